"""
The HTTP server: FastAPI routes over the continuous-batching schedulers.

    GET  /                       the chat UI (ui.html with the server's sampling bounds filled in)
    POST /chat/completions       the UI's streaming endpoint
    POST /v1/chat/completions    OpenAI Chat Completions (stream and non-stream)
    POST /v1/completions         OpenAI's legacy text completions (prompt text or token ids; echo, logprobs)
    GET  /v1/models              the served model
    GET  /v1/models/{model}      its card (404 for other names; chat requests accept any name and echo it)
    POST /v1/batch/completions   several conversations generated together
    GET  /health, GET /metrics   readiness and Prometheus metrics (no key needed)

Every generation route goes through the same steps: API key -> rate limit -> parse and validate ->
render the prompt -> submit a Ticket -> read its events. Each route is a plain function that reads the
server's state from request.app.state.nanochat; responses are built from protocol.py's pydantic models
(the same ones the OpenAPI schema shows), and errors always have OpenAI's body shape.
"""

import asyncio
import json
import logging
import re
import threading
import time
import uuid
from importlib.resources import files

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanochat.grammar import GrammarCompiler
from nanochat.serving.auth import AuthError, MissingKey, check_api_key
from nanochat.serving.metrics import ServerMetrics
from nanochat.serving.origins import OriginGuard
from nanochat.serving.protocol import (
    BatchCompletionRequest,
    BatchCompletionResponse,
    BatchResult,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Delta,
    ErrorResponse,
    ModelCard,
    ModelList,
    RequestError,
    ResponseMessage,
    TokenLogprob,
    TopLogprob,
    Usage,
    conversation_turns,
    error_body,
    ignored_fields,
    parse_batch_request,
    parse_completion_request,
    parse_request,
    resolve_logprobs,
    resolve_max_tokens,
    resolve_penalties,
    resolve_sampling,
    validate_against_config,
    validate_completion_against_config,
)
from nanochat.serving.ratelimit import SlidingWindowRateLimiter, retry_after_header
from nanochat.serving.tickets import Overloaded, Ticket
from nanochat.serving.streaming import TextStream

logger = logging.getLogger("nanochat.serving")
IGNORED_FIELDS_HEADER = "X-Ignored-Fields"
UI_CONFIG_PLACEHOLDER = "/*__NANOCHAT_UI_CONFIG__*/null"
MAX_BODY_BYTES = 1 << 20  # far above any request the config limits allow; bigger bodies are refused unread
DISCONNECT_POLL_SECONDS = 0.5
GENERATION_ROUTES = ("/v1/chat/completions", "/v1/completions", "/chat/completions", "/v1/batch/completions")
SHED_LOG_SECONDS = 10


class APIError(Exception):
    """Any client-facing failure: becomes a JSON error body with this status (and headers)."""

    def __init__(self, status, message, type="invalid_request_error", param=None, code=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}


class GenerationFailed(Exception):
    """The scheduler reported an error for this request (e.g. out of memory); the server itself goes on."""


class ServerState:
    """What every route reads (request.app.state.nanochat): the replicas, the config, limiters and metrics."""

    def __init__(self, schedulers, tokenizer, config, model_name, page):
        self.schedulers, self.tokenizer, self.config, self.model_name = schedulers, tokenizer, config, model_name
        self.page = page  # the chat UI's HTML
        self.context_len = schedulers[0].context_len
        self.max_batch_size = schedulers[0].max_rows
        self.vocab_size = tokenizer.get_vocab_size()
        # the tokens that end a reply (the calculator's RowState knows them) and the front's grammar compiler,
        # which checks response_format schemas before a request is queued
        self.stop_token_ids = sorted(tokenizer.terminal_token_ids())
        self.grammars = None
        self.created = int(time.time())
        self.limiter = SlidingWindowRateLimiter(config.rate_limit_max_requests, config.rate_limit_window_seconds)
        self.failed_logins = SlidingWindowRateLimiter(config.max_failed_logins, config.rate_limit_window_seconds)
        self.metrics = ServerMetrics(schedulers)
        self.draining = False

    def begin_shutdown(self, timeout):
        """
        The server was told to stop: new requests get 503 and queued ones an error event at once; running
        streams may finish for `timeout` seconds, then the rest end with an error event and one log line.
        """
        logger.info(f"shutting down: refusing new requests, running streams have {timeout:g} s to finish")
        self.draining = True
        for scheduler in self.schedulers:
            scheduler.drain()

        def deadline():
            running = sum(s.rows_in_use() for s in self.schedulers)
            if running:
                logger.warning(f"shutdown deadline: ending {running} running sequence(s) with an error event")
                for scheduler in self.schedulers:
                    scheduler.end_running()
        timer = threading.Timer(timeout, deadline)
        timer.daemon = True
        timer.start()


# ---------------------------------------------------------------------------------------------- helpers

def _error_response(status, message, type, param=None, code=None, headers=None):
    return JSONResponse(error_body(message, type, param, code), status_code=status, headers=headers)


def _authorize(state, request):
    """
    The caller's key id; raises 401 for a missing/wrong key and 429 past the rate limit. An address that
    sent max_failed_logins wrong keys in the window gets 429 for any key until the window frees a slot,
    so keys cannot be guessed at request speed.
    """
    address = request.client.host if request.client else "unknown"
    locked_for = state.failed_logins.retry_after(address) if state.config.valid_api_keys else 0
    if locked_for:
        raise APIError(429, f"too many failed logins from {address}; retry later", "rate_limit_error",
                       code="too_many_failed_logins", headers={"Retry-After": retry_after_header(locked_for)})
    try:
        caller = check_api_key(request.headers.get("authorization"), state.config.valid_api_keys)
    except MissingKey as e:
        raise APIError(401, str(e), "invalid_request_error", code="missing_api_key",
                       headers={"WWW-Authenticate": "Bearer"}) from None
    except AuthError as e:
        state.failed_logins.check(address)
        raise APIError(401, str(e), "invalid_request_error", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"}) from None
    allowed, retry_after = state.limiter.check(caller)
    if not allowed:
        raise APIError(429, f"rate limit exceeded: at most {state.config.rate_limit_max_requests} requests per "
                       f"{state.config.rate_limit_window_seconds:g} s", "rate_limit_error", code="rate_limit_exceeded",
                       headers={"Retry-After": retry_after_header(retry_after)})
    return caller


async def _read_json(state, request):
    """
    The request's JSON body, read only up to MAX_BODY_BYTES (also when it arrives chunked, without a
    length) and only for body_timeout_seconds (a client that announces more than it sends is cut off).
    """
    too_large = APIError(413, f"request body too large (limit {MAX_BODY_BYTES} bytes)", code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_large
    body = bytearray()
    try:
        async with asyncio.timeout(state.config.body_timeout_seconds):
            async for chunk in request.stream():
                body += chunk
                if len(body) > MAX_BODY_BYTES:
                    raise too_large
    except TimeoutError:
        raise APIError(408, f"request body not received within {state.config.body_timeout_seconds:g} s",
                       code="request_timeout", headers={"Connection": "close"}) from None
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "request body is not valid JSON") from None
    except ValueError:  # Python refuses to read integers of more than 4300 digits
        raise APIError(400, "request body has an integer of more than 4300 digits") from None
    except RecursionError:
        raise APIError(400, "request body is nested too deeply") from None


def _bad_request(e):
    return APIError(400, e.message, param=e.param, code="invalid_value" if e.param else None)


MAX_IGNORED_NAMED = 20
PLAIN_NAME = re.compile(r"[A-Za-z0-9_.\[\]-]+")


def _ignored_headers(request_model, route):
    """
    Unknown request fields are ignored, named in the log and in a response header (as vLLM does). A name
    that is not plain (letters, digits, _ . [ ] -) is written as a JSON string: a header value must be
    printable ASCII without edge whitespace. Only the first MAX_IGNORED_NAMED are listed.
    """
    ignored = ignored_fields(request_model)
    if not ignored:
        return {}
    names = ", ".join(name if PLAIN_NAME.fullmatch(name) else json.dumps(name) for name in ignored[:MAX_IGNORED_NAMED])
    names += f", ... ({len(ignored)} in all)" if len(ignored) > MAX_IGNORED_NAMED else ""
    logger.warning(f"{route}: ignored unknown field(s) {names}")
    return {IGNORED_FIELDS_HEADER: names}


def _render_prompt(state, messages, param="messages"):
    conversation = {"messages": [{"role": role, "content": text} for role, text, _ in conversation_turns(messages)] +
                    [{"role": "assistant", "content": ""}]}
    prompt = state.tokenizer.render_for_completion(conversation)
    if len(prompt) >= state.context_len:
        raise APIError(400, f"the prompt is {len(prompt)} tokens but the model's context is {state.context_len} "
                       "tokens, leaving no room for a reply; shorten the conversation", param=param,
                       code="context_length_exceeded")
    return prompt


def _response_format(state, req):
    """The request's JSON response_format (None for text), compiled once here so a bad schema is a 400."""
    fmt = req.response_format.as_dict() if req.response_format else None
    if fmt is None:
        return None
    if req.ignore_eos or req.min_tokens:
        raise RequestError("ignore_eos and min_tokens cannot be combined with response_format (the reply ends "
                           "where its JSON does)", "response_format")
    if state.grammars is None:
        state.grammars = GrammarCompiler(state.tokenizer, state.stop_token_ids, state.vocab_size)
    try:
        state.grammars.compile(fmt)
    except ValueError as e:
        raise RequestError(f"response_format: {e}", "response_format") from None
    return fmt


def _prepare_chat(state, body):
    """Validated request -> (request, prompt tokens, max_tokens, (temperature, top_k, top_p), ticket options)."""
    try:
        req = parse_request(body)
        validate_against_config(req, state.config)
        max_tokens, sampling = resolve_max_tokens(req, state.config), resolve_sampling(req, state.config)
        options = dict(penalties=resolve_penalties(req, state.vocab_size, max_tokens),
                       logprobs=resolve_logprobs(req), response_format=_response_format(state, req))
    except RequestError as e:
        raise _bad_request(e) from None
    if req.n > state.max_batch_size:
        raise APIError(400, f"n={req.n} exceeds the server's batch size {state.max_batch_size}", param="n")
    return req, _render_prompt(state, req.messages), max_tokens, sampling, options


def _completion_prompts(state, req, max_tokens):
    """
    The prompts as token ids: text is encoded after a BOS (as documents were in pretraining), token ids are
    taken as they are. Each must leave room for max_tokens >= 1 (with 0, it may fill the context).
    """
    prompts, given = [], req.prompts()
    for i, p in enumerate(given):
        param = "prompt" if len(given) == 1 else f"prompt[{i}]"
        if isinstance(p, str):
            p = state.tokenizer.encode(p, prepend="<|bos|>")
        elif max(p) >= state.vocab_size:
            raise APIError(400, f"{param}: token ids must be below the vocabulary size {state.vocab_size}",
                           param=param, code="invalid_value")
        room = 1 if max_tokens else 0
        if len(p) + room > state.context_len:
            raise APIError(400, f"{param} is {len(p)} tokens but the model's context is {state.context_len} tokens"
                           + (", leaving no room for a completion" if room else ""), param=param,
                           code="context_length_exceeded")
        prompts.append(p)
    if len(prompts) * req.n > state.max_batch_size:
        raise APIError(400, f"{len(prompts)} prompt(s) x n={req.n} exceed the server's batch size "
                       f"{state.max_batch_size}", param="n")
    return prompts


def _prepare_completion(state, body):
    """Validated text completion request -> (request, prompts as token ids, max_tokens, sampling, ticket options)."""
    try:
        req = parse_completion_request(body)
        validate_completion_against_config(req, state.config)
        max_tokens, sampling = resolve_max_tokens(req, state.config), resolve_sampling(req, state.config)
        options = dict(penalties=resolve_penalties(req, state.vocab_size, max_tokens), logprobs=req.logprobs,
                       prompt_logprobs=req.echo and req.logprobs is not None)
    except RequestError as e:
        raise _bad_request(e) from None
    return req, _completion_prompts(state, req, max_tokens), max_tokens, sampling, options


def _overloaded(e):
    return APIError(503, "the server is at capacity; retry later", "server_error", code="overloaded",
                    headers={"Retry-After": retry_after_header(e.retry_after)})


def _shutting_down():
    return APIError(503, "the server is shutting down", "server_error", code="shutting_down")


def _refusal(state):
    """The 503 a generation request gets now (shutting down, or no replica could queue one row), or None."""
    if state.draining:
        return _shutting_down()
    probe = Ticket([[0]], 1, 1, 0.0, None, None)  # the smallest request: one row
    alive = [s for s in state.schedulers if s.alive]
    if all(s.queued(extra=probe) > s.max_queued_requests for s in alive):
        return _overloaded(min((Overloaded.of(s, s.queued()) for s in alive), key=lambda e: e.retry_after,
                               default=Overloaded(5)))
    return None


class Shedder:
    """
    ASGI middleware: past capacity, a generation request is refused here, before routing, auth and its body.
    Under a flood of clients the refusals must cost next to nothing, or answering them takes the CPU (and,
    with the scheduler in this process, the GIL) from the streams already admitted: through the full
    FastAPI stack with a log line each, 100 refusals/s cost a 2-core server a third of its token rate.
    Refusals are counted in /metrics and summed up in one log line per SHED_LOG_SECONDS.
    """

    def __init__(self, app, state):
        self.app, self.state = app, state
        self.refused, self.logged_at = 0, time.monotonic()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in GENERATION_ROUTES:
            refusal = _refusal(self.state)
            if refusal is not None:
                self.state.metrics.requests.labels(scope["path"], "503").inc()
                self._log_now_and_then(refusal)
                body = json.dumps(error_body(refusal.message, refusal.type, code=refusal.code)).encode()
                headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                headers += [(k.lower().encode(), v.encode()) for k, v in refusal.headers.items()]
                await send({"type": "http.response.start", "status": 503, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)

    def _log_now_and_then(self, refusal):
        self.refused += 1
        now = time.monotonic()
        if now - self.logged_at >= SHED_LOG_SECONDS:
            logger.info(f"refused {self.refused} request(s) in the last {now - self.logged_at:.0f} s: {refusal.message}")
            self.refused, self.logged_at = 0, now


def _submit(state, prompts, num_samples, max_tokens, sampling, seed, **options):
    """options: the Ticket's penalties, logprobs, prompt_logprobs, response_format."""
    if state.draining:  # began while the body was read
        raise _shutting_down()
    ticket = Ticket(prompts, num_samples, max_tokens, *sampling, seed=seed, **options)
    alive = [s for s in state.schedulers if s.alive] or state.schedulers  # a dead worker answers 503 itself
    scheduler = min(alive, key=lambda s: s.load())  # the least busy replica
    try:
        scheduler.submit(ticket)
    except Overloaded as e:
        raise _overloaded(e) from None
    ticket.scheduler = scheduler
    return ticket


def _stop_list(stop):
    return [stop] if isinstance(stop, str) else list(stop or [])


async def _next_events(ticket, request):
    """Every event list waiting in the ticket's queue (at least one), or None if the client went away."""
    if request is None:  # streaming: Starlette notices a disconnect itself and closes our generator
        events = await ticket.events.get()
    else:
        while True:
            try:
                events = await asyncio.wait_for(ticket.events.get(), DISCONNECT_POLL_SECONDS)
                break
            except TimeoutError:
                if await request.is_disconnected():
                    return None
    while not ticket.events.empty():  # under load the loop falls behind: take all steps at once
        events += ticket.events.get_nowait()
    return events


async def _text_events(ticket, tokenizer, stop, request=None):
    """
    Yields lists of (row, text piece, finish_reason or None) until every row of the ticket has finished;
    the TextStreams (token counts) stay on ticket.streams. One list covers every step that arrived since the
    last, so a busy server writes one network chunk per client per wake-up rather than one per token. With
    a request given (non-streaming), a client that disconnects while waiting ends the generation.
    """
    streams = ticket.streams = [TextStream(tokenizer, stop) for _ in range(ticket.num_rows)]
    open_rows = ticket.num_rows
    while open_rows:
        events = await _next_events(ticket, request)
        if events is None:
            return
        if ticket.first_event_at is None:
            ticket.first_event_at = time.monotonic()
        updates = []
        for kind, row, value in events:
            if kind == "error":
                raise GenerationFailed(value)
            stream = streams[row]
            if stream.stopped:
                continue
            if kind == "logprob":
                stream.logprobs.append(value)
            elif kind == "prompt_logprobs":
                stream.prompt_logprobs = value
            elif kind == "token":
                piece, stopped = stream.add(value)
                if stopped:  # the scheduler drops the row before its next step
                    ticket.scheduler.stop_row(ticket, row)
                    open_rows -= 1
                    updates.append((row, piece, "stop"))
                elif piece:
                    updates.append((row, piece, None))
            else:
                stream.stopped = True
                open_rows -= 1
                updates.append((row, stream.finish(), value))
        if updates:
            yield updates


def _record(state, route, caller, request_id, arrived, ticket, prompt_tokens, status=200, finish=None):
    """Metrics and the one log line of a generation request."""
    now = time.monotonic()
    completion = sum(s.num_tokens for s in getattr(ticket, "streams", []))
    state.metrics.requests.labels(route, str(status)).inc()
    state.metrics.prompt_tokens.inc(prompt_tokens)
    state.metrics.completion_tokens.inc(completion)
    state.metrics.request_duration.observe(now - arrived)
    ttft = None if ticket.first_event_at is None else ticket.first_event_at - arrived
    rate = None
    if ttft is not None:
        state.metrics.time_to_first_token.observe(ttft)
        if completion and now > ticket.first_event_at:
            rate = completion / (now - ticket.first_event_at)
            state.metrics.tokens_per_second.observe(rate)
    logger.info(f"{route} {status} id={request_id} caller={caller} prompt_tokens={prompt_tokens} "
                f"completion_tokens={completion} rows={ticket.num_rows} "
                f"ttft_ms={'-' if ttft is None else f'{ttft * 1000:.0f}'} total_ms={(now - arrived) * 1000:.0f} "
                f"tokens_per_second={'-' if rate is None else f'{rate:.1f}'} finish={finish or '-'}")


# Characters that JSON leaves as they are but Python's str.splitlines() (hence httpx's aiter_lines) treats as line
# breaks: a client reading SSE that way would get a JSON line cut in two. Escaped, the JSON means the same.
_LINE_BREAKS_JSON_KEEPS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _sse(payload):
    return f"data: {payload.translate(_LINE_BREAKS_JSON_KEEPS)}\n\n"


class TicketStreamingResponse(StreamingResponse):
    """
    Cancels its ticket however the response ends, at once. Otherwise an interrupted stream relies on the
    body generator's `finally`, which runs only when the suspended generator is garbage-collected, and
    never for a generator that had not started.
    """

    def __init__(self, content, ticket, headers=None):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", **(headers or {})})
        self.ticket = ticket

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.ticket.scheduler.cancel(self.ticket)


# ---------------------------------------------------------------------------------------------- OpenAPI

def _component_ref(components, model):
    """Put a pydantic model's JSON schema (and the models it uses) in components; return a $ref to it."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(schema.pop("$defs", {}))
    components[model.__name__] = schema
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _number(kind, lo, hi, positive=False):
    bound = {"type": kind, "maximum": hi} | ({"exclusiveMinimum": 0} if positive and lo <= 0 else {"minimum": lo})
    return {"anyOf": [bound, {"type": "null"}]}


def _state_limits(components, config, max_batch_size):
    """The schema carries this server's limits (config bounds, batch size), not just the wire types."""
    sampling = dict(temperature=_number("number", config.min_temperature, config.max_temperature),
                    top_k=_number("integer", config.min_top_k, config.max_top_k),
                    top_p=_number("number", config.min_top_p, config.max_top_p, positive=True),
                    max_tokens=_number("integer", 1, config.max_tokens_limit))
    chat = components["ChatCompletionRequest"]["properties"]
    chat.update(sampling, max_completion_tokens=sampling["max_tokens"])
    chat["n"].update(maximum=min(chat["n"]["maximum"], max_batch_size))
    chat["messages"]["maxItems"] = config.max_messages
    components["BatchCompletionRequest"]["properties"].update(sampling)
    completion = components["CompletionRequest"]["properties"]
    completion.update(sampling, max_tokens=_number("integer", 0, config.max_tokens_limit))
    completion["n"].update(maximum=min(completion["n"]["maximum"], max_batch_size))
    components["BatchCompletionRequest"]["properties"]["requests"]["maxItems"] = min(
        components["BatchCompletionRequest"]["properties"]["requests"]["maxItems"], max_batch_size)
    content = components["ChatMessage"]["properties"]["content"]["anyOf"]
    content[0]["maxLength"] = config.max_message_chars


def _openapi_docs(components, config, max_batch_size):
    """requestBody / responses for routes that read the raw body (so our own validation gives the errors)."""
    error = {"description": "error", "content": {"application/json": {"schema": _component_ref(components, ErrorResponse)}}}
    errors = {str(code): error for code in (400, 401, 403, 404, 408, 413, 429, 503)}
    # one parsed SSE event per item (OpenAPI 3.1 tools read `schema` as the per-event schema); data is JSON text
    sse = {"text/event-stream": {"schema": {"type": "object", "required": ["data"], "properties": {
        "data": {"type": "string", "contentMediaType": "application/json"}}}}}

    def body(model):
        return {"requestBody": {"required": True, "content": {"application/json": {
            "schema": _component_ref(components, model)}}}}

    chat = body(ChatCompletionRequest) | {"responses": {"200": {"description": "a completion, or chunks when "
        "stream=true", "content": {"application/json": {"schema": _component_ref(components, ChatCompletionResponse)},
                                   **sse}}} | errors}
    _component_ref(components, ChatCompletionChunk)  # documented for clients; sent as SSE data lines
    ui = body(ChatCompletionRequest) | {"responses": {"200": {"description": "token events", "content": sse}} | errors}
    completions = body(CompletionRequest) | {"responses": {"200": {"description": "a completion, or chunks of the "
        "same shape when stream=true", "content": {"application/json": {"schema": _component_ref(
            components, CompletionResponse)}, **sse}}} | errors}
    batch = body(BatchCompletionRequest) | {"responses": {"200": {"description": "one result per request",
        "content": {"application/json": {"schema": _component_ref(components, BatchCompletionResponse)}}}} | errors}
    models = {"responses": {"200": {"description": "the served model", "content": {"application/json": {
        "schema": _component_ref(components, ModelList)}}}, "401": error, "429": error}}
    model = {"responses": {"200": {"description": "the served model's card", "content": {"application/json": {
        "schema": _component_ref(components, ModelCard)}}}, "401": error, "404": error, "429": error}}
    _state_limits(components, config, max_batch_size)
    return dict(chat=chat, completions=completions, ui=ui, batch=batch, models=models, model=model)


# ---------------------------------------------------------------------------------------------- responses

def _usage(prompt_tokens, completion_tokens):
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)


def _chunk(state, meta, choices, usage=None):
    """
    One SSE event of an OpenAI chat stream. A delta's unset fields (role, content) are left out;
    finish_reason and logprobs stay, null until set, as OpenAI's schema requires; usage only when given.
    """
    chunk = ChatCompletionChunk(id=meta["request_id"], created=meta["created"], model=meta["model"],
                                choices=choices, usage=usage).model_dump(exclude={"usage"} if usage is None else None)
    for choice in chunk["choices"]:
        choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
    return _sse(json.dumps(chunk, ensure_ascii=False, separators=(",", ":")))


def _top(tokenizer, token, logprob):
    return TopLogprob(token=tokenizer.decode([token]), logprob=logprob, bytes=list(tokenizer.token_bytes(token)))


def _chat_logprobs(tokenizer, entries):
    """(token, logprob, [(id, logprob)]) entries -> chat's choices[].logprobs."""
    return ChoiceLogprobs(content=[TokenLogprob(**_top(tokenizer, token, lp).model_dump(),
                                                top_logprobs=[_top(tokenizer, i, v) for i, v in top])
                                   for token, lp, top in entries])


def _completion_logprobs(tokenizer, entries, offset=0):
    """
    (token, logprob or None, [(id, logprob)] or None) entries -> (legacy completions' logprobs, the text offset
    after them). Offsets count characters of the choice's text; as OpenAI does, the chosen token is always
    among a position's top_logprobs.
    """
    tokens, offsets, tops = [], [], []
    for token, lp, top in entries:
        text = tokenizer.decode([token])
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        tops.append(None if top is None else {tokenizer.decode([i]): v for i, v in [*top, (token, lp)]})
    return CompletionLogprobs(tokens=tokens, token_logprobs=[lp for _, lp, _ in entries], top_logprobs=tops,
                              text_offset=offsets), offset


def _error_event(e):
    return _sse(json.dumps(error_body(f"{e}; retry later", "server_error", code="generation_failed")))


async def _complete(state, ticket, stop, meta, request):
    """Non-streaming: every row's whole text and finish reason (a 503 if generation failed)."""
    texts, finishes, status = [""] * ticket.num_rows, ["stop"] * ticket.num_rows, 200
    try:
        async for updates in _text_events(ticket, state.tokenizer, _stop_list(stop), request):
            for row, piece, finish in updates:
                texts[row] += piece
                finishes[row] = finish or finishes[row]
    except GenerationFailed as e:
        status = 503
        raise APIError(503, f"{e}; retry later", "server_error", code="generation_failed",
                       headers={"Retry-After": "1"}) from None
    finally:
        _finish(state, ticket, meta, status, ",".join(sorted(set(finishes))))
    return texts, finishes


async def _openai_stream(state, ticket, req, meta):
    status, finishes = 200, set()
    options = req.stream_options
    sent = [0] * ticket.num_rows  # logprob entries already sent per row

    def usage():
        return _usage(meta["prompt_tokens"], sum(s.num_tokens for s in ticket.streams))

    def chunk(row, delta, finish=None):  # continuous_usage_stats (vLLM's extension): the usage so far in every chunk
        logprobs = None
        if req.logprobs and ticket.streams:  # the tokens since this row's last chunk, whether their text is out or not
            entries, sent[row] = ticket.streams[row].logprobs[sent[row]:], len(ticket.streams[row].logprobs)
            logprobs = _chat_logprobs(state.tokenizer, entries)
        choice = ChunkChoice(index=row, delta=delta, finish_reason=finish, logprobs=logprobs)
        return _chunk(state, meta, [choice], usage() if options and options.continuous_usage_stats else None)

    try:
        for i in range(ticket.num_rows):
            yield chunk(i, Delta(role="assistant", content=""))
        async for updates in _text_events(ticket, state.tokenizer, _stop_list(req.stop)):
            out = []
            for row, piece, finish in updates:
                if piece:
                    out.append(chunk(row, Delta(content=piece)))
                if finish:
                    finishes.add(finish)
                    out.append(chunk(row, Delta(), finish))
            if out:
                yield "".join(out)  # several SSE events in one write
        if options and options.include_usage:
            yield _chunk(state, meta, [], usage())
        yield _sse("[DONE]")
    except GenerationFailed as e:
        status = 503
        yield _error_event(e)
    finally:  # also runs when the client disconnects: the ticket's rows leave the batch
        _finish(state, ticket, meta, status if finishes or status != 200 else 499, ",".join(sorted(finishes)))


async def _ui_stream(state, ticket, req, meta):
    """The UI's own wire format: {"token": piece} events, then {"done", "finish_reason", "usage"}."""
    status, finish_reason = 200, None
    try:
        async for updates in _text_events(ticket, state.tokenizer, _stop_list(req.stop)):
            text = "".join(_sse(json.dumps({"token": piece})) for _, piece, _ in updates if piece)
            if text:
                yield text
            finish_reason = next((f for _, _, f in updates if f), finish_reason)
        usage = _usage(meta["prompt_tokens"], sum(s.num_tokens for s in ticket.streams))
        yield _sse(json.dumps({"done": True, "finish_reason": finish_reason, "usage": usage.model_dump()}))
    except GenerationFailed as e:
        status = 503
        yield _error_event(e)
    finally:
        _finish(state, ticket, meta, status if finish_reason or status != 200 else 499, finish_reason)


def _finish(state, ticket, meta, status, finish):
    ticket.scheduler.cancel(ticket)  # a no-op for a finished ticket; frees the rows of one whose client left
    _record(state, meta["route"], meta["caller"], meta["request_id"], meta["arrived"], ticket,
            meta["prompt_tokens"], status, finish)


def _meta(route, caller, arrived, prefix, prompt_tokens, model):
    """What a generation request's response and its log line need. model: the name the client asked for,
    echoed (one model is served: any name reaches it), else the served model's."""
    return dict(route=route, caller=caller, arrived=arrived, created=int(time.time()), model=model,
                request_id=f"{prefix}-{uuid.uuid4().hex[:24]}", prompt_tokens=prompt_tokens)


# ---------------------------------------------------------------------------------------------- routes

async def index(request: Request):
    return HTMLResponse(request.app.state.nanochat.page)


async def health(request: Request):
    state = request.app.state.nanochat
    replicas = [{"name": s.name, "device": str(s.device), "pid": s.pid, "alive": s.alive, "running": s.rows_in_use(),
                 "queued": s.queued(), "generated_tokens": s.counters["generated_tokens"]} for s in state.schedulers]
    ready = all(r["alive"] for r in replicas) and not state.draining
    status = "shutting down" if state.draining else "ok" if ready else "degraded"
    return {"status": status, "ready": ready, "model": state.model_name, "replicas": replicas,
            "running": sum(r["running"] for r in replicas), "queued": sum(r["queued"] for r in replicas),
            "auth": "on" if state.config.valid_api_keys else "off"}


async def metrics(request: Request):
    state = request.app.state.nanochat
    return Response(state.metrics.render(), media_type=state.metrics.content_type)


async def list_models(request: Request):
    state = request.app.state.nanochat
    _authorize(state, request)
    return ModelList(data=[ModelCard(id=state.model_name, created=state.created)]).model_dump()


async def retrieve_model(request: Request, model: str):
    """GET /v1/models/{model}: the served model's card under its own name (chat accepts any name, but
    the list of models stays truthful)."""
    state = request.app.state.nanochat
    _authorize(state, request)
    if model != state.model_name:
        raise APIError(404, f"The model {model!r} does not exist; this server serves {state.model_name!r}",
                       param="model", code="model_not_found")
    return ModelCard(id=state.model_name, created=state.created).model_dump()


async def chat_completions(request: Request):
    """POST /v1/chat/completions: OpenAI's Chat Completions, streamed (SSE) or whole."""
    state, arrived = request.app.state.nanochat, time.monotonic()
    caller = _authorize(state, request)
    req, prompt, max_tokens, sampling, options = _prepare_chat(state, await _read_json(state, request))
    ticket = _submit(state, [prompt], req.n, max_tokens, sampling, req.seed, **options)
    meta = _meta("/v1/chat/completions", caller, arrived, "chatcmpl", len(prompt), req.model or state.model_name)
    headers = _ignored_headers(req, meta["route"])
    if req.stream:
        return TicketStreamingResponse(_openai_stream(state, ticket, req, meta), ticket, headers)
    texts, finishes = await _complete(state, ticket, req.stop, meta, request)
    logprobs = [_chat_logprobs(state.tokenizer, s.logprobs) if req.logprobs else None for s in ticket.streams]
    return JSONResponse(ChatCompletionResponse(
        id=meta["request_id"], created=meta["created"], model=meta["model"],
        choices=[Choice(index=i, message=ResponseMessage(content=text), finish_reason=finish, logprobs=lp)
                 for i, (text, finish, lp) in enumerate(zip(texts, finishes, logprobs))],
        usage=_usage(meta["prompt_tokens"], sum(s.num_tokens for s in ticket.streams))).model_dump(), headers=headers)


def _completion_choices(state, req, ticket, prompts, texts, finishes):
    """Each row's choice; with echo its prompt comes first (text as sent, and its tokens' logprobs)."""
    choices = []
    for row, (text, finish, stream) in enumerate(zip(texts, finishes, ticket.streams)):
        prompt_text, entries = _echo(state, req, prompts, row, stream)
        logprobs = None
        if req.logprobs is not None:
            logprobs, _ = _completion_logprobs(state.tokenizer, entries + stream.logprobs)
        choices.append(CompletionChoice(index=row, text=prompt_text + text, logprobs=logprobs, finish_reason=finish))
    return choices


def _echo(state, req, prompts, row, stream):
    """(the echoed prompt text, its logprob entries): empty without echo. A BOS the server put before a text
    prompt is neither echoed nor scored."""
    if not req.echo:
        return "", []
    given = req.prompts()[row // req.n]
    entries = stream.prompt_logprobs or []
    if isinstance(given, str):
        return given, entries[1:]
    return state.tokenizer.decode(prompts[row // req.n]), entries


async def _completion_stream(state, ticket, req, prompts, meta):
    """Legacy completions streamed: chunks of the response's own shape, one choice each, then [DONE]."""
    status, finishes = 200, set()
    options = req.stream_options
    sent, offsets, echoed = [0] * ticket.num_rows, [0] * ticket.num_rows, [False] * ticket.num_rows

    def chunk(row, piece, finish):
        stream, prefix, entries = ticket.streams[row], "", []
        if not echoed[row]:  # echo: the prompt goes out with the row's first chunk
            echoed[row] = True
            prefix, entries = _echo(state, req, prompts, row, stream)
        entries, sent[row] = entries + stream.logprobs[sent[row]:], len(stream.logprobs)
        logprobs = None
        if req.logprobs is not None:
            logprobs, offsets[row] = _completion_logprobs(state.tokenizer, entries, offsets[row])
        usage = _usage(meta["prompt_tokens"], sum(s.num_tokens for s in ticket.streams)) \
            if options and options.continuous_usage_stats else None
        response = CompletionResponse(id=meta["request_id"], created=meta["created"], model=meta["model"], usage=usage,
                                      choices=[CompletionChoice(index=row, text=prefix + piece, logprobs=logprobs,
                                                                finish_reason=finish)])
        return _sse(response.model_dump_json(exclude={"usage"} if usage is None else None))

    try:
        async for updates in _text_events(ticket, state.tokenizer, _stop_list(req.stop)):
            out = []
            for row, piece, finish in updates:
                out.append(chunk(row, piece, finish))
                finishes.add(finish)
            yield "".join(out)
        if options and options.include_usage:
            usage = _usage(meta["prompt_tokens"], sum(s.num_tokens for s in ticket.streams))
            yield _sse(CompletionResponse(id=meta["request_id"], created=meta["created"], model=meta["model"],
                                          choices=[], usage=usage).model_dump_json())
        yield _sse("[DONE]")
    except GenerationFailed as e:
        status = 503
        yield _error_event(e)
    finally:
        finishes.discard(None)
        _finish(state, ticket, meta, status if finishes or status != 200 else 499, ",".join(sorted(finishes)))


async def completions(request: Request):
    """POST /v1/completions: OpenAI's legacy text completions (prompts continued as they are), streamed or whole."""
    state, arrived = request.app.state.nanochat, time.monotonic()
    caller = _authorize(state, request)
    req, prompts, max_tokens, sampling, options = _prepare_completion(state, await _read_json(state, request))
    ticket = _submit(state, prompts, req.n, max_tokens, sampling, req.seed, **options)
    meta = _meta("/v1/completions", caller, arrived, "cmpl", sum(map(len, prompts)), req.model or state.model_name)
    headers = _ignored_headers(req, meta["route"])
    if req.stream:
        return TicketStreamingResponse(_completion_stream(state, ticket, req, prompts, meta), ticket, headers)
    texts, finishes = await _complete(state, ticket, req.stop, meta, request)
    return JSONResponse(CompletionResponse(
        id=meta["request_id"], created=meta["created"], model=meta["model"],
        choices=_completion_choices(state, req, ticket, prompts, texts, finishes),
        usage=_usage(meta["prompt_tokens"], sum(s.num_tokens for s in ticket.streams))).model_dump(), headers=headers)


async def ui_chat_completions(request: Request):
    """POST /chat/completions: the chat UI's stream of one reply."""
    state, arrived = request.app.state.nanochat, time.monotonic()
    caller = _authorize(state, request)
    req, prompt, max_tokens, sampling, options = _prepare_chat(state, await _read_json(state, request))
    if req.n != 1:  # its token events carry no row: replies would interleave
        raise APIError(400, "the UI route streams one reply: n must be 1 (use /v1/chat/completions for more)",
                       param="n", code="invalid_value")
    ticket = _submit(state, [prompt], 1, max_tokens, sampling, req.seed, **options)
    meta = _meta("/chat/completions", caller, arrived, "chatcmpl", len(prompt), req.model or state.model_name)
    return TicketStreamingResponse(_ui_stream(state, ticket, req, meta), ticket, _ignored_headers(req, meta["route"]))


def _prepare_batch(state, body):
    """Validated batch -> (batch, its requests as chat requests, max_tokens, sampling); each checked like a chat."""
    try:
        batch = parse_batch_request(body)
        chat_requests = batch.as_chat_requests()
        for i, chat_request in enumerate(chat_requests):
            try:
                validate_against_config(chat_request, state.config)
            except RequestError as e:
                if e.param and e.param.startswith("messages"):
                    raise RequestError(f"requests[{i}]: {e.message}", f"requests[{i}].{e.param}") from None
                raise
        max_tokens = resolve_max_tokens(chat_requests[0], state.config)
        sampling = resolve_sampling(chat_requests[0], state.config)
    except RequestError as e:
        raise _bad_request(e) from None
    if len(chat_requests) > state.max_batch_size:
        raise APIError(400, f"{len(chat_requests)} requests exceed the server's batch size {state.max_batch_size}",
                       param="requests")
    return batch, chat_requests, max_tokens, sampling


async def batch_completions(request: Request):
    """POST /v1/batch/completions: several conversations generated together, one result each."""
    state, arrived = request.app.state.nanochat, time.monotonic()
    caller = _authorize(state, request)
    batch, chat_requests, max_tokens, sampling = _prepare_batch(state, await _read_json(state, request))
    prompts = [_render_prompt(state, r.messages, f"requests[{i}].messages") for i, r in enumerate(chat_requests)]
    ticket = _submit(state, prompts, 1, max_tokens, sampling, batch.seed)
    meta = _meta("/v1/batch/completions", caller, arrived, "batch", sum(map(len, prompts)),
                 batch.model or state.model_name)
    texts, finishes = await _complete(state, ticket, batch.stop, meta, request)
    results = [BatchResult(index=i, message=ResponseMessage(content=text), finish_reason=finish,
                           usage=_usage(len(prompt), stream.num_tokens))
               for i, (text, finish, prompt, stream) in enumerate(zip(texts, finishes, prompts, ticket.streams))]
    return BatchCompletionResponse(id=meta["request_id"], created=meta["created"], model=meta["model"],
                                   results=results,
                                   usage=_usage(meta["prompt_tokens"], sum(s.num_tokens for s in ticket.streams))
                                   ).model_dump()


# ---------------------------------------------------------------------------------------------- errors: OpenAI's shape

async def api_error(request, e):
    request.app.state.nanochat.metrics.requests.labels(request.url.path, str(e.status)).inc()
    logger.info(f"{request.url.path} {e.status} {e.message}")
    return _error_response(e.status, e.message, e.type, e.param, e.code, e.headers)


async def http_error(request, e):
    request.app.state.nanochat.metrics.requests.labels("other", str(e.status_code)).inc()
    if e.status_code == 404:
        return _error_response(404, f"Unknown route: {request.method} {request.url.path}",
                               "invalid_request_error", code="not_found")
    return _error_response(e.status_code, str(e.detail), "invalid_request_error", headers=e.headers)


async def validation_error(request, e):
    return _error_response(400, str(e.errors()[0].get("msg", "invalid request")), "invalid_request_error")


async def unexpected_error(request, e):
    logger.exception(f"{request.url.path}: unexpected error")
    return _error_response(500, "internal server error", "server_error")


# ---------------------------------------------------------------------------------------------- the app

def _ui_page(ui_html, config, model_name):
    """ui.html with this server's model and sampling bounds filled in."""
    ui_config = {
        "model": model_name, "auth_required": bool(config.valid_api_keys), "max_tokens": config.default_max_tokens,
        "temperature": {"min": config.min_temperature, "max": config.max_temperature,
                        "default": config.default_temperature, "step": 0.05},
        "top_k": {"min": config.min_top_k, "max": config.max_top_k, "default": config.default_top_k, "step": 1},
        "top_p": {"min": config.min_top_p, "max": config.max_top_p, "default": config.default_top_p, "step": 0.01},
    }
    return ui_html.replace(UI_CONFIG_PLACEHOLDER, json.dumps(ui_config).replace("</", "<\\/"))


def create_app(schedulers, tokenizer, config, model_name, ui_html=None, bound_host=None, cors_origins=()):
    """
    schedulers: one started Scheduler per replica. bound_host: the address the server listens on (a loopback
    one answers loopback Host names only); cors_origins: browser origins allowed besides the server's own
    (serving/origins.py). Returns the FastAPI app.
    """
    ui_html = ui_html or files("nanochat.serving").joinpath("ui.html").read_text(encoding="utf-8")
    state = ServerState(schedulers, tokenizer, config, model_name, _ui_page(ui_html, config, model_name))
    app = FastAPI(title="nanochat", version="1.0", description="Chat with a nanochat model; OpenAI-compatible API.")
    app.state.nanochat = state
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)
    app.add_middleware(Shedder, state=state)
    app.add_middleware(OriginGuard, bound_host=bound_host or "", cors_origins=cors_origins)  # added last: outermost

    components = {}
    docs = _openapi_docs(components, config, schedulers[0].max_rows)
    app.add_api_route("/", index, methods=["GET"], response_class=HTMLResponse, include_in_schema=False)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"], response_class=Response)
    app.add_api_route("/v1/models", list_models, methods=["GET"], openapi_extra=docs["models"])
    app.add_api_route("/v1/models/{model}", retrieve_model, methods=["GET"], openapi_extra=docs["model"])
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"], openapi_extra=docs["chat"])
    app.add_api_route("/v1/completions", completions, methods=["POST"], openapi_extra=docs["completions"])
    app.add_api_route("/chat/completions", ui_chat_completions, methods=["POST"], openapi_extra=docs["ui"])
    app.add_api_route("/v1/batch/completions", batch_completions, methods=["POST"], openapi_extra=docs["batch"])
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected_error)

    def openapi():
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            schema.setdefault("components", {}).setdefault("schemas", {}).update(components)
            app.openapi_schema = schema
        return app.openapi_schema
    app.openapi = openapi
    return app
