"""
Which structured-output library nanochat.grammar should build on: xgrammar vs llguidance with our tokenizer,
in one run. For each library and each response_format (JSON mode, a 10-field schema):
  - compile time (grammar for our tokenizer, no cache) and the cost of a fresh per-sequence matcher
  - µs per token, over random-logits walks (torch.randn logits, masked softmax, multinomial) that run to a
    stop token: filling the allowed-token bitmask, applying it to the logits (nanochat.grammar's torch code,
    the same for both) and accepting the sampled token; mean and median (a busy machine inflates the mean)
  - correctness: every finished walk's text must json.loads (strict: no raw control characters in strings)
    and pass jsonschema.validate
For scale: one plain sampling step (softmax + multinomial over the vocab). Also import time, and
nanochat.grammar's mask_rows_ (one bitmask for a batch) against one mask_ call per row, and the cost per
generated token through the serving Scheduler with and without a response_format.

python dev/bench_grammar.py [--vocab-size 4096] [--text PATH] [--walks 10] [--batch 8] [--threads 2]

The tokenizer is trained on --text (default: $NANOCHAT_DATA_DIR/tinystories/tinystories_val_sample.txt).
A library that is not installed is skipped (pip install xgrammar llguidance to compare both).
Prints a table and ends with one JSON line.
"""

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import jsonschema
import torch

from nanochat.common import get_data_dir
from nanochat.grammar import GrammarCompiler, Matcher, disallowed, mask_rows_
from nanochat.tokenizer import RustBPETokenizer

PROFILE = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0},
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "score": {"type": "number"},
        "active": {"type": "boolean"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string", "maxLength": 30}, "city": {"type": "string", "maxLength": 20},
                           "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["street", "city", "zip"],
            "additionalProperties": False,
        },
        "nickname": {"type": ["string", "null"], "maxLength": 16},
        "email": {"type": "string", "maxLength": 40},
    },
    "required": ["id", "name", "age", "score", "active", "role", "tags", "address", "nickname", "email"],
    "additionalProperties": False,
}
SCHEMAS = {"json_object": {"type": "object"}, "10-field schema": PROFILE}
MAX_STEPS = 20_000  # a walk that has not stopped by then counts as unfinished


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer, stop_token_ids, vocab_size, threads):
        import xgrammar
        self.xgr = xgrammar
        specials = set(tokenizer.special_tokens.values())
        # Raw token bytes; an empty entry marks a special token (never allowed); stop ids end the grammar.
        vocab = [b"" if i in specials else tokenizer.enc.decode_single_token_bytes(i)
                 for i in range(tokenizer.get_vocab_size())]
        info = xgrammar.TokenizerInfo(vocab, xgrammar.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=threads, cache_enabled=False)

    def compile(self, schema):
        return self.compiler.compile_json_schema(schema, any_whitespace=False)  # separators ", " and ": "

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher, bitmask):
        matcher.fill_next_token_bitmask(bitmask)

    def accept(self, matcher, token):
        return matcher.accept_token(token)


class LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer, stop_token_ids, vocab_size, threads):
        import llguidance
        import llguidance.tiktoken
        self.llg = llguidance
        self.tokenizer = llguidance.tiktoken.lltokenizer_from_encoding(tokenizer.enc, n_vocab=vocab_size,
                                                                      eos_token=stop_token_ids)

    def compile(self, schema):
        options = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
        grammar = self.llg.LLMatcher.grammar_from_json_schema(schema, overrides=options)
        matcher = self.llg.LLMatcher(self.tokenizer, grammar, log_level=0)  # building it is the compile
        assert not matcher.is_error(), matcher.get_error()
        return matcher

    def matcher(self, compiled):
        return compiled.deep_copy()

    def fill(self, matcher, bitmask):
        matcher.unsafe_compute_mask_ptr(bitmask.data_ptr(), bitmask.numel() * 4)

    def accept(self, matcher, token):
        return matcher.consume_token(token)


def best_ms(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def import_seconds(module):
    """Import time in a fresh interpreter that already has torch (which both need anyway)."""
    code = f"import time, torch; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def walks(lib, compiled, schema, tokenizer, stops, vocab_size, n_walks):
    """Random-logits walks to a stop token. Per-token times (fill the bitmask, apply it to the logits with
    nanochat.grammar's torch code, accept the sampled token) and how many finished walks parse and validate."""
    bitmask = torch.empty(1, (vocab_size + 31) // 32, dtype=torch.int32)
    times = {"fill": [], "apply": [], "accept": []}
    valid = finished = 0
    lengths, failures = [], []
    for seed in range(n_walks):
        generator = torch.Generator().manual_seed(seed)
        matcher, tokens = lib.matcher(compiled), []
        for _ in range(MAX_STEPS):
            logits = torch.randn(vocab_size, generator=generator)
            t0 = time.perf_counter()
            lib.fill(matcher, bitmask)
            t1 = time.perf_counter()
            logits.masked_fill_(disallowed(bitmask, vocab_size, logits.device)[0], float("-inf"))
            t2 = time.perf_counter()
            token = torch.multinomial(logits.softmax(-1), 1, generator=generator).item()
            t3 = time.perf_counter()
            assert lib.accept(matcher, token), f"{lib.name} rejected a token its own mask allowed"
            t4 = time.perf_counter()
            for key, seconds in (("fill", t1 - t0), ("apply", t2 - t1), ("accept", t4 - t3)):
                times[key].append(seconds * 1e6)
            if token in stops:
                break
            tokens.append(token)
        else:
            continue
        finished += 1
        lengths.append(len(tokens))
        text = tokenizer.decode(tokens)
        try:
            jsonschema.validate(json.loads(text), schema)  # json.loads is strict: raw control characters fail
            valid += 1
        except (ValueError, jsonschema.ValidationError) as e:
            failures.append(f"{str(e).splitlines()[0]} in {text[:80]!r}...")
    stats = {f"{key}_us": round(statistics.mean(v), 1) for key, v in times.items()}
    stats.update({f"{key}_us_median": round(statistics.median(v), 1) for key, v in times.items()})
    return {**stats, "tokens": len(times["fill"]), "valid": valid, "finished": finished, "walks": n_walks,
            "mean_reply_tokens": round(statistics.mean(lengths)) if lengths else None, "first_failure": failures[:1]}


def batched(compiler, batch, steps):
    """µs per decode step (median: robust to a busy machine) to mask (batch, V) logits: mask_rows_ vs one
    mask_ per row, with the rows walking the 10-field schema (a row that stops starts over)."""
    compiled = compiler.compile({"type": "json_schema", "json_schema": {"name": "profile", "schema": PROFILE}})
    matchers = [Matcher(compiled) for _ in range(batch)]
    generator = torch.Generator().manual_seed(0)
    times = {"mask_rows_": [], "mask_ per row": []}

    def per_row(logits, matchers):
        for row, matcher in zip(logits, matchers):
            matcher.mask_(row)

    for step in range(steps):
        raw = torch.randn(batch, compiler.vocab_size, generator=generator)
        outputs = []
        order = [("mask_rows_", mask_rows_), ("mask_ per row", per_row)][::1 if step % 2 else -1]  # neither always first
        for name, fn in order:
            logits = raw.clone()
            t0 = time.perf_counter()
            fn(logits, matchers)
            times[name].append((time.perf_counter() - t0) * 1e6)
            outputs.append(logits)
        assert torch.equal(*outputs)
        for i, token in enumerate(torch.multinomial(outputs[0].softmax(-1), 1, generator=generator).flatten().tolist()):
            matchers[i].accept(token)
            if token in compiler.stop_token_ids:
                matchers[i] = Matcher(compiled)
    return {name: round(statistics.median(v), 1) for name, v in times.items()}


def served(tokenizer, batch, max_tokens=64, repeats=3):
    """
    What a constrained reply costs in the server: ms per generated token through the serving Scheduler (a
    d4-sized random model, one request of `batch` rows, sampled at temperature 1), plain vs JSON mode vs the
    10-field schema; best of `repeats` runs each.
    """
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.serving.scheduler import Scheduler
    from nanochat.serving.tickets import Ticket

    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=512, vocab_size=tokenizer.get_vocab_size(), n_layer=4, n_head=2,
                          n_kv_head=2, n_embd=256))
    model.init_weights()
    model.eval()
    done, counts = threading.Event(), {}

    def deliver(outbox):  # the scheduler thread's events: count tokens, notice when every row has finished
        for events in outbox.values():
            for kind, _, value in events:
                counts["error"] = value if kind == "error" else counts["error"]
                counts["tokens"] += kind == "token"
                counts["finished"] += kind == "finish"
        if counts["finished"] == batch or counts["error"]:
            done.set()

    scheduler = Scheduler(model, tokenizer, max_batch_size=batch, prefix_cache_rows=0, deliver=deliver)
    scheduler.start()
    prompt = tokenizer.render_for_completion({"messages": [{"role": "user", "content": "A person, as JSON."},
                                                           {"role": "assistant", "content": ""}]})
    formats = {"plain": None, "json_object": {"type": "json_object"},
               "10-field schema": {"type": "json_schema", "json_schema": {"name": "profile", "schema": PROFILE}}}
    results = {}
    for label, fmt in formats.items():
        best = float("inf")
        for seed in range(repeats):
            counts.update(tokens=0, finished=0, error=None)
            done.clear()
            t0 = time.perf_counter()
            scheduler.submit(Ticket([prompt], batch, max_tokens, 1.0, None, None, seed=seed, response_format=fmt))
            done.wait()
            if counts["error"]:
                raise SystemExit(f"error: generation failed ({label}): {counts['error']}")
            best = min(best, (time.perf_counter() - t0) * 1e3 / max(counts["tokens"], 1))
        results[label] = round(best, 3)
    scheduler.shutdown()
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--text", default=None, help="text to train the tokenizer on (default: the tinystories sample)")
    p.add_argument("--walks", type=int, default=10, help="random-logits walks per library and format")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=5, help="compile timings: best of this many")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    text_path = args.text or os.path.join(get_data_dir() or "", "tinystories", "tinystories_val_sample.txt")
    if not os.path.isfile(text_path):
        raise SystemExit(f"error: no text at {text_path!r}: pass --text or set NANOCHAT_DATA_DIR")
    with open(text_path, encoding="utf-8") as f:
        text = f.read()
    tokenizer = RustBPETokenizer.train_from_iterator((text[i:i + 10_000] for i in range(0, len(text), 10_000)),
                                                     args.vocab_size)
    tokenizer_vocab = tokenizer.get_vocab_size()
    vocab_size = (tokenizer_vocab + 63) // 64 * 64  # padded like a model's lm_head
    stops = [tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()]
    logits = torch.randn(vocab_size)  # for scale: one plain sampling step
    sample_us = best_ms(lambda: [torch.multinomial(logits.softmax(-1), 1) for _ in range(1000)], 3)

    results = {}
    for cls in (XGrammar, LLGuidance):
        if importlib.util.find_spec(cls.name) is None:
            print(f"{cls.name} is not installed: skipped (pip install {cls.name})")
            continue
        r = {"import_s": round(import_seconds(cls.name), 2)}
        importlib.import_module(cls.name)  # not in the tokenizer time below
        t0 = time.perf_counter()
        lib = cls(tokenizer, stops, vocab_size, args.threads)
        r["tokenizer_ms"] = round((time.perf_counter() - t0) * 1e3, 1)
        for label, schema in SCHEMAS.items():
            compiled = lib.compile(schema)
            r[label] = {"compile_ms": round(best_ms(lambda: lib.compile(schema), args.repeats), 2),
                        "new_matcher_us": round(best_ms(lambda: [lib.matcher(compiled) for _ in range(100)], 3) * 10, 1),
                        **walks(lib, compiled, schema, tokenizer, stops, vocab_size, args.walks)}
        results[cls.name] = r

    print(f"tokenizer vocab {tokenizer_vocab} (logits padded to {vocab_size}), threads {args.threads}; "
          f"a plain sampling step (softmax + multinomial): {sample_us:.1f} µs")
    print("µs per token: mean (median)")
    print(f"{'library':<12}{'format':<17}{'compile ms':>11}{'matcher µs':>11}{'fill mask':>14}{'apply mask':>14}"
          f"{'accept':>13}{'valid/finished/walks':>22}{'tokens/reply':>14}")
    for name, r in results.items():
        for label in SCHEMAS:
            s = r[label]
            per_token = "".join(f"{s[k + '_us']:>{w - 7}.1f} ({s[k + '_us_median']:>4.1f})"
                                for k, w in (("fill", 14), ("apply", 14), ("accept", 13)))
            print(f"{name:<12}{label:<17}{s['compile_ms']:>11.2f}{s['new_matcher_us']:>11.1f}{per_token}"
                  f"{s['valid']:>12}/{s['finished']}/{s['walks']}{s['mean_reply_tokens']:>14}")
    for name, r in results.items():
        print(f"{name}: import {r['import_s']} s (after torch), tokenizer info {r['tokenizer_ms']} ms")
        for label in SCHEMAS:
            for failure in r[label]["first_failure"]:
                print(f"  {label} invalid: {failure}")

    batch = {}
    if "llguidance" in results:
        compiler = GrammarCompiler(tokenizer, stops, vocab_size=vocab_size)
        batch = {"batch": args.batch, **batched(compiler, args.batch, 300)}
        print(f"nanochat.grammar, batch {args.batch}, µs per step (median): mask_rows_ {batch['mask_rows_']}, "
              f"mask_ per row {batch['mask_ per row']} ({batch['mask_ per row'] / batch['mask_rows_']:.2f}x)")
    serving = {}
    if "llguidance" in results:
        serving = served(tokenizer, args.batch)
        print(f"served (Scheduler, d4-sized model, {args.batch} rows), ms per generated token: " + ", ".join(
            f"{label} {ms:.3f} ({ms / serving['plain']:.2f}x)" for label, ms in serving.items()))
    print(json.dumps({"tokenizer_vocab": tokenizer_vocab, "vocab_size": vocab_size, "threads": args.threads,
                      "sample_step_us": round(sample_us, 1), "libraries": results, "nanochat_grammar": batch,
                      "served_ms_per_token": serving}))


if __name__ == "__main__":
    main()
