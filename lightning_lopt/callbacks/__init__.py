"""Lightning callbacks for the hierarchical RNN learned optimizer."""

from lightning_lopt.callbacks.eval_mode import EvalWithTrueParameters

__all__ = ["EvalWithTrueParameters"]
