"""dev/gpu_check_verdicts.py, the judge of dev/gpu_check.sh's rows, on logs written here (as the script runs it)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "dev" / "gpu_check_verdicts.py"


def verdict(tmp_path, name, log, *args, on_gpu=False):
    path = tmp_path / f"{name}.log"
    path.write_text(log)
    env = {"DEVICE": "cuda" if on_gpu else "cpu", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, str(SCRIPT), name, str(path), *map(str, args)], capture_output=True,
                          text=True, env=env)
    return done.returncode, done.stdout.strip()


def web_log(ok, of):
    result = {"ok": ok, "of": of, "seconds": 1.0, "drafted": 39.0, "replicas": 2, "first": "hello"}
    return ("10:23:01 INFO /v1/chat/completions 200 id=chatcmpl-1 finish=length\n" + json.dumps(result) + "\n"
            "10:23:01 INFO shutting down: refusing new requests, running streams have 10 s to finish\n"
            "10:23:02 INFO replica-0: the worker process stopped\n")


def test_web_reads_the_client_line_before_the_servers_shutdown_lines(tmp_path):
    assert verdict(tmp_path, "web", web_log(32, 32)) == (0, "32/32 requests in 1.0 s on 2 replica(s)")
    status, out = verdict(tmp_path, "web", web_log(30, 32))
    assert status == 1 and "2 of 32 requests failed" in out
    batched = tmp_path / "batched.log"
    batched.write_text(web_log(32, 32))
    status, out = verdict(tmp_path, "web_speculative", web_log(1, 1), batched)
    assert status == 0 and out.startswith("drafted 39 tokens") and out.endswith("True")
    assert verdict(tmp_path, "web", "10:23:01 INFO no client output\n")[0] == 1


def test_reply_drops_log_lines_and_progress_bars(tmp_path):
    log = "10:00:00 INFO loading\nGSM8K:   0%|   | 0/2 [00:00<?]\rGSM8K: 0.5000 (1/2)   in 0.2s\n[speculative: x]\n"
    assert verdict(tmp_path, "reply", log) == (0, "GSM8K: 0.5000 (1/2) in 0.2s")


@pytest.mark.parametrize("text, status", [("The river runs.\n", 0), ("The river ran.\n", 1)])
def test_same_reply_compares_the_text_only(tmp_path, text, status):
    plain = tmp_path / "plain.log"
    plain.write_text("10:00:00 INFO loading\nThe river runs.\n")
    log = f"10:00:01 INFO loading\n{text}[speculative: 3/4 drafts accepted, 2.00 tokens per target forward]\n"
    assert verdict(tmp_path, "same_reply", log, plain)[0] == status


def test_resume_compares_the_resumed_steps(tmp_path):
    full, resumed = tmp_path / "full.jsonl", tmp_path / "resumed.jsonl"
    full.write_text("".join(json.dumps({"step": s, "loss": 5.0 - s / 10}) + "\n" for s in range(1, 31)))
    resumed.write_text("".join(json.dumps({"step": s, "loss": 5.0 - s / 10}) + "\n" for s in range(16, 31)))
    assert verdict(tmp_path, "resume", "", full, resumed)[0] == 0
    resumed.write_text("".join(json.dumps({"step": s, "loss": 5.1 - s / 10}) + "\n" for s in range(16, 31)))
    status, out = verdict(tmp_path, "resume", "", full, resumed)
    assert status == 1 and "losses differ" in out
