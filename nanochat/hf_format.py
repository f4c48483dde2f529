"""
The Hugging Face NanoChat format: a directory that transformers' NanoChatForCausalLM (model_type "nanochat")
and AutoTokenizer load with no custom code, and so vLLM / SGLang / TGI serve through transformers.

    config.json              NanoChatConfig: sizes, rope_theta, logit soft-cap, special token ids
    generation_config.json   stop on <|assistant_end|> or <|bos|>, as our Engine does
    model.safetensors        weights under HF's names (see hf_weight_name)
    tokenizer.json           a `tokenizers` byte-level BPE giving our ids for every string
    tokenizer_config.json    special tokens and CHAT_TEMPLATE (renders exactly render_for_completion's ids)

Architecturally an MHA/GQA GPT is that model: RoPE (θ = 10000, pairs (x1, x2) = the two halves, rotated
then QK-normed), parameter-free RMSNorm also right after the embedding, ReLU² MLP of 4x the width, untied
unembedding, tanh logit soft-cap. MLA has no HF equivalent and is refused.

The tokenizer: ours is tiktoken's BPE over mergeable ranks (a token's id is its merge rank). HF's BPE
wants merges (pair of parts -> merged) instead; a token's merge is recovered by running BPE on its own
bytes with only lower-ranked tokens available, which leaves exactly two parts. Bytes map to printable
characters with GPT-2's byte-level alphabet. With merges in rank order and ignore_merges (a pre-token
that is itself in the vocabulary is one token, as tiktoken does) both encoders give the same ids.
"""

import json
import os
import shutil
import tempfile
from dataclasses import asdict

import torch

from nanochat.gpt import GPTConfig
from nanochat.tokenizer import SPECIAL_TOKENS, RustBPETokenizer

ROPE_THETA = 10000.0  # gpt.GPT._precompute_rotary's base
RMS_NORM_EPS = torch.finfo(torch.float32).eps  # F.rms_norm's default in float32
WEIGHTS_FILE = "model.safetensors"
EXPORT_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


class HFFormatError(ValueError):
    """A directory or checkpoint that cannot be converted; the message says why and what to do."""


# Renders a conversation as RustBPETokenizer.render_for_completion does (with add_generation_prompt) or
# render_conversation's ids (without): a leading system message joins the first user message after a blank
# line, roles alternate user/assistant, assistant content is a string or parts (text / python /
# python_output). Ids equal ours as long as message text holds no special-token string (HF's tokenizer turns
# "<|bos|>" written in a message into the special token, ours keeps such text as plain text) and no two text
# parts of an assistant message are adjacent (the template joins them into one string; ours encodes each
# part alone, so "hel" + "lo" splits differently; no dataset here has such parts).
CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='', first=0) -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set ns.system = messages[0]['content'] + '\n\n' -%}{%- set ns.first = 1 -%}"
    "{%- endif -%}"
    "<|bos|>"
    "{%- for message in messages[ns.first:] -%}"
    "{%- if message['role'] != ('user' if loop.index0 % 2 == 0 else 'assistant') -%}"
    "{{- raise_exception('after an optional system message, roles must alternate user/assistant, user first') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- '<|user_start|>' + (ns.system if loop.first else '') + message['content'] + '<|user_end|>' -}}"
    "{%- else -%}"
    "<|assistant_start|>"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- elif part['type'] == 'python' -%}{{- '<|python_start|>' + part['text'] + '<|python_end|>' -}}"
    "{%- elif part['type'] == 'python_output' -%}{{- '<|output_start|>' + part['text'] + '<|output_end|>' -}}"
    "{%- else -%}{{- raise_exception('unknown assistant part type ' + part['type']) -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "<|assistant_end|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant_start|>{%- endif -%}"
)


# ---------------------------------------------------------------------------------------------- tokenizer

def byte_alphabet():
    """GPT-2's byte-level alphabet: byte -> one printable character (printable bytes stand for themselves)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _merge_of(token, ranks):
    """The two parts BPE joins into token: BPE over its bytes using only tokens ranked below it."""
    limit = ranks[token]
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        candidates = [(ranks.get(parts[i] + parts[i + 1], limit), i) for i in range(len(parts) - 1)]
        rank, i = min(candidates)
        if rank >= limit:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2 or ranks.get(parts[0], limit) >= limit or ranks.get(parts[1], limit) >= limit:
        raise HFFormatError(f"token {token!r} (rank {limit}) is not a merge of two lower-ranked tokens")
    return parts[0], parts[1]


def tokenizer_to_hf(tokenizer: RustBPETokenizer):
    """Our tokenizer as a `tokenizers.Tokenizer` with the same ids for every string and special token."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    alphabet = byte_alphabet()

    def text(token):
        return "".join(alphabet[b] for b in token)

    ranks = tokenizer.mergeable_ranks
    by_rank = sorted(ranks, key=ranks.get)
    merges = [tuple(text(part) for part in _merge_of(token, ranks)) for token in by_rank if len(token) > 1]
    bpe = models.BPE(vocab={text(token): rank for token, rank in ranks.items()}, merges=merges,
                     ignore_merges=True)
    hf = Tokenizer(bpe)
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tokenizer.pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in SPECIAL_TOKENS])
    for name, token_id in tokenizer.special_tokens.items():
        if hf.token_to_id(name) != token_id:
            raise HFFormatError(f"special token {name} got id {hf.token_to_id(name)} in the HF tokenizer, "
                                f"ours is {token_id}")
    return hf


def _split_pattern(pre_tokenizer):
    """The regex of a byte-level pre-tokenizer: Sequence[Split(regex, isolated), ByteLevel(no regex)]."""
    steps = pre_tokenizer.get("pretokenizers", []) if pre_tokenizer and pre_tokenizer.get("type") == "Sequence" else []
    kinds = [step.get("type") for step in steps]
    if kinds != ["Split", "ByteLevel"] or "Regex" not in steps[0].get("pattern", {}) \
            or steps[0].get("behavior") != "Isolated" or steps[1].get("use_regex", True):
        raise HFFormatError(f"tokenizer.json pre-tokenizer is {kinds or pre_tokenizer}; nanochat reads a "
                            f"Sequence of Split(regex, Isolated) and ByteLevel(use_regex=false)")
    return steps[0]["pattern"]["Regex"]


def tokenizer_from_hf(tokenizer_json: dict) -> RustBPETokenizer:
    """The reverse of tokenizer_to_hf, from tokenizer.json's content; refuses layouts tiktoken can't reproduce."""
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise HFFormatError(f"tokenizer.json holds a {model.get('type')!r} model; nanochat reads byte-level BPE")
    pattern = _split_pattern(tokenizer_json.get("pre_tokenizer"))
    to_byte = {char: b for b, char in byte_alphabet().items()}
    try:
        ranks = {bytes(to_byte[char] for char in token): token_id for token, token_id in model["vocab"].items()}
    except KeyError as e:
        raise HFFormatError(f"tokenizer.json vocabulary has a character outside the byte-level alphabet: {e}") from None
    n = len(ranks)
    if sorted(ranks.values()) != list(range(n)):
        raise HFFormatError(f"tokenizer.json vocabulary ids are not 0..{n - 1}")
    merged = [("".join(m.split(" ", 1)) if isinstance(m, str) else "".join(m)) for m in model.get("merges", [])]
    merged_ids = [model["vocab"].get(token, -1) for token in merged]
    if merged_ids != sorted(merged_ids) or -1 in merged_ids:
        raise HFFormatError("tokenizer.json merges are not in the order of their tokens' ids; tiktoken's "
                            "rank-ordered BPE would encode differently")
    specials = {t.get("content"): t.get("id") for t in tokenizer_json.get("added_tokens", [])}
    expected = {name: n + i for i, name in enumerate(SPECIAL_TOKENS)}
    if {name: specials.get(name) for name in SPECIAL_TOKENS} != expected:
        raise HFFormatError(f"tokenizer.json special tokens must be {expected}, got {specials}")
    return RustBPETokenizer(ranks, pattern=pattern)


def tokenizer_config(tokenizer: RustBPETokenizer, max_length: int):
    """tokenizer_config.json: the special tokens by role, and the chat template."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>",
        "eos_token": "<|assistant_end|>",
        "pad_token": "<|bos|>",
        "add_bos_token": False,  # encode(text) has no BOS, as ours; the chat template writes it
        "model_max_length": max_length,
        "chat_template": CHAT_TEMPLATE,
    }


# ---------------------------------------------------------------------------------------------- model

def hf_config(config: GPTConfig, tokenizer: RustBPETokenizer, dtype: str):
    """config.json for NanoChatForCausalLM. MLA is refused: HF's NanoChat has MHA/GQA attention only."""
    if config.attention == "mla":
        raise HFFormatError("this model uses MLA attention, which the Hugging Face NanoChat architecture does "
                            "not have; only MHA and GQA models can be exported")
    bos, assistant_end = tokenizer.get_bos_token_id(), tokenizer.encode_special("<|assistant_end|>")
    return {
        "architectures": ["NanoChatForCausalLM"],
        "model_type": "nanochat",
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": 4 * config.n_embd,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "head_dim": config.n_embd // config.n_head,
        "max_position_embeddings": config.sequence_len,
        "hidden_act": "relu2",
        "rms_norm_eps": RMS_NORM_EPS,
        "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA},
        "final_logit_softcapping": config.logit_softcap,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "bos_token_id": bos,
        "eos_token_id": [assistant_end, bos],
        "pad_token_id": bos,
        "dtype": dtype,
    }


def gpt_config_from_hf(cfg: dict) -> GPTConfig:
    """Our GPTConfig from a NanoChat config.json; anything our GPT does not compute the same way is refused."""
    if cfg.get("model_type") != "nanochat":
        raise HFFormatError(f"config.json has model_type {cfg.get('model_type')!r}, expected 'nanochat'")
    try:
        n_embd, n_head = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        n_kv_head, n_layer = int(cfg.get("num_key_value_heads") or n_head), int(cfg["num_hidden_layers"])
        vocab_size = int(cfg["vocab_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise HFFormatError(f"config.json lacks or has a bad size field: {e}") from None
    rope = cfg.get("rope_parameters") or {"rope_theta": cfg.get("rope_theta", ROPE_THETA)}
    checks = {
        "intermediate_size": (cfg.get("intermediate_size"), 4 * n_embd),
        "head_dim": (cfg.get("head_dim") or n_embd // max(n_head, 1), n_embd // max(n_head, 1)),
        "hidden_act": (cfg.get("hidden_act", "relu2"), "relu2"),
        "rope_theta": (float(rope.get("rope_theta", ROPE_THETA)), ROPE_THETA),
        "rope_type": (rope.get("rope_type", "default"), "default"),
        "attention_bias": (bool(cfg.get("attention_bias", False)), False),
        "tie_word_embeddings": (bool(cfg.get("tie_word_embeddings", False)), False),
    }
    for name, (value, ours) in checks.items():
        if value != ours:
            raise HFFormatError(f"config.json {name} = {value!r}; nanochat's GPT computes {ours!r}")
    softcap = cfg.get("final_logit_softcapping")
    if not softcap:
        raise HFFormatError("config.json has no final_logit_softcapping; nanochat's GPT always soft-caps logits")
    attention = "mha" if n_kv_head == n_head else "gqa"
    try:
        return GPTConfig(sequence_len=int(cfg.get("max_position_embeddings", 2048)), vocab_size=vocab_size,
                         n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head, n_embd=n_embd, attention=attention,
                         logit_softcap=float(softcap))
    except ValueError as e:
        raise HFFormatError(f"config.json sizes are not a valid nanochat model: {e}") from None


# our name -> HF name; {i} is the layer
_LAYER_NAMES = {
    "attn.c_q.weight": "self_attn.q_proj.weight",
    "attn.c_k.weight": "self_attn.k_proj.weight",
    "attn.c_v.weight": "self_attn.v_proj.weight",
    "attn.c_proj.weight": "self_attn.o_proj.weight",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_proj.weight": "mlp.fc2.weight",
}


def hf_weight_names(n_layer: int):
    """{our parameter name: HF parameter name} for every weight of an MHA/GQA GPT."""
    names = {"transformer.wte.weight": "model.embed_tokens.weight", "lm_head.weight": "lm_head.weight"}
    for i in range(n_layer):
        for ours, theirs in _LAYER_NAMES.items():
            names[f"transformer.h.{i}.{ours}"] = f"model.layers.{i}.{theirs}"
    return names


# ---------------------------------------------------------------------------------------------- directories

def _write_json(obj, path):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def prepare_output_dir(out_dir: str, force: bool):
    """Refuse an existing non-empty directory (or a file) unless force; the caller writes to a temp dir first."""
    if os.path.isfile(out_dir):
        raise HFFormatError(f"{out_dir} is a file; give a directory to write the model into")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not force:
        raise HFFormatError(f"{out_dir} exists and is not empty; choose another directory or pass --force to "
                            f"replace its contents")


def replace_dir(tmp_dir: str, out_dir: str):
    """Move a fully written tmp_dir to out_dir, replacing what was there: no reader sees half a model."""
    if os.path.isdir(out_dir):
        old = out_dir.rstrip(os.sep) + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
        os.replace(tmp_dir, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp_dir, out_dir)


def export_dir(state_dict: dict, config: GPTConfig, tokenizer: RustBPETokenizer, out_dir: str,
               dtype: str = "bfloat16", force: bool = False):
    """Write the HF NanoChat directory for a model's weights (our names) and tokenizer."""
    from safetensors.torch import save_file

    if dtype not in EXPORT_DTYPES:
        raise HFFormatError(f"dtype must be one of {list(EXPORT_DTYPES)}, got {dtype!r}")
    prepare_output_dir(out_dir, force)
    config_json = hf_config(config, tokenizer, dtype)  # refuses MLA before anything is written
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise HFFormatError(f"tokenizer vocab ({tokenizer.get_vocab_size()}) does not match the model's "
                            f"({config.vocab_size})")
    state_dict = {k.removeprefix("_orig_mod."): v for k, v in state_dict.items()}
    names = hf_weight_names(config.n_layer)
    if set(state_dict) != set(names):
        raise HFFormatError(f"weights do not match an MHA/GQA GPT: unexpected {sorted(set(state_dict) - set(names))}, "
                            f"missing {sorted(set(names) - set(state_dict))}")
    weights = {names[k]: v.detach().to("cpu", EXPORT_DTYPES[dtype]).contiguous() for k, v in state_dict.items()}
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        save_file(weights, os.path.join(tmp_dir, WEIGHTS_FILE), metadata={"format": "pt"})
        _write_json(config_json, os.path.join(tmp_dir, "config.json"))
        _write_json({"bos_token_id": config_json["bos_token_id"], "eos_token_id": config_json["eos_token_id"],
                     "pad_token_id": config_json["pad_token_id"]}, os.path.join(tmp_dir, "generation_config.json"))
        tokenizer_to_hf(tokenizer).save(os.path.join(tmp_dir, "tokenizer.json"))
        _write_json(tokenizer_config(tokenizer, config.sequence_len), os.path.join(tmp_dir, "tokenizer_config.json"))
        replace_dir(tmp_dir, out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _read_json(path):
    if not os.path.isfile(path):
        raise HFFormatError(f"{path} is missing: not a Hugging Face model directory")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HFFormatError(f"{path} is not valid JSON ({e})") from None


def _read_weights(model_dir):
    """HF-named tensors from model.safetensors, or the shards listed in model.safetensors.index.json."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index_path = os.path.join(model_dir, WEIGHTS_FILE + ".index.json")
    files = sorted(set(_read_json(index_path).get("weight_map", {}).values())) if os.path.isfile(index_path) \
        else [WEIGHTS_FILE]
    weights = {}
    for name in files:
        path = os.path.join(model_dir, name)
        if not os.path.isfile(path):
            raise HFFormatError(f"{path} is missing (only safetensors weights are read, never pickles)")
        try:
            weights.update(load_file(path))
        except (SafetensorError, OSError) as e:
            raise HFFormatError(f"{path} is corrupt or truncated ({e})") from None
    return weights


def import_dir(model_dir: str) -> tuple[GPTConfig, dict, RustBPETokenizer]:
    """(GPTConfig, state dict under our names, RustBPETokenizer) from an HF NanoChat directory, all checked."""
    if not os.path.isdir(model_dir):
        raise HFFormatError(f"{model_dir} is not a directory")
    config = gpt_config_from_hf(_read_json(os.path.join(model_dir, "config.json")))
    tokenizer = tokenizer_from_hf(_read_json(os.path.join(model_dir, "tokenizer.json")))
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise HFFormatError(f"tokenizer.json has {tokenizer.get_vocab_size()} tokens, config.json vocab_size "
                            f"is {config.vocab_size}")
    weights = _read_weights(model_dir)
    names = hf_weight_names(config.n_layer)
    missing = sorted(set(names.values()) - set(weights))
    unexpected = sorted(set(weights) - set(names.values()))
    if missing or unexpected:
        raise HFFormatError(f"model weights do not match config.json: missing {missing[:5]}, "
                            f"unexpected {unexpected[:5]}")
    return config, {ours: weights[theirs] for ours, theirs in names.items()}, tokenizer


def _check_shapes(config: GPTConfig, state_dict: dict):
    from nanochat.gpt import GPT
    with torch.device("meta"):
        expected = GPT(config).state_dict()
    for name, tensor in state_dict.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise HFFormatError(f"weight {name} has shape {tuple(tensor.shape)}, config.json implies "
                                f"{tuple(expected[name].shape)}")


# ---------------------------------------------------------------------------------------------- our checkpoints

def export_checkpoint(source: str, out_dir: str, model_tag=None, step=None, dtype="bfloat16", force=False):
    """A checkpoint of ours (base/mid/sft/rl) -> an HF directory. Returns (model_tag, step)."""
    from nanochat.checkpoint_manager import find_checkpoint, load_checkpoint, load_meta
    from nanochat.tokenizer import get_tokenizer

    checkpoint_dir, model_tag, step = find_checkpoint(source, model_tag, step)
    config, tokenizer = GPTConfig(**load_meta(checkpoint_dir, step)["model_config"]), get_tokenizer()
    hf_config(config, tokenizer, dtype)  # refuses MLA before the weights are read
    state_dict, _, _ = load_checkpoint(checkpoint_dir, step, torch.device("cpu"))
    export_dir(state_dict, config, tokenizer, out_dir, dtype=dtype, force=force)
    return model_tag, step


def import_checkpoint(model_dir: str, source: str, model_tag: str, force=False):
    """
    An HF NanoChat directory -> our checkpoint <source>/<model_tag> at step 0, and its tokenizer as the
    project's tokenizer when there is none yet. A different tokenizer already in place is refused (the models
    trained with it would stop working); nothing is written unless everything was read and checked.
    Returns the checkpoint directory.
    """
    from nanochat.checkpoint_manager import SOURCES, save_checkpoint
    from nanochat.common import get_base_dir

    if source not in SOURCES:
        raise HFFormatError(f"source must be one of {list(SOURCES)}, got {source!r}")
    checkpoint_dir = os.path.join(get_base_dir(), SOURCES[source], model_tag)
    if os.path.isdir(checkpoint_dir) and os.listdir(checkpoint_dir) and not force:
        raise HFFormatError(f"{checkpoint_dir} already holds checkpoints; choose another --model-tag or pass "
                            f"--force to replace them")
    config, state_dict, tokenizer = import_dir(model_dir)
    _check_shapes(config, state_dict)
    tokenizer_dir = os.path.join(get_base_dir(), "tokenizer")
    if os.path.isdir(tokenizer_dir) and os.listdir(tokenizer_dir):
        current = RustBPETokenizer.from_directory(tokenizer_dir)
        if (current.mergeable_ranks, current.pattern) != (tokenizer.mergeable_ranks, tokenizer.pattern):
            raise HFFormatError(f"{tokenizer_dir} holds a different tokenizer, and models trained with it would "
                                f"stop working if it were replaced; import into a fresh base directory instead, "
                                f"e.g. NANOCHAT_BASE_DIR=~/.cache/nanochat-imported")
    else:
        tokenizer.save(tokenizer_dir)
    parent = os.path.dirname(checkpoint_dir)
    os.makedirs(parent, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=f".import-{model_tag}-", dir=parent)
    try:
        meta = {"model_config": asdict(config), "model_tag": model_tag,
                "user_config": {"imported_from": os.path.abspath(model_dir)}}
        save_checkpoint(tmp_dir, 0, state_dict, None, meta)
        replace_dir(tmp_dir, checkpoint_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return checkpoint_dir
