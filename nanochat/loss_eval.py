"""
Bits per byte: the validation loss in a unit that does not depend on the tokenizer.

Mean cross-entropy per token changes with the vocabulary (bigger tokens -> higher loss per token), so
we sum the loss in nats over all target tokens, divide by the number of UTF-8 bytes those tokens
decode to, and convert to bits. Special tokens (0 bytes) are left out of both sums.
"""

import math

import torch
import torch.distributed as dist

from nanochat.common import progress


@torch.no_grad()
def evaluate_bpb(model, batches, steps: int, token_bytes: torch.Tensor, desc: str | None = None) -> tuple[float, int]:
    """
    model: a GPT (or its compiled wrapper); batches: iterator of (inputs, targets) (B, T);
    steps: how many batches this rank evaluates (fewer if the iterator ends); token_bytes: (vocab,) int;
    desc: label of a progress bar (None: none, e.g. inside a training loop).
    Sums are all-reduced across ranks when running distributed. Returns (bits per byte, tokens scored):
    special tokens and ignored targets (-1) are not scored.
    """
    device = token_bytes.device
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    total_tokens = torch.zeros((), dtype=torch.int64, device=device)
    steps_and_batches = zip(range(steps), batches)
    if desc is not None:
        steps_and_batches = progress(steps_and_batches, desc, total=steps, unit="batch")
    for _, (x, y) in steps_and_batches:
        loss = model(x, y, loss_reduction="none").view(-1)  # (B*T,) nats, 0 where y == -1
        y = y.view(-1)
        valid = y >= 0
        num_bytes = torch.where(valid, token_bytes[y.clamp(min=0)], torch.zeros_like(y))
        counted = num_bytes > 0
        total_nats += (loss * counted).sum().double()
        total_bytes += num_bytes.sum()
        total_tokens += counted.sum()
    if dist.is_available() and dist.is_initialized():
        for total in (total_nats, total_bytes, total_tokens):
            dist.all_reduce(total)
    if total_bytes.item() == 0:
        return float("inf"), 0
    return total_nats.item() / (math.log(2) * total_bytes.item()), total_tokens.item()
