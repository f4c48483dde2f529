"""
The GPT model.

Notable choices:
- rotary position embeddings (no learned positions), QK-norm, parameter-free RMSNorm, no biases
- ReLU² MLP, untied token embedding and unembedding, logits soft-capped with tanh
- three attention variants:
    "mha"  multi-head attention, n_kv_head == n_head
    "gqa"  grouped-query attention, n_kv_head divides n_head (MQA when n_kv_head == 1)
    "mla"  multi-head latent attention: tokens are compressed to a latent c_kv (kv_lora_rank) plus one
           small RoPE key shared by all heads; only those two are cached, and at decode time the K and
           V up-projections are absorbed into the query and the output so the cache is never expanded.
- optional gradient checkpointing per block (recompute activations in backward, same gradients)
- the weights live in nn.Linear modules (names, init, state dicts) but forward calls F.linear on them: a module
  call costs ~2.7 µs of Python on a CPU, about a quarter of a small decode step's matmul time
"""

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

ATTENTION_VARIANTS = ("mha", "gqa", "mla")


@dataclass
class GPTConfig:
    sequence_len: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    attention: str = "mha"
    # MLA sizes (0 = derived from the head dim in __post_init__)
    kv_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    logit_softcap: float = 15.0

    def __post_init__(self):
        if self.attention not in ATTENTION_VARIANTS:
            raise ValueError(f"attention must be one of {ATTENTION_VARIANTS}, got {self.attention!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.attention == "mha" and self.n_kv_head != self.n_head:
            raise ValueError(f"mha needs n_kv_head == n_head, got n_kv_head={self.n_kv_head}, n_head={self.n_head}")
        if self.attention == "gqa" and (self.n_kv_head < 1 or self.n_head % self.n_kv_head != 0):
            raise ValueError(f"gqa needs n_kv_head to divide n_head, got n_kv_head={self.n_kv_head}, n_head={self.n_head}")
        head_dim = self.n_embd // self.n_head
        if head_dim % 2 != 0:
            raise ValueError(f"head dim n_embd/n_head = {head_dim} must be even for rotary embeddings")
        if self.attention == "mla":
            # DeepSeek-V2 sizes: latent = 4 head dims (capped at half the width for small models),
            # decoupled RoPE key = half a head dim
            self.kv_lora_rank = self.kv_lora_rank or min(4 * head_dim, self.n_embd // 2)
            # rounded down to a multiple of 8 where it can be: a query of nope + rope dims stays 8-aligned
            rope_dim = head_dim // 2
            self.qk_rope_head_dim = self.qk_rope_head_dim or (rope_dim - rope_dim % 8 if rope_dim >= 8 else rope_dim)
            if self.qk_rope_head_dim % 2 != 0:
                raise ValueError(f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
            self.n_kv_head = 1  # the latent is shared by all heads


def config_from_depth(depth, sequence_len, vocab_size, attention="mha", head_dim=128, n_kv_head=None,
                      kv_lora_rank=0):
    """
    nanochat convention: width = 64 * depth, heads of at most head_dim, as few as divide the width into heads a
    multiple of 8 wide (depth 3 with head_dim 128: 192 wide -> 2 heads of 96). CUDA's fused attention kernels
    need that alignment: depth 17 would otherwise get 16 heads of 68 and the unfused math kernel (slower,
    memory quadratic in the sequence); it gets 17 heads of 64. Any width 64 * depth has heads of 64.
    """
    if depth < 1:
        raise ValueError(f"--depth must be >= 1, got {depth}")
    n_embd = 64 * depth
    n_head = max(1, math.ceil(n_embd / head_dim))
    while n_embd % n_head != 0 or (head_dim >= 8 and n_embd // n_head % 8 != 0):
        n_head += 1
    if attention == "mha":
        n_kv_head = n_head
    elif n_kv_head is None:  # gqa: the most kv heads, up to half the heads, that divide them (10 heads: 5; 13: 1)
        n_kv_head = max(k for k in range(1, max(1, n_head // 2) + 1) if n_head % k == 0)
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                     n_kv_head=n_kv_head, n_embd=n_embd, attention=attention, kv_lora_rank=kv_lora_rank)


def norm(x):
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary_emb(x, cos, sin):
    """
    x: (B, T, H, D) rotated pairwise (x1, x2) = its two halves: (x1 cos + x2 sin, x2 cos - x1 sin).
    cos, sin: (1 or B, T, 1, D), the tables already laid out as [cos, cos] and [sin, -sin], so the rotation is
    x * cos + [x2, x1] * sin, [x2, x1] being x rolled by D/2: four ops instead of eight (decode is bound by
    per-op overhead), same bits.
    """
    d = x.shape[-1] // 2
    return x * cos + x.roll(d, dims=-1) * sin


def attention(q, k, v, attn_mask=None, scale=None):
    """
    Scaled dot-product attention, q (B, H, T, D) over k, v (B, H_kv, S, D|Dv) with H a multiple of H_kv.
    Without a mask it is causal: T == S, or one query (T == 1) that sees every key. With grouped heads
    (H > H_kv) and a mask (a KV cache whose rows have different lengths) or one query (decode), each group of
    H / H_kv query heads is folded into the query axis, (B, H_kv, group*T, D), with the mask repeated to match:
    CUDA has no fused kernel that takes both enable_gqa and a mask (the math fallback would build (B, H, T, S)
    scores), and for decode enable_gqa repeats K/V per head on a CPU (MLA's 16 heads over one 576-wide latent,
    500 keys: 2.64 ms against 0.17 ms folded). Folded, K/V are never copied.
    """
    B, H, T, D = q.shape
    H_kv = k.size(1)
    if H != H_kv and (attn_mask is not None or T == 1):
        group = H // H_kv
        q = q.reshape(B, H_kv, group * T, D)  # query head h = kv head h // group (enable_gqa's order)
        mask = None if attn_mask is None else attn_mask.repeat(1, 1, group, 1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return y.reshape(B, H, T, -1)  # not view: CUDA's fused kernels return y with (B, group*T, H_kv, D) strides
    if attn_mask is None:  # causal aligned to the last key: T == S (no cache or an empty one) or T == 1 (decode)
        assert T == 1 or T == k.size(2), "a query block shorter than the keys needs a mask"
        return F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, scale=scale, enable_gqa=H != H_kv)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)


class CausalSelfAttention(nn.Module):
    """MHA and GQA. With a KV cache, K/V of n_kv_head heads are cached per token."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(self.n_head * self.head_dim, config.n_embd, bias=False)

    def forward(self, x, cos, sin, kv_cache=None, attn_mask=None):
        B, T, C = x.shape
        q = F.linear(x, self.c_q.weight).view(B, T, self.n_head, self.head_dim)
        k = F.linear(x, self.c_k.weight).view(B, T, self.n_kv_head, self.head_dim)
        v = F.linear(x, self.c_v.weight).view(B, T, self.n_kv_head, self.head_dim)
        # rotary and QK-norm over the query and key heads together: half the ops (decode is op-bound)
        qk = norm(apply_rotary_emb(torch.cat([q, k], dim=2), cos, sin))
        q, k = qk.split([self.n_head, self.n_kv_head], dim=2)
        if kv_cache is not None:
            # the full history of this layer: (B, S, n_kv_head, head_dim), S = longest row + T
            k = kv_cache.write(self.layer_idx, "k", k)
            v = kv_cache.write(self.layer_idx, "v", v)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T or S, head_dim)
        y = attention(q, k, v, attn_mask)  # (B, n_head, T, head_dim)
        return F.linear(y.transpose(1, 2).reshape(B, T, -1), self.c_proj.weight)


class MultiHeadLatentAttention(nn.Module):
    """
    MLA. Per token we keep c_kv (kv_lora_rank) and k_rope (qk_rope_head_dim); per head,
    k_nope = W_uk c_kv and v = W_uv c_kv. Scores are q_nope·k_nope + q_rope·k_rope.

    Training / no cache: expand c_kv into per-head K and V and run ordinary attention.
    With a cache (absorbed form): q_nope·(W_uk c) = (W_ukᵀ q_nope)·c, so the query is mapped into the
    latent space and attends over the cached latents directly (one shared "kv head" of width
    kv_lora_rank + qk_rope_head_dim); the attention output stays in latent space and W_uv is applied
    after, together with the output projection. The cache is never expanded to full K/V.

    QK-norm is applied where it stays absorbable: on the queries, the latent c_kv and the RoPE key.
    """

    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.nope_dim = config.n_embd // config.n_head
        self.rope_dim = config.qk_rope_head_dim
        self.v_dim = self.nope_dim
        self.rank = config.kv_lora_rank
        self.c_q = nn.Linear(config.n_embd, self.n_head * (self.nope_dim + self.rope_dim), bias=False)
        self.c_kv_down = nn.Linear(config.n_embd, self.rank + self.rope_dim, bias=False)
        self.c_k_up = nn.Linear(self.rank, self.n_head * self.nope_dim, bias=False)
        self.c_v_up = nn.Linear(self.rank, self.n_head * self.v_dim, bias=False)
        self.c_proj = nn.Linear(self.n_head * self.v_dim, config.n_embd, bias=False)
        self.scale = 1.0 / math.sqrt(self.nope_dim + self.rope_dim)

    def forward(self, x, cos, sin, kv_cache=None, attn_mask=None):
        B, T, C = x.shape
        H = self.n_head
        q = F.linear(x, self.c_q.weight).view(B, T, H, self.nope_dim + self.rope_dim)
        q_nope, q_rope = norm(q[..., :self.nope_dim]), q[..., self.nope_dim:]
        q_rope = norm(apply_rotary_emb(q_rope, cos, sin))
        kv = F.linear(x, self.c_kv_down.weight)
        c_kv = norm(kv[..., :self.rank])  # (B, T, rank)
        k_rope = norm(apply_rotary_emb(kv[..., self.rank:].unsqueeze(2), cos, sin)).squeeze(2)  # (B, T, rope_dim)

        if kv_cache is None:
            k_nope = F.linear(c_kv, self.c_k_up.weight).view(B, T, H, self.nope_dim)
            k = torch.cat([k_nope, k_rope.unsqueeze(2).expand(B, T, H, self.rope_dim)], dim=-1)
            v = F.linear(c_kv, self.c_v_up.weight).view(B, T, H, self.v_dim)
            q = torch.cat([q_nope, q_rope], dim=-1)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, .)
            y = attention(q, k, v, scale=self.scale)
            return F.linear(y.transpose(1, 2).reshape(B, T, -1), self.c_proj.weight)

        c_kv = kv_cache.write(self.layer_idx, "c_kv", c_kv)        # (B, S, rank)
        k_rope = kv_cache.write(self.layer_idx, "k_rope", k_rope)  # (B, S, rope_dim)
        w_uk = self.c_k_up.weight.view(H, self.nope_dim, self.rank)
        w_uv = self.c_v_up.weight.view(H, self.v_dim, self.rank)
        q_latent = torch.einsum("bthd,hdr->bthr", q_nope, w_uk)       # (B, T, H, rank)
        q = torch.cat([q_latent, q_rope], dim=-1).transpose(1, 2)      # (B, H, T, rank + rope_dim)
        k = torch.cat([c_kv, k_rope], dim=-1).unsqueeze(1)             # (B, 1, S, rank + rope_dim)
        v = c_kv.unsqueeze(1)                                          # (B, 1, S, rank)
        y = attention(q, k, v, attn_mask, scale=self.scale)              # (B, H, T, rank)
        y = torch.einsum("bhtr,hdr->bthd", y, w_uv)                    # (B, T, H, v_dim)
        return F.linear(y.reshape(B, T, -1), self.c_proj.weight)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return F.linear(F.relu(F.linear(x, self.c_fc.weight)).square(), self.c_proj.weight)


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        attention_class = MultiHeadLatentAttention if config.attention == "mla" else CausalSelfAttention
        self.attn = attention_class(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, kv_cache=None, attn_mask=None):
        x = x + self.attn(norm(x), cos, sin, kv_cache, attn_mask)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # rotary tables cover 10x the training context so generation can run past it
        self.rope_dim = config.qk_rope_head_dim if config.attention == "mla" else config.n_embd // config.n_head
        self.rotary_seq_len = config.sequence_len * 10
        cos, sin = self._precompute_rotary(self.rotary_seq_len, self.rope_dim)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _precompute_rotary(self, seq_len, dim, base=10000, device=None):
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
        t = torch.arange(seq_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)  # (seq_len, dim/2)
        cos, sin = freqs.cos(), freqs.sin()
        # laid out for apply_rotary_emb: (1, seq_len, 1, dim)
        return torch.cat([cos, cos], dim=-1)[None, :, None, :], torch.cat([sin, -sin], dim=-1)[None, :, None, :]

    @torch.no_grad()
    def init_weights(self):
        """Also call after to_empty(): it fills parameters and recomputes the rotary buffers."""
        torch.nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        torch.nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.transformer.h:
            for name, p in block.named_parameters():
                if name.endswith("c_proj.weight"):
                    torch.nn.init.zeros_(p)  # residual branches start as identity
                else:
                    torch.nn.init.normal_(p, mean=0.0, std=1.0 / math.sqrt(p.shape[1]))
        cos, sin = self._precompute_rotary(self.rotary_seq_len, self.rope_dim, device=self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def enable_gradient_checkpointing(self, enabled=True):
        """Recompute each block's activations in backward: lower peak memory, identical gradients."""
        self.gradient_checkpointing = enabled

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self):
        """Training FLOPs per token: 6 per matmul weight (fwd + bwd) plus attention over the context."""
        c = self.config
        num_matmul_params = self.num_params() - self.transformer.wte.weight.numel()
        if c.attention == "mla":
            qk_dim, v_dim = c.n_embd // c.n_head + c.qk_rope_head_dim, c.n_embd // c.n_head
        else:
            qk_dim = v_dim = c.n_embd // c.n_head
        attention_flops = 6 * c.n_layer * c.n_head * (qk_dim + v_dim) * c.sequence_len
        return 6 * num_matmul_params + attention_flops

    def kv_cache_layout(self):
        """What one layer caches per token: {name: trailing shape}."""
        c = self.config
        if c.attention == "mla":
            return {"c_kv": (c.kv_lora_rank,), "k_rope": (c.qk_rope_head_dim,)}
        head_dim = c.n_embd // c.n_head
        return {"k": (c.n_kv_head, head_dim), "v": (c.n_kv_head, head_dim)}

    def kv_cache_bytes_per_token(self, dtype=torch.bfloat16):
        elements_per_layer = sum(math.prod(shape) for shape in self.kv_cache_layout().values())
        return self.config.n_layer * elements_per_layer * torch.empty((), dtype=dtype).element_size()

    def get_device(self):
        return self.transformer.wte.weight.device

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean", logits_at=None):
        """
        idx: (B, T) token ids. targets: (B, T) with -1 where no loss is taken.
        Returns the loss when targets are given, else float32 logits (B, T, vocab_size); with
        logits_at ((B,) time indices) only those positions go through the unembedding: (B, 1, vocab_size)
        (a prefill needs the last prompt token's logits only, and the unembedding is the widest matmul).
        With a kv_cache, row b's tokens sit at positions kv_cache.lengths[b] + 0..T-1 and the cache
        lengths advance by T.
        """
        matmul_dtype = self.lm_head.weight.dtype
        if matmul_dtype != torch.float32 and not torch.is_autocast_enabled(idx.device.type):
            # bf16 inference weights (load_model on a bf16 GPU) always compute under autocast, as they were made for
            with torch.autocast(idx.device.type, dtype=matmul_dtype):
                return self.forward(idx, targets, kv_cache, loss_reduction, logits_at)
        B, T = idx.shape
        if kv_cache is None:
            if T > self.rotary_seq_len:
                raise ValueError(f"sequence of {T} tokens exceeds the rotary table ({self.rotary_seq_len})")
            cos, sin = self.cos[:, :T], self.sin[:, :T]  # (1, T, 1, rope_dim)
            attn_mask = None
        else:
            if kv_cache.seq_len > self.rotary_seq_len:
                raise ValueError(f"KV cache of {kv_cache.seq_len} positions exceeds the rotary table "
                                 f"({self.rotary_seq_len})")
            start, positions = kv_cache.begin_step(T)
            if start is not None:  # every row at the same length: a slice, no gather
                cos, sin = self.cos[:, start:start + T], self.sin[:, start:start + T]  # (1, T, 1, rope_dim)
            else:
                cos, sin = self.cos[0, positions], self.sin[0, positions]  # (B, T, 1, rope_dim)
            attn_mask = kv_cache.attention_mask(T)  # None, or (B or 1, 1, T, S)

        x = norm(self.transformer.wte(idx))
        for block in self.transformer.h:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, kv_cache, attn_mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, kv_cache, attn_mask)
        x = norm(x)
        if kv_cache is not None:
            kv_cache.advance(T)

        if logits_at is not None:
            x = x[torch.arange(B, device=x.device), logits_at].unsqueeze(1)  # (B, 1, n_embd)
        logits = F.linear(x, self.lm_head.weight).float()
        softcap = self.config.logit_softcap
        logits = softcap * torch.tanh(logits / softcap)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction=loss_reduction)

    def config_dict(self):
        return asdict(self.config)
