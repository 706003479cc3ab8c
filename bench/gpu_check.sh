#!/usr/bin/env bash
# One-shot check on a lent GPU machine (no network), from the repo root, 9 minutes at
# most: installs the wheels in .whl/ (filled beforehand where there is network, as
# README.md says) and ftlaunch, runs the GPU tier (tests/test_gpu.py), then bench/gpu.py
# for llama-3.2-1b with the time left. Logs go to $OUT (default /tmp/ftlaunch-gpu-check).
#   bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
out=${OUT:-/tmp/ftlaunch-gpu-check}
mkdir -p "$out"
end=$((SECONDS + 510))            # everything below, the install included
left() { echo $((end - SECONDS)); }
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PIP_BREAK_SYSTEM_PACKAGES=1 \
       PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

ls .whl/*.whl >/dev/null 2>&1 || { echo "gpu_check: no wheels in .whl/ (README.md)" >&2; exit 2; }
# A venv over the image's packages (torch, transformers, ...), unless the image's python3
# is a venv itself (one made from it would not see them): then into that one.
py=$(command -v python3) venv=/tmp/ftlaunch-gpu-venv
if python3 -c 'import sys; sys.exit(sys.prefix != sys.base_prefix)' &&
   python3 -m venv --system-site-packages "$venv" >/dev/null 2>&1; then
  py=$venv/bin/python
fi
timeout 240 "$py" -m pip install -q --no-index --find-links .whl --no-deps .whl/*.whl ||
  { echo "gpu_check: installing .whl/ into $py failed" >&2; exit 2; }
if ! timeout 120 "$py" -m pip install -q --no-index --no-build-isolation --no-deps -e .; then
  echo "gpu_check: pip install -e . failed; ftlaunch from launcher/ through PYTHONPATH" >&2
  export PYTHONPATH=$PWD/launcher${PYTHONPATH:+:$PYTHONPATH}
fi
# The tests and bench/gpu.py start the ftlaunch script beside their python.
script=$("$py" -c 'import os, sys; print(os.path.dirname(sys.executable))')/ftlaunch
if [ ! -x "$script" ]; then
  printf '#!%s\nfrom ftlaunch.cli import main\nmain()\n' "$py" > "$script" && chmod +x "$script"
fi
"$py" -c 'import ftlaunch.cli' || { echo "gpu_check: ftlaunch does not import" >&2; exit 2; }
"$py" -c 'import pytest' || { echo "gpu_check: no pytest; put its wheels in .whl first:" \
  "python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12" \
  "-d .whl pytest==9.2.0 pluggy iniconfig" >&2; exit 2; }
{ nvidia-smi; "$py" -m pip list; } > "$out/environment.txt" 2>&1

# SIGINT: pytest stops and still prints what passed and failed so far.
t=$(left); [ "$t" -gt 420 ] && t=420
timeout -s INT -k 30 "$t" "$py" -m pytest -m gpu tests/test_gpu.py -q -rA \
  --junitxml "$out/test-gpu.xml" 2>&1 | tee "$out/test-gpu.txt"
tests=${PIPESTATUS[0]}

bench=skipped
if [ "$(left)" -gt 90 ]; then
  timeout -s INT -k 30 "$(left)" "$py" bench/gpu.py --models llama-3.2-1b --steps 4 \
    --seq-len 1024 2>&1 | tee "$out/bench-gpu.txt"
  bench=${PIPESTATUS[0]}
fi
echo "gpu_check: tests exit $tests, bench $bench (124: out of time), ${SECONDS} s; logs in $out"
[ "$tests" = 0 ] && [ "$bench" = 0 ]
