"""
Stages 1-5. Each reads the previous stage's file from the run directory, skips what its own output
already holds, and appends one complete record per unit of work (a record is one line, so a kill can
only lose the unit in flight). Derived files (deduplicated questions, the filtered dataset) are
rewritten whole at the end of their stage.

    seeds      seeds.jsonl              the seed bank (seeds.py)
    redteam    redteam_raw.jsonl        questions per (seed, strategy) -> questions.jsonl, duplicates.jsonl
    optimize   apo_evals.jsonl          answers + judge scores per (round, question) -> apo_rounds.jsonl,
                                        best_prompt.jsonl
    answers    answers.jsonl            single- and multi-turn conversations with the best prompt
    filter     quality_scores.jsonl     rule checks + judge scores -> the final dataset, rejected.jsonl
"""

import hashlib
import json
import random

from safety_data_workflow import prompts
from safety_data_workflow.checks import quality_issues
from safety_data_workflow.dedup import find_duplicates
from safety_data_workflow.llm import ModelCallFailed
from safety_data_workflow.seeds import DOMAINS, STRATEGIES, seed_records
from safety_data_workflow.store import JsonlStore, write_jsonl_atomic

WORST_EXAMPLES_FOR_OPTIMIZER = 8


def _user(text):
    return {"role": "user", "content": text}


def run_seeds(ctx):
    seeds = seed_records()[:ctx.config.seed_limit or None]
    store = JsonlStore(ctx.path("seeds.jsonl"), key=lambda r: r["seed_id"])
    added = sum(store.append(s) for s in seeds)
    print(f"seeds: {len(seeds)} seeds in {len(DOMAINS)} domains ({added} new) -> {store.path}")


async def run_redteam(ctx):
    seeds = ctx.read("seeds.jsonl", "seeds")
    n = ctx.config.questions_per_cell
    raw = JsonlStore(ctx.path("redteam_raw.jsonl"), key=lambda r: r["cell"])
    cells = [(s, strategy) for s in seeds for strategy in STRATEGIES if f"{s['seed_id']}/{strategy}" not in raw]
    red = ctx.client("red_team")

    async def work(cell):
        seed, strategy = cell
        request = prompts.RED_TEAM_USER.format(domain=seed["domain"], domain_description=seed["domain_description"],
                                               description=seed["description"], strategy=strategy,
                                               strategy_description=STRATEGIES[strategy], count=n)
        questions = await red.json(prompts.RED_TEAM_SYSTEM, [_user(request)], lambda o: prompts.check_questions(o, n))
        raw.append({"cell": f"{seed['seed_id']}/{strategy}", "seed_id": seed["seed_id"], "domain": seed["domain"],
                    "strategy": strategy, "questions": questions})

    failed = await ctx.map("redteam", cells, work, key=lambda c: f"{c[0]['seed_id']}/{c[1]}")
    # flatten in seed x strategy order, so deduplication keeps the same first occurrence on every run
    order = {f"{s['seed_id']}/{strategy}": i for i, (s, strategy) in
             enumerate((s, t) for s in seeds for t in STRATEGIES)}
    flat = [{"question_id": f"{r['cell'].replace('/', '-')}-{i}", "seed_id": r["seed_id"], "domain": r["domain"],
             "strategy": r["strategy"], "question": q}
            for r in sorted(raw.values(), key=lambda r: order.get(r["cell"], len(order))) for i, q in enumerate(r["questions"])]
    dropped = find_duplicates([q["question"] for q in flat], ctx.config.near_duplicate_threshold)
    write_jsonl_atomic(ctx.path("questions.jsonl"), [q for i, q in enumerate(flat) if i not in dropped])
    write_jsonl_atomic(ctx.path("duplicates.jsonl"), [{"question_id": flat[i]["question_id"], "kind": kind,
                                                       "duplicate_of": flat[j]["question_id"]}
                                                      for i, (kind, j) in sorted(dropped.items())])
    print(f"redteam: {len(flat)} questions from {len(raw)} cells, {len(dropped)} duplicates removed, "
          f"{failed} cells failed -> {ctx.path('questions.jsonl')}")


def _mean_scores(evals):
    if not evals:
        return {name: 0.0 for name in prompts.DIMENSIONS}
    return {name: sum(e["scores"][name] for e in evals) / len(evals) for name in prompts.DIMENSIONS}


async def _answer_and_judge(ctx, system_prompt, messages, tag):
    answer = await ctx.client("blue_team").text(system_prompt, messages)
    transcript = prompts.render_transcript([*messages, {"role": "assistant", "content": answer}])
    judgment = await ctx.client("judge").json(prompts.judge_system(), [_user(transcript)], prompts.check_judgment, tag=tag)
    return answer, judgment


async def _rewrite(ctx, system_prompt, evals, means):
    """The optimizer's new prompt, or None when it cannot produce a valid one (the old prompt stays)."""
    worst = sorted(evals, key=lambda e: sum(e["scores"].values()))[:WORST_EXAMPLES_FOR_OPTIMIZER]
    report = {"current_prompt": system_prompt, "mean_scores": means,
              "worst_answers": [{"question": e["question"], "answer": e["answer"], "scores": e["scores"],
                                 "judge_notes": e["notes"]} for e in worst]}
    try:
        return await ctx.client("optimizer").json(prompts.OPTIMIZER_SYSTEM, [_user(json.dumps(report, indent=1))],
                                                  prompts.check_rewrite)
    except ModelCallFailed as e:
        return {"error": str(e)}


async def run_optimize(ctx):
    config = ctx.config
    questions = ctx.read("questions.jsonl", "redteam")
    sample = random.Random(config.random_seed).sample(questions, min(config.apo_sample_size, len(questions)))
    rounds = JsonlStore(ctx.path("apo_rounds.jsonl"), key=lambda r: r["round"])
    evals = JsonlStore(ctx.path("apo_evals.jsonl"), key=lambda r: (r["round"], r["question_id"]))
    system_prompt = prompts.INITIAL_BLUE_PROMPT
    for r in range(1, config.apo_rounds + 1):
        if r in rounds:
            system_prompt = rounds.records[r]["next_prompt"]
            continue

        async def work(q, r=r, system_prompt=system_prompt):
            answer, judgment = await _answer_and_judge(ctx, system_prompt, [_user(q["question"])], tag="apo")
            evals.append({"round": r, "question_id": q["question_id"], "domain": q["domain"], "strategy": q["strategy"],
                          "question": q["question"], "answer": answer, **judgment,
                          "passed": prompts.passes(judgment["scores"], config.min_dimension_score, config.min_mean_score)})

        todo = [q for q in sample if (r, q["question_id"]) not in evals]
        await ctx.map(f"optimize round {r}/{config.apo_rounds}", todo, work, key=lambda q: q["question_id"])
        round_evals = [e for e in evals.values() if e["round"] == r]
        means = _mean_scores(round_evals)
        pass_rate = sum(e["passed"] for e in round_evals) / len(round_evals) if round_evals else 0.0
        rewrite = await _rewrite(ctx, system_prompt, round_evals, means) if r < config.apo_rounds else {}
        accepted = "prompt" in rewrite
        rounds.append({"round": r, "prompt": system_prompt, "evaluated": len(round_evals), "pass_rate": pass_rate,
                       "mean_scores": means, "diagnosis": rewrite.get("diagnosis", rewrite.get("error", "")),
                       "rule_patches": rewrite.get("rule_patches", []), "rewrite_accepted": accepted,
                       "next_prompt": rewrite["prompt"] if accepted else system_prompt})
        print(f"optimize: round {r}: pass rate {pass_rate:.1%} over {len(round_evals)} answers, "
              f"rewrite {'accepted' if accepted else 'kept the prompt' if r < config.apo_rounds else 'not needed'}")
        system_prompt = rounds.records[r]["next_prompt"]
    best = max(rounds.values(), key=lambda x: (x["pass_rate"], sum(x["mean_scores"].values())))
    write_jsonl_atomic(ctx.path("best_prompt.jsonl"), [{"round": best["round"], "pass_rate": best["pass_rate"],
                                                        "prompt": best["prompt"]}])
    print(f"optimize: best prompt from round {best['round']} (pass rate {best['pass_rate']:.1%})")


def _follow_up_count(question_id, fraction, max_follow_ups):
    """Deterministic per question: the same questions get follow-ups on every (re-)run."""
    h = int(hashlib.sha256(question_id.encode()).hexdigest(), 16)
    if max_follow_ups == 0 or (h % 10_000) / 10_000 >= fraction:
        return 0
    return 1 + (h // 10_000) % max_follow_ups


async def run_answers(ctx):
    config = ctx.config
    questions = ctx.read("questions.jsonl", "redteam")
    best = ctx.read("best_prompt.jsonl", "optimize")[0]
    store = JsonlStore(ctx.path("answers.jsonl"), key=lambda r: r["id"])
    blue, red = ctx.client("blue_team"), ctx.client("red_team")

    async def work(q):
        messages = [_user(q["question"])]
        messages.append({"role": "assistant", "content": await blue.text(best["prompt"], messages)})
        for k in range(_follow_up_count(q["question_id"], config.multiturn_fraction, config.max_follow_ups)):
            follow_up = await red.json(prompts.FOLLOW_UP_SYSTEM, [_user(prompts.render_transcript(messages))],
                                       prompts.check_follow_up, tag=f"follow-up {k}")
            messages.append(_user(follow_up))
            messages.append({"role": "assistant", "content": await blue.text(best["prompt"], messages)})
        store.append({"id": q["question_id"], "domain": q["domain"], "strategy": q["strategy"], "seed_id": q["seed_id"],
                      "source": "workflow", "prompt_round": best["round"], "messages": messages})

    todo = [q for q in questions if q["question_id"] not in store]
    failed = await ctx.map("answers", todo, work, key=lambda q: q["question_id"])
    multi = sum(sum(m["role"] == "user" for m in r["messages"]) > 1 for r in store.values())
    print(f"answers: {len(store)} conversations ({multi} multi-turn), {failed} failed -> {store.path}")


async def run_filter(ctx):
    config = ctx.config
    conversations = ctx.read("answers.jsonl", "answers")
    scores = JsonlStore(ctx.path("quality_scores.jsonl"), key=lambda r: r["id"])
    judge = ctx.client("judge")

    async def work(record):
        issues = quality_issues(record)
        if issues:  # rule failures need no model call
            scores.append({"id": record["id"], "rule_issues": issues, "scores": None, "notes": "", "passed": False})
            return
        transcript = prompts.render_transcript(record["messages"])
        judgment = await judge.json(prompts.judge_system(), [_user(transcript)], prompts.check_judgment, tag="filter")
        scores.append({"id": record["id"], "rule_issues": [], **judgment,
                       "passed": prompts.passes(judgment["scores"], config.min_dimension_score, config.min_mean_score)})

    failed = await ctx.map("filter", [c for c in conversations if c["id"] not in scores], work, key=lambda c: c["id"])
    accepted, rejected = [], []
    for record in conversations:
        score = scores.records.get(record["id"])
        if score is None:
            continue  # its scoring failed this run; a re-run tries again
        if score["passed"]:
            accepted.append({**record, "scores": score["scores"]})
        else:
            reasons = score["rule_issues"] or [f"scores below threshold: {score['scores']} ({score['notes']})"]
            rejected.append({**record, "scores": score["scores"], "reasons": reasons})
    write_jsonl_atomic(config.final_path, accepted)
    write_jsonl_atomic(ctx.path("rejected.jsonl"), rejected)
    print(f"filter: {len(accepted)} accepted, {len(rejected)} rejected, {failed} not scored -> {config.final_path}")
