"""Shared test fixtures."""

import os

import pytest
import torch

# Without a GPU, Triton's kernels run in its interpreter on CPU tensors (tests/test_triton.py).
# Triton fixes the mode when it is first imported, which importing lightning does: set it first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def single_thread():
    """Run a module of tiny-tensor tests on one intra-op thread: on a busy 2-core machine each parallel region
    (e.g. index_add_ on a handful of elements) otherwise waits for a second thread, ~0.1 s per call."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
