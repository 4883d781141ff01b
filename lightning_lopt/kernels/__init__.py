"""Hand-written kernels of the hierarchical RNN step, built on first use.

The CPU kernel (``hrnn_cpu.cpp``) fuses the element-level part of the step without autograd. It is
compiled through torch's extension loader into torch's extension cache (``TORCH_EXTENSIONS_DIR``,
by default ``~/.cache/torch_extensions``) once per machine, source, compiler flags, torch and
Python version, whatever the path the package is installed at: the source is copied into the
build directory and compiled from there, and later processes import the shared library directly.
Processes that start together wait for one build (a file lock). Build ahead of time with
``lightning-lopt-build-kernel`` (or ``python -m lightning_lopt.kernels``). Where the kernel cannot
be built (no compiler, no ninja), :func:`cpu_kernel` warns once and returns None, and the step
stays eager.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import importlib.util
import os
import platform
import sys
import threading
import time
import warnings
from pathlib import Path
from types import ModuleType
from typing import Iterator, Optional, Sequence

__all__ = [
    "cpu_kernel",
    "cpu_kernel_build_seconds",
    "cpu_kernel_cached",
    "cpu_kernel_compiled_here",
    "cpu_kernel_directory",
    "cpu_kernel_failed",
    "main",
]

_SOURCE = Path(__file__).with_name("hrnn_cpu.cpp")
_CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-std=c++17"]
_LDFLAGS = ["-fopenmp", "-lm"]

_lock = threading.Lock()
_module: Optional[ModuleType] = None
_failed = False
_build_seconds: Optional[float] = None
_compiled_here = False


def _machine_tag() -> str:
    # -march=native code must not be reused on another CPU sharing the cache (a home directory on
    # a cluster): the CPU's model and flags are part of the extension's name.
    text = platform.machine()
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))][:2]
        text += "".join(lines)
    except OSError:
        text += platform.processor()
    return hashlib.sha1(text.encode()).hexdigest()[:10]


@functools.lru_cache(maxsize=None)
def _name() -> str:
    # The source, flags, torch and Python versions are part of the name, not the install path:
    # a build of an old source must not count as cached, and two installations of the same
    # version share one build.
    import torch

    key = b"\0".join(
        [
            _SOURCE.read_bytes(),
            " ".join(_CFLAGS + _LDFLAGS).encode(),
            torch.__version__.encode(),
            f"{sys.implementation.cache_tag}{getattr(sys, 'abiflags', '')}".encode(),
        ]
    )
    return f"lightning_lopt_hrnn_cpu_{_machine_tag()}_{hashlib.sha1(key).hexdigest()[:8]}"


def cpu_kernel_directory() -> Path:
    """The directory that holds (or will hold) the CPU kernel's build in torch's extension cache."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        try:
            from torch.utils.cpp_extension import _get_build_directory

            return Path(_get_build_directory(_name(), verbose=False))
        except Exception:  # a private helper of torch: if it moves, use its documented default
            root = str(Path.home() / ".cache" / "torch_extensions")
    return Path(root) / _name()


def _library(directory: Path) -> Path:
    return directory / f"{_name()}{'.pyd' if sys.platform == 'win32' else '.so'}"


def _marker(directory: Path) -> Path:
    # Written after the library imported once: a library cut short by a killed build has none.
    return directory / f"{_name()}.ok"


def cpu_kernel_cached() -> bool:
    """True when the CPU kernel is loaded in this process or a finished build is in the extension
    cache (so :func:`cpu_kernel` imports it in well under a second rather than compile it)."""
    if _module is not None:
        return True
    if _failed:
        return False
    try:
        directory = cpu_kernel_directory()
        return _marker(directory).exists() and _library(directory).exists()
    except Exception:
        return False


def cpu_kernel_failed() -> bool:
    """True when building the CPU kernel was tried and failed in this process."""
    return _failed


def cpu_kernel_build_seconds() -> Optional[float]:
    """Seconds the first :func:`cpu_kernel` call took (a compilation or a cache load), or None."""
    return _build_seconds


def cpu_kernel_compiled_here() -> bool:
    """True when this process compiled the CPU kernel (rather than loading a cached build)."""
    return _compiled_here


def _is_rank_zero() -> bool:
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "SLURM_PROCID"))


def _say(message: str) -> None:
    # A first step that compiles for tens of seconds must not look hung; stderr, so that it reaches
    # a terminal whatever logging is configured (and on rank zero only, like Lightning's messages).
    if _is_rank_zero():
        print(f"lightning_lopt: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path``: processes that start together wait for one build.

    The operating system releases the lock when its holder dies, so a killed build blocks no one.
    """
    try:
        import fcntl
    except ImportError:  # Windows: torch's own lock file inside ``load`` still serialises builds
        yield
        return
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            _say(f"waiting for another process that is building the fused CPU kernel ({path.parent}) ...")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _import(directory: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(_name(), _library(directory))
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {_library(directory)}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build(directory: Path) -> ModuleType:
    """Compile the kernel in ``directory`` from a copy of the source kept there (the caller holds the lock)."""
    global _compiled_here
    from torch.utils.cpp_extension import load

    source = directory / _SOURCE.name
    text = _SOURCE.read_bytes()
    if not source.exists() or source.read_bytes() != text:
        # Compiling a copy keeps the install path out of build.ninja, so another installation
        # of the same source finds nothing to redo.
        tmp = source.with_name(source.name + f".{os.getpid()}.tmp")
        tmp.write_bytes(text)
        os.replace(tmp, source)
    # torch's own lock file, left behind by a build that was killed, would make load() wait forever;
    # no one else builds here while this process holds the lock.
    (directory / "lock").unlink(missing_ok=True)
    _say("building the fused CPU kernel of the learned optimizer, once per machine (tens of seconds) ...")
    start = time.perf_counter()
    module = load(
        name=_name(),
        sources=[str(source)],
        extra_cflags=_CFLAGS,
        extra_ldflags=_LDFLAGS,
        build_directory=str(directory),
        verbose=False,
    )
    _compiled_here = True
    _marker(directory).write_text(f"{_name()}\n")
    _say(f"built the fused CPU kernel in {time.perf_counter() - start:.0f} s; later runs load it from {directory}")
    return module


def cpu_kernel(warn: bool = True) -> Optional[ModuleType]:
    """The compiled CPU kernel module, building it on the first call; None where that fails.

    Args:
        warn: Warn (once per process) when the build fails.

    Returns:
        A module with ``element_update`` and ``apply_update``, or None.
    """
    global _module, _failed, _build_seconds
    if _module is not None or _failed:
        return _module
    with _lock:
        if _module is not None or _failed:
            return _module
        start = time.perf_counter()
        try:
            directory = cpu_kernel_directory()
            directory.mkdir(parents=True, exist_ok=True)
            if cpu_kernel_cached():
                _module = _import(directory)
            else:
                with _build_lock(directory / "build.lock"):
                    # Another process may have finished the build while this one waited.
                    _module = _import(directory) if cpu_kernel_cached() else _build(directory)
        except Exception as err:  # a missing compiler or ninja, a failed build: eager computes the same
            _failed = True
            if warn:
                warnings.warn(
                    f"Building the C++ kernel of the hierarchical RNN step failed ({type(err).__name__}: "
                    f"{str(err).strip().splitlines()[-1] if str(err).strip() else ''}); using the eager step.",
                    RuntimeWarning,
                    stacklevel=3,
                )
        _build_seconds = time.perf_counter() - start
    return _module


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Build the CPU kernel ahead of time (``lightning-lopt-build-kernel``); 1 when it cannot be built.

    Args:
        argv: Command-line arguments; default ``sys.argv[1:]``.
    """
    parser = argparse.ArgumentParser(
        prog="lightning-lopt-build-kernel",
        description="Compile the fused CPU kernel of the learned optimizer into torch's extension cache "
        "(TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions), so that no training run waits for it. "
        "Once per machine, torch and Python version; a no-op when it is already built.",
    )
    parser.add_argument("--check", action="store_true", help="only report whether it is built; exit 1 if not")
    args = parser.parse_args(argv)
    directory = cpu_kernel_directory()
    if args.check:
        built = cpu_kernel_cached()
        print(f"{'built' if built else 'not built'}: {directory}")
        return 0 if built else 1
    if cpu_kernel(warn=True) is None:
        print("The CPU kernel could not be built here; the learned optimizer uses its eager step.", file=sys.stderr)
        return 1
    how = "compiled" if _compiled_here else "already built, loaded"
    print(f"CPU kernel ready ({how} in {_build_seconds:.2f} s): {_library(directory)}")
    return 0
