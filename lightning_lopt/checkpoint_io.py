"""Crash-safe checkpoint files: a kill at any moment leaves the previous checkpoint loadable.

Lightning's :class:`~lightning.pytorch.plugins.io.TorchCheckpointIO` (2.6) writes through an
fsspec transaction: the bytes go to a temporary file made by :func:`tempfile.mkstemp` in the
system's temporary directory, which ``shutil.move`` then moves onto the target. When that directory
lies on another file system than the checkpoints (a tmpfs ``/tmp``, a scratch or network volume),
the move is a copy into the target itself, so a kill during the copy leaves a truncated
``last.ckpt``; a killed process also leaves its temporary file behind, as large as a checkpoint;
and nothing is flushed to disk, so a power loss right after the move can leave an empty file.

:class:`AtomicCheckpointIO` writes next to the target and renames, which is atomic on POSIX and
Windows. ``ModelCheckpoint(save_last=True)`` writes ``last.ckpt`` as a full checkpoint through
the checkpoint IO, so it is covered; ``save_last="link"`` instead removes ``last.ckpt`` and then
makes a symlink, outside the checkpoint IO, which a kill in between leaves missing: prefer
``save_last=True``. Use it in a Trainer with ``Trainer(plugins=[AtomicCheckpointIO()])``; the
``lightning-lopt`` command uses it unless the configuration names another checkpoint IO.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

__all__ = ["AtomicCheckpointIO", "atomic_torch_save"]

log = logging.getLogger(__name__)

# Temporary files start with a dot and end in ".tmp", so that Lightning's search for "last"
# checkpoints (names "last*.ckpt") and users' globs for "*.ckpt" never pick up a partial file.
_TMP_SUFFIX = ".tmp"


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}."


def atomic_torch_save(obj: Any, path: _PATH) -> None:
    """``torch.save`` to a local ``path`` so that ``path`` holds either its old or its new content.

    The data go to a temporary file in the same directory, which is flushed to disk and then
    renamed onto ``path``; the directory is flushed too, so that the rename survives a power loss.
    Temporary files that a killed writer left for the same ``path`` are removed first.

    Args:
        obj: What to save (anything :func:`torch.save` accepts).
        path: The target file; its directory is created if missing.
    """
    path = Path(str(path).removeprefix("file://"))
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f"{_tmp_prefix(path)}*{_TMP_SUFFIX}"):
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=_TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates the file 0600; give it the mode a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # Directories cannot be opened for fsync on Windows; the rename is durable enough there.
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """:class:`~lightning.pytorch.plugins.io.TorchCheckpointIO` whose local writes are atomic.

    A crash or ``kill -9`` while a checkpoint is written leaves the previous file at that path
    (``last.ckpt`` included) intact and loadable. Remote paths (``s3://`` and the like) are saved
    by Lightning's own transaction, as before.

    Example::

        trainer = pl.Trainer(plugins=[AtomicCheckpointIO()], callbacks=[ModelCheckpoint(save_last=True)])
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Optional[Any] = None) -> None:
        """Save ``checkpoint`` to ``path`` atomically (see :func:`atomic_torch_save`).

        Args:
            checkpoint: The trainer's checkpoint dict.
            path: The target file.
            storage_options: Not supported, as in ``TorchCheckpointIO``.
        """
        if not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"`storage_options` is not supported by {type(self).__name__}.")
        log.debug("Saving checkpoint atomically: %s", path)
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(
        self, path: _PATH, map_location: Optional[Any] = None, weights_only: Optional[bool] = None
    ) -> dict[str, Any]:
        """Load ``path`` with every tensor on the CPU unless ``map_location`` says otherwise.

        Lightning moves the model and optimizer states to the run's device afterwards, so a
        checkpoint written on a GPU (a meta-training burst) resumes on a machine without one.
        """
        return super().load_checkpoint(path, map_location=map_location or "cpu", weights_only=weights_only)
