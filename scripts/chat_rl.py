"""
Reinforcement learning on GSM8K: sample several answers per problem, reward 1 for a correct final
answer, and push up the log-probability of answers that beat their group's mean (REINFORCE with the
per-problem mean reward as baseline; on-policy, one update per batch of samples, so no importance ratio
or clipping is needed).

python -m scripts.chat_rl
torchrun --standalone --nproc_per_node=8 -m scripts.chat_rl
"""

import argparse
import os
import sys
import time

import torch

from nanochat.checkpoint_manager import SOURCES, CheckpointError, load_model, resume_training, save_checkpoint
from nanochat.common import (DEVICE_TYPES, DTYPE_CHOICES, autocast_context, broadcast_parameters, compute_cleanup,
                             compute_init, first_error, format_duration, get_base_dir, load_on_all_ranks, print0,
                             training_dtype)
from nanochat.engine import Engine
from nanochat.memory import log_peak_memory
from nanochat.optim import apply_schedule, checkpoint_states, setup_optimizers
from nanochat.report import get_report
from tasks.common import DatasetUnavailable


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="RL on GSM8K with pass@k evaluation")
    p.add_argument("--device-type", default=None, choices=DEVICE_TYPES)
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="compute dtype (autocast; weights stay fp32). auto: bf16 where the device has native bf16")
    p.add_argument("--source", default="sft", choices=list(SOURCES))
    p.add_argument("--model-tag", default=None)
    p.add_argument("--model-step", type=int, default=None)
    p.add_argument("--examples-per-step", type=int, default=16, help="problems per optimizer step over all processes")
    p.add_argument("--num-samples", type=int, default=16, help="answers sampled per problem")
    p.add_argument("--device-batch-size", type=int, default=8, help="sequences per forward when computing log-probs")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--num-epochs", type=float, default=1.0)
    p.add_argument("--num-iterations", type=int, default=-1, help="overrides --num-epochs")
    p.add_argument("--init-lr-frac", type=float, default=0.05)
    p.add_argument("--matrix-lr", type=float, default=0.02)
    p.add_argument("--embedding-lr", type=float, default=0.2)
    p.add_argument("--unembedding-lr", type=float, default=0.004)
    p.add_argument("--eval-every", type=int, default=60)
    p.add_argument("--eval-examples", type=int, default=400)
    p.add_argument("--pass-k", type=int, default=8, help="evaluation reports pass@1..pass@k")
    p.add_argument("--save-every", type=int, default=-1)
    p.add_argument("--resume-from-step", type=int, default=-1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("examples_per_step", "num_samples", "device_batch_size", "max_new_tokens", "eval_every", "eval_examples", "pass_k"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.temperature <= 0:
        p.error("--temperature must be > 0: RL needs different samples per problem")
    if args.num_iterations == 0 or args.num_epochs <= 0:
        p.error("--num-iterations and --num-epochs must be positive")
    return args


@torch.no_grad()
def evaluate_pass_at_k(engine, task, num_examples, k, max_new_tokens, temperature, top_k, rank, world_size, seed=1234):
    """pass@1..k on the first num_examples problems: k samples each, solved@j if any of the first j is right."""
    tokenizer = engine.tokenizer
    solved = torch.zeros(k)
    count = 0
    for i in range(rank, min(num_examples, len(task)), world_size):
        conversation = task[i]
        prompt = tokenizer.render_for_completion(conversation)
        results, _ = engine.generate_batch(prompt, num_samples=k, max_tokens=max_new_tokens, temperature=temperature,
                                           top_k=top_k, seed=seed + i)
        correct = [task.evaluate(conversation, tokenizer.decode(r[len(prompt):])) for r in results]
        first_hit = next((j for j, c in enumerate(correct) if c), k)
        solved[first_hit:] += 1
        count += 1
    totals = torch.cat([solved, torch.tensor([float(count)])])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        totals = totals.to(engine.model.get_device())
        torch.distributed.all_reduce(totals)
        totals = totals.cpu()
    return (totals[:k] / max(float(totals[k]), 1.0)).tolist()


def policy_gradient_loss(model, sequences, masks, advantages, prompt_lens, batch_size, device):
    """
    -(advantage x log p(sampled token)) averaged over the sampled (mask 1) tokens of all sequences.
    Backpropagates in chunks of batch_size sequences; returns the mean loss.
    """
    pad = 0
    num_tokens = sum(sum(m[p:]) for m, p in zip(masks, prompt_lens))
    total = 0.0
    for start in range(0, len(sequences), batch_size):
        chunk = range(start, min(start + batch_size, len(sequences)))
        longest = max(len(sequences[i]) for i in chunk)
        ids = torch.full((len(chunk), longest), pad, dtype=torch.long)
        targets = torch.full((len(chunk), longest), -1, dtype=torch.long)
        weights = torch.zeros(len(chunk), longest)
        for row, i in enumerate(chunk):
            seq, mask, p = sequences[i], masks[i], prompt_lens[i]
            ids[row, :len(seq)] = torch.tensor(seq)
            # position t predicts token t+1: only sampled tokens after the prompt carry a loss
            for t in range(p - 1, len(seq) - 1):
                if mask[t + 1]:
                    targets[row, t] = seq[t + 1]
                    weights[row, t] = advantages[i]
        nll = model(ids.to(device), targets.to(device), loss_reduction="none").view(len(chunk), longest)
        loss = (nll * weights.to(device)).sum() / max(num_tokens, 1)  # nll = -log p: minimizing raises p where adv > 0
        loss.backward()
        total += loss.item()
    return total


def main(argv=None):
    args = parse_args(argv)
    is_ddp, rank, _, world_size, device = compute_init(args.device_type, seed=args.seed)
    from tasks.gsm8k import GSM8K
    error = None
    try:
        tasks, skipped = load_on_all_ranks([("GSM8K train", lambda: GSM8K(subset="main", split="train")),
                                             ("GSM8K test", lambda: GSM8K(subset="main", split="test"))])
        if skipped:
            raise DatasetUnavailable("; ".join(f"{name}: {reason}" for name, reason in skipped))
        (_, train_task), (_, test_task) = tasks
        model, tokenizer, source_meta = load_model(args.source, device, phase="train", model_tag=args.model_tag,
                                                   step=args.model_step)
    except (CheckpointError, FileNotFoundError, RuntimeError) as e:  # DataMismatch, DatasetUnavailable too
        error = str(e)
    if error := first_error(error):
        print0(f"error: {error}")
        compute_cleanup()
        return 1
    if args.examples_per_step % world_size != 0:
        print0(f"error: --examples-per-step must be a multiple of the world size ({world_size})")
        compute_cleanup()
        return 1
    model_tag = args.model_tag or source_meta.get("model_tag") or f"d{model.config.n_layer}"
    checkpoint_dir = os.path.join(get_base_dir(), SOURCES["rl"], model_tag)
    num_iterations = args.num_iterations if args.num_iterations > 0 else max(1, int(args.num_epochs * len(train_task) / args.examples_per_step))
    lr = dict(matrix_lr=args.matrix_lr * args.init_lr_frac, embedding_lr=args.embedding_lr * args.init_lr_frac,
              unembedding_lr=args.unembedding_lr * args.init_lr_frac)
    optimizers = setup_optimizers(model, rank=rank, world_size=world_size, **lr)
    start_step = 0
    if args.resume_from_step >= 0:
        meta, error = resume_training(checkpoint_dir, args.resume_from_step, model, optimizers, device, rank)
        if error:
            print0(f"error: cannot resume: {error}")
            compute_cleanup()
            return 1
        start_step = meta["step"]
    broadcast_parameters(model)  # every rank starts from rank 0's weights
    autocast = autocast_context(device.type, training_dtype(args.dtype, device.type))
    engine = Engine(model, tokenizer)
    per_rank = args.examples_per_step // world_size
    print0(f"RL: {args.source} {model_tag} -> rl, {num_iterations} steps x {args.examples_per_step} problems x "
           f"{args.num_samples} samples")

    rewards_curve, pass_at_k, t_start = [], None, time.time()
    for step in range(start_step, num_iterations + 1):
        last_step = step == num_iterations
        if last_step or step % args.eval_every == 0:
            model.eval()
            with autocast:
                pass_at_k = evaluate_pass_at_k(engine, test_task, args.eval_examples, args.pass_k, args.max_new_tokens,
                                               1.0, args.top_k, rank, world_size)
            print0(f"step {step:05d} | " + " ".join(f"pass@{j + 1} {v:.4f}" for j, v in enumerate(pass_at_k)))
        if last_step or (args.save_every > 0 and step > start_step and step % args.save_every == 0):
            meta = dict(model_config=model.config_dict(), user_config=vars(args), model_tag=model_tag, pass_at_k=pass_at_k,
                        source=args.source, source_step=source_meta["step"])
            save_checkpoint(checkpoint_dir, step, model.state_dict(), checkpoint_states(optimizers, rank), meta, rank)
        if last_step:
            break

        # rollouts: this rank's problems for this step, num_samples answers each (deterministic per step: exact resume)
        model.eval()
        sequences, masks, advantages, prompt_lens, rewards = [], [], [], [], []
        for j in range(per_rank):
            index = (step * args.examples_per_step + rank * per_rank + j) % len(train_task)
            conversation = train_task[index]
            prompt = tokenizer.render_for_completion(conversation)
            with autocast, torch.no_grad():
                results, result_masks = engine.generate_batch(prompt, num_samples=args.num_samples, max_tokens=args.max_new_tokens,
                                                              temperature=args.temperature, top_k=args.top_k,
                                                              seed=args.seed + step * 100_003 + index)
            group = [float(train_task.reward(conversation, tokenizer.decode(r[len(prompt):]))) for r in results]
            baseline = sum(group) / len(group)
            for r, m, g in zip(results, result_masks, group):
                sequences.append(r)
                masks.append(m)
                advantages.append(g - baseline)
                prompt_lens.append(len(prompt))
            rewards += group
        model.train()
        with autocast:
            loss = policy_gradient_loss(model, sequences, masks, advantages, prompt_lens, args.device_batch_size, device)
        lrm = apply_schedule(optimizers, step, num_iterations, 0.0, 1.0, 0.0)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        mean_reward = torch.tensor(sum(rewards) / len(rewards), device=device)
        if is_ddp:
            torch.distributed.all_reduce(mean_reward, op=torch.distributed.ReduceOp.AVG)
        rewards_curve.append(float(mean_reward))
        if step == start_step:
            log_peak_memory(device)  # rollouts and the policy-gradient step have run once
        eta = (time.time() - t_start) / (step - start_step + 1) * (num_iterations - step - 1)
        print0(f"step {step + 1:05d}/{num_iterations:05d} | mean reward {float(mean_reward):.4f} | loss {loss:.4f} | "
               f"lrm {lrm:.3f} | eta {format_duration(eta)}")

    report = get_report()
    report.log(section="Chat RL", data=[
        {"source": f"{args.source} {model_tag} step {source_meta['step']}", "iterations": num_iterations,
         "problems per step": args.examples_per_step, "samples per problem": args.num_samples},
        {f"GSM8K pass@{j + 1}": v for j, v in enumerate(pass_at_k or [])},
        {"mean reward (last step)": rewards_curve[-1] if rewards_curve else None, "training time (s)": time.time() - t_start}])
    if rewards_curve:
        report.log_curve("Chat RL mean reward", list(range(start_step + 1, start_step + 1 + len(rewards_curve))),
                         rewards_curve, "mean reward")
    compute_cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
