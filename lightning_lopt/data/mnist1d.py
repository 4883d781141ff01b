"""``MNIST1DDataModule``: the MNIST-1D data set, generated locally from a seed (no download)."""

from __future__ import annotations

import random
from typing import Optional

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["MNIST1DDataModule", "make_mnist1d"]


def make_mnist1d(num_samples: int = 5000, seed: int = 42) -> dict[str, np.ndarray]:
    """Generate MNIST-1D with :func:`mnist1d.data.make_dataset` (about 1 s per 5000 samples).

    The generator reseeds Python's and NumPy's global random state; this function restores both
    afterwards, so making the data set does not change the randomness of the caller's run.

    Args:
        num_samples: Total number of examples (train and test together), 10 classes.
        seed: Seed of the generator; the same seed gives the same arrays.

    Returns:
        The dictionary of :func:`mnist1d.data.make_dataset`: ``x`` ``(n_train, 40)``, ``y``,
        ``x_test``, ``y_test`` (80/20 split) and the templates.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        return make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


class MNIST1DDataModule(pl.LightningDataModule):
    """MNIST-1D (Greydanus, 2020): 40-sample 1-D signals of the ten digits, made on the fly from a seed.

    The generator's train part is split into train and validation sets by a permutation drawn
    from ``seed``; its test part is the test set. Inputs are float32 ``(batch, 40)``, targets int64.

    Args:
        num_samples: Total number of generated examples; 80% train + validation, 20% test.
        val_fraction: Fraction of the train part held out for validation.
        batch_size: Batch size of every split.
        seed: Seed of the data generator and of the train/validation split.
        num_workers: DataLoader worker processes (0 loads in the main process; the data is tiny).
    """

    num_classes: int = 10
    input_dim: int = 40

    def __init__(
        self,
        num_samples: int = 5000,
        val_fraction: float = 0.1,
        batch_size: int = 128,
        seed: int = 42,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if num_samples < 10:
            raise ValueError(f"num_samples={num_samples} is too small: MNIST-1D needs at least one example per class.")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction={val_fraction} must be strictly between 0 and 1.")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1.")
        self.save_hyperparameters()
        self.num_samples = num_samples
        self.val_fraction = val_fraction
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.train_set: Optional[TensorDataset] = None
        self.val_set: Optional[TensorDataset] = None
        self.test_set: Optional[TensorDataset] = None

    def setup(self, stage: Optional[str] = None) -> None:
        """Generate the data set (once; later calls reuse it). Every process makes the same arrays."""
        if self.train_set is not None:
            return
        data = make_mnist1d(self.num_samples, self.seed)
        x = torch.as_tensor(data["x"], dtype=torch.float32)
        y = torch.as_tensor(data["y"], dtype=torch.int64)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.seed))
        n_val = max(1, int(round(len(y) * self.val_fraction)))
        val_idx, train_idx = order[:n_val], order[n_val:]
        self.train_set = TensorDataset(x[train_idx], y[train_idx])
        self.val_set = TensorDataset(x[val_idx], y[val_idx])
        self.test_set = TensorDataset(
            torch.as_tensor(data["x_test"], dtype=torch.float32), torch.as_tensor(data["y_test"], dtype=torch.int64)
        )

    def _loader(self, dataset: Optional[TensorDataset], shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("MNIST1DDataModule.setup() must run before asking for a dataloader.")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches (the order follows the global torch seed, e.g. ``seed_everything``)."""
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in a fixed order."""
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches in a fixed order."""
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """The test set, for ``trainer.predict``."""
        return self._loader(self.test_set, shuffle=False)
