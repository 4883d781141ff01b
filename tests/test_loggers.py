"""The project's W&B logger: Lightning's, without the two warnings W&B printed on every run."""

from __future__ import annotations

from pathlib import Path

from lightning_lopt.loggers import WandbLogger


def test_wandb_logger_passes_no_anonymous_setting_and_makes_its_folder(tmp_path: Path) -> None:
    save_dir = tmp_path / "runs" / "wb"
    logger = WandbLogger(project="p", save_dir=str(save_dir), offline=True)
    assert "anonymous" not in logger._wandb_init  # W&B warns about any value, None included
    assert save_dir.is_dir()  # W&B looks for a git root there before it makes the folder
    assert WandbLogger(project="p", save_dir=str(save_dir), offline=True, anonymous=True)._wandb_init["anonymous"] == "allow"


def test_offline_run_prints_neither_warning(tmp_path: Path) -> None:
    """In a fresh process: W&B prints each of these warnings once per process."""
    import os
    import subprocess
    import sys

    script = ("from lightning_lopt.loggers import WandbLogger\n"
              "logger = WandbLogger(project='p', save_dir='runs/wb', offline=True)\n"
              "logger.log_metrics({'x': 1.0}, step=0)\n"
              "logger.experiment.finish()\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text
    assert "offline" in text  # W&B did print its start-up lines
    assert "anonymous setting" not in text and "git root" not in text
