"""
Inference: the KV cache and generation.

The cache is preallocated and keeps a length per row, so rows can sit at different positions: prompts
of different lengths share one batch, a speculative step is rolled back by setting a row's length back,
and a server can put a new sequence into a free row between decode steps.
"""

import torch


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
        device = model.get_device()
        dtype = dtype or model.transformer.wte.weight.dtype
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

    def copy_row(self, src_row, dst_rows):
        """Share a prefilled prompt: copy row src_row's history into dst_rows (no recompute)."""
        for t in self.tensors.values():
            t[:, dst_rows] = t[:, src_row:src_row + 1]
        self.lengths[dst_rows] = self.lengths[src_row]

    def reorder(self, row_indices):
        """Beam search: row b becomes a copy of row row_indices[b]."""
        idx = torch.as_tensor(row_indices, device=self.lengths.device)
        for name in self.tensors:
            self.tensors[name] = self.tensors[name][:, idx]
        self.lengths = self.lengths[idx]


@torch.no_grad()
def complete_greedy(model, tokenizer, prompts, max_tokens=32):
    """
    Greedy completion of text prompts with the KV cache, one prompt at a time; used for the samples
    printed during pretraining. Returns the decoded completions (prompt included).
    """
    completions = []
    for prompt in prompts:
        tokens = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
        kv_cache = KVCache.for_model(model, 1, len(tokens) + max_tokens)
        ids = torch.tensor([tokens], dtype=torch.long, device=model.get_device())
        logits = model(ids, kv_cache=kv_cache)
        for _ in range(max_tokens):
            next_id = logits[:, -1].argmax(dim=-1, keepdim=True)  # (1, 1)
            tokens.append(int(next_id))
            if tokens[-1] == tokenizer.get_bos_token_id():
                break
            logits = model(next_id, kv_cache=kv_cache)
        completions.append(tokenizer.decode(tokens[1:]))
    return completions
