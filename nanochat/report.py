"""
Report cards: every stage logs a section (a small markdown file) into $NANOCHAT_BASE_DIR/report/,
and `python -m nanochat.report generate` stitches them into one report.md.

    python -m nanochat.report reset      # start a fresh report: clears the dir, writes the header
    python -m nanochat.report generate   # header + sections -> report/report.md and ./report.md
"""

import argparse
import datetime
import os
import platform
import re
import shutil
import subprocess
import sys

import torch

from nanochat.common import get_base_dir, get_dist_info

HEADER_FILE = "header.md"
REPORT_FILE = "report.md"

# Sections appear in pipeline order; sections not listed here follow, alphabetically.
SECTION_ORDER = [
    "Tokenizer training",
    "Tokenizer evaluation",
    "Base model training",
    "Base model loss",
    "Base model evaluation",
    "Midtraining",
    "Chat SFT",
    "Chat RL",
    "Chat evaluation",
]


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


def _git_commit():
    """Short commit hash of the code that produced the report, or 'unknown' (no git, not a repo)."""
    try:
        repo_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo_dir,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _hardware_lines():
    lines = [f"- CPU: {platform.processor() or platform.machine()} ({os.cpu_count()} logical cores)"]
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        props = torch.cuda.get_device_properties(0)
        lines.append(f"- GPU: {n} x {props.name} ({props.total_memory / 1024**3:.1f} GiB each)")
    else:
        lines.append("- GPU: none")
    return lines


def header_text():
    lines = [
        "# nanochat training report",
        "",
        f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M:%S')}",
        f"- git commit: {_git_commit()}",
        f"- platform: {platform.platform()}",
        f"- python: {sys.version.split()[0]}",
        f"- torch: {torch.__version__}",
        *_hardware_lines(),
        "",
    ]
    return "\n".join(lines) + "\n"


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

    def reset(self):
        """Clears the report dir and writes a fresh header."""
        shutil.rmtree(self.report_dir, ignore_errors=True)
        os.makedirs(self.report_dir, exist_ok=True)
        path = os.path.join(self.report_dir, HEADER_FILE)
        with open(path, "w", encoding="utf-8") as f:
            f.write(header_text())
        return path

    def _section_files(self):
        """Section files in pipeline order, then the unknown ones alphabetically."""
        present = {name for name in os.listdir(self.report_dir)
                   if name.endswith(".md") and name not in (HEADER_FILE, REPORT_FILE)}
        ordered = [slugify(s) + ".md" for s in SECTION_ORDER if slugify(s) + ".md" in present]
        return ordered + sorted(present - set(ordered))

    def generate(self, copy_to_cwd=True):
        """Concatenates header + sections into report_dir/report.md (and ./report.md). Returns its path."""
        header_path = os.path.join(self.report_dir, HEADER_FILE)
        if os.path.isfile(header_path):
            with open(header_path, encoding="utf-8") as f:
                parts = [f.read()]
        else:
            parts = [header_text()]  # no reset was run: describe the machine as it is now
        for name in self._section_files():
            with open(os.path.join(self.report_dir, name), encoding="utf-8") as f:
                parts.append(f.read())
        path = os.path.join(self.report_dir, REPORT_FILE)
        with open(path, "w", encoding="utf-8") as f:
            f.write("".join(parts))
        if copy_to_cwd:
            shutil.copyfile(path, os.path.join(os.getcwd(), REPORT_FILE))
        return path


class DummyReport:
    """What non-main ranks get: every call is a no-op, so 8 ranks never write the same file."""

    def log(self, *args, **kwargs):
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
        print(f"report written: {report.generate()} (copied to ./{REPORT_FILE})")
