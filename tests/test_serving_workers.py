"""
Replicas in worker processes (nanochat/serving/workers.py), through the real server with --cpu-workers 2:
the same outputs as generating in-process, one request per replica under its own limits, cancellation
reaching the worker, and a worker that dies failing only its own requests.
"""

import contextlib
import json
import os
import signal
import time

import httpx
import pytest
import torch

from nanochat.checkpoint_manager import load_model
from nanochat.engine import Engine
from tests.server_utils import PROMPT, RunningServer, make_chat_checkpoint

pytestmark = pytest.mark.slow
USER = [{"role": "user", "content": PROMPT}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Two CPU worker processes, each allowed two running requests (the config's limit, not half of it), no queue."""
    base = tmp_path_factory.mktemp("workers_base")
    make_chat_checkpoint(str(base))
    env = {"NANOCHAT_MAX_CONCURRENT_REQUESTS": "2", "NANOCHAT_MAX_QUEUED_REQUESTS": "0", "OMP_NUM_THREADS": "1"}
    with RunningServer(base, "--cpu-workers", "2", env=env) as s:
        s.base = base
        yield s


def health(server):
    return httpx.get(server.url + "/health").json()


def chat(server, max_tokens, **extra):
    body = {"messages": USER, "max_tokens": max_tokens, "temperature": 0, **extra}
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)


def test_workers_generate_what_the_engine_generates(server, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(server.base))
    model, tokenizer, _ = load_model("sft", "cpu", "eval")
    prompt = tokenizer.render_for_completion({"messages": USER + [{"role": "assistant", "content": ""}]})
    with torch.no_grad():
        reference, _ = Engine(model, tokenizer).generate_batch(prompt, max_tokens=24, temperature=0.0)
    expected = tokenizer.decode(reference[0][len(prompt):])
    assert chat(server, 24).json()["choices"][0]["message"]["content"] == expected
    streamed = ""
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60,
                      json={"messages": USER, "max_tokens": 24, "temperature": 0, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                streamed += "".join(c["delta"].get("content", "") for c in json.loads(line[6:])["choices"])
    assert streamed == expected
    replicas = health(server)["replicas"]
    assert len(replicas) == 2 and all(r["alive"] for r in replicas) and health(server)["ready"]


def test_limits_are_per_replica_and_requests_spread(server):
    """Two running requests per replica: four long streams all run, two on each worker; a fifth is a 503."""
    body = {"messages": USER, "max_tokens": 1000, "temperature": 0, "stream": True}
    with contextlib.ExitStack() as stack:
        for _ in range(4):
            response = stack.enter_context(httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60))
            lines = response.iter_lines()
            next(lines)
            stack.callback(lambda lines=lines: lines)  # keep the iterator (a collected one closes the response)
        assert [r["running"] for r in health(server)["replicas"]] == [2, 2]
        r = chat(server, 2)
        assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded" and int(r.headers["retry-after"]) >= 1
    deadline = time.monotonic() + 10  # both clients hung up: the workers drop the rows
    while health(server)["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert health(server)["running"] == 0
    generated = [r["generated_tokens"] for r in health(server)["replicas"]]
    time.sleep(0.5)
    assert [r["generated_tokens"] for r in health(server)["replicas"]] == generated  # nothing runs on
    assert all(n < 1000 for n in generated) and chat(server, 2).status_code == 200


def test_stop_sequence_ends_the_row_in_the_worker(server):
    text = chat(server, 40).json()["choices"][0]["message"]["content"]
    stop = text[10:13]
    reply = chat(server, 40, stop=stop).json()["choices"][0]
    assert reply["finish_reason"] == "stop" and reply["message"]["content"] == text[:text.index(stop)]


def test_logprobs_grammars_and_scoring_cross_the_process_boundary(server):
    """A ticket's options reach the worker (Ticket.spec) and its logprob events come back."""
    scored = httpx.post(server.url + "/v1/completions", timeout=60,
                        json={"prompt": [[1, 2, 3], [4, 5]], "max_tokens": 0, "echo": True, "logprobs": 1}).json()
    assert [len(c["logprobs"]["tokens"]) for c in scored["choices"]] == [3, 2]
    assert scored["choices"][1]["logprobs"]["token_logprobs"][0] is None
    schema = {"type": "object", "properties": {"a": {"type": "integer", "maximum": 99}}, "required": ["a"],
              "additionalProperties": False}
    reply = chat(server, 100, logprobs=True, response_format={"type": "json_schema", "json_schema": {
        "name": "a", "schema": schema}}).json()["choices"][0]
    assert reply["finish_reason"] == "stop" and 0 <= json.loads(reply["message"]["content"])["a"] <= 99
    assert reply["logprobs"]["content"]
    assert chat(server, 7, ignore_eos=True).json()["usage"]["completion_tokens"] == 7


def test_a_dead_worker_fails_only_its_own_requests(server):
    body = {"messages": USER, "max_tokens": 1000, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        next(lines)
        busy = next(replica for replica in health(server)["replicas"] if replica["running"])
        assert busy["pid"] != server.process.pid
        os.kill(busy["pid"], signal.SIGKILL)
        tail = "".join(lines)
    assert "worker process exited" in tail and "generation_failed" in tail
    state = health(server)
    assert not state["ready"] and [r["alive"] for r in state["replicas"]].count(False) == 1
    for _ in range(3):  # the other replica serves everything now
        assert chat(server, 4).status_code == 200
    assert "worker process exited" in server.log()
