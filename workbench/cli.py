"""The `workbench` command line: train, info, export, bench (also `python -m workbench`)."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

from .errors import WorkbenchError

__all__ = ["main"]


def _option(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. batchnorm=false, hidden=[512,256]), got {text!r}")
    key, value = text.split("=", 1)
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return key.strip(), parsed


def _load_data(name: str, root: str | None, seed: int):
    from . import data

    return data.load(name, root=root, seed=seed)


def cmd_train(args: argparse.Namespace) -> None:
    from .recipe import Recipe, run

    recipe = Recipe(model=args.model, dataset=args.dataset, model_options=dict(args.option), epochs=args.epochs,
                    lr=args.lr, batch_size=args.batch_size, optimizer=args.optimizer, seed=args.seed,
                    weight_decay=args.weight_decay)
    out = Path(args.out)
    if out.exists() and out.is_dir():
        raise WorkbenchError(f"--out {str(out)!r} is a directory; give a file name such as model.pt")
    result = run(recipe, data=_load_data(args.dataset, args.data_root, args.seed), use_cache=not args.no_cache)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.copyfile(result.checkpoint_path, tmp)
    tmp.replace(out)
    source = "from cache" if result.cached else f"trained in {result.train_seconds:.1f} s"
    print(f"{recipe.model} on {recipe.dataset}: test accuracy {result.accuracy:.4f} ({source}); wrote {out}")


def cmd_info(args: argparse.Namespace) -> None:
    from . import measure, models
    from .train import evaluate

    model, info = models.load_checkpoint(args.checkpoint)
    spec, meta = info["spec"], info["metadata"]
    recipe = meta.get("recipe", {})
    print(f"model:        {spec['name']} {spec['options'] or ''}".rstrip())
    print(f"input shape:  {tuple(spec['input_shape'])}, classes: {spec['num_classes']}")
    print(f"parameters:   {measure.count_params(model):,} ({measure.count_nonzero(model):,} non-zero)")
    print(f"MACs:         {measure.macs(model, tuple(spec['input_shape'])).total:,} per example")
    print(f"file size:    {measure.file_bytes(args.checkpoint) / 1024:.1f} KB")
    if recipe.get("dataset"):
        ds = _load_data(recipe["dataset"], args.data_root, int(recipe.get("seed", 0)))
        if ds.input_shape != tuple(spec["input_shape"]):
            raise WorkbenchError(f"checkpoint expects inputs {tuple(spec['input_shape'])} but {ds.name} has {ds.input_shape}")
        ev = evaluate(model, ds.X_test, ds.y_test)
        print(f"test accuracy: {ev.accuracy:.4f} on {ev.n} {ds.name} test examples (seed {ds.seed})")


def cmd_export(args: argparse.Namespace) -> None:
    from . import measure, models
    from . import onnx as wonnx

    model, info = models.load_checkpoint(args.checkpoint)
    spec, recipe = info["spec"], info["metadata"].get("recipe", {})
    path = wonnx.export(model, args.out, input_shape=tuple(spec["input_shape"]))
    print(f"wrote {path} ({measure.file_bytes(path) / 1024:.1f} KB), onnx.checker passed")
    if recipe.get("dataset"):
        ds = _load_data(recipe["dataset"], args.data_root, int(recipe.get("seed", 0)))
        p = wonnx.parity(model, path, ds.X_test)
        print(f"parity vs PyTorch on {p.n} test examples: max abs err {p.max_abs_err:.2e}, "
              f"top-1 agreement {p.top1_agreement:.4f}")


def cmd_bench(args: argparse.Namespace) -> None:
    from . import bench

    report = bench.run_bench(args.only, cache=args.cache)
    if args.json:
        bench.write_json(report, args.json)
        print(f"wrote {args.json}")
    width = max(len(k) for k in report["figures"])
    for key, value in report["figures"].items():
        print(f"{key:<{width}}  {value:.6g}")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .data import DATASETS
    from .models import MODELS
    from .train import OPTIMIZERS

    parser = argparse.ArgumentParser(prog="workbench", description=__doc__.split(":")[0] + ".")
    parser.add_argument("--version", action="version", version=f"workbench {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model of the zoo and save a checkpoint",
                       description="Train a model through the Recipe pipeline (cached) and save a checkpoint.")
    p.add_argument("--model", default="mlp", choices=list(MODELS))
    p.add_argument("--dataset", default="digits", choices=list(DATASETS))
    p.add_argument("--data-root", help="folder with the dataset files (mnist, fashion-mnist, cifar10)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--optimizer", default="adam", choices=list(OPTIMIZERS))
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                   help="model option, repeatable (e.g. --option batchnorm=false --option hidden=[512,256])")
    p.add_argument("--no-cache", action="store_true", help="retrain even if this recipe is cached")
    p.add_argument("--out", required=True, help="checkpoint file to write (e.g. model.pt)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("info", help="parameters, MACs, size and test accuracy of a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--data-root", help="folder with the dataset files, if not the default")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("export", help="export a checkpoint to ONNX and print its parity with PyTorch")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True, help="ONNX file to write (e.g. model.onnx)")
    p.add_argument("--data-root", help="folder with the dataset files, if not the default")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("bench", help="run the benchmark groups and print/write the measured figures")
    p.add_argument("--json", metavar="PATH", help="write {machine, results, figures} as JSON to PATH")
    p.add_argument("--only", action="append", metavar="GROUP", help="run only this group (repeatable)")
    p.add_argument("--cache", metavar="DIR", help="result cache folder (default $WORKBENCH_CACHE or ~/.cache/workbench)")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `workbench` console script. User errors print one line and return 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except WorkbenchError as exc:
        print(f"workbench {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
