"""
Replicas in worker processes: one process per GPU holds the model and runs a Scheduler, and the HTTP front
talks to it through two pipes. Eight replicas as threads of one process would share one GIL, so every
decode step's Python (sampling, bookkeeping, streaming) of eight GPUs would run on one core; as processes
they run side by side and the front's event loop only moves text.

The front's WorkerReplica offers what the app uses of a Scheduler (submit, cancel, stop_row, drain,
end_running, load, queued, rows_in_use, counters, speculative_counts) and decides admission itself, with the scheduler's
rule (tickets.count_queued) over the tickets it has outstanding, so a full replica is a 503 before any
response starts. Messages (pickled):
    front -> worker: ("submit", id, Ticket.spec()),
                     ("cancel", id), ("stop_row", id, row), ("drain", message), ("end_running", message),
                     ("shutdown",)
    worker -> front: ("ready", {context_len, max_rows, device}) or ("failed", message) once at start, then
                     per scheduler step ("step", [(id, events), ...], status) with the scheduler's
                     counters and occupancy, and ("events", [(id, events)]) for a refused submission.
"""

import logging
import multiprocessing
import os
import threading
import time
from collections import OrderedDict

from nanochat.serving.tickets import Overloaded, Ticket, count_queued

logger = logging.getLogger("nanochat.serving")
READY_TIMEOUT_SECONDS = 600  # loading a big checkpoint from a slow disk


def _status(scheduler):
    drafted, accepted = scheduler.speculative_counts()
    return {"rows_in_use": scheduler.rows_in_use(), "queued": scheduler.queued(), "counters": dict(scheduler.counters),
            "drafted": drafted, "accepted": accepted}


def _worker_main(spec, commands, events):
    """A worker process: load the model on spec["device"], run a Scheduler, follow the front's commands."""
    import torch

    from nanochat.checkpoint_manager import load_draft, load_model
    from nanochat.serving.scheduler import Scheduler
    send_lock = threading.Lock()  # the scheduler thread and this one both send

    def send(message):
        with send_lock:
            events.send(message)

    try:
        device = torch.device(spec["device"])
        if device.type == "cuda":
            torch.cuda.set_device(device)
        else:
            torch.set_num_threads(spec["cpu_threads"])
        model, tokenizer, _ = load_model(spec["source"], device, "eval", model_tag=spec["model_tag"], step=spec["step"])
        draft = load_draft(spec["source"], spec["draft_model_tag"], device)
        scheduler = Scheduler(model, tokenizer, max_batch_size=spec["max_batch_size"],
                              max_running_requests=spec["max_running_requests"], max_queued_requests=2**31,
                              draft=draft, speculative_proposals=spec["speculative_proposals"],
                              prefill_chunk_tokens=spec["prefill_chunk_tokens"],
                              prefix_cache_rows=spec["prefix_cache_rows"], name=spec["name"],
                              deliver=lambda outbox: send(("step", [(t.id, e) for t, e in outbox.items()], _status(scheduler))))
    except Exception as e:  # a missing checkpoint, out of memory: the front reports it and exits
        send(("failed", f"{type(e).__name__}: {e}"))
        return
    send(("ready", {"context_len": scheduler.context_len, "max_rows": scheduler.max_rows, "device": str(device)}))
    scheduler.start()
    tickets = {}
    try:
        while True:
            message = commands.recv()
            kind = message[0]
            if kind == "submit":
                ticket = Ticket(**message[2])
                ticket.id = message[1]
                tickets[ticket.id] = ticket
                try:
                    scheduler.submit(ticket)
                except (Overloaded, ValueError) as e:  # the front admitted it: only a disagreement about capacity
                    send(("events", [(ticket.id, [("error", None, str(e))])]))
            elif kind == "cancel" and message[1] in tickets:
                scheduler.cancel(tickets.pop(message[1]))
            elif kind == "stop_row" and message[1] in tickets:
                scheduler.stop_row(tickets[message[1]], message[2])
            elif kind in ("drain", "end_running"):
                getattr(scheduler, kind)(message[1])
            elif kind == "shutdown":
                break
            if len(tickets) > 4 * scheduler.max_rows:  # forget finished tickets (ids are never reused)
                for ticket_id in [i for i, t in tickets.items() if t.rows_left == 0]:
                    del tickets[ticket_id]
    except (EOFError, OSError):  # the front went away
        pass
    scheduler.shutdown()


class WorkerReplica:
    """The front's handle on one worker process (see the module docstring)."""

    def __init__(self, spec, max_running_requests, max_queued_requests):
        self.name, self.spec = spec["name"], dict(spec, max_running_requests=max_running_requests)
        self.max_running_requests, self.max_queued_requests = max_running_requests, max_queued_requests
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no CUDA state inherited
        commands_out, self._commands = context.Pipe(duplex=False)
        self._events, events_in = context.Pipe(duplex=False)
        self._process = context.Process(target=_worker_main, args=(self.spec, commands_out, events_in), daemon=True,
                                        name=f"nanochat-{self.name}")
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._tickets = OrderedDict()  # id -> ticket, in submission order, until every row has finished
        self._next_id = 0
        self._status = {"rows_in_use": 0, "queued": 0, "counters": {"generated_tokens": 0}, "drafted": 0, "accepted": 0}
        self.alive = False
        self._stopping = False  # shutdown() was called: the worker's exit is expected
        self.seconds_per_request = 2.0  # running average of finished requests, for Retry-After
        self.device = self.context_len = self.max_rows = None

    def start(self):
        """Start the process (it loads its model meanwhile: start every replica, then wait_ready each)."""
        self._process.start()

    def wait_ready(self):
        """Wait until the worker has loaded its model; raises RuntimeError if it could not."""
        if not self._events.poll(READY_TIMEOUT_SECONDS):
            self._process.kill()
            raise RuntimeError(f"{self.name}: the worker did not load its model in {READY_TIMEOUT_SECONDS} s")
        try:
            kind, info = self._events.recv()
        except EOFError:
            raise RuntimeError(f"{self.name}: the worker process exited while loading (exit code "
                               f"{self._process.exitcode}); see its log above") from None
        if kind == "failed":
            raise RuntimeError(f"{self.name}: {info}")
        self.device, self.context_len, self.max_rows = info["device"], info["context_len"], info["max_rows"]
        self.alive = True
        threading.Thread(target=self._read, name=f"{self.name}-events", daemon=True).start()

    # ------------------------------------------------------------------ the Scheduler interface of the app

    def submit(self, ticket):
        if ticket.num_rows > self.max_rows:
            raise ValueError(f"{ticket.num_rows} sequences exceed --max-batch-size {self.max_rows}")
        with self._lock:
            if not self.alive:
                raise Overloaded(5)
            if self._queued(extra=ticket) > self.max_queued_requests:
                raise Overloaded.of(self, self._queued())
            ticket.id, self._next_id = self._next_id, self._next_id + 1
            ticket.started_at = time.monotonic()
            self._tickets[ticket.id] = ticket
        self._send(("submit", ticket.id, ticket.spec()))

    def cancel(self, ticket):
        ticket.cancel()
        with self._lock:
            outstanding = self._tickets.pop(getattr(ticket, "id", None), None) is not None
        if outstanding:
            self._send(("cancel", ticket.id))

    def stop_row(self, ticket, row):
        ticket.stop_row(row)
        self._send(("stop_row", ticket.id, row))

    def wake(self):
        pass  # commands wake the worker themselves

    def drain(self, message="the server is shutting down"):
        with self._lock:
            self.max_queued_requests = -1  # submit() refuses from now on
        self._send(("drain", message))

    def end_running(self, message="the server is shutting down"):
        self._send(("end_running", message))

    @property
    def pid(self):
        return self._process.pid

    def rows_in_use(self):
        return self._status["rows_in_use"]

    def queued(self, extra=None):
        with self._lock:
            return self._queued(extra)

    def load(self):
        with self._lock:
            return sum(t.rows_left for t in self._tickets.values())

    @property
    def counters(self):
        return self._status["counters"]

    def speculative_counts(self):
        return self._status["drafted"], self._status["accepted"]

    def shutdown(self):
        self._stopping = True
        if self._process.is_alive():
            self._send(("shutdown",))
            self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.kill()

    # ------------------------------------------------------------------ internals

    def _queued(self, extra=None):
        """The scheduler's rule over this front's outstanding tickets (the running ones come first)."""
        tickets = [*self._tickets.values(), *([extra] if extra else [])]
        return count_queued([t.rows_left for t in tickets], self.max_rows, self.max_running_requests)

    def _send(self, message):
        try:
            with self._send_lock:  # the event loop and the shutdown timer both send
                self._commands.send(message)
        except (OSError, ValueError):  # the worker is gone: _read fails its tickets
            pass

    def _read(self):
        """Thread: deliver each step's events to the tickets' event loops, keep the status, detect a dead worker."""
        try:
            while True:
                message = self._events.recv()
                if message[0] == "step":
                    self._status = message[2]
                self._deliver(message[1])
        except (EOFError, OSError):
            pass
        with self._lock:
            self.alive = False
            orphans, self._tickets = list(self._tickets.values()), OrderedDict()
            self._status = dict(self._status, rows_in_use=0, queued=0)
        if self._stopping and not orphans:
            logger.info(f"{self.name}: the worker process stopped")
        else:
            logger.error(f"{self.name}: the worker process exited (code {self._process.exitcode}); "
                         f"{len(orphans)} request(s) failed")
        for ticket in orphans:
            ticket.send([("error", None, "the replica's worker process exited")])

    def _deliver(self, items):
        for ticket_id, events in items:
            with self._lock:
                ticket = self._tickets.get(ticket_id)
                if ticket is None:  # cancelled: the client is gone
                    continue
                ticket.rows_left -= sum(kind == "finish" for kind, _, _ in events)
                if ticket.rows_left <= 0 or any(kind == "error" for kind, _, _ in events):
                    del self._tickets[ticket_id]
                    seconds = time.monotonic() - ticket.started_at
                    self.seconds_per_request = 0.9 * self.seconds_per_request + 0.1 * seconds
            ticket.send(events)


def default_cpu_threads(workers):
    """Torch threads per CPU worker: the cores but one (the front's), shared out."""
    return max(1, ((os.cpu_count() or 2) - 1) // workers)
