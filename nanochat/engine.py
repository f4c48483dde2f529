"""
Inference: the KV cache and generation.

The cache is preallocated and keeps a length per row, so rows can sit at different positions: prompts
of different lengths share one batch, a speculative step is rolled back by setting a row's length back,
and a server can put a new sequence into a free row between decode steps.
"""

import ast
import math
import operator
from collections import deque

import torch

from nanochat.sampling import sample_next_token, validate_sampling_params


class KVCache:
    """
    Per layer and per cached quantity, a tensor (B, seq_len, *shape): for MHA/GQA "k" and "v" with shape
    (n_kv_head, head_dim); for MLA only "c_kv" (kv_lora_rank,) and "k_rope" (qk_rope_head_dim,).
    lengths[b] = number of valid positions in row b; positions >= lengths[b] hold stale values that are
    never attended (the mask stops at each row's own length) and get overwritten by later writes.
    """

    def __init__(self, batch_size, seq_len, num_layers, layout, device, dtype=torch.float32):
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.num_layers = num_layers
        self.layout = dict(layout)
        self.tensors = {name: torch.zeros(num_layers, batch_size, seq_len, *shape, device=device, dtype=dtype)
                        for name, shape in self.layout.items()}
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._step_positions = None  # (B, T) positions written by the forward in flight

    @classmethod
    def for_model(cls, model, batch_size, seq_len, dtype=None):
        """
        A cache in the dtype attention computes in (unless given): autocast's when autocast is on for the
        model's device (bf16 K/V: half the memory of fp32 weights, and SDPA reads it without a cast copy
        of the whole history per layer per step), else the weights'.
        """
        device = model.get_device()
        if dtype is None:
            autocast = torch.is_autocast_enabled(device.type)
            dtype = torch.get_autocast_dtype(device.type) if autocast else next(model.parameters()).dtype
        return cls(batch_size, seq_len, model.config.n_layer, model.kv_cache_layout(), device, dtype)

    def positions(self, T):
        """(B, T) absolute positions of the T new tokens of each row."""
        offsets = torch.arange(T, device=self.lengths.device)
        self._step_positions = self.lengths[:, None] + offsets[None, :]
        self._visible_len = int(self._step_positions.max()) + 1
        return self._step_positions

    def attention_mask(self, T):
        """(B, 1, T, S) bool: query t of row b sees key s iff s <= lengths[b] + t."""
        keys = torch.arange(self._visible_len, device=self.lengths.device)
        return (keys[None, None, :] <= self._step_positions[:, :, None]).unsqueeze(1)

    def write(self, layer_idx, name, values):
        """Store values (B, T, *shape) at this step's positions; return the visible history (B, S, *shape)."""
        cache = self.tensors[name][layer_idx]
        rows = torch.arange(self.batch_size, device=values.device)[:, None]
        cache[rows, self._step_positions] = values.to(cache.dtype)
        return cache[:, :self._visible_len]

    def advance(self, T):
        self.lengths += T

    def set_lengths(self, lengths):
        """Roll rows back (speculative rejection) or set the real prompt lengths after a padded prefill."""
        self.lengths.copy_(torch.as_tensor(lengths, dtype=torch.long, device=self.lengths.device))

    def reset(self):
        self.lengths.zero_()

    def view(self, start, stop):
        """Rows [start, stop) as a KVCache sharing this one's storage: a forward on the view writes in place."""
        view = KVCache.__new__(KVCache)
        view.batch_size, view.seq_len, view.num_layers, view.layout = stop - start, self.seq_len, self.num_layers, self.layout
        view.tensors = {name: t[:, start:stop] for name, t in self.tensors.items()}
        view.lengths = self.lengths[start:stop]
        view._step_positions = None
        return view

    def copy_row(self, src, dst, n=None):
        """
        Row dst becomes a copy of row src, or of its first n positions (a server packing its running rows,
        sharing a prefilled prompt, reusing a cached prefix).
        """
        n = int(self.lengths[src]) if n is None else n  # only the valid positions: the rest is never read
        for t in self.tensors.values():
            t[:, dst, :n] = t[:, src, :n]
        self.lengths[dst] = n

    def reorder(self, row_indices, seq_len=None):
        """
        New rows from old ones: row b becomes a copy of row row_indices[b] (beam search; sharing one
        prefilled prompt among num_samples rows). The batch size may change; seq_len may grow the capacity.
        """
        idx = torch.as_tensor(row_indices, dtype=torch.long, device=self.lengths.device)
        seq_len = seq_len or self.seq_len
        for name, t in self.tensors.items():
            rows = t[:, idx]  # (num_layers, new_B, old seq_len, *shape)
            if seq_len > self.seq_len:
                grown = rows.new_zeros(rows.shape[0], rows.shape[1], seq_len, *rows.shape[3:])
                grown[:, :, :self.seq_len] = rows
                rows = grown
            self.tensors[name] = rows
        self.lengths = self.lengths[idx]
        self.batch_size, self.seq_len = len(idx), seq_len



# ---------------------------------------------------------------------------------------------------
# The calculator tool. The model writes an expression between <|python_start|> and <|python_end|>; we
# evaluate it by walking its syntax tree ourselves (never eval/exec), allowing only numbers, + - * / // %
# ** with small exponents, parentheses, and "<string>.count(<string>)". Anything else is refused (None).

_BINARY_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
               ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY_OPS = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_EXPRESSION_CHARS = 200
MAX_NUMBER_MAGNITUDE = 1e100  # keeps every intermediate result small enough to compute instantly


def _evaluate_node(node):
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.Constant) and type(node.value) is str:
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPS:
        operand = _evaluate_node(node.operand)
        if isinstance(operand, str):
            raise ValueError("arithmetic on a string")
        return _UNARY_OPS[type(node.op)](operand)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
        left, right = _evaluate_node(node.left), _evaluate_node(node.right)
        if isinstance(left, str) or isinstance(right, str):
            raise ValueError("arithmetic on a string")
        if isinstance(node.op, ast.Pow) and (abs(right) > 64 or abs(left) > 1e6):
            raise ValueError("exponent too large")
        result = _BINARY_OPS[type(node.op)](left, right)
        if isinstance(result, complex) or abs(result) > MAX_NUMBER_MAGNITUDE:
            raise ValueError("result out of range")
        return result
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "count"
            and not node.keywords and len(node.args) == 1):
        haystack, needle = _evaluate_node(node.func.value), _evaluate_node(node.args[0])
        if isinstance(haystack, str) and isinstance(needle, str):
            return haystack.count(needle)
    raise ValueError(f"not allowed: {type(node).__name__}")


def calculator(expression):
    """The tool's answer as text, or None when the expression is not plain arithmetic / str.count."""
    expression = expression.strip().replace(",", "") if "count" not in expression else expression.strip()
    if not expression or len(expression) > MAX_EXPRESSION_CHARS:
        return None
    try:
        tree = ast.parse(expression, mode="eval")
        value = _evaluate_node(tree.body)
    except (SyntaxError, ValueError, TypeError, ZeroDivisionError, OverflowError, RecursionError, MemoryError):
        return None
    if isinstance(value, str):
        return None
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        value = int(value) if value.is_integer() and abs(value) < 1e15 else round(value, 10)
    return str(value)


class RowState:
    """
    One generated sequence: forced tool-output tokens waiting to be fed, the python expression being
    written, and whether the row is finished.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        special = tokenizer.encode_special
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")
        self.terminal = {special("<|assistant_end|>"), tokenizer.get_bos_token_id()}
        self.forced = deque()
        self.expression = None  # token ids between python_start and python_end, while inside
        self.done = False

    def has_forced(self):
        return bool(self.forced)

    def next(self, sampled):
        """The token this row emits given what was sampled: (token, mask) with mask 0 if forced."""
        token, mask = (self.forced.popleft(), 0) if self.forced else (sampled, 1)
        if token in self.terminal:
            self.done = True
        elif token == self.python_start:
            self.expression = []
        elif token == self.python_end and self.expression is not None:
            result = calculator(self.tokenizer.decode(self.expression))
            self.expression = None
            if result is not None:
                self.forced.extend([self.output_start, *self.tokenizer.encode(result), self.output_end])
        elif self.expression is not None:
            self.expression.append(token)
        return token, mask


# ---------------------------------------------------------------------------------------------------
# Generation


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


class Engine:
    """
    Generation with the KV cache: prefill once, then one forward per generated token (or per verified
    draft, with speculative decoding). `draft` is None, a small GPT sharing the tokenizer, or "ngram".
    """

    def __init__(self, model, tokenizer, draft=None):
        self.model, self.tokenizer, self.draft = model, tokenizer, draft
        self.last_speculative_stats = None

    @property
    def context_len(self):
        return self.model.config.sequence_len

    def _check(self, prompts, num_samples, max_tokens, temperature, top_k, top_p, speculative_num_tokens):
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
        if speculative_num_tokens:
            if isinstance(speculative_num_tokens, bool) or not isinstance(speculative_num_tokens, int) or speculative_num_tokens < 0:
                raise ValueError(f"speculative_num_tokens must be a non-negative integer, got {speculative_num_tokens!r}")
            if num_samples != 1 or len(prompts) != 1:
                raise ValueError("speculative decoding needs num_samples == 1 and a single prompt")
            if self.draft is None:
                raise ValueError("speculative decoding needs a drafter: Engine(model, tokenizer, draft=<GPT> or 'ngram')")

    def _max_new_tokens(self, prompts, max_tokens):
        room = self.context_len - max(len(p) for p in prompts)
        return room if max_tokens is None else min(max_tokens, room)

    @torch.no_grad()
    def prefill(self, prompts, num_samples=1, capacity=None):
        """
        Run the prompts once, right-padded into one batch (row i's pad positions come after its tokens,
        so causal attention never sees them, and the cache lengths are then set to the real lengths).
        Returns (kv_cache with len(prompts) * num_samples rows, last-token logits (rows, V) float32);
        rows i*num_samples .. i*num_samples + num_samples-1 belong to prompt i.
        """
        device = self.model.get_device()
        lengths = [len(p) for p in prompts]
        T = max(lengths)
        pad = self.tokenizer.get_pad_token_id()
        ids = torch.tensor([p + [pad] * (T - len(p)) for p in prompts], dtype=torch.long, device=device)
        kv_cache = KVCache.for_model(self.model, len(prompts), T)
        last_index = torch.tensor(lengths, device=device) - 1
        last = self.model(ids, kv_cache=kv_cache, logits_at=last_index)[:, 0]  # (P, V)
        kv_cache.set_lengths(lengths)
        rows = [i for i in range(len(prompts)) for _ in range(num_samples)]
        kv_cache.reorder(rows, seq_len=max(capacity or T, T))
        return kv_cache, last[rows]

    @torch.no_grad()
    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, top_p=None, seed=42,
                 speculative_num_tokens=0, **speculative_options):
        """
        Yields (token_column, token_masks) per step: one token per row (rows = prompts x num_samples,
        prompt-major), mask 1 = sampled, 0 = forced by the calculator tool. A finished row leaves the
        running batch (its cache rows are dropped) and repeats its terminal token with mask 0. temperature,
        top_k and top_p may also be per-row lists. Stops when every row has emitted <|assistant_end|> / <|bos|>, after max_tokens
        steps, or at the end of the context.
        """
        prompts, _ = _normalize_prompts(tokens)
        self._check(prompts, num_samples, max_tokens, temperature, top_k, top_p, speculative_num_tokens)
        max_new = self._max_new_tokens(prompts, max_tokens)
        if speculative_num_tokens:
            from nanochat.speculative import speculative_generate
            yield from speculative_generate(self, prompts[0], max_new, temperature, top_k, top_p, seed,
                                            speculative_num_tokens, **speculative_options)
            return
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

    def generate_batch(self, tokens, num_samples=1, **kwargs):
        """
        Non-streaming generate. Returns (results, masks): one token list per row, the prompt included and
        the terminal token excluded. For one prompt: num_samples rows. For a list of prompts: row
        i * num_samples + j is sample j of prompt i (with num_samples=1, row i is prompt i).
        """
        prompts, _ = _normalize_prompts(tokens)
        results = [list(p) for p in prompts for _ in range(num_samples)]
        masks = [[0] * len(p) for p in prompts for _ in range(num_samples)]
        terminal = {self.tokenizer.encode_special("<|assistant_end|>"), self.tokenizer.get_bos_token_id()}
        done = [False] * len(results)
        for column, column_masks in self.generate(prompts if len(prompts) > 1 else prompts[0], num_samples, **kwargs):
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

    @torch.no_grad()
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
        self._check(prompts, 1, max_tokens, 1.0, None, None, 0)
        prompt = prompts[0]
        max_new = self._max_new_tokens(prompts, max_tokens)
        terminal = {self.tokenizer.encode_special("<|assistant_end|>"), self.tokenizer.get_bos_token_id()}
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
