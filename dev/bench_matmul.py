"""
Why batching and speculative verification gain little on some CPUs: the cost of one linear layer of the
reference d4 model as the number of rows M grows (decode: M = 1; an 8-prompt batch step or a γ+1-token
verify: M = 5..16), for the kernels torch offers, in one run.

python dev/bench_matmul.py [--threads 2] [--repeats 300]

Prints µs per call and the cost relative to M = 1 of the same kernel, then one JSON line.
"""

import argparse
import json
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.mkldnn

SHAPES = [(256, 1024), (1024, 256), (256, 768), (256, 4096)]  # (in, out): d4 MLP up/down, q,k,v, unembedding
ROWS = (1, 2, 5, 8, 16)


def microseconds(fn, repeats):
    for _ in range(20):
        fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats * 1e6


def kernels(weight):
    """name -> f(x): the ways to compute x @ weight.T that torch offers on a CPU."""
    transposed = weight.t().contiguous()
    bf16 = weight.bfloat16()
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data.copy_(weight)
    packed = torch.utils.mkldnn.to_mkldnn(linear.eval())
    return {
        "fp32 F.linear": lambda x: F.linear(x, weight),
        "fp32 F.linear, W column-major": lambda x: F.linear(x, transposed.t()),  # how load_model keeps lm_head on CPU
        "fp32 mkldnn packed": lambda x: packed(x.to_mkldnn()).to_dense(),
        "bf16 F.linear": lambda x: F.linear(x.bfloat16(), bf16),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=300)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = {}
    with torch.inference_mode():
        for k, n in SHAPES:
            inputs = {m: torch.randn(m, k) for m in ROWS}
            for name, fn in kernels(torch.randn(n, k)).items():
                results[f"{k}->{n} {name}"] = [microseconds(lambda: fn(inputs[m]), args.repeats) for m in ROWS]
    print(f"threads {args.threads}; µs per call (x M=1 cost)")
    print(f"{'shape / kernel':<40}" + "".join(f"{'M=' + str(m):>16}" for m in ROWS))
    for label, times in results.items():
        print(f"{label:<40}" + "".join(f"{t:>8.0f} ({t / times[0]:4.1f}x)" for t in times))
    print(json.dumps({"threads": args.threads, "rows": ROWS,
                      "us_per_call": {label: [round(t, 1) for t in times] for label, times in results.items()}}))


if __name__ == "__main__":
    main()
