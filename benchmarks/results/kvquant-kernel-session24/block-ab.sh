# kvquant_step_time.py with BLOCK = 64 and 128 alternated, two rounds per context (session 24). Run from anywhere;
# it edits src/kvcompress/kernels/kvquant_cpu.py in place and puts the file back as it was, whatever happens.
cd "$(dirname "$0")/../../.." || exit 1
kernel=src/kvcompress/kernels/kvquant_cpu.py
saved=$(mktemp)
cp "$kernel" "$saved"
trap 'cp "$saved" "$kernel"; rm -f "$saved"' EXIT
for ctx in 4096 8192; do
for round in 1 2; do
for blk in 64 128; do
  sed -i "s/^BLOCK = [0-9]*$/BLOCK = $blk/" "$kernel"
  echo "== ctx $ctx block $blk round $round"
  NUMBA_CACHE_DIR="${TMPDIR:-/tmp}/kvq-block-ab/nb$blk" .venv/bin/python benchmarks/kvquant_step_time.py \
    --context $ctx --threads 1 2>/dev/null | tail -1
done; done; done
