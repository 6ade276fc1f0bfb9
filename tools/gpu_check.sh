#!/usr/bin/env bash
# The first check on a machine with one NVIDIA GPU, in stages. Each stage writes its results
# under $OUT as soon as it finishes, so a run cut short still leaves what ran.
#
#   stage 0  environment: install wheels found in wheels/ whose package is missing (no
#            network needed), import torch, triton, megatron-core and the kernels
#   stage 1  kernel correctness: pytest -x -m gpu tests/gpu (the kernels compile on first use;
#            each training case checks the output and every gradient)
#   stage 2  only if stage 1 passed: tools/bench_kernels.py at sequence 2048 and 8192, head
#            dims 64, 96, 128 and 160 (the paper configs' head dims)
#   stage 3  fusedkv-pretrain on one GPU, mock data, bf16, the 332m shape with 4 layers and
#            sequence 4096: the local backend, then Transformer Engine and TE with FP8 where TE
#            imports (FP8 on compute capability 8.9+); each runs 3 iterations, saves, resumes
#            and runs 2 more. The local run's measured peak memory is put next to
#            fusedkv-plan's prediction for the same flags.
#   stage 4  tools/bench_model.py at the same shape (sequence 8192, batch 1): tokens/s of
#            fusedkv vs vanilla, and vanilla vs a plain Megatron-Core GPTModel from
#            Megatron's own spec with the same config (the "no overhead" ratio); with TE
#            specs too where TE imports
#
# Worst case (every stage runs into its timeout): 60 + 135 + 4 x 40 + 3 x 100 + 2 x 90 =
# 835 s, plus ~15 s of shell and summary: about 14 minutes. A healthy H100 run is expected to
# take 6-8 minutes, most of it kernel compilation and start-up (not measured yet).
#
#   bash tools/gpu_check.sh                      # results in $OUT, default /tmp/gpu_check
#   OUT=results/h100 PY=.venv/bin/python bash tools/gpu_check.sh
#
# Results: status.txt (one line per stage as it ends), env.txt, gpu_tests.log/.xml,
# bench_d{64,96,128,160}.{log,md,json}, train_*.log, memory.md, model_{local,te}.{log,json}.
# Environment: PY (default python3), STAGE0_TIMEOUT..STAGE4_TIMEOUT (seconds, per run of the
# stage), BENCH_ARGS (extra bench_kernels.py arguments), GPU_CHECK_ALLOW_CPU=1 (run the same
# flow without a GPU at tiny sizes: the GPU tests skip, the kernels run in Triton's
# interpreter, training and the model benchmark run on the CPU; for checking this script).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="${PY:-python3}"
RESULTS="${OUT:-/tmp/gpu_check}"
SITE="/tmp/gpu_check_site"
T0="${STAGE0_TIMEOUT:-60}" T1="${STAGE1_TIMEOUT:-135}" T2="${STAGE2_TIMEOUT:-40}"
T3="${STAGE3_TIMEOUT:-100}" T4="${STAGE4_TIMEOUT:-90}"
CPU_FLOW="${GPU_CHECK_ALLOW_CPU:-0}"
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
  # Each wheel in wheels/ (or .whl/) whose distribution is not installed goes into $SITE:
  # no network, no dependency resolution (a GPU image usually lacks megatron-core only).
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
  "$PY" - "$RESULTS" <<'EOF'
import os
import sys

import torch
import triton

results = sys.argv[1]
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"triton {triton.__version__}")
try:
    import megatron.core

    import fusedkv_megatron.kernels.triton_attention  # noqa: F401
except ImportError as err:
    sys.exit(
        f"gpu_check: {err}. If megatron-core is missing, download its wheel where there is a "
        "network\n  pip download --no-deps megatron-core==0.19.2 -d wheels/\nand copy wheels/ "
        "into this checkout (see docs/benchmarks.md)"
    )
print("megatron-core", megatron.core.__version__)
from fusedkv_megatron.spec import transformer_engine_import_error

te_error = transformer_engine_import_error()
print("transformer engine:", "imports" if te_error is None else f"not usable ({te_error})")
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    print(f"device: {props.name}, {props.total_memory / 2**30:.1f} GiB, sm_{props.major}{props.minor}")
    flags = dict(cuda=1, te=int(te_error is None), gib=int(props.total_memory / 2**30),
                 fp8=int(te_error is None and (props.major, props.minor) >= (8, 9)))
elif os.environ.get("GPU_CHECK_ALLOW_CPU") == "1":
    print("device: none (GPU_CHECK_ALLOW_CPU=1: the flow runs on the CPU at tiny sizes)")
    flags = dict(cuda=0, te=0, gib=80, fp8=0)
else:
    sys.exit("gpu_check: torch sees no CUDA device; nothing to check (GPU_CHECK_ALLOW_CPU=1 runs "
             "the flow on the CPU)")
with open(f"{results}/device.env", "w") as f:
    f.write("".join(f"GPU_{k.upper()}={v}\n" for k, v in flags.items()))
EOF
}

step "stage 0: environment and packages (timeout ${T0}s)"
start=$SECONDS
export -f stage0
export RESULTS
timeout "$T0" bash -c stage0 2>&1 | tee "$RESULTS/env.txt"
rc0=${PIPESTATUS[0]}
record 0 "$rc0" $((SECONDS - start))
[ "$rc0" -eq 0 ] || { cat "$RESULTS/status.txt"; exit 1; }
# shellcheck disable=SC1091
. "$RESULTS/device.env"

rc1=skipped
step "stage 1: compile and correctness, pytest -x -m gpu tests/gpu (timeout ${T1}s)"
start=$SECONDS
timeout "$T1" "$PY" -m pytest -x -m gpu tests/gpu -q -rA -p no:cacheprovider \
  --junitxml="$RESULTS/gpu_tests.xml" 2>&1 | tee "$RESULTS/gpu_tests.log"
rc1=${PIPESTATUS[0]}
record 1 "$rc1" $((SECONDS - start))

rc2=skipped
if [ "$rc1" = 0 ]; then
  step "stage 2: kernel benchmarks at 2k and 8k, head dims 64 96 128 160 (timeout ${T2}s each)"
  start=$SECONDS
  rc2=0
  if [ "$GPU_CUDA" = 1 ]; then kargs=(--seqs 2048 8192); else kargs=(--smoke-cpu --seqs 20 --tokens 20 --decode-batch 1 --heads 2 --kv-heads 1); fi
  for d in 64 96 128 160; do
    # shellcheck disable=SC2086
    TRITON_INTERPRET=$((1 - GPU_CUDA)) timeout "$T2" "$PY" tools/bench_kernels.py "${kargs[@]}" \
      --head-dim "$d" --markdown "$RESULTS/bench_d$d.md" --json "$RESULTS/bench_d$d.json" \
      ${BENCH_ARGS:-} >"$RESULTS/bench_d$d.log" 2>&1
    rc=$?
    echo "  head dim $d: $(describe $rc)"
    [ "$rc" -eq 0 ] || rc2=$rc
  done
  record 2 "$rc2" $((SECONDS - start))
fi

# Stage 3: the trainer. The 332m shape (hidden 1024, 16 heads of 64, ffn 2816, 128k vocab)
# with 4 layers at sequence 4096 on a GPU; a tiny model on the CPU.
if [ "$GPU_CUDA" = 1 ]; then
  SHAPE=(--num-layers 4 --hidden-size 1024 --ffn-hidden-size 2816 --num-attention-heads 16
         --kv-channels 64 --seq-length 4096 --vocab-size 128000 --micro-batch-size 1
         --global-batch-size 4)
else
  SHAPE=(--num-layers 4 --hidden-size 64 --ffn-hidden-size 128 --num-attention-heads 4
         --seq-length 64 --vocab-size 512 --micro-batch-size 2 --global-batch-size 2 --allow-cpu)
fi
TRAIN=(--mock-data --bf16 --kv-sharing fusedkv --log-interval 1 --eval-interval 1000
       --eval-iters 1 --lr 3e-4 --min-lr 3e-5 "${SHAPE[@]}")

train_and_resume() { # name, extra flags...: 3 iterations + save, then resume to 5
  local name=$1 ckpt="$RESULTS/ckpt_$1" rc
  shift
  rm -rf "$ckpt"
  timeout "$T3" "$PY" -m fusedkv_megatron.pretrain "${TRAIN[@]}" "$@" --train-iters 3 \
    --save "$ckpt" >"$RESULTS/train_$name.log" 2>&1
  rc=$?
  if [ "$rc" -eq 0 ]; then
    timeout "$T3" "$PY" -m fusedkv_megatron.pretrain "${TRAIN[@]}" "$@" --train-iters 5 \
      --load "$ckpt" --save "$ckpt" >>"$RESULTS/train_$name.log" 2>&1
    rc=$?
    if [ "$rc" -eq 0 ] && ! grep -q "training from iteration 3 to 5" "$RESULTS/train_$name.log"; then
      echo "  $name: the second run did not resume from iteration 3" >>"$RESULTS/train_$name.log"
      rc=1
    fi
  fi
  grep -E "^> (fusions|data-parallel|backend|attention)|iteration +[0-9]+/" "$RESULTS/train_$name.log" | tail -12
  rm -rf "$ckpt"
  echo "  $name: $(describe "$rc")"
  return "$rc"
}

step "stage 3: fusedkv-pretrain, mock data, bf16: local backend, then TE and TE+FP8 (timeout ${T3}s per run)"
start=$SECONDS
rc3=0
train_and_resume local --transformer-impl local || rc3=$?
if [ "$GPU_TE" = 1 ]; then
  train_and_resume te --transformer-impl transformer_engine || rc3=$?
  if [ "$GPU_FP8" = 1 ]; then
    train_and_resume te_fp8 --transformer-impl transformer_engine --fp8-format hybrid \
      --fp8-recipe delayed || rc3=$?
  else
    echo "  te_fp8: skipped (FP8 needs compute capability 8.9 or newer)"
  fi
else
  echo "  te, te_fp8: skipped (Transformer Engine does not import: see env.txt)"
fi
# Peak memory: the local run's last logged "max" next to the planner's peak for the same flags.
"$PY" - "$RESULTS" "$GPU_GIB" "${TRAIN[@]}" --transformer-impl local --train-iters 5 <<'EOF' | tee "$RESULTS/memory.md"
import re
import subprocess
import sys

results, gib, flags = sys.argv[1], sys.argv[2], sys.argv[3:]
flags = [f for f in flags if f != "--allow-cpu"]
log = open(f"{results}/train_local.log").read()
peaks = re.findall(r"memory \(GiB?\):[^|]*?([\d.]+) max", log)
measured = f"{peaks[-1]} GiB" if peaks else "not logged (no GPU)"
cmd = [sys.executable, "-m", "fusedkv_megatron.planner.cli", *flags,
       "--gpus-per-node", "1", "--gpu-memory", gib]
plan = subprocess.run(cmd, capture_output=True, text=True)
line = next((ln for ln in plan.stdout.splitlines() if ln.startswith("peak per GPU")), None)
predicted = line.split(":", 1)[1].split(" of ")[0].strip() if line else f"planner failed: {plan.stderr[-300:]}"
print("| run | measured peak (torch max allocated) | fusedkv-plan's peak |")
print("|---|---|---|")
print(f"| fusedkv, local backend, bf16, {' '.join(flags)} | {measured} | {predicted} |")
EOF
record 3 "$rc3" $((SECONDS - start))

step "stage 4: tokens/s, fusedkv vs vanilla vs Megatron-Core GPTModel (timeout ${T4}s per run)"
start=$SECONDS
rc4=0
if [ "$GPU_CUDA" = 1 ]; then
  MODEL=(--layers 4 --hidden 1024 --heads 16 --ffn 2816 --vocab 128000 --seq 8192 --batch 1
         --rounds 5 --bf16)
else
  MODEL=(--layers 4 --hidden 64 --heads 4 --ffn 128 --vocab 512 --seq 64 --batch 2 --rounds 2)
fi
specs=(local)
[ "$GPU_TE" = 1 ] && specs+=(te)
for spec in "${specs[@]}"; do
  extra=()
  [ "$spec" = te ] && extra=(--te)
  timeout "$T4" "$PY" tools/bench_model.py --variants vanilla fusedkv "${MODEL[@]}" "${extra[@]}" \
    --json "$RESULTS/model_$spec.json" >"$RESULTS/model_$spec.log" 2>&1
  rc=$?
  grep -vE "Warning|warn|DEPRECATED" "$RESULTS/model_$spec.log" | tail -6
  echo "  $spec specs: $(describe $rc)"
  [ "$rc" -eq 0 ] || rc4=$rc
done
record 4 "$rc4" $((SECONDS - start))

step "summary"
cat "$RESULTS/status.txt"
[ "$rc1" != skipped ] && { grep -E "^(PASSED|FAILED|ERROR|SKIPPED)" "$RESULTS/gpu_tests.log" | sed 's/^/  /' || true; }
for d in 64 96 128 160; do [ -s "$RESULTS/bench_d$d.md" ] && cat "$RESULTS/bench_d$d.md"; done
cat "$RESULTS/memory.md"
echo "total ${SECONDS}s (worst case about 14 minutes)"
[ "$rc1" = 0 ] && [ "$rc2" = 0 ] && [ "$rc3" = 0 ] && [ "$rc4" = 0 ]
