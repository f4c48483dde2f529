"""
The clients people point at an OpenAI-compatible server, each used as its docs show, against a running
nanochat server (python -m scripts.chat_web): the openai SDK, litellm and langchain-openai. A client that
is not installed is reported as skipped.

  python dev/clients_check.py --url http://127.0.0.1:8000 [--api-key KEY]

Run it with the Python that has the clients (they need not be the project's dependencies), e.g.
  ~/venvs/clients/bin/pip install openai litellm langchain-openai
  ~/venvs/clients/bin/python dev/clients_check.py --url http://127.0.0.1:8000
Prints one line per check (ok / FAILED / skipped, with what came back) and ends with one JSON line; exit
status 1 when a check failed.
"""

import argparse
import json
import traceback
from typing import Annotated, Literal

from pydantic import BaseModel, Field

PROMPT = "Tell me about a person."


class Person(BaseModel):
    """Every field bounded, so that even a tiny model's reply completes (see README: structured outputs)."""
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=120)
    mood: Literal["happy", "sad"]
    tags: list[Annotated[str, Field(max_length=6)]] = Field(max_length=2)


def openai_checks(url, key):
    import openai
    client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
    model = client.models.list().data[0].id

    def retrieve():
        return client.models.retrieve(model).id

    def completions():
        r = client.completions.create(model=model, prompt=["Once upon", "The cat"], max_tokens=8, logprobs=2,
                                      echo=True, temperature=0)
        assert len(r.choices) == 2 and r.choices[0].logprobs.token_logprobs[-1] <= 0
        return repr(r.choices[0].text)

    def chat_logprobs():
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}],
                                           max_tokens=8, logprobs=True, top_logprobs=2)
        content = r.choices[0].logprobs.content
        assert content and len(content[0].top_logprobs) == 2
        return f"{len(content)} tokens, first {content[0].token!r} {content[0].logprob:.3f}"

    def parse():
        r = client.beta.chat.completions.parse(model=model, messages=[{"role": "user", "content": PROMPT}],
                                               response_format=Person, max_tokens=200)
        return repr(r.choices[0].message.parsed)

    def any_model_name():  # the seed's curl examples say "model": "nanochat"
        return client.chat.completions.create(model="nanochat", max_tokens=4, messages=[
            {"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "user", "content": "there"}]).model

    return {"openai models.retrieve": retrieve, "openai completions.create (echo, logprobs)": completions,
            "openai chat logprobs": chat_logprobs, "openai beta.chat.completions.parse": parse,
            "openai model 'nanochat', developer role, two user messages": any_model_name}


def litellm_checks(url, key):
    import litellm

    def text_completion():
        r = litellm.text_completion(model="openai/served", api_base=url + "/v1", api_key=key, prompt="Once upon",
                                    max_tokens=8)
        return repr(r.choices[0].text)

    def chat():
        r = litellm.completion(model="openai/served", api_base=url + "/v1", api_key=key, max_tokens=8,
                               messages=[{"role": "user", "content": PROMPT}])
        return repr(r.choices[0].message.content)

    return {"litellm text_completion": text_completion, "litellm completion": chat}


def langchain_checks(url, key):
    from langchain_openai import ChatOpenAI, OpenAI

    def structured():
        llm = ChatOpenAI(base_url=url + "/v1", api_key=key, model="served", max_tokens=200)
        return repr(llm.with_structured_output(Person, method="json_schema").invoke(PROMPT))

    def text():
        return repr(OpenAI(base_url=url + "/v1", api_key=key, model="served", max_tokens=8).invoke("Once upon"))

    return {"langchain ChatOpenAI.with_structured_output": structured, "langchain OpenAI (completions)": text}


def main():
    p = argparse.ArgumentParser(description="openai, litellm and langchain-openai against a nanochat server")
    p.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--api-key", default="not-needed", help="a key when the server has keys on")
    args = p.parse_args()
    url = args.url.rstrip("/")
    results = {}
    for name, checks in (("openai", openai_checks), ("litellm", litellm_checks), ("langchain_openai", langchain_checks)):
        try:
            suite = checks(url, args.api_key)
        except ImportError as e:
            results[name] = ("skipped", f"{e} (pip install {name.replace('_', '-')})")
            continue
        for label, check in suite.items():
            try:
                results[label] = ("ok", check())
            except Exception as e:  # a failed check is reported with what went wrong; the others still run
                results[label] = ("FAILED", f"{type(e).__name__}: {e}".splitlines()[0][:300])
                traceback.print_exc()
    width = max(map(len, results))
    for label, (status, detail) in results.items():
        print(f"{label:<{width}}  {status:<7} {detail[:120]}")
    failed = [label for label, (status, _) in results.items() if status == "FAILED"]
    print(json.dumps({"checks": len(results), "ok": sum(s == "ok" for s, _ in results.values()),
                      "failed": failed, "skipped": [k for k, (s, _) in results.items() if s == "skipped"]}))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
