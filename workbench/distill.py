"""Knowledge distillation (Hinton et al. 2015): temperature-softened targets, the KD loss and a distillation loop."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .data import Dataset
from .errors import WorkbenchError
from .train import History, _check_model, fit, predict

__all__ = ["soft_targets", "kd_loss", "distill"]


def _check_temperature(temperature: float) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0 \
            or temperature == float("inf"):
        raise WorkbenchError(f"temperature must be a finite number > 0 (1 = plain softmax, 2-20 typical), "
                             f"got {temperature!r}")
    return float(temperature)


def _check(temperature: float, alpha: float) -> None:
    _check_temperature(temperature)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise WorkbenchError(f"alpha (weight of the soft-target loss) must be in [0, 1], got {alpha!r}")


def soft_targets(logits: torch.Tensor, *, temperature: float) -> torch.Tensor:
    """The temperature-softened probabilities ``softmax(z / T)`` along the last dimension.

    T = 1 is the ordinary softmax; a larger T flattens the distribution and so shows how the
    model ranks the wrong classes (the "dark knowledge" a student learns from).

    Example:
        >>> soft_targets(torch.tensor([4.0, 1.0, 0.0]), temperature=4.0)
        tensor([0.5434, 0.2567, 0.1999])
    """
    return torch.softmax(logits / _check_temperature(temperature), dim=-1)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
            temperature: float, alpha: float) -> torch.Tensor:
    """Hinton's loss: ``alpha * T^2 * KL(softmax(z_t/T) || softmax(z_s/T)) + (1 - alpha) * CE(z_s, y)``.

    The soft-target term's gradients scale as 1/T^2, so it is multiplied by T^2 to keep its
    weight against the hard-label term the same whatever the temperature. The KL divergence is
    summed over classes and averaged over the batch (``reduction="batchmean"``, the mathematically
    correct mean); the cross-entropy is averaged over the batch.

    Args:
        student_logits, teacher_logits: ``(batch, classes)`` raw outputs (before softmax).
        labels: ``(batch,)`` class indices.
        temperature: T > 0 (1 = plain softmax; Hinton et al. used up to 20).
        alpha: weight of the soft-target term in [0, 1]; 0 is plain cross-entropy.

    Returns:
        The scalar loss.

    Example:
        >>> loss = kd_loss(student(x), teacher(x), y, temperature=4.0, alpha=0.9)
    """
    _check(temperature, alpha)
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise WorkbenchError(f"student and teacher logits must both be (batch, classes); got "
                             f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
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
    teacher's logits are computed once, in eval mode, for the whole train split: it is frozen, so
    they never change. The teacher itself is left as it was (weights and train/eval mode).

    Args:
        student: trained in place; left in eval mode.
        teacher: a trained model for the same inputs and classes.
        data: a :class:`workbench.data.Dataset`; the train split is the transfer set.
        temperature, alpha: as in :func:`kd_loss`.
        **fit_kwargs: passed to :func:`workbench.train.fit` (epochs, lr, seed, ...).

    Returns:
        The student's :class:`~workbench.train.History` (its train loss is the KD loss).

    Example:
        >>> hist = distill(student, teacher, load("digits"), temperature=4, alpha=0.9, epochs=20)
    """
    _check(temperature, alpha)
    if "loss" in fit_kwargs:
        raise WorkbenchError("distill sets fit's `loss` itself (the KD loss); call fit() for a custom loss")
    was_training = teacher.training
    try:
        _check_model(teacher, data)
        teacher_logits = predict(teacher, data.X_train)
    finally:
        teacher.train(was_training)
    y = data.y_train
    return fit(student, data, **fit_kwargs, loss=lambda logits, idx: kd_loss(
        logits, teacher_logits[idx], y[idx], temperature=temperature, alpha=alpha))
