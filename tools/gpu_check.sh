#!/usr/bin/env bash
# The GPU check in stages; each stage writes its results under $OUT as soon as it finishes,
# so a call cut short still returns what ran.
#
#   stage 0  environment and packages: install carried wheels that are missing, import
#   stage 1  correctness: pytest -x -m gpu tests/gpu (the kernels compile on first use, with a
#            cold Triton cache; each training case checks the output and every gradient)
#   stage 2  only if stage 1 passed: tools/bench_kernels.py at sequence 2048 and 8192
#
# Worst case (every stage runs into its timeout): 60 + 135 + 60 = 255 s, plus ~10 s of shell
# and summary = 4 min 25 s. With ~3 min of machine start-up a call takes at most ~7.5 min, so
# a second call (a rerun after a fix, ~7.5 min again if the machine went back) still fits in
# a 15-minute device budget. Call with a timeout above the worst case:
#   run(command="bash tools/gpu_check.sh", carry=["wheels"], timeout_s=300)
# Prepare on the development machine (once):
#   .venv/bin/python -m pip download --no-deps megatron-core==0.19.2 -d wheels/
#
# Results under $OUT (or /tmp/gpu_check): status.txt (one line per stage as it ends),
# env.txt, gpu_tests.log + gpu_tests.xml, bench.log + bench.md + bench.json.
# Environment: PY (default python3), STAGE0_TIMEOUT / STAGE1_TIMEOUT / STAGE2_TIMEOUT (s),
# BENCH_ARGS (extra bench_kernels.py arguments), GPU_CHECK_ALLOW_CPU=1 (run the flow without
# a GPU: the tests skip and the benchmark refuses; for checking this script).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="${PY:-python3}"
RESULTS="${OUT:-/tmp/gpu_check}"
SITE="/tmp/gpu_check_site"
T0="${STAGE0_TIMEOUT:-60}" T1="${STAGE1_TIMEOUT:-135}" T2="${STAGE2_TIMEOUT:-60}"
mkdir -p "$RESULTS" "$SITE"
export PY SITE PYTHONUNBUFFERED=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}"
: >"$RESULTS/status.txt"

describe() { case "$1" in 0) echo "ok" ;; 124) echo "TIMED OUT" ;; *) echo "FAILED (rc=$1)" ;; esac; }
record() { # stage, rc, seconds
  echo "stage $1: $(describe "$2") after $3 s" | tee -a "$RESULTS/status.txt"
}
step() { printf '\n=== [%4ss] %s ===\n' "$SECONDS" "$*"; }

stage0() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  # Each carried wheel (wheels/ or .whl/) whose distribution is not installed goes into $SITE:
  # no network, no dependency resolution. megatron-core is the one the GPU image lacks.
  "$PY" - "$SITE" <<'EOF' || return 1
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
  "$PY" - <<'EOF'
import os
import sys

import torch
import triton

print(f"python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}")
try:
    import megatron.core

    import fusedkv_megatron.kernels.triton_attention  # noqa: F401
except ImportError as err:
    sys.exit(
        f"gpu_check: {err}. If megatron-core is missing, run on the development machine\n"
        "  .venv/bin/python -m pip download --no-deps megatron-core==0.19.2 -d wheels/\n"
        'and call the device tool with carry=["wheels"]'
    )
print("megatron-core", megatron.core.__version__)
if torch.cuda.is_available():
    print("device:", torch.cuda.get_device_name())
elif os.environ.get("GPU_CHECK_ALLOW_CPU") != "1":
    sys.exit("gpu_check: torch sees no CUDA device; nothing to check")
EOF
}

step "stage 0: environment and packages (timeout ${T0}s)"
start=$SECONDS
export -f stage0
timeout "$T0" bash -c stage0 2>&1 | tee "$RESULTS/env.txt"
rc0=${PIPESTATUS[0]}
record 0 "$rc0" $((SECONDS - start))

rc1=skipped
if [ "$rc0" -eq 0 ]; then
  step "stage 1: compile and correctness, pytest -x -m gpu tests/gpu (timeout ${T1}s)"
  start=$SECONDS
  timeout "$T1" "$PY" -m pytest -x -m gpu tests/gpu -q -rA -p no:cacheprovider \
    --junitxml="$RESULTS/gpu_tests.xml" 2>&1 | tee "$RESULTS/gpu_tests.log"
  rc1=${PIPESTATUS[0]}
  record 1 "$rc1" $((SECONDS - start))
fi

rc2=skipped
if [ "$rc1" = 0 ]; then
  step "stage 2: benchmark at 2k and 8k (timeout ${T2}s)"
  start=$SECONDS
  # shellcheck disable=SC2086
  timeout "$T2" "$PY" tools/bench_kernels.py --seqs 2048 8192 --markdown "$RESULTS/bench.md" \
    --json "$RESULTS/bench.json" ${BENCH_ARGS:-} 2>&1 | tee "$RESULTS/bench.log"
  rc2=${PIPESTATUS[0]}
  record 2 "$rc2" $((SECONDS - start))
fi

step "summary"
cat "$RESULTS/status.txt"
[ "$rc1" != skipped ] && { grep -E "^(PASSED|FAILED|ERROR|SKIPPED)" "$RESULTS/gpu_tests.log" | sed 's/^/  /' || true; }
[ -s "$RESULTS/bench.md" ] && cat "$RESULTS/bench.md"
echo "total ${SECONDS}s (worst case 4 min 25 s)"
[ "$rc0" -eq 0 ] && [ "$rc1" = 0 ] && [ "$rc2" = 0 ]
