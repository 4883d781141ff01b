"""The speed benchmark's measurements: what it counts is what the step does."""

from __future__ import annotations

import sys

import pytest
import torch

from lightning_lopt import HierarchicalRNN
from lightning_lopt.bench import speed


def test_flops_per_parameter_counts_the_products_by_hand():
    # GRU: (12 features + 10 hidden) -> 3 x 10 gate and candidate units; read-outs: 5 heads from 10
    # hidden units and 2 momentum shortcuts from 4 timescales; 2 FLOPs per multiply-add.
    assert speed.flops_per_parameter(HierarchicalRNN()) == 2 * 22 * 30 + 2 * 10 * 5 + 2 * 4 * 2 == 1436
    assert speed.flops_per_parameter(HierarchicalRNN(attention=False)) == 2 * 22 * 30 + 2 * 10 * 4 + 2 * 4


def test_mixed_shapes_hit_the_requested_size():
    for n in (10_000, 1_000_000):
        total = sum(torch.Size(s).numel() for s in speed.mixed_shapes(n))
        assert abs(total - n) / n < 0.05
        assert len(speed.mixed_shapes(n)) == 50


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_step_peak_sees_a_known_transient_allocation():
    class Allocates:
        def step(self) -> None:
            x = torch.ones(4 * 1024 * 1024)  # 16 MiB, touched, then freed
            assert float(x[-1]) == 1.0

    class Nothing:
        def step(self) -> None:
            pass

    assert 15.0 <= speed.step_peak_mib(Allocates()) <= 20.0
    assert speed.step_peak_mib(Nothing()) < 1.0


def test_time_steps_rows_and_fraction_of_peak():
    factories = [f for f in speed.optimizer_factories(["default"]) if f[0] in ("Adam foreach", "HRNN")]
    rows = speed.time_steps(factories, [(300,), (40, 5)], "mixed", warmup=1, rounds=3, flops_per_param=1436, matmul_size=256)
    assert [r.name for r in rows] == ["Adam foreach", "HRNN"]
    adam, hrnn = rows
    assert adam.numel == hrnn.numel == 500 and hrnn.num_tensors == 2
    assert adam.fraction_of_peak is None and 0 < hrnn.fraction_of_peak < 1
    assert hrnn.gflops == pytest.approx(1436 * 500 / (hrnn.step_ms * 1e-3) / 1e9)
    assert adam.state_bytes_per_param == pytest.approx(8.0, abs=0.1)  # exp_avg and exp_avg_sq
    assert hrnn.state_bytes_per_param > 80


def test_mnist1d_training_step_compares_both():
    out = speed.mnist1d_training_step(rounds=4)
    assert out["HRNN ms"] > 0 and out["Adam ms"] > 0 and out["ratio"] > 0


def test_main_prints_the_tables(capsys):
    speed.main(["--sizes", "2e3", "--cases", "single", "--repeats", "2", "--no-meta", "--no-mnist1d"])
    out = capsys.readouterr().out
    assert "| 2e+03 | single | 1 | HRNN |" in out
    assert "matmul GFLOP/s during the rounds" in out


def test_busy_processes_spin_and_are_reaped(monkeypatch):
    started = []
    real = speed.subprocess.Popen

    def record(*args, **kwargs):
        started.append(real(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(speed.subprocess, "Popen", record)
    with speed.busy_processes(2):
        assert len(started) == 2 and all(p.poll() is None for p in started)  # still spinning
    assert all(p.poll() is not None for p in started)  # killed and reaped


def test_threads_table_has_idle_and_busy_rows_per_thread_count(monkeypatch):
    monkeypatch.setattr(speed, "mnist1d_training_step", lambda rounds, threads: {"Adam ms": 1.0, "HRNN ms": 2.0 * threads})
    rows = speed.mnist1d_threads_table(busy=1, rounds=2)
    assert [(label.split()[0], others) for label, others, _ in rows] == [
        ("1", 0), ("1", 1), (str(torch.get_num_threads()), 0), (str(torch.get_num_threads()), 1)]
