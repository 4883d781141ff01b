"""Synthetic problem families of the paper's meta-training set (spec section 6).

Every task builds its fixed data from ``seed`` in the constructor (CPU, float32) and draws initial
parameters and minibatches only from the generators it is given, so a task is reproducible from
its constructor arguments alone.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_lopt.tasks.base import Task, make_generator, randn, sample_rows

__all__ = [
    "QuadraticTask",
    "LargeQuadraticTask",
    "BowlTask",
    "NormTask",
    "LogisticRegressionTask",
    "MLPTask",
    "DeepReLUMLPTask",
    "MatMulAlgorithmTask",
    "ConvNetTask",
    "AttentionTask",
]


class QuadraticTask(Task):
    """Quadratic ``0.5 * ||W x - y||^2`` with a random square ``W`` and ``y = W x*``.

    The minimum is exactly 0 (at ``x*``); a random Gaussian ``W`` makes the conditioning vary
    widely between seeds, as in the paper.

    Args:
        dim: Dimension of ``x`` (the paper uses 20-100).
        seed: Seed of ``W`` and ``x*``.
    """

    family = "quadratic"

    def __init__(self, dim: int = 50, seed: int = 0) -> None:
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}.")
        self.dim = int(dim)
        self.seed = int(seed)
        g = make_generator(seed)
        self.W = randn((dim, dim), g, std=1.0 / math.sqrt(dim))
        self.y = self.W @ randn((dim,), g)

    def init_params(self, generator: torch.Generator) -> list[Tensor]:
        """``x ~ N(0, I)``."""
        return [randn((self.dim,), generator).to(self.W.device)]

    def loss(self, params: Sequence[Tensor], batch: Any = None) -> Tensor:
        """``0.5 * ||W x - y||^2``."""
        r = self.W @ params[0] - self.y
        return 0.5 * (r * r).sum()

    def particle_loss(self, params: Sequence[Tensor], batch: Any = None) -> Optional[Tensor]:
        """:meth:`loss` per particle, ``params[0]`` of shape ``(P, dim)``."""
        if type(self).loss is not QuadraticTask.loss:
            return None  # a subclass with its own loss (NormTask writes its own particle_loss)
        r = params[0] @ self.W.T - self.y
        return 0.5 * (r * r).sum(-1)


class LargeQuadraticTask(QuadraticTask):
    """The paper's large quadratics (784-2048 dimensions); costly, so off by default in sampling.

    Args:
        dim: Dimension of ``x``.
        seed: Seed of ``W`` and ``x*``.
    """

    family = "quadratic_large"

    def __init__(self, dim: int = 784, seed: int = 0) -> None:
        super().__init__(dim=dim, seed=seed)


class BowlTask(Task):
    """Rotated 2-D quadratic bowl ``0.5 * (u_1^2 + condition * u_2^2)``, ``u = R(angle) (x - c)``.

    Args:
        condition: Curvature of the second principal axis relative to the first (paper: 0.1-5).
        angle: Rotation of the principal axes in radians.
        seed: Seed of the centre ``c``.
    """

    family = "bowl"

    def __init__(self, condition: float = 1.0, angle: float = 0.0, seed: int = 0) -> None:
        if condition <= 0:
            raise ValueError(f"condition must be > 0, got {condition}.")
        self.condition = float(condition)
        self.angle = float(angle)
        self.seed = int(seed)
        c, s = math.cos(angle), math.sin(angle)
        self.rotation = torch.tensor([[c, -s], [s, c]], dtype=torch.float32)
        self.center = randn((2,), make_generator(seed))
        self.curvature = torch.tensor([1.0, self.condition], dtype=torch.float32)

    def init_params(self, generator: torch.Generator) -> list[Tensor]:
        """``x ~ N(0, 4 I)``, about two units from the centre."""
        return [randn((2,), generator, std=2.0).to(self.center.device)]

    def loss(self, params: Sequence[Tensor], batch: Any = None) -> Tensor:
        """``0.5 * sum_i curvature_i * u_i^2``."""
        u = self.rotation @ (params[0] - self.center)
        return 0.5 * (self.curvature * u * u).sum()


class NormTask(QuadraticTask):
    """Norm problem ``||W x - y||_p^p`` with ``y = W x*`` (minimum exactly 0); data as :class:`QuadraticTask`.

    Args:
        dim: Dimension of ``x``.
        p: Exponent (the paper uses 1, 2 and 3).
        seed: Seed of ``W`` and ``x*``.
    """

    family = "norm"

    def __init__(self, dim: int = 20, p: float = 2.0, seed: int = 0) -> None:
        if p <= 0:
            raise ValueError(f"need p > 0, got p={p}.")
        super().__init__(dim=dim, seed=seed)
        self.p = float(p)

    def loss(self, params: Sequence[Tensor], batch: Any = None) -> Tensor:
        """``sum_i |W x - y|_i^p``."""
        return (self.W @ params[0] - self.y).abs().pow(self.p).sum()

    def particle_loss(self, params: Sequence[Tensor], batch: Any = None) -> Optional[Tensor]:
        """:meth:`loss` per particle, ``params[0]`` of shape ``(P, dim)``."""
        if type(self).loss is not NormTask.loss:
            return None
        return (params[0] @ self.W.T - self.y).abs().pow(self.p).sum(-1)


class _DataTask(Task):
    """A task with a fixed training set ``(x, y)`` and uniform minibatches (with replacement).

    ``loss(params, None)`` is the loss on the whole training set.
    """

    x: Tensor
    y: Tensor
    batch_size: int

    def sample_batch(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """A minibatch ``(x, y)`` of ``batch_size`` rows, on the task's device."""
        idx = sample_rows(generator, self.x.shape[0], self.batch_size, self.x.device)
        return self.x[idx], self.y[idx]

    def _data(self, batch: Optional[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        return (self.x, self.y) if batch is None else batch


class LogisticRegressionTask(_DataTask):
    """Binary logistic regression on synthetic data labelled by a noisy linear teacher.

    Labels are Bernoulli draws from the teacher's probabilities, so the data are not separable and
    the minimum loss is positive.

    Args:
        features: Number of input features (paper: 10-256).
        num_samples: Size of the fixed training set.
        batch_size: Minibatch size of :meth:`sample_batch`.
        seed: Seed of the data.
    """

    family = "logistic_regression"

    def __init__(self, features: int = 32, num_samples: int = 512, batch_size: int = 32, seed: int = 0) -> None:
        if features < 1 or num_samples < 1 or batch_size < 1:
            raise ValueError("features, num_samples and batch_size must be >= 1.")
        self.features = int(features)
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        g = make_generator(seed)
        self.x = randn((num_samples, features), g)
        # Teacher logits of unit-ish scale keep the labels informative but noisy.
        teacher = randn((features,), g, std=2.0 / math.sqrt(features))
        bias = float(randn((1,), g, std=0.5))
        prob = torch.sigmoid(self.x @ teacher + bias)
        self.y = (torch.rand(num_samples, generator=g) < prob).to(torch.float32)

    def init_params(self, generator: torch.Generator) -> list[Tensor]:
        """Weights ``N(0, 1/features)`` of shape ``(features,)`` and a zero bias of shape ``(1,)``."""
        w = randn((self.features,), generator, std=1.0 / math.sqrt(self.features))
        return [w.to(self.x.device), torch.zeros(1, device=self.x.device)]

    def loss(self, params: Sequence[Tensor], batch: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
        """Mean binary cross-entropy of the logits ``x @ w + b``."""
        x, y = self._data(batch)
        return F.binary_cross_entropy_with_logits(x @ params[0] + params[1], y)

    def particle_loss(self, params: Sequence[Tensor], batch: Optional[tuple[Tensor, Tensor]] = None) -> Optional[Tensor]:
        """:meth:`loss` per particle: weights ``(P, features)``, biases ``(P, 1)``."""
        if type(self).loss is not LogisticRegressionTask.loss:
            return None
        x, y = self._data(batch)
        logits = params[0] @ x.T + params[1].reshape(params[1].shape[0], -1)  # bias (P, 1)
        return F.binary_cross_entropy_with_logits(logits, y.expand_as(logits), reduction="none").mean(-1)

    def particle_loss_and_grad(
        self, params: Sequence[Tensor], batch: Optional[tuple[Tensor, tuple[Tensor, Tensor]]] = None
    ) -> Optional[tuple[Tensor, list[Tensor]]]:
        """:meth:`particle_loss` and its gradient: ``(sigmoid(logits) - y) / B`` times the inputs."""
        if type(self).loss is not LogisticRegressionTask.loss:
            return None
        x, y = self._data(batch)
        logits = params[0] @ x.T + params[1].reshape(params[1].shape[0], -1)
        losses = F.binary_cross_entropy_with_logits(logits, y.expand_as(logits), reduction="none").mean(-1)
        dlogits = (torch.sigmoid(logits) - y) / x.shape[0]
        return losses, [dlogits @ x, dlogits.sum(-1).reshape(params[1].shape)]


class MLPTask(_DataTask):
    """Small sigmoid MLP classifying Gaussian inputs labelled by a random teacher network.

    The teacher has the student's architecture with larger weights, so the labels are a
    learnable, non-linear function of the inputs; the loss is the mean cross-entropy.

    Args:
        input_dim: Number of input features.
        hidden_sizes: Widths of the hidden layers.
        num_classes: Number of classes.
        num_samples: Size of the fixed training set.
        batch_size: Minibatch size of :meth:`sample_batch`.
        seed: Seed of the teacher and the data.
    """

    family = "mlp"

    def __init__(
        self,
        input_dim: int = 8,
        hidden_sizes: Sequence[int] = (16,),
        num_classes: int = 3,
        num_samples: int = 512,
        batch_size: int = 32,
        seed: int = 0,
    ) -> None:
        if input_dim < 1 or num_classes < 2 or any(h < 1 for h in hidden_sizes):
            raise ValueError("need input_dim >= 1, num_classes >= 2 and positive hidden sizes.")
        self.input_dim = int(input_dim)
        self.hidden_sizes = tuple(int(h) for h in hidden_sizes)
        self.num_classes = int(num_classes)
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        g = make_generator(seed)
        self.x = randn((num_samples, input_dim), g)
        teacher = self._random_params(g, weight_gain=3.0, bias_std=1.0)
        self.y = self._forward(teacher, self.x).argmax(dim=1)

    @property
    def _sizes(self) -> list[int]:
        return [self.input_dim, *self.hidden_sizes, self.num_classes]

    def _random_params(self, generator: torch.Generator, weight_gain: float, bias_std: float) -> list[Tensor]:
        params = []
        for fan_in, fan_out in zip(self._sizes[:-1], self._sizes[1:]):
            params.append(randn((fan_out, fan_in), generator, std=weight_gain / math.sqrt(fan_in)))
            params.append(randn((fan_out,), generator, std=bias_std))
        return params

    _activation = staticmethod(torch.sigmoid)

    def _forward(self, params: Sequence[Tensor], x: Tensor) -> Tensor:
        h = x
        n_layers = len(params) // 2
        for i in range(n_layers):
            h = F.linear(h, params[2 * i], params[2 * i + 1])
            if i < n_layers - 1:
                h = self._activation(h)
        return h

    def init_params(self, generator: torch.Generator) -> list[Tensor]:
        """Weights ``(out, in)`` drawn ``N(0, 1/fan_in)`` and zero biases ``(out,)``, per layer."""
        params = self._random_params(generator, weight_gain=1.0, bias_std=0.0)
        return [p.to(self.x.device) for p in params]

    def loss(self, params: Sequence[Tensor], batch: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
        """Mean cross-entropy of the MLP's logits."""
        x, y = self._data(batch)
        # cross_entropy written out: under vmap (meta-training's particles) F.cross_entropy has no
        # batching rule and runs a slow decomposition; log_softmax and gather have one.
        return -F.log_softmax(self._forward(params, x), dim=-1).gather(-1, y.unsqueeze(-1)).mean()

    def particle_loss(self, params: Sequence[Tensor], batch: Optional[tuple[Tensor, Tensor]] = None) -> Optional[Tensor]:
        """:meth:`loss` per particle: weights ``(P, out, in)``, biases ``(P, out)``."""
        if type(self).loss is not MLPTask.loss or type(self)._forward is not MLPTask._forward:
            return None
        x, y = self._data(batch)
        h, _ = self._particle_logits(params, x)
        picked = F.log_softmax(h, dim=-1).gather(-1, y.view(1, -1, 1).expand(h.shape[0], -1, 1))
        return -picked.mean((-2, -1))

    def _particle_logits(self, params: Sequence[Tensor], x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Every particle's logits ``(P, B, classes)``, and each layer's input (for backpropagation)."""
        inputs, h = [], x
        n_layers = len(params) // 2
        for i in range(n_layers):
            inputs.append(h)
            # (B, in) or (P, B, in) times (P, in, out): every particle's layer in one batched product.
            h = torch.matmul(h, params[2 * i].transpose(-1, -2)) + params[2 * i + 1].unsqueeze(-2)
            if i < n_layers - 1:
                h = self._activation(h)
        return h, inputs

    def particle_loss_and_grad(
        self, params: Sequence[Tensor], batch: Optional[tuple[Tensor, Tensor]] = None
    ) -> Optional[tuple[Tensor, list[Tensor]]]:
        """:meth:`particle_loss` and its gradient by backpropagation written out (sigmoid or ReLU)."""
        if type(self).loss is not MLPTask.loss or type(self)._forward is not MLPTask._forward:
            return None
        derivative = {torch.sigmoid: lambda a: a * (1.0 - a), torch.relu: lambda a: (a > 0).to(a.dtype)}.get(
            type(self)._activation)
        if derivative is None:
            return None
        x, y = self._data(batch)
        n_layers, particles = len(params) // 2, params[0].shape[0]
        h, inputs = self._particle_logits(params, x)
        index = y.view(1, -1, 1).expand(particles, -1, 1)
        log_probs = F.log_softmax(h, dim=-1)
        losses = -log_probs.gather(-1, index).mean((-2, -1))
        # d(mean cross-entropy)/d logits = (softmax - one_hot) / batch
        delta = log_probs.exp().scatter_add_(-1, index, torch.full(index.shape, -1.0, dtype=h.dtype, device=h.device))
        delta = delta / x.shape[0]
        grads: list[Tensor] = [torch.empty(0)] * len(params)
        for i in reversed(range(n_layers)):
            a = inputs[i]
            grads[2 * i] = delta.transpose(-1, -2) @ a
            grads[2 * i + 1] = delta.sum(-2)
            if i > 0:
                delta = (delta @ params[2 * i]) * derivative(a)
        return losses, grads


class DeepReLUMLPTask(MLPTask):
    """:class:`MLPTask` with ReLU activations, meant for several hidden layers.

    Deep ReLU networks punish a too-large step differently from sigmoid ones: one step can kill
    units for good and leave the network at chance, which the small sigmoid MLPs never show.
    """

    family = "mlp_deep_relu"
    _activation = staticmethod(torch.relu)


class MatMulAlgorithmTask(Task):
    """Learn a bilinear algorithm with ``rank`` multiplications for ``n x n`` matrix products.

    The algorithm computes ``m = (U vec A) * (V vec B)`` (``rank`` products) and
    ``vec C = W m``; the loss is its mean squared error against ``A @ B`` on random Gaussian
    matrices. With ``rank`` at least the tensor rank (7 for ``n = 2``, Strassen; at most 23 for
    ``n = 3``) the minimum is 0. ``loss(params, None)`` is the exact expectation over Gaussian
    matrices, ``||T_hat - T||_F^2`` for the algorithm's tensor ``T_hat``.

    Args:
        n: Matrix size.
        rank: Number of multiplications of the algorithm.
        batch_size: Number of random matrix pairs per minibatch.
        init_scale: Standard deviation of the initial factors.
        seed: Unused by the data (the target tensor is fixed); kept for a uniform constructor.
    """

    family = "matmul"

    def __init__(self, n: int = 2, rank: int = 7, batch_size: int = 32, init_scale: float = 0.5, seed: int = 0) -> None:
        if n < 1 or rank < 1 or batch_size < 1:
            raise ValueError("n, rank and batch_size must be >= 1.")
        self.n = int(n)
        self.rank = int(rank)
        self.batch_size = int(batch_size)
        self.init_scale = float(init_scale)
        self.seed = int(seed)
        nn = n * n
        # T[(i,k), (k,j), (i,j)] = 1 encodes C_ij = sum_k A_ik B_kj on row-major vectorisations.
        self.target = torch.zeros(nn, nn, nn)
        for i in range(n):
            for j in range(n):
                for k in range(n):
                    self.target[i * n + k, k * n + j, i * n + j] = 1.0

    def init_params(self, generator: torch.Generator) -> list[Tensor]:
        """Factors ``U (rank, n^2)``, ``V (rank, n^2)``, ``W (n^2, rank)``, each ``N(0, init_scale^2)``."""
        nn, dev = self.n * self.n, self.target.device
        return [
            randn((self.rank, nn), generator, self.init_scale).to(dev),
            randn((self.rank, nn), generator, self.init_scale).to(dev),
            randn((nn, self.rank), generator, self.init_scale).to(dev),
        ]

    def sample_batch(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Random Gaussian matrices ``A, B`` of shape ``(batch_size, n, n)``."""
        shape = (self.batch_size, self.n, self.n)
        dev = self.target.device
        return randn(shape, generator).to(dev), randn(shape, generator).to(dev)

    def loss(self, params: Sequence[Tensor], batch: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
        """Mean over the batch of ``||C_hat - A B||^2`` (exact expectation when ``batch`` is None)."""
        u, v, w = params
        if batch is None:
            t_hat = torch.einsum("rp,rq,cr->pqc", u, v, w)
            return ((t_hat - self.target) ** 2).sum()
        a, b = batch
        m = (a.flatten(1) @ u.T) * (b.flatten(1) @ v.T)
        err = m @ w.T - (a @ b).flatten(1)
        return (err * err).sum(dim=1).mean()


class _TeacherClassifierTask(_DataTask):
    """A classifier whose labels a random teacher of the student's architecture (larger weights) gives.

    Pooled features of a random network share a sign, so one class would win everywhere: each
    class's teacher logit is centred over the data set, which spreads the labels over the classes.
    Subclasses define ``_forward(params, x)``.
    """

    num_classes: int

    def _data_settings(self, num_classes: int, num_samples: int, batch_size: int, seed: int) -> torch.Generator:
        """Store the settings every such task has; the generator of the data and the teacher."""
        self.num_classes = int(num_classes)
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        return make_generator(seed)

    def _forward(self, params: Sequence[Tensor], x: Tensor) -> Tensor:
        raise NotImplementedError

    def _label(self, teacher: Sequence[Tensor]) -> None:
        with torch.no_grad():
            logits = self._forward(teacher, self.x)
            self.y = (logits - logits.mean(0)).argmax(dim=1)

    def loss(self, params: Sequence[Tensor], batch: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
        """Mean cross-entropy of the logits."""
        x, y = self._data(batch)
        return -F.log_softmax(self._forward(params, x), dim=-1).gather(-1, y.unsqueeze(-1)).mean()


class ConvNetTask(_TeacherClassifierTask):
    """Small ReLU conv net classifying Gaussian ``size x size`` images labelled by a random teacher.

    Two 3x3 convolutions (the second with stride 2), global average pooling and a linear read-out;
    the teacher has the student's architecture with larger weights, so the labels are a learnable,
    translation-aware function of the images. Convolution weights have four dimensions, whose
    gradient statistics an MLP never shows the update rule.

    Args:
        size: Image height and width.
        channels: Output channels of the two convolutions.
        num_classes: Number of classes.
        num_samples: Size of the fixed training set.
        batch_size: Minibatch size of :meth:`sample_batch`.
        seed: Seed of the teacher and the data.
    """

    family = "conv"

    def __init__(
        self,
        size: int = 8,
        channels: Sequence[int] = (4, 8),
        num_classes: int = 3,
        num_samples: int = 512,
        batch_size: int = 32,
        seed: int = 0,
    ) -> None:
        if size < 3 or num_classes < 2 or len(channels) != 2 or min(channels) < 1:
            raise ValueError("need size >= 3, num_classes >= 2 and two positive channel counts.")
        self.size = int(size)
        self.channels = (int(channels[0]), int(channels[1]))
        g = self._data_settings(num_classes, num_samples, batch_size, seed)
        self.x = randn((num_samples, 1, size, size), g)
        self._label(self._random_params(g, gain=3.0, bias_std=0.5))

    def _random_params(self, generator: torch.Generator, gain: float, bias_std: float) -> list[Tensor]:
        c1, c2 = self.channels
        shapes = [((c1, 1, 3, 3), 9), ((c2, c1, 3, 3), 9 * c1), ((self.num_classes, c2), c2)]
        params = []
        for shape, fan_in in shapes:
            params.append(randn(shape, generator, std=gain / math.sqrt(fan_in)))
            params.append(randn((shape[0],), generator, std=bias_std))
        return params

    def _forward(self, params: Sequence[Tensor], x: Tensor) -> Tensor:
        w1, b1, w2, b2, w3, b3 = params
        h = torch.relu(F.conv2d(x, w1, b1, padding=1))
        h = torch.relu(F.conv2d(h, w2, b2, stride=2, padding=1))
        return F.linear(h.mean((-2, -1)), w3, b3)

    def init_params(self, generator: torch.Generator) -> list[Tensor]:
        """He-scaled weights ``N(0, 2/fan_in)`` and zero biases, per layer."""
        params = self._random_params(generator, gain=math.sqrt(2.0), bias_std=0.0)
        return [p.to(self.x.device) for p in params]


class AttentionTask(_TeacherClassifierTask):
    """One-head self-attention classifying Gaussian token sequences labelled by a random teacher.

    ``softmax(Q K^T / sqrt(d)) V`` over the sequence, then mean pooling and a linear read-out; the
    teacher has the student's architecture with larger weights. Query and key weights meet in a
    product, which gives the loss a curvature no MLP layer has.

    Args:
        length: Tokens per sequence.
        dim: Token and head dimension.
        num_classes: Number of classes.
        num_samples: Size of the fixed training set.
        batch_size: Minibatch size of :meth:`sample_batch`.
        seed: Seed of the teacher and the data.
    """

    family = "attention"

    def __init__(
        self,
        length: int = 8,
        dim: int = 8,
        num_classes: int = 3,
        num_samples: int = 512,
        batch_size: int = 32,
        seed: int = 0,
    ) -> None:
        if length < 1 or dim < 1 or num_classes < 2:
            raise ValueError("need length >= 1, dim >= 1 and num_classes >= 2.")
        self.length = int(length)
        self.dim = int(dim)
        g = self._data_settings(num_classes, num_samples, batch_size, seed)
        self.x = randn((num_samples, length, dim), g)
        self._label(self._random_params(g, gain=3.0))

    def _random_params(self, generator: torch.Generator, gain: float) -> list[Tensor]:
        d, std = self.dim, gain / math.sqrt(self.dim)
        return [randn((d, d), generator, std=std) for _ in range(3)] + [
            randn((self.num_classes, d), generator, std=std), torch.zeros(self.num_classes)]

    def _forward(self, params: Sequence[Tensor], x: Tensor) -> Tensor:
        wq, wk, wv, wo, bo = params
        q, k, v = x @ wq.T, x @ wk.T, x @ wv.T
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.dim), dim=-1)
        return F.linear((att @ v).mean(-2), wo, bo)

    def init_params(self, generator: torch.Generator) -> list[Tensor]:
        """Projections ``N(0, 1/dim)``, read-out ``N(0, 1/dim)`` and a zero bias."""
        return [p.to(self.x.device) for p in self._random_params(generator, gain=1.0)]
