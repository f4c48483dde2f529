"""
The one place logits become a distribution.

penalize_logits applies OpenAI's frequency/presence penalties and logit_bias to a row (the server's
requests) and holds back the end of a reply (vLLM's min_tokens / ignore_eos); token_logprobs gives the
log-probabilities a server reports. process_logits applies temperature, then top-k, then top-p within those
k (nucleus: the smallest set of the most likely tokens whose probability reaches p; always at least one
token). Temperature 0 means greedy: a one-hot distribution on the argmax, and so does any temperature below
GREEDY_BELOW_TEMPERATURE: logits divided by a float32 subnormal such as 1e-40 overflow to inf and the softmax
turns to NaN, while at 1e-6 the distribution is already one-hot to float32 precision. Plain sampling and
speculative verification both call it, so the draft's q and the target's p are processed identically, which
exact speculative sampling needs.

Parameters may be per row (tensors of shape (B,)) so one batch can serve requests with different settings.
"""

import torch

# Bounds checked at every entry point (engine, CLI, server) through validate_sampling_params.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.0, 2.0
MIN_TOP_K, MAX_TOP_K = 0, 200  # 0 / None = no top-k
MIN_TOP_P, MAX_TOP_P = 0.0, 1.0  # top_p in (0, 1]; 1 / None = no nucleus
GREEDY_BELOW_TEMPERATURE = 1e-6


def validate_sampling_params(temperature=1.0, top_k=None, top_p=None, max_temperature=None, max_top_k=None):
    """Raise ValueError with a message naming the bad parameter. Upper bounds are optional."""
    for name, value in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"{name} must be a number, got {value!r}")
    if temperature is None or not temperature >= 0:  # also rejects NaN
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if max_temperature is not None and temperature > max_temperature:
        raise ValueError(f"temperature must be <= {max_temperature}, got {temperature}")
    if top_k is not None:
        if top_k < 0 or int(top_k) != top_k:
            raise ValueError(f"top_k must be a non-negative integer (0 = off), got {top_k}")
        if max_top_k is not None and top_k > max_top_k:
            raise ValueError(f"top_k must be <= {max_top_k}, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def _as_column(value, B, default, dtype, device):
    """A scalar, None or per-row sequence -> (B, 1) tensor; None becomes `default`."""
    if value is None:
        value = default
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype).reshape(B, 1)
    if isinstance(value, (list, tuple)):
        return torch.tensor([default if v is None else v for v in value], dtype=dtype, device=device).reshape(B, 1)
    return torch.full((B, 1), value, dtype=dtype, device=device)


# OpenAI's bounds for the logit adjustments below (checked at the API boundary, serving/protocol.py)
MAX_PENALTY, MAX_LOGIT_BIAS = 2.0, 100.0


def penalize_logits(logits, generated, frequency_penalty=0.0, presence_penalty=0.0, logit_bias=None, min_tokens=0,
                    eos_ids=()):
    """
    OpenAI's frequency/presence penalties and logit_bias on one row's logits (V,), before temperature:
        logit[j] -= c[j] * frequency_penalty + (c[j] > 0) * presence_penalty;  then logit[j] += bias[j]
    with c[j] how many times token j was generated so far in this reply (the prompt does not count).
    While fewer than min_tokens tokens were generated, the tokens that end a reply (eos_ids) are excluded
    (-inf), whatever their bias. Returns a new tensor; the input is not modified.
    """
    logits = logits.float().clone()
    if generated and (frequency_penalty or presence_penalty):
        counts = torch.bincount(torch.tensor(generated, device=logits.device), minlength=logits.numel())
        logits -= counts.float() * frequency_penalty + (counts > 0).float() * presence_penalty
    if logit_bias:
        ids = torch.tensor(list(logit_bias), device=logits.device)
        logits[ids] += torch.tensor(list(logit_bias.values()), dtype=torch.float32, device=logits.device)
    if len(generated) < min_tokens and eos_ids:
        logits[list(eos_ids)] = float("-inf")
    return logits


# Reported log-probabilities below this are clamped (JSON has no -inf; OpenAI reports -9999.0 the same way).
MIN_REPORTED_LOGPROB = -9999.0


def token_logprobs(logits, tokens, temperature=1.0, top=0):
    """
    The log-probabilities a server reports (OpenAI's logprobs) for the chosen tokens of rows of logits (B, V):
    those of the distribution after penalties and temperature and before top-k/top-p truncation (vLLM's
    "processed" logprobs); a greedy row (temperature 0) reports the model's own distribution (temperature 1),
    since its one-hot sampling distribution says nothing. tokens: B ids. temperature: a scalar or B values.
    Returns [(logprob of the token, [(id, logprob)] of the `top` most likely tokens, most likely first)] per row.
    """
    B = logits.shape[0]
    t = _as_column(temperature, B, 1.0, torch.float32, logits.device)
    t = torch.where(t < GREEDY_BELOW_TEMPERATURE, torch.ones_like(t), t)
    logprobs = torch.log_softmax(logits.float() / t, dim=-1).clamp(min=MIN_REPORTED_LOGPROB)  # (B, V)
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logits.device).view(B, 1))[:, 0].tolist()
    if not top:
        return [(lp, []) for lp in chosen]
    values, ids = logprobs.topk(top, dim=-1)  # (B, top)
    return [(lp, list(zip(i, v))) for lp, i, v in zip(chosen, ids.tolist(), values.tolist())]


def is_greedy(temperature):
    """A scalar temperature that means greedy decoding (per-row values are never greedy as a whole)."""
    return (not isinstance(temperature, (list, tuple, torch.Tensor)) and temperature is not None
            and temperature < GREEDY_BELOW_TEMPERATURE)


def process_logits(logits, temperature=1.0, top_k=None, top_p=None):
    """
    logits: (B, V). temperature / top_k / top_p: scalars or per-row values (None = off).
    Returns probabilities (B, V) float32: rows with temperature 0 are one-hot on their argmax.
    """
    B, V = logits.shape
    logits = logits.float()
    if is_greedy(temperature):  # the common greedy case: no softmax, no sort
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)
    temperature = _as_column(temperature, B, 1.0, torch.float32, logits.device)
    greedy = temperature < GREEDY_BELOW_TEMPERATURE  # (B, 1)
    scaled = logits / torch.where(greedy, torch.ones_like(temperature), temperature)
    use_top_p = top_p is not None and (isinstance(top_p, (list, tuple, torch.Tensor)) or top_p < 1.0)
    use_top_k = top_k is not None and (isinstance(top_k, (list, tuple, torch.Tensor)) or 0 < top_k < V)

    if use_top_p:
        # sort once; top-k and top-p are then masks over sorted positions
        top_k = _as_column(top_k, B, 0, torch.long, logits.device)
        top_p = _as_column(top_p, B, 1.0, torch.float32, logits.device)
        sorted_logits, sorted_idx = scaled.sort(dim=-1, descending=True)  # (B, V)
        rank = torch.arange(V, device=logits.device)[None, :]
        keep = (top_k <= 0) | (rank < top_k)
        sorted_probs = torch.softmax(sorted_logits.masked_fill(~keep, float("-inf")), dim=-1)
        # nucleus within the top-k: keep a token if the mass strictly before it is < p (the first always stays)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        keep &= (mass_before < top_p) | (rank == 0)  # rank 0 explicitly: a tiny top_p rounds to 0 in float32
        sorted_probs = sorted_probs * keep
        sorted_probs = sorted_probs / sorted_probs.sum(dim=-1, keepdim=True)
        probs = torch.zeros_like(sorted_probs).scatter_(-1, sorted_idx, sorted_probs)
    elif use_top_k:
        # only the k largest survive: a partial top-k instead of a full sort of the vocabulary
        top_k = _as_column(top_k, B, 0, torch.long, logits.device).clamp(max=V)
        k_max = int(top_k.max()) if int(top_k.max()) > 0 else V
        values, indices = scaled.topk(k_max, dim=-1)  # (B, k_max), descending
        rank = torch.arange(k_max, device=logits.device)[None, :]
        values = values.masked_fill((top_k > 0) & (rank >= top_k), float("-inf"))
        masked = torch.full_like(scaled, float("-inf")).scatter_(-1, indices, values)
        no_top_k = top_k <= 0  # rows without a top-k in a mixed batch
        probs = torch.softmax(torch.where(no_top_k, scaled, masked), dim=-1)
    else:
        probs = torch.softmax(scaled, dim=-1)

    if greedy.any():
        one_hot = torch.zeros_like(probs).scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)
        probs = torch.where(greedy, one_hot, probs)
    return probs


def sample_from_probs(probs, generator=None):
    """probs (B, V) -> token ids (B, 1). Deterministic for one-hot rows; seeded by `generator`."""
    return torch.multinomial(probs, num_samples=1, generator=generator)


def sample_next_token(logits, generator=None, temperature=1.0, top_k=None, top_p=None):
    """logits (B, V) -> (B, 1) token ids. Greedy (temperature 0 for all rows) is a plain argmax."""
    if is_greedy(temperature):
        return logits.argmax(dim=-1, keepdim=True)
    return sample_from_probs(process_logits(logits, temperature, top_k, top_p), generator)
