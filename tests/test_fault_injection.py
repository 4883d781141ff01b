"""Fault injection: kill -9 of DDP meta-training, and a crash in the middle of writing last.ckpt.

The DDP runs are scripts (tests/fault_worker.py) in subprocesses, each in its own process group so
that the kill reaches the rank that Lightning's launcher starts as a child. Starting a process
costs seconds (importing Lightning), so one launch fits both gradient estimators in turn and the
uninterrupted reference runs beside the killed one.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from lightning_lopt.checkpoint_io import AtomicCheckpointIO, atomic_torch_save
from tests.processes import ended_well

sys.path.insert(0, str(Path(__file__).parent))
from test_meta import _free_port  # noqa: E402

WORKER = Path(__file__).parent / "fault_worker.py"
MAX_STEPS, EVERY = 12, 3
ESTIMATORS = ("tbptt", "pes")
TIMEOUT = 240


def _start(out: Path, *args: str) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), PYTHONWARNINGS="ignore")
    for var in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "GLOBAL_RANK"):
        env.pop(var, None)
    log = open(out / f"log{len(list(out.glob('log*.txt')))}.txt", "w")
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(out), "--max-steps", str(MAX_STEPS), "--every", str(EVERY), *args],
        cwd=out, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )


def _log_tail(out: Path) -> str:
    return "".join(p.read_text()[-3000:] for p in sorted(out.glob("log*.txt")))


def _finish(proc: subprocess.Popen, out: Path) -> None:
    try:
        rc = proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert ended_well(rc, _log_tail(out), any(out.glob("final_*_rank0.pt"))), _log_tail(out)


def _steps_done(out: Path, estimator: str) -> int:
    path = out / f"progress_{estimator}.txt"
    lines = path.read_text().split() if path.exists() else []
    return int(lines[-1]) if lines else 0


def _kill_group(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    # Rank 1 is reparented when rank 0 dies; wait until the whole group is gone.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError("a rank survived kill -9 of its process group")


@dataclass
class _Kill:
    seed: int
    steps_at_kill: int = 0
    ckpt_step: int = 0


def _kill_at_random_moment(proc: subprocess.Popen, out: Path, estimator: str, rng: random.Random, seed: int) -> _Kill:
    """Kill the run's process group once ``estimator`` has done a random number of steps, plus a random delay."""
    target = rng.randint(EVERY + 1, MAX_STEPS - 3)
    deadline = time.monotonic() + TIMEOUT
    try:
        while _steps_done(out, estimator) < target:
            assert proc.poll() is None, _log_tail(out)
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.15))  # anywhere in a step, a checkpoint write included
    finally:
        _kill_group(proc)
    kill = _Kill(seed, steps_at_kill=_steps_done(out, estimator))
    kill.ckpt_step = torch.load(out / f"ckpt_{estimator}" / "last.ckpt", weights_only=True)["global_step"]
    return kill


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory) -> tuple[Path, Path, dict[str, _Kill]]:
    """An uninterrupted run and, beside it, one killed twice at random moments, once in each estimator's fit.

    The victim fits TBPTT, then PES: the first kill lands in the TBPTT fit; the first resume
    continues it from last.ckpt, starts PES and is killed in its turn; the second resume finishes PES.
    """
    root = tmp_path_factory.mktemp("faults")
    full, victim = root / "full", root / "killed"
    reference = _start(full)
    seed = random.SystemRandom().randrange(2**32)
    rng = random.Random(seed)
    kills = {}
    # A short sleep after each step, so that the kill lands before the fit ends; it changes no number.
    kills["tbptt"] = _kill_at_random_moment(_start(victim, "--step-sleep", "0.1"), victim, "tbptt", rng, seed)
    kills["pes"] = _kill_at_random_moment(_start(victim, "--step-sleep", "0.1", "--resume"), victim, "pes", rng, seed)
    last = _start(victim, "--resume")
    _finish(reference, full)
    _finish(last, victim)
    return full, victim, kills


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_kill9_of_ddp_meta_training_resumes_bit_exactly(killed_and_resumed, estimator):
    """kill -9 of both ranks at a random moment; ckpt_path="last" ends where an uninterrupted run ends."""
    full, victim, kills = killed_and_resumed
    kill = kills[estimator]
    note = f"(random seed {kill.seed}: killed after step {kill.steps_at_kill}, last.ckpt at step {kill.ckpt_step})"
    assert 0 < kill.steps_at_kill < MAX_STEPS, note
    assert kill.steps_at_kill - EVERY <= kill.ckpt_step <= kill.steps_at_kill, f"lost more than one interval {note}"
    reference = torch.load(full / f"final_{estimator}_rank0.pt", weights_only=True)
    for rank in (0, 1):
        resumed = torch.load(victim / f"final_{estimator}_rank{rank}.pt", weights_only=True)
        for name, value in reference.items():
            assert torch.equal(value, resumed[name]), f"{name} on rank {rank} {note}"
    assert not list((victim / f"ckpt_{estimator}").glob(".*.tmp")), "later saves remove stale temporary files"


def test_crash_while_writing_last_ckpt_keeps_the_previous_one(tmp_path):
    """A process that dies half-way through writing last.ckpt leaves the previous last.ckpt loadable."""
    proc = subprocess.run([sys.executable, str(WORKER), str(tmp_path), "--crash-mid-write"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=TIMEOUT, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 9, proc.stderr[-3000:]
    ckpt_dir = tmp_path / "ckpt"
    partial = list(ckpt_dir.glob(".last.ckpt.*.tmp"))
    assert len(partial) == 1, "the write of step 4's last.ckpt was under way"
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=True)["global_step"] == 2
    assert torch.load(ckpt_dir / "epoch=0-step=4.ckpt", weights_only=True)["global_step"] == 4
    with pytest.raises(Exception):
        torch.load(partial[0], weights_only=True)

    # The next save replaces last.ckpt and clears what the dead writer left.
    AtomicCheckpointIO().save_checkpoint({"global_step": 5}, ckpt_dir / "last.ckpt")
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=True) == {"global_step": 5}
    assert not list(ckpt_dir.glob(".*.tmp"))


def test_atomic_save_failure_leaves_target_untouched(tmp_path, monkeypatch):
    """An error while serialising leaves the old file and no temporary file; the new file gets normal permissions."""
    target = tmp_path / "sub" / "last.ckpt"
    atomic_torch_save({"v": torch.ones(3)}, target)
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())

    def boom(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"v": torch.zeros(3)}, target)
    monkeypatch.undo()
    assert torch.equal(torch.load(target, weights_only=True)["v"], torch.ones(3))
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]


def test_cli_and_configs_write_checkpoints_atomically(monkeypatch):
    """The lightning-lopt CLI swaps Lightning's default checkpoint IO; the meta-training configs name it."""
    from lightning_lopt.cli import build_cli

    monkeypatch.setattr(sys, "argv", ["lightning-lopt"])

    configs = Path(__file__).parents[1] / "configs"
    cli = build_cli(["-c", str(configs / "mnist1d_adam.yaml"), "--trainer.logger=false"], run=False)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    for path in configs.glob("meta_train*.yaml"):
        assert "lightning_lopt.checkpoint_io.AtomicCheckpointIO" in path.read_text(), path.name


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("sig, devices", [(signal.SIGINT, 1), (signal.SIGTERM, 1), (signal.SIGTERM, 2)])
def test_ctrl_c_and_sigterm_save_a_checkpoint_that_resumes_exactly(tmp_path, sig, devices):
    """A real SIGINT (Ctrl-C) or SIGTERM mid-run: the run stops after the current meta-step with a
    checkpoint there (no periodic checkpoint exists yet), and resuming from it ends bit-identical to
    an uninterrupted run. Under DDP the signal goes to every process of the group at once, as
    ``kill`` of a process group or a scheduler sends it (where Lightning's own handler deadlocked)."""
    args = ("--estimators", "pes", "--devices", str(devices), "--on-interrupt")
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "interrupted"
    ref = subprocess.Popen(
        [sys.executable, str(WORKER), str(ref_dir), "--max-steps", "10", "--every", "100", *args],
        cwd=tmp_path, env=dict(os.environ, PYTHONWARNINGS="ignore"), start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )
    run_dir.mkdir()
    log = open(run_dir / "log0.txt", "w")
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), str(run_dir), "--max-steps", "10", "--every", "100", "--step-sleep", "0.3", *args],
        cwd=tmp_path, env=dict(os.environ, PYTHONWARNINGS="ignore"), start_new_session=True, stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + TIMEOUT
    while _steps_done(run_dir, "pes") < 3:
        assert proc.poll() is None and time.time() < deadline, _log_tail(run_dir)
        time.sleep(0.05)
    if devices == 1:
        proc.send_signal(sig)
    else:
        os.killpg(proc.pid, sig)  # the launcher and the rank it started
    # Stopped by Lightning's end-of-step SIGTERM path (exit status 0), not by an interrupt mid-step (1).
    assert proc.wait(timeout=TIMEOUT) == 0, _log_tail(run_dir)
    stopped_at = _steps_done(run_dir, "pes")
    saved = run_dir / "ckpt_pes" / "last-interrupted.ckpt"
    assert saved.exists(), _log_tail(run_dir)
    assert not (run_dir / "ckpt_pes" / "last.ckpt").exists()  # only the interruption saved
    assert torch.load(saved, weights_only=True, map_location="cpu")["global_step"] == stopped_at < 10
    assert not (run_dir / "final_pes_rank0.pt").exists()
    _finish(_start(run_dir, "--max-steps", "10", "--every", "100", "--resume", *args), run_dir)
    _finish(ref, ref_dir)
    a = torch.load(ref_dir / "final_pes_rank0.pt", weights_only=True)
    b = torch.load(run_dir / "final_pes_rank0.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
