"""The prepared GPU check runs end to end (here on the CPU, where it compares the fused path with the
eager reference) and fails when the device disagrees."""

from __future__ import annotations

import torch

from lightning_lopt.bench import cuda_check


def test_cuda_check_runs_on_cpu_and_passes(capsys):
    assert cuda_check.main(["--device", "cpu", "--sizes", "2e3", "--check-size", "3e3", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "| 2e+03 | single | HRNN |" in out and "| 2e+03 | mixed | Adam fused |" in out


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
