"""
The real server (scripts/chat_web.py under uvicorn on a free loopback port) with a tiny checkpoint,
driven with the official openai SDK and httpx.
"""

import asyncio
import json
import time

import httpx
import openai
import pytest
import torch

from tests.server_utils import PROMPT, RunningServer, make_chat_checkpoint, openai_response_validator

pytestmark = pytest.mark.slow
API_KEY = "nc-test-4f9a8b7c6d5e4f3a2b1c"
USER = [{"role": "user", "content": PROMPT}]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("serve_base")
    tokenizer = make_chat_checkpoint(str(base))
    return base, tokenizer


@pytest.fixture(scope="module")
def server(base_dir):
    # many tests share this server within a minute: its rate limit is not what they test (keyed_server's is)
    with RunningServer(base_dir[0], env={"NANOCHAT_RATE_LIMIT_MAX_REQUESTS": "100000"}) as s:
        yield s


@pytest.fixture(scope="module")
def keyed_server(base_dir):
    env = {"NANOCHAT_API_KEYS": API_KEY, "NANOCHAT_RATE_LIMIT_MAX_REQUESTS": "6"}
    with RunningServer(base_dir[0], "--cors-origins", "https://app.example", env=env) as s:
        yield s


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="not-needed", max_retries=0, timeout=60)


def prompt_tokens(tokenizer, messages=USER):
    return len(tokenizer.render_for_completion({"messages": messages + [{"role": "assistant", "content": ""}]}))


def error_of(response, status):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    return body["error"]


# ---------------------------------------------------------------------------------------------- OpenAI SDK

def test_non_stream_with_usage(client, base_dir):
    r = client.chat.completions.create(model="sft-d2", messages=USER, max_tokens=16, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "sft-d2"
    assert len(r.choices) == 1 and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.content
    assert r.usage.prompt_tokens == prompt_tokens(base_dir[1])
    assert r.usage.completion_tokens == 16 and r.usage.total_tokens == r.usage.prompt_tokens + 16


def test_stream_matches_non_stream(client):
    plain = client.chat.completions.create(model="sft-d2", messages=USER, max_completion_tokens=24, temperature=0)
    chunks = list(client.chat.completions.create(model="sft-d2", messages=USER, max_completion_tokens=24,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens


def test_stream_ends_with_done_line(server):
    body = {"messages": USER, "max_tokens": 5, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    assert "usage" not in json.loads(lines[-2][6:])  # no usage chunk unless asked for


def test_n_samples_in_one_request(client):
    r = client.chat.completions.create(model="sft-d2", messages=USER, max_tokens=12, temperature=1.0, n=3, seed=1)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) > 1
    assert r.usage.completion_tokens == sum(12 if c.finish_reason == "length" else 0 for c in r.choices) or \
        r.usage.completion_tokens <= 36
    stream = list(client.chat.completions.create(model="sft-d2", messages=USER, max_tokens=8, temperature=1.0,
                                                 n=2, seed=1, stream=True))
    roles = [c.choices[0].index for c in stream if c.choices and c.choices[0].delta.role == "assistant"]
    assert sorted(roles) == [0, 1]
    assert sorted(c.choices[0].index for c in stream if c.choices and c.choices[0].finish_reason) == [0, 1]


def test_seed_reproducibility(client):
    def sample(seed):
        return client.chat.completions.create(model="sft-d2", messages=USER, max_tokens=20, temperature=1.0,
                                              seed=seed).choices[0].message.content
    first = sample(1234)
    assert sample(1234) == first
    assert sample(-5) == sample(-5) and sample(10**30) == sample(10**30)  # any JSON integer is a seed
    assert any(sample(s) != first for s in (1, 2, 3))


def test_stop_sequences(client):
    full = client.chat.completions.create(model="sft-d2", messages=USER, max_tokens=60, temperature=0)
    text = full.choices[0].message.content
    stop = text[20:24]
    expected = text[:text.index(stop)]
    r = client.chat.completions.create(model="sft-d2", messages=USER, max_tokens=60, temperature=0,
                                       stop=[stop, "never appears"])
    assert r.choices[0].message.content == expected and r.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(model="sft-d2", messages=USER, max_tokens=60, temperature=0,
                                                 stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]


def test_models_list_and_retrieve(client):
    assert [m.id for m in client.models.list()] == ["sft-d2"]
    assert client.models.retrieve("sft-d2").id == "sft-d2"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("gpt-4")


def test_text_parts_and_system_message(client):
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hello, "}, {"type": "text", "text": "you"}]}]
    r = client.chat.completions.create(model="sft-d2", messages=messages, max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_sdk_raises_typed_errors(client):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="sft-d2", messages=USER, temperature=5.0)


def test_any_model_name_is_echoed_and_client_shapes_are_accepted(client, server):
    """One model is served: any name reaches it and is echoed. The response has message.refusal (null), as
    OpenAI's schema requires; developer messages, null assistant content and repeated roles are accepted."""
    messages = [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "user", "content": "there"}, {"role": "assistant", "content": None},
                {"role": "user", "content": "ok?"}]
    r = client.chat.completions.create(model="nanochat", messages=messages, max_tokens=3, temperature=0)
    assert r.model == "nanochat" and r.choices[0].message.refusal is None
    stream = client.chat.completions.create(model="gpt-4", messages=USER, max_tokens=3, stream=True)
    assert {chunk.model for chunk in stream} == {"gpt-4"}
    raw = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                     json={"messages": USER, "max_tokens": 2, "request_tag": "a", "ignore_this": 1})
    assert raw.status_code == 200 and raw.headers["x-ignored-fields"] == "request_tag, ignore_this"
    odd = httpx.post(server.url + "/v1/completions", timeout=30, json={"prompt": "a", "max_tokens": 1, "": 1, "é\n": 2})
    assert odd.status_code == 200 and odd.headers["x-ignored-fields"] == '"", "\\u00e9\\n"'  # a header stays ASCII
    assert raw.json()["choices"][0]["message"]["refusal"] is None


def test_logit_bias_and_penalties_reach_the_sampler(client, base_dir):
    tokenizer = base_dir[1]
    token = tokenizer.encode(" the")[0]
    r = client.chat.completions.create(model="m", messages=USER, max_tokens=5, temperature=0,
                                       logit_bias={str(token): 100})
    assert tokenizer.encode(r.choices[0].message.content) == tokenizer.encode(" the" * 5)
    plain = client.chat.completions.create(model="m", messages=USER, max_tokens=12, temperature=0)
    penalized = client.chat.completions.create(model="m", messages=USER, max_tokens=12, temperature=0,
                                               frequency_penalty=2.0, presence_penalty=2.0)
    assert penalized.choices[0].message.content != plain.choices[0].message.content


def test_continuous_usage_stats_put_usage_in_every_chunk(server):
    body = {"messages": USER, "max_tokens": 6, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    completion = [c["usage"]["completion_tokens"] for c in chunks]
    assert all("usage" in c for c in chunks) and completion == sorted(completion) and completion[-1] > 0
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == \
        chunks[-1]["usage"]["prompt_tokens"] + completion[-1]


def test_chat_logprobs(client, base_dir):
    """Greedy: each reply token is its position's most likely; the tokens' bytes spell the reply; streamed the same."""
    r = client.chat.completions.create(model="m", messages=USER, max_tokens=8, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 8 and r.choices[0].logprobs.refusal is None
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob) and entry.logprob <= 0
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
    assert bytes(b for entry in content for b in entry.bytes).decode(errors="replace") == r.choices[0].message.content
    chunks = list(client.chat.completions.create(model="m", messages=USER, max_tokens=8, temperature=0,
                                                 logprobs=True, top_logprobs=3, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    assert not client.chat.completions.create(model="m", messages=USER, max_tokens=2).choices[0].logprobs


def test_ignore_eos_and_min_tokens(client, base_dir):
    """With the end of a reply made certain (logit_bias), ignore_eos still runs to max_tokens and min_tokens
    holds the end back for exactly that many tokens."""
    end = {str(base_dir[1].encode_special("<|assistant_end|>")): 100}
    ended = client.chat.completions.create(model="m", messages=USER, max_tokens=10, logit_bias=end)
    assert ended.usage.completion_tokens == 0 and ended.choices[0].finish_reason == "stop"
    forced = client.chat.completions.create(model="m", messages=USER, max_tokens=10, logit_bias=end,
                                            extra_body={"ignore_eos": True})
    assert forced.usage.completion_tokens == 10 and forced.choices[0].finish_reason == "length"
    held = client.chat.completions.create(model="m", messages=USER, max_tokens=10, logit_bias=end,
                                          extra_body={"min_tokens": 4})
    assert held.usage.completion_tokens == 4 and held.choices[0].finish_reason == "stop"
    text = client.completions.create(model="m", prompt="hello", max_tokens=6, logit_bias=end,
                                     extra_body={"ignore_eos": True})
    assert text.usage.completion_tokens == 6


# ---------------------------------------------------------------------------------------------- structured outputs

# Every string, number and array bounded: the tiny random model would otherwise write one string until
# max_tokens (a grammar decides what may come, not when a free-form value ends).
REPLY_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["name", "age", "mood", "tags", "address"],
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "mood": {"enum": ["happy", "sad", "calm"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "address": {"type": "object", "additionalProperties": False, "required": ["city", "verified"],
                    "properties": {"city": {"type": "string", "maxLength": 8}, "verified": {"type": "boolean"}}},
    },
}


def test_50_constrained_replies_parse_and_validate(client):
    import jsonschema
    fmt = {"type": "json_schema", "json_schema": {"name": "reply", "schema": REPLY_SCHEMA, "strict": True}}
    replies = [choice for seed in range(5) for choice in client.chat.completions.create(
        model="m", messages=USER, response_format=fmt, n=10, seed=seed, temperature=1.0, max_tokens=300).choices]
    assert len(replies) == 50
    for choice in replies:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), REPLY_SCHEMA)
    assert len({choice.message.content for choice in replies}) > 40  # sampled, not one reply repeated


def test_structured_outputs_with_the_sdk_parse(client):
    from typing import Annotated, Literal

    from pydantic import BaseModel, Field

    class Person(BaseModel):
        name: str = Field(max_length=10)
        age: int = Field(ge=0, le=120)
        mood: Literal["happy", "sad"]
        tags: list[Annotated[str, Field(max_length=5)]] = Field(max_length=2)

    r = client.beta.chat.completions.parse(model="m", messages=USER, response_format=Person, temperature=0,
                                           max_tokens=200)
    person = r.choices[0].message.parsed
    assert isinstance(person, Person) and person.mood in ("happy", "sad") and len(person.tags) <= 2
    fmt = {"type": "json_schema", "json_schema": {"name": "Person", "schema": Person.model_json_schema() | {
        "additionalProperties": False}}}
    whole = client.chat.completions.create(model="m", messages=USER, temperature=0, max_tokens=200,
                                           response_format=fmt)
    streamed = client.chat.completions.create(model="m", messages=USER, temperature=0, max_tokens=200, stream=True,
                                              response_format=fmt)
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == whole.choices[0].message.content and Person.model_validate_json(text)


def test_json_mode_and_unconstrained_neighbours(server, client):
    """json_object gives a JSON object; a constrained row in the batch leaves the other rows' replies as
    they are alone."""
    body = {"messages": USER, "max_tokens": 40, "temperature": 0}
    alone = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()

    async def together():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            return await asyncio.gather(*[http.post("/v1/chat/completions", json=body | extra) for extra in (
                {}, {"response_format": {"type": "json_object"}, "max_tokens": 300}, {})])
    plain, json_mode, plain_again = [r.json() for r in asyncio.run(together())]
    assert plain["choices"] == alone["choices"] == plain_again["choices"]
    if json_mode["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(json_mode["choices"][0]["message"]["content"]), dict)
    else:  # a free-form string still running at max_tokens: what there is begins a JSON object
        assert json_mode["choices"][0]["message"]["content"].startswith("{")


@pytest.mark.parametrize("response_format, message", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}}, "frobnicate"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(["}}}, "schema"),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}, "name"),
])
def test_bad_schemas_are_400(server, response_format, message):
    error = error_of(httpx.post(server.url + "/v1/chat/completions", timeout=30, json={
        "messages": USER, "response_format": response_format}), 400)
    assert error["param"].startswith("response_format") and message in error["message"]
    error = error_of(httpx.post(server.url + "/v1/chat/completions", timeout=30, json={
        "messages": USER, "response_format": {"type": "json_object"}, "ignore_eos": True}), 400)
    assert error["param"] == "response_format"


# ---------------------------------------------------------------------------------------------- text completions

def served_model(base_dir):
    from nanochat.checkpoint_manager import build_model
    import os
    model, _ = build_model(os.path.join(base_dir[0], "chatsft_checkpoints", "d2"), 1, torch.device("cpu"), "eval")
    return model


def test_completions_with_the_sdk(client, base_dir):
    tokenizer = base_dir[1]
    r = client.completions.create(model="m", prompt=["the quick", "hello"], n=2, max_tokens=5, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == "m"
    assert [c.index for c in r.choices] == [0, 1, 2, 3] and all(c.finish_reason == "length" for c in r.choices)
    assert r.choices[0].text == r.choices[1].text and r.choices[2].text == r.choices[3].text  # greedy
    bos = tokenizer.get_bos_token_id()
    assert r.usage.prompt_tokens == len(tokenizer.encode("the quick")) + len(tokenizer.encode("hello")) + 2
    assert r.usage.completion_tokens == 20
    ids = [bos] + tokenizer.encode("the quick")  # token ids are taken as given: the same prompt
    same = client.completions.create(model="m", prompt=ids, max_tokens=5, temperature=0)
    assert same.choices[0].text == r.choices[0].text
    default = client.completions.create(model="m", prompt="hello", temperature=0)
    assert default.usage.completion_tokens == 16  # OpenAI's default max_tokens


def test_completions_echo_logprobs_are_the_models(client, base_dir):
    """echo + logprobs + max_tokens 0 (how lm-eval scores a continuation): the prompt's logprobs are the
    model's own log-softmax at each position; the chosen token is always among top_logprobs."""
    from nanochat.common import autocast_context
    tokenizer = base_dir[1]
    ids = [tokenizer.get_bos_token_id()] + tokenizer.encode("hello world, how are you today?")
    r = client.completions.create(model="m", prompt=ids, max_tokens=0, echo=True, logprobs=2, temperature=0)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == tokenizer.decode(ids) and r.usage.completion_tokens == 0
    assert lp.tokens == [tokenizer.decode([t]) for t in ids] and lp.token_logprobs[0] is None
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(ids))]
    with torch.no_grad(), autocast_context("cpu"):
        expected = torch.log_softmax(served_model(base_dir)(torch.tensor([ids]))[0, :-1].float(), dim=-1)
    for i, token in enumerate(ids[1:]):
        assert lp.token_logprobs[i + 1] == pytest.approx(float(expected[i, token]), abs=2e-2)
        assert lp.tokens[i + 1] in lp.top_logprobs[i + 1] and len(lp.top_logprobs[i + 1]) in (2, 3)
    text = client.completions.create(model="m", prompt="hello world", max_tokens=3, echo=True, logprobs=0,
                                     temperature=0)
    assert text.choices[0].text.startswith("hello world")  # the BOS the server adds is neither echoed nor scored
    assert "".join(text.choices[0].logprobs.tokens) == text.choices[0].text
    assert None not in text.choices[0].logprobs.token_logprobs


def test_completions_stream_matches_non_stream(client):
    kwargs = dict(model="m", prompt=["hello", "the quick"], max_tokens=6, temperature=0, logprobs=1, echo=True)
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    for choice in whole.choices:
        parts = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == choice.index]
        assert "".join(p.text for p in parts) == choice.text
        assert [p.finish_reason for p in parts][-1] == choice.finish_reason
        assert [t for p in parts for t in p.logprobs.tokens] == choice.logprobs.tokens
        assert [o for p in parts for o in p.logprobs.text_offset] == choice.logprobs.text_offset
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_every_response_shape_validates_against_openai_schema(server):
    """OpenAI's official schema (tests/data/openai_schemas.json) for chat and text completions, whole and
    streamed, with and without logprobs, models and errors."""
    def post(route, body):
        return httpx.post(server.url + route, json=body, timeout=60)

    def events(route, body):
        with httpx.stream("POST", server.url + route, json=body | {"stream": True}, timeout=60) as r:
            return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]

    chat, text = {"messages": USER, "max_tokens": 4}, {"prompt": ["hello", "the"], "max_tokens": 4}
    shapes = {
        "CreateChatCompletionResponse": [post("/v1/chat/completions", chat | extra).json() for extra in (
            {}, {"n": 2, "logprobs": True, "top_logprobs": 2})],
        "CreateChatCompletionStreamResponse": [e for extra in ({}, {"logprobs": True, "stream_options": {
            "include_usage": True, "continuous_usage_stats": True}}) for e in events("/v1/chat/completions",
                                                                                      chat | extra)],
        "CreateCompletionResponse": [post("/v1/completions", text | extra).json() for extra in (
            {}, {"echo": True, "logprobs": 2}, {"echo": True, "logprobs": 0, "max_tokens": 0})] + [
            e for extra in ({}, {"echo": True, "logprobs": 1, "stream_options": {"include_usage": True}})
            for e in events("/v1/completions", text | extra)],
        "ListModelsResponse": [httpx.get(server.url + "/v1/models").json()],
        "Model": [httpx.get(server.url + "/v1/models/sft-d2").json()],
        "ErrorResponse": [post("/v1/chat/completions", {"messages": []}).json(),
                          post("/v1/completions", {"prompt": "a", "suffix": "b"}).json(),
                          httpx.get(server.url + "/v1/models/other").json()],
    }
    for name, bodies in shapes.items():
        validator = openai_response_validator(name)
        for body in bodies:
            errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(body)]
            assert not errors, (name, body, errors)


# ---------------------------------------------------------------------------------------------- other routes

def test_ui_route_streams_tokens(server):
    body = {"messages": USER, "max_tokens": 10, "temperature": 0}
    with httpx.stream("POST", server.url + "/chat/completions", json=body, timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert all("token" in e for e in events[:-1]) and events[-1]["done"] is True
    assert events[-1]["finish_reason"] == "length" and events[-1]["usage"]["completion_tokens"] == 10
    plain = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()
    assert "".join(e["token"] for e in events[:-1]) == plain["choices"][0]["message"]["content"]


def test_batch_completions(server):
    requests = [{"messages": USER}, {"messages": [{"role": "user", "content": "the quick brown fox"}]},
                {"messages": USER}]
    r = httpx.post(server.url + "/v1/batch/completions", json={"requests": requests, "temperature": 0,
                                                                "max_tokens": 12}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "batch.completion" and [x["index"] for x in body["results"]] == [0, 1, 2]
    single = httpx.post(server.url + "/v1/chat/completions", json={"messages": USER, "temperature": 0,
                                                                   "max_tokens": 12}, timeout=60).json()
    assert body["results"][0]["message"]["content"] == single["choices"][0]["message"]["content"]
    assert body["results"][2]["message"]["content"] == body["results"][0]["message"]["content"]
    assert body["usage"]["completion_tokens"] == sum(x["usage"]["completion_tokens"] for x in body["results"])
    error = error_of(httpx.post(server.url + "/v1/batch/completions", json={"requests": [
        {"messages": USER}, {"messages": [{"role": "assistant", "content": "hi"}]}]}), 400)
    assert error["param"].startswith("requests[1].messages")


def test_health_and_metrics(server):
    health = httpx.get(server.url + "/health").json()
    assert health["ready"] is True and health["replicas"][0]["device"] == "cpu" and health["auth"] == "off"
    assert {"running", "queued"} <= set(health)
    httpx.post(server.url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 3}, timeout=60)
    metrics = httpx.get(server.url + "/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    for name in ("nanochat_requests_total", "nanochat_prompt_tokens_total", "nanochat_completion_tokens_total",
                 "nanochat_time_to_first_token_seconds_bucket", "nanochat_request_tokens_per_second_count",
                 "nanochat_queued_requests", "nanochat_speculative_acceptance_rate"):
        assert name in metrics.text
    assert 'nanochat_requests_total{route="/v1/chat/completions",status="200"}' in metrics.text


def test_ui_page_has_server_bounds(server):
    page = httpx.get(server.url + "/").text
    assert "__NANOCHAT_UI_CONFIG__" not in page and '"max": 2.0' in page and '"auth_required": false' in page


def test_request_log_line(server):
    httpx.post(server.url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 2}, timeout=60)
    time.sleep(0.2)
    line = [ln for ln in server.log().splitlines() if "/v1/chat/completions 200" in ln][-1]
    for field in ("prompt_tokens=", "completion_tokens=2", "ttft_ms=", "total_ms=", "tokens_per_second="):
        assert field in line


# ---------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("body,param", [
    ({"messages": USER, "temperature": 2.5}, "temperature"),
    ({"messages": USER, "top_p": 0}, "top_p"),
    ({"messages": USER, "top_k": -1}, "top_k"),
    ({"messages": USER, "max_tokens": 0}, "max_tokens"),
    ({"messages": USER, "max_tokens": 100000}, "max_tokens"),
    ({"messages": USER, "n": 0}, "n"),
    ({"messages": USER, "logprobs": "yes"}, "logprobs"),
    ({"messages": USER, "top_logprobs": 2}, "top_logprobs"),
    ({"messages": USER, "min_tokens": 8, "max_tokens": 4}, "min_tokens"),
    ({"messages": USER, "frequency_penalty": 2.5}, "frequency_penalty"),
    ({"messages": USER, "logit_bias": {"99999999": 5}}, "logit_bias"),
    ({"messages": USER, "response_format": {"type": "regex"}}, "response_format.type"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x" * 9000}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "hello world " * 600}]}, "messages"),  # > 1024 context tokens
    ({"messages": USER, "stop": ""}, "stop"),
    ({"messages": USER, "temperature": "hot"}, "temperature"),
])
def test_bad_requests_are_400(server, body, param):
    error = error_of(httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60), 400)
    assert error["param"] == param and error["type"] == "invalid_request_error"


@pytest.mark.parametrize("body,param", [
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "suffix": "end"}, "suffix"),
    ({"prompt": [1, 2, 99999]}, "prompt"),
    ({"prompt": [[1], [2, 99999]]}, "prompt[1]"),
    ({"prompt": [1] * 1024}, "prompt"),  # no room left in the 1024-token context
    ({"prompt": ["a"] * 20, "n": 2}, "n"),  # 40 rows > the batch
    ({"prompt": "hi", "logprobs": 21}, "logprobs"),
    ({"prompt": "hi", "temperature": 3}, "temperature"),
    ({}, "prompt"),
])
def test_bad_completion_requests_are_400(server, body, param):
    error = error_of(httpx.post(server.url + "/v1/completions", json=body, timeout=60), 400)
    assert error["param"] == param and error["type"] == "invalid_request_error"


def test_malformed_bodies_and_unknown_routes(server):
    error_of(httpx.post(server.url + "/v1/chat/completions", content=b"{not json", timeout=30), 400)
    error_of(httpx.post(server.url + "/v1/chat/completions", json=[1, 2], timeout=30), 400)
    error_of(httpx.post(server.url + "/chat/completions", content=b"\xff\xfe", timeout=30), 400)
    assert error_of(httpx.get(server.url + "/v2/nothing"), 404)["code"] == "not_found"
    error_of(httpx.get(server.url + "/v1/chat/completions"), 405)
    assert error_of(httpx.get(server.url + "/v1/models/nope"), 404)["code"] == "model_not_found"


def test_requests_the_http_parser_rejects_get_an_openai_shaped_400(server):
    """A malformed Content-Length (or header line) never reaches the app: it used to be uvicorn's plain-text 400."""
    import socket
    for head in (b"Content-Length: 12abc", b"Content-Length: -5", b"Content-Length: 3\r\nContent-Length: 4",
                 b"bad header line"):
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n" + head + b"\r\n\r\n{}")
            sock.settimeout(10)
            answer = b""
            while data := sock.recv(65536):  # the server closes the connection after its answer
                answer += data
        head_part, _, body = answer.partition(b"\r\n\r\n")
        assert head_part.startswith(b"HTTP/1.1 400") and b"content-type: application/json" in head_part.lower()
        assert json.loads(body)["error"]["code"] == "bad_http_request"
    assert httpx.post(server.url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 2},
                      timeout=30).status_code == 200


def test_auth_and_rate_limit(keyed_server):
    url = keyed_server.url
    assert httpx.get(url + "/health").status_code == 200  # open without a key
    for route in ("/v1/chat/completions", "/chat/completions", "/v1/batch/completions"):
        assert error_of(httpx.post(url + route, json={"messages": USER}), 401)["message"] == \
            "Missing Authorization header"
        assert error_of(httpx.post(url + route, json={"messages": USER},
                                   headers={"Authorization": "Bearer wrong-key-123456789"}), 401)["message"] == \
            "Invalid API key"
    assert error_of(httpx.get(url + "/v1/models"), 401)["code"] == "missing_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong-key-123456789", max_retries=0).models.list()
    assert '"auth_required": true' in httpx.get(url + "/").text

    good = openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    statuses = []
    for _ in range(8):  # the limit is 6 per window
        r = httpx.post(url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 2},
                       headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
        statuses.append(r.status_code)
    assert statuses[:6] == [200] * 6 and statuses[6:] == [429, 429]
    error = error_of(r, 429)
    assert error["code"] == "rate_limit_exceeded" and int(r.headers["retry-after"]) >= 1
    with pytest.raises(openai.RateLimitError):
        good.chat.completions.create(model="sft-d2", messages=USER, max_tokens=2)


def test_cross_site_and_rebinding_requests_are_refused(server, keyed_server):
    """With auth off, any web page (or a DNS-rebinding name) used to make the local server generate."""
    body = {"messages": USER, "max_tokens": 2}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, headers={"Origin": "https://evil.example"})
    assert error_of(r, 403)["code"] == "origin_not_allowed"
    r = httpx.post(server.url + "/v1/chat/completions", json=body, headers={"Host": f"rebind.example:{server.port}"})
    assert error_of(r, 403)["code"] == "host_not_allowed"
    assert httpx.post(server.url + "/chat/completions", json=body, headers={"Origin": server.url}).status_code == 200

    # --cors-origins: that origin gets CORS answers (preflight included), any other is still refused
    preflight = httpx.options(keyed_server.url + "/v1/chat/completions", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == "https://app.example"
    r = httpx.get(keyed_server.url + "/v1/models", headers={"Origin": "https://app.example",
                                                           "Authorization": f"Bearer {API_KEY}"})
    assert r.headers["access-control-allow-origin"] == "https://app.example"  # (200, or 429 after the tests above)
    r = httpx.get(keyed_server.url + "/v1/models", headers={"Origin": "https://evil.example",
                                                           "Authorization": f"Bearer {API_KEY}"})
    assert error_of(r, 403)["code"] == "origin_not_allowed" and "access-control-allow-origin" not in r.headers


def test_failed_logins_are_rate_limited_per_address(keyed_server):
    """Wrong keys used to be answered 401 forever, at request speed (unbounded guessing)."""
    url, statuses = keyed_server.url, []
    for i in range(20):  # the default limit is 10 wrong keys per window per address (test_auth_and_rate_limit sent 4)
        r = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer wrong-key-{i:016d}"})
        statuses.append(r.status_code)
        if r.status_code == 429:
            break
    assert statuses[0] == 401 and statuses[-1] == 429 and set(statuses[:-1]) == {401}
    assert error_of(r, 429)["code"] == "too_many_failed_logins" and int(r.headers["retry-after"]) >= 1
    r = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})  # even the right key waits
    assert error_of(r, 429)["code"] == "too_many_failed_logins"


def test_overload_is_503_with_retry_after(base_dir):
    env = {"NANOCHAT_MAX_QUEUED_REQUESTS": "0", "NANOCHAT_MAX_CONCURRENT_REQUESTS": "1"}
    with RunningServer(base_dir[0], "--max-batch-size", "1", env=env) as s:
        long_body = {"messages": USER, "max_tokens": 1000, "temperature": 0, "stream": True}
        with httpx.stream("POST", s.url + "/v1/chat/completions", json=long_body, timeout=60) as held:
            lines = held.iter_lines()  # keep a reference: a collected line iterator closes the response
            next(lines)  # generating: the only slot is taken
            for _ in range(20):  # refused before auth and body, and not logged one by one
                r = httpx.post(s.url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 2}, timeout=30)
                assert error_of(r, 503)["code"] == "overloaded" and int(r.headers["retry-after"]) >= 1
            assert s.log().count("completions 503") + s.log().count("refused") <= 1
        # the slot frees once the holder disconnects
        deadline = time.monotonic() + 10
        while httpx.get(s.url + "/health").json()["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.post(s.url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 2},
                          timeout=30).status_code == 200


# ---------------------------------------------------------------------------------------------- concurrency

def generated_tokens(server):
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith("nanochat_generated_tokens "):
            return float(line.split()[1])
    raise AssertionError("nanochat_generated_tokens missing from /metrics")


def test_disconnect_mid_stream_frees_the_slot(server):
    before = generated_tokens(server)
    body = {"messages": USER, "max_tokens": 1000, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
    deadline = time.monotonic() + 5
    while httpx.get(server.url + "/health").json()["running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert httpx.get(server.url + "/health").json()["running"] == 0
    after = generated_tokens(server)
    time.sleep(0.5)
    assert generated_tokens(server) == after  # nothing generated once the row left
    assert after - before < 1000  # the reply was cut short, not run to max_tokens


def test_disconnect_before_the_first_chunk_frees_the_slot(server):
    """The client sends its request and hangs up without reading: the sequence must not run to max_tokens."""
    import socket
    before = generated_tokens(server)
    body = json.dumps({"messages": USER, "max_tokens": 1000, "temperature": 0, "stream": True}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        time.sleep(0.05)
        if httpx.get(server.url + "/health").json()["running"] == 0 and generated_tokens(server) > before:
            break
    assert httpx.get(server.url + "/health").json()["running"] == 0
    assert generated_tokens(server) - before < 1000


def concurrent_streams(server, temperatures, max_tokens=24):
    """One streamed request per temperature, all at once, through the openai SDK (it raises on an error event)."""
    async def one(client, temperature, seed):
        text, finish = "", None
        stream = await client.chat.completions.create(model="sft-d2", messages=USER, max_tokens=max_tokens,
                                                      temperature=temperature, seed=seed, stream=True)
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        return text, finish

    async def main():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
        return await asyncio.gather(*(one(client, t, seed) for seed, t in enumerate(temperatures)))

    return asyncio.run(main())


def test_32_concurrent_streams_all_complete(server):
    results = concurrent_streams(server, [0.8] * 32)
    assert len(results) == 32 and all(finish in ("stop", "length") for _, finish in results)
    assert sum(finish == "length" for _, finish in results) >= 16


def test_a_subnormal_temperature_harms_no_concurrent_stream(server, client):
    """temperature=1e-40 overflowed logits / temperature: sampling raised and every stream of the batch failed."""
    results = concurrent_streams(server, [0.8, 0.8, 0.8, 1e-40, 0.8, 0.8, 0.8, 0.8])
    assert [finish for _, finish in results] == ["length"] * 8
    greedy = client.chat.completions.create(model="sft-d2", messages=USER, max_tokens=24, temperature=0)
    assert results[3][0] == greedy.choices[0].message.content


def test_huge_stop_sequences_are_refused(server):
    """Four 200,000-character stops with n=16 used to stall the event loop for seconds on every token."""
    body = {"model": "sft-d2", "messages": USER, "n": 16, "max_tokens": 64, "stop": ["x" * 200_000] * 4}
    assert error_of(httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30), 400)["param"] == "stop"
    assert httpx.get(server.url + "/health", timeout=5).json()["status"] == "ok"


def test_a_chunked_body_is_refused_at_the_limit(server):
    """A chunked upload (no Content-Length) used to be read whole, however big, before the 1 MiB check."""
    import socket
    chunk = b"x" * 65536
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        for _ in range(17):  # just past 1 MiB, and the body never ends: the answer must not wait for its end
            sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        response = b""
        while b"request_too_large" not in response and (data := sock.recv(65536)):
            response += data
    assert response.startswith(b"HTTP/1.1 413") and b"request_too_large" in response


@pytest.mark.parametrize("body", [b"[" * 5000 + b"]" * 5000, b'{"messages": ' + b"[" * 1200 + b"]" * 1200 + b"}",
                                  b'{"model": "sft-d2", "max_tokens": ' + b"9" * 5000 + b"}"])
def test_deep_nesting_and_huge_integers_are_400(server, body):
    """JSON nested 1,000+ levels (RecursionError) and 5,000-digit integers used to give 500 and a traceback."""
    seen = len(server.log())
    r = httpx.post(server.url + "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"},
                   timeout=30)
    assert error_of(r, 400)["message"]
    assert "Traceback" not in server.log()[seen:]


def test_the_ui_route_refuses_several_replies(server):
    """Its events carry no row index: with n > 1 every reply used to be interleaved into one stream."""
    body = {"messages": USER, "n": 2, "max_tokens": 4}
    assert error_of(httpx.post(server.url + "/chat/completions", json=body, timeout=30), 400)["param"] == "n"


def test_unfinished_requests_time_out(base_dir, tmp_path):
    """Silent connections, partial headers and short bodies used to stay open forever."""
    import socket
    config = tmp_path / "timeouts.json"
    config.write_text(json.dumps({"header_timeout_seconds": 1, "body_timeout_seconds": 1}))

    def closed_within(sock, seconds):
        """True if the server closes the connection within `seconds` (what it sent before is returned too)."""
        sock.settimeout(seconds)
        received = b""
        try:
            while data := sock.recv(65536):
                received += data
        except TimeoutError:
            return False, received
        return True, received

    with RunningServer(base_dir[0], "--config", str(config)) as server:
        address = ("127.0.0.1", server.port)
        with socket.create_connection(address) as silent, socket.create_connection(address) as partial, \
                socket.create_connection(address) as short:
            partial.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            short.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 100\r\n\r\n{\"messages\": ")
            assert closed_within(silent, 5) == (True, b"")
            assert closed_within(partial, 5) == (True, b"")
            done, answer = closed_within(short, 5)
            assert done and answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer
        r = httpx.post(server.url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 2}, timeout=30)
        assert r.status_code == 200  # a prompt client is served as before


def open_stream(url, max_tokens=1000):
    """A streaming chat request whose response has begun; returns its lines iterator."""
    client = httpx.Client(timeout=60)
    request = client.build_request("POST", url + "/v1/chat/completions", json={
        "messages": USER, "max_tokens": max_tokens, "temperature": 0, "stream": True})
    return client.send(request, stream=True).iter_lines()


def wait_for_health(server, **expected):
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        health = httpx.get(server.url + "/health").json()
        if all(health[k] == v for k, v in expected.items()):
            return
        time.sleep(0.05)
    raise AssertionError(f"health never reached {expected}: {health}")


def test_shutdown_refuses_queued_at_once_and_ends_running_at_the_deadline(base_dir):
    """SIGTERM used to keep admitting queued work, and a second signal did nothing."""
    import signal
    # a short deadline: a fast CPU generates the streams' 1000 tokens in about a second
    with RunningServer(base_dir[0], "--max-batch-size", "2", "--shutdown-timeout", "0.2") as server:
        streams = [open_stream(server.url) for _ in range(4)]
        wait_for_health(server, running=2, queued=2)
        server.process.send_signal(signal.SIGTERM)
        outputs = ["\n".join(lines) for lines in streams]
        assert server.process.wait(timeout=30) == 0
        log = server.log()
    def got_tokens(out):
        chunks = [json.loads(line[6:]) for line in out.splitlines() if line.startswith("data: {")]
        return any(c.get("delta", {}).get("content") for chunk in chunks for c in chunk.get("choices", []))
    assert sum(map(got_tokens, outputs)) == 2  # the other two were queued: they never got a token
    for out in outputs:
        assert "[DONE]" not in out and "the server is shutting down" in out.splitlines()[-1]
    assert "shutdown deadline: ending 2 running sequence(s)" in log

    with RunningServer(base_dir[0], "--shutdown-timeout", "60") as server:
        lines = open_stream(server.url)
        wait_for_health(server, running=1)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        server.process.send_signal(signal.SIGTERM)  # the second signal: exit now
        assert server.process.wait(timeout=15) == 0
        received = []
        with pytest.raises(httpx.RemoteProtocolError):  # cut mid-stream, not served to its end
            received.extend(lines)
        assert "[DONE]" not in "\n".join(received)
        assert "second signal: exiting now" in server.log()


# ---------------------------------------------------------------------------------------------- CLI

def test_refuses_public_host_without_keys(base_dir, tmp_path, run_main, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base_dir[0]))
    assert "without API keys" in run_main("scripts.chat_web", ["--host", "0.0.0.0"], expect=1)
    bad = tmp_path / "config.json"
    bad.write_text('{"rate_limit_max_requests": "many"}')
    assert "rate_limit_max_requests" in run_main("scripts.chat_web", ["--config", str(bad)], expect=1)
    assert "max_temperature" in run_main("scripts.chat_web", ["--max-temperature", "9"], expect=1)
    assert "CUDA" in run_main("scripts.chat_web", ["--num-gpus", "2", "--device-type", "cpu"], expect=1)
    # a non-ASCII key could never authenticate (headers arrive Latin-1 decoded): refused at start-up
    monkeypatch.setenv("NANOCHAT_API_KEYS", "nc-schlüssel-4f9a8b7c6d5e4f3a")
    assert "printable ASCII" in run_main("scripts.chat_web", [], expect=1)


def test_speculative_server_is_exact(base_dir, server):
    body = {"messages": USER, "max_tokens": 40, "temperature": 0}
    plain = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()
    with RunningServer(base_dir[0], "--speculative-proposals", "3", "--draft-model-tag", "ngram") as s:
        fast = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=60).json()
        metrics = httpx.get(s.url + "/metrics").text
    assert fast["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]
    drafted = [ln for ln in metrics.splitlines() if ln.startswith("nanochat_speculative_drafted_tokens ")]
    assert float(drafted[0].split()[1]) > 0
