"""
CORE eval: prompt rendering, candidate scoring per task type (with a stub model whose choice is known),
the centered metric, bundle lookup/download/offline errors, and scripts.base_eval end to end on a tiny
checkpoint and a tiny bundle the tests write.
"""

import functools
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import zipfile
from types import SimpleNamespace

import pytest
import torch

from nanochat import core_eval
from nanochat.checkpoint_manager import save_checkpoint
from nanochat.core_eval import (
    EvalBundleError,
    centered_accuracy,
    evaluate_core,
    evaluate_task,
    get_eval_bundle_dir,
    load_core_tasks,
    load_task_rows,
    render_candidates,
    sample_fewshot,
    score_sequences,
    tokenize_candidates,
)
from nanochat.tokenizer import RustBPETokenizer
from tests.conftest import tiny_gpt

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = ("The cat sat on the mat. The dog ran home. Question: what is red? Answer: the apple. "
          "A zebra has stripes. The sun is hot and the snow is cold. Paris is the capital of France. ") * 20

MC_ROWS = [{"query": f"Question: what does animal {i} say?", "choices": ["meow", "woof"], "gold": i % 2}
           for i in range(6)]
SCHEMA_ROWS = [{"context_options": [f"The cat {i} sat", f"The dog {i} sat"], "continuation": "on the mat.",
                "gold": i % 2} for i in range(4)]
LM_ROWS = [{"context": f"Count: {i}, {i + 1},", "continuation": f"{i + 2}"} for i in range(5)]

# label -> (icl_task_type, dataset_uri, num_fewshot, continuation_delimiter or None, random baseline in percent, rows)
TINY_TASKS = {
    "tiny_mc": ("multiple_choice", "world/tiny_mc.jsonl", 1, "\nAnswer: ", 50, MC_ROWS),
    "tiny_schema": ("schema", "language/tiny_schema.jsonl", 0, None, 50, SCHEMA_ROWS),
    "tiny_lm": ("language_modeling", "symbolic/tiny_lm.jsonl", 2, None, 0, LM_ROWS),
    "tiny_missing": ("multiple_choice", "world/not_there.jsonl", 0, None, 25, None),
}


def write_bundle(root):
    """A bundle in the published layout: core.yaml, eval_meta_data.csv, eval_data/<category>/<task>.jsonl."""
    os.makedirs(root, exist_ok=True)
    yaml_lines = ["icl_tasks:"]
    csv_lines = ["Eval Task,Task Category,Task Type,#shots,#datapoints,Random baseline,Centered Metric?,Description"]
    for label, (task_type, uri, shots, delimiter, baseline, rows) in TINY_TASKS.items():
        yaml_lines += ["-", f"  label: {label}", f"  dataset_uri: {uri}", f"  num_fewshot: [{shots}]",
                       f"  icl_task_type: {task_type}"]
        if delimiter is not None:
            yaml_lines.append(f"  continuation_delimiter: {json.dumps(delimiter)}")
        csv_lines.append(f'{label},test,{task_type},{shots},{len(rows or [])},{baseline},,"a tiny task"')
        if rows is not None:
            path = os.path.join(root, "eval_data", uri)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write("".join(json.dumps(r) + "\n" for r in rows))
    with open(os.path.join(root, "core.yaml"), "w", encoding="utf-8") as f:
        f.write("\n".join(yaml_lines) + "\n")
    with open(os.path.join(root, "eval_meta_data.csv"), "w", encoding="utf-8") as f:
        f.write("\n".join(csv_lines) + "\n")
    return str(root)


@pytest.fixture(scope="module")
def tokenizer():
    return RustBPETokenizer.train_from_iterator(iter([CORPUS]), 300)


def tiny_model(tokenizer, sequence_len=64):
    return tiny_gpt(tokenizer.get_vocab_size(), sequence_len=sequence_len, n_layer=1)


def meta(task_type, num_fewshot=0, delimiter=" "):
    return dict(label="t", icl_task_type=task_type, num_fewshot=num_fewshot, continuation_delimiter=delimiter)


class PeekStub:
    """
    A stand-in model with a known preference: in rows containing a marker token it predicts every next
    token perfectly (it peeks at the input), elsewhere its logits are flat (argmax = token 0, loss log V).
    """

    def __init__(self, vocab_size, marker_ids, sequence_len=512):
        self.config = SimpleNamespace(sequence_len=sequence_len)
        self.vocab_size, self.marker_ids = vocab_size, torch.tensor(sorted(marker_ids))

    def __call__(self, idx):
        B, T = idx.shape
        logits = torch.zeros(B, T, self.vocab_size)
        logits[:, :-1].scatter_(2, idx[:, 1:].unsqueeze(-1), 20.0)
        has_marker = torch.isin(idx, self.marker_ids).any(dim=1)
        logits[~has_marker] = 0.0
        return logits


def zebra_stub(tokenizer, other_texts):
    """PeekStub favouring rows that mention 'zebra' (marker = its tokens that no other text uses)."""
    others = {t for text in other_texts for t in tokenizer.encode(text)}
    marker = set(tokenizer.encode(" zebra")) - others
    assert marker, "the word zebra must have a token the other texts lack"
    return PeekStub(tokenizer.get_vocab_size(), marker)


# -----------------------------------------------------------------------------
# prompts and tokens

def test_sample_fewshot_is_deterministic_distinct_and_excludes_the_example():
    for idx in range(10):
        shots = sample_fewshot(10, idx, 4)
        assert shots == sample_fewshot(10, idx, 4) and len(set(shots)) == 4 and idx not in shots
        assert all(0 <= s < 10 for s in shots)
    assert sorted(sample_fewshot(3, 1, 10)) == [0, 2]  # k is capped at the other rows
    assert sample_fewshot(1, 0, 5) == [] and sample_fewshot(10, 3, 0) == []
    assert any(sample_fewshot(50, i, 3, seed=1) != sample_fewshot(50, i, 3, seed=2) for i in range(5))


def test_render_candidates_with_fewshot_and_delimiters():
    mc_shot = {"query": "Q: 1+1?", "choices": ["3", "2"], "gold": 1}
    mc_row = {"query": "Q: 2+2?", "choices": ["4", "5"], "gold": 0}
    assert render_candidates(meta("multiple_choice", 1, "\nAnswer: "), mc_row, [mc_shot]) == [
        ("Q: 1+1?\nAnswer: 2\n\nQ: 2+2?\nAnswer: ", "4"), ("Q: 1+1?\nAnswer: 2\n\nQ: 2+2?\nAnswer: ", "5")]

    schema_shot = {"context_options": ["A cat", "A dog"], "continuation": "barks.", "gold": 1}
    schema_row = {"context_options": ["The sun", "The snow"], "continuation": "is cold.", "gold": 1}
    assert render_candidates(meta("schema", 1), schema_row, [schema_shot]) == [
        ("A dog barks.\n\nThe sun ", "is cold."), ("A dog barks.\n\nThe snow ", "is cold.")]

    lm_shots = [{"context": "1, 2,", "continuation": "3"}, {"context": "5, 6,", "continuation": "7"}]
    assert render_candidates(meta("language_modeling", 2), {"context": "8, 9,", "continuation": "10"}, lm_shots) == [
        ("1, 2, 3\n\n5, 6, 7\n\n8, 9, ", "10")]
    # the delimiter defaults to a space when a task does not give one
    lm_task = {"icl_task_type": "language_modeling"}
    assert render_candidates(lm_task, {"context": "a", "continuation": "b"}, []) == [("a ", "b")]


def test_tokenize_candidates_splits_at_the_continuation_and_truncates_from_the_left(tokenizer):
    bos = tokenizer.get_bos_token_id()
    context, continuation = "Question: what is red?\nAnswer: ", "the apple"
    [(ids, start)] = tokenize_candidates(tokenizer, [(context, continuation)])
    assert ids[0] == bos and ids[1:] == tokenizer.encode(context + continuation)
    assert tokenizer.decode(ids[start:]) == " the apple"  # the delimiter's space merges into the first word
    assert tokenizer.decode(ids[1:start]) == context.rstrip(" ")

    [(short, short_start)] = tokenize_candidates(tokenizer, [(context, continuation)], max_len=8)
    assert len(short) == 8 and short[0] == bos  # BOS kept, the oldest context tokens dropped
    assert short[short_start:] == ids[start:]


# -----------------------------------------------------------------------------
# scoring

@pytest.mark.parametrize("task_type", ["multiple_choice", "schema", "language_modeling"])
def test_stub_model_choice_is_scored_per_task_type(tokenizer, task_type):
    if task_type == "multiple_choice":  # same context, the zebra continuation is favoured
        rows = [{"query": "Which animal?", "choices": ["a cat", "a zebra", "a dog"], "gold": 1},
                {"query": "Which one?", "choices": ["a zebra", "a dog"], "gold": 0},
                {"query": "Which pet?", "choices": ["a zebra", "a cat"], "gold": 1}]  # the model is wrong here
        others = ["Which animal? a cat a dog Which one? Which pet?"]
    elif task_type == "schema":  # different contexts, same continuation: the zebra context is favoured
        rows = [{"context_options": ["The cat", "The zebra"], "continuation": "ran home.", "gold": 1},
                {"context_options": ["The zebra", "The dog"], "continuation": "sat on the mat.", "gold": 0},
                {"context_options": ["The zebra", "The cat"], "continuation": "is red.", "gold": 1}]
        others = ["The cat The dog ran home. sat on the mat. is red."]
    else:  # greedy decoding reproduces the continuation only in the zebra rows
        rows = [{"context": "A striped animal is a", "continuation": "zebra"},
                {"context": "The pet is a", "continuation": "cat"},
                {"context": "The capital of France is", "continuation": "Paris"}]
        others = ["A striped animal is a The pet is a cat The capital of France is Paris"]
    stub = zebra_stub(tokenizer, others)
    accuracy, cropped = evaluate_task(stub, tokenizer, meta(task_type), rows, "cpu")
    assert accuracy == pytest.approx(2 / 3 if task_type != "language_modeling" else 1 / 3) and cropped == 0
    # batching several examples into one forward changes nothing
    assert evaluate_task(stub, tokenizer, meta(task_type), rows, "cpu", batch_size=16) == (accuracy, 0)
    assert evaluate_task(stub, tokenizer, meta(task_type), rows, "cpu", max_examples=1)[0] in (0.0, 1.0)


def test_score_sequences_matches_the_model_loss_and_ignores_padding(tokenizer):
    model = tiny_model(tokenizer)
    seqs = tokenize_candidates(tokenizer, [("The cat sat on", " the mat."), ("Paris is the capital of", " France."),
                                           ("A", " zebra has stripes. The sun is hot and the snow is cold.")])
    mean_losses, all_match = score_sequences(model, seqs, tokenizer.get_bos_token_id(), "cpu")
    for (ids, start), batched in zip(seqs, mean_losses):
        x = torch.tensor([ids[:-1]])
        y = torch.tensor([[-1] * (start - 1) + ids[start:]])
        with torch.no_grad():
            expected = model(x, y).item()  # mean over the continuation targets only
        alone, _ = score_sequences(model, [(ids, start)], tokenizer.get_bos_token_id(), "cpu")
        assert batched == pytest.approx(expected, rel=1e-4) and alone[0] == pytest.approx(expected, rel=1e-4)
    assert all_match == [False, False, False]  # an untrained model does not reproduce text


def test_each_rank_takes_every_world_size_th_example_and_counts_are_summed(tokenizer, monkeypatch):
    seen, reduced = {}, []
    render = core_eval.render_candidates
    monkeypatch.setattr(core_eval, "render_candidates",
                        lambda task, row, shots: seen[rank].append(row["context"]) or render(task, row, shots))
    monkeypatch.setattr(core_eval.dist, "all_reduce", lambda counts: reduced.append(counts.tolist()))
    for rank in (0, 1):
        seen[rank] = []
        monkeypatch.setattr(core_eval, "_dist_rank_world", lambda: (rank, 2))
        evaluate_task(tiny_model(tokenizer), tokenizer, meta("language_modeling"), LM_ROWS, "cpu")
    assert seen[0] == [r["context"] for r in LM_ROWS[0::2]] and seen[1] == [r["context"] for r in LM_ROWS[1::2]]
    assert [total for _, _, total in reduced] == [3, 2]  # (correct, cropped, total) of each rank are all-reduced


def test_evaluate_task_real_model_all_task_types_and_batching_agree(tokenizer):
    model = tiny_model(tokenizer, sequence_len=32)  # short: the 1-2 shot prompts get truncated from the left
    cases = [("multiple_choice", MC_ROWS, 1), ("schema", SCHEMA_ROWS, 0), ("language_modeling", LM_ROWS, 2)]
    total_cropped = 0
    for task_type, rows, shots in cases:
        task = meta(task_type, shots)
        accuracy, cropped = evaluate_task(model, tokenizer, task, rows, "cpu")
        assert 0.0 <= accuracy <= 1.0 and 0 <= cropped <= len(rows)
        assert evaluate_task(model, tokenizer, task, rows, "cpu", batch_size=5) == (accuracy, cropped)
        assert evaluate_task(tiny_model(tokenizer, sequence_len=1024), tokenizer, task, rows, "cpu")[1] == 0
        total_cropped += cropped
    assert total_cropped > 0  # the 32-token context crops some few-shot prompts: counted


# -----------------------------------------------------------------------------
# the bundle and the CORE aggregate

def test_load_core_tasks_reads_yaml_and_baselines(tmp_path):
    tasks = {t["label"]: t for t in load_core_tasks(write_bundle(tmp_path / "bundle"))}
    assert list(tasks) == list(TINY_TASKS)
    assert tasks["tiny_mc"]["num_fewshot"] == 1 and tasks["tiny_mc"]["continuation_delimiter"] == "\nAnswer: "
    assert tasks["tiny_schema"]["continuation_delimiter"] == " " and tasks["tiny_missing"]["random_baseline"] == 0.25
    assert load_task_rows(tasks["tiny_schema"]) == SCHEMA_ROWS


def test_malformed_rows_are_refused_with_the_file_and_line(tmp_path):
    bundle = write_bundle(tmp_path / "bundle")
    path = os.path.join(bundle, "eval_data", "world", "tiny_mc.jsonl")
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"query": "no choices here", "gold": 0}) + "\n")
    task = next(t for t in load_core_tasks(bundle) if t["label"] == "tiny_mc")
    with pytest.raises(EvalBundleError, match=r"tiny_mc.jsonl:7 lacks \['choices'\]"):
        load_task_rows(task)
    with open(path, "w", encoding="utf-8") as f:
        f.write("{not json\n")
    with pytest.raises(EvalBundleError, match=r"tiny_mc.jsonl:1 is not valid JSON"):
        load_task_rows(task)
    with open(os.path.join(bundle, "core.yaml"), "w", encoding="utf-8") as f:
        f.write("icl_tasks:\n- dataset_uri: x.jsonl\n")
    with pytest.raises(EvalBundleError, match=r"core.yaml is malformed"):
        load_core_tasks(bundle)


def test_evaluate_core_skips_missing_files_and_marks_partial(tokenizer, tmp_path):
    bundle_dir = write_bundle(tmp_path / "bundle")
    out = evaluate_core(tiny_model(tokenizer), tokenizer, "cpu", bundle_dir=bundle_dir, max_per_task=3)
    assert list(out["results"]) == ["tiny_mc", "tiny_schema", "tiny_lm"]
    assert out["skipped"] == ["tiny_missing"] and out["partial"] is True
    assert out["examples"] == {"tiny_mc": 3, "tiny_schema": 3, "tiny_lm": 3}
    assert set(out["cropped"]) == set(out["examples"])
    assert out["core"] == pytest.approx(sum(out["centered"].values()) / 3)


def test_centered_metric_arithmetic(tmp_path, monkeypatch):
    assert centered_accuracy(0.25, 0.25) == 0.0 and centered_accuracy(1.0, 0.25) == 1.0
    assert centered_accuracy(0.5, 0.62) == pytest.approx(-0.12 / 0.38)
    accuracies = {"tiny_mc": 0.75, "tiny_schema": 0.5, "tiny_lm": 0.2}
    monkeypatch.setattr(core_eval, "evaluate_task", lambda model, tok, task, *a, **k: (accuracies[task["label"]], 0))
    out = evaluate_core(None, None, "cpu", bundle_dir=write_bundle(tmp_path / "bundle"))
    assert out["results"] == accuracies
    assert out["centered"] == pytest.approx({"tiny_mc": 0.5, "tiny_schema": 0.0, "tiny_lm": 0.2})
    assert out["core"] == pytest.approx(0.7 / 3)


# -----------------------------------------------------------------------------
# where the bundle comes from

def closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/eval_bundle.zip"  # nothing listens there: refused at once


def test_data_dir_mirror_is_used_first(tmp_path, monkeypatch):
    write_bundle(tmp_path / "mirror" / "core_eval_bundle")
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(tmp_path / "mirror"))
    assert get_eval_bundle_dir() == str(tmp_path / "mirror" / "core_eval_bundle")


def test_bundle_is_downloaded_once_and_unzipped(tmp_path, monkeypatch, isolated_base_dir):
    monkeypatch.delenv("NANOCHAT_DATA_DIR", raising=False)
    write_bundle(tmp_path / "serve" / "eval_bundle")
    with zipfile.ZipFile(tmp_path / "eval_bundle.zip", "w") as z:
        for folder, _, files in os.walk(tmp_path / "serve"):
            for name in files:
                z.write(os.path.join(folder, name), os.path.relpath(os.path.join(folder, name), tmp_path / "serve"))
    handler = functools.partial(QuietHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(core_eval, "BUNDLE_URL", f"http://127.0.0.1:{server.server_address[1]}/eval_bundle.zip")
        bundle_dir = get_eval_bundle_dir()
    finally:
        server.shutdown()
        server.server_close()
    assert bundle_dir == str(isolated_base_dir / "eval_bundle")
    assert [t["label"] for t in load_core_tasks(bundle_dir)] == list(TINY_TASKS)
    assert not [n for n in os.listdir(isolated_base_dir) if n.endswith(".tmp") or n.startswith(".eval_bundle-")]
    assert get_eval_bundle_dir() == bundle_dir  # the server is gone: the second call must not download


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_offline_without_bundle_says_what_to_do(monkeypatch, isolated_base_dir):
    monkeypatch.delenv("NANOCHAT_DATA_DIR", raising=False)
    monkeypatch.setattr(core_eval, "BUNDLE_URL", closed_port_url())
    monkeypatch.setattr(core_eval, "DOWNLOAD_ATTEMPTS", 1)
    with pytest.raises(EvalBundleError) as info:
        get_eval_bundle_dir()
    message = str(info.value)
    assert "downloading it failed" in message and "NANOCHAT_DATA_DIR" in message and "eval_bundle.zip" in message
    assert not os.path.exists(isolated_base_dir / "eval_bundle")


# -----------------------------------------------------------------------------
# scripts.base_eval

@pytest.fixture
def tiny_checkpoint(tokenizer, isolated_base_dir):
    """A tokenizer and a d1 base checkpoint (step 5) in $NANOCHAT_BASE_DIR."""
    tokenizer.save(str(isolated_base_dir / "tokenizer"))
    model = tiny_model(tokenizer)
    save_checkpoint(str(isolated_base_dir / "base_checkpoints" / "d1"), 5, model.state_dict(), None,
                    dict(model_config=model.config_dict(), user_config={"depth": 1}))
    return isolated_base_dir


def script_env(base_dir, data_dir=None):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT)
    env.pop("NANOCHAT_DATA_DIR", None)
    if data_dir:
        env["NANOCHAT_DATA_DIR"] = str(data_dir)
    return env


@pytest.mark.slow
def test_base_eval_script_end_to_end(tiny_checkpoint, tmp_path, run_main, monkeypatch):
    write_bundle(tmp_path / "mirror" / "core_eval_bundle")
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(tmp_path / "mirror"))
    output = run_main("scripts.base_eval", ["--max-per-task", "4", "--device-type", "cpu"])
    for text in ("tiny_mc", "tiny_schema", "tiny_lm", "CORE: ", "partial: 3 of 4 tasks",
                 "skipped (data file missing): tiny_missing"):
        assert text in output, text
    csv_path = tiny_checkpoint / "base_eval" / "d1_000005.csv"
    lines = csv_path.read_text().splitlines()
    assert lines[0] == "task,accuracy,centered,examples,cropped,status" and lines[-1].startswith("CORE,,")
    assert lines[-1].endswith(",partial") and any(line.startswith("tiny_missing,") for line in lines)
    report = (tiny_checkpoint / "report" / "base-model-evaluation.md").read_text()
    assert "## Base model evaluation" in report and "- CORE partial: True" in report and "| tiny_lm |" in report
    # the few-shot multiple-choice prompts do not fit the 64-token context: scored cropped, and counted
    assert "- examples: 12" in report and "- examples cropped to the context: 4" in report
    assert "4 examples (4 cropped to the 64-token context)" in output


def test_base_eval_missing_checkpoint_is_a_clear_error(isolated_base_dir, capsys):
    from scripts.base_eval import main
    assert main(["--device-type", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "error: no checkpoints directory" in out and "python -m scripts.base_train" in out


def test_base_eval_offline_without_bundle_is_a_clear_error(tiny_checkpoint, monkeypatch, capsys):
    from scripts.base_eval import main
    monkeypatch.delenv("NANOCHAT_DATA_DIR", raising=False)
    monkeypatch.setattr(core_eval, "BUNDLE_URL", closed_port_url())
    monkeypatch.setattr(core_eval, "DOWNLOAD_ATTEMPTS", 1)
    assert main(["--device-type", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "error: the CORE eval bundle is not at" in out and "NANOCHAT_DATA_DIR" in out


@pytest.mark.slow
def test_two_processes_give_the_same_core_as_one(tiny_checkpoint, tmp_path, run_main, monkeypatch):
    """torchrun with 2 gloo ranks: each takes half the examples; the all-reduced accuracies match one process."""
    write_bundle(tmp_path / "mirror" / "core_eval_bundle")
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(tmp_path / "mirror"))
    run_main("scripts.base_eval", ["--device-type", "cpu"])
    one_process = (tiny_checkpoint / "base_eval" / "d1_000005.csv").read_text()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = subprocess.run([*torchrun, "-m", "scripts.base_eval", "--device-type", "cpu"],
                            env=script_env(tiny_checkpoint, tmp_path / "mirror"), cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert (tiny_checkpoint / "base_eval" / "d1_000005.csv").read_text() == one_process


# -----------------------------------------------------------------------------
# the real bundle (only where the shared data mirror is available)

REAL_BUNDLE = os.path.join(os.environ.get("NANOCHAT_DATA_DIR", ""), "core_eval_bundle")


@pytest.mark.skipif(not os.environ.get("NANOCHAT_DATA_DIR") or not os.path.isdir(REAL_BUNDLE),
                    reason="needs NANOCHAT_DATA_DIR with core_eval_bundle/ (the shared data mirror)")
def test_real_bundle_tasks_present_and_skipped(tokenizer):
    tasks = load_core_tasks(REAL_BUNDLE)
    assert len(tasks) == 22
    missing = [t["label"] for t in tasks if not os.path.isfile(t["path"])]
    assert missing == ["hellaswag_zeroshot", "hellaswag", "squad", "coqa"]
    # every present file parses with its task type's fields, and 2 examples per task run end to end
    out = evaluate_core(tiny_model(tokenizer), tokenizer, "cpu", bundle_dir=REAL_BUNDLE, max_per_task=2)
    assert len(out["results"]) == 18 and out["skipped"] == missing and out["partial"]
    assert all(0.0 <= a <= 1.0 for a in out["results"].values())
