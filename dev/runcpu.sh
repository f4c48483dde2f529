#!/usr/bin/env bash
# The tiny CPU recipe: a d4 model on a laptop or a 2-core box in ~15 minutes.
#   bash dev/runcpu.sh                                   # downloads 4 shards, or
#   NANOCHAT_DATA_DIR=/path/to/mirror bash dev/runcpu.sh # uses the local mirror's pretrain/ text
set -euo pipefail
cd "$(dirname "$0")/.."
export NANOCHAT_BASE_DIR=${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}
[ -n "${VIRTUAL_ENV:-}" ] || source dev/setup_env.sh
source dev/stage.sh
python -m nanochat.report reset

stage "data"
if ! python -c "from nanochat.dataset import ensure_local_shards; ensure_local_shards()" 2>/dev/null; then
    if ! python -m nanochat.dataset -n 4; then
        echo "error: no pretraining data. Offline? Set NANOCHAT_DATA_DIR to a local mirror or run"
        echo "       python -m nanochat.dataset --local PATH...  with your own text files."
        exit 1
    fi
fi

stage "tokenizer (vocab 8192)"
python -m scripts.tok_train --vocab-size 8192 --max-chars 50000000
python -m scripts.tok_eval

stage "base model d4, 300 steps x 4096 tokens (~9 min on 2 cores)"
python -m scripts.base_train --depth 4 --max-seq-len 256 --head-dim 64 --device-batch-size 8 \
    --total-batch-size 4096 --num-iterations 300 --eval-every 50 --eval-tokens 32768 --sample-every 150
python -m scripts.base_loss --device-batch-size 8 --split-tokens 32768

stage "report"
python -m nanochat.report generate
stage_summary
