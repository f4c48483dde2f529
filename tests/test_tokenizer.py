"""Tokenizer: training, round trips, special tokens, save/load, the chat template, token bytes."""

import pytest
import torch

from nanochat.tokenizer import (
    MIN_VOCAB_SIZE,
    SPECIAL_TOKENS,
    RustBPETokenizer,
    get_token_bytes,
    get_tokenizer,
    validate_messages,
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps in the sun.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "In 2024 there were 365 days plus one more, so 366 days in all.",
    "Tokenizers split text into pieces; the pieces are then merged by frequency.",
    "Hello, world! Hello again, world. How are you today? I am fine, thanks.",
    "Café, naïve, résumé: accents are bytes too. 한국어 문장도 있습니다. 😀🚀",
] * 20

VOCAB_SIZE = 400

ROUND_TRIP_TEXTS = [
    "plain ascii text, nothing fancy.",
    "ünïcödé wörds, 中文字符, 한국어, Ελληνικά",
    "emojis 😀🚀👍🏽 and a family 👨‍👩‍👧",
    "def f(x):\n\treturn {'k': [x ** 2 for _ in range(3)]}\n",
    "   leading spaces, trailing spaces   \n\n\n  \t\t mixed whitespace runs\r\n",
    "",
    "<|bos|> special-looking text stays ordinary <|assistant_end|>",
    "123456789 1,000,000 3.14159",
]


@pytest.fixture(scope="module")
def tok():
    return RustBPETokenizer.train_from_iterator(iter(CORPUS), VOCAB_SIZE)


def test_vocab_and_special_tokens(tok):
    assert tok.get_vocab_size() == VOCAB_SIZE
    assert tok.get_special_tokens() == SPECIAL_TOKENS
    bpe_size = VOCAB_SIZE - len(SPECIAL_TOKENS)
    # special ids come right after the BPE vocabulary, in SPECIAL_TOKENS order
    assert [tok.encode_special(name) for name in SPECIAL_TOKENS] == list(range(bpe_size, VOCAB_SIZE))
    assert tok.get_bos_token_id() == tok.encode_special("<|bos|>") == bpe_size
    assert tok.get_pad_token_id() == tok.get_bos_token_id()
    assert tok.id_to_token(tok.encode_special("<|assistant_end|>")) == "<|assistant_end|>"
    with pytest.raises(ValueError, match="unknown special token"):
        tok.encode_special("<|nope|>")


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < VOCAB_SIZE - len(SPECIAL_TOKENS) for i in ids)  # text never yields special ids


def test_merges_were_learned(tok):
    # frequent words compress well below one token per byte
    assert len(tok.encode("The quick brown fox")) < len("The quick brown fox") / 2
    # numbers split into 1-2 digit groups: 6 digits take at least 3 tokens
    assert len(tok.encode("123456")) >= 3


def test_encode_prepend_append_and_batch(tok):
    bos, end = tok.get_bos_token_id(), tok.encode_special("<|assistant_end|>")
    ids = tok.encode("hello world")
    assert tok.encode("hello world", prepend="<|bos|>", append=end) == [bos] + ids + [end]
    batch = tok.encode(["hello world", "the dog"], prepend=bos, num_threads=2)
    assert batch == [[bos] + ids, [bos] + tok.encode("the dog")]
    assert tok.decode(torch.tensor(ids)) == "hello world"
    with pytest.raises(TypeError):
        tok.encode(42)


def test_save_load_round_trip(tok, tmp_path):
    tok.save(str(tmp_path))
    loaded = RustBPETokenizer.from_directory(str(tmp_path))
    assert loaded.get_vocab_size() == tok.get_vocab_size()
    for text in ROUND_TRIP_TEXTS:
        assert loaded.encode(text) == tok.encode(text)
    assert loaded.encode_special("<|output_end|>") == tok.encode_special("<|output_end|>")


def test_missing_directory_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="scripts.tok_train"):
        RustBPETokenizer.from_directory(str(tmp_path / "missing"))


def test_get_tokenizer_and_token_bytes(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="tok_train"):
        get_tokenizer()
    with pytest.raises(FileNotFoundError, match="token_bytes.pt"):
        get_token_bytes()
    tok.save(str(tmp_path / "tokenizer"))
    assert get_tokenizer().encode("hello world") == tok.encode("hello world")
    token_bytes = get_token_bytes(device="cpu")
    assert token_bytes.shape == (VOCAB_SIZE,)
    assert token_bytes[:256].tolist() == [1] * 256  # the byte tokens
    assert token_bytes[-len(SPECIAL_TOKENS):].tolist() == [0] * len(SPECIAL_TOKENS)
    for i in range(256, VOCAB_SIZE - len(SPECIAL_TOKENS)):
        assert token_bytes[i] == len(tok.enc.decode_single_token_bytes(i)) >= 2  # merges are >= 2 bytes
    ids = tok.encode("Café 😀 fox")
    assert token_bytes[ids].sum().item() == len("Café 😀 fox".encode("utf-8"))


def test_bad_vocab_size():
    with pytest.raises(ValueError, match=str(MIN_VOCAB_SIZE)):
        RustBPETokenizer.train_from_iterator(iter(CORPUS), MIN_VOCAB_SIZE - 1)


# ---------------------------------------------------------------------- chat template

def special(tok, name):
    return tok.encode_special(name)


def test_render_conversation_exact(tok):
    conversation = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me compute."},
            {"type": "python", "text": "2+3"},
            {"type": "python_output", "text": "5"},
            {"type": "text", "text": "It is 5."},
        ]},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You are welcome."},
    ]}
    ids, mask = tok.render_conversation(conversation)
    s = lambda name: special(tok, name)  # noqa: E731
    expected = [
        ([s("<|bos|>")], 0),
        ([s("<|user_start|>")] + tok.encode("Be brief.\n\nWhat is 2+3?") + [s("<|user_end|>")], 0),
        ([s("<|assistant_start|>")], 0),
        (tok.encode("Let me compute."), 1),
        ([s("<|python_start|>")] + tok.encode("2+3") + [s("<|python_end|>")], 1),
        ([s("<|output_start|>")] + tok.encode("5") + [s("<|output_end|>")], 0),
        (tok.encode("It is 5."), 1),
        ([s("<|assistant_end|>")], 1),
        ([s("<|user_start|>")] + tok.encode("Thanks") + [s("<|user_end|>")], 0),
        ([s("<|assistant_start|>")], 0),
        (tok.encode("You are welcome.") + [s("<|assistant_end|>")], 1),
    ]
    expected_ids = [i for chunk, _ in expected for i in chunk]
    expected_mask = [m for chunk, m in expected for _ in chunk]
    assert ids == expected_ids
    assert mask == expected_mask

    # truncation cuts ids and mask together
    short_ids, short_mask = tok.render_conversation(conversation, max_tokens=7)
    assert short_ids == expected_ids[:7] and short_mask == expected_mask[:7]
    # debug view: masked-out tokens in brackets, trained ones bare
    view = tok.visualize_tokenization(ids, mask, color=False)
    assert view.startswith("[<|bos|>]|[<|user_start|>]|") and view.endswith("|<|assistant_end|>")


def test_render_for_completion(tok):
    conversation = {"messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "And now?"},
        {"role": "assistant", "content": "This reply is dropped."},
    ]}
    ids = tok.render_for_completion(conversation)
    prefix, _ = tok.render_conversation({"messages": conversation["messages"][:-1]})
    assert ids == prefix + [special(tok, "<|assistant_start|>")]
    assert "dropped" not in tok.decode(ids)


@pytest.mark.parametrize("messages", [
    [],
    [{"role": "assistant", "content": "I speak first"}],
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    [{"role": "system", "content": "only a system prompt"}],
    [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}],
    [{"role": "user", "content": ["not", "a", "string"]}],
])
def test_bad_conversations(tok, messages):
    with pytest.raises(ValueError):
        tok.render_conversation({"messages": messages})


def test_bad_completion_inputs(tok):
    with pytest.raises(ValueError):
        tok.render_for_completion({"messages": [{"role": "user", "content": "no assistant at the end"}]})
    with pytest.raises(ValueError):
        tok.render_for_completion({"messages": []})
    with pytest.raises(ValueError):
        tok.render_conversation([{"role": "user", "content": "not wrapped in a dict"}])


# ----------------------------------------------------------------------------- training conversations

@pytest.mark.parametrize("messages, reason", [
    ([], "non-empty"),
    ([{"role": "user", "content": "hi"}], "at least one"),
    ([{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}], "expected 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "expected 'assistant'"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}], "empty"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}], "last"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "code", "text": "x"}]}], "bad part"),
    ([{"role": "user", "content": ["a"]}, {"role": "assistant", "content": "b"}], "string"),
    ([{"role": "system", "content": ""}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "empty"),
])
def test_validate_messages_rejects(messages, reason):
    with pytest.raises(ValueError, match=reason):
        validate_messages(messages)


def test_validate_messages_accepts_system_and_parts():
    validate_messages([{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
                       {"role": "assistant", "content": [{"type": "python", "text": "2+2"},
                                                         {"type": "python_output", "text": "4"}]}])
