"""
HumanEval: 164 hand-written Python functions to complete, graded by running their unit tests (generative).
Hub: openai/openai_humaneval, config "openai_humaneval", split "test", rows
{task_id, prompt, canonical_solution, test, entry_point}. Local mirror: $NANOCHAT_DATA_DIR/humaneval/HumanEval.jsonl.gz
(the original release, same fields). The assistant's reference answer is the complete function
(prompt + canonical solution) in a ```python block, the shape we want a chat model to answer in.
"""

import gzip
import json
import re

from nanochat.execution import execute_code
from tasks.common import Task, load_hub_dataset, local_data_file

LOCAL_FILE = "humaneval/HumanEval.jsonl.gz"
CODE_BLOCK = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL)


def read_local(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def row_to_conversation(row):
    prompt = row["prompt"]
    user = ("Complete the following Python function. Reply with the whole function in a ```python code block."
            f"\n\n```python\n{prompt}```")
    solution = f"```python\n{prompt}{row['canonical_solution']}```"
    return {
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": solution}],
        "task_id": row["task_id"], "prompt": prompt, "entry_point": row["entry_point"], "test": row["test"],
    }


def extract_code(text):
    """The first ```python block of a reply (an unclosed block runs to the end), else the whole text."""
    match = CODE_BLOCK.search(text)
    return match.group(1) if match else text


def build_program(conversation, completion):
    """
    prompt + completion + tests + check(entry_point). The prompt comes first whole (its imports, helper
    functions, and the stub of the function, which is valid Python since a docstring is a body), so both a
    full `def` (which redefines the stub) and a bare indented body (which continues it) work.
    """
    prompt, code = conversation["prompt"], extract_code(completion)
    if not prompt.endswith("\n"):
        prompt += "\n"
    return f"{prompt}{code}\n\n{conversation['test']}\n\ncheck({conversation['entry_point']})\n"


class HumanEval(Task):
    eval_type = "generative"

    def __init__(self, timeout=10.0, **kwargs):
        super().__init__(**kwargs)
        self.timeout = timeout  # seconds per program; the tests themselves take well under a second
        path = local_data_file(LOCAL_FILE)
        if path:
            self.rows = read_local(path)
        else:
            hub_rows = load_hub_dataset("openai/openai_humaneval", "openai_humaneval", "test", local_file=LOCAL_FILE)
            self.rows = list(hub_rows)

    def to_conversation(self, row):
        return row_to_conversation(row)

    def evaluate(self, conversation, assistant_response):
        result = execute_code(build_program(conversation, assistant_response), timeout=self.timeout)
        return int(result.success)
