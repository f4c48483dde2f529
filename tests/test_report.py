"""Report cards: sections are logged by the main process and stitched in pipeline order."""

import os

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
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    report = get_report()
    assert isinstance(report, DummyReport)
    report.log("Chat SFT", [{"x": 1}])
    assert not os.path.exists(tmp_path / "report")


def test_helpers():
    assert slugify("Base model evaluation") == "base-model-evaluation"
    assert slugify("Chat RL") == "chat-rl"
    assert format_value(0.5) == "0.5"
    assert format_value(2.0 / 3.0) == "0.666667"
    assert format_value(1.5e-5) == "1.5000e-05"
    assert format_value(True) == "True"
    assert format_value("abc") == "abc"
