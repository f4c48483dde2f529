"""Report cards: sections are logged by the main process and stitched in pipeline order."""

import json
import os
import re
import time

import pytest

from nanochat import report as report_module
from nanochat.report import DummyReport, format_value, get_report, slugify


def test_log_and_generate(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.chdir(tmp_path)
    report = get_report()
    report.reset()
    # logged out of order on purpose: generate() puts them in pipeline order
    report.log("Chat SFT", [{"val_loss": 1.234567891}])
    report.log("Custom stage", ["free text line"])
    report.log("Tokenizer training", [{"vocab_size": 65536, "train_time_s": 12.3456789}, "a note"])

    section = (tmp_path / "base" / "report" / "tokenizer-training.md").read_text()
    assert section.startswith("## Tokenizer training\n")
    assert "timestamp:" in section
    assert "- vocab_size: 65,536" in section
    assert "- train_time_s: 12.3457" in section
    assert "a note" in section

    path = report.generate()
    text = open(path).read()
    assert text.startswith("# nanochat training report")
    assert "torch:" in text and "python:" in text
    positions = [text.index(f"## {name}") for name in ("Tokenizer training", "Chat SFT", "Custom stage")]
    assert positions == sorted(positions)
    assert "- val_loss: 1.23457" in text
    assert (tmp_path / "report.md").read_text() == text  # copied to the current directory

    # reset clears the old sections
    report.reset()
    assert not os.path.exists(tmp_path / "base" / "report" / "chat-sft.md")


def test_non_main_rank_is_noop(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.chdir(tmp_path)
    report = get_report()
    assert isinstance(report, DummyReport)
    report.reset()
    report.log("Chat SFT", [{"x": 1}])
    report.log_metrics("Chat evaluation sft", {"GSM8K": 0.5})
    report.log_curve("loss", [1, 2], [3.0, 2.0])
    report.generate()
    assert os.listdir(tmp_path) == []  # no report dir, no ./report.md, no plots


def test_helpers():
    assert slugify("Base model evaluation") == "base-model-evaluation"
    assert slugify("Chat RL") == "chat-rl"
    assert format_value(0.5) == "0.5"
    assert format_value(2.0 / 3.0) == "0.666667"
    assert format_value(1.5e-5) == "1.5000e-05"
    assert format_value(True) == "True"
    assert format_value("abc") == "abc"



@pytest.fixture
def report(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.delenv("NANOCHAT_GPU_HOURLY_COST", raising=False)
    monkeypatch.chdir(tmp_path)
    r = get_report()
    r.reset()
    return r


def set_run(report, **fields):
    """Rewrites the facts reset() recorded (start time, GPUs seen) as if the run were elsewhere/earlier."""
    path = os.path.join(report.report_dir, report_module.RUN_FILE)
    with open(path) as f:
        run = json.load(f)
    run.update(fields)
    with open(path, "w") as f:
        json.dump(run, f)


def test_header_describes_the_run(report):
    header = open(os.path.join(report.report_dir, report_module.HEADER_FILE)).read()
    for expected in ("# nanochat training report", "- run started: ", "- git: ", "- platform: ", "- CPU: ",
                     "logical cores", "- RAM: ", "- GPU: ", "- python: ", "- torch: ", "tiktoken", "rustbpe",
                     "datasets", "- bloat: "):
        assert expected in header, expected
    assert re.search(r"- git: (commit \w+, branch .+, dirty: (yes|no|unknown)|unknown)", header)
    bloat = re.search(r"- bloat: (\d+) files, ([\d,]+) lines, ([\d,]+) characters of code in nanochat/ scripts/ tasks/",
                      header)
    assert bloat and int(bloat.group(1)) > 5
    run = json.load(open(os.path.join(report.report_dir, report_module.RUN_FILE)))
    assert abs(run["start_time"] - time.time()) < 60 and isinstance(run["gpus"], list)


def test_code_stats(tmp_path):
    (tmp_path / "nanochat" / "__pycache__").mkdir(parents=True)
    (tmp_path / "nanochat" / "a.py").write_text("x = 1\ny = 2\n")
    (tmp_path / "nanochat" / "ui.html").write_text("<p>hi</p>\n")
    (tmp_path / "nanochat" / "notes.txt").write_text("not code\n")
    (tmp_path / "nanochat" / "__pycache__" / "a.py").write_text("cached\n")
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "b.py").write_text("print(1)\n")
    assert report_module.code_stats(str(tmp_path)) == (3, 4, 12 + 10 + 9)  # tasks/ absent: fine


def summary_rows(text):
    """{metric: [BASE, MID, SFT, RL]} from the summary table of report.md."""
    table = text[text.index("## Summary"):]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 5 and cells[0] != "Metric":
            rows[cells[0]] = cells[1:]
    return rows


def test_summary_table(report):
    report.log("Base model evaluation", [{"CORE": 0.221912345, "bpb": 0.81}])
    report.log("Chat evaluation mid", [{"ARC-Easy": 0.35, "MMLU": 0.3, "GSM8K": 0.02}])
    report.log_metrics("Chat evaluation sft", {"ARC-Easy": 0.4})
    report.log_metrics("Chat evaluation sft", {"GSM8K": 0.05, "ChatCORE": 0.1})  # keeps ARC-Easy
    report.log("Chat evaluation rl", [{"GSM8K": 0.09, "AIME-2024": 0.0333}])
    text = open(report.generate()).read()
    assert text.index("## Chat evaluation rl") < text.index("## Summary")  # the summary closes the report
    assert text.rstrip().splitlines()[-1].startswith("- estimated cost: ")
    rows = summary_rows(text)
    assert list(rows) == ["CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "AIME", "AIME-2024",
                          "SpellingBee", "ChatCORE"]  # AIME-2025: logged by no stage, so no row
    assert rows["CORE"] == ["0.2219", "-", "-", "-"]
    assert rows["ARC-Easy"] == ["-", "0.3500", "0.4000", "-"]
    assert rows["GSM8K"] == ["-", "0.0200", "0.0500", "0.0900"]
    assert rows["MMLU"] == ["-", "0.3000", "-", "-"]
    assert rows["AIME-2024"] == ["-", "-", "-", "0.0333"]
    assert rows["HumanEval"] == ["-"] * 4 and rows["ChatCORE"] == ["-", "-", "0.1000", "-"]
    # evaluation sections come right after their stage
    report.log("Chat SFT", [{"val_loss": 1.0}])
    report.log("Midtraining", [{"val_loss": 2.0}])
    text = open(report.generate()).read()
    order = [text.index(f"## {s}") for s in ("Base model evaluation", "Midtraining", "Chat evaluation mid", "Chat SFT",
                                             "Chat evaluation sft", "Chat evaluation rl", "Summary")]
    assert order == sorted(order)


def test_empty_summary_and_wall_clock_without_reset(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.chdir(tmp_path)
    text = open(get_report().generate()).read()  # no reset: header describes the machine now
    assert text.startswith("# nanochat training report")
    assert all(values == ["-"] * 4 for values in summary_rows(text).values())
    assert "- total wall clock time: unknown" in text


def test_wall_clock_and_cost(report, monkeypatch):
    set_run(report, start_time=time.time() - 2 * 3600 - 65, gpus=["NVIDIA H100 80GB HBM3"] * 8)
    text = open(report.generate()).read()
    assert "- total wall clock time: 2h01m05s" in text
    assert "- estimated cost: $48.4" in text and "$24.00/h, default for an 8xH100 node" in text
    monkeypatch.setenv("NANOCHAT_GPU_HOURLY_COST", "10")
    text = open(report.generate()).read()
    assert "- estimated cost: $20.18 (2.02 h at $10.00/h, from NANOCHAT_GPU_HOURLY_COST)" in text
    monkeypatch.setenv("NANOCHAT_GPU_HOURLY_COST", "ten dollars")
    assert "- estimated cost: unknown (NANOCHAT_GPU_HOURLY_COST='ten dollars' is not" in open(report.generate()).read()
    monkeypatch.delenv("NANOCHAT_GPU_HOURLY_COST")
    set_run(report, gpus=["NVIDIA H100 80GB HBM3"] * 4)
    assert "- estimated cost: unknown (set NANOCHAT_GPU_HOURLY_COST" in open(report.generate()).read()


def test_hourly_cost(monkeypatch):
    monkeypatch.delenv("NANOCHAT_GPU_HOURLY_COST", raising=False)
    assert report_module.hourly_cost(["NVIDIA H100 80GB HBM3"] * 8)[0] == 24.0
    assert report_module.hourly_cost(["NVIDIA A100-SXM4-80GB"] * 8)[0] is None
    assert report_module.hourly_cost([])[0] is None
    monkeypatch.setenv("NANOCHAT_GPU_HOURLY_COST", "$2.5")
    assert report_module.hourly_cost([])[0] == 2.5
    monkeypatch.setenv("NANOCHAT_GPU_HOURLY_COST", "-1")
    assert report_module.hourly_cost(["NVIDIA H100 80GB HBM3"] * 8)[0] is None


def test_curves_are_plotted_and_linked(report, tmp_path):
    report.log("Base model training", [{"min val bpb": 0.9}])
    report.log_curve("Base model training loss", range(1, 101), [5.0 - i / 50 for i in range(100)], ylabel="train loss")
    report.log_curve("Base model val bpb", [0, 50, 100, 150], [1.2, float("nan"), 0.9, None], ylabel="val bpb")
    report.log_curve("Base model training loss", range(1, 201), [4.0] * 200, ylabel="train loss")  # replaces
    text = open(report.generate()).read()
    for png in ("report_base-model-training-loss.png", "report_base-model-val-bpb.png"):
        for folder in (report.report_dir, tmp_path):  # beside report/report.md and beside ./report.md
            with open(os.path.join(folder, png), "rb") as f:
                assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert text.index("## Training curves") < text.index("## Summary")
    assert "![Base model training loss](report_base-model-training-loss.png)" in text
    assert "![Base model val bpb](report_base-model-val-bpb.png)" in text
    assert "Base model training loss: 200 points, last 4, min 4" in text
    assert "Base model val bpb: 4 points, last 0.9, min 0.9" in text
    assert (tmp_path / "report.md").read_text() == text
    with pytest.raises(ValueError, match="2 steps but 3 values"):
        report.log_curve("bad", [1, 2], [1.0, 2.0, 3.0])
    report.reset()  # a new run starts without the old curves
    assert "## Training curves" not in open(report.generate()).read()


def test_header_flags_the_fallback_corpus(tmp_path, monkeypatch):
    from nanochat.dataset import FALLBACK_MARKER
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    (tmp_path / "base_data").mkdir()
    (tmp_path / "base_data" / FALLBACK_MARKER).write_text("fallback")
    header = open(get_report().reset()).read()
    assert "- pretraining data: FALLBACK corpus of installed package documentation, not web text" in header


def test_fallback_corpus_built_after_reset_is_flagged_in_the_report(report):
    from nanochat.dataset import FALLBACK_MARKER
    os.makedirs(os.path.join(os.environ["NANOCHAT_BASE_DIR"], "base_data"), exist_ok=True)
    with open(os.path.join(os.environ["NANOCHAT_BASE_DIR"], "base_data", FALLBACK_MARKER), "w") as f:
        f.write("fallback")
    text = open(report.generate()).read()
    assert text.count("FALLBACK corpus of installed package documentation") == 1
