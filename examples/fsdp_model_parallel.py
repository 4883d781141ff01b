"""The learned optimizer on a model sharded with FSDP2 under Lightning's ``ModelParallelStrategy``.

``configure_model`` shards each layer with ``fully_shard`` over the strategy's data-parallel mesh;
``configure_optimizers`` returns the learned optimizer over the sharded (DTensor) parameters. Each
rank keeps optimizer state for its own shards only; the per-tensor and per-problem statistics of
the update rule are all-reduced over the mesh, so the update equals the unsharded one.

    python examples/fsdp_model_parallel.py                       # 2 CPU processes over gloo
    python examples/fsdp_model_parallel.py --accelerator gpu     # 2 GPUs over NCCL

The same code path without Lightning (``fully_shard`` in plain ``torch.distributed``) is what
``tests/test_sharding.py`` checks against an unsharded run; ``shard`` below is shared with it.
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lopt import HierarchicalRNNOptimizer
from lightning_lopt.callbacks import EvalWithTrueParameters


def shard(net: nn.Sequential, mesh: object = None) -> nn.Sequential:
    """Shard every linear layer, then the root, with FSDP2 (``mesh=None``: all ranks)."""
    from torch.distributed.fsdp import fully_shard

    for layer in net:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)
    return net


class ShardedRegression(pl.LightningModule):
    """A small MLP regression, sharded in ``configure_model``."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1))

    def configure_model(self) -> None:
        shard(self.net, self.device_mesh["data_parallel"])

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> HierarchicalRNNOptimizer:
        return HierarchicalRNNOptimizer(self.parameters())


def data(n: int = 2048) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 16, generator=gen)
    y = torch.sin(x[:, :4].sum(1, keepdim=True))
    return DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--checkpoint", default=None,
                        help="save a sharded checkpoint (a directory) here at the end, then resume from it for 5 steps")
    args = parser.parse_args()
    from lightning.pytorch.strategies import ModelParallelStrategy

    def trainer(max_steps: int) -> pl.Trainer:
        return pl.Trainer(
            accelerator=args.accelerator,
            devices=args.devices,
            strategy=ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1),
            max_steps=max_steps,
            callbacks=[EvalWithTrueParameters()],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )

    fit = trainer(args.max_steps)
    fit.fit(ShardedRegression(), data())
    if fit.is_global_zero:
        print(f"final train_loss {float(fit.callback_metrics['train_loss']):.4f}")
    if args.checkpoint:
        # The strategy saves the optimizer through torch.distributed.checkpoint: each rank writes its shards.
        fit.save_checkpoint(args.checkpoint)
        resumed = trainer(args.max_steps + 5)
        resumed.fit(ShardedRegression(), data(), ckpt_path=args.checkpoint)
        if resumed.is_global_zero:
            print(f"resumed to step {resumed.global_step}, train_loss {float(resumed.callback_metrics['train_loss']):.4f}")
    # torch asks every process to end its process groups itself: left to the interpreter's exit,
    # gloo's threads can abort it ("terminate called without an active exception").
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
