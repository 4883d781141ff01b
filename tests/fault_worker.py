"""Meta-training runs for the fault-injection tests: 2 CPU processes under DDP, checkpoints every K steps.

Run as a script (Lightning's DDP launcher starts rank 1 by re-running it). One launch fits each
gradient estimator in turn (starting processes costs more than these fits); with ``--resume``,
estimators whose final file exists are skipped and the others continue from their ``last.ckpt``.
Rank 0 appends each finished meta-step to ``progress_{estimator}.txt`` (flushed, so that a killer
can read it); after each fit, each rank saves its meta-parameters to ``final_{estimator}_rank{r}.pt``.

    python fault_worker.py OUT [--estimators tbptt,pes] [--max-steps 12] [--every 3] [--resume] [--step-sleep 0.1]
    python fault_worker.py OUT --crash-mid-write   # see _crash_mid_write
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_meta import QuadDistribution  # noqa: E402

from lightning_lopt.callbacks import CheckpointOnInterrupt  # noqa: E402
from lightning_lopt.checkpoint_io import AtomicCheckpointIO  # noqa: E402
from lightning_lopt.meta import MetaTrainingModule, TaskDataModule  # noqa: E402

warnings.filterwarnings("ignore")


def _module(estimator: str) -> MetaTrainingModule:
    if estimator == "pes":
        return MetaTrainingModule(tasks=QuadDistribution(), tasks_per_step=2, gradient_estimator="pes", pes_pairs=2,
                                  truncation_length=4, task_lengths=(6, 14), meta_lr=1e-3, num_threads=1)
    return MetaTrainingModule(tasks=QuadDistribution(), tasks_per_step=2, truncation_length=4, unroll_length_mean=10,
                              unroll_length_min=5, num_unrolls_mean=1, num_threads=1)


class Progress(pl.Callback):
    """Records finished meta-steps on rank 0; sleeps after each so that a kill can land mid-run."""

    def __init__(self, path: Path, sleep: float) -> None:
        self.path, self.sleep = path, sleep

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.is_global_zero:
            with open(self.path, "a") as f:
                f.write(f"{trainer.global_step}\n")
                f.flush()
                os.fsync(f.fileno())
        time.sleep(self.sleep)


def _trainer(out: Path, max_steps: int, every: int, callbacks: list, ckpt_dir: str = "ckpt", devices: int = 2) -> pl.Trainer:
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=out / ckpt_dir, every_n_train_steps=every, save_last=True, save_top_k=-1)
    return pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                      logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      callbacks=[*callbacks, ckpt], plugins=[AtomicCheckpointIO()], default_root_dir=out)


def _crash_mid_write(out: Path) -> None:
    """Save checkpoints at steps 2 and 4; the write of step 4's last.ckpt dies half-way, as a kill would leave it."""
    real_save = torch.save

    def half_then_die(obj, f, *args, **kwargs):
        if int(obj.get("global_step", 0)) < 4 or ".last.ckpt." not in str(getattr(f, "name", "")):
            return real_save(obj, f, *args, **kwargs)
        import io

        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os._exit(9)

    torch.save = half_then_die
    pl.seed_everything(0)
    _trainer(out, 6, 2, [], devices=1).fit(_module("tbptt"), TaskDataModule(tasks_per_step=2))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--estimators", default="tbptt,pes")
    parser.add_argument("--max-steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=3)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--step-sleep", type=float, default=0.0)
    parser.add_argument("--crash-mid-write", action="store_true")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--on-interrupt", action="store_true", help="with CheckpointOnInterrupt")
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.crash_mid_write:
        _crash_mid_write(args.out)
        return
    # Decided before the first fit, which is when rank 1 starts: both ranks see the same files.
    todo = [e for e in args.estimators.split(",") if not (args.resume and (args.out / f"final_{e}_rank0.pt").exists())]
    for estimator in todo:
        pl.seed_everything(0)
        module = _module(estimator)
        progress = Progress(args.out / f"progress_{estimator}.txt", args.step_sleep)
        callbacks: list = [progress]
        if args.on_interrupt:
            callbacks.append(CheckpointOnInterrupt(str(args.out / f"ckpt_{estimator}")))
        trainer = _trainer(args.out, args.max_steps, args.every, callbacks, ckpt_dir=f"ckpt_{estimator}",
                           devices=args.devices)
        trainer.fit(module, TaskDataModule(tasks_per_step=2), ckpt_path="last" if args.resume else None)
        torch.save(module.lopt.state_dict(), args.out / f"final_{estimator}_rank{trainer.global_rank}.pt")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()

if __name__ == "__main__":
    main()
