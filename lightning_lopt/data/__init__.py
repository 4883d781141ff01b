"""Small real data sets made or shipped locally (nothing is downloaded at run time)."""

from lightning_lopt.data.mnist1d import MNIST1DDataModule, make_mnist1d

__all__ = ["MNIST1DDataModule", "make_mnist1d"]
