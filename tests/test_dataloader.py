"""Tests for nanochat/dataloader.py on tiny shards and a byte-level stand-in tokenizer."""

import gc
import json
import random
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat.dataloader import DataLoader, make_train_loader, make_val_loader, merge_state_dicts

BOS = 256
B, T = 4, 64
SMALL = dict(buffer_docs=16, tokenizer_batch_size=8, tokenizer_threads=1)  # small buffer: refills often


class ByteTokenizer:
    """Stand-in with the real tokenizer's encode/get_bos_token_id signature: one token per UTF-8 byte."""

    def get_bos_token_id(self):
        return BOS

    def encode(self, texts, prepend=None, num_threads=1):
        assert prepend in ("<|bos|>", BOS) and num_threads >= 1
        return [[BOS] + list(t.encode("utf-8")) for t in texts]


class FailingTokenizer(ByteTokenizer):
    def __init__(self, fail_on_call):
        self.calls, self.fail_on_call = 0, fail_on_call

    def encode(self, texts, prepend=None, num_threads=1):
        self.calls += 1
        if self.calls >= self.fail_on_call:
            raise RuntimeError("boom in the tokenizer")
        return super().encode(texts, prepend, num_threads)


@pytest.fixture
def docs(tmp_path, monkeypatch):
    """3 shards x 3 row groups x 20 docs; shards 0-1 are train (global row groups 0..5), shard 2 is val.
    Every doc is '<shard>-<group>-<i>:' + filler of 5..90 chars, so some do not fit a row of T+1 = 65."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.delenv("NANOCHAT_DATA_DIR", raising=False)
    data_dir = tmp_path / "base_data"
    data_dir.mkdir()
    rng, by_id = random.Random(0), {}
    for s in range(3):
        texts = []
        for g in range(3):
            for i in range(20):
                doc_id = f"{s}-{g}-{i}"
                by_id[doc_id] = f"{doc_id}:" + "abcdefgh"[i % 8] * rng.randint(5, 90)
                texts.append(by_id[doc_id])
        pq.write_table(pa.table({"text": texts}), data_dir / f"shard_{s:05d}.parquet", row_group_size=20)
    return by_id


def segments(row):
    """Split a row of token ids into documents at BOS tokens -> list of (doc_id, text)."""
    starts = [i for i, t in enumerate(row) if t == BOS]
    assert starts and starts[0] == 0
    out = []
    for a, b in zip(starts, starts[1:] + [len(row)]):
        text = bytes(row[a + 1:b]).decode()
        out.append((text.split(":")[0], text))
    return out


def batch_rows(x, y):
    """Full rows of T+1 tokens from inputs and targets."""
    return torch.cat([x, y[:, -1:]], dim=1).tolist()


def assert_batches_equal(a, b):
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_shapes_bos_and_shift(docs):
    loader = DataLoader(ByteTokenizer(), B, T, "train", [0], 1, **SMALL)
    for _ in range(5):
        x, y = next(loader)
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64 and x.device.type == "cpu"
        assert (x[:, 0] == BOS).all()  # every row starts at a document start
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    loader.close()


def consumed_docs(state, stream_id=0):
    """Ids of the documents a 1-stream loader has packed so far, from its state: everything before the
    reader cursor minus what is still buffered (first epoch only: position k is global row group k)."""
    st = state["streams"][str(stream_id)]
    read = {f"{k // 3}-{k % 3}-{i}" for k in range(st["next_pos"] + 1)
            for i in range(20 if k < st["next_pos"] else st["next_doc"])}
    buffered = {f"{k // 3}-{k % 3}-{i}" for k, ids in st["buffer"] for i in ids}
    return read - buffered


def test_rows_hold_whole_documents_and_one_cropped_tail(docs):
    loader = DataLoader(ByteTokenizer(), B, T, "train", [0], 1, **SMALL)
    whole, tails = [], []
    for _ in range(8):  # < 1 epoch (6 row groups x 20 docs)
        for row in batch_rows(*next(loader)):
            segs = segments(row)
            for doc_id, text in segs[:-1]:
                assert text == docs[doc_id]  # no token lost inside a row
                whole.append(doc_id)
            tails.append(segs[-1][1])  # only the last document of a row may be cropped
    consumed = consumed_docs(loader.state_dict())
    assert len(whole) == len(set(whole)) and set(whole) <= consumed  # no document twice within an epoch
    assert len(whole) + len(tails) == len(consumed)
    tail_docs = [docs[d] for d in consumed - set(whole)]
    for tail in tails:
        assert any(doc.startswith(tail) for doc in tail_docs)
    # tokens of the packed documents (+1 BOS each) minus tokens placed in rows = tokens cropped
    placed = 8 * B * (T + 1)
    cropped = sum(len(docs[d]) + 1 for d in consumed) - placed
    assert loader.stats()["cropped_tokens"] == cropped > 0
    assert loader.stats()["batches"] == 8 and loader.stats()["epoch"] == 0
    loader.close()


def test_best_fit_prefers_whole_documents(docs):
    # with a big buffer, most rows should end with an exactly fitting document rather than a crop
    loader = DataLoader(ByteTokenizer(), B, T, "train", [0], 1, buffer_docs=60, tokenizer_batch_size=8)
    for _ in range(4):
        next(loader)
    stats = loader.stats()
    assert stats["cropped_tokens"] < 0.2 * stats["tokens"]
    loader.close()


def test_streams_match_across_process_counts(docs):
    # 1 process x 2 accumulation steps == 2 processes x 1 step, batch by batch
    tok = ByteTokenizer()
    single = make_train_loader(tok, B, T, world_size=1, rank=0, grad_accum_steps=2, device="cpu", **SMALL)
    ranks = [make_train_loader(tok, B, T, world_size=2, rank=r, grad_accum_steps=1, device="cpu", **SMALL)
             for r in range(2)]
    manual = DataLoader(tok, B, T, "train", [0, 1], 2, **SMALL)
    for _ in range(12):  # crosses into the second epoch
        for r in range(2):
            a, b, c = next(single), next(ranks[r]), next(manual)
            assert_batches_equal(a, b)
            assert_batches_equal(a, c)
    assert manual.stats()["epoch"] == 1  # documents repeat: base_train says so
    for loader in [single, manual, *ranks]:
        loader.close()


def test_ranks_read_disjoint_row_groups(docs):
    tok = ByteTokenizer()
    groups = []
    for r in range(2):
        loader = make_train_loader(tok, B, T, world_size=2, rank=r, grad_accum_steps=1, device="cpu", **SMALL)
        ids = {d for _ in range(3) for row in batch_rows(*next(loader)) for d, text in segments(row) if ":" in text}
        groups.append({3 * int(d.split("-")[0]) + int(d.split("-")[1]) for d in ids})  # global row group
        loader.close()
    assert groups[0] <= {0, 2, 4} and groups[1] <= {1, 3, 5}  # stream s reads s, s+2, s+4


@pytest.mark.parametrize("stream_ids,num_streams,k", [([0], 1, 0), ([0], 1, 3), ([0], 1, 13), ([0], 1, 30),
                                                      ([0, 1], 2, 5), ([1, 3], 4, 2)])
def test_resume_is_exact(docs, stream_ids, num_streams, k):
    tok, m = ByteTokenizer(), 6
    reference = DataLoader(tok, B, T, "train", stream_ids, num_streams, **SMALL)
    expected = [next(reference) for _ in range(k + m)][k:]
    reference.close()

    first = DataLoader(tok, B, T, "train", stream_ids, num_streams, **SMALL)
    for _ in range(k):
        next(first)
    time.sleep(0.05)  # let the prefetch thread run ahead: the state must still be "after batch k"
    state = json.loads(json.dumps(first.state_dict()))
    first.close()
    text = json.dumps(state)
    assert len(text) < 2000  # ids and cursors, no tokens

    resumed = DataLoader(tok, B, T, "train", stream_ids, num_streams, resume_state=state, **SMALL)
    for batch in expected:
        assert_batches_equal(next(resumed), batch)
    resumed.close()


def test_resume_from_two_ranks_in_one_process(docs):
    tok = ByteTokenizer()
    single = make_train_loader(tok, B, T, 1, 0, 2, "cpu", **SMALL)
    expected = [next(single) for _ in range(10)][6:]
    single.close()
    states = []
    for r in range(2):
        loader = make_train_loader(tok, B, T, 2, r, 1, "cpu", **SMALL)
        for _ in range(3):
            next(loader)
        states.append(loader.state_dict())
        loader.close()
    # a list of per-rank states (as base_train gathers them) or their merge both work
    for resume in (states, merge_state_dicts(states)):
        resumed = make_train_loader(tok, B, T, 1, 0, 2, "cpu", resume_state=resume, **SMALL)
        for batch in expected:
            assert_batches_equal(next(resumed), batch)
        resumed.close()


def test_resume_state_must_match(docs):
    tok = ByteTokenizer()
    loader = DataLoader(tok, B, T, "train", [0], 2, **SMALL)
    next(loader)
    state = loader.state_dict()
    loader.close()
    with pytest.raises(ValueError, match="num_streams"):
        DataLoader(tok, B, T, "train", [0], 3, resume_state=state, **SMALL)
    with pytest.raises(ValueError, match="no entry for streams"):
        DataLoader(tok, B, T, "train", [1], 2, resume_state=state, **SMALL)


def test_thread_exception_reaches_consumer(docs):
    for fail_on_call in (1, 4):
        loader = DataLoader(FailingTokenizer(fail_on_call), B, T, "train", [0], 1, **SMALL)
        with pytest.raises(RuntimeError, match="boom in the tokenizer"):
            for _ in range(100):
                next(loader)
        with pytest.raises(RuntimeError, match="boom"):
            next(loader)  # still an error, not a silent end
        assert not loader._thread.is_alive()


def test_val_loader_terminates(docs):
    tok = ByteTokenizer()
    counts = []
    for r in range(2):
        loader = make_val_loader(tok, B, T, world_size=2, rank=r, device="cpu", **SMALL)
        batches = list(loader)  # must end
        counts.append(len(batches))
        for x, y in batches:
            for row in batch_rows(x, y):
                assert all(t.startswith("2-") or "2-".startswith(t) for _, t in segments(row))  # only the val shard
        with pytest.raises(StopIteration):
            next(loader)
    assert all(c > 0 for c in counts)


def test_close_and_drop_stop_the_thread(docs):
    loader = DataLoader(ByteTokenizer(), B, T, "train", [0], 1, prefetch_batches=1, **SMALL)
    next(loader)
    thread = loader._thread
    loader.close()
    assert not thread.is_alive()
    with pytest.raises(StopIteration):
        next(loader)

    loader = DataLoader(ByteTokenizer(), B, T, "train", [0], 1, prefetch_batches=1, **SMALL)
    next(loader)
    thread = loader._thread
    del loader
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_bad_arguments_and_missing_shards(docs, tmp_path, monkeypatch):
    tok = ByteTokenizer()
    with pytest.raises(ValueError):
        DataLoader(tok, B, T, "train", [2], 2)
    with pytest.raises(ValueError):
        DataLoader(tok, B, T, "train", [0, 0], 2)
    with pytest.raises(ValueError):
        DataLoader(tok, 0, T, "train", [0], 1)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="--local"):
        DataLoader(tok, B, T, "train", [0], 1)
