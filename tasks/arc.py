"""
ARC (AI2 Reasoning Challenge): grade-school science multiple choice, Easy and Challenge sets.
Hub: allenai/ai2_arc, configs "ARC-Easy" / "ARC-Challenge", splits train/validation/test, rows
{id, question, choices: {text: [...], label: ["A".."D"] or ["1".."4"]}, answerKey}.
Local mirror: $NANOCHAT_DATA_DIR/arc/arc_{easy,challenge}_test.jsonl, rows in the CORE format
{query: "Question: ...", choices: [...], gold: index}. Categorical.
"""

from nanochat.common import read_jsonl
from tasks.common import Task, evaluate_mc, load_hub_dataset, local_data_file, mc_conversation

SUBSETS = {"ARC-Easy": "arc_easy", "ARC-Challenge": "arc_challenge"}
SPLITS = ("train", "validation", "test")


def normalize_local_row(row):
    """CORE row -> {question, choices, answer}: strip the "Question: ... Answer:" framing of the stem."""
    question = row["query"].strip()
    if question.startswith("Question:"):
        question = question[len("Question:"):]
    question = question.strip()
    if question.endswith("Answer:"):
        question = question[:-len("Answer:")]
    return {"question": question.strip(), "choices": list(row["choices"]), "answer": int(row["gold"])}


def normalize_hub_row(row):
    """allenai/ai2_arc row -> {question, choices, answer}. Labels become A, B, C... by position."""
    labels = list(row["choices"]["label"])
    return {"question": row["question"].strip(), "choices": list(row["choices"]["text"]),
            "answer": labels.index(row["answerKey"]), "id": row.get("id")}


def row_to_conversation(row, subset):
    return mc_conversation(row["question"], row["choices"], row["answer"], subset=subset)


class ARC(Task):
    eval_type = "categorical"

    def __init__(self, subset="ARC-Easy", split="test", **kwargs):
        super().__init__(**kwargs)
        if subset not in SUBSETS or split not in SPLITS:
            raise ValueError(f"ARC subset must be one of {list(SUBSETS)} and split one of {SPLITS}, "
                             f"got {subset!r}, {split!r}")
        self.subset, self.split = subset, split
        local_name = f"arc/{SUBSETS[subset]}_{split}.jsonl"
        path = local_data_file(local_name)
        if path:
            self.rows = [normalize_local_row(r) for r in read_jsonl(path)]
        else:
            rows = load_hub_dataset("allenai/ai2_arc", subset, split, local_file=local_name)
            self.rows = [normalize_hub_row(r) for r in rows]

    def to_conversation(self, row):
        return row_to_conversation(row, self.subset)

    def evaluate(self, conversation, assistant_response):
        return evaluate_mc(conversation, assistant_response)
