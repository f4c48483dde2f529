"""
The tokenizer: byte-level BPE in the GPT-4 style, plus the chat template.

Training uses rustbpe (fast, parallel merge counting); encoding and decoding use tiktoken (fast
inference) built from the merges rustbpe learned. The chat template (render_conversation /
render_for_completion) lives here and nowhere else, so training and inference agree on it.
"""

import os
import pickle

import rustbpe
import tiktoken
import torch

from nanochat.common import get_base_dir, logger

# Special tokens get the ids right after the BPE vocabulary, so vocab_size counts them too.
SPECIAL_TOKENS = [
    "<|bos|>",  # begins every document; also the padding id (see get_pad_token_id)
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",  # the assistant calls the python tool
    "<|output_start|>", "<|output_end|>",  # the tool's output, forced in at inference
]

# GPT-4's split pattern with one change: numbers split into groups of 1-2 digits (\p{N}{1,2})
# instead of 1-3. With a small vocabulary (2^15-2^16) the ~1000 three-digit groups would take
# tokens away from text, and 1-2 digit groups make arithmetic tokens more regular.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)

# 256 byte tokens are always there (byte-level BPE), then the special tokens; merges come on top.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)

TOKENIZER_FILE = "tokenizer.pkl"
TOKEN_BYTES_FILE = "token_bytes.pt"
TRAIN_HINT = "train one with `python -m scripts.tok_train`"


def role_order_error(roles):
    """
    The chat template's order of roles: an optional leading system message, then user and assistant
    alternating, starting with the user. Returns (index, expected role) of the first role out of order, or
    None. Training data, the tokenizer and the server each add their own rule on how a conversation ends.
    """
    start = 1 if roles and roles[0] == "system" else 0
    for i, role in enumerate(roles[start:], start):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if role != expected:
            return i, expected
    return None


PART_TYPES = ("text", "python", "python_output")  # an assistant message's parts (see _render_assistant)


def validate_messages(messages):
    """
    A training conversation's messages (data checks at load time; rendering checks again): ValueError(reason)
    unless an optional system message, then user/assistant alternating, ending with the assistant, every
    content non-empty text (the assistant's may be a list of parts).
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"message {i} is not an object")
    roles = [m.get("role") for m in messages]
    start = 1 if roles[0] == "system" else 0
    if len(roles) - start < 2:
        raise ValueError("needs at least one user message and one assistant reply")
    if (wrong := role_order_error(roles)) is not None:
        i, expected = wrong
        raise ValueError(f"message {i} has role {roles[i]!r}, expected {expected!r}")
    for i, message in enumerate(messages):
        _validate_content(message.get("content"), roles[i], i)
    if roles[-1] != "assistant":
        raise ValueError("the last message must be the assistant's")


def _validate_content(content, role, i):
    if isinstance(content, str):
        if not content.strip():
            raise ValueError(f"message {i} ({role}) has empty content")
        return
    if role != "assistant" or not isinstance(content, list) or not content:
        raise ValueError(f"message {i} ({role}) content must be a non-empty string"
                         + (" or a list of parts" if role == "assistant" else ""))
    for part in content:
        if not isinstance(part, dict) or part.get("type") not in PART_TYPES or not isinstance(part.get("text"), str):
            raise ValueError(f"message {i} has a bad part {part!r}: "
                             f"parts are {{'type': one of {PART_TYPES}, 'text': str}}")


def validate_vocab_size(vocab_size):
    """The one place the vocab size bound lives (used by the class and by scripts/tok_train.py)."""
    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be an integer >= {MIN_VOCAB_SIZE} (256 byte tokens + {len(SPECIAL_TOKENS)} "
            f"special tokens), got {vocab_size!r}"
        )


class RustBPETokenizer:
    """Byte-level BPE: rustbpe learns the merges, a tiktoken.Encoding does the encoding/decoding."""

    def __init__(self, mergeable_ranks, pattern=SPLIT_PATTERN):
        """mergeable_ranks: dict bytes -> rank/id (0..n-1). Special tokens take ids n, n+1, ..."""
        self.mergeable_ranks = mergeable_ranks
        self.pattern = pattern
        n = len(mergeable_ranks)
        # name -> id, in SPECIAL_TOKENS order
        self.special_tokens = {name: n + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding(
            name="rustbpe", pat_str=pattern, mergeable_ranks=mergeable_ranks, special_tokens=self.special_tokens
        )

    # ------------------------------------------------------------------ training, saving, loading

    @classmethod
    def train_from_iterator(cls, text_iterator, vocab_size):
        """Learn vocab_size - len(SPECIAL_TOKENS) byte-level BPE tokens from an iterator of strings."""
        validate_vocab_size(vocab_size)
        bpe_vocab_size = vocab_size - len(SPECIAL_TOKENS)
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(text_iterator, bpe_vocab_size, pattern=SPLIT_PATTERN)
        mergeable_ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
        if len(mergeable_ranks) < bpe_vocab_size:
            # rustbpe stops early when no pair occurs twice: the corpus was too small for the request
            logger.warning(
                f"the corpus only supported {len(mergeable_ranks)} BPE tokens (asked for {bpe_vocab_size}); "
                f"vocab size is {len(mergeable_ranks) + len(SPECIAL_TOKENS)}"
            )
        return cls(mergeable_ranks, pattern=trainer.get_pattern())

    @classmethod
    def from_directory(cls, tokenizer_dir):
        path = os.path.join(tokenizer_dir, TOKENIZER_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no tokenizer at {path}: {TRAIN_HINT}")
        with open(path, "rb") as f:
            state = pickle.load(f)
        return cls(state["mergeable_ranks"], pattern=state["pattern"])

    def save(self, tokenizer_dir):
        """Writes tokenizer.pkl (pattern + merges) and token_bytes.pt (for bits-per-byte)."""
        os.makedirs(tokenizer_dir, exist_ok=True)
        state = {"pattern": self.pattern, "mergeable_ranks": self.mergeable_ranks}
        path = os.path.join(tokenizer_dir, TOKENIZER_FILE)
        # temp file + rename: a crash never leaves a half-written tokenizer behind
        with open(path + ".tmp", "wb") as f:
            pickle.dump(state, f)
        os.replace(path + ".tmp", path)
        bytes_path = os.path.join(tokenizer_dir, TOKEN_BYTES_FILE)
        torch.save(self.compute_token_bytes(), bytes_path + ".tmp")
        os.replace(bytes_path + ".tmp", bytes_path)
        return path

    def compute_token_bytes(self):
        """(vocab_size,) int32: UTF-8 bytes each token id stands for; 0 for special tokens."""
        special_ids = set(self.special_tokens.values())
        sizes = [
            0 if i in special_ids else len(self.enc.decode_single_token_bytes(i))
            for i in range(self.get_vocab_size())
        ]
        return torch.tensor(sizes, dtype=torch.int32)

    # ------------------------------------------------------------------ vocabulary

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_special_tokens(self):
        return list(self.special_tokens)

    def encode_special(self, name):
        if name not in self.special_tokens:
            raise ValueError(f"unknown special token {name!r}; known: {SPECIAL_TOKENS}")
        return self.special_tokens[name]

    def get_bos_token_id(self):
        return self.special_tokens["<|bos|>"]

    def get_pad_token_id(self):
        # BOS doubles as padding. Safe because pad positions are always masked out: their targets are
        # ignored by the loss and attention never lets real tokens see them, so the id's value never matters.
        return self.get_bos_token_id()

    def terminal_token_ids(self):
        """The tokens that end a reply: <|assistant_end|>, and <|bos|> (a new document, for a base model)."""
        return {self.encode_special("<|assistant_end|>"), self.get_bos_token_id()}

    def id_to_token(self, token_id):
        return self.enc.decode([token_id])

    def token_bytes(self, token_id):
        """The bytes a token stands for (a special token's name as UTF-8); may be part of a UTF-8 character."""
        return self.enc.decode_single_token_bytes(token_id)

    # ------------------------------------------------------------------ encode / decode

    def _special_id(self, token):
        """prepend/append accept a special token name or an id."""
        return self.encode_special(token) if isinstance(token, str) else int(token)

    def encode(self, text, prepend=None, append=None, num_threads=8):
        """
        str -> list[int], or list[str] -> list[list[int]] (batched over num_threads threads).
        Special-token strings inside text are encoded as ordinary text, never as special tokens.
        """
        prepend_id = None if prepend is None else self._special_id(prepend)
        append_id = None if append is None else self._special_id(append)
        if isinstance(text, str):
            rows = [self.enc.encode_ordinary(text)]
        elif isinstance(text, (list, tuple)):
            rows = self.enc.encode_ordinary_batch(list(text), num_threads=num_threads)
        else:
            raise TypeError(f"encode expects a str or a list of str, got {type(text).__name__}")
        for row in rows:
            if prepend_id is not None:
                row.insert(0, prepend_id)
            if append_id is not None:
                row.append(append_id)
        return rows[0] if isinstance(text, str) else rows

    def decode(self, ids):
        if hasattr(ids, "tolist"):  # torch tensor / numpy array
            ids = ids.tolist()
        return self.enc.decode(list(ids))

    def __call__(self, *args, **kwargs):
        return self.encode(*args, **kwargs)

    # ------------------------------------------------------------------ chat template

    def _normalized_messages(self, conversation):
        """Checks the conversation's shape; merges a leading system message into the first user turn."""
        if not isinstance(conversation, dict) or not isinstance(conversation.get("messages"), list):
            raise ValueError('conversation must be a dict {"messages": [{"role": ..., "content": ...}, ...]}')
        messages = [dict(m) for m in conversation["messages"]]
        if messages and messages[0].get("role") == "system":
            if len(messages) < 2 or messages[1].get("role") != "user":
                raise ValueError("a system message must be followed by a user message")
            if not isinstance(messages[0].get("content"), str) or not isinstance(messages[1].get("content"), str):
                raise ValueError("system and user message content must be strings")
            messages[1]["content"] = messages[0]["content"] + "\n\n" + messages[1]["content"]
            messages = messages[1:]
        if not messages:
            raise ValueError("conversation has no user/assistant messages")
        if (wrong := role_order_error([m.get("role") for m in messages])) is not None:
            i, expected = wrong
            raise ValueError(f"message {i} has role {messages[i].get('role')!r}, expected {expected!r}: after an "
                             f"optional system message, roles must alternate user/assistant starting with user")
        return messages

    def _wrap(self, start, text, end):
        """<|start|> text <|end|> as ids."""
        return [self.special_tokens[start]] + self.encode(text) + [self.special_tokens[end]]

    def _render_assistant(self, content, add):
        """add(ids, mask_value) appends tokens. Content is a str or a list of typed parts."""
        if isinstance(content, str):
            add(self.encode(content), 1)
            return
        if not isinstance(content, list):
            raise ValueError(f"assistant content must be a str or a list of parts, got {type(content).__name__}")
        for part in content:
            kind, text = part.get("type"), part.get("text")
            if not isinstance(text, str):
                raise ValueError(f"assistant part {part!r} needs a string 'text'")
            if kind == "text":
                add(self.encode(text), 1)
            elif kind == "python":
                # the model learns to write the tool call, so it is trained on (mask 1)
                add(self._wrap("<|python_start|>", text, "<|python_end|>"), 1)
            elif kind == "python_output":
                # the tool's output is forced in at inference time, never predicted: mask 0
                add(self._wrap("<|output_start|>", text, "<|output_end|>"), 0)
            else:
                raise ValueError(f"unknown assistant part type {kind!r} (expected text, python, python_output)")

    def render_conversation(self, conversation: dict, max_tokens: int | None = 2048) -> tuple[list[int], list[int]]:
        """
        Conversation -> (ids, mask), two lists of equal length (truncated to max_tokens; None: no limit).
        mask[i] = 1 where the model is trained to predict token i (the assistant's own tokens), else 0.
        """
        messages = self._normalized_messages(conversation)
        ids, mask = [], []

        def add(token_ids, mask_value):
            ids.extend(token_ids)
            mask.extend([mask_value] * len(token_ids))

        add([self.get_bos_token_id()], 0)
        for message in messages:
            content = message.get("content")
            if message["role"] == "user":
                if not isinstance(content, str):
                    raise ValueError(f"user content must be a str, got {type(content).__name__}")
                add(self._wrap("<|user_start|>", content, "<|user_end|>"), 0)
            else:
                add([self.special_tokens["<|assistant_start|>"]], 0)
                self._render_assistant(content, add)
                add([self.special_tokens["<|assistant_end|>"]], 1)  # learning to stop matters
        if max_tokens is not None:
            ids, mask = ids[:max_tokens], mask[:max_tokens]
        return ids, mask

    def render_for_completion(self, conversation: dict) -> list[int]:
        """The prompt for sampling the assistant's reply: drop the final assistant message, open a new one."""
        messages = conversation.get("messages") if isinstance(conversation, dict) else None
        if not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant":
            raise ValueError("render_for_completion needs a conversation whose last message is the assistant's")
        ids, _ = self.render_conversation({"messages": messages[:-1]}, max_tokens=None)
        return ids + [self.special_tokens["<|assistant_start|>"]]

    def visualize_tokenization(self, ids, mask, color=True):
        """Debug string: tokens separated by '|', trained tokens (mask 1) green, others red."""
        pieces = []
        for token_id, m in zip(ids, mask):
            text = self.id_to_token(token_id)
            if color:
                text = ("\033[92m" if m else "\033[91m") + text + "\033[0m"
            else:
                text = text if m else f"[{text}]"
            pieces.append(text)
        return "|".join(pieces)


# ---------------------------------------------------------------------- the project's tokenizer


def get_tokenizer():
    return RustBPETokenizer.from_directory(os.path.join(get_base_dir(), "tokenizer"))


def get_token_bytes(device="cpu"):
    """(vocab_size,) int tensor of UTF-8 bytes per token id (0 for special tokens), for bits-per-byte."""
    path = os.path.join(get_base_dir(), "tokenizer", TOKEN_BYTES_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no token bytes at {path}: {TRAIN_HINT}")
    return torch.load(path, map_location=device)
