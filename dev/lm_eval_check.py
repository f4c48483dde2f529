"""
lm-eval-harness scores a nanochat server the way the project scores the model itself.

ARC rows (the project's own loader, tasks/arc.py, over the local mirror) become an lm-eval multiple-choice
task in the letter style of scripts/chat_eval.py run_categorical: the context is the chat prompt that
tokenizer.render_for_completion makes (<|bos|><|user_start|>question + lettered options + "Answer with the
letter..."<|user_end|><|assistant_start|>), the choices are the letters "A", "B", ... (one token each), no
delimiter between the two. The real server (python -m scripts.chat_web) answers lm-eval's `local-completions`
model on /v1/completions (token-id prompts, echo, logprobs=1, max_tokens=1); the same rows are then scored
in this process by scripts/chat_eval.py's own run_categorical, and the two accuracies and per-row letters are
compared, with each choice's log-likelihood against a plain forward (log-softmax at the context's end).

  python dev/lm_eval_check.py --tiny --venv ~/venvs/clients            a random tiny model, ~a minute
  python dev/lm_eval_check.py -i sft -g d20 --rows 100 --venv ~/venvs/clients
  python dev/lm_eval_check.py --tiny --venv ~/venvs/clients --guidellm  also dev/guidellm_check.sh

lm-eval and guidellm live in their own virtualenv (they pin other versions of transformers, datasets, ...):
  python -m venv ~/venvs/clients && ~/venvs/clients/bin/pip install torch==2.13.0 'lm-eval[api]' guidellm
(plain `lm-eval` lacks tenacity, which its API models need: the [api] extra brings it.)

Data: ARC through tasks/arc.py (the Hugging Face hub online, or a local copy under $NANOCHAT_DATA_DIR).
Everything runs offline (HF_HUB_OFFLINE=1): lm-eval gets the model's tokenizer exported to a temporary
Hugging Face directory (nanochat.hf_format), so `tokenizer_backend=huggingface` never touches the hub.

Output: lm-eval's own table, a comparison table, then one JSON line
  {"lm_eval_acc": ..., "nanochat_acc": ..., "rows": ..., "equal": true|false, ...}
"equal" means both accuracies are the same and every row picked the same letter. Exit status 0 when
equal, 1 when not, 2 when something could not run (lm-eval missing, server not healthy, lm-eval failed).
"""

import argparse
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

TASK_NAME = "nanochat_arc_letters"
VENV_HINT = ("create the venv with:\n  python -m venv ~/venvs/clients && ~/venvs/clients/bin/pip install "
             "torch==2.13.0 'lm-eval[api]' guidellm\nthen pass --venv ~/venvs/clients")
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}


class CheckError(RuntimeError):
    """Something the check needs could not run; main() prints it and exits 2."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="lm-eval (local-completions) against the nanochat server vs the "
                                            "model scored directly, on ARC letter multiple choice")
    p.add_argument("--venv", default=None, help="virtualenv holding lm_eval (default: lm_eval on PATH)")
    p.add_argument("--rows", type=int, default=20, help="first N rows of the split (default 20)")
    p.add_argument("--subset", default="ARC-Easy", choices=["ARC-Easy", "ARC-Challenge"])
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument("-i", "--source", default="sft", choices=["base", "mid", "sft", "rl"],
                   help="which checkpoints (ignored with --tiny)")
    p.add_argument("-g", "--model-tag", default=None, help="model tag (default: the largest)")
    p.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument("--tiny", action="store_true",
                   help="no checkpoint needed: a tokenizer trained on the ARC rows and a small randomly "
                        "initialised model, saved to a temporary NANOCHAT_BASE_DIR")
    p.add_argument("--batch-size", type=int, default=1,
                   help="lm-eval --batch_size: prompts per /v1/completions request (>1: a list of token-id lists)")
    p.add_argument("--concurrency", type=int, default=1, help="lm-eval num_concurrent (parallel requests)")
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for scripts.chat_web (repeatable), e.g. --server-arg=--cpu-workers=0")
    p.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for the server's /health")
    p.add_argument("--guidellm", action="store_true",
                   help="afterwards, run dev/guidellm_check.sh against the same server and tokenizer")
    p.add_argument("--guidellm-seconds", type=int, default=30, help="length of the guidellm benchmark")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (data, logs, results)")
    args = p.parse_args(argv)
    if args.rows < 1:
        p.error("--rows must be >= 1")
    if args.batch_size < 1 or args.concurrency < 1:
        p.error("--batch-size and --concurrency must be >= 1")
    return args


# ---------------------------------------------------------------------------------------------- lm-eval

def find_lm_eval(venv):
    """(path of the lm_eval executable, the python beside it); CheckError with the venv recipe if absent."""
    if venv:
        exe = os.path.join(venv, "bin", "lm_eval")
        if not os.path.isfile(exe):
            raise CheckError(f"no lm_eval in {venv}/bin: {VENV_HINT}")
    else:
        exe = shutil.which("lm_eval")
        if exe is None:
            raise CheckError(f"lm_eval is not on PATH: {VENV_HINT}")
    python = os.path.join(os.path.dirname(exe), "python")
    if not os.path.isfile(python):
        python = sys.executable
    probe = subprocess.run([python, "-c", "import lm_eval, tenacity, aiohttp, transformers"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        raise CheckError(f"lm_eval's environment lacks what local-completions needs ({last}): {VENV_HINT}")
    return exe, python


def write_task(task_dir, rows):
    """rows.jsonl + the task YAML. doc_to_text/doc_to_choice name fields, so no template touches the text."""
    data_path = os.path.join(task_dir, "rows.jsonl")
    with open(data_path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({"id": row["index"], "context": row["context"], "letters": row["letters"],
                                "gold": row["gold"]}) + "\n")
    yaml = f"""task: {TASK_NAME}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(data_path)}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: letters
doc_to_target: gold
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
    with open(os.path.join(task_dir, f"{TASK_NAME}.yaml"), "w", encoding="utf-8") as f:
        f.write(yaml)


def run_lm_eval(exe, url, model_id, hf_dir, max_length, task_dir, out_dir, args, log_path):
    model_args = ",".join([
        f"base_url={url}/v1/completions", f"model={model_id}", f"tokenizer={hf_dir}",
        "tokenizer_backend=huggingface",   # else it first probes GET /tokenizer_info (3 tries) for a remote one
        "tokenized_requests=True",         # token-id prompts: the ids below are exactly what the server scores
        f"max_length={max_length}", f"num_concurrent={args.concurrency}", "max_retries=1", "timeout=600",
    ])
    cmd = [exe, "--model", "local-completions", "--model_args", model_args, "--tasks", TASK_NAME,
           "--include_path", task_dir, "--batch_size", str(args.batch_size), "--output_path", out_dir,
           "--log_samples"]
    env = dict(os.environ, **OFFLINE_ENV, HF_DATASETS_CACHE=os.path.join(out_dir, "hf_datasets_cache"))
    env.pop("OPENAI_API_KEY", None)  # the server runs without keys on 127.0.0.1
    print("$ " + " ".join(cmd), flush=True)
    with open(log_path, "w") as log:
        process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for line in process.stdout:  # shown as it comes and kept for the error report
            log.write(line)
            sys.stdout.write(line)
        return process.wait()


def read_lm_eval_results(out_dir):
    """(acc, {doc_id: [loglikelihood per choice]}) from lm-eval's results JSON and samples JSONL."""
    results = sorted(glob.glob(os.path.join(out_dir, "**", "results_*.json"), recursive=True))
    samples = sorted(glob.glob(os.path.join(out_dir, "**", f"samples_{TASK_NAME}_*.jsonl"), recursive=True))
    if not results or not samples:
        raise CheckError(f"lm-eval wrote no results/samples under {out_dir}")
    with open(results[-1]) as f:
        acc = json.load(f)["results"][TASK_NAME]["acc,none"]
    lls = {}
    with open(samples[-1]) as f:
        for line in f:
            sample = json.loads(line)
            lls[sample["doc"]["id"]] = [float(r[0]) for r in sample["filtered_resps"]]
    return acc, lls


# ---------------------------------------------------------------------------------------------- the model

def make_tiny_checkpoint(base_dir, texts):
    """A tokenizer trained on the rows' text and a random 2-layer sft model with decisive (not tied) logits."""
    import torch

    from nanochat.checkpoint_manager import save_checkpoint
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.tokenizer import RustBPETokenizer

    tokenizer = RustBPETokenizer.train_from_iterator(iter(texts), 1024)
    tokenizer.save(os.path.join(base_dir, "tokenizer"))
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=1024, vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=2,
                          n_kv_head=2, n_embd=64))
    model.init_weights()
    # The default init makes every logit ~0 (lm_head std 0.001, residual projections zero): the letters
    # would tie to float noise. Wider weights give margins far above any kernel difference.
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            torch.nn.init.normal_(p, std=0.1)
    torch.nn.init.normal_(model.lm_head.weight, std=0.5)
    save_checkpoint(os.path.join(base_dir, "chatsft_checkpoints", "d2"), 1, model.state_dict(), None,
                    dict(model_config=model.config_dict()))
    return "sft", "d2", 1


def export_tokenizer(tokenizer, out_dir, max_length):
    """tokenizer.json + tokenizer_config.json (the HF export's tokenizer half): all lm-eval and guidellm load."""
    from nanochat.hf_format import tokenizer_config, tokenizer_to_hf

    os.makedirs(out_dir, exist_ok=True)
    tokenizer_to_hf(tokenizer).save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer_config(tokenizer, max_length), f, indent=2)


def build_rows(task, tokenizer, hf_dir):
    """
    Per ARC row: the context as text (the prompt ids decoded: special tokens come back as their names), its
    ids, the letters' ids and the gold index. The Hugging Face tokenizer must turn that text back into the
    same ids (what lm-eval sends); checked here when the tokenizers package is importable.
    """
    try:
        from tokenizers import Tokenizer
        hf = Tokenizer.from_file(os.path.join(hf_dir, "tokenizer.json"))
    except ImportError:
        hf = None
    rows = []
    for index in range(len(task)):
        conversation = task[index]
        ids = tokenizer.render_for_completion(conversation)
        letters = conversation["letters"]
        letter_ids = [tokenizer.encode(letter) for letter in letters]
        if any(len(t) != 1 for t in letter_ids):
            raise CheckError(f"answer letters {letters} are not single tokens for this tokenizer")
        context = tokenizer.decode(ids)
        if hf is not None:
            for letter, (letter_id,) in zip(letters, letter_ids):
                whole = hf.encode(context + letter, add_special_tokens=False).ids
                if whole != ids + [letter_id]:
                    raise CheckError(f"row {index}: the HF tokenizer encodes context+{letter!r} differently "
                                     f"from render_for_completion + the letter: lm-eval would send other ids")
        gold = letters.index(conversation["messages"][-1]["content"])
        rows.append({"index": index, "context": context, "ids": ids, "letters": letters,
                     "letter_ids": [t[0] for t in letter_ids], "gold": gold})
    return rows


def score_rows(model, rows, device):
    """Per row, the log-probability of each letter after the context: one forward, log-softmax at the end."""
    import torch

    from nanochat.common import autocast_context

    scores = []
    with torch.no_grad():
        for row in rows:
            idx = torch.tensor([row["ids"]], dtype=torch.long, device=device)
            with autocast_context(device.type):
                logits = model(idx, logits_at=torch.tensor([len(row["ids"]) - 1], device=device))
            logprobs = torch.log_softmax(logits[0, 0].float(), dim=-1)
            scores.append([float(logprobs[t]) for t in row["letter_ids"]])
    return scores


def first_argmax(values):
    return max(range(len(values)), key=lambda i: (values[i], -i))


# ---------------------------------------------------------------------------------------------- the server

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url, timeout=5.0):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


class Server:
    """python -m scripts.chat_web on a free loopback port; its log in a file; SIGTERM then kill on exit."""

    def __init__(self, base_dir, source, model_tag, step, extra, log_path, startup_timeout):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "scripts.chat_web", "-i", source, "--port", str(self.port)]
        self.cmd += ["-g", model_tag] if model_tag else []
        self.cmd += ["-s", str(step)] if step is not None else []
        self.cmd += list(extra)
        self.env = dict(os.environ, NANOCHAT_BASE_DIR=base_dir)
        self.env.pop("NANOCHAT_API_KEYS", None)  # loopback only: no keys, so lm-eval needs none
        # the default limit (120 requests a minute per caller) would 429 lm-eval: one request per choice
        self.env["NANOCHAT_RATE_LIMIT_MAX_REQUESTS"] = "1000000"
        self.log_path, self.startup_timeout = log_path, startup_timeout
        self.process = None

    def __enter__(self):
        print("$ " + " ".join(self.cmd), flush=True)
        self.log_file = open(self.log_path, "w")
        self.process = subprocess.Popen(self.cmd, cwd=REPO_ROOT, env=self.env, stdout=self.log_file,
                                        stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise CheckError(f"the server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                http_json(self.url + "/health", timeout=2)
                return self
            except (urllib.error.URLError, OSError, ValueError):
                time.sleep(0.5)
        self.__exit__()
        raise CheckError(f"the server was not healthy after {self.startup_timeout:.0f}s:\n{self.log_tail()}")

    def model_id(self):
        data = http_json(self.url + "/v1/models").get("data") or [{}]
        return data[0].get("id") or "nanochat"

    def log_tail(self, lines=40):
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def __exit__(self, *exc):
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()  # the server drains for --shutdown-timeout (10 s) at most
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log_file.close()


# ---------------------------------------------------------------------------------------------- main

def check(args, work):
    exe, _ = find_lm_eval(args.venv)
    import torch

    from nanochat.checkpoint_manager import load_model
    from tasks.arc import ARC

    task = ARC(args.subset, args.split, stop=args.rows)
    print(f"data: {args.subset} {args.split}, {len(task)} rows", flush=True)

    if args.tiny:
        base_dir = os.path.join(work, "base")
        corpus = ARC(args.subset, args.split, stop=600)  # the tokenizer's training text: these rows' prompts
        texts = [m["content"] for i in range(len(corpus)) for m in corpus[i]["messages"]]
        source, model_tag, step = make_tiny_checkpoint(base_dir, texts)
    else:
        from nanochat.common import get_base_dir
        base_dir = get_base_dir()
        source, model_tag, step = args.source, args.model_tag, args.step
    os.environ["NANOCHAT_BASE_DIR"] = base_dir
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, meta = load_model(source, device, "eval", model_tag=model_tag, step=step)
    seq_len = model.config.sequence_len

    hf_dir = os.path.join(work, "hf_tokenizer")
    export_tokenizer(tokenizer, hf_dir, seq_len)
    rows = build_rows(task, tokenizer, hf_dir)
    too_long = [r["index"] for r in rows if len(r["ids"]) + 1 > seq_len]
    if too_long:
        raise CheckError(f"rows {too_long} do not fit the model's {seq_len}-token context; use fewer --rows")
    task_dir = os.path.join(work, "task")
    os.makedirs(task_dir)
    write_task(task_dir, rows)

    out_dir = os.path.join(work, "lm_eval_out")
    server = Server(base_dir, source, model_tag, step, args.server_arg, os.path.join(work, "server.log"),
                    args.startup_timeout)
    with server:
        model_id = server.model_id()
        print(f"server {server.url} healthy, model {model_id!r}", flush=True)
        code = run_lm_eval(exe, server.url, model_id, hf_dir, seq_len, task_dir, out_dir, args,
                           os.path.join(work, "lm_eval.log"))
        if code != 0:
            raise CheckError(f"lm-eval exited with {code} (its output is above). Server log tail:\n"
                             f"{server.log_tail()}")
        guidellm_code = None
        if args.guidellm:
            script = os.path.join(REPO_ROOT, "dev", "guidellm_check.sh")
            env = dict(os.environ, SECONDS_LIMIT=str(args.guidellm_seconds))
            if args.venv:
                env["VENV"] = args.venv
            print(f"$ bash {script} {server.url} {hf_dir}", flush=True)
            guidellm_code = subprocess.run(["bash", script, server.url, hf_dir], env=env).returncode

    lm_acc, lm_lls = read_lm_eval_results(out_dir)
    from nanochat.common import autocast_context
    from scripts.chat_eval import run_categorical
    with torch.no_grad(), autocast_context(device.type):  # the project's own letter scoring
        records = run_categorical(model, tokenizer, task, list(range(len(task))), 8, device)
    ours_correct = [int(r.correct) for r in sorted(records, key=lambda r: r.index)]
    nanochat_acc = sum(ours_correct) / len(rows)
    ours = score_rows(model, rows, device)
    differ, max_diff = [], 0.0
    for row, scores in zip(rows, ours):
        theirs = lm_lls.get(row["index"])
        if theirs is None or len(theirs) != len(scores):
            differ.append(row["index"])
            continue
        max_diff = max(max_diff, *(abs(a - b) for a, b in zip(theirs, scores)))
        lm_eval_right = int(first_argmax(theirs) == row["gold"])
        if first_argmax(theirs) != first_argmax(scores) or ours_correct[row["index"]] != lm_eval_right:
            differ.append(row["index"])
    lm_correct = round(lm_acc * len(rows))

    print()
    print(f"{'':26s} {'rows':>5s} {'correct':>8s} {'accuracy':>9s}")
    print(f"{'lm-eval via the server':26s} {len(rows):5d} {lm_correct:8d} {lm_acc:9.4f}")
    print(f"{'chat_eval run_categorical':26s} {len(rows):5d} {sum(ours_correct):8d} {nanochat_acc:9.4f}")
    print(f"per-choice log-likelihood, lm-eval vs direct: max |difference| {max_diff:.2e} over "
          f"{sum(len(r['letters']) for r in rows)} choices; rows whose letter differs: {differ or 'none'}")
    if guidellm_code is not None:
        print(f"guidellm: exit status {guidellm_code}")
    equal = abs(lm_acc - nanochat_acc) < 1e-9 and not differ
    print(json.dumps({"lm_eval_acc": lm_acc, "nanochat_acc": nanochat_acc, "rows": len(rows), "equal": equal,
                      "max_loglik_diff": max_diff, "rows_differing": differ}))
    return 0 if equal and not guidellm_code else 1


def main(argv=None):
    args = parse_args(argv)
    work = tempfile.mkdtemp(prefix="lm_eval_check_")
    from nanochat.checkpoint_manager import CheckpointError
    from tasks.common import DatasetUnavailable
    try:
        return check(args, work)
    except (CheckError, CheckpointError, DatasetUnavailable, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
