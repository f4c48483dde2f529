"""
Rule-based checks on a safety conversation record: the schema SFT needs, and the style we want.

They run before any model scoring in the quality filter (cheap, and no model can talk them away), and
they validate the hand-written data shipped in data/. Each check returns human-readable reasons.
"""

from safety_data_workflow.seeds import DOMAINS, STRATEGIES
from nanochat.tokenizer import validate_messages

# Lecturing / boilerplate that makes refusals preachy; the data must not teach it.
PREACHY_PHRASES = ("as an ai", "as a language model", "i must remind", "it's important to note", "it is important to note",
                   "it's important to remember", "it is important to remember", "i cannot and will not",
                   "i strongly condemn", "i must emphasize", "i must stress")
GENERIC_REFUSALS = {"i can't help with that", "i cannot help with that", "i can't do that", "sorry, i can't help with that",
                    "i'm sorry, but i can't help with that", "i can't assist with that"}
MIN_WORDS, MAX_WORDS = 15, 300


def schema_issues(record):
    if not isinstance(record, dict):
        return ["record is not a JSON object"]
    issues = []
    if not isinstance(record.get("id"), str) or not record["id"]:
        issues.append("missing id")
    if record.get("domain") not in DOMAINS:
        issues.append(f"unknown domain {record.get('domain')!r}")
    if record.get("strategy") not in STRATEGIES:
        issues.append(f"unknown strategy {record.get('strategy')!r}")
    try:
        validate_messages(record.get("messages"))
    except ValueError as e:
        issues.append(f"messages: {e}")
        return issues
    if record["messages"][0]["role"] == "system":
        issues.append("messages: no system message (SFT renders the conversation as is)")
    if not all(isinstance(m["content"], str) for m in record["messages"]):
        issues.append("messages: contents must be plain strings")
    return issues


def style_issues(record):
    """Assistant turns: not preachy, not generic, not too short or long."""
    issues = []
    for i, message in enumerate(record["messages"]):
        if message["role"] != "assistant":
            continue
        text = message["content"]
        lowered = text.lower()
        for phrase in PREACHY_PHRASES:
            if phrase in lowered:
                issues.append(f"message {i}: preachy phrase {phrase!r}")
        words = len(text.split())
        if not MIN_WORDS <= words <= MAX_WORDS:
            issues.append(f"message {i}: {words} words (want {MIN_WORDS}-{MAX_WORDS})")
        first_sentence = lowered.replace("!", ".").split(".")[0].strip()
        if first_sentence in GENERIC_REFUSALS:
            issues.append(f"message {i}: generic refusal without saying what is declined")
    return issues


def quality_issues(record):
    issues = schema_issues(record)
    return issues if issues else style_issues(record)


def is_multiturn(record):
    return sum(m["role"] == "user" for m in record["messages"]) > 1
