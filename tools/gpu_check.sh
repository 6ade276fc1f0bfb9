#!/usr/bin/env bash
# One call on a GPU machine: install what is missing from carried wheels, run the GPU tests
# (pytest -m gpu tests/gpu) and the kernel benchmark, print a short table. Budget: 8 minutes.
#
# Prepare on the development machine (once):
#   .venv/bin/python -m pip download --no-deps megatron-core==0.19.2 -d wheels/
# then, through the device tool, from the repository root:
#   run(command="bash tools/gpu_check.sh", carry=["wheels"], timeout_s=540)
# Results: the table on stdout; logs, junit XML, bench.md and bench.json under $OUT (or
# /tmp/gpu_check). Copy the table into docs/benchmarks.md with the date and machine.
#
# Environment: PY (python, default python3), GPU_TEST_TIMEOUT (s, default 270),
# BENCH_TIMEOUT (s, default 170), BENCH_ARGS (extra tools/bench_kernels.py arguments),
# GPU_CHECK_ALLOW_CPU=1 (run the flow without a GPU: tests skip, the benchmark refuses).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="${PY:-python3}"
RESULTS="${OUT:-/tmp/gpu_check}"
SITE="/tmp/gpu_check_site"
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"

step() { printf '\n=== [%4ss] %s ===\n' "$SECONDS" "$*"; }

step "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" - <<'EOF'
import os
import sys

import torch
import triton

print(f"python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}")
if torch.cuda.is_available():
    print("device:", torch.cuda.get_device_name())
elif os.environ.get("GPU_CHECK_ALLOW_CPU") != "1":  # =1 only to test this script's flow
    sys.exit("gpu_check: torch sees no CUDA device; nothing to check")
EOF

step "packages"
# Install each carried wheel (wheels/ or .whl/) whose distribution is not installed: no
# network, no dependency resolution. megatron-core is the one the GPU image lacks.
mkdir -p "$SITE"
"$PY" - "$SITE" <<'EOF'
import glob
import importlib.metadata as md
import subprocess
import sys
import zipfile

site = sys.argv[1]
for whl in sorted(glob.glob("wheels/*.whl") + glob.glob(".whl/*.whl")):
    dist = whl.rsplit("/", 1)[-1].split("-")[0]
    try:
        print(f"{dist}: installed ({md.version(dist)}), {whl} not needed")
        continue
    except md.PackageNotFoundError:
        pass
    print(f"{dist}: installing {whl} into {site}")
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
           "--no-compile", "--target", site, whl]
    if subprocess.run(cmd).returncode != 0:
        zipfile.ZipFile(whl).extractall(site)  # a wheel is a zip of site-packages
EOF
export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import megatron.core" 2>/dev/null; then
  echo "megatron-core is missing and no wheel of it was carried: on the dev machine run"
  echo "  .venv/bin/python -m pip download --no-deps megatron-core==0.19.2 -d wheels/"
  echo "and call the device tool with carry=[\"wheels\"]"
  exit 2
fi
"$PY" -c "import megatron.core, fusedkv_megatron; print('megatron-core', megatron.core.__version__)"

step "GPU tests (timeout ${GPU_TEST_TIMEOUT:-270}s)"
rc_tests=0
set -o pipefail
timeout "${GPU_TEST_TIMEOUT:-270}" "$PY" -m pytest -m gpu tests/gpu -q -rA -p no:cacheprovider \
  --junitxml="$RESULTS/gpu_tests.xml" 2>&1 | tee "$RESULTS/gpu_tests.log" || rc_tests=$?

step "benchmark (timeout ${BENCH_TIMEOUT:-170}s)"
rc_bench=0
# shellcheck disable=SC2086
timeout "${BENCH_TIMEOUT:-170}" "$PY" tools/bench_kernels.py --markdown "$RESULTS/bench.md" \
  --json "$RESULTS/bench.json" ${BENCH_ARGS:-} 2>&1 | tee "$RESULTS/bench.log" || rc_bench=$?

step "summary"
describe() { case "$1" in 0) echo "ok" ;; 124) echo "TIMED OUT" ;; *) echo "FAILED (rc=$1)" ;; esac; }
echo "GPU tests: $(describe "$rc_tests")   (log: $RESULTS/gpu_tests.log)"
grep -E "^(PASSED|FAILED|ERROR|SKIPPED)" "$RESULTS/gpu_tests.log" | sed 's/^/  /' || true
echo "benchmark: $(describe "$rc_bench")   (tables: $RESULTS/bench.md)"
[ -s "$RESULTS/bench.md" ] && cat "$RESULTS/bench.md"
echo "total ${SECONDS}s"
if [ "$rc_tests" -ne 0 ] || [ "$rc_bench" -ne 0 ]; then
  exit 1
fi
