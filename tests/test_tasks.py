"""
Tasks: loading from a local mirror (fixtures written here), from the hub (hub-schema rows through a fake
datasets.load_dataset), the error when neither works, conversion, grading, mixing and slicing.
The real mirror (/work/shared/data via NANOCHAT_DATA_DIR) is used only by test_real_mirror_sizes.
"""

import csv
import gzip
import json
import os

import datasets
import pytest

import tasks.spellingbee as spellingbee
from nanochat.tools import calculator
from nanochat.tokenizer import RustBPETokenizer
from tasks.aime import AIME, extract_answer as aime_answer
from tasks.arc import ARC
from tasks.common import (DatasetUnavailable, Task, TaskMixture, TaskSequence, evaluate_mc, load_hub_dataset,
                          mc_conversation, render_mc)
from tasks.customjson import CustomJSON
from tasks.gsm8k import GSM8K, answer_to_parts, extract_answer as gsm8k_answer
from tasks.humaneval import HumanEval
from tasks.mmlu import MMLU
from tasks.smoltalk import SmolTalk
from tasks.spellingbee import SimpleSpelling, SpellingBee

REAL_DATA_DIR = os.environ.get("NANOCHAT_DATA_DIR")  # read before the autouse fixture hides it


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test sees the real mirror or the network unless it asks: hub and word-list downloads fail."""
    monkeypatch.delenv("NANOCHAT_DATA_DIR", raising=False)
    hub = FakeHub()
    monkeypatch.setattr("datasets.load_dataset", hub)
    monkeypatch.setattr("tasks.common.hub_reachable", lambda: True)  # the fake hub answers (or fails) itself

    def no_download(path, timeout=10):
        raise ConnectionError("offline (test)")

    monkeypatch.setattr(spellingbee, "download_word_list", no_download)
    monkeypatch.setattr(spellingbee, "_WORDS_CACHE", {})
    monkeypatch.setattr(spellingbee, "_DOWNLOAD_FAILED", [])
    return hub


class FakeHub:
    """Stands in for datasets.load_dataset: serves tables[(path, name, split)], else fails like offline."""

    def __init__(self):
        self.tables, self.calls = {}, []

    def __call__(self, path, name=None, split=None, **kwargs):
        self.calls.append((path, name, split))
        if (path, name, split) not in self.tables:
            raise ConnectionError(f"Couldn't reach '{path}' on the Hub (test)")
        return self.tables[(path, name, split)]


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    """An empty fake NANOCHAT_DATA_DIR; tests write the files they need."""
    root = tmp_path / "data"
    root.mkdir()
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(root))
    return root


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture(scope="module")
def tok():
    corpus = ["The quick brown fox jumps over the lazy dog. 0123456789 +-*/=()'\"#$\n"] * 20
    return RustBPETokenizer.train_from_iterator(iter(corpus), 300)


# ---------------------------------------------------------------------------------------------------
# Task, slicing, mixtures


class Numbers(Task):
    def __init__(self, n, tag="n", **kwargs):
        super().__init__(**kwargs)
        self.n, self.tag = n, tag

    def num_examples(self):
        return self.n

    def get_example(self, index):
        return {"messages": [], "id": f"{self.tag}{index}"}


def ids(task):
    return [task[i]["id"] for i in range(len(task))]


def test_slicing():
    assert ids(Numbers(5)) == ["n0", "n1", "n2", "n3", "n4"]
    assert ids(Numbers(10, start=2, stop=8, step=3)) == ["n2", "n5"]
    assert ids(Numbers(10, start=1, step=4)) == ["n1", "n5", "n9"]
    assert len(Numbers(5, stop=100)) == 5 and len(Numbers(5, start=7)) == 0
    task = Numbers(10, start=2, stop=6)
    assert task[-1]["id"] == "n5"
    with pytest.raises(IndexError):
        task[4]
    with pytest.raises(IndexError):
        task[-5]
    with pytest.raises(ValueError):
        Numbers(5, step=0)
    with pytest.raises(ValueError):
        Numbers(5, start=3, stop=2)


def test_reward_defaults_to_evaluate():
    class Always(Numbers):
        def evaluate(self, conversation, response):
            return 1
    assert Always(1).reward({}, "x") == 1.0 and isinstance(Always(1).reward({}, "x"), float)


def test_task_mixture_is_deterministic_and_oversamples():
    a, b = Numbers(30, "a"), Numbers(10, "b")
    order = ids(TaskMixture([a, b]))
    assert order == ids(TaskMixture([a, b]))  # same order every time
    assert order != ids(TaskMixture([a, b], seed=7))
    assert sorted(order) == sorted(ids(a) + ids(b))
    assert order != ids(a) + ids(b)  # actually shuffled
    twice = ids(TaskMixture([a, b, b]))
    assert len(twice) == 50 and all(twice.count(x) == 2 for x in ids(b)) and all(twice.count(x) == 1 for x in ids(a))


def test_task_sequence_keeps_order():
    seq = TaskSequence([Numbers(2, "a"), Numbers(0, "e"), Numbers(3, "b", start=1)])
    assert len(seq) == 4
    assert [seq[i]["id"] for i in range(4)] == ["a0", "a1", "b1", "b2"]
    assert seq[-1]["id"] == "b2"
    with pytest.raises(IndexError):
        seq[4]


def test_render_mc_and_categorical_conversation():
    prompt = render_mc("What is 2+2?", ["A", "B", "C"], ["3", "4", " 5 "])
    assert prompt == "What is 2+2?\n\nA. 3\nB. 4\nC. 5\n\nAnswer with the letter of the correct choice only."
    with pytest.raises(ValueError):
        render_mc("q", ["A"], ["x", "y"])
    conv = mc_conversation("What is 2+2?", ["3", "4", "5"], 1, subject="math")
    assert conv["letters"] == ["A", "B", "C"] and conv["subject"] == "math"
    assert conv["messages"][0]["content"] == prompt and conv["messages"][1] == {"role": "assistant", "content": "B"}
    assert evaluate_mc(conv, "B") == 1 and evaluate_mc(conv, " B\n") == 1 and evaluate_mc(conv, "A") == 0


def test_load_hub_dataset_failure_says_how_to_fix(offline):
    with pytest.raises(DatasetUnavailable) as info:
        load_hub_dataset("openai/gsm8k", "main", "test", local_file="gsm8k/test.jsonl")
    message = str(info.value)
    assert "openai/gsm8k" in message and "ConnectionError" in message
    assert "NANOCHAT_DATA_DIR" in message and "$NANOCHAT_DATA_DIR/gsm8k/test.jsonl" in message and "internet" in message
    assert isinstance(info.value, RuntimeError)


# ---------------------------------------------------------------------------------------------------
# ARC

ARC_LOCAL = [
    {"query": "Question: Which gas do plants take in?\nAnswer:", "choices": ["oxygen", "carbon dioxide", "helium"], "gold": 1},
    {"query": "Question: What melts ice?", "choices": ["heat", "cold", "dark", "wind"], "gold": 0},
]
ARC_HUB = [
    {"id": "x1", "question": "Which is a mammal?", "choices": {"text": ["shark", "whale", "trout", "eel"],
                                                                "label": ["1", "2", "3", "4"]}, "answerKey": "2"},
    {"id": "x2", "question": "Pick D.", "choices": {"text": ["a", "b", "c", "d"], "label": ["A", "B", "C", "D"]},
     "answerKey": "D"},
]


def test_arc_local(data_dir, offline):
    write_jsonl(data_dir / "arc" / "arc_easy_test.jsonl", ARC_LOCAL)
    task = ARC("ARC-Easy")
    assert len(task) == 2 and task.eval_type == "categorical" and offline.calls == []
    conv = task[0]
    assert conv["messages"][0]["content"].startswith("Which gas do plants take in?\n\nA. oxygen\nB. carbon dioxide\nC. helium")
    assert "Question:" not in conv["messages"][0]["content"] and "Answer:" not in conv["messages"][0]["content"]
    assert conv["letters"] == ["A", "B", "C"] and conv["messages"][1]["content"] == "B"
    assert task.evaluate(conv, "B") == 1 and task.evaluate(conv, "A") == 0
    assert task[1]["messages"][1]["content"] == "A"


def test_arc_hub_schema(data_dir, offline):
    # the mirror lacks ARC-Challenge: fall through to the hub with the hub's config and split names
    offline.tables[("allenai/ai2_arc", "ARC-Challenge", "test")] = ARC_HUB
    task = ARC("ARC-Challenge")
    assert offline.calls == [("allenai/ai2_arc", "ARC-Challenge", "test")]
    assert task[0]["messages"][1]["content"] == "B" and "B. whale" in task[0]["messages"][0]["content"]
    assert task[1]["messages"][1]["content"] == "D"


def test_arc_unavailable():
    with pytest.raises(DatasetUnavailable, match="arc/arc_easy_test.jsonl"):
        ARC("ARC-Easy")
    with pytest.raises(ValueError):
        ARC("ARC-Medium")


# ---------------------------------------------------------------------------------------------------
# MMLU


def write_mmlu_csv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["question", "choice0", "choice1", "choice2", "choice3", "answer"])
        writer.writerows(rows)


def test_mmlu_local(data_dir, offline):
    write_mmlu_csv(data_dir / "mmlu" / "test" / "astronomy_test.csv", [["Closest star, to us?", "Sun", "Vega", "Sirius", "Rigel", 0]])
    write_mmlu_csv(data_dir / "mmlu" / "test" / "abstract_algebra_test.csv",
                   [["Order of Z_4?", "1", "2", "3", "4", 3], ["Is Z a field?", "yes", "no", "maybe", "n/a", 1]])
    task = MMLU()
    assert len(task) == 3 and offline.calls == [] and task.eval_type == "categorical"
    assert [task[i]["subject"] for i in range(3)] == ["abstract_algebra", "abstract_algebra", "astronomy"]
    conv = task[2]
    assert "Closest star, to us?" in conv["messages"][0]["content"] and "A. Sun" in conv["messages"][0]["content"]
    assert conv["letters"] == ["A", "B", "C", "D"] and conv["messages"][1]["content"] == "A"
    assert task.evaluate(task[0], "D") == 1 and task.evaluate(task[0], "C") == 0
    assert len(MMLU("astronomy")) == 1


def test_mmlu_hub_schema(offline):
    rows = [{"question": "q1", "subject": "virology", "choices": ["a", "b", "c", "d"], "answer": 2}]
    offline.tables[("cais/mmlu", "all", "test")] = rows
    conv = MMLU()[0]
    assert conv["messages"][1]["content"] == "C" and conv["subject"] == "virology"
    # auxiliary_train: only a "train" split on the hub; older revisions nest each row under "train"
    offline.tables[("cais/mmlu", "auxiliary_train", "train")] = [{"train": {"question": "q2", "subject": "",
                                                                            "choices": ["w", "x", "y", "z"], "answer": 1}}]
    conv = MMLU("auxiliary_train", split="train")[0]
    assert conv["messages"][1]["content"] == "B" and conv["messages"][0]["content"].startswith("q2")


def test_mmlu_unavailable():
    with pytest.raises(DatasetUnavailable, match=r"mmlu/test/<subject>_test.csv"):
        MMLU()


# ---------------------------------------------------------------------------------------------------
# GSM8K

GSM_ROW = {"question": "Janet has 16 eggs, eats 3 and bakes 4. She sells the rest at $2. How much?",
           "answer": "She sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\nShe makes 9 * 2 = $<<9*2=18>>18.\n#### 18"}


def test_gsm8k_answer_parts():
    parts = answer_to_parts(GSM_ROW["answer"])
    assert parts == [
        {"type": "text", "text": "She sells 16 - 3 - 4 = "},
        {"type": "python", "text": "16-3-4"}, {"type": "python_output", "text": "9"},
        {"type": "text", "text": "9 eggs.\nShe makes 9 * 2 = $"},
        {"type": "python", "text": "9*2"}, {"type": "python_output", "text": "18"},
        {"type": "text", "text": "18.\n#### 18"},
    ]
    for call, output in zip(parts[1::3], parts[2::3]):
        assert calculator(call["text"]) == output["text"]  # the engine's tool reproduces the annotations
    assert answer_to_parts("no calls here\n#### 5") == [{"type": "text", "text": "no calls here\n#### 5"}]


@pytest.mark.parametrize("text, expected", [
    ("so 18.\n#### 18", "18"), ("#### 1,000", "1000"), ("####-7", "-7"), ("#### $42", "42"),
    ("#### 2.50 dollars", "2.50"), ("The answer is 18", None), ("", None), ("#### 3\nlater #### 4", "3"),
])
def test_gsm8k_extract_answer(text, expected):
    assert gsm8k_answer(text) == expected


def test_gsm8k_local_and_grading(data_dir, offline):
    write_jsonl(data_dir / "gsm8k" / "test.jsonl", [GSM_ROW, {"question": "q", "answer": "#### 1,234"}])
    task = GSM8K(split="test")
    assert len(task) == 2 and task.eval_type == "generative" and offline.calls == []
    conv = task[0]
    assert conv["messages"][0]["content"] == GSM_ROW["question"] and conv["answer"] == "18"
    assert task.evaluate(conv, "She makes $18.\n#### 18") == 1
    assert task.evaluate(conv, "#### 17") == 0 and task.evaluate(conv, "18") == 0
    assert task.reward(conv, "#### 18") == 1.0 and task.reward(conv, "#### 1") == 0.0
    assert task.evaluate(task[1], "#### 1234") == 1


def test_gsm8k_hub_schema(offline):
    offline.tables[("openai/gsm8k", "main", "train")] = datasets.Dataset.from_list([GSM_ROW])
    task = GSM8K(split="train")
    assert task[0]["messages"][1]["content"][1] == {"type": "python", "text": "16-3-4"}


def test_gsm8k_unavailable():
    with pytest.raises(DatasetUnavailable, match="gsm8k/test.jsonl"):
        GSM8K()


# ---------------------------------------------------------------------------------------------------
# HumanEval

HUMANEVAL_ROW = {
    "task_id": "Test/0",
    "prompt": "import math\n\n\ndef _helper(x):\n    return x\n\n\ndef add(a, b):\n    \"\"\"Add two numbers.\n    >>> add(2, 3)\n    5\n    \"\"\"\n",
    "canonical_solution": "    return _helper(a) + b\n",
    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
    "entry_point": "add",
}


def test_humaneval_local_and_grading(data_dir, offline):
    path = data_dir / "humaneval" / "HumanEval.jsonl.gz"
    path.parent.mkdir()
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(json.dumps(HUMANEVAL_ROW) + "\n")
    task = HumanEval()
    assert len(task) == 1 and task.eval_type == "generative" and offline.calls == []
    conv = task[0]
    assert HUMANEVAL_ROW["prompt"] in conv["messages"][0]["content"] and conv["entry_point"] == "add"
    assert task.evaluate(conv, conv["messages"][1]["content"]) == 1  # the reference passes
    assert task.evaluate(conv, "Sure:\n```python\ndef add(a, b):\n    return a + b\n```\nDone.") == 1
    assert task.evaluate(conv, "    return a + b\n") == 1  # a bare body continues the prompt's stub
    assert task.evaluate(conv, "```python\ndef add(a, b):\n    return a - b\n```") == 0
    assert task.evaluate(conv, "this is not code") == 0


def test_humaneval_hub_schema(offline):
    offline.tables[("openai/openai_humaneval", "openai_humaneval", "test")] = [HUMANEVAL_ROW]
    assert HumanEval()[0]["task_id"] == "Test/0"


def test_humaneval_unavailable():
    with pytest.raises(DatasetUnavailable, match="humaneval/HumanEval.jsonl.gz"):
        HumanEval()


# ---------------------------------------------------------------------------------------------------
# SmolTalk and CustomJSON


def chat(i, turns=1):
    messages = []
    for t in range(turns):
        messages += [{"role": "user", "content": f"question {i}.{t}"}, {"role": "assistant", "content": f"answer {i}.{t}"}]
    return {"messages": messages}


def test_smoltalk_local_holdout_and_skips(data_dir, offline):
    good = [chat(i, turns=1 + i % 3) for i in range(200)]
    bad = [{"messages": [{"role": "assistant", "content": "x"}]}, {"messages": []}, {"no_messages": 1}]
    write_jsonl(data_dir / "chat_sft" / "a.messages.jsonl", good[:120] + bad[:2])
    write_jsonl(data_dir / "chat_sft" / "b.messages.jsonl", good[120:] + bad[2:])
    (data_dir / "chat_sft" / "ignored.json").write_text("[]")
    train, test = SmolTalk("train"), SmolTalk("test")
    assert offline.calls == [] and train.num_skipped == 3
    train_ids = [c["messages"][0]["content"] for c in train]
    test_ids = [c["messages"][0]["content"] for c in test]
    assert len(train) + len(test) == 200 and not set(train_ids) & set(test_ids)
    assert 0 < len(test) < 40  # about 5%
    assert test_ids == [c["messages"][0]["content"] for c in SmolTalk("test")]  # deterministic


def test_smoltalk_hub_schema(offline):
    rows = [dict(chat(0), source="x"), {"messages": [{"role": "user", "content": "only a question"}], "source": "y"},
            {"messages": [{"role": "system", "content": "sys"}] + chat(1)["messages"], "source": "z"}]
    offline.tables[("HuggingFaceTB/smol-smoltalk", None, "test")] = datasets.Dataset.from_list(rows)  # the real type
    task = SmolTalk("test")
    assert len(task) == 2 and task.num_skipped == 1
    assert task[1]["messages"][0] == {"role": "system", "content": "sys"} and task[0] == chat(0)


def test_smoltalk_unavailable():
    with pytest.raises(DatasetUnavailable, match=r"chat_sft/\*.messages.jsonl"):
        SmolTalk()


def test_customjson(tmp_path):
    path = tmp_path / "identity.jsonl"
    lines = [json.dumps(chat(0)), "", json.dumps(chat(1, turns=2)["messages"]),
             json.dumps({"messages": [{"role": "system", "content": "s"}] + chat(2)["messages"]})]
    path.write_text("\n".join(lines) + "\n")
    task = CustomJSON(str(path))
    assert len(task) == 3 and task[1]["messages"][3]["content"] == "answer 1.1" and task[2]["messages"][0]["role"] == "system"


@pytest.mark.parametrize("bad_line, reason", [
    ("{not json", "Expecting"),
    (json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}), "expected 'assistant'"),
    (json.dumps([{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]), "empty content"),
    (json.dumps({"messages": [{"role": "user", "content": "a"}]}), "at least one"),
    (json.dumps({"text": "hello"}), "non-empty list"),
])
def test_customjson_errors_name_file_and_line(tmp_path, bad_line, reason):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(chat(0)) + "\n\n" + bad_line + "\n")
    with pytest.raises(ValueError, match=rf"data.jsonl:3: .*{reason}"):
        CustomJSON(str(path))


# ---------------------------------------------------------------------------------------------------
# Spelling


def test_spellingbee_is_deterministic_and_right():
    task = SpellingBee(size=200, split="train")
    again = SpellingBee(size=200, split="train")
    assert [task[i] for i in range(200)] == [again[i] for i in range(200)]
    assert task.eval_type == "generative" and len(task) == 200
    zero_seen = False
    for conv in task:
        word, letter, parts = conv["word"], conv["letter"], conv["messages"][1]["content"]
        assert conv["answer"] == word.count(letter)
        assert word in conv["messages"][0]["content"]
        call, output = parts[1], parts[2]
        assert call == {"type": "python", "text": f"'{word}'.count('{letter}')"}
        assert calculator(call["text"]) == output["text"] == str(word.count(letter))
        text = "".join(p["text"] for p in parts)
        n = conv["answer"]
        assert task.evaluate(conv, text) == 1 and task.evaluate(conv, text.replace(f"#### {n}", f"#### {n + 1}")) == 0
        zero_seen |= n == 0
    assert zero_seen  # absent letters are part of the curriculum
    conv = next(c for c in task if c["answer"] == 1)
    # only the stated answer counts: not a later number, not the calculator's output, not a bare number
    for reply in ["#### 2\n\n(I checked 1 times)", "<|python_start|>'x'.count('y')<|python_end|><|output_start|>1", "1"]:
        assert task.evaluate(conv, reply) == 0, reply


def test_spelling_splits_use_disjoint_words():
    train, test = SpellingBee(size=300, split="train"), SpellingBee(size=100, split="test")
    assert not {c["word"] for c in train} & {c["word"] for c in test}
    assert train[0] != test[0]
    with pytest.raises(ValueError):
        SpellingBee(split="validation")


def test_simple_spelling():
    task = SimpleSpelling(size=20, split="test")
    conv = task[3]
    word = conv["word"]
    assert conv["messages"][1]["content"] == word + ":" + ",".join(word)
    assert task.evaluate(conv, conv["messages"][1]["content"]) == 1
    assert task.evaluate(conv, f"{word}: {' '.join(word)}") == 1 and task.evaluate(conv, f"{word}:x") == 0
    assert [task[i] for i in range(20)] == [SimpleSpelling(size=20, split="test")[i] for i in range(20)]


def test_word_list_sources(data_dir, isolated_base_dir, monkeypatch):
    # offline, mirror without text: the built-in list
    assert "strawberry" in spellingbee.load_words()
    # offline, mirror with text: words seen twice in it
    monkeypatch.setattr(spellingbee, "_WORDS_CACHE", {})
    words = [f"word{''.join(chr(97 + (i // 26 ** k) % 26) for k in range(3))}" for i in range(150)]
    (data_dir / "tinystories").mkdir()
    (data_dir / "tinystories" / "s.txt").write_text(" ".join(words * 2) + " Once upon onlyonce")
    loaded = spellingbee.load_words()
    assert loaded == sorted(words) and "onlyonce" not in loaded
    # a downloaded (cached) list wins
    monkeypatch.setattr(spellingbee, "_WORDS_CACHE", {})
    cached = isolated_base_dir / "task_data" / spellingbee.WORD_LIST_FILE
    cached.parent.mkdir(parents=True)
    cached.write_text("\n".join(["Apple", "x", "it's"] + [f"zz{w}" for w in words]) + "\n")
    loaded = spellingbee.load_words()
    assert "apple" in loaded and "x" not in loaded and "it's" not in loaded and len(loaded) == 151


# ---------------------------------------------------------------------------------------------------
# AIME


@pytest.mark.parametrize("text, expected", [
    (r"so \boxed{ 042 }", 42),
    (r"first \boxed{12} then \boxed{345}", 345),
    (r"\boxed{1,000}", 1000),
    (r"\boxed{-5}", -5),
    ("the answer is -12", -12),
    ("no number at all", None),
    ("", None),
    ("it is 3.5", None),
    ("maybe 7, or is it 3.5", 7),
    (r"\boxed{\frac{1}{2}}", None),
    (r"we get 12. \boxed{\frac{1}{2}}", 12),
    (r"\boxed{17} and later \boxed{x+1}", 17),
    (r"\boxed{3.5}", None),
    ("there are 1,000 ways, so 999", 999),
    (r"$\boxed{\$33\$}$", None),
    (r"\boxed{33}.", 33),
    # formatting and a choice label around the integer
    (r"\boxed{\textbf{(B) } 204}", 204),
    (r"\boxed{\text{ 204 }}", 204),
    (r"\boxed{\mathrm{204}}", 204),
    (r"\boxed{$204$}", 204),
    (r"\boxed{\text{\textbf{7}}}", 7),
    (r"\boxed{(C) 45}", 45),
    (r"\boxed{\textbf{(B)}}", None),
    (r"\boxed{\text{x}}", None),
])
def test_aime_extract_answer(text, expected):
    assert aime_answer(text) == expected


def aime_rows(year, n):
    return [{"ID": f"{year}-I-{k + 1}", "Problem": f"Problem {k} of {year}", "Solution": "", "Answer": k * 7}
            for k in range(n)]


def test_aime_local_years_and_grading(data_dir, offline):
    write_jsonl(data_dir / "aime" / "aime_2024.jsonl", aime_rows(2024, 3))
    write_jsonl(data_dir / "aime" / "aime_2025.jsonl", aime_rows(2025, 2))
    both = AIME()
    assert len(both) == 5 and offline.calls == [] and both.eval_type == "generative"
    assert [c["year"] for c in both] == [2024] * 3 + [2025] * 2 and both[3]["id"] == "2025-I-1"
    assert len(AIME(2024)) == 3 and len(AIME(year=2025)) == 2
    conv = both[2]
    assert "\\boxed{}" in conv["messages"][0]["content"] and conv["answer"] == 14
    assert both.evaluate(conv, conv["messages"][1]["content"]) == 1
    assert both.evaluate(conv, r"\boxed{014}") == 1 and both.evaluate(conv, r"\boxed{15}") == 0
    assert both.evaluate(both[0], r"\boxed{0}") == 1 and both.evaluate(both[0], r"\boxed{1000}") == 0
    with pytest.raises(ValueError):
        AIME(2023)


def test_aime_out_of_range_is_wrong(data_dir):
    write_jsonl(data_dir / "aime" / "aime_2024.jsonl", aime_rows(2024, 1))
    task = AIME(2024)
    assert task.evaluate({"answer": 5}, r"\boxed{-5}") == 0 and task.evaluate({"answer": 5}, r"\boxed{5}") == 1
    assert task.evaluate({"answer": 1000}, r"\boxed{1,000}") == 0  # parses, but no AIME answer is > 999
    assert task.evaluate({"answer": -3}, "so -3") == 0


def test_aime_hub_schema(offline):
    offline.tables[("Maxwell-Jia/AIME_2024", None, "train")] = [
        {"ID": "2024-II-4", "Problem": "p", "Solution": "s", "Answer": 33}]
    offline.tables[("opencompass/AIME2025", "AIME2025-I", "test")] = [{"question": "q1", "answer": "70"}]
    offline.tables[("opencompass/AIME2025", "AIME2025-II", "test")] = [{"question": "q2", "answer": "8"},
                                                                       {"question": "q3", "answer": "081"}]
    task = AIME()
    assert [(c["year"], c["id"], c["answer"]) for c in task] == [
        (2024, "2024-II-4", 33), (2025, "2025-I-1", 70), (2025, "2025-II-1", 8), (2025, "2025-II-2", 81)]
    assert task[0]["messages"][1]["content"] == "s\n\nThe answer is \\boxed{33}."


def test_aime_unavailable():
    with pytest.raises(DatasetUnavailable, match="aime/aime_2025.jsonl"):
        AIME(2025)


# ---------------------------------------------------------------------------------------------------
# Every task's conversations render with the chat template


def test_conversations_render(tok, data_dir, offline, tmp_path):
    write_jsonl(data_dir / "gsm8k" / "test.jsonl", [GSM_ROW])
    write_jsonl(data_dir / "arc" / "arc_easy_test.jsonl", ARC_LOCAL)
    write_jsonl(data_dir / "aime" / "aime_2024.jsonl", aime_rows(2024, 1))
    custom = tmp_path / "c.jsonl"
    custom.write_text(json.dumps(chat(0)) + "\n")
    for task in (GSM8K(), ARC(), AIME(2024), SpellingBee(size=3), SimpleSpelling(size=3), CustomJSON(str(custom))):
        conv = task[0]
        ids, mask = tok.render_conversation(conv)
        assert len(ids) == len(mask) and sum(mask) > 0
        prompt = tok.render_for_completion(conv)
        assert prompt[-1] == tok.encode_special("<|assistant_start|>")


# ---------------------------------------------------------------------------------------------------
# The real mirror (skipped without it)


@pytest.mark.skipif(not REAL_DATA_DIR or not os.path.isdir(REAL_DATA_DIR), reason="NANOCHAT_DATA_DIR (real mirror) not set")
def test_real_mirror_sizes(monkeypatch, offline):
    monkeypatch.setenv("NANOCHAT_DATA_DIR", REAL_DATA_DIR)
    assert len(AIME(2024)) == 30 and len(AIME(2025)) == 30 and len(AIME()) == 60
    assert len(GSM8K(split="test")) == 1319 and len(GSM8K(split="train")) == 7473
    assert len(MMLU(split="test")) == 14042 and len(MMLU(split="dev")) == 285
    assert len(ARC("ARC-Easy")) == 2376 and len(ARC("ARC-Challenge")) == 1172
    assert len(HumanEval()) == 164
    train, test = SmolTalk("train"), SmolTalk("test")
    assert len(train) + len(test) + train.num_skipped == 9986 and 0 < len(test) < len(train)
    assert offline.calls == []  # everything came from the mirror
    assert all(c["answer"] == aime_answer(c["messages"][1]["content"]) for c in AIME())
    for task in (ARC("ARC-Challenge"), MMLU()):
        conv = task[len(task) - 1]
        assert conv["messages"][1]["content"] in conv["letters"]
    gsm = GSM8K(split="test")
    conv = gsm[0]
    assert gsm.evaluate(conv, "".join(p["text"] for p in conv["messages"][1]["content"])) == 1


def test_unreachable_hub_fails_fast(monkeypatch):
    from tasks.common import DatasetUnavailable, load_hub_dataset
    monkeypatch.setattr("tasks.common.hub_reachable", lambda: False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(DatasetUnavailable, match="unreachable.*HF_HUB_OFFLINE"):
        load_hub_dataset("openai/gsm8k", "main", "test", local_file="gsm8k/test.jsonl")
