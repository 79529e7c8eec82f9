cd /work/main
export KVCOMPRESS_CACHE=/tmp/kvc-cache
for ctx in 4096 8192; do
for round in 1 2; do
for blk in 64 128; do
  sed -i "s/^BLOCK = [0-9]*$/BLOCK = $blk/" src/kvcompress/kernels/kvquant_cpu.py
  echo "== ctx $ctx block $blk round $round"
  NUMBA_CACHE_DIR=/tmp/s24/nb$blk .venv/bin/python benchmarks/kvquant_step_time.py --context $ctx --threads 1 2>/dev/null | tail -1
done; done; done
sed -i "s/^BLOCK = [0-9]*$/BLOCK = 64/" src/kvcompress/kernels/kvquant_cpu.py
