"""Held-out tasks of the quality benchmark (``lightning-lopt-bench``): none is in the meta-training
distribution. ``TASKS`` maps a short key (``a`` ... ``f``) to each task's spec; :func:`build_task`
builds one. See :mod:`lightning_lopt.bench.quality` for what is measured on them.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_lopt.tasks.base import Task, make_generator, randn, sample_rows
from lightning_lopt.tasks.heldout import DigitsConvNetTask, MNIST1DMLPTask
from lightning_lopt.tasks.synthetic import QuadraticTask

__all__ = [
    "BreastCancerLogRegTask",
    "CharTransformerTask",
    "DigitsConvNetActivationTask",
    "NoisyQuadraticTask",
    "TASKS",
    "TASK_ALIASES",
    "TaskSpec",
    "build_task",
    "pydoc_text",
    "resolve_task_keys",
]


class DigitsConvNetActivationTask(DigitsConvNetTask):
    """:class:`~lightning_lopt.tasks.DigitsConvNetTask` with a choice of hidden activation.

    Args:
        activation: ``"relu"`` or ``"sigmoid"``.
        **kwargs: Passed to :class:`~lightning_lopt.tasks.DigitsConvNetTask`.
    """

    def __init__(self, activation: str = "relu", **kwargs: Any) -> None:
        if activation not in ("relu", "sigmoid"):
            raise ValueError(f"activation must be 'relu' or 'sigmoid', got {activation!r}.")
        super().__init__(**kwargs)
        self.activation = activation
        self.family = f"digits_convnet_{activation}"

    def logits(self, params: Sequence[Tensor], x: Tensor) -> Tensor:
        """Conv-net logits of images ``x`` of shape ``(batch, 1, 8, 8)``."""
        act = F.relu if self.activation == "relu" else torch.sigmoid
        w1, b1, w2, b2, w3, b3 = params
        h = act(F.conv2d(x, w1, b1, padding=1))
        h = act(F.conv2d(h, w2, b2, stride=2, padding=1))
        return F.linear(h.flatten(1), w3, b3)


class BreastCancerLogRegTask(Task):
    """Binary logistic regression on scikit-learn's breast-cancer set (569 rows, 30 features).

    Features are standardised with the training split's mean and standard deviation.

    Args:
        batch_size: Minibatch size.
        test_fraction: Fraction of the rows held out as the test split.
        split_seed: Seed of the train/test permutation.
    """

    family = "breast_cancer_logreg"

    def __init__(self, batch_size: int = 32, test_fraction: float = 0.2, split_seed: int = 0) -> None:
        from sklearn.datasets import load_breast_cancer

        data = load_breast_cancer()
        x = torch.as_tensor(data.data, dtype=torch.float32)
        y = torch.as_tensor(data.target, dtype=torch.float32)
        perm = torch.randperm(len(y), generator=make_generator(split_seed))
        n_test = int(round(test_fraction * len(y)))
        train, test = perm[n_test:], perm[:n_test]
        mean, std = x[train].mean(0), x[train].std(0).clamp_min(1e-6)
        self.batch_size = int(batch_size)
        self.x, self.y = (x[train] - mean) / std, y[train]
        self.x_test, self.y_test = (x[test] - mean) / std, y[test]

    def init_params(self, generator: torch.Generator) -> list[Tensor]:
        """Weights ``N(0, 1/features)`` and a zero bias."""
        d = self.x.shape[1]
        return [randn((d,), generator, std=1.0 / math.sqrt(d)), torch.zeros(1)]

    def sample_batch(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """A minibatch ``(x, y)`` of training rows."""
        idx = sample_rows(generator, self.x.shape[0], self.batch_size, self.x.device)
        return self.x[idx], self.y[idx]

    def loss(self, params: Sequence[Tensor], batch: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
        """Mean binary cross-entropy (the whole training split when ``batch`` is None)."""
        x, y = (self.x, self.y) if batch is None else batch
        return F.binary_cross_entropy_with_logits(x @ params[0] + params[1], y)

    @torch.no_grad()
    def evaluate(self, params: Sequence[Tensor]) -> dict[str, float]:
        """Loss and accuracy on the test split."""
        logits = self.x_test @ params[0] + params[1]
        return {
            "test_loss": float(F.binary_cross_entropy_with_logits(logits, self.y_test)),
            "test_accuracy": float(((logits > 0).float() == self.y_test).float().mean()),
        }


@functools.lru_cache(maxsize=1)
def pydoc_text() -> str:
    """The English documentation text CPython ships in ``pydoc_data.topics``, as ASCII.

    Topics are joined in sorted order; non-ASCII characters become ``?`` so the vocabulary stays
    under 100 symbols.
    """
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    text = "\n\n".join(topics[k] for k in sorted(topics))
    return text.encode("ascii", "replace").decode("ascii")


class CharTransformerTask(Task):
    """A small causal transformer predicting the next character of the ``pydoc_data`` text.

    Pre-norm blocks (multi-head self-attention, GELU MLP of width ``4 * width``), learned
    position embeddings. The last ``test_fraction`` of the text is the test split. Because the
    training text is large, ``loss(params, None)`` is the loss on a fixed batch of
    ``eval_sequences`` training windows, drawn once from ``data_seed``.

    Args:
        width: Model width.
        layers: Number of transformer blocks.
        heads: Attention heads.
        context: Characters per training window.
        batch_size: Windows per minibatch.
        eval_sequences: Windows of the fixed training-loss batch and of the test batch.
        test_fraction: Fraction of the text (its end) held out.
        max_chars: Use only the first ``max_chars`` characters of the text (None: all of it).
        data_seed: Seed of the fixed evaluation windows.
    """

    family = "char_lm"

    def __init__(
        self,
        width: int = 32,
        layers: int = 2,
        heads: int = 4,
        context: int = 32,
        batch_size: int = 16,
        eval_sequences: int = 256,
        test_fraction: float = 0.1,
        max_chars: Optional[int] = None,
        data_seed: int = 0,
    ) -> None:
        if width % heads:
            raise ValueError(f"width {width} must be divisible by heads {heads}.")
        text = pydoc_text()
        if max_chars is not None:
            text = text[: int(max_chars)]
        self.vocab = sorted(set(pydoc_text()))
        lookup = {c: i for i, c in enumerate(self.vocab)}
        ids = torch.tensor([lookup[c] for c in text], dtype=torch.long)
        n_test = int(round(test_fraction * len(ids)))
        self.train_ids, self.test_ids = ids[:-n_test], ids[-n_test:]
        self.width, self.layers, self.heads = int(width), int(layers), int(heads)
        self.context, self.batch_size = int(context), int(batch_size)
        g = make_generator(data_seed)
        self.eval_batch = self._windows(self.train_ids, eval_sequences, g)
        self.test_batch = self._windows(self.test_ids, eval_sequences, g)

    @property
    def vocab_size(self) -> int:
        """Number of distinct characters."""
        return len(self.vocab)

    def _windows(self, ids: Tensor, count: int, generator: torch.Generator) -> Tensor:
        starts = torch.randint(len(ids) - self.context - 1, (count,), generator=generator)
        return ids[starts.unsqueeze(1) + torch.arange(self.context + 1)].to(ids.device)

    def init_params(self, generator: torch.Generator) -> list[Tensor]:
        """GPT-2-style initialisation: ``N(0, 0.02)`` embeddings, ``1/sqrt(fan_in)`` projections."""
        d, v, n = self.width, self.vocab_size, self.layers
        residual = 1.0 / math.sqrt(2 * n)  # keeps the residual stream's scale independent of depth

        def w(shape: tuple[int, int], std: float) -> Tensor:
            return randn(shape, generator, std=std)

        params = [w((v, d), 0.02), w((self.context, d), 0.02)]
        for _ in range(n):
            params += [
                torch.ones(d), torch.zeros(d),
                w((3 * d, d), 1.0 / math.sqrt(d)), torch.zeros(3 * d),
                w((d, d), residual / math.sqrt(d)), torch.zeros(d),
                torch.ones(d), torch.zeros(d),
                w((4 * d, d), 1.0 / math.sqrt(d)), torch.zeros(4 * d),
                w((d, 4 * d), residual / math.sqrt(4 * d)), torch.zeros(d),
            ]  # fmt: skip
        params += [torch.ones(d), torch.zeros(d), w((v, d), 1.0 / math.sqrt(d)), torch.zeros(v)]
        return [p.to(self.train_ids.device) for p in params]

    def logits(self, params: Sequence[Tensor], x: Tensor) -> Tensor:
        """Next-character logits ``(batch, time, vocab)`` of character ids ``x``."""
        d, h = self.width, self.heads
        it = iter(params)
        emb, pos = next(it), next(it)
        z = emb[x] + pos[: x.shape[1]]
        b, t = x.shape
        for _ in range(self.layers):
            g1, b1, wqkv, bqkv, wo, bo, g2, b2, w1, bb1, w2, bb2 = (next(it) for _ in range(12))
            a = F.layer_norm(z, (d,), g1, b1)
            q, k, v = F.linear(a, wqkv, bqkv).view(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
            att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            z = z + F.linear(att.transpose(1, 2).reshape(b, t, d), wo, bo)
            a = F.layer_norm(z, (d,), g2, b2)
            z = z + F.linear(F.gelu(F.linear(a, w1, bb1)), w2, bb2)
        gf, bf, wh, bh = it
        return F.linear(F.layer_norm(z, (d,), gf, bf), wh, bh)

    def sample_batch(self, generator: torch.Generator) -> Tensor:
        """``batch_size`` random training windows of ``context + 1`` characters."""
        return self._windows(self.train_ids, self.batch_size, generator)

    def loss(self, params: Sequence[Tensor], batch: Optional[Tensor] = None) -> Tensor:
        """Mean next-character cross-entropy (nats); the fixed training batch when ``batch`` is None."""
        windows = self.eval_batch if batch is None else batch
        logits = self.logits(params, windows[:, :-1])
        return F.cross_entropy(logits.reshape(-1, self.vocab_size), windows[:, 1:].reshape(-1))

    @torch.no_grad()
    def evaluate(self, params: Sequence[Tensor]) -> dict[str, float]:
        """Loss and next-character accuracy on fixed windows of the held-out text."""
        logits = self.logits(params, self.test_batch[:, :-1])
        target = self.test_batch[:, 1:]
        return {
            "test_loss": float(F.cross_entropy(logits.reshape(-1, self.vocab_size), target.reshape(-1))),
            "test_accuracy": float((logits.argmax(-1) == target).float().mean()),
        }


class NoisyQuadraticTask(QuadraticTask):
    """:class:`~lightning_lopt.tasks.QuadraticTask` with additive Gaussian gradient noise.

    The loss itself (and so the final training loss) is exact; only the gradients the
    optimizer sees are noisy.

    Args:
        dim: Dimension (meta-training's quadratics have 20-100).
        noise: Standard deviation of the gradient noise per coordinate.
        seed: Seed of ``W`` and ``x*``.
    """

    family = "noisy_quadratic"

    def __init__(self, dim: int = 2000, noise: float = 1.0, seed: int = 0) -> None:
        super().__init__(dim=dim, seed=seed)
        self.gradient_noise = float(noise)


@dataclass(frozen=True)
class TaskSpec:
    """A benchmark task: how to build it and how long to train it.

    Attributes:
        key: Short name used by ``--tasks`` (``a``, ``b``, ``b2``, ...).
        name: Descriptive name (file names, tables).
        title: One-line description.
        group: Letter of the issue's task list; ``b`` and ``b2`` share one.
        steps: Training steps in the full benchmark.
        factory: Builds the task; keyword arguments override its defaults (tests make tiny ones).
        kwargs: The benchmark's arguments of ``factory``.
    """

    key: str
    name: str
    title: str
    group: str
    steps: int
    factory: Callable[..., Task]
    kwargs: dict[str, Any] = field(default_factory=dict)


TASKS: dict[str, TaskSpec] = {
    s.key: s
    for s in (
        TaskSpec("a", "mnist1d_mlp", "MLP 40-64-10 (ReLU) on MNIST-1D, batch 128", "a", 1000,
                 MNIST1DMLPTask, dict(hidden_sizes=(64,), batch_size=128)),
        TaskSpec("b", "digits_conv_relu", "conv net 8-16 (ReLU) on sklearn digits, batch 64", "b", 1000,
                 DigitsConvNetActivationTask, dict(activation="relu", batch_size=64)),
        TaskSpec("b2", "digits_conv_sigmoid", "conv net 8-16 (sigmoid) on sklearn digits, batch 64", "b", 1000,
                 DigitsConvNetActivationTask, dict(activation="sigmoid", batch_size=64)),
        TaskSpec("c", "char_lm", "2-layer char transformer (width 32, context 32) on pydoc_data text, batch 16",
                 "c", 600, CharTransformerTask, dict()),
        TaskSpec("d", "breast_cancer_logreg", "logistic regression on sklearn breast cancer, batch 32", "d", 500,
                 BreastCancerLogRegTask, dict(batch_size=32)),
        TaskSpec("e", "mnist1d_deep_mlp", "MLP 40-32x4-10 (ReLU) on MNIST-1D, batch 128, 5000 steps", "e", 5000,
                 MNIST1DMLPTask, dict(hidden_sizes=(32, 32, 32, 32), batch_size=128)),
        TaskSpec("f", "noisy_quadratic", "2000-dim quadratic 0.5|Wx-y|^2, gradient noise std 1", "f", 500,
                 NoisyQuadraticTask, dict(dim=2000, noise=1.0)),
    )
}  # fmt: skip
TASK_ALIASES = {"b'": "b2", **{s.name: s.key for s in TASKS.values()}}


def resolve_task_keys(text: str) -> list[str]:
    """Task keys from a comma-separated list of keys, names or ``b'``; ``all`` is every task."""
    if text.strip() == "all":
        return list(TASKS)
    keys = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        key = TASK_ALIASES.get(item, item)
        if key not in TASKS:
            choices = ", ".join(f"{s.key} ({s.name})" for s in TASKS.values())
            raise ValueError(f"Unknown task {item!r}; choose from {choices}.")
        if key not in keys:
            keys.append(key)
    return keys


@functools.lru_cache(maxsize=16)
def _cached_task(key: str, overrides: tuple[tuple[str, Any], ...]) -> Task:
    spec = TASKS[key]
    return spec.factory(**{**spec.kwargs, **dict(overrides)})


def build_task(key: str, **overrides: Any) -> Task:
    """The task ``key`` (cached per process; tasks hold only fixed data, never run state)."""
    return _cached_task(key, tuple(sorted(overrides.items())))
