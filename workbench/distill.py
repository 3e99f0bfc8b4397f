"""Knowledge distillation (Hinton et al. 2015): the temperature-softened KD loss and a distillation loop."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .data import Dataset
from .errors import WorkbenchError
from .train import History, _check_model, fit, predict

__all__ = ["kd_loss", "distill"]


def _check(temperature: float, alpha: float) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise WorkbenchError(f"temperature must be > 0 (1 = plain softmax, 2-20 typical), got {temperature!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise WorkbenchError(f"alpha (weight of the soft-target loss) must be in [0, 1], got {alpha!r}")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
            temperature: float, alpha: float) -> torch.Tensor:
    """Hinton's loss: ``alpha * T^2 * KL(softmax(z_t/T) || softmax(z_s/T)) + (1 - alpha) * CE(z_s, y)``.

    The soft-target term's gradients scale as 1/T^2, so it is multiplied by T^2 to keep its
    weight against the hard-label term the same whatever the temperature. The KL divergence is
    averaged over the batch (``reduction="batchmean"``, the mathematically correct mean).

    Example:
        >>> loss = kd_loss(student(x), teacher(x), y, temperature=4.0, alpha=0.9)
    """
    _check(temperature, alpha)
    t = float(temperature)
    soft = F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                    reduction="batchmean", log_target=True)
    hard = F.cross_entropy(student_logits, labels)
    return alpha * t * t * soft + (1.0 - alpha) * hard


def distill(student: nn.Module, teacher: nn.Module, data: Dataset, *, temperature: float = 4.0,
            alpha: float = 0.9, **fit_kwargs: Any) -> History:
    """Train `student` on `data` with :func:`kd_loss` against a frozen `teacher`.

    It is :func:`workbench.train.fit` with the KD loss plugged in, so it is just as deterministic
    (same seed, same numbers) and takes the same settings (epochs, lr, optimizer, ...). The
    teacher's logits are computed once for the whole train split: it is frozen, so they never change.

    Returns:
        The student's :class:`~workbench.train.History` (its train loss is the KD loss).

    Example:
        >>> hist = distill(student, teacher, load("digits"), temperature=4, alpha=0.9, epochs=20)
    """
    _check(temperature, alpha)
    _check_model(teacher, data)
    teacher_logits = predict(teacher, data.X_train)
    y = data.y_train
    return fit(student, data, **fit_kwargs, loss=lambda logits, idx: kd_loss(
        logits, teacher_logits[idx], y[idx], temperature=temperature, alpha=alpha))
