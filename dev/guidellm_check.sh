#!/usr/bin/env bash
# guidellm's synthetic benchmark against a running nanochat server (python -m scripts.chat_web), given only
# the target and the model's tokenizer, offline; prints guidellm's tables and a one-line summary.
#
#   bash dev/guidellm_check.sh http://127.0.0.1:8000 /path/to/hf_tokenizer_dir
#   python dev/lm_eval_check.py --tiny --venv ~/venvs/clients --guidellm     starts a server and calls this
#
# The tokenizer directory is the HF export's tokenizer.json + tokenizer_config.json (python -m
# scripts.export_hf, or nanochat.hf_format.tokenizer_to_hf); guidellm needs it to make prompts of a given
# token length, and would otherwise look the server's model name up on the hub.
# Environment: VENV (where guidellm lives; default: guidellm on PATH), SECONDS_LIMIT (30), PROMPT_TOKENS (256),
# OUTPUT_TOKENS (128), PROFILE (synchronous: one request at a time; guidellm's docs use sweep, which runs
# ~10 benchmarks), REQUEST_FORMAT (/v1/chat/completions, guidellm's default; or /v1/completions), OUT (a
# directory for the JSON report; default: a temporary one, removed).
# guidellm 0.8 has `guidellm run --backend kind=openai_http,target=...`, 0.5 `guidellm benchmark --target ...
# --processor ...`: the first is used when `guidellm run --help` works, else the second. Exit status: guidellm's, or 1 when a request errored.
# The server's default rate limit (120 requests a minute per caller) turns a fast model's benchmark into a
# flood of 429s: start it with NANOCHAT_RATE_LIMIT_MAX_REQUESTS=1000000 (dev/lm_eval_check.py does).
set -euo pipefail
if [ $# -lt 2 ]; then
    sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
TARGET=$1 TOKENIZER=$2
GUIDELLM=${VENV:+$VENV/bin/}guidellm
if ! command -v "$GUIDELLM" > /dev/null; then
    echo "error: $GUIDELLM not found; create the venv with:" >&2
    echo "  python -m venv ~/venvs/clients &&" >&2
    echo "  ~/venvs/clients/bin/pip install torch==2.13.0 'lm-eval[api]' guidellm" >&2
    echo "and set VENV=~/venvs/clients" >&2
    exit 2
fi
PYTHON=$(dirname "$(command -v "$GUIDELLM")")/python
SECONDS_LIMIT=${SECONDS_LIMIT:-30} PROMPT_TOKENS=${PROMPT_TOKENS:-256} OUTPUT_TOKENS=${OUTPUT_TOKENS:-128}
PROFILE=${PROFILE:-synchronous} REQUEST_FORMAT=${REQUEST_FORMAT:-/v1/chat/completions}
KEEP_OUT=${OUT:+1}
OUT=${OUT:-$(mktemp -d /tmp/guidellm_check.XXXXXX)}
mkdir -p "$OUT"
[ -z "$KEEP_OUT" ] && trap 'rm -rf "$OUT"' EXIT
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
cd "$OUT"  # guidellm writes its default reports into the working directory

if "$GUIDELLM" run --help > /dev/null 2>&1; then
    cmd=("$GUIDELLM" run --backend "kind=openai_http,target=$TARGET,request_format=$REQUEST_FORMAT"
         --profile "kind=$PROFILE"
         --data "kind=synthetic_text,prompt_tokens=$PROMPT_TOKENS,output_tokens=$OUTPUT_TOKENS"
         --tokenizer "kind=huggingface_auto,model=$TOKENIZER"
         --constraint "kind=max_duration,seconds=$SECONDS_LIMIT"
         --output "kind=json,path=$OUT/benchmarks.json" --disable-progress)
else  # the older CLI; its default outputs include an HTML report whose template is downloaded: JSON only
    kind=chat_completions; [ "$REQUEST_FORMAT" = /v1/completions ] && kind=text_completions
    cmd=("$GUIDELLM" benchmark --target "$TARGET" --processor "$TOKENIZER" --request-type "$kind"
         --data "prompt_tokens=$PROMPT_TOKENS,output_tokens=$OUTPUT_TOKENS" --profile "$PROFILE"
         --max-seconds "$SECONDS_LIMIT" --outputs json --disable-progress)
fi
echo "$ ${cmd[*]}"
status=0
"${cmd[@]}" || status=$?
if [ ! -f "$OUT/benchmarks.json" ]; then
    echo "error: guidellm wrote no report (exit status $status)" >&2
    exit $(( status ? status : 1 ))
fi

"$PYTHON" - "$OUT/benchmarks.json" <<'EOF' || status=$(( status ? status : 1 ))
import json, sys
report = json.load(open(sys.argv[1]))
failed = 0
for bench in report["benchmarks"]:
    m = bench["metrics"]
    def stat(name, group="successful", key="median"):
        try:
            return m[name][group][key]
        except (KeyError, TypeError):
            return None
    totals = m.get("request_totals", {})
    errored = totals.get("errored", 0) or 0
    failed += errored
    summary = {"strategy": bench.get("config", {}).get("strategy", {}).get("type_"),
               "successful": totals.get("successful"), "errored": errored, "incomplete": totals.get("incomplete"),
               "prompt_tokens_median": stat("prompt_token_count"), "output_tokens_median": stat("output_token_count"),
               "ttft_ms_median": stat("time_to_first_token_ms"), "itl_ms_median": stat("inter_token_latency_ms"),
               "output_tokens_per_s_mean": stat("output_tokens_per_second", "total", "mean"),
               "requests_per_s_mean": stat("requests_per_second", "successful", "mean")}
    print("guidellm summary: " + json.dumps(summary))
    requests = bench.get("requests") or {}
    for r in (requests.get("errored") or [])[:3]:
        info = r.get("info") or {}
        print(f"  errored request: {info.get('error')!r}")
sys.exit(1 if failed else 0)
EOF
exit $status
