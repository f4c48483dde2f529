"""
Things every stage needs: where files live, which device to run on, distributed set-up, logging.
"""

import logging
import os

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


def autodetect_device_type():
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def get_dist_info():
    """(is_ddp, rank, local_rank, world_size) from the variables torchrun sets."""
    if all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1


def is_main_process():
    return get_dist_info()[1] == 0


def print0(*args, **kwargs):
    if is_main_process():
        print(*args, **kwargs, flush=True)


def compute_init(device_type=None, seed=42):
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


def compute_cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def autocast_dtype(device_type):
    """
    Dtype policy: bf16 autocast on GPUs that support it (fp32 master weights), fp32 everywhere else.
    On CPU bf16 autocast was measured slower than fp32 for our small models (dev/bench_train.py), so
    CPU stays fp32 unless the user asks otherwise.
    """
    if device_type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def autocast_context(device_type):
    """torch.autocast with the dtype policy above (a no-op context in fp32); reusable across `with` blocks."""
    dtype = autocast_dtype(device_type)
    return torch.amp.autocast(device_type=device_type, dtype=dtype, enabled=dtype != torch.float32)


def synchronize(device_type):
    if device_type == "cuda":
        torch.cuda.synchronize()
    elif device_type == "mps":
        torch.mps.synchronize()


def peak_flops_per_second(device_type):
    """Peak dense bf16 FLOP/s of one device, for an MFU estimate; None when unknown (CPU, mps)."""
    if device_type != "cuda":
        return None
    name = torch.cuda.get_device_name().lower()
    for key, flops in (("h200", 989e12), ("h100", 989e12), ("a100", 312e12), ("l40", 181e12),
                       ("4090", 165e12), ("a10", 125e12), ("3090", 71e12), ("v100", 125e12)):
        if key in name:
            return flops
    return None


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
