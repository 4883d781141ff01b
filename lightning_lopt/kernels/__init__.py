"""Hand-written kernels of the hierarchical RNN step, built on first use.

The CPU kernel (``hrnn_cpu.cpp``) fuses the element-level part of the step without autograd. It is
compiled through torch's extension loader into torch's extension cache (``TORCH_EXTENSIONS_DIR``,
by default ``~/.cache/torch_extensions``), so the compilation (tens of seconds) happens once per
machine and later processes only load the shared library. Where it cannot be built (no compiler,
no ninja), :func:`cpu_kernel` warns once and returns None, and the step stays eager.
"""

from __future__ import annotations

import functools
import hashlib
import platform
import threading
import time
import warnings
from pathlib import Path
from types import ModuleType
from typing import Optional

__all__ = ["cpu_kernel", "cpu_kernel_build_seconds", "cpu_kernel_cached", "cpu_kernel_failed"]

_SOURCE = Path(__file__).with_name("hrnn_cpu.cpp")
_CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-std=c++17"]
_LDFLAGS = ["-fopenmp", "-lm"]

_lock = threading.Lock()
_module: Optional[ModuleType] = None
_failed = False
_build_seconds: Optional[float] = None


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
    # The source and flags are part of the name too: after an upgrade, a build of the old source
    # must not count as cached (loading would then recompile on a small model's first step).
    source = hashlib.sha1(_SOURCE.read_bytes() + " ".join(_CFLAGS + _LDFLAGS).encode()).hexdigest()[:8]
    return f"lightning_lopt_hrnn_cpu_{_machine_tag()}_{source}"


def cpu_kernel_cached() -> bool:
    """True when the CPU kernel is loaded in this process or a build of it is in the extension cache
    (so :func:`cpu_kernel` is expected to load it in well under a second rather than compile it)."""
    if _module is not None:
        return True
    if _failed:
        return False
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return (Path(_get_build_directory(_name(), verbose=False)) / f"{_name()}.so").exists()
    except Exception:  # a private helper of torch: if it moves, assume nothing is cached
        return False


def cpu_kernel_failed() -> bool:
    """True when building the CPU kernel was tried and failed in this process."""
    return _failed


def cpu_kernel_build_seconds() -> Optional[float]:
    """Seconds the first :func:`cpu_kernel` call took (a compilation or a cache load), or None."""
    return _build_seconds


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
            from torch.utils.cpp_extension import load

            _module = load(
                name=_name(),
                sources=[str(_SOURCE)],
                extra_cflags=_CFLAGS,
                extra_ldflags=_LDFLAGS,
                verbose=False,
            )
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
