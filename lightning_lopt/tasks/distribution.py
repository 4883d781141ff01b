"""The meta-training task distribution: an integer seed becomes a task, deterministically."""

from __future__ import annotations

import math
import random
from typing import Any, Callable, Optional

from lightning_lopt.tasks.base import Task
from lightning_lopt.tasks.functions import FUNCTIONS_2D, Function2DTask
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
from lightning_lopt.tasks.wrappers import GradientNoise, LogObjective, ReparamWeights, Rescaled, SparseGradients, SumOfTasks

__all__ = ["TaskDistribution", "DEFAULT_FAMILY_WEIGHTS", "DEFAULT_GRADIENT_NOISE"]

#: Default sampling weights (normalised when sampling). The large quadratics cost ~1000x more
#: per step than the rest, so they are opt-in.
DEFAULT_FAMILY_WEIGHTS: dict[str, float] = {
    "quadratic": 1.0,
    "quadratic_large": 0.0,
    "bowl": 0.5,
    "logistic_regression": 1.0,
    "mlp": 1.0,
    "mlp_deep_relu": 0.0,  # opt-in: keeps the default task stream of earlier releases
    "conv": 0.0,  # opt-in, as mlp_deep_relu
    "attention": 0.0,  # opt-in, as mlp_deep_relu
    "norm": 1.0,
    "matmul": 0.5,
    "sum": 1.0,
    **{name: 0.15 for name in FUNCTIONS_2D},
}

#: Largest gradient-noise standard deviation per family (the level is drawn uniformly below it),
#: roughly the size of a typical gradient entry at initialisation.
DEFAULT_GRADIENT_NOISE: dict[str, float] = {
    "quadratic": 2.0,
    "quadratic_large": 2.0,
    "bowl": 1.0,
    "logistic_regression": 0.1,
    "mlp": 0.05,
    "mlp_deep_relu": 0.05,
    "conv": 0.05,
    "attention": 0.05,
    "norm": 1.0,
    "matmul": 0.5,
    "sum": 0.5,
    "ackley": 1.0,
    "beale": 10.0,
    "booth": 5.0,
    "branin": 5.0,
    "logsumexp": 0.5,
    "matyas": 1.0,
    "michalewicz": 0.3,
    "rosenbrock": 10.0,
    "styblinski_tang": 5.0,
}

# Families a sum is built from: cheap, small ones, so a sum stays within a few thousand parameters.
_SUM_COMPONENTS = ("quadratic", "bowl", "norm", "logistic_regression", "matmul", *FUNCTIONS_2D)


class TaskDistribution:
    """Turns integer seeds into meta-training tasks (spec section 6).

    ``sample(seed)`` picks a family by weight, draws the family's hyper-parameters, builds the
    task's data, and applies wrappers with the given probabilities, innermost first: gradient
    noise, log objective, rescaling, sparse gradients. All randomness comes from
    ``random.Random(seed)`` and generators seeded from it, so a seed gives the same task on every
    rank and machine. Held-out evaluation tasks (``lightning_lopt.tasks.heldout``) are never
    sampled.

    Args:
        family_weights: Sampling weight per family name; families left out get weight 0. None
            uses ``DEFAULT_FAMILY_WEIGHTS``.
        gradient_noise_prob: Probability of additive gradient noise (the "noisy" versions).
        gradient_noise_levels: Largest noise standard deviation per family, overriding
            ``DEFAULT_GRADIENT_NOISE`` for the families given.
        log_objective_prob: Probability of the ``log(1 + f)`` wrapper.
        rescale_prob: Probability of the parameter-rescaling wrapper.
        rescale_range: Range of the parameter scale, sampled log-uniformly.
        sparse_prob: Probability of the sparse-gradient wrapper.
        sparse_drop_prob: Probability that the sparse wrapper zeroes a gradient entry.
        quadratic_dims: Range of the quadratic's dimension (inclusive).
        large_quadratic_dims: Range of the large quadratic's dimension (inclusive).
        bowl_conditions: Range of the bowl's condition number, sampled log-uniformly.
        logistic_features: Range of logistic regression's feature count (inclusive).
        norm_dims: Range of the norm problem's dimension (inclusive).
        sum_sizes: Range of the number of summed tasks (inclusive).
        reparam_prob: Probability of the per-tensor reparameterisation wrapper
            (:class:`~lightning_lopt.tasks.ReparamWeights`), applied outermost.
        reparam_range: Range of its per-tensor scales, sampled log-uniformly.

    Raises:
        ValueError: On an unknown family name, a negative weight, or no positive weight.
    """

    def __init__(
        self,
        family_weights: Optional[dict[str, float]] = None,
        gradient_noise_prob: float = 0.3,
        gradient_noise_levels: Optional[dict[str, float]] = None,
        log_objective_prob: float = 0.1,
        rescale_prob: float = 0.2,
        rescale_range: tuple[float, float] = (0.123, 1000.0),
        sparse_prob: float = 0.05,
        sparse_drop_prob: float = 0.99,
        quadratic_dims: tuple[int, int] = (20, 100),
        large_quadratic_dims: tuple[int, int] = (784, 2048),
        bowl_conditions: tuple[float, float] = (0.1, 5.0),
        logistic_features: tuple[int, int] = (10, 256),
        norm_dims: tuple[int, int] = (10, 100),
        sum_sizes: tuple[int, int] = (2, 4),
        reparam_prob: float = 0.0,
        reparam_range: tuple[float, float] = (1e-3, 1e3),
    ) -> None:
        weights = dict(DEFAULT_FAMILY_WEIGHTS) if family_weights is None else dict(family_weights)
        self._check_names(weights, "family_weights")
        if any(not (w >= 0 and math.isfinite(w)) for w in weights.values()):
            raise ValueError(f"Family weights must be finite and >= 0, got {weights}.")
        if not any(w > 0 for w in weights.values()):
            raise ValueError(f"At least one family needs a positive weight, got {weights}.")
        noise = dict(DEFAULT_GRADIENT_NOISE)
        if gradient_noise_levels:
            self._check_names(gradient_noise_levels, "gradient_noise_levels")
            noise.update(gradient_noise_levels)
        for name, p in dict(
            gradient_noise_prob=gradient_noise_prob,
            log_objective_prob=log_objective_prob,
            rescale_prob=rescale_prob,
            sparse_prob=sparse_prob,
            reparam_prob=reparam_prob,
        ).items():
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}.")
        self.family_weights = {f: float(weights.get(f, 0.0)) for f in self.families}
        self.gradient_noise_levels = noise
        self.gradient_noise_prob = gradient_noise_prob
        self.log_objective_prob = log_objective_prob
        self.rescale_prob = rescale_prob
        self.rescale_range = tuple(rescale_range)
        self.sparse_prob = sparse_prob
        self.sparse_drop_prob = sparse_drop_prob
        self.quadratic_dims = tuple(quadratic_dims)
        self.large_quadratic_dims = tuple(large_quadratic_dims)
        self.bowl_conditions = tuple(bowl_conditions)
        self.logistic_features = tuple(logistic_features)
        self.norm_dims = tuple(norm_dims)
        self.sum_sizes = tuple(sum_sizes)
        self.reparam_prob = reparam_prob
        self.reparam_range = tuple(reparam_range)

    def settings(self) -> dict[str, Any]:
        """Everything that decides which task a seed draws (meta-training checkpoints compare it on resume)."""
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in sorted(vars(self).items())}

    @property
    def families(self) -> list[str]:
        """Every family name this distribution knows, in a fixed order."""
        return list(DEFAULT_FAMILY_WEIGHTS)

    def _check_names(self, mapping: dict[str, float], arg: str) -> None:
        unknown = sorted(set(mapping) - set(self.families))
        if unknown:
            raise ValueError(f"Unknown task families {unknown} in {arg}; valid names: {self.families}.")

    def sample(self, seed: int) -> Task:
        """The task of ``seed`` (same seed, same task, on any machine)."""
        rng = random.Random(seed)
        names = [f for f in self.families if self.family_weights[f] > 0]
        family = rng.choices(names, weights=[self.family_weights[f] for f in names])[0]
        return self._wrap(self._build(family, rng), rng)

    def sample_family(self, family: str, seed: int) -> Task:
        """A task of ``family`` (weights ignored), with hyper-parameters and wrappers drawn from ``seed``.

        Raises:
            ValueError: If ``family`` is unknown.
        """
        self._check_names({family: 1.0}, "sample_family")
        rng = random.Random(seed)
        return self._wrap(self._build(family, rng), rng)

    def _wrap(self, task: Task, rng: random.Random) -> Task:
        # Every draw happens whether or not the wrapper applies, so the stream stays aligned.
        noisy, noise = rng.random() < self.gradient_noise_prob, rng.random()
        use_log = rng.random() < self.log_objective_prob
        rescale, scale = rng.random() < self.rescale_prob, self._log_uniform(rng, *self.rescale_range)
        sparse = rng.random() < self.sparse_prob
        level = self.gradient_noise_levels.get(task.family, 0.0)
        if noisy and level > 0:
            task = GradientNoise(task, noise=noise * level)
        if use_log:
            task = LogObjective(task)
        if rescale:
            task = Rescaled(task, scale=scale)
        if sparse:
            task = SparseGradients(task, drop_prob=self.sparse_drop_prob)
        # Drawn after the others (and only when enabled), so that the default stream of tasks is unchanged.
        if self.reparam_prob > 0 and rng.random() < self.reparam_prob:
            task = ReparamWeights(task, scale_range=self.reparam_range, seed=rng.getrandbits(62))
        return task

    @staticmethod
    def _log_uniform(rng: random.Random, low: float, high: float) -> float:
        return math.exp(rng.uniform(math.log(low), math.log(high)))

    def _build(self, family: str, rng: random.Random) -> Task:
        builders: dict[str, Callable[[random.Random], Task]] = {
            "quadratic": lambda r: QuadraticTask(dim=r.randint(*self.quadratic_dims), seed=self._seed(r)),
            "quadratic_large": lambda r: LargeQuadraticTask(dim=r.randint(*self.large_quadratic_dims), seed=self._seed(r)),
            "bowl": lambda r: BowlTask(
                condition=self._log_uniform(r, *self.bowl_conditions), angle=r.uniform(0, math.pi), seed=self._seed(r)
            ),
            "logistic_regression": lambda r: LogisticRegressionTask(
                features=r.randint(*self.logistic_features),
                num_samples=r.choice((256, 512, 1024)),
                batch_size=r.choice((16, 32, 64, 128)),
                seed=self._seed(r),
            ),
            "mlp": lambda r: MLPTask(
                input_dim=r.randint(2, 32),
                hidden_sizes=tuple(r.randint(4, 48) for _ in range(r.randint(1, 2))),
                num_classes=r.randint(2, 10),
                num_samples=r.choice((256, 512, 1024)),
                batch_size=r.choice((16, 32, 64, 128)),
                seed=self._seed(r),
            ),
            "mlp_deep_relu": lambda r: DeepReLUMLPTask(
                input_dim=r.randint(8, 48),
                hidden_sizes=tuple(r.randint(16, 48) for _ in range(r.randint(3, 5))),
                num_classes=r.randint(2, 10),
                num_samples=r.choice((512, 1024)),
                batch_size=r.choice((32, 64, 128)),
                seed=self._seed(r),
            ),
            "conv": lambda r: ConvNetTask(
                size=r.choice((6, 8, 10)),
                channels=(r.randint(2, 8), r.randint(4, 12)),
                num_classes=r.randint(2, 6),
                num_samples=r.choice((256, 512)),
                batch_size=r.choice((16, 32, 64)),
                seed=self._seed(r),
            ),
            "attention": lambda r: AttentionTask(
                length=r.randint(4, 12),
                dim=r.choice((4, 8, 12)),
                num_classes=r.randint(2, 6),
                num_samples=r.choice((256, 512)),
                batch_size=r.choice((16, 32, 64)),
                seed=self._seed(r),
            ),
            "norm": lambda r: NormTask(dim=r.randint(*self.norm_dims), p=float(r.choice((1, 2, 3))), seed=self._seed(r)),
            "matmul": self._matmul,
            "sum": self._sum,
        }
        if family in FUNCTIONS_2D:
            return Function2DTask(family)
        return builders[family](rng)

    @staticmethod
    def _seed(rng: random.Random) -> int:
        return rng.getrandbits(62)

    @staticmethod
    def _matmul(rng: random.Random) -> Task:
        # Ranks from the known tensor rank (7 for 2x2, Strassen; 23 for 3x3, Laderman) up to the
        # naive algorithm's n^3, so the minimum is 0.
        n = rng.choice((2, 2, 3))
        rank = rng.randint(7, 8) if n == 2 else rng.randint(23, 27)
        return MatMulAlgorithmTask(n=n, rank=rank, batch_size=rng.choice((16, 32, 64)), seed=rng.getrandbits(62))

    def _sum(self, rng: random.Random) -> Task:
        count = rng.randint(*self.sum_sizes)
        parts = []
        for _ in range(count):
            part = self._build(rng.choice(_SUM_COMPONENTS), rng)
            # Different scales per summed problem make the tensors' gradient scales differ.
            rescale, scale = rng.random() < 0.5, self._log_uniform(rng, 0.1, 10.0)
            parts.append(Rescaled(part, scale=scale) if rescale else part)
        return SumOfTasks(parts)

    def __repr__(self) -> str:
        active = {f: w for f, w in self.family_weights.items() if w > 0}
        return f"TaskDistribution(family_weights={active})"
