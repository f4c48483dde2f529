"""
scripts.chat_eval: problems that cannot be attempted (prompt longer than the context) or whose answers were
cut are counted as wrong and reported with the reason, in the printed line, the samples log and the report.
"""

import json
import os

import pytest

from nanochat.checkpoint_manager import save_checkpoint
from nanochat.engine import Engine
from nanochat.report import Report, summary_notes
from nanochat.tokenizer import RustBPETokenizer
from scripts import chat_eval
from tasks.common import Task
from tests.conftest import tiny_gpt

CORPUS = ["What is 3 times 4? It is 12. Which letter is right: A, B, C or D? The answer is B. " * 30]


@pytest.fixture(scope="module")
def tok():
    return RustBPETokenizer.train_from_iterator(iter(CORPUS), 300)


def tiny_model(tok, sequence_len=48):
    return tiny_gpt(tok.get_vocab_size(), sequence_len=sequence_len, n_layer=1)


class Questions(Task):
    """Questions of given lengths (in words); the reference answer is 'B'."""

    def __init__(self, lengths, eval_type):
        super().__init__()
        self.lengths, self._eval_type = lengths, eval_type

    @property
    def eval_type(self):
        return self._eval_type

    def num_examples(self):
        return len(self.lengths)

    def get_example(self, index):
        question = " ".join(["what"] * self.lengths[index]) + "?"
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": "B"}],
                "letters": ["A", "B", "C", "D"]}

    def evaluate(self, conversation, answer):
        return int(answer == "B")


def test_generative_prompt_longer_than_the_context_is_counted_not_attempted(tok):
    model = tiny_model(tok)
    task = Questions([2, 200, 3, 300], "generative")
    records = chat_eval.run_generative(Engine(model, tok), task, list(range(4)), batch_size=4, num_samples=1,
                                       max_new_tokens=3, temperature=0.0, top_k=None, seed=0)
    assert sorted(r.index for r in records) == [0, 1, 2, 3]
    by_index = {r.index: r for r in records}
    assert by_index[1].not_attempted == by_index[3].not_attempted == "prompt longer than the 48-token context"
    assert by_index[1].correct == 0 and by_index[1].answer == []
    # a random model never ends its answer within 3 tokens: both attempted answers were cut
    assert by_index[0].cut == by_index[2].cut == "cut at -m 3 tokens"
    line = chat_eval.result_line("Q", chat_eval.gather(records))
    assert line == ("Q: 0.0000 (0/4; 2 not attempted: prompt longer than the 48-token context; "
                    "2 answers cut at -m 3 tokens)")


def test_categorical_prompt_longer_than_the_context_is_counted_not_attempted(tok):
    model = tiny_model(tok)
    task = Questions([2, 200, 300, 400], "categorical")
    records = chat_eval.gather(chat_eval.run_categorical(model, tok, task, list(range(4)), 2, "cpu"))
    assert [r.not_attempted is None for r in records] == [True, False, False, False]
    assert records[0].answer in "ABCD" and records[1].answer is None
    line = chat_eval.result_line("MC", records)
    assert line.startswith(f"MC: {records[0].correct / 4:.4f} ({records[0].correct}/4; 3 not attempted: "
                           f"prompt longer than the 48-token context)")
    hints = chat_eval.hints("MC", records)
    assert len(hints) == 1 and "--max-seq-len" in hints[0]
    assert chat_eval.report_counts("MC", records) == {
        "MC problems": 4, "MC not attempted": "3 (prompt longer than the 48-token context)", "MC answers cut": 0}


def test_hints_only_when_most_problems_are_affected():
    records = [chat_eval.Record(i, {}, [], 0, cut="cut at -m 8 tokens" if i < 3 else None) for i in range(4)]
    assert chat_eval.hints("G", records) == ["hint: most G answers were cut at -m 8 tokens; raise -m (--max-new-tokens)"]
    assert chat_eval.hints("G", records[2:]) == []  # one of two: not most


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def test_main_reports_not_attempted_and_missing_data(tok, isolated_base_dir, tmp_path, monkeypatch, capsys):
    tok.save(str(isolated_base_dir / "tokenizer"))
    model = tiny_model(tok, sequence_len=32)
    save_checkpoint(str(isolated_base_dir / "chatsft_checkpoints" / "d1"), 5, model.state_dict(), None,
                    {"model_config": model.config_dict()})
    mirror = tmp_path / "mirror"
    for year in (2024, 2025):  # every AIME problem is longer than the 32-token context
        write_jsonl(mirror / "aime" / f"aime_{year}.jsonl",
                    [{"ID": f"{year}-{i}", "Problem": "Find the number of ordered pairs of integers " * 4,
                      "Solution": "", "Answer": i} for i in range(3)])
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(mirror))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    samples = tmp_path / "samples.jsonl"
    assert chat_eval.main(["-i", "sft", "-a", "AIME|MMLU", "-x", "6", "--log-samples", str(samples),
                           "--device-type", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "AIME: 0.0000 (0/6; 6 not attempted: prompt longer than the 32-token context) in " in out
    assert "hint: most AIME prompts do not fit the model's context" in out
    assert "MMLU: skipped (no data offline; set NANOCHAT_DATA_DIR: could not load" in out
    logged = [json.loads(line) for line in samples.read_text().splitlines()]
    assert [r["not_attempted"] for r in logged] == ["prompt longer than the 32-token context"] * 6

    section = (isolated_base_dir / "report" / "chat-evaluation-sft.md").read_text()
    assert "- AIME not attempted: 6 (prompt longer than the 32-token context)" in section
    assert "- AIME problems: 6" in section
    report = Report(str(isolated_base_dir / "report"))
    text = open(report.generate(copy_to_cwd=False), encoding="utf-8").read()
    summary = text[text.index("## Summary"):]
    assert "- SFT AIME: 6 of 6 problems not attempted (prompt longer than the 32-token context), counted as wrong" \
        in summary
    assert "- SFT MMLU: skipped, no data offline; set NANOCHAT_DATA_DIR" in summary
    assert "- BASE, MID, RL: stage not evaluated" in summary


def test_summary_notes_group_skipped_tasks_and_clear_stale_skips(tmp_path):
    values = {"Chat evaluation sft": {"ARC-Easy": "0.25", "skipped MMLU": "no data offline; set X: long story",
                                      "skipped GSM8K": "no data offline; set X: another story"}}
    notes = summary_notes(values)
    assert "- SFT MMLU, GSM8K: skipped, no data offline; set X" in notes
    assert any(n.startswith("- SFT ARC-Challenge, HumanEval, AIME, SpellingBee: not evaluated") for n in notes)
    report = Report(str(tmp_path))
    report.log_metrics("Chat evaluation sft", {"skipped MMLU": "no data"})
    report.log_metrics("Chat evaluation sft", {"MMLU": 0.3, "skipped MMLU": None})
    assert "skipped MMLU" not in (tmp_path / "chat-evaluation-sft.md").read_text()


def test_chatcore_needs_all_six_tasks_and_drops_a_stale_value(tmp_path):
    six = {name: 0.5 for name in chat_eval.BASELINES}
    # ARC/MMLU: (0.5 - 0.25) / 0.75 = 1/3 each; the other three: 0.5 each
    assert chat_eval.chatcore(six) == {"ChatCORE": pytest.approx((3 * (1 / 3) + 3 * 0.5) / 6)}
    assert chat_eval.chatcore({"GSM8K": 0.2}) == {"ChatCORE": None}  # its old value no longer matches GSM8K's
    assert chat_eval.chatcore({"AIME": 0.1}) == {}  # not one of its tasks: an old value stays
    report = Report(str(tmp_path))
    report.log_metrics("Chat evaluation sft", {**six, **chat_eval.chatcore(six)})
    report.log_metrics("Chat evaluation sft", {"GSM8K": 0.2, **chat_eval.chatcore({"GSM8K": 0.2})})
    text = (tmp_path / "chat-evaluation-sft.md").read_text()
    assert "- GSM8K: 0.2" in text and "ChatCORE" not in text
