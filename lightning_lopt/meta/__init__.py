"""Meta-training of the hierarchical RNN: the LightningModule and the task-seed DataModule."""

from lightning_lopt.meta.data import TaskDataModule
from lightning_lopt.meta.module import MetaTrainingModule, TaskSlot, meta_objective_terms, run_inner

__all__ = ["MetaTrainingModule", "TaskDataModule", "TaskSlot", "meta_objective_terms", "run_inner"]
