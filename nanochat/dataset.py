"""
Pretraining data: parquet shards of raw text in $NANOCHAT_BASE_DIR/base_data/shard_XXXXX.parquet.

Three ways to get shards:
    python -m nanochat.dataset -n 8                   download the first 8 shards of FineWeb-Edu
    python -m nanochat.dataset --local PATH [PATH..]  import your own text (.txt, .jsonl, .parquet, folders)
    python -m nanochat.dataset --from-installed-docs  offline fallback: the documentation of the installed
                                                      Python packages; only for testing the pipeline
or set NANOCHAT_DATA_DIR to a local mirror with a pretrain/ folder: the training scripts import it by
themselves when base_data/ is empty (ensure_local_shards).

Every shard has one column, "text", one document per row, stored in several row groups. A row group is
the unit the tokenizer trainer and the dataloader read. Shards sorted by name: the LAST one is the
validation split, all the others are the train split.
"""

import argparse
import json
import os
import random
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

import pyarrow as pa
import pyarrow.parquet as pq
import requests
from filelock import FileLock
from tqdm import tqdm

from nanochat.common import get_base_dir, get_data_dir

BASE_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
MAX_SHARD = 1822  # the public dataset has shards 0..1822
LOCAL_EXTENSIONS = (".txt", ".jsonl", ".parquet")
# Import defaults. 6M chars per shard (~1.5M tokens) turns the ~43 MB local mirror into ~7 shards of
# ~2 row groups each, so the validation shard is ~1/7 of the text and DDP streams have row groups to share.
DEFAULT_DOC_CHARS = 4000
DEFAULT_SHARD_CHARS = 6_000_000
DEFAULT_ROW_GROUP_DOCS = 1024


def get_shard_dir():
    """The folder of pretraining shards: $NANOCHAT_BASE_DIR/base_data."""
    path = os.path.join(get_base_dir(), "base_data")
    os.makedirs(path, exist_ok=True)
    return path


def shard_filename(index):
    return f"shard_{index:05d}.parquet"


def list_parquet_files(data_dir=None):
    """Full paths of the finished shards in data_dir (default base_data/), sorted by name. Partial
    downloads (*.tmp), lock files and hidden files are not shards."""
    data_dir = data_dir or get_shard_dir()
    if not os.path.isdir(data_dir):
        return []
    names = sorted(n for n in os.listdir(data_dir) if n.endswith(".parquet") and not n.startswith("."))
    return [os.path.join(data_dir, n) for n in names]


def no_shards_message(data_dir):
    return (
        f"no pretraining shards (*.parquet) in {data_dir}. Get some with one of:\n"
        f"  python -m nanochat.dataset -n 8               # download the first 8 FineWeb-Edu shards\n"
        f"  python -m nanochat.dataset --local PATH ...   # import your own .txt / .jsonl / .parquet text\n"
        f"  export NANOCHAT_DATA_DIR=/path/to/mirror      # a local mirror with pretrain/, imported automatically\n"
        f"  python -m nanochat.dataset --from-installed-docs  # offline fallback (package docs): pipeline tests only"
    )


# -----------------------------------------------------------------------------
# reading shards

def _split_files(split, data_dir=None):
    """The shards of one split: train = all but the last shard, val = the last one."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    data_dir = data_dir or get_shard_dir()
    paths = list_parquet_files(data_dir) or ensure_local_shards(data_dir)
    if len(paths) < 2:
        raise FileNotFoundError(
            f"only {len(paths)} shard in {data_dir}: need at least 2 (the last one is the validation split). "
            f"Download more (python -m nanochat.dataset -n 2) or re-import with --local")
    return paths[:-1] if split == "train" else paths[-1:]


def list_row_groups(split, data_dir=None):
    """[(path, row_group_index, num_rows), ...] of a split, in order. The position in this list is the
    'global row group index' that start/step (and the dataloader's streams) refer to."""
    out = []
    for path in _split_files(split, data_dir):
        meta = pq.read_metadata(path)
        out.extend((path, i, meta.row_group(i).num_rows) for i in range(meta.num_row_groups))
    return out


def read_row_group(path, index):
    """The documents (list of str) of one row group. Null entries become empty strings."""
    with pq.ParquetFile(path) as pf:
        table = pf.read_row_group(index, columns=["text"])
    return [t or "" for t in table.column("text").to_pylist()]


def parquets_iter_batched(split, start=0, step=1, data_dir=None):
    """
    Yield the documents of a split one row group at a time (a list of str each). Global row groups
    start, start+step, start+2*step, ... so DDP ranks (start=rank, step=world_size) read disjoint data.
    """
    if start < 0 or step < 1:
        raise ValueError(f"need start >= 0 and step >= 1, got start={start} step={step}")
    row_groups = list_row_groups(split, data_dir)
    files = {}
    for path, index, _ in row_groups[start::step]:
        if path not in files:
            files[path] = pq.ParquetFile(path)
        table = files[path].read_row_group(index, columns=["text"])
        yield [t or "" for t in table.column("text").to_pylist()]


def ensure_local_shards(data_dir=None):
    """
    Make sure base_data/ has shards before a run starts. When it is empty and NANOCHAT_DATA_DIR is set,
    import $NANOCHAT_DATA_DIR/pretrain (once: a file lock makes other ranks wait and then reuse it).
    Returns the shard paths; raises FileNotFoundError saying how to get data when there are none.
    """
    data_dir = data_dir or get_shard_dir()
    paths = list_parquet_files(data_dir)
    if paths:
        return paths
    mirror = get_data_dir()
    source = os.path.join(mirror, "pretrain") if mirror else None
    if source and os.path.isdir(source):
        os.makedirs(data_dir, exist_ok=True)
        with FileLock(os.path.join(data_dir, ".import.lock")):
            if not list_parquet_files(data_dir):  # another rank may have imported while we waited
                print(f"no shards in {data_dir}: importing {source} ($NANOCHAT_DATA_DIR/pretrain)", flush=True)
                import_local([source], data_dir=data_dir)
        paths = list_parquet_files(data_dir)
    if not paths:
        raise FileNotFoundError(no_shards_message(data_dir))
    return paths


# -----------------------------------------------------------------------------
# downloading

def offline_hint():
    return ("If this machine is offline, use local text instead:\n"
            "  python -m nanochat.dataset --local PATH [PATH ...]   (.txt, .jsonl with a \"text\" field, "
            ".parquet with a \"text\" column; folders are walked)\n"
            "  or set NANOCHAT_DATA_DIR to a local mirror with a pretrain/ folder (the training scripts import it).")


def _fetch(url, tmp_path, timeout):
    with requests.get(url, stream=True, timeout=timeout) as response:
        response.raise_for_status()
        with open(tmp_path, "wb") as f:
            for chunk in response.iter_content(chunk_size=1 << 20):
                f.write(chunk)


def _remove_quietly(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def download_single_file(index, data_dir=None, max_attempts=5, backoff=2.0, timeout=60):
    """
    Download shard `index` into data_dir (default base_data/). Returns True when the shard is there.
    Resume-safe: bytes go to <name>.tmp and are renamed into place only once they parse as parquet, so a
    crash never leaves a half shard; shards already present are skipped. A per-file lock makes concurrent
    processes (torchrun ranks, the background download in speedrun.sh) wait instead of writing twice.
    Retries wait backoff * 2^attempt seconds (2, 4, 8, 16 s by default).
    """
    data_dir = data_dir or get_shard_dir()
    name = shard_filename(index)
    path = os.path.join(data_dir, name)
    if os.path.exists(path):
        return True
    os.makedirs(os.path.join(data_dir, ".locks"), exist_ok=True)
    with FileLock(os.path.join(data_dir, ".locks", name + ".lock")):
        if os.path.exists(path):  # another process finished it while we waited for the lock
            return True
        tmp_path, error = path + ".tmp", None
        for attempt in range(1, max_attempts + 1):
            try:
                _fetch(f"{BASE_URL}/{name}", tmp_path, timeout)
                pq.read_metadata(tmp_path)  # a truncated file or an HTML error page fails here
                os.replace(tmp_path, path)  # atomic on POSIX: readers see all of the shard or none
                return True
            except (requests.RequestException, OSError, pa.ArrowException) as e:
                error = e
                _remove_quietly(tmp_path)
                if attempt < max_attempts:
                    wait = backoff * 2 ** (attempt - 1)
                    print(f"{name}: attempt {attempt}/{max_attempts} failed ({e}); retrying in {wait:g}s",
                          file=sys.stderr, flush=True)
                    time.sleep(wait)
    print(f"{name}: giving up after {max_attempts} attempts ({error}).\n{offline_hint()}", file=sys.stderr, flush=True)
    return False


def download_shards(num_shards, workers=4, data_dir=None, **kw):
    """Download shards 0..num_shards-1 with `workers` threads. Returns the indices that failed."""
    data_dir = data_dir or get_shard_dir()
    if os.path.exists(os.path.join(data_dir, FALLBACK_MARKER)):
        # its shard_00000.. would pass for downloaded ones and mix package docs into the web text
        print(f"{data_dir} holds the fallback corpus (package documentation), not FineWeb-Edu shards: "
              f"delete that folder (or use another NANOCHAT_BASE_DIR) to download", file=sys.stderr, flush=True)
        return list(range(num_shards))
    todo = [i for i in range(num_shards) if not os.path.exists(os.path.join(data_dir, shard_filename(i)))]
    print(f"{num_shards - len(todo)} of {num_shards} shards already in {data_dir}; downloading {len(todo)} "
          f"with {workers} workers", flush=True)
    if not todo:
        return []
    # the first shard alone: when offline this fails after a few retries instead of once per shard
    if not download_single_file(todo[0], data_dir, **kw):
        return todo
    failed = []
    with ThreadPoolExecutor(workers) as pool:
        futures = {pool.submit(download_single_file, i, data_dir, **kw): i for i in todo[1:]}
        for future in tqdm(as_completed(futures), total=len(todo), initial=1, desc="shards", unit="shard"):
            if not future.result():
                failed.append(futures[future])
    return sorted(failed)


# -----------------------------------------------------------------------------
# importing local text

ENDOFTEXT = "<|endoftext|>"
BLANK_LINES = re.compile(r"\n[ \t\f\v]*\n(?:[ \t\f\v]*\n)*")


def _split_long(text, limit):
    """Cut text longer than limit chars at a line break, else a space, in the second half of each window."""
    while len(text) > limit:
        cut = text.rfind("\n", limit // 2, limit)
        if cut <= 0:
            cut = text.rfind(" ", limit // 2, limit)
        if cut <= 0:
            cut = limit
        piece, text = text[:cut].rstrip(), text[cut:].lstrip()
        if piece:
            yield piece
    if text:
        yield text


def split_into_documents(text, doc_chars=DEFAULT_DOC_CHARS):
    """
    Plain text -> documents: paragraphs (separated by blank lines) packed greedily, in order, into
    documents of at most doc_chars characters; a paragraph longer than that is cut at line/word breaks.
    An explicit "<|endoftext|>" marker (the TinyStories convention) always ends a document.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if ENDOFTEXT in text:
        return [doc for part in text.split(ENDOFTEXT) for doc in split_into_documents(part, doc_chars)]
    docs, current, size = [], [], 0
    for paragraph in BLANK_LINES.split(text):
        paragraph = paragraph.strip("\n").rstrip()
        if not paragraph.strip():
            continue
        for piece in _split_long(paragraph, doc_chars):
            if current and size + 2 + len(piece) > doc_chars:
                docs.append("\n\n".join(current))
                current, size = [], -2
            current.append(piece)
            size += 2 + len(piece)  # 2 = the "\n\n" joining it to the previous paragraph
    if current:
        docs.append("\n\n".join(current))
    return docs


def _cap_length(text, doc_chars):
    """Documents from .jsonl/.parquet stay as they are unless longer than doc_chars (then split at
    paragraphs): the BOS-aligned loader crops what does not fit in a row, so a huge document would
    otherwise lose most of its text."""
    return [text] if len(text) <= doc_chars else split_into_documents(text, doc_chars)


def _iter_input_files(paths):
    """Files to import, in a deterministic order: folders are walked recursively, sorted."""
    for path in paths:
        if os.path.isdir(path):
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    if name.endswith(LOCAL_EXTENSIONS) and not name.startswith("."):
                        yield os.path.join(root, name)
        elif os.path.isfile(path):
            if not path.endswith(LOCAL_EXTENSIONS):
                raise ValueError(f"{path}: unsupported file type; --local takes "
                                 f"{', '.join(LOCAL_EXTENSIONS)} files or folders")
            yield path
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")


def _read_jsonl(path, doc_chars, stats):
    docs = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str) or not text.strip():
                stats["skipped_lines"] += 1
                continue
            docs.extend(_cap_length(text, doc_chars))
    return docs


def _read_parquet(path, doc_chars, stats):
    pf = pq.ParquetFile(path)
    if "text" not in pf.schema_arrow.names:
        raise ValueError(f"{path}: no 'text' column (columns: {pf.schema_arrow.names})")
    docs = []
    for batch in pf.iter_batches(columns=["text"]):
        for text in batch.column(0).to_pylist():
            if not isinstance(text, str) or not text.strip():
                stats["skipped_lines"] += 1
                continue
            docs.extend(_cap_length(text, doc_chars))
    return docs


def read_local_documents(paths, doc_chars=DEFAULT_DOC_CHARS):
    """All documents of the given files/folders, in file order. Returns (docs, stats)."""
    stats = {"files": 0, "skipped_lines": 0}
    docs = []
    for path in _iter_input_files(paths):
        stats["files"] += 1
        if path.endswith(".jsonl"):
            docs.extend(_read_jsonl(path, doc_chars, stats))
        elif path.endswith(".parquet"):
            docs.extend(_read_parquet(path, doc_chars, stats))
        else:
            with open(path, encoding="utf-8", errors="replace") as f:
                docs.extend(split_into_documents(f.read(), doc_chars))
    return docs, stats


def _shard_bounds(doc_lengths, num_shards):
    """Contiguous [start, end) doc ranges of ~equal chars, every shard at least one document."""
    n, target = len(doc_lengths), sum(doc_lengths) / num_shards
    bounds, start, cum = [], 0, 0
    for i in range(num_shards - 1):
        end, cum = start + 1, cum + doc_lengths[start]
        while end < n - (num_shards - 1 - i) and cum < target * (i + 1):
            cum += doc_lengths[end]
            end += 1
        bounds.append((start, end))
        start = end
    bounds.append((start, n))
    return bounds


def _write_shard(path, docs, row_group_docs):
    """One parquet file, docs split evenly into ceil(len/row_group_docs) row groups."""
    num_groups = -(-len(docs) // row_group_docs)
    schema = pa.schema([("text", pa.string())])
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        for g in range(num_groups):
            chunk = docs[g * len(docs) // num_groups:(g + 1) * len(docs) // num_groups]
            writer.write_table(pa.table({"text": chunk}, schema=schema), row_group_size=len(chunk))
    return num_groups


def write_shards(docs, data_dir, shard_chars=DEFAULT_SHARD_CHARS, row_group_docs=DEFAULT_ROW_GROUP_DOCS):
    """
    Write docs (already shuffled) as shard_00000.parquet, ... of ~shard_chars chars each, at least 2 shards
    (the last is validation; small inputs get smaller shards). Files appear by atomic rename only at the
    end. Returns the number of row groups per shard.
    """
    if len(docs) < 2:
        raise ValueError(f"need at least 2 documents (one shard to train on, one to validate), got {len(docs)}")
    num_shards = min(len(docs), max(2, round(sum(map(len, docs)) / shard_chars)))
    bounds = _shard_bounds([len(d) for d in docs], num_shards)
    os.makedirs(data_dir, exist_ok=True)
    groups, tmp_paths = [], []
    for i, (start, end) in enumerate(bounds):
        tmp_paths.append(os.path.join(data_dir, shard_filename(i) + ".tmp"))
        groups.append(_write_shard(tmp_paths[-1], docs[start:end], row_group_docs))
    for tmp in tmp_paths:
        os.replace(tmp, tmp[:-len(".tmp")])
    return groups


def import_local(paths, data_dir=None, doc_chars=DEFAULT_DOC_CHARS, shard_chars=DEFAULT_SHARD_CHARS,
                 row_group_docs=DEFAULT_ROW_GROUP_DOCS, seed=42, overwrite=False):
    """
    Turn local text into shards in data_dir (default base_data/). Documents are shuffled with a fixed seed
    so every shard (and the validation shard) is a mix of all sources. Returns a summary dict.
    """
    if doc_chars < 1 or shard_chars < 1 or row_group_docs < 1:
        raise ValueError("doc_chars, shard_chars and row_group_docs must be >= 1")
    data_dir = data_dir or get_shard_dir()
    existing = list_parquet_files(data_dir)
    if existing and not overwrite:
        raise ValueError(f"{data_dir} already has {len(existing)} shards; pass --overwrite to replace them "
                         f"(or point NANOCHAT_BASE_DIR somewhere else)")
    t0 = time.time()
    docs, stats = read_local_documents(paths, doc_chars)
    if not docs:
        raise ValueError(f"no documents found in {' '.join(paths)} ({stats['files']} files read): expected .txt "
                         f"files, .jsonl lines with a \"text\" field or .parquet files with a \"text\" column")
    random.Random(seed).shuffle(docs)
    for path in existing:
        os.remove(path)
    _remove_quietly(os.path.join(data_dir, FALLBACK_MARKER))  # the new shards are whatever was imported now
    groups = write_shards(docs, data_dir, shard_chars, row_group_docs)
    return dict(files=stats["files"], docs=len(docs), chars=sum(map(len, docs)), skipped_lines=stats["skipped_lines"],
                shards=len(groups), row_groups=groups, data_dir=data_dir, seconds=time.time() - t0)


def format_summary(s):
    return (f"imported {s['docs']:,} documents ({s['chars']:,} chars) from {s['files']} files "
            f"(skipped {s['skipped_lines']} records without text) in {s['seconds']:.1f}s\n"
            f"wrote {s['shards']} shards to {s['data_dir']}: {s['shards'] - 1} train + 1 val (the last), "
            f"row groups per shard: {s['row_groups']}")


# marks base_data/ while its shards come from the offline fallback corpus (nanochat/fallback_corpus.py)
FALLBACK_MARKER = "FALLBACK_CORPUS.txt"


# -----------------------------------------------------------------------------
# command line

def parse_args(argv=None):
    from nanochat import fallback_corpus  # here, not at the top: it builds on this module
    parser = argparse.ArgumentParser(description="Download FineWeb-Edu shards or import local text as shards "
                                                 "(or, offline, the documentation of installed packages).")
    parser.add_argument("-n", "--num-files", type=int, default=None,
                        help=f"download the first N shards (1..{MAX_SHARD + 1})")
    parser.add_argument("-w", "--num-workers", type=int, default=4, help="parallel downloads")
    parser.add_argument("--local", nargs="+", metavar="PATH", help="import .txt/.jsonl/.parquet files or folders")
    parser.add_argument("--from-installed-docs", action="store_true",
                        help="offline fallback: import the docstrings and docs of installed Python packages "
                             "(for testing the pipeline only: this is not web text)")
    parser.add_argument("--max-chars", type=int, default=None,
                        help=f"--from-installed-docs: at most this many characters "
                             f"(default {fallback_corpus.DEFAULT_FALLBACK_CHARS:,})")
    parser.add_argument("--doc-chars", type=int, default=DEFAULT_DOC_CHARS, help="max characters per document")
    parser.add_argument("--shard-chars", type=int, default=DEFAULT_SHARD_CHARS, help="characters per shard")
    parser.add_argument("--row-group-docs", type=int, default=DEFAULT_ROW_GROUP_DOCS, help="documents per row group")
    parser.add_argument("--seed", type=int, default=42, help="shuffle seed for --local")
    parser.add_argument("--overwrite", action="store_true",
                        help="--local / --from-installed-docs: replace shards already in base_data/")
    args = parser.parse_args(argv)
    modes = [args.num_files is not None, args.local is not None, args.from_installed_docs]
    if sum(modes) != 1:
        parser.error("give exactly one of -n N (download), --local PATH [PATH ...] (import) or "
                     "--from-installed-docs (offline fallback)")
    if args.max_chars is not None and (not args.from_installed_docs or args.max_chars < 1):
        parser.error(f"--max-chars goes with --from-installed-docs and must be >= 1, got {args.max_chars}")
    if args.num_files is not None and not 1 <= args.num_files <= MAX_SHARD + 1:
        parser.error(f"-n must be between 1 and {MAX_SHARD + 1} (the dataset has {MAX_SHARD + 1} shards), "
                     f"got {args.num_files}")
    if args.num_workers < 1:
        parser.error(f"-w must be >= 1, got {args.num_workers}")
    for flag in ("doc_chars", "shard_chars", "row_group_docs"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    return parser, args


def _main_installed_docs(parser, args):
    from nanochat.fallback_corpus import DEFAULT_FALLBACK_CHARS, FALLBACK_BANNER, import_installed_docs
    print(FALLBACK_BANNER, flush=True)  # before and after: it scrolls by in a long speedrun log
    try:
        _, summary = import_installed_docs(args.max_chars or DEFAULT_FALLBACK_CHARS, overwrite=args.overwrite,
                                           doc_chars=args.doc_chars, shard_chars=args.shard_chars,
                                           row_group_docs=args.row_group_docs, seed=args.seed)
    except (ValueError, FileNotFoundError) as e:
        parser.exit(2, f"error: {e}\n")
    print(format_summary(summary))
    print(FALLBACK_BANNER, flush=True)
    return 0


def main(argv=None):
    parser, args = parse_args(argv)
    if args.local is not None:
        try:
            summary = import_local(args.local, doc_chars=args.doc_chars, shard_chars=args.shard_chars,
                                   row_group_docs=args.row_group_docs, seed=args.seed, overwrite=args.overwrite)
        except (ValueError, FileNotFoundError) as e:
            parser.exit(2, f"error: {e}\n")
        print(format_summary(summary))
        return 0
    if args.from_installed_docs:
        return _main_installed_docs(parser, args)
    failed = download_shards(args.num_files, args.num_workers)
    if failed:
        print(f"{len(failed)} of {args.num_files} shards failed (first: {failed[0]}); rerun to retry them.",
              file=sys.stderr)
        return 1
    print(f"done: {args.num_files} shards in {get_shard_dir()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
