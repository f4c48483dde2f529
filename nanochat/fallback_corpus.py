"""
The offline fallback corpus: with no network and no NANOCHAT_DATA_DIR there is still English text on any
machine that runs nanochat: the docstrings and README/.md/.rst/.txt files of its installed Python packages
(and /usr/share/doc). It is technical prose, far from web text: enough to check that every stage runs, never
to judge a model. `python -m nanochat.dataset --from-installed-docs` builds it and imports it as shards.
"""

import ast
import gzip
import hashlib
import json
import multiprocessing
import os
import re
import site
import sysconfig
import textwrap
import time
import warnings
import zlib

from nanochat.common import get_base_dir
from nanochat.dataset import BLANK_LINES, FALLBACK_MARKER, get_shard_dir, import_local, list_parquet_files

FALLBACK_CORPUS_FILE = "fallback_corpus.jsonl"  # in $NANOCHAT_BASE_DIR
DEFAULT_FALLBACK_CHARS = 200_000_000
DOC_SUFFIXES = (".md", ".rst", ".txt")
MAX_SOURCE_BYTES = 2_000_000  # bigger files are generated code or data, not documentation
MIN_PARAGRAPH_CHARS = 40
MIN_DOCUMENT_CHARS = 100  # shorter files (a one-line module docstring) add little but noise
_SKIP_DIRS = {"__pycache__", "test", "tests", "licenses", "license", "node_modules"}
# documentation files that are not prose (LICENSE.txt, CHANGES.rst, requirements-dev.txt, top_level.txt, ...)
_SKIP_NAMES = re.compile(r"^(licen[cs]es?|copying|copyright|notice|authors|contributors|thanks|changelog|changes|"
                         r"history|news|record|sources|entry_points|top_level|dependency_links|requires|"
                         r"requirements|installer|wheel)([-_.].*)?$", re.I)
_LICENSE_TEXT = re.compile(r"permission is hereby granted|licensed under|general public license|redistribution and use|"
                           r"merchantability|all rights reserved|without warranty|apache license|copyright \(c\)|"
                           r"copyright ©|spdx-license-identifier", re.I)
_NOT_LETTER_OR_SPACE = re.compile(r"[^A-Za-z ]")
_STOPWORDS = frozenset("the a an of to and in is are was be for that this with it as on by or not from can if "
                       "which when you we".split())
_FENCED_CODE = re.compile(r"^[ \t]*(```|~~~).*?^[ \t]*\1[^\n]*$", re.M | re.S)
_INLINE_MARKUP = [  # (pattern, replacement): reST/markdown markup -> the words a reader sees
    (re.compile(r":[\w:.-]+:`~?([^`<]+?)\s*(?:<[^>`]*>)?`"), r"\1"),  # :class:`Foo <a.Foo>` -> Foo
    (re.compile(r"`([^`<]+?)\s*<[^>`]*>`_{1,2}"), r"\1"),  # reST links `text <url>`_
    (re.compile(r"``([^`]+)``"), r"\1"),  # reST literals
    (re.compile(r"`([^`]+)`_{0,2}"), r"\1"),  # markdown code, reST references
    (re.compile(r"!?\[([^\]]*)\]\([^)]*\)"), r"\1"),  # markdown links and images
    (re.compile(r"\*\*([^*]+)\*\*"), r"\1"),  # bold
]
FALLBACK_BANNER = "\n".join([
    "#" * 80,
    "#  FALLBACK PRETRAINING CORPUS: the documentation of the installed Python packages",
    "#  (docstrings, README / .md / .rst / .txt files, /usr/share/doc) -- NOT web text.",
    "#  Models trained on it are ONLY for testing that the pipeline runs end to end.",
    "#  Real data: python -m nanochat.dataset -n N (online) or NANOCHAT_DATA_DIR=/path/to/mirror.",
    "#" * 80,
])


def is_english_prose(text, min_chars=MIN_PARAGRAPH_CHARS):
    """
    A cheap test for "a paragraph of English sentences": mostly ASCII letters and spaces (code, tables of
    numbers, markup and other scripts fail), ordinary word lengths (hashes, URLs fail), enough common
    English function words (lists of identifiers fail), no doctest and no license boilerplate.
    """
    words = text.split()
    flat = " ".join(words)  # indentation would make code look like prose
    if len(flat) < min_chars or len(words) < 6 or ">>>" in flat or _LICENSE_TEXT.search(flat):
        return False
    if len(_NOT_LETTER_OR_SPACE.sub("", flat)) < 0.9 * len(flat):
        return False
    if not 2 <= (len(flat) - len(words) + 1) / len(words) <= 10:
        return False
    return sum(w.lower().strip(".,;:!?()\"'") in _STOPWORDS for w in words) >= 0.1 * len(words)


def installed_docs_roots():
    """Where the installed packages live (site-packages of this interpreter/venv, user site) and
    /usr/share/doc: the folders that exist and can be read, each once, in a fixed order."""
    paths = sysconfig.get_paths()
    candidates = [paths["purelib"], paths["platlib"], *getattr(site, "getsitepackages", list)()]
    if site.ENABLE_USER_SITE:
        candidates.append(site.getusersitepackages())
    candidates.append("/usr/share/doc")
    roots = []
    for path in candidates:
        real = os.path.realpath(path)
        if real not in roots and os.path.isdir(real) and os.access(real, os.R_OK | os.X_OK):
            roots.append(real)
    return roots


def _doc_kind(name, folder):
    """How a file holds documentation: 'python' (docstrings), 'metadata' (a package's long description,
    usually its README), 'text', or None."""
    if name.startswith("."):
        return None
    if name.endswith(".py"):
        return "python"
    if _SKIP_NAMES.match(name):
        return None
    if name in ("METADATA", "PKG-INFO") and folder.endswith((".dist-info", ".egg-info")):
        return "metadata"
    plain = name[:-3] if name.endswith(".gz") else name  # /usr/share/doc compresses most of its files
    if plain.endswith(DOC_SUFFIXES) or plain.upper() in ("README", "FAQ"):
        return "text"
    return None


def _iter_doc_sources(roots):
    """(path, kind) of every documentation file under roots, in sorted order: the same corpus every time."""
    for root in roots:
        for folder, dirnames, filenames in os.walk(root):  # unreadable folders are skipped, links not followed
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d.lower() not in _SKIP_DIRS)
            for name in sorted(filenames):
                path = os.path.join(folder, name)
                kind = _doc_kind(name, folder)
                if kind and not os.path.islink(path):
                    yield path, kind


def _read_source(path):
    """A file's text (gzip ones too), or None when it cannot be read or is too big to be documentation."""
    try:
        if os.path.getsize(path) > MAX_SOURCE_BYTES:
            return None
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            return f.read(MAX_SOURCE_BYTES)
    except (OSError, EOFError, zlib.error):
        return None


def python_docstrings(source):
    """Module, class and function docstrings of Python source, in source order. The code is parsed with
    ast, never imported or run."""
    if '"""' not in source and "'''" not in source:
        return []  # one-line docstrings in plain quotes are too short to keep anyway
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences in old packages
            tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return []  # Python 2 files, templates, null bytes, absurd nesting: no docstrings then
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    nodes = sorted((n for n in ast.walk(tree) if isinstance(n, kinds)), key=lambda n: getattr(n, "lineno", 0))
    return [doc for doc in (ast.get_docstring(n) for n in nodes) if doc]


def strip_markup(text):
    for pattern, replacement in _INLINE_MARKUP:
        text = pattern.sub(replacement, text)
    return text


def prose_paragraphs(path, kind):
    """The English paragraphs of one documentation file, markup removed, in order. Runs in the worker
    processes: parsing ~20k Python files is most of the time (~90 s for 2 GB of packages on 2 cores)."""
    text = _read_source(path)
    if text is None:
        return []
    if kind == "python":
        pieces = python_docstrings(text)
    elif kind == "metadata":
        pieces = text.split("\n\n", 1)[1:]  # e-mail style headers, a blank line, then the description
    else:
        pieces = [text]
    kept = []
    for piece in pieces:
        for paragraph in BLANK_LINES.split(_FENCED_CODE.sub("\n\n", piece)):
            paragraph = strip_markup(textwrap.dedent(paragraph).strip())
            if not paragraph.startswith((".. ", "::")) and is_english_prose(paragraph):  # reST directives out
                kept.append(paragraph)
    return kept


def _prose_of(source):
    return prose_paragraphs(*source)  # Pool.imap passes one argument


def _map_in_order(fn, items, workers):
    """map(fn, items) over `workers` processes, results in input order (so the corpus does not depend on
    the number of cores). Stopping the iteration early terminates the pool."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with multiprocessing.get_context().Pool(workers) as pool:
        yield from pool.imap(fn, items, chunksize=16)


def build_installed_docs_corpus(out_path, max_chars=DEFAULT_FALLBACK_CHARS, roots=None,
                                min_doc_chars=MIN_DOCUMENT_CHARS, workers=None):
    """
    Write a .jsonl ({"text", "source"} per line) of English prose from installed documentation (see
    installed_docs_roots; `roots` overrides them), at most max_chars characters of text, one document per
    file. Deterministic: files in sorted order, paragraphs deduplicated in that order (vendored copies of
    a package repeat the same docstrings). Returns a stats dict.
    """
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    roots = installed_docs_roots() if roots is None else list(roots)
    workers = workers or min(16, os.cpu_count() or 1)
    t0, seen = time.time(), set()
    sources = list(_iter_doc_sources(roots))
    stats = dict(roots=roots, files=0, docs=0, chars=0, path=out_path)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path + ".tmp", "w", encoding="utf-8") as f:
        for (path, _), paragraphs in zip(sources, _map_in_order(_prose_of, sources, workers)):
            stats["files"] += 1
            new = []
            for paragraph in paragraphs:
                digest = hashlib.blake2b(" ".join(paragraph.split()).lower().encode(), digest_size=16).digest()
                if digest not in seen:
                    seen.add(digest)
                    new.append(paragraph)
            doc = "\n\n".join(new)
            if len(doc) < min_doc_chars:
                continue
            doc = doc[:max_chars - stats["chars"]]  # the last document is cut to fit
            f.write(json.dumps({"text": doc, "source": path}, ensure_ascii=False) + "\n")
            stats["docs"], stats["chars"] = stats["docs"] + 1, stats["chars"] + len(doc)
            if stats["chars"] >= max_chars:
                break
    os.replace(out_path + ".tmp", out_path)
    stats["seconds"] = time.time() - t0
    return stats


def format_corpus_stats(s):
    return (f"fallback corpus: {s['docs']:,} documents, {s['chars']:,} chars from {s['files']:,} files read "
            f"in {s['seconds']:.1f}s -> {s['path']}\n  roots: {', '.join(s['roots']) or '(none)'}")


def import_installed_docs(max_chars=DEFAULT_FALLBACK_CHARS, overwrite=False, roots=None, **import_kw):
    """Build the fallback corpus into $NANOCHAT_BASE_DIR and import it as shards (marked as fallback)."""
    data_dir = get_shard_dir()
    if list_parquet_files(data_dir) and not overwrite:  # fail before a minute of reading, not after
        raise ValueError(f"{data_dir} already has shards; pass --overwrite to replace them "
                         f"(or point NANOCHAT_BASE_DIR somewhere else)")
    out_path = os.path.join(get_base_dir(), FALLBACK_CORPUS_FILE)
    corpus = build_installed_docs_corpus(out_path, max_chars, roots)
    print(format_corpus_stats(corpus), flush=True)
    summary = import_local([out_path], data_dir=data_dir, overwrite=overwrite, **import_kw)
    with open(os.path.join(data_dir, FALLBACK_MARKER), "w", encoding="utf-8") as f:
        f.write(FALLBACK_BANNER + f"\n\nbuilt from {out_path}: {format_corpus_stats(corpus)}\n")
    return corpus, summary
