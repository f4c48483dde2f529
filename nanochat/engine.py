"""
Generation: prefill once, then one forward per generated token (or per verified draft with speculative
decoding), for one prompt or a batch of prompts of different lengths, with the calculator tool.
"""

from typing import TYPE_CHECKING

import torch

from nanochat.kv_cache import KVCache
from nanochat.sampling import sample_next_token, validate_sampling_params
from nanochat.speculative import SpeculativeRun
from nanochat.tools import RowState

if TYPE_CHECKING:  # annotations only: anything with GPT's forward(ids, kv_cache=, logits_at=) works
    from nanochat.gpt import GPT


def _normalize_prompts(tokens):
    """A prompt (list of ids) or a list of prompts -> (list of prompts, was_batch)."""
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.tolist()
    if not isinstance(tokens, (list, tuple)) or len(tokens) == 0:
        raise ValueError("tokens must be a non-empty list of token ids (or a list of such lists)")
    if all(isinstance(t, int) for t in tokens):
        return [list(tokens)], False
    if all(isinstance(p, (list, tuple)) for p in tokens):
        for i, p in enumerate(tokens):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty: every prompt needs at least one token (e.g. <|bos|>)")
            if not all(isinstance(t, int) for t in p):
                raise ValueError(f"prompt {i} must be a list of integer token ids")
        return [list(p) for p in tokens], True
    raise ValueError("tokens must be a list of token ids or a list of lists of token ids")


def _select_rows(value, indices):
    """A per-row sampling parameter (list/tensor) restricted to the rows still running; scalars pass through."""
    if isinstance(value, torch.Tensor):
        return value.reshape(-1)[indices]
    if isinstance(value, (list, tuple)):
        return [value[i] for i in indices]
    return value


def prefill_logits(model: "GPT", prompts: list[list[int]], pad_id: int,
                   kv_cache: KVCache | None = None) -> torch.Tensor:
    """
    The logits after each prompt's last token, (P, V) float32, from one forward over the prompts right-padded
    to the longest: a row's pads come after its tokens, so causal attention never lets a real token see them.
    With a kv_cache (one row per prompt, each continuing from its current length) the prompts' K/V are
    written into it and each row's length then counts its real tokens only (the pads' K/V are overwritten
    later, never read).
    """
    device = model.get_device()
    lengths = [len(p) for p in prompts]
    longest = max(lengths)
    ids = torch.tensor([p + [pad_id] * (longest - len(p)) for p in prompts], dtype=torch.long, device=device)
    start = None if kv_cache is None else kv_cache.lengths.clone()
    logits = model(ids, kv_cache=kv_cache, logits_at=torch.tensor(lengths, device=device) - 1)[:, 0]
    if kv_cache is not None:
        kv_cache.set_lengths(start + torch.tensor(lengths))
    return logits


class Engine:
    """
    Generation with the KV cache: prefill once, then one forward per generated token (or per verified
    draft, with speculative decoding). `draft` is None, a small GPT sharing the tokenizer, or "ngram".
    """

    def __init__(self, model: "GPT", tokenizer, draft: "GPT | str | None" = None):
        self.model, self.tokenizer, self.draft = model, tokenizer, draft

    @property
    def context_len(self):
        return self.model.config.sequence_len

    def _check(self, prompts, num_samples, max_tokens, temperature, top_k, top_p):
        """Validate everything up front, so bad input is a ValueError here and never an error in torch."""
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
            raise ValueError(f"max_tokens must be a positive integer (or None for the rest of the context), got {max_tokens!r}")
        num_rows = len(prompts) * num_samples
        per_row = [v for v in (temperature, top_k, top_p) if isinstance(v, (list, tuple))]
        if any(len(v) != num_rows for v in per_row):
            raise ValueError(f"per-row sampling parameters need one value per row ({num_rows})")
        for i in range(num_rows if per_row else 1):
            validate_sampling_params(*(v[i] if isinstance(v, (list, tuple)) else v for v in (temperature, top_k, top_p)))
        vocab_size = self.model.config.vocab_size
        for i, p in enumerate(prompts):
            if len(p) >= self.context_len:
                raise ValueError(f"prompt {i} has {len(p)} tokens but the model's context is {self.context_len}: "
                                 f"no room to generate")
            if min(p) < 0 or max(p) >= vocab_size:
                raise ValueError(f"prompt {i} has token ids outside [0, {vocab_size})")

    def _max_new_tokens(self, prompts, max_tokens):
        room = self.context_len - max(len(p) for p in prompts)
        return room if max_tokens is None else min(max_tokens, room)

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], num_samples: int = 1,
                capacity: int | None = None) -> tuple[KVCache, torch.Tensor]:
        """
        Run the prompts once, right-padded into one batch (row i's pad positions come after its tokens,
        so causal attention never sees them, and the cache lengths are then set to the real lengths).
        Returns (kv_cache with len(prompts) * num_samples rows, last-token logits (rows, V) float32);
        rows i*num_samples .. i*num_samples + num_samples-1 belong to prompt i.
        """
        T = max(map(len, prompts))
        kv_cache = KVCache.for_model(self.model, len(prompts), T)
        last = prefill_logits(self.model, prompts, self.tokenizer.get_pad_token_id(), kv_cache)  # (P, V)
        rows = [i for i in range(len(prompts)) for _ in range(num_samples)]
        kv_cache.reorder(rows, seq_len=max(capacity or T, T))
        return kv_cache, last[rows]

    @torch.inference_mode()
    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, top_p=None, seed=42,
                 speculative_num_tokens=0, **speculative_options):
        """
        Yields (token_column, token_masks) per step: one token per row (rows = prompts x num_samples,
        prompt-major), mask 1 = sampled, 0 = forced by the calculator tool. A finished row leaves the
        running batch (its cache rows are dropped) and repeats its terminal token with mask 0. temperature,
        top_k and top_p may also be per-row lists. Stops when every row has emitted <|assistant_end|> / <|bos|>, after max_tokens
        steps, or at the end of the context.
        """
        if speculative_num_tokens:
            if num_samples != 1:
                raise ValueError("speculative decoding needs num_samples == 1 and a single prompt")
            yield from self.speculative(tokens, max_tokens, temperature, top_k, top_p, seed, speculative_num_tokens,
                                        **speculative_options)
            return
        prompts, _ = _normalize_prompts(tokens)
        self._check(prompts, num_samples, max_tokens, temperature, top_k, top_p)
        max_new = self._max_new_tokens(prompts, max_tokens)
        device = self.model.get_device()
        generator = torch.Generator(device=device).manual_seed(seed)
        kv_cache, logits = self.prefill(prompts, num_samples, capacity=max(map(len, prompts)) + max_new)
        rows = [RowState(self.tokenizer) for _ in range(len(prompts) * num_samples)]
        column, masks = [None] * len(rows), [0] * len(rows)
        active = list(range(len(rows)))  # rows still generating; KV cache row j holds rows[active[j]]
        for step in range(max_new):
            params = [_select_rows(v, active) for v in (temperature, top_k, top_p)]
            sampled = sample_next_token(logits, generator, *params)[:, 0].tolist()
            masks = [0] * len(rows)  # finished rows repeat their terminal token with mask 0
            for i, s in zip(active, sampled):
                column[i], masks[i] = rows[i].next(s)
            yield list(column), masks
            still = [j for j, i in enumerate(active) if not rows[i].done]
            if not still or step == max_new - 1:
                return
            if len(still) < len(active):  # drop finished rows from the batch: no compute is spent on them
                kv_cache.reorder(still)
                active = [active[j] for j in still]
            ids = torch.tensor([column[i] for i in active], dtype=torch.long, device=device)[:, None]  # (active, 1)
            logits = self.model(ids, kv_cache=kv_cache)[:, -1]

    def speculative(self, tokens, max_tokens=None, temperature=1.0, top_k=None, top_p=None, seed=42,
                    speculative_num_tokens=4, **options) -> SpeculativeRun:
        """
        Speculative decoding of one prompt with this engine's drafter: a SpeculativeRun, iterated like
        generate (([token], [mask]) per step), whose `stats` (drafted, accepted, tokens per target forward,
        ...) the caller reads whenever it likes. options: see SpeculativeRun.
        """
        gamma = speculative_num_tokens
        if isinstance(gamma, bool) or not isinstance(gamma, int) or gamma < 1:
            raise ValueError(f"speculative_num_tokens must be a positive integer (0 = off in generate), got {gamma!r}")
        if self.draft is None:
            raise ValueError("speculative decoding needs a drafter: Engine(model, tokenizer, draft=<GPT> or 'ngram')")
        prompts, is_batch = _normalize_prompts(tokens)
        if is_batch and len(prompts) != 1:
            raise ValueError("speculative decoding needs num_samples == 1 and a single prompt")
        self._check(prompts, 1, max_tokens, temperature, top_k, top_p)
        max_new = self._max_new_tokens(prompts, max_tokens)
        return SpeculativeRun(self.model, self.tokenizer, self.draft, prompts[0], max_new, temperature, top_k, top_p,
                              seed, gamma, **options)

    def generate_batch(self, tokens, num_samples: int = 1, **kwargs) -> tuple[list[list[int]], list[list[int]]]:
        """
        Non-streaming generate. Returns (results, masks): one token list per row, the prompt included and
        the terminal token excluded. For one prompt: num_samples rows. For a list of prompts: row
        i * num_samples + j is sample j of prompt i (with num_samples=1, row i is prompt i).
        """
        prompts, _ = _normalize_prompts(tokens)
        steps = self.generate(prompts if len(prompts) > 1 else prompts[0], num_samples, **kwargs)
        return self.collect(steps, prompts, num_samples)

    def collect(self, steps, prompts, num_samples=1):
        """generate_batch's (results, masks) from the steps of generate or of a SpeculativeRun."""
        results = [list(p) for p in prompts for _ in range(num_samples)]
        masks = [[0] * len(p) for p in prompts for _ in range(num_samples)]
        terminal = self.tokenizer.terminal_token_ids()
        done = [False] * len(results)
        for column, column_masks in steps:
            for i, (token, mask) in enumerate(zip(column, column_masks)):
                if done[i]:
                    continue
                if token in terminal:
                    done[i] = True
                else:
                    results[i].append(token)
                    masks[i].append(mask)
            if all(done):
                break
        return results, masks

    @torch.inference_mode()
    def beam_search(self, tokens, num_beams=4, max_tokens=64, top_k=3, min_length=5.0, alpha=1.2):
        """
        Beam search with the GNMT length penalty lp(n) = ((min_length + n) / (min_length + 1)) ** alpha:
        every live beam expands its top_k tokens, the best num_beams candidates by log p / lp(n) live on,
        a candidate ending in <|assistant_end|> / <|bos|> is frozen as finished. The KV cache rows are
        reordered to follow the surviving beams (never recomputed).
        Returns [(tokens, normalized score)] best first; tokens include the prompt and, for a finished
        beam, its terminal token (a beam without one ran out of max_tokens).
        """
        prompts, is_batch = _normalize_prompts(tokens)
        if is_batch:
            raise ValueError("beam_search takes one prompt")
        for name, value in (("num_beams", num_beams), ("max_tokens", max_tokens), ("top_k", top_k)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self._check(prompts, 1, max_tokens, 1.0, None, None)
        prompt = prompts[0]
        max_new = self._max_new_tokens(prompts, max_tokens)
        terminal = self.tokenizer.terminal_token_ids()
        penalty = lambda n: ((min_length + n) / (min_length + 1)) ** alpha  # noqa: E731
        device = self.model.get_device()

        kv_cache, logits = self.prefill([prompt], 1, capacity=len(prompt) + max_new)
        beams = [([], 0.0)]  # (generated tokens, sum of log-probs)
        finished = []
        for step in range(max_new):
            logprobs = torch.log_softmax(logits.float(), dim=-1)  # (live beams, V)
            top_logprobs, top_ids = logprobs.topk(min(top_k, logprobs.size(-1)), dim=-1)
            candidates = [(score + lp, b, token) for b, (_, score) in enumerate(beams)
                          for lp, token in zip(top_logprobs[b].tolist(), top_ids[b].tolist())]
            candidates.sort(key=lambda c: c[0] / penalty(step + 1), reverse=True)
            survivors = []
            for score, b, token in candidates:  # best first, until num_beams live beams are found
                sequence = beams[b][0] + [token]
                if token in terminal:
                    finished.append((sequence, score / penalty(len(sequence))))
                else:
                    survivors.append((sequence, score, b))
                if len(survivors) == num_beams:
                    break
            if not survivors or len(finished) >= num_beams:
                beams = []
                break
            kv_cache.reorder([b for _, _, b in survivors])
            beams = [(sequence, score) for sequence, score, _ in survivors]
            if step < max_new - 1:
                ids = torch.tensor([[sequence[-1]] for sequence, _ in beams], dtype=torch.long, device=device)
                logits = self.model(ids, kv_cache=kv_cache)[:, -1]
        # beams still alive when max_tokens ran out compete with the finished ones
        finished += [(sequence, score / penalty(len(sequence))) for sequence, score in beams]
        finished.sort(key=lambda f: f[1], reverse=True)
        return [(prompt + sequence, score) for sequence, score in finished[:num_beams]]


def complete_greedy(model, tokenizer, prompts, max_tokens=32):
    """Greedy completions of text prompts in one batch (the samples printed by the base-model scripts)."""
    bos = tokenizer.get_bos_token_id()
    token_prompts = [[bos] + tokenizer.encode(p) for p in prompts]
    results, _ = Engine(model, tokenizer).generate_batch(token_prompts, max_tokens=max_tokens, temperature=0.0)
    return [tokenizer.decode(r[1:]) for r in results]
