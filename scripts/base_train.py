"""
Pretrain the base model.

One GPU or CPU:     python -m scripts.base_train --depth 4 --max-seq-len 256 --device-batch-size 8 ...
Many (one node):    torchrun --standalone --nproc_per_node=8 -m scripts.base_train --depth 20
Many nodes:         torchrun --nnodes=2 --node-rank=R --rdzv-endpoint=HOST:PORT --nproc_per_node=8 -m scripts.base_train ...

The horizon comes from --num-iterations, else --target-flops, else --target-param-data-ratio (tokens =
ratio * parameters; Chinchilla ~20). Gradient accumulation fills --total-batch-size tokens per step from
--device-batch-size rows of --max-seq-len tokens on each of the world's processes.
"""

import argparse
import json
import os
import sys
import time

import torch

from nanochat.checkpoint_manager import SOURCES, resume_training, save_checkpoint
from nanochat.common import (COMPILE_MODES, DEVICE_TYPES, DTYPE_CHOICES, DummyWandb, autocast_context,
                             autodetect_device_type, broadcast_parameters, compile_model, compute_cleanup, compute_init,
                             first_error, format_duration, get_base_dir, get_dist_info, peak_flops_per_second, print0,
                             resolve_compile_mode, synchronize, training_dtype)
from nanochat.dataloader import make_train_loader, make_val_loader
from nanochat.dataset import ensure_local_shards
from nanochat.engine import complete_greedy
from nanochat.gpt import ATTENTION_VARIANTS, GPT, config_from_depth
from nanochat.loss_eval import evaluate_bpb
from nanochat.memory import log_peak_memory, planned_dtype, planned_vocab_size, shards_needed, training_plan
from nanochat.optim import apply_schedule, checkpoint_states, setup_optimizers
from nanochat.report import get_report
from nanochat.tokenizer import get_token_bytes, get_tokenizer

SAMPLE_PROMPTS = ["The capital of France is", "The chemical symbol of gold is", "If yesterday was Friday, then tomorrow will be",
                  "The opposite of hot is", "My favorite color is"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Pretrain the nanochat base model")
    p.add_argument("--run", default="dummy", help="wandb run name ('dummy' = no wandb)")
    p.add_argument("--device-type", default=None, choices=DEVICE_TYPES, help="default: autodetect")
    p.add_argument("--seed", type=int, default=42)
    # model
    p.add_argument("--depth", type=int, default=20, help="layers; width = 64 * depth")
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--attention", default="mha", choices=ATTENTION_VARIANTS)
    p.add_argument("--n-kv-head", type=int, default=None,
                   help="gqa: kv heads (default: the most, up to n_head // 2, that divide n_head)")
    p.add_argument("--kv-lora-rank", type=int, default=0, help="mla: latent size (0 = min(4*head_dim, width/2))")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    # horizon
    p.add_argument("--num-iterations", type=int, default=-1)
    p.add_argument("--target-flops", type=float, default=-1.0)
    p.add_argument("--target-param-data-ratio", type=float, default=20.0)
    # batch
    p.add_argument("--device-batch-size", type=int, default=32)
    p.add_argument("--total-batch-size", type=int, default=524288, help="tokens per optimizer step")
    # optimization
    p.add_argument("--embedding-lr", type=float, default=0.2)
    p.add_argument("--unembedding-lr", type=float, default=0.004)
    p.add_argument("--matrix-lr", type=float, default=0.02)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-ratio", type=float, default=0.0)
    p.add_argument("--warmdown-ratio", type=float, default=0.2)
    p.add_argument("--final-lr-frac", type=float, default=0.0)
    # evaluation, checkpoints, speed
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-tokens", type=int, default=20 * 524288)
    p.add_argument("--sample-every", type=int, default=2000)
    p.add_argument("--save-every", type=int, default=-1, help="also checkpoint every N steps (-1: only at the end)")
    p.add_argument("--resume-from-step", type=int, default=-1)
    p.add_argument("--model-tag", default=None, help="checkpoint folder name (default d<depth>)")
    p.add_argument("--compile-mode", default="auto", choices=COMPILE_MODES,
                   help="auto: default on cuda, and on a cpu for runs of 500+ steps (a C++ compiler needed)")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="compute dtype (autocast; weights stay fp32). auto: bf16 where the device has native bf16")
    p.add_argument("--tokenizer-threads", type=int, default=4)
    p.add_argument("--tokenizer-batch-size", type=int, default=128)
    p.add_argument("--loss-log", default=None, help="append JSON lines: a run header, {step, loss, ...} per step, {step, val_bpb} per eval")
    p.add_argument("--dry-run", action="store_true", help="print parameters, tokens, FLOPs, accumulation, shards and "
                   "the estimated peak memory per GPU, end with a JSON line, and exit (needs no GPU, data or tokenizer)")
    p.add_argument("--world-size", type=int, default=None,
                   help="--dry-run: processes to plan for (default: torchrun's WORLD_SIZE, else 1)")
    args = p.parse_args(argv)
    positive = ["depth", "max_seq_len", "head_dim", "device_batch_size", "total_batch_size", "eval_every",
                "sample_every", "tokenizer_threads", "tokenizer_batch_size"]
    for name in positive:
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ["warmup_ratio", "warmdown_ratio", "final_lr_frac"]:
        if not 0.0 <= getattr(args, name) <= 1.0:
            p.error(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    if args.warmup_ratio + args.warmdown_ratio > 1.0:
        p.error("--warmup-ratio + --warmdown-ratio must be <= 1")
    if args.num_iterations == 0 or args.save_every == 0:
        p.error("--num-iterations and --save-every must be positive (or -1)")
    if args.world_size is not None and args.world_size < 1:
        p.error("--world-size must be >= 1")
    try:  # the architecture flags together (any vocab size: it is not checked)
        config_from_depth(args.depth, args.max_seq_len, 2, args.attention, args.head_dim, args.n_kv_head,
                          args.kv_lora_rank)
    except ValueError as e:
        p.error(f"--depth/--head-dim/--attention/--n-kv-head/--kv-lora-rank: {e}")
    return args


def resolve_num_iterations(args, model, tokens_per_step):
    num_params = model.num_params()
    if args.num_iterations > 0:
        return args.num_iterations, "--num-iterations"
    if args.target_flops > 0:
        return max(1, round(args.target_flops / (model.estimate_flops() * tokens_per_step))), "--target-flops"
    if args.target_param_data_ratio > 0:
        return max(1, round(args.target_param_data_ratio * num_params / tokens_per_step)), "--target-param-data-ratio"
    raise ValueError("no training horizon: give --num-iterations, --target-flops or --target-param-data-ratio")


def compile_mode_for(args, model, device_type):
    """--compile-mode for this run: auto also depends on its length (a long CPU run compiles)."""
    num_iterations, _ = resolve_num_iterations(args, model, args.total_batch_size)
    return resolve_compile_mode(args.compile_mode, device_type, num_iterations)


def accumulation_steps(args, world_size):
    tokens_per_row_step = args.device_batch_size * args.max_seq_len * world_size
    if args.total_batch_size % tokens_per_row_step != 0:
        raise ValueError(f"--total-batch-size {args.total_batch_size} must be a multiple of device_batch_size * "
                         f"max_seq_len * world_size = {tokens_per_row_step}")
    return args.total_batch_size // tokens_per_row_step


def describe_run(args, model, world_size, grad_accum_steps, dtype, compiled):
    """Print what this run will do; returns (num_iterations, the plan dict of nanochat.memory.training_plan)."""
    num_iterations, horizon_source = resolve_num_iterations(args, model, args.total_batch_size)
    num_params, flops_per_token = model.num_params(), model.estimate_flops()
    tokens = num_iterations * args.total_batch_size
    print0(f"model: {model.config}")
    print0(f"parameters: {num_params:,} | FLOPs/token: {flops_per_token:.3e} | KV cache: "
           f"{model.kv_cache_bytes_per_token()} bytes/token (bf16)")
    print0(f"batch: {args.total_batch_size:,} tokens/step = {args.device_batch_size} rows x {args.max_seq_len} tokens "
           f"x {world_size} processes x {grad_accum_steps} accumulation steps")
    print0(f"horizon: {num_iterations:,} steps ({horizon_source}) = {tokens:,} tokens, {tokens / num_params:.1f} tokens/param, "
           f"{flops_per_token * tokens:.3e} FLOPs, ~{shards_needed(tokens)} FineWeb-Edu shards")
    plan = training_plan(model, args.device_batch_size, args.max_seq_len, world_size, grad_accum_steps,
                         args.total_batch_size, num_iterations, dtype, compiled)
    return num_iterations, dict(plan, shards=shards_needed(tokens))


def dry_run(args):
    """--dry-run: the plan for the given flags, on any machine (the model is built on the meta device)."""
    device_type = args.device_type or autodetect_device_type()
    world_size = args.world_size or get_dist_info()[3]
    config = config_from_depth(args.depth, args.max_seq_len, planned_vocab_size(), args.attention, args.head_dim,
                               args.n_kv_head, args.kv_lora_rank)
    with torch.device("meta"):
        model = GPT(config)
    model.enable_gradient_checkpointing(args.gradient_checkpointing)
    try:
        grad_accum_steps = accumulation_steps(args, world_size)
    except ValueError as e:
        print0(f"error: {e}")
        return 1
    compiled = compile_mode_for(args, model, device_type) != "none"
    _, plan = describe_run(args, model, world_size, grad_accum_steps, planned_dtype(device_type, args.dtype), compiled)
    print0(json.dumps(plan))
    return 0


def main(argv=None):
    args = parse_args(argv)
    if args.dry_run:
        return dry_run(args)
    is_ddp, rank, local_rank, world_size, device = compute_init(args.device_type, seed=args.seed)
    device_type = device.type
    master = rank == 0
    dtype = training_dtype(args.dtype, device_type)
    autocast = autocast_context(device_type, dtype)

    # data and tokenizer first: both fail fast with a message that says what to run (on every rank at once)
    error = None
    try:
        tokenizer = get_tokenizer()
        token_bytes = get_token_bytes(device=device)
        ensure_local_shards()
    except FileNotFoundError as e:
        error = str(e)
    if error := first_error(error):
        print0(f"error: {error}")
        compute_cleanup()
        return 1
    vocab_size = tokenizer.get_vocab_size()

    config = config_from_depth(args.depth, args.max_seq_len, vocab_size, args.attention, args.head_dim,
                               args.n_kv_head, args.kv_lora_rank)
    with torch.device("meta"):
        model = GPT(config)
    model.enable_gradient_checkpointing(args.gradient_checkpointing)
    model_tag = args.model_tag or f"d{args.depth}"
    checkpoint_dir = os.path.join(get_base_dir(), SOURCES["base"], model_tag)
    try:
        grad_accum_steps = accumulation_steps(args, world_size)
    except ValueError as e:
        print0(f"error: {e}")
        compute_cleanup()
        return 1
    compile_mode = compile_mode_for(args, model, device_type)
    num_iterations, plan = describe_run(args, model, world_size, grad_accum_steps, dtype,
                                        compile_mode != "none")
    num_params, flops_per_token = model.num_params(), model.estimate_flops()
    model.to_empty(device=device)
    model.init_weights()

    optimizers = setup_optimizers(model, args.unembedding_lr, args.embedding_lr, args.matrix_lr,
                                  args.weight_decay, rank, world_size)

    # resume: model, optimizer and loader state, and the loop's own counters
    start_step, loop_state, loader_state = 0, {}, None
    if args.resume_from_step >= 0:
        meta, error = resume_training(checkpoint_dir, args.resume_from_step, model, optimizers, device, rank)
        if error:
            print0(f"error: cannot resume: {error}")
            compute_cleanup()
            return 1
        start_step = meta["step"]
        loop_state = meta.get("loop_state", {})
        loader_state = meta["dataloader_state"][rank] if meta.get("dataloader_state") else None
        print0(f"resumed from step {start_step} of {checkpoint_dir}")

    broadcast_parameters(model)  # every rank starts from rank 0's weights, whatever its device's RNG did
    train_model = compile_model(model, compile_mode)

    loader_kwargs = dict(tokenizer_threads=args.tokenizer_threads, tokenizer_batch_size=args.tokenizer_batch_size)
    train_loader = make_train_loader(tokenizer, args.device_batch_size, args.max_seq_len, world_size, rank,
                                     grad_accum_steps, device, resume_state=loader_state, **loader_kwargs)
    train_iter = iter(train_loader)
    eval_steps = max(1, args.eval_tokens // (args.device_batch_size * args.max_seq_len * world_size))

    wandb_run = DummyWandb()
    if args.run != "dummy" and master:
        import wandb
        wandb_run = wandb.init(project="nanochat", name=args.run, config=vars(args))

    peak_flops = peak_flops_per_second(device_type)
    user_config = vars(args).copy()
    curves = loop_state.get("curves", {"train_steps": [], "train_loss": [], "val_steps": [], "val_bpb": []})
    min_val_bpb = loop_state.get("min_val_bpb", float("inf"))
    val_bpb = loop_state.get("val_bpb")
    total_training_time = loop_state.get("total_training_time", 0.0)
    steps_timed = loop_state.get("steps_timed", 0)

    loss_log = open(args.loss_log, "a", encoding="utf-8") if args.loss_log and master else None
    if loss_log:
        loss_log.write(json.dumps({"run": model_tag, "model_config": model.config_dict(), "parameters": num_params,
                                   "kv_cache_bytes_per_token": model.kv_cache_bytes_per_token(),
                                   "start_step": start_step, "num_iterations": num_iterations}) + "\n")
    for step in range(start_step, num_iterations + 1):
        last_step = step == num_iterations

        if last_step or (step % args.eval_every == 0 and step > start_step) or step == 0:
            model.eval()
            t_eval = time.time()
            with make_val_loader(tokenizer, args.device_batch_size, args.max_seq_len, world_size, rank, device,
                                 **loader_kwargs) as val_loader, autocast:
                val_bpb, _ = evaluate_bpb(train_model, val_loader, eval_steps, token_bytes)
            if step == start_step and compile_mode != "none":
                print0(f"evaluation graph compiled and run in {time.time() - t_eval:.1f}s")
            min_val_bpb = min(min_val_bpb, val_bpb)
            curves["val_steps"].append(step)
            curves["val_bpb"].append(val_bpb)
            data = train_loader.stats()  # this rank's streams
            read = data["tokens"] + data["cropped_tokens"]
            packing = f" | packing cropped {data['cropped_tokens'] / read:.0%} of the tokens read" if read else ""
            repeat = (f" | data epoch {data['epoch']}: documents are repeating, download more shards "
                      f"({plan['shards']} planned)") if data["epoch"] else ""
            print0(f"step {step:05d} | val bpb {val_bpb:.4f}{packing}{repeat}")
            wandb_run.log({"step": step, "val/bpb": val_bpb})
            if loss_log:
                loss_log.write(json.dumps({"step": step, "val_bpb": val_bpb}) + "\n")
            model.train()

        if master and (last_step or (step > 0 and step % args.sample_every == 0)):
            model.eval()
            with autocast:
                for completion in complete_greedy(model, tokenizer, SAMPLE_PROMPTS, max_tokens=16):
                    print0(f"  sample: {completion!r}")
            model.train()

        if last_step or (args.save_every > 0 and step > start_step and step % args.save_every == 0):
            loop_state = dict(min_val_bpb=min_val_bpb, val_bpb=val_bpb, total_training_time=total_training_time,
                              steps_timed=steps_timed, curves=curves)
            # every rank's loader state travels in meta (small), so any rank can resume its streams
            loader_states = [train_loader.state_dict()]
            if is_ddp:
                loader_states = [None] * world_size
                torch.distributed.all_gather_object(loader_states, train_loader.state_dict())
            meta = dict(model_config=model.config_dict(), user_config=user_config, val_bpb=val_bpb,
                        loop_state=loop_state, dataloader_state=loader_states, world_size=world_size)
            save_checkpoint(checkpoint_dir, step, model.state_dict(), checkpoint_states(optimizers, rank), meta, rank)

        if last_step:
            break

        # one optimizer step: grad_accum_steps micro-batches, gradients averaged over all of them
        synchronize(device_type)
        t0 = time.time()
        train_loss = torch.zeros((), device=device)
        for _ in range(grad_accum_steps):
            x, y = next(train_iter)
            with autocast:
                loss = train_model(x, y)
            train_loss += loss.detach()
            (loss / grad_accum_steps).backward()
        lr_mult = apply_schedule(optimizers, step, num_iterations, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        train_loss /= grad_accum_steps
        if is_ddp:
            torch.distributed.all_reduce(train_loss, op=torch.distributed.ReduceOp.AVG)
        train_loss = train_loss.item()
        synchronize(device_type)
        dt = time.time() - t0

        if step == start_step:  # the first step has seen every kind of allocation (eval, compile, optimizer state)
            log_peak_memory(device, plan["peak_memory_gb_per_gpu"] * 1e9)
        if step - start_step > 1:  # the first steps include compilation / warm-up: keep them out of the timing
            total_training_time += dt
            steps_timed += 1
        tokens_per_second = args.total_batch_size / dt
        flops_per_second = flops_per_token * tokens_per_second
        mfu = f"{100 * flops_per_second / (peak_flops * world_size):.1f}%" if peak_flops else "n/a"
        avg_dt = total_training_time / steps_timed if steps_timed else dt
        eta = format_duration(avg_dt * (num_iterations - step - 1))
        print0(f"step {step + 1:05d}/{num_iterations:05d} ({100 * (step + 1) / num_iterations:.2f}%) | loss {train_loss:.6f} | "
               f"lrm {lr_mult:.3f} | dt {dt * 1000:.0f}ms | tok/s {tokens_per_second:,.0f} | "
               f"FLOP/s {flops_per_second:.3e} | mfu {mfu} | eta {eta}"
               + (" | includes compiling the training graph" if step == start_step and compile_mode != "none" else ""))
        curves["train_steps"].append(step + 1)
        curves["train_loss"].append(train_loss)
        wandb_run.log({"step": step + 1, "train/loss": train_loss, "train/lrm": lr_mult, "train/tok_per_sec": tokens_per_second})
        if loss_log:
            loss_log.write(json.dumps({"step": step + 1, "loss": train_loss, "lrm": lr_mult,
                                       "tokens_per_second": tokens_per_second}) + "\n")
            loss_log.flush()

    train_loader.close()  # stop the prefetch thread before the interpreter shuts down
    print0(f"done: min val bpb {min_val_bpb:.4f} | training time {format_duration(total_training_time)}")
    report = get_report()
    report.log_curve("Base model training loss", curves["train_steps"], curves["train_loss"], ylabel="train loss")
    report.log_curve("Base model validation bpb", curves["val_steps"], curves["val_bpb"], ylabel="val bpb")
    report.log(section="Base model training", data=[
        user_config,
        {"parameters": num_params, "FLOPs per token": flops_per_token, "iterations": num_iterations,
         "training tokens": num_iterations * args.total_batch_size, "world size": world_size,
         "KV cache bytes per token (bf16)": model.kv_cache_bytes_per_token()},
        {"min val bpb": min_val_bpb, "final val bpb": val_bpb, "training time (s)": total_training_time},
    ])
    if loss_log:
        loss_log.close()
    wandb_run.finish()
    compute_cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
