"""
GSM8K: grade-school math word problems with worked solutions (generative).
Hub: openai/gsm8k, configs "main" / "socratic", splits train (7473) / test (1319), rows {question, answer}.
Local mirror: $NANOCHAT_DATA_DIR/gsm8k/{train,test}.jsonl, same rows (only "main").
The answer text marks each calculation as <<expr=result>> and ends with "#### <number>". The assistant
message becomes a list of parts so the model learns to call the calculator tool:
    "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs."  ->
    [text "Janet sells 16 - 3 - 4 = ", python "16-3-4", python_output "9", text "9 duck eggs."]
The visible result after the annotation stays in the text, so the prose reads as in the original.
"""

import re

from nanochat.common import read_jsonl
from tasks.common import Task, load_hub_dataset, local_data_file

ANNOTATION = re.compile(r"<<([^<>]*)>>")
FINAL_ANSWER = re.compile(r"####\s*\$?\s*(-?[0-9][0-9,]*(?:\.[0-9]+)?)")


def extract_answer(text):
    """The number after the first "####" with commas removed ("1,000" -> "1000"), or None."""
    match = FINAL_ANSWER.search(text)
    return match.group(1).replace(",", "") if match else None


def answer_to_parts(answer):
    """GSM8K answer text -> assistant parts (text / python / python_output), see the module docstring."""
    parts = []

    def add_text(text):
        if text:
            parts.append({"type": "text", "text": text})

    position = 0
    for match in ANNOTATION.finditer(answer):
        add_text(answer[position:match.start()])
        inner = match.group(1)
        if "=" in inner:
            expr, result = inner.rsplit("=", 1)
            parts.append({"type": "python", "text": expr.strip()})
            parts.append({"type": "python_output", "text": result.strip()})
        else:  # not a calculation: keep its text, drop the markers
            add_text(inner)
        position = match.end()
    add_text(answer[position:])
    return parts


def row_to_conversation(row):
    return {
        "messages": [
            {"role": "user", "content": row["question"]},
            {"role": "assistant", "content": answer_to_parts(row["answer"])},
        ],
        "answer": extract_answer(row["answer"]),
    }


def response_text(response):
    """Model output as a plain string (a list of parts is joined)."""
    if isinstance(response, list):
        return "".join(part.get("text", "") for part in response)
    return response


class GSM8K(Task):
    eval_type = "generative"

    def __init__(self, subset="main", split="test", **kwargs):
        super().__init__(**kwargs)
        if subset not in ("main", "socratic") or split not in ("train", "test"):
            raise ValueError(f"GSM8K subset must be main|socratic and split train|test, got {subset!r}, {split!r}")
        self.subset, self.split = subset, split
        local_name = f"gsm8k/{split}.jsonl"
        path = local_data_file(local_name) if subset == "main" else None  # the mirror holds "main" only
        if path:
            self.rows = read_jsonl(path)
        else:
            self.rows = list(load_hub_dataset("openai/gsm8k", subset, split, local_file=local_name))

    def to_conversation(self, row):
        return row_to_conversation(row)

    def evaluate(self, conversation, assistant_response):
        """Exact match of the "####" numbers (commas ignored); no "####" in the response is wrong."""
        predicted = extract_answer(response_text(assistant_response))
        return int(predicted is not None and predicted == conversation["answer"])
