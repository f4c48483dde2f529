#!/usr/bin/env bash
# Every GPU path of the project at a tiny size, in under 10 minutes on 1-8 CUDA GPUs, with a pass/fail table:
# base_train (bf16, compiled, torchrun over all GPUs, --resume-from-step continuing the same losses; GQA and MLA), the
# memory estimate against torch.cuda.max_memory_allocated at 2048 tokens, mid_train and chat_sft compiled
# (no recompilation after the first step), chat_eval, chat_cli with both drafters, chat_web --num-gpus N
# with concurrent clients and speculative decoding. Verdicts come from the logs (dev/gpu_check_verdicts.py).
#
#   bash dev/gpu_check.sh                 # a scratch NANOCHAT_BASE_DIR, removed when every check passed
#   KEEP=1 bash dev/gpu_check.sh          # keep it (logs in $WORK/logs)
#
# Without a CUDA GPU it says so and exits 0. GPU_CHECK_ON_CPU=1 runs the same steps on the CPU (smaller,
# compiled with the eager backend) to work on this script where there is no GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${GPU_CHECK_ON_CPU:-0}" = "1" ]; then
    NPROC=2; DEVICE=cpu; export NANOCHAT_COMPILE_BACKEND=eager OMP_NUM_THREADS=1
else
    NPROC=$(python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
    DEVICE=cuda
    if [ "$NPROC" -eq 0 ]; then
        echo "gpu_check: no CUDA GPU visible to torch: nothing checked (the GPU paths stay unverified here)."
        exit 0
    fi
fi
WORK=$(mktemp -d /tmp/nanochat_gpu_check.XXXXXX)
export NANOCHAT_BASE_DIR=$WORK/base NANOCHAT_DATA_DIR=$WORK/mirror HF_HUB_OFFLINE=1 DEVICE
LOGS=$WORK/logs
mkdir -p "$LOGS"
TORCHRUN=(torchrun --standalone --nproc_per_node="$NPROC")
ROWS=()
START=$(date +%s)

# check NAME "VERDICT [ARGS]" -- COMMAND...: runs COMMAND into $LOGS/NAME.log, then the verdict on that log
check() {
    local name=$1 verdict=$2 t0 status out
    shift 3
    local log=$LOGS/$name.log
    t0=$(date +%s)
    echo "--- $name"
    if "$@" > "$log" 2>&1; then
        # shellcheck disable=SC2086 (the verdict's arguments split on purpose)
        out=$(python dev/gpu_check_verdicts.py ${verdict%% *} "$log" $(echo "$verdict" | cut -s -d' ' -f2-)) \
            && status=PASS || status=FAIL
    else
        status=FAIL
        out="exit $? (tail: $(tail -c 300 "$log" | tr '\n' ' '))"
    fi
    ROWS+=("$(printf '%-4s %5ss  %-22s %s' "$status" "$(($(date +%s) - t0))" "$name" "$out")")
    echo "$status $out"
}

python dev/gpu_check_verdicts.py data "$WORK"
check data reply -- python -m nanochat.dataset --local "$WORK/corpus.txt" --doc-chars 2000 --row-group-docs 256
check tokenizer reply -- python -m scripts.tok_train --vocab-size 4096 --max-chars 5000000

# --- base model over every GPU: compiled, bf16, checkpoints, and a resumed run that continues the same losses
SEQ=512; B=8; [ "$DEVICE" = cpu ] && SEQ=128 && B=4
BASE=(--depth 4 --max-seq-len $SEQ --head-dim 64 --device-batch-size $B --total-batch-size $((B * SEQ * NPROC))
      --num-iterations 30 --eval-every 15 --eval-tokens $((B * SEQ * NPROC * 2)) --sample-every 30 --save-every 15
      --compile-mode default --device-type $DEVICE)
check base_train base_train -- "${TORCHRUN[@]}" -m scripts.base_train "${BASE[@]}" --loss-log "$WORK/full.jsonl"
check base_resume "resume $WORK/full.jsonl $WORK/resumed.jsonl" -- \
    "${TORCHRUN[@]}" -m scripts.base_train "${BASE[@]}" --resume-from-step 15 --loss-log "$WORK/resumed.jsonl"

# --- GQA and MLA, eager: the last step's samples decode prompts of different lengths (masked grouped attention)
for A in gqa mla; do
    check "base_train_$A" base_train -- "${TORCHRUN[@]}" -m scripts.base_train "${BASE[@]}" --attention $A \
        --compile-mode none --model-tag "$A"
done

# --- the memory estimate against what CUDA allocates, at a real sequence length (d8, 8 x 2048 tokens)
MEM=(--depth 8 --max-seq-len 2048 --device-batch-size 8 --total-batch-size $((8 * 2048 * NPROC)) --num-iterations 3
     --eval-every 1000 --eval-tokens $((8 * 2048 * NPROC)) --sample-every 1000 --model-tag mem --device-type $DEVICE)
[ "$DEVICE" = cpu ] && MEM=(--depth 2 --max-seq-len 256 --device-batch-size 2 --total-batch-size $((2 * 256 * NPROC))
                            --num-iterations 3 --eval-every 1000 --eval-tokens 1024 --sample-every 1000 --model-tag mem)
check memory_compiled memory -- "${TORCHRUN[@]}" -m scripts.base_train "${MEM[@]}" --compile-mode default
check memory_eager memory -- "${TORCHRUN[@]}" -m scripts.base_train "${MEM[@]}" --compile-mode none

# --- midtraining and SFT, compiled: every batch has one shape, so nothing recompiles after the first step
CHAT=(--model-tag d4 --max-seq-len $SEQ --device-batch-size 4 --examples-per-step $((4 * NPROC * 2)) --num-iterations 10
      --eval-every 5 --eval-batches 2 --compile-mode default --device-type $DEVICE)
check mid_train no_recompile -- env TORCH_LOGS=recompiles "${TORCHRUN[@]}" -m scripts.mid_train "${CHAT[@]}"
check chat_sft no_recompile -- env TORCH_LOGS=recompiles "${TORCHRUN[@]}" -m scripts.chat_sft "${CHAT[@]}"
check chat_eval reply -- "${TORCHRUN[@]}" -m scripts.chat_eval -i sft -g d4 -a "GSM8K|ARC-Easy" -x 32 -m 32 \
    --device-type $DEVICE

# --- chat_cli: greedy output with a draft model (d4 drafting for mem) and with n-grams equals plain greedy, in fp32:
#     in bf16 a verify forward (several rows) and a decode step (one) round differently, and an untrained model's
#     near-ties could then tip its argmax either way; bf16 speculative decoding runs once more for a reply only
CLI=(python -m scripts.chat_cli -i base -g mem -p "The river" -t 0 -m 48 --device-type $DEVICE)
check chat_cli_plain reply -- "${CLI[@]}" --dtype float32
check chat_cli_draft "same_reply $LOGS/chat_cli_plain.log" -- "${CLI[@]}" --dtype float32 --speculative-proposals 4 \
    --draft-model-tag d4
check chat_cli_ngram "same_reply $LOGS/chat_cli_plain.log" -- "${CLI[@]}" --dtype float32 --speculative-proposals 4 \
    --draft-model-tag ngram
check chat_cli_bf16 reply -- "${CLI[@]}" --speculative-proposals 4 --draft-model-tag d4

# --- chat_web: one worker process per GPU under 32 concurrent clients; then speculative decoding of a lone request
serve_and_query() {  # PORT CLIENTS [chat_web flags]: start the server, send the requests, stop it; one JSON line
    local port=$1 clients=$2
    shift 2
    python -m scripts.chat_web -i sft -g d4 --port "$port" --device-type $DEVICE "$@" &
    local pid=$!
    python - "$port" "$clients" <<'PY'
import concurrent.futures, json, sys, time, httpx
port, clients = int(sys.argv[1]), int(sys.argv[2])
url = f"http://127.0.0.1:{port}"
for _ in range(600):
    try:
        if httpx.get(url + "/health", timeout=2).status_code == 200:
            break
    except httpx.HTTPError:
        time.sleep(1)
def ask(i):
    body = {"messages": [{"role": "user", "content": f"Say something about the number {i % 7}."}],
            "max_tokens": 48, "temperature": 0.0}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=300)
    return r.status_code, r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else r.text
t0 = time.time()
with concurrent.futures.ThreadPoolExecutor(clients) as pool:
    results = list(pool.map(ask, range(clients)))
ok = [text for status, text in results if status == 200]
metrics = httpx.get(url + "/metrics").text
drafted = sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("nanochat_speculative_drafted"))
print(json.dumps({"ok": len(ok), "of": clients, "seconds": round(time.time() - t0, 1), "drafted": drafted,
                  "replicas": len(httpx.get(url + "/health").json()["replicas"]), "first": ok[0] if ok else None}))
PY
    local status=$?
    kill "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    return $status
}
REPLICAS=(--num-gpus "$NPROC"); [ "$DEVICE" = cpu ] && REPLICAS=(--cpu-workers 2)
check chat_web web -- serve_and_query 8601 32 "${REPLICAS[@]}"
check chat_web_speculative "web_speculative $LOGS/chat_web.log" -- \
    serve_and_query 8602 1 --speculative-proposals 4 --draft-model-tag ngram

# --- the table
echo
GPU=$(python -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU')")
echo "=== gpu_check: $NPROC x $GPU, torch $(python -c "import torch; print(torch.__version__)"), $(( $(date +%s) - START )) s ==="
printf '%s\n' "${ROWS[@]}"
FAILED=$(printf '%s\n' "${ROWS[@]}" | grep -c '^FAIL')
echo "logs: $LOGS"
[ "${KEEP:-0}" = "1" ] || [ "$FAILED" -gt 0 ] || rm -rf "$WORK"
[ "$FAILED" -eq 0 ]
