"""
CustomJSON: conversations from your own JSONL file (identity chats, safety data, ...), for SFT/midtraining.
Each line is {"messages": [{"role", "content"}, ...]} or just the list of messages. Roles: an optional
leading "system", then "user"/"assistant" alternating, starting with "user" and ending with "assistant";
contents are non-empty strings (the assistant's may be a list of parts, see tasks/common.py).
A bad line stops loading with an error that names file:line. Blank lines are skipped.
"""

import json

from nanochat.tokenizer import validate_messages
from tasks.common import Task


def read_conversations(filepath):
    conversations = []
    with open(filepath, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
                messages = data["messages"] if isinstance(data, dict) and "messages" in data else data
                validate_messages(messages)
            except (json.JSONDecodeError, ValueError) as e:
                raise ValueError(f"{filepath}:{line_number}: {e}") from None
            conversations.append({"messages": messages})
    return conversations


class CustomJSON(Task):
    eval_type = "generative"

    def __init__(self, filepath, **kwargs):
        super().__init__(**kwargs)
        self.filepath = filepath
        self.rows = read_conversations(filepath)

    def to_conversation(self, row):
        return row

    def evaluate(self, conversation, assistant_response):
        raise NotImplementedError("CustomJSON is training data; it has no grader")
