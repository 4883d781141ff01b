"""The GPU burst config, run on the CPU with tiny settings: it stops itself at its time limit with a
checkpoint in the campaign's directory, which the CPU campaign resumes, and the other way round."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from lightning_lopt.cli import build_cli

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
TINY = ["--model.init_args.tasks_per_step=2", "--data.init_args.tasks_per_step=2", "--model.init_args.pes_pairs=1",
        "--model.init_args.truncation_length=3", "--model.init_args.task_lengths=[5,20]",
        "--model.init_args.max_task_length=20", "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--trainer.val_check_interval=1000", "--trainer.num_sanity_val_steps=0",
        "--data.init_args.num_validation_tasks=1", "--model.init_args.validation_lengths=[5]"]


@pytest.fixture()
def cli_argv(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr("sys.argv", ["lightning-lopt"])
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _config(tmp_path: Path, name: str) -> Path:
    text = (CONFIGS / name).read_text().replace("runs/meta_classifiers", str(tmp_path / "run"))
    out = tmp_path / name
    out.write_text(text)
    return out


def _lopt(ckpt: Path) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("lopt.")}


def test_burst_stops_itself_and_the_campaign_resumes_it_and_back(tmp_path: Path, cli_argv: None) -> None:
    burst, campaign = _config(tmp_path, "meta_train_gpu_burst.yaml"), _config(tmp_path, "meta_train_campaign.yaml")
    last, stopped = tmp_path / "run" / "checkpoints" / "last.ckpt", tmp_path / "run" / "checkpoints" / "last-interrupted.ckpt"
    cli = build_cli(["fit", "-c", str(burst), *TINY, "--trainer.max_time=00:00:00:04"])
    steps = cli.trainer.global_step
    assert cli.trainer.interrupted is False and steps >= 1 and stopped.exists()
    after_burst = _lopt(stopped)
    assert torch.load(stopped, weights_only=True)["global_step"] == steps  # where it stopped, not the last multiple of 25
    # The CPU campaign (one process here, another task count) continues from the burst's checkpoint.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = build_cli(["fit", "-c", str(campaign), *TINY, "--model.init_args.tasks_per_step=3",
                             "--data.init_args.tasks_per_step=3", "--trainer.devices=1", "--trainer.strategy=auto",
                             f"--trainer.max_steps={steps + 2}", "--ckpt_path", "last"])
    assert resumed.trainer.global_step == steps + 2
    assert any("tasks" in str(w.message) and "afresh" in str(w.message) for w in caught)
    after_campaign = _lopt(last)
    assert any(not torch.equal(after_burst[k], after_campaign[k]) for k in after_burst)  # it trained on
    # ... and the burst continues from the campaign's last.ckpt.
    with pytest.warns(UserWarning, match="afresh"):  # the burst's task count again
        again = build_cli(["fit", "-c", str(burst), *TINY, f"--trainer.max_steps={steps + 3}", "--ckpt_path", "last"])
    assert again.trainer.global_step == steps + 3


def test_meta_progress_bar_counts_resumed_meta_steps(tmp_path: Path, cli_argv: None) -> None:
    """After --ckpt_path last the bar starts at the resumed step, with max_steps as its total."""
    from lightning_lopt.callbacks import MetaTrainingProgressBar

    campaign = _config(tmp_path, "meta_train_campaign.yaml")
    args = ["-c", str(campaign), *[a for a in TINY if "progress_bar" not in a], "--trainer.devices=1",
            "--trainer.strategy=auto", "--trainer.callbacks+=lightning_lopt.callbacks.MetaTrainingProgressBar"]
    build_cli(["fit", *args, "--trainer.max_steps=3"])
    cli = build_cli(["fit", *args, "--trainer.max_steps=5", "--ckpt_path", "last"])
    bar = next(cb for cb in cli.trainer.callbacks if isinstance(cb, MetaTrainingProgressBar))
    assert cli.trainer.progress_bar_callback is bar
    assert (bar.train_progress_bar.total, bar.train_progress_bar.initial, bar.train_progress_bar.n) == (5, 3, 5)


def test_resumed_meta_training_logs_on_in_its_version_folder(tmp_path: Path, cli_argv: None) -> None:
    """--ckpt_path last continues the run's metrics.csv (Lightning's CSVLogger would open version_1)."""
    import csv

    campaign = _config(tmp_path, "meta_train_campaign.yaml")
    args = ["-c", str(campaign), *TINY, "--trainer.devices=1", "--trainer.strategy=auto"]
    build_cli(["fit", *args, "--trainer.max_steps=3"])
    build_cli(["fit", *args, "--trainer.max_steps=5", "--ckpt_path", "last"])
    logs = tmp_path / "run" / "logs"
    assert sorted(p.name for p in logs.iterdir()) == ["version_0"]
    with open(logs / "version_0" / "metrics.csv", newline="") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("meta/loss")]
    assert steps == [0, 1, 2, 3, 4]
    # A fresh run (no checkpoint) takes a new folder, as the CSVLogger does.
    build_cli(["fit", *args, "--trainer.max_steps=1"])
    assert sorted(p.name for p in logs.iterdir()) == ["version_0", "version_1"]


def test_resumed_writer_drops_the_rows_logged_after_the_checkpoint(tmp_path: Path) -> None:
    from lightning_lopt.loggers import _ContinuingWriter

    (tmp_path / "metrics.csv").write_text("a,step\n" + "".join(f"{i * 0.5},{i}\n" for i in range(6)))
    writer = _ContinuingWriter(str(tmp_path), resume_step=3)
    writer.log_metrics({"a": 9.0}, step=3)
    writer.save()
    assert (tmp_path / "metrics.csv").read_text().split() == ["a,step", "0.0,0", "0.5,1", "1.0,2", "9.0,3"]
