"""
SmolTalk: general chat conversations for SFT (generative, no grader).
Hub: HuggingFaceTB/smol-smoltalk, splits train (~460k) / test (~24k), rows {messages: [{role, content}], source}.
Offline fallback: every $NANOCHAT_DATA_DIR/chat_sft/*.messages.jsonl ({"messages": [...]}); a fixed ~5% of
them (chosen by a hash of the conversation's content, so it does not depend on file order or on which
files are present) is held out as "test". Conversations that break the role rules are skipped and counted.
"""

import glob
import json
import os
import zlib

from nanochat.common import get_data_dir, logger
from nanochat.common import read_jsonl
from nanochat.tokenizer import validate_messages
from tasks.common import Task, load_hub_dataset

TEST_PERCENT = 5


def is_test(messages):
    """Deterministic hold-out: the crc32 of the conversation picks ~TEST_PERCENT% of them."""
    key = json.dumps(messages, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return zlib.crc32(key) % 100 < TEST_PERCENT


def local_files():
    data_dir = get_data_dir()
    return sorted(glob.glob(os.path.join(data_dir, "chat_sft", "*.messages.jsonl"))) if data_dir else []


def iter_messages(rows):
    """Each row's "messages" (None when missing), from a list of dicts or a hub Dataset."""
    if hasattr(rows, "iter"):  # a hub Dataset: converting batches from Arrow is much faster than single rows
        for batch in rows.iter(batch_size=1024):
            yield from batch["messages"]
    else:
        for row in rows:
            yield row.get("messages") if isinstance(row, dict) else None


def valid_indices(rows):
    """(indices of the rows whose "messages" pass validation, number skipped). One pass; keeps no copies."""
    kept, skipped = [], 0
    for i, messages in enumerate(iter_messages(rows)):
        try:
            validate_messages(messages)
        except ValueError:
            skipped += 1
            continue
        kept.append(i)
    return kept, skipped


class SmolTalk(Task):
    eval_type = "generative"

    def __init__(self, split="train", **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"SmolTalk split must be train|test, got {split!r}")
        self.split = split
        paths = local_files()
        if paths:
            rows = [row for path in paths for row in read_jsonl(path)]
            source = f"{len(paths)} local chat_sft/*.messages.jsonl files"
        else:
            # a hub Dataset stays memory-mapped on disk: we keep row indices, not ~460k conversations in RAM
            rows = load_hub_dataset("HuggingFaceTB/smol-smoltalk", None, split, local_file="chat_sft/*.messages.jsonl")
            rows = rows.select_columns(["messages"]) if hasattr(rows, "select_columns") else rows
            source = "HuggingFaceTB/smol-smoltalk"
        self.rows = rows
        self.indices, self.num_skipped = valid_indices(rows)
        if paths:  # the hub has a real test split; locally we hold out a slice
            self.indices = [i for i in self.indices if is_test(rows[i]["messages"]) == (split == "test")]
        if self.num_skipped:
            logger.warning(f"SmolTalk: skipped {self.num_skipped} malformed conversations from {source}")

    def num_examples(self):
        return len(self.indices)

    def get_example(self, index):
        return {"messages": self.rows[self.indices[index]]["messages"]}

    def evaluate(self, conversation, assistant_response):
        raise NotImplementedError("SmolTalk is training data; it has no grader")
