"""
Continuous batching: one Scheduler, with its own thread, per model replica.

A request (Ticket) has len(prompts) x num_samples sequences. Each Sequence has a status and sits in the
queue of that status; a request waits as a whole until there are batch rows for all its sequences:

    waiting --admit--> prefilling --prefill done--> running --finish/stop/cancel--> finished

The KV cache is preallocated for max_batch_size rows x the model's context; a prefilling or running
sequence owns one row ("slot"). Running sequences stay packed in slots 0..n-1 (running[j] is in slot j),
so a decode step is one forward over the view kv_cache[0:n] with each sequence's latest token, (n, 1);
when one finishes, the last running sequence moves into its slot (one row copy). A prompt up to
prefill_chunk_tokens long is prefilled in one step straight into the slot after the running ones,
together with the other short prompts of that step. A longer one is read one chunk per step in the last
slot (one such prompt at a time) and then copied down, so it never stalls the running streams for more
than one chunk's forward. The later samples of a prompt (n > 1) wait, prefilling, for the first: they
copy its slot instead of recomputing it. A finished sequence's KV is kept in a few extra cache rows
(serving/prefix_cache.py): a context that starts with it (the next turn of a chat) copies it and is
prefilled only from there.

Each sequence samples with its request's temperature / top-k / top-p and its request's seeded generator,
after its penalties and, for a response_format, its grammar's mask (nanochat/grammar.py).
A failure while sampling or emitting one sequence's token ends only that sequence's request (an error
event); a failed forward ends the requests in that forward. With speculative decoding on, a sequence
running alone is decoded speculatively (the engine keeps its own caches and drives the same calculator
state); when another request arrives it goes back to prefilling, with its prompt plus what it generated.

The HTTP side never touches torch: it submits a Ticket (serving/tickets.py) and reads lists of events
from the ticket's asyncio queue, filled by this thread through loop.call_soon_threadsafe, so generation
never blocks the event loop. Events: ("token", row, token_id), ("finish", row, "stop"|"length"),
("error", None, message), and when the request asked for logprobs ("logprob", row, (token, logprob, top))
before a token and ("prompt_logprobs", row, [...]) before any (serving/tickets.py). In a worker process (serving/workers.py) `deliver` sends each step's events
through a pipe to the HTTP front instead.
"""

import logging
import os
import secrets
import threading
import time
from collections import defaultdict, deque

import torch

from nanochat.common import autocast_context
from nanochat.engine import Engine, prefill_logits
from nanochat.grammar import GrammarCompiler, Matcher, mask_rows_
from nanochat.kv_cache import KVCache
from nanochat.tools import RowState
from nanochat.sampling import penalize_logits, process_logits, sample_from_probs, token_logprobs
from nanochat.serving.prefix_cache import PrefixCache
from nanochat.serving.tickets import Overloaded, count_queued

logger = logging.getLogger(__name__)

WAITING, PREFILLING, RUNNING, FINISHED = "waiting", "prefilling", "running", "finished"


class Sequence:
    """
    Row `index` of a ticket. While prefilling or running it owns KV cache row `slot` (none while decoded
    speculatively: the engine has its own caches). While prefilling, the slot holds the first `cached`
    tokens of context(); while running, all but the last generated token, which the next decode step feeds.
    """

    def __init__(self, ticket, index, tokenizer, context_len):
        self.ticket, self.index = ticket, index
        self.prompt = ticket.prompts[index // ticket.num_samples]
        self.generated = []
        self.tool = RowState(tokenizer)  # the calculator; done once a terminal token is emitted
        self.max_new = min(ticket.max_tokens, context_len - len(self.prompt))
        self.status = WAITING
        self.slot, self.cached = None, 0
        self.leader = None  # an earlier sample of the same prompt whose prefilled slot this one copies
        self.speculative = None  # the engine's token iterator while this sequence runs alone
        self.matcher = None  # its grammar's state when the request constrains the reply (nanochat/grammar.py)

    def context(self):
        return self.prompt + self.generated

    def dropped(self):
        return self.ticket.cancelled or self.index in self.ticket.stopped_rows


class Scheduler:
    def __init__(self, model, tokenizer, max_batch_size=32, max_running_requests=None, max_queued_requests=128,
                 draft=None, speculative_proposals=0, max_prefill_tokens=None, prefill_chunk_tokens=512,
                 prefix_cache_rows=8, name="replica-0", deliver=None):
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
            self.kv_cache = KVCache.for_model(model, max_batch_size + prefix_cache_rows, self.context_len)
        cache_bytes = sum(t.numel() * t.element_size() for t in self.kv_cache.tensors.values())
        logger.info(f"{name}: KV cache ({max_batch_size} batch + {prefix_cache_rows} prefix rows) x {self.context_len} "
                    f"tokens = {cache_bytes / 2**30:.2f} GiB on {self.device} (lower --max-batch-size or "
                    f"--prefix-cache-rows to use less)")
        self.waiting = deque()  # tickets not admitted yet, first come first served
        self.prefilling = []  # admitted sequences whose context is not (all) in their slot yet
        self.running = []  # running[j] is in slot j
        self.running_tickets = set()
        self.outbox = defaultdict(list)  # ticket -> events of this step
        # deliver(outbox) hands a step's events over: to each ticket's event loop here, through a pipe in a worker
        self.deliver = deliver or (lambda outbox: [ticket.send(events) for ticket, events in outbox.items()])
        self.generator = torch.Generator(device=self.device).manual_seed(int.from_bytes(os.urandom(7), "little"))
        self.seconds_per_request = 2.0  # running average, for Retry-After
        self.counters = dict(decode_steps=0, prefill_tokens=0, generated_tokens=0, drafted=0, accepted=0)
        self.grammars = None  # nanochat.grammar.GrammarCompiler, made when the first request needs one
        self.prefix_cache = PrefixCache(self.kv_cache, max_batch_size, prefix_cache_rows, self.counters)
        self._cond = threading.Condition()
        self._stopping = False
        self._ending = {}  # "waiting" / "running" -> the error message those tickets get at the next step
        self._thread = threading.Thread(target=self._run, name=f"scheduler-{name}", daemon=True)

    # ------------------------------------------------------------------ called from the event loop

    def start(self):
        self._thread.start()

    def drain(self, message="the server is shutting down"):
        """Stop admitting: waiting tickets get an error event, submit() refuses; running ones go on."""
        with self._cond:
            self.max_queued_requests = -1
            self._ending["waiting"] = message
            self._cond.notify()

    def end_running(self, message="the server is shutting down"):
        """Every admitted ticket gets an error event and leaves at the next step."""
        with self._cond:
            self._ending["running"] = message
            self._cond.notify()

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

    @property
    def solo(self):
        """The sequence being decoded speculatively, if any."""
        return next((s for s in self.running if s.speculative is not None), None)

    def rows_in_use(self):
        return len(self.running) + len(self.prefilling)

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
        if self.solo is not None:
            stats = self.solo.speculative.stats
            drafted, accepted = drafted + stats["drafted"], accepted + stats["accepted"]
        return drafted, accepted

    def submit(self, ticket):
        """Queue a ticket, or raise Overloaded when it cannot start now and the queue is full."""
        if ticket.num_rows > self.max_rows:
            raise ValueError(f"{ticket.num_rows} sequences exceed --max-batch-size {self.max_rows}")
        with self._cond:
            if self.queued(extra=ticket) > self.max_queued_requests:
                raise Overloaded.of(self, self.queued())
            ticket.sequences = [Sequence(ticket, i, self.tokenizer, self.context_len) for i in range(ticket.num_rows)]
            self.waiting.append(ticket)
            self._cond.notify()

    def wake(self):
        """A ticket was cancelled: let the thread drop its sequences now even if it was idle."""
        with self._cond:
            self._cond.notify()

    def cancel(self, ticket):
        """The client went away (or the response ended): its sequences leave before the next step."""
        ticket.cancel()
        self.wake()

    def stop_row(self, ticket, row):
        """The client ended one row itself (a stop sequence matched)."""
        ticket.stop_row(row)

    # ------------------------------------------------------------------ the scheduler thread

    def _run(self):
        while True:
            with self._cond:
                while not self._stopping and not (self.running or self.prefilling or self.waiting or self._ending):
                    self._cond.wait()
                if self._stopping:
                    return
                ending, self._ending = self._ending, {}
                refused = [self.waiting.popleft() for _ in range(len(self.waiting))] if "waiting" in ending else []
            self._end(refused, ending)
            try:
                with torch.inference_mode(), self.autocast:
                    self._step()
            except Exception as e:  # a bug outside any one forward: fail what is in flight, keep the replica
                logger.exception(f"{self.name}: scheduler step failed")
                self._fail({s.ticket for s in self.running + self.prefilling}, f"generation failed: {type(e).__name__}")
            self._flush()

    def _end(self, refused, ending):
        """What drain() / end_running() asked for: error events for the refused waiting tickets, or all running."""
        for ticket in refused:
            self.outbox[ticket] = [("error", None, ending["waiting"])]
        if "running" in ending:
            self._fail({s.ticket for s in self.running + self.prefilling}, ending["running"])

    def _step(self):
        self._finish([s for s in self.running + self.prefilling if s.dropped()])
        self._start(self._admit())
        solo = self.solo
        if solo is not None and (self.waiting or self.rows_in_use() > 1):  # someone else arrived: rejoin
            self._end_speculation(solo)
            self._finish([solo], rejoin=True)
        if self._can_speculate():
            self._guarded([*self.running, *self.prefilling], self._speculative_step)
            return
        if self.prefilling:
            self._prefill()
        if self.running:
            self._guarded(list(self.running), self._decode)

    def _guarded(self, sequences, work, *args):
        """Run one forward's work; if it raises, only the requests of `sequences` fail (the replica goes on)."""
        try:
            work(*args)
        except Exception as e:  # out of memory, a bug: those requests get an error event
            logger.exception(f"{self.name}: generation failed for {len(sequences)} sequence(s)")
            self._fail({s.ticket for s in sequences}, f"generation failed: {type(e).__name__}")

    def _admit(self):
        """
        Waiting tickets -> prefilling sequences, first come first served, while rows and request slots last.
        Returns the admitted tickets.
        """
        admitted = []
        with self._cond:
            while self.waiting:
                ticket = self.waiting[0]
                if ticket.cancelled:
                    self.waiting.popleft()
                    continue
                if (self.rows_in_use() + ticket.num_rows > self.max_rows
                        or len(self.running_tickets) >= self.max_running_requests):
                    return admitted
                self.waiting.popleft()
                self.running_tickets.add(ticket)
                ticket.started_at = time.monotonic()
                if ticket.seed is not None:
                    ticket.generator = torch.Generator(device=self.device).manual_seed(ticket.seed)
                for seq in ticket.sequences:
                    seq.status = PREFILLING
                    if seq.index % ticket.num_samples:  # later samples copy the first one's prefill
                        seq.leader = ticket.sequences[seq.index - seq.index % ticket.num_samples]
                self.prefilling += ticket.sequences
                admitted.append(ticket)
        return admitted

    def _start(self, tickets):
        """
        What an admitted ticket needs before its prefill: a grammar state per row, its prompts' logprobs
        (completions' echo). A ticket asking for no new tokens is done after that. One that fails fails alone.
        """
        for ticket in tickets:
            if ticket.response_format is not None or ticket.prompt_logprobs:
                self._guarded(ticket.sequences, self._prepare, ticket)
            if ticket.max_tokens == 0 and not ticket.cancelled and ticket in self.running_tickets:
                self.outbox[ticket] += [("finish", seq.index, "length") for seq in ticket.sequences]
                self._finish(ticket.sequences)

    def _prepare(self, ticket):
        if ticket.response_format is not None:
            if self.grammars is None:
                self.grammars = GrammarCompiler(self.tokenizer, sorted(self.tokenizer.terminal_token_ids()),
                                                self.model.config.vocab_size)
            compiled = self.grammars.compile(ticket.response_format)
            for seq in ticket.sequences:
                seq.matcher = Matcher(compiled)
        if ticket.prompt_logprobs:
            for i, prompt in enumerate(ticket.prompts):
                scored = self._score_prompt(prompt, ticket.logprobs or 0)
                for seq in ticket.sequences[i * ticket.num_samples:(i + 1) * ticket.num_samples]:
                    self.outbox[ticket].append(("prompt_logprobs", seq.index, scored))

    def _score_prompt(self, prompt, top):
        """
        [(token, logprob, top alternatives)] for each prompt token under the model's own distribution; the
        first token has (token, None, None): nothing predicts it. One forward over the whole prompt.
        """
        scored = []
        if len(prompt) > 1:
            logits = self.model(torch.tensor([prompt], dtype=torch.long, device=self.device))[0, :-1]  # (T - 1, V)
            scored = token_logprobs(logits, prompt[1:], 1.0, top)
        return [(prompt[0], None, None)] + [(token, lp, alt) for token, (lp, alt) in zip(prompt[1:], scored)]

    # ------------------------------------------------------------------ prefill

    def _prefill(self):
        """
        Short contexts (what is left of them after a reused prefix) are prefilled whole, as many as the budget
        allows; the chunked prefill of one long context advances one chunk.
        """
        chunked = next((s for s in self.prefilling if s.slot is not None), None)
        short, reuse, longest = [], [], 0
        for seq in self.prefilling:
            if seq.leader is not None or seq is chunked:
                continue
            context = seq.context()
            row, n = self.prefix_cache.match(context)
            length = len(context) - n
            if length > self.prefill_chunk_tokens:
                if chunked is None:  # one long context at a time, in the last slot
                    chunked, seq.slot = seq, self.max_rows - 1
                    seq.cached = self.prefix_cache.load(row, n, seq.slot)
                continue
            if short and (len(short) + 1) * max(longest, length) > self.max_prefill_tokens:
                break
            short.append(seq)
            reuse.append((row, n))
            longest = max(longest, length)
        if short:  # first: a sequence finishing in the chunked step could evict the rows they reuse
            self._guarded([*short, *(f for s in short for f in self._followers(s))], self._prefill_short, short, reuse,
                          longest)
        if chunked is not None:
            self._guarded([chunked, *self._followers(chunked)], self._prefill_chunk, chunked)

    def _followers(self, leader):
        return [s for s in self.prefilling if s.leader is leader]

    def _prefill_chunk(self, seq):
        """One chunk of a long context into its slot; when it is all in, it starts running."""
        context = seq.context()
        view = self.kv_cache.view(seq.slot, seq.slot + 1)
        chunk = context[seq.cached:seq.cached + self.prefill_chunk_tokens]
        ids = torch.tensor([chunk], dtype=torch.long, device=self.device)
        logits = self.model(ids, kv_cache=view, logits_at=torch.tensor([len(chunk) - 1], device=self.device))[:, 0]
        seq.cached += len(chunk)
        self.counters["prefill_tokens"] += len(chunk)
        if seq.cached == len(context):
            self._start_running([seq], logits)

    def _prefill_short(self, leaders, reuse, longest):
        """
        What is left of each context after its reused prefix (if any), right-padded to the longest, in one
        forward straight into the slots after the running sequences.
        """
        start = len(self.running)
        for i, (seq, (row, n)) in enumerate(zip(leaders, reuse)):
            # a row's padded positions must fit the context: reuse less rather than overflow
            seq.slot = start + i
            seq.cached = self.prefix_cache.load(row, min(n, self.context_len - longest), seq.slot)
        rests = [seq.context()[seq.cached:] for seq in leaders]
        view = self.kv_cache.view(start, start + len(leaders))
        logits = prefill_logits(self.model, rests, self.tokenizer.get_pad_token_id(), view)  # (leaders, V)
        self.counters["prefill_tokens"] += sum(map(len, rests))
        for seq, rest in zip(leaders, rests):
            seq.cached += len(rest)
        self._start_running(leaders, logits)

    def _start_running(self, leaders, logits):
        """
        Prefilled leaders take the next running slots (a chunked one is copied down; the short ones are there
        already), then their followers take copies; each samples its first token from its leader's logits.
        """
        joined, logit_rows = [], []
        for i, seq in enumerate(leaders):
            self._append_running(seq, seq.slot)
            joined.append(seq)
            logit_rows.append(i)
        for i, seq in enumerate(leaders):
            for follower in self._followers(seq):
                self._append_running(follower, seq.slot)
                joined.append(follower)
                logit_rows.append(i)
        taken = set(map(id, joined))
        self.prefilling = [s for s in self.prefilling if id(s) not in taken]
        self._sample_and_emit(joined, logits[logit_rows])

    def _append_running(self, seq, source_slot):
        slot = len(self.running)
        if source_slot != slot:
            self.kv_cache.copy_row(source_slot, slot)
        seq.slot, seq.cached, seq.status, seq.leader = slot, len(seq.context()), RUNNING, None
        self.running.append(seq)

    # ------------------------------------------------------------------ decode and emission

    def _decode(self):
        ids = torch.tensor([[seq.generated[-1]] for seq in self.running], dtype=torch.long, device=self.device)
        logits = self.model(ids, kv_cache=self.kv_cache.view(0, len(self.running)))[:, -1]  # (n, V)
        self.counters["decode_steps"] += 1
        self._sample_and_emit(list(self.running), logits)

    def _sample_and_emit(self, sequences, logits):
        """One token per sequence with its request's settings; a sequence that cannot be sampled fails alone."""
        logits, tokens = self._sample(sequences, logits)
        failed, finished = {}, []  # failed: ticket -> error message
        for j, (seq, token) in enumerate(zip(sequences, tokens)):
            if seq.ticket in failed:
                continue
            try:
                if token is None:
                    raise RuntimeError("sampling failed")
                token, _ = seq.tool.next(token)  # the calculator may replace it with forced output
                if seq.ticket.logprobs is not None:
                    (lp, top), = token_logprobs(logits[j:j + 1], [token], seq.ticket.temperature, seq.ticket.logprobs)
                    self.outbox[seq.ticket].append(("logprob", seq.index, (token, lp, top)))
                if seq.matcher is not None:
                    seq.matcher.accept(token)
                if self._emit(seq, token):
                    finished.append(seq)
            except Exception as e:
                logger.exception(f"{self.name}: sequence {seq.index} of a request failed")
                failed[seq.ticket] = f"generation failed: {type(e).__name__}"
        self._finish(finished)
        for ticket, message in failed.items():
            self._fail({ticket}, message)

    def _sample(self, sequences, logits):
        """
        (the logits the rows sampled from, the token ids): None for a sequence whose sampling raised (every
        other one still gets its token).
        """
        try:
            logits = self._adjust(sequences, logits)
            return logits, self._sample_rows(sequences, logits)
        except Exception:  # find the culprit(s): sample each sequence on its own
            rows, tokens = [], []
            for j, seq in enumerate(sequences):
                try:
                    row = self._adjust([seq], logits[j:j + 1])
                    tokens += self._sample_rows([seq], row)
                except Exception:
                    row = logits[j:j + 1].float()
                    tokens.append(None)
                rows.append(row)
            return torch.cat(rows), tokens

    def _adjust(self, sequences, logits):
        """Each row's penalties / logit_bias / min_tokens, then its grammar's mask: (B, V) float32."""
        penalized = any(s.ticket.penalties for s in sequences)
        constrained = any(s.matcher is not None for s in sequences)
        if not (penalized or constrained):
            return logits
        if penalized:
            logits = torch.stack([penalize_logits(row, s.generated, eos_ids=s.tool.terminal, **s.ticket.penalties)
                                  if s.ticket.penalties else row.float() for s, row in zip(sequences, logits)])
        else:
            logits = logits.float().clone()
        return mask_rows_(logits, [s.matcher for s in sequences]) if constrained else logits

    def _sample_rows(self, sequences, logits):
        settings = [(s.ticket.temperature, s.ticket.top_k, s.ticket.top_p) for s in sequences]
        if len(set(settings)) == 1:
            probs = process_logits(logits, *settings[0])
        else:
            probs = process_logits(logits, *map(list, zip(*settings)))
        tokens = [0] * len(sequences)
        by_generator = defaultdict(list)  # seeded requests draw from their own generator, the rest share one
        for j, seq in enumerate(sequences):
            by_generator[seq.ticket.generator or self.generator].append(j)
        for generator, js in by_generator.items():
            for j, token in zip(js, sample_from_probs(probs[js], generator)[:, 0].tolist()):
                tokens[j] = token
        return tokens

    def _emit(self, seq, token):
        """Record one emitted token (already through the calculator); True when the sequence has finished."""
        events = self.outbox[seq.ticket]
        if seq.tool.done:  # the terminal token ends the reply and is not part of it
            events.append(("finish", seq.index, "stop"))
            return True
        seq.generated.append(token)
        self.counters["generated_tokens"] += 1
        events.append(("token", seq.index, token))
        if len(seq.generated) >= seq.max_new:
            events.append(("finish", seq.index, "length"))
            return True
        return False

    # ------------------------------------------------------------------ leaving

    def _finish(self, sequences, rejoin=False, keep_prefix=True):
        """
        Sequences leave the running and prefilling queues: finished (and their tickets closed when it was
        their last row), or with rejoin=True back to prefilling from the start (a speculative run ending).
        A finished running sequence's KV goes to the prefix cache (unless it failed: keep_prefix=False).
        The last running sequences move into the freed slots to keep the running ones packed.
        """
        if not sequences:
            return
        for seq in sequences:
            if keep_prefix and not rejoin and seq.status == RUNNING and seq.slot is not None:
                self.prefix_cache.store(seq.slot, seq.context()[:int(self.kv_cache.lengths[seq.slot])])
        leaving = set(map(id, sequences))
        keep = len(self.running) - sum(id(s) in leaving for s in self.running)
        holes = [j for j in range(keep) if id(self.running[j]) in leaving]
        movers = [j for j in range(keep, len(self.running)) if id(self.running[j]) not in leaving]
        for hole, src in zip(holes, movers):  # equal counts: as many survivors past `keep` as holes before it
            self.kv_cache.copy_row(src, hole)
            self.running[hole] = self.running[src]
            self.running[hole].slot = hole
        del self.running[keep:]
        self.prefilling = [s for s in self.prefilling if id(s) not in leaving]
        for seq in self.prefilling:  # a sample whose leader left prefills on its own
            if seq.leader is not None and id(seq.leader) in leaving:
                seq.leader = None
        for seq in sequences:
            seq.slot, seq.cached = None, 0
            if rejoin:
                seq.status = PREFILLING
                self.prefilling.append(seq)
                continue
            seq.status = FINISHED
            self._end_speculation(seq)
            ticket = seq.ticket
            ticket.rows_left -= 1
            if ticket.rows_left == 0:
                self.running_tickets.discard(ticket)
                seconds = time.monotonic() - ticket.started_at
                self.seconds_per_request = 0.9 * self.seconds_per_request + 0.1 * seconds

    def _fail(self, tickets, message=None):
        """Every sequence of these tickets leaves; with a message, the ticket gets it as an error event."""
        if not tickets:
            return
        for ticket in tickets:
            if message is not None:
                self.outbox[ticket] = [("error", None, message)]
        self._finish([s for s in self.running + self.prefilling if s.ticket in tickets], keep_prefix=False)

    # ------------------------------------------------------------------ speculative decoding of a lone sequence

    def _can_speculate(self):
        if not self.speculative_proposals or self.waiting:
            return False
        sequences = self.running + self.prefilling
        # the speculative engine samples from plain logits: penalties, logprobs and grammars decode plainly
        return len(sequences) == 1 and sequences[0].ticket.num_rows == 1 and not sequences[0].ticket.needs_logits

    def _speculative_step(self):
        seq = (self.running + self.prefilling)[0]
        if seq.speculative is None:  # its slot is abandoned: the engine keeps its own caches
            self.prefilling, self.running = [], [seq]
            seq.status, seq.slot = RUNNING, None
            # an unseeded request gets a seed from the host: the replica's generator lives on its device
            seed = seq.ticket.seed if seq.ticket.seed is not None else secrets.randbits(62)
            seed = (seed + len(seq.generated)) % 2**63  # a rejoin must not replay the first segment's draws
            seq.speculative = self.engine.speculative(
                seq.context(), max_tokens=seq.max_new - len(seq.generated), temperature=seq.ticket.temperature,
                top_k=seq.ticket.top_k, top_p=seq.ticket.top_p, seed=seed,
                speculative_num_tokens=self.speculative_proposals, tool_state=seq.tool)
        column = next(seq.speculative, None)  # the engine has already put the token through seq.tool
        if column is None:  # the engine stopped early (the end of its context)
            self.outbox[seq.ticket].append(("finish", seq.index, "length"))
        if column is None or self._emit(seq, column[0][0]):
            self._finish([seq])

    def _end_speculation(self, seq):
        if seq.speculative is None:
            return
        seq.speculative.close()
        self.counters["drafted"] += seq.speculative.stats["drafted"]
        self.counters["accepted"] += seq.speculative.stats["accepted"]
        seq.speculative = None

    # ------------------------------------------------------------------ delivery

    def _flush(self):
        self.deliver(self.outbox)  # also when empty: a worker reports its occupancy after every step
        self.outbox.clear()
