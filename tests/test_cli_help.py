"""The command-line tools explain every option in --help."""

from __future__ import annotations

import re
from typing import Callable

import pytest


def _help(main: Callable[..., object], capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def _undocumented(text: str) -> list[str]:
    """Options of an argparse help whose entry has no description (the flag alone on its lines)."""
    entries = re.split(r"\n(?=  \S)", text.split("options:", 1)[-1])
    return [e.split()[0] for e in entries if e.strip() and len(re.sub(r"\s+", " ", e).strip().split(" ")) <= 2]


def test_select_help_explains_its_options(capsys: pytest.CaptureFixture) -> None:
    from lightning_lopt.meta.select import main

    out = _help(main, capsys)
    assert "python -m lightning_lopt.meta.select" in out
    assert "CHECKPOINT" in out and ".ckpt" in out
    assert "--num-tasks" in out and "validation tasks" in out
    assert "--threads" in out and "threads" in out.split("--threads", 2)[-1]
    assert not _undocumented(out)


def test_build_kernel_help_explains_its_options(capsys: pytest.CaptureFixture) -> None:
    from lightning_lopt.kernels import main

    out = _help(main, capsys)
    assert "TORCH_EXTENSIONS_DIR" in out and "--check" in out
    assert not _undocumented(out)
