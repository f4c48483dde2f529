"""
End to end on CPU: a tiny base checkpoint -> mid_train -> chat_sft -> chat_eval (categorical and
generative tasks, AIME per year, --log-samples) -> chat_rl, with a small dataset mirror written by the test.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from nanochat.checkpoint_manager import save_checkpoint
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import RustBPETokenizer

pytestmark = pytest.mark.slow


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def make_mirror(root):
    """A few examples of each dataset, in the NANOCHAT_DATA_DIR layout."""
    gsm8k = [{"question": f"Tom has {i} apples and buys {i + 2} more. How many apples does he have?",
              "answer": f"He has {i} + {i + 2} = <<{i}+{i + 2}={2 * i + 2}>>{2 * i + 2} apples.\n#### {2 * i + 2}"}
             for i in range(1, 13)]
    write_jsonl(root / "gsm8k" / "train.jsonl", gsm8k)
    write_jsonl(root / "gsm8k" / "test.jsonl", gsm8k[:6])
    chats = [{"messages": [{"role": "user", "content": f"Say something about the number {i}."},
                           {"role": "assistant", "content": f"The number {i} comes after {i - 1}."}]} for i in range(1, 41)]
    write_jsonl(root / "chat_sft" / "tiny.messages.jsonl", chats)
    arc = [{"query": f"Question: Which number is largest, option {i}?\nAnswer:", "choices": ["1", "2", "3", "40"], "gold": 3}
           for i in range(6)]
    write_jsonl(root / "arc" / "arc_easy_test.jsonl", arc)
    for year in (2024, 2025):
        rows = [{"ID": f"{year}-I-{i}", "Problem": f"What is {i} times 3?", "Solution": "", "Answer": 3 * i} for i in range(1, 4)]
        write_jsonl(root / "aime" / f"aime_{year}.jsonl", rows)


@pytest.fixture
def env(isolated_base_dir, tmp_path):
    mirror = tmp_path / "mirror"
    make_mirror(mirror)
    text = ["Tom has apples. He buys more apples. The number comes after. Which number is largest? " * 20,
            "What is 3 times 4? It is 12. Say something about the number 7. #### 14 " * 20]
    tokenizer = RustBPETokenizer.train_from_iterator(iter(text), 400)
    tokenizer.save(str(isolated_base_dir / "tokenizer"))
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=256, vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
    model.init_weights()
    save_checkpoint(str(isolated_base_dir / "base_checkpoints" / "d2"), 10, model.state_dict(), None,
                    dict(model_config=model.config_dict()))
    environment = dict(os.environ, NANOCHAT_BASE_DIR=str(isolated_base_dir), NANOCHAT_DATA_DIR=str(mirror),
                       HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return environment


def run(args, env, expect=0):
    result = subprocess.run([sys.executable, "-m", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, timeout=600)  # one stream: log lines stay in order with the prints
    output = result.stdout
    assert result.returncode == expect, f"{args} exited {result.returncode}:\n{output[-4000:]}"
    return output


def assert_no_recompilation_after_first_step(out):
    """TORCH_LOGS=recompiles output: compiling the eval and the train graph happens before step 1 is logged."""
    after = out[out.index("step 00001/"):]
    assert "Recompiling" not in after, after[:3000]


def test_mid_sft_eval_rl(env, isolated_base_dir, tmp_path, run_main, monkeypatch):
    small = ["--max-seq-len", "128", "--device-batch-size", "2", "--examples-per-step", "4", "--num-iterations", "3",
             "--eval-every", "2", "--eval-batches", "1"]
    # compiled (with the eager backend: dynamo's guards and recompilations, without C++ compile minutes)
    compiled = dict(env, TORCH_LOGS="recompiles", NANOCHAT_COMPILE_BACKEND="eager")
    out = run(["scripts.mid_train", *small, "--compile-mode", "default"], compiled)
    assert "GSM8K train 12" in out and "val loss" in out and "estimated peak memory" in out
    assert_no_recompilation_after_first_step(out)
    assert os.path.exists(isolated_base_dir / "mid_checkpoints" / "d2" / "model_000003.pt")
    out = run(["scripts.chat_sft", *small, "--compile-mode", "default"], compiled)
    assert "identity_conversations.jsonl" in out and "skipping ARC-Easy train" in out  # says what it used
    assert_no_recompilation_after_first_step(out)
    assert os.path.exists(isolated_base_dir / "chatsft_checkpoints" / "d2" / "meta_000003.json")

    # the rest in this process (no interpreter start and torch import per stage)
    for name in ("NANOCHAT_DATA_DIR", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(name, env[name])
    # resume continues from the saved step
    run_main("scripts.chat_sft", [*small, "--num-iterations", "4", "--resume-from-step", "3"])
    assert os.path.exists(isolated_base_dir / "chatsft_checkpoints" / "d2" / "model_000004.pt")

    samples = tmp_path / "samples.jsonl"
    out = run_main("scripts.chat_eval", ["-i", "sft", "-a", "ARC-Easy|GSM8K|AIME", "-x", "4", "-b", "3", "-m", "16",
                                         "--log-samples", str(samples)])
    assert "ARC-Easy:" in out and "GSM8K:" in out and "AIME-2024:" in out and "AIME-2025:" in out
    logged = [json.loads(line) for line in samples.read_text().splitlines()]
    assert {r["task"] for r in logged} == {"ARC-Easy", "GSM8K", "AIME"}
    assert all("correct" in r for r in logged) and any("extracted" in r for r in logged)
    report = (isolated_base_dir / "report" / "chat-evaluation-sft.md").read_text()
    assert "ARC-Easy" in report and "AIME" in report

    out = run_main("scripts.chat_eval", ["-i", "sft", "-a", "MMLU", "-x", "2"])
    assert "MMLU: skipped" in out  # not in the mirror and the hub is offline: skipped with the reason

    out = run_main("scripts.chat_rl", ["--examples-per-step", "2", "--num-samples", "2", "--max-new-tokens", "8",
                                       "--num-iterations", "2", "--eval-every", "2", "--eval-examples", "2",
                                       "--pass-k", "2"])
    assert "mean reward" in out and "pass@2" in out
    assert os.path.exists(isolated_base_dir / "chatrl_checkpoints" / "d2" / "model_000002.pt")


def test_chat_stage_errors(env, run_main, monkeypatch):
    for name in ("NANOCHAT_DATA_DIR", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(name, env[name])
    out = run_main("scripts.chat_sft", ["--examples-per-step", "3", "--device-batch-size", "2"], expect=1)
    assert "mid_checkpoints" in out  # no midtrained model yet
    out = run_main("scripts.chat_sft", ["--source", "base", "--examples-per-step", "3", "--device-batch-size", "2"],
                   expect=1)
    assert "multiple of" in out
    assert "no checkpoints directory" in run_main("scripts.chat_eval", ["-i", "rl"], expect=1)
    assert "unknown task" in run_main("scripts.chat_eval", ["-a", "Jeopardy"], expect=2)
    assert "not found" in run_main("scripts.chat_sft", ["--custom-json", "/nonexistent.jsonl"], expect=2)


def test_without_a_validation_task_the_log_says_val_loss_uses_training_data(capsys):
    from scripts.finetune_cli import mixtures
    from tasks.common import Task
    train = Task()
    train.rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    train.to_conversation = lambda row: row
    _, val = mixtures([train], [])
    assert len(val) == 1 and "measured on training conversations" in capsys.readouterr().out
    mixtures([train], [train])
    assert capsys.readouterr().out == ""
