"""
Stage 6, the data quality report: Markdown plus PNG plots, for any conversations file (the shipped
hand-written data or a run's filtered output) and, when a run directory is given, the run's own
figures (duplicates removed, prompt-optimization rounds, filter decisions, failures).
"""

import os
import statistics
from collections import Counter

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from safety_data_workflow.checks import is_multiturn, quality_issues  # noqa: E402
from safety_data_workflow.dedup import find_duplicates  # noqa: E402
from safety_data_workflow.prompts import DIMENSIONS  # noqa: E402
from safety_data_workflow.seeds import DOMAINS, STRATEGIES  # noqa: E402
from nanochat.common import read_jsonl  # noqa: E402


def _stats(values):
    if not values:
        return "-"
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    return f"mean {statistics.mean(values):.0f}, median {statistics.median(values):.0f}, p95 {p95}, max {ordered[-1]}"


def _coverage(records, out_dir, lines):
    counts = Counter((r["domain"], r["strategy"]) for r in records)
    lines += ["## Coverage (conversations per domain × strategy)", "",
              "| domain | " + " | ".join(STRATEGIES) + " | total |", "|---" * (len(STRATEGIES) + 2) + "|"]
    for d in DOMAINS:
        row = [counts[(d, s)] for s in STRATEGIES]
        lines.append(f"| {d} | " + " | ".join(map(str, row)) + f" | {sum(row)} |")
    empty = [f"{d}/{s}" for d in DOMAINS for s in STRATEGIES if counts[(d, s)] == 0]
    lines += ["", f"Empty cells: {', '.join(empty) if empty else 'none'}.", ""]
    fig, ax = plt.subplots(figsize=(9, 5))
    grid = [[counts[(d, s)] for s in STRATEGIES] for d in DOMAINS]
    image = ax.imshow(grid, cmap="Blues")
    ax.set_xticks(range(len(STRATEGIES)), list(STRATEGIES), rotation=35, ha="right")
    ax.set_yticks(range(len(DOMAINS)), list(DOMAINS))
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            ax.text(j, i, value, ha="center", va="center")
    fig.colorbar(image)
    ax.set_title("conversations per domain × strategy")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "coverage.png"), dpi=100)
    plt.close(fig)
    lines += ["![coverage](coverage.png)", ""]


def _lengths(records, out_dir, lines):
    user = [len(m["content"].split()) for r in records for m in r["messages"] if m["role"] == "user"]
    assistant = [len(m["content"].split()) for r in records for m in r["messages"] if m["role"] == "assistant"]
    turns = Counter(sum(m["role"] == "user" for m in r["messages"]) for r in records)
    lines += ["## Lengths", "", f"- user messages (words): {_stats(user)}",
              f"- assistant messages (words): {_stats(assistant)}",
              "- user turns per conversation: " + ", ".join(f"{k}: {v}" for k, v in sorted(turns.items())), ""]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist([user, assistant], bins=20, label=["user", "assistant"])
    ax.set_xlabel("words per message")
    ax.set_ylabel("messages")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "lengths.png"), dpi=100)
    plt.close(fig)
    lines += ["![lengths](lengths.png)", ""]


def _scores(records, out_dir, lines):
    scored = [r for r in records if isinstance(r.get("scores"), dict)]
    lines += ["## Judge scores", ""]
    if not scored:
        lines += ["No model scores in this file (hand-written data is checked by the rule checks above, not a "
                  "judge model; a workflow run adds scores).", ""]
        return
    lines += ["| dimension | mean | min | share >= 4 |", "|---|---|---|---|"]
    for name in DIMENSIONS:
        values = [r["scores"][name] for r in scored]
        lines.append(f"| {name} | {statistics.mean(values):.2f} | {min(values):.0f} | "
                     f"{sum(v >= 4 for v in values) / len(values):.0%} |")
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.boxplot([[r["scores"][n] for r in scored] for n in DIMENSIONS])
    ax.set_xticks(range(1, len(DIMENSIONS) + 1), list(DIMENSIONS), rotation=25, ha="right")
    ax.set_ylim(0.5, 5.5)
    ax.set_title("judge scores per dimension")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "scores.png"), dpi=100)
    plt.close(fig)
    lines += ["", "![scores](scores.png)", ""]


def _run_section(run_dir, out_dir, lines):
    def load(name):
        path = os.path.join(run_dir, name)
        return read_jsonl(path) if os.path.exists(path) else []

    duplicates, rounds, rejected, failures = (load("duplicates.jsonl"), load("apo_rounds.jsonl"),
                                              load("rejected.jsonl"), load("failures.jsonl"))
    kinds = Counter(d["kind"] for d in duplicates)
    lines += [f"## Run: {run_dir}", "", f"- red-team duplicates removed: {len(duplicates)} "
              f"(exact {kinds['exact']}, near {kinds['near']})",
              f"- rejected by the quality filter: {len(rejected)}", f"- failed work items (all stages): {len(failures)}"]
    reasons = Counter(reason.split(":")[0] for r in rejected for reason in r.get("reasons", []))
    for reason, n in reasons.most_common(5):
        lines.append(f"  - {reason}: {n}")
    if rounds:
        lines += ["", "| round | evaluated | pass rate | mean score | rewrite accepted |", "|---|---|---|---|---|"]
        for r in rounds:
            mean = sum(r["mean_scores"].values()) / len(r["mean_scores"])
            lines.append(f"| {r['round']} | {r['evaluated']} | {r['pass_rate']:.1%} | {mean:.2f} | {r['rewrite_accepted']} |")
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([r["round"] for r in rounds], [r["pass_rate"] for r in rounds], marker="o")
        ax.set_xlabel("prompt-optimization round")
        ax.set_ylabel("pass rate")
        ax.set_ylim(0, 1.05)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "apo_pass_rate.png"), dpi=100)
        plt.close(fig)
        lines += ["", "![pass rate per round](apo_pass_rate.png)"]
    lines.append("")


def build_report(conversations_path, out_dir, run_dir=None, near_duplicate_threshold=0.8):
    """Write report.md and its PNGs into out_dir; returns the report's path."""
    records = read_jsonl(conversations_path)
    os.makedirs(out_dir, exist_ok=True)
    issues = {r.get("id", f"line {i + 1}"): quality_issues(r) for i, r in enumerate(records)}
    bad = {k: v for k, v in issues.items() if v}
    multi = sum(is_multiturn(r) for r in records if not quality_issues(r))
    firsts = [r["messages"][0]["content"] for r in records if not bad.get(r.get("id"))]
    duplicates = Counter(kind for kind, _ in find_duplicates(firsts, near_duplicate_threshold).values())
    sources = Counter(r.get("source", "unknown") for r in records)
    lines = ["# Safety SFT data quality report", "", f"File: `{conversations_path}`", "",
             f"- conversations: {len(records)} ({', '.join(f'{k}: {v}' for k, v in sources.items())})",
             f"- multi-turn: {multi} ({multi / max(1, len(records)):.0%})",
             f"- failing the rule checks (schema, preachy phrases, generic refusals, length): {len(bad)}",
             f"- duplicate first user messages: exact {duplicates['exact']}, near {duplicates['near']}", ""]
    for key, problems in list(bad.items())[:20]:
        lines.append(f"  - {key}: {'; '.join(problems)}")
    good = [r for r in records if not quality_issues(r)]
    _coverage(good, out_dir, lines)
    _lengths(good, out_dir, lines)
    _scores(good, out_dir, lines)
    run_files = ("duplicates.jsonl", "apo_rounds.jsonl", "rejected.jsonl", "failures.jsonl")
    if run_dir and any(os.path.exists(os.path.join(run_dir, name)) for name in run_files):
        _run_section(run_dir, out_dir, lines)
    path = os.path.join(out_dir, "report.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path
