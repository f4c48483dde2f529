"""Tests for nanochat/dataset.py: local import, shard iteration, errors, and the (mocked) download."""

import gzip
import io
import json
import os
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests

from nanochat import dataset, fallback_corpus
from nanochat.common import read_jsonl


@pytest.fixture
def base_dir(tmp_path, monkeypatch):
    base = tmp_path / "base"
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    monkeypatch.delenv("NANOCHAT_DATA_DIR", raising=False)
    return base


def shard_texts(path):
    return pq.read_table(path).column("text").to_pylist()


def write_parquet(path, texts, row_group_size=None):
    pq.write_table(pa.table({"text": texts}), path, row_group_size=row_group_size)


def parquet_bytes(texts):
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": texts}), buf)
    return buf.getvalue()


# -----------------------------------------------------------------------------
# local import

def test_import_txt_jsonl_parquet(base_dir, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("Para one line1\nline2\n\n\nPara two\n  \nPara three\n")
    lines = [json.dumps({"text": "json doc 1"}), json.dumps({"id": 3}), "not json", json.dumps({"text": ""}),
             "", json.dumps({"text": "json doc 2"})]
    (src / "sub" / "b.jsonl").write_text("\n".join(lines) + "\n")
    write_parquet(src / "sub" / "c.parquet", ["pq doc 1", None, "pq doc 2"])
    (src / "ignored.csv").write_text("a,b\n")

    summary = dataset.import_local([str(src)])
    assert summary["files"] == 3
    assert summary["skipped_lines"] == 4  # no text field, bad json, empty text, null parquet value
    assert summary["shards"] == 2
    expected = {"Para one line1\nline2\n\nPara two\n\nPara three", "json doc 1", "json doc 2", "pq doc 1", "pq doc 2"}
    assert summary["docs"] == len(expected)

    paths = dataset.list_parquet_files()
    assert [os.path.basename(p) for p in paths] == ["shard_00000.parquet", "shard_00001.parquet"]
    train = [t for batch in dataset.parquets_iter_batched("train") for t in batch]
    val = [t for batch in dataset.parquets_iter_batched("val") for t in batch]
    assert val == shard_texts(paths[-1])  # the last shard is the validation split
    assert train == shard_texts(paths[0])
    assert set(train) | set(val) == expected and not set(train) & set(val)


def test_txt_paragraph_packing():
    text = "a" * 10 + "\r\n\r\n" + "b" * 10 + "\n \n\n" + "c" * 10 + "\n\n" + "d" * 50
    docs = dataset.split_into_documents(text, doc_chars=30)
    assert docs == ["a" * 10 + "\n\n" + "b" * 10, "c" * 10, "d" * 30, "d" * 20]
    assert all(len(d) <= 30 for d in docs)
    # long paragraphs are cut at line breaks / spaces when there is one in the second half of the window
    words = " ".join(["word"] * 40)
    pieces = dataset.split_into_documents(words, doc_chars=50)
    assert all(len(p) <= 50 for p in pieces) and " ".join(pieces) == words


def test_endoftext_marker_ends_documents():
    text = "story one\n<|endoftext|>\nstory two\n\nmore of two<|endoftext|>"
    assert dataset.split_into_documents(text, doc_chars=100) == ["story one", "story two\n\nmore of two"]


def test_long_jsonl_documents_are_capped(base_dir, tmp_path):
    src = tmp_path / "long.jsonl"
    long_text = "\n\n".join(f"paragraph {i} " + "x" * 80 for i in range(20))
    src.write_text(json.dumps({"text": long_text}) + "\n" + json.dumps({"text": "short"}) + "\n")
    summary = dataset.import_local([str(src)], doc_chars=300)
    docs = [t for p in dataset.list_parquet_files() for t in shard_texts(p)]
    assert summary["docs"] == len(docs) > 2
    assert all(len(d) <= 300 for d in docs) and "short" in docs


def test_shards_row_groups_and_determinism(tmp_path):
    src = tmp_path / "src.txt"
    src.write_text("\n\n".join(f"paragraph number {i} " + "y" * (i % 50) for i in range(500)))
    out1, out2 = tmp_path / "o1", tmp_path / "o2"
    s1 = dataset.import_local([str(src)], data_dir=str(out1), doc_chars=200, shard_chars=8000, row_group_docs=16)
    s2 = dataset.import_local([str(src)], data_dir=str(out2), doc_chars=200, shard_chars=8000, row_group_docs=16)
    assert s1["shards"] >= 3 and s1["shards"] == s2["shards"]
    files1, files2 = dataset.list_parquet_files(str(out1)), dataset.list_parquet_files(str(out2))
    for p1, p2 in zip(files1, files2):
        assert shard_texts(p1) == shard_texts(p2)  # same seed, same shards
        meta = pq.read_metadata(p1)
        sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        assert max(sizes) <= 16 and max(sizes) - min(sizes) <= 1  # even row groups
    assert s1["row_groups"] == [pq.read_metadata(p).num_row_groups for p in files1]
    assert not [n for n in os.listdir(out1) if n.endswith(".tmp")]


def test_small_input_still_gives_two_shards(base_dir, tmp_path):
    src = tmp_path / "tiny.txt"
    src.write_text("first\n\nsecond")
    summary = dataset.import_local([str(src)], doc_chars=6)
    assert summary["shards"] == 2 and summary["docs"] == 2


def test_empty_or_single_document_input_refused(base_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("\n\n  \n")
    with pytest.raises(ValueError, match="no documents found"):
        dataset.import_local([str(empty)])
    with pytest.raises(SystemExit) as e:
        dataset.main(["--local", str(empty)])
    assert e.value.code == 2 and "no documents found" in capsys.readouterr().err
    one = tmp_path / "one.txt"
    one.write_text("just one paragraph")
    with pytest.raises(ValueError, match="at least 2 documents"):
        dataset.import_local([str(one)])
    with pytest.raises(FileNotFoundError):
        dataset.import_local([str(tmp_path / "missing")])


def test_import_refuses_to_mix_with_existing_shards(base_dir, tmp_path):
    src = tmp_path / "t.txt"
    src.write_text("one\n\ntwo\n\nthree")
    dataset.import_local([str(src)], doc_chars=5)
    with pytest.raises(ValueError, match="--overwrite"):
        dataset.import_local([str(src)], doc_chars=5)
    dataset.import_local([str(src)], doc_chars=5, overwrite=True)
    assert len(dataset.list_parquet_files()) == 2


def test_cli_local_prints_summary(base_dir, tmp_path, capsys):
    src = tmp_path / "t.txt"
    src.write_text("\n\n".join(f"para {i}" for i in range(10)))
    assert dataset.main(["--local", str(src), "--doc-chars", "20"]) == 0
    out = capsys.readouterr().out
    assert "imported" in out and "2 shards" in out and "1 val" in out


# -----------------------------------------------------------------------------
# reading shards

def test_no_shards_error_says_what_to_do(base_dir):
    for call in (lambda: next(dataset.parquets_iter_batched("train")), dataset.ensure_local_shards):
        with pytest.raises(FileNotFoundError) as e:
            call()
        msg = str(e.value)
        assert "python -m nanochat.dataset -n" in msg and "--local" in msg and "NANOCHAT_DATA_DIR" in msg


def test_list_ignores_partial_files(tmp_path):
    write_parquet(tmp_path / "shard_00001.parquet", ["b"])
    write_parquet(tmp_path / "shard_00000.parquet", ["a"])
    (tmp_path / "shard_00002.parquet.tmp").write_bytes(b"partial")
    (tmp_path / ".locks").mkdir()
    names = [os.path.basename(p) for p in dataset.list_parquet_files(str(tmp_path))]
    assert names == ["shard_00000.parquet", "shard_00001.parquet"]


def test_iter_start_step_and_split(tmp_path):
    # train = shards 0,1 (3 row groups each -> global row groups 0..5), val = shard 2
    for s in range(3):
        write_parquet(tmp_path / f"shard_{s:05d}.parquet", [f"s{s}g{g}d{d}" for g in range(3) for d in range(2)], 2)
    groups = list(dataset.parquets_iter_batched("train", start=1, step=2, data_dir=str(tmp_path)))
    assert groups == [["s0g1d0", "s0g1d1"], ["s1g0d0", "s1g0d1"], ["s1g2d0", "s1g2d1"]]
    val = list(dataset.parquets_iter_batched("val", data_dir=str(tmp_path)))
    assert [t[:2] for g in val for t in g] == ["s2"] * 6
    with pytest.raises(ValueError):
        next(dataset.parquets_iter_batched("test", data_dir=str(tmp_path)))


def test_ensure_local_shards_imports_the_mirror(base_dir, tmp_path, monkeypatch, capsys):
    mirror = tmp_path / "mirror"
    (mirror / "pretrain").mkdir(parents=True)
    (mirror / "pretrain" / "book.txt").write_text("\n\n".join(f"paragraph {i} " + "z" * 100 for i in range(200)))
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(mirror))
    paths = dataset.ensure_local_shards()
    assert len(paths) >= 2
    assert "NANOCHAT_DATA_DIR" in capsys.readouterr().out
    assert dataset.ensure_local_shards() == paths  # second call: nothing to do
    assert next(dataset.parquets_iter_batched("val"))


# -----------------------------------------------------------------------------
# download (requests mocked)

class FakeResponse:
    def __init__(self, data, status=200, break_after=None):
        self.data, self.status, self.break_after = data, status, break_after

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def raise_for_status(self):
        if self.status >= 400:
            raise requests.HTTPError(f"{self.status} error")

    def iter_content(self, chunk_size=1):
        for i in range(0, len(self.data), 64):
            if self.break_after is not None and i >= self.break_after:
                raise requests.ConnectionError("connection reset mid-download")
            yield self.data[i:i + 64]


def test_download_retries_then_renames_atomically(tmp_path, monkeypatch):
    good = parquet_bytes(["doc a", "doc b"])
    final = tmp_path / dataset.shard_filename(7)
    calls, sleeps = [], []

    def fake_get(url, stream, timeout):
        assert not final.exists()  # the shard appears only once it is complete
        calls.append(url)
        if len(calls) == 1:
            raise requests.ConnectionError("offline for a moment")
        if len(calls) == 2:
            return FakeResponse(good, break_after=128)  # partial download -> .tmp discarded
        return FakeResponse(good)

    monkeypatch.setattr(dataset.requests, "get", fake_get)
    monkeypatch.setattr(dataset.time, "sleep", sleeps.append)
    assert dataset.download_single_file(7, data_dir=str(tmp_path))
    assert calls == [f"{dataset.BASE_URL}/shard_00007.parquet"] * 3
    assert sleeps == [2.0, 4.0]  # exponential backoff
    assert shard_texts(final) == ["doc a", "doc b"]
    assert not (tmp_path / "shard_00007.parquet.tmp").exists()


def test_download_skips_existing(tmp_path, monkeypatch):
    write_parquet(tmp_path / dataset.shard_filename(0), ["already here"])

    def fake_get(*args, **kwargs):
        raise AssertionError("must not download a shard that is already present")

    monkeypatch.setattr(dataset.requests, "get", fake_get)
    assert dataset.download_single_file(0, data_dir=str(tmp_path))


def test_download_gives_up_with_offline_hint(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_get(url, **kwargs):
        calls.append(url)
        if len(calls) % 2:
            raise requests.ConnectionError("no route to host")
        return FakeResponse(b"<html>not a parquet file</html>")

    monkeypatch.setattr(dataset.requests, "get", fake_get)
    monkeypatch.setattr(dataset.time, "sleep", lambda s: None)
    assert not dataset.download_single_file(3, data_dir=str(tmp_path), max_attempts=4)
    assert len(calls) == 4
    err = capsys.readouterr().err
    assert "--local" in err and "NANOCHAT_DATA_DIR" in err
    assert dataset.list_parquet_files(str(tmp_path)) == []
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_concurrent_downloads_of_one_file_write_it_once(tmp_path, monkeypatch):
    calls = []

    def slow_get(url, **kwargs):
        calls.append(url)
        time.sleep(0.2)
        return FakeResponse(parquet_bytes(["x"]))

    monkeypatch.setattr(dataset.requests, "get", slow_get)
    results = []
    threads = [threading.Thread(target=lambda: results.append(dataset.download_single_file(5, data_dir=str(tmp_path))))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 3 and len(calls) == 1


def test_cli_download(base_dir, monkeypatch, capsys):
    monkeypatch.setattr(dataset.requests, "get", lambda url, **kw: FakeResponse(parquet_bytes([url[-20:]])))
    assert dataset.main(["-n", "3", "-w", "2"]) == 0
    assert len(dataset.list_parquet_files()) == 3
    assert dataset.main(["-n", "3"]) == 0  # everything present: nothing to do
    assert "3 of 3 shards already" in capsys.readouterr().out


def test_cli_download_offline_stops_after_first_shard(base_dir, monkeypatch, capsys):
    calls = []

    def offline(url, **kwargs):
        calls.append(url)
        raise requests.ConnectionError("offline")

    monkeypatch.setattr(dataset.requests, "get", offline)
    monkeypatch.setattr(dataset.time, "sleep", lambda s: None)
    assert dataset.main(["-n", "50"]) == 1
    assert len(set(calls)) == 1  # retried the first shard only, then stopped
    assert "--local" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [[], ["-n", "0"], ["-n", "-1"], ["-n", str(dataset.MAX_SHARD + 2)],
                                  ["-n", "1", "-w", "0"], ["-n", "1", "--local", "x"], ["--local"],
                                  ["--local", "x", "--doc-chars", "0"], ["-n", "two"]])
def test_cli_rejects_bad_flags(base_dir, argv, capsys):
    with pytest.raises(SystemExit) as e:
        dataset.main(argv)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


MIRROR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.mark.skipif(not os.path.isdir(os.path.join(MIRROR, "tinystories")), reason="local data mirror not present")
def test_import_real_text_from_the_mirror(tmp_path):
    out = tmp_path / "shards"
    sources = [os.path.join(MIRROR, "tinystories"), os.path.join(MIRROR, "tinyshakespeare")]
    summary = dataset.import_local(sources, data_dir=str(out), shard_chars=500_000, row_group_docs=128)
    assert summary["files"] == 3 and summary["shards"] >= 3
    texts = [t for p in dataset.list_parquet_files(str(out)) for t in shard_texts(p)]
    assert len(texts) == summary["docs"] and sum(map(len, texts)) == summary["chars"]
    assert all(0 < len(t) <= dataset.DEFAULT_DOC_CHARS for t in texts)
    assert not any("<|endoftext|>" in t for t in texts)


# -----------------------------------------------------------------------------
# offline fallback corpus: documentation of installed packages (a fake site-packages tree)

PROSE_1 = "This module reads the configuration of the pipeline and checks that every value is in range."
PROSE_2 = "When a value is missing, the default from the table below is used instead of failing."
PROSE_CLASS = "A small cache that keeps the most recent results in memory for the duration of a run."
PROSE_FUNC = "Return the number of tokens in the text, counting each special token as one token."
PROSE_README = "The alpha package is a tiny library that helps you to test the documentation corpus."
PROSE_META = "Beta is a package for the people who want to know how the metadata of a wheel is read."
PROSE_SHARE = "This directory contains the documentation that the system package manager installed for you."
LICENSE = ("Permission is hereby granted, free of charge, to any person obtaining a copy of this software and "
           "associated documentation files, to deal in the Software without restriction.")


def make_fake_installed_docs(root):
    """A site-packages tree and a /usr/share/doc tree: which files and paragraphs should be kept."""
    site_dir, share = root / "site-packages", root / "share-doc"
    (site_dir / "alpha" / "tests").mkdir(parents=True)
    (site_dir / "beta" / "_vendor").mkdir(parents=True)
    (site_dir / "beta-1.0.dist-info" / "licenses").mkdir(parents=True)
    (share / "pkg").mkdir(parents=True)
    module = (f'"""\n{PROSE_1}\n\n{PROSE_2}\n"""\n'
              'raise SystemExit("the corpus builder must never import or run package code")\n\n'
              f'class Cache:\n    """{PROSE_CLASS}"""\n\n'
              f'    def count(self, text):\n        """\n        {PROSE_FUNC}\n\n'
              '        Parameters\n        ----------\n        text : str\n\n'
              '        >>> Cache().count("hello world, how are you today my friend")\n        9\n        """\n\n'
              'def other():\n    """这个函数返回一个很长的中文句子，用来检查非英文的文档字符串会被过滤掉。这是第二个句子。"""\n')
    (site_dir / "alpha" / "__init__.py").write_text(module, encoding="utf-8")
    (site_dir / "alpha" / "broken.py").write_text(f'"""{PROSE_SHARE} and more"""\ndef (:\n')
    (site_dir / "alpha" / "LICENSE.txt").write_text(LICENSE)
    table = "\n".join(" ".join(str(i * j) for j in range(12)) for i in range(30))
    (site_dir / "alpha" / "numbers.txt").write_text(table)
    (site_dir / "alpha" / "README.md").write_text(
        f"# Alpha\n\n{PROSE_README} See [the guide](https://example.com/guide) and ``alpha.run``.\n\n"
        "```python\nimport alpha\n# this comment is in a code block and is written in plain English words\n```\n")
    (site_dir / "alpha" / "tests" / "test_alpha.py").write_text(f'"""{PROSE_CLASS} in the tests folder."""\n')
    (site_dir / "beta" / "_vendor" / "alpha_copy.py").write_text(module, encoding="utf-8")  # all duplicates
    (site_dir / "beta-1.0.dist-info" / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: beta\nVersion: 1.0\n\n{PROSE_META} It has one more sentence here.\n")
    (site_dir / "beta-1.0.dist-info" / "licenses" / "LICENSE").write_text(LICENSE)
    with gzip.open(share / "pkg" / "README.gz", "wt") as f:
        f.write(PROSE_SHARE + " It is compressed with gzip, as Debian does with most of its files.\n")
    (share / "pkg" / "copyright").write_text(LICENSE)
    return [str(site_dir), str(share)]


def test_is_english_prose_and_markup():
    assert fallback_corpus.is_english_prose(PROSE_1)
    assert not fallback_corpus.is_english_prose("Too short to be a paragraph.")
    assert not fallback_corpus.is_english_prose("def f(x):\n    return {k: v for k, v in x.items() if v is not None}")
    assert not fallback_corpus.is_english_prose("1.0 2.5 3.25 4.125\n5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20")
    assert not fallback_corpus.is_english_prose(LICENSE)
    assert not fallback_corpus.is_english_prose("这个函数返回一个很长的中文句子，用来检查非英文的文档字符串会被过滤掉。")
    assert not fallback_corpus.is_english_prose(">>> run the example that is shown in the documentation of this")
    assert fallback_corpus.strip_markup("Use :class:`~torch.Tensor` or ``x.view`` (see `docs <https://x.y>`_ and "
                                "[the guide](https://g.h)); **never** `eval`.") == \
        "Use torch.Tensor or x.view (see docs and the guide); never eval."


def test_build_installed_docs_corpus(tmp_path):
    roots = make_fake_installed_docs(tmp_path / "fake")
    out = tmp_path / "corpus.jsonl"
    stats = fallback_corpus.build_installed_docs_corpus(str(out), roots=roots, min_doc_chars=50, workers=1)
    records = read_jsonl(out)
    sources = [os.path.relpath(r["source"], tmp_path / "fake") for r in records]
    assert sources == ["site-packages/alpha/README.md", "site-packages/alpha/__init__.py",
                       "site-packages/beta-1.0.dist-info/METADATA", "share-doc/pkg/README.gz"]
    texts = {s: r["text"] for s, r in zip(sources, records)}
    assert texts["site-packages/alpha/__init__.py"] == "\n\n".join([PROSE_1, PROSE_2, PROSE_CLASS, PROSE_FUNC])
    assert texts["site-packages/alpha/README.md"].startswith(PROSE_README + " See the guide and alpha.run.")
    assert "code block" not in texts["site-packages/alpha/README.md"]  # fenced code is dropped
    assert texts["site-packages/beta-1.0.dist-info/METADATA"].startswith(PROSE_META)
    assert "Version" not in texts["site-packages/beta-1.0.dist-info/METADATA"]
    assert texts["share-doc/pkg/README.gz"].startswith(PROSE_SHARE)
    everything = "\n".join(texts.values())
    assert "Permission is hereby granted" not in everything and ">>>" not in everything and "中文" not in everything
    assert stats["docs"] == 4 and stats["chars"] == sum(map(len, texts.values()))
    assert stats["files"] == 7  # 3 .py (tests/ skipped), .md, numbers.txt, METADATA, README.gz; licenses skipped

    # deterministic, whatever the number of worker processes
    out2 = tmp_path / "corpus2.jsonl"
    fallback_corpus.build_installed_docs_corpus(str(out2), roots=roots, min_doc_chars=50, workers=2)
    assert out2.read_bytes() == out.read_bytes()


def test_installed_docs_corpus_max_chars(tmp_path):
    roots = make_fake_installed_docs(tmp_path / "fake")
    out = tmp_path / "corpus.jsonl"
    stats = fallback_corpus.build_installed_docs_corpus(str(out), max_chars=150, roots=roots, min_doc_chars=50, workers=1)
    records = read_jsonl(out)
    assert stats["chars"] == 150 == sum(len(r["text"]) for r in records) and len(records) == 2
    with pytest.raises(ValueError):
        fallback_corpus.build_installed_docs_corpus(str(out), max_chars=0, roots=roots)


def test_installed_docs_roots_exist_once():
    roots = fallback_corpus.installed_docs_roots()
    assert roots and len(set(roots)) == len(roots) and all(os.path.isdir(r) for r in roots)


def test_cli_from_installed_docs(base_dir, tmp_path, monkeypatch, capsys):
    roots = make_fake_installed_docs(tmp_path / "fake")
    monkeypatch.setattr(fallback_corpus, "installed_docs_roots", lambda: roots)
    assert dataset.main(["--from-installed-docs", "--max-chars", "100000", "--doc-chars", "150"]) == 0
    out = capsys.readouterr().out
    assert out.count("FALLBACK PRETRAINING CORPUS") == 2 and "NOT web text" in out
    assert "fallback corpus: 4 documents" in out and "2 shards" in out
    assert len(read_jsonl(base_dir / fallback_corpus.FALLBACK_CORPUS_FILE)) == 4
    shards = dataset.list_parquet_files()
    texts = [t for p in shards for t in shard_texts(p)]
    assert len(shards) == 2 and PROSE_CLASS in "\n".join(texts) and all(len(t) <= 150 for t in texts)
    marker = base_dir / "base_data" / dataset.FALLBACK_MARKER
    assert "NOT web text" in marker.read_text()

    # shards there already: refused before reading anything, unless --overwrite
    assert dataset.main(["--from-installed-docs", "--overwrite"]) == 0
    with pytest.raises(SystemExit) as e:
        dataset.main(["--from-installed-docs"])
    assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err

    # a download must not mix web shards with the fallback ones (same file names)
    def no_network(url, **kwargs):
        raise AssertionError("must not download into a folder that holds the fallback corpus")
    monkeypatch.setattr(dataset.requests, "get", no_network)
    assert dataset.main(["-n", "2"]) == 1
    assert "fallback corpus" in capsys.readouterr().err
    # importing real text replaces the fallback shards and their marker
    src = tmp_path / "real.txt"
    src.write_text("\n\n".join(f"para {i}" for i in range(10)))
    assert dataset.main(["--local", str(src), "--overwrite", "--doc-chars", "20"]) == 0
    assert not marker.exists()


@pytest.mark.parametrize("argv", [["--from-installed-docs", "-n", "1"], ["--from-installed-docs", "--local", "x"],
                                  ["-n", "1", "--max-chars", "10"], ["--from-installed-docs", "--max-chars", "0"]])
def test_cli_rejects_bad_fallback_flags(base_dir, argv, capsys):
    with pytest.raises(SystemExit) as e:
        dataset.main(argv)
    assert e.value.code == 2 and "error" in capsys.readouterr().err


def test_which_files_are_documentation():
    kinds = {name: fallback_corpus._doc_kind(name, "/site-packages/pkg") for name in
             ["history.py", "README.md", "guide.rst", "notes.txt", "README", "FAQ.gz", "intro.md.gz", "LICENSE",
              "LICENSE-MIT.txt", "COPYING.LIB", "CHANGES.rst", "requirements-dev.txt", "top_level.txt", "data.json",
              "METADATA", ".hidden.md"]}
    assert [n for n, k in kinds.items() if k] == ["history.py", "README.md", "guide.rst", "notes.txt", "README",
                                                   "FAQ.gz", "intro.md.gz"]
    assert fallback_corpus._doc_kind("METADATA", "/site-packages/beta-1.0.dist-info") == "metadata"
