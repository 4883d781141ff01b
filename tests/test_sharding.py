"""The learned optimizer on sharded parameters: FSDP2, ZeRO-1, DDP and distributed checkpoints.

The multi-process checks run tests/sharding_worker.py in a subprocess (2 gloo processes on a free
port; Lightning's ddp would re-run pytest in its children); each scenario runs once per module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lightning_lopt import HierarchicalRNN, HierarchicalRNNOptimizer
from lightning_lopt.hrnn import Layout
from tests.processes import ended_well

WORKER = Path(__file__).with_name("sharding_worker.py")
REL = 1e-5

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="needs gloo"
)


def _scenario(name: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp(name) / "out.json"
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(WORKER), name, str(out)], capture_output=True, text=True,
                          timeout=300, env=env, cwd=WORKER.parent.parent)
    assert ended_well(proc.returncode, proc.stderr, out.exists()), proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _scenario("fsdp", tmp_path_factory)


@pytest.fixture(scope="module")
def ddp(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _scenario("ddp", tmp_path_factory)


@pytest.mark.parametrize("case", ["fp32", "bf16", "partial", "frozen"])
def test_fsdp_equals_unsharded(fsdp: dict[str, Any], case: str) -> None:
    # 12 steps, default weights, attention on, an MLP whose first dimensions (7, 5, 3, 1) shard unevenly.
    assert fsdp[f"{case}_rel"] <= REL


_DEFAULT = HierarchicalRNN.from_pretrained("default")


def test_fsdp_state_is_per_shard(fsdp: dict[str, Any]) -> None:
    whole = fsdp["fp32_state_numel_unsharded"]
    ranks = [fsdp["fp32_state_numel_rank0"], fsdp["fp32_state_numel_rank1"]]
    tensors = 8
    # Per-element state splits between the ranks; only the per-tensor and per-problem parts repeat
    # (their widths: the RNNs' units, and the step gain's columns with the default weights).
    per_tensor = tensors * _DEFAULT.tensor_state_width + _DEFAULT.global_state_width
    assert sum(ranks) - per_tensor == whole
    assert max(ranks) < whole


def test_fsdp_frozen_layer_holds_no_state(fsdp: dict[str, Any]) -> None:
    # The second layer (7 x 5 weights, 5 biases) is frozen: no state on either rank, and it never moves.
    assert fsdp["frozen_held_rank0"] == fsdp["frozen_held_rank1"] == [0, 1, 4, 5, 6, 7]
    assert fsdp["frozen_frozen_unchanged"]
    ranks = [fsdp["frozen_state_numel_rank0"], fsdp["frozen_state_numel_rank1"]]
    repeated = 6 * _DEFAULT.tensor_state_width + _DEFAULT.global_state_width
    assert sum(ranks) - repeated == fsdp["frozen_state_numel_unsharded"] < fsdp["fp32_state_numel_unsharded"]


def test_fsdp_checkpoint_resumes_on_two_ranks(fsdp: dict[str, Any]) -> None:
    assert fsdp["resume2_equal"]


def test_fsdp_checkpoint_reshards_to_one_rank(fsdp: dict[str, Any]) -> None:
    assert fsdp["resume1_rel"] <= REL


def test_zero_equals_unsharded(ddp: dict[str, Any]) -> None:
    assert ddp["zero_rel"] <= REL
    whole = ddp["zero_state_numel_unsharded"]
    assert ddp["zero_state_numel_rank0"] < whole and ddp["zero_state_numel_rank1"] < whole


def test_ddp_ranks_bit_identical_with_cpp_kernel(ddp: dict[str, Any]) -> None:
    assert ddp["ddp_backend"] == "cpp"
    assert ddp["ddp_moved"]
    assert ddp["ddp_bit_identical"]


def test_layout_counts_allow_empty_shards() -> None:
    layout = Layout.build([2, 0, 3], counts=[4, 1, 3])
    assert layout.numel == 5
    assert layout.tensor_counts.tolist() == [4.0, 1.0, 3.0]
    assert layout.problem_elements.tolist() == [8.0]
    with pytest.raises(ValueError, match="do not fit"):
        Layout.build([5], counts=[4])
    with pytest.raises(ValueError, match="no empty tensors"):
        Layout.build([2, 0])


def _train(model: nn.Module, opt: HierarchicalRNNOptimizer, steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        x = torch.randn(8, 6, generator=gen)
        nn.functional.mse_loss(model(x), x[:, :3]).backward()
        opt.step()


def test_per_parameter_state_dict_round_trip() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 3))
    opt = HierarchicalRNNOptimizer(model.parameters(), backend="eager")
    opt.per_parameter_state_dict = True
    _train(model, opt, 3, seed=1)
    sd = opt.state_dict()
    assert sorted(sd["state"]) == [0, 1, 2, 3]
    assert sd["state"][0]["h_param"].shape == (7, 6, opt.lopt.param_units)
    assert sd["state"][2]["theta"].shape == (3, 7)
    clone = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 3))
    clone.load_state_dict(model.state_dict())
    opt2 = HierarchicalRNNOptimizer(clone.parameters(), backend="eager")
    opt2.load_state_dict(sd)
    _train(model, opt, 3, seed=2)
    _train(clone, opt2, 3, seed=2)
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)


def test_per_parameter_state_dict_wrong_shard_is_refused() -> None:
    model = nn.Linear(6, 7)
    opt = HierarchicalRNNOptimizer(model.parameters(), backend="eager")
    opt.per_parameter_state_dict = True
    _train(nn.Sequential(model, nn.Linear(7, 3)), opt, 1, seed=1)
    sd = opt.state_dict()
    sd["state"][0] = dict(sd["state"][0], log_lr=sd["state"][0]["log_lr"][:3])
    with pytest.raises(ValueError, match="reshards"):
        HierarchicalRNNOptimizer(model.parameters()).load_state_dict(sd)


def test_lightning_model_parallel_example(tmp_path: Path) -> None:
    # Lightning's ModelParallelStrategy runs on CPU over gloo: fit, save a sharded checkpoint, resume.
    example = WORKER.parent.parent / "examples" / "fsdp_model_parallel.py"
    proc = subprocess.run([sys.executable, str(example), "--max-steps", "3", "--checkpoint", str(tmp_path / "ckpt")],
                          capture_output=True, text=True, timeout=400, cwd=tmp_path,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert ended_well(proc.returncode, proc.stderr, "resumed to step 8" in proc.stdout), proc.stderr[-4000:]
    assert "resumed to step 8" in proc.stdout
