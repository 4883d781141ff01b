"""lightning-lopt: the hierarchical RNN learned optimizer for PyTorch Lightning."""

from lightning_lopt.hrnn import HierarchicalRNN, HRNNState, Layout, StepDiagnostics
from lightning_lopt.optimizer import HierarchicalRNNOptimizer

__all__ = ["HierarchicalRNN", "HierarchicalRNNOptimizer", "HRNNState", "Layout", "StepDiagnostics"]
__version__ = "0.1.0"
