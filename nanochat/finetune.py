"""
The training loop shared by midtraining and SFT: start from an earlier stage's checkpoint, train on
conversations (nanochat.conversation_loader.ConversationLoader), evaluate the loss on held-out conversations,
checkpoint, and resume exactly from a checkpoint of this stage.
"""

import json
import os
import time

import torch

from nanochat.checkpoint_manager import (SOURCES, CheckpointError, find_meta, load_model, resume_training,
                                         save_checkpoint)
from nanochat.common import (DummyWandb, autocast_context, autodetect_device_type, broadcast_parameters, compile_model,
                             compute_cleanup, first_error, format_duration, get_base_dir, get_dist_info,
                             load_on_all_ranks, print0, resolve_compile_mode, synchronize, training_dtype)
from nanochat.conversation_loader import ConversationLoader
from nanochat.gpt import GPT, GPTConfig, config_from_depth
from nanochat.memory import log_peak_memory, planned_dtype, planned_vocab_size, training_plan
from nanochat.optim import apply_schedule, checkpoint_states, setup_optimizers
from nanochat.report import get_report


@torch.no_grad()
def conversation_loss(model, loader, num_batches):
    """Mean loss (nats) per trained token over num_batches of held-out conversations."""
    sums = torch.zeros(2, dtype=torch.float64, device=loader.device)  # (nats, trained tokens)
    for _ in range(num_batches):
        x, y = next(loader)
        sums[0] += model(x, y, loss_reduction="sum").double()
        sums[1] += (y >= 0).sum()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)
    total, count = sums.tolist()  # the one host sync of the evaluation
    return total / max(count, 1)


def accumulation_steps(args, world_size):
    rows_per_micro_step = args.device_batch_size * world_size
    if args.examples_per_step % rows_per_micro_step != 0:
        raise ValueError(f"--examples-per-step {args.examples_per_step} must be a multiple of device_batch_size x "
                         f"world_size = {rows_per_micro_step}")
    return args.examples_per_step // rows_per_micro_step


def describe_plan(args, model, world_size, grad_accum_steps, num_iterations, dtype, compiled):
    """Print what the run will need (tokens count every position of the fixed-shape rows); returns the plan dict."""
    print0(f"model: {model.config}")
    print0(f"batch: {args.examples_per_step} rows/step = {args.device_batch_size} rows x {world_size} processes x "
           f"{grad_accum_steps} accumulation steps, rows of {args.max_seq_len} tokens")
    return training_plan(model, args.device_batch_size, args.max_seq_len, world_size, grad_accum_steps,
                         args.examples_per_step * args.max_seq_len, num_iterations, dtype, compiled)


def dry_run(args):
    """--dry-run: the plan from the source checkpoint's config (or --depth), without loading weights or data."""
    device_type = args.device_type or autodetect_device_type()
    world_size = args.world_size or get_dist_info()[3]
    try:
        config = GPTConfig(**find_meta(args.source, args.model_tag, args.model_step)["model_config"])
    except CheckpointError as e:
        if args.depth is None:
            print0(f"error: {e}\n(to plan before the earlier stage has run, give --depth)")
            return 1
        print0(f"no {args.source} checkpoint yet: planning for depth {args.depth}")
        config = config_from_depth(args.depth, args.max_seq_len, planned_vocab_size())
    with torch.device("meta"):
        model = GPT(config)
    args.max_seq_len = min(args.max_seq_len, config.sequence_len)
    try:
        grad_accum_steps = accumulation_steps(args, world_size)
    except ValueError as e:
        print0(f"error: {e}")
        return 1
    if args.num_iterations < 0:
        print0("tokens and FLOPs depend on the data mixture: give --num-iterations to plan them")
    compiled = resolve_compile_mode(args.compile_mode, device_type) != "none"
    num_iterations = args.num_iterations if args.num_iterations > 0 else None
    dtype = planned_dtype(device_type, args.dtype)
    plan = describe_plan(args, model, world_size, grad_accum_steps, num_iterations, dtype, compiled)
    print0(json.dumps(plan))
    return 0


def finetune(args, train_set, val_set, packed, section, ddp_info, data_summary):
    """
    Train `args.source` -> `args.dest` checkpoints on conversations. args: the stage's settings (the flags of
    scripts/finetune_cli.py, or any object with those attributes). Returns the process exit code.
    """
    is_ddp, rank, _, world_size, device = ddp_info
    error = None
    try:
        model, tokenizer, source_meta = load_model(args.source, device, phase="train", model_tag=args.model_tag,
                                                   step=args.model_step)
        grad_accum_steps = accumulation_steps(args, world_size)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        error = str(e)
    if error := first_error(error):  # every rank stops, or none
        print0(f"error: {error}")
        compute_cleanup()
        return 1
    args.max_seq_len = min(args.max_seq_len, model.config.sequence_len)
    rows_per_epoch = len(train_set) if not packed else estimate_packed_rows(train_set, tokenizer, args.max_seq_len)
    num_iterations = args.num_iterations if args.num_iterations > 0 else max(1, round(args.num_epochs * rows_per_epoch / args.examples_per_step))
    model_tag = args.model_tag or source_meta.get("model_tag") or f"d{model.config.n_layer}"
    checkpoint_dir = os.path.join(get_base_dir(), SOURCES[args.dest], model_tag)
    compile_mode = resolve_compile_mode(args.compile_mode, device.type)
    dtype = training_dtype(args.dtype, device.type)
    plan = describe_plan(args, model, world_size, grad_accum_steps, num_iterations, dtype,
                         compile_mode != "none")

    lr = dict(unembedding_lr=args.unembedding_lr * args.init_lr_frac, embedding_lr=args.embedding_lr * args.init_lr_frac,
              matrix_lr=args.matrix_lr * args.init_lr_frac)
    optimizers = setup_optimizers(model, rank=rank, world_size=world_size, **lr)
    start_step, loader_state, curve = 0, None, {"steps": [], "loss": []}
    if args.resume_from_step >= 0:
        meta, error = resume_training(checkpoint_dir, args.resume_from_step, model, optimizers, device, rank)
        if error:
            print0(f"error: cannot resume: {error}")
            compute_cleanup()
            return 1
        start_step, loader_state = meta["step"], meta["dataloader_state"][rank]
        print0(f"resumed from step {start_step} of {checkpoint_dir}")
    broadcast_parameters(model)  # every rank starts from rank 0's weights
    train_model = compile_model(model, compile_mode)

    loader = ConversationLoader(train_set, tokenizer, args.device_batch_size, args.max_seq_len, rank, world_size,
                                device, packed=packed, seed=args.seed, resume_state=loader_state)
    autocast = autocast_context(device.type, dtype)
    print0(f"{section}: {args.source} {model_tag} -> {args.dest}, {num_iterations} steps x {args.examples_per_step} rows "
           f"({grad_accum_steps} accumulation steps), {'packed' if packed else 'padded'} rows of {args.max_seq_len} tokens")
    print0(f"data: {data_summary}")

    wandb_run = DummyWandb()
    if args.run != "dummy" and rank == 0:
        import wandb
        wandb_run = wandb.init(project="nanochat", name=args.run, config=vars(args), group=section)
    val_loss, t_start = None, time.time()
    for step in range(start_step, num_iterations + 1):
        last_step = step == num_iterations
        # evaluating at the first step also compiles the eval graph up front: no recompilation later
        if last_step or step % args.eval_every == 0 or step == start_step:
            model.eval()
            val_loader = ConversationLoader(val_set, tokenizer, args.device_batch_size, args.max_seq_len, rank,
                                            world_size, device, packed=packed, seed=12345)
            with autocast:
                val_loss = conversation_loss(train_model, val_loader, args.eval_batches)
            print0(f"step {step:05d} | val loss {val_loss:.4f}")
            wandb_run.log({"step": step, "val/loss": val_loss})
            model.train()
        if last_step or (args.save_every > 0 and step > start_step and step % args.save_every == 0):
            states = [loader.state_dict()]
            if is_ddp:
                states = [None] * world_size
                torch.distributed.all_gather_object(states, loader.state_dict())
            meta = dict(model_config=model.config_dict(), user_config=vars(args), val_loss=val_loss, model_tag=model_tag,
                        dataloader_state=states, source=args.source, source_step=source_meta["step"])
            save_checkpoint(checkpoint_dir, step, model.state_dict(), checkpoint_states(optimizers, rank), meta, rank)
        if last_step:
            break

        synchronize(device.type)
        t0 = time.time()
        sums = torch.zeros(2, device=device)  # (sum of micro-batch losses, trained tokens): no host sync per micro-step
        for _ in range(grad_accum_steps):
            x, y = next(loader)
            with autocast:
                loss = train_model(x, y)
            sums[0] += loss.detach()
            sums[1] += (y >= 0).sum()
            (loss / grad_accum_steps).backward()
        lrm = apply_schedule(optimizers, step, num_iterations, 0.0, args.warmdown_ratio, 0.0)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        loss_sum, tokens = sums.tolist()
        train_loss = loss_sum / grad_accum_steps
        dt = time.time() - t0
        if step == start_step:
            log_peak_memory(device, plan["peak_memory_gb_per_gpu"] * 1e9)
        eta = (time.time() - t_start) / (step - start_step + 1) * (num_iterations - step - 1)
        compiling = step == start_step and compile_mode != "none"
        print0(f"step {step + 1:05d}/{num_iterations:05d} | loss {train_loss:.4f} | lrm {lrm:.3f} | "
               f"trained tok/s {tokens * world_size / dt:,.0f} | eta {format_duration(eta)}"
               + (f" | {dt:.1f}s, includes compiling the training graph" if compiling else ""))
        wandb_run.log({"step": step + 1, "train/loss": train_loss, "train/lrm": lrm})
        curve["steps"].append(step + 1)
        curve["loss"].append(train_loss)

    report = get_report()
    report.log(section=section, data=[
        {"source": f"{args.source} {model_tag} step {source_meta['step']}", "iterations": num_iterations,
         "examples per step": args.examples_per_step, "max seq len": args.max_seq_len, "data": data_summary},
        {"final val loss": val_loss, "training time (s)": time.time() - t_start}])
    if curve["steps"]:
        report.log_curve(f"{section} loss", curve["steps"], curve["loss"], "train loss")
    wandb_run.finish()
    compute_cleanup()
    return 0


def estimate_packed_rows(dataset, tokenizer, max_len, sample=256):
    """
    Rows one epoch of packed conversations fills: ConversationLoader's packing (a conversation that does not fit
    in what is left of a row opens the next one) run over a sample's rendered lengths, scaled to the dataset.
    Mean length / row length would ignore the unfilled row ends and stop an "epoch" ~8% short (2048-token rows).
    """
    n = min(sample, len(dataset))
    step = max(1, len(dataset) // n)
    lengths = [len(tokenizer.render_conversation(dataset[i], max_tokens=max_len + 1)[0])
               for i in range(0, len(dataset), step)[:n]]
    rows, used = 1, 0
    for length in lengths:
        if used and used + length > max_len + 1:
            rows, used = rows + 1, 0
        used += length
    return max(1, round(len(dataset) * rows / len(lengths)))


def describe_mixture(named_counts):
    """'GSM8K 7473, SmolTalk 9000, ...' for logs and the report."""
    return ", ".join(f"{name} {count:,}" for name, count in named_counts) or "nothing"


def load_available(candidates):
    """
    candidates: [(name, zero-argument constructor)]. Builds each task; one whose data is unavailable
    (offline, not in NANOCHAT_DATA_DIR) is skipped with a message, the same way on every rank (nanochat.common.
    load_on_all_ranks; DataMismatch when ranks cannot agree). Returns ([tasks], "name count, ..."), so a stage says
    exactly what it trained on.
    """
    loaded, skipped = load_on_all_ranks(candidates)
    for name, reason in skipped:
        print0(f"  skipping {name}: {reason}")
    return [task for _, task in loaded], describe_mixture([(name, len(task)) for name, task in loaded])
