"""Example LightningModules used by the configs, the examples and the benchmark."""

from lightning_lopt.models.mlp import MLPClassifier

__all__ = ["MLPClassifier"]
