"""
Table and loss-curve plot from base_train --loss-log files (one per run).

python dev/plot_attention_comparison.py OUT_DIR RUN.jsonl [RUN.jsonl ...]
Writes OUT_DIR/table.md and OUT_DIR/attention_comparison.png, prints the table and one JSON line.
"""

import json
import os
import sys

import matplotlib

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt


def read_run(path):
    header, train, val = None, [], []
    with open(path, encoding="utf-8") as f:
        for record in map(json.loads, f):
            if "run" in record:
                header = record
            elif "val_bpb" in record:
                val.append((record["step"], record["val_bpb"]))
            else:
                train.append(record)
    if header is None or not train or not val:
        sys.exit(f"error: {path} is not a complete base_train --loss-log file")
    # the first steps include warm-up; the median is robust to a noisy neighbour on a shared machine
    speeds = sorted(r["tokens_per_second"] for r in train[2:] or train)
    return dict(name=header["model_config"]["attention"], config=header["model_config"], parameters=header["parameters"],
                kv_cache_bytes_per_token=header["kv_cache_bytes_per_token"], tokens_per_second=speeds[len(speeds) // 2],
                final_val_bpb=val[-1][1], final_train_loss=train[-1]["loss"], train=train, val=val)


def smooth(values, beta=0.9):
    out, ema = [], None
    for v in values:
        ema = v if ema is None else beta * ema + (1 - beta) * v
        out.append(ema)
    return out


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    out_dir, paths = sys.argv[1], sys.argv[2:]
    runs = [read_run(p) for p in paths]

    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in runs:
        ax_train.plot([t["step"] for t in r["train"]], smooth([t["loss"] for t in r["train"]]), label=r["name"])
        ax_val.plot(*zip(*r["val"]), marker="o", label=r["name"])
    ax_train.set(xlabel="step", ylabel="train loss (EMA 0.9)", title="Training loss")
    ax_val.set(xlabel="step", ylabel="val bits per byte", title="Validation bpb")
    for ax in (ax_train, ax_val):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    png = os.path.join(out_dir, "attention_comparison.png")
    fig.savefig(png, dpi=120)

    lines = ["| attention | parameters | KV cache bytes/token (bf16) | train tokens/s | final train loss | final val bpb |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['name']} | {r['parameters']:,} | {r['kv_cache_bytes_per_token']:,} | {r['tokens_per_second']:,.0f} | "
              f"{r['final_train_loss']:.4f} | {r['final_val_bpb']:.4f} |" for r in runs]
    table = "\n".join(lines)
    with open(os.path.join(out_dir, "table.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n\n![loss curves](attention_comparison.png)\n")
    print(table)
    print(f"plot: {png}")
    print(json.dumps({"bench": "attention_comparison", "runs": [
        {k: r[k] for k in ("name", "parameters", "kv_cache_bytes_per_token", "tokens_per_second", "final_val_bpb")}
        for r in runs]}))


if __name__ == "__main__":
    main()
