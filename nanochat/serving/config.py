"""
Server settings: a JSON file (config.json) plus a few environment overrides, validated once at startup.

Loading fails loudly (ValueError naming the field, file or variable) rather than starting a server
with a typo'd limit silently ignored. With no API keys configured, auth is off (local use only).
"""

import dataclasses
import math
import os
from dataclasses import dataclass, field

from nanochat.common import check_known_fields, read_json_object
from nanochat.sampling import (
    MAX_TEMPERATURE,
    MAX_TOP_K,
    MAX_TOP_P,
    MIN_TEMPERATURE,
    MIN_TOP_K,
    MIN_TOP_P,
)

MIN_API_KEY_CHARS = 16
# Keys copied from docs/templates: accepting them would make a "secured" server open to anyone.
PLACEHOLDER_MARKERS = ("changeme", "change-me", "change_me", "your-api-key", "your_api_key", "yourapikey",
                       "your-key", "your_key", "placeholder", "replace-me", "replace_me", "example")


@dataclass
class ServerConfig:
    valid_api_keys: list[str] = field(default_factory=list)
    rate_limit_window_seconds: float = 60
    rate_limit_max_requests: int = 120
    max_failed_logins: int = 10  # wrong keys per client address per rate-limit window, then 429 for that address
    max_concurrent_requests: int = 32
    max_queued_requests: int = 128
    max_messages: int = 500
    max_message_chars: int = 8000
    max_total_chars: int = 32000
    max_tokens_limit: int = 4096
    min_temperature: float = MIN_TEMPERATURE
    max_temperature: float = MAX_TEMPERATURE
    min_top_k: int = MIN_TOP_K
    max_top_k: int = MAX_TOP_K
    min_top_p: float = MIN_TOP_P
    max_top_p: float = MAX_TOP_P
    default_temperature: float = 0.8
    default_top_k: int = 50
    default_top_p: float = 1.0
    default_max_tokens: int = 512
    # connections: a request's headers must arrive within header_timeout_seconds of the connection's start
    # (or of the previous response), its body within body_timeout_seconds; idle keep-alive connections close
    # after keep_alive_seconds; past max_connections open connections uvicorn answers 503
    header_timeout_seconds: float = 10
    body_timeout_seconds: float = 30
    keep_alive_seconds: float = 5
    max_connections: int = 1024


# Environment variable -> (field, parser). Keys come from the environment so they need not live in a file.
ENV_OVERRIDES = {
    "NANOCHAT_API_KEYS": ("valid_api_keys", lambda s: [k.strip() for k in s.split(",") if k.strip()]),
    "NANOCHAT_RATE_LIMIT_WINDOW_SECONDS": ("rate_limit_window_seconds", float),
    "NANOCHAT_RATE_LIMIT_MAX_REQUESTS": ("rate_limit_max_requests", int),
    "NANOCHAT_MAX_FAILED_LOGINS": ("max_failed_logins", int),
    "NANOCHAT_MAX_CONCURRENT_REQUESTS": ("max_concurrent_requests", int),
    "NANOCHAT_MAX_QUEUED_REQUESTS": ("max_queued_requests", int),
}

INT_FIELDS = {f.name for f in dataclasses.fields(ServerConfig) if f.type is int}
FLOAT_FIELDS = {f.name for f in dataclasses.fields(ServerConfig) if f.type is float}


def _read_json(path):
    data = read_json_object(path)
    check_known_fields(data, ServerConfig, path)
    return data


def _check_types(values, source):
    """JSON gives us any type; a string where a number belongs must fail here, not mid-request."""
    for name, value in values.items():
        if name in INT_FIELDS and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{source}: {name} must be an integer, got {value!r}")
        if name in FLOAT_FIELDS and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"{source}: {name} must be a number, got {value!r}")
        if name == "valid_api_keys" and (not isinstance(value, list) or not all(isinstance(k, str) for k in value)):
            raise ValueError(f"{source}: valid_api_keys must be a list of strings")


def _env_overrides(env):
    values = {}
    for var, (name, parse) in ENV_OVERRIDES.items():
        raw = env.get(var)
        if raw is None:
            continue
        try:
            values[name] = parse(raw)
        except ValueError:
            raise ValueError(f"environment variable {var}: cannot parse {raw!r}") from None
    return values


def validate_config(config):
    """Raise ValueError naming the first bad field."""
    for name in INT_FIELDS | FLOAT_FIELDS:
        value = getattr(config, name)
        if not math.isfinite(value):
            raise ValueError(f"config: {name} must be finite, got {value}")
    positive = ["rate_limit_window_seconds", "rate_limit_max_requests", "max_failed_logins", "max_concurrent_requests",
                "max_messages", "header_timeout_seconds", "body_timeout_seconds", "keep_alive_seconds", "max_connections",
                "max_message_chars", "max_total_chars", "max_tokens_limit", "default_max_tokens"]
    for name in positive:
        if getattr(config, name) <= 0:
            raise ValueError(f"config: {name} must be positive, got {getattr(config, name)}")
    if config.max_queued_requests < 0:
        raise ValueError(f"config: max_queued_requests must be >= 0, got {config.max_queued_requests}")
    # Config may narrow the sampling bounds but never widen them past what the sampler supports.
    for param, lo, hi in (("temperature", MIN_TEMPERATURE, MAX_TEMPERATURE), ("top_k", MIN_TOP_K, MAX_TOP_K),
                          ("top_p", MIN_TOP_P, MAX_TOP_P)):
        cmin, cmax, default = (getattr(config, f"min_{param}"), getattr(config, f"max_{param}"),
                               getattr(config, f"default_{param}"))
        if not lo <= cmin <= cmax <= hi:
            raise ValueError(f"config: need {lo} <= min_{param} ({cmin}) <= max_{param} ({cmax}) <= {hi}")
        if not cmin <= default <= cmax:
            raise ValueError(f"config: default_{param} ({default}) must be within [{cmin}, {cmax}]")
    if config.default_top_p <= 0:
        raise ValueError("config: default_top_p must be > 0")
    if config.default_max_tokens > config.max_tokens_limit:
        raise ValueError(f"config: default_max_tokens ({config.default_max_tokens}) exceeds max_tokens_limit")
    for i, key in enumerate(config.valid_api_keys):
        lowered = key.lower()
        if any(m in lowered for m in PLACEHOLDER_MARKERS) or 0 < len(set(key)) <= 2:  # or "xxxxxxxxxxxxxxxx"
            raise ValueError(f"config: valid_api_keys[{i}] looks like a placeholder; set a real random key")
        if key.strip() != key or len(key) < MIN_API_KEY_CHARS:
            raise ValueError(f"config: valid_api_keys[{i}] must be a string of >= {MIN_API_KEY_CHARS} characters "
                             "without surrounding whitespace")
        if not all("!" <= c <= "~" for c in key):  # what an Authorization header carries intact
            raise ValueError(f"config: valid_api_keys[{i}] must be printable ASCII without spaces: clients send the "
                             "Authorization header as ASCII bytes (read back as Latin-1), so such a key could never match")
    return config


def load_config(path=None, env=os.environ):
    """Defaults <- JSON file (if given) <- environment overrides, then validate."""
    values = {}
    if path is not None:
        values.update(_read_json(path))
        _check_types(values, path)
    overrides = _env_overrides(env)
    _check_types(overrides, "environment")
    values.update(overrides)
    config = ServerConfig(**values)
    # Ints are fine wherever floats are expected; store floats so later arithmetic is uniform.
    for name in FLOAT_FIELDS:
        setattr(config, name, float(getattr(config, name)))
    return validate_config(config)
