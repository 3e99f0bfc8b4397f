"""Training and evaluation: a seeded, deterministic `fit` with an LR-schedule hook, and `evaluate`."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import trange

from .data import Dataset
from .errors import WorkbenchError

__all__ = ["History", "Evaluation", "OPTIMIZERS", "fit", "evaluate", "predict", "show_progress"]

OPTIMIZERS = ("adam", "adamw", "sgd")


@dataclass
class History:
    """Per-epoch curves of one `fit` call (lists are aligned; index i is epoch i + 1)."""

    train_loss: list[float] = field(default_factory=list)
    train_acc: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_acc: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    @property
    def epochs(self) -> int:
        return len(self.train_loss)

    def to_dict(self) -> dict[str, list[float]]:
        return asdict(self)


@dataclass(frozen=True)
class Evaluation:
    """Mean cross-entropy loss and top-1 accuracy over `n` examples.

    Accuracy is counted, not averaged: `correct` of `n` examples, and `accuracy` is their exact
    ratio (a float32 mean of 0/1 flags is not: 342/360 comes out as 0.94999999 < 0.95).
    """

    loss: float
    correct: int
    n: int

    @property
    def accuracy(self) -> float:
        """``correct / n``, correctly rounded to the nearest double."""
        return self.correct / self.n

    @classmethod
    def from_logits(cls, logits: torch.Tensor, y: torch.Tensor) -> "Evaluation":
        """Loss and top-1 counts of `logits` (N, classes) against labels `y` (N,)."""
        return cls(loss=float(F.cross_entropy(logits, y)), correct=int((logits.argmax(1) == y).sum()), n=len(y))


def show_progress(progress: bool | None) -> bool:
    """Resolve a `progress` argument.

    None means: on in a terminal or a notebook, off in logs (stderr not a terminal) and in CI;
    the environment variable WORKBENCH_PROGRESS=0/1 overrides the guess.
    """
    if progress is not None:
        return bool(progress)
    env = os.environ.get("WORKBENCH_PROGRESS")
    if env is not None:
        return env.strip().lower() not in ("0", "false", "no", "")
    if os.environ.get("CI"):
        return False
    return "ipykernel" in sys.modules or sys.stderr.isatty()


@torch.no_grad()
def predict(model: nn.Module, X: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Logits of `model` on `X`, computed in eval mode in batches (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model(X[i:i + batch_size]) for i in range(0, len(X), batch_size)])
    finally:
        model.train(was_training)


def evaluate(model: nn.Module, X: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> Evaluation:
    """Loss and top-1 accuracy of `model` on (X, y).

    Example:
        >>> ev = evaluate(model, *data.split("test")); print(f"{ev.accuracy:.3f}")
    """
    if len(X) != len(y) or len(X) == 0:
        raise WorkbenchError(f"evaluate needs as many labels as inputs (got {len(X)} inputs, {len(y)} labels)")
    return Evaluation.from_logits(predict(model, X, batch_size), y)


def _optimizer(name: str, params, lr: float, weight_decay: float, momentum: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def _check_model(model: nn.Module, data: Dataset) -> None:
    x = data.X_train[:2]
    try:
        with torch.no_grad():
            out = model.eval()(x)
    except Exception as exc:
        raise WorkbenchError(
            f"the model failed on a batch of shape {tuple(x.shape)} from dataset {data.name!r}: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. "
            "Build it for this dataset's input_shape and num_classes."
        ) from exc
    if out.shape != (2, data.num_classes):
        raise WorkbenchError(
            f"the model returns shape {tuple(out.shape)} for 2 inputs; expected (2, {data.num_classes}) logits "
            f"for the {data.num_classes} classes of {data.name!r}"
        )


def fit(
    model: nn.Module,
    data: Dataset,
    *,
    epochs: int = 20,
    lr: float = 1e-3,
    batch_size: int = 64,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    lr_schedule: Callable[[int], float] | None = None,
    seed: int = 0,
    progress: bool | None = None,
    on_step: Callable[[nn.Module], None] | None = None,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> History:
    """Train `model` on `data`'s train split with cross-entropy; report val metrics every epoch.

    Same model weights, data and seed give bit-identical results: the shuffling and dropout use a
    generator seeded from `seed`, and the global RNG state is left untouched.

    Args:
        model: modified in place; left in eval mode.
        data: a :class:`workbench.data.Dataset`.
        epochs, lr, batch_size, weight_decay, momentum: the usual (momentum only for SGD).
        optimizer: "adam", "adamw" or "sgd".
        lr_schedule: the LR hook: a function of the optimizer step (0, 1, ...) returning the factor
            that multiplies `lr` at that step (``torch.optim.lr_scheduler.LambdaLR`` semantics);
            see ``workbench.schedules``. None keeps `lr` constant.
        seed: seeds shuffling and dropout.
        progress: a tqdm.auto bar per epoch; None shows it unless CI or WORKBENCH_PROGRESS=0.
        on_step: called with the model after every optimizer step (e.g. to re-apply pruning masks).
        loss: the training loss as a function of (logits, indices of the batch in the train split);
            default cross-entropy with the labels. Knowledge distillation plugs in here.

    Returns:
        The :class:`History` of losses, accuracies and learning rates per epoch.

    Example:
        >>> hist = fit(model, load("digits"), epochs=10, lr=1e-3)
    """
    if int(epochs) != epochs or epochs < 1:
        raise WorkbenchError(f"epochs must be a positive integer, got {epochs!r}")
    if not lr > 0:
        raise WorkbenchError(f"lr must be positive, got {lr!r}")
    if int(batch_size) != batch_size or batch_size < 1:
        raise WorkbenchError(f"batch_size must be a positive integer, got {batch_size!r}")
    if optimizer not in OPTIMIZERS:
        raise WorkbenchError(f"unknown optimizer {optimizer!r}; known: {', '.join(OPTIMIZERS)}")
    _check_model(model, data)

    opt = _optimizer(optimizer, model.parameters(), lr, weight_decay, momentum)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule) if lr_schedule is not None else None
    gen = torch.Generator().manual_seed(seed)
    X, y = data.X_train, data.y_train
    hist = History()
    bar = trange(int(epochs), desc=f"{'train' if loss is None else 'distill'} {type(model).__name__}",
                 disable=not show_progress(progress), leave=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # dropout and any other in-model randomness
        for _ in bar:
            t0 = time.perf_counter()
            model.train()
            perm = torch.randperm(len(X), generator=gen)
            total_loss, correct = 0.0, 0
            for i in range(0, len(X), batch_size):
                idx = perm[i:i + batch_size]
                logits = model(X[idx])
                batch_loss = F.cross_entropy(logits, y[idx]) if loss is None else loss(logits, idx)
                opt.zero_grad(set_to_none=True)
                batch_loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
                if on_step is not None:
                    on_step(model)
                total_loss += batch_loss.item() * len(idx)
                correct += int((logits.argmax(1) == y[idx]).sum())
            val = evaluate(model, data.X_val, data.y_val)
            hist.train_loss.append(total_loss / len(X))
            hist.train_acc.append(correct / len(X))
            hist.val_loss.append(val.loss)
            hist.val_acc.append(val.accuracy)
            hist.lr.append(opt.param_groups[0]["lr"])
            hist.seconds.append(time.perf_counter() - t0)
            bar.set_postfix(loss=f"{hist.train_loss[-1]:.3f}", val_acc=f"{val.accuracy:.3f}")
    model.eval()
    return hist
