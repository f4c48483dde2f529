"""nanochat.memory: the estimated peak of a training step against what the CPU allocator really allocated,
and the --dry-run of the three training scripts at speedrun sizes (no GPU, data or tokenizer needed)."""

import json

import pytest
import torch

from nanochat.gpt import GPT, GPTConfig
from nanochat.memory import format_memory, measure_training_peak, shards_needed, training_memory


FP32, BF16 = torch.float32, torch.bfloat16
CASES = [  # (n_layer, n_embd, n_head, n_kv_head, attention, vocab, B, T, gradient checkpointing, dtype)
    (4, 256, 4, 4, "mha", 4096, 4, 128, False, BF16),  # (fp32 and GQA: dev/bench_memory.py)
    (4, 256, 4, 4, "mla", 4096, 4, 128, False, FP32),
    (4, 256, 4, 4, "mha", 4096, 4, 128, True, FP32),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[4]}{'-ckpt' if c[8] else ''}-{str(c[9])[6:]}")
def test_estimate_matches_what_the_cpu_allocates(case):
    n_layer, n_embd, n_head, n_kv_head, attention, vocab, B, T, checkpointing, dtype = case
    config = GPTConfig(sequence_len=T, vocab_size=vocab, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head,
                       n_embd=n_embd, attention=attention)
    measured, model = measure_training_peak(config, B, T, dtype, compiled=False, gradient_checkpointing=checkpointing)
    estimate = training_memory(model, B, T, world_size=1, dtype=dtype, compiled=False)
    ratio = estimate["total"] / measured
    print(f"measured {measured / 1e6:.1f} MB, estimated {estimate['total'] / 1e6:.1f} MB (ratio {ratio:.3f}): "
          f"{format_memory({k: v * 1000 for k, v in estimate.items()}).replace('GB', 'MB')}")
    assert 0.85 < ratio < 1.2


def test_optimizer_state_is_split_across_ranks():
    with torch.device("meta"):
        model = GPT(GPTConfig(sequence_len=256, vocab_size=4096, n_layer=8, n_head=4, n_kv_head=4, n_embd=256))
    one, eight = training_memory(model, 4, 256, world_size=1), training_memory(model, 4, 256, world_size=8)
    adamw = 4 * 2 * 2 * 4096 * 256  # two moments of the embedding and the unembedding, replicated
    muon = one["optimizer"] - adamw
    assert eight["optimizer"] == adamw + muon // 8  # 48 equal matrices: 6 per rank
    assert eight["activations"] == one["activations"]


def test_shards_needed_covers_the_horizon():
    # d20: 11.2B tokens / 0.65 kept after packing x 4.8 chars / 250M chars, + the val shard
    assert shards_needed(11.2e9) == 332
    assert shards_needed(11.2e9, cropped_fraction=0.0) == 217
    assert shards_needed(1) == 2


def dry_run(capsys, script, *flags, expect=0):
    """The script's main() in this process (a --dry-run allocates nothing and joins no process group)."""
    assert script.main(["--dry-run", *flags]) == expect
    out = capsys.readouterr().out
    return out, (json.loads(out.strip().splitlines()[-1]) if expect == 0 else None)


def test_dry_run_plans_the_speedrun_sizes_without_a_gpu(capsys, monkeypatch):
    from scripts import base_train, chat_sft, mid_train
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    plans = {}
    for depth, batch in ((20, 32), (26, 16), (32, 8)):
        out, plan = dry_run(capsys, base_train, "--depth", str(depth), "--device-batch-size", str(batch),
                            "--world-size", "8", "--device-type", "cuda")
        assert "no tokenizer yet" in out and "estimated peak memory per process" in out
        assert plan["grad_accum_steps"] == 32 // batch and plan["shards"] > 200
        assert plan["tokens"] == round(20 * plan["params"] / 524288) * 524288
        plans[depth] = plan
    assert plans[20]["params"] < plans[26]["params"] < plans[32]["params"]
    _, half = dry_run(capsys, base_train, "--depth", "20", "--device-batch-size", "16", "--world-size", "8",
                      "--device-type", "cuda")
    assert half["grad_accum_steps"] == 2 and half["peak_memory_gb_per_gpu"] < plans[20]["peak_memory_gb_per_gpu"]
    out, _ = dry_run(capsys, base_train, "--depth", "20", "--device-batch-size", "64", "--world-size", "8", expect=1)
    assert "must be a multiple of" in out

    out, mid = dry_run(capsys, mid_train, "--depth", "20", "--world-size", "8", "--device-type", "cuda",
                       "--num-iterations", "100")
    assert mid["tokens"] == 100 * 256 * 2048 and mid["grad_accum_steps"] == 1
    out, sft = dry_run(capsys, chat_sft, "--depth", "20", "--world-size", "8", "--device-type", "cuda")
    assert sft["tokens"] is None and "give --num-iterations" in out
    assert sft["peak_memory_gb_per_gpu"] < mid["peak_memory_gb_per_gpu"]  # 4 rows per GPU instead of 32
    out, _ = dry_run(capsys, chat_sft, "--world-size", "8", expect=1)
    assert "give --depth" in out
