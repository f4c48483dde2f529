"""
OpenAI Chat Completions wire format: request validation, response/chunk models, the error body.

Policy: lenient where harmless, strict where the result would change. A field of OpenAI's API that we do
not implement is accepted only in a value that does not change the result (logprobs=false,
tools=[], ignore_eos=false, ...); any other value is rejected with the field named, so a client never gets
silently different behaviour. Fields unknown to OpenAI's API (clients and tools add their own) are ignored,
and ignored_fields() names them for the log and a response header. Parse errors become
RequestError(message, param).
"""

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from nanochat.sampling import MAX_LOGIT_BIAS, MAX_PENALTY, validate_sampling_params
from nanochat.tokenizer import role_order_error

StrictFloat = Annotated[float, Field(strict=True)]  # strict float still accepts ints, but not "0.5" or true
MAX_STOP_SEQUENCES = 4
# Checking a reply for stop sequences costs O(length of the longest) per token (serving/streaming.py):
# bounded here, so four huge stops x n rows cannot stall the event loop.
MAX_STOP_CHARS = 256
MAX_N = 16
MAX_TOP_LOGPROBS = 20  # OpenAI's bound for chat (5 for completions; we allow 20 for both)


class RequestError(ValueError):
    """A bad request (HTTP 400). param names the offending field in OpenAI's dotted style, or is None."""

    def __init__(self, message, param=None):
        super().__init__(message)
        self.message = message
        self.param = param


def error_body(message, type, param=None, code=None):
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Lenient(BaseModel):
    """A request object whose unknown fields are kept aside (model_extra) and ignored."""
    model_config = ConfigDict(extra="allow")


# ----------------------------------------------------------------------------- requests

class TextPart(_Model):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant"]  # developer: OpenAI's newer name for system
    content: StrictStr | list[TextPart] | None  # required; null only from the assistant (checked below)
    name: StrictStr | None = None  # OpenAI allows a participant name; it does not reach the model

    @field_validator("content", mode="before")
    @classmethod
    def _only_text_parts(cls, value):
        # Checked here so the error says what is wrong instead of listing every branch of the union.
        if isinstance(value, list):
            for i, part in enumerate(value):
                if not isinstance(part, dict):
                    raise ValueError(f"content part {i} must be an object")  # noqa: TRY004 (pydantic wants ValueError)
                if part.get("type") != "text":
                    raise ValueError(f"content part {i} has type {part.get('type')!r}; only 'text' is supported")
        elif value is not None and not isinstance(value, str):
            raise ValueError("content must be a string or a list of text parts")  # noqa: TRY004
        return value

    @field_validator("content")
    @classmethod
    def _null_only_for_the_assistant(cls, value, info):
        # an assistant message that only called tools has content null (clients send the history back)
        if value is None and info.data.get("role") != "assistant":
            raise ValueError("null is allowed only in assistant messages")
        return value

    @property
    def text(self):
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Model):
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False  # vLLM's extension: usage in every chunk (benchmark tools)


def _must_be(value, allowed, field):
    if value not in allowed:
        raise ValueError(f"{field}={value!r} is not supported (would change the result); allowed: {allowed}")
    return value


# The OpenAPI schema states what the validators below enforce, so generated clients and fuzzers see the
# real contract (the models' own types are looser so that our validators can give the clearer message).
STOP_STRING = {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS}
STOP_SCHEMA = {"anyOf": [STOP_STRING, {"type": "array", "items": STOP_STRING, "maxItems": MAX_STOP_SEQUENCES},
                         {"type": "null"}]}
ZERO_ONLY = {"anyOf": [{"const": 0}, {"type": "null"}]}
NO_TOOL_CHOICE = {"anyOf": [{"enum": ["none", "auto"]}, {"type": "null"}]}
MAX_LOGIT_BIAS_TOKENS = 300
LOGIT_BIAS_SCHEMA = {"anyOf": [{"type": "object", "maxProperties": MAX_LOGIT_BIAS_TOKENS,
                                "propertyNames": {"pattern": "^[0-9]+$"},
                                "additionalProperties": {"type": "number", "minimum": -MAX_LOGIT_BIAS,
                                                         "maximum": MAX_LOGIT_BIAS}}, {"type": "null"}]}


def _check_stop_value(value):
    if isinstance(value, list):
        if len(value) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(value)}")
        if not all(isinstance(s, str) and s for s in value):
            raise ValueError("stop sequences must be non-empty strings")
    elif isinstance(value, str) and not value:
        raise ValueError("stop must not be an empty string")
    elif value is not None and not isinstance(value, str):
        raise ValueError("stop must be a string or a list of strings")
    if any(len(s) > MAX_STOP_CHARS for s in ([value] if isinstance(value, str) else value or [])):
        raise ValueError(f"stop sequences must be at most {MAX_STOP_CHARS} characters long")
    return value


class _GenerationRequest(_Lenient):
    """What chat and text completions share: sampling, stop sequences, penalties, streaming."""
    model: StrictStr | None = None
    temperature: StrictFloat | None = None
    top_p: StrictFloat | None = None
    top_k: StrictInt | None = None  # extension; not in OpenAI's API
    max_tokens: StrictInt | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | list[StrictStr] | None = Field(None, json_schema_extra=STOP_SCHEMA)
    n: StrictInt = Field(default=1, ge=1, le=MAX_N)
    seed: StrictInt | None = None
    user: StrictStr | None = None
    # OpenAI's penalties and logit_bias (sampling.penalize_logits), within OpenAI's bounds
    frequency_penalty: StrictFloat | None = Field(None, ge=-MAX_PENALTY, le=MAX_PENALTY)
    presence_penalty: StrictFloat | None = Field(None, ge=-MAX_PENALTY, le=MAX_PENALTY)
    logit_bias: dict[str, StrictFloat] | None = Field(None, json_schema_extra=LOGIT_BIAS_SCHEMA)
    # vLLM's extensions that benchmark and eval tools send: ignore_eos (the reply runs to max_tokens) and
    # min_tokens (no end before that many tokens) are implemented; the rest are known so that a value that
    # would change the result is a 400 instead of an ignored unknown field, and accepted in no-op values.
    ignore_eos: StrictBool | None = None
    min_tokens: StrictInt | None = Field(None, ge=0)
    repetition_penalty: StrictFloat | None = Field(None, json_schema_extra={"anyOf": [{"const": 1}, {"type": "null"}]})
    min_p: StrictFloat | None = Field(None, json_schema_extra=ZERO_ONLY)
    best_of: StrictInt | None = Field(None, json_schema_extra={"anyOf": [{"const": 1}, {"type": "null"}]})
    use_beam_search: StrictBool | None = Field(None, json_schema_extra={"anyOf": [{"const": False}, {"type": "null"}]})
    stop_token_ids: list[StrictInt] | None = Field(None, json_schema_extra={"maxItems": 0})
    guided_json: Any = Field(None, json_schema_extra={"type": "null"})
    guided_regex: Any = Field(None, json_schema_extra={"type": "null"})
    guided_choice: Any = Field(None, json_schema_extra={"type": "null"})
    guided_grammar: Any = Field(None, json_schema_extra={"type": "null"})

    @field_validator("stop", mode="before")
    @classmethod
    def _check_stop(cls, value):
        return _check_stop_value(value)

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, value):
        if value is None:
            return value
        if len(value) > MAX_LOGIT_BIAS_TOKENS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS_TOKENS} tokens may be biased, got {len(value)}")
        for token, bias in value.items():
            if not token.isdigit():
                raise ValueError(f"keys must be token ids (digit strings), got {token!r}")
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise ValueError(f"biases must be between -{MAX_LOGIT_BIAS:g} and {MAX_LOGIT_BIAS:g}, got {bias}")
        return value

    @field_validator("use_beam_search")
    @classmethod
    def _false_only(cls, value, info):
        return value if value is None else _must_be(value, [False], info.field_name)

    @field_validator("min_p")
    @classmethod
    def _zero_only(cls, value, info):
        return value if value is None else _must_be(value, [0], info.field_name)

    @field_validator("repetition_penalty", "best_of")
    @classmethod
    def _one_only(cls, value, info):
        return value if value is None else _must_be(value, [1], info.field_name)

    @field_validator("stop_token_ids")
    @classmethod
    def _no_stop_token_ids(cls, value):
        if value:
            raise ValueError("stop_token_ids is not supported (would change the result); send [] or omit it")
        return value

    @field_validator("guided_json", "guided_regex", "guided_choice", "guided_grammar")
    @classmethod
    def _no_guided_decoding(cls, value, info):
        if value is not None:
            raise ValueError(f"{info.field_name} (guided decoding) is not supported (would change the result); "
                             "use response_format")
        return value


class JsonSchemaFormat(_Model):
    name: StrictStr
    description: StrictStr | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")  # {} = any JSON value
    strict: StrictBool | None = None


class ResponseFormat(_Model):
    """OpenAI's response_format: text (no constraint), any JSON object, or JSON matching a schema."""
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self):
        if (self.json_schema is not None) != (self.type == "json_schema"):
            raise ValueError("json_schema is given with type 'json_schema', and only then")
        return self

    def as_dict(self):
        """None for text; else the JSON form nanochat/grammar.py compiles (and a Ticket carries)."""
        return None if self.type == "text" else self.model_dump(by_alias=True, exclude_none=True)


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = None
    # logprobs of each reply token, with top_logprobs alternatives (sampling.token_logprobs)
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    # structured outputs: replies constrained to JSON (nanochat/grammar.py); the schema is checked by the app
    response_format: ResponseFormat | None = None
    # Accepted only in their no-op values (see the validators below).
    tools: list[Any] | None = Field(None, json_schema_extra={"maxItems": 0})
    tool_choice: StrictStr | dict[str, Any] | None = Field(None, json_schema_extra=NO_TOOL_CHOICE)
    parallel_tool_calls: StrictBool | None = None
    functions: list[Any] | None = Field(None, json_schema_extra={"maxItems": 0})
    function_call: StrictStr | dict[str, Any] | None = Field(None, json_schema_extra=NO_TOOL_CHOICE)
    store: StrictBool | None = None
    metadata: dict[str, StrictStr] | None = None  # only stored by OpenAI; harmless to drop
    service_tier: StrictStr | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, value, info):
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs=true")
        return value

    @field_validator("tools", "functions")
    @classmethod
    def _no_tools(cls, value, info):
        if value:
            raise ValueError(f"{info.field_name} are not supported (would change the result); send none")
        return value

    @field_validator("tool_choice", "function_call")
    @classmethod
    def _no_tool_choice(cls, value, info):
        return value if value is None else _must_be(value, ["none", "auto"], info.field_name)


TokenIds = list[StrictInt]


class CompletionRequest(_GenerationRequest):
    """OpenAI's legacy text completions: a prompt (text or token ids, one or several) continued as it is."""
    prompt: StrictStr | list[StrictStr] | TokenIds | list[TokenIds] = Field(json_schema_extra={"anyOf": [
        {"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1},
        {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
        {"type": "array", "items": {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
         "minItems": 1}]})
    echo: StrictBool = False
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # how many alternatives per token
    suffix: StrictStr | None = Field(None, json_schema_extra={"anyOf": [{"const": ""}, {"type": "null"}]})

    @field_validator("prompt")
    @classmethod
    def _prompts_not_empty(cls, value):
        if not isinstance(value, list):
            return value
        if not value or any(isinstance(p, list) and not p for p in value):
            raise ValueError("prompt must not be an empty list")
        ids = [t for p in value for t in (p if isinstance(p, list) else [p]) if isinstance(t, int)]
        if any(t < 0 for t in ids):
            raise ValueError("token ids must be >= 0")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value):
        if value:
            raise ValueError("suffix (insertion) is not supported (would change the result); send null")
        return value

    def prompts(self):
        """The prompt as a list of prompts, each a string or a list of token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(p, int) for p in self.prompt):
            return [self.prompt]
        return list(self.prompt)


UNION_TAGS = {"str", "int", "float", "bool"}  # pydantic adds the failing union member's type to the loc


def _param_from_loc(loc):
    """('messages', 0, 'content') -> 'messages[0].content' (OpenAI's param style)."""
    param = ""
    for part in loc:
        if isinstance(part, str) and (part in UNION_TAGS or "[" in part):
            continue
        param += f"[{part}]" if isinstance(part, int) else (f".{part}" if param else str(part))
    return param or None


def _validate(model, body):
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        param = _param_from_loc(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        raise RequestError(f"{param}: {msg}" if param else msg, param) from None


def parse_request(body):
    """dict (decoded JSON) -> ChatCompletionRequest, or RequestError naming the first bad field."""
    return _validate(ChatCompletionRequest, body)


def parse_completion_request(body):
    """dict -> CompletionRequest, or RequestError naming the first bad field."""
    return _validate(CompletionRequest, body)


def ignored_fields(request):
    """The unknown fields a request carried, in OpenAI's param style: ['ignore_this', 'messages[0].x']."""
    names = list(request.model_extra or {})
    for i, message in enumerate(getattr(request, "messages", [])):
        names += [f"messages[{i}].{name}" for name in message.model_extra or {}]
    return names


def conversation_turns(messages):
    """
    [(role, text, index of its first message)]: developer messages count as system, an assistant's null
    content as "", and consecutive messages of one role are joined by a blank line (OpenAI's API accepts
    them; our chat template alternates user and assistant).
    """
    turns = []
    for i, m in enumerate(messages):
        role = "system" if m.role == "developer" else m.role
        if turns and turns[-1][0] == role:
            turns[-1] = (role, turns[-1][1] + "\n\n" + m.text, turns[-1][2])
        else:
            turns.append((role, m.text, i))
    return turns


# ----------------------------------------------------------------------------- checks against server config

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def resolve_max_tokens(request, config):
    """
    max_completion_tokens (current OpenAI name) wins over the deprecated max_tokens; both set must agree.
    Text completions default to OpenAI's 16 tokens and allow 0 with echo (score the prompt only).
    """
    a, b = getattr(request, "max_completion_tokens", None), request.max_tokens
    if a is not None and b is not None and a != b:
        raise RequestError("max_tokens and max_completion_tokens disagree; send one", "max_tokens")
    param, value = ("max_completion_tokens", a) if a is not None else ("max_tokens", b)
    if value is None:
        return COMPLETIONS_DEFAULT_MAX_TOKENS if isinstance(request, CompletionRequest) else config.default_max_tokens
    lowest = 0 if getattr(request, "echo", False) else 1
    if not lowest <= value <= config.max_tokens_limit:
        raise RequestError(f"{param} must be between {lowest} and {config.max_tokens_limit}, got {value}"
                           + (" (0 only with echo)" if isinstance(request, CompletionRequest) and value == 0 else ""),
                           param)
    return value


def resolve_sampling(request, config):
    """(temperature, top_k, top_p) with server defaults filled in, checked against the config bounds."""
    t = config.default_temperature if request.temperature is None else request.temperature
    k = config.default_top_k if request.top_k is None else request.top_k
    p = config.default_top_p if request.top_p is None else request.top_p
    try:
        validate_sampling_params(t, k, p, max_temperature=config.max_temperature, max_top_k=config.max_top_k)
    except ValueError as e:
        raise RequestError(str(e), str(e).split(" ", 1)[0]) from None  # its messages start with the name
    for name, value, lo, hi in (("temperature", t, config.min_temperature, config.max_temperature),
                                ("top_k", k, config.min_top_k, config.max_top_k),
                                ("top_p", p, config.min_top_p, config.max_top_p)):
        if not lo <= value <= hi:
            raise RequestError(f"{name} must be between {lo} and {hi}, got {value}", name)
    return t, k, p


def resolve_penalties(request, vocab_size, max_tokens):
    """
    sampling.penalize_logits' keyword arguments for this request (eos_ids aside: the scheduler knows them),
    or None when nothing would change. ignore_eos holds the end back for the whole reply (max_tokens).
    """
    bias = {int(token): float(b) for token, b in (request.logit_bias or {}).items() if b}
    if any(token >= vocab_size for token in bias):
        raise RequestError(f"logit_bias: token ids must be below the vocabulary size {vocab_size}", "logit_bias")
    if request.min_tokens and request.min_tokens > max_tokens:
        raise RequestError(f"min_tokens ({request.min_tokens}) exceeds max_tokens ({max_tokens})", "min_tokens")
    frequency, presence = request.frequency_penalty or 0.0, request.presence_penalty or 0.0
    min_tokens = max_tokens if request.ignore_eos else request.min_tokens or 0
    if not (frequency or presence or bias or min_tokens):
        return None
    return {"frequency_penalty": frequency, "presence_penalty": presence, "logit_bias": bias or None,
            "min_tokens": min_tokens}


def resolve_logprobs(request):
    """How many alternatives to report with each token's logprob, or None for no logprobs."""
    if isinstance(request, CompletionRequest):
        return request.logprobs
    return (request.top_logprobs or 0) if request.logprobs else None


def _check_conversation(messages):
    """Optional leading system turn, then user/assistant turns alternating, ending with the user."""
    turns = conversation_turns(messages)
    if (wrong := role_order_error([role for role, _, _ in turns])) is not None:
        t, expected = wrong
        role, _, i = turns[t]
        where = "only the first messages may be system messages" if role == "system" else \
            "the conversation must start with the user after any system messages"
        raise RequestError(f"messages[{i}].role: expected {expected!r}, got {messages[i].role!r} ({where})",
                           f"messages[{i}].role")
    if turns[-1][0] != "user":
        raise RequestError("the last message must be from the user", "messages")


def validate_against_config(request, config):
    """Size limits, max_tokens and sampling bounds from the server config; raises RequestError."""
    msgs = request.messages
    if len(msgs) > config.max_messages:
        raise RequestError(f"too many messages: {len(msgs)} > {config.max_messages}", "messages")
    total = 0
    for i, m in enumerate(msgs):
        n = len(m.text)
        if n > config.max_message_chars:
            raise RequestError(f"messages[{i}].content is too long: {n} > {config.max_message_chars} characters",
                               f"messages[{i}].content")
        total += n
    if total > config.max_total_chars:
        raise RequestError(f"conversation is too long: {total} > {config.max_total_chars} characters", "messages")
    resolve_max_tokens(request, config)
    resolve_sampling(request, config)
    _check_conversation(msgs)


def validate_completion_against_config(request, config):
    """The text prompts' size (token-id prompts are checked against the model by the app); raises RequestError."""
    texts = [p for p in request.prompts() if isinstance(p, str)]
    total = sum(map(len, texts))
    if total > config.max_total_chars:
        raise RequestError(f"prompt is too long: {total} > {config.max_total_chars} characters", "prompt")
    resolve_max_tokens(request, config)
    resolve_sampling(request, config)


# ----------------------------------------------------------------------------- responses

class Usage(_Model):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ResponseMessage(_Model):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None  # required by OpenAI's schema; this server never refuses in-band


class TopLogprob(_Model):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(_Model):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(_Model):
    content: list[TokenLogprob] | None
    refusal: None = None


class Choice(_Model):
    index: int
    message: ResponseMessage
    finish_reason: Literal["stop", "length"]
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionResponse(_Model):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(_Model):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(_Model):
    index: int
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(_Model):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None  # only on the final chunk, when stream_options.include_usage


class CompletionLogprobs(_Model):
    """Legacy completions' logprobs: one entry per token; with echo the prompt's first token has no logprob."""
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(_Model):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None  # None in the stream chunks before a choice's last


class CompletionResponse(_Model):
    """Both the response and each stream chunk (OpenAI's legacy completions use one shape for both)."""
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None  # in a stream only on the last chunk, with stream_options.include_usage


class ModelCard(_Model):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "nanochat"


class ModelList(_Model):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ----------------------------------------------------------------------------- batch API (nanochat's own)

MAX_BATCH_REQUESTS = 64


class BatchItem(_Model):
    messages: list[ChatMessage] = Field(min_length=1)


class BatchCompletionRequest(_Model):
    """Several conversations generated together with shared sampling settings: one result per request."""
    model: StrictStr | None = None
    requests: list[BatchItem] = Field(min_length=1, max_length=MAX_BATCH_REQUESTS)
    temperature: StrictFloat | None = None
    top_p: StrictFloat | None = None
    top_k: StrictInt | None = None
    max_tokens: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = Field(None, json_schema_extra=STOP_SCHEMA)
    seed: StrictInt | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _check_stop(cls, value):
        return _check_stop_value(value)


    def as_chat_requests(self):
        """One ChatCompletionRequest per item, so each is checked exactly like a /v1/chat/completions body."""
        shared = self.model_dump(exclude={"requests"}, exclude_none=True)
        return [ChatCompletionRequest(messages=item.messages, **shared) for item in self.requests]


def parse_batch_request(body):
    """dict -> BatchCompletionRequest, or RequestError naming the first bad field."""
    return _validate(BatchCompletionRequest, body)


class BatchResult(_Model):
    index: int
    message: ResponseMessage
    finish_reason: Literal["stop", "length"]
    usage: Usage


class BatchCompletionResponse(_Model):
    id: str
    object: Literal["batch.completion"] = "batch.completion"
    created: int
    model: str
    results: list[BatchResult]
    usage: Usage


class ErrorDetail(_Model):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Model):
    error: ErrorDetail
