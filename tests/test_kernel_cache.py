"""The C++ kernel is built once per machine and source, whatever the path the package is installed at."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import lightning_lopt

_PROBE = """
import json, sys, time
start = time.perf_counter()
import lightning_lopt
from lightning_lopt import kernels
assert lightning_lopt.__file__.startswith(sys.argv[1]), lightning_lopt.__file__
module = kernels.cpu_kernel(warn=False)
print(json.dumps({"ok": module is not None and module.answer() == 42, "compiled": kernels.cpu_kernel_compiled_here(),
                  "seconds": kernels.cpu_kernel_build_seconds(), "file": getattr(module, "__file__", None)}))
"""


# A stand-in for hrnn_cpu.cpp that compiles in seconds: the build machinery is what is tested,
# and the real kernel (a minute on a busy 2-core machine) is built by tests/test_kernel.py.
_SMALL_SOURCE = """
#include <pybind11/pybind11.h>
int answer() { return 42; }
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("answer", &answer); }
"""


def _install_copy(root: Path) -> Path:
    root.mkdir()
    package = Path(lightning_lopt.__file__).parent
    shutil.copytree(package, root / "lightning_lopt", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "lightning_lopt" / "kernels" / "hrnn_cpu.cpp").write_text(_SMALL_SOURCE)
    return root


def _start(copy: Path, cache: Path) -> subprocess.Popen:
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(cache), PYTHONPATH=str(copy))
    return subprocess.Popen(
        [sys.executable, "-c", _PROBE, str(copy)], cwd=copy, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )


def _result(proc: subprocess.Popen) -> tuple[dict, str]:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1]), err


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler")
def test_two_installations_started_together_share_one_build(tmp_path: Path) -> None:
    """Two copies of the package at different paths, started together on an empty cache: one
    compiles while the other waits for it; a later process of either copy only loads the library."""
    cache = tmp_path / "torch_extensions"
    first, second = _install_copy(tmp_path / "clone_a"), _install_copy(tmp_path / "env_b")
    procs = [_start(first, cache), _start(second, cache)]
    results = [_result(p) for p in procs]
    if not all(r["ok"] for r, _ in results):
        pytest.skip("the C++ kernel does not build here")
    assert sorted(r["compiled"] for r, _ in results) == [False, True]
    builder_err = next(err for r, err in results if r["compiled"])
    assert "building the fused CPU kernel" in builder_err  # the long first step says what it does
    assert results[0][0]["file"] == results[1][0]["file"]
    library = Path(results[0][0]["file"])
    built_at = library.stat().st_mtime_ns

    # The copy that did not compile: a build.ninja naming the other copy's path must not matter.
    waiter = [first, second][[r["compiled"] for r, _ in results].index(False)]
    again, err = _result(_start(waiter, cache))
    assert again["ok"] and not again["compiled"] and again["file"] == str(library)
    assert again["seconds"] < 10  # an import, not a compilation
    assert "building" not in err
    assert library.stat().st_mtime_ns == built_at
