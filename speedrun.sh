#!/usr/bin/env bash
# The whole pipeline, start to finish: environment, data, tokenizer, base model, midtraining, SFT,
# evaluations, report (RUN_RL=1 adds RL on GSM8K).
#
#   bash speedrun.sh                       # 8-GPU node: the d20 model (~$100 of compute); no GPU: dev/runcpu.sh
#   WANDB_RUN=d20 bash speedrun.sh         # also log to Weights & Biases
#   NANOCHAT_DATA_DIR=/path/to/mirror bash speedrun.sh   # offline: use a local dataset mirror
#
# Bigger models: DEPTH=26 bash speedrun.sh (~$300), DEPTH=32 (~$800). Each stage's device batch is the
# largest power of two whose estimated peak memory (--dry-run) fits the GPU's free memory; gradient
# accumulation keeps the global batch. DEVICE_BATCH=N forces one for every stage.
set -euo pipefail
cd "$(dirname "$0")"
export NANOCHAT_BASE_DIR=${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}
WANDB_RUN=${WANDB_RUN:-dummy}
DEPTH=${DEPTH:-20}
mkdir -p "$NANOCHAT_BASE_DIR"

source dev/setup_env.sh   # .venv with torch (CUDA or CPU build) and nanochat installed

NUM_GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$NUM_GPUS" -eq 0 ]; then
    echo "No CUDA GPU found: running the tiny CPU configuration (dev/runcpu.sh)."
    exec bash dev/runcpu.sh
fi
# one CPU thread per GPU process (8 processes share the node's cores); the CPU recipe keeps all cores
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
source dev/stage.sh
python -m nanochat.report reset
FREE_BYTES=$(python -c "import torch; print(torch.cuda.mem_get_info()[0])")
source dev/pick_batch.sh

# enough FineWeb-Edu shards for the horizon of this depth (~333 for d20, packing crops ~35%), so no data repeats
SHARDS=$(python -m scripts.base_train --depth "$DEPTH" --dry-run --world-size "$NUM_GPUS" --device-batch-size 1 \
    | tail -1 | python -c "import json, sys; print(json.load(sys.stdin)['shards'])")
stage "data: first 8 shards (tokenizer training), the rest of $SHARDS in the background"
if python -m nanochat.dataset -n 8; then
    python -m nanochat.dataset -n "$SHARDS" > "$NANOCHAT_BASE_DIR/download.log" 2>&1 &
    DOWNLOAD_PID=$!
else
    DOWNLOAD_PID=
    if [ -n "${NANOCHAT_DATA_DIR:-}" ]; then
        echo "Download failed; the training scripts will import \$NANOCHAT_DATA_DIR/pretrain."
    else
        echo "!!! Download failed and no NANOCHAT_DATA_DIR: building a FALLBACK corpus from installed package docs."
        python -m nanochat.dataset --from-installed-docs
    fi
fi

stage "tokenizer (~1 min)"
python -m scripts.tok_train --max-chars 2000000000 --vocab-size 65536
python -m scripts.tok_eval

[ -n "$DOWNLOAD_PID" ] && wait "$DOWNLOAD_PID"
BATCH=$(pick_batch scripts.base_train --depth "$DEPTH")
stage "base model d$DEPTH on $NUM_GPUS GPUs, device batch $BATCH (~3 h on 8xH100 for d20)"
torchrun --standalone --nproc_per_node="$NUM_GPUS" -m scripts.base_train --depth "$DEPTH" \
    --device-batch-size "$BATCH" --run "$WANDB_RUN"
torchrun --standalone --nproc_per_node="$NUM_GPUS" -m scripts.base_loss --device-batch-size "$BATCH"
torchrun --standalone --nproc_per_node="$NUM_GPUS" -m scripts.base_eval

BATCH=$(pick_batch scripts.mid_train)
stage "midtraining, device batch $BATCH (~15 min)"
torchrun --standalone --nproc_per_node="$NUM_GPUS" -m scripts.mid_train --device-batch-size "$BATCH" --run "$WANDB_RUN"
torchrun --standalone --nproc_per_node="$NUM_GPUS" -m scripts.chat_eval -i mid

BATCH=$(pick_batch scripts.chat_sft)
stage "supervised finetuning, device batch $BATCH (~10 min)"
torchrun --standalone --nproc_per_node="$NUM_GPUS" -m scripts.chat_sft --device-batch-size "$BATCH" --run "$WANDB_RUN"
torchrun --standalone --nproc_per_node="$NUM_GPUS" -m scripts.chat_eval -i sft

if [ "${RUN_RL:-0}" = "1" ]; then   # optional: RL on GSM8K (~1 h)
    stage "RL on GSM8K"
    torchrun --standalone --nproc_per_node="$NUM_GPUS" -m scripts.chat_rl
    torchrun --standalone --nproc_per_node="$NUM_GPUS" -m scripts.chat_eval -i rl -a GSM8K
fi

stage "report"
python -m nanochat.report generate
stage_summary
