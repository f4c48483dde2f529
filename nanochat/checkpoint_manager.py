"""
Saving and loading checkpoints.

Layout: $NANOCHAT_BASE_DIR/<source>_checkpoints/<model_tag>/
    model_<step:06d>.pt          model weights (rank 0)
    optim_<step:06d>_rank<r>.pt  optimizer states of rank r: its own part of Muon's momentum; AdamW's state,
                                 the same on every rank, only in rank 0's file
    meta_<step:06d>.json         model_config, user_config, step, val_bpb, loop + dataloader state

Every file is written to a temporary name and renamed, and meta is written last (after a barrier under
torchrun) with the byte size of the model file, so a crash mid-save leaves no checkpoint that looks
complete; a truncated or corrupt file is refused with an error naming it.
"""

import glob
import json
import os
import re

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from nanochat.common import autocast_dtype, first_error, get_base_dir, logger
from nanochat.gpt import GPT, GPTConfig

if TYPE_CHECKING:  # annotations only: the tokenizer is imported where a model is loaded
    from nanochat.tokenizer import RustBPETokenizer

SOURCES = {"base": "base_checkpoints", "mid": "mid_checkpoints", "sft": "chatsft_checkpoints", "rl": "chatrl_checkpoints"}


class CheckpointError(RuntimeError):
    pass


def _atomic_torch_save(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_json_save(obj, path):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def save_checkpoint(checkpoint_dir, step, model_state, optimizer_states, meta, rank=0):
    """
    Rank 0 writes the model; every rank writes its optimizer states (a list; None entries are states this
    rank does not save, see optim.checkpoint_states; the whole list may be None). Under torchrun every rank
    must call this: meta, which marks the checkpoint complete, is written only after all ranks' files are.
    """
    os.makedirs(checkpoint_dir, exist_ok=True)
    model_path = os.path.join(checkpoint_dir, f"model_{step:06d}.pt")
    if rank == 0:
        _atomic_torch_save(model_state, model_path)
    if optimizer_states is not None:
        _atomic_torch_save(optimizer_states, os.path.join(checkpoint_dir, f"optim_{step:06d}_rank{rank}.pt"))
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    if rank == 0:
        meta = dict(meta, step=step, model_file_bytes=os.path.getsize(model_path))
        _atomic_json_save(meta, os.path.join(checkpoint_dir, f"meta_{step:06d}.json"))
        logger.info(f"saved checkpoint step {step} to {checkpoint_dir}")


def _torch_load(path, device):
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint file is missing: {path}")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint file is corrupt or partial and was not loaded: {path} ({e})") from e


def load_meta(checkpoint_dir, step):
    path = os.path.join(checkpoint_dir, f"meta_{step:06d}.json")
    if not os.path.exists(path):
        raise CheckpointError(f"no complete checkpoint for step {step}: {path} is missing")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint metadata is corrupt: {path} ({e})") from e


def load_checkpoint(checkpoint_dir, step, device, load_optimizer=False, rank=0):
    """Returns (model_state, optimizer_states or None, meta)."""
    meta = load_meta(checkpoint_dir, step)
    model_path = os.path.join(checkpoint_dir, f"model_{step:06d}.pt")
    expected = meta.get("model_file_bytes")
    if os.path.exists(model_path) and expected is not None and os.path.getsize(model_path) != expected:
        raise CheckpointError(f"checkpoint file is truncated: {model_path} has {os.path.getsize(model_path)} "
                              f"bytes, its metadata says {expected}")
    model_state = _torch_load(model_path, device)
    optimizer_states = None
    if load_optimizer:
        optimizer_states = _torch_load(os.path.join(checkpoint_dir, f"optim_{step:06d}_rank{rank}.pt"), device)
    return model_state, optimizer_states, meta


def restore_training_state(checkpoint_dir, step, model, optimizers, device, rank=0):
    """Resume: load a checkpoint's weights and this rank's optimizer states in place. Returns its meta."""
    model_state, optimizer_states, meta = load_checkpoint(checkpoint_dir, step, device, load_optimizer=True, rank=rank)
    if meta["model_config"] != model.config_dict():
        raise CheckpointError(f"checkpoint {checkpoint_dir} step {step} has model config {meta['model_config']}, "
                              f"the flags give {model.config_dict()}")
    model.load_state_dict(model_state)
    if any(state is None for state in optimizer_states):  # replicated states were saved once, by rank 0
        rank0_states = _torch_load(os.path.join(checkpoint_dir, f"optim_{step:06d}_rank0.pt"), device)
        optimizer_states = [mine if mine is not None else theirs for mine, theirs in zip(optimizer_states, rank0_states)]
    for optimizer, state in zip(optimizers, optimizer_states):
        optimizer.load_state_dict(state)
    return meta


def resume_training(checkpoint_dir, step, model, optimizers, device, rank=0):
    """
    restore_training_state on every rank or on none (a collective): (meta, None), or (None, the message of
    the first rank that could not resume). Every rank must call it.
    """
    meta, error = None, None
    try:
        meta = restore_training_state(checkpoint_dir, step, model, optimizers, device, rank)
    except CheckpointError as e:
        error = str(e)
    error = first_error(error)
    return (None, error) if error else (meta, None)


def find_last_step(checkpoint_dir):
    """The newest step with complete metadata."""
    steps = [int(m.group(1)) for f in glob.glob(os.path.join(checkpoint_dir, "meta_*.json"))
             if (m := re.fullmatch(r"meta_(\d+)\.json", os.path.basename(f)))]
    if not steps:
        raise CheckpointError(f"no checkpoints in {checkpoint_dir}")
    return max(steps)


def find_largest_model(checkpoints_dir):
    """Tags look like d20: pick the deepest; otherwise the most recently written tag."""
    if not os.path.isdir(checkpoints_dir):
        raise CheckpointError(f"no checkpoints directory {checkpoints_dir}")
    tags = [t for t in os.listdir(checkpoints_dir) if os.path.isdir(os.path.join(checkpoints_dir, t))]
    if not tags:
        raise CheckpointError(f"no model tags in {checkpoints_dir}")
    depths = {t: int(m.group(1)) for t in tags if (m := re.fullmatch(r"d(\d+)", t))}
    if depths:
        return max(depths, key=depths.get)
    return max(tags, key=lambda t: os.path.getmtime(os.path.join(checkpoints_dir, t)))


def build_model(checkpoint_dir: str, step: int, device: torch.device, phase: str,
                compute_dtype: torch.dtype | None = None) -> tuple[GPT, dict]:
    """
    Construct a GPT from a checkpoint. phase is "train" or "eval". Returns (model, meta). compute_dtype: what an
    eval model will compute in (default: the device's inference policy, common.autocast_dtype).
    """
    if phase not in ("train", "eval"):
        raise ValueError(f"phase must be 'train' or 'eval', got {phase!r}")
    model_state, _, meta = load_checkpoint(checkpoint_dir, step, device)
    # fp32 weights first, on every device, as training keeps them: a bf16 checkpoint (imported from a bf16 Hugging
    # Face export) would otherwise train without fp32 master weights, and where autocast is off (CPU inference,
    # GPUs before Ampere, --dtype float32) attention would mix dtypes
    model_state = {k: v.float() if v.dtype in (torch.bfloat16, torch.float16) else v for k, v in model_state.items()}
    model_state = {k.removeprefix("_orig_mod."): v for k, v in model_state.items()}  # torch.compile prefix
    if phase == "train":
        compute_dtype = torch.float32
    elif compute_dtype is None:
        compute_dtype = autocast_dtype(device.type)
    if compute_dtype != torch.float32:
        # inference where autocast computes in bf16 (GPUs from Ampere on): the matmul weights are stored in bf16,
        # the values autocast would cast them to at every forward (under inference_mode it caches none of
        # those casts: each decode step would read the fp32 weights, write and read bf16 copies, 4x the
        # weight traffic). The embedding stays fp32, so the residual stream, and every result, is unchanged.
        model_state = {k: v.to(compute_dtype) if v.dim() == 2 and k != "transformer.wte.weight" else v
                       for k, v in model_state.items()}
    if device.type == "cpu" and phase == "eval":
        # the unembedding (vocab, n_embd) laid out column-major, same values: x @ W^T then reads W^T contiguously,
        # which CPU GEMMs with a few rows (a decode batch, a speculative verify) do up to 2x faster
        # (dev/bench_matmul.py); training keeps the default layout (all-reduce wants contiguous gradients)
        model_state["lm_head.weight"] = model_state["lm_head.weight"].t().contiguous().t()
    config = GPTConfig(**meta["model_config"])
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()  # fills the non-persistent rotary buffers; weights are overwritten next
    try:
        model.load_state_dict(model_state, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {checkpoint_dir} step {step} does not match its config: {e}") from e
    model.train() if phase == "train" else model.eval()
    return model, meta


def find_checkpoint(source: str, model_tag: str | None = None, step: int | None = None) -> tuple[str, str, int]:
    """(checkpoint_dir, model_tag, step) of a source's checkpoint: the largest tag and newest step by default."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {list(SOURCES)}, got {source!r}")
    checkpoints_dir = os.path.join(get_base_dir(), SOURCES[source])
    model_tag = model_tag or find_largest_model(checkpoints_dir)
    checkpoint_dir = os.path.join(checkpoints_dir, model_tag)
    step = find_last_step(checkpoint_dir) if step is None else step
    return checkpoint_dir, model_tag, step


def find_meta(source, model_tag=None, step=None):
    """A checkpoint's metadata (model_config, ...) without loading its weights."""
    checkpoint_dir, _, step = find_checkpoint(source, model_tag, step)
    return load_meta(checkpoint_dir, step)


def load_model(source: str, device, phase: str, model_tag: str | None = None, step: int | None = None,
               compute_dtype: torch.dtype | None = None) -> tuple[GPT, "RustBPETokenizer", dict]:
    """load_model("base"|"mid"|"sft"|"rl", device, "eval") -> (model, tokenizer, meta); see build_model."""
    from nanochat.tokenizer import get_tokenizer
    checkpoint_dir, model_tag, step = find_checkpoint(source, model_tag, step)
    logger.info(f"loading {source} model {model_tag} step {step} from {checkpoint_dir}")
    model, meta = build_model(checkpoint_dir, step, torch.device(device), phase, compute_dtype)
    tokenizer = get_tokenizer()
    if tokenizer.get_vocab_size() != model.config.vocab_size:
        raise CheckpointError(f"tokenizer vocab ({tokenizer.get_vocab_size()}) does not match the model's "
                              f"({model.config.vocab_size}): the tokenizer in {get_base_dir()}/tokenizer was "
                              f"retrained after this model; retrain the model or restore the tokenizer")
    return model, tokenizer, meta


def load_draft(source: str, draft_tag: str | None, device,
               compute_dtype: torch.dtype | None = None) -> GPT | str | None:
    """
    The draft for speculative decoding (Engine's `draft`): None without a tag, "ngram" for the n-gram drafter,
    else the model `draft_tag` of the same source (it must share the target's tokenizer).
    """
    if draft_tag in (None, "ngram"):
        return draft_tag
    draft, _, _ = load_model(source, device, "eval", model_tag=draft_tag, compute_dtype=compute_dtype)
    return draft


def speculative_flags_error(proposals, draft_tag):
    """The message for bad --speculative-proposals / --draft-model-tag flags, or None."""
    if proposals < 0:
        return "--speculative-proposals must be >= 0"
    if proposals and not draft_tag:
        return "--speculative-proposals needs --draft-model-tag (a model tag or 'ngram')"
    return None
