"""The prepared GPU check runs end to end (here on the CPU, where it compares the fused path with the
eager reference) and fails when the device disagrees."""

from __future__ import annotations

import torch

from lightning_lopt.bench import cuda_check


def test_cuda_check_runs_on_cpu_and_passes(capsys):
    argv = ["--device", "cpu", "--sizes", "2e3", "--check-size", "3e3", "--repeats", "2",
            "--triton-check-size", "100", "--meta-tasks", "1", "--meta-steps", "2",
            "--es-tasks", "2", "--es-pairs", "1", "--es-seconds", "0.5"]
    assert cuda_check.main(argv) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "| 2e+03 | single | HRNN eager |" in out and "| 2e+03 | mixed | AdamW fused |" in out
    assert "| 2e+03 | mixed | HRNN auto bf16 state |" in out
    assert "TBPTT meta-training step: 1 tasks x 2 inner steps" in out and "inner steps/s" in out
    assert "ES meta-training (configs/meta_train_gpu_burst.yaml, batched unroll): 4 particles per inner step" in out
    if cuda_check.triton_step.applies(torch.device("cpu")):  # under Triton's interpreter (tests/conftest.py)
        assert "triton vs eager, float32 state" in out and "triton vs eager, bfloat16 state" in out
        assert "FAIL" not in out


def test_cuda_check_triton_skipped_without_triton(monkeypatch):
    monkeypatch.setattr(cuda_check.triton_step, "AVAILABLE", False)
    assert cuda_check.check_triton(torch.device("cpu"), [(5,)]) == {}


def test_meta_training_step_counts_inner_steps():
    out = cuda_check.meta_training_step(torch.device("cpu"), tasks=2, steps=2)
    assert out["inner_steps"] == 4 and out["inner_steps_per_s"] > 0 and out["seconds"] > 0


def test_cuda_check_reports_a_disagreement(monkeypatch):
    real = cuda_check.HierarchicalRNNOptimizer

    class Off(real):  # a "device" whose steps are off by 1e-3
        def step(self, closure=None):
            out = super().step(closure)
            if self.backend != "eager":
                with torch.no_grad():
                    for p in self.params:
                        p.add_(1e-3)
            return out

    monkeypatch.setattr(cuda_check, "HierarchicalRNNOptimizer", Off)
    diffs = cuda_check.check_against_cpu(torch.device("cpu"), [(50,), (7, 3)], steps=2)
    assert diffs["params"] > 1e-4 and diffs["h_param"] < 1e-4
