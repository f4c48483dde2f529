"""
Report cards: every stage logs a section (a small markdown file) into $NANOCHAT_BASE_DIR/report/,
and `python -m nanochat.report generate` stitches them into one report.md.

    python -m nanochat.report reset      # start a fresh report: clears the dir, writes the header
    python -m nanochat.report generate   # header + sections + curves + summary -> report/report.md,
                                         # copied with its plots (report_*.png) to the current directory

The header (written at reset) describes the run: date, git commit/branch/dirty, hardware, versions,
how much code there is ("bloat"). generate() adds the training curves, a summary table and the total
wall clock time (reset -> generate) with a cost estimate: dollars per hour from NANOCHAT_GPU_HOURLY_COST,
default $24/h when the run saw an 8xH100 node, else no estimate.

What the stages log (the summary table reads these exact section names and keys):

    "Base model evaluation"  (scripts.base_eval)           key "CORE"
    "Chat evaluation mid"    (scripts.chat_eval -i mid)    keys "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K",
    "Chat evaluation sft"    (scripts.chat_eval -i sft)         "HumanEval", "AIME", "AIME-2024", "AIME-2025",
    "Chat evaluation rl"     (scripts.chat_eval -i rl)          "SpellingBee", "ChatCORE"

Accuracies are fractions in [0, 1]. chat_eval may run one task per call: use
report.log_metrics(chat_eval_section(source), {"GSM8K": acc}), which keeps the keys logged before.
A missing value shows as "-".

Training curves: a script records a series once it has it (calling again replaces it, so calling it at
every eval leaves a crashed run with its curve so far):

    report.log_curve("Base model training loss", steps, losses, ylabel="train loss")
    report.log_curve("Base model validation bpb", eval_steps, val_bpbs, ylabel="val bpb")

The series is stored as JSON in the report dir; generate() plots it (matplotlib, Agg, no display needed).
"""

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time

import torch

from nanochat.common import format_duration, get_base_dir, get_dist_info

HEADER_FILE = "header.md"
RUN_FILE = "run.json"  # machine-readable facts from reset: start time, GPUs (for wall clock and cost)
REPORT_FILE = "report.md"
CURVE_SUFFIX = ".curve.json"
PLOT_PREFIX = "report_"  # plots are report_<curve>.png, here and beside the copied report.md
REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE_DIRS = ("nanochat", "scripts", "tasks")
CODE_EXTENSIONS = (".py", ".sh", ".html", ".js", ".css", ".rs")
DEPENDENCIES = ("tiktoken", "rustbpe", "datasets", "numpy", "pyarrow", "fastapi", "uvicorn", "wandb", "matplotlib")
H100_NODE_HOURLY_COST = 24.0  # dollars per hour for 8xH100 (~$3/GPU/h, a typical on-demand price)


def chat_eval_section(source):
    """The section scripts.chat_eval logs into for a model source: 'sft' -> 'Chat evaluation sft'."""
    return f"Chat evaluation {source}"


# Sections appear in pipeline order; sections not listed here follow, alphabetically.
SECTION_ORDER = [
    "Tokenizer training",
    "Tokenizer evaluation",
    "Base model training",
    "Base model loss",
    "Base model evaluation",
    "Midtraining",
    chat_eval_section("mid"),
    "Chat SFT",
    chat_eval_section("sft"),
    "Chat RL",
    chat_eval_section("rl"),
    "Chat evaluation",  # older runs logged one section for all sources
]

# Summary table: columns are (label, the section holding that stage's numbers), rows are the keys.
SUMMARY_COLUMNS = [("BASE", "Base model evaluation"), ("MID", chat_eval_section("mid")),
                   ("SFT", chat_eval_section("sft")), ("RL", chat_eval_section("rl"))]
SUMMARY_METRICS = ["CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval",
                   "AIME", "AIME-2024", "AIME-2025", "SpellingBee", "ChatCORE"]
OPTIONAL_METRICS = {"AIME-2024", "AIME-2025"}  # rows shown only when some stage logged them


def slugify(section):
    """'Chat SFT' -> 'chat-sft' (the section's file name without .md)."""
    return re.sub(r"[^a-z0-9]+", "-", section.lower()).strip("-")


def format_value(value):
    """Floats to 6 significant digits (4 for tiny/huge ones in scientific notation), ints with separators."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
            return f"{value:.4e}"
        return f"{value:.6g}"
    return str(value)


def read_section_values(path):
    """The '- key: value' lines of a section file as {key: value string} (later lines win)."""
    values = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("- ") and ": " in line:
                key, value = line[2:].rstrip("\n").split(": ", 1)
                values[key.strip()] = value.strip()
    return values


# -----------------------------------------------------------------------------
# header: what ran where

def _git(*args):
    """Output of a read-only git command in the repo, or None (no git, not a repo)."""
    try:
        # --no-optional-locks: `git status` must not rewrite the index of the repo it describes
        out = subprocess.run(["git", "--no-optional-locks", *args], cwd=REPO_DIR,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def git_line():
    commit = _git("rev-parse", "--short", "HEAD")
    if not commit:
        return "- git: unknown (not a git checkout)"
    branch = _git("rev-parse", "--abbrev-ref", "HEAD") or "unknown"
    status = _git("status", "--porcelain", "--untracked-files=no")
    dirty = "unknown" if status is None else ("yes (uncommitted changes)" if status else "no")
    return f"- git: commit {commit}, branch {branch}, dirty: {dirty}"


def _cpu_model():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _ram_gib():
    try:
        import psutil
        return psutil.virtual_memory().total / 1024**3
    except ImportError:
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
        except (ValueError, OSError, AttributeError):
            return None


def gpu_names():
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def hardware_lines():
    ram = _ram_gib()
    lines = [f"- CPU: {_cpu_model()} ({os.cpu_count()} logical cores)",
             f"- RAM: {ram:.1f} GiB" if ram else "- RAM: unknown"]
    if torch.cuda.is_available():
        counts = {}  # name -> (count, GiB): a node of 8 identical GPUs is one line
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            n, _ = counts.get(props.name, (0, 0))
            counts[props.name] = (n + 1, props.total_memory / 1024**3)
        gpus = ", ".join(f"{n} x {name} ({gib:.1f} GiB each)" for name, (n, gib) in counts.items())
        lines.append(f"- GPU: {gpus}, CUDA {torch.version.cuda}")
    else:
        lines.append("- GPU: none")
    return lines


def dependency_line():
    versions = []
    for name in DEPENDENCIES:
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{name} (not installed)")
    return "- dependencies: " + ", ".join(versions)


def code_stats(root=REPO_DIR, dirs=CODE_DIRS):
    """(files, lines, characters) of the code in root/dirs: how big the project has grown."""
    files = lines = chars = 0
    for d in dirs:
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, d)):
            dirnames[:] = sorted(n for n in dirnames if not n.startswith(".") and n != "__pycache__")
            for name in sorted(filenames):
                if not name.endswith(CODE_EXTENSIONS):
                    continue
                with open(os.path.join(dirpath, name), encoding="utf-8", errors="replace") as f:
                    text = f.read()
                files, lines, chars = files + 1, lines + text.count("\n"), chars + len(text)
    return files, lines, chars


def _pretraining_data_line():
    """Says so when base_data/ holds the fallback corpus: its models only test the pipeline."""
    from nanochat.dataset import FALLBACK_MARKER  # lazy: pyarrow etc. are not needed for the rest
    if os.path.exists(os.path.join(get_base_dir(), "base_data", FALLBACK_MARKER)):
        return ["- pretraining data: FALLBACK corpus of installed package documentation, not web text "
                "(models trained on it are for testing the pipeline only)"]
    return []


def header_text(started=None):
    files, lines, chars = code_stats()
    started = started or datetime.datetime.now()
    parts = [
        "# nanochat training report",
        "",
        f"- run started: {started.strftime('%Y-%m-%d %H:%M:%S')}",
        git_line(),
        f"- platform: {platform.platform()}",
        *hardware_lines(),
        f"- python: {sys.version.split()[0]}",
        f"- torch: {torch.__version__}",
        dependency_line(),
        f"- bloat: {files} files, {lines:,} lines, {chars:,} characters of code in "
        f"{' '.join(d + '/' for d in CODE_DIRS)}",
        *_pretraining_data_line(),
        "",
    ]
    return "\n".join(parts) + "\n"


# -----------------------------------------------------------------------------
# summary: the table, wall clock, cost

def hourly_cost(gpus):
    """(dollars per hour or None, where the number comes from / how to get one)."""
    raw = os.environ.get("NANOCHAT_GPU_HOURLY_COST", "").strip()
    if raw:
        try:
            price = float(raw.lstrip("$"))
        except ValueError:
            price = float("nan")
        if math.isfinite(price) and price >= 0:
            return price, "from NANOCHAT_GPU_HOURLY_COST"
        return None, f"NANOCHAT_GPU_HOURLY_COST={raw!r} is not a number of dollars per hour"
    if len(gpus) == 8 and all("H100" in name for name in gpus):
        return H100_NODE_HOURLY_COST, "default for an 8xH100 node; set NANOCHAT_GPU_HOURLY_COST to change"
    return None, "set NANOCHAT_GPU_HOURLY_COST (dollars per hour for this machine) to estimate it"


def _table_value(value):
    """Metrics to 4 decimals in the table (0.221912 -> 0.2219); anything else as logged."""
    if value is None:
        return "-"
    try:
        return f"{float(value):.4f}" if re.search(r"[.eE]", value) else value
    except ValueError:
        return value


def _summary_rows(section_values):
    def logged(m):
        return any(section_values.get(s, {}).get(m) is not None for _, s in SUMMARY_COLUMNS)
    return [m for m in SUMMARY_METRICS if m not in OPTIONAL_METRICS or logged(m)]


def summary_table(section_values):
    """section_values: {section name: {key: value}} -> the markdown table, '-' where a value is missing."""
    lines = ["| Metric | " + " | ".join(label for label, _ in SUMMARY_COLUMNS) + " |",
             "|" + "---|" * (len(SUMMARY_COLUMNS) + 1)]
    for m in _summary_rows(section_values):
        lines.append(f"| {m} | " + " | ".join(_table_value(section_values.get(s, {}).get(m))
                                              for _, s in SUMMARY_COLUMNS) + " |")
    return "\n".join(lines)


def _column_metrics(section):
    """The rows a column can fill: CORE in the base column, the chat metrics in the others."""
    return [m for m in SUMMARY_METRICS if (m == "CORE") == (section == SUMMARY_COLUMNS[0][1])]


def summary_notes(section_values):
    """
    Lines under the table: why cells are empty (stage not run, task skipped and the reason's short form,
    the part before its first ': '), and cells whose accuracy counts problems the model never attempted.
    """
    notes = []
    not_run = [label for label, section in SUMMARY_COLUMNS if section not in section_values]
    if not_run:
        notes.append(f"- {', '.join(not_run)}: stage not evaluated")
    for label, section in SUMMARY_COLUMNS:
        values = section_values.get(section)
        if values is None:
            continue
        empty = {}
        for m in _column_metrics(section):
            if values.get(m) is None and m not in OPTIONAL_METRICS:
                skipped = values.get(f"skipped {m}")
                reason = f"skipped, {skipped.split(': ', 1)[0]}" if skipped else "not evaluated"
                if m == "ChatCORE" and not skipped:
                    reason = "needs all of ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval, SpellingBee in one run"
                empty.setdefault(reason, []).append(m)
            not_attempted = values.get(f"{m} not attempted")  # "4 (prompt longer than ...)" or "0"
            if not_attempted not in (None, "0"):
                count, _, why = not_attempted.partition(" ")
                notes.append(f"- {label} {m}: {count} of {values.get(f'{m} problems', '?')} problems not attempted "
                             f"{why}, counted as wrong")
        notes += [f"- {label} {', '.join(metrics)}: {reason}" for reason, metrics in empty.items()]
    return notes


def summary_text(section_values, run, now=None):
    """The closing section: table, total wall clock since reset, cost estimate."""
    now = now or time.time()
    notes = summary_notes(section_values)
    lines = ["## Summary", "", summary_table(section_values), "", *notes, *([""] if notes else [])]
    start = run.get("start_time")
    if start is None:
        lines.append("- total wall clock time: unknown (run `python -m nanochat.report reset` when a run starts)")
        return "\n".join(lines) + "\n"
    seconds = max(0.0, now - start)
    lines.append(f"- total wall clock time: {format_duration(seconds)} (reset -> generate)")
    price, why = hourly_cost(run.get("gpus", []))
    if price is None:
        lines.append(f"- estimated cost: unknown ({why})")
    else:
        lines.append(f"- estimated cost: ${price * seconds / 3600:,.2f} "
                     f"({seconds / 3600:.2f} h at ${price:,.2f}/h, {why})")
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# curves

def plot_curve(curve, path):
    """One PNG per series. The Figure API (not pyplot) renders with Agg and touches no global backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    points = [(s, v) for s, v in zip(curve["steps"], curve["values"]) if v is not None and math.isfinite(v)]
    fig = Figure(figsize=(7, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if points:
        steps, values = zip(*points)
        ax.plot(steps, values, linewidth=1, marker="." if len(points) < 50 else None)
    ax.set_title(curve["name"])
    ax.set_xlabel(curve.get("xlabel", "step"))
    ax.set_ylabel(curve.get("ylabel", ""))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _number(x):
    """A step as int when it is whole (JSON stays small and readable), else float."""
    x = float(x)
    return int(x) if x.is_integer() else x


def _curve_caption(curve):
    finite = [v for v in curve["values"] if v is not None and math.isfinite(v)]
    if not finite:
        return f"{len(curve['values'])} points, none finite"
    return f"{len(curve['values'])} points, last {format_value(finite[-1])}, min {format_value(min(finite))}"


# -----------------------------------------------------------------------------
# the report

class Report:
    """Writes report sections into report_dir (one markdown file per section)."""

    def __init__(self, report_dir):
        self.report_dir = report_dir
        os.makedirs(report_dir, exist_ok=True)

    def log(self, section, data):
        """
        data: a list of dicts (each key/value becomes a '- key: value' line) or strings (written as is).
        Logging the same section again replaces it (a re-run stage overwrites its old numbers).
        """
        lines = [f"## {section}", f"timestamp: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M:%S')}", ""]
        for item in data:
            if isinstance(item, dict):
                lines.extend(f"- {key}: {format_value(value)}" for key, value in item.items())
            elif item is not None:  # strings as is ("" is a blank line)
                lines.append(str(item))
        path = os.path.join(self.report_dir, slugify(section) + ".md")
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n\n")
        return path

    def log_metrics(self, section, metrics):
        """Adds/replaces '- key: value' lines of a section, keeping the keys logged before (for stages that
        run once per task, like chat_eval -a GSM8K then -a MMLU); a None value removes its key. The section
        holds key/values only."""
        path = os.path.join(self.report_dir, slugify(section) + ".md")
        values = read_section_values(path) if os.path.isfile(path) else {}
        values.update((key, format_value(value)) for key, value in metrics.items() if value is not None)
        for key in [key for key, value in metrics.items() if value is None]:  # None removes a key
            values.pop(key, None)
        return self.log(section, [values])

    def log_curve(self, name, steps, values, ylabel="loss", xlabel="step"):
        """Stores a series (e.g. loss per step) for generate() to plot. Same name again replaces it."""
        steps, values = list(steps), list(values)
        if len(steps) != len(values):
            raise ValueError(f"log_curve({name!r}): {len(steps)} steps but {len(values)} values")
        # float() also takes 0-d tensors / numpy scalars; None and NaN/inf (a diverged run) are stored as null
        values = [None if v is None else float(v) for v in values]
        curve = dict(name=name, xlabel=xlabel, ylabel=ylabel, logged_at=time.time(), steps=[_number(s) for s in steps],
                     values=[v if v is not None and math.isfinite(v) else None for v in values])
        path = os.path.join(self.report_dir, slugify(name) + CURVE_SUFFIX)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(curve, f)
        os.replace(path + ".tmp", path)  # generate() never reads half a series
        return path

    def reset(self):
        """Clears the report dir and writes a fresh header (and the start time for the wall clock)."""
        shutil.rmtree(self.report_dir, ignore_errors=True)
        os.makedirs(self.report_dir, exist_ok=True)
        started = datetime.datetime.now()
        with open(os.path.join(self.report_dir, RUN_FILE), "w", encoding="utf-8") as f:
            json.dump({"start_time": started.timestamp(), "gpus": gpu_names()}, f)
        path = os.path.join(self.report_dir, HEADER_FILE)
        with open(path, "w", encoding="utf-8") as f:
            f.write(header_text(started))
        return path

    def _section_files(self):
        """Section files in pipeline order, then the unknown ones alphabetically."""
        present = {name for name in os.listdir(self.report_dir)
                   if name.endswith(".md") and name not in (HEADER_FILE, REPORT_FILE)}
        ordered = [slugify(s) + ".md" for s in SECTION_ORDER if slugify(s) + ".md" in present]
        return ordered + sorted(present - set(ordered))

    def _curves_text(self):
        """Plots every logged curve into report_dir/report_<name>.png; returns (markdown, png names)."""
        curves = []
        for name in sorted(os.listdir(self.report_dir)):
            if name.endswith(CURVE_SUFFIX):
                with open(os.path.join(self.report_dir, name), encoding="utf-8") as f:
                    curves.append(json.load(f))
        if not curves:
            return "", []
        curves.sort(key=lambda c: c.get("logged_at", 0))  # the order the stages ran in
        lines, pngs = ["## Training curves", ""], []
        can_plot = importlib.util.find_spec("matplotlib") is not None
        if not can_plot:
            lines += ["(matplotlib is not installed: `pip install matplotlib` to plot these curves)", ""]
        for curve in curves:
            png = PLOT_PREFIX + slugify(curve["name"]) + ".png"
            if can_plot:
                plot_curve(curve, os.path.join(self.report_dir, png))
                pngs.append(png)
                lines += [f"![{curve['name']}]({png})", ""]  # relative: works here and beside ./report.md
            lines += [f"{curve['name']}: {_curve_caption(curve)}", ""]
        return "\n".join(lines) + "\n", pngs

    def generate(self, copy_to_cwd=True):
        """Header + sections + curves + summary into report_dir/report.md (and ./report.md with its
        plots). Returns its path."""
        header_path = os.path.join(self.report_dir, HEADER_FILE)
        run_path = os.path.join(self.report_dir, RUN_FILE)
        if os.path.isfile(header_path):
            with open(header_path, encoding="utf-8") as f:
                parts = [f.read()]
        else:
            parts = [header_text()]  # no reset was run: describe the machine as it is now
        for line in _pretraining_data_line():  # the fallback corpus is usually built after the reset
            if line not in parts[0]:
                parts[0] = parts[0].rstrip("\n") + "\n" + line + "\n\n"
        run = {}
        if os.path.isfile(run_path):
            with open(run_path, encoding="utf-8") as f:
                run = json.load(f)
        section_values = {}
        for name in self._section_files():
            path = os.path.join(self.report_dir, name)
            with open(path, encoding="utf-8") as f:
                parts.append(f.read())
            section_values[parts[-1].split("\n", 1)[0].removeprefix("## ").strip()] = read_section_values(path)
        curves_text, pngs = self._curves_text()
        parts += [curves_text, summary_text(section_values, run)]
        path = os.path.join(self.report_dir, REPORT_FILE)
        with open(path, "w", encoding="utf-8") as f:
            f.write("".join(parts))
        if copy_to_cwd and os.path.realpath(os.getcwd()) != os.path.realpath(self.report_dir):
            for name in [REPORT_FILE, *pngs]:
                shutil.copyfile(os.path.join(self.report_dir, name), os.path.join(os.getcwd(), name))
        return path


class DummyReport:
    """What non-main ranks get: every call is a no-op, so 8 ranks never write the same file."""

    def log(self, *args, **kwargs):
        pass

    def log_metrics(self, *args, **kwargs):
        pass

    def log_curve(self, *args, **kwargs):
        pass

    def reset(self, *args, **kwargs):
        pass

    def generate(self, *args, **kwargs):
        pass


def get_report():
    if get_dist_info()[1] == 0:
        return Report(os.path.join(get_base_dir(), "report"))
    return DummyReport()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Reset or generate the nanochat report card")
    parser.add_argument("command", choices=["reset", "generate"])
    args = parser.parse_args()
    report = get_report()
    if args.command == "reset":
        print(f"report reset: {report.reset()}")
    else:
        print(f"report written: {report.generate()} (copied to ./{REPORT_FILE} with its plots)")
