"""
Optimizers and schedules.

Muon trains the 2-D weight matrices of the transformer blocks; AdamW trains the token embedding and
the unembedding (lm_head), whose rows are per-token vectors rather than linear maps.

Distributed: both optimizers average gradients across ranks themselves (no DDP wrapper), so the training
loop is the same code for 1 or N processes. Muon also splits its expensive orthogonalization: each rank
orthogonalizes only the matrices it owns (index % world_size) and broadcasts the updated weights.
"""

import torch
import torch.distributed as dist

from nanochat.common import has_native_bf16

# Coefficients of the quintic Newton-Schulz iteration used by Muon (Keller Jordan, 2024): chosen to push
# singular values towards 1 fast, accepting that they end up in roughly [0.7, 1.2] rather than exactly 1.
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def orthogonalize(G, steps=5, dtype=torch.bfloat16):
    """
    Approximately replace each matrix of G (..., rows, cols) by U Vᵀ from its SVD (all singular values
    -> ~1). The iteration tolerates bf16 (its fixed point attracts rounding errors back), the standard
    choice where bf16 matmuls are fast; Muon passes fp32 where they are emulated.
    """
    a, b, c = NS_COEFFS
    X = G.to(dtype)
    transposed = X.size(-2) > X.size(-1)
    if transposed:  # iterate on the smaller Gram matrix
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return (X.mT if transposed else X).to(G.dtype)


def _average_gradients(params, world_size):
    """All-reduce the gradients of params (in flight together), then divide by world_size."""
    handles = [dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, async_op=True) for p in params if p.grad is not None]
    for h in handles:
        h.wait()
    for p in params:
        if p.grad is not None:
            p.grad.div_(world_size)


class Muon(torch.optim.Optimizer):
    """
    MomentUm Orthogonalized by Newton-schulz: SGD with (Nesterov) momentum whose update is
    orthogonalized, scaled by sqrt(max(1, rows/cols)) so tall and wide matrices move alike.
    """

    sharded = True  # each rank keeps the momentum of the matrices it owns only

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.0,
                 rank=0, world_size=1):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.rank, self.world_size = rank, world_size

    @torch.no_grad()
    def step(self):
        all_params = [p for group in self.param_groups for p in group["params"]]
        if self.world_size > 1:
            _average_gradients(all_params, self.world_size)
        # This rank's matrices, batched by (group, shape): a model's blocks have a handful of shapes, so the
        # Newton-Schulz iteration runs as a few batched matmuls instead of one small matmul chain per matrix.
        batches, index = {}, 0
        for group_index, group in enumerate(self.param_groups):
            for p in group["params"]:
                if index % self.world_size == self.rank and p.grad is not None:
                    batches.setdefault((group_index, p.shape), []).append(p)
                index += 1
        for (group_index, _), params in batches.items():
            self._update(params, self.param_groups[group_index])
        if self.world_size > 1:  # every rank receives the matrices the others updated
            handles = [dist.broadcast(p.data, src=index % self.world_size, async_op=True)
                       for index, p in enumerate(all_params)]
            for h in handles:
                h.wait()

    def _update(self, params, group):
        """One Muon step of same-shape matrices (rows, cols)."""
        updates = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - group["momentum"])
            updates.append(p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf)
        dtype = torch.bfloat16 if has_native_bf16(params[0].device.type) else torch.float32
        updates = orthogonalize(torch.stack(updates), steps=group["ns_steps"], dtype=dtype)  # (n, rows, cols)
        rows, cols = params[0].shape
        if group["weight_decay"] > 0:
            torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
        torch._foreach_add_(params, list(updates.unbind(0)), alpha=-group["lr"] * max(1.0, rows / cols) ** 0.5)


class DistAdamW(torch.optim.AdamW):
    """AdamW that first averages gradients across ranks (a no-op in a single process)."""

    sharded = False  # same averaged gradients, same update: every rank holds the same state

    def __init__(self, params, rank=0, world_size=1, **kwargs):
        super().__init__(params, **kwargs)
        self.rank, self.world_size = rank, world_size

    @torch.no_grad()
    def step(self, closure=None):
        if self.world_size > 1:
            _average_gradients([p for g in self.param_groups for p in g["params"]], self.world_size)
        return super().step(closure)


def setup_optimizers(model, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0,
                     rank=0, world_size=1):
    """Returns [adamw, muon]. AdamW learning rates are scaled by 1/sqrt(width/768) (tuned at width 768)."""
    matrix_params = list(model.transformer.h.parameters())
    embedding_params = list(model.transformer.wte.parameters())
    lm_head_params = list(model.lm_head.parameters())
    assert len(matrix_params) + len(embedding_params) + len(lm_head_params) == len(list(model.parameters()))
    scale = (model.config.n_embd / 768) ** -0.5
    adam_groups = [dict(params=lm_head_params, lr=unembedding_lr * scale),
                   dict(params=embedding_params, lr=embedding_lr * scale)]
    fused = lm_head_params[0].device.type in ("cpu", "cuda")  # one kernel for all tensors (not on meta/mps)
    adamw = DistAdamW(adam_groups, rank=rank, world_size=world_size, betas=(0.8, 0.95), eps=1e-10,
                      weight_decay=weight_decay, fused=fused)
    muon = Muon(matrix_params, lr=matrix_lr, momentum=0.95, weight_decay=weight_decay, rank=rank, world_size=world_size)
    optimizers = [adamw, muon]
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]  # the schedule multiplies this
    return optimizers


def checkpoint_states(optimizers, rank):
    """What this rank saves of each optimizer: a replicated state once (rank 0), a sharded one by every rank."""
    return [opt.state_dict() if rank == 0 or opt.sharded else None for opt in optimizers]


def lr_multiplier(step, num_iterations, warmup_ratio=0.0, warmdown_ratio=0.2, final_lr_frac=0.0):
    """Linear warmup, constant, then linear warmdown to final_lr_frac over the last warmdown_ratio of the run."""
    warmup_iters = round(warmup_ratio * num_iterations)
    warmdown_iters = round(warmdown_ratio * num_iterations)
    if step < warmup_iters:
        return (step + 1) / warmup_iters
    if step <= num_iterations - warmdown_iters:
        return 1.0
    progress = (num_iterations - step) / warmdown_iters  # 1 -> 0 over the warmdown
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(step, warmup_steps=300, start=0.85, end=0.95):
    """Muon momentum ramps up over the first steps, when gradients change fastest."""
    frac = min(step / warmup_steps, 1.0)
    return (1 - frac) * start + frac * end


def apply_schedule(optimizers, step, num_iterations, warmup_ratio, warmdown_ratio, final_lr_frac):
    multiplier = lr_multiplier(step, num_iterations, warmup_ratio, warmdown_ratio, final_lr_frac)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * multiplier
            if isinstance(opt, Muon):
                group["momentum"] = muon_momentum(step)
    return multiplier
