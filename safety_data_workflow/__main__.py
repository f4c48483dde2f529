"""
The safety SFT data workflow: red-team questions, blue-team answers, prompt optimization, filtering.

python -m safety_data_workflow all                    every stage in order (resumes where a previous run stopped)
python -m safety_data_workflow seeds|redteam|optimize|answers|filter   one stage
python -m safety_data_workflow report                 data quality report of the dataset (default: the shipped one)
python -m safety_data_workflow all --config my_workflow.json --out-dir runs/r1 --seed-limit 7

Keys come from the environment (OPENAI_API_KEY, ANTHROPIC_API_KEY, or the api_key_env each model names)
or from the config file; they are never written to logs or outputs. Any OpenAI-compatible server works as
a model, e.g. {"blue_team": {"provider": "openai", "model": "sft-d20", "base_url": "http://127.0.0.1:8000/v1"}}.
"""

import argparse
import asyncio
import logging
import os
import sys

from safety_data_workflow import stages
from safety_data_workflow.config import load_config
from safety_data_workflow.llm import BudgetExceeded, ModelConfigError
from safety_data_workflow.report import build_report
from safety_data_workflow.run import RunContext, StageInputMissing

ASYNC_STAGES = {"redteam": stages.run_redteam, "optimize": stages.run_optimize, "answers": stages.run_answers,
                "filter": stages.run_filter}
ORDER = ["seeds", "redteam", "optimize", "answers", "filter", "report"]
FLAG_FIELDS = ("out_dir", "final_path", "seed_limit", "concurrency", "max_requests", "max_total_tokens",
               "apo_rounds", "apo_sample_size", "min_dimension_score", "min_mean_score", "multiturn_fraction")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Generate, optimize, answer and filter safety SFT conversations")
    p.add_argument("stage", choices=ORDER + ["all"])
    p.add_argument("--config", default=None, help="workflow config JSON (models, base URLs, limits)")
    p.add_argument("--out-dir", default=None, help="run directory for every stage's files (default safety_data_run)")
    p.add_argument("--final-path", default=None, help="the filtered dataset (default data/safety_sft_...filtered.jsonl)")
    p.add_argument("--seed-limit", type=int, default=None, help="use only the first N seeds (a quick trial)")
    p.add_argument("--concurrency", type=int, default=None, help="API calls in flight at once")
    p.add_argument("--max-requests", type=int, default=None, help="request budget of this run")
    p.add_argument("--max-total-tokens", type=int, default=None, help="token budget of this run")
    p.add_argument("--apo-rounds", type=int, default=None, help="prompt-optimization rounds (default 3)")
    p.add_argument("--apo-sample-size", type=int, default=None, help="questions per optimization round (default 100)")
    p.add_argument("--min-dimension-score", type=int, default=None, help="filter: every dimension >= this (1-5)")
    p.add_argument("--min-mean-score", type=float, default=None, help="filter: mean of the dimensions >= this")
    p.add_argument("--multiturn-fraction", type=float, default=None, help="share of questions with follow-ups")
    p.add_argument("--report-input", default=None, help="report: conversations file (default: --final-path)")
    return p.parse_args(argv)


def run_stage(stage, config, report_input=None):
    if stage == "report":
        source = report_input or config.final_path
        if not os.path.exists(source):
            raise StageInputMissing(f"{source} does not exist: run the workflow, or pass --report-input")
        path = build_report(source, os.path.join(config.out_dir, "report"), run_dir=config.out_dir,
                            near_duplicate_threshold=config.near_duplicate_threshold)
        print(f"report: {path}")
        return
    ctx = RunContext(config)
    try:
        if stage == "seeds":
            stages.run_seeds(ctx)
        else:
            asyncio.run(ASYNC_STAGES[stage](ctx))
    finally:
        print(f"{stage}: API requests this run {ctx.budget.requests}, tokens {ctx.budget.tokens}", file=sys.stderr)
        ctx.close()


def main(argv=None):
    args = parse_args(argv)
    # our own messages at INFO; the HTTP libraries' one line per request would drown the progress bars
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("safety_data_workflow").setLevel(logging.INFO)
    try:
        config = load_config(args.config, {name: getattr(args, name) for name in FLAG_FIELDS})
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    for stage in (ORDER if args.stage == "all" else [args.stage]):
        try:
            run_stage(stage, config, args.report_input)
        except (StageInputMissing, ModelConfigError, ValueError) as e:  # ValueError: e.g. no API key set
            sys.exit(f"error: {e}")
        except BudgetExceeded as e:
            sys.exit(f"stopped: {e}. Everything finished so far is saved; raise --max-requests / "
                     "--max-total-tokens and re-run to continue.")


if __name__ == "__main__":
    main()
