"""Shipped and user-supplied files: damaged weights files fail clearly; shipped checkpoints are portable."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_lopt import HierarchicalRNN, HierarchicalRNNOptimizer

ROOT = Path(__file__).resolve().parents[1]
META_CHECKPOINTS = sorted((ROOT / "meta_checkpoints").glob("*.ckpt"))


def _damaged(source: Path, target: Path, how: str) -> Path:
    data = source.read_bytes()
    if how == "empty":
        data = b""
    elif how == "truncated_half":
        data = data[: len(data) // 2]
    elif how == "truncated_end":
        data = data[:-7]
    elif how == "garbage_header":
        data = data[:8] + b"\xff" * 64 + data[72:]
    target.write_bytes(data)
    return target


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return HierarchicalRNN().save_pretrained(tmp_path_factory.mktemp("weights") / "w.safetensors")


@pytest.mark.parametrize("how", ["empty", "truncated_half", "truncated_end", "garbage_header"])
def test_damaged_safetensors_names_the_file(weights_file: Path, tmp_path: Path, how: str) -> None:
    bad = _damaged(weights_file, tmp_path / f"{how}.safetensors", how)
    with pytest.raises(ValueError, match="truncated or corrupted") as err:
        HierarchicalRNN.from_pretrained(bad)
    assert str(bad) in str(err.value)
    with pytest.raises(ValueError, match=str(bad).replace("\\", "\\\\")):
        HierarchicalRNNOptimizer([torch.nn.Parameter(torch.zeros(3))], weights=str(bad))


@pytest.mark.parametrize("how", ["empty", "truncated_half", "truncated_end", "garbage_header"])
def test_damaged_checkpoint_names_the_file(tmp_path: Path, how: str) -> None:
    good = shutil.copy(META_CHECKPOINTS[0], tmp_path / "good.ckpt")
    HierarchicalRNN.from_pretrained(good)  # the undamaged copy loads
    bad = _damaged(Path(good), tmp_path / f"{how}.ckpt", how)
    with pytest.raises(ValueError, match="truncated or corrupted") as err:
        HierarchicalRNN.from_pretrained(bad)
    assert str(bad) in str(err.value)


def _strings(x: Any) -> Iterator[str]:
    if isinstance(x, str):
        yield x
    elif isinstance(x, dict):
        for k, v in x.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _strings(v)


def _assert_portable(path: Path, tmp_path: Path) -> None:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert not [s for s in _strings(ckpt) if os.path.isabs(s)]
    states = [v for k, v in ckpt["callbacks"].items() if k.startswith("ModelCheckpoint")]
    assert states
    for state in states:
        callback = ModelCheckpoint(dirpath=tmp_path / "runs" / "checkpoints", monitor=state["monitor"])
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # Lightning warns "The dirpath has changed" otherwise
            callback.load_state_dict(state)
        assert callback.best_k_models == state["best_k_models"]


@pytest.mark.parametrize("path", META_CHECKPOINTS, ids=lambda p: p.name)
def test_shipped_meta_checkpoints_resume_anywhere(path: Path, tmp_path: Path) -> None:
    """No path of the machine that wrote them, so resuming elsewhere restores the top-k state silently."""
    _assert_portable(path, tmp_path)


def test_make_portable_rewrites_a_fresh_checkpoint(tmp_path: Path) -> None:
    """A checkpoint Lightning just wrote holds absolute paths; its portable copy holds relative ones and
    the same meta-parameters."""
    import lightning.pytorch as pl

    from lightning_lopt.meta import MetaTrainingModule, TaskDataModule
    from lightning_lopt.meta.portable import make_portable
    from tests.test_meta import QuadDistribution

    run = tmp_path / "run"
    module = MetaTrainingModule(tasks=QuadDistribution(), tasks_per_step=2, truncation_length=3,
                                unroll_length_mean=6, unroll_length_min=3, num_unrolls_mean=1)
    callbacks = [ModelCheckpoint(dirpath=run / "checkpoints", save_last=True, every_n_train_steps=1),
                 ModelCheckpoint(dirpath=run / "checkpoints", monitor="meta/loss", filename="best-{step}")]
    pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
               limit_val_batches=0, callbacks=callbacks).fit(module, TaskDataModule(tasks_per_step=2))
    written = run / "checkpoints" / "last.ckpt"
    assert any(os.path.isabs(s) for s in _strings(torch.load(written, weights_only=True)["callbacks"]))
    out = make_portable(written, tmp_path / "portable.ckpt", root=tmp_path)
    _assert_portable(out, tmp_path)
    ckpt = torch.load(out, weights_only=True)
    assert "run/checkpoints/last.ckpt" in list(_strings(ckpt["callbacks"]))
    for k, v in torch.load(written, weights_only=True)["state_dict"].items():
        assert torch.equal(v, ckpt["state_dict"][k])


def test_a_copy_without_tasks_in_flight_resumes_the_meta_parameters(tmp_path: Path) -> None:
    """``drop_tasks`` leaves out the tasks in flight; resuming from it warns, keeps the meta-state and trains on."""
    import lightning.pytorch as pl

    from lightning_lopt.meta import MetaTrainingModule, TaskDataModule
    from lightning_lopt.meta.portable import make_portable
    from tests.test_meta import QuadDistribution

    def module() -> MetaTrainingModule:
        return MetaTrainingModule(tasks=QuadDistribution(), tasks_per_step=2, truncation_length=3,
                                  unroll_length_mean=6, unroll_length_min=3, num_unrolls_mean=1)

    def trainer(steps: int, **kw: Any) -> pl.Trainer:
        return pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                          enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path, **kw)

    first = trainer(2, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=2)])
    first.fit(module(), TaskDataModule(tasks_per_step=2))
    full = tmp_path / "ckpt" / "last.ckpt"
    slim = make_portable(full, tmp_path / "slim.ckpt", root=tmp_path, drop_tasks=True)
    saved = torch.load(slim, weights_only=True)
    assert "meta_ranks" not in saved and "meta_ranks" in torch.load(full, weights_only=True)
    assert slim.stat().st_size < full.stat().st_size

    resumed = module()
    with pytest.warns(UserWarning, match="holds no tasks in flight"):
        trainer(3, enable_checkpointing=False).fit(resumed, TaskDataModule(tasks_per_step=2), ckpt_path=slim)
    assert resumed.global_step == 3 and resumed.stream_position == saved["meta_counters"]["stream_position"] + 1
    assert all(slot is not None for slot in resumed.slots)
