"""
The CORE metric (DCLM, arXiv:2406.11794) for base models: 22 in-context-learning tasks, each scored by
accuracy, centered against its random-guess baseline, then averaged.

The eval bundle holds
    core.yaml              icl_tasks: label, dataset_uri, num_fewshot [k], icl_task_type,
                           continuation_delimiter (default " "), has_categories (ignored)
    eval_meta_data.csv     "Eval Task" -> "Random baseline" (in percent)
    eval_data/<category>/<task>.jsonl, one example per line:
        multiple_choice    query, choices, gold      one context, one candidate continuation per choice
        schema             context_options, continuation, gold   one candidate context per option
        language_modeling  context, continuation     correct iff greedy decoding reproduces the continuation
It is found at $NANOCHAT_DATA_DIR/core_eval_bundle, else $NANOCHAT_BASE_DIR/eval_bundle (downloaded once).

How one example is scored: k few-shot examples from the same task (never the example itself) are
rendered "context<delimiter>continuation" and joined by blank lines in front of it; every candidate
becomes one BOS-prefixed token row; all candidates run in one forward pass; a multiple-choice or schema
example picks the candidate with the lowest mean cross-entropy (nats/token) over its continuation tokens.
"""

import csv
import json
import os
import random
import shutil
import tempfile
import time
import zipfile

import requests
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from filelock import FileLock

from nanochat.common import autocast_context, get_base_dir, get_data_dir, load_on_all_ranks, print0, progress

BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
DOWNLOAD_ATTEMPTS = 3
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
REQUIRED_FIELDS = {
    "multiple_choice": ("query", "choices", "gold"),
    "schema": ("context_options", "continuation", "gold"),
    "language_modeling": ("context", "continuation"),
}
EXAMPLE_SEPARATOR = "\n\n"  # between few-shot examples and before the example under test
FEWSHOT_SEED = 1234  # shots of example i come from random.Random(FEWSHOT_SEED + i): same on every rank
SUBSET_SEED = 42  # which examples --max-per-task keeps


class EvalBundleError(RuntimeError):
    """The eval bundle is missing, cannot be downloaded, or is malformed. The message says what to do."""


# -----------------------------------------------------------------------------
# finding / downloading the bundle

def bundle_help(dest_dir):
    return ("To get it, either\n"
            f"  - download {BUNDLE_URL} and unzip it so that {os.path.join(dest_dir, 'core.yaml')} exists, or\n"
            "  - set NANOCHAT_DATA_DIR to a local mirror holding core_eval_bundle/ "
            "(core.yaml, eval_meta_data.csv, eval_data/).")


def get_eval_bundle_dir():
    """The mirror's core_eval_bundle/ if there is one, else $NANOCHAT_BASE_DIR/eval_bundle (downloaded if absent)."""
    data_dir = get_data_dir()
    if data_dir and os.path.isfile(os.path.join(data_dir, "core_eval_bundle", "core.yaml")):
        return os.path.join(data_dir, "core_eval_bundle")
    dest_dir = os.path.join(get_base_dir(), "eval_bundle")
    if os.path.isfile(os.path.join(dest_dir, "core.yaml")):
        return dest_dir
    return download_eval_bundle(dest_dir)


def _fetch_with_retries(url, path):
    error = None
    for attempt in range(DOWNLOAD_ATTEMPTS):
        if attempt:
            time.sleep(2 ** attempt)  # 2 s, 4 s
        try:
            with requests.get(url, stream=True, timeout=60) as response:
                response.raise_for_status()
                with open(path, "wb") as f:
                    for chunk in response.iter_content(chunk_size=1 << 20):
                        f.write(chunk)
            return
        except (requests.RequestException, OSError) as e:
            error = e
    raise error


def _unpack_zip(zip_path, dest_dir):
    """Extract next to dest_dir, then rename the folder holding core.yaml into place (readers never see half)."""
    scratch = tempfile.mkdtemp(prefix=".eval_bundle-", dir=os.path.dirname(dest_dir))
    try:
        with zipfile.ZipFile(zip_path) as z:
            z.extractall(scratch)  # zipfile drops absolute paths and ".." components
        roots = [scratch] + [os.path.join(scratch, d) for d in sorted(os.listdir(scratch))]
        root = next((r for r in roots if os.path.isfile(os.path.join(r, "core.yaml"))), None)
        if root is None:
            raise EvalBundleError(f"{zip_path} has no core.yaml at its top level or one folder down")
        shutil.rmtree(dest_dir, ignore_errors=True)  # an incomplete leftover without core.yaml
        os.replace(root, dest_dir)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def download_eval_bundle(dest_dir, url=None):
    """Download + unzip the bundle into dest_dir once; a file lock makes torchrun ranks wait for one download."""
    url = url or BUNDLE_URL
    os.makedirs(os.path.dirname(dest_dir), exist_ok=True)
    with FileLock(dest_dir + ".lock"):
        if os.path.isfile(os.path.join(dest_dir, "core.yaml")):  # another process got it while we waited
            return dest_dir
        zip_tmp = dest_dir + ".zip.tmp"
        print0(f"downloading the CORE eval bundle from {url} ...")
        try:
            _fetch_with_retries(url, zip_tmp)
            _unpack_zip(zip_tmp, dest_dir)
        except (requests.RequestException, OSError, zipfile.BadZipFile) as e:
            raise EvalBundleError(f"the CORE eval bundle is not at {dest_dir} and downloading it failed ({e}).\n"
                                  + bundle_help(dest_dir)) from e
        finally:
            if os.path.exists(zip_tmp):
                os.remove(zip_tmp)
    return dest_dir


# -----------------------------------------------------------------------------
# reading the bundle

def _read_baselines(bundle_dir):
    """{task label: random-guess accuracy as a fraction} from eval_meta_data.csv (which stores percent)."""
    path = os.path.join(bundle_dir, "eval_meta_data.csv")
    if not os.path.isfile(path):
        raise EvalBundleError(f"the eval bundle has no {path}")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return {row["Eval Task"].strip(): float(row["Random baseline"]) / 100.0 for row in csv.DictReader(f)}
    except (KeyError, ValueError, AttributeError) as e:
        raise EvalBundleError(f"{path} is malformed: it needs 'Eval Task' and numeric 'Random baseline' "
                              f"columns ({e!r})") from e


def load_core_tasks(bundle_dir):
    """
    core.yaml -> [task dict]: label, path (of the jsonl), icl_task_type, num_fewshot (int),
    continuation_delimiter, random_baseline (fraction).
    """
    config_path = os.path.join(bundle_dir, "core.yaml")
    if not os.path.isfile(config_path):
        raise EvalBundleError(f"no eval bundle at {bundle_dir}: {config_path} is missing.\n" + bundle_help(bundle_dir))
    try:
        with open(config_path, encoding="utf-8") as f:
            entries = yaml.safe_load(f)["icl_tasks"]
        entries = [(e, e["label"], e["icl_task_type"], e["dataset_uri"]) for e in entries]
    except (yaml.YAMLError, KeyError, TypeError) as e:
        raise EvalBundleError(f"{config_path} is malformed: it needs icl_tasks entries with label, "
                              f"dataset_uri and icl_task_type ({e!r})") from e
    baselines = _read_baselines(bundle_dir)
    tasks = []
    for entry, label, task_type, uri in entries:
        if task_type not in TASK_TYPES:
            raise EvalBundleError(f"{config_path}: task {label} has icl_task_type {task_type!r}, "
                                  f"expected one of {TASK_TYPES}")
        if label not in baselines:
            raise EvalBundleError(f"task {label} has no 'Random baseline' row in {bundle_dir}/eval_meta_data.csv")
        shots = entry.get("num_fewshot", [0])
        tasks.append(dict(
            label=label,
            path=os.path.join(bundle_dir, "eval_data", uri),
            icl_task_type=task_type,
            num_fewshot=int(shots[0] if isinstance(shots, list) else shots),  # CORE uses one k per task
            continuation_delimiter=entry.get("continuation_delimiter", " "),
            random_baseline=baselines[label],
        ))
    return tasks


def load_task_rows(task_meta):
    """The task's jsonl as a list of dicts; every row is checked for the fields its task type needs."""
    fields = REQUIRED_FIELDS[task_meta["icl_task_type"]]
    rows = []
    with open(task_meta["path"], encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalBundleError(f"{task_meta['path']}:{line_number} is not valid JSON ({e})") from e
            missing = [k for k in fields if k not in row]
            if missing:
                raise EvalBundleError(f"{task_meta['path']}:{line_number} lacks {missing} "
                                      f"(a {task_meta['icl_task_type']} row needs {list(fields)})")
            rows.append(row)
    return rows


# -----------------------------------------------------------------------------
# prompts

def sample_fewshot(num_rows, idx, k, seed=FEWSHOT_SEED):
    """k distinct row indices != idx, the same for example idx on every run and rank."""
    k = min(k, num_rows - 1)
    if k <= 0:
        return []
    picks = random.Random(seed + idx).sample(range(num_rows - 1), k)
    return [p + (p >= idx) for p in picks]  # indices 0..n-2 mapped onto all rows but idx


def _shot_text(task_type, row, delimiter):
    """A solved example: the gold context and its continuation."""
    if task_type == "multiple_choice":
        return row["query"] + delimiter + row["choices"][row["gold"]]
    if task_type == "schema":
        return row["context_options"][row["gold"]] + delimiter + row["continuation"]
    return row["context"] + delimiter + row["continuation"]


def render_candidates(task_meta, row, shots):
    """-> [(context, continuation)], one per candidate; few-shot examples `shots` (rows) come first."""
    task_type = task_meta["icl_task_type"]
    delimiter = task_meta.get("continuation_delimiter", " ")
    prefix = "".join(_shot_text(task_type, s, delimiter) + EXAMPLE_SEPARATOR for s in shots)
    if task_type == "multiple_choice":
        return [(prefix + row["query"] + delimiter, choice) for choice in row["choices"]]
    if task_type == "schema":
        return [(prefix + context + delimiter, row["continuation"]) for context in row["context_options"]]
    return [(prefix + row["context"] + delimiter, row["continuation"])]


def _common_prefix_len(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def tokenize_candidates(tokenizer, pairs, max_len=None):
    """
    [(context, continuation)] -> [(ids, start)]: BOS + tokens of context+continuation, and where the
    continuation starts. The text is tokenized whole (a delimiter's trailing space merges into the next
    word, as in training text), so the continuation begins where those tokens part from the context's own.
    Rows longer than max_len lose tokens from the left, right after BOS, so the continuation stays whole.
    """
    texts = [text for context, continuation in pairs for text in (context, context + continuation)]
    encoded = tokenizer.encode(texts, prepend=tokenizer.get_bos_token_id())
    seqs = []
    for context_ids, ids in zip(encoded[0::2], encoded[1::2]):
        start = min(_common_prefix_len(context_ids, ids), len(ids) - 1)  # an empty continuation scores 1 token
        seqs.append(crop_left(ids, start, max_len))
    return seqs


def crop_left(ids, start, max_len):
    """(ids, start) with tokens dropped right after BOS until it fits max_len (None: no limit)."""
    if max_len is None or len(ids) <= max_len:
        return ids, start
    cut = len(ids) - max_len
    return ids[:1] + ids[1 + cut:], max(1, start - cut)


# -----------------------------------------------------------------------------
# scoring

@torch.no_grad()
def score_sequences(model, seqs, pad_id, device):
    """
    seqs: [(ids, start)]. One forward over all rows (right-padded: causal attention keeps pads out of
    real positions). Returns (mean continuation cross-entropy in nats per row, whether the greedy argmax
    reproduces every continuation token per row).
    """
    device = torch.device(device)
    tokens = torch.full((len(seqs), max(len(ids) for ids, _ in seqs)), pad_id, dtype=torch.long)
    rows, cols = [], []  # (row, position) of every logit that predicts a continuation token
    for i, (ids, start) in enumerate(seqs):
        tokens[i, :len(ids)] = torch.tensor(ids)
        rows.extend([i] * (len(ids) - start))
        cols.extend(range(start - 1, len(ids) - 1))
    tokens = tokens.to(device)
    rows, cols = torch.tensor(rows, device=device), torch.tensor(cols, device=device)
    with autocast_context(device.type):
        logits = model(tokens)  # (B, T, V)
    picked = logits[rows, cols].float()  # (M, V): only continuation positions, not B*T*V of softmax
    targets = tokens[rows, cols + 1]
    losses = F.cross_entropy(picked, targets, reduction="none")  # (M,)
    misses = (picked.argmax(dim=-1) != targets).float()
    zeros = torch.zeros(len(seqs), device=device)
    counts = torch.bincount(rows, minlength=len(seqs)).float()
    mean_losses = zeros.index_add(0, rows, losses) / counts
    all_match = zeros.index_add(0, rows, misses) == 0
    return mean_losses.tolist(), all_match.tolist()


def _is_correct(task_type, row, mean_losses, all_match):
    if task_type == "language_modeling":
        return all_match[0]
    best = min(range(len(mean_losses)), key=mean_losses.__getitem__)
    return best == row["gold"]


def _dist_rank_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def example_indices(num_rows, max_examples=None, seed=SUBSET_SEED):
    """All rows, or a fixed random subset of max_examples (in file order) so that small runs see every category."""
    if max_examples is None or max_examples >= num_rows:
        return list(range(num_rows))
    return sorted(random.Random(seed).sample(range(num_rows), max_examples))


def _batches(items, batch_size):
    """Group (row, seqs, cropped) items so a forward holds at most batch_size rows; one example is never split."""
    batch, num_rows = [], 0
    for item in items:
        if batch and batch_size is not None and num_rows + len(item[1]) > batch_size:
            yield batch
            batch, num_rows = [], 0
        batch.append(item)
        num_rows += len(item[1])
        if batch_size is None:
            yield batch
            batch, num_rows = [], 0
    if batch:
        yield batch


def _prepared_examples(model, tokenizer, task_meta, rows, indices):
    """(row, [(ids, start)] cropped to the context, whether any candidate had to be cropped) per example."""
    max_len = model.config.sequence_len
    for idx in progress(indices, task_meta["label"], unit="example"):
        shots = [rows[j] for j in sample_fewshot(len(rows), idx, task_meta["num_fewshot"])]
        seqs = tokenize_candidates(tokenizer, render_candidates(task_meta, rows[idx], shots))
        cropped = any(len(ids) > max_len for ids, _ in seqs)
        yield rows[idx], [crop_left(ids, start, max_len) for ids, start in seqs], cropped


def evaluate_task(model, tokenizer, task_meta: dict, rows: list[dict], device, max_examples: int | None = None,
                  batch_size: int | None = None) -> tuple[float, int]:
    """
    (accuracy, examples cropped) of the model on one task: an example longer than the model's context loses
    tokens from the left of its context and is still scored. Each rank evaluates examples rank::world and the
    counts are summed over ranks. batch_size: most token rows per forward (None: one example per forward).
    """
    task_type = task_meta["icl_task_type"]
    if task_type not in TASK_TYPES:
        raise ValueError(f"icl_task_type must be one of {TASK_TYPES}, got {task_type!r}")
    rank, world_size = _dist_rank_world()
    indices = example_indices(len(rows), max_examples)[rank::world_size]
    correct = cropped = 0
    pad_id = tokenizer.get_bos_token_id()  # pads sit after every real token: their value never matters
    for batch in _batches(_prepared_examples(model, tokenizer, task_meta, rows, indices), batch_size):
        mean_losses, all_match = score_sequences(model, [s for _, seqs, _ in batch for s in seqs], pad_id, device)
        offset = 0
        for row, seqs, was_cropped in batch:
            n = len(seqs)
            correct += _is_correct(task_type, row, mean_losses[offset:offset + n], all_match[offset:offset + n])
            cropped += was_cropped
            offset += n
    counts = torch.tensor([correct, cropped, len(indices)], dtype=torch.long, device=device)
    if world_size > 1:
        dist.all_reduce(counts)
    correct, cropped, total = counts.tolist()
    return (correct / total if total else float("nan")), cropped


# -----------------------------------------------------------------------------
# the CORE metric

def centered_accuracy(accuracy, random_baseline):
    """0 at random guessing, 1 at perfect: (acc - baseline) / (1 - baseline), baseline as a fraction."""
    return (accuracy - random_baseline) / (1.0 - random_baseline)


def evaluate_core(model, tokenizer, device, bundle_dir=None, max_per_task=None, batch_size=None):
    """
    Evaluate every CORE task whose file is present. Returns dict(results={label: accuracy},
    centered={label: centered accuracy}, core=mean centered accuracy (None if nothing ran),
    skipped=[labels whose data file is missing or empty], partial=bool(skipped), examples={label: n},
    cropped={label: examples longer than the context, scored on their cropped form}).
    """
    bundle_dir = bundle_dir or get_eval_bundle_dir()
    results, centered, examples, cropped, skipped = {}, {}, {}, {}, []
    for task in load_core_tasks(bundle_dir):
        label = task["label"]
        # rank 0 decides (a file missing on one node only would desynchronize the ranks' collectives)
        loaded, _ = load_on_all_ranks([(label, lambda: load_task_rows(task) if os.path.isfile(task["path"]) else [])])
        if not loaded:
            print0(f"{label}: skipped, {task['path']} is missing or empty")
            skipped.append(label)
            continue
        rows = loaded[0][1]
        t0 = time.time()
        accuracy, cropped[label] = evaluate_task(model, tokenizer, task, rows, device, max_per_task, batch_size)
        results[label] = accuracy
        centered[label] = centered_accuracy(accuracy, task["random_baseline"])
        examples[label] = len(example_indices(len(rows), max_per_task))
        note = f" ({cropped[label]} cropped to the {model.config.sequence_len}-token context)" if cropped[label] else ""
        print0(f"{label}: accuracy {accuracy:.4f} | centered {centered[label]:.4f} | "
               f"{examples[label]} examples{note}, {task['num_fewshot']}-shot | {time.time() - t0:.1f}s")
    core = sum(centered.values()) / len(centered) if centered else None
    return dict(results=results, centered=centered, core=core, skipped=skipped, partial=bool(skipped),
                examples=examples, cropped=cropped)
