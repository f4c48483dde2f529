"""
The training memory estimate (nanochat/memory.py) against what the CPU allocator really allocates, for
eager and compiled models in fp32 and bf16, MHA/GQA/MLA and gradient checkpointing. Compiling takes
minutes on a CPU; --eager-only skips those cases.

    python dev/bench_memory.py [--eager-only]
"""

import argparse
import json
import time

import torch

from nanochat.gpt import GPTConfig
from nanochat.memory import measure_training_peak, training_memory

CASES = [  # (name, attention, n_kv_head, gradient checkpointing, dtype, compiled)
    ("mha fp32 eager", "mha", 4, False, torch.float32, False),
    ("mha bf16 eager", "mha", 4, False, torch.bfloat16, False),
    ("gqa fp32 eager", "gqa", 2, False, torch.float32, False),
    ("mla fp32 eager", "mla", 4, False, torch.float32, False),
    ("mha fp32 eager ckpt", "mha", 4, True, torch.float32, False),
    ("mha fp32 compiled", "mha", 4, False, torch.float32, True),
    ("mha bf16 compiled", "mha", 4, False, torch.bfloat16, True),
]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--eager-only", action="store_true")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    args = p.parse_args()
    rows = []
    print(f"d{args.depth} width {args.width} vocab {args.vocab_size}, {args.batch} x {args.seq_len} tokens per micro-batch")
    print(f"{'case':<22}{'measured MB':>12}{'estimate MB':>12}{'ratio':>8}{'seconds':>9}")
    for name, attention, n_kv_head, checkpointing, dtype, compiled in CASES:
        if compiled and args.eager_only:
            continue
        config = GPTConfig(sequence_len=args.seq_len, vocab_size=args.vocab_size, n_layer=args.depth, n_head=4,
                           n_kv_head=n_kv_head, n_embd=args.width, attention=attention)
        t0 = time.time()
        measured, model = measure_training_peak(config, args.batch, args.seq_len, dtype, compiled, checkpointing)
        estimate = training_memory(model, args.batch, args.seq_len, dtype=dtype, compiled=compiled)["total"]
        rows.append({"case": name, "measured_mb": round(measured / 1e6, 2), "estimate_mb": round(estimate / 1e6, 2),
                     "ratio": round(estimate / measured, 3)})
        print(f"{name:<22}{measured / 1e6:>12.1f}{estimate / 1e6:>12.1f}{estimate / measured:>8.3f}{time.time() - t0:>9.1f}")
    ratios = [r["ratio"] for r in rows]
    print(json.dumps({"cases": rows, "min_ratio": min(ratios), "max_ratio": max(ratios)}))


if __name__ == "__main__":
    main()
