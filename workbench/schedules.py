"""Learning-rate decay as pure functions of the optimizer step, and their adapter to ``LambdaLR``.

Every schedule gives the LR at step ``t`` (0, 1, ..., one step per optimizer update) from the base
LR ``lr_0``; an optional linear warmup runs first and the decay then starts from step 0 of its own:

* ``constant``:    ``lr_t = lr_0``
* ``step``:        ``lr_t = lr_0 * gamma ** floor(t / step_size)``                   (``StepLR``)
* ``exponential``: ``lr_t = lr_0 * gamma ** t``                                       (``ExponentialLR``)
* ``cosine``:      ``lr_t = lr_min + (lr_0 - lr_min) (1 + cos(pi t / T)) / 2``        (``CosineAnnealingLR``)
* ``polynomial``:  ``lr_t = lr_0 (1 - t / T) ** power``                               (``PolynomialLR``)
* warmup:          ``lr_t = lr_0 (s + (1 - s) t / W)`` for ``t < W``                   (``LinearLR``, then
  ``SequentialLR`` hands over to the decay at step ``W``)

``T`` is the number of decay steps (``total_steps - warmup_steps``); past it cosine and
polynomial hold their final value. Each formula equals its ``torch.optim.lr_scheduler``
counterpart within 1e-12 at every step (``tests/test_schedules.py``). Cosine annealing is from
SGDR (Loshchilov & Hutter 2017); the polynomial decay is the seed's formula.

Example:
    >>> s = Schedule("cosine", total_steps=100, warmup_steps=10)
    >>> fit(model, data, lr=0.1, lr_schedule=s.factor)   # LambdaLR semantics: a factor of lr
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from .errors import WorkbenchError

__all__ = ["KINDS", "Schedule", "lr_at", "steps_per_epoch", "from_epochs", "lambda_lr", "torch_reference"]

KINDS = ("constant", "step", "exponential", "cosine", "polynomial")


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise WorkbenchError(f"schedule {name} must be a finite number, got {value!r}")
    return float(value)


def _integer(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise WorkbenchError(f"schedule {name} must be an integer, got {value!r}")
    return value


@dataclass(frozen=True)
class Schedule:
    """One LR schedule: the kind, its length in optimizer steps and its settings (validated).

    Args:
        kind: one of ``KINDS``.
        total_steps: optimizer steps of the whole run, warmup included (> 0).
        gamma: the decay factor of ``step`` and ``exponential`` (in (0, 1]).
        step_size: steps between two decays of ``step`` (default: a third of the decay steps).
        power: the exponent of ``polynomial`` (> 0; 1 is linear decay).
        min_lr_ratio: ``lr_min / lr_0`` of ``cosine`` (in [0, 1]).
        warmup_steps: steps of linear warmup before the decay (0 <= warmup < total_steps).
        warmup_start: the warmup's first factor ``s`` (in (0, 1]); torch's LinearLR needs s > 0.

    Example:
        >>> Schedule("step", total_steps=90, gamma=0.1, step_size=30).factor(45)
        0.1
    """

    kind: str
    total_steps: int
    gamma: float = 0.1
    step_size: int | None = None
    power: float = 1.0
    min_lr_ratio: float = 0.0
    warmup_steps: int = 0
    warmup_start: float = 0.1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise WorkbenchError(f"unknown LR schedule {self.kind!r}; known: {', '.join(KINDS)}")
        if _integer("total_steps", self.total_steps) <= 0:
            raise WorkbenchError(f"schedule total_steps must be > 0 (optimizer steps of the run), got {self.total_steps}")
        if _integer("warmup_steps", self.warmup_steps) < 0 or self.warmup_steps >= self.total_steps:
            raise WorkbenchError(f"schedule warmup_steps must be in [0, total_steps) = [0, {self.total_steps}), "
                                 f"got {self.warmup_steps}")
        gamma = _number("gamma", self.gamma)
        if not 0.0 < gamma <= 1.0:
            raise WorkbenchError(f"schedule gamma (the decay factor) must be in (0, 1], got {self.gamma!r}; "
                                 "a negative or zero rate is not a decay")
        if _number("power", self.power) <= 0:
            raise WorkbenchError(f"schedule power must be > 0 (1 = linear decay), got {self.power!r}")
        if not 0.0 <= _number("min_lr_ratio", self.min_lr_ratio) <= 1.0:
            raise WorkbenchError(f"schedule min_lr_ratio (lr_min / lr_0) must be in [0, 1], got {self.min_lr_ratio!r}")
        if not 0.0 < _number("warmup_start", self.warmup_start) <= 1.0:
            raise WorkbenchError(f"schedule warmup_start must be in (0, 1], got {self.warmup_start!r}")
        if self.step_size is not None and _integer("step_size", self.step_size) <= 0:
            raise WorkbenchError(f"schedule step_size must be > 0 steps, got {self.step_size}")

    @property
    def decay_steps(self) -> int:
        """Steps of the decay part (after the warmup)."""
        return self.total_steps - self.warmup_steps

    @property
    def effective_step_size(self) -> int:
        return self.step_size if self.step_size is not None else max(1, self.decay_steps // 3)

    def factor(self, step: int) -> float:
        """``lr_t / lr_0`` at optimizer step `step` (the ``LambdaLR`` lambda)."""
        if step < 0:
            raise WorkbenchError(f"step must be >= 0, got {step}")
        w = self.warmup_steps
        if step < w:
            return self.warmup_start + (1.0 - self.warmup_start) * step / w
        t = step - w
        T = self.decay_steps
        if self.kind == "constant":
            return 1.0
        if self.kind == "step":
            return self.gamma ** (t // self.effective_step_size)
        if self.kind == "exponential":
            return self.gamma ** t
        if self.kind == "cosine":
            t = min(t, T)
            return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * (1.0 + math.cos(math.pi * t / T)) / 2.0
        return (1.0 - min(t, T) / T) ** self.power  # polynomial

    def lr(self, step: int, base_lr: float) -> float:
        """The learning rate at `step` for base LR `base_lr`."""
        return base_lr * self.factor(step)

    def curve(self, base_lr: float = 1.0) -> list[float]:
        """The LR at every step 0..total_steps - 1."""
        return [self.lr(t, base_lr) for t in range(self.total_steps)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def lr_at(kind: str, step: int, *, base_lr: float, total_steps: int, **settings: Any) -> float:
    """The LR of schedule `kind` at `step` (a one-call form of :class:`Schedule`).

    Example:
        >>> lr_at("polynomial", 50, base_lr=0.1, total_steps=100, power=2.0)
        0.025
    """
    if _number("base_lr", base_lr) <= 0:
        raise WorkbenchError(f"base_lr must be positive, got {base_lr!r}")
    return Schedule(kind, total_steps, **settings).lr(step, base_lr)


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """Optimizer steps in one epoch of ``fit`` (the last, smaller batch is a step too)."""
    if n_train < 1 or batch_size < 1:
        raise WorkbenchError(f"need n_train >= 1 and batch_size >= 1, got {n_train} and {batch_size}")
    return -(-n_train // batch_size)


def from_epochs(kind: str, *, epochs: int, steps_per_epoch: int, step_epochs: int | None = None,
                warmup_epochs: int = 0, **settings: Any) -> Schedule:
    """A :class:`Schedule` whose lengths are given in epochs (as a Recipe gives them).

    Args:
        kind: one of ``KINDS``.
        epochs, steps_per_epoch: the run's length.
        step_epochs: epochs between two decays of ``step``.
        warmup_epochs: epochs of linear warmup.
        **settings: ``gamma``, ``power``, ``min_lr_ratio``, ``warmup_start``.

    Example:
        >>> from_epochs("step", epochs=30, steps_per_epoch=23, step_epochs=10).step_size
        230
    """
    known = {"gamma", "power", "min_lr_ratio", "warmup_start"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise WorkbenchError(f"unknown schedule option(s) {', '.join(unknown)}; known: "
                             f"{', '.join(sorted(known | {'step_epochs', 'warmup_epochs'}))}")
    if _integer("epochs", epochs) <= 0:
        raise WorkbenchError(f"a schedule needs epochs > 0, got {epochs}")
    # Said in the units the caller used (epochs), before they become steps.
    if not 0 <= _integer("warmup_epochs", warmup_epochs) < epochs:
        raise WorkbenchError(f"warmup_epochs must be in [0, epochs) = [0, {epochs}), got {warmup_epochs}")
    if step_epochs is not None and _integer("step_epochs", step_epochs) < 1:
        raise WorkbenchError(f"step_epochs must be >= 1, got {step_epochs}")
    return Schedule(kind, total_steps=epochs * steps_per_epoch, warmup_steps=_integer("warmup_epochs",
                    warmup_epochs) * steps_per_epoch,
                    step_size=None if step_epochs is None else _integer("step_epochs", step_epochs) * steps_per_epoch,
                    **settings)


def lambda_lr(schedule: Schedule, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``torch.optim.lr_scheduler.LambdaLR`` that follows `schedule` (call ``.step()`` after each update)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.factor)


def torch_reference(schedule: Schedule, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """torch's own scheduler(s) for `schedule`: the trusted reference the formulas are tested against.

    ``constant`` is ``ConstantLR(factor=1)``; a warmup is ``LinearLR`` then the decay, joined by
    ``SequentialLR`` at ``milestones=[warmup_steps]``.
    """
    S = torch.optim.lr_scheduler
    T = schedule.decay_steps
    decay: Callable[[], S.LRScheduler] = {
        "constant": lambda: S.ConstantLR(optimizer, factor=1.0, total_iters=0),
        "step": lambda: S.StepLR(optimizer, step_size=schedule.effective_step_size, gamma=schedule.gamma),
        "exponential": lambda: S.ExponentialLR(optimizer, gamma=schedule.gamma),
        "cosine": lambda: S.CosineAnnealingLR(optimizer, T_max=T,
                                              eta_min=schedule.min_lr_ratio * optimizer.defaults["lr"]),
        "polynomial": lambda: S.PolynomialLR(optimizer, total_iters=T, power=schedule.power),
    }[schedule.kind]
    if not schedule.warmup_steps:
        return decay()
    warm = S.LinearLR(optimizer, start_factor=schedule.warmup_start, end_factor=1.0,
                      total_iters=schedule.warmup_steps)
    return S.SequentialLR(optimizer, [warm, decay()], milestones=[schedule.warmup_steps])
