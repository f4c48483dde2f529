"""
Continuous batching: one Scheduler, with its own thread, per model replica.

Every running sequence ("row") owns one slot of a KV cache preallocated for max_batch_size rows x the
model's context. Running rows stay packed in slots 0..n-1, so a decode step is one forward over the view
kv_cache[0:n] with each row's latest token, (n, 1). Between steps:
- rows that finished, used up their token budget, or whose client went away leave at once; the last
  running row is copied into the freed slot (one row copy) to keep the rows packed;
- waiting requests join: their prompts are prefilled together into the next free slots, and a request's
  extra samples (n > 1) copy its prefilled slot instead of recomputing it. A prompt longer than
  prefill_chunk_tokens is staged in the last slot and read one chunk per step, so it never stalls the
  running streams for more than one chunk's forward.
Each row samples with its own request's temperature / top-k / top-p, and its request's seeded generator.
With speculative decoding on, a sequence running alone is decoded speculatively (its own caches); when
another request arrives it rejoins the batch by prefilling its prompt plus what it has generated so far.

The HTTP side never touches torch: it submits a Ticket (serving/tickets.py) and reads lists of events
from the ticket's asyncio queue, filled by this thread through loop.call_soon_threadsafe, so generation
never blocks the event loop. Events: ("token", row, token_id), ("finish", row, "stop"|"length"),
("error", None, message). In a worker process (serving/workers.py) `deliver` sends each step's events
through a pipe to the HTTP front instead.
"""

import logging
import math
import os
import secrets
import threading
import time
from collections import defaultdict, deque

import torch

from nanochat.common import autocast_context
from nanochat.engine import Engine, KVCache, RowState
from nanochat.sampling import process_logits, sample_from_probs
from nanochat.serving.tickets import Overloaded, count_queued

logger = logging.getLogger(__name__)


class Row:
    """One generated sequence. Invariant while batched: its slot caches prompt + generated[:-1]."""

    def __init__(self, ticket, index, tokenizer):
        self.ticket, self.index = ticket, index
        self.prompt = ticket.prompts[index // ticket.num_samples]
        self.state = RowState(tokenizer)  # calculator tool state; done once a terminal token is sampled
        self.generated = []
        self.max_new = None  # set by the scheduler from the context left
        self.speculative = None  # the speculative token iterator while this row runs alone

    def context(self):
        return self.prompt + self.generated

    def dropped(self):
        return self.ticket.cancelled or self.index in self.ticket.stopped_rows


class Scheduler:
    def __init__(self, model, tokenizer, max_batch_size=32, max_running_requests=None, max_queued_requests=128,
                 draft=None, speculative_proposals=0, max_prefill_tokens=None, prefill_chunk_tokens=512,
                 name="replica-0", deliver=None):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.engine = Engine(model, tokenizer, draft=draft)
        self.device = model.get_device()
        self.context_len = model.config.sequence_len
        self.max_rows = max_batch_size
        self.max_running_requests = max_running_requests or max_batch_size
        self.max_queued_requests = max_queued_requests
        self.speculative_proposals = speculative_proposals if draft is not None else 0
        # A long prompt burst is prefilled over several steps so running streams are not stalled for long.
        self.max_prefill_tokens = max_prefill_tokens or max(4 * self.context_len, 4096)
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.autocast = autocast_context(self.device.type)
        with self.autocast:  # the cache takes the compute dtype (bf16 under autocast), not the fp32 weights'
            self.kv_cache = KVCache.for_model(model, max_batch_size, self.context_len)
        cache_bytes = sum(t.numel() * t.element_size() for t in self.kv_cache.tensors.values())
        logger.info(f"{name}: KV cache {max_batch_size} rows x {self.context_len} tokens = {cache_bytes / 2**30:.2f} GiB "
                    f"on {self.device} (lower --max-batch-size to use less)")
        self.rows = []  # running rows; rows[j] lives in kv_cache slot j
        self.pending = []  # admitted rows waiting for their prefill
        self.solo = None  # the row being decoded speculatively, if any
        self.staging = None  # a long context being prefilled chunk by chunk: {"rows", "slot", "done"}
        self.waiting = deque()  # submitted tickets not yet admitted
        self.running_tickets = set()
        self.outbox = defaultdict(list)  # ticket -> events of this step
        # deliver(outbox) hands a step's events over: to each ticket's event loop here, through a pipe in a worker
        self.deliver = deliver or (lambda outbox: [ticket.send(events) for ticket, events in outbox.items()])
        self.generator = torch.Generator(device=self.device).manual_seed(int.from_bytes(os.urandom(7), "little"))
        self.seconds_per_request = 2.0  # running average, for Retry-After
        self.counters = dict(decode_steps=0, prefill_tokens=0, generated_tokens=0, drafted=0, accepted=0)
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"scheduler-{name}", daemon=True)

    # ------------------------------------------------------------------ called from the event loop

    def start(self):
        self._thread.start()

    def shutdown(self):
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=10)

    @property
    def alive(self):
        return self._thread.is_alive()

    @property
    def pid(self):
        return os.getpid()  # the replica runs in the server's own process

    def rows_in_use(self):
        staged = len(self.staging["rows"]) if self.staging else 0
        return len(self.rows) + len(self.pending) + staged + (self.solo is not None)

    def load(self):
        """Rows running or waiting: where the next request should go (fewest first)."""
        with self._cond:  # (a re-entrant lock) the thread pops from waiting while we iterate it
            return self.rows_in_use() + sum(t.num_rows for t in self.waiting)

    def queued(self, extra=None):
        """Waiting tickets that do not fit in the free capacity (first come first served), counting `extra` last."""
        with self._cond:
            waiting = [t.num_rows for t in [*self.waiting, *([extra] if extra else [])]]
        return count_queued(waiting, self.max_rows - self.rows_in_use(),
                            self.max_running_requests - len(self.running_tickets))

    def speculative_counts(self):
        """(drafted, accepted) tokens so far, including the speculative run in progress."""
        drafted, accepted = self.counters["drafted"], self.counters["accepted"]
        stats = self.engine.last_speculative_stats
        if self.solo is not None and stats:
            drafted, accepted = drafted + stats["drafted"], accepted + stats["accepted"]
        return drafted, accepted

    def submit(self, ticket):
        """Queue a ticket, or raise Overloaded when it cannot start now and the queue is full."""
        if ticket.num_rows > self.max_rows:
            raise ValueError(f"{ticket.num_rows} sequences exceed --max-batch-size {self.max_rows}")
        with self._cond:
            if self.queued(extra=ticket) > self.max_queued_requests:
                wait = self.seconds_per_request * (self.queued() + 1) / self.max_running_requests
                raise Overloaded(max(1.0, math.ceil(wait)))
            self.waiting.append(ticket)
            self._cond.notify()

    def wake(self):
        """A ticket was cancelled: let the thread drop its rows now even if it was idle."""
        with self._cond:
            self._cond.notify()

    def cancel(self, ticket):
        """The client went away (or the response ended): its rows leave before the next step."""
        ticket.cancel()
        self.wake()

    def stop_row(self, ticket, row):
        """The client ended one row itself (a stop sequence matched)."""
        ticket.stop_row(row)

    # ------------------------------------------------------------------ the scheduler thread

    def _run(self):
        while True:
            with self._cond:
                while not self._stopping and not (self.rows or self.pending or self.staging or self.solo or self.waiting):
                    self._cond.wait()
                if self._stopping:
                    return
            try:
                with torch.inference_mode(), self.autocast:
                    self._step()
            except Exception as e:  # a bug or out-of-memory must not kill the replica: fail the batch, go on
                logger.exception(f"{self.name}: generation step failed")
                self._fail_all(f"generation failed: {type(e).__name__}")
            self._flush()

    def _step(self):
        self._drop_rows([r for r in self._all_rows() if r.dropped()])
        self._admit()
        if self._can_speculate():
            self._speculative_step()
            return
        if self.solo is not None:  # someone else arrived: the solo row rejoins the batch
            self._end_speculation(self.solo)
            self.pending.append(self.solo)
            self.solo = None
        if self.pending or self.staging:
            self._prefill()
        if self.rows:
            self._decode()

    def _all_rows(self):
        staged = self.staging["rows"] if self.staging else []
        return self.rows + self.pending + staged + ([self.solo] if self.solo is not None else [])

    def _admit(self):
        """Waiting tickets -> pending rows, first come first served, while slots and request slots last."""
        with self._cond:
            while self.waiting:
                ticket = self.waiting[0]
                if ticket.cancelled:
                    self.waiting.popleft()
                    continue
                if (self.rows_in_use() + ticket.num_rows > self.max_rows
                        or len(self.running_tickets) >= self.max_running_requests):
                    return
                self.waiting.popleft()
                self.running_tickets.add(ticket)
                ticket.started_at = time.monotonic()
                if ticket.seed is not None:
                    ticket.generator = torch.Generator(device=self.device).manual_seed(ticket.seed)
                for index in range(ticket.num_rows):
                    row = Row(ticket, index, self.tokenizer)
                    row.max_new = min(ticket.max_tokens, self.context_len - len(row.prompt))
                    self.pending.append(row)

    def _prefill(self):
        """
        Prefill pending rows into the slots after the running ones; a prompt's samples share one prefill.
        A context longer than prefill_chunk_tokens is staged instead: prefilled one chunk per step in the
        last slot, so running streams keep getting a token every step while a long prompt is read.
        """
        groups = defaultdict(list)  # fresh samples of one prompt share a prefill; a rejoining row has its own
        for row in self.pending:
            key = (id(row.ticket), row.index // row.ticket.num_samples) if not row.generated else id(row)
            groups[key].append(row)
        chosen, longest = [], 0
        for group in groups.values():
            length = len(group[0].context())
            if length > self.prefill_chunk_tokens:
                if self.staging is None:
                    self.staging = {"rows": group, "slot": self.max_rows - 1, "done": 0}
                    self._take_pending(group)
                continue
            if chosen and (len(chosen) + 1) * max(longest, length) > self.max_prefill_tokens:
                break
            chosen.append(group)
            longest = max(longest, length)
        if self.staging is not None:
            self._advance_staging()
        if chosen:
            self._prefill_batch(chosen, longest)

    def _take_pending(self, rows):
        taken = {id(r) for r in rows}
        self.pending = [r for r in self.pending if id(r) not in taken]

    def _join(self, group, source_slot):
        """A prefilled group's rows take the next running slots, copies of source_slot."""
        for row in group:
            if source_slot != len(self.rows):
                self.kv_cache.copy_row(source_slot, len(self.rows))
            self.rows.append(row)

    def _prefill_batch(self, chosen, longest):
        contexts = [group[0].context() for group in chosen]
        lengths = [len(c) for c in contexts]
        start = len(self.rows)
        view = self.kv_cache.view(start, start + len(chosen))
        view.reset()  # the slots may hold a departed row's length
        pad = self.tokenizer.get_pad_token_id()
        ids = torch.tensor([c + [pad] * (longest - len(c)) for c in contexts], dtype=torch.long, device=self.device)
        last = torch.tensor(lengths, device=self.device) - 1
        logits = self.model(ids, kv_cache=view, logits_at=last)[:, 0]  # (groups, V)
        view.set_lengths(lengths)  # right padding sits past each row's length: never attended, overwritten later
        self.counters["prefill_tokens"] += sum(lengths)
        # leaders first (they are in their slots already), then the extra samples copy their leader's slot
        self.rows.extend(group[0] for group in chosen)
        for g, group in enumerate(chosen):
            self._join(group[1:], start + g)
        new_rows = [group[0] for group in chosen] + [row for group in chosen for row in group[1:]]
        logit_rows = list(range(len(chosen))) + [g for g, group in enumerate(chosen) for _ in group[1:]]
        self._take_pending(new_rows)
        self._sample_and_emit(new_rows, logits[logit_rows])

    def _advance_staging(self):
        """One chunk of the staged context; when it is all in, the group joins the running rows."""
        staging = self.staging
        context = staging["rows"][0].context()
        view = self.kv_cache.view(staging["slot"], staging["slot"] + 1)
        if staging["done"] == 0:
            view.reset()
        chunk = context[staging["done"]:staging["done"] + self.prefill_chunk_tokens]
        ids = torch.tensor([chunk], dtype=torch.long, device=self.device)
        logits = self.model(ids, kv_cache=view, logits_at=torch.tensor([len(chunk) - 1], device=self.device))[:, 0]
        staging["done"] += len(chunk)
        self.counters["prefill_tokens"] += len(chunk)
        if staging["done"] < len(context):
            return
        self.staging = None
        self._join(staging["rows"], staging["slot"])
        self._sample_and_emit(staging["rows"], logits.expand(len(staging["rows"]), -1))

    def _decode(self):
        ids = torch.tensor([[row.generated[-1]] for row in self.rows], dtype=torch.long, device=self.device)
        logits = self.model(ids, kv_cache=self.kv_cache.view(0, len(self.rows)))[:, -1]  # (n, V)
        self.counters["decode_steps"] += 1
        self._sample_and_emit(list(self.rows), logits)

    def _sample_and_emit(self, rows, logits):
        """Sample one token per row with that row's settings, emit it, and retire finished rows."""
        settings = [(r.ticket.temperature, r.ticket.top_k, r.ticket.top_p) for r in rows]
        if len(set(settings)) == 1:
            probs = process_logits(logits, *settings[0])
        else:
            probs = process_logits(logits, *map(list, zip(*settings)))
        sampled = [0] * len(rows)
        by_generator = defaultdict(list)  # seeded requests draw from their own generator, the rest share one
        for j, row in enumerate(rows):
            by_generator[row.ticket.generator or self.generator].append(j)
        for generator, js in by_generator.items():
            tokens = sample_from_probs(probs[js], generator)[:, 0].tolist()
            for j, token in zip(js, tokens):
                sampled[j] = token
        finished = [row for row, token in zip(rows, sampled) if self._emit(row, token)]
        self._drop_rows(finished)

    def _emit(self, row, sampled):
        """Feed one token to the row (the tool may override it); returns True when the row has finished."""
        token, _ = row.state.next(sampled)
        events = self.outbox[row.ticket]
        if row.state.done:  # the terminal token ends the reply and is not part of it
            events.append(("finish", row.index, "stop"))
            return True
        row.generated.append(token)
        self.counters["generated_tokens"] += 1
        events.append(("token", row.index, token))
        if len(row.generated) >= row.max_new:
            events.append(("finish", row.index, "length"))
            return True
        return False

    def _drop_rows(self, doomed):
        """Remove rows from wherever they are, keep the running rows packed, and close finished tickets."""
        if not doomed:
            return
        doomed_ids = {id(r) for r in doomed}
        keep = len(self.rows) - sum(id(r) in doomed_ids for r in self.rows)
        holes = [j for j in range(keep) if id(self.rows[j]) in doomed_ids]
        movers = [j for j in range(keep, len(self.rows)) if id(self.rows[j]) not in doomed_ids]
        for hole, src in zip(holes, movers):  # equal counts: as many survivors past `keep` as holes before it
            self.kv_cache.copy_row(src, hole)
            self.rows[hole] = self.rows[src]
        del self.rows[keep:]
        self.pending = [r for r in self.pending if id(r) not in doomed_ids]
        if self.staging is not None:
            self.staging["rows"] = [r for r in self.staging["rows"] if id(r) not in doomed_ids]
            if not self.staging["rows"]:
                self.staging = None
        if self.solo is not None and id(self.solo) in doomed_ids:
            self._end_speculation(self.solo)
            self.solo = None
        for row in doomed:
            ticket = row.ticket
            ticket.rows_left -= 1
            if ticket.rows_left == 0:
                self.running_tickets.discard(ticket)
                seconds = time.monotonic() - ticket.started_at
                self.seconds_per_request = 0.9 * self.seconds_per_request + 0.1 * seconds

    # ------------------------------------------------------------------ speculative decoding of a lone row

    def _can_speculate(self):
        if not self.speculative_proposals or self.waiting:
            return False
        rows = self._all_rows()
        if len(rows) != 1 or rows[0].ticket.num_rows != 1:
            return False
        row = rows[0]
        # the drafter's own tool state starts empty: only start between tool calls
        return row is self.solo or (not row.state.has_forced() and row.state.expression is None)

    def _speculative_step(self):
        if self.solo is None:
            row = self._all_rows()[0]
            self.rows, self.pending, self.staging = [], [], None  # its slot is abandoned; it is re-prefilled
            # an unseeded request gets a seed from the host: the replica's generator lives on its device
            seed = row.ticket.seed if row.ticket.seed is not None else secrets.randbits(62)
            seed = (seed + len(row.generated)) % 2**63  # a rejoin must not replay the first segment's draws
            row.speculative = self.engine.generate(
                row.context(), max_tokens=row.max_new - len(row.generated), temperature=row.ticket.temperature,
                top_k=row.ticket.top_k, top_p=row.ticket.top_p, seed=seed,
                speculative_num_tokens=self.speculative_proposals)
            self.solo = row
        row = self.solo
        column = next(row.speculative, None)
        if column is None:  # the iterator ran out: only at the token budget, which _emit has already closed
            self._drop_rows([row])
        elif self._emit(row, column[0][0]):
            self._drop_rows([row])

    def _end_speculation(self, row):
        if row.speculative is None:
            return
        row.speculative.close()
        stats = self.engine.last_speculative_stats or {}
        self.counters["drafted"] += stats.get("drafted", 0)
        self.counters["accepted"] += stats.get("accepted", 0)
        row.speculative = None

    # ------------------------------------------------------------------ delivery and failure

    def _flush(self):
        self.deliver(self.outbox)  # also when empty: a worker reports its occupancy after every step
        self.outbox.clear()

    def _fail_all(self, message):
        for row in self._all_rows():
            self.outbox[row.ticket] = [("error", None, message)]
        self._drop_rows(self._all_rows())
        self.kv_cache.reset()
