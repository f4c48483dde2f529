#!/usr/bin/env bash
# MHA vs GQA vs MLA trained at an equal budget (same steps, same tokens, same data order) on CPU.
# Writes $OUT/table.md (parameters, KV-cache bytes/token, training tokens/s, final val bpb) and
# $OUT/attention_comparison.png (loss curves), and prints the table.
#
#   bash dev/run_attention_comparison.sh                      # d4, seq 256, 120 steps of 4096 tokens
#   DEPTH=6 STEPS=300 bash dev/run_attention_comparison.sh    # bigger
#
# Needs a tokenizer and shards (python -m scripts.tok_train; NANOCHAT_DATA_DIR or python -m nanochat.dataset).
set -euo pipefail
cd "$(dirname "$0")/.."

DEPTH=${DEPTH:-4}
SEQ_LEN=${SEQ_LEN:-256}
HEAD_DIM=${HEAD_DIM:-64}
STEPS=${STEPS:-120}
DEVICE_BATCH=${DEVICE_BATCH:-8}
TOTAL_BATCH=${TOTAL_BATCH:-4096}
EVAL_EVERY=${EVAL_EVERY:-20}
EVAL_TOKENS=${EVAL_TOKENS:-32768}
OUT=${OUT:-dev/out/attention_comparison}
mkdir -p "$OUT"

if ! python -c "from nanochat.tokenizer import get_tokenizer; get_tokenizer()" 2>/dev/null; then
    echo "== no tokenizer yet: training one (vocab 8192) =="
    python -m scripts.tok_train --vocab-size 8192 --max-chars 50000000
fi

for attention in mha gqa mla; do
    echo "== $attention: d$DEPTH, $STEPS steps x $TOTAL_BATCH tokens =="
    rm -f "$OUT/$attention.jsonl"
    python -m scripts.base_train --attention "$attention" --depth "$DEPTH" --max-seq-len "$SEQ_LEN" \
        --head-dim "$HEAD_DIM" --device-batch-size "$DEVICE_BATCH" --total-batch-size "$TOTAL_BATCH" \
        --num-iterations "$STEPS" --eval-every "$EVAL_EVERY" --eval-tokens "$EVAL_TOKENS" --sample-every 100000 \
        --model-tag "attention_$attention" --loss-log "$OUT/$attention.jsonl" | tee "$OUT/$attention.log" | grep -E "val bpb|done"
done

python dev/plot_attention_comparison.py "$OUT" "$OUT/mha.jsonl" "$OUT/gqa.jsonl" "$OUT/mla.jsonl"
