"""
nanochat.grammar: replies sampled from random logits under a response_format mask always parse as JSON and
validate against the schema; stop, special and padding tokens are handled; bad schemas are clear ValueErrors.
"""

import json

import jsonschema
import pytest
import torch

from nanochat.grammar import CACHE_SIZE, GrammarCompiler, Matcher, mask_rows_
from nanochat.tokenizer import RustBPETokenizer

# JSON-like text so merged tokens span grammar boundaries ('": "', '", "', '{"'): masks must handle tokens
# that close one value and open the next.
CORPUS = ['{"name": "Ann", "age": 31, "role": "admin", "tags": ["a", "b"]} ' * 20,
          "the quick brown fox jumps over the lazy dog. " * 20, "numbers 12 345 6789, café naïve über. " * 10]
PADDED_VOCAB = 320  # the model's logits are wider than the tokenizer's vocabulary (multiple of 32)
RUNS = 24

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "scores": {"type": "array", "items": {"type": "integer"}, "maxItems": 2},  # optional
    },
    "required": ["name", "age", "role", "tags", "address"],
    "additionalProperties": False,
}
FORMATS = {
    "json_object": ({"type": "json_object"}, {"type": "object"}),
    "json_schema": ({"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}, PERSON),
}


@pytest.fixture(scope="module")
def tok():
    tokenizer = RustBPETokenizer.train_from_iterator(iter(CORPUS), 300)
    assert tokenizer.get_vocab_size() < PADDED_VOCAB
    return tokenizer


@pytest.fixture(scope="module")
def stops(tok):
    return [tok.encode_special("<|assistant_end|>"), tok.get_bos_token_id()]


@pytest.fixture(scope="module")
def compiler(tok, stops):
    return GrammarCompiler(tok, stops, vocab_size=PADDED_VOCAB)


def forbidden_ids(tok, stops):
    """Special tokens that are not stop tokens, and the padding columns: never allowed in constrained output."""
    specials = [i for i in tok.special_tokens.values() if i not in stops]
    return torch.tensor(specials + list(range(tok.get_vocab_size(), PADDED_VOCAB)))


def sample(logits, generator):
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).item()


@pytest.mark.parametrize("name", FORMATS)
def test_random_replies_parse_and_validate(name, compiler, tok, stops):
    """RUNS random-logits walks, each until a stop token; every mask keeps forbidden ids at -inf."""
    response_format, schema = FORMATS[name]
    compiled = compiler.compile(response_format)
    forbidden = forbidden_ids(tok, stops)
    generator = torch.Generator().manual_seed(0)
    for run in range(RUNS):
        matcher, tokens = Matcher(compiled), []
        for _ in range(20_000):
            logits = matcher.mask_(torch.randn(PADDED_VOCAB, generator=generator))
            assert torch.isneginf(logits[forbidden]).all()
            if matcher.done:  # the JSON is complete: only a stop token may follow
                assert set(torch.isfinite(logits).nonzero().flatten().tolist()) == set(stops)
            token = sample(logits, generator)
            matcher.accept(token)
            if token in stops:
                break
            tokens.append(token)
        else:
            pytest.fail(f"run {run}: no stop token after 20000 steps")
        assert matcher.done
        text = tok.decode(tokens)
        jsonschema.validate(json.loads(text), schema)  # json.loads is strict: no raw control characters


def test_batched_rows_match_single_rows_and_leave_unconstrained_rows_alone(compiler, stops):
    """mask_rows_ drives a batch (constrained rows mixed with None) to valid replies; each step it equals mask_."""
    compiled = compiler.compile(FORMATS["json_schema"][0])
    matchers = [Matcher(compiled), None, Matcher(compiled), Matcher(compiled), None]
    replies = [[] for _ in matchers]
    generator = torch.Generator().manual_seed(1)
    for _ in range(20_000):
        raw = torch.randn(len(matchers), PADDED_VOCAB, generator=generator)
        logits = mask_rows_(raw.clone(), matchers)
        for i, m in enumerate(matchers):
            expected = raw[i] if m is None else m.mask_(raw[i].clone())
            assert torch.equal(logits[i], expected)
        for i, m in enumerate(matchers):
            if m is not None:
                token = sample(logits[i], generator)
                m.accept(token)
                if token in stops:
                    matchers[i] = None  # finished rows leave the batch's constraints
                else:
                    replies[i].append(token)
        if all(m is None for m in matchers):
            break
    assert len([r for r in replies if r]) == 3


def test_stop_tokens_only_once_complete_and_nothing_after(compiler, tok, stops):
    matcher = Matcher(compiler.compile({"type": "json_object"}))
    for token in tok.encode('{"a": 1'):
        matcher.accept(token)
    assert not matcher.done
    with pytest.raises(ValueError, match="not allowed"):
        matcher.accept(stops[0])  # the object is not closed yet
    for token in tok.encode("}"):
        matcher.accept(token)
    assert matcher.done
    matcher.accept(stops[1])  # either stop token ends the reply
    with pytest.raises(ValueError, match="reply is over"):
        matcher.accept(tok.encode(" ")[0])


def test_forbidden_tokens_raise_and_leave_the_matcher_usable(compiler, tok, stops):
    matcher = Matcher(compiler.compile({"type": "json_object"}))
    for token in [tok.encode("x")[0], tok.encode_special("<|python_start|>"), tok.get_vocab_size(), PADDED_VOCAB, -1]:
        with pytest.raises(ValueError):
            matcher.accept(token)
    for token in tok.encode("{}"):  # still at the start: a rejected token changed nothing
        matcher.accept(token)
    matcher.accept(stops[0])


def test_padded_and_special_columns_are_never_allowed(compiler, tok, stops):
    """Also when the logits are wider than the compiler's vocab_size: columns past it are -inf."""
    matcher = Matcher(compiler.compile({"type": "json_object"}))
    logits = matcher.mask_(torch.zeros(PADDED_VOCAB + 40))
    assert torch.isneginf(logits[forbidden_ids(tok, stops)]).all() and torch.isneginf(logits[PADDED_VOCAB:]).all()
    assert torch.isneginf(logits[stops]).all()  # nothing written yet: the reply cannot end
    allowed = torch.isfinite(logits).nonzero().flatten().tolist()
    assert allowed and all(tok.decode([i]).startswith("{") for i in allowed)


@pytest.mark.parametrize("response_format,message", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}, "foo"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"not": {}}}}}}, "not"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "("}}}, "regex"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/missing"}}}, "missing"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 5, "maximum": 1}}}, "minimum"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "json_schema.schema"),
    ({"type": "text"}, "'text'"),
    ("json", "must be an object"),
])
def test_bad_formats_are_clear_value_errors(compiler, response_format, message):
    with pytest.raises(ValueError, match=message):
        compiler.compile(response_format)


def test_compiled_grammars_are_cached_and_bounded(compiler):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}}
    first = compiler.compile({"type": "json_schema", "json_schema": {"name": "one", "schema": schema}})
    reordered = dict(reversed(schema.items()))  # same schema, other key order and name: one entry
    assert compiler.compile({"type": "json_schema", "json_schema": {"name": "two", "schema": reordered}}) is first
    for n in range(CACHE_SIZE):
        compiler.compile({"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "integer", "minimum": n}}})
    assert len(compiler._cache) == CACHE_SIZE
    assert compiler.compile({"type": "json_schema", "json_schema": {"name": "one", "schema": schema}}) is not first


def test_compiler_checks_its_arguments(tok, stops):
    with pytest.raises(ValueError, match="vocab_size"):
        GrammarCompiler(tok, stops, vocab_size=tok.get_vocab_size() - 1)
    with pytest.raises(ValueError, match="stop token"):
        GrammarCompiler(tok, [])
    missing_byte = RustBPETokenizer({bytes([b]): b for b in range(255)})  # no token for byte 0xff
    with pytest.raises(ValueError, match="0xff"):
        GrammarCompiler(missing_byte, stops)
