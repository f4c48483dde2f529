import os

import pytest
import torch

from nanochat import checkpoint_manager
from nanochat.checkpoint_manager import (CheckpointError, build_model, find_largest_model, find_last_step,
                                         load_checkpoint, load_model, restore_training_state, save_checkpoint)
from nanochat.gpt import GPT, GPTConfig
from nanochat.kv_cache import KVCache
from nanochat.optim import checkpoint_states, setup_optimizers
from nanochat.tokenizer import RustBPETokenizer


def tiny_model(attention="mha", n_kv_head=2):
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=32, vocab_size=300, n_layer=2, n_head=2, n_kv_head=n_kv_head, n_embd=32,
                          attention=attention))
    model.init_weights()
    return model


def save_tiny(checkpoint_dir, step, model, optimizers=None):
    meta = dict(model_config=model.config_dict(), user_config={"depth": 2}, val_bpb=1.5)
    optim_states = [o.state_dict() for o in optimizers] if optimizers else None
    save_checkpoint(str(checkpoint_dir), step, model.state_dict(), optim_states, meta)


@pytest.mark.parametrize("attention", ["mha", "mla"])
def test_round_trip(tmp_path, attention):
    model = tiny_model(attention)
    optimizers = setup_optimizers(model)
    x = torch.randint(0, 300, (2, 16))
    model(x, x).backward()
    for opt in optimizers:
        opt.step()
    save_tiny(tmp_path, 7, model, optimizers)
    assert sorted(os.listdir(tmp_path)) == ["meta_000007.json", "model_000007.pt", "optim_000007_rank0.pt"]

    loaded, meta = build_model(str(tmp_path), 7, torch.device("cpu"), "eval")
    assert meta["step"] == 7 and meta["val_bpb"] == 1.5 and not loaded.training
    for name, p in model.state_dict().items():
        assert torch.equal(p, loaded.state_dict()[name]), name
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded(x))
    assert loaded.lm_head.weight.t().is_contiguous()  # column-major for CPU inference; same values, same logits

    _, optim_states, _ = load_checkpoint(str(tmp_path), 7, "cpu", load_optimizer=True)
    fresh = setup_optimizers(tiny_model(attention))
    for opt, state in zip(fresh, optim_states):
        opt.load_state_dict(state)
    assert fresh[1].state_dict()["state"].keys() == optimizers[1].state_dict()["state"].keys()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_weights_load_as_fp32_and_compile_prefix_is_stripped(tmp_path, dtype):
    """On every device (no branch on it): fp32 master weights for training, one dtype where autocast is off."""
    model = tiny_model()
    state = {"_orig_mod." + k: v.to(dtype) for k, v in model.state_dict().items()}
    meta = dict(model_config=model.config_dict())
    save_checkpoint(str(tmp_path), 1, state, None, meta)
    loaded, _ = build_model(str(tmp_path), 1, torch.device("cpu"), "train")
    assert all(p.dtype == torch.float32 for p in loaded.parameters()) and loaded.training
    assert all(p.is_contiguous() for p in loaded.parameters())  # training keeps the default layout


@pytest.mark.parametrize("attention,n_kv_head", [("mha", 2), ("gqa", 1), ("mla", 2)])
def test_inference_weights_take_the_compute_dtype(tmp_path, attention, n_kv_head, monkeypatch):
    """
    Where inference computes in bf16 (GPUs from Ampere on; the CPU stands in for one here), the matmul weights
    load in bf16 and the embedding in fp32: the same logits as fp32 weights under autocast, bit for bit,
    with autocast on or off (the model then enters it itself), through a KV cache too (bf16 either way).
    """
    model = tiny_model(attention, n_kv_head)
    for name, p in model.named_parameters():  # output projections start at zero: give attention some effect
        if name.endswith("c_proj.weight"):
            torch.nn.init.normal_(p, std=0.05)
    save_tiny(tmp_path, 1, model)
    monkeypatch.setattr(checkpoint_manager, "autocast_dtype", lambda device_type: torch.bfloat16)
    loaded, _ = build_model(str(tmp_path), 1, torch.device("cpu"), "eval")
    dtypes = {name: p.dtype for name, p in loaded.named_parameters()}
    assert dtypes.pop("transformer.wte.weight") == torch.float32 and set(dtypes.values()) == {torch.bfloat16}
    model.eval()
    x = torch.randint(0, 300, (2, 12))
    bf16 = dict(device_type="cpu", dtype=torch.bfloat16)
    with torch.inference_mode():
        with torch.autocast(**bf16):
            expected = model(x)
            assert torch.equal(loaded(x), expected)
            reference_cache = KVCache.for_model(model, 2, 16)
            expected_steps = [model(x[:, :8], kv_cache=reference_cache), model(x[:, 8:9], kv_cache=reference_cache)]
        assert torch.equal(loaded(x), expected)
        cache = KVCache.for_model(loaded, 2, 16)
        steps = [loaded(x[:, :8], kv_cache=cache), loaded(x[:, 8:9], kv_cache=cache)]
    assert all(torch.equal(a, b) for a, b in zip(steps, expected_steps))
    assert {t.dtype for t in cache.tensors.values()} == {torch.bfloat16}


def test_find_last_step_and_largest_model(tmp_path):
    model = tiny_model()
    for tag in ("d2", "d12", "d4"):
        os.makedirs(tmp_path / tag)
    assert find_largest_model(str(tmp_path)) == "d12"
    for step in (5, 20, 10):
        save_tiny(tmp_path / "d12", step, model)
    assert find_last_step(str(tmp_path / "d12")) == 20
    with pytest.raises(CheckpointError, match="no checkpoints"):
        find_last_step(str(tmp_path / "d2"))


def test_partial_save_is_not_a_checkpoint(tmp_path):
    """A crash before meta is written leaves no checkpoint that looks complete."""
    model = tiny_model()
    save_tiny(tmp_path, 5, model)
    torch.save(model.state_dict(), tmp_path / "model_000010.pt.tmp")  # interrupted write of step 10
    assert find_last_step(str(tmp_path)) == 5
    with pytest.raises(CheckpointError, match="meta_000010.json is missing"):
        load_checkpoint(str(tmp_path), 10, "cpu")


def test_truncated_model_file_is_refused(tmp_path):
    save_tiny(tmp_path, 3, tiny_model())
    path = tmp_path / "model_000003.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model_000003.pt"):
        load_checkpoint(str(tmp_path), 3, "cpu")


def test_corrupt_model_file_is_refused(tmp_path):
    save_tiny(tmp_path, 3, tiny_model())
    path = tmp_path / "model_000003.pt"
    size = path.stat().st_size
    path.write_bytes(b"\0" * size)  # same size, garbage content
    with pytest.raises(CheckpointError, match="corrupt or partial.*model_000003.pt"):
        load_checkpoint(str(tmp_path), 3, "cpu")


def test_corrupt_meta_is_refused(tmp_path):
    save_tiny(tmp_path, 3, tiny_model())
    (tmp_path / "meta_000003.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="meta_000003.json"):
        load_checkpoint(str(tmp_path), 3, "cpu")


def test_missing_optimizer_file_is_named(tmp_path):
    save_tiny(tmp_path, 3, tiny_model())
    with pytest.raises(CheckpointError, match="optim_000003_rank0.pt"):
        load_checkpoint(str(tmp_path), 3, "cpu", load_optimizer=True)


def test_load_model_checks_tokenizer(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    text = ["the quick brown fox jumps over the lazy dog " * 20, "hello world, numbers 12 345 6789 " * 20]
    tokenizer = RustBPETokenizer.train_from_iterator(iter(text), 300)
    tokenizer.save(str(tmp_path / "tokenizer"))
    vocab_size = tokenizer.get_vocab_size()
    config = dict(sequence_len=32, n_layer=2, n_head=2, n_kv_head=2, n_embd=32)
    matching, mismatched = GPT(GPTConfig(vocab_size=vocab_size, **config)), GPT(GPTConfig(vocab_size=vocab_size + 1, **config))
    for model in (matching, mismatched):
        model.init_weights()
    save_tiny(tmp_path / "base_checkpoints" / "d2", 4, matching)
    save_tiny(tmp_path / "base_checkpoints" / "d3", 4, mismatched)
    model, tok, meta = load_model("base", "cpu", "eval", model_tag="d2")
    assert meta["step"] == 4 and model.config.vocab_size == tok.get_vocab_size()
    with pytest.raises(CheckpointError, match="does not match"):
        load_model("base", "cpu", "eval")  # the largest tag, d3, was trained with another tokenizer
    with pytest.raises(ValueError, match="source must be one of"):
        load_model("pretrained", "cpu", "eval")
    with pytest.raises(CheckpointError, match="no checkpoints directory"):
        load_model("sft", "cpu", "eval")


def trained_tiny():
    """A tiny model and its optimizers after one step (so the optimizers have state)."""
    model = tiny_model()
    optimizers = setup_optimizers(model)
    x = torch.randint(0, 300, (2, 16))
    model(x, x).backward()
    for opt in optimizers:
        opt.step()
    return model, optimizers


def test_restore_training_state(tmp_path):
    model, optimizers = trained_tiny()
    save_tiny(tmp_path, 4, model, optimizers)
    fresh = tiny_model()
    fresh_optimizers = setup_optimizers(fresh)
    meta = restore_training_state(str(tmp_path), 4, fresh, fresh_optimizers, "cpu")
    assert meta["step"] == 4 and all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))
    assert fresh_optimizers[1].state_dict()["state"].keys() == optimizers[1].state_dict()["state"].keys()
    other = tiny_model("mla")
    with pytest.raises(CheckpointError, match="model config"):
        restore_training_state(str(tmp_path), 4, other, setup_optimizers(other), "cpu")


def test_replicated_optimizer_state_is_saved_once_and_every_rank_restores_it(tmp_path):
    """Under torchrun AdamW's state (the same on every rank) is in rank 0's file only; Muon's is per rank."""
    model, optimizers = trained_tiny()
    meta = dict(model_config=model.config_dict())
    save_checkpoint(str(tmp_path), 4, model.state_dict(), checkpoint_states(optimizers, rank=0), meta, rank=0)
    rank1_states = checkpoint_states(optimizers, rank=1)
    assert rank1_states[0] is None and rank1_states[1] is not None  # AdamW left to rank 0, Muon kept
    for state in rank1_states[1]["state"].values():  # rank 1's own Muon momentum differs from rank 0's
        state["momentum_buffer"] = state["momentum_buffer"] * 2
    save_checkpoint(str(tmp_path), 4, None, rank1_states, meta, rank=1)

    fresh = tiny_model()
    restored = setup_optimizers(fresh)
    restore_training_state(str(tmp_path), 4, fresh, restored, "cpu", rank=1)
    adamw, muon = (opt.state_dict()["state"] for opt in restored)
    assert all(torch.equal(adamw[k]["exp_avg"], v["exp_avg"]) for k, v in optimizers[0].state_dict()["state"].items())
    assert all(torch.equal(muon[k]["momentum_buffer"], v["momentum_buffer"]) for k, v in rank1_states[1]["state"].items())


def test_speculative_flags_and_the_draft_they_name():
    from nanochat.checkpoint_manager import load_draft, speculative_flags_error
    assert speculative_flags_error(0, None) is None and speculative_flags_error(4, "ngram") is None
    assert "must be >= 0" in speculative_flags_error(-1, "d2")
    assert "needs --draft-model-tag" in speculative_flags_error(4, None)
    assert load_draft("sft", None, "cpu") is None and load_draft("sft", "ngram", "cpu") == "ngram"
