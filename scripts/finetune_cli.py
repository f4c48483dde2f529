"""
The command line that midtraining (scripts/mid_train.py) and SFT (scripts/chat_sft.py) share: their flags
(with each stage's own defaults), the checks on them, and the run: load the data mixture, then
nanochat.finetune.finetune.
"""

import argparse

from nanochat.checkpoint_manager import SOURCES
from nanochat.common import (COMPILE_MODES, DEVICE_TYPES, DTYPE_CHOICES, DataMismatch, compute_cleanup, compute_init,
                             print0, print_all)
from nanochat.finetune import dry_run, finetune


def add_finetune_flags(p, source, dest, lr_frac, max_seq_len, device_batch_size, examples_per_step):
    p.add_argument("--run", default="dummy", help="wandb run name ('dummy' = no wandb)")
    p.add_argument("--device-type", default=None, choices=DEVICE_TYPES)
    p.add_argument("--source", default=source, choices=list(SOURCES), help="the checkpoints to start from")
    p.add_argument("--model-tag", default=None, help="model tag to start from (default: the largest)")
    p.add_argument("--model-step", type=int, default=None, help="checkpoint step to start from (default: newest)")
    p.add_argument("--dest", default=dest, choices=list(SOURCES), help=argparse.SUPPRESS)
    p.add_argument("--max-seq-len", type=int, default=max_seq_len)
    p.add_argument("--device-batch-size", type=int, default=device_batch_size)
    p.add_argument("--examples-per-step", type=int, default=examples_per_step,
                   help="rows per optimizer step over all processes (gradient accumulation is derived)")
    p.add_argument("--num-epochs", type=float, default=1.0)
    p.add_argument("--num-iterations", type=int, default=-1, help="overrides --num-epochs")
    p.add_argument("--init-lr-frac", type=float, default=lr_frac, help="learning rates relative to pretraining")
    p.add_argument("--embedding-lr", type=float, default=0.2)
    p.add_argument("--unembedding-lr", type=float, default=0.004)
    p.add_argument("--matrix-lr", type=float, default=0.02)
    p.add_argument("--warmdown-ratio", type=float, default=1.0, help="fraction of the run with a linearly falling lr")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-batches", type=int, default=20)
    p.add_argument("--save-every", type=int, default=-1)
    p.add_argument("--resume-from-step", type=int, default=-1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile-mode", default="auto", choices=COMPILE_MODES, help="auto: default on cuda, none elsewhere")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="compute dtype (autocast; weights stay fp32). auto: bf16 where the device has native bf16")
    p.add_argument("--dry-run", action="store_true", help="print parameters, tokens, FLOPs, accumulation and the "
                   "estimated peak memory per GPU, end with a JSON line, and exit (loads no weights and no data)")
    p.add_argument("--world-size", type=int, default=None,
                   help="--dry-run: processes to plan for (default: torchrun's WORLD_SIZE, else 1)")
    p.add_argument("--depth", type=int, default=None,
                   help="--dry-run with no checkpoint yet: plan for a base model of this depth (as base_train builds it)")


def check_finetune_flags(p, args):
    for name in ("max_seq_len", "device_batch_size", "examples_per_step", "eval_every", "eval_batches"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.num_epochs <= 0 or args.num_iterations == 0 or not 0 < args.init_lr_frac <= 10:
        p.error("--num-epochs and --num-iterations must be positive, --init-lr-frac in (0, 10]")
    if not 0 <= args.warmdown_ratio <= 1:
        p.error("--warmdown-ratio must be in [0, 1]")
    if (args.world_size is not None and args.world_size < 1) or (args.depth is not None and args.depth < 1):
        p.error("--world-size and --depth must be >= 1")


def mixtures(train_tasks, val_tasks):
    """(train, val) TaskMixtures. Without a validation task (offline, no mirror) the val loss is measured on
    training conversations, and the log says so."""
    from tasks.common import TaskMixture
    if not val_tasks:
        print0("note: no validation task could be loaded: the val loss below is measured on training conversations")
    return TaskMixture(train_tasks), TaskMixture(val_tasks or train_tasks)


def run(args, build_mixture, packed, section, no_data_hint):
    """
    The stage after its flags are parsed: a --dry-run plan, or build_mixture() -> (train, val, summary; train
    None when nothing loaded) and the finetuning run. Returns the exit status.
    """
    if args.dry_run:
        return dry_run(args)
    ddp_info = compute_init(args.device_type, seed=args.seed)
    print0(f"{section} data:")
    try:
        train_set, val_set, summary = build_mixture()
    except DataMismatch as e:
        print_all(f"error: {e}")
        compute_cleanup()
        return 1
    if train_set is None:
        print0(f"error: no conversation data could be loaded. {no_data_hint}")
        compute_cleanup()
        return 1
    return finetune(args, train_set, val_set, packed=packed, section=section, ddp_info=ddp_info, data_summary=summary)
