"""Watch the learned optimizer's internals on W&B while an MLP trains on MNIST-1D.

    python examples/monitor_wandb.py            # offline: writes ./wandb/offline-run-*
    wandb sync wandb/offline-run-*               # upload later (after `wandb login`)
    lightning-lopt-dashboard --entity ME --project lightning-lopt   # the workspace for it

Pass ``--online`` to stream to W&B directly. The same monitor works with TensorBoard or CSV
loggers (scalars; histograms on TensorBoard too) and writes PNG figures at the end of fit.
"""

import argparse

import lightning.pytorch as pl
import torch
from lightning_lopt.loggers import WandbLogger  # Lightning's, without two spurious W&B warnings

from lightning_lopt import HierarchicalRNNOptimizer
from lightning_lopt.callbacks import EvalWithTrueParameters, LearnedOptimizerMonitor, TrainingProgress
from lightning_lopt.data import MNIST1DDataModule
from lightning_lopt.models import MLPClassifier


class MLPWithLearnedOptimizer(MLPClassifier):
    """The MNIST-1D MLP, trained with the hierarchical RNN optimizer."""

    def configure_optimizers(self) -> HierarchicalRNNOptimizer:
        return HierarchicalRNNOptimizer(self.parameters(), weights="default")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--interval", type=int, default=50, help="log the optimizer's internals every N steps")
    parser.add_argument("--online", action="store_true", help="stream to W&B instead of writing an offline run")
    args = parser.parse_args()
    # A small model: one CPU thread is faster than torch's pool of all cores (lightning-lopt does the same).
    torch.set_num_threads(1)

    pl.seed_everything(0)
    logger = WandbLogger(project="lightning-lopt", save_dir=".", offline=not args.online)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        log_every_n_steps=10,
        logger=logger,
        callbacks=[
            EvalWithTrueParameters(),
            TrainingProgress(),
            LearnedOptimizerMonitor(logging_interval=args.interval),
        ],
    )
    trainer.fit(MLPWithLearnedOptimizer(hidden_dims=(100, 100)), MNIST1DDataModule(batch_size=128))
    print(f"Run files (history, figures): {logger.experiment.dir}")


if __name__ == "__main__":
    main()
