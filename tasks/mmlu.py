"""
MMLU: 57-subject multiple choice (4 options, letters ABCD).
Hub: cais/mmlu, config "all" (splits test 14042, validation, dev 285, auxiliary_train) or a single subject
(e.g. "abstract_algebra"), or "auxiliary_train" (split "train"); rows {question, subject, choices: [4],
answer: 0-3}. In older revisions the auxiliary_train rows are nested one level, as {"train": {...}}.
Local mirror: $NANOCHAT_DATA_DIR/mmlu/{dev,test}/<subject>_{dev,test}.csv with header
question,choice0,choice1,choice2,choice3,answer (answer = 0-based index). Categorical.
"""

import csv
import glob
import os

from nanochat.common import get_data_dir
from tasks.common import Task, evaluate_mc, load_hub_dataset, mc_conversation

SPLITS = ("test", "validation", "dev", "train", "auxiliary_train")


def normalize_hub_row(row):
    if "question" not in row and isinstance(row.get("train"), dict):
        row = row["train"]
    return {"question": row["question"], "choices": list(row["choices"]), "answer": int(row["answer"]),
            "subject": row.get("subject") or ""}


def read_local_csv(path, subject):
    """One subject's CSV -> rows {question, choices, answer, subject}."""
    with open(path, encoding="utf-8", newline="") as f:
        return [{"question": r["question"], "choices": [r[f"choice{k}"] for k in range(4)],
                 "answer": int(r["answer"]), "subject": subject} for r in csv.DictReader(f)]


def local_files(subset, split):
    """The local CSVs for this subset/split (sorted by subject), or [] when the mirror lacks them."""
    data_dir = get_data_dir()
    if data_dir is None or subset == "auxiliary_train":
        return []
    pattern = "*" if subset == "all" else subset
    return sorted(glob.glob(os.path.join(data_dir, "mmlu", split, f"{pattern}_{split}.csv")))


def row_to_conversation(row):
    subject = row["subject"].replace("_", " ")
    question = (f"(Subject: {subject}) " if subject else "") + row["question"].strip()
    return mc_conversation(question, row["choices"], row["answer"], subject=row["subject"])


class MMLU(Task):
    eval_type = "categorical"

    def __init__(self, subset="all", split="test", **kwargs):
        super().__init__(**kwargs)
        if split not in SPLITS:
            raise ValueError(f"MMLU split must be one of {SPLITS}, got {split!r}")
        if subset == "auxiliary_train":
            split = "train"  # the hub only has this one split for it
        self.subset, self.split = subset, split
        paths = local_files(subset, split)
        if paths:
            suffix = f"_{split}.csv"
            self.rows = [row for p in paths for row in read_local_csv(p, os.path.basename(p)[:-len(suffix)])]
        else:
            local = f"mmlu/{split}/{'<subject>' if subset == 'all' else subset}_{split}.csv"
            self.rows = [normalize_hub_row(r) for r in load_hub_dataset("cais/mmlu", subset, split, local_file=local)]

    def to_conversation(self, row):
        return row_to_conversation(row)

    def evaluate(self, conversation, assistant_response):
        return evaluate_mc(conversation, assistant_response)
