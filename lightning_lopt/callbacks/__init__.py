"""Lightning callbacks for the hierarchical RNN learned optimizer."""

from lightning_lopt.callbacks.eval_mode import EvalWithTrueParameters
from lightning_lopt.callbacks.interrupt import CheckpointOnInterrupt
from lightning_lopt.callbacks.monitor import LearnedOptimizerMonitor, diagnostics_histograms, diagnostics_summary
from lightning_lopt.callbacks.progress import MetaTrainingProgressBar, TrainingProgress

__all__ = [
    "CheckpointOnInterrupt",
    "EvalWithTrueParameters",
    "LearnedOptimizerMonitor",
    "MetaTrainingProgressBar",
    "TrainingProgress",
    "diagnostics_histograms",
    "diagnostics_summary",
]
