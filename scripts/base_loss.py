"""
Train and val bits-per-byte of a base model, plus a few greedy samples.

python -m scripts.base_loss [--model-tag d20] [--model-step N] [--split-tokens N]
torchrun --standalone --nproc_per_node=8 -m scripts.base_loss

--split-tokens defaults to the device: 10,485,760 tokens per split on CUDA (a stable number for a d20), 262,144
on a CPU or MPS (a d4 finishes both splits in under a minute on 2 CPU cores; pass more for a steadier one).
"""

import argparse
import sys

from nanochat.checkpoint_manager import CheckpointError, load_model
from nanochat.common import DEVICE_TYPES, autocast_context, compute_cleanup, compute_init, first_error, print0
from nanochat.dataloader import make_train_loader, make_val_loader
from nanochat.engine import complete_greedy
from nanochat.loss_eval import evaluate_bpb
from nanochat.report import get_report
from nanochat.tokenizer import get_token_bytes

GPU_SPLIT_TOKENS, CPU_SPLIT_TOKENS = 20 * 524288, 262144
SAMPLE_PROMPTS = ["The capital of France is", "The chemical symbol of gold is", "If yesterday was Friday, then tomorrow will be",
                  "The opposite of hot is", "The planets of the solar system are:", "My favorite color is", "If 5*x + 3 = 13, then x is"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Evaluate base model train/val bits-per-byte and print samples")
    p.add_argument("--device-type", default=None, choices=DEVICE_TYPES, help="default: autodetect")
    p.add_argument("--device-batch-size", type=int, default=32)
    p.add_argument("--split-tokens", type=int, default=None,
                   help=f"tokens evaluated per split (default: {GPU_SPLIT_TOKENS:,} on cuda, {CPU_SPLIT_TOKENS:,} elsewhere)")
    p.add_argument("--model-tag", default=None)
    p.add_argument("--model-step", type=int, default=None)
    p.add_argument("--max-sample-tokens", type=int, default=24)
    args = p.parse_args(argv)
    for name in ["device_batch_size", "split_tokens"]:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    is_ddp, rank, _, world_size, device = compute_init(args.device_type)
    error = None
    try:
        model, tokenizer, meta = load_model("base", device, phase="eval", model_tag=args.model_tag, step=args.model_step)
        token_bytes = get_token_bytes(device=device)
    except (CheckpointError, FileNotFoundError) as e:
        error = str(e)
    if error := first_error(error):  # every rank stops, or none
        print0(f"error: {error}\nTrain a base model first: python -m scripts.base_train")
        compute_cleanup()
        return 1
    autocast = autocast_context(device.type)

    B, T = args.device_batch_size, model.config.sequence_len
    split_tokens = args.split_tokens or (GPU_SPLIT_TOKENS if device.type == "cuda" else CPU_SPLIT_TOKENS)
    steps = max(1, split_tokens // (B * T * world_size))
    results = {}
    for split in ("train", "val"):
        if split == "train":
            loader = make_train_loader(tokenizer, B, T, world_size, rank, 1, device)
        else:
            loader = make_val_loader(tokenizer, B, T, world_size, rank, device)
        with loader, autocast:
            results[f"{split} bpb"], scored = evaluate_bpb(model, loader, steps, token_bytes, desc=f"{split} bpb")
        results[f"{split} tokens scored"] = scored
        # special tokens (BOS) carry no bytes and are not scored; a split that ends early scores fewer
        print0(f"{split} bpb: {results[f'{split} bpb']:.4f} over {scored:,} scored tokens "
               f"(of {steps * B * T * world_size:,} requested)")

    samples = []
    if rank == 0:
        with autocast:
            samples = complete_greedy(model, tokenizer, SAMPLE_PROMPTS, max_tokens=args.max_sample_tokens)
        for s in samples:
            print0(f"  {s!r}")
    get_report().log(section="Base model loss", data=[
        {"model step": meta["step"], "tokens requested per split": steps * B * T * world_size, **results},
        "### Samples", *[f"`{s}`" for s in samples]])
    compute_cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
