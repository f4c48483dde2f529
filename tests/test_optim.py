import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import Muon, lr_multiplier, muon_momentum, orthogonalize, setup_optimizers


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=32, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=32))
    model.init_weights()
    return model


@pytest.mark.parametrize("shape", [(32, 32), (64, 16), (16, 48)])
def test_orthogonalize_pushes_singular_values_to_one(shape):
    torch.manual_seed(0)
    G = torch.randn(shape) * torch.logspace(-1, 0, shape[1])  # columns scaled over 10x
    s = torch.linalg.svdvals(orthogonalize(G))
    assert s.min() > 0.5 and s.max() < 1.3, s
    assert orthogonalize(G).shape == G.shape


def test_setup_optimizers_partitions_parameters():
    model = tiny_model()
    adamw, muon = setup_optimizers(model)
    adam_params = {id(p) for g in adamw.param_groups for p in g["params"]}
    muon_params = {id(p) for g in muon.param_groups for p in g["params"]}
    assert not adam_params & muon_params
    assert adam_params | muon_params == {id(p) for p in model.parameters()}
    assert all(p.ndim == 2 for g in muon.param_groups for p in g["params"])
    assert id(model.lm_head.weight) in adam_params and id(model.transformer.wte.weight) in adam_params


def test_optimizer_steps_reduce_loss():
    model = tiny_model()
    optimizers = setup_optimizers(model, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.01)
    x = torch.randint(0, 64, (4, 32))
    losses = []
    for _ in range(30):
        loss = model(x, x.roll(-1, dims=1))
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    state = optimizers[1].state_dict()
    assert len(state["state"]) == len(list(model.transformer.h.parameters()))  # a momentum buffer each


def test_lr_schedule():
    assert lr_multiplier(0, 100, warmup_ratio=0.1) == pytest.approx(0.1)
    assert lr_multiplier(9, 100, warmup_ratio=0.1) == pytest.approx(1.0)
    assert lr_multiplier(50, 100, warmdown_ratio=0.2) == 1.0
    assert lr_multiplier(90, 100, warmdown_ratio=0.2, final_lr_frac=0.0) == pytest.approx(0.5)
    assert lr_multiplier(100, 100, warmdown_ratio=0.2, final_lr_frac=0.1) == pytest.approx(0.1)
    assert muon_momentum(0) == pytest.approx(0.85) and muon_momentum(1000) == pytest.approx(0.95)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_worker(rank, world_size, port, data, result_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    model = tiny_model()
    optimizers = setup_optimizers(model, rank=rank, world_size=world_size)
    for step_data in data:
        x = step_data[rank]
        model(x, x.roll(-1, dims=1)).backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
    if rank == 0:
        torch.save(model.state_dict(), result_path)
    dist.barrier()
    dist.destroy_process_group()
    # Skip interpreter teardown: under a loaded machine gloo's background threads occasionally abort
    # the child in static destructors ("terminate called without an active exception") after all work is done.
    os._exit(0)


def test_distributed_matches_single_process(tmp_path):
    """2 gloo ranks, each with half the batch, end with the same weights as 1 process with all of it."""
    torch.manual_seed(1)
    data = [torch.randint(0, 64, (2, 4, 32)) for _ in range(3)]  # (ranks, rows, T) per step
    result_path = str(tmp_path / "dist.pt")
    mp.spawn(_distributed_worker, args=(2, _free_port(), data, result_path), nprocs=2, join=True)
    distributed = torch.load(result_path)

    model = tiny_model()
    optimizers = setup_optimizers(model)
    for step_data in data:
        for x in step_data:  # gradient accumulation over the two halves = the ranks' average
            (model(x, x.roll(-1, dims=1)) / 2).backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
    for name, p in model.state_dict().items():
        assert torch.allclose(p, distributed[name], atol=1e-5), name


def test_muon_single_process_has_no_collectives():
    p = torch.nn.Parameter(torch.randn(8, 8))
    p.grad = torch.randn(8, 8)
    before = p.detach().clone()
    Muon([p], lr=0.1).step()
    assert not torch.equal(before, p.detach())
