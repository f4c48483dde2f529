"""
Memory planning: what one process holds at the peak of a training step, estimated from the model and
the batch shape before anything is allocated. The training scripts print it (and `--dry-run` prints only
it), speedrun.sh picks the largest device batch that fits the GPU with it, and every CUDA run logs it
next to torch.cuda.max_memory_allocated() after its first steps.

The parts, in bytes per process (P = parameters, N = B*T tokens of one micro-batch, C = width, V = vocab):
- weights: fp32 master weights, 4P (autocast computes in bf16 from them)
- gradients: fp32, 4P; they live across the micro-steps of gradient accumulation
- optimizer: AdamW keeps two fp32 moments of the embedding and the unembedding (on every rank);
  Muon one fp32 momentum per matrix, only for the matrices this rank owns (index % world_size)
- activations: what autograd keeps for backward, N * n_layer * ACTIVATION_BYTES * C, plus bf16 copies
  of the weights that eager autocast makes (and keeps for backward)
- logits: N * V * LOGIT_BYTES: fp32 logits, their soft-capped copy, log-softmax and their gradients
  around the start of backward, the largest single item for big vocabularies

ACTIVATION_BYTES and LOGIT_BYTES are measured, not derived: the peak of the CPU allocator during training
steps (measure_training_peak below) over models of different depth, width and vocabulary, fitted per
(dtype, compiled); dev/bench_memory.py prints estimate against measurement, tests/test_memory.py checks
them. The per-layer figure is linear in C (flash-style attention keeps O(T) per token, no T x T scores).
On CUDA the same torch.compile partitioner decides what is saved, but kernels differ: every CUDA run
logs the ratio, and dev/gpu_check.sh checks it.
"""

import math

import torch

from nanochat.common import print0, training_dtype
from nanochat.tokenizer import get_tokenizer

# bytes per token, per layer, per unit of width, kept for backward; (compute dtype, compiled) ->
ACTIVATION_BYTES = {(torch.float32, False): 72, (torch.bfloat16, False): 48,
                    (torch.float32, True): 72, (torch.bfloat16, True): 50}
# bytes per token per vocabulary entry at the start of backward (compiled code fuses half of them away)
LOGIT_BYTES = {False: 16, True: 8}
EMBEDDING_BYTES = 12  # per token per unit of width: the normed embedding and final norm


def training_memory(model, device_batch_size, seq_len, world_size=1, dtype=torch.bfloat16, compiled=True):
    """
    Estimated peak bytes of one training process, by part: {"weights", "gradients", "optimizer",
    "activations", "logits", "total"}. `model` may live on the meta device (nothing is allocated);
    its gradient_checkpointing flag is honoured.
    """
    c = model.config
    tokens = device_batch_size * seq_len
    matrices = list(model.transformer.h.parameters())
    vectors = list(model.transformer.wte.parameters()) + list(model.lm_head.parameters())
    num_params = sum(p.numel() for p in model.parameters())
    # Muon deals matrices to ranks round robin; the busiest rank holds the most momentum
    owned = [sum(p.numel() for i, p in enumerate(matrices) if i % world_size == r) for r in range(world_size)]
    optimizer = 4 * (2 * sum(p.numel() for p in vectors) + max(owned))

    per_layer = ACTIVATION_BYTES[(dtype, compiled)] * c.n_embd * tokens
    if model.gradient_checkpointing:  # each block keeps its fp32 input; one block is recomputed at a time
        activations = c.n_layer * 4 * c.n_embd * tokens + per_layer
    else:
        activations = c.n_layer * per_layer
    activations += EMBEDDING_BYTES * c.n_embd * tokens
    if dtype != torch.float32 and not compiled:  # autocast's bf16 weight copies, saved for backward
        activations += 2 * (sum(p.numel() for p in matrices) + model.lm_head.weight.numel())
    parts = {"weights": 4 * num_params, "gradients": 4 * num_params, "optimizer": optimizer,
             "activations": activations, "logits": LOGIT_BYTES[compiled] * c.vocab_size * tokens}
    parts["total"] = sum(parts.values())
    return parts


def format_memory(parts):
    """'total 61.3 GB = weights 2.2 + gradients 2.2 + ...' (GB = 1e9 bytes)."""
    pieces = " + ".join(f"{name} {value / 1e9:.1f}" for name, value in parts.items() if name != "total")
    return f"{parts['total'] / 1e9:.1f} GB = {pieces}"


def shards_needed(tokens, chars_per_token=4.8, chars_per_shard=250e6, cropped_fraction=0.35):
    """
    FineWeb-Edu shards (~250M characters each) to read for `tokens` training tokens, plus the validation shard.
    4.8 characters per token is what the 65,536-token tokenizer gets on this data (scripts.tok_eval). Packing
    (nanochat.dataloader) discards the tail of a document that fits no row: at 2048-token rows about 35% of
    the tokens read (karpathy/nanochat reports ~35% for the same BOS-aligned best fit; base_train prints the
    share it sees), so the shards must hold tokens / (1 - 0.35), or the last third of the run repeats data.
    """
    return math.ceil(tokens / (1 - cropped_fraction) * chars_per_token / chars_per_shard) + 1


def cpu_peak_allocated(fn):
    """
    Peak bytes allocated on the CPU while fn() runs (tensors allocated inside it and still live), read from
    the profiler's allocator events: what the estimate is checked against where there is no CUDA allocator.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    def walk(nodes):
        for node in nodes:
            yield node
            yield from walk(node.children)

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [n for n in walk(prof.profiler.kineto_results.experimental_event_tree()) if n.tag == _EventType.Allocation]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_time_ns):
        live += event.extra_fields.alloc_size
        peak = max(peak, live)
    return peak


def measure_training_peak(config, device_batch_size, seq_len, dtype=torch.float32, compiled=False,
                          gradient_checkpointing=False):
    """
    What training_memory() estimates, measured on the CPU: build the model and optimizers, then two
    optimizer steps, the second accumulating two micro-batches (its second forward runs with gradients and
    optimizer state allocated: the real peak). A compiled model is compiled and warmed up outside the
    measurement. Returns (measured peak bytes, the model).
    """
    from nanochat.gpt import GPT
    from nanochat.optim import setup_optimizers
    x, y = torch.randint(0, config.vocab_size, (2, device_batch_size, seq_len)).unbind(0)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    built = {}

    def train():
        torch.manual_seed(0)
        model = GPT(config)
        model.init_weights()
        model.enable_gradient_checkpointing(gradient_checkpointing)
        optimizers = setup_optimizers(model)
        forward = torch.compile(model, dynamic=False) if compiled else model
        for micro_steps in (1, 2):
            for _ in range(micro_steps):
                with autocast:
                    loss = forward(x, y)
                (loss / micro_steps).backward()
            for opt in optimizers:
                opt.step()
            model.zero_grad(set_to_none=True)
        built["model"] = model

    if compiled:
        train()  # compilation allocates too: keep it out of the measurement
    return cpu_peak_allocated(train), built["model"]


PLANNING_VOCAB_SIZE = 65536  # what speedrun.sh trains the tokenizer to


def planned_vocab_size():
    """The trained tokenizer's vocabulary, or speedrun's before there is one (said once)."""
    try:
        return get_tokenizer().get_vocab_size()
    except FileNotFoundError:
        print0(f"no tokenizer yet: planning with a vocabulary of {PLANNING_VOCAB_SIZE:,}")
        return PLANNING_VOCAB_SIZE


def planned_dtype(device_type, requested="auto"):
    """A training run's compute dtype (--dtype); planning for CUDA on a machine without a GPU assumes bf16 for auto."""
    if device_type == "cuda" and not torch.cuda.is_available() and requested == "auto":
        return torch.bfloat16
    return training_dtype(requested, device_type)


def training_plan(model, device_batch_size, seq_len, world_size, grad_accum_steps, tokens_per_step, num_iterations,
                  dtype, compiled):
    """
    What a run will do and need, printed (rank 0) and returned as the dict `--dry-run` ends with as one
    JSON line. num_iterations may be None (unknown without the data): tokens and flops are then None.
    """
    memory = training_memory(model, device_batch_size, seq_len, world_size, dtype, compiled)
    tokens = None if num_iterations is None else num_iterations * tokens_per_step
    flops = None if tokens is None else model.estimate_flops() * tokens
    print0(f"estimated peak memory per process: {format_memory(memory)} "
           f"({str(dtype).removeprefix('torch.')}, {'compiled' if compiled else 'eager'}, "
           f"{device_batch_size} x {seq_len} tokens per micro-batch, {world_size} process(es))")
    return {"params": model.num_params(), "tokens": tokens, "flops": flops, "grad_accum_steps": grad_accum_steps,
            "peak_memory_gb_per_gpu": round(memory["total"] / 1e9, 2),
            "memory_gb": {k: round(v / 1e9, 2) for k, v in memory.items() if k != "total"}}


def log_peak_memory(device, estimate_bytes=None):
    """After the first steps of a CUDA run: what torch really allocated at the peak, next to the estimate."""
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device)
    estimate = "" if estimate_bytes is None else \
        f" (estimated {estimate_bytes / 1e9:.2f} GB, ratio {estimate_bytes / max(peak, 1):.2f})"
    print0(f"peak memory allocated: {peak / 1e9:.2f} GB{estimate}; "
           f"reserved {torch.cuda.max_memory_reserved(device) / 1e9:.2f} GB")
    return peak
