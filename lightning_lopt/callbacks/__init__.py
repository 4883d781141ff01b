"""Lightning callbacks for the hierarchical RNN learned optimizer."""

from lightning_lopt.callbacks.eval_mode import EvalWithTrueParameters
from lightning_lopt.callbacks.monitor import LearnedOptimizerMonitor, diagnostics_histograms, diagnostics_summary

__all__ = ["EvalWithTrueParameters", "LearnedOptimizerMonitor", "diagnostics_histograms", "diagnostics_summary"]
