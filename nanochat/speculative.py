"""
Exact speculative decoding.

A cheap drafter proposes γ tokens; the target model scores all of them in ONE forward pass and keeps a
prefix, so several tokens can come out of one target forward. Verification (Leviathan et al. 2023; Chen
et al. 2023) keeps the output distribution exactly the target's:
- draft token d_i with draft probability q_i(d_i) is accepted with probability min(1, p_i(d_i) / q_i(d_i));
- at the first rejection we emit a token from the residual norm(max(0, p_i − q_i)) and stop;
- if all γ are accepted, a bonus token is sampled from the target's next distribution p_{γ+1}.
p and q are processed by the SAME sampling.process_logits (temperature, top-k, top-p). At temperature 0
both are one-hot, so a draft is accepted iff it equals the target's argmax: greedy output is identical.
One-hot drafts (n-grams, q = δ_d) simplify to: sample s ~ p; accept iff s == d, else emit that same s.

Drafters: a small GPT with its own KV cache (`draft=<GPT>`), or n-grams of the context (`draft="ngram"`).
Adaptive γ: "entropy" (γ = clip(int((1 − H/log V)·γ_max), γ_min, γ_max) from the drafter's entropy,
optionally EMA-smoothed) or "acceptance" (γ maximizing expected tokens per unit of cost for the observed
acceptance rate α: E[tokens] = (1 − α^(γ+1)) / (1 − α), cost = 1 + draft_cost·γ).
"""

import math
from collections import defaultdict

import torch

from nanochat.engine import KVCache, RowState
from nanochat.sampling import is_greedy, process_logits, sample_from_probs

ADAPTIVE_RULES = (None, "entropy", "acceptance")


class NgramDrafter:
    """
    Prompt lookup / n-gram storage of the context. Counts next tokens after every context of n−1 tokens,
    for n = max_n down to min_n (multi-level back-off; min_n == max_n is a single level), updated online
    with every emitted token. Proposes the most frequent continuation (latest seen wins ties) of the
    longest matching context. With stop_when_unknown=False and no match, a unigram guess continues.
    filler_top_k > 0 adds the target's top-k tokens at verified positions as pseudo-observations
    (weight filler_weight), so contexts the target has scored become draftable before they repeat.
    """

    def __init__(self, max_n=4, min_n=2, stop_when_unknown=True, filler_top_k=0, filler_weight=0.25):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"n-gram sizes need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        self.max_n, self.min_n = max_n, min_n
        self.stop_when_unknown, self.filler_top_k, self.filler_weight = stop_when_unknown, filler_top_k, filler_weight
        self.counts = defaultdict(lambda: defaultdict(float))  # context tuple -> next token -> weight
        self.last_seen = {}  # (context, token) -> time, to break ties towards the most recent
        self.clock = 0
        self.observed = 0  # how many tokens of the sequence have been indexed

    def _add(self, context, token, weight):
        self.counts[context][token] += weight
        self.clock += 1
        self.last_seen[(context, token)] = self.clock

    def observe(self, tokens):
        """Index the n-grams ending at tokens[self.observed:] (call with the whole sequence so far)."""
        for i in range(max(self.observed, 1), len(tokens)):
            for n in range(self.min_n, self.max_n + 1):
                if i - (n - 1) >= 0:
                    self._add(tuple(tokens[i - n + 1:i]), tokens[i], 1.0)
            if not self.stop_when_unknown:
                self._add((), tokens[i], 1.0)
        self.observed = len(tokens)

    def observe_target(self, context_tokens, target_scores):
        """Filler: the target's top-k at a verified position (logits or probs (V,)) become weak observations."""
        if self.filler_top_k <= 0:
            return
        top = target_scores.topk(self.filler_top_k).indices.tolist()
        for n in range(self.min_n, self.max_n + 1):
            if len(context_tokens) >= n - 1:
                context = tuple(context_tokens[len(context_tokens) - (n - 1):])
                for token in top:
                    self._add(context, token, self.filler_weight)

    def _lookup(self, tokens):
        levels = range(self.max_n, self.min_n - 1, -1)
        contexts = [tuple(tokens[len(tokens) - (n - 1):]) for n in levels if len(tokens) >= n - 1]
        if not self.stop_when_unknown:
            contexts.append(())
        for context in contexts:
            nexts = self.counts.get(context)
            if nexts:
                return max(nexts, key=lambda t: (nexts[t], self.last_seen[(context, t)]))
        return None

    def propose(self, tokens, gamma):
        drafts = []
        for _ in range(gamma):
            token = self._lookup(tokens + drafts)
            if token is None:
                break
            drafts.append(token)
        return drafts


class ModelDrafter:
    """A small GPT sharing the tokenizer, with its own KV cache that follows the accepted sequence."""

    def __init__(self, model, capacity):
        self.model = model
        self.kv_cache = KVCache.for_model(model, 1, capacity)
        self.cached = 0  # tokens of the sequence already in the draft cache

    @torch.no_grad()
    def propose(self, tokens, gamma, sampling, generator, first_gamma_rule=None):
        """
        Sample up to gamma drafts from q. Returns (drafts, q (len(drafts), V)). first_gamma_rule(q_1)
        may shrink gamma after seeing the first distribution (entropy-adaptive γ).
        """
        device = self.model.get_device()
        self.kv_cache.set_lengths([self.cached])
        ids = torch.tensor([tokens[self.cached:]], dtype=torch.long, device=device)
        drafts, qs = [], []
        while len(drafts) < gamma:
            logits = self.model(ids, kv_cache=self.kv_cache)[:, -1]  # (1, V)
            q = process_logits(logits, **sampling)
            if not drafts and first_gamma_rule is not None:  # entropy of the model itself, before temperature etc.
                gamma = min(gamma, first_gamma_rule(torch.softmax(logits[0].float(), dim=-1)))
            token = sample_from_probs(q, generator)  # (1, 1)
            drafts.append(int(token))
            qs.append(q[0])
            ids = token
        self.cached = len(tokens) + len(drafts) - 1  # the last draft was sampled, not fed
        return drafts, torch.stack(qs)

    def rollback(self, num_valid):
        self.cached = min(self.cached, num_valid)


def entropy_gamma(probs, gamma_min, gamma_max):
    """EGAG: fewer drafts when the distribution is uncertain. H is normalized by log V (0 = certain)."""
    p = probs[probs > 0]
    entropy = float(-(p * p.log()).sum())
    return int(min(max(int((1 - entropy / math.log(probs.numel())) * gamma_max), gamma_min), gamma_max)), entropy


def acceptance_gamma(alpha, draft_cost, gamma_min, gamma_max):
    """γ maximizing (1 − α^(γ+1)) / ((1 − α)(1 + draft_cost·γ)): expected tokens per unit of cost."""
    alpha = min(max(alpha, 1e-3), 1 - 1e-3)
    value = lambda g: (1 - alpha ** (g + 1)) / ((1 - alpha) * (1 + draft_cost * g))  # noqa: E731
    return max(range(gamma_min, gamma_max + 1), key=value)


def expected_tokens_per_forward(alpha, gamma):
    """Leviathan et al.: with i.i.d. acceptance α, one target forward yields (1 − α^(γ+1)) / (1 − α) tokens."""
    return gamma + 1 if alpha >= 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)


def verify(p, drafts, q, generator, greedy=False):
    """
    p: (γ+1, V) target distributions at the draft positions and one past them; q: (γ, V) draft
    distributions or None for one-hot drafts. Returns (number accepted, the token to emit after them).
    greedy: temperature 0, so acceptance is "draft == argmax p" and no randomness is drawn (p may be logits).
    """
    if greedy:
        targets = p.argmax(dim=-1).tolist()
        n = next((i for i, d in enumerate(drafts) if d != targets[i]), len(drafts))
        return n, targets[n]
    for i, d in enumerate(drafts):
        if q is None:  # one-hot draft: sample s ~ p_i; accept iff s == d, else emit s
            s = int(sample_from_probs(p[i:i + 1], generator))
            if s != d:
                return i, s
            continue
        r = torch.rand((), generator=generator, device=p.device)
        if r * q[i, d] < p[i, d]:  # r < p/q, i.e. probability min(1, p/q); strict so p = 0 never accepts
            continue
        residual = (p[i] - q[i]).clamp(min=0)
        if residual.sum() <= 0:  # p == q: rejection has probability 0; numerically, fall back to p
            residual = p[i]
        return i, int(sample_from_probs((residual / residual.sum())[None], generator))
    return len(drafts), int(sample_from_probs(p[len(drafts):len(drafts) + 1], generator))


@torch.no_grad()
def speculative_generate(engine, prompt, max_new, temperature, top_k, top_p, seed, gamma_max,
                         adaptive=None, gamma_min=1, entropy_ema=None, draft_cost=None, ngram_max_n=4,
                         ngram_min_n=2, ngram_stop_when_unknown=True, ngram_filler_top_k=0, tool_state=None):
    """
    Engine.generate(..., speculative_num_tokens=γ): yields ([token], [mask]) one token at a time.
    tool_state: the RowState of a sequence that has already generated part of its reply (a server
    continuing it): its calculator state carries on here, and is exactly up to date after every yield.
    """
    if adaptive not in ADAPTIVE_RULES:
        raise ValueError(f"adaptive must be one of {ADAPTIVE_RULES}, got {adaptive!r}")
    if not 1 <= gamma_min <= gamma_max:
        raise ValueError(f"need 1 <= gamma_min <= speculative_num_tokens, got gamma_min={gamma_min}")
    model, tokenizer = engine.model, engine.tokenizer
    device = model.get_device()
    generator = torch.Generator(device=device).manual_seed(seed)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    greedy = is_greedy(temperature)
    capacity = len(prompt) + max_new + gamma_max + 1
    if engine.draft == "ngram":
        drafter = NgramDrafter(ngram_max_n, ngram_min_n, ngram_stop_when_unknown, ngram_filler_top_k)
        draft_cost = 0.05 if draft_cost is None else draft_cost
    else:
        if engine.draft.config.vocab_size != model.config.vocab_size:
            raise ValueError("the draft model must share the target's tokenizer (vocab sizes differ)")
        drafter = ModelDrafter(engine.draft, capacity)
        draft_cost = engine.draft.estimate_flops() / model.estimate_flops() if draft_cost is None else draft_cost

    target_cache = KVCache.for_model(model, 1, capacity)
    target_cached = 0
    tokens, row = list(prompt), RowState(tokenizer) if tool_state is None else tool_state
    stats = dict(drafted=0, accepted=0, rejected=0, target_forwards=0, emitted=0, acceptance_rate=0.0,
                 position_acceptance_rate=0.0, tokens_per_target_forward=0.0)
    engine.last_speculative_stats = stats
    gamma, alpha, smoothed_entropy = gamma_max, None, None

    def entropy_rule(probs):
        nonlocal smoothed_entropy
        g, h = entropy_gamma(probs, gamma_min, gamma_max)
        if entropy_ema is not None:
            smoothed_entropy = h if smoothed_entropy is None else entropy_ema * smoothed_entropy + (1 - entropy_ema) * h
            g = int(min(max(int((1 - smoothed_entropy / math.log(probs.numel())) * gamma_max), gamma_min), gamma_max))
        return g

    last_distribution = None
    while stats["emitted"] < max_new and not row.done:
        if row.has_forced():  # tool output: emitted as is, fed with the next verification forward
            token, mask = row.next(None)
            tokens.append(token)
            stats["emitted"] += 1
            yield [token], [mask]
            continue
        budget = min(gamma, max_new - stats["emitted"] - 1)  # the forward also yields a bonus/correction token
        if adaptive == "entropy" and engine.draft == "ngram" and last_distribution is not None:
            budget = min(budget, entropy_rule(last_distribution))  # the target's latest entropy as the proxy
        if engine.draft == "ngram":
            drafter.observe(tokens)
            drafts, q = drafter.propose(tokens, budget), None
        elif budget > 0:
            drafts, q = drafter.propose(tokens, budget, sampling, generator,
                                        entropy_rule if adaptive == "entropy" else None)
        else:
            drafts, q = [], None

        # one target forward over the not-yet-cached tokens plus the drafts
        target_cache.set_lengths([target_cached])
        new = tokens[target_cached:] + drafts
        logits = model(torch.tensor([new], dtype=torch.long, device=device), kv_cache=target_cache)[0]
        p = logits[len(new) - len(drafts) - 1:]  # (len(drafts) + 1, V) at the draft positions and one past
        if not greedy:  # greedy verification only compares argmaxes: no distribution needed
            p = process_logits(p, **sampling)
        num_accepted, next_token = verify(p, drafts, q, generator, greedy=greedy)
        stats["target_forwards"] += 1
        stats["drafted"] += len(drafts)
        stats["accepted"] += num_accepted
        stats["rejected"] += num_accepted < len(drafts)
        stats["acceptance_rate"] = stats["accepted"] / stats["drafted"] if stats["drafted"] else 0.0
        # per verified position (drafts after a rejection are never examined): the α of the formula
        decided = stats["accepted"] + stats["rejected"]
        stats["position_acceptance_rate"] = stats["accepted"] / decided if decided else 0.0
        last_distribution = torch.softmax(logits[len(new) - len(drafts) - 1 + num_accepted].float(), dim=-1)
        if engine.draft == "ngram":
            for i in range(num_accepted + 1 if drafter.filler_top_k > 0 else 0):
                drafter.observe_target(tokens + drafts[:i], logits[len(new) - len(drafts) - 1 + i])
        target_cached = len(tokens) + num_accepted  # cache holds everything up to the last accepted draft

        for token in drafts[:num_accepted] + [next_token]:
            token, mask = row.next(token)
            tokens.append(token)
            stats["emitted"] += 1
            # kept current at every token: the caller may stop iterating anywhere
            stats["tokens_per_target_forward"] = stats["emitted"] / stats["target_forwards"]
            yield [token], [mask]
            if row.done or row.has_forced() or stats["emitted"] >= max_new:
                break
        target_cached = min(target_cached, len(tokens))
        if isinstance(drafter, ModelDrafter):
            drafter.rollback(len(tokens) - 1)

        if drafts and adaptive == "acceptance":
            observed = num_accepted / len(drafts)
            alpha = observed if alpha is None else 0.7 * alpha + 0.3 * observed
            gamma = acceptance_gamma(alpha, draft_cost, gamma_min, gamma_max)
