"""LearnedOptimizerMonitor: diagnostics on W&B (offline), TensorBoard and CSV; figures; the dashboard."""

from __future__ import annotations

import csv
import json
import math
import re
import struct
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lopt import HierarchicalRNN, HierarchicalRNNOptimizer
from lightning_lopt.callbacks import LearnedOptimizerMonitor, diagnostics_histograms, diagnostics_summary
from lightning_lopt.callbacks.monitor import HISTORY_FILE
from lightning_lopt.models import MLPClassifier

GLOBAL_UNITS = [f"lopt/global_rnn/unit_{j:02d}" for j in range(20)]
HISTOGRAMS = ["lopt/hist/log10_lr", "lopt/hist/log10_timescale_s0", "lopt/hist/log10_timescale_s3"]


def _trainer(**kwargs: Any) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1000,  # the monitor must log regardless of Lightning's own cadence
    )
    return pl.Trainer(**{**defaults, **kwargs})


def _classification_data(n: int = 96, dim: int = 6, classes: int = 3, batch_size: int = 8) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, dim, generator=gen)
    y = (x[:, :classes]).argmax(1)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


class _TinyMLP(MLPClassifier):
    def __init__(self) -> None:
        super().__init__(input_dim=6, hidden_dims=(8,), num_classes=3)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return HierarchicalRNNOptimizer(self.parameters(), weights=None)


# ---------------------------------------------------------------------------------------------- .wandb reader


def _leveldb_records(data: bytes, header_in_first_block: bool) -> list[bytes]:
    """Records of W&B's transaction log: a 7-byte file header, then the leveldb log format.

    Blocks of 32 KiB; each chunk has a 7-byte header (crc32, length, type: 1 full, 2 first,
    3 middle, 4 last); a block tail shorter than a header is padding.
    """
    block = 32768
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1, "not a .wandb file"
    base = 0 if header_in_first_block else 7
    pos, out, pending = 7, [], None
    while pos + 7 <= len(data):
        left = block - (pos - base) % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left  # zero padding up to the block end
            continue
        if length > left - 7 or kind not in (1, 2, 3, 4):
            raise ValueError(f"bad chunk at {pos}")
        if pos + 7 + length > len(data):
            break  # a chunk still being written
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            out.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        else:
            out.append(pending + chunk)
            pending = None
    return out


def _wandb_records(path: Path, timeout: float = 30.0) -> list[Any]:
    """Every record of a ``.wandb`` file, once its ``exit`` record is there.

    The file is written by W&B's separate service process: under load it can still be growing
    for a moment after ``wandb.finish()`` returns.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    deadline = time.monotonic() + timeout
    while True:
        data = path.read_bytes()
        try:
            chunks = _leveldb_records(data, header_in_first_block=True)
        except ValueError:
            chunks = _leveldb_records(data, header_in_first_block=False)
        records = []
        for chunk in chunks:
            record = pb.Record()
            record.ParseFromString(chunk)
            records.append(record)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def read_wandb_history(path: Path) -> list[dict[str, Any]]:
    """The history rows of an offline run's ``run-*.wandb`` file, nested keys as nested dicts."""
    rows = []
    for record in _wandb_records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        row: dict[str, Any] = {}
        for item in record.history.item:
            keys = [item.key] if item.key else list(item.nested_key)
            target = row
            for k in keys[:-1]:
                target = target.setdefault(k, {})
            target[keys[-1]] = json.loads(item.value_json)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------- one run, three loggers


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One fit of a small MLP with the monitor and W&B (offline), CSV and TensorBoard loggers."""
    import wandb

    root = tmp_path_factory.mktemp("monitor_run")
    with pytest.MonkeyPatch.context() as mp:
        # WandbLogger(offline=True) sets WANDB_MODE for the process: the context restores it.
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        mp.setenv("WANDB_DISABLE_GIT", "true")
        mp.setenv("WANDB_DISABLE_CODE", "true")
        for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
            mp.setenv(var, str(root / "wandb_home"))
        mp.chdir(root)
        loggers = [
            WandbLogger(save_dir=str(root), project="lopt-test", offline=True, settings=wandb.Settings(x_disable_stats=True)),
            CSVLogger(str(root), name="csv"),
            TensorBoardLogger(str(root), name="tb"),
        ]
        monitor = LearnedOptimizerMonitor(logging_interval=4)
        trainer = _trainer(max_epochs=1, logger=loggers, callbacks=[monitor], limit_val_batches=2, log_every_n_steps=5)
        data = _classification_data()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                trainer.fit(_TinyMLP(), data, data)
            wandb_files = loggers[0].experiment.dir
        finally:
            wandb.finish()
    (run_file,) = (root / "wandb").glob("offline-run-*/run-*.wandb")
    return dict(
        root=root,
        monitor=monitor,
        wandb_file=run_file,
        wandb_files_dir=Path(wandb_files),
        csv_dir=Path(loggers[1].log_dir),
        tb_dir=Path(loggers[2].log_dir),
        batches=len(data),
    )


def _assert_monitor_scalars(metrics: dict[str, Any], tensors: tuple[str, ...] = ("net.0.weight", "net.2.bias")) -> None:
    keys = [
        "lopt/timescale/s0_mean",
        "lopt/timescale/s3_p50",
        "lopt/lr/median",
        "lopt/attention/offset_rel_param",
        "lopt/update/ratio",
        "lopt/tensor_rnn/rms",
        "lopt/skipped_steps",
        "lopt/decay_factor",
        *GLOBAL_UNITS,
    ]
    for name in tensors:
        keys += [f"lopt/timescale/{name}/s0_mean", f"lopt/lr/{name}/max", f"lopt/attention/{name}/offset_rel_step"]
    for key in keys:
        assert key in metrics, key
        assert math.isfinite(float(metrics[key])), (key, metrics[key])


def test_wandb_offline_run_file_holds_scalars_and_histograms(logged_run: dict[str, Any]) -> None:
    rows = read_wandb_history(logged_run["wandb_file"])
    scalar_rows = [r for r in rows if "lopt/lr/median" in r]
    steps = logged_run["monitor"].logging_interval
    expected = list(range(0, logged_run["batches"], steps))
    assert [r["trainer/global_step"] for r in scalar_rows] == expected
    for row in scalar_rows:
        _assert_monitor_scalars(row)
    hist_rows = [r for r in rows if "lopt/hist/log10_lr" in r]
    assert [r["trainer/global_step"] for r in hist_rows] == expected
    for key in HISTOGRAMS:
        h = hist_rows[-1][key]
        assert h["_type"] == "histogram"
        assert len(h["bins"]) == len(h["values"]) + 1
        assert sum(h["values"]) > 0 and all(math.isfinite(b) for b in h["bins"])
    # Lightning's own metrics went to the same run.
    assert any("val_loss" in r for r in rows)


def test_csv_logger_gets_scalars(logged_run: dict[str, Any]) -> None:
    with open(logged_run["csv_dir"] / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = [r for r in rows if r.get("lopt/lr/median")]
    assert [int(r["step"]) for r in logged] == list(range(0, logged_run["batches"], 4))
    for row in logged:
        _assert_monitor_scalars(row)


def test_decay_factor_is_logged_for_the_step_it_scaled(tmp_path: Path) -> None:
    """With TrainingProgress, the logged decay factor is 1, then falls linearly to 0 over the last half."""
    from lightning.pytorch.loggers import CSVLogger

    from lightning_lopt.callbacks import TrainingProgress

    class Decaying(_TinyMLP):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return HierarchicalRNNOptimizer(self.parameters(), weights=None, decay_fraction=0.5)

    logger = CSVLogger(str(tmp_path), name="csv")
    trainer = _trainer(max_epochs=1, logger=logger, limit_val_batches=0,
                       callbacks=[TrainingProgress(), LearnedOptimizerMonitor(logging_interval=2)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Decaying(), _classification_data())  # 12 steps
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        logged = {int(r["step"]): float(r["lopt/decay_factor"]) for r in csv.DictReader(f) if r.get("lopt/decay_factor")}
    assert logged == pytest.approx({k: min(1.0, (1 - k / 12) / 0.5) for k in range(0, 12, 2)})


def test_tensorboard_logger_gets_scalars_and_histograms(logged_run: dict[str, Any]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logged_run["tb_dir"]), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    for key in ("lopt/timescale/s0_mean", "lopt/lr/mean", "lopt/attention/offset_rel_param", *GLOBAL_UNITS):
        assert key in tags["scalars"], key
        assert all(math.isfinite(e.value) for e in acc.Scalars(key))
    for key in HISTOGRAMS:
        assert key in tags["histograms"], key
        events = acc.Histograms(key)
        assert [e.step for e in events] == list(range(0, logged_run["batches"], 4))
        assert events[-1].histogram_value.num == sum(events[-1].histogram_value.bucket)


def test_history_file_and_figures(logged_run: dict[str, Any], tmp_path: Path) -> None:
    from lightning_lopt.plots import FIGURES, main

    files = logged_run["wandb_files_dir"]  # with W&B first, the run's files directory: synced with the run
    history = json.loads((files / HISTORY_FILE).read_text())
    assert [r["step"] for r in history["records"]] == list(range(0, logged_run["batches"], 4))
    for name in FIGURES:
        assert (files / name).stat().st_size > 1000, name
    main([str(logged_run["root"] / "wandb"), "--out", str(tmp_path)])
    made = {p.name for p in tmp_path.rglob("*.png")}
    assert made == set(FIGURES)


# ---------------------------------------------------------------------------------------------- agreement with the state


def test_summary_agrees_with_optimizer_state() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2))
    groups = [
        {"params": [model[0].weight, model[0].bias], "lr": 1.0},
        {"params": [model[2].weight, model[2].bias], "lr": 0.3},
    ]
    opt = HierarchicalRNNOptimizer(groups, weights=HierarchicalRNN(seed=3))
    names = ["0.weight", "0.bias", "2.weight", "2.bias"]
    x, y = torch.randn(16, 5), torch.randn(16, 2)

    def step() -> None:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()

    for _ in range(3):
        step()
    st = opt.hrnn_state
    old_log_lr, old_theta = st["log_lr"].double().clone(), st["theta"].double().clone()
    opt.request_diagnostics()
    step()
    diag = opt.last_diagnostics
    assert diag is not None and opt.last_diagnostics_tensors == [0, 1, 2, 3]
    sizes = [p.numel() for p in opt.params]
    quantiles = (0.1, 0.5, 0.9)
    got = diagnostics_summary(diag, names, sizes, quantiles=quantiles)

    # Independently, from the state before and after the step and the model's parameters.
    lopt = opt.lopt
    keep = torch.sigmoid(lopt.lr_smoothing.double())
    log_lr_step = (st["log_lr"].double() - keep * old_log_lr) / (1 - keep)
    group_lr = torch.cat([torch.full((p.numel(),), g["lr"], dtype=torch.float64) for g in groups for p in g["params"]])
    applied = torch.exp(log_lr_step + lopt.step_offset.double()) * group_lr
    beta = st["beta_in"].double()
    theta = st["theta"].double()
    phi = torch.cat([p.detach().reshape(-1).double() for p in opt.params])
    update = theta - old_theta
    bounds = [0]
    for s in sizes:
        bounds.append(bounds[-1] + s)
    spans = [("", slice(0, bounds[-1]))] + [(f"{n}/", slice(a, b)) for n, a, b in zip(names, bounds, bounds[1:])]
    for sub, sl in spans:
        for s in range(4):
            tau = 1.0 / (1.0 - beta[sl] ** (2.0**-s))
            assert got[f"lopt/timescale/{sub}s{s}_mean"] == pytest.approx(tau.mean().item(), rel=1e-4)
            for q in quantiles:
                want = torch.quantile(tau, q).item()
                assert got[f"lopt/timescale/{sub}s{s}_p{int(q * 100)}"] == pytest.approx(want, rel=1e-4)
        lr = applied[sl]
        assert got[f"lopt/lr/{sub}mean"] == pytest.approx(lr.mean().item(), rel=1e-3)
        assert got[f"lopt/lr/{sub}median"] == pytest.approx(torch.quantile(lr, 0.5).item(), rel=1e-3)
        assert got[f"lopt/lr/{sub}min"] == pytest.approx(lr.min().item(), rel=1e-3)
        assert got[f"lopt/lr/{sub}max"] == pytest.approx(lr.max().item(), rel=1e-3)
        off = (phi[sl] - theta[sl]).norm()
        assert got[f"lopt/attention/{sub}offset_rel_param"] == pytest.approx((off / theta[sl].norm()).item(), rel=1e-3)
        assert got[f"lopt/attention/{sub}offset_rel_step"] == pytest.approx((off / update[sl].norm()).item(), rel=1e-3)
        rms = update[sl].square().mean().sqrt().item()
        assert got[f"lopt/update/{sub}rms"] == pytest.approx(rms, rel=1e-3)
        assert got[f"lopt/update/{sub}ratio"] == pytest.approx((update[sl].norm() / theta[sl].norm()).item(), rel=1e-3)
        assert got[f"lopt/scale_decay/{sub}mean"] == pytest.approx(st["beta_sc"][sl].double().mean().item(), rel=1e-5)
    for t, name in enumerate(names):
        h = st["h_tensor"][t].double()
        assert got[f"lopt/tensor_rnn/{name}/mean"] == pytest.approx(h.mean().item(), rel=1e-5, abs=1e-7)
        assert got[f"lopt/tensor_rnn/{name}/rms"] == pytest.approx(h.square().mean().sqrt().item(), rel=1e-5)
    for j, key in enumerate(GLOBAL_UNITS):
        assert got[key] == pytest.approx(st["h_global"][0, j].item(), rel=1e-6, abs=1e-7)

    # Quantiles of a strided subsample; means still over every element.
    sub = diagnostics_summary(diag, names, sizes, quantiles=quantiles, max_samples=10)
    assert sub.keys() == got.keys() and all(math.isfinite(v) for v in sub.values())
    for key in ("lopt/timescale/s0_mean", "lopt/lr/0.weight/mean", "lopt/lr/min", "lopt/update/ratio"):
        assert sub[key] == pytest.approx(got[key], rel=1e-6)

    hists = diagnostics_histograms(diag, bins=16)
    h = hists["lopt/hist/log10_lr"]
    assert h.num == sum(h.counts) == bounds[-1]
    assert h.min == pytest.approx(torch.log10(applied).min().item(), abs=1e-3)
    assert h.max == pytest.approx(torch.log10(applied).max().item(), abs=1e-3)


# ---------------------------------------------------------------------------------------------- cost and configurations


def test_non_logging_steps_compute_no_diagnostics(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls = {"with": 0, "without": 0}
    original = HierarchicalRNN.step

    def counting_step(self: HierarchicalRNN, *args: Any, **kwargs: Any) -> Any:
        calls["with" if kwargs.get("diagnostics") else "without"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(HierarchicalRNN, "step", counting_step)
    monitor = LearnedOptimizerMonitor(logging_interval=4, histograms=False, plots=False)
    # Gradient accumulation: 2 batches per optimizer step, 10 optimizer steps.
    trainer = _trainer(max_steps=10, accumulate_grad_batches=2, logger=CSVLogger(str(tmp_path)), callbacks=[monitor])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(_TinyMLP(), _classification_data(n=160))
    assert calls == {"with": 3, "without": 7}  # optimizer steps 0, 4, 8
    with open(Path(trainer.loggers[0].log_dir) / "metrics.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("lopt/timescale/s0_mean")]
    assert steps == [0, 4, 8]


def test_without_logger_raises() -> None:
    trainer = _trainer(max_steps=1, logger=False, callbacks=[LearnedOptimizerMonitor()])
    data = _classification_data(n=16)
    with pytest.raises(MisconfigurationException, match="no logger"), warnings.catch_warnings():
        # The tiny model's untrained optimizer (weights=None) is beside the point here.
        warnings.filterwarnings("ignore", message=r"HierarchicalRNNOptimizer\(weights=None\)")
        trainer.fit(_TinyMLP(), data, data)


class _TwoOptimizers(pl.LightningModule):
    """Manual optimization: SGD first, the learned optimizer second with two groups and an unused tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.encoder = nn.Linear(6, 8)
        self.head = nn.Linear(8, 3)
        self.scale = nn.Parameter(torch.ones(3))
        self.unused = nn.Parameter(torch.zeros(4))  # never gets a gradient

    def training_step(self, batch: Any, batch_idx: int) -> None:
        sgd, lopt = self.optimizers()
        x, y = batch
        loss = nn.functional.cross_entropy(self.head(torch.tanh(self.encoder(x))) * self.scale, y)
        sgd.zero_grad()
        lopt.zero_grad()
        self.manual_backward(loss)
        sgd.step()
        lopt.step()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        groups = [
            {"params": [self.head.weight, self.head.bias], "lr": 1.0},
            {"params": [self.scale, self.unused], "lr": 0.25},
        ]
        return [
            torch.optim.SGD(self.encoder.parameters(), lr=0.1),
            HierarchicalRNNOptimizer(groups, weights=None),
        ]


def test_second_optimizer_several_groups_manual_optimization(tmp_path: Path) -> None:
    monitor = LearnedOptimizerMonitor(logging_interval=3, histograms=False, plots=False)
    trainer = _trainer(max_steps=14, logger=CSVLogger(str(tmp_path)), callbacks=[monitor])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(_TwoOptimizers(), _classification_data(n=56))  # 7 batches, 2 optimizer steps each
    assert [r["step"] for r in monitor.history] == [0, 3, 6]
    metrics = monitor.history[-1]["metrics"]
    assert not any("encoder" in k or "unused" in k for k in metrics)  # SGD's and gradient-free tensors
    _assert_monitor_scalars(metrics, tensors=("head.weight", "head.bias", "scale"))


# ---------------------------------------------------------------------------------------------- dashboard


def test_dashboard_panels_name_logged_keys(logged_run: dict[str, Any], capsys: pytest.CaptureFixture) -> None:
    from lightning_lopt.dashboard import build_workspace, main, panel_keys

    logged = set()
    for row in read_wandb_history(logged_run["wandb_file"]):
        logged.update(row)
    workspace = build_workspace("some-entity", "some-project")
    workspace._to_model()  # serialises offline: the payload `save()` would send
    panels = panel_keys(workspace)
    assert {sec for sec, *_ in panels} == {
        "Loss and accuracy",
        "Momentum timescales",
        "Learning rates",
        "Attention and updates",
        "Global and tensor RNN",
        "Histograms",
    }
    for section, title, keys, regex in panels:
        assert keys or regex, (section, title)
        missing = [k for k in keys if k not in logged]
        assert not missing, (section, title, missing)
        if regex:
            assert any(re.fullmatch(regex, k) for k in logged), (section, title, regex)
    main(["--entity", "e", "--project", "p", "--dry-run"])
    out = capsys.readouterr().out
    assert "[Histograms]" in out and "lopt/global_rnn/unit_19" in out


def test_dashboard_without_login_says_what_to_do(tmp_path: Path) -> None:
    """No W&B account configured: one line naming `wandb login` and --dry-run, no traceback."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), WANDB_CONFIG_DIR=str(tmp_path / "wandb_config"), NETRC=str(tmp_path / "netrc"))
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_lopt.dashboard", "--entity", "e", "--project", "p"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "wandb login" in lines[0] and "--dry-run" in lines[0]


def test_dashboard_with_a_key_but_no_network_says_so(tmp_path: Path) -> None:
    """An API key that W&B cannot be reached to verify is not reported as "not logged in"."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), WANDB_CONFIG_DIR=str(tmp_path / "wandb_config"), NETRC=str(tmp_path / "netrc"),
               WANDB_API_KEY="0" * 40, WANDB_BASE_URL="http://127.0.0.1:9")  # nothing listens on port 9
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_lopt.dashboard", "--entity", "e", "--project", "p"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "could not reach W&B" in lines[0] and "not logged in" not in lines[0]
