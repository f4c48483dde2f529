"""
The safety data workflow end to end against a local LLM server (tests/fake_llm_server.py) through the
real openai and anthropic clients: every stage, injected faults, kill -9 and resume, budget, cache.
"""

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from safety_data_workflow.__main__ import main
from safety_data_workflow.checks import quality_issues
from safety_data_workflow.config import load_config
from safety_data_workflow.dedup import find_duplicates
from safety_data_workflow.prompts import check_rewrite
from nanochat.common import read_jsonl
from safety_data_workflow.store import JsonlStore
from tasks.customjson import read_conversations
from tests.fake_llm_server import FakeLLM, ThreadedServer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET = "sk-test-SECRET-7f3a9c"
SHIPPED = os.path.join(REPO, "data", "safety_sft_conversations_multiturn_filtered.jsonl")
STAGE_KEYS = {"seeds.jsonl": "seed_id", "redteam_raw.jsonl": "cell", "answers.jsonl": "id",
              "quality_scores.jsonl": "id"}


def write_config(tmp_path, url, **overrides):
    """Red team and judge over the OpenAI API, blue team and optimizer over the Anthropic API."""
    models = {"red_team": ("openai", url + "/v1"), "judge": ("openai", url + "/v1"),
              "blue_team": ("anthropic", url), "optimizer": ("anthropic", url)}
    config = {role: {"provider": provider, "model": f"fake-{role}", "base_url": base, "api_key": SECRET}
              for role, (provider, base) in models.items()}
    config.update(out_dir=str(tmp_path / "run"), final_path=str(tmp_path / "final.jsonl"), seed_limit=7,
                  apo_rounds=2, apo_sample_size=10, concurrency=4, timeout_seconds=0.5, backoff_base_seconds=0.01,
                  backoff_max_seconds=0.1)
    config.update(overrides)
    path = tmp_path / "workflow.json"
    path.write_text(json.dumps(config))
    return path


def keys_of(path, key):
    return [record[key] for record in read_jsonl(path)] if os.path.exists(path) else []


@pytest.mark.slow
def test_every_stage_with_injected_faults(tmp_path, capfd):
    fake = FakeLLM(rate_limit_every=7, error_every=11, slow_every=17, malformed_every=5, slow_seconds=1.0)
    with ThreadedServer(fake.app()) as url:
        config = write_config(tmp_path, url, malformed_retries=4)  # random faults rarely exhaust 5 attempts
        assert run_main(config, "all") is None
        stats = httpx.get(url + "/stats").json()
    output = capfd.readouterr()  # file-descriptor level: the log handlers' output too
    run = tmp_path / "run"
    assert stats["openai"] > 0 and stats["anthropic"] > 0
    assert min(stats["rate_limited"], stats["server_error"], stats["slow"], stats["malformed"]) > 0

    questions = read_jsonl(run / "questions.jsonl")
    duplicates = read_jsonl(run / "duplicates.jsonl")
    failures = read_jsonl(run / "failures.jsonl")
    failed_cells = {f["key"] for f in failures if f["stage"] == "redteam"}
    assert "ph-01/translation" in failed_cells  # always malformed; others only if random faults exhaust retries
    assert len(questions) + len(duplicates) == (7 * 7 - len(failed_cells)) * 2
    assert any(d["kind"] == "near" for d in duplicates)

    rounds = read_jsonl(run / "apo_rounds.jsonl")
    assert [r["round"] for r in rounds] == [1, 2] and rounds[0]["rewrite_accepted"]
    assert rounds[1]["pass_rate"] > rounds[0]["pass_rate"] and "RULE-PATCHED" in rounds[1]["prompt"]
    assert read_jsonl(run / "best_prompt.jsonl")[0]["round"] == 2

    answers = read_jsonl(run / "answers.jsonl")
    assert any(sum(m["role"] == "user" for m in a["messages"]) > 1 for a in answers)
    final, rejected = read_conversations(tmp_path / "final.jsonl"), read_jsonl(run / "rejected.jsonl")
    not_scored = {f["key"] for f in failures if f["stage"] == "filter"}  # random faults can exhaust retries
    assert final and rejected and len(final) + len(rejected) + len(not_scored) == len(answers)
    assert all(not quality_issues(r) and r["scores"] for r in read_jsonl(tmp_path / "final.jsonl"))
    assert all(r["reasons"] for r in rejected) and any("preachy" in " ".join(r["reasons"]) for r in rejected)
    assert (run / "report" / "report.md").exists() and (run / "report" / "apo_pass_rate.png").exists()

    for path in [*run.rglob("*"), tmp_path / "final.jsonl"]:  # the key appears in no output or log
        if path.is_file() and path.suffix in (".jsonl", ".md", ".json") and path.name != "workflow.json":
            assert SECRET not in path.read_text()
    assert SECRET not in output.out + output.err and "answers" in output.out + output.err


@pytest.mark.slow
def test_kill_and_resume_loses_and_duplicates_nothing(tmp_path):
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    reference_dir.mkdir()
    killed_dir.mkdir()
    with ThreadedServer(FakeLLM(latency=0.01).app()) as url:
        assert run_main(write_config(reference_dir, url, seed_limit=4), "all") is None
        config = write_config(killed_dir, url, seed_limit=4)
        process = subprocess.Popen([sys.executable, "-m", "safety_data_workflow", "all", "--config", str(config)],
                                   cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        answers = killed_dir / "run" / "answers.jsonl"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(keys_of(answers, "id")) < 10:
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
        before = {name: keys_of(killed_dir / "run" / name, key) for name, key in STAGE_KEYS.items()}
        assert 10 <= len(before["answers.jsonl"]) < len(keys_of(reference_dir / "run" / "answers.jsonl", "id"))
        assert run_main(config, "all") is None
    for name, key in STAGE_KEYS.items():
        after = keys_of(killed_dir / "run" / name, key)
        assert len(after) == len(set(after)), f"{name} has duplicates"
        assert set(before[name]) <= set(after), f"{name} lost records"
        assert set(after) == set(keys_of(reference_dir / "run" / name, key)), name
    assert keys_of(killed_dir / "final.jsonl", "id") and \
        sorted(keys_of(killed_dir / "final.jsonl", "id")) == sorted(keys_of(reference_dir / "final.jsonl", "id"))


def run_main(config_path, *args):
    """The CLI in this process (fast); returns the SystemExit message, or None on success."""
    try:
        main([*args, "--config", str(config_path)])
    except SystemExit as e:
        return str(e.code)
    return None


def test_budget_stops_cleanly_and_a_rerun_continues(tmp_path):
    with ThreadedServer(FakeLLM().app()) as url:
        config = write_config(tmp_path, url, max_requests=20)
        assert run_main(config, "seeds") is None
        assert "budget spent" in run_main(config, "redteam")
        done = keys_of(tmp_path / "run" / "redteam_raw.jsonl", "cell")
        assert 0 < len(done) <= 20  # what was in flight when the budget ran out was still saved
        assert run_main(config, "redteam", "--max-requests", "1000") is None
        after = keys_of(tmp_path / "run" / "redteam_raw.jsonl", "cell")
        assert set(done) <= set(after) and len(after) == len(set(after)) == 7 * 7 - 1
        # the cache: redoing the whole stage from scratch pays for nothing (only the failing cell is re-asked)
        requests = httpx.get(url + "/stats").json()["requests"]
        os.remove(tmp_path / "run" / "redteam_raw.jsonl")
        assert run_main(config, "redteam", "--max-requests", "1000") is None
        assert sorted(keys_of(tmp_path / "run" / "redteam_raw.jsonl", "cell")) == sorted(after)
        assert httpx.get(url + "/stats").json()["requests"] == requests + 3  # ph-01/translation: 3 attempts


def test_malformed_rewrite_never_replaces_the_prompt(tmp_path):
    with ThreadedServer(FakeLLM(broken_optimizer=True).app()) as url:
        config = write_config(tmp_path, url, seed_limit=2)
        for stage in ("seeds", "redteam", "optimize"):
            assert run_main(config, stage) is None
    rounds = read_jsonl(tmp_path / "run" / "apo_rounds.jsonl")
    assert not rounds[0]["rewrite_accepted"] and "malformed" in rounds[0]["diagnosis"]
    assert rounds[1]["prompt"] == rounds[0]["prompt"]  # the working prompt stayed


def test_clear_errors(tmp_path, monkeypatch):
    assert "missing.json" in run_main(tmp_path / "missing.json", "seeds")
    bad = tmp_path / "bad.json"
    bad.write_text('{"red_team": {"provider": "mistral"}}')
    assert "provider" in run_main(bad, "seeds")
    config = tmp_path / "ok.json"
    config.write_text(json.dumps({"out_dir": str(tmp_path / "run")}))
    assert "run `python -m safety_data_workflow redteam` first" in run_main(config, "answers")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert run_main(config, "seeds") is None
    assert "OPENAI_API_KEY" in run_main(config, "redteam")


def test_store_survives_a_torn_last_line(tmp_path):
    path = tmp_path / "out.jsonl"
    store = JsonlStore(str(path), key=lambda r: r["id"])
    store.append({"id": 1})
    store.append({"id": 2})
    assert not store.append({"id": 2})  # a key already written is not written twice
    with open(path, "a") as f:
        f.write('{"id": 3, "text": "cut sho')  # kill -9 in the middle of a write
    reopened = JsonlStore(str(path), key=lambda r: r["id"])
    assert sorted(reopened.records) == [1, 2]
    reopened.append({"id": 3})
    assert [r["id"] for r in read_jsonl(path)] == [1, 2, 3]


def test_duplicates_and_rewrite_checks():
    texts = ["How can I do the thing here?", "how can i do the THING here", "How can I do the thing here now?",
             "Something else."]
    assert find_duplicates(texts, 0.8) == {1: ("exact", 0), 2: ("near", 0)}
    good = {"diagnosis": "too vague", "rule_patches": ["name it"], "prompt": "x" * 300}
    assert check_rewrite(good)["prompt"] == "x" * 300
    for broken in ({**good, "prompt": "short"}, {**good, "rule_patches": "one"}, {**good, "prompt": "{{x}}" * 100},
                   {k: v for k, v in good.items() if k != "diagnosis"}):
        with pytest.raises(ValueError):
            check_rewrite(broken)
    with pytest.raises(ValueError, match="min_mean_score"):
        load_config(overrides={"min_mean_score": 9})


def test_shipped_dataset_meets_the_bar():
    records = read_jsonl(SHIPPED)
    assert len(records) >= 200
    assert all(r.get("source") == "hand-written" for r in records)
    problems = {r["id"]: quality_issues(r) for r in records if quality_issues(r)}
    assert not problems
    cells = {(r["domain"], r["strategy"]) for r in records}
    assert len(cells) == 7 * 7
    multi = sum(sum(m["role"] == "user" for m in r["messages"]) > 1 for r in records)
    assert multi / len(records) >= 0.30
    assert len({r["id"] for r in records}) == len(records)
    assert len(read_conversations(SHIPPED)) == len(records)  # what chat_sft's CustomJSON reads


@pytest.mark.slow
def test_report_on_the_shipped_data(tmp_path, capfd):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"out_dir": str(tmp_path / "run")}))
    assert run_main(config, "report", "--report-input", SHIPPED) is None
    report = (tmp_path / "run" / "report" / "report.md").read_text()
    assert "## Coverage" in report and "Empty cells: none" in report and "report.md" in capfd.readouterr().out
    for png in ("coverage.png", "lengths.png"):
        assert (tmp_path / "run" / "report" / png).stat().st_size > 1000


@pytest.mark.slow
def test_nanochat_server_as_the_blue_team(tmp_path):
    """Any OpenAI-compatible server can be a model: here nanochat's own chat_web answers the questions."""
    from tests.server_utils import RunningServer, make_chat_checkpoint
    make_chat_checkpoint(str(tmp_path))
    with ThreadedServer(FakeLLM().app()) as url, RunningServer(tmp_path) as nanochat:
        config = json.loads(write_config(tmp_path, url, seed_limit=1, apo_rounds=1, apo_sample_size=3,
                                         multiturn_fraction=0.0).read_text())
        config["blue_team"] = {"provider": "openai", "model": "sft-d2", "base_url": nanochat.url + "/v1",
                               "max_tokens": 24}
        config["timeout_seconds"] = 30
        path = tmp_path / "nanochat.json"
        path.write_text(json.dumps(config))
        for stage in ("seeds", "redteam", "optimize", "answers"):
            assert run_main(path, stage) is None
        log = nanochat.log()
    answers = read_jsonl(tmp_path / "run" / "answers.jsonl")
    assert len(answers) == len(read_jsonl(tmp_path / "run" / "questions.jsonl")) > 0
    assert all(a["messages"][-1]["role"] == "assistant" and a["messages"][-1]["content"] for a in answers)
    assert log.count("/v1/chat/completions 200") >= len(answers)
