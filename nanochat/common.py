"""
Things every stage needs: where files live, which device to run on, distributed set-up, logging.
"""

import ctypes
import dataclasses
import json
import logging
import os
import shutil

import torch
import torch.distributed as dist

logger = logging.getLogger("nanochat")
if not logger.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)

DEVICE_TYPES = ("cuda", "mps", "cpu")


def get_base_dir():
    """Everything the runs produce or download lives here (NANOCHAT_BASE_DIR, default ~/.cache/nanochat)."""
    base_dir = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    os.makedirs(base_dir, exist_ok=True)
    return base_dir


def get_data_dir():
    """The optional local mirror of public datasets (NANOCHAT_DATA_DIR), or None."""
    data_dir = os.environ.get("NANOCHAT_DATA_DIR")
    if data_dir and os.path.isdir(data_dir):
        return data_dir
    return None


def read_jsonl(path):
    """A JSON Lines file as a list of its records (blank lines skipped)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_json_object(path):
    """A JSON file whose top level is an object, as a dict; ValueError naming the file (and line) otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level")  # noqa: TRY004 (callers catch ValueError)
    return data


def check_known_fields(data, config_class, where):
    """ValueError for the first key of data that is not a field of the dataclass config_class (a typo'd setting)."""
    known = {f.name for f in dataclasses.fields(config_class)}
    for name in data:
        if name not in known:
            raise ValueError(f"{where}: unknown field {name!r}")


def format_duration(seconds):
    """Seconds as '2m05s', or '1h02m05s' from an hour on (progress lines, summaries, the report)."""
    seconds = int(round(seconds))
    minutes = f"{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{minutes}" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def autodetect_device_type():
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def get_dist_info() -> tuple[bool, int, int, int]:
    """(is_ddp, rank, local_rank, world_size) from the variables torchrun sets."""
    if all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1


def is_main_process():
    return get_dist_info()[1] == 0


def progress(iterable, desc, total=None, unit="it"):
    """A progress bar (tqdm, on stderr) over iterable for long evaluations: on the main process only, and
    gone once done so that the result line printed after it stands alone."""
    from tqdm import tqdm
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True, mininterval=1.0,
                disable=not is_main_process())


def print0(*args, **kwargs):
    if is_main_process():
        print(*args, **kwargs, flush=True)


CPU_HEAP_KEEP_BYTES = 1 << 30


def keep_freed_memory():
    """
    CPU tensors come from glibc's malloc, which by default gives every allocation over 128 KiB its own
    fresh pages (mmap) and hands freed memory back to the OS: each training step then page-faults its
    activations in again, zero-filled by the kernel. Raising both thresholds to 1 GiB keeps freed memory
    for reuse (resident memory stays at the peak, which a training run reaches anyway). d4 bf16 training on
    2 cores: 1,166 vs 400-585 tok/s, the system time halved. A no-op off glibc; returns whether it applied.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>
        mmap_set = libc.mallopt(M_MMAP_THRESHOLD, CPU_HEAP_KEEP_BYTES)
        return bool(mmap_set and libc.mallopt(M_TRIM_THRESHOLD, CPU_HEAP_KEEP_BYTES))
    except (OSError, AttributeError):  # not Linux/glibc (macOS, musl): nothing to tune
        return False


def compute_init(device_type: str | None = None, seed: int = 42) -> tuple[bool, int, int, int, torch.device]:
    """
    Pick the device, seed, and join the process group when launched by torchrun.
    Returns (is_ddp, rank, local_rank, world_size, device).
    """
    device_type = device_type or autodetect_device_type()
    if device_type not in DEVICE_TYPES:
        raise ValueError(f"--device-type must be one of {DEVICE_TYPES}, got {device_type!r}")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device-type cuda was requested but torch sees no CUDA GPU (torch.cuda.is_available() is False)")
    if device_type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device-type mps was requested but MPS is not available on this machine")

    torch.manual_seed(seed)
    if device_type == "cpu":
        keep_freed_memory()
    if device_type == "cuda":
        torch.cuda.manual_seed(seed)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    is_ddp, rank, local_rank, world_size = get_dist_info()
    if is_ddp and device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl", device_id=device)
    elif is_ddp:
        device = torch.device(device_type)
        dist.init_process_group(backend="gloo")
    else:
        device = torch.device(device_type)
    if is_ddp:
        dist.barrier()
    return is_ddp, rank, local_rank, world_size, device


def broadcast_parameters(model):
    """Every rank takes rank 0's parameters and buffers (after a fresh init or a resume; a no-op alone)."""
    if dist.is_available() and dist.is_initialized():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)


def gather_from_ranks(value):
    """[value of rank 0, value of rank 1, ...] under torchrun (any picklable value); [value] alone."""
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def first_error(error):
    """
    Every rank passes its error message (None when fine) and gets the first one of any rank, the same on
    all ranks: a rank that fails alone and exits would leave the others waiting in their next collective
    until the NCCL timeout, so all ranks stop together instead.
    """
    errors = gather_from_ranks(error)
    for rank, e in enumerate(errors):
        if e is not None:
            return e if len(errors) == 1 else f"rank {rank}: {e}"
    return None


class DataMismatch(RuntimeError):
    """The ranks of one torchrun job could not load the same data (they would desynchronize and hang)."""


LOAD_ERRORS = (RuntimeError, FileNotFoundError, OSError)  # tasks.common.DatasetUnavailable is a RuntimeError


def load_on_all_ranks(candidates):
    """
    candidates: [(name, zero-argument constructor)]. Each rank builds them, then rank 0 decides for all
    (under torchrun): a task rank 0 could not load is skipped on every rank; a task rank 0 loaded but
    another rank could not, or loaded with a different length, raises DataMismatch on every rank. Ranks
    stepping through different data would disagree on their number of collectives and hang.
    Returns ([(name, task)], [(name, why skipped)]), in candidate order, the same on every rank.
    """
    built, report = {}, []
    for name, build in candidates:
        try:
            task = build()
        except LOAD_ERRORS as e:
            report.append((name, None, str(e).splitlines()[0] if str(e) else type(e).__name__))
            continue
        built[name] = task
        report.append((name, len(task), None if len(task) else "no examples"))
    reports = gather_from_ranks(report)
    for rank, theirs in enumerate(reports[1:], start=1):
        for (name, length, _), (_, their_length, reason) in zip(reports[0], theirs):
            if length and their_length != length:
                problem = reason or f"{their_length} examples where rank 0 has {length}"
                raise DataMismatch(f"{name}: rank {rank} cannot load what rank 0 loaded ({problem}); the ranks would "
                                   f"train or evaluate on different data. Give every rank the same data (the same "
                                   f"NANOCHAT_DATA_DIR, hub access or cache) and run again.")
    used = [(name, built[name]) for name, length, _ in reports[0] if length]
    skipped = [(name, reason) for name, length, reason in reports[0] if not length]
    return used, skipped


def print_all(*args):
    """print on every rank, prefixed by the rank under torchrun (errors each rank must show)."""
    is_ddp, rank, _, _ = get_dist_info()
    print(*([f"[rank {rank}]"] if is_ddp else []), *args, flush=True)


def compute_cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


_said_dtype = set()


def has_native_bf16(device_type):
    """
    bf16 matmuls at full speed: CUDA compute capability >= 8.0 (A100, H100, L40S, RTX 30xx/40xx), or an x86
    CPU with AVX512-BF16 or AMX. Elsewhere bf16 is emulated (older GPUs, other CPUs) and slower than fp32.
    """
    if device_type == "cuda":
        return torch.cuda.get_device_capability() >= (8, 0)
    if device_type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def autocast_dtype(device_type):
    """
    Dtype policy: bf16 autocast (fp32 master weights) on GPUs with native bf16 tensor cores, i.e. compute
    capability >= 8.0 (A100, H100, L40S, RTX 30xx/40xx); fp32 everywhere else. Older GPUs (V100, T4) report
    torch.cuda.is_bf16_supported() through emulation, which is slow and has no fused attention kernel:
    at 2048 tokens the fallback attention would run out of memory, so they train and serve in fp32.
    On CPU inference stays in fp32 (training picks bf16 where the CPU has it: training_dtype).
    """
    dtype = torch.float32
    if device_type == "cuda" and has_native_bf16("cuda"):
        dtype = torch.bfloat16
    if device_type not in _said_dtype:
        _said_dtype.add(device_type)
        if device_type == "cuda" and dtype == torch.float32:
            major, minor = torch.cuda.get_device_capability()
            print0(f"note: {torch.cuda.get_device_name()} (compute capability {major}.{minor}) has no native bf16: "
                   f"computing in fp32 (slower, but no emulated bf16 or unfused attention)")
    return dtype


DTYPE_CHOICES = ("auto", "float32", "bfloat16")


def training_dtype(requested, device_type):
    """
    The training scripts' --dtype: "auto" is bf16 autocast (fp32 master weights) wherever the device has
    native bf16, CPUs with AVX512-BF16/AMX included (d4 on 2 such cores: 1.57-1.70x the tokens/s of fp32,
    losses within 0.013 over 60 steps), else fp32. Inference keeps autocast_dtype's policy.
    """
    if requested not in DTYPE_CHOICES:
        raise ValueError(f"dtype must be one of {DTYPE_CHOICES}, got {requested!r}")
    if requested == "auto":
        return torch.bfloat16 if has_native_bf16(device_type) else torch.float32
    return getattr(torch, requested)


def autocast_context(device_type, dtype=None):
    """
    torch.autocast in dtype (default: the inference policy above); a no-op context in fp32. Reusable
    across `with` blocks.
    """
    dtype = autocast_dtype(device_type) if dtype is None else dtype
    return torch.amp.autocast(device_type=device_type, dtype=dtype, enabled=dtype != torch.float32)


COMPILE_MODES = ("auto", "none", "default", "reduce-overhead", "max-autotune")


# CPU runs this long compile under --compile-mode auto (see resolve_compile_mode)
CPU_COMPILE_MIN_STEPS = 500


def resolve_compile_mode(mode, device_type, num_iterations=None):
    """
    --compile-mode auto: torch.compile ("default") on CUDA. On a CPU, for runs of at least
    CPU_COMPILE_MIN_STEPS optimizer steps when a C++ compiler is at hand (inductor builds C++ kernels): the
    compile time is won back there. Measured with d4 (dev/bench_train.py, and base_train with the runcpu flags)
    on two 2-core CPUs: compiling took ~2 minutes / 12 s up front, then bf16 trained 1.14x / 1.36x faster than
    eager, so the 500-step runcpu pretraining finishes sooner compiled on both; shorter runs stay eager.
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")
    if mode != "auto":
        return mode
    if device_type == "cuda":
        return "default"
    long_run = device_type == "cpu" and (num_iterations or 0) >= CPU_COMPILE_MIN_STEPS
    return "default" if long_run and cxx_compiler() else "none"


def cxx_compiler():
    """The C++ compiler torch inductor would use on a CPU ($CXX, else g++ / c++ / clang++), or None."""
    candidates = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    return next((path for path in map(shutil.which, candidates) if path), None)


def compile_model(model, mode):
    """
    The model itself for mode "none", else torch.compile with fixed shapes (every batch has the same shape).
    NANOCHAT_COMPILE_BACKEND picks another backend than inductor: the tests use "eager", which has the same
    guards, hence the same recompilations, without minutes of C++ compilation on a CPU.
    """
    if mode == "none":
        return model
    backend = os.environ.get("NANOCHAT_COMPILE_BACKEND", "inductor")
    if backend != "inductor":  # modes are inductor's
        return torch.compile(model, backend=backend, dynamic=False)
    return torch.compile(model, mode=mode, dynamic=False)


def synchronize(device_type):
    if device_type == "cuda":
        torch.cuda.synchronize()
    elif device_type == "mps":
        torch.mps.synchronize()


# Dense (no sparsity) tensor-core peak FLOP/s in the dtype the policy computes in, by a substring of
# torch.cuda.get_device_name(), most specific first ("h100 nvl" before "h100", "l40s" before "l40").
PEAK_BF16_FLOPS = (("gb200", 2.5e15), ("b200", 2.25e15), ("h200", 989e12), ("gh200", 989e12),
                   ("h100 nvl", 835e12), ("h100 pcie", 756e12), ("h100", 989e12), ("h800", 989e12),
                   ("a100", 312e12), ("a800", 312e12), ("l40s", 362e12), ("l40", 181e12), ("l4", 121e12),
                   ("a6000", 155e12), ("4090", 165e12), ("a10g", 70e12), ("a10", 125e12), ("3090", 71e12))
PEAK_FP32_FLOPS = (("v100", 15.7e12), ("t4", 8.1e12))


def peak_flops_per_second(device_type):
    """Peak dense FLOP/s of one device in the compute dtype, for an MFU estimate; None when unknown (CPU, mps)."""
    if device_type != "cuda":
        return None
    name = torch.cuda.get_device_name().lower()
    table = PEAK_BF16_FLOPS if autocast_dtype("cuda") == torch.bfloat16 else PEAK_FP32_FLOPS
    return next((flops for key, flops in table if key in name), None)


class DummyWandb:
    """Stands in for a wandb run when logging is off (--run dummy)."""

    def log(self, *args, **kwargs):
        pass

    def finish(self):
        pass


def saved_tensor_bytes(fn):
    """
    Bytes of activations autograd keeps for backward while fn() runs (parameters excluded, each storage
    counted once): the memory that gradient checkpointing trades for recomputation. Works on any device.
    """
    storages = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return sum(storages.values()), result
