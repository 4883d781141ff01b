"""Multi-process checks of the learned optimizer on sharded parameters (run by tests/test_sharding.py).

``python tests/sharding_worker.py SCENARIO OUT.json`` starts 2 gloo processes on a free port; rank 0
writes what it measured to OUT.json. Scenarios: ``fsdp`` (FSDP2 equality in fp32 and bf16 state,
uneven shards, partial sharding, a frozen layer, DCP checkpoints saved on 2 ranks and loaded on 2 and on 1) and
``ddp`` (ZeRO-1 equality, DDP bit-exactness over 100 steps with the C++ kernel).
"""

from __future__ import annotations

import copy
import json
import os
import socket
import sys
import tempfile
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lightning_lopt import HierarchicalRNNOptimizer

WORLD = 2
STEPS = 12


def mlp(seed: int = 0) -> nn.Sequential:
    # First dimensions 7, 5, 3 and 1: split unevenly over 2 ranks, the last leaving rank 1 an empty shard.
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3), nn.Tanh(),
                         nn.Linear(3, 1))


def batches(steps: int, rows: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(rows, 6, generator=gen), torch.randn(rows, 1, generator=gen)) for _ in range(steps)]


def train(model: nn.Module, opt: Any, data: list, rank: int = 0, world: int = 1, closure: bool = True) -> None:
    for x, y in data:
        rows = x.shape[0] // world
        xs, ys = x[rank * rows : (rank + 1) * rows], y[rank * rows : (rank + 1) * rows]
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(xs), ys)
        loss.backward()
        # The step gain reads the closure's loss: averaged over the ranks, it is the whole batch's.
        # A process stepping alone in a process group passes none (the mean is a collective).
        opt.step(lambda: loss) if closure else opt.step()


def full(model: nn.Module) -> list[torch.Tensor]:
    return [p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone() for p in model.parameters()]


def max_rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float(((x - y).detach().abs().max() / y.abs().max().clamp_min(1e-12))) for x, y in zip(a, b))


def sharded_mlp(partial: bool = False, frozen: bool = False) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = mlp()
    if frozen:
        model[2].requires_grad_(False)
    if partial:
        fully_shard(model[0])  # the other layers stay plain tensors, whole on every rank
        return model
    for layer in (model[0], model[2], model[4], model[6]):
        fully_shard(layer)
    fully_shard(model)
    return model


def fsdp(rank: int, out: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    import torch.distributed.checkpoint as dcp

    data = batches(STEPS)
    for name, state_dtype, partial, frozen in (("fp32", None, False, False), ("bf16", torch.bfloat16, False, False),
                                               ("partial", None, True, False), ("frozen", None, False, True)):
        model = sharded_mlp(partial, frozen)
        opt = HierarchicalRNNOptimizer(model.parameters(), state_dtype=state_dtype)
        # Partly sharded: the plain layers' gradients are not averaged, so every rank sees the whole batch.
        train(model, opt, data, 0 if partial else rank, 1 if partial else WORLD)
        opt.eval()
        got = full(model)
        ref_model = mlp()
        if frozen:
            ref_model[2].requires_grad_(False)
        ref = HierarchicalRNNOptimizer(ref_model.parameters(), state_dtype=state_dtype)
        train(ref_model, ref, data)
        ref.eval()
        out[f"{name}_rel"] = max_rel(got, full(ref_model))
        local = sum(t.numel() for t in opt.hrnn_state.values() if isinstance(t, torch.Tensor))
        out[f"{name}_state_numel_rank{rank}"] = local
        out[f"{name}_state_numel_unsharded"] = sum(t.numel() for t in ref.hrnn_state.values() if isinstance(t, torch.Tensor))
        out[f"{name}_held_rank{rank}"] = list(opt.hrnn_state["held"])
        out[f"{name}_frozen_unchanged"] = all(torch.equal(a, b) for a, b in zip(got[2:4], full(mlp())[2:4]))

    # Checkpoints: save after 6 steps on 2 ranks; resume on 2 ranks and on 1 (there alone: no closure,
    # whose loss the ranks would average, so none anywhere).
    first, second = data[:6], data[6:]
    model = sharded_mlp()
    opt = HierarchicalRNNOptimizer(model.parameters())
    train(model, opt, first, rank, WORLD, closure=False)
    root = out["ckpt_dir"]
    dcp.save({"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=root)
    train(model, opt, second, rank, WORLD, closure=False)
    expected = full(model)

    model2 = sharded_mlp()
    with torch.no_grad():
        for p in model2.parameters():
            p.mul_(0.0)  # the checkpoint must bring the weights back
    opt2 = HierarchicalRNNOptimizer(model2.parameters())
    sd = {"model": model2.state_dict(), "optim": get_optimizer_state_dict(model2, opt2)}
    dcp.load(sd, checkpoint_id=root)
    model2.load_state_dict(sd["model"])
    set_optimizer_state_dict(model2, opt2, sd["optim"])
    train(model2, opt2, second, rank, WORLD, closure=False)
    out["resume2_equal"] = all(torch.equal(a, b) for a, b in zip(full(model2), expected))
    out["resume2_rel"] = max_rel(full(model2), expected)

    if rank == 0:
        model1 = mlp(seed=5)
        opt1 = HierarchicalRNNOptimizer(model1.parameters())
        opt1.per_parameter_state_dict = True
        sd = {"model": model1.state_dict(), "optim": get_optimizer_state_dict(model1, opt1)}
        dcp.load(sd, checkpoint_id=root, no_dist=True)
        model1.load_state_dict(sd["model"])
        set_optimizer_state_dict(model1, opt1, sd["optim"])
        train(model1, opt1, second, closure=False)
        out["resume1_rel"] = max_rel(full(model1), expected)
    dist.barrier()


def ddp(rank: int, out: dict[str, Any]) -> None:
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    data = batches(STEPS)
    model = mlp()
    ref_model = copy.deepcopy(model)
    zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=HierarchicalRNNOptimizer,
                                   problem_group=dist.group.WORLD)
    train(DDP(model), zero, data, rank, WORLD)
    # The unsharded reference takes the tensors in the order of the ranks' partitions, as ZeRO's ranks
    # draw their initial learning rates from one stream in that order.
    index = {id(p): i for i, p in enumerate(model.parameters())}
    order = [index[id(p)] for part in zero._partition_parameters() for g in part for p in g["params"]]
    ref_params = list(ref_model.parameters())
    ref = HierarchicalRNNOptimizer([ref_params[i] for i in order])
    train(ref_model, ref, data)
    out["zero_rel"] = max_rel(full(model), full(ref_model))
    out["zero_state_numel_unsharded"] = sum(t.numel() for t in ref.hrnn_state.values() if isinstance(t, torch.Tensor))
    out[f"zero_state_numel_rank{rank}"] = sum(
        t.numel() for t in zero.optim.hrnn_state.values() if isinstance(t, torch.Tensor))

    # DDP: every rank computes the same update, with the fused kernel on 2 OpenMP threads.
    torch.set_num_threads(2)
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 10))
    ddp_model = DDP(model)
    opt = HierarchicalRNNOptimizer(ddp_model.parameters(), backend="cpp")
    start = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gen = torch.Generator().manual_seed(10 + rank)  # different data per rank: DDP averages the gradients
    for _ in range(100):
        opt.zero_grad()
        x = torch.randn(8, 32, generator=gen)
        loss = nn.functional.cross_entropy(ddp_model(x), (x[:, 0] > 0).long())
        loss.backward()
        opt.step(lambda: loss)  # each rank's own loss: the optimizer agrees on their mean
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(WORLD)]
    dist.all_gather(gathered, flat)
    out["ddp_backend"] = opt.lopt.last_backend
    out["ddp_bit_identical"] = all(torch.equal(gathered[0], g) for g in gathered[1:])
    out["ddp_moved"] = bool((flat != start).any()) and opt.hrnn_state["step"] == 100


def _run(rank: int, scenario: str, port: int, path: str, ckpt_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    out: dict[str, Any] = {"ckpt_dir": ckpt_dir}
    try:
        {"fsdp": fsdp, "ddp": ddp}[scenario](rank, out)
        merged = [None] * WORLD
        dist.all_gather_object(merged, out)
        if rank == 0:
            result = {k: v for o in merged for k, v in o.items()}
            with open(path, "w") as f:
                json.dump(result, f, indent=1)
    finally:
        dist.destroy_process_group()
    # Everything is measured and written: leave without the interpreter's teardown, where torch's
    # gloo threads abort a process now and then ("terminate called without an active exception").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    scenario, path = sys.argv[1], sys.argv[2]
    with tempfile.TemporaryDirectory() as ckpt:
        mp.spawn(_run, args=(scenario, free_port(), path, ckpt), nprocs=WORLD, join=True)
