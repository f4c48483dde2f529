"""
What every task shares: the Task base class (a sliceable list of conversations plus a grader), mixing and
sequencing tasks for training, the multiple-choice prompt, and dataset loading (local mirror first, then
the Hugging Face hub, else a DatasetUnavailable that says how to fix it).

A conversation is {"messages": [{"role": "user"|"assistant"|"system", "content": ...}, ...], ...extra}.
Extra keys (answer letters, ids, tests) ride along for the grader; render_conversation ignores them.
"""

import functools
import os
import random
import socket
from bisect import bisect_right

from nanochat.common import get_data_dir


class DatasetUnavailable(RuntimeError):
    """A dataset could be found neither in NANOCHAT_DATA_DIR nor on the Hugging Face hub."""


# ---------------------------------------------------------------------------------------------------
# Task and combinations of tasks


class Task:
    """
    A list of conversations over a dataset, viewed through a slice start:stop:step of its examples
    (e.g. Task(stop=100) for a quick eval, Task(start=1, step=2) for every other example).
    Subclasses set eval_type and self.rows (the examples, in order) and implement to_conversation(row) and
    evaluate(); a task whose examples are not a list of rows overrides num_examples() and get_example().
    """
    eval_type = None  # "generative" (sample a reply, grade it) or "categorical" (pick the likeliest answer letter)

    def __init__(self, start=0, stop=None, step=1):
        if start < 0 or step < 1 or (stop is not None and stop < start):
            raise ValueError(f"bad slice start={start} stop={stop} step={step}: need 0 <= start <= stop and step >= 1")
        self.start, self.stop, self.step = start, stop, step

    def num_examples(self):
        """Number of underlying examples, before slicing."""
        return len(self.rows)

    def get_example(self, index):
        """Underlying example index -> conversation dict."""
        return self.to_conversation(self.rows[index])

    def to_conversation(self, row):
        """One of self.rows -> its conversation dict."""
        raise NotImplementedError

    def evaluate(self, conversation, assistant_response):
        """1 if the response is correct for this conversation, else 0."""
        raise NotImplementedError

    def reward(self, conversation, assistant_response):
        """RL reward; by default the same as evaluate, as a float."""
        return float(self.evaluate(conversation, assistant_response))

    def __len__(self):
        stop = self.num_examples() if self.stop is None else min(self.stop, self.num_examples())
        span = max(0, stop - self.start)
        return (span + self.step - 1) // self.step  # ceil: the slice includes a partial last step

    def __getitem__(self, i):
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"{type(self).__name__} index {i} out of range (length {n})")
        return self.get_example(self.start + i * self.step)


class TaskMixture:
    """
    All examples of all tasks in one deterministically shuffled order (its own RNG: the same order every
    run, whatever else uses `random`). Listing a task twice oversamples it 2x.
    """

    def __init__(self, tasks, seed=42):
        self.tasks = list(tasks)
        self.index = [(t, i) for t, task in enumerate(self.tasks) for i in range(len(task))]
        random.Random(seed).shuffle(self.index)

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        task_idx, example_idx = self.index[i]
        return self.tasks[task_idx][example_idx]


class TaskSequence:
    """Tasks one after another, in the order given (a curriculum: all of task 0, then all of task 1, ...)."""

    def __init__(self, tasks):
        self.tasks = list(tasks)
        self.offsets = [0]  # offsets[k] = index of task k's first example; offsets[-1] = total length
        for task in self.tasks:
            self.offsets.append(self.offsets[-1] + len(task))

    def __len__(self):
        return self.offsets[-1]

    def __getitem__(self, i):
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"TaskSequence index {i} out of range (length {len(self)})")
        k = bisect_right(self.offsets, i) - 1
        return self.tasks[k][i - self.offsets[k]]


# ---------------------------------------------------------------------------------------------------
# Multiple choice

LETTERS = "ABCDEFGHIJ"


def render_mc(question, letters, choices):
    """
    The multiple-choice prompt. Format (the answer is the letter alone, e.g. "B"):

        <question>

        A. <choice 0>
        B. <choice 1>
        ...

        Answer with the letter of the correct choice only.
    """
    if len(letters) != len(choices):
        raise ValueError(f"{len(letters)} letters for {len(choices)} choices")
    lines = [question.strip(), ""]
    lines += [f"{letter}. {str(choice).strip()}" for letter, choice in zip(letters, choices)]
    lines += ["", "Answer with the letter of the correct choice only."]
    return "\n".join(lines)


def mc_conversation(question, choices, answer_index, **extra):
    """Categorical conversation: the assistant's content is the correct letter; "letters" lists the options."""
    if not 0 <= answer_index < len(choices) <= len(LETTERS):
        raise ValueError(f"answer index {answer_index} with {len(choices)} choices")
    letters = list(LETTERS[:len(choices)])
    messages = [
        {"role": "user", "content": render_mc(question, letters, choices)},
        {"role": "assistant", "content": letters[answer_index]},
    ]
    return {"messages": messages, "letters": letters, **extra}


def evaluate_mc(conversation, letter):
    """1 if the chosen letter (surrounding whitespace ignored) is the assistant message's letter."""
    return int(letter.strip() == conversation["messages"][-1]["content"])


# ---------------------------------------------------------------------------------------------------
# Loading: local mirror first, then the hub

def local_data_file(*parts):
    """$NANOCHAT_DATA_DIR/<parts...> if NANOCHAT_DATA_DIR is set and that file exists, else None."""
    data_dir = get_data_dir()
    if data_dir is None:
        return None
    path = os.path.join(data_dir, *parts)
    return path if os.path.exists(path) else None


@functools.lru_cache(maxsize=1)
def hub_reachable(host="huggingface.co", timeout=3.0):
    """One TCP connection attempt per process (DNS failure or timeout = offline)."""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_hub_dataset(path, name=None, split=None, local_file=None):
    """
    datasets.load_dataset(path, name, split=split), with any failure (offline, unknown dataset, missing
    config) turned into a DatasetUnavailable saying what failed and how to fix it. local_file: where the
    same data would live under NANOCHAT_DATA_DIR (for the message).
    """
    what = f"{path}" + (f" (config {name!r})" if name else "") + (f" split {split!r}" if split else "")
    try:
        if not os.environ.get("HF_HUB_OFFLINE") and not hub_reachable():
            # fail in a second instead of after datasets' ~25 s of retries; HF_HUB_OFFLINE=1 uses its local cache
            raise ConnectionError("huggingface.co is unreachable (set HF_HUB_OFFLINE=1 to use datasets' local cache)")
        import datasets
        return datasets.load_dataset(path, name, split=split)
    except Exception as e:  # the hub raises many types (ConnectionError, FileNotFoundError, ValueError, ...)
        local = (f"$NANOCHAT_DATA_DIR/{local_file}" if local_file
                 else "a local copy under NANOCHAT_DATA_DIR (the file each task reads is named in tasks/)")
        # the part before the first ': ' is the short reason the report's summary shows
        offline = isinstance(e, ConnectionError) or os.environ.get("HF_HUB_OFFLINE")
        short = "no data offline; set NANOCHAT_DATA_DIR" if offline else "no data; set NANOCHAT_DATA_DIR"
        raise DatasetUnavailable(
            f"{short}: could not load {what} from the Hugging Face hub ({type(e).__name__}: {e}). "
            f"Fix: connect to the internet so `datasets` can download it, or set NANOCHAT_DATA_DIR to a local "
            f"mirror that contains {local} (NANOCHAT_DATA_DIR is currently "
            f"{os.environ.get('NANOCHAT_DATA_DIR') or 'unset'})."
        ) from e
