"""A model registry on MLflow: register ONNX models with their recipe and metrics, aliases, promote, rollback.

By default the registry is a SQLite file and an artifact folder under the workbench's data folder
(``$WORKBENCH_CACHE/registry``, or ``$WORKBENCH_REGISTRY``); ``$WORKBENCH_REGISTRY_URI`` (or the
``uri`` argument) points it elsewhere: a folder (``/srv/registry`` or ``file:///srv/registry``: a
SQLite registry inside it), ``sqlite:///PATH.db``, or an MLflow tracking server such as
``http://mlflow:5000``. MLflow's telemetry is switched off before it is imported. Every version
carries the sha256 of its ONNX file; :meth:`Registry.load` recomputes it and refuses a file that
was changed or removed, and promote and rollback verify it before they move the champion alias.

Writes to a local SQLite registry are serialized with a file lock, so several processes
registering at once lose nothing (SQLite alone would answer "database is locked" or hand two
processes the same version number).

Example:
    >>> reg = Registry(root="/tmp/registry")
    >>> v = reg.register_result(wb.run(Recipe(model="mlp", epochs=40)), name="digits-mlp")
    >>> reg.promote("digits-mlp", v.version)          # alias "champion" -> this version
    >>> path, v = reg.load("digits-mlp@champion")     # sha256 checked
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import time
import urllib.parse
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import numpy as np

from . import quiet_mlflow
from ..errors import WorkbenchError

if TYPE_CHECKING:
    from ..recipe import Result

__all__ = ["Registry", "ModelVersion", "default_uri", "tracking_uri", "parse_ref", "sha256_file", "check_name", "CHAMPION",
           "CHALLENGER"]

CHAMPION = "champion"
CHALLENGER = "challenger"
EXPERIMENT = "workbench"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
_ALIAS = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,62}$")


def check_name(name: Any) -> str:
    """`name` if it is a valid registered-model name (1-100 letters, digits, ``_.-``), else a WorkbenchError."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise WorkbenchError(f"model names are 1-100 letters, digits, '_', '.' or '-', starting with a letter "
                             f"or digit; got {name!r}")
    return name
_HISTORY_TAG = "workbench.champion_history"
# MLflow tracking servers and databases, passed through as they are (the "+driver" part aside).
_SERVER_SCHEMES = ("http", "https", "postgresql", "mysql", "mssql", "databricks", "databricks-uc", "uc")
_EXPECTED_URI = ("a folder path, file:///FOLDER, sqlite:///PATH.db or an MLflow tracking server "
                 "(http://HOST:PORT, postgresql://...)")


@contextlib.contextmanager
def _quiet_eprint() -> Iterator[None]:
    """Drop MLflow's "Successfully registered model" / "Created version" lines (printed to stderr, not logged)."""
    import io
    import sys

    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        yield
    for line in buf.getvalue().splitlines():
        if line and not line.startswith(("Successfully registered model", "Created version",
                                         "Registered model '")):
            print(line, file=sys.stderr)


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, as hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_uri() -> str:
    """$WORKBENCH_REGISTRY_URI, else a SQLite file in $WORKBENCH_REGISTRY or <workbench cache>/registry."""
    if os.environ.get("WORKBENCH_REGISTRY_URI"):
        return os.environ["WORKBENCH_REGISTRY_URI"]
    from ..recipe import cache_dir

    root = Path(os.environ.get("WORKBENCH_REGISTRY") or cache_dir() / "registry")
    return f"sqlite:///{root.resolve() / 'mlflow.db'}"


def tracking_uri(uri: str) -> str:
    """The MLflow tracking URI for a registry location: a folder or ``file://`` URI becomes its SQLite file.

    MLflow 3 refuses its file store, so a folder means the workbench's own layout: ``mlflow.db`` and
    ``artifacts/`` inside it. A path ending in ``.db`` (or naming an existing file) is the SQLite file itself.

    Raises:
        WorkbenchError: an empty URI or a scheme MLflow cannot use as a registry.

    Example:
        >>> tracking_uri("/srv/registry")
        'sqlite:////srv/registry/mlflow.db'
    """
    if not isinstance(uri, str) or not uri.strip():
        raise WorkbenchError(f"the registry URI is empty; expected {_EXPECTED_URI}")
    uri = uri.strip()
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if scheme.split("+", 1)[0] in ("sqlite", *_SERVER_SCHEMES) or uri.split(":", 1)[0] in _SERVER_SCHEMES:
        return uri
    if scheme == "file":
        parsed = urllib.parse.urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise WorkbenchError(f"the registry URI {uri!r} names another host ({parsed.netloc}); expected "
                                 f"{_EXPECTED_URI}")
        path = Path(urllib.parse.unquote(parsed.path))
    elif scheme or re.match(r"^[A-Za-z][\w+.-]*:", uri) and not re.match(r"^[A-Za-z]:[\\/]", uri):
        given = scheme or uri.split(":", 1)[0]
        raise WorkbenchError(f"unsupported registry URI scheme {given!r} in {uri!r}; expected {_EXPECTED_URI}")
    else:
        path = Path(uri).expanduser()
    path = path.resolve()
    if path.suffix in (".db", ".sqlite") or path.is_file():
        return f"sqlite:///{path}"
    return f"sqlite:///{path / 'mlflow.db'}"


def _create_local(db: Path) -> list[Path]:
    """Make the folder of a local registry and its lock file; return what this call created (to undo it).

    Raises:
        WorkbenchError: the folder cannot be made or written (a file in the way, no permission, /proc ...);
            anything made before the failure is removed again.
    """
    root = db.parent
    missing = [d for d in (root, *root.parents) if not d.exists()][::-1]
    existing = (missing[0].parent if missing else root)
    if not existing.is_dir():
        raise _cannot_create(db, f"{existing} is a file, not a folder")
    if db.exists() and not db.is_file():  # MLflow would retry opening it for minutes
        raise _cannot_create(db, "a folder is in the way of the database file", "open")
    created: list[Path] = []
    try:
        for d in missing:
            d.mkdir()
            created.append(d)
        lock = root / ".lock"
        if not lock.exists():
            lock.touch()
            created.append(lock)
        with open(lock, "a+"):
            pass
    except OSError as exc:
        _remove(created)
        why = f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else str(exc)
        raise _cannot_create(db, why) from None
    return created


def _cannot_create(db: Path, why: str, verb: str = "create") -> WorkbenchError:
    return WorkbenchError(f"cannot {verb} the registry database at {db} ({why}); expected a folder this user can "
                          f"write, given as a folder path, file:///FOLDER or sqlite:///FOLDER/mlflow.db")


def _remove(paths: list[Path]) -> None:
    """Remove files and (empty) folders this process created, newest first."""
    for p in reversed(paths):
        with contextlib.suppress(OSError):
            p.rmdir() if p.is_dir() else p.unlink()


def parse_ref(ref: str) -> tuple[str, str | int]:
    """Split ``NAME@ALIAS`` or ``NAME/VERSION`` (MLflow's two spellings) into (name, alias or version)."""
    if not isinstance(ref, str):
        raise WorkbenchError(f"a model reference is a string NAME@ALIAS or NAME/VERSION (digits-mlp@champion), "
                             f"got {ref!r}")
    if "@" in ref:
        name, alias = ref.rsplit("@", 1)
        if _NAME.match(name) and _ALIAS.match(alias):
            return name, alias
    elif "/" in ref:
        name, version = ref.rsplit("/", 1)
        if _NAME.match(name) and version.isdigit() and int(version) > 0:
            return name, int(version)
    raise WorkbenchError(f"cannot read the model reference {ref!r}: write NAME@ALIAS (digits-mlp@champion) "
                         f"or NAME/VERSION (digits-mlp/3)")


@dataclass(frozen=True)
class ModelVersion:
    """One registered version: what it is, how it was made and measured, where its file is."""

    name: str
    version: int
    aliases: tuple[str, ...]
    recipe: dict[str, Any]
    metrics: dict[str, float]
    sha256: str
    source: str              # the artifact URI of the logged model's folder
    run_id: str
    created: str
    description: str = ""
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.name}/{self.version}"

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        shape = self.tags.get("input_shape")
        return tuple(json.loads(shape)) if shape else None

    @property
    def class_share(self) -> list[float] | None:
        """Share of each predicted class on the evaluation set at registration (the drift reference)."""
        share = self.tags.get("class_share")
        return json.loads(share) if share else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["aliases"] = list(self.aliases)
        return d

    def summary(self) -> dict[str, Any]:
        m = self.metrics
        return {"name": self.name, "version": self.version, "aliases": ",".join(self.aliases),
                "accuracy": m.get("accuracy"), "ort_p50_us": m.get("latency_ort_b1_p50_us"),
                "onnx_kb": round(m["size_onnx_bytes"] / 1024, 1) if "size_onnx_bytes" in m else None,
                "description": self.description, "sha256": self.sha256[:12], "created": self.created}


class Registry:
    """The workbench's view of an MLflow tracking server / model registry.

    Args:
        uri: a folder, ``file:///FOLDER``, ``sqlite:///PATH.db`` or an MLflow tracking server URI
            (see :func:`tracking_uri`); default :func:`default_uri` (or ``root``'s SQLite file).
        root: a folder for a local registry (``mlflow.db`` and ``artifacts/`` inside); tests use a tmp dir.

    Raises:
        WorkbenchError: an unsupported URI, or a local database that cannot be created (nothing is left behind).
    """

    def __init__(self, uri: str | None = None, *, root: str | os.PathLike | None = None) -> None:
        if uri is not None and root is not None:
            raise WorkbenchError("give the registry either a tracking uri or a local root folder, not both")
        if root is not None:
            uri = f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"
        self.uri = tracking_uri(uri or default_uri())
        self._local = self.uri.startswith("sqlite:///")
        db = Path(self.uri[len("sqlite:///"):])
        self.root = db.parent if self._local else None
        created = _create_local(db) if self._local else []
        db_existed = self._local and db.exists()
        quiet_mlflow()
        from mlflow import MlflowClient

        for name in ("mlflow", "alembic"):  # after the import: MLflow sets its own levels when imported
            logging.getLogger(name).setLevel(logging.WARNING)

        try:
            with self._lock():  # the first connection creates the tables (alembic): one process at a time
                self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
                self._experiment_id = self._experiment()
        except Exception as exc:
            if not self._local:
                raise
            if not db_existed:
                created.append(db)
            _remove(created)
            raise _cannot_create(db, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
                                 "open" if db_existed else "create") from None

    def __repr__(self) -> str:
        return f"Registry({self.uri!r})"

    # -- plumbing -------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """An exclusive lock across processes for a local registry (a no-op for a tracking server)."""
        if not self._local:
            yield
            return
        with open(self.root / ".lock", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def _fluent(self) -> Iterator[Any]:
        """MLflow's fluent API (needed by ``mlflow.onnx.log_model``) pointed at this registry, then restored."""
        import mlflow

        old_tracking, old_registry = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)
        try:
            yield mlflow
        finally:
            mlflow.set_tracking_uri(old_tracking)
            mlflow.set_registry_uri(old_registry)

    def _experiment(self) -> str:
        exp = self.client.get_experiment_by_name(EXPERIMENT)
        if exp is not None:
            return exp.experiment_id
        location = (self.root / "artifacts").resolve().as_uri() if self._local else None
        return self.client.create_experiment(EXPERIMENT, artifact_location=location)

    def _require_model(self, name: str) -> Any:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_registered_model(name)
        except MlflowException:
            known = ", ".join(self.models()) or "none yet"
            raise WorkbenchError(f"no registered model named {name!r} in {self.uri}; registered models: {known}") \
                from None

    def _version(self, mv: Any, aliases: Mapping[str, str] | None = None) -> ModelVersion:
        tags = dict(mv.tags or {})
        if aliases is not None:  # search results carry no aliases; the registered model has them all
            names = [a for a, v in aliases.items() if str(v) == str(mv.version)]
        else:
            names = list(getattr(mv, "aliases", []) or [])
        return ModelVersion(
            name=mv.name, version=int(mv.version), aliases=tuple(sorted(names)),
            recipe=json.loads(tags.get("recipe", "{}")), metrics=json.loads(tags.get("metrics", "{}")),
            sha256=tags.get("sha256", ""), source=mv.source, run_id=mv.run_id or "",
            created=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(mv.creation_timestamp / 1000)),
            description=mv.description or "",
            tags={k: v for k, v in tags.items() if k not in ("recipe", "metrics", "sha256")},
        )

    # -- reading --------------------------------------------------------------------------------------
    def models(self) -> list[str]:
        """Names of the registered models."""
        return sorted(m.name for m in self.client.search_registered_models())

    def versions(self, name: str) -> list[ModelVersion]:
        """Every version of `name`, oldest first."""
        aliases = dict(self._require_model(name).aliases or {})
        found = self.client.search_model_versions(f"name = '{name}'")
        return sorted((self._version(mv, aliases) for mv in found), key=lambda v: v.version)

    def get(self, name: str, which: str | int) -> ModelVersion:
        """A version by number or alias (``get("digits-mlp", "champion")``)."""
        from mlflow.exceptions import MlflowException

        self._require_model(name)
        try:
            if isinstance(which, int) or (isinstance(which, str) and which.isdigit()):
                return self._version(self.client.get_model_version(name, str(int(which))))
            return self._version(self.client.get_model_version_by_alias(name, which))
        except MlflowException:
            pass
        versions = self.versions(name)
        if isinstance(which, int) or str(which).isdigit():
            listed = ", ".join(str(v.version) for v in versions) or "none"
            raise WorkbenchError(f"model {name!r} has no version {which}; its versions: {listed}") from None
        aliases = sorted({a for v in versions for a in v.aliases})
        raise WorkbenchError(f"model {name!r} has no alias {which!r}; its aliases: {', '.join(aliases) or 'none'} "
                             f"(promote a version first: workbench registry promote {name} VERSION)") from None

    def resolve(self, ref: str) -> ModelVersion:
        """The version a reference ``NAME@ALIAS`` or ``NAME/VERSION`` points at now."""
        return self.get(*parse_ref(ref))

    def history(self, name: str) -> list[int]:
        """The versions that were champion, in order; the last is the current one."""
        tags = self._require_model(name).tags or {}
        return [int(v) for v in json.loads(tags.get(_HISTORY_TAG, "[]"))]

    def local_path(self, version: ModelVersion) -> Path:
        """The ONNX file of a version on this machine (downloaded if the artifact store is remote)."""
        import mlflow

        try:
            uri = self.client.get_model_version_download_uri(version.name, str(version.version))
            folder = mlflow.artifacts.download_artifacts(artifact_uri=uri, tracking_uri=self.uri)
        except Exception as exc:
            raise WorkbenchError(f"registry entry {version.ref}: its files cannot be read "
                                 f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
        return Path(folder) / "model.onnx"

    def load(self, ref: str | ModelVersion) -> tuple[Path, ModelVersion]:
        """The verified ONNX file of a version: its sha256 must equal the one recorded at registration.

        Raises:
            WorkbenchError: the reference does not resolve, the file is missing, or its bytes changed.
        """
        version = ref if isinstance(ref, ModelVersion) else self.resolve(ref)
        path = self.local_path(version)
        if not path.is_file():
            raise WorkbenchError(f"registry entry {version.ref}: its ONNX file {str(path)!r} is missing; "
                                 f"register the model again or roll back to another version")
        if not version.sha256:
            raise WorkbenchError(f"registry entry {version.ref} has no recorded sha256, so its file cannot be "
                                 f"verified; register it through workbench")
        actual = sha256_file(path)
        if actual != version.sha256:
            raise WorkbenchError(f"registry entry {version.ref}: sha256 mismatch: {str(path)!r} has sha256 "
                                 f"{actual[:16]}... but {version.sha256[:16]}... was registered; the file was changed "
                                 f"after registration, refusing to load it")
        return path, version

    def _verify_before_moving(self, target: ModelVersion, action: str) -> None:
        """Load-check `target` (sha256) before the champion alias moves to it; on failure say the alias stayed."""
        try:
            self.load(target)
        except WorkbenchError as exc:
            try:
                where = f"it still points at version {self.get(target.name, CHAMPION).version}"
            except WorkbenchError:
                where = "no version is champion"
            reason = str(exc).removeprefix(f"registry entry {target.ref}: ")
            raise WorkbenchError(f"cannot {action} model {target.name!r} to version {target.version}: {reason}; "
                                 f"the {CHAMPION} alias was NOT moved ({where})") from None

    # -- writing --------------------------------------------------------------------------------------
    def register(self, onnx_path: str | os.PathLike, *, name: str, recipe: Mapping[str, Any] | None = None,
                 metrics: Mapping[str, float] | None = None, tags: Mapping[str, str] | None = None,
                 description: str = "", alias: str | None = None) -> ModelVersion:
        """Log an ONNX file as an MLflow model and register it as the next version of `name`.

        Args:
            onnx_path: the ``.onnx`` file (checked with ``onnx.checker``).
            name: the registered model's name (letters, digits, ``_.-``).
            recipe: the settings that produced it (logged as run parameters and a JSON tag).
            metrics: numbers to log (accuracy, latency, size, ...).
            tags: more version tags (fingerprints, class shares, ...).
            description: one line shown by ``workbench registry list``.
            alias: set this alias (e.g. ``"challenger"``) on the new version.

        Returns:
            The new :class:`ModelVersion`.
        """
        import onnx

        from .. import onnx as wonnx

        check_name(name)
        if alias is not None:
            self._check_alias(alias)
        wonnx.check(onnx_path)
        proto = onnx.load(str(onnx_path))
        expected = hashlib.sha256(proto.SerializeToString()).hexdigest()
        inp, out = proto.graph.input[0], proto.graph.output[0]
        shape = [d.dim_value for d in inp.type.tensor_type.shape.dim[1:]]
        n_out = out.type.tensor_type.shape.dim[-1].dim_value
        metrics = {k: float(v) for k, v in (metrics or {}).items() if v is not None}
        recipe = dict(recipe or {})
        all_tags = {"recipe": json.dumps(recipe, sort_keys=True), "metrics": json.dumps(metrics, sort_keys=True),
                    "input_shape": json.dumps(shape), "num_classes": str(n_out),
                    "source_sha256": sha256_file(onnx_path), **{k: str(v) for k, v in (tags or {}).items()}}

        from mlflow.models.signature import ModelSignature
        from mlflow.types.schema import Schema, TensorSpec

        signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *shape), inp.name)]),
                                   outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, n_out), out.name)]))
        with self._lock(), self._fluent() as mlflow:
            with mlflow.start_run(experiment_id=self._experiment_id, run_name=f"{name}-register") as run:
                flat = {k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in recipe.items()}
                if flat:
                    mlflow.log_params({k: str(v)[:500] for k, v in flat.items()})
                if metrics:
                    mlflow.log_metrics(metrics)
                mlflow.set_tags({k: v for k, v in all_tags.items() if k != "recipe"})
                with _quiet_eprint():
                    info = mlflow.onnx.log_model(proto, name="model", registered_model_name=name,
                                                 signature=signature, pip_requirements=["onnxruntime"],
                                                 await_registration_for=0, save_as_external_data=False)
            number = str(info.registered_model_version)
            for key, value in all_tags.items():
                self.client.set_model_version_tag(name, number, key, value)
            if description:
                self.client.update_model_version(name, number, description=description)
            mv = self._version(self.client.get_model_version(name, number))
            stored = sha256_file(self.local_path(mv))
            if stored != expected:  # never seen; would mean MLflow re-encoded the model
                raise WorkbenchError(f"MLflow stored {name}/{number} with different bytes than were logged")
            self.client.set_model_version_tag(name, number, "sha256", stored)
            if alias is not None:
                self.client.set_registered_model_alias(name, alias, number)
        return self.get(name, int(number))

    def register_result(self, result: "Result", *, name: str, alias: str | None = CHALLENGER,
                        description: str = "", extra_metrics: Mapping[str, float] | None = None) -> ModelVersion:
        """Register a pipeline :class:`~workbench.recipe.Result`: its ONNX model, recipe, metrics and fingerprints.

        Args:
            result: what ``workbench.run`` returned (it must have exported ONNX).
            name: the registered model's name.
            alias: alias for the new version (default ``challenger``; None sets none).
            description: a line for ``registry list`` (default: model, dataset and compression).
            extra_metrics: more numbers to log.

        An ONNX Runtime int8 model is a Result too: ``run(recipe.replace(ort_quant="dynamic"))``.
        """
        from .. import data as _data
        from .. import onnx as wonnx
        from ..measure import file_bytes

        if result.onnx_path is None:
            raise WorkbenchError("this Result has no ONNX file (its recipe had export_onnx=False); run it with "
                                 "export_onnx=True to register it")
        path = Path(result.onnx_path)
        ds = _data.load(result.recipe.dataset, seed=result.recipe.seed)
        preds = wonnx.run_session(wonnx.session(path), ds.X_test).argmax(1)
        share = np.bincount(preds, minlength=ds.num_classes) / len(preds)
        metrics: dict[str, float] = {"size_onnx_bytes": file_bytes(path), "params": result.params,
                                     "accuracy": result.accuracy, "val_accuracy": result.val_accuracy}
        if result.latency_ort_b1 is not None:
            metrics |= {"latency_ort_b1_p50_us": result.latency_ort_b1.p50_us,
                        "latency_ort_b1_p99_us": result.latency_ort_b1.p99_us}
        metrics |= dict(extra_metrics or {})
        r = result.recipe
        tags = {"result_key": result.key, "data_fingerprint": ds.fingerprint,
                "model_fingerprint": sha256_file(result.checkpoint_path), "dataset": r.dataset,
                "class_share": json.dumps([round(float(s), 6) for s in share]),
                "classes": json.dumps(list(ds.classes))}
        if not description:
            description = f"{r.model} on {r.dataset}" + (", compressed" if r.compressed else "")
        return self.register(path, name=name, recipe=r.to_dict(), metrics=metrics, tags=tags,
                             description=description, alias=alias)

    def _check_alias(self, alias: str) -> None:
        if not isinstance(alias, str) or not _ALIAS.match(alias) or re.fullmatch(r"[vV]\d+", alias):
            raise WorkbenchError(f"aliases are a letter then letters, digits, '_' or '-' (and not v<number>), "
                                 f"got {alias!r}")

    def set_alias(self, name: str, alias: str, version: int) -> ModelVersion:
        """Point `alias` at `version` (which must exist)."""
        self._check_alias(alias)
        target = self.get(name, int(version))
        with self._lock():
            self.client.set_registered_model_alias(name, alias, str(target.version))
        return self.get(name, target.version)

    def promote(self, name: str, version: int, *, verify: bool = True) -> ModelVersion:
        """Make `version` the champion (its file is verified first); the previous champion stays in the history.

        A server started with ``--model NAME@champion`` picks the new version up at its next poll.
        """
        if isinstance(version, bool) or not str(version).isdigit():
            raise WorkbenchError(f"a version is a positive whole number, got {version!r}")
        target = self.get(name, int(version))
        if verify:
            self._verify_before_moving(target, "promote")
        with self._lock():
            history = self.history(name)
            if not history or history[-1] != target.version:
                history.append(target.version)
            self.client.set_registered_model_alias(name, CHAMPION, str(target.version))
            self.client.set_registered_model_tag(name, _HISTORY_TAG, json.dumps(history[-50:]))
            if CHALLENGER in target.aliases:
                self.client.delete_registered_model_alias(name, CHALLENGER)
        return self.get(name, target.version)

    def rollback(self, name: str) -> ModelVersion:
        """Put the previous champion back (the current one leaves the history); returns the restored version.

        The previous version's file is verified first (sha256): a server would refuse it, so the alias
        does not move to it (WorkbenchError) and the history stays as it was.
        """
        with self._lock():
            history = self.history(name)
            if len(history) < 2:
                raise WorkbenchError(f"model {name!r} has no previous champion to roll back to "
                                     f"(champion history: {history or 'empty'})")
            dropped = history.pop()
            previous = history[-1]
            self._verify_before_moving(self.get(name, previous), "roll back")
            self.client.set_registered_model_alias(name, CHAMPION, str(previous))
            self.client.set_registered_model_tag(name, _HISTORY_TAG, json.dumps(history))
            self.client.set_model_version_tag(name, str(dropped), "rolled_back", "true")
        return self.get(name, previous)

    def reject(self, name: str, version: int, reason: str) -> ModelVersion:
        """Keep a challenger out: drop its ``challenger`` alias and record why."""
        target = self.get(name, int(version))
        with self._lock():
            self.client.set_model_version_tag(name, str(target.version), "rejected", reason[:4000])
            if CHALLENGER in target.aliases:
                self.client.delete_registered_model_alias(name, CHALLENGER)
        return self.get(name, target.version)

