"""nanochat.common: the dtype policy on GPUs with and without native bf16, the MFU peak table, compile modes."""

import subprocess
import sys

import pytest
import torch

from nanochat import common


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend torch sees a CUDA GPU of a given name and compute capability."""
    def install(name, capability):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # true on V100/T4: emulation
        monkeypatch.setattr(common, "_said_dtype", set())
    return install


def test_bf16_needs_compute_capability_8(fake_gpu, capsys):
    fake_gpu("NVIDIA H100 80GB HBM3", (9, 0))
    assert common.autocast_dtype("cuda") == torch.bfloat16
    assert capsys.readouterr().out == ""
    fake_gpu("Tesla V100-SXM2-32GB", (7, 0))
    assert common.autocast_dtype("cuda") == torch.float32
    assert common.autocast_dtype("cuda") == torch.float32
    out = capsys.readouterr().out
    assert out.count("no native bf16") == 1 and "7.0" in out  # said once, not every call
    assert common.autocast_dtype("cpu") == torch.float32


def test_training_dtype_auto_is_bf16_where_the_device_has_it(fake_gpu, monkeypatch):
    fake_gpu("NVIDIA H100 80GB HBM3", (9, 0))
    assert common.training_dtype("auto", "cuda") == torch.bfloat16
    fake_gpu("Tesla T4", (7, 5))
    assert common.training_dtype("auto", "cuda") == torch.float32
    assert common.training_dtype("bfloat16", "cuda") == torch.bfloat16  # asked for: emulated but honoured
    for native in (True, False):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        assert common.training_dtype("auto", "cpu") == (torch.bfloat16 if native else torch.float32)
        assert common.training_dtype("float32", "cpu") == torch.float32
        assert common.autocast_dtype("cpu") == torch.float32  # inference on a CPU stays fp32
    assert common.training_dtype("auto", "mps") == torch.float32
    with pytest.raises(ValueError, match="dtype must be one of"):
        common.training_dtype("float16", "cpu")


@pytest.mark.parametrize("name, capability, flops", [
    ("NVIDIA H100 80GB HBM3", (9, 0), 989e12), ("NVIDIA H100 PCIe", (9, 0), 756e12),
    ("NVIDIA H100 NVL", (9, 0), 835e12), ("NVIDIA L40S", (8, 9), 362e12), ("NVIDIA L40", (8, 9), 181e12),
    ("NVIDIA A100-SXM4-80GB", (8, 0), 312e12), ("NVIDIA A10G", (8, 6), 70e12), ("NVIDIA A10", (8, 6), 125e12),
    ("Tesla V100-SXM2-32GB", (7, 0), 15.7e12), ("Tesla T4", (7, 5), 8.1e12), ("Some Future GPU", (10, 0), None)])
def test_peak_flops_by_exact_model_and_compute_dtype(fake_gpu, name, capability, flops):
    fake_gpu(name, capability)
    assert common.peak_flops_per_second("cuda") == flops
    assert common.peak_flops_per_second("cpu") is None


def test_compile_mode_auto_is_on_for_cuda_only():
    assert common.resolve_compile_mode("auto", "cuda") == "default"
    assert common.resolve_compile_mode("auto", "cpu") == "none"
    assert common.resolve_compile_mode("auto", "cpu", num_iterations=499) == "none"
    long_run = "default" if common.cxx_compiler() else "none"  # inductor builds C++ kernels on a CPU
    assert common.resolve_compile_mode("auto", "cpu", num_iterations=500) == long_run
    assert common.resolve_compile_mode("auto", "mps", num_iterations=10_000) == "none"
    assert common.resolve_compile_mode("max-autotune", "cpu") == "max-autotune"
    with pytest.raises(ValueError):
        common.resolve_compile_mode("fast", "cuda")


def _rank_main(rank, port, results):
    """One of two gloo processes: rank 1 cannot load "chats", and rank 0 cannot load "extra"."""
    import torch.distributed as dist

    from tasks.common import DatasetUnavailable
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)

    def chats():
        if rank == 1:
            raise DatasetUnavailable("chats: not in NANOCHAT_DATA_DIR and the hub is offline")
        return list(range(5))

    def extra():
        if rank == 0:
            raise FileNotFoundError("extra.jsonl")
        return [1, 2]

    outcome = {}
    loaded, skipped = common.load_on_all_ranks([("numbers", lambda: list(range(3))), ("extra", extra)])
    outcome["agreed"] = ([name for name, _ in loaded], [name for name, _ in skipped])
    try:
        common.load_on_all_ranks([("numbers", lambda: list(range(3))), ("chats", chats)])
    except common.DataMismatch as e:
        outcome["mismatch"] = str(e)
    outcome["first_error"] = common.first_error("disk full" if rank == 1 else None)
    dist.destroy_process_group()
    results.put((rank, outcome))


def test_ranks_decide_together_and_fail_together():
    """Two gloo processes: rank 0's view of the data is everyone's, and one rank's missing dataset is a clear
    error on both ranks instead of a hang at the next collective."""
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=_rank_main, args=(rank, port, results)) for rank in range(2)]
    for process in processes:
        process.start()
    outcomes = dict(results.get(timeout=120) for _ in processes)
    for process in processes:
        process.join(timeout=30)
        assert process.exitcode == 0
    for rank in range(2):
        assert outcomes[rank]["agreed"] == (["numbers"], ["extra"])  # rank 0 lacked "extra": skipped everywhere
        assert "chats: rank 1 cannot load what rank 0 loaded" in outcomes[rank]["mismatch"]
        assert "hub is offline" in outcomes[rank]["mismatch"]
        assert outcomes[rank]["first_error"] == "rank 1: disk full"


KEEP_PROBE = """
import sys, torch
from nanochat.common import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
resident = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
before = resident()
del x
print(applied, before - resident())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc thresholds")
def test_keep_freed_memory_keeps_large_blocks_for_reuse():
    """glibc's default returns a freed 64 MiB tensor to the OS (the next step page-faults it in again);
    after keep_freed_memory it stays in the heap for the next allocation."""
    def released(mode):
        out = subprocess.run([sys.executable, "-c", KEEP_PROBE, mode], capture_output=True, text=True, check=True).stdout
        applied, released_bytes = out.split()
        return applied == "True", int(released_bytes)
    applied, kept_released = released("keep")
    if not applied:
        pytest.skip("not glibc: nothing to tune")
    assert released("default")[1] > 60 * 2**20
    assert kept_released < 4 * 2**20
