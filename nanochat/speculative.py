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
Both implement propose(tokens, gamma) -> (drafts, q or None) and sync(tokens, target_logits), called after
every verification, and carry `cost`: one drafted token's cost relative to a target forward.
Adaptive γ: "acceptance" (the default: γ maximizing expected tokens per unit of cost for the observed
acceptance rate α: E[tokens] = (1 − α^(γ+1)) / (1 − α), cost = 1 + cost·γ; n-gram proposals are cut by the
learned acceptance of each draft's kind instead), "entropy" (γ = clip(int((1 −
H/log V)·γ_max), γ_min, γ_max) from the drafter's entropy, optionally EMA-smoothed) or None (always γ_max).
"""

import math

import torch

from nanochat.kv_cache import KVCache
from nanochat.sampling import is_greedy, process_logits, sample_from_probs
from nanochat.tools import RowState

ADAPTIVE_RULES = (None, "entropy", "acceptance")


class NgramDrafter:
    """
    Prompt lookup / n-gram storage of the context. Counts next tokens after every context of n−1 tokens,
    for n = max_n down to min_n (multi-level back-off; min_n == max_n is a single level), updated online
    with every emitted token. Proposes the most frequent continuation (latest seen wins ties) of the
    longest matching context. With stop_when_unknown=False and no match, a unigram guess continues.
    filler_top_k > 0 adds the target's top-k tokens at verified positions as pseudo-observations
    (weight filler_weight), so contexts the target has scored become draftable before they repeat.

    The index is incremental: each new token costs one update per level, and each context keeps its current
    best continuation, so a proposal is one dictionary lookup per level and drafted token.

    With trim, every draft has a kind (how long a context matched, how often it went on this way, whether
    always), each kind's acceptance is learned from the verifications, and a proposal is cut to the length
    with the most expected tokens per unit of cost (1 for the forward, plus fixed_cost once any token is
    drafted, plus cost per draft: see widening_cost). Measured on repetitive text, a draft after a 3-token
    context seen 3+ times always the same way is accepted ~98% of the time, one after a 1-token context seen
    once ~40%.
    """

    def __init__(self, max_n=4, min_n=2, stop_when_unknown=True, filler_top_k=0, filler_weight=0.25, cost=0.05,
                 fixed_cost=0.0, trim=False):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"n-gram sizes need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        self.max_n, self.min_n = max_n, min_n
        self.stop_when_unknown, self.filler_top_k, self.filler_weight = stop_when_unknown, filler_top_k, filler_weight
        self.counts = {}  # context tuple -> {next token: weight}
        self.totals = {}  # context tuple -> the sum of its weights
        self.best = {}  # context tuple -> its most frequent next token, the latest seen among equals
        self.observed = 0  # how many tokens of the sequence have been indexed
        self.cost, self.fixed_cost, self.trim = cost, fixed_cost, trim
        self.outcomes = {}  # kind of draft -> [accepted, examined]
        self._proposal = None  # (sequence length, drafts, their kinds) of the proposal awaiting its verification

    def _add(self, context, token, weight):
        nexts = self.counts.setdefault(context, {})
        nexts[token] = nexts.get(token, 0.0) + weight
        self.totals[context] = self.totals.get(context, 0.0) + weight
        best = self.best.get(context)
        if best is None or nexts[token] >= nexts[best]:  # >=: the token just seen is the latest
            self.best[context] = token

    def observe(self, tokens):
        """Index the n-grams ending at tokens[self.observed:] (call with the whole sequence so far)."""
        for i in range(max(self.observed, 1), len(tokens)):
            for n in range(self.min_n, min(self.max_n, i + 1) + 1):
                self._add(tuple(tokens[i - n + 1:i]), tokens[i], 1.0)
            if not self.stop_when_unknown:
                self._add((), tokens[i], 1.0)
        self.observed = max(self.observed, len(tokens))

    def observe_target(self, context_tokens, target_scores):
        """Filler: the target's top-k at a verified position (logits or probs (V,)) become weak observations."""
        top = target_scores.topk(self.filler_top_k).indices.tolist()
        for n in range(self.min_n, self.max_n + 1):
            if len(context_tokens) >= n - 1:
                context = tuple(context_tokens[len(context_tokens) - (n - 1):])
                for token in top:
                    self._add(context, token, self.filler_weight)

    def _lookup(self, tail):
        """(continuation, kind) of the longest indexed context ending `tail` (the last max_n − 1 tokens), or None."""
        contexts = [tuple(tail[len(tail) - (n - 1):]) for n in range(min(self.max_n, len(tail) + 1), self.min_n - 1, -1)]
        if not self.stop_when_unknown:
            contexts.append(())
        for context in contexts:
            token = self.best.get(context)
            if token is not None:
                weight = self.counts[context][token]
                return token, (len(context), min(int(weight), 3), weight == self.totals[context])
        return None

    def _acceptance(self, kind):
        """
        A kind's acceptance so far. An unseen kind starts at 0.92, worth two verifications: optimistic, as a long
        draft that comes true gives up to γ + 1 tokens and one that fails costs a few positions of one forward.
        """
        accepted, examined = self.outcomes.get(kind, (0, 0))
        return (accepted + 1.84) / (examined + 2)

    def _best_length(self, kinds):
        """The number of drafts maximizing (1 + Σ_i Π_{j<=i} a_j) / (1 + fixed_cost + cost·i): tokens per cost."""
        best, best_value, expected, all_accepted = 0, 1.0, 1.0, 1.0
        for i, kind in enumerate(kinds, start=1):
            all_accepted *= self._acceptance(kind)
            expected += all_accepted
            value = expected / (1 + self.fixed_cost + self.cost * i)
            if value > best_value:
                best, best_value = i, value
        return best

    def propose(self, tokens, gamma):
        self.observe(tokens)
        tail, drafts, kinds = tokens[max(0, len(tokens) - (self.max_n - 1)):], [], []  # the last max_n − 1 tokens
        for _ in range(gamma):
            found = self._lookup(tail)
            if found is None:
                break
            drafts.append(found[0])
            kinds.append(found[1])
            tail = (tail + [found[0]])[1:] if len(tail) == self.max_n - 1 else tail + [found[0]]
        if self.trim:
            keep = self._best_length(kinds)
            drafts, kinds = drafts[:keep], kinds[:keep]
        self._proposal = (len(tokens), drafts, kinds)
        return drafts, None

    def sync(self, tokens, target_logits):
        """
        tokens: the sequence after the verification; target_logits (k, V): the target's logits that predicted its
        last k tokens. Each draft up to the first rejected one counts towards its kind's acceptance.
        """
        if self._proposal is not None:
            start, drafts, kinds = self._proposal
            for draft, kind, token in zip(drafts, kinds, tokens[start:]):
                outcome = self.outcomes.setdefault(kind, [0, 0])
                outcome[1] += 1
                if token != draft:
                    break
                outcome[0] += 1
            self._proposal = None
        if self.filler_top_k > 0:
            k = target_logits.size(0)
            for i in range(k):
                self.observe_target(tokens[:len(tokens) - k + i], target_logits[i])


def widening_cost(device: torch.device) -> tuple[float, float]:
    """
    What n-gram drafts add to the verify forward, relative to a one-token forward: (fixed, per draft). On a
    2-core CPU (d4, 200 cached tokens) 2 positions cost 1.19x one, 5 positions 1.31x, 9 positions 1.53x: a product
    of two rows or more leaves MKL's matrix-vector path (~0.14 once), then each position adds ~0.05. A GPU forward
    of a few positions is bound by reading the weights, so each costs little more: (0, 0.05), not measured.
    """
    return (0.14, 0.05) if device.type == "cpu" else (0.0, 0.05)


class ModelDrafter:
    """A small GPT sharing the tokenizer, with its own KV cache that follows the accepted sequence."""

    def __init__(self, model, target, capacity, sampling, generator, gamma_rule=None):
        if model.config.vocab_size != target.config.vocab_size:
            raise ValueError("the draft model must share the target's tokenizer (vocab sizes differ)")
        self.model, self.sampling, self.generator, self.gamma_rule = model, sampling, generator, gamma_rule
        self.kv_cache = KVCache.for_model(model, 1, capacity)
        self.cached = 0  # tokens of the sequence already in the draft cache
        self.cost = model.estimate_flops() / target.estimate_flops()

    def propose(self, tokens, gamma):
        """
        Sample up to gamma drafts from q. Returns (drafts, q (len(drafts), V)). gamma_rule(probs) may shrink
        gamma after seeing the first distribution (entropy-adaptive γ).
        """
        device = self.model.get_device()
        self.kv_cache.set_lengths([self.cached])
        ids = torch.tensor([tokens[self.cached:]], dtype=torch.long, device=device)
        drafts, qs = [], []
        while len(drafts) < gamma:
            logits = self.model(ids, kv_cache=self.kv_cache)[:, -1]  # (1, V)
            q = process_logits(logits, **self.sampling)
            if not drafts and self.gamma_rule is not None:  # entropy of the model itself, before temperature etc.
                gamma = min(gamma, self.gamma_rule(torch.softmax(logits[0].float(), dim=-1)))
            token = sample_from_probs(q, self.generator)  # (1, 1)
            drafts.append(int(token))
            qs.append(q[0])
            ids = token
        self.cached = len(tokens) + len(drafts) - 1  # the last draft was sampled, not fed
        return drafts, torch.stack(qs) if qs else None

    def sync(self, tokens, target_logits):
        self.cached = min(self.cached, len(tokens) - 1)  # the last token (the target's) was never fed here


def _gamma_for_entropy(entropy, vocab_size, gamma_min, gamma_max):
    return min(max(int((1 - entropy / math.log(vocab_size)) * gamma_max), gamma_min), gamma_max)


def entropy_gamma(probs, gamma_min, gamma_max):
    """EGAG: fewer drafts when the distribution is uncertain. H is normalized by log V (0 = certain)."""
    p = probs[probs > 0]
    entropy = float(-(p * p.log()).sum())
    return _gamma_for_entropy(entropy, probs.numel(), gamma_min, gamma_max), entropy


def acceptance_gamma(alpha, draft_cost, gamma_min, gamma_max):
    """γ maximizing (1 − α^(γ+1)) / ((1 − α)(1 + draft_cost·γ)): expected tokens per unit of cost."""
    alpha = min(max(alpha, 1e-3), 1 - 1e-3)
    value = lambda g: (1 - alpha ** (g + 1)) / ((1 - alpha) * (1 + draft_cost * g))  # noqa: E731
    return max(range(gamma_min, gamma_max + 1), key=value)


def expected_tokens_per_forward(alpha, gamma):
    """Leviathan et al.: with i.i.d. acceptance α, one target forward yields (1 − α^(γ+1)) / (1 − α) tokens."""
    return gamma + 1 if alpha >= 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)


def verify(p: torch.Tensor, drafts: list[int], q: torch.Tensor | None, generator: torch.Generator | None,
           greedy: bool = False) -> tuple[int, int]:
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


class GammaRule:
    """How many tokens to draft next: γ_max, or adapted to the observed acceptance or to the entropy."""

    def __init__(self, adaptive, gamma_min, gamma_max, draft_cost, entropy_ema=None):
        if adaptive not in ADAPTIVE_RULES:
            raise ValueError(f"adaptive must be one of {ADAPTIVE_RULES}, got {adaptive!r}")
        if not 1 <= gamma_min <= gamma_max:
            raise ValueError(f"need 1 <= gamma_min <= speculative_num_tokens, got gamma_min={gamma_min}")
        self.adaptive, self.gamma_min, self.gamma_max = adaptive, gamma_min, gamma_max
        self.draft_cost, self.entropy_ema = draft_cost, entropy_ema
        self.gamma, self.alpha, self.smoothed_entropy = gamma_max, None, None

    def from_entropy(self, probs):
        g, h = entropy_gamma(probs, self.gamma_min, self.gamma_max)
        if self.entropy_ema is not None:
            s = self.smoothed_entropy
            self.smoothed_entropy = h if s is None else self.entropy_ema * s + (1 - self.entropy_ema) * h
            g = _gamma_for_entropy(self.smoothed_entropy, probs.numel(), self.gamma_min, self.gamma_max)
        return g

    def observe(self, num_drafted, num_accepted):
        """After a verification: the acceptance rule follows an exponential average of the acceptance."""
        if num_drafted and self.adaptive == "acceptance":
            observed = num_accepted / num_drafted
            self.alpha = observed if self.alpha is None else 0.7 * self.alpha + 0.3 * observed
            self.gamma = acceptance_gamma(self.alpha, self.draft_cost, self.gamma_min, self.gamma_max)


class SpeculativeRun:
    """
    One speculative generation (Engine.speculative): iterate it for ([token], [mask]) one token at a time,
    as Engine.generate yields. `stats` belongs to this run and is current after every token, so a caller that
    stops early (a server switching back to batching, a client going away) still reads what happened.
    tool_state: the RowState of a sequence that has already generated part of its reply (a server
    continuing it): its calculator state carries on here, and is exactly up to date after every yield.
    """

    def __init__(self, model, tokenizer, draft, prompt, max_new, temperature, top_k, top_p, seed, gamma_max,
                 adaptive="acceptance", gamma_min=1, entropy_ema=None, draft_cost=None, ngram_max_n=4,
                 ngram_min_n=2, ngram_stop_when_unknown=True, ngram_filler_top_k=0, tool_state=None):
        device = model.get_device()
        self.model, self.max_new = model, max_new
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        capacity = len(prompt) + max_new + gamma_max + 1
        # n-gram drafts under the acceptance rule: each proposal is cut by its own drafts' odds (NgramDrafter's
        # trim), which know more than one running α, so γ itself stays at γ_max
        trim = draft == "ngram" and adaptive == "acceptance"
        if draft == "ngram":
            fixed_cost, cost = widening_cost(device)
            self.drafter = NgramDrafter(ngram_max_n, ngram_min_n, ngram_stop_when_unknown, ngram_filler_top_k,
                                        cost=cost if draft_cost is None else draft_cost, fixed_cost=fixed_cost,
                                        trim=trim)
        else:
            self.drafter = ModelDrafter(draft, model, capacity, self.sampling, self.generator)
        self.gamma_rule = GammaRule(None if trim else adaptive, gamma_min, gamma_max,
                                    self.drafter.cost if draft_cost is None else draft_cost, entropy_ema)
        if adaptive == "entropy" and draft != "ngram":
            self.drafter.gamma_rule = self.gamma_rule.from_entropy
        self.target_cache = KVCache.for_model(model, 1, capacity)
        self.row = RowState(tokenizer) if tool_state is None else tool_state
        self.stats = dict(drafted=0, accepted=0, rejected=0, target_forwards=0, emitted=0, acceptance_rate=0.0,
                          position_acceptance_rate=0.0, tokens_per_target_forward=0.0)
        self._tokens = self._generate(list(prompt))

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._tokens)

    def close(self):
        self._tokens.close()

    def _verify_step(self, tokens, target_cached, last_distribution):
        """
        Draft, then one target forward over the not-yet-cached tokens plus the drafts.
        Returns (drafts, number accepted, the token after them, target logits at the verified positions).
        """
        budget = min(self.gamma_rule.gamma, self.max_new - self.stats["emitted"] - 1)  # +1: the bonus/correction
        if self.gamma_rule.adaptive == "entropy" and isinstance(self.drafter, NgramDrafter) and last_distribution is not None:
            budget = min(budget, self.gamma_rule.from_entropy(last_distribution))  # the target's entropy as the proxy
        drafts, q = self.drafter.propose(tokens, budget) if budget > 0 else ([], None)
        self.target_cache.set_lengths([target_cached])
        new = tokens[target_cached:] + drafts
        ids = torch.tensor([new], dtype=torch.long, device=self.model.get_device())
        logits = self.model(ids, kv_cache=self.target_cache)[0, len(new) - len(drafts) - 1:]  # (len(drafts) + 1, V)
        greedy = is_greedy(self.sampling["temperature"])  # then verification only compares argmaxes
        p = logits if greedy else process_logits(logits, **self.sampling)
        num_accepted, next_token = verify(p, drafts, q, self.generator, greedy=greedy)
        return drafts, num_accepted, next_token, logits[:num_accepted + 1]

    def _count(self, num_drafted, num_accepted):
        s = self.stats
        s["target_forwards"] += 1
        s["drafted"] += num_drafted
        s["accepted"] += num_accepted
        s["rejected"] += num_accepted < num_drafted
        s["acceptance_rate"] = s["accepted"] / s["drafted"] if s["drafted"] else 0.0
        # per verified position (drafts after a rejection are never examined): the α of the formula
        decided = s["accepted"] + s["rejected"]
        s["position_acceptance_rate"] = s["accepted"] / decided if decided else 0.0

    @torch.inference_mode()  # as a decorator: entered and left around each resume, never across a yield
    def _generate(self, tokens):
        row, stats = self.row, self.stats
        target_cached, last_distribution = 0, None
        while stats["emitted"] < self.max_new and not row.done:
            if row.has_forced():  # tool output: emitted as is, fed with the next verification forward
                token, mask = row.next(None)
                tokens.append(token)
                stats["emitted"] += 1
                yield [token], [mask]
                continue
            drafts, num_accepted, next_token, verified = self._verify_step(tokens, target_cached, last_distribution)
            self._count(len(drafts), num_accepted)
            self.gamma_rule.observe(len(drafts), num_accepted)
            if self.gamma_rule.adaptive == "entropy":
                last_distribution = torch.softmax(verified[-1].float(), dim=-1)
            target_cached = len(tokens) + num_accepted  # the cache holds everything up to the last accepted draft
            emitted = 0
            for token in drafts[:num_accepted] + [next_token]:
                token, mask = row.next(token)
                tokens.append(token)
                emitted += 1
                stats["emitted"] += 1
                stats["tokens_per_target_forward"] = stats["emitted"] / stats["target_forwards"]
                yield [token], [mask]
                if row.done or row.has_forced() or stats["emitted"] >= self.max_new:
                    break
            target_cached = min(target_cached, len(tokens))
            self.drafter.sync(tokens, verified[:emitted])
