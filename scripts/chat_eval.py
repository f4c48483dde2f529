"""
Evaluate a chat model on tasks.

python -m scripts.chat_eval -i sft                              # every task
python -m scripts.chat_eval -i sft -a "ARC-Easy|GSM8K" -x 100   # some tasks, at most 100 problems each
python -m scripts.chat_eval -i sft -a AIME -n 8 -t 0.7          # pass@8 on AIME 2024 + 2025
torchrun --standalone --nproc_per_node=8 -m scripts.chat_eval -i sft

Categorical tasks (multiple choice) score by restricting the next-token logits to the answer letters.
Generative tasks decode many problems at once through Engine.generate_batch (one batch of prompts, each
with -n samples) and count a problem solved if any sample is correct (pass@n).
A problem whose prompt does not fit the model's context is not attempted and counts as wrong; each task's
line says how many, and how many answers were cut at the token budget, with the reasons.
"""

import argparse
import importlib
import json
import sys
import time
from collections import Counter
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from nanochat.checkpoint_manager import CheckpointError, load_model
from nanochat.common import (DEVICE_TYPES, DataMismatch, autocast_context, compute_cleanup, compute_init, first_error,
                             load_on_all_ranks, print0, print_all, progress)
from nanochat.engine import Engine, prefill_logits
from nanochat.report import chat_eval_section, get_report
from nanochat.sampling import validate_sampling_params

ALL_TASKS = ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee", "AIME"]
# random-guess accuracy of each task, for ChatCORE (mean of (acc - baseline) / (1 - baseline))
BASELINES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0, "SpellingBee": 0.0}
TASK_NAMES = ALL_TASKS + ["AIME-2024", "AIME-2025"]


def chatcore(results):
    """
    {"ChatCORE": the mean centered accuracy} when this run evaluated all six of its tasks; {"ChatCORE": None}
    (the report drops an older value, computed from numbers this run replaced) when it evaluated some; {} else.
    """
    if all(name in results for name in BASELINES):
        return {"ChatCORE": sum((results[n] - b) / (1 - b) for n, b in BASELINES.items()) / len(BASELINES)}
    return {"ChatCORE": None} if any(name in results for name in BASELINES) else {}


def load_task(name):
    """Task objects are built lazily so that one missing dataset does not stop the others."""
    if name in ("ARC-Easy", "ARC-Challenge"):
        from tasks.arc import ARC
        return ARC(subset=name, split="test")
    if name == "MMLU":
        from tasks.mmlu import MMLU
        return MMLU(subset="all", split="test")
    if name == "GSM8K":
        from tasks.gsm8k import GSM8K
        return GSM8K(subset="main", split="test")
    if name == "HumanEval":
        from tasks.humaneval import HumanEval
        return HumanEval()
    if name == "SpellingBee":
        from tasks.spellingbee import SpellingBee
        return SpellingBee(size=256, split="test")
    if name.startswith("AIME"):
        from tasks.aime import AIME
        return AIME(year=int(name.split("-")[1]) if "-" in name else None)
    raise ValueError(f"unknown task {name!r}; choose from {TASK_NAMES}")


def shard_indices(n, rank, world_size, max_problems):
    n = n if max_problems is None else min(n, max_problems)
    return list(range(rank, n, world_size)), n


class Record(NamedTuple):
    """One evaluated problem. Not attempted counts as wrong, so accuracies stay comparable across models."""
    index: int
    conversation: dict
    answer: Any  # the predicted letter (categorical) or the completions (generative)
    correct: int
    not_attempted: str | None = None  # why the model never saw the problem
    cut: str | None = None  # why a sample's answer stopped before the model ended it


def too_long(context_len):
    return f"prompt longer than the {context_len}-token context"


def prompt_batches(task, tokenizer, indices, batch_size, fits):
    """
    Per batch of batch_size problems: (its offset in indices, [chunk, conversations, prompts] of the problems
    whose prompt fits, [(index, conversation)] of those whose prompt does not), with a progress bar.
    """
    for start in progress(range(0, len(indices), batch_size), type(task).__name__, unit="batch"):
        chunk = indices[start:start + batch_size]
        conversations = [task[i] for i in chunk]
        prompts = [tokenizer.render_for_completion(c) for c in conversations]
        keep = [fits(p) for p in prompts]
        kept = [[x for x, k in zip(xs, keep) if k] for xs in (chunk, conversations, prompts)]
        yield start, kept, [(i, c) for i, c, k in zip(chunk, conversations, keep) if not k]


@torch.no_grad()
def run_categorical(model, tokenizer, task, indices, batch_size, device):
    """Returns [Record] for this rank's problems: the answer is the predicted letter."""
    context_len = model.config.sequence_len
    out = []
    for _, (chunk, conversations, prompts), dropped in prompt_batches(task, tokenizer, indices, batch_size,
                                                                      lambda p: len(p) <= context_len):
        out += [Record(i, c, None, 0, too_long(context_len)) for i, c in dropped]
        if not prompts:
            continue
        logits = prefill_logits(model, prompts, tokenizer.get_pad_token_id())  # (B, V)
        for row, conversation in enumerate(conversations):
            letters = conversation["letters"]
            letter_ids = [tokenizer.encode(letter) for letter in letters]
            if any(len(t) != 1 for t in letter_ids):
                raise ValueError(f"answer letters {letters} are not single tokens for this tokenizer")
            scores = logits[row, [t[0] for t in letter_ids]]  # only the letters compete
            letter = letters[int(scores.argmax())]
            out.append(Record(chunk[row], conversation, letter, task.evaluate(conversation, letter)))
    return out


@torch.no_grad()
def run_generative(engine, task, indices, batch_size, num_samples, max_new_tokens, temperature, top_k, seed):
    """Returns [Record] for this rank's problems: correct if any of the samples is (pass@n)."""
    tokenizer, context_len = engine.tokenizer, engine.context_len
    out = []
    for start, (chunk, conversations, prompts), dropped in prompt_batches(task, tokenizer, indices, batch_size,
                                                                          lambda p: len(p) < context_len):
        out += [Record(i, c, [], 0, too_long(context_len)) for i, c in dropped]
        if not prompts:
            continue
        results, _ = engine.generate_batch(prompts, num_samples=num_samples, max_tokens=max_new_tokens,
                                           temperature=temperature, top_k=top_k, seed=seed + start)
        # every row of the batch gets the budget of its longest prompt (what Engine.generate allows)
        budget = min(max_new_tokens, context_len - max(map(len, prompts)))
        cut_reason = (f"cut at -m {max_new_tokens} tokens" if budget == max_new_tokens
                      else f"cut at the {context_len}-token context")
        for j, (index, conversation, prompt) in enumerate(zip(chunk, conversations, prompts)):
            samples = results[j * num_samples:(j + 1) * num_samples]
            completions = [tokenizer.decode(r[len(prompt):]) for r in samples]
            correct = int(any(task.evaluate(conversation, c) for c in completions))
            cut = cut_reason if any(len(r) - len(prompt) >= budget for r in samples) else None
            out.append(Record(index, conversation, completions, correct, cut=cut))
    return out


def gather(records):
    if dist.is_available() and dist.is_initialized():
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, records)
        records = [r for part in everyone for r in part]
    return sorted(records, key=lambda r: r.index)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a chat model on tasks")
    p.add_argument("-i", "--source", default="sft", choices=["base", "mid", "sft", "rl"])
    p.add_argument("-a", "--task-name", default="|".join(ALL_TASKS), help=f"tasks separated by |, from {TASK_NAMES}")
    p.add_argument("-n", "--num-samples", type=int, default=1, help="samples per problem (pass@n)")
    p.add_argument("-t", "--temperature", type=float, default=0.0)
    p.add_argument("-k", "--top-k", type=int, default=50)
    p.add_argument("-x", "--max-problems", type=int, default=None, help="at most this many problems per task")
    p.add_argument("-b", "--batch-size", type=int, default=8, help="problems per forward / generation batch")
    p.add_argument("-m", "--max-new-tokens", type=int, default=512)
    p.add_argument("-g", "--model-tag", default=None)
    p.add_argument("-s", "--step", type=int, default=None)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--log-samples", default=None, help="write every problem, completion, answer and verdict to this JSONL")
    p.add_argument("--device-type", default=None, choices=DEVICE_TYPES)
    args = p.parse_args(argv)
    args.tasks = [t.strip() for t in args.task_name.split("|") if t.strip()]
    unknown = [t for t in args.tasks if t not in TASK_NAMES]
    if unknown or not args.tasks:
        p.error(f"unknown task(s) {unknown}; choose from {TASK_NAMES}")
    for name in ("num_samples", "batch_size", "max_new_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_problems is not None and args.max_problems < 1:
        p.error("--max-problems must be >= 1")
    try:
        validate_sampling_params(args.temperature, args.top_k, None)
    except ValueError as e:
        p.error(str(e))
    if args.num_samples > 1 and args.temperature == 0:
        print("note: -n > 1 with -t 0 draws identical greedy samples; use -t > 0 for pass@n", file=sys.stderr)
    return args


def log_samples(path, task, task_name, records):
    """One JSON line per problem: prompt, reference, completion(s), extracted answer(s), verdict, and why it
    was not attempted or its answer was cut (null when neither)."""
    extract = getattr(importlib.import_module(type(task).__module__), "extract_answer", None)
    with open(path, "a", encoding="utf-8") as f:
        for r in records:
            row = {"task": task_name, "index": r.index, "prompt": r.conversation["messages"][:-1],
                   "reference": r.conversation["messages"][-1]["content"], "correct": bool(r.correct),
                   "not_attempted": r.not_attempted, "cut": r.cut}
            if task.eval_type == "categorical":
                row["predicted"] = r.answer
            else:
                row["completions"] = r.answer
                row["extracted"] = [extract(c) for c in r.answer] if extract else None
            f.write(json.dumps(row, default=str) + "\n")


def counted(records, field):
    """[(reason, count)] of a Record field over the records, most common first."""
    return Counter(getattr(r, field) for r in records if getattr(r, field)).most_common()


def result_line(name, records):
    """'AIME: 0.0000 (0/6; 6 not attempted: prompt longer than the 128-token context)'."""
    correct = sum(r.correct for r in records)
    details = [f"{n} not attempted: {why}" for why, n in counted(records, "not_attempted")]
    details += [f"{n} answers {why}" for why, n in counted(records, "cut")]
    accuracy = correct / max(len(records), 1)
    return f"{name}: {accuracy:.4f} ({correct}/{len(records)}{''.join('; ' + d for d in details)})"


def hints(name, records):
    """What would let most problems be attempted, or most answers finish."""
    out, half = [], len(records) / 2
    if sum(1 for r in records if r.not_attempted) > half:
        out.append(f"hint: most {name} prompts do not fit the model's context; a model trained with a longer "
                   f"--max-seq-len can be evaluated on them")
    for why, n in counted(records, "cut"):
        if n > half:
            fix = ("raise -m (--max-new-tokens)" if "-m" in why
                   else "the context ends first: train with a longer --max-seq-len")
            out.append(f"hint: most {name} answers were {why}; {fix}")
    return out


def report_counts(name, records):
    """Report keys: how many problems, how many not attempted and cut, and why (logged even when 0, so a
    re-run replaces the counts of an earlier one)."""
    def with_reasons(field):
        pairs = counted(records, field)
        n = sum(count for _, count in pairs)
        return f"{n} ({'; '.join(why for why, _ in pairs)})" if n else 0
    return {f"{name} problems": len(records), f"{name} not attempted": with_reasons("not_attempted"),
            f"{name} answers cut": with_reasons("cut")}


def evaluate_task(name, task, model, tokenizer, engine, args, device, rank, world_size):
    indices, total = shard_indices(len(task), rank, world_size, args.max_problems)
    t0 = time.time()
    if task.eval_type == "categorical":
        records = run_categorical(model, tokenizer, task, indices, args.batch_size, device)
    else:
        records = run_generative(engine, task, indices, args.batch_size, args.num_samples, args.max_new_tokens,
                                 args.temperature, args.top_k, args.seed)
    records = gather(records)
    print0(f"{result_line(name, records)} in {time.time() - t0:.1f}s")
    for line in hints(name, records):
        print0(line)
    if args.log_samples and rank == 0:
        log_samples(args.log_samples, task, name, records)
    return sum(r.correct for r in records) / max(len(records), 1), records


def main(argv=None):
    args = parse_args(argv)
    is_ddp, rank, _, world_size, device = compute_init(args.device_type)
    error = None
    try:
        model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
    except (CheckpointError, FileNotFoundError) as e:
        error = str(e)
    if error := first_error(error):  # every rank stops, or none
        print0(f"error: {error}")
        compute_cleanup()
        return 1
    autocast = autocast_context(device.type)
    engine = Engine(model, tokenizer)
    if args.log_samples and rank == 0:
        open(args.log_samples, "w").close()

    results, counts, skipped = {}, {}, {}
    for name in args.tasks:
        try:  # rank 0 decides: a dataset it lacks skips the task everywhere, with the reason
            loaded, not_loaded = load_on_all_ranks([(name, lambda: load_task(name))])
        except DataMismatch as e:
            print_all(f"error: {e}")
            compute_cleanup()
            return 1
        if not_loaded:
            print0(f"{name}: skipped ({not_loaded[0][1]})")
            skipped[name] = not_loaded[0][1]
            continue
        with autocast:
            accuracy, records = evaluate_task(name, loaded[0][1], model, tokenizer, engine, args, device, rank, world_size)
        results[name] = accuracy
        counts.update(report_counts(name, records), **{f"skipped {name}": None})  # None: drop an old skip
        if name == "AIME":  # per-year accuracy from the same run
            for year in (2024, 2025):
                year_records = [r for r in records if r.conversation.get("year") == year]
                if year_records:
                    results[f"AIME-{year}"] = sum(r.correct for r in year_records) / len(year_records)
                    print0(f"  {result_line(f'AIME-{year}', year_records)}")

    results.update(chatcore(results))
    if results.get("ChatCORE") is not None:
        print0(f"ChatCORE: {results['ChatCORE']:.4f}")
    # merged into the section, so evaluating tasks in separate runs accumulates them in the report; the settings
    # are per task, as each task keeps the line of the run that last evaluated it
    run = (f"step {meta['step']}, {args.num_samples} samples, temperature {args.temperature}, "
           f"max problems {args.max_problems}")
    settings = {"source": args.source, **{f"{name} run": run for name in args.tasks if name in results}}
    get_report().log_metrics(chat_eval_section(args.source),
                             {**settings, **results, **counts,
                              **{f"skipped {k}": v.splitlines()[0] for k, v in skipped.items()}})
    compute_cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
