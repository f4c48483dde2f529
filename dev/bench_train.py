"""
Training throughput and activation memory (bytes autograd saves for backward) of one model size per
attention variant, with and without gradient checkpointing, and fp32 vs bf16 autocast (the dtype policy in nanochat/common.py rests on this measurement on CPU).

python dev/bench_train.py [--depth 4] [--seq-len 256] [--batch-size 8] [--steps 5] [--device-type cpu]

Random tokens stand in for data (throughput does not depend on what the tokens are). Prints a table and
ends with one JSON line; ratios against the first row (MHA, fp32, no checkpointing) are the robust part
on a shared machine.
"""

import argparse
import json
import time

import torch

from nanochat.common import autodetect_device_type, saved_tensor_bytes, synchronize
from nanochat.gpt import GPT, config_from_depth
from nanochat.optim import setup_optimizers


def measure(config, device, steps, batch_size, checkpointing, dtype):
    torch.manual_seed(0)
    model = GPT(config).to(device)
    model.init_weights()
    model.enable_gradient_checkpointing(checkpointing)
    optimizers = setup_optimizers(model)
    T = config.sequence_len
    x = torch.randint(0, config.vocab_size, (batch_size, T), device=device)
    y = torch.randint(0, config.vocab_size, (batch_size, T), device=device)
    autocast = torch.amp.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)

    optimizer_seconds = 0.0

    def train_step():
        nonlocal optimizer_seconds
        with autocast:
            loss = model(x, y)
        loss.backward()
        synchronize(device.type)
        t0 = time.perf_counter()
        for opt in optimizers:
            opt.step()
        synchronize(device.type)
        optimizer_seconds += time.perf_counter() - t0
        model.zero_grad(set_to_none=True)

    with autocast:
        activation_bytes, loss = saved_tensor_bytes(lambda: model(x, y))
    loss.backward()  # also the warm-up step (allocator, kernels)
    model.zero_grad(set_to_none=True)
    synchronize(device.type)
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step()
    synchronize(device.type)
    seconds_per_step = (time.perf_counter() - t0) / steps
    tokens_per_second = batch_size * T / seconds_per_step
    return dict(tokens_per_second=tokens_per_second, optimizer_ms=1000 * optimizer_seconds / steps, activation_mb=activation_bytes / 2**20, flops_per_second=tokens_per_second * model.estimate_flops(),
                params=model.num_params(), kv_cache_bytes_per_token=model.kv_cache_bytes_per_token())


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device-type", default=None, choices=["cuda", "mps", "cpu"])
    args = p.parse_args()
    device = torch.device(args.device_type or autodetect_device_type())

    cases = [("mha", False, torch.float32), ("gqa", False, torch.float32), ("mla", False, torch.float32),
             ("mha", True, torch.float32), ("gqa", True, torch.float32), ("mla", True, torch.float32),
             ("mha", False, torch.bfloat16)]
    rows = []
    for attention, checkpointing, dtype in cases:
        config = config_from_depth(args.depth, args.seq_len, args.vocab_size, attention, args.head_dim)
        r = measure(config, device, args.steps, args.batch_size, checkpointing, dtype)
        r.update(attention=attention, gradient_checkpointing=checkpointing, dtype=str(dtype).removeprefix("torch."))
        rows.append(r)
        print(f"measured {attention} checkpointing={checkpointing} {r['dtype']}: {r['tokens_per_second']:,.0f} tok/s", flush=True)

    base = rows[0]["tokens_per_second"]
    print(f"\nd{args.depth}, seq {args.seq_len}, batch {args.batch_size}, device {device.type}, torch threads {torch.get_num_threads()}")
    print(f"{'attention':<10}{'ckpt':<6}{'dtype':<10}{'params':>10}{'KV B/tok':>10}{'tok/s':>10}{'opt ms':>8}{'GFLOP/s':>10}{'act MiB':>10}{'vs first':>10}")
    for r in rows:
        print(f"{r['attention']:<10}{str(r['gradient_checkpointing']):<6}{r['dtype']:<10}{r['params']:>10,}"
              f"{r['kv_cache_bytes_per_token']:>10,}{r['tokens_per_second']:>10,.0f}{r['optimizer_ms']:>8.1f}{r['flops_per_second'] / 1e9:>10.1f}{r['activation_mb']:>10.1f}"
              f"{r['tokens_per_second'] / base:>10.2f}")
    summary = {"bench": "train", "depth": args.depth, "seq_len": args.seq_len, "batch_size": args.batch_size,
               "device": device.type, "rows": [{k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items()} for r in rows]}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
