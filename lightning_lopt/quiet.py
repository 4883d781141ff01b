"""Silence third-party messages that say nothing about a lightning-lopt run.

Each filter names its source and why it is noise here; :func:`quiet_third_party` installs them
(the ``lightning-lopt`` command does, before anything else runs).
"""

from __future__ import annotations

import logging
import warnings

__all__ = ["KNOWN_WARNINGS", "quiet_third_party"]

KNOWN_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    # Lightning 2.6's pytree helper calls torch's LeafSpec, which torch 2.13 deprecates: nothing to act on.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, "lightning.pytorch.utilities._pytree"),
    # Meta-training optimises manually; its checkpoints are meant to hold the state after the meta-update.
    (r"Using ModelCheckpoint with manual optimization and every_n_train_steps", UserWarning, ""),
)


class _DropTips(logging.Filter):
    """Lightning's "💡 Tip:" advertisements of other packages."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("💡 Tip:")


def quiet_third_party() -> None:
    """Install the filters of :data:`KNOWN_WARNINGS` and drop Lightning's package tips."""
    for message, category, module in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())
