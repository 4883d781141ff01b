"""torch.optim contracts of HierarchicalRNNOptimizer: copies, frozen parameters, foreign state,
non-finite updates, and a fuzz test over random parameter sets."""

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn

from lightning_lopt import HierarchicalRNN, HierarchicalRNNOptimizer

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def lopt() -> HierarchicalRNN:
    return HierarchicalRNN()


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def _set_grads(params: list[torch.Tensor], step: int) -> None:
    gen = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) + 0.5 * p.detach()


# ---------------------------------------------------------------------------------- copy and pickle


def _pickled(opt: HierarchicalRNNOptimizer) -> HierarchicalRNNOptimizer:
    return pickle.loads(pickle.dumps(opt))


@pytest.mark.parametrize("copier", [copy.deepcopy, _pickled], ids=["deepcopy", "pickle"])
@pytest.mark.parametrize("attention", [True, False])
@pytest.mark.parametrize("steps_before", [0, 3])
def test_copy_steps_exactly_like_the_original(copier, attention: bool, steps_before: int) -> None:
    params = list(_model().parameters())
    opt = HierarchicalRNNOptimizer(params, weights=HierarchicalRNN(attention=attention), lr=0.7, backend="eager")
    for i in range(steps_before):
        _set_grads(params, i)
        opt.step()
    twin = copier(opt)
    twin_params = twin.params
    assert all(a is not b for a, b in zip(params, twin_params))  # a copy, with its own parameters
    assert twin.training == opt.training and twin.skipped_steps == opt.skipped_steps
    for i in range(steps_before, steps_before + 4):
        _set_grads(params, i)
        _set_grads(twin_params, i)
        opt.step()
        twin.step()
    for a, b in zip(params, twin_params):
        assert torch.equal(a, b)
    opt.eval()
    twin.eval()
    for a, b in zip(params, twin_params):
        assert torch.equal(a, b)
    # The copy does not share state with the original: stepping one leaves the other alone.
    before = [p.detach().clone() for p in params]
    _set_grads(twin_params, 99)
    twin.train()
    twin.step()
    assert all(torch.equal(a, b) for a, b in zip(params, before))


def test_copy_in_eval_mode_keeps_the_mode(lopt) -> None:
    params = list(_model().parameters())
    opt = HierarchicalRNNOptimizer(params, weights=lopt, backend="eager")
    _set_grads(params, 0)
    opt.step()
    opt.eval()
    twin = copy.deepcopy(opt)
    assert not twin.training
    with pytest.raises(RuntimeError, match="eval mode"):
        twin.step()
    twin.train()
    opt.train()
    _set_grads(params, 1)
    _set_grads(twin.params, 1)
    opt.step()
    twin.step()
    assert all(torch.equal(a, b) for a, b in zip(params, twin.params))
