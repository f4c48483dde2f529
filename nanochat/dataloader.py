"""
The pretraining dataloader: parquet row groups -> tokens -> (inputs, targets) batches of shape (B, T).

Streams. The row groups of a split are dealt to `num_streams` streams: position k of stream s is the
global row group (s + k * num_streams) % R (R = row groups in the split), so stream s reads row groups
s, s+N, s+2N, ... and, for train, wraps around into the next epoch forever. A training run uses
N = world_size * grad_accum_steps = total_batch_size / (B*T) streams and micro-step a of rank r takes its
batch from stream a * world_size + r. N does not depend on how many processes there are, so an optimizer
step sees exactly the same N*B*T tokens on 1 process with 8 accumulation steps as on 8 processes with 1;
only which process computes which micro-batch changes. Ranks own disjoint streams and never read the
same row group within an epoch (unless R < N, which a warning points out).
The val split is read once: every stream reads ceil(R/N) positions (the last few may wrap to row groups
another stream also reads) so that every rank gets some validation data, then the loader stops.

Packing (BOS-aligned best fit). Every row of T+1 tokens starts with the BOS token of a document, and
holds whole documents plus at most one cropped document at its end. This way every token in a row can
attend back to the start of its document (no row begins mid-document without the context that explains
it) and no document fragment continues into the next row, where it would sit with no beginning. To
waste little, each slot is filled by best fit from a buffer of ~buffer_docs tokenized documents: the
longest document that fits the space left; when none fits, the shortest one is cropped to the space
left (its tail is discarded and counted in cropped_tokens).

Prefetch. A daemon thread reads, tokenizes (tokenizer.encode(docs, num_threads=tokenizer_threads) on
tokenizer_batch_size documents at a time) and packs batches into a bounded queue, so the training loop
does not wait on the CPU. An exception in the thread is re-raised by next(); close() (or dropping the
loader) stops the thread.

Exact resume. state_dict() holds no tokens: for each stream, the reader cursor (next_pos, next_doc) and
the ids (position, document index) of the documents still in its buffer. A loader built with that state
re-reads and re-tokenizes those documents and yields exactly the batches the old loader would have
yielded next (given the same shards, tokenizer, B, T, buffer_docs and tokenizer_batch_size).
"""

import bisect
import copy
import queue
import threading
import weakref
from array import array

import torch

from nanochat.common import print0
from nanochat.dataset import list_row_groups, read_row_group

STATE_VERSION = 1
_INF = float("inf")
_END = object()  # queue item: the (val) data is exhausted


class _Failure:
    """Queue item carrying an exception from the prefetch thread to the consumer."""

    def __init__(self, error):
        self.error = error


class _Stream:
    """One stream of documents, its buffer of tokenized documents, and the packing of rows."""

    def __init__(self, stream_id, num_streams, row_groups, split, tokenizer, T, buffer_docs,
                 tokenizer_threads, tokenizer_batch_size, state=None):
        self.stream_id, self.num_streams, self.row_groups = stream_id, num_streams, row_groups
        # train: positions 0, 1, 2, ... forever; val: ceil(R / N) positions, the same for every stream
        self.num_positions = None if split == "train" else -(-len(row_groups) // num_streams)
        self.tokenizer, self.bos = tokenizer, tokenizer.get_bos_token_id()
        self.T, self.buffer_docs = T, buffer_docs
        self.tokenizer_threads, self.tokenizer_batch_size = tokenizer_threads, tokenizer_batch_size
        self.pos, self.doc = 0, 0  # reader cursor: the next document to read is `doc` of position `pos`
        self.keys = []             # sorted (num_tokens, pos, doc) of the buffered documents
        self.tokens = {}           # (pos, doc) -> array('i') of token ids, BOS first
        self.batches, self.cropped = 0, 0
        self.pending = None        # buffer of a resume state, rebuilt in the thread before the first batch
        self._cache = (None, None)  # (pos, texts) of the last row group read
        if state is not None:
            self.pos, self.doc = state["next_pos"], state["next_doc"]
            self.batches, self.cropped = state["batches"], state["cropped_tokens"]
            self.pending = state["buffer"]

    def _texts(self, pos):
        if self._cache[0] != pos:
            path, index, _ = self.row_groups[(self.stream_id + pos * self.num_streams) % len(self.row_groups)]
            self._cache = (pos, read_row_group(path, index))
        return self._cache[1]

    def _read(self, n):
        """Up to n ((pos, doc), text) from the cursor on; fewer only at the end of the val split."""
        out, empty_positions = [], 0
        while len(out) < n:
            if self.num_positions is not None and self.pos >= self.num_positions:
                break
            texts = self._texts(self.pos)
            take = texts[self.doc:self.doc + n - len(out)]
            out.extend(((self.pos, self.doc + i), text) for i, text in enumerate(take))
            self.doc += len(take)
            if self.doc >= len(texts):
                self.pos, self.doc = self.pos + 1, 0
            empty_positions = 0 if take else empty_positions + 1
            if empty_positions > len(self.row_groups):
                raise ValueError("the train split has no documents: every row group is empty")
        return out

    def _add(self, items):
        """Tokenize ((pos, doc), text) items and put them in the buffer."""
        texts = [text for _, text in items]
        for start in range(0, len(texts), self.tokenizer_batch_size):
            chunk = texts[start:start + self.tokenizer_batch_size]
            encoded = self.tokenizer.encode(chunk, prepend="<|bos|>", num_threads=self.tokenizer_threads)
            for (key, _), ids in zip(items[start:start + len(chunk)], encoded):
                if not ids or ids[0] != self.bos:
                    raise ValueError(f"tokenizer.encode(..., prepend='<|bos|>') did not start a document "
                                     f"with the BOS token ({self.bos})")
                bisect.insort(self.keys, (len(ids), *key))
                self.tokens[key] = array("i", ids)

    def _refill(self):
        while len(self.tokens) < self.buffer_docs:
            items = self._read(self.tokenizer_batch_size)
            if not items:
                return
            self._add(items)

    def _restore(self):
        """Re-read and re-tokenize the documents a resume state had in its buffer."""
        for pos, docs in self.pending:
            texts = self._texts(pos)
            if docs and docs[-1] >= len(texts):
                raise ValueError(f"resume state names document {docs[-1]} of stream {self.stream_id} position {pos}, "
                                 f"but that row group has {len(texts)}: the shards changed since the state was saved")
            self._add([((pos, d), texts[d]) for d in docs])
        self.pending = None

    def _take(self, space):
        """Best fit: the longest buffered document of <= space tokens (the earliest read among equals);
        if none fits, the shortest one, which loses the fewest tokens to cropping."""
        i = bisect.bisect_right(self.keys, (space, _INF, _INF)) - 1
        i = bisect.bisect_left(self.keys, (self.keys[i][0], -1, -1)) if i >= 0 else 0
        _, pos, doc = self.keys.pop(i)
        return self.tokens.pop((pos, doc))

    def _row(self):
        """T+1 tokens starting at a document's BOS, or None when the documents ran out (val)."""
        row, space = array("i"), self.T + 1
        while space > 0:
            self._refill()
            if not self.keys:
                return None
            ids = self._take(space)
            if len(ids) > space:
                self.cropped += len(ids) - space
                ids = ids[:space]
            row.extend(ids)
            space -= len(ids)
        return row

    def next_batch(self, B):
        """(B*(T+1) token ids as array('i'), state after this batch), or None at the end of the data."""
        if self.pending is not None:
            self._restore()
        rows = array("i")
        for _ in range(B):
            row = self._row()
            if row is None:
                return None
            rows.extend(row)
        self.batches += 1
        return rows, self.snapshot()

    def snapshot(self):
        """This stream's resume state (see DataLoader.state_dict)."""
        buffer = []
        for pos, doc in sorted(self.tokens):
            if buffer and buffer[-1][0] == pos:
                buffer[-1][1].append(doc)
            else:
                buffer.append([pos, [doc]])
        return {"next_pos": self.pos, "next_doc": self.doc, "buffer": buffer,
                "batches": self.batches, "cropped_tokens": self.cropped}


def _put(q, stop, item):
    """queue.put that gives up when the loader is closed (so the thread never blocks forever)."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            pass
    return False


def _produce(streams, start, B, pin, q, stop):
    """The prefetch thread: batches from the streams in round-robin order. It holds no reference to the
    DataLoader, so dropping the loader lets the finalizer stop the thread."""
    try:
        i = start
        while not stop.is_set():
            result = streams[i].next_batch(B)
            if result is None:
                _put(q, stop, _END)
                return
            rows, snapshot = result
            batch = torch.frombuffer(rows, dtype=torch.int32).view(B, -1).long()  # (B, T+1)
            inputs, targets = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()  # (B, T) each
            if pin:
                inputs, targets = inputs.pin_memory(), targets.pin_memory()
            if not _put(q, stop, (i, inputs, targets, snapshot)):
                return
            i = (i + 1) % len(streams)
    except BaseException as e:  # re-raised by DataLoader.__next__, never swallowed
        _put(q, stop, _Failure(e))


def merge_state_dicts(states):
    """One state holding the streams of several ranks' state_dict()s (e.g. gathered with all_gather_object)."""
    states = [s for s in states if s is not None]
    if not states:
        return None
    merged = copy.deepcopy(states[0])
    for s in states[1:]:
        for key in ("version", "split", "num_streams", "num_row_groups"):
            if s[key] != merged[key]:
                raise ValueError(f"cannot merge loader states with different {key}: {s[key]} vs {merged[key]}")
        merged["streams"].update(copy.deepcopy(s["streams"]))
    return merged


def _resume_entries(resume_state, split, num_streams, num_row_groups, stream_ids, packing):
    """Check a resume state (a dict, or a list of per-rank dicts) against this loader; entries by stream id."""
    state = merge_state_dicts(resume_state) if isinstance(resume_state, (list, tuple)) else resume_state
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"unknown dataloader state version {state.get('version')} (this code writes {STATE_VERSION})")
    expected = {"split": split, "num_streams": num_streams, "num_row_groups": num_row_groups}
    for key, value in expected.items():
        if state[key] != value:
            raise ValueError(f"dataloader state has {key}={state[key]} but this loader has {key}={value}: "
                             f"resume needs the same shards and total_batch_size / (B*T)")
    missing = [s for s in stream_ids if str(s) not in state["streams"]]
    if missing:
        have = sorted(state["streams"], key=int)
        raise ValueError(f"dataloader state has no entry for streams {missing} (it has {have})")
    if state.get("packing") != packing:
        print0(f"warning: resuming the dataloader with {packing} instead of {state.get('packing')}: "
               f"the data continues where it stopped but batches differ from an uninterrupted run")
    return [copy.deepcopy(state["streams"][str(s)]) for s in stream_ids]


class DataLoader:
    """
    Iterate to get (inputs, targets), each (B, T) int64 on `device`; targets are inputs shifted by one.
    The loader serves its streams in turn: batch i comes from stream_ids[i % len(stream_ids)].
    """

    def __init__(self, tokenizer, B, T, split, stream_ids, num_streams, device="cpu", tokenizer_threads=4,
                 tokenizer_batch_size=128, buffer_docs=1000, resume_state=None, prefetch_batches=4, data_dir=None):
        stream_ids = list(stream_ids)
        if min(B, T, tokenizer_threads, tokenizer_batch_size, buffer_docs, prefetch_batches) < 1:
            raise ValueError("B, T, tokenizer_threads, tokenizer_batch_size, buffer_docs and prefetch_batches "
                             "must be >= 1")
        if not stream_ids or len(set(stream_ids)) != len(stream_ids) or not set(stream_ids) <= set(range(num_streams)):
            raise ValueError(f"stream_ids must be distinct ids in [0, {num_streams}), got {stream_ids}")
        self.B, self.T, self.split = B, T, split
        self.stream_ids, self.num_streams = stream_ids, num_streams
        self.device = torch.device(device)
        row_groups = list_row_groups(split, data_dir)
        self.num_row_groups = len(row_groups)
        if split == "train" and self.num_row_groups < num_streams:
            print0(f"warning: the train split has {self.num_row_groups} row groups for {num_streams} streams: "
                   f"some streams read the same row groups in the same epoch (import smaller row groups)")
        self.packing = {"B": B, "T": T, "buffer_docs": buffer_docs, "tokenizer_batch_size": tokenizer_batch_size}
        entries = [None] * len(stream_ids)
        if resume_state is not None:
            entries = _resume_entries(resume_state, split, num_streams, self.num_row_groups, stream_ids, self.packing)
        self._streams = [_Stream(s, num_streams, row_groups, split, tokenizer, T, buffer_docs, tokenizer_threads,
                                 tokenizer_batch_size, e) for s, e in zip(stream_ids, entries)]
        # the consumer's view of each stream: the state right after the last batch it handed out
        self._snapshots = {s: e if e is not None else st.snapshot()
                           for s, e, st in zip(stream_ids, entries, self._streams)}
        self._queue = queue.Queue(maxsize=prefetch_batches)
        self._stop = threading.Event()
        self._thread, self._finished, self._error = None, False, None
        weakref.finalize(self, self._stop.set)

    def _start(self):
        # round robin resumes at the first stream that has handed out fewer batches than the one before it
        counts = [self._snapshots[s]["batches"] for s in self.stream_ids]
        start = counts.index(min(counts))
        pin = self.device.type == "cuda"
        self._thread = threading.Thread(target=_produce, daemon=True, name="nanochat-dataloader",
                                        args=(self._streams, start, self.B, pin, self._queue, self._stop))
        self._thread.start()

    def _get(self):
        while True:
            try:
                return self._queue.get(timeout=0.5)
            except queue.Empty:
                if not self._thread.is_alive():
                    try:
                        return self._queue.get_nowait()
                    except queue.Empty:
                        raise RuntimeError("the dataloader thread stopped without a batch (was the loader closed?)")

    def __iter__(self):
        return self

    def __next__(self):
        if self._error is not None:
            raise self._error
        if self._finished:
            raise StopIteration
        if self._thread is None:
            self._start()
        item = self._get()
        if item is _END or isinstance(item, _Failure):
            self.close()
            if item is _END:
                raise StopIteration
            self._error = item.error
            raise item.error
        i, inputs, targets, snapshot = item
        self._snapshots[self.stream_ids[i]] = snapshot
        if self.device.type == "cuda":  # pinned host memory: the copy overlaps with compute
            return inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
        return inputs.to(self.device), targets.to(self.device)

    def close(self):
        """Stop the prefetch thread. The loader ends (StopIteration) afterwards."""
        self._finished = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        while not self._queue.empty():
            self._queue.get_nowait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def state_dict(self):
        """
        JSON-serializable resume state as of the last batch handed out (prefetched batches don't count):
          version, split, num_streams, num_row_groups (must match on resume),
          packing: {B, T, buffer_docs, tokenizer_batch_size} (a mismatch resumes, but not batch-exactly),
          streams: {"<stream id>": {
              next_pos, next_doc: the next document to read is row `next_doc` of the stream's position
                                  next_pos, i.e. of global row group (stream + next_pos * num_streams) % num_row_groups,
              buffer: [[pos, [doc, doc, ...]], ...] documents read but not yet packed, by position and row,
              batches: batches this stream has produced, cropped_tokens: tokens lost to cropping}}
        """
        return {"version": STATE_VERSION, "split": self.split, "num_streams": self.num_streams,
                "num_row_groups": self.num_row_groups, "packing": dict(self.packing),
                "streams": {str(s): copy.deepcopy(self._snapshots[s]) for s in self.stream_ids}}

    def stats(self):
        """Counters over this loader's streams, as of the last batch handed out."""
        snaps = [self._snapshots[s] for s in self.stream_ids]
        epochs = [(s + snap["next_pos"] * self.num_streams) // self.num_row_groups
                  for s, snap in zip(self.stream_ids, snaps)]
        return {"batches": sum(x["batches"] for x in snaps), "cropped_tokens": sum(x["cropped_tokens"] for x in snaps),
                "tokens": sum(x["batches"] for x in snaps) * self.B * self.T,
                "epoch": max(epochs)}  # the furthest stream's: its documents are the first to repeat


def make_train_loader(tokenizer, B, T, world_size, rank, grad_accum_steps, device, **kw):
    """Rank `rank`'s train loader: streams rank, rank + world_size, ... (micro-step a -> stream a*world_size + rank)."""
    stream_ids = [a * world_size + rank for a in range(grad_accum_steps)]
    return DataLoader(tokenizer, B, T, "train", stream_ids, world_size * grad_accum_steps, device=device, **kw)


def make_val_loader(tokenizer, B, T, world_size, rank, device, **kw):
    """Rank `rank`'s val loader: one stream per rank, one pass over the val shard, then StopIteration."""
    return DataLoader(tokenizer, B, T, "val", [rank], world_size, device=device, **kw)
