"""Model zoo: mlp, lenet300 (LeNet-300-100), lenet5 (Caffe LeNet), cnn (with/without BN), vit; checkpoints."""

from __future__ import annotations

import inspect
import os
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .errors import WorkbenchError

__all__ = [
    "MODELS",
    "MLP",
    "LeNet5",
    "CNN",
    "Attention",
    "ViT",
    "build",
    "width_options",
    "save_checkpoint",
    "load_checkpoint",
]

CHECKPOINT_FORMAT = "workbench-checkpoint/1"


class MLP(nn.Module):
    """Flatten, then Linear+ReLU blocks, then a Linear classifier."""

    def __init__(self, in_features: int, num_classes: int, hidden: tuple[int, ...], dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LeNet5(nn.Module):
    """The Caffe LeNet-5 used by Deep Compression: conv5(20)-pool-conv5(50)-pool-fc500-fc10 (431K params on 28x28)."""

    def __init__(self, in_channels: int, num_classes: int, spatial: tuple[int, int],
                 channels: tuple[int, int] = (20, 50), hidden: int = 500):
        super().__init__()
        # 5x5 valid conv (-4), 2x2 pool (/2), twice.
        h, w = (((s - 4) // 2 - 4) // 2 for s in spatial)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, channels[0], 5), nn.MaxPool2d(2),
            nn.Conv2d(channels[0], channels[1], 5), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(channels[1] * h * w, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class CNN(nn.Module):
    """Two conv blocks (3x3 conv, optional BatchNorm, ReLU, 2x2 max-pool) and two Linear layers."""

    def __init__(self, in_channels: int, num_classes: int, spatial: tuple[int, int],
                 channels: tuple[int, int] = (32, 64), hidden: int = 128, batchnorm: bool = True):
        super().__init__()
        blocks: list[nn.Module] = []
        c_in = in_channels
        for c in channels:
            # A conv followed by BN needs no bias: BN's shift replaces it (and BN folding restores it).
            blocks += [nn.Conv2d(c_in, c, 3, padding=1, bias=not batchnorm)]
            if batchnorm:
                blocks.append(nn.BatchNorm2d(c))
            blocks += [nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c
        self.features = nn.Sequential(*blocks)
        h, w = (s // 2 ** len(channels) for s in spatial)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c_in * h * w, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class Attention(nn.Module):
    """Multi-head self-attention written out with matmuls, so MACs and quantization see every product."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * (self.head_dim ** -0.5)
        out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """A tiny pre-norm vision transformer: patch embedding, class token, learned positions, `depth` blocks."""

    def __init__(self, in_channels: int, num_classes: int, spatial: tuple[int, int], patch_size: int,
                 dim: int = 64, depth: int = 2, heads: int = 4, mlp_ratio: int = 2):
        super().__init__()
        num_patches = (spatial[0] // patch_size) * (spatial[1] // patch_size)
        self.patch = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, num_patches + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[_Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def _mlp(c: int, h: int, w: int, num_classes: int, hidden: tuple[int, ...] = (256, 128), dropout: float = 0.0):
    if not hidden or any(int(n) < 1 for n in hidden):
        raise WorkbenchError(f"mlp hidden sizes must be positive integers, got {hidden!r}")
    if not 0.0 <= dropout < 1.0:
        raise WorkbenchError(f"mlp dropout must be in [0, 1), got {dropout}")
    return MLP(c * h * w, num_classes, tuple(int(n) for n in hidden), dropout)


def _lenet300(c: int, h: int, w: int, num_classes: int, hidden: tuple[int, int] = (300, 100)):
    # `hidden` exists so that a structurally pruned LeNet-300-100 can be rebuilt from its checkpoint.
    return _mlp(c, h, w, num_classes, hidden=hidden)


def _lenet5(c: int, h: int, w: int, num_classes: int, channels: tuple[int, int] = (20, 50), hidden: int = 500):
    if min(h, w) < 16:
        raise WorkbenchError(
            f"lenet5 needs images of at least 16x16 (two 5x5 convs and two 2x2 pools); got {h}x{w}. "
            "Use dataset 'digits28' (the digits resized to 28x28) or mnist."
        )
    return LeNet5(c, num_classes, (h, w), tuple(int(n) for n in channels), int(hidden))


def _cnn(c: int, h: int, w: int, num_classes: int, batchnorm: bool = True,
         channels: tuple[int, int] = (32, 64), hidden: int = 128):
    if min(h, w) < 4:
        raise WorkbenchError(f"cnn needs images of at least 4x4 (two 2x2 pools); got {h}x{w}")
    return CNN(c, num_classes, (h, w), tuple(int(n) for n in channels), int(hidden), bool(batchnorm))


def _vit(c: int, h: int, w: int, num_classes: int, patch_size: int | None = None,
         dim: int = 64, depth: int = 2, heads: int = 4, mlp_ratio: int = 2):
    patch = patch_size or (2 if max(h, w) <= 16 else 4)
    if h % patch or w % patch:
        raise WorkbenchError(f"vit patch_size {patch} must divide the image size {h}x{w}")
    if dim % heads:
        raise WorkbenchError(f"vit dim ({dim}) must be divisible by heads ({heads})")
    return ViT(c, num_classes, (h, w), patch, dim, depth, heads, mlp_ratio)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": _mlp,
    "lenet300": _lenet300,
    "lenet5": _lenet5,
    "cnn": _cnn,
    "vit": _vit,
}


def width_options(model: nn.Module) -> dict[str, Any]:
    """The width options of a zoo model as it is now (e.g. after structured pruning removed channels).

    ``build(name, **options | width_options(model))`` rebuilds a model of the same shape, which
    is how checkpoints of structurally pruned models are loaded.
    """
    if isinstance(model, MLP):
        linears = [m for m in model.net if isinstance(m, nn.Linear)]
        return {"hidden": tuple(m.out_features for m in linears[:-1])}
    if isinstance(model, (CNN, LeNet5)):
        convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
        return {"channels": tuple(m.out_channels for m in convs), "hidden": model.classifier[1].out_features}
    return {}


def build(name: str, *, input_shape: tuple[int, int, int], num_classes: int, seed: int = 0,
          **options: Any) -> nn.Module:
    """Build a model of the zoo for images of `input_shape` (C, H, W) and `num_classes` classes.

    Args:
        name: one of ``MODELS`` (mlp, lenet300, lenet5, cnn, vit).
        input_shape: (channels, height, width) of one image, e.g. ``dataset.input_shape``.
        num_classes: number of output logits, e.g. ``dataset.num_classes``.
        seed: seeds the weight initialization, so the same call gives the same weights.
        **options: model-specific settings (mlp: hidden, dropout; lenet300: hidden; lenet5: channels,
            hidden; cnn: batchnorm, channels, hidden; vit: patch_size, dim, depth, heads, mlp_ratio).

    Returns:
        The model in eval mode.

    Example:
        >>> m = build("cnn", input_shape=(1, 8, 8), num_classes=10, batchnorm=False)
    """
    key = str(name).lower()
    if key not in MODELS:
        raise WorkbenchError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    if len(tuple(input_shape)) != 3 or any(int(s) < 1 for s in input_shape):
        raise WorkbenchError(f"input_shape must be (channels, height, width) of positive ints, got {input_shape!r}")
    if int(num_classes) < 2:
        raise WorkbenchError(f"num_classes must be at least 2, got {num_classes}")
    builder = MODELS[key]
    allowed = [p for p in inspect.signature(builder).parameters if p not in ("c", "h", "w", "num_classes")]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise WorkbenchError(
            f"unknown option(s) {', '.join(unknown)} for model {key!r}; "
            f"allowed: {', '.join(allowed) if allowed else 'none'}"
        )
    c, h, w = (int(s) for s in input_shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = builder(c, h, w, int(num_classes), **options)
    return model.eval()


def save_checkpoint(path: str | os.PathLike, model: nn.Module, *, spec: dict[str, Any],
                    metadata: dict[str, Any] | None = None) -> Path:
    """Write `model` with the spec needed to rebuild it, atomically, in a `weights_only`-safe format.

    Args:
        path: destination file (conventionally ``*.pt``).
        model: a model built by :func:`build`.
        spec: ``{"name", "input_shape", "num_classes", "options"}``: the arguments of :func:`build`.
        metadata: plain JSON-like extras (dataset, metrics, recipe).

    Returns:
        The path written.
    """
    path = Path(path)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "spec": {
            "name": spec["name"],
            "input_shape": [int(s) for s in spec["input_shape"]],
            "num_classes": int(spec["num_classes"]),
            "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in spec.get("options", {}).items()},
        },
        "metadata": metadata or {},
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Load a checkpoint written by :func:`save_checkpoint` (with ``torch.load(weights_only=True)``).

    Returns:
        ``(model, info)`` where info holds ``spec`` and ``metadata``.

    Raises:
        WorkbenchError: the file is missing, not a torch file, or not a workbench checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise WorkbenchError(f"checkpoint {str(path)!r} does not exist (expected a file written by `workbench train`)")
    if not zipfile.is_zipfile(path):
        raise WorkbenchError(
            f"{str(path)!r} is not a workbench checkpoint: it is not a PyTorch file at all "
            "(torch.save writes a zip archive); expected a file written by `workbench train`"
        )
    try:
        # weights_only=True: a checkpoint is data, never code; a pickle with code is refused.
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for foreign files
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise WorkbenchError(
            f"{str(path)!r} is not a workbench checkpoint: torch.load(weights_only=True) refused it "
            f"(it holds Python objects other than tensors and plain data, which could run code "
            f"when loaded; {type(exc).__name__}: {reason})"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise WorkbenchError(
            f"{str(path)!r} is a torch file but not a workbench checkpoint (no '{CHECKPOINT_FORMAT}' header); "
            "write one with `workbench train` or workbench.models.save_checkpoint"
        )
    spec = payload["spec"]
    options = {k: (tuple(v) if isinstance(v, list) else v) for k, v in spec.get("options", {}).items()}
    model = build(spec["name"], input_shape=tuple(spec["input_shape"]), num_classes=spec["num_classes"], **options)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise WorkbenchError(f"{str(path)!r}: weights do not fit model {spec['name']!r}: {str(exc)[:300]}") from None
    return model.eval(), {"spec": {**spec, "options": options}, "metadata": payload.get("metadata", {})}
