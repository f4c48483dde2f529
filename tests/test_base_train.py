"""
End to end on CPU: tok_train -> base_train -> base_loss on a small corpus the test writes, exact resume,
a 2-process gloo run against 1 process with twice the accumulation, and the errors users hit first.
"""

import json
import os
import random
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow

WORDS = ("the a one some every river stone light city garden teacher child friend house road story music "
         "paper window morning night summer winter water fire small large quiet bright old new green blue "
         "walks sings reads writes builds finds keeps opens carries follows remembers tells and but while "
         "because after before under over near with from into across").split()
TRAIN = ["--depth", "2", "--max-seq-len", "64", "--head-dim", "32", "--device-batch-size", "4",
         "--total-batch-size", "512", "--num-iterations", "12", "--eval-every", "6", "--eval-tokens", "1024",
         "--sample-every", "6", "--save-every", "6"]


def write_corpus(path, num_docs=600, seed=0):
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(num_docs):
            sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 14))).capitalize() + "."
                         for _ in range(rng.randint(2, 8))]
            f.write(" ".join(sentences) + "\n\n")


def run(args, env, expect=0, module=True):
    cmd = [sys.executable, "-m", *args] if module else args
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == expect, f"{' '.join(cmd)} exited {result.returncode}:\n{output[-3000:]}"
    return output


def read_losses(path):
    with open(path) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


@pytest.fixture
def env(isolated_base_dir, monkeypatch):
    monkeypatch.delenv("NANOCHAT_DATA_DIR", raising=False)
    environment = dict(os.environ, NANOCHAT_BASE_DIR=str(isolated_base_dir), OMP_NUM_THREADS="1")
    environment.pop("NANOCHAT_DATA_DIR", None)
    return environment


@pytest.fixture
def prepared(env, tmp_path, run_main):
    """A tokenizer and shards, ready for base_train."""
    corpus = tmp_path / "corpus.txt"
    write_corpus(corpus)
    run_main("nanochat.dataset", ["--local", str(corpus), "--doc-chars", "400", "--row-group-docs", "32"])
    assert "saved tokenizer" in run_main("scripts.tok_train", ["--vocab-size", "512", "--max-chars", "1000000"])
    return env


def test_tok_train_base_train_base_loss_and_exact_resume(prepared, tmp_path, isolated_base_dir, run_main):
    out = run_main("scripts.base_train", [*TRAIN, "--loss-log", str(tmp_path / "full.jsonl")])
    assert "val bpb" in out and "sample:" in out and "eta" in out and "tok/s" in out
    checkpoint_dir = isolated_base_dir / "base_checkpoints" / "d2"
    assert {"model_000006.pt", "model_000012.pt", "meta_000012.json", "optim_000006_rank0.pt"} <= set(os.listdir(checkpoint_dir))
    full = read_losses(tmp_path / "full.jsonl")
    assert len(full) == 12 and full[12] < full[1]
    meta = json.loads((checkpoint_dir / "meta_000012.json").read_text())
    assert meta["val_bpb"] < 8 and meta["step"] == 12

    # continuing from step 6 reproduces steps 7..12 exactly
    run_main("scripts.base_train", [*TRAIN, "--resume-from-step", "6", "--loss-log", str(tmp_path / "resumed.jsonl")])
    resumed = read_losses(tmp_path / "resumed.jsonl")
    assert sorted(resumed) == list(range(7, 13))
    assert all(resumed[s] == full[s] for s in resumed), (resumed, full)

    out = run_main("scripts.base_loss", ["--device-batch-size", "4", "--split-tokens", "1024", "--max-sample-tokens", "8"])
    assert "train bpb:" in out and "val bpb:" in out and "scored tokens (of 1,024 requested)" in out
    report = (isolated_base_dir / "report" / "base-model-loss.md").read_text()
    assert "val bpb" in report and "- val tokens scored: " in report


def test_two_processes_match_one_with_double_accumulation(prepared, tmp_path, isolated_base_dir, run_main):
    env = prepared
    common = [*TRAIN, "--num-iterations", "6", "--save-every", "-1", "--sample-every", "100"]
    run_main("scripts.base_train", [*common, "--model-tag", "single", "--loss-log", str(tmp_path / "single.jsonl")])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "-m", "scripts.base_train", *common, "--model-tag", "ddp", "--loss-log", str(tmp_path / "ddp.jsonl")]
    out = run([*torchrun, "--save-every", "3"], env, module=False)
    assert "x 2 processes x 1 accumulation steps" in out
    single, ddp = read_losses(tmp_path / "single.jsonl"), read_losses(tmp_path / "ddp.jsonl")
    assert sorted(single) == sorted(ddp) == list(range(1, 7))
    max_difference = max(abs(single[s] - ddp[s]) for s in single)
    print(f"max |loss_1proc - loss_2proc| over 6 steps: {max_difference:.3e}")
    assert max_difference < 1e-5

    # AdamW's state is the same on both ranks: saved once, by rank 0; each rank saves its own Muon momentum
    checkpoint_dir = isolated_base_dir / "base_checkpoints" / "ddp"
    rank0, rank1 = (torch.load(checkpoint_dir / f"optim_000003_rank{r}.pt") for r in range(2))
    assert rank0[0] is not None and rank1[0] is None and rank0[1]["state"] and rank1[1]["state"]
    assert not set(rank0[1]["state"]) & set(rank1[1]["state"])  # disjoint Muon shards
    # (restoring them on every rank: tests/test_checkpoint_manager.py; an exact resume under torchrun: dev/gpu_check.sh)


def test_clear_errors(env, run_main):
    out = run_main("scripts.base_train", TRAIN, expect=1)
    assert "tok_train" in out  # no tokenizer yet
    assert "invalid choice: 'flash'" in run_main("scripts.base_train", [*TRAIN, "--attention", "flash"], expect=2)
    out = run_main("scripts.base_train", [*TRAIN, "--device-batch-size", "0"], expect=2)
    assert "--device-batch-size must be >= 1" in out
    out = run_main("scripts.base_train", [*TRAIN, "--attention", "gqa", "--n-kv-head", "3"], expect=2)
    assert "gqa needs n_kv_head to divide n_head" in out and "Traceback" not in out
    assert "base_train" in run_main("scripts.base_loss", [], expect=1)


def test_missing_data_and_corrupt_checkpoint(prepared, run_main, isolated_base_dir):
    out = run_main("scripts.base_train", [*TRAIN, "--total-batch-size", "1000"], expect=1)
    assert "must be a multiple of" in out
    run_main("scripts.base_train", [*TRAIN, "--num-iterations", "6"])
    model_file = isolated_base_dir / "base_checkpoints" / "d2" / "model_000006.pt"
    model_file.write_bytes(model_file.read_bytes()[:1000])
    out = run_main("scripts.base_train", [*TRAIN, "--resume-from-step", "6"], expect=1)
    assert "model_000006.pt" in out and "truncated" in out
    out = run_main("scripts.base_train", [*TRAIN, "--resume-from-step", "3"], expect=1)
    assert "meta_000003.json is missing" in out
    for shard in (isolated_base_dir / "base_data").glob("*.parquet"):
        shard.unlink()
    out = run_main("scripts.base_train", TRAIN, expect=1)
    assert "nanochat.dataset" in out
