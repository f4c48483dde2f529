#!/usr/bin/env bash
# The tiny CPU pipeline: tokenizer -> d4 base model -> midtraining -> SFT -> evaluations -> report.md.
# Pretraining dominates: 2M tokens, in bf16 autocast with kept malloc memory and, being 500 steps long,
# compiled when a C++ compiler is present (--compile-mode auto): ~30 min on 2 AVX512-BF16 cores, ~3 min on
# 2 AMX cores. The model is tiny and barely trained: this run proves the pipeline, its numbers are near chance.
#   bash dev/runcpu.sh                                    # online: downloads 4 shards and the eval data
#   NANOCHAT_DATA_DIR=/path/to/mirror bash dev/runcpu.sh  # offline with a local mirror of the datasets
#   bash dev/runcpu.sh   (offline, nothing local)         # falls back to a corpus of installed package docs
set -euo pipefail
cd "$(dirname "$0")/.."
export NANOCHAT_BASE_DIR=${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}
[ -n "${VIRTUAL_ENV:-}" ] || source dev/setup_env.sh
source dev/stage.sh
python -m nanochat.report reset

SEQ=256
MODEL="--depth 4 --max-seq-len $SEQ --head-dim 64"

stage "pretraining data"
if ! python -c "from nanochat.dataset import ensure_local_shards; ensure_local_shards()" 2>/dev/null; then
    if ! python -m nanochat.dataset -n 4; then
        echo "!!! No network and no NANOCHAT_DATA_DIR: building a FALLBACK corpus from installed package docs."
        python -m nanochat.dataset --from-installed-docs
    fi
fi

stage "tokenizer (vocab 8192)"
python -m scripts.tok_train --vocab-size 8192 --max-chars 50000000
python -m scripts.tok_eval

stage "base model d4: 500 steps x 4096 tokens (3-30 min on 2 cores)"
python -m scripts.base_train $MODEL --device-batch-size 8 --total-batch-size 4096 --num-iterations 500 \
    --eval-every 100 --eval-tokens 32768 --sample-every 250
python -m scripts.base_loss --device-batch-size 8 --split-tokens 32768
python -m scripts.base_eval --max-per-task 40 || echo "(base_eval skipped: no eval bundle)"

stage "midtraining: 60 steps (~2 min)"
python -m scripts.mid_train --max-seq-len $SEQ --device-batch-size 8 --examples-per-step 16 --num-iterations 60 \
    --eval-every 30 --eval-batches 4
python -m scripts.chat_eval -i mid -x 40 -b 8 -m 96

stage "SFT: 60 steps (~2 min)"
python -m scripts.chat_sft --max-seq-len $SEQ --device-batch-size 8 --examples-per-step 16 --num-iterations 60 \
    --eval-every 30 --eval-batches 4
python -m scripts.chat_eval -i sft -x 40 -b 8 -m 96

stage "report"
python -m nanochat.report generate
stage_summary
echo "Chat with it: python -m scripts.chat_cli -i sft"
