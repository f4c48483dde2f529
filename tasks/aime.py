"""
AIME 2024 / 2025: 30 competition problems per year, each answer an integer 0-999 (generative).
Local mirror: $NANOCHAT_DATA_DIR/aime/aime_{2024,2025}.jsonl, rows {ID: "2024-I-1", Problem, Solution, Answer: int}.
Hub, for users without the mirror (normalized to the same ID/Problem/Solution/Answer rows):
  - 2024: Maxwell-Jia/AIME_2024, split "train", columns ID ("2024-I-1"), Problem, Solution, Answer (int).
  - 2025: opencompass/AIME2025, configs "AIME2025-I" and "AIME2025-II", split "test", columns question,
    answer (a string); no ids or solutions, so IDs are made from the config and position ("2025-II-3").
Grading: the last \\boxed{...} holding an integer, else the last integer of the reply; only 0-999 counts;
exact integer match. Conversations carry "year" and "id" for per-year reporting.
"""

import re

from nanochat.common import read_jsonl
from tasks.common import Task, load_hub_dataset, local_data_file

YEARS = (2024, 2025)
INSTRUCTION = "Solve the problem step by step. The answer is an integer from 0 to 999; put it in \\boxed{} at the end."
INTEGER = re.compile(r"^[+-]?\d+$")
# a number in running text: digits, optional thousands groups ("1,000"), optional decimals ("3.5")
NUMBER_IN_TEXT = re.compile(r"(?<![\d.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
# formatting a model wraps around a boxed answer: \textbf{204}, \text{ 204}, \mathrm{204}
FORMATTING = re.compile(r"\\(?:textbf|textrm|text|mathrm|mathbf|boldsymbol|mbox)\{([^{}]*)\}")
CHOICE_LABEL = re.compile(r"^\(?[A-E]\)")  # "(B) 204": a multiple-choice label before the number


def boxed_spans(text):
    """(start, end, content) of every \\boxed{...}, braces matched so \\boxed{\\frac{1}{2}} is one box."""
    spans, search_from = [], 0
    while (start := text.find("\\boxed{", search_from)) != -1:
        depth, i = 0, start + len("\\boxed")
        while i < len(text):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                break
            i += 1
        if depth != 0:  # unclosed box: not an answer
            break
        spans.append((start, i + 1, text[start + len("\\boxed{"):i]))
        search_from = i + 1
    return spans


def parse_integer(content):
    """
    A box's content as an int ("042" -> 42, "1,000" -> 1000, "-5" -> -5, "\\textbf{(B) } 204" -> 204), or None
    (3.5, \\frac{1}{2}, x, \\$33: an escaped dollar is a currency sign, not math mode).
    """
    while (unwrapped := FORMATTING.sub(r"\1", content)) != content:  # innermost first: \text{\textbf{7}}
        content = unwrapped
    cleaned = re.sub(r"\s|\\[,;!: ]", "", content).replace(",", "")
    cleaned = CHOICE_LABEL.sub("", re.sub(r"(?<!\\)\$", "", cleaned))
    return int(cleaned) if INTEGER.match(cleaned) else None


def extract_answer(text):
    """The last \\boxed{} integer; else the last integer in the text outside the boxes (decimals skipped); else None."""
    spans = boxed_spans(text)
    for _, _, content in reversed(spans):
        value = parse_integer(content)
        if value is not None:
            return value
    for start, end, _ in reversed(spans):  # a non-integer box's digits (\frac{1}{2}) are not an answer
        text = text[:start] + " " + text[end:]
    for match in reversed(list(NUMBER_IN_TEXT.finditer(text))):
        if "." not in match.group():
            return int(match.group().replace(",", ""))
    return None


def normalize_hub_2024(row):
    return {"ID": row["ID"], "Problem": row["Problem"], "Solution": row.get("Solution") or "",
            "Answer": int(row["Answer"])}


def normalize_hub_2025(row, part, position):
    return {"ID": f"2025-{part}-{position + 1}", "Problem": row["question"], "Solution": "",
            "Answer": int(row["answer"])}


def load_year(year):
    local_name = f"aime/aime_{year}.jsonl"
    path = local_data_file(local_name)
    if path:
        return read_jsonl(path)
    if year == 2024:
        hub_rows = load_hub_dataset("Maxwell-Jia/AIME_2024", None, "train", local_file=local_name)
        return [normalize_hub_2024(r) for r in hub_rows]
    rows = []
    for part in ("I", "II"):
        hub_rows = load_hub_dataset("opencompass/AIME2025", f"AIME2025-{part}", "test", local_file=local_name)
        rows += [normalize_hub_2025(r, part, k) for k, r in enumerate(hub_rows)]
    return rows


def row_to_conversation(row, year):
    answer = int(row["Answer"])
    solution = (row.get("Solution") or "").strip()
    reference = (solution + "\n\n" if solution else "") + f"The answer is \\boxed{{{answer}}}."
    return {
        "messages": [
            {"role": "user", "content": f"{row['Problem'].strip()}\n\n{INSTRUCTION}"},
            {"role": "assistant", "content": reference},
        ],
        "year": year, "id": row["ID"], "answer": answer,
    }


class AIME(Task):
    eval_type = "generative"

    def __init__(self, year=None, **kwargs):
        super().__init__(**kwargs)
        if year is not None and year not in YEARS:
            raise ValueError(f"AIME year must be one of {YEARS} or None (both), got {year!r}")
        self.years = YEARS if year is None else (year,)
        self.rows = [(y, row) for y in self.years for row in load_year(y)]

    def to_conversation(self, row):
        year, problem = row
        return row_to_conversation(problem, year)

    def evaluate(self, conversation, assistant_response):
        predicted = extract_answer(assistant_response)
        return int(predicted is not None and 0 <= predicted <= 999 and predicted == conversation["answer"])
