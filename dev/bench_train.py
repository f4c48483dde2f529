"""
Training throughput and activation memory (bytes autograd saves for backward) of one model size per
attention variant, with and without gradient checkpointing, fp32 vs bf16 autocast, eager vs torch.compile
(the dtype and compile policies in nanochat/common.py rest on this measurement on CPU). The row marked
"base_train default" is what `--dtype auto --compile-mode auto` pick on this machine; the first-step column
shows what compilation costs up front.

python dev/bench_train.py [--depth 4] [--seq-len 256] [--batch-size 8] [--head-dim 128] [--vocab-size 4096]
                          [--steps 5] [--device-type cpu]

Random tokens stand in for data (throughput does not depend on what the tokens are). Prints a table and
ends with one JSON line; ratios against the first row are the robust part on a shared machine. On a CPU
the first row is the old default (eager fp32, glibc's default malloc; measured in a subprocess), the
others run with nanochat.common.keep_freed_memory as every CPU run of the scripts does.
"""

import argparse
import json
import subprocess
import sys
import time

import torch

from nanochat.common import (DEVICE_TYPES, autodetect_device_type, compile_model, keep_freed_memory,
                             resolve_compile_mode, saved_tensor_bytes, synchronize, training_dtype)
from nanochat.gpt import GPT, config_from_depth
from nanochat.optim import setup_optimizers


def measure(config, device, steps, batch_size, checkpointing, dtype, compiled=False):
    torch.manual_seed(0)
    model = GPT(config).to(device)
    model.init_weights()
    model.enable_gradient_checkpointing(checkpointing)
    optimizers = setup_optimizers(model)
    train_model = compile_model(model, "default" if compiled else "none")
    T = config.sequence_len
    x = torch.randint(0, config.vocab_size, (batch_size, T), device=device)
    y = torch.randint(0, config.vocab_size, (batch_size, T), device=device)
    autocast = torch.amp.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)

    optimizer_seconds = 0.0

    def train_step():
        nonlocal optimizer_seconds
        with autocast:
            loss = train_model(x, y)
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
    loss.backward()
    model.zero_grad(set_to_none=True)
    synchronize(device.type)
    t0 = time.perf_counter()
    train_step()  # the warm-up step (allocator, kernels; compilation when compiled)
    first_step_seconds = time.perf_counter() - t0
    optimizer_seconds = 0.0
    synchronize(device.type)
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step()
    synchronize(device.type)
    seconds_per_step = (time.perf_counter() - t0) / steps
    tokens_per_second = batch_size * T / seconds_per_step
    return dict(tokens_per_second=tokens_per_second, first_step_s=first_step_seconds, optimizer_ms=1000 * optimizer_seconds / steps, activation_mb=activation_bytes / 2**20, flops_per_second=tokens_per_second * model.estimate_flops(),
                params=model.num_params(), kv_cache_bytes_per_token=model.kv_cache_bytes_per_token())


CASES = [("mha", False, torch.float32, False), ("gqa", False, torch.float32, False), ("mla", False, torch.float32, False),
         ("mha", True, torch.float32, False), ("gqa", True, torch.float32, False), ("mla", True, torch.float32, False),
         ("mha", False, torch.bfloat16, False), ("mha", False, torch.float32, True), ("mha", False, torch.bfloat16, True)]


def run_case(args, device, attention, checkpointing, dtype, compiled):
    config = config_from_depth(args.depth, args.seq_len, args.vocab_size, attention, args.head_dim)
    r = measure(config, device, args.steps, args.batch_size, checkpointing, dtype, compiled)
    r.update(attention=attention, gradient_checkpointing=checkpointing, dtype=str(dtype).removeprefix("torch."),
             compiled=compiled, malloc="glibc default" if args.glibc_default_malloc else "kept")
    return r


def old_default_row(args):
    """Eager fp32 with glibc's default malloc, the CPU default before bf16 and keep_freed_memory: in a fresh
    process, since malloc's thresholds cannot be put back to their (adaptive) defaults once changed."""
    flags = ["--depth", args.depth, "--seq-len", args.seq_len, "--batch-size", args.batch_size, "--head-dim", args.head_dim,
             "--vocab-size", args.vocab_size, "--steps", args.steps, "--device-type", "cpu", "--glibc-default-malloc", "--first-case-only"]
    out = subprocess.run([sys.executable, __file__, *map(str, flags)], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["rows"][0]


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device-type", default=None, choices=DEVICE_TYPES)
    p.add_argument("--glibc-default-malloc", action="store_true", help="CPU: skip keep_freed_memory (the old default)")
    p.add_argument("--first-case-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    device = torch.device(args.device_type or autodetect_device_type())
    if device.type == "cpu" and not args.glibc_default_malloc:
        keep_freed_memory()  # what compute_init does for every CPU run of the scripts

    rows = []
    if device.type == "cpu" and not args.first_case_only and not args.glibc_default_malloc:
        rows.append(old_default_row(args))
        print(f"measured the old CPU default (eager fp32, glibc malloc): {rows[0]['tokens_per_second']:,.0f} tok/s", flush=True)
    default_dtype = training_dtype("auto", device.type)
    default_compiled = resolve_compile_mode("auto", device.type) != "none"
    for attention, checkpointing, dtype, compiled in CASES[:1] if args.first_case_only else CASES:
        r = run_case(args, device, attention, checkpointing, dtype, compiled)
        r["base_train_default"] = (attention, checkpointing, dtype, compiled) == ("mha", False, default_dtype, default_compiled)
        rows.append(r)
        print(f"measured {attention} checkpointing={checkpointing} {r['dtype']} compiled={compiled}: "
              f"{r['tokens_per_second']:,.0f} tok/s (first step {r['first_step_s']:.1f} s)", flush=True)

    base = rows[0]["tokens_per_second"]
    print(f"\nd{args.depth}, seq {args.seq_len}, batch {args.batch_size}, device {device.type}, torch threads {torch.get_num_threads()}")
    print(f"{'attention':<10}{'ckpt':<6}{'dtype':<10}{'compiled':<9}{'malloc':<14}{'params':>10}{'KV B/tok':>10}{'tok/s':>10}"
          f"{'1st step s':>11}{'opt ms':>8}{'GFLOP/s':>10}{'act MiB':>10}{'vs first':>10}")
    for r in rows:
        print(f"{r['attention']:<10}{str(r['gradient_checkpointing']):<6}{r['dtype']:<10}{str(r['compiled']):<9}{r['malloc']:<14}"
              f"{r['params']:>10,}{r['kv_cache_bytes_per_token']:>10,}{r['tokens_per_second']:>10,.0f}{r['first_step_s']:>11.1f}"
              f"{r['optimizer_ms']:>8.1f}{r['flops_per_second'] / 1e9:>10.1f}{r['activation_mb']:>10.1f}"
              f"{r['tokens_per_second'] / base:>10.2f}{'  <- base_train default' if r.get('base_train_default') else ''}")
    summary = {"bench": "train", "depth": args.depth, "seq_len": args.seq_len, "batch_size": args.batch_size, "device": device.type,
               "rows": [{k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items()} for r in rows]}
    default = next((r for r in rows if r.get("base_train_default")), None)
    if default is not None and not args.first_case_only:
        summary["default_vs_first_row"] = round(default["tokens_per_second"] / base, 2)
        print(f"base_train's default ({default['dtype']}, compiled={default['compiled']}) vs the first row: "
              f"{summary['default_vs_first_row']:.2f}x")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
