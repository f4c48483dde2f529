"""
What a generation request is to a replica, and the admission rule, without torch: the HTTP front uses
these both for a scheduler in its own process and for replicas in worker processes (serving/workers.py).
"""

import asyncio
import math


class Overloaded(Exception):
    """Every slot is busy and the queue is full (HTTP 503); retry_after is in seconds."""

    def __init__(self, retry_after):
        super().__init__("the server is at capacity; retry later")
        self.retry_after = retry_after

    @classmethod
    def of(cls, replica, queued):
        """For a replica with `queued` tickets waiting: about when one of its request slots frees (>= 1 s)."""
        return cls(max(1.0, math.ceil(replica.seconds_per_request * (queued + 1) / replica.max_running_requests)))


class Ticket:
    """
    One request: len(prompts) x num_samples rows (row = prompt_index * num_samples + sample). A replica
    reports progress as lists of events, ("token", row, token_id), ("finish", row, "stop"|"length") and
    ("error", None, message), put on `events` (an asyncio queue of the HTTP side's event loop).
    """

    def __init__(self, prompts, num_samples, max_tokens, temperature, top_k, top_p, seed=None, penalties=None,
                 logprobs=None, prompt_logprobs=False, response_format=None, loop=None):
        self.prompts, self.num_samples, self.max_tokens = prompts, num_samples, max_tokens
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        # None, or sampling.penalize_logits' keyword arguments: frequency_penalty, presence_penalty, logit_bias,
        # min_tokens
        self.penalties = penalties
        # None, or how many alternatives to report with each generated token's logprob: ("logprob", row,
        # (token, logprob, [(id, logprob)])) before its token event; with prompt_logprobs the prompt's too,
        # in one ("prompt_logprobs", row, [(token, None, None), (token, logprob, top), ...]) event first
        self.logprobs, self.prompt_logprobs = logprobs, prompt_logprobs
        self.response_format = response_format  # None, or OpenAI's JSON response_format (nanochat/grammar.py)
        self.seed = None if seed is None else seed % 2**63  # any JSON integer -> a valid torch seed
        self.num_rows = len(prompts) * num_samples
        self.loop = loop  # where events are delivered: the running loop when created by the HTTP side
        if loop is None:
            try:
                self.loop = asyncio.get_running_loop()
            except RuntimeError:  # created in a worker process: events travel back through a pipe instead
                pass
        self.events = asyncio.Queue()
        self.cancelled = False  # the client went away: drop every row
        self.stopped_rows = set()  # rows the client ended itself (a stop sequence matched)
        self.generator = None  # a scheduler seeds one on the model's device when seed is given
        self.rows_left = self.num_rows
        self.started_at = None
        self.first_event_at = None  # set by the HTTP side when the first events arrive (time to first token)
        self.streams = []  # the HTTP side's TextStreams, one per row
        self.scheduler = None  # the replica it was submitted to
        self.sequences = []  # that replica's Sequence per row (serving/scheduler.py)

    def spec(self):
        """The arguments that recreate this ticket in another process (serving/workers.py)."""
        return dict(prompts=self.prompts, num_samples=self.num_samples, max_tokens=self.max_tokens,
                    temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, seed=self.seed,
                    penalties=self.penalties, logprobs=self.logprobs, prompt_logprobs=self.prompt_logprobs,
                    response_format=self.response_format)

    @property
    def needs_logits(self):
        """Its rows need every step's logits (penalties, logprobs, a grammar): no speculative decoding."""
        return bool(self.penalties or self.logprobs is not None or self.response_format)

    def cancel(self):
        self.cancelled = True

    def stop_row(self, row):
        self.stopped_rows.add(row)

    def send(self, events):
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, events)
        except RuntimeError:  # the event loop is closed (server shutting down): nobody is listening
            pass


def count_queued(rows_per_ticket, free_rows, free_requests):
    """
    How many tickets (their row counts, in arrival order) cannot start with free_rows batch rows and
    free_requests request slots. Admission is first come first served: once one ticket waits, every later
    one waits behind it.
    """
    for i, rows in enumerate(rows_per_ticket):
        if rows > free_rows or free_requests < 1:
            return len(rows_per_ticket) - i
        free_rows, free_requests = free_rows - rows, free_requests - 1
    return 0
