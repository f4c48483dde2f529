"""
The KV cache: preallocated, with a length per row, so rows can sit at different positions: prompts of
different lengths share one batch, a speculative step is rolled back by setting a row's length back, and a
server can put a new sequence into a free row between decode steps.
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
        self.device, self.dtype = torch.device(device), dtype
        self.tensors = {name: torch.zeros(num_layers, batch_size, seq_len, *shape, device=device, dtype=dtype)
                        for name, shape in self.layout.items()}
        # on the host: every step plans from them (same length? how far to read?) without a device sync
        self.lengths = torch.zeros(batch_size, dtype=torch.long)
        self._step = None  # (start, flat_index, positions, visible_len) of the forward in flight, see begin_step

    @classmethod
    def for_model(cls, model, batch_size, seq_len, dtype=None):
        """
        A cache in the dtype attention computes in (unless given): autocast's when autocast is on for the
        model's device (bf16 K/V: half the memory of fp32 weights, and SDPA reads it without a cast copy
        of the whole history per layer per step), else the narrowest of the weights' dtypes (bf16 inference
        weights next to an fp32 embedding compute under autocast of their own dtype, see GPT.forward).
        """
        device = model.get_device()
        if dtype is None and torch.is_autocast_enabled(device.type):
            dtype = torch.get_autocast_dtype(device.type)
        elif dtype is None:
            dtype = min((p.dtype for p in model.parameters()), key=lambda d: torch.finfo(d).bits)
        return cls(batch_size, seq_len, model.config.n_layer, model.kv_cache_layout(), device, dtype)

    def begin_step(self, T):
        """
        Plan a forward of T new tokens per row. Returns (start, positions): when every row has the same
        length (batch 1, a fresh prefill, a batch that started together) start is that length and
        positions is None, so writes are slices and the rotary tables are sliced; otherwise start is None
        and positions (B, T) are the new tokens' absolute positions, on the cache's device.
        """
        lengths = self.lengths.tolist()
        visible_len = max(lengths) + T
        if visible_len > self.seq_len:
            raise ValueError(f"KV cache of {self.seq_len} positions is full")
        if min(lengths) == max(lengths):
            self._step = (lengths[0], None, None, visible_len)
            return lengths[0], None
        positions = self.lengths[:, None] + torch.arange(T)  # (B, T)
        flat_index = torch.arange(self.batch_size)[:, None] * self.seq_len + positions  # into (B * seq_len)
        if self.device.type == "cuda":  # pinned + non_blocking: the copy never waits for the GPU's queue
            positions, flat_index = positions.pin_memory(), flat_index.pin_memory()
        positions = positions.to(self.device, non_blocking=True)
        flat_index = flat_index.flatten().to(self.device, non_blocking=True)
        self._step = (None, flat_index, positions, visible_len)
        return None, positions

    def attention_mask(self, T):
        """
        (B or 1, 1, T, S) additive mask in the cache's dtype, 0 where query t of row b sees key s
        (s <= lengths[b] + t) and -inf elsewhere; additive rather than bool because CPU SDPA converts a bool
        mask on every call (every layer). None where that is what attention() does unmasked: all rows at
        one length and T == 1 (every key) or an empty cache (plain causal, T == S).
        """
        start, _, positions, visible_len = self._step
        if start is not None:
            if T == 1 or start == 0:
                return None
            positions = start + torch.arange(T, device=self.device)[None]  # (1, T)
        keys = torch.arange(visible_len, device=self.device)
        hidden = (keys[None, None, :] > positions[:, :, None]).unsqueeze(1)
        return torch.zeros(hidden.shape, dtype=self.dtype, device=self.device).masked_fill_(hidden, float("-inf"))

    def write(self, layer_idx, name, values):
        """Store values (B, T, *shape) at this step's positions; return the visible history (B, S, *shape)."""
        cache = self.tensors[name][layer_idx]  # (B, seq_len, *shape)
        start, flat_index, _, visible_len = self._step
        if start is not None:
            cache[:, start:start + values.size(1)] = values
        else:  # view, never reshape: a copy would silently drop the write
            cache.view(-1, *cache.shape[2:]).index_copy_(0, flat_index, values.flatten(0, 1).to(cache.dtype))
        return cache[:, :visible_len]

    def advance(self, T):
        self.lengths += T

    def set_lengths(self, lengths):
        """Roll rows back (speculative rejection) or set the real prompt lengths after a padded prefill."""
        self.lengths.copy_(torch.as_tensor(lengths, dtype=torch.long))

    def reset(self):
        self.lengths.zero_()

    def view(self, start, stop):
        """Rows [start, stop) as a KVCache sharing this one's storage: a forward on the view writes in place."""
        view = KVCache.__new__(KVCache)
        view.batch_size, view.seq_len, view.num_layers, view.layout = stop - start, self.seq_len, self.num_layers, self.layout
        view.device, view.dtype = self.device, self.dtype
        view.tensors = {name: t[:, start:stop] for name, t in self.tensors.items()}
        view.lengths = self.lengths[start:stop]
        view._step = None
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
        idx = torch.as_tensor(row_indices, dtype=torch.long)
        seq_len = seq_len or self.seq_len
        for name, t in self.tensors.items():
            rows = t[:, idx.to(self.device)]  # (num_layers, new_B, old seq_len, *shape)
            if seq_len > self.seq_len:
                grown = rows.new_zeros(rows.shape[0], rows.shape[1], seq_len, *rows.shape[3:])
                grown[:, :, :self.seq_len] = rows
                rows = grown
            self.tensors[name] = rows
        self.lengths = self.lengths[idx]
        self.batch_size, self.seq_len = len(idx), seq_len
