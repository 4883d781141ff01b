"""HierarchicalRNNOptimizer through a Lightning Trainer and the ``lightning-lopt`` CLI (CPU, tiny problems)."""

from __future__ import annotations

import importlib.util
import random
import subprocess
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lopt import HierarchicalRNN, HierarchicalRNNOptimizer
from lightning_lopt.callbacks import EvalWithTrueParameters, TrainingProgress
from lightning_lopt.cli import build_cli, main
from lightning_lopt.data import MNIST1DDataModule
from lightning_lopt.models import MLPClassifier

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

pytestmark = pytest.mark.filterwarnings(
    "ignore:This installation ships no meta-trained",
    "ignore:.*Checkpoint directory.*exists and is not empty",
    "ignore:.*GPU available but not used",
)

N_FEATURES, N_CLASSES, BATCH = 8, 3, 8


def _data(n_batches: int = 8, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_batches * BATCH, N_FEATURES, generator=gen)
    y = (x[:, :N_CLASSES] * 2).argmax(dim=1)  # learnable labels
    return TensorDataset(x, y)


def _flat(module: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1).float() for p in module.parameters()]).clone()


class TinyModule(pl.LightningModule):
    """A two-layer net on fixed data, trained with the learned optimizer (attention on)."""

    def __init__(self, n_batches: int = 8, optimizer_cls: type = HierarchicalRNNOptimizer, **opt_kwargs: Any) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(N_FEATURES, 16), nn.Tanh(), nn.Linear(16, N_CLASSES))
        self.dataset = _data(n_batches)
        self.optimizer_cls = optimizer_cls
        self.opt_kwargs = opt_kwargs
        self.logits_dtypes: list[torch.dtype] = []

    def loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        logits = self.net(x)
        self.logits_dtypes.append(logits.dtype)
        return F.cross_entropy(logits.float(), y)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self.loss(batch)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=BATCH, shuffle=False)

    def configure_optimizers(self) -> HierarchicalRNNOptimizer:
        kwargs = dict(self.opt_kwargs)
        kwargs.setdefault("weights", HierarchicalRNN())  # the spec's seeded initialisation, no warning
        return self.optimizer_cls(self.parameters(), **kwargs)

    def full_loss(self) -> float:
        x, y = self.dataset.tensors
        with torch.no_grad():
            return float(F.cross_entropy(self.net(x), y))

    def batch_grad(self, index: int) -> Tensor:
        """Gradient of batch ``index`` at the model's current parameters, in float32."""
        x, y = self.dataset.tensors
        sl = slice(index * BATCH, (index + 1) * BATCH)
        params = list(self.parameters())
        with torch.enable_grad():
            loss = F.cross_entropy(self.net(x[sl]).float(), y[sl])
            grads = torch.autograd.grad(loss, params)
        return torch.cat([g.reshape(-1) for g in grads])


class ValTinyModule(TinyModule):
    """TinyModule with validation that records where the model is when it validates."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.val_points: list[Tensor] = []
        self.train_points: list[Tensor] = []

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        self.train_points.append(_flat(self))
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.val_points.append(_flat(self))
        self.log("val_loss", self.loss(batch))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_data(1, seed=1), batch_size=BATCH)


def _trainer(tmp_path: Path, **kwargs: Any) -> pl.Trainer:
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def _hrnn(trainer: pl.Trainer) -> HierarchicalRNNOptimizer:
    (opt,) = trainer.optimizers
    opt = getattr(opt, "optimizer", opt)
    assert isinstance(opt, HierarchicalRNNOptimizer)
    return opt


def _spy_grads(opt: HierarchicalRNNOptimizer) -> list[tuple[Tensor, Tensor]]:
    """Record (point, grad) as the update rule receives them, on each step."""
    seen: list[tuple[Tensor, Tensor]] = []
    inner = opt.lopt.step

    def step(state: Any, point: Tensor, grad: Tensor, *args: Any, **kwargs: Any) -> Any:
        seen.append((point.clone(), grad.clone()))
        return inner(state, point, grad, *args, **kwargs)

    opt.lopt.step = step  # type: ignore[method-assign]
    return seen


class SpyOnFirstStep(Callback):
    """Installs the gradient spy once the optimizer exists."""

    def __init__(self) -> None:
        self.seen: list[tuple[Tensor, Tensor]] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seen = _spy_grads(_hrnn(trainer))


# ---------------------------------------------------------------------------------------- Trainer


def test_configure_optimizers_trains_with_the_learned_optimizer(tmp_path: Path) -> None:
    model = TinyModule(n_batches=8)
    before, loss_before = _flat(model), model.full_loss()
    trainer = _trainer(tmp_path, max_epochs=3, callbacks=[EvalWithTrueParameters()])
    trainer.fit(model)
    opt = _hrnn(trainer)
    assert trainer.global_step == 24
    assert opt.hrnn_state["step"] == 24 and opt.skipped_steps == 0
    after = _flat(model)
    assert torch.isfinite(after).all()
    assert not torch.allclose(before, after)
    assert model.full_loss() < loss_before


def test_accumulate_grad_batches_steps_on_the_mean_gradient(tmp_path: Path) -> None:
    model = TinyModule(n_batches=8)
    spy = SpyOnFirstStep()
    trainer = _trainer(tmp_path, max_epochs=1, accumulate_grad_batches=2, callbacks=[spy, EvalWithTrueParameters()])
    # The first step's gradient must be the mean of batches 0 and 1 at the initial point.
    expected = (model.batch_grad(0) + model.batch_grad(1)) / 2
    trainer.fit(model)
    assert trainer.global_step == 4
    assert _hrnn(trainer).hrnn_state["step"] == 4
    assert len(spy.seen) == 4
    torch.testing.assert_close(spy.seen[0][1], expected, rtol=1e-5, atol=1e-7)


class RecordUnclipped(Callback):
    def __init__(self) -> None:
        self.norms: list[float] = []
        self.grads: list[Tensor] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        # Lightning clips after this hook, inside the closure, before optimizer.step reads grads.
        g = torch.cat([p.grad.reshape(-1) for p in pl_module.parameters()]).clone()
        self.grads.append(g)
        self.norms.append(float(g.norm()))


def test_gradient_clip_val_clips_before_the_step(tmp_path: Path) -> None:
    clip = 1e-2
    model = TinyModule(n_batches=3)
    spy, unclipped = SpyOnFirstStep(), RecordUnclipped()
    trainer = _trainer(tmp_path, max_steps=3, gradient_clip_val=clip,
                       callbacks=[spy, unclipped, EvalWithTrueParameters()])
    trainer.fit(model)
    assert len(spy.seen) == 3 == len(unclipped.grads)
    for (_, seen), raw, norm in zip(spy.seen, unclipped.grads, unclipped.norms):
        assert norm > 10 * clip  # otherwise the test would not show clipping
        assert float(seen.norm()) == pytest.approx(clip, rel=1e-4)
        torch.testing.assert_close(seen, raw * (clip / (norm + 1e-6)), rtol=1e-5, atol=1e-9)


def test_bf16_mixed_precision(tmp_path: Path) -> None:
    model = TinyModule(n_batches=4)
    before = _flat(model)
    trainer = _trainer(tmp_path, max_epochs=2, precision="bf16-mixed", callbacks=[EvalWithTrueParameters()])
    trainer.fit(model)
    assert set(model.logits_dtypes) == {torch.bfloat16}  # autocast really ran
    opt = _hrnn(trainer)
    assert trainer.global_step == 8 == opt.hrnn_state["step"]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    after = _flat(model)
    assert torch.isfinite(after).all() and not torch.allclose(before, after)


class RecordingHRNN(HierarchicalRNNOptimizer):
    """Records the closure argument of every step() call."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.closures: list[Optional[Any]] = []

    def step(self, closure: Optional[Any] = None) -> Any:
        self.closures.append(closure)
        return super().step(closure)


def test_16_mixed_with_grad_scaler_steps_without_closure(tmp_path: Path) -> None:
    # precision="16-mixed" on CPU silently becomes bf16-mixed in Lightning 2.6; the plugin keeps fp16
    # and a GradScaler, which runs the closure itself and then calls optimizer.step() with no closure.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    plugin = MixedPrecision("16-mixed", device="cpu", scaler=scaler)
    model = TinyModule(n_batches=4, optimizer_cls=RecordingHRNN)
    before = _flat(model)
    spy = SpyOnFirstStep()
    trainer = _trainer(tmp_path, max_epochs=1, plugins=[plugin], callbacks=[spy])
    expected = model.batch_grad(0)
    trainer.fit(model)
    assert set(model.logits_dtypes) == {torch.float16}
    opt = _hrnn(trainer)
    assert isinstance(opt, RecordingHRNN)
    assert len(opt.closures) == 4 and all(c is None for c in opt.closures)
    assert opt.hrnn_state["step"] == 4 == trainer.global_step and opt.skipped_steps == 0
    # The optimizer saw the unscaled gradient (fp16 forward, so a loose tolerance).
    torch.testing.assert_close(spy.seen[0][1], expected, rtol=2e-2, atol=2e-3)
    after = _flat(model)
    assert torch.isfinite(after).all() and not torch.allclose(before, after)


class RecordTheta(Callback):
    """After each step, record the true parameters (optimizer state) and the model's point."""

    def __init__(self) -> None:
        self.theta: dict[int, Tensor] = {}
        self.phi: dict[int, Tensor] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        opt = _hrnn(trainer)
        assert opt.training
        self.theta[trainer.global_step] = opt.hrnn_state["theta"].clone()
        self.phi[trainer.global_step] = _flat(pl_module)


def test_eval_callback_validates_at_true_parameters_and_trains_at_attended_point(tmp_path: Path) -> None:
    model = ValTinyModule(n_batches=6)
    rec = RecordTheta()
    trainer = _trainer(
        tmp_path, max_steps=6, val_check_interval=3, num_sanity_val_steps=0, callbacks=[EvalWithTrueParameters(), rec]
    )
    trainer.fit(model)
    opt = _hrnn(trainer)
    assert opt.lopt.attention
    assert len(model.val_points) == 2  # after steps 3 and 6
    for val_point, step in zip(model.val_points, (3, 6)):
        assert not torch.equal(rec.theta[step], rec.phi[step])  # attention moves the point
        assert torch.equal(val_point, rec.theta[step])
    # Step 4 trains where step 3 left the attended point, after validation swapped back.
    assert torch.equal(model.train_points[3], rec.phi[3])
    # After fit, the model holds the trained (true) parameters.
    assert torch.equal(_flat(model), rec.theta[6])
    assert not opt.training


def test_checkpoint_holds_true_parameters_and_loads_weights_only(tmp_path: Path) -> None:
    model = ValTinyModule(n_batches=4)
    rec = RecordTheta()
    callbacks = [EvalWithTrueParameters(), rec]
    trainer = _trainer(tmp_path, max_epochs=1, enable_checkpointing=True, num_sanity_val_steps=0, callbacks=callbacks)
    trainer.fit(model)
    (path,) = (tmp_path / "checkpoints").glob("*.ckpt")
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["global_step"] == 4
    saved = torch.cat([t.reshape(-1).float() for t in ckpt["state_dict"].values()])
    assert torch.equal(saved, rec.theta[4])
    assert not torch.equal(saved, rec.phi[4])
    st = ckpt["optimizer_states"][0]["state"]["hrnn"]
    assert st["training"] is False and st["step"] == 4
    assert torch.equal(st["theta"], rec.phi[4])  # eval mode: the state holds the attended point
    # A model loaded from the checkpoint for inference is the trained one.
    fresh = ValTinyModule(n_batches=4)
    fresh.load_state_dict(ckpt["state_dict"])
    assert torch.equal(_flat(fresh), rec.theta[4])


@pytest.mark.parametrize("horizon", [None, 8])
def test_resume_from_checkpoint_is_bit_identical(tmp_path: Path, horizon: Optional[int]) -> None:
    """Also mid-decay: with the run's length known (8 steps), the step decays over steps 4-7 and the
    resumed run (from step 4) takes the same decayed steps."""
    kwargs = dict(num_sanity_val_steps=0, limit_val_batches=1)

    def callbacks() -> list[pl.Callback]:
        return [EvalWithTrueParameters()] + ([TrainingProgress(horizon)] if horizon else [])

    # Uninterrupted: 2 epochs of 4 steps, validating (and swapping) after each, no checkpoints.
    full = ValTinyModule(n_batches=4, decay_fraction=0.5)
    t_full = _trainer(tmp_path / "full", max_epochs=2, callbacks=callbacks(), **kwargs)
    t_full.fit(full)
    # Interrupted: 1 epoch with checkpointing, then a new model and trainer resume to 2 epochs.
    first = ValTinyModule(n_batches=4, decay_fraction=0.5)
    t1 = _trainer(
        tmp_path / "a", max_epochs=1, enable_checkpointing=True, callbacks=callbacks(), **kwargs
    )
    t1.fit(first)
    (ckpt,) = (tmp_path / "a" / "checkpoints").glob("*.ckpt")
    mid = _flat(first)
    resumed = ValTinyModule(n_batches=4, decay_fraction=0.5)
    t2 = _trainer(tmp_path / "b", max_epochs=2, callbacks=callbacks(), **kwargs)
    t2.fit(resumed, ckpt_path=ckpt)

    assert t2.global_step == t_full.global_step == 8
    assert _hrnn(t_full).lopt.attention
    assert not torch.equal(_flat(resumed), mid)
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    st_full, st_res = _hrnn(t_full).hrnn_state, _hrnn(t2).hrnn_state
    assert st_full["step"] == st_res["step"] == 8
    assert _hrnn(t2).decay_factor == (0.0 if horizon else 1.0) and _hrnn(t2).decay_fraction == 0.5
    for key, value in st_full.items():
        if isinstance(value, Tensor):
            assert torch.equal(value, st_res[key]), key


# ---------------------------------------------------------------------------------------- data


def test_mnist1d_datamodule_is_deterministic_with_right_shapes() -> None:
    py_state, np_state = random.getstate(), np.random.get_state()
    a = MNIST1DDataModule(num_samples=300, val_fraction=0.1, batch_size=16, seed=7)
    a.setup("fit")
    # Generating the data set must not reseed the caller's global random state.
    assert random.getstate() == py_state
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1]) and after[2:] == np_state[2:]

    b = MNIST1DDataModule(num_samples=300, val_fraction=0.1, batch_size=16, seed=7)
    b.setup("fit")
    c = MNIST1DDataModule(num_samples=300, val_fraction=0.1, batch_size=16, seed=8)
    c.setup("fit")
    for split in ("train_set", "val_set", "test_set"):
        for ta, tb in zip(getattr(a, split).tensors, getattr(b, split).tensors):
            assert torch.equal(ta, tb)
    assert not torch.equal(a.train_set.tensors[0], c.train_set.tensors[0])

    assert len(a.train_set) == 216 and len(a.val_set) == 24 and len(a.test_set) == 60
    x, y = next(iter(a.train_dataloader()))
    assert x.shape == (16, 40) and x.dtype == torch.float32
    assert y.shape == (16,) and y.dtype == torch.int64
    all_y = torch.cat([a.train_set.tensors[1], a.val_set.tensors[1], a.test_set.tensors[1]])
    assert set(all_y.tolist()) == set(range(10))
    xv, _ = next(iter(a.val_dataloader()))
    assert xv.shape[1] == 40


# ---------------------------------------------------------------------------------------- CLI


TINY_RUN = [
    "--data.init_args.num_samples=200",
    "--data.init_args.batch_size=32",
    "--model.init_args.hidden_dims=[8]",
    "--trainer.logger=false",
    "--trainer.enable_model_summary=false",
]


@pytest.fixture
def cli_argv(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The CLI runs in-process from ``args``: keep pytest's argv out, restore the thread count after."""
    monkeypatch.setattr("sys.argv", ["lightning-lopt"])
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_cli_optimizer_section_builds_the_learned_optimizer(tmp_path: Path, cli_argv: None) -> None:
    # LightningCLI instantiates the optimizer with the model; weights=None must say it is untrained.
    with pytest.warns(UserWarning, match="untrained initialisation"):
        cli = build_cli(
            [
                "--model=lightning_lopt.models.MLPClassifier",
                "--data=lightning_lopt.data.MNIST1DDataModule",
                "--optimizer=lightning_lopt.HierarchicalRNNOptimizer",
                "--optimizer.weights=null",
                "--optimizer.lr=0.5",
                "--optimizer.weight_decay=0.01",
                "--optimizer.seed=3",
                "--trainer.max_steps=2",
                "--trainer.enable_progress_bar=false",
                "--trainer.enable_checkpointing=false",
                "--trainer.callbacks+=lightning_lopt.callbacks.EvalWithTrueParameters",
                f"--trainer.default_root_dir={tmp_path}",
                *TINY_RUN,
            ],
            run=False,
        )
    opt = cli.model.configure_optimizers()
    assert isinstance(opt, HierarchicalRNNOptimizer)
    assert opt.param_groups[0]["lr"] == 0.5 and opt.param_groups[0]["weight_decay"] == 0.01 and opt.seed == 3
    assert {id(p) for p in opt.params} == {id(p) for p in cli.model.parameters()}
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    trained = _hrnn(cli.trainer)
    assert cli.trainer.global_step == 2 == trained.hrnn_state["step"]


@pytest.mark.parametrize(
    "name, optimizer",
    [("mnist1d_hrnn.yaml", HierarchicalRNNOptimizer), ("mnist1d_adam.yaml", torch.optim.Adam)],
)
def test_configs_parse(name: str, optimizer: type, tmp_path: Path, cli_argv: None) -> None:
    torch.set_num_threads(2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = build_cli(["-c", str(CONFIGS / name), f"--trainer.default_root_dir={tmp_path}"], run=False)
    # The config's optimizer replaces MLPClassifier's fallback on purpose: no warning about it.
    assert not [w for w in caught if "will be overridden" in str(w.message)]
    assert isinstance(cli.model, MLPClassifier) and isinstance(cli.datamodule, MNIST1DDataModule)
    assert cli.model.hparams.hidden_dims == [100, 100]
    assert cli.config.torch_num_threads == 1 and torch.get_num_threads() == 1
    assert isinstance(cli.trainer.progress_bar_callback, TQDMProgressBar)  # Lightning's default bar
    has_eval = any(isinstance(cb, EvalWithTrueParameters) for cb in cli.trainer.callbacks)
    assert has_eval == (optimizer is HierarchicalRNNOptimizer)
    opt = cli.model.configure_optimizers()
    assert type(opt) is optimizer
    if optimizer is torch.optim.Adam:
        assert opt.param_groups[0]["lr"] == 1e-3


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_configs_accept_the_cli_progress_bar_switch(name: str, tmp_path: Path, cli_argv: None) -> None:
    """`--trainer.enable_progress_bar false` works with every shipped config (no hard-coded bar callback)."""
    cli = build_cli(
        ["-c", str(CONFIGS / name), "--trainer.enable_progress_bar=false", "--trainer.logger=false",
         f"--trainer.default_root_dir={tmp_path}"],
        run=False,
    )
    assert cli.trainer.progress_bar_callback is None


def test_wandb_config_writes_nothing_into_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli_argv: None
) -> None:
    """The W&B config keeps its files (and the CLI's config.yaml) under runs/, which git ignores."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")  # WandbLogger(offline=True) sets it for the process
    monkeypatch.setenv("WANDB_SILENT", "true")
    try:
        main(["fit", "-c", str(CONFIGS / "mnist1d_hrnn_wandb.yaml"), "--trainer.max_steps=2",
              "--trainer.enable_progress_bar=false", "--trainer.log_every_n_steps=1",
              *[a for a in TINY_RUN if "logger" not in a]])
    finally:
        wandb.finish()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]
    run_dir = tmp_path / "runs" / "mnist1d_hrnn_wandb"
    assert (run_dir / "config.yaml").exists()
    assert list((run_dir / "wandb").glob("offline-run-*"))
    ignored = subprocess.run(["git", "check-ignore", "-q", "runs/mnist1d_hrnn_wandb/config.yaml"], cwd=ROOT)
    assert ignored.returncode == 0


def test_cli_fit_runs_config_and_prints_validation_accuracy(
    tmp_path: Path, capsys: pytest.CaptureFixture, cli_argv: None
) -> None:
    args = [
        "fit",
        "-c",
        str(CONFIGS / "mnist1d_hrnn.yaml"),
        "--trainer.max_steps=3",
        f"--trainer.default_root_dir={tmp_path}",
        *TINY_RUN,
    ]
    main(args)
    out = capsys.readouterr().out
    assert "Final validation accuracy after 3 steps: val_acc=" in out
    acc = float(out.split("val_acc=")[-1].split()[0])
    assert 0.0 <= acc <= 1.0
    assert float(out.split("(fit: ")[-1].split(" s)")[0]) > 0  # README run times come from this line
    assert (tmp_path / "config.yaml").exists()
    (ckpt,) = (tmp_path / "checkpoints").glob("*.ckpt")
    loaded = torch.load(ckpt, weights_only=True)
    assert loaded["global_step"] == 3
    assert loaded["hyper_parameters"]["hidden_dims"] == [8]
    assert loaded["optimizer_states"][0]["state"]["hrnn"]["step"] == 3
    # The saved config.yaml is overwritten, not refused, on a second run in the same directory.
    main(args[:3] + ["--trainer.max_steps=1"] + args[4:])
    assert "Final validation accuracy after 1 steps" in capsys.readouterr().out


def test_cli_help_lists_the_optimizer_arguments(capsys: pytest.CaptureFixture, cli_argv: None) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--optimizer.help", "lightning_lopt.HierarchicalRNNOptimizer"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for arg in ("--optimizer.weights", "--optimizer.lr", "--optimizer.weight_decay"):
        assert arg in out
    assert "Multiplier of the learned step size" in out
    markup = [m for m in ("``", ":class:", ":data:", ":mod:", ":meth:") if m in out]
    assert not markup, f"raw Sphinx markup in --help: {markup}"


# ---------------------------------------------------------------------------------------- example


def test_example_script_runs(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("train_mnist1d", ROOT / "examples" / "train_mnist1d.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        acc = module.main(
            max_epochs=1,
            limit_train_batches=3,
            limit_val_batches=1,
            default_root_dir=tmp_path,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
        )
    assert 0.0 <= acc <= 1.0


@pytest.mark.parametrize("given", [None, 100])
def test_training_progress_callback_sets_the_horizon(tmp_path: Path, given: Optional[int]) -> None:
    """TrainingProgress gives the optimizer trainer.estimated_stepping_batches (or its own horizon), which the
    optimizer's progress then follows; a horizon passed to the optimizer is kept."""
    from lightning_lopt.callbacks import TrainingProgress

    weights = HierarchicalRNN(progress_input=True)
    model = TinyModule(n_batches=4, weights=weights)
    trainer = _trainer(tmp_path, max_epochs=2, accumulate_grad_batches=2, callbacks=[TrainingProgress(given), EvalWithTrueParameters()])
    trainer.fit(model)
    opt = _hrnn(trainer)
    assert opt.total_steps == (given or 4) and opt.hrnn_state["step"] == 4
    assert opt.progress == 4 / opt.total_steps
    kept = TinyModule(n_batches=4, weights=weights, total_steps=50)
    trainer = _trainer(tmp_path, max_epochs=1, callbacks=[TrainingProgress(), EvalWithTrueParameters()])
    trainer.fit(kept)
    assert _hrnn(trainer).total_steps == 50


@pytest.mark.parametrize("setting, expected", [([], 1), (["--torch_num_threads=null"], 2), (["--torch_num_threads=2"], 2)])
def test_thread_default_is_one_for_a_small_model_on_cpu(setting, expected, tmp_path: Path, cli_argv: None) -> None:
    """torch_num_threads: auto (the default) runs a small model on one thread; null keeps torch's setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cli = build_cli(["-c", str(CONFIGS / "mnist1d_hrnn_wandb.yaml"), f"--trainer.default_root_dir={tmp_path}",
                         "--trainer.logger=false", "--trainer.callbacks=[]", *setting], run=False)
        assert torch.get_num_threads() == expected
        assert cli.config.torch_num_threads == ("auto" if not setting else (None if "null" in setting[0] else 2))
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    "option, says",
    [("--optimizer.init_args.lr=-1", "lr=-1.0"), ("--optimizer.init_args.weights=missing.safetensors", "does not exist"),
     ("--optimizer.init_args.backend=cuda", "backend")],
)
def test_bad_values_end_with_one_message_and_no_traceback(
    option, says, tmp_path: Path, capsys, monkeypatch, cli_argv: None
) -> None:
    """The entry point reports a bad value in a line (exit status 2); --traceback re-raises it."""
    from lightning_lopt.cli import main

    monkeypatch.delenv("LIGHTNING_LOPT_TRACEBACK", raising=False)
    argv = ["fit", "-c", str(CONFIGS / "mnist1d_hrnn.yaml"), f"--trainer.default_root_dir={tmp_path}",
            "--trainer.max_steps=1", "--trainer.logger=false", "--trainer.enable_progress_bar=false", option]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "lightning-lopt: error:" in err and says in err and "Traceback" not in err
    with pytest.raises((ValueError, FileNotFoundError)):
        main([*argv, "--traceback"])


def test_state_dtype_takes_plain_names_in_configs(tmp_path: Path) -> None:
    for name in ("bfloat16", "torch.bfloat16", "float32"):
        opt = HierarchicalRNNOptimizer([torch.nn.Parameter(torch.ones(3))], state_dtype=name)
        assert opt.state_dtype == getattr(torch, name.removeprefix("torch."))
    with pytest.raises(ValueError, match="float16|bfloat16"):
        HierarchicalRNNOptimizer([torch.nn.Parameter(torch.ones(3))], state_dtype="int8")


def test_known_third_party_noise_is_filtered(caplog) -> None:
    """quiet_third_party (the lightning-lopt command runs it) drops Lightning's package tips and the
    LeafSpec deprecation that Lightning's pytree helper triggers, and nothing else."""
    import logging

    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    from lightning_lopt.quiet import quiet_third_party

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_third_party()
        warnings.warn_explicit("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning,
                               "_pytree.py", 21, module="lightning.pytorch.utilities._pytree")
        warnings.warn("an unrelated warning", UserWarning)
    assert [str(w.message) for w in caught] == ["an unrelated warning"]
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        rank_zero_info("💡 Tip: try installing something")
        rank_zero_info("GPU available: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False"]


def test_abbreviated_options_are_refused(tmp_path: Path, cli_argv: None, capsys) -> None:
    """--trainer.max_epoch is not silently taken for --trainer.max_epochs."""
    with pytest.raises(SystemExit):
        build_cli(["fit", "-c", str(CONFIGS / "mnist1d_adam.yaml"), "--trainer.max_epoch=1"])
    assert "--trainer.max_epoch=1" in capsys.readouterr().err


def test_a_weights_card_is_named_as_such() -> None:
    card = Path(__file__).resolve().parent.parent / "lightning_lopt" / "weights" / "default.json"
    with pytest.raises(ValueError, match="weights card.*default.safetensors"):
        HierarchicalRNNOptimizer([torch.nn.Parameter(torch.ones(2))], weights=str(card))
