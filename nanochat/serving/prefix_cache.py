"""
Prefix reuse: a multi-turn chat sends its whole history every turn, and the history is what the previous
turn's sequence had in its KV cache when it finished. The scheduler's KV cache has `rows` extra rows past
the batch slots; a finished sequence's slot is copied into one of them (the least recently used), with
the tokens it holds. A new context starting with such tokens copies that row into its slot instead of
recomputing them, and is prefilled from there. Copies of rows are exact, so the output is the same as
after a cold prefill up to float rounding of batched vs. one-token forwards.

Only whole rows are tracked (no token-block sharing as in paged attention): enough for the multi-turn
case, with a small fixed memory cost (rows x context x the cache's bytes per token).
"""

import os

MIN_REUSE_TOKENS = 16  # below this a copy saves too little to bother


class PrefixCache:
    def __init__(self, kv_cache, first_row, rows, counters):
        """kv_cache rows [first_row, first_row + rows) belong to this cache; counters: the scheduler's dict."""
        self.kv_cache, self.rows = kv_cache, list(range(first_row, first_row + rows))
        self.tokens = {row: None for row in self.rows}  # row -> the tokens its KV holds
        self.last_used = {row: 0 for row in self.rows}
        self.clock = 0
        self.counters = counters
        counters.update(prefix_lookups=0, prefix_hits=0, prefix_tokens_reused=0)

    def store(self, slot, tokens):
        """Keep the KV of a finished sequence's slot, which holds `tokens`, in the least recently used row."""
        if not self.rows or len(tokens) < MIN_REUSE_TOKENS:
            return
        if any(held is not None and held[:len(tokens)] == tokens for held in self.tokens.values()):
            return  # already held (a longer entry covers it)
        row = min(self.rows, key=lambda r: self.last_used[r])
        self.kv_cache.copy_row(slot, row)
        self.tokens[row], self.last_used[row] = tokens, self._tick()

    def match(self, context):
        """(row, n): the held row sharing the longest prefix with `context`, n < len(context) (its last token's
        logits are needed); (None, 0) when no row shares MIN_REUSE_TOKENS."""
        best_row, best = None, 0
        for row, held in self.tokens.items():
            if held is not None:
                n = min(len(os.path.commonprefix([held, context])), len(context) - 1)
                if n > best:
                    best_row, best = row, n
        return (best_row, best) if best >= MIN_REUSE_TOKENS else (None, 0)

    def load(self, row, n, slot):
        """Copy the first n positions of a held row into a batch slot; returns n (0 for no row: a cold start)."""
        self.counters["prefix_lookups"] += 1
        if row is None or n == 0:
            self.kv_cache.lengths[slot] = 0
            return 0
        self.kv_cache.copy_row(row, slot, n)
        self.last_used[row] = self._tick()
        self.counters["prefix_hits"] += 1
        self.counters["prefix_tokens_reused"] += n
        return n

    def _tick(self):
        self.clock += 1
        return self.clock
