"""
The CORE metric (DCLM) of a base model: accuracy on 22 in-context-learning tasks, centered against
random guessing and averaged. Tasks whose data file is missing are skipped and CORE is marked partial.

python -m scripts.base_eval [--model-tag d20] [--step N] [--max-per-task 500] [--device-batch-size 16]
torchrun --standalone --nproc_per_node=8 -m scripts.base_eval

The eval bundle comes from $NANOCHAT_DATA_DIR/core_eval_bundle, else $NANOCHAT_BASE_DIR/eval_bundle
(downloaded once). Results go to $NANOCHAT_BASE_DIR/base_eval/<model_tag>_<step>.csv and the report.
"""

import argparse
import csv
import os
import sys
import time

from nanochat.checkpoint_manager import SOURCES, CheckpointError, find_largest_model, load_model
from nanochat.common import (DEVICE_TYPES, compute_cleanup, compute_init, first_error, get_base_dir, is_main_process,
                             print0)
from nanochat.core_eval import EvalBundleError, evaluate_core, get_eval_bundle_dir
from nanochat.report import get_report


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a base model on the CORE metric (DCLM tasks)")
    p.add_argument("--device-type", default=None, choices=DEVICE_TYPES, help="default: autodetect")
    p.add_argument("--model-tag", default=None, help="model tag (default: the largest)")
    p.add_argument("--step", "--model-step", dest="step", type=int, default=None,
                   help="checkpoint step (default: the newest)")
    p.add_argument("--max-per-task", type=int, default=None,
                   help="evaluate at most N examples per task (a fixed random subset; default: all)")
    p.add_argument("--device-batch-size", type=int, default=16, help="most token rows (candidates) per forward pass")
    args = p.parse_args(argv)
    for name in ["max_per_task", "device_batch_size"]:
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def format_table(out):
    lines = [f"{'task':<34} {'accuracy':>9} {'centered':>9}"]
    lines += [f"{label:<34} {acc:>9.4f} {out['centered'][label]:>9.4f}" for label, acc in out["results"].items()]
    return lines


def core_line(out):
    if out["core"] is None:
        return "CORE: n/a (no task could be evaluated)"
    line = f"CORE: {out['core']:.4f}"
    if out["partial"]:
        total = len(out["results"]) + len(out["skipped"])
        line += f" (partial: {len(out['results'])} of {total} tasks; missing data for {', '.join(out['skipped'])})"
    return line


def write_csv(out, path):
    """One row per task (skipped ones too), then CORE; written to a temp name and renamed."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["task", "accuracy", "centered", "examples", "cropped", "status"])
        for label, acc in out["results"].items():
            writer.writerow([label, f"{acc:.6f}", f"{out['centered'][label]:.6f}", out["examples"][label],
                             out["cropped"][label], "evaluated"])
        for label in out["skipped"]:
            writer.writerow([label, "", "", 0, 0, "skipped (data file missing)"])
        core = "" if out["core"] is None else f"{out['core']:.6f}"
        writer.writerow(["CORE", "", core, "", "", "partial" if out["partial"] else "complete"])
    os.replace(path + ".tmp", path)


def log_report(out, model_tag, step, args, seconds):
    summary = {"model": model_tag, "step": step, "CORE": out["core"] if out["core"] is not None else "n/a",
               "CORE partial": out["partial"], "tasks evaluated": len(out["results"]),
               "examples": sum(out["examples"].values()),
               "examples cropped to the context": sum(out["cropped"].values()),
               "max examples per task": args.max_per_task or "all", "eval time (s)": round(seconds, 1)}
    table = ["| task | accuracy | centered | examples | cropped |", "| --- | --- | --- | --- | --- |"]
    table += [f"| {label} | {acc:.4f} | {out['centered'][label]:.4f} | {out['examples'][label]} | "
              f"{out['cropped'][label]} |" for label, acc in out["results"].items()]
    skipped = f"Skipped (data file missing): {', '.join(out['skipped'])}" if out["skipped"] else None
    get_report().log(section="Base model evaluation", data=[summary, "", *table, "", skipped])


def main(argv=None):
    args = parse_args(argv)
    _, _, _, _, device = compute_init(args.device_type)
    error = None
    try:
        model_tag = args.model_tag or find_largest_model(os.path.join(get_base_dir(), SOURCES["base"]))
        model, tokenizer, meta = load_model("base", device, phase="eval", model_tag=model_tag, step=args.step)
        bundle_dir = get_eval_bundle_dir()
    except (CheckpointError, FileNotFoundError) as e:
        error = f"{e}\nTrain a base model first: python -m scripts.base_train"
    except EvalBundleError as e:
        error = str(e)
    if error := first_error(error):  # every rank stops, or none
        print0(f"error: {error}")
        compute_cleanup()
        return 1
    print0(f"CORE eval of base model {model_tag} step {meta['step']} with the bundle at {bundle_dir}")

    t0 = time.time()
    try:
        out = evaluate_core(model, tokenizer, device, bundle_dir=bundle_dir, max_per_task=args.max_per_task,
                            batch_size=args.device_batch_size)
    except EvalBundleError as e:  # a malformed core.yaml, metadata or task file
        print0(f"error: {e}")
        compute_cleanup()
        return 1
    seconds = time.time() - t0
    print0("\n".join(["", *format_table(out), "", core_line(out)]))
    if out["skipped"]:
        print0(f"skipped (data file missing): {', '.join(out['skipped'])}")
    if is_main_process():
        csv_path = os.path.join(get_base_dir(), "base_eval", f"{model_tag}_{meta['step']:06d}.csv")
        write_csv(out, csv_path)
        print0(f"results written to {csv_path} ({seconds:.1f}s)")
    log_report(out, model_tag, meta["step"], args, seconds)
    compute_cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
