"""Meta-training: meta-gradients, learning signal, checkpoint/resume and DDP."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_lopt import HierarchicalRNN
from lightning_lopt.hrnn import Layout
from lightning_lopt.meta import MetaTrainingModule, TaskDataModule, TaskSlot, run_inner
from lightning_lopt.tasks import NegativeLossError, Task

warnings.filterwarnings("ignore", ".*does not have many workers.*")


class QuadTask(Task):
    """0.5 ||W x - y||^2 + 0.5 ||M||^2: two tensors, full batch, gradient depends on the parameters."""

    family = "quad"

    def __init__(self, seed: int, dim: int = 6, dtype: torch.dtype = torch.float32) -> None:
        g = torch.Generator().manual_seed(seed)
        self.W = (torch.randn(dim, dim, generator=g) / dim**0.5).to(dtype)
        self.y = torch.randn(dim, generator=g).to(dtype)
        self.dim, self.dtype = dim, dtype

    def init_params(self, generator: torch.Generator) -> list[torch.Tensor]:
        return [torch.randn(self.dim, generator=generator).to(self.dtype), torch.randn(2, 3, generator=generator).to(self.dtype)]

    def loss(self, params, batch):
        x, m = params
        return 0.5 * ((self.W @ x - self.y) ** 2).sum() + 0.5 * (m**2).sum()


class LinearTask(Task):
    """c . x + 100 on a small box: its gradient does not depend on the parameters."""

    family = "linear"

    def __init__(self, seed: int) -> None:
        self.c = torch.randn(5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    def init_params(self, generator):
        return [torch.randn(5, generator=generator, dtype=torch.float64)]

    def loss(self, params, batch):
        return (self.c * params[0]).sum() + 100.0


class QuadDistribution:
    """Duck-typed task distribution over QuadTask seeds."""

    def __init__(self, task_cls=QuadTask) -> None:
        self.task_cls = task_cls

    def sample(self, seed: int) -> Task:
        return self.task_cls(seed)


def _fresh_slots(lopt: HierarchicalRNN, tasks: list[Task], dtype=torch.float64) -> list[TaskSlot]:
    slots = []
    for i, task in enumerate(tasks):
        gen = torch.Generator().manual_seed(100 + i)
        params = [p.to(dtype) for p in task.init_params(gen)]
        point = torch.cat([p.reshape(-1) for p in params])
        layout = Layout.build([p.numel() for p in params])
        slot = TaskSlot(seed=i, task=task, length=1000, shapes=[p.shape for p in params], generator=gen)
        slot.point = point
        slot.state = lopt.init_state(layout, theta=point, generator=torch.Generator().manual_seed(i), dtype=dtype)
        slot.initial_loss = task.loss(params, None).detach()
        slots.append(slot)
    return slots


def _grads(loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    grads = torch.autograd.grad(loss, params, allow_unused=True)  # attention read-outs are unused without attention
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def _meta_loss(lopt: HierarchicalRNN, tasks: list[Task], steps: int, second_order: bool) -> torch.Tensor:
    loss, _, _ = run_inner(lopt, _fresh_slots(lopt, tasks), steps, second_order=second_order)
    return loss


def _perturbed_lopt(attention: bool) -> HierarchicalRNN:
    lopt = HierarchicalRNN(attention=attention, seed=3).double()
    with torch.no_grad():
        # Non-zero log-lr read-out and a larger step so every path of the rule carries gradient.
        lopt.w_log_lr.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(5))
        lopt.step_offset.fill_(3.0)
    return lopt


@pytest.mark.parametrize("attention", [True, False])
def test_second_order_meta_gradient_matches_finite_differences(attention):
    """Through a 3-step unroll, autograd's meta-gradient equals central finite differences."""
    lopt = _perturbed_lopt(attention)
    tasks = [QuadTask(1, dtype=torch.float64), QuadTask(2, dtype=torch.float64)]
    params = list(lopt.parameters())
    loss = _meta_loss(lopt, tasks, 3, second_order=True)
    grads = _grads(loss, params)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        direction = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
        analytic = sum((g * d).sum() for g, d in zip(grads, direction))
        eps = 1e-6
        with torch.no_grad():
            values = []
            for sign in (1.0, -1.0):
                for p, d in zip(params, direction):
                    p.add_(sign * eps * d)
                values.append(_meta_loss(lopt, tasks, 3, second_order=True))
                for p, d in zip(params, direction):
                    p.sub_(sign * eps * d)
        numeric = (values[0] - values[1]) / (2 * eps)
        assert torch.allclose(analytic, numeric, rtol=1e-4, atol=1e-7), (float(analytic), float(numeric))


def test_first_order_meta_gradient_is_exact_when_gradients_do_not_depend_on_parameters():
    """First-order drops only d(grad)/d(params): on a linear task it equals finite differences."""
    lopt = _perturbed_lopt(attention=True)
    tasks = [LinearTask(1), LinearTask(2)]
    params = list(lopt.parameters())
    grads = _grads(_meta_loss(lopt, tasks, 3, second_order=False), params)
    direction = [torch.randn(p.shape, generator=torch.Generator().manual_seed(1), dtype=p.dtype) for p in params]
    analytic = sum((g * d).sum() for g, d in zip(grads, direction))
    eps = 1e-6
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.add_(eps * d)
        up = _meta_loss(lopt, tasks, 3, second_order=False)
        for p, d in zip(params, direction):
            p.sub_(2 * eps * d)
        down = _meta_loss(lopt, tasks, 3, second_order=False)
    assert torch.allclose(analytic, (up - down) / (2 * eps), rtol=1e-4, atol=1e-8)


def test_first_order_differs_from_second_order_on_a_curved_task():
    """The second_order option really backpropagates through the task's gradients."""
    lopt = _perturbed_lopt(attention=False)
    tasks = [QuadTask(1, dtype=torch.float64)]
    params = list(lopt.parameters())
    g1 = _grads(_meta_loss(lopt, tasks, 3, second_order=False), params)
    g2 = _grads(_meta_loss(lopt, tasks, 3, second_order=True), params)
    diff = sum(float((a - b).abs().sum()) for a, b in zip(g1, g2))
    assert diff > 1e-8


def test_batched_tasks_match_tasks_unrolled_alone():
    """Several tasks in one flat vector give each task the same trajectory as alone."""
    lopt = _perturbed_lopt(attention=True)
    tasks = [QuadTask(1, dtype=torch.float64), QuadTask(2, dtype=torch.float64)]
    together = _fresh_slots(lopt, tasks)
    with torch.no_grad():
        run_inner(lopt, together, 5)
        for i, task in enumerate(tasks):
            alone = _fresh_slots(lopt, tasks)[i : i + 1]
            alone[0].generator = torch.Generator().manual_seed(100 + i)
            run_inner(lopt, alone, 5)
            assert torch.allclose(alone[0].point, together[i].point, atol=1e-12)
            assert torch.allclose(alone[0].state.h_global, together[i].state.h_global, atol=1e-12)


class NegativeTask(QuadTask):
    family = "negative"

    def loss(self, params, batch):
        return super().loss(params, batch) - 1e6


def test_negative_task_loss_raises_naming_the_task():
    module = MetaTrainingModule(tasks=QuadDistribution(NegativeTask), tasks_per_step=1)
    with pytest.raises(NegativeLossError, match="negative"):
        module.new_slot(0)


def _held_out_objective(lopt: HierarchicalRNN, seeds: range, steps: int = 200) -> float:
    tasks = [QuadTask(s, dim=8) for s in seeds]
    lopt = lopt.float()
    slots = _fresh_slots(lopt, tasks, dtype=torch.float32)
    with torch.no_grad():
        loss, _, _ = run_inner(lopt, slots, steps)
    return float(loss)


def test_short_meta_training_lowers_held_out_meta_objective(tmp_path):
    """A short, seeded meta-training improves the meta-objective on quadratic seeds it never saw."""
    pl.seed_everything(0)
    module = MetaTrainingModule(
        tasks=QuadDistribution(),
        tasks_per_step=4,
        truncation_length=10,
        unroll_length_mean=40,
        unroll_length_min=20,
        num_unrolls_mean=1,
        meta_lr=3e-3,
    )
    before = _held_out_objective(module.lopt, range(10_000, 10_006))
    trainer = pl.Trainer(
        max_steps=120,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, TaskDataModule(tasks_per_step=4, seed=0))
    after = _held_out_objective(module.lopt, range(10_000, 10_006))
    assert module.meta_skips == 0
    assert after < before - 0.1, (before, after)


def _meta_trainer(tmp_path: Path, max_steps: int, **kw) -> pl.Trainer:
    return pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        **kw,
    )


def _small_module() -> MetaTrainingModule:
    return MetaTrainingModule(
        tasks=QuadDistribution(),
        tasks_per_step=3,
        truncation_length=4,
        unroll_length_mean=10,
        unroll_length_min=5,
        num_unrolls_mean=1,
    )


def test_meta_training_resumes_exactly(tmp_path):
    """Fit N, resume to 2N == an uninterrupted 2N run: meta-parameters, tasks in flight, stream."""
    pl.seed_everything(0)
    full = _small_module()
    _meta_trainer(tmp_path / "full", 12, enable_checkpointing=False).fit(full, TaskDataModule(tasks_per_step=3))

    pl.seed_everything(0)
    first = _small_module()
    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=6, save_top_k=-1)
    _meta_trainer(tmp_path / "a", 6, callbacks=[ckpt_cb]).fit(first, TaskDataModule(tasks_per_step=3))
    ckpt = next((tmp_path / "ckpt").glob("*step=6*.ckpt"))
    torch.load(ckpt, weights_only=True)  # checkpoints hold tensors and primitives only

    resumed = _small_module()
    _meta_trainer(tmp_path / "b", 12, enable_checkpointing=False).fit(resumed, TaskDataModule(tasks_per_step=3), ckpt_path=ckpt)
    for (name, a), b in zip(full.lopt.state_dict().items(), resumed.lopt.state_dict().values()):
        assert torch.equal(a, b), name
    assert [s.seed for s in full.slots] == [s.seed for s in resumed.slots]
    assert full.stream_position == resumed.stream_position

    loaded = HierarchicalRNN.from_pretrained(ckpt)
    for a, b in zip(first.lopt.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)


def test_export_round_trips_into_the_optimizer(tmp_path):
    """Exported weights load into HierarchicalRNNOptimizer and reproduce the module's rule."""
    module = _small_module()
    path = module.export(tmp_path / "mine", card={"note": "test"})
    from lightning_lopt import HierarchicalRNNOptimizer

    opt = HierarchicalRNNOptimizer([torch.nn.Parameter(torch.ones(3))], weights=str(path))
    for a, b in zip(module.lopt.state_dict().values(), opt.lopt.state_dict().values()):
        assert torch.equal(a, b)


DDP_SCRIPT = textwrap.dedent(
    """
    import sys, torch, lightning.pytorch as pl
    sys.path.insert(0, {tests!r})
    from test_meta import QuadDistribution
    from lightning_lopt.meta import MetaTrainingModule, TaskDataModule

    class Recording(MetaTrainingModule):
        def training_step(self, batch, batch_idx):
            self.seen = getattr(self, "seen", []) + batch["seeds"].tolist()
            return super().training_step(batch, batch_idx)

    pl.seed_everything(0)
    module = Recording(tasks=QuadDistribution(), tasks_per_step=2, truncation_length=4,
                       unroll_length_mean=10, unroll_length_min=5, num_unrolls_mean=1, num_threads=1)
    trainer = pl.Trainer(max_steps=5, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0,
                         enable_model_summary=False)
    trainer.fit(module, TaskDataModule(tasks_per_step=2))
    torch.save({{"params": module.lopt.state_dict(), "seen": module.seen}}, {out!r} + f"/rank{{trainer.global_rank}}.pt")
    torch.distributed.destroy_process_group()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_average_meta_gradients(tmp_path):
    """Two CPU processes draw different tasks yet end with identical meta-parameters."""
    script = tmp_path / "ddp_meta.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent), out=str(tmp_path)))
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), PYTHONWARNINGS="ignore")
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run([sys.executable, str(script)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    from tests.processes import ended_well  # here: the script imports this module without the package

    written = all((tmp_path / f"rank{r}.pt").exists() for r in (0, 1))
    assert ended_well(proc.returncode, proc.stderr, written), proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert not set(r0["seen"]) & set(r1["seen"]), "ranks must draw different tasks"
    start = HierarchicalRNN().state_dict()
    moved = False
    for name, value in r0["params"].items():
        assert torch.equal(value, r1["params"][name]), name
        moved = moved or not torch.equal(value, start[name])
    assert moved


def test_inner_diagnostics_are_logged_on_schedule(tmp_path):
    """The inner update rule's internals reach the logger every `inner_diagnostics_interval` meta-steps."""
    import csv

    module = MetaTrainingModule(
        tasks=QuadDistribution(), tasks_per_step=2, truncation_length=3, unroll_length_mean=10,
        unroll_length_min=5, num_unrolls_mean=1, inner_diagnostics_interval=2,
    )
    calls = []
    original = module.lopt.step

    def counting_step(*args, **kwargs):
        calls.append(bool(kwargs.get("diagnostics")))
        return original(*args, **kwargs)

    module.lopt.step = counting_step
    logger = pl.loggers.CSVLogger(tmp_path)
    trainer = pl.Trainer(max_steps=4, accelerator="cpu", logger=logger, log_every_n_steps=1, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, TaskDataModule(tasks_per_step=2))
    assert sum(calls) == 2 and len(calls) == 12  # meta-steps 0 and 2, first inner step each
    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    keys = {k for r in rows for k, v in r.items() if v}
    assert {"lopt/inner/lr/mean", "lopt/inner/global_rnn/unit_00", "lopt/inner/timescale/s0_mean"} <= keys
    values = {float(r["lopt/inner/lr/mean"]) for r in rows if r.get("lopt/inner/lr/mean")}
    assert len(values) == 2  # one summary per diagnosed meta-step
    assert all(math.isfinite(v) and v > 0 for v in values)


def test_validation_verdict_marks_stalls_and_divergence():
    from lightning_lopt.meta.module import validation_verdict

    assert validation_verdict(float("inf"), 1.0, 0.1) == "diverged"
    assert validation_verdict(0.9, 1.0, 0.1) == "stalled"  # barely moved since 10%, 9x Adam's loss
    assert validation_verdict(0.9, 1.0, 0.5) is None  # within 2x of Adam: nothing left to learn
    assert validation_verdict(0.4, 1.0, 0.1) is None  # still learning: below half its early loss


def test_a_rule_that_stops_stepping_is_disqualified_in_validation():
    """A rule whose steps vanish is marked stalled on its validation tasks; a working one is not."""
    from lightning_lopt.meta.module import validation_verdict

    module = MetaTrainingModule(tasks=QuadDistribution(), validation_lengths=(150,), validation_adam_lr=0.1)
    seeds = [10_000, 10_001]
    adam = [module._adam_final_loss(s, 150) for s in seeds]
    with torch.no_grad():
        module.lopt.step_offset.fill_(3.0)
    working = module.learned_losses(seeds, [150, 150])
    with torch.no_grad():
        module.lopt.step_offset.fill_(-40.0)  # exp(-40): no step at all
    frozen = module.learned_losses(seeds, [150, 150])
    assert [validation_verdict(f, e, a) for (f, e), a in zip(frozen, adam)] == ["stalled", "stalled"]
    assert all(f < e for f, e in working)


def _one_step_checkpoint(tmp_path) -> Path:
    """A checkpoint of one meta-step of a small module."""
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(_small_module(), TaskDataModule(tasks_per_step=3))
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    return tmp_path / "m.ckpt"


def test_export_records_the_validation_scores_in_the_card(tmp_path):
    """``validate=True`` writes each validation task's log ratio to Adam and verdict, as meta.select scores them."""
    import json

    from lightning_lopt.meta.export import export_checkpoint
    from lightning_lopt.meta.select import score_checkpoints, validation_tasks

    ckpt = _one_step_checkpoint(tmp_path)
    out = export_checkpoint(ckpt, tmp_path / "w.safetensors", validate=True, num_validation_tasks=1)
    card = json.loads(out.with_suffix(".json").read_text())["validation"]
    _, score, ratios, verdicts = score_checkpoints([str(ckpt)], 1)[0]
    (seed, steps), = validation_tasks(1)
    assert card["selection_score"] == score
    assert card["tasks"] == [{"seed": seed, "steps": steps, "log_ratio_vs_adam": ratios[0], "verdict": verdicts[0]}]


def test_export_prints_its_validation_table_and_writes_files_of_one_mode(tmp_path, capsys):
    """The command prints the scores it writes into the card; the weights file and the card share
    the ordinary file mode; the card holds no callback score of another checkpoint."""
    import json
    import stat

    from lightning_lopt.meta.export import main as export_main

    ckpt = _one_step_checkpoint(tmp_path)
    export_main([str(ckpt), str(tmp_path / "w.safetensors"), "--validate"])
    out = capsys.readouterr().out
    card = json.loads((tmp_path / "w.json").read_text())
    task = card["validation"]["tasks"][0]
    assert f"| {task['seed']} | {task['steps']} | {task['log_ratio_vs_adam']:+.3f} |" in out
    assert f"selection score: {card['validation']['selection_score']:.3f}" in out
    assert "checkpoint_selection" not in card
    modes = {stat.S_IMODE((tmp_path / name).stat().st_mode) for name in ("w.safetensors", "w.json")}
    assert len(modes) == 1


def test_export_writes_the_decay_phase_into_the_weights(tmp_path):
    """``--decay-fraction`` lands in the weights' config, which the optimizer then reads."""
    from lightning_lopt import HierarchicalRNNOptimizer
    from lightning_lopt.meta.export import main as export_main

    ckpt = _one_step_checkpoint(tmp_path)
    export_main([str(ckpt), str(tmp_path / "w.safetensors"), "--decay-fraction", "0.5"])
    export_main([str(ckpt), str(tmp_path / "plain.safetensors")])
    lopt = HierarchicalRNN.from_pretrained(tmp_path / "w.safetensors")
    assert lopt.config["decay_fraction"] == 0.5
    assert "decay_fraction" not in HierarchicalRNN.from_pretrained(tmp_path / "plain.safetensors").config
    opt = HierarchicalRNNOptimizer([torch.nn.Parameter(torch.ones(2))], weights=str(tmp_path / "w.safetensors"))
    assert opt.decay_fraction == 0.5
    for a, b in zip(lopt.state_dict().values(), HierarchicalRNN.from_pretrained(ckpt).state_dict().values()):
        assert torch.equal(a, b)
