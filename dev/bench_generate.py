"""
Generation speed, measured as ratios in one run:
  1. decode tokens/s at batch 1; decode ms/token after a 16 / 64 / 128 / 190-token prompt (reference d4 shape)
  2. 8 prompts of different lengths: one batch vs one by one (greedy; outputs must be identical)
  3. speculative decoding with a small trained draft model vs plain (greedy and T=1): acceptance rate,
     tokens per target forward (against (1 − α^(γ+1)) / (1 − α), with α the acceptance rate per examined
     draft position), wall speedup
  4. n-gram drafting vs plain at T=0 on an input-grounded prompt and on free text (outputs must be identical)

python dev/bench_generate.py [--target-tag d4] [--draft-tag d2] [--gamma 4] [--ngram-gamma 8] [--max-tokens 128]

Uses base checkpoints from $NANOCHAT_BASE_DIR; a missing target/draft is trained first with
scripts.base_train (d4: ~5 min, d2: ~1 min on 2 CPU cores; needs a tokenizer and pretraining data).
Cases compared in a ratio run interleaved, the best of --repeats runs each (a shared CPU has slow spells).
Prints a table and ends with one JSON line.
"""

import argparse
import json
import os
import time

import torch

from nanochat.checkpoint_manager import SOURCES, load_model
from nanochat.common import DEVICE_TYPES, autodetect_device_type, get_base_dir, synchronize
from nanochat.dataset import parquets_iter_batched
from nanochat.engine import Engine
from nanochat.gpt import GPT, config_from_depth
from nanochat.kv_cache import KVCache
from nanochat.speculative import expected_tokens_per_forward

TRAIN_RECIPES = {  # tag -> base_train flags for a quick CPU model
    "d4": ["--depth", "4", "--num-iterations", "300"],
    "d2": ["--depth", "2", "--num-iterations", "300"],
}
COMMON_TRAIN_FLAGS = ["--max-seq-len", "256", "--head-dim", "64", "--device-batch-size", "8", "--total-batch-size", "4096",
                      "--eval-every", "1000", "--eval-tokens", "16384", "--sample-every", "100000"]


def ensure_model(tag):
    if os.path.isdir(os.path.join(get_base_dir(), SOURCES["base"], tag)):
        return
    if tag not in TRAIN_RECIPES:
        raise SystemExit(f"error: no base checkpoint '{tag}' and no recipe to train it; train it with scripts.base_train")
    print(f"training the missing base model {tag} (once)...", flush=True)
    from scripts.base_train import main as base_train
    if base_train([*TRAIN_RECIPES[tag], *COMMON_TRAIN_FLAGS, "--model-tag", tag]) != 0:
        raise SystemExit(f"error: training {tag} failed")


REPEATS = 3


def timed(device, *fns):
    """
    [(output, best wall time of REPEATS runs)] for each fn, their runs interleaved (a, b, a, b, ...): a ratio
    of two cases then compares runs made under the same load, and the minimum is the least disturbed.
    """
    outputs, best = [None] * len(fns), [float("inf")] * len(fns)
    for _ in range(REPEATS):
        for i, fn in enumerate(fns):
            synchronize(device.type)
            t0 = time.perf_counter()
            outputs[i] = fn()
            synchronize(device.type)
            best[i] = min(best[i], time.perf_counter() - t0)
    return list(zip(outputs, best))


DECODE_PROMPT_LENGTHS = (16, 64, 128, 190)


def decode_ms_per_token(model, prompt_lengths, steps=32):
    """
    Batch-1 greedy decode after a prefill of each prompt length: {length: ms per token}, the best of
    4 * REPEATS runs per length, the lengths taken in turn so a slow spell of a shared machine hits all alike.
    """
    device = model.get_device()

    @torch.inference_mode()
    def run(prompt_len):
        ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
        kv_cache = KVCache.for_model(model, 1, prompt_len + steps)
        logits = model(ids.to(device), kv_cache=kv_cache)[:, -1]
        synchronize(device.type)
        t0 = time.perf_counter()
        for _ in range(steps):
            token = logits.argmax(dim=-1, keepdim=True)  # (1, 1)
            logits = model(token, kv_cache=kv_cache)[:, -1]
            token.tolist()  # generation reads every token on the host
        synchronize(device.type)
        return time.perf_counter() - t0

    run(prompt_lengths[0])  # warm-up
    best = {n: float("inf") for n in prompt_lengths}
    for _ in range(4 * REPEATS):
        for n in prompt_lengths:
            best[n] = min(best[n], run(n))
    return {n: seconds / steps * 1000 for n, seconds in best.items()}


def speculative_batch(engine, prompt, gamma, **kwargs):
    """generate_batch's results for one prompt decoded speculatively, and the run's statistics."""
    run = engine.speculative(prompt, speculative_num_tokens=gamma, **kwargs)
    return engine.collect(run, [prompt])[0], run.stats


def generated_count(results, prompts):
    return sum(len(r) - len(p) for r, p in zip(results, prompts))


def main():
    p = argparse.ArgumentParser(description="Generation benchmarks (ratios in one run)")
    p.add_argument("--target-tag", default="d4")
    p.add_argument("--draft-tag", default="d2")
    p.add_argument("--gamma", type=int, default=4, help="draft-model tokens per target forward (at most, adaptive)")
    p.add_argument("--ngram-gamma", type=int, default=8, help="n-gram tokens per target forward (at most, adaptive):"
                   " n-gram drafts cost almost nothing, so the acceptance rule gets more room")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="time each case this many times, keep the best")
    p.add_argument("--device-type", default=None, choices=DEVICE_TYPES)
    args = p.parse_args()
    global REPEATS
    REPEATS = max(1, args.repeats)
    device = torch.device(args.device_type or autodetect_device_type())
    ensure_model(args.target_tag)
    ensure_model(args.draft_tag)
    target, tokenizer, _ = load_model("base", device, "eval", model_tag=args.target_tag)
    draft, _, _ = load_model("base", device, "eval", model_tag=args.draft_tag)
    bos = tokenizer.get_bos_token_id()
    val_docs = next(parquets_iter_batched("val"))
    text = " ".join(val_docs)[:20000]
    rows, summary = [], {"bench": "generate", "device": device.type, "target": args.target_tag, "draft": args.draft_tag,
                         "gamma": args.gamma, "ngram_gamma": args.ngram_gamma, "max_tokens": args.max_tokens}
    plain = Engine(target, tokenizer)

    # 1. decode tokens/s at batch 1 (time per generated token after a short prompt)
    prompt = [bos] + tokenizer.encode(text[:200])[:32]
    plain.generate_batch(prompt, max_tokens=8, temperature=0.0)  # warm-up
    [((results, _), seconds)] = timed(device, lambda: plain.generate_batch(prompt, max_tokens=args.max_tokens, temperature=0.0))
    decode_tps = generated_count(results, [prompt]) / seconds
    rows.append(("decode, batch 1", f"{decode_tps:,.1f} tok/s", ""))
    summary["decode_tokens_per_second"] = round(decode_tps, 1)

    # 1b. decode latency per prompt length, on the reference d4 shape (width 256, 2 heads of 128, vocab 4096)
    latency_model = GPT(config_from_depth(4, 256, 4096, "mha", 128)).to(device)
    latency_model.init_weights()
    latency = decode_ms_per_token(latency_model.eval(), DECODE_PROMPT_LENGTHS)
    rows.append(("decode ms/token, d4 ref", " / ".join(f"{ms:.2f}" for ms in latency.values()),
                 "after a " + " / ".join(map(str, DECODE_PROMPT_LENGTHS)) + "-token prompt"))
    summary["decode_ms_per_token"] = {str(n): round(ms, 3) for n, ms in latency.items()}

    # 2. eight prompts of different lengths: one batch vs one by one
    words = text.split()
    prompts = [[bos] + tokenizer.encode(" ".join(words[i * 40:i * 40 + n])) for i, n in enumerate(range(4, 68, 8))]
    batch_max = args.max_tokens // 2
    ((batched, _), batched_s), (serial, serial_s) = timed(
        device, lambda: plain.generate_batch(prompts, max_tokens=batch_max, temperature=0.0),
        lambda: [plain.generate_batch(q, max_tokens=batch_max, temperature=0.0)[0][0] for q in prompts])
    assert batched == serial, "batched greedy output differs from one-by-one"
    n_tokens = generated_count(batched, prompts)
    batch_speedup = serial_s / batched_s
    rows.append(("8 prompts batched", f"{n_tokens / batched_s:,.1f} tok/s", f"{batch_speedup:.2f}x vs one by one"))
    rows.append(("8 prompts one by one", f"{n_tokens / serial_s:,.1f} tok/s", "identical outputs"))
    summary.update(batch_tokens_per_second=round(n_tokens / batched_s, 1), serial_tokens_per_second=round(n_tokens / serial_s, 1),
                   batch_speedup=round(batch_speedup, 2))

    # 3. speculative with the draft model vs plain
    prompt = [bos] + tokenizer.encode(text[2000:2400])[:48]
    args.max_tokens = min(args.max_tokens, target.config.sequence_len - 100)  # every prompt below fits in 100 tokens
    spec_engine = Engine(target, tokenizer, draft=draft)
    for temperature in (0.0, 1.0):
        kw = dict(max_tokens=args.max_tokens, temperature=temperature, seed=0)
        ((base_out, _), base_s), ((spec_out, s), spec_s) = timed(
            device, lambda: plain.generate_batch(prompt, **kw), lambda: speculative_batch(spec_engine, prompt, args.gamma, **kw))
        if temperature == 0.0:
            assert spec_out == base_out, "speculative greedy output differs from plain greedy"
        alpha, per_forward = s["position_acceptance_rate"], s["tokens_per_target_forward"]
        formula = expected_tokens_per_forward(alpha, args.gamma)
        speedup = (generated_count(spec_out, [prompt]) / spec_s) / (generated_count(base_out, [prompt]) / base_s)
        rows.append((f"draft {args.draft_tag}, T={temperature:g}", f"alpha {alpha:.3f}, {per_forward:.2f} tok/fwd",
                     f"{speedup:.2f}x wall; formula {formula:.2f} tok/fwd"))
        summary[f"draft_T{temperature:g}"] = dict(acceptance_rate=round(s["acceptance_rate"], 3), position_acceptance_rate=round(alpha, 3),
                                                  tokens_per_target_forward=round(per_forward, 3),
                                                  formula_tokens_per_forward=round(formula, 3), wall_speedup=round(speedup, 2))

    # 4. n-gram drafts. Input-grounded: the passage is in the prompt twice, then its opening again, so the
    #    continuation can be looked up in the context. Free text: an ordinary prompt, for contrast.
    passage = " ".join(words[600:640])
    grounded = [bos] + tokenizer.encode(f"{passage}\n\n{passage}\n\n{' '.join(words[600:610])}")
    free = [bos] + tokenizer.encode(" ".join(words[1200:1240]))
    ngram_engine = Engine(target, tokenizer, draft="ngram")
    for name, prompt in (("grounded", grounded), ("free text", free)):
        kw = dict(max_tokens=min(args.max_tokens, target.config.sequence_len - len(prompt)), temperature=0.0)
        ((base_out, _), base_s), ((ngram_out, s), ngram_s) = timed(
            device, lambda: plain.generate_batch(prompt, **kw), lambda: speculative_batch(ngram_engine, prompt, args.ngram_gamma, **kw))
        assert ngram_out == base_out, "n-gram speculative greedy output differs from plain greedy"
        speedup, ngram_tps = base_s / ngram_s, generated_count(ngram_out, [prompt]) / ngram_s
        rows.append((f"n-gram {name}, T=0", f"alpha {s['position_acceptance_rate']:.3f}, {s['tokens_per_target_forward']:.2f} tok/fwd",
                     f"{speedup:.2f}x wall ({ngram_tps:,.0f} tok/s), identical output"))
        summary[f"ngram_T0_{name.replace(' ', '_')}"] = dict(
            acceptance_rate=round(s["acceptance_rate"], 3), position_acceptance_rate=round(s["position_acceptance_rate"], 3),
            tokens_per_target_forward=round(s["tokens_per_target_forward"], 3),
            wall_speedup=round(speedup, 2), tokens_per_second=round(ngram_tps, 1))

    print(f"\ntarget {args.target_tag} ({target.num_params():,} params), draft {args.draft_tag} ({draft.num_params():,}), "
          f"device {device.type}, torch threads {torch.get_num_threads()}")
    print(f"{'measurement':<28}{'result':<34}{'ratio / note'}")
    for name, result, note in rows:
        print(f"{name:<28}{result:<34}{note}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
