"""Start the real server (python -m scripts.chat_web) on a free loopback port with a tiny checkpoint."""

import atexit
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import torch

from nanochat.checkpoint_manager import save_checkpoint
from nanochat.engine import Engine
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import RustBPETokenizer

CORPUS = ["the quick brown fox jumps over the lazy dog. " * 30, "hello world, how are you today? " * 30,
          "numbers 12 345 6789 and 1+2=3, café naïve über. " * 20]
PROMPT = "hello, who are you?"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_made = {}  # (sequence_len, long_reply_tokens) -> a directory holding that checkpoint, made once per test session


def make_chat_checkpoint(base_dir, sequence_len=1024, long_reply_tokens=1000):
    """
    Tokenizer + an sft "d2" checkpoint whose greedy reply to PROMPT runs at least long_reply_tokens
    without a terminal token (so tests can rely on long generations: disconnects, stop sequences).
    Made once per session (a search over seeds takes seconds) and copied into base_dir after that.
    """
    key = (sequence_len, long_reply_tokens)
    if key not in _made:
        _made[key] = tempfile.mkdtemp(prefix="chat_checkpoint_")
        atexit.register(shutil.rmtree, _made[key], True)
        _build_chat_checkpoint(_made[key], sequence_len, long_reply_tokens)
    shutil.copytree(_made[key], base_dir, dirs_exist_ok=True)
    return RustBPETokenizer.from_directory(os.path.join(base_dir, "tokenizer"))


def _build_chat_checkpoint(base_dir, sequence_len, long_reply_tokens):
    tokenizer = RustBPETokenizer.train_from_iterator(iter(CORPUS), 320)
    tokenizer.save(os.path.join(base_dir, "tokenizer"))
    prompt = tokenizer.render_for_completion({"messages": [{"role": "user", "content": PROMPT},
                                                           {"role": "assistant", "content": ""}]})
    for seed in range(50):
        torch.manual_seed(seed)
        model = GPT(GPTConfig(sequence_len=sequence_len, vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=2,
                              n_kv_head=2, n_embd=32))
        model.init_weights()
        for name, p in model.named_parameters():  # varied text instead of one repeated token
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, std=0.1)
        # Peaked logits with the terminal tokens' at 0, far below the top ones: a reply (greedy or sampled)
        # practically never ends early, so tests can count on long generations.
        torch.nn.init.normal_(model.lm_head.weight, std=0.5)
        with torch.no_grad():
            for token in (tokenizer.get_bos_token_id(), tokenizer.encode_special("<|assistant_end|>")):
                model.lm_head.weight[token] = 0
        reply, _ = Engine(model.eval(), tokenizer).generate_batch(prompt, max_tokens=long_reply_tokens, temperature=0.0)
        if len(reply[0]) - len(prompt) == long_reply_tokens and len(set(reply[0][len(prompt):])) > 5:
            break
    else:
        raise RuntimeError("no seed gave a long varied greedy reply")
    save_checkpoint(os.path.join(base_dir, "chatsft_checkpoints", "d2"), 1, model.state_dict(), None,
                    dict(model_config=model.config_dict()))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    """Context manager: the server process; .url, .log() (its combined output so far)."""

    def __init__(self, base_dir, *args, env=None, log_path=None, startup_timeout=90):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path or os.path.join(base_dir, f"server_{self.port}.log")
        # The replica in the server process unless a test asks for workers: it starts ~7 s sooner here, and
        # test_serving_workers.py covers worker processes (the CPU default).
        self.args = args if "--cpu-workers" in args else ("--cpu-workers", "0", *args)
        self.startup_timeout = startup_timeout
        self.env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir))
        self.env.pop("NANOCHAT_API_KEYS", None)  # only the keys a test asks for
        self.env.update(env or {})

    def __enter__(self):
        self.log_file = open(self.log_path, "w")
        self.process = subprocess.Popen([sys.executable, "-m", "scripts.chat_web", "-i", "sft", "--port", str(self.port),
                                         *self.args], cwd=REPO_ROOT, env=self.env, stdout=self.log_file,
                                        stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.__exit__()
        raise RuntimeError(f"server did not become healthy in {self.startup_timeout}s:\n{self.log()}")

    def __exit__(self, *exc):
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log_file.close()

    def log(self):
        with open(self.log_path) as f:
            return f.read()


# ---------------------------------------------------------------------------------------------- OpenAI's schema

def _openapi_to_json_schema(node):
    """OpenAPI 3.0's `nullable: true` (which the spec still uses in places) as JSON Schema's type: [..., null]."""
    if isinstance(node, list):
        return [_openapi_to_json_schema(v) for v in node]
    if not isinstance(node, dict):
        return node
    node = {k: _openapi_to_json_schema(v) for k, v in node.items()}
    if node.pop("nullable", False):
        node = {"anyOf": [node, {"type": "null"}]}
    return node


def openai_response_validator(name):
    """
    A jsonschema validator for one of OpenAI's response objects (tests/data/openai_schemas.json, extracted
    from the official spec by dev/openai_schemas.py). Where OpenAI's own API departs from its spec, the
    departure is allowed here, each named: legacy completions stream chunks carry finish_reason null until
    a choice ends, and echoed logprobs give the prompt's first token a null logprob (nothing predicts it).
    """
    import jsonschema

    with open(os.path.join(REPO_ROOT, "tests", "data", "openai_schemas.json"), encoding="utf-8") as f:
        spec = json.load(f)
    schemas = _openapi_to_json_schema(spec["components"]["schemas"])
    choice = schemas["CreateCompletionResponse"]["properties"]["choices"]["items"]["properties"]
    choice["finish_reason"] = {"anyOf": [choice["finish_reason"], {"type": "null"}]}
    logprobs = choice["logprobs"]["anyOf"][0]["properties"]
    logprobs["token_logprobs"]["items"] = {"type": ["number", "null"]}
    logprobs["top_logprobs"]["items"] = {"anyOf": [logprobs["top_logprobs"]["items"], {"type": "null"}]}
    root = {"components": {"schemas": schemas}, "$ref": f"#/components/schemas/{name}"}
    return jsonschema.Draft202012Validator(root)
