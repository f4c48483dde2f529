"""
Constrained decoding for OpenAI's response_format (structured outputs): every token a constrained sequence
samples keeps its reply a prefix of JSON that the requested schema accepts, and the reply may only end (stop
token) once that JSON is complete.

    compiler = GrammarCompiler(tokenizer, stop_token_ids=[assistant_end, bos], vocab_size=model_vocab)  # once
    compiled = compiler.compile(response_format)   # when the request arrives: ValueError -> HTTP 400
    matcher = Matcher(compiled)                     # one per sequence
    each step: mask_rows_(logits, matchers) (or matcher.mask_(row)), sample, matcher.accept(token)

Built on llguidance, picked over xgrammar by dev/bench_grammar.py on our tokenizer (4096 vocab, 2 CPU cores):
every random-logits reply parsed and validated with llguidance, while with xgrammar half the replies to a
10-field schema were invalid JSON (it lets raw control characters into strings that have a minLength or
maxLength); xgrammar also silently ignores keywords it does not implement (not, uniqueItems, if/then), which
llguidance names in an error. llguidance compiles faster (0.7 vs 1.6 ms for that schema), has no dependencies
and imports in 0.01 s after torch (xgrammar: ~1.2 s, and pulls in transformers and triton). Its mask costs
more at some positions (median 6 vs 2 µs per token on that schema), small next to applying the mask to the
logits (~20 µs) or a plain sampling step (~100-200 µs).
"""

import json
import threading
from collections import OrderedDict

import llguidance
import llguidance.tiktoken
import torch

# Compact JSON with json.dumps' separators and no other whitespace: one way to write each value, so a weak
# model cannot spend its max_tokens on blank space ("whitespace_flexible" would allow any run of it), and
# ", " / ": " is how most JSON in training text looks. Passed as overrides so a schema's own "x-guidance"
# options cannot turn free whitespace back on.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Short error messages: the verbose ones dump parser state and the whole grammar (the user's schema).
LIMITS = llguidance.LLParserLimits(verbose_errors=False)
CACHE_SIZE = 64  # compiled grammars kept, least recently used dropped first


def schema_of(response_format: dict) -> dict:
    """The JSON schema a response_format asks for; ValueError naming the bad field otherwise."""
    if not isinstance(response_format, dict):
        raise ValueError(f"response_format must be an object, got {type(response_format).__name__}")
    kind = response_format.get("type")
    if kind == "json_object":
        return {"type": "object"}  # JSON mode: any JSON object
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise ValueError("response_format.json_schema.schema must be a JSON schema object")
        # "strict" is not read: the schema is always enforced (OpenAI's strict: false only means best effort)
        return spec["schema"]
    raise ValueError(f"response_format.type must be 'json_object' or 'json_schema' to constrain output, got {kind!r}")


class CompiledGrammar:
    """A schema's grammar for one tokenizer: a fresh matcher that each sequence copies (~1 µs; building one
    from the grammar takes ~0.3 ms)."""

    def __init__(self, compiler: "GrammarCompiler", template: llguidance.LLMatcher):
        self.compiler = compiler
        self.template = template


class GrammarCompiler:
    """One per served tokenizer (built at server start): the library's tokenizer info, a cache of compiled grammars."""

    def __init__(self, tokenizer, stop_token_ids: list[int], vocab_size: int | None = None):
        """stop_token_ids end a reply (<|assistant_end|>, <|bos|>); vocab_size: the model's logits width when
        it pads the tokenizer's vocabulary (default: the tokenizer's)."""
        vocab_size = tokenizer.get_vocab_size() if vocab_size is None else vocab_size
        if vocab_size < tokenizer.get_vocab_size():
            raise ValueError(f"vocab_size {vocab_size} is below the tokenizer's {tokenizer.get_vocab_size()}")
        if not stop_token_ids:
            raise ValueError("need at least one stop token: a constrained reply must be able to end")
        # A grammar may need any byte next (an escape, a multi-byte UTF-8 character): with a byte that no token
        # spells, a sequence could reach a state where nothing is allowed. Byte-level BPE keeps all 256.
        for b in range(256):
            try:
                tokenizer.enc.encode_single_token(bytes([b]))
            except KeyError:
                raise ValueError(f"tokenizer has no token for byte {b:#04x}: constrained decoding needs all 256") from None
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        # The encoding's special tokens become llguidance special tokens, which a JSON grammar never allows;
        # the stop tokens are its end-of-sequence tokens, allowed only once the JSON is complete; ids past
        # the tokenizer (vocab padding) are no token at all, so their bits are always 0.
        self.lltokenizer = llguidance.tiktoken.lltokenizer_from_encoding(
            tokenizer.enc, n_vocab=vocab_size, eos_token=self.stop_token_ids)
        self._cache: OrderedDict[str, CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()  # requests may compile from several threads

    def compile(self, response_format: dict) -> CompiledGrammar:
        """{"type": "json_object"} (any JSON object) or {"type": "json_schema", "json_schema": {"name": ...,
        "schema": {...}, "strict": ...}}. ValueError saying what is unsupported or invalid for a bad schema."""
        schema = schema_of(response_format)
        # Keyed by the schema alone: name and strict do not change the grammar, so more requests share one.
        key = json.dumps(schema, sort_keys=True, separators=(",", ":"))
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        compiled = self._build(schema)  # outside the lock: a big schema takes a while (llguidance drops the GIL)
        with self._lock:
            self._cache[key] = compiled
            if len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def _build(self, schema: dict) -> CompiledGrammar:
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
        except ValueError as e:
            raise ValueError(f"invalid JSON schema: {e}") from None
        # llguidance reports grammar errors (unknown type, unimplemented keyword, bad regex, dangling $ref) as
        # a matcher in an error state rather than an exception.
        template = llguidance.LLMatcher(self.lltokenizer, grammar, log_level=0, limits=LIMITS)
        if template.is_error():
            raise ValueError(f"unsupported or invalid JSON schema: {template.get_error()}")
        return CompiledGrammar(self, template)


class Matcher:
    """One per sequence: where its reply stands in the grammar."""

    def __init__(self, compiled: CompiledGrammar):
        self.compiled = compiled
        self._matcher = compiled.template.deep_copy()
        self._bitmask = torch.empty(1, bitmask_words(compiled.compiler.vocab_size), dtype=torch.int32)
        self._stopped = False  # a stop token was accepted: the reply is over

    def mask_(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (V,) on any device: disallowed tokens -> -inf in place. Returns logits."""
        self._fill(self._bitmask[0])
        logits.masked_fill_(disallowed(self._bitmask, logits.shape[-1], logits.device)[0], float("-inf"))
        return logits

    def _fill(self, words: torch.Tensor) -> None:
        """Write the allowed-token bits into words, a contiguous (bitmask_words(vocab_size),) int32 CPU tensor."""
        self._matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * 4)

    def accept(self, token: int) -> None:
        """Advance past token; ValueError (and no change) if the grammar does not allow it here."""
        compiler, token = self.compiled.compiler, int(token)
        if self._stopped:
            raise ValueError(f"token {token} after the stop token: the reply is over")
        if not 0 <= token < compiler.vocab_size:
            raise ValueError(f"token {token} is outside the vocabulary (0..{compiler.vocab_size - 1})")
        # Check before consuming: a rejected token leaves an llguidance matcher in an error state for good.
        # validate_tokens only knows the first end-of-sequence token, so stop tokens are checked as "may the
        # reply end here", which is what the mask allows them for.
        if token in compiler.stop_token_ids:
            allowed = self._matcher.is_accepting()
        else:
            allowed = self._matcher.validate_tokens([token]) == 1
        if not allowed:
            raise ValueError(f"token {token} is not allowed by the response_format grammar here")
        if not self._matcher.consume_token(token):
            raise RuntimeError(f"grammar matcher failed on an allowed token {token}: {self._matcher.get_error()}")
        self._stopped = token in compiler.stop_token_ids

    @property
    def done(self) -> bool:
        """The grammar is complete: only a stop token may follow (or one was accepted already)."""
        return self._stopped or self._matcher.is_stopped()


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def disallowed(bitmask: torch.Tensor, width: int, device: torch.device) -> torch.Tensor:
    """(R, W) int32 bitmask (bit j of word w: token 32w + j allowed) -> (R, width) bool, True = not allowed.
    Unpacked on the logits' device so only the compact mask crosses to a GPU. Columns past the mask (logits
    wider than the compiler's vocab_size) are never allowed."""
    bits = bitmask.to(device)
    shifts = torch.arange(32, dtype=torch.int32, device=device)
    allowed = ((bits.unsqueeze(-1) >> shifts) & 1).flatten(1).bool()[:, :width]
    if allowed.shape[1] < width:
        allowed = torch.cat([allowed, allowed.new_zeros(allowed.shape[0], width - allowed.shape[1])], dim=1)
    return ~allowed


def mask_rows_(logits: torch.Tensor, matchers: list[Matcher | None]) -> torch.Tensor:
    """logits (B, V), matchers[i] for row i or None (unconstrained: row untouched). Fills one bitmask for all
    constrained rows and applies it with one set of tensor ops instead of one per row (~2x faster for 8 rows
    of a 4096 vocab: dev/bench_grammar.py). Returns logits."""
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return logits
    bitmask = torch.empty(len(rows), bitmask_words(matchers[rows[0]].compiled.compiler.vocab_size), dtype=torch.int32)
    # Row by row on this thread: llguidance's LLExecutor spreads rows over its own threads, but with torch's
    # OpenMP threads on the same cores a step sometimes waited milliseconds for them (2-core CPU box).
    for k, r in enumerate(rows):
        matchers[r]._fill(bitmask[k])
    mask = disallowed(bitmask, logits.shape[-1], logits.device)
    if len(rows) == logits.shape[0]:
        logits.masked_fill_(mask, float("-inf"))
    else:
        index = torch.tensor(rows, device=logits.device)
        logits[index] = logits[index].masked_fill_(mask, float("-inf"))
    return logits
