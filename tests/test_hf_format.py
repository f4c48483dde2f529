"""
The Hugging Face NanoChat format: transformers loads an export with no custom code and computes what we do;
import is the exact inverse; bad input is refused with nothing half-written.
"""

import json
import os
from dataclasses import asdict

import pytest
import torch

from nanochat.checkpoint_manager import SOURCES, build_model, find_checkpoint, save_checkpoint
from nanochat.common import get_base_dir
from nanochat.engine import Engine
from nanochat.gpt import GPT, config_from_depth
from nanochat.hf_format import export_dir, import_dir, tokenizer_from_hf, tokenizer_to_hf
from nanochat.tokenizer import SPECIAL_TOKENS, RustBPETokenizer, get_tokenizer
from scripts import export_hf, import_hf

transformers = pytest.importorskip("transformers")

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 12:45 and we'll meet at 1,234,567 Main St.\n",
    "naïve café, Ünïcödé façade; 日本語のテキスト、中文字符 and emoji 🙂🚀 mixed in.\n",
    "def add(a, b):\n    return a + b\n\n\tprint(add(2, 3))  # tabs\tand   spaces\n",
    "Numbers: 0 1 22 333 4444 55555 3.14159 -42 1e10 0xFF\r\n\r\nWindows line ends.\n",
] * 40

TEXTS = [
    "Hello   world!!\n\n\n   indented",
    "café 🙂 12345678 日本語 ÿþ \x00\x01 control",
    "it's we'll they've I'M   \r\n\r\n  \t\t end",
    "  leading spaces and trailing   ",
    "".join(chr(c) for c in range(0x20, 0x250, 7)),
    "🚀🚀🚀 unseen: ωξψ Ж ﷽ 𝔘𝔫𝔦",
]


@pytest.fixture(scope="module")
def tok():
    return RustBPETokenizer.train_from_iterator(iter(CORPUS), 420)


def train_tiny(tok, attention, steps=40):
    """A d2 model that has learned something (greedy margins far above float noise), in a second."""
    config = config_from_depth(2, 256, tok.get_vocab_size(), attention=attention, head_dim=32)
    torch.manual_seed(0)
    model = GPT(config)
    model.init_weights()
    ids = torch.tensor(tok.encode("".join(CORPUS[:8]), prepend="<|bos|>"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 65, (8,), generator=g)
        batch = torch.stack([ids[s:s + 65] for s in starts.tolist()])
        loss = model(batch[:, :-1], targets=batch[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module", params=["mha", "gqa"])
def exported(request, tok, tmp_path_factory):
    model = train_tiny(tok, request.param)
    out = str(tmp_path_factory.mktemp(request.param) / "hf")
    export_dir(model.state_dict(), model.config, tok, out, dtype="float32")
    return model, out


def test_tokenizer_ids_equal_ours(tok):
    hf = tokenizer_to_hf(tok)
    for text in TEXTS + CORPUS[:4]:
        ours = tok.encode(text)
        assert hf.encode(text, add_special_tokens=False).ids == ours, text
        assert hf.decode(ours, skip_special_tokens=False) == tok.decode(ours)
    for name in SPECIAL_TOKENS:
        assert hf.token_to_id(name) == tok.encode_special(name)
    # special tokens between texts: each segment encoded alone, as render_conversation does
    text = "<|user_start|>2+2 = ?<|user_end|><|assistant_start|> 4<|assistant_end|>"
    special = tok.encode_special
    expected = ([special("<|user_start|>")] + tok.encode("2+2 = ?") + [special("<|user_end|>"),
                special("<|assistant_start|>")] + tok.encode(" 4") + [special("<|assistant_end|>")])
    assert hf.encode(text, add_special_tokens=False).ids == expected


def test_tokenizer_ids_equal_ours_on_real_text():
    data_dir = os.environ.get("NANOCHAT_DATA_DIR")
    wikitext = os.path.join(data_dir or "", "pretrain", "wikitext2")
    if not os.path.isdir(wikitext):
        pytest.skip("needs the dataset mirror: set NANOCHAT_DATA_DIR")
    train = open(os.path.join(wikitext, "valid.txt"), encoding="utf-8").read()
    held_out = open(os.path.join(wikitext, "test.txt"), encoding="utf-8").read()[:300_000]
    tok = RustBPETokenizer.train_from_iterator(iter([train[i:i + 10_000] for i in range(0, len(train), 10_000)]), 4096)
    hf = tokenizer_to_hf(tok)
    chunks = [held_out[i:i + 3000] for i in range(0, len(held_out), 3000)]
    assert [hf.encode(c, add_special_tokens=False).ids for c in chunks] == tok.encode(chunks)


def test_tokenizer_json_round_trip(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    tokenizer_to_hf(tok).save(str(path))
    back = tokenizer_from_hf(json.loads(path.read_text()))
    assert back.mergeable_ranks == tok.mergeable_ranks and back.pattern == tok.pattern
    assert back.special_tokens == tok.special_tokens


CONVERSATIONS = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What's 12 + 30?"}],
    [{"role": "user", "content": "café 🙂\n\n  spaces"}, {"role": "assistant", "content": [
        {"type": "text", "text": "Let me compute."}, {"type": "python", "text": "12*3"},
        {"type": "python_output", "text": "36"}, {"type": "text", "text": " It's 36."}]},
     {"role": "user", "content": "thanks"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "one turn"}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_renders_our_ids(exported, tok, messages):
    _, out = exported
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ours = tok.render_for_completion({"messages": messages + [{"role": "assistant", "content": ""}]})
    assert hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"] == ours
    full = messages + [{"role": "assistant", "content": "done."}]
    ids, _ = tok.render_conversation({"messages": full}, max_tokens=None)
    assert hf_tok.apply_chat_template(full, tokenize=True)["input_ids"] == ids


def test_chat_template_refuses_bad_roles(exported):
    hf_tok = transformers.AutoTokenizer.from_pretrained(exported[1])
    with pytest.raises(Exception, match="alternate"):
        hf_tok.apply_chat_template([{"role": "assistant", "content": "x"}], tokenize=False)


def test_hf_model_computes_our_logits_and_greedy_text(exported, tok):
    model, out = exported
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode(CORPUS[1] + CORPUS[2], prepend="<|bos|>")])
    with torch.no_grad():
        torch.testing.assert_close(hf_model(ids).logits, model(ids), rtol=1e-4, atol=1e-4)
    prompt = tok.encode("The quick brown", prepend="<|bos|>")
    ours, _ = Engine(model, tok).generate_batch(prompt, max_tokens=64, temperature=0.0)
    with torch.no_grad():
        theirs = hf_model.generate(torch.tensor([prompt]), max_new_tokens=64, do_sample=False)
    assert ours[0] == theirs[0].tolist()[:len(ours[0])]
    assert len(ours[0]) == len(prompt) + 64  # no early stop: all 64 greedy tokens compared


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_export_import_round_trip_is_bit_identical(tok, tmp_path, dtype):
    model = train_tiny(tok, "gqa", steps=2)
    out = str(tmp_path / "hf")
    export_dir(model.state_dict(), model.config, tok, out, dtype=dtype)
    config, state, back = import_dir(out)
    assert config == model.config
    assert back.mergeable_ranks == tok.mergeable_ranks
    for name, tensor in model.state_dict().items():
        assert torch.equal(state[name], tensor.to(getattr(torch, dtype))), name


def save_ours(model, tok, source="sft", tag="d2", step=7):
    """A checkpoint and the project tokenizer in the test's NANOCHAT_BASE_DIR."""
    tok.save(os.path.join(get_base_dir(), "tokenizer"))
    checkpoint_dir = os.path.join(get_base_dir(), SOURCES[source], tag)
    save_checkpoint(checkpoint_dir, step, model.state_dict(), None, {"model_config": asdict(model.config)})
    return checkpoint_dir


def test_scripts_round_trip(tok, tmp_path, capsys, monkeypatch):
    model = train_tiny(tok, "mha", steps=2)
    save_ours(model, tok)
    out = str(tmp_path / "export")
    assert export_hf.main(["-i", "sft", "-g", "d2", "--out", out, "--dtype", "float32"]) == 0
    assert "exported sft model d2 step 7" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors",
                                       "tokenizer.json", "tokenizer_config.json"]
    assert import_hf.main([out, "--model-tag", "d2-back", "--source", "base"]) == 0
    checkpoint_dir, _, step = find_checkpoint("base", "d2-back")
    back, meta = build_model(checkpoint_dir, step, torch.device("cpu"), "eval")
    assert meta["model_config"] == asdict(model.config) and meta["user_config"]["imported_from"] == out
    for (name, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name
    # importing into a base directory without a tokenizer installs the model's
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "fresh"))
    assert import_hf.main([out, "--model-tag", "d2"]) == 0
    assert get_tokenizer().mergeable_ranks == tok.mergeable_ranks


def error_of(main, argv, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def test_export_refusals_write_nothing(tok, tmp_path, capsys):
    out = tmp_path / "out"
    assert "no checkpoints" in error_of(export_hf.main, ["-i", "sft", "--out", str(out)], capsys)
    assert not out.exists()
    mla = GPT(config_from_depth(2, 64, tok.get_vocab_size(), attention="mla", head_dim=32))
    mla.init_weights()
    save_ours(mla, tok, tag="mla")
    assert "MLA" in error_of(export_hf.main, ["-i", "sft", "-g", "mla", "--out", str(out)], capsys)
    assert not out.exists()
    save_ours(train_tiny(tok, "mha", steps=1), tok)
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "--force" in error_of(export_hf.main, ["-i", "sft", "-g", "d2", "--out", str(out)], capsys)
    assert os.listdir(out) == ["keep.txt"]
    assert export_hf.main(["-i", "sft", "-g", "d2", "--out", str(out), "--force"]) == 0
    assert "keep.txt" not in os.listdir(out) and "model.safetensors" in os.listdir(out)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".export-") or p.endswith(".old")]


def corrupt_truncated_weights(out):
    path = os.path.join(out, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def corrupt_config(out):
    with open(os.path.join(out, "config.json"), "w") as f:
        f.write("{not json")


def corrupt_mlp_size(out):
    path = os.path.join(out, "config.json")
    config = json.load(open(path))
    config["intermediate_size"] += 64
    json.dump(config, open(path, "w"))


def corrupt_missing_tokenizer(out):
    os.remove(os.path.join(out, "tokenizer.json"))


def corrupt_weight_shape(out):
    from safetensors.torch import load_file, save_file
    path = os.path.join(out, "model.safetensors")
    weights = load_file(path)
    weights["lm_head.weight"] = weights["lm_head.weight"][:, :-1].contiguous()
    save_file(weights, path)


@pytest.mark.parametrize("corrupt, message", [
    (corrupt_truncated_weights, "corrupt or truncated"),
    (corrupt_config, "not valid JSON"),
    (corrupt_mlp_size, "intermediate_size"),
    (corrupt_missing_tokenizer, "tokenizer.json is missing"),
    (corrupt_weight_shape, "lm_head.weight has shape"),
])
def test_import_refuses_a_corrupt_directory(tok, tmp_path, capsys, corrupt, message):
    out = str(tmp_path / "hf")
    export_dir(train_tiny(tok, "mha", steps=1).state_dict(), config_from_depth(2, 256, tok.get_vocab_size(),
               head_dim=32), tok, out, dtype="float32")
    corrupt(out)
    assert message in error_of(import_hf.main, [out, "--model-tag", "x"], capsys)
    assert not [f for _, _, files in os.walk(get_base_dir()) for f in files]  # no tokenizer, checkpoint, temp file


def test_import_refuses_a_different_tokenizer_and_an_existing_tag(tok, tmp_path, capsys):
    model = train_tiny(tok, "mha", steps=1)
    out = str(tmp_path / "hf")
    export_dir(model.state_dict(), model.config, tok, out, dtype="float32")
    save_ours(model, tok, tag="taken")
    assert "--force" in error_of(import_hf.main, [out, "--model-tag", "taken"], capsys)
    other = RustBPETokenizer.train_from_iterator(iter(CORPUS[:2] * 3), 300)
    other.save(os.path.join(get_base_dir(), "tokenizer"))
    assert "different tokenizer" in error_of(import_hf.main, [out, "--model-tag", "new"], capsys)
    assert not os.path.exists(os.path.join(get_base_dir(), SOURCES["sft"], "new"))
