"""
The conversation loader for midtraining and SFT. A dataset is anything with __len__ and __getitem__
returning a conversation (tasks.common.Task / TaskMixture). Examples are dealt to ranks by index (rank,
rank + world_size, ...), in a fresh deterministic shuffle every epoch. State = (epoch, cursor), so a resumed
run continues with exactly the examples that came next.
"""

import torch


class ConversationLoader:
    """
    Batches of exactly (B, max_len): the same shape every step, so a compiled model (dynamic=False) is
    compiled once, and the memory a step needs is known in advance (nanochat.memory).
    packed=False (SFT): one conversation per row (at most max_len + 1 tokens); targets are -1 wherever
    the render mask is 0 (user turns, tool output) and on the padding after the conversation.
    packed=True (midtraining): conversations are rendered and packed back to back into rows of at most
    max_len + 1 tokens, every row starting at a conversation's <|bos|>; a conversation that does not fit
    opens the next row (longer ones are cropped); all real tokens are trained on, padding is not.
    Padding sits after a row's real tokens, so causal attention never lets it change their loss.
    """

    def __init__(self, dataset, tokenizer, B, max_len, rank=0, world_size=1, device="cpu", packed=False, seed=0,
                 resume_state=None):
        if len(dataset) < world_size:
            raise ValueError(f"the dataset has {len(dataset)} conversations, fewer than the {world_size} ranks")
        self.dataset, self.tokenizer, self.B, self.max_len = dataset, tokenizer, B, max_len
        self.rank, self.world_size, self.device, self.packed, self.seed = rank, world_size, torch.device(device), packed, seed
        self.pad = tokenizer.get_pad_token_id()
        state = resume_state or {}
        self.epoch, self.cursor = state.get("epoch", 0), state.get("cursor", 0)
        self._order = None
        self._pending_index = state.get("pending_index")  # packed: a conversation read but not yet placed
        self._pending = None if self._pending_index is None else self._render(self._pending_index)[0]

    def state_dict(self):
        return {"epoch": self.epoch, "cursor": self.cursor, "pending_index": self._pending_index}

    def _render(self, index):
        return self.tokenizer.render_conversation(self.dataset[index], max_tokens=self.max_len + 1)

    def _next_index(self):
        if self._order is None:  # this epoch's shuffle, then this rank's share of it
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            self._order = torch.randperm(len(self.dataset), generator=g)[self.rank::self.world_size].tolist()
        if self.cursor >= len(self._order):
            self.epoch, self.cursor, self._order = self.epoch + 1, 0, None
            return self._next_index()
        self.cursor += 1
        return self._order[self.cursor - 1]

    def __iter__(self):
        return self

    def __next__(self):
        rows = self._packed_rows() if self.packed else self._padded_rows()
        inputs = torch.full((self.B, self.max_len), self.pad, dtype=torch.long)   # (B, T)
        targets = torch.full((self.B, self.max_len), -1, dtype=torch.long)        # (B, T), -1 = no loss
        for b, (ids, mask) in enumerate(rows):
            n = len(ids) - 1
            inputs[b, :n] = torch.tensor(ids[:-1])
            target = torch.tensor(ids[1:])
            target[torch.tensor(mask[1:]) == 0] = -1
            targets[b, :n] = target
        if self.device.type == "cuda":  # pinned host memory: the copy overlaps with compute
            return inputs.pin_memory().to(self.device, non_blocking=True), targets.pin_memory().to(self.device, non_blocking=True)
        return inputs.to(self.device), targets.to(self.device)

    def _padded_rows(self):
        rows = []
        while len(rows) < self.B:
            ids, mask = self._render(self._next_index())
            if sum(mask[1:]) > 0:  # nothing to learn from a conversation cropped before its answer
                rows.append((ids, mask))
        return rows

    def _packed_rows(self):
        rows = []
        while len(rows) < self.B:
            row = []
            while len(row) < self.max_len + 1:
                if self._pending is None:
                    self._pending_index = self._next_index()
                    self._pending = self._render(self._pending_index)[0]
                if row and len(row) + len(self._pending) > self.max_len + 1:
                    break  # it stays pending and opens the next row
                row += self._pending
                self._pending, self._pending_index = None, None
            rows.append((row, [1] * len(row)))
        return rows
