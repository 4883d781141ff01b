"""Optimizer state per rank, unsharded and sharded (FSDP2 ``fully_shard``, ZeRO-1), for one model.

``python -m lightning_lopt.bench.sharding`` starts 2 gloo processes on CPU, takes one step of the
learned optimizer in each setting, and prints the bytes of optimizer state each rank holds.
"""

from __future__ import annotations

import argparse
import os
import socket
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lightning_lopt import HierarchicalRNNOptimizer


def model(width: int, seed: int = 0) -> nn.Module:
    """The measured model: an MLP of about ``2 * width**2`` parameters."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(width, 2 * width), nn.Tanh(), nn.Linear(2 * width, width // 2 + 1),
                         nn.Tanh(), nn.Linear(width // 2 + 1, 10))


def _step(net: nn.Module, opt: Any, width: int) -> None:
    x = torch.randn(4, width)
    opt.zero_grad()
    net(x).square().mean().backward()
    opt.step()


def _measure(rank: int, world: int, port: int, width: int, queue: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    rows = {}
    for name, state_dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        net = model(width)
        for layer in (net[0], net[2], net[4]):
            fully_shard(layer)
        fully_shard(net)
        opt = HierarchicalRNNOptimizer(net.parameters(), state_dtype=state_dtype)
        _step(net, opt, width)
        rows[("fsdp", name)] = opt.state_bytes
        net = model(width)
        zero = ZeroRedundancyOptimizer(net.parameters(), optimizer_class=HierarchicalRNNOptimizer,
                                       problem_group=dist.group.WORLD, state_dtype=state_dtype)
        _step(DDP(net), zero, width)
        rows[("zero", name)] = zero.optim.state_bytes
    gathered: list[Optional[dict]] = [None] * world
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        queue.put(gathered)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: Optional[list[str]] = None) -> None:
    """Print the table of optimizer state bytes per rank."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--width", type=int, default=512, help="MLP width (about 2*width^2 parameters)")
    args = parser.parse_args(argv)
    width, world = args.width, 2
    n = sum(p.numel() for p in model(width).parameters())
    tensors = len(list(model(width).parameters()))
    single = {}
    for name, state_dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        net = model(width)
        opt = HierarchicalRNNOptimizer(net.parameters(), state_dtype=state_dtype)
        _step(net, opt, width)
        single[name] = opt.state_bytes
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.spawn(_measure, args=(world, _free_port(), width, queue), nprocs=world, join=True)
    per_rank = queue.get()
    print(f"model: MLP width {width}, {n:,} parameters in {tensors} tensors; torch {torch.__version__}")
    print("| state | setting | ranks | state bytes per rank | bytes / parameter (per rank) | vs 1 rank |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in ("fp32", "bf16"):
        print(f"| {name} | unsharded | 1 | {single[name]:,} | {single[name] / n:.1f} | 1.00 |")
        for setting in ("fsdp", "zero"):
            values = [r[(setting, name)] for r in per_rank]
            label = "FSDP2 fully_shard" if setting == "fsdp" else "ZeRO-1"
            worst = max(values)
            print(f"| {name} | {label} | {world} | {' / '.join(f'{v:,}' for v in values)} | "
                  f"{worst / n:.1f} | {worst / single[name]:.3f} |")


if __name__ == "__main__":
    main()
