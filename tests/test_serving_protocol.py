import pytest

from nanochat.serving.config import ServerConfig
from nanochat.serving.protocol import (
    ChatCompletionChunk,
    ChatCompletionResponse,
    Choice,
    ChunkChoice,
    Delta,
    ModelCard,
    ModelList,
    RequestError,
    ResponseMessage,
    Usage,
    conversation_turns,
    error_body,
    ignored_fields,
    parse_request,
    parse_completion_request,
    resolve_logprobs,
    resolve_max_tokens,
    resolve_penalties,
    resolve_sampling,
    validate_against_config,
    validate_completion_against_config,
)

USER = {"role": "user", "content": "hi"}


def req(**fields):
    return {"model": "nanochat", "messages": [USER], **fields}


def rejected(body):
    with pytest.raises(RequestError) as e:
        parse_request(body)
    return e.value


def test_minimal_and_full_request():
    r = parse_request({"messages": [USER]})
    assert r.n == 1 and r.stream is False and r.stop is None
    r = parse_request(req(temperature=0.5, top_p=0.9, top_k=40, max_tokens=64, stream=True,
                          stream_options={"include_usage": True}, stop=["\n", "END"], n=3, seed=7, user="u1"))
    assert r.stream_options.include_usage and r.stop == ["\n", "END"] and r.seed == 7 and r.top_k == 40


def test_string_and_text_parts_content():
    r = parse_request({"messages": [{"role": "system", "content": [{"type": "text", "text": "be "},
                                                                    {"type": "text", "text": "nice"}]}, USER]})
    assert r.messages[0].text == "be nice" and r.messages[1].text == "hi"


@pytest.mark.parametrize("content", [[{"type": "image_url", "image_url": {"url": "x"}}],
                                     [{"type": "text", "text": "a"}, {"type": "input_audio"}], ["plain"], 5, None])
def test_bad_content_names_field(content):
    e = rejected({"messages": [USER, {"role": "assistant", "content": "ok"}, {"role": "user", "content": content}]})
    assert e.param == "messages[2].content" and "messages[2].content" in e.message


@pytest.mark.parametrize("stop", ["###", ["a"], ["a", "b", "c", "d"], "x" * 256])
def test_stop_accepted(stop):
    assert parse_request(req(stop=stop)).stop == stop


@pytest.mark.parametrize("stop", ["", ["a", ""], ["a", "b", "c", "d", "e"], [1], 3, "x" * 257, ["a", "x" * 257]])
def test_stop_rejected(stop):
    assert rejected(req(stop=stop)).param == "stop"


@pytest.mark.parametrize("n, ok", [(1, True), (16, True), (0, False), (17, False), (True, False), (2.0, False)])
def test_n_bounds(n, ok):
    if ok:
        assert parse_request(req(n=n)).n == n
    else:
        assert rejected(req(n=n)).param == "n"


def test_harmless_fields_accepted():
    parse_request(req(frequency_penalty=0, presence_penalty=0.0, logprobs=False, top_logprobs=0,
                      response_format={"type": "text"}, tools=[], tool_choice="none", parallel_tool_calls=True,
                      functions=None, logit_bias={}, store=False, metadata={"a": "b"}, service_tier="auto"))


@pytest.mark.parametrize("field, value", [
    ("frequency_penalty", 2.5), ("presence_penalty", -3), ("logprobs", "yes"), ("top_logprobs", 21),
    ("top_logprobs", 3),  # without logprobs=true
    ("response_format", {"type": "grammar"}), ("response_format", {"type": "json_schema"}),
    ("tools", [{"type": "function", "function": {"name": "f"}}]),
    ("tool_choice", "required"), ("functions", [{"name": "f"}]), ("logit_bias", {"abc": -100}), ("logit_bias", {"5": 101}), ("logit_bias", {"5": "1"}),
    ("temperature", "0.5"), ("top_k", 1.5), ("stream", "yes"), ("max_tokens", "10"),
    ("ignore_eos", 1), ("min_tokens", -1), ("repetition_penalty", 1.2), ("min_p", 0.1), ("best_of", 2),
    ("use_beam_search", True), ("stop_token_ids", [3]), ("guided_choice", ["a"]), ("guided_json", {}),
    ("seed", 1.5), ("model", 3), ("tool_choice", 3), ("user", ["u"]), ("stream_options", {"include_usage": True, "extra": 1}),
])
def test_result_changing_or_unknown_fields_rejected(field, value):
    e = rejected(req(**{field: value}))
    assert e.param is not None and e.param.startswith(field) and field in e.message
    assert ".str" not in e.param and "[" not in e.param  # no pydantic union-member tags leak into param


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"), ({}, "messages"), ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
])
def test_bad_messages_named(body, param):
    assert rejected(body).param == param


def test_penalties_and_logit_bias_resolved():
    assert resolve_penalties(parse_request(req(frequency_penalty=0, logit_bias={"3": 0}, min_tokens=0)), 100, 8) is None
    assert resolve_penalties(parse_request(req(presence_penalty=-2, logit_bias={"3": 5, "7": -100.0})), 100, 8) == {
        "frequency_penalty": 0.0, "presence_penalty": -2, "logit_bias": {3: 5.0, 7: -100.0}, "min_tokens": 0}
    with pytest.raises(RequestError) as e:
        resolve_penalties(parse_request(req(logit_bias={"100": 1})), 100, 8)
    assert e.value.param == "logit_bias" and "vocabulary size 100" in e.value.message


def test_ignore_eos_and_min_tokens_resolved():
    """vLLM's extensions: ignore_eos holds the end back for all max_tokens, min_tokens for that many."""
    assert resolve_penalties(parse_request(req(ignore_eos=True)), 100, 8)["min_tokens"] == 8
    assert resolve_penalties(parse_request(req(min_tokens=3)), 100, 8)["min_tokens"] == 3
    assert resolve_penalties(parse_request(req(ignore_eos=False)), 100, 8) is None
    with pytest.raises(RequestError) as e:
        resolve_penalties(parse_request(req(min_tokens=9)), 100, 8)
    assert e.value.param == "min_tokens" and "exceeds max_tokens (8)" in e.value.message


def test_logprobs_resolved():
    assert resolve_logprobs(parse_request(req())) is None
    assert resolve_logprobs(parse_request(req(logprobs=False, top_logprobs=0))) is None
    assert resolve_logprobs(parse_request(req(logprobs=True))) == 0
    assert resolve_logprobs(parse_request(req(logprobs=True, top_logprobs=5))) == 5
    assert resolve_logprobs(parse_completion_request({"prompt": "a", "logprobs": 2})) == 2
    assert rejected(req(logit_bias={str(i): 1 for i in range(301)})).param == "logit_bias"


def test_unknown_fields_are_ignored_and_named():
    request = parse_request(req(unknown_field=1, request_tag="x", ignore_eos=False, min_tokens=0,
                                stream_options={"include_usage": True, "continuous_usage_stats": True},
                                messages=[{"role": "user", "content": "x", "extra": 1}]))
    assert ignored_fields(request) == ["unknown_field", "request_tag", "messages[0].extra"]
    assert ignored_fields(parse_request(req())) == []


def test_clients_conversation_shapes_are_normalized():
    """developer = system, assistant content null = "", consecutive messages of one role joined."""
    messages = parse_request({"messages": [
        {"role": "developer", "content": "Be brief."}, {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "a"}, {"role": "user", "content": [{"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None}, {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "c"}]}).messages
    assert conversation_turns(messages) == [("system", "Be brief.\n\nBe kind.", 0), ("user", "a\n\nb", 2),
                                            ("assistant", "\n\nok", 4), ("user", "c", 6)]
    validate_against_config(parse_request({"messages": messages_as_dicts(messages)}), CFG_LOOSE)


def messages_as_dicts(messages):
    return [m.model_dump() for m in messages]


def test_non_object_body():
    assert rejected([1, 2]).param is None


def test_error_body_shape():
    assert error_body("nope", "invalid_request_error") == {
        "error": {"message": "nope", "type": "invalid_request_error", "param": None, "code": None}}
    assert error_body("m", "t", "temperature", "c") == {
        "error": {"message": "m", "type": "t", "param": "temperature", "code": "c"}}


# ----------------------------------------------------------------------------- against the server config

CFG = ServerConfig(max_messages=5, max_message_chars=10, max_total_chars=25, max_tokens_limit=100,
                   max_temperature=1.5, max_top_k=100, min_top_p=0.1)
CFG_LOOSE = ServerConfig()


def check(**fields):
    with pytest.raises(RequestError) as e:
        validate_against_config(parse_request(req(**fields)), CFG)
    return e.value


def msgs(*roles, text="hi"):
    return [{"role": r, "content": text} for r in roles]


def test_valid_conversation_passes():
    validate_against_config(parse_request({"messages": msgs("system", "user", "assistant", "user")}), CFG)
    validate_against_config(parse_request({"messages": msgs("user", "assistant", "user")}), CFG)


def test_size_limits():
    assert check(messages=msgs("user", "assistant", "user", "assistant", "user", "assistant", "user")).param \
        == "messages"
    assert check(messages=msgs("user", "assistant") + msgs("user", text="x" * 11)).param == "messages[2].content"
    assert check(messages=msgs("user", "assistant", "user", text="x" * 9)).param == "messages"  # 27 > 25


@pytest.mark.parametrize("fields, param", [
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 101}, "max_tokens"),
    ({"max_completion_tokens": 101}, "max_completion_tokens"), ({"max_tokens": 5, "max_completion_tokens": 6},
                                                                "max_tokens"),
    ({"temperature": 1.6}, "temperature"), ({"temperature": -0.1}, "temperature"),
    ({"top_k": 101}, "top_k"), ({"top_k": -1}, "top_k"),
    ({"top_p": 0.05}, "top_p"), ({"top_p": 0}, "top_p"), ({"top_p": 1.1}, "top_p"),
])
def test_bounds(fields, param):
    e = check(**fields)
    assert e.param == param and param in e.message


def test_resolved_defaults():
    r = parse_request(req())
    assert resolve_max_tokens(r, CFG) == CFG.default_max_tokens
    assert resolve_sampling(r, CFG) == (0.8, 50, 1.0)
    r = parse_request(req(max_completion_tokens=7, temperature=0, top_k=0, top_p=0.5))
    assert resolve_max_tokens(r, CFG) == 7 and resolve_sampling(r, CFG) == (0, 0, 0.5)


@pytest.mark.parametrize("roles, param", [
    (("user", "assistant"), "messages"),
    (("system",), "messages"),
    (("assistant", "user"), "messages[0].role"),
    (("system", "assistant", "user"), "messages[1].role"),
    (("user", "system", "user"), "messages[1].role"),
    (("user", "assistant", "assistant"), "messages"),
])
def test_conversation_shape(roles, param):
    assert check(messages=msgs(*roles)).param == param


def test_response_models_serialize():
    usage = Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5)
    resp = ChatCompletionResponse(id="chatcmpl-1", created=1, model="m", usage=usage,
                                  choices=[Choice(index=0, message=ResponseMessage(content="yo"), finish_reason="stop")])
    d = resp.model_dump()
    assert d["object"] == "chat.completion"
    assert d["choices"][0]["message"] == {"role": "assistant", "content": "yo", "refusal": None}
    chunk = ChatCompletionChunk(id="c", created=1, model="m",
                                choices=[ChunkChoice(index=0, delta=Delta(content="y"), finish_reason=None)])
    assert chunk.model_dump(exclude_none=True)["choices"][0]["delta"] == {"content": "y"}
    assert chunk.object == "chat.completion.chunk"
    ml = ModelList(data=[ModelCard(id="nanochat-sft", created=1)]).model_dump()
    assert ml == {"object": "list", "data": [{"id": "nanochat-sft", "object": "model", "created": 1,
                                              "owned_by": "nanochat"}]}


# ----------------------------------------------------------------------------- text completions

@pytest.mark.parametrize("prompt, prompts", [
    ("once", ["once"]), (["a", "b"], ["a", "b"]), ([1, 2, 3], [[1, 2, 3]]), ([[1], [2, 3]], [[1], [2, 3]]),
])
def test_completion_prompt_shapes(prompt, prompts):
    assert parse_completion_request({"prompt": prompt}).prompts() == prompts


@pytest.mark.parametrize("fields, param", [
    ({}, "prompt"), ({"prompt": []}, "prompt"), ({"prompt": [[]]}, "prompt"), ({"prompt": [-1]}, "prompt"),
    ({"prompt": [[1], "a"]}, "prompt"), ({"prompt": 5}, "prompt"), ({"prompt": "a", "suffix": "b"}, "suffix"),
    ({"prompt": "a", "logprobs": 21}, "logprobs"), ({"prompt": "a", "logprobs": True}, "logprobs"),
    ({"prompt": "a", "echo": "yes"}, "echo"), ({"prompt": "a", "best_of": 3}, "best_of"),
])
def test_bad_completion_requests_named(fields, param):
    with pytest.raises(RequestError) as e:
        parse_completion_request(fields)
    assert e.value.param == param


def test_completion_max_tokens():
    """OpenAI's default of 16; 0 (score the prompt only) needs echo."""
    assert resolve_max_tokens(parse_completion_request({"prompt": "a"}), CFG) == 16
    assert resolve_max_tokens(parse_completion_request({"prompt": "a", "max_tokens": 0, "echo": True}), CFG) == 0
    with pytest.raises(RequestError) as e:
        resolve_max_tokens(parse_completion_request({"prompt": "a", "max_tokens": 0}), CFG)
    assert e.value.param == "max_tokens" and "0 only with echo" in e.value.message
    parse_completion_request({"prompt": "a", "suffix": "", "logprobs": 0, "n": 2, "stop": ["\n"], "seed": 1})


def test_completion_prompt_size_limit():
    with pytest.raises(RequestError) as e:
        validate_completion_against_config(parse_completion_request({"prompt": ["x" * 20, "y" * 6]}), CFG)
    assert e.value.param == "prompt" and "26 > 25" in e.value.message
    validate_completion_against_config(parse_completion_request({"prompt": [[1] * 100]}), CFG)
