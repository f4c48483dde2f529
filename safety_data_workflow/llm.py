"""
Talking to the models: the official openai / anthropic clients with our own reliability layer.

- a shared concurrency limit (asyncio semaphore) across every model of the run;
- retries with exponential backoff and jitter on 429 / 408 / 5xx / timeouts / connection errors,
  honouring Retry-After; the clients' own retries are off so every attempt is counted and logged;
- a per-run budget (requests and tokens) checked before each call;
- a response cache: only outputs that passed validation are cached, so a re-run pays for nothing twice;
- malformed output (bad JSON, missing fields) is asked for again, then reported as a failed record.
"""

import asyncio
import inspect
import json
import logging
import random
import re

import anthropic
import openai

from safety_data_workflow.store import ResponseCache

logger = logging.getLogger("safety_data_workflow")
TRANSIENT_STATUS = {408, 409, 429}  # and every 5xx
ANTHROPIC_TAKES_TEMPERATURE = "temperature" in inspect.signature(anthropic.resources.messages.AsyncMessages.create).parameters


class BudgetExceeded(Exception):
    """The run's request or token budget is spent: stop cleanly; a re-run continues where this stopped."""


class ModelCallFailed(Exception):
    """One record could not be produced (retries exhausted, malformed output): record it, move on."""


class ModelConfigError(Exception):
    """Wrong key, model or URL: every call would fail the same way, so the run stops."""


class Budget:
    def __init__(self, max_requests, max_total_tokens):
        self.max_requests, self.max_total_tokens = max_requests, max_total_tokens
        self.requests = self.tokens = 0

    def check(self):
        if self.requests >= self.max_requests or self.tokens >= self.max_total_tokens:
            raise BudgetExceeded(f"budget spent: {self.requests} requests (max {self.max_requests}), "
                                 f"{self.tokens} tokens (max {self.max_total_tokens})")


def parse_json_object(text):
    """The first {...} object in a model's reply (code fences and chatter around it are tolerated)."""
    text = re.sub(r"^```(?:json)?|```$", "", text.strip(), flags=re.MULTILINE)
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        raise ValueError("no JSON object in the reply")
    try:
        value = json.loads(text[start:end + 1])
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON: {e.msg}") from None
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object")
    return value


def _retry_after(error):
    response = getattr(error, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


def _is_transient(error):
    if isinstance(error, (openai.APITimeoutError, openai.APIConnectionError,
                          anthropic.APITimeoutError, anthropic.APIConnectionError)):
        return True
    status = getattr(error, "status_code", None)
    return status is not None and (status in TRANSIENT_STATUS or status >= 500)


class ModelClient:
    def __init__(self, role, spec, config, cache: ResponseCache, budget: Budget, semaphore: asyncio.Semaphore):
        self.role, self.spec, self.config = role, spec, config
        self.cache, self.budget, self.semaphore = cache, budget, semaphore
        key = spec.resolve_api_key()
        if spec.provider == "openai":
            self.client = openai.AsyncOpenAI(api_key=key, base_url=spec.base_url, max_retries=0,
                                             timeout=config.timeout_seconds)
        else:
            self.client = anthropic.AsyncAnthropic(api_key=key, base_url=spec.base_url, max_retries=0,
                                                   timeout=config.timeout_seconds)

    async def _call_once(self, system, messages, temperature):
        """One API request -> (text, tokens used)."""
        if self.spec.provider == "openai":
            sampling = {} if temperature is None else {"temperature": temperature}
            response = await self.client.chat.completions.create(
                model=self.spec.model, messages=[{"role": "system", "content": system}, *messages],
                max_tokens=self.spec.max_tokens, **sampling)
            usage = response.usage
            return response.choices[0].message.content or "", (usage.total_tokens if usage else 0)
        # Newer anthropic SDKs dropped the temperature argument; models that take it still accept it in the body.
        # temperature None (config: null) sends none, for models that reject it.
        sampling = ({} if temperature is None else {"temperature": temperature} if ANTHROPIC_TAKES_TEMPERATURE
                    else {"extra_body": {"temperature": temperature}})
        response = await self.client.messages.create(model=self.spec.model, system=system, messages=messages,
                                                     max_tokens=self.spec.max_tokens, **sampling)
        text = "".join(block.text for block in response.content if getattr(block, "type", None) == "text")
        return text, response.usage.input_tokens + response.usage.output_tokens

    async def _call(self, system, messages, temperature):
        for attempt in range(self.config.max_retries + 1):
            self.budget.check()
            self.budget.requests += 1  # an attempt costs a request even when it fails
            try:
                async with self.semaphore:
                    text, tokens = await self._call_once(system, messages, temperature)
                self.budget.tokens += tokens
                return text
            except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError,
                    anthropic.AuthenticationError, anthropic.PermissionDeniedError, anthropic.NotFoundError) as e:
                raise ModelConfigError(f"{self.role} ({self.spec.provider} {self.spec.model}): "
                                       f"{type(e).__name__} — check the model name, base URL and API key") from None
            except (openai.APIError, anthropic.APIError) as e:
                if not _is_transient(e):
                    raise ModelCallFailed(f"{self.role}: {type(e).__name__}: {getattr(e, 'message', e)}") from None
                if attempt == self.config.max_retries:
                    raise ModelCallFailed(f"{self.role}: {type(e).__name__} after {attempt + 1} attempts") from None
                backoff = min(self.config.backoff_max_seconds, self.config.backoff_base_seconds * 2 ** attempt)
                delay = _retry_after(e)
                delay = backoff * (0.5 + random.random() / 2) if delay is None else min(delay, self.config.backoff_max_seconds)
                logger.warning(f"{self.role}: {type(e).__name__}, retry {attempt + 1}/{self.config.max_retries} "
                               f"in {delay:.1f}s")
                await asyncio.sleep(delay)

    async def text(self, system, messages, validate=None, tag=""):
        """The model's reply; with validate (raises ValueError), malformed replies are asked for again."""
        temperature = self.spec.temperature
        key = ResponseCache.fingerprint(self.spec.provider, self.spec.model, self.spec.base_url, system, messages,
                                        temperature, self.spec.max_tokens, tag)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        conversation, problem = list(messages), None
        for _ in range(self.config.malformed_retries + 1):
            raw = await self._call(system, conversation, temperature)
            try:
                if validate is not None:
                    validate(raw)
                elif not raw.strip():
                    raise ValueError("empty reply")
            except ValueError as e:
                problem = str(e)
                conversation = [*messages, {"role": "assistant", "content": raw or "(empty)"},
                                {"role": "user", "content": f"That reply was not usable ({problem}). Answer again, "
                                 "exactly in the requested format and nothing else."}]
                continue
            self.cache.put(key, raw)
            return raw
        raise ModelCallFailed(f"{self.role}: malformed output after {self.config.malformed_retries + 1} attempts: "
                              f"{problem}")

    async def json(self, system, messages, check, tag=""):
        """A JSON object from the model; check(obj) raises ValueError on missing/bad fields, returns the value."""
        raw = await self.text(system, messages, validate=lambda text: check(parse_json_object(text)), tag=tag)
        return check(parse_json_object(raw))
