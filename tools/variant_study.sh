#!/usr/bin/env bash
# A small-scale study of the KV-sharing variants on the embedded English text (CPU or GPU):
# vanilla, gqa, cla, yoco, fusedkv, fusedkv_lite and the dense_probe, with identical data, seed
# and schedule, plus a second seed of vanilla and fusedkv for the seed-to-seed spread; then
# fusedkv-compare over all runs and fusedkv-probe-report on the probe. docs/research.md.
#
#   bash tools/variant_study.sh                 # everything (resumes whatever is already done)
#   STUDY_ITERS=2 bash tools/variant_study.sh   # a smoke check of the whole pipeline
#
# Each run trains with --save/--load into STUDY_DIR/<run>/checkpoints, so running the script
# again resumes an interrupted run and skips a finished one (the trainer only re-evaluates).
#   STUDY_DIR       output directory (default: <repo>/runs/study)
#   STUDY_ITERS     iterations per run (default 500; the schedule scales with it)
#   STUDY_RUNS      runs to train, as variant:seed (default: the list below)
#   STUDY_NPROC     processes for torchrun (default 1)
#   STUDY_PYTHON    a Python with fusedkv_megatron installed (default: tools/env.sh's venv)
#   STUDY_EXTRA     extra fusedkv-pretrain flags for every run (e.g. "--bf16" on a GPU)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -n "${STUDY_PYTHON:-}" ]; then
    PY="$STUDY_PYTHON"
else
    FUSEDKV_EXTRAS="${FUSEDKV_EXTRAS:-test}" source "$REPO/tools/env.sh"
fi
cd "$REPO"

OUT="${STUDY_DIR:-$REPO/runs/study}"
ITERS="${STUDY_ITERS:-500}"
NPROC="${STUDY_NPROC:-1}"
RUNS="${STUDY_RUNS:-vanilla:1234 gqa:1234 cla:1234 yoco:1234 fusedkv:1234 fusedkv_lite:1234 dense_probe:1234 vanilla:4321 fusedkv:4321}"
# The schedule as a fraction of the run: warmup 10%, validation every 10%, a checkpoint every 20%.
WARMUP=$(( ITERS / 10 > 1 ? ITERS / 10 : 1 ))
EVAL=$(( ITERS / 10 > 1 ? ITERS / 10 : 1 ))
SAVE=$(( ITERS / 5 > 1 ? ITERS / 5 : 1 ))
LOG=$(( ITERS / 50 > 1 ? ITERS / 50 : 1 ))
mkdir -p "$OUT"

echo "[study] data and tokenizer in $OUT/data"
eval "$("$PY" -m fusedkv_megatron.data.datasets "$OUT/data")"

# The model: examples/configs/tiny.yaml at 8 layers (4 storage + 4 top layers): 6.8M parameters
# without embeddings (vanilla; 8.9M with the tied 8k-vocabulary embedding), 256 tokens x 16
# sequences per iteration.
COMMON=(
    --config examples/configs/tiny.yaml
    --num-layers 8
    --train-iters "$ITERS"
    --lr-warmup-iters "$WARMUP"
    --eval-interval "$EVAL"
    --eval-iters 8
    --save-interval "$SAVE"
    --log-interval "$LOG"
    --train-data-path "$TRAIN_DATA_PREFIX"
    --valid-data-path "$HELDOUT_DATA_PREFIX"
    --tokenizer-model "$TOKENIZER_MODEL"
)
if [ "$NPROC" -gt 1 ]; then
    LAUNCH=("$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC")
else
    LAUNCH=("$PY")
fi

names=()
for spec in $RUNS; do
    variant="${spec%%:*}"
    seed="${spec##*:}"
    name="${variant}-s${seed}"
    names+=("$OUT/$name")
    flags=(--kv-sharing "$variant" --seed "$seed")
    # The probe starts every weight at 1/(number of storage layers): no source is favoured.
    [ "$variant" = dense_probe ] && flags+=(--fusion-init uniform)
    dir="$OUT/$name"
    mkdir -p "$dir"
    echo "[study] $name: ${flags[*]} (log: $dir/train.log)"
    start=$(date +%s)
    # shellcheck disable=SC2086  # STUDY_EXTRA is a list of flags
    "${LAUNCH[@]}" -m fusedkv_megatron.pretrain "${COMMON[@]}" "${flags[@]}" \
        --save "$dir/checkpoints" --load "$dir/checkpoints" --tensorboard-dir "$dir/tensorboard" \
        ${STUDY_EXTRA:-} >>"$dir/train.log" 2>&1 || {
        echo "[study] $name failed; see $dir/train.log" >&2
        exit 1
    }
    echo "[study] $name done ($(( $(date +%s) - start )) s)"
done

echo "[study] comparing the runs"
# The difference plot subtracts the first vanilla run (vanilla-s1234 in the default list).
"$PY" -m fusedkv_megatron.research.compare "${names[@]}" --out "$OUT/report"
for dir in "${names[@]}"; do
    case "$dir" in
        */dense_probe-*) "$PY" -m fusedkv_megatron.research.probe "$dir" --out "$OUT/report/$(basename "$dir")" ;;
    esac
done
echo "[study] report: $OUT/report/report.md"
