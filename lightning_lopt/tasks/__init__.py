"""Task corpus for meta-training (spec section 6) and held-out evaluation tasks."""

from lightning_lopt.tasks.base import NegativeLossError, Task
from lightning_lopt.tasks.distribution import DEFAULT_FAMILY_WEIGHTS, DEFAULT_GRADIENT_NOISE, TaskDistribution
from lightning_lopt.tasks.functions import FUNCTIONS_2D, Function2DTask
from lightning_lopt.tasks.heldout import HELDOUT_TASKS, DigitsConvNetTask, HeldOutClassificationTask, MNIST1DMLPTask
from lightning_lopt.tasks.synthetic import (
    AttentionTask,
    BowlTask,
    ConvNetTask,
    DeepReLUMLPTask,
    LargeQuadraticTask,
    LogisticRegressionTask,
    MatMulAlgorithmTask,
    MLPTask,
    NormTask,
    QuadraticTask,
)
from lightning_lopt.tasks.wrappers import (
    GradientNoise,
    LogObjective,
    ReparamWeights,
    Rescaled,
    SparseGradients,
    SumOfTasks,
    TaskWrapper,
)

__all__ = [
    "Task",
    "NegativeLossError",
    "TaskDistribution",
    "DEFAULT_FAMILY_WEIGHTS",
    "DEFAULT_GRADIENT_NOISE",
    "QuadraticTask",
    "LargeQuadraticTask",
    "BowlTask",
    "NormTask",
    "LogisticRegressionTask",
    "DeepReLUMLPTask",
    "MLPTask",
    "MatMulAlgorithmTask",
    "ConvNetTask",
    "AttentionTask",
    "Function2DTask",
    "FUNCTIONS_2D",
    "TaskWrapper",
    "LogObjective",
    "Rescaled",
    "ReparamWeights",
    "SumOfTasks",
    "SparseGradients",
    "GradientNoise",
    "HeldOutClassificationTask",
    "MNIST1DMLPTask",
    "DigitsConvNetTask",
    "HELDOUT_TASKS",
]
