import pytest
import torch

from nanochat.common import saved_tensor_bytes

from nanochat.kv_cache import KVCache
from nanochat.gpt import GPT, GPTConfig, config_from_depth

VOCAB = 97


def tiny_model(attention, n_kv_head=4, seed=0, n_layer=2):
    torch.manual_seed(seed)
    config = GPTConfig(sequence_len=64, vocab_size=VOCAB, n_layer=n_layer, n_head=4, n_kv_head=n_kv_head,
                       n_embd=64, attention=attention)
    model = GPT(config)
    model.init_weights()
    # output projections start at zero; give them weight so attention actually shapes the outputs
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            torch.nn.init.normal_(p, std=0.05)
    return model


VARIANTS = [("mha", 4), ("gqa", 2), ("gqa", 1), ("mla", 4)]


@pytest.mark.parametrize("attention,n_kv_head", VARIANTS)
def test_forward_backward(attention, n_kv_head):
    model = tiny_model(attention, n_kv_head)
    idx = torch.randint(0, VOCAB, (2, 16))
    logits = model(idx)
    assert logits.shape == (2, 16, VOCAB) and logits.dtype == torch.float32
    assert logits.abs().max() <= model.config.logit_softcap
    targets = idx.clone()
    targets[:, :3] = -1  # ignored positions
    loss = model(idx, targets)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.transformer.h[0].attn.c_q.weight.grad.abs().sum() > 0


def test_initial_loss_is_uniform():
    model = tiny_model("mha")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("c_proj.weight"):
                p.zero_()
    idx = torch.randint(0, VOCAB, (4, 32))
    assert abs(model(idx, idx).item() - torch.log(torch.tensor(float(VOCAB))).item()) < 0.05


@pytest.mark.parametrize("attention,n_kv_head", VARIANTS)
def test_cached_equals_uncached(attention, n_kv_head):
    model = tiny_model(attention, n_kv_head).eval()
    idx = torch.randint(0, VOCAB, (3, 24))
    with torch.no_grad():
        full = model(idx)
        kv_cache = KVCache.for_model(model, batch_size=3, seq_len=64)
        pieces = [model(idx[:, :9], kv_cache=kv_cache)]  # prefill 9, then chunks of 1 and 4
        pieces += [model(idx[:, t:t + 1], kv_cache=kv_cache) for t in range(9, 12)]
        pieces += [model(idx[:, 12:16], kv_cache=kv_cache), model(idx[:, 16:], kv_cache=kv_cache)]
    assert torch.allclose(full, torch.cat(pieces, dim=1), atol=1e-5, rtol=0)
    assert kv_cache.lengths.tolist() == [24, 24, 24]


@pytest.mark.parametrize("attention,n_kv_head", VARIANTS)
def test_rows_at_different_lengths(attention, n_kv_head):
    """
    Per-row lengths: a right-padded prefill, one decode step, then a 3-token chunk per row (a batched
    verify) equal each row run alone. The rows live in a view of a larger cache (a server's running
    batch), so the scattered writes must land in the parent's storage.
    """
    model = tiny_model(attention, n_kv_head).eval()
    lengths = [5, 11, 8]
    rows = [torch.randint(0, VOCAB, (n + 4,)) for n in lengths]
    padded = torch.zeros(3, max(lengths), dtype=torch.long)
    for b, (row, n) in enumerate(zip(rows, lengths)):
        padded[b, :n] = row[:n]
    with torch.no_grad():
        parent = KVCache.for_model(model, batch_size=5, seq_len=32)
        kv_cache = parent.view(1, 4)
        model(padded, kv_cache=kv_cache)
        kv_cache.set_lengths(lengths)  # drop the pad positions: they are overwritten and never attended
        next_tokens = torch.stack([row[n] for row, n in zip(rows, lengths)])[:, None]
        batched = model(next_tokens, kv_cache=kv_cache)[:, 0]
        chunk = model(torch.stack([row[n + 1:n + 4] for row, n in zip(rows, lengths)]), kv_cache=kv_cache)
        for b, (row, n) in enumerate(zip(rows, lengths)):
            alone = model(row[None])[0]
            assert torch.allclose(batched[b], alone[n], atol=1e-5), b
            assert torch.allclose(chunk[b], alone[n + 1:], atol=1e-5), b
    assert parent.lengths.tolist() == [0, 9, 15, 12, 0]


def test_rotary_matches_the_pairwise_rotation():
    """The [cos, cos] / [sin, -sin] tables give bit for bit the textbook rotation of the two halves."""
    from nanochat.gpt import apply_rotary_emb
    model = tiny_model("mha")
    x = torch.randn(2, 10, 4, 16)
    cos, sin = model.cos[:, :10, :, :8], model.sin[:, :10, :, :8]
    x1, x2 = x[..., :8], x[..., 8:]
    expected = torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)
    assert torch.equal(apply_rotary_emb(x, model.cos[:, :10], model.sin[:, :10]), expected)


def test_mla_caches_only_latent():
    model = tiny_model("mla")
    c = model.config
    assert set(model.kv_cache_layout()) == {"c_kv", "k_rope"}
    assert c.kv_lora_rank == min(4 * 16, 64 // 2) and c.qk_rope_head_dim == 8
    assert model.kv_cache_bytes_per_token(torch.bfloat16) == c.n_layer * (c.kv_lora_rank + c.qk_rope_head_dim) * 2
    mha = tiny_model("mha")
    assert mha.kv_cache_bytes_per_token(torch.bfloat16) == c.n_layer * 2 * 4 * 16 * 2
    assert tiny_model("gqa", 1).kv_cache_bytes_per_token(torch.float32) == c.n_layer * 2 * 1 * 16 * 4


@pytest.mark.parametrize("attention,n_kv_head", VARIANTS)
def test_gradient_checkpointing_same_gradients(attention, n_kv_head):
    idx = torch.randint(0, VOCAB, (2, 32))
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(attention, n_kv_head, seed=1, n_layer=3)
        model.enable_gradient_checkpointing(checkpointing)
        model(idx, idx).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5), name


@pytest.mark.parametrize("attention,n_kv_head", VARIANTS)
def test_gradient_checkpointing_saves_less_activation_memory(attention, n_kv_head):
    idx = torch.randint(0, VOCAB, (2, 32))
    saved = {}
    for checkpointing in (False, True):
        model = tiny_model(attention, n_kv_head, n_layer=4)
        model.enable_gradient_checkpointing(checkpointing)
        saved[checkpointing], _ = saved_tensor_bytes(lambda: model(idx, idx))
    assert saved[True] < 0.6 * saved[False], saved


def test_config_validation():
    with pytest.raises(ValueError, match="attention must be one of"):
        GPTConfig(attention="flash")
    with pytest.raises(ValueError, match="gqa needs n_kv_head"):
        GPTConfig(n_head=6, n_kv_head=4, attention="gqa")
    with pytest.raises(ValueError, match="mha needs"):
        GPTConfig(n_head=6, n_kv_head=3, attention="mha")
    with pytest.raises(ValueError, match="--depth"):
        config_from_depth(0, 128, 300)


def test_config_from_depth():
    c = config_from_depth(20, 2048, 65536)
    assert (c.n_embd, c.n_head, c.n_kv_head, c.n_layer) == (1280, 10, 10, 20)
    c = config_from_depth(4, 256, 512, attention="gqa", head_dim=64)
    assert (c.n_embd, c.n_head, c.n_kv_head) == (256, 4, 2)
    c = config_from_depth(3, 256, 512, head_dim=128)
    assert (c.n_embd, c.n_head) == (192, 2)


@pytest.mark.parametrize("head_dim", [64, 96, 128])
def test_config_from_depth_keeps_heads_aligned_for_fused_attention(head_dim):
    """Every depth gets heads a multiple of 8 wide, at most head_dim; MLA's query (nope + rope) too; GQA's
    default kv heads divide the heads (d26: 13 heads, which n_head // 2 = 6 does not divide)."""
    for depth in range(1, 49):
        c = config_from_depth(depth, 256, 512, head_dim=head_dim)
        width = c.n_embd // c.n_head
        assert width % 8 == 0 and width <= max(head_dim, 64) and c.n_embd % c.n_head == 0, depth
        mla = config_from_depth(depth, 256, 512, attention="mla", head_dim=head_dim)
        assert (width + mla.qk_rope_head_dim) % 8 == 0, depth
        gqa = config_from_depth(depth, 256, 512, attention="gqa", head_dim=head_dim)  # the default kv heads divide
        assert gqa.n_head % gqa.n_kv_head == 0 and gqa.n_kv_head <= max(1, gqa.n_head // 2), depth
    assert config_from_depth(17, 256, 512).n_head == 17  # not 16 heads of 68
    assert [config_from_depth(d, 256, 512, "gqa").n_kv_head for d in (4, 20, 26)] == [1, 5, 1]
    assert [config_from_depth(d, 256, 512).n_head for d in (4, 20, 26, 32)] == [2, 10, 13, 16]  # unchanged


def test_estimate_flops_counts_matmuls():
    model = tiny_model("mha")
    c = model.config
    matmul_params = model.num_params() - c.vocab_size * c.n_embd
    assert model.estimate_flops() == 6 * matmul_params + 12 * c.n_layer * c.n_embd * c.sequence_len


def test_cache_full_is_an_error():
    model = tiny_model("mha").eval()
    kv_cache = KVCache.for_model(model, batch_size=1, seq_len=8)
    with torch.no_grad(), pytest.raises(ValueError, match="full"):
        model(torch.zeros(1, 9, dtype=torch.long), kv_cache=kv_cache)


def test_logits_at_selects_positions():
    model = tiny_model("gqa", 2).eval()
    idx = torch.randint(0, VOCAB, (3, 12))
    with torch.no_grad():
        full = model(idx)
        picked = model(idx, logits_at=torch.tensor([11, 0, 5]))
    assert picked.shape == (3, 1, VOCAB)
    assert torch.allclose(picked[:, 0], full[torch.arange(3), torch.tensor([11, 0, 5])], atol=1e-6)


@pytest.mark.parametrize("n_head, n_kv_head, d, dv", [(6, 2, 16, 16), (4, 1, 24, 16), (3, 3, 8, 8)])
def test_masked_grouped_attention_folds_heads_into_queries(n_head, n_kv_head, d, dv, monkeypatch):
    """With a mask, grouped heads are folded into the query axis (a fused kernel instead of the math fallback
    on CUDA): same result as SDPA's enable_gqa, for GQA and MLA's one shared latent head (dv != d). Also
    with SDPA's output laid out as CUDA's fused kernels return it, (B, T, H, D) in memory, which no view can
    unfold."""
    from nanochat.gpt import attention
    torch.manual_seed(0)
    B, T, S = 2, 3, 7
    q, k, v = torch.randn(B, n_head, T, d), torch.randn(B, n_kv_head, S, d), torch.randn(B, n_kv_head, S, dv)
    lengths = torch.tensor([2, 4])  # rows at different positions, as in a batched decode
    mask = (torch.arange(S)[None, None, :] <= (lengths[:, None] + torch.arange(T))[:, :, None]).unsqueeze(1)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3,
                                                                enable_gqa=n_head != n_kv_head)
    assert torch.allclose(attention(q, k, v, mask, scale=0.3), expected, atol=1e-6)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *args, **kwargs: sdpa(*args, **kwargs).transpose(1, 2).contiguous().transpose(1, 2))
    assert torch.allclose(attention(q, k, v, mask, scale=0.3), expected, atol=1e-6)


@pytest.mark.parametrize("n_head, n_kv_head, d, dv", [(6, 2, 16, 16), (4, 1, 24, 16), (3, 3, 8, 8)])
def test_decode_attention_folds_grouped_heads(n_head, n_kv_head, d, dv, monkeypatch):
    """One query per row, no mask (a decode step): grouped heads fold into the query axis, same result as
    enable_gqa, also with SDPA's output in CUDA's layout."""
    from nanochat.gpt import attention
    torch.manual_seed(0)
    q, k, v = torch.randn(2, n_head, 1, d), torch.randn(2, n_kv_head, 7, d), torch.randn(2, n_kv_head, 7, dv)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3, enable_gqa=n_head != n_kv_head)
    assert torch.allclose(attention(q, k, v, scale=0.3), expected, atol=1e-6)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *args, **kwargs: sdpa(*args, **kwargs).transpose(1, 2).contiguous().transpose(1, 2))
    assert torch.allclose(attention(q, k, v, scale=0.3), expected, atol=1e-6)


@pytest.mark.parametrize("attention,n_kv_head", VARIANTS)
def test_kv_cache_takes_the_compute_dtype(attention, n_kv_head):
    """Under bf16 autocast the cache is bf16 (half of fp32 weights'), and cached decoding still matches."""
    model = tiny_model(attention, n_kv_head).eval()
    idx = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        full = model(idx)
        kv_cache = KVCache.for_model(model, batch_size=2, seq_len=32)
        assert all(t.dtype == torch.bfloat16 for t in kv_cache.tensors.values())
        pieces = [model(idx[:, :8], kv_cache=kv_cache)] + [model(idx[:, t:t + 1], kv_cache=kv_cache) for t in range(8, 12)]
    assert torch.allclose(full, torch.cat(pieces, dim=1), atol=0.1)  # bf16 rounding, not a different computation
    assert KVCache.for_model(model, batch_size=2, seq_len=32).tensors[next(iter(model.kv_cache_layout()))].dtype == torch.float32
