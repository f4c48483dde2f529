"""
Workflow settings: defaults <- JSON config file <- command-line flags, validated once.

API keys are never stored here in plain fields that get logged: each model names the environment
variable that holds its key (api_key_env), or the config file may give "api_key" directly; either way
the key only reaches the client constructor, and repr() hides it.
"""

import dataclasses
import os
from dataclasses import dataclass, field

from nanochat.common import check_known_fields, read_json_object

PROVIDERS = ("openai", "anthropic")


@dataclass
class ModelConfig:
    provider: str = "openai"
    model: str = "gpt-4o-mini"
    base_url: str | None = None  # any OpenAI-compatible server (e.g. nanochat's scripts.chat_web), or a proxy
    api_key_env: str = "OPENAI_API_KEY"
    api_key: str | None = field(default=None, repr=False)
    temperature: float | None = 0.7  # None: send none (for models that reject the parameter)
    max_tokens: int = 1024

    def resolve_api_key(self):
        key = self.api_key or os.environ.get(self.api_key_env)
        if not key and self.base_url is None:
            raise ValueError(f"no API key for {self.provider} model {self.model}: set {self.api_key_env} "
                             "(or api_key in the config file)")
        return key or "not-needed"  # local OpenAI-compatible servers usually take any key


def _default_red():
    return ModelConfig("openai", "gpt-4o-mini", api_key_env="OPENAI_API_KEY", temperature=1.0)


def _default_blue():
    return ModelConfig("anthropic", "claude-3-7-sonnet-20250219", api_key_env="ANTHROPIC_API_KEY", temperature=0.7)


def _default_judge():
    return ModelConfig("anthropic", "claude-3-7-sonnet-20250219", api_key_env="ANTHROPIC_API_KEY", temperature=0.0)


@dataclass
class WorkflowConfig:
    red_team: ModelConfig = field(default_factory=_default_red)
    blue_team: ModelConfig = field(default_factory=_default_blue)
    judge: ModelConfig = field(default_factory=_default_judge)  # scores answers (prompt optimization, filter)
    optimizer: ModelConfig = field(default_factory=_default_blue)  # rewrites the blue-team prompt
    out_dir: str = "safety_data_run"  # every stage's JSONL, the cache and the report
    final_path: str = "data/safety_sft_conversations_multiturn_filtered.jsonl"
    seed_limit: int = 0  # 0 = all seeds; a small number for a quick trial run
    questions_per_cell: int = 2  # per (seed, strategy): 49 seeds x 7 strategies x 2 = 686 questions
    near_duplicate_threshold: float = 0.8  # Jaccard similarity of character 5-gram sets
    apo_rounds: int = 3
    apo_sample_size: int = 100
    multiturn_fraction: float = 0.4  # share of questions that get follow-up attack turns
    max_follow_ups: int = 2
    min_dimension_score: int = 3  # a conversation passes if every dimension >= this (1..5) ...
    min_mean_score: float = 4.0  # ... and the mean over dimensions >= this
    concurrency: int = 8
    max_retries: int = 5
    malformed_retries: int = 2  # extra attempts when the output is not the JSON we asked for
    timeout_seconds: float = 60.0
    backoff_base_seconds: float = 1.0
    backoff_max_seconds: float = 60.0
    max_requests: int = 20000  # budget per run: API calls ...
    max_total_tokens: int = 20_000_000  # ... and tokens (prompt + completion); cached answers are free
    random_seed: int = 1234


MODEL_FIELDS = ("red_team", "blue_team", "judge", "optimizer")


def _model_from(data, where, default):
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be an object")
    check_known_fields(data, ModelConfig, where)
    return dataclasses.replace(default, **data)


def load_config(path=None, overrides=None):
    """Defaults <- the JSON file <- overrides (a dict of top-level fields, e.g. from flags); validated."""
    config = WorkflowConfig()
    data = read_json_object(path) if path is not None else {}
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    check_known_fields(data, WorkflowConfig, "config")
    for name, value in data.items():
        if name in MODEL_FIELDS:
            value = _model_from(value, f"config.{name}", getattr(config, name))
        setattr(config, name, value)
    return validate(config)


def validate(config):
    for name in MODEL_FIELDS:
        model = getattr(config, name)
        if model.provider not in PROVIDERS:
            raise ValueError(f"config.{name}.provider must be one of {PROVIDERS}, got {model.provider!r}")
        if not model.model:
            raise ValueError(f"config.{name}.model must be set")
        if model.temperature is not None and not 0 <= model.temperature <= 2:
            raise ValueError(f"config.{name}.temperature must be in [0, 2] or null, got {model.temperature}")
        if model.max_tokens < 1:
            raise ValueError(f"config.{name}.max_tokens must be positive")
    positive = ("questions_per_cell", "apo_rounds", "apo_sample_size", "concurrency", "timeout_seconds",
                "max_requests", "max_total_tokens", "backoff_max_seconds")
    for name in positive:
        if not getattr(config, name) > 0:
            raise ValueError(f"config.{name} must be positive, got {getattr(config, name)}")
    for name in ("max_retries", "malformed_retries", "seed_limit", "max_follow_ups"):
        if getattr(config, name) < 0:
            raise ValueError(f"config.{name} must be >= 0")
    if not 0 <= config.multiturn_fraction <= 1:
        raise ValueError("config.multiturn_fraction must be in [0, 1]")
    if not 0 < config.near_duplicate_threshold <= 1:
        raise ValueError("config.near_duplicate_threshold must be in (0, 1]")
    if not 1 <= config.min_dimension_score <= 5 or not 1 <= config.min_mean_score <= 5:
        raise ValueError(f"config.min_dimension_score ({config.min_dimension_score}) and config.min_mean_score "
                         f"({config.min_mean_score}) must be within the 1..5 scale")
    return config
