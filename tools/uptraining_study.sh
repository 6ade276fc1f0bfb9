#!/usr/bin/env bash
# A small uptraining study on the embedded English text (CPU or GPU): a vanilla model is
# pretrained, converted by fusedkv-convert-variant into fusedkv (normal / lite / equivalent
# fusion init), fusedkv_lite and yoco, and each conversion is trained for 10% of the pretraining
# iterations; a vanilla control gets the same extra training (fresh optimizer, new warm-up).
# The table (validation loss on the held-out text before conversion, right after it, after
# uptraining) goes to UPTRAIN_DIR/table.md. docs/uptraining.md.
#
#   bash tools/uptraining_study.sh                                        # everything
#   UPTRAIN_PRETRAIN_ITERS=2 UPTRAIN_ITERS=2 bash tools/uptraining_study.sh   # a smoke check
#
# Every training uses --save/--load, every step skips what is already done: run the script
# again to resume an interrupted study.
#   UPTRAIN_DIR             output directory (default: <repo>/runs/uptraining)
#   UPTRAIN_PRETRAIN_ITERS  iterations of the vanilla pretraining (default 500)
#   UPTRAIN_ITERS           iterations of each uptraining (default: 10% of the pretraining)
#   UPTRAIN_SOURCE          an existing vanilla --save directory to start from instead of
#                           pretraining one (e.g. runs/study/vanilla-s1234/checkpoints of
#                           tools/variant_study.sh: the same model, flags and seed as here)
#   UPTRAIN_DATA_DIR        the prepared corpus (default UPTRAIN_DIR/data); with UPTRAIN_SOURCE,
#                           the directory that run was trained from (runs/study/data): two
#                           preparations train tokenizers that encode the same text identically
#                           but differ in bytes, and the data loader refuses a mismatch
#   UPTRAIN_CASES           variant:init pairs (default: the list below; init "-" = none)
#   UPTRAIN_NPROC           processes for torchrun (default 1)
#   UPTRAIN_PYTHON          a Python with fusedkv_megatron installed (default: tools/env.sh's)
#   UPTRAIN_EXTRA           extra fusedkv-pretrain flags for every training (e.g. "--bf16")
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -n "${UPTRAIN_PYTHON:-}" ]; then
    PY="$UPTRAIN_PYTHON"
else
    FUSEDKV_EXTRAS="${FUSEDKV_EXTRAS:-test}" source "$REPO/tools/env.sh"
fi
cd "$REPO"

OUT="${UPTRAIN_DIR:-$REPO/runs/uptraining}"
PRE="${UPTRAIN_PRETRAIN_ITERS:-500}"
UP="${UPTRAIN_ITERS:-$(( PRE / 10 > 1 ? PRE / 10 : 1 ))}"
NPROC="${UPTRAIN_NPROC:-1}"
CASES="${UPTRAIN_CASES:-fusedkv:normal fusedkv:lite fusedkv:equivalent fusedkv_lite:- yoco:- vanilla:-}"
SEED=1234
EVAL_ITERS=8  # x the global batch (16) = the validation samples of every number in the table
mkdir -p "$OUT"
read -r -a EXTRA <<< "${UPTRAIN_EXTRA:-}"

DATA="${UPTRAIN_DATA_DIR:-$OUT/data}"
echo "[uptraining] data and tokenizer in $DATA"
eval "$("$PY" -m fusedkv_megatron.data.datasets "$DATA")"

# The model of tools/variant_study.sh: examples/configs/tiny.yaml at 8 layers.
MODEL=(
    --config examples/configs/tiny.yaml
    --num-layers 8
    --seed "$SEED"
    --eval-iters "$EVAL_ITERS"
    --train-data-path "$TRAIN_DATA_PREFIX"
    --valid-data-path "$HELDOUT_DATA_PREFIX"
    --tokenizer-model "$TOKENIZER_MODEL"
)
if [ "$NPROC" -gt 1 ]; then
    LAUNCH=("$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC")
else
    LAUNCH=("$PY")
fi
every() { local n=$(( $1 / $2 )); echo $(( n > 1 ? n : 1 )); }  # iterations / parts, >= 1
latest() { cat "$1/latest_checkpointed_iteration.txt" 2>/dev/null || echo none; }
run() { echo "+ $*" >&2; "$@"; }

# Validation loss of the latest checkpoint under $1 on the held-out text: the samples and the
# loss of the trainer's validation (fusedkv_megatron/uptrain_eval.py), for any variant. Every
# command the study runs is logged as a "+ ..." line in its log (train, convert, uptrain.log).
evaluate() {
    "$PY" - "$1" "$HELDOUT_DATA_PREFIX" "$(( EVAL_ITERS * 16 ))" "$SEED" <<'EOF'
import sys
from fusedkv_megatron.hf.megatron_io import load_megatron_checkpoint
from fusedkv_megatron import checkpoint_format as cf
from fusedkv_megatron.uptrain import Model
from fusedkv_megatron.uptrain_eval import validation_loss

info, ckpt, state = load_megatron_checkpoint(sys.argv[1])
model = Model(info, state, cf.tokenizer_path(ckpt, info), str(ckpt))
loss = validation_loss(model, sys.argv[2], samples=int(sys.argv[3]), micro_batch_size=8,
                       seed=int(sys.argv[4]))
print(f"{loss:.4f}")
EOF
}

# 1. The vanilla model (the variant study's vanilla run, unless UPTRAIN_SOURCE names one).
SOURCE="${UPTRAIN_SOURCE:-$OUT/vanilla/checkpoints}"
if [ -z "${UPTRAIN_SOURCE:-}" ] && [ "$(latest "$SOURCE")" != "$PRE" ]; then
    echo "[uptraining] pretraining vanilla for $PRE iterations (log: $OUT/vanilla/train.log)"
    mkdir -p "$OUT/vanilla"
    run "${LAUNCH[@]}" -m fusedkv_megatron.pretrain "${MODEL[@]}" --kv-sharing vanilla \
        --train-iters "$PRE" --lr-warmup-iters "$(every "$PRE" 10)" \
        --eval-interval "$(every "$PRE" 10)" --save-interval "$(every "$PRE" 5)" \
        --log-interval "$(every "$PRE" 50)" --save "$SOURCE" --load "$SOURCE" \
        "${EXTRA[@]}" > "$OUT/vanilla/train.log" 2>&1
fi
[ -s "$OUT/before.txt" ] || evaluate "$SOURCE" > "$OUT/before.txt" 2>> "$OUT/evaluate.log"
echo "[uptraining] vanilla at iteration $(latest "$SOURCE"): validation loss $(cat "$OUT/before.txt")"

# 2. Per case: convert (iteration 0, loss right after), uptrain UP iterations, evaluate.
for case in $CASES; do
    variant="${case%%:*}"
    init="${case##*:}"
    name="$variant"
    [ "$init" != "-" ] && name="$variant-$init"
    [ "$variant" = vanilla ] && name="vanilla-control"  # $OUT/vanilla is the pretraining
    dir="$OUT/$name"
    mkdir -p "$dir"
    if [ "$(latest "$dir/converted")" = none ]; then
        echo "[uptraining] $name: converting (log: $dir/convert.log)"
        rm -rf "$dir/converted" "$dir/hf"
        if [ "$variant" = vanilla ]; then  # the control: the same weights at iteration 0
            run "$PY" -m fusedkv_megatron.hf.convert --load "$SOURCE" --out "$dir/hf" \
                > "$dir/convert.log" 2>&1
            run "$PY" -c "import sys; from fusedkv_megatron.hf.convert import main_to_megatron; \
sys.exit(main_to_megatron())" --hf "$dir/hf" --save "$dir/converted" >> "$dir/convert.log" 2>&1
            cp "$OUT/before.txt" "$dir/after.txt"
        else
            flags=(--kv-sharing "$variant")
            [ "$init" != "-" ] && flags+=(--fusion-init "$init")
            run "$PY" -m fusedkv_megatron.uptrain --load "$SOURCE" --save "$dir/converted" \
                "${flags[@]}" --seed "$SEED" --eval-data "$HELDOUT_DATA_PREFIX" \
                --eval-samples "$(( EVAL_ITERS * 16 ))" --eval-micro-batch-size 8 \
                > "$dir/convert.log" 2>&1
            awk '/^  converted/ {print $(NF-1)}' "$dir/convert.log" > "$dir/after.txt"
        fi
    fi
    if [ "$(latest "$dir/uptrained")" != "$UP" ]; then
        echo "[uptraining] $name: uptraining for $UP iterations (log: $dir/uptrain.log)"
        if [ "$(latest "$dir/uptrained")" = none ]; then  # start: fresh optimizer, new warm-up
            load=(--load "$dir/converted" --no-load-optim --no-load-rng)
        else  # resume an interrupted uptraining
            load=(--load "$dir/uptrained")
        fi
        flags=(--kv-sharing "$variant")
        [ "$init" != "-" ] && flags+=(--fusion-init "$init")
        run "${LAUNCH[@]}" -m fusedkv_megatron.pretrain "${MODEL[@]}" "${flags[@]}" \
            "${load[@]}" --save "$dir/uptrained" --train-iters "$UP" \
            --lr-warmup-iters "$(every "$UP" 10)" --eval-interval "$UP" \
            --save-interval "$(every "$UP" 2)" --log-interval "$(every "$UP" 10)" \
            "${EXTRA[@]}" >> "$dir/uptrain.log" 2>&1
        rm -f "$dir/uptrained.txt"
    fi
    [ -s "$dir/uptrained.txt" ] || evaluate "$dir/uptrained" > "$dir/uptrained.txt" \
        2>> "$OUT/evaluate.log"
    echo "[uptraining] $name: $(cat "$OUT/before.txt") -> $(cat "$dir/after.txt") (converted)" \
        "-> $(cat "$dir/uptrained.txt") (after $UP iterations)"
done

# 3. The table.
{
    echo "Validation loss on the held-out text ($(( EVAL_ITERS * 16 )) sequences of 256 tokens);"
    echo "vanilla pretrained for $(latest "$SOURCE") iterations, each model uptrained for $UP."
    echo
    echo "| model | fusion init | before conversion | right after | after uptraining |"
    echo "|---|---|---|---|---|"
    for case in $CASES; do
        variant="${case%%:*}"
        init="${case##*:}"
        name="$variant"
        [ "$init" != "-" ] && name="$variant-$init"
        [ "$variant" = vanilla ] && name="vanilla-control"
        label="$variant"
        [ "$variant" = vanilla ] && label="vanilla (control)"
        echo "| $label | $init | $(cat "$OUT/before.txt") | $(cat "$OUT/$name/after.txt") |" \
            "$(cat "$OUT/$name/uptrained.txt") |"
    done
} > "$OUT/table.md"
echo
cat "$OUT/table.md"
