"""What the server serves: a loaded ONNX model, and where it comes from (a registry alias or a file)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import WorkbenchError

__all__ = ["LoadedModel", "ModelSource", "RegistrySource", "FileSource"]


@dataclass
class LoadedModel:
    """One ONNX model ready to serve: its session and what it is."""

    name: str
    version: int | str
    path: str
    sha256: str
    recipe: dict[str, Any]
    session: Any
    input_shape: tuple[int, ...]
    num_classes: int
    class_share: list[float] | None = None
    description: str = ""
    loaded_at: float = field(default_factory=time.time)

    @classmethod
    def from_file(cls, path: str | os.PathLike, *, name: str, version: int | str, sha256: str,
                  recipe: dict[str, Any] | None = None, class_share: list[float] | None = None,
                  description: str = "", threads: int = 1) -> "LoadedModel":
        """Open an ONNX Runtime session and check it on one batch of zeros (a broken file fails here)."""
        from .. import onnx as wonnx

        sess = wonnx.session(path, threads=threads)
        inp = sess.get_inputs()[0]
        shape = tuple(inp.shape[1:])
        if not all(isinstance(d, int) and d > 0 for d in shape):
            raise WorkbenchError(f"{name}/{version}: the model's input shape {inp.shape} must be fixed except the "
                                 f"batch axis")
        try:
            out = sess.run(None, {inp.name: np.zeros((1, *shape), np.float32)})[0]
        except Exception as exc:
            raise WorkbenchError(f"{name}/{version} does not run on a batch of zeros: "
                                 f"{str(exc).splitlines()[0][:200]}") from None
        if out.ndim != 2:
            raise WorkbenchError(f"{name}/{version}: expected logits of shape (batch, classes), got {out.shape}")
        return cls(name=name, version=version, path=str(path), sha256=sha256, recipe=recipe or {}, session=sess,
                   input_shape=shape, num_classes=int(out.shape[1]), class_share=class_share,
                   description=description)

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.session.get_inputs()[0].name: x})[0]

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "sha256": self.sha256, "recipe": self.recipe,
                "input_shape": list(self.input_shape), "num_classes": self.num_classes,
                "description": self.description, "path": self.path,
                "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.loaded_at))}


class ModelSource(Protocol):
    """Where the server's model comes from: a registry alias (hot-swappable) or a fixed file."""

    def describe(self) -> str: ...

    def current(self) -> str: ...

    def load(self, threads: int) -> LoadedModel: ...


class RegistrySource:
    """``NAME@ALIAS`` (or ``NAME/VERSION``) in a :class:`~workbench.serve.registry.Registry`."""

    def __init__(self, ref: str, *, registry: Any = None, uri: str | None = None) -> None:
        from .registry import Registry, parse_ref

        parse_ref(ref)
        self.ref = ref
        self.registry = registry if registry is not None else Registry(uri)

    def describe(self) -> str:
        return f"{self.ref} in {self.registry.uri}"

    def current(self) -> str:
        return str(self.registry.resolve(self.ref).version)

    def load(self, threads: int = 1) -> LoadedModel:
        path, v = self.registry.load(self.ref)
        return LoadedModel.from_file(path, name=v.name, version=v.version, sha256=v.sha256, recipe=v.recipe,
                                     class_share=v.class_share, description=v.description, threads=threads)


class FileSource:
    """A bare ONNX file (no registry); it is swapped when its bytes change."""

    def __init__(self, path: str | os.PathLike, *, name: str | None = None) -> None:
        self.path = Path(path)
        self.name = name or self.path.stem
        if not self.path.is_file():
            raise WorkbenchError(f"ONNX file {str(self.path)!r} does not exist")

    def describe(self) -> str:
        return str(self.path)

    def current(self) -> str:
        from .registry import sha256_file

        return sha256_file(self.path)

    def load(self, threads: int = 1) -> LoadedModel:
        sha = self.current()
        return LoadedModel.from_file(self.path, name=self.name, version=sha[:12], sha256=sha, threads=threads)
