"""``TaskDataModule``: the stream of task seeds that meta-training consumes."""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

__all__ = ["TaskDataModule", "task_seed"]

# Training seeds stay below this bound; validation tasks use seeds above it, so they are never trained on.
VALIDATION_SEED_OFFSET = 1 << 40


def task_seed(stream_seed: int, index: int, slot: int, rank: int, world_size: int, width: int) -> int:
    """The seed of one task of the training stream: disjoint across slots, ranks and steps."""
    return (stream_seed * 1_000_003 + (index * world_size + rank) * width + slot) % VALIDATION_SEED_OFFSET


class _SeedStream(IterableDataset):
    """Infinite stream of ``{"index": k, "seeds": (width,)}`` batches for one rank, from ``start``."""

    def __init__(self, stream_seed: int, width: int, rank: int, world_size: int, start: int = 0) -> None:
        self.stream_seed, self.width, self.rank, self.world_size, self.start = stream_seed, width, rank, world_size, start

    def __iter__(self) -> Iterator[dict[str, Any]]:
        k = self.start
        while True:
            seeds = [task_seed(self.stream_seed, k, i, self.rank, self.world_size, self.width) for i in range(self.width)]
            yield {"index": k, "seeds": torch.tensor(seeds)}
            k += 1


class TaskDataModule(pl.LightningDataModule):
    """Yields task seeds for :class:`~lightning_lopt.meta.MetaTrainingModule`.

    Each training batch is a tensor of ``tasks_per_step`` fresh seeds; the module starts a new task
    from one whenever a task in flight finishes. Under DDP every rank draws from its own disjoint
    part of the stream. The stream resumes where the module last read it (the module saves its
    position in checkpoints), so a resumed run draws exactly the tasks an uninterrupted one would.

    Args:
        tasks_per_step: Seeds per batch; should equal the module's ``tasks_per_step``.
        seed: Seed of the training stream.
        num_validation_tasks: Fixed validation tasks (seeds disjoint from training).
        validation_seed: Seed of the validation task set.
    """

    def __init__(
        self,
        tasks_per_step: int = 8,
        seed: int = 0,
        num_validation_tasks: int = 6,
        validation_seed: int = 0,
    ) -> None:
        super().__init__()
        if tasks_per_step < 1:
            raise ValueError(f"tasks_per_step must be >= 1, got {tasks_per_step}.")
        self.tasks_per_step = tasks_per_step
        self.seed = seed
        self.num_validation_tasks = num_validation_tasks
        self.validation_seed = validation_seed

    def validation_seeds(self) -> list[int]:
        """Seeds of the fixed validation tasks (never drawn by the training stream)."""
        return [VALIDATION_SEED_OFFSET + self.validation_seed * 1_000 + i for i in range(self.num_validation_tasks)]

    def train_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank if self.trainer is not None else 0
        world = self.trainer.world_size if self.trainer is not None else 1
        # Lightning restores the module before it builds dataloaders, so the position is known here.
        module = self.trainer.lightning_module if self.trainer is not None else None
        start = int(getattr(module, "stream_position", 0))
        stream = _SeedStream(self.seed, self.tasks_per_step, rank, world, start)
        return DataLoader(stream, batch_size=None, num_workers=0)

    def val_dataloader(self) -> DataLoader:
        seeds: Sequence[int] = self.validation_seeds()
        return DataLoader([torch.tensor(seeds)], batch_size=None, num_workers=0)
