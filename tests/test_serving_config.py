import json

import pytest

from nanochat import sampling
from nanochat.serving.config import ServerConfig, load_config

GOOD_KEY = "k3y-0123456789abcdef"


def write(tmp_path, data, name="config.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def test_defaults_match_sampling_constants():
    c = load_config(env={})
    assert c == ServerConfig()
    assert (c.min_temperature, c.max_temperature) == (sampling.MIN_TEMPERATURE, sampling.MAX_TEMPERATURE)
    assert (c.min_top_k, c.max_top_k) == (sampling.MIN_TOP_K, sampling.MAX_TOP_K)
    assert (c.min_top_p, c.max_top_p) == (sampling.MIN_TOP_P, sampling.MAX_TOP_P)
    assert c.valid_api_keys == [] and c.rate_limit_max_requests == 120 and c.default_max_tokens == 512


def test_shipped_config_json_loads_with_no_keys():
    c = load_config("config.json", env={})
    assert c.valid_api_keys == []
    assert c == ServerConfig()


def test_file_values_and_env_overrides(tmp_path):
    path = write(tmp_path, {"max_messages": 10, "rate_limit_max_requests": 5, "valid_api_keys": [GOOD_KEY]})
    env = {"NANOCHAT_API_KEYS": " aaaaBBBBccccDDDD1 , eeeeFFFFggggHHHH2 ,",
           "NANOCHAT_RATE_LIMIT_WINDOW_SECONDS": "2.5", "NANOCHAT_RATE_LIMIT_MAX_REQUESTS": "7",
           "NANOCHAT_MAX_CONCURRENT_REQUESTS": "3", "NANOCHAT_MAX_QUEUED_REQUESTS": "0"}
    c = load_config(path, env=env)
    assert c.max_messages == 10
    assert c.valid_api_keys == ["aaaaBBBBccccDDDD1", "eeeeFFFFggggHHHH2"]  # env replaces the file's keys
    assert (c.rate_limit_window_seconds, c.rate_limit_max_requests) == (2.5, 7)
    assert (c.max_concurrent_requests, c.max_queued_requests) == (3, 0)


def test_unknown_field_names_field_and_file(tmp_path):
    path = write(tmp_path, {"max_mesages": 10})
    with pytest.raises(ValueError, match="max_mesages") as e:
        load_config(path, env={})
    assert path in str(e.value)


def test_bad_json_names_file_and_line(tmp_path):
    path = write(tmp_path, '{\n  "max_messages": 10,\n  oops\n}')
    with pytest.raises(ValueError, match="line 3") as e:
        load_config(path, env={})
    assert path in str(e.value)


def test_non_object_json(tmp_path):
    with pytest.raises(ValueError, match="object"):
        load_config(write(tmp_path, "[1, 2]"), env={})


@pytest.mark.parametrize("var", ["NANOCHAT_RATE_LIMIT_WINDOW_SECONDS", "NANOCHAT_RATE_LIMIT_MAX_REQUESTS",
                                 "NANOCHAT_MAX_CONCURRENT_REQUESTS", "NANOCHAT_MAX_QUEUED_REQUESTS"])
def test_bad_env_value_names_variable(var):
    with pytest.raises(ValueError, match=var):
        load_config(env={var: "lots"})


@pytest.mark.parametrize("data, field", [
    ({"max_messages": "10"}, "max_messages"),
    ({"max_messages": True}, "max_messages"),
    ({"rate_limit_window_seconds": "60"}, "rate_limit_window_seconds"),
    ({"valid_api_keys": "abc"}, "valid_api_keys"),
    ({"valid_api_keys": [123]}, "valid_api_keys"),
])
def test_wrong_types_rejected(tmp_path, data, field):
    with pytest.raises(ValueError, match=field):
        load_config(write(tmp_path, data), env={})


@pytest.mark.parametrize("data, field", [
    ({"rate_limit_window_seconds": 0}, "rate_limit_window_seconds"),
    ({"rate_limit_max_requests": -1}, "rate_limit_max_requests"),
    ({"max_concurrent_requests": 0}, "max_concurrent_requests"),
    ({"max_queued_requests": -1}, "max_queued_requests"),
    ({"max_failed_logins": 0}, "max_failed_logins"),
    ({"max_tokens_limit": 0}, "max_tokens_limit"),
    ({"min_temperature": 1.5, "max_temperature": 1.0, "default_temperature": 1.0}, "temperature"),
    ({"max_temperature": 3.0}, "temperature"),  # wider than the sampler supports
    ({"min_top_k": 10, "max_top_k": 5}, "top_k"),
    ({"max_top_p": 1.5}, "top_p"),
    ({"max_temperature": 0.5}, "default_temperature"),  # default 0.8 falls outside
    ({"default_max_tokens": 5000}, "default_max_tokens"),
])
def test_invalid_limits_rejected(tmp_path, data, field):
    with pytest.raises(ValueError, match=field):
        load_config(write(tmp_path, data), env={})


def test_env_override_validated_too():
    with pytest.raises(ValueError, match="max_concurrent_requests"):
        load_config(env={"NANOCHAT_MAX_CONCURRENT_REQUESTS": "0"})


@pytest.mark.parametrize("key", ["short", "changeme", "your-api-key", "YOUR-API-KEY-HERE-0000", "x" * 20,
                                 "changeme-changeme-1", " " + GOOD_KEY, "", "nc-schlüssel-4f9a8b7c6d5e", "nc 4f9a8b7c6d5e4f3a2b1c"])
def test_weak_or_placeholder_keys_rejected(tmp_path, key):
    with pytest.raises(ValueError, match=r"valid_api_keys\[0\]"):
        load_config(write(tmp_path, {"valid_api_keys": [key]}), env={})


def test_placeholder_key_from_env_rejected():
    with pytest.raises(ValueError, match="placeholder"):
        load_config(env={"NANOCHAT_API_KEYS": "changeme"})


def test_ints_accepted_for_float_fields(tmp_path):
    c = load_config(write(tmp_path, {"rate_limit_window_seconds": 30, "max_temperature": 1}), env={})
    assert c.rate_limit_window_seconds == 30.0 and isinstance(c.max_temperature, float)
