"""The nine 2-D optimisation test functions of the paper's meta-training set, shifted to be >= 0.

Each loss is the textbook function minus its known global minimum value, so it is 0 at the global
minimiser. Where the shifted function has a form that is a sum of non-negative terms (Ackley,
Branin, Matyas, Styblinski-Tang, the second Michalewicz term) that form is used, so the loss is
>= 0 exactly in floating point; otherwise (LogSumExp, the first Michalewicz term) the
``~1e-7`` negative rounding of float32 near the minimum is clamped to 0, which is the only
change to the textbook function.

Textbook definitions and minima (``x, y`` the two coordinates):

- Ackley: ``-20 exp(-0.2 sqrt((x^2 + y^2)/2)) - exp((cos 2 pi x + cos 2 pi y)/2) + e + 20``;
  0 at ``(0, 0)``.
- Beale: ``(1.5 - x + xy)^2 + (2.25 - x + xy^2)^2 + (2.625 - x + xy^3)^2``; 0 at ``(3, 0.5)``.
- Booth: ``(x + 2y - 7)^2 + (2x + y - 5)^2``; 0 at ``(1, 3)``.
- Branin: ``(y - 5.1 x^2/(4 pi^2) + 5x/pi - 6)^2 + 10 (1 - 1/(8 pi)) cos x + 10``;
  ``5/(4 pi) = 0.397887...`` at ``(-pi, 12.275)``, ``(pi, 2.275)``, ``(3 pi, 2.475)``.
- LogSumExp (Boyd & Vandenberghe, eq. 9.20): ``log(e^{x+3y-0.1} + e^{x-3y-0.1} + e^{-x-0.1})``;
  ``1.5 log 2 - 0.1`` at ``(-log(2)/2, 0)``.
- Matyas: ``0.26 (x^2 + y^2) - 0.48 xy``; 0 at ``(0, 0)``.
- Michalewicz (m = 10) on ``[0, pi]^2``: ``-sin(x) sin^20(x^2/pi) - sin(y) sin^20(2 y^2/pi)``;
  ``-1.8013034...`` at ``(2.2029055..., pi/2)``. The function is defined on the box only (outside
  it, lower values exist), so the loss evaluates it at the point clamped into the box and adds
  the squared distance to the box.
- Rosenbrock: ``(1 - x)^2 + 100 (y - x^2)^2``; 0 at ``(1, 1)``.
- Styblinski-Tang: ``0.5 sum_i (x_i^4 - 16 x_i^2 + 5 x_i)``; ``-78.3323314...`` at
  ``x_i = -2.9035340...``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import Tensor

from lightning_lopt.tasks.base import Task, uniform

__all__ = ["Function2DTask", "FUNCTIONS_2D", "Function2D"]

_MICHALEWICZ_X1 = 2.2029055186862294
# max_x sin(x) sin^20(x^2/pi) on [0, pi]: the first coordinate's share of the global minimum.
_MICHALEWICZ_PEAK1 = 0.8013034100985525
_STYBLINSKI_X = -2.903534027771177  # root of 4x^3 - 32x + 5 = 0
_LOGSUMEXP_MIN = 1.5 * math.log(2.0) - 0.1


def _ackley(x: Tensor, y: Tensor, p: Tensor) -> Tensor:
    # -expm1(.) <= 0 arguments keep both terms >= 0 in floating point; vector_norm has a zero
    # (not NaN) gradient at the minimiser.
    radial = -torch.expm1(-0.2 * torch.linalg.vector_norm(p) / math.sqrt(2.0))
    periodic = -torch.expm1(0.5 * (torch.cos(2 * math.pi * x) + torch.cos(2 * math.pi * y)) - 1.0)
    return 20.0 * radial + math.e * periodic


def _beale(x: Tensor, y: Tensor, p: Tensor) -> Tensor:
    return (1.5 - x + x * y) ** 2 + (2.25 - x + x * y**2) ** 2 + (2.625 - x + x * y**3) ** 2


def _booth(x: Tensor, y: Tensor, p: Tensor) -> Tensor:
    return (x + 2 * y - 7) ** 2 + (2 * x + y - 5) ** 2


def _branin(x: Tensor, y: Tensor, p: Tensor) -> Tensor:
    # s (1 - t) cos x + s - 5/(4 pi) == s (1 - t) (1 + cos x) because s t = 5/(4 pi).
    b, c, s, t = 5.1 / (4 * math.pi**2), 5.0 / math.pi, 10.0, 1.0 / (8 * math.pi)
    return (y - b * x**2 + c * x - 6.0) ** 2 + s * (1 - t) * (1 + torch.cos(x))


def _logsumexp(x: Tensor, y: Tensor, p: Tensor) -> Tensor:
    terms = torch.stack([x + 3 * y - 0.1, x - 3 * y - 0.1, -x - 0.1])
    return torch.clamp_min(torch.logsumexp(terms, dim=0) - _LOGSUMEXP_MIN, 0.0)


def _matyas(x: Tensor, y: Tensor, p: Tensor) -> Tensor:
    # 0.26 (x^2 + y^2) - 0.48 xy written as a sum of squares.
    return 0.24 * (x - y) ** 2 + 0.02 * (x * x + y * y)


def _michalewicz(x: Tensor, y: Tensor, p: Tensor) -> Tensor:
    xc, yc = x.clamp(0.0, math.pi), y.clamp(0.0, math.pi)
    outside = (x - xc) ** 2 + (y - yc) ** 2
    first = torch.clamp_min(_MICHALEWICZ_PEAK1 - torch.sin(xc) * torch.sin(xc**2 / math.pi) ** 20, 0.0)
    second = 1.0 - torch.sin(yc) * torch.sin(2 * yc**2 / math.pi) ** 20
    return first + second + outside


def _styblinski_tang(x: Tensor, y: Tensor, p: Tensor) -> Tensor:
    # x^4 - 16x^2 + 5x - min == (x - x*)^2 ((x + x*)^2 + 2 x*^2 - 16), a product of non-negatives.
    s = _STYBLINSKI_X
    return 0.5 * ((p - s) ** 2 * ((p + s) ** 2 + (2 * s * s - 16.0))).sum()


def _rosenbrock(x: Tensor, y: Tensor, p: Tensor) -> Tensor:
    return (1 - x) ** 2 + 100.0 * (y - x * x) ** 2


class Function2D(NamedTuple):
    """A shifted 2-D test function.

    Attributes:
        fn: ``fn(x, y, p)`` with ``p = stack([x, y])``; the shifted loss.
        minimizer: A global minimiser (loss 0 there).
        minimum: The textbook global minimum value that was subtracted.
        box: Initialisation box ``((x_low, x_high), (y_low, y_high))``, the usual search domain.
    """

    fn: Callable[[Tensor, Tensor, Tensor], Tensor]
    minimizer: tuple[float, float]
    minimum: float
    box: tuple[tuple[float, float], tuple[float, float]]


FUNCTIONS_2D: dict[str, Function2D] = {
    "ackley": Function2D(_ackley, (0.0, 0.0), 0.0, ((-5.0, 5.0), (-5.0, 5.0))),
    "beale": Function2D(_beale, (3.0, 0.5), 0.0, ((-4.5, 4.5), (-4.5, 4.5))),
    "booth": Function2D(_booth, (1.0, 3.0), 0.0, ((-10.0, 10.0), (-10.0, 10.0))),
    "branin": Function2D(_branin, (math.pi, 2.275), 5.0 / (4 * math.pi), ((-5.0, 10.0), (0.0, 15.0))),
    "logsumexp": Function2D(_logsumexp, (-math.log(2.0) / 2, 0.0), _LOGSUMEXP_MIN, ((-2.0, 2.0), (-2.0, 2.0))),
    "matyas": Function2D(_matyas, (0.0, 0.0), 0.0, ((-10.0, 10.0), (-10.0, 10.0))),
    "michalewicz": Function2D(
        _michalewicz, (_MICHALEWICZ_X1, math.pi / 2), -1.0 - _MICHALEWICZ_PEAK1, ((0.0, math.pi), (0.0, math.pi))
    ),
    "rosenbrock": Function2D(_rosenbrock, (1.0, 1.0), 0.0, ((-2.0, 2.0), (-1.0, 3.0))),
    "styblinski_tang": Function2D(
        _styblinski_tang,
        (_STYBLINSKI_X, _STYBLINSKI_X),
        0.5 * 2 * (_STYBLINSKI_X**4 - 16 * _STYBLINSKI_X**2 + 5 * _STYBLINSKI_X),
        ((-5.0, 5.0), (-5.0, 5.0)),
    ),
}


class Function2DTask(Task):
    """One of the nine 2-D test functions, shifted so its global minimum is 0 (see module doc).

    The parameter is one tensor of shape ``(2,)``, initialised uniformly in the function's usual
    search box. The family name is the function's name (e.g. ``"rosenbrock"``); noisy versions are
    this task wrapped in :class:`~lightning_lopt.tasks.wrappers.GradientNoise`.

    Args:
        function: Name of the function, one of ``FUNCTIONS_2D``.
    """

    def __init__(self, function: str = "rosenbrock") -> None:
        if function not in FUNCTIONS_2D:
            raise ValueError(f"Unknown 2-D function {function!r}; valid: {sorted(FUNCTIONS_2D)}.")
        self.function = function
        self.family = function
        self._spec = FUNCTIONS_2D[function]

    def init_params(self, generator: torch.Generator) -> list[Tensor]:
        """A point drawn uniformly in the function's search box."""
        (x_lo, x_hi), (y_lo, y_hi) = self._spec.box
        x = uniform((1,), generator, x_lo, x_hi)
        y = uniform((1,), generator, y_lo, y_hi)
        return [torch.cat([x, y])]

    def loss(self, params: Sequence[Tensor], batch: Any = None) -> Tensor:
        """The shifted function value (>= 0, 0 at the global minimiser)."""
        p = params[0]
        return self._spec.fn(p[0], p[1], p)
