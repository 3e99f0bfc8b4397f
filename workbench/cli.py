"""The `workbench` command line: train, compress, info, generate, export, bench, serve, registry (also `python -m workbench`).

Every mistake a user can make ends in one line on stderr and exit status 2, and a failed command
leaves no output file behind: outputs are checked before any work starts, written under temporary
names and renamed into place only when the command succeeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

from .errors import WorkbenchError

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line, like every other user error (the usage is one `--help` away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. batchnorm=false, hidden=[512,256]), got {text!r}")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return key.strip(), parsed


def _default(name: str) -> Any:
    """The default of Recipe field `name`: flags use the library's defaults, never copies of them."""
    from .recipe import Recipe

    return {f.name: f.default for f in dataclasses.fields(Recipe)}[name]


class _Outputs:
    """The files a command writes: checked before any work starts, then written all or nothing.

    Used as ``with _Outputs() as outs: outs.add(args.out, "--out", "model.pt"); ...``: each output is
    written under a temporary name in its own folder (``outs.tmp(path)``) and renamed into place when
    the block succeeds; on any failure the temporary files go, and so do the folders made for them.
    """

    def __init__(self) -> None:
        self._tmp: dict[Path, Path] = {}  # final path -> temporary path
        self._made: list[Path] = []  # folders created for the outputs, outermost first

    def add(self, value: str | os.PathLike, what: str, example: str) -> Path:
        """Check that `value` can be written, making its folder if needed.

        `what` names the output in errors (``--out``) and `example` is a file name to suggest.
        """
        if not str(value):
            raise WorkbenchError(f"{what} is empty; give a file name such as {example}")
        path = Path(value)
        if path.is_dir():
            raise WorkbenchError(f"{str(path)!r} is a folder; give {what} a file name such as {str(path / example)!r}")
        if path.exists() and not path.is_file():
            raise WorkbenchError(f"{str(path)!r} exists and is not a regular file; give {what} another file name")
        for other in self._tmp:
            if other.resolve() == path.resolve():
                raise WorkbenchError(f"{what} names the same file as another output ({str(path)!r}); give each its own")
        missing, folder = [], path.parent
        while not folder.exists() and folder != folder.parent:
            missing.append(folder)
            folder = folder.parent
        if not folder.is_dir():
            raise WorkbenchError(f"cannot write {str(path)!r}: {str(folder)!r} is a file, not a folder; "
                                 f"give {what} a path in a folder")
        try:
            for new in reversed(missing):
                new.mkdir()
                self._made.append(new)
            fd, probe = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".probe")
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:  # leaving the `with` block removes the folders made so far
            raise WorkbenchError(f"cannot write {str(path)!r}: the folder {str(path.parent)!r} does not take new files "
                                 f"({exc.strerror or exc}); give {what} a path in a folder you can write") from None
        self._tmp[path] = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
        return path

    def tmp(self, path: str | os.PathLike) -> Path:
        """Where to write the output `path` until the command succeeds."""
        return self._tmp[Path(path)]

    def commit(self) -> None:
        for final, tmp in self._tmp.items():
            if tmp.exists():
                os.replace(tmp, final)

    def discard(self) -> None:
        for tmp in self._tmp.values():
            tmp.unlink(missing_ok=True)
        for folder in reversed(self._made):
            try:
                folder.rmdir()
            except OSError:  # not empty: someone else wrote there meanwhile
                pass

    def __enter__(self) -> "_Outputs":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.commit()
                return
            except BaseException:
                self.discard()
                raise
        self.discard()


def _load_data(name: str, root: str | None, seed: int):
    from . import data

    return data.load(name, root=root, seed=seed)


def _is_lm(recipe) -> bool:
    from .recipe import LANGUAGE_MODELS

    return recipe.model in LANGUAGE_MODELS


def _refuse_for_lm(args: argparse.Namespace, *flags: str) -> None:
    """Options of the classifier pipeline that the GPT does not have: one line, before any work."""
    given = [f for f in flags if getattr(args, f.lstrip("-").replace("-", "_"), None) not in (None, False)]
    if given:
        raise WorkbenchError(f"{', '.join(given)} is not available for the GPT (its ONNX export and registry "
                             "entry are not part of this pipeline); drop it")


def _train_recipe(args: argparse.Namespace, **compression: Any):
    from .recipe import Recipe

    return Recipe(model=args.model, dataset=args.dataset, model_options=dict(args.option), epochs=args.epochs,
                  lr=args.lr, batch_size=args.batch_size, optimizer=args.optimizer, seed=args.seed,
                  weight_decay=args.weight_decay, lr_schedule=args.lr_schedule,
                  lr_schedule_options=dict(args.lr_option), **compression)


def _compress_recipe(args: argparse.Namespace):
    from .recipe import LANGUAGE_MODELS

    # A classifier's --bits quantizes activations to 8 bits too unless told; the GPT's is weight-only.
    weight_and_act = args.bits and args.model not in LANGUAGE_MODELS
    act_bits = args.act_bits if args.act_bits is not None else (8 if weight_and_act else _default("act_bits"))
    return _train_recipe(args, prune_amount=args.prune, prune_kind=args.prune_kind, prune_scope=args.scope,
                         prune_schedule=args.schedule, prune_steps=args.steps, prune_exclude=tuple(args.exclude),
                         finetune_epochs=args.finetune_epochs, finetune_lr=args.finetune_lr, weight_bits=args.bits,
                         act_bits=act_bits, quant_symmetric=not args.asymmetric, quant_granularity=args.granularity,
                         calibration=args.calibration, qat_epochs=args.qat, fold_bn=args.fold_bn,
                         ort_quant=args.ort_quant, prune_method=args.prune_method, group_size=args.group_size,
                         quant_method=args.quant_method)


def _check_register(args: argparse.Namespace) -> None:
    """--register needs the serve extra and a valid name: say so before training, not after."""
    if args.register is not None:
        from .serve import require_extra

        require_extra()
        from .serve.registry import check_name

        check_name(args.register)


def _register(result, args: argparse.Namespace) -> str | None:
    """--register NAME: the Result's ONNX model becomes the next version of NAME (alias challenger)."""
    if args.register is None:
        return None
    from .serve.registry import Registry

    reg = Registry(args.registry)
    v = reg.register_result(result, name=args.register)
    return (f"registered {v.name} version {v.version} (alias challenger) in {reg.uri}; "
            f"`workbench registry promote {v.name} {v.version}` makes it the champion")


def cmd_train(args: argparse.Namespace) -> None:
    from .recipe import run

    recipe = _train_recipe(args)
    lm = _is_lm(recipe)
    if lm:
        _refuse_for_lm(args, "--register", "--data-root")
    _check_register(args)
    with _Outputs() as outs:
        outs.add(args.out, "--out", "model.pt")
        data = None if lm else _load_data(args.dataset, args.data_root, args.seed)
        result = run(recipe, data=data, use_cache=not args.no_cache)
        shutil.copyfile(result.checkpoint_path, outs.tmp(args.out))
        registered = _register(result, args)
    source = "from cache" if result.cached else f"trained in {result.train_seconds:.1f} s"
    metric = (f"validation {result.val_bpc:.4f} bits/char" if lm else f"test accuracy {result.accuracy:.4f}")
    print(f"{recipe.model} on {recipe.dataset}: {metric} ({source}); wrote {args.out}")
    if registered:
        print(registered)


def cmd_compress(args: argparse.Namespace) -> None:
    from .recipe import run

    recipe = _compress_recipe(args)
    if not recipe.compressed:
        raise WorkbenchError("nothing to compress: give a pruning amount (--prune 0.8), bits (--bits 8), "
                             "--fold-bn or --ort-quant")
    if _is_lm(recipe):
        _refuse_for_lm(args, "--register", "--onnx", "--data-root")
        return _compress_lm(recipe, args)
    _check_register(args)
    with _Outputs() as outs:
        outs.add(args.out, "--out", "model.pt")
        if args.onnx is not None:
            outs.add(args.onnx, "--onnx", "model.onnx")
        ds = _load_data(args.dataset, args.data_root, args.seed)
        r = run(recipe, data=ds, use_cache=not args.no_cache)
        shutil.copyfile(r.checkpoint_path, outs.tmp(args.out))
        if args.onnx is not None:
            shutil.copyfile(r.onnx_path, outs.tmp(args.onnx))
        dense = run(recipe.dense(), data=ds)
        registered = _register(r, args)
    best = min(r.sparse_bytes, key=r.sparse_bytes.get) if r.sparse_bytes else None
    steps = []
    if recipe.prune_amount:
        steps.append(f"{recipe.prune_kind} pruning {recipe.prune_amount:.0%} "
                     f"({recipe.prune_schedule if recipe.prune_kind == 'unstructured' else 'one-shot'}, "
                     f"{recipe.finetune_epochs} fine-tune epochs{' per round' if recipe.prune_schedule == 'gradual' else ''})")
    if recipe.quantized:
        steps.append(f"{recipe.weight_bits or 32}-bit weights ({recipe.quant_granularity}, "
                     f"{'symmetric' if recipe.quant_symmetric else 'asymmetric'}), "
                     f"{recipe.act_bits or 32}-bit activations ({recipe.calibration} calibration), "
                     + (f"QAT {recipe.qat_epochs} epochs" if recipe.qat_epochs else "PTQ"))
    if recipe.fold_bn:
        steps.append(f"BatchNorm folded ({', '.join(r.steps['fold_bn'].folded) or 'none found'})")
    if recipe.ort_quant != "none":
        q = r.steps["ort_quant"]
        steps.append(f"ONNX Runtime int8, {q.reason}")
    print(f"{recipe.model} on {recipe.dataset}: " + "; ".join(steps))
    print(f"  test accuracy  {dense.accuracy:.4f} -> {r.accuracy:.4f} ({100 * (r.accuracy - dense.accuracy):+.2f} percentage points)")
    print(f"  parameters     {dense.params:,} -> {r.params:,} ({r.nonzero_params:,} non-zero, sparsity {r.sparsity:.1%})")
    print(f"  MACs           {dense.macs:,} -> {r.macs:,}")
    print(f"  ONNX file      {dense.size_onnx_bytes / 1024:.1f} KB -> {r.size_onnx_bytes / 1024:.1f} KB"
          + (f" (weights stored {best}: {r.sparse_bytes[best] / 1024:.1f} KB)" if r.sparsity > 0 else ""))
    if r.size_quantized_bytes:
        print(f"  packed weights {dense.size_state_dict_bytes / 1024:.1f} KB -> {r.size_quantized_bytes / 1024:.1f} KB"
              f" ({dense.size_state_dict_bytes / r.size_quantized_bytes:.1f}x smaller; "
              f"mean SQNR {sum(r.layer_sqnr.values()) / len(r.layer_sqnr):.1f} dB)")
    print(f"  ORT batch-1    {dense.latency_ort_b1.p50_us:.0f} us -> {r.latency_ort_b1.p50_us:.0f} us (p50"
          + (", fake-quantized float graph: real int8 speed is chapter 8" if recipe.quantized else "") + ")")
    print(f"wrote {args.out}" + (f" and {args.onnx}" if args.onnx else ""))
    if registered:
        print(registered)


def _compress_lm(recipe, args: argparse.Namespace) -> None:
    from .recipe import run

    with _Outputs() as outs:
        outs.add(args.out, "--out", "model.pt")
        r = run(recipe, use_cache=not args.no_cache)
        shutil.copyfile(r.checkpoint_path, outs.tmp(args.out))
        dense = run(recipe.dense())
    steps = []
    if "prune" in r.steps:
        p = r.steps["prune"]
        steps.append(f"{p.method} pruning {'2:4' if p.kind == '2:4' else f'{p.amount:.0%}'} ({p.scope}, no retraining)")
    if "quantize" in r.steps:
        q = r.steps["quantize"]
        groups = f"groups of {q.group_size}" if q.group_size else "per channel"
        steps.append(f"{q.method.upper() if q.method != 'smoothquant' else 'SmoothQuant'} "
                     + (f"W{q.weight_bits or 32}A{q.act_bits} per tensor" if q.act_bits else
                        f"{q.weight_bits}-bit weights {groups}, {'symmetric' if q.symmetric else 'asymmetric'}"))
    print(f"{recipe.model} on {recipe.dataset}: " + "; ".join(steps))
    print(f"  validation bits/char {dense.val_bpc:.4f} -> {r.val_bpc:.4f} ({r.delta_bpc:+.4f}; perplexity "
          f"{dense.val_perplexity:.3f} -> {r.val_perplexity:.3f}) on {r.val_chars:,} held-out characters")
    print(f"  block Linears  {dense.weight_bytes / 1024:.1f} KB -> {r.weight_bytes / 1024:.1f} KB "
          f"({r.bits_per_weight:.3g} bits per weight with scales and zero points; sparsity {r.sparsity:.1%})")
    print(f"  checkpoint     {os.path.getsize(dense.checkpoint_path) / 1024:.1f} KB -> "
          f"{os.path.getsize(r.checkpoint_path) / 1024:.1f} KB")
    print(f"  {r.samples['prompt']!r} -> {r.samples['greedy'][:60]!r} (greedy)")
    print(f"wrote {args.out}")


def _load(path: str):
    """The model of a checkpoint written by train/compress (quantized ones included), its spec and metadata."""
    from .llm.checkpoint import is_gpt_checkpoint
    from .models import read_checkpoint
    from .recipe import load_model

    if is_gpt_checkpoint(path):
        raise WorkbenchError(f"{path!r} is a GPT checkpoint: `workbench info` and `workbench generate` read it; "
                             "ONNX export of the GPT is not part of this command")
    payload = read_checkpoint(path)  # one sentence for anything that is not a sound checkpoint
    return load_model(path), payload["spec"], payload["metadata"]


def _info_lm(path: str) -> None:
    from . import llm, measure

    model, tok, meta = llm.checkpoint.load(path)
    cfg = model.config
    linears = llm.block_linears(model)
    n = sum(m.weight.numel() for m in linears.values())
    print(f"model:        gpt, {cfg.n_layer} layers x {cfg.n_head} heads x {cfg.n_embd} wide, context {cfg.block_size}, "
          f"{tok.vocab_size}-character vocabulary")
    recipe = meta.get("recipe", {})
    if recipe.get("weight_bits"):
        print(f"compressed:   {recipe.get('quant_method')} {recipe['weight_bits']}-bit weights"
              + (f", groups of {recipe['group_size']}" if recipe.get("group_size") else "")
              + (f", {recipe['act_bits']}-bit activations" if recipe.get("act_bits") else ""))
    if recipe.get("prune_amount"):
        print(f"pruned:       {recipe.get('prune_method')} {recipe.get('prune_kind')} {recipe['prune_amount']:.0%}")
    print(f"parameters:   {measure.count_params(model):,} ({n:,} in the block Linears, "
          f"{sum(int((m.weight != 0).sum()) for m in linears.values()):,} of them non-zero)")
    print(f"file size:    {measure.file_bytes(path) / 1024:.1f} KB")
    corpus = llm.load_corpus()
    if meta.get("sha256") == corpus.sha256 and tok.chars == corpus.tokenizer.chars:
        bpc = llm.evaluate_bpc(model, corpus.ids("val"))
        print(f"validation:   {bpc.bits_per_char:.4f} bits/char (perplexity {bpc.perplexity:.3f}) on {bpc.chars:,} "
              f"characters of {corpus.name} (Python {corpus.python_version})")
    else:
        print(f"validation:   not measured: the checkpoint was trained on a corpus with sha256 "
              f"{str(meta.get('sha256'))[:12]}, this Python's is {corpus.sha256[:12]}")


def cmd_info(args: argparse.Namespace) -> None:
    from . import measure
    from .llm.checkpoint import is_gpt_checkpoint
    from .train import evaluate

    if is_gpt_checkpoint(args.checkpoint):
        return _info_lm(args.checkpoint)

    model, spec, meta = _load(args.checkpoint)
    recipe = meta.get("recipe", {})
    quantized = f", weights {recipe['weight_bits']}-bit" if recipe.get("weight_bits") else ""
    print(f"model:        {spec['name']} {spec['options'] or ''}{quantized}".rstrip())
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


def cmd_generate(args: argparse.Namespace) -> None:
    from . import llm
    from .llm.checkpoint import is_gpt_checkpoint

    from .models import read_checkpoint

    if not is_gpt_checkpoint(args.checkpoint):
        read_checkpoint(args.checkpoint)  # one line for a missing, foreign or unsafe file
        raise WorkbenchError(f"{args.checkpoint!r} is an image classifier's checkpoint; `workbench generate` "
                             "continues text with a GPT (`workbench train --model gpt --dataset pydoc --out gpt.pt`)")
    if args.top_k is not None and args.top_k < 1:
        raise WorkbenchError(f"--top-k must be >= 1 (the number of likeliest characters to sample from), got {args.top_k}")
    model, tok, _ = llm.checkpoint.load(args.checkpoint)
    text = llm.generate(model, tok, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_k=args.top_k, seed=args.seed)
    print(args.prompt + text)


def _provider_names(text: str | None) -> str | list[str] | None:
    """--providers as resolve_providers takes it, checked before anything is exported."""
    from . import onnx as wonnx

    if text is None:
        return None
    names = "auto" if text.strip().lower() == "auto" else [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise WorkbenchError(f"--providers is empty ({text!r}); give auto or names such as cuda,cpu")
    wonnx.resolve_providers(names)  # an unknown or uninstalled provider fails here, before any file is written
    return names


def cmd_export(args: argparse.Namespace) -> None:
    from . import measure
    from . import onnx as wonnx

    model, spec, meta = _load(args.checkpoint)
    providers = _provider_names(args.providers)
    out = Path(args.out)
    if str(args.out) and out.resolve() == Path(args.checkpoint).resolve():
        raise WorkbenchError(f"--out {args.out!r} would overwrite the checkpoint it exports; "
                             f"give the ONNX file its own name such as {str(out.with_suffix('.onnx'))!r}")
    recipe = meta.get("recipe", {})
    lines = []
    with _Outputs() as outs:
        outs.add(args.out, "--out", "model.onnx")
        opt_path = out.with_name(f"{out.stem}.{args.opt_level}.onnx") if args.opt_level else None
        if opt_path:
            outs.add(opt_path, "the --opt-level output", "model.onnx")
        path = wonnx.export(model, outs.tmp(out), input_shape=tuple(spec["input_shape"]))
        lines.append(f"wrote {out} ({measure.file_bytes(path) / 1024:.1f} KB), onnx.checker passed")
        if recipe.get("dataset"):
            ds = _load_data(recipe["dataset"], args.data_root, int(recipe.get("seed", 0)))
            p = wonnx.parity(model, path, ds.X_test)
            lines.append(f"parity vs PyTorch on {p.n} test examples: max abs err {p.max_abs_err:.2e}, "
                         f"top-1 agreement {p.top1_agreement:.4f}")
        if opt_path:
            import onnx

            graph = wonnx.optimized_graph(path, args.opt_level)
            onnx.save(graph, str(outs.tmp(opt_path)))
            ops: dict[str, int] = {}
            for node in graph.graph.node:
                ops[node.op_type] = ops.get(node.op_type, 0) + 1
            lines.append(f"wrote {opt_path}: {len(graph.graph.node)} nodes after '{args.opt_level}' optimization: "
                         + ", ".join(f"{op} x{n}" for op, n in sorted(ops.items())))
        if providers:
            import numpy as np

            x = np.zeros((1, *spec["input_shape"]), dtype=np.float32)
            rep = wonnx.provider_report(path, x, providers=providers)
            lines.append(f"providers: asked {', '.join(rep.requested)}; session uses {', '.join(rep.session_providers)}"
                         + ("  (FELL BACK: the first provider could not start)" if rep.fell_back else ""))
            lines.append("nodes per provider: " + ", ".join(f"{k} {v}" for k, v in rep.counts().items()))
    print("\n".join(lines))


def cmd_bench(args: argparse.Namespace) -> int:
    from . import bench

    report = bench.run_bench(args.only, cache=args.cache)
    if args.json:
        bench.write_json(report, args.json)
        print(f"wrote {args.json}")
    width = max(len(k) for k in report["figures"])
    for key, value in report["figures"].items():
        bar = report["bars"].get(key)
        mark = "" if bar is None else f"  {'ok  ' if bar['ok'] else 'MISS'} {bar['bar']}"
        print(f"{key:<{width}}  {value:<12.6g}{mark}")
    failed = bench.failed_bars(report)
    for line in failed:
        print(f"workbench bench: bar missed: {line}", file=sys.stderr)
    return 1 if failed and args.check else 0


def build_parser() -> argparse.ArgumentParser:
    # Choices are the library's own constants and defaults the Recipe's, so the CLI never drifts from them.
    from . import __version__
    from .data import DATASETS
    from .models import MODELS
    from .onnx import OPT_LEVELS
    from .quant import CALIBRATIONS, GRANULARITIES
    from .recipe import (CORPORA, LANGUAGE_MODELS, ORT_QUANT_MODES, PRUNE_KINDS, PRUNE_METHODS, PRUNE_SCHEDULES,
                         PRUNE_SCOPES, QUANT_METHODS)
    from .schedules import KINDS
    from .train import OPTIMIZERS

    parser = _Parser(prog="workbench", description=__doc__.split(":")[0] + ".")
    parser.add_argument("--version", action="version", version=f"workbench {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def training_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default=_default("model"), choices=[*MODELS, *LANGUAGE_MODELS],
                       help="an image classifier of the zoo, or gpt (a character-level language model)")
        p.add_argument("--dataset", default=_default("dataset"), choices=[*DATASETS, *CORPORA],
                       help="an image dataset, or pydoc (the text corpus the gpt trains on)")
        p.add_argument("--data-root", help="folder with the dataset files (mnist, fashion-mnist, cifar10)")
        p.add_argument("--epochs", type=int, default=_default("epochs"))
        p.add_argument("--lr", type=float, default=_default("lr"))
        p.add_argument("--batch-size", type=int, default=_default("batch_size"))
        p.add_argument("--optimizer", default=_default("optimizer"), choices=list(OPTIMIZERS))
        p.add_argument("--weight-decay", type=float, default=_default("weight_decay"))
        p.add_argument("--seed", type=int, default=_default("seed"))
        p.add_argument("--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                       help="model option, repeatable (e.g. --option batchnorm=false --option hidden=[512,256]; "
                            "for gpt, its training settings: --option steps=300 --option n_layer=4)")
        p.add_argument("--lr-schedule", default=_default("lr_schedule"), choices=list(KINDS),
                       help="learning-rate decay over the training epochs (chapter 7)")
        p.add_argument("--lr-option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                       help="schedule setting, repeatable: gamma, power, min_lr_ratio, step_epochs, warmup_epochs, "
                            "warmup_start (e.g. --lr-schedule cosine --lr-option warmup_epochs=2)")
        p.add_argument("--no-cache", action="store_true", help="recompute even if this recipe is cached")
        p.add_argument("--out", required=True, help="checkpoint file to write (e.g. model.pt)")
        p.add_argument("--register", metavar="NAME",
                       help="also register the ONNX model in the model registry as the next version of NAME "
                            "(alias challenger; see `workbench registry`)")
        p.add_argument("--registry", metavar="URI",
                       help="MLflow tracking URI of the registry (default $WORKBENCH_REGISTRY_URI or a SQLite "
                            "file under $WORKBENCH_CACHE/registry)")

    p = sub.add_parser("train", help="train a model of the zoo and save a checkpoint",
                       description="Train a model through the Recipe pipeline (cached) and save a checkpoint.")
    training_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("compress", help="train (or fetch) a model, then prune and/or quantize it, save the result",
                       description="Compress a model of the zoo through the Recipe pipeline and compare it with "
                                   "the dense model (both cached).")
    training_flags(p)
    p.add_argument("--prune", type=float, default=_default("prune_amount"), metavar="AMOUNT",
                   help="fraction of weights (unstructured) or channels (structured) to remove, in [0, 1)")
    p.add_argument("--prune-kind", default=_default("prune_kind"), choices=list(PRUNE_KINDS),
                   help="2:4 (gpt only; with --prune 0.5) keeps 2 weights of every 4 consecutive inputs")
    p.add_argument("--prune-method", default=_default("prune_method"), choices=list(PRUNE_METHODS),
                   help="gpt only: wanda (|W| x input norm, per output row) and sparsegpt (OBS reconstruction), "
                        "without retraining")
    p.add_argument("--scope", default=_default("prune_scope"), choices=list(PRUNE_SCOPES),
                   help="unstructured: rank weights over all layers together (global), within each layer, or "
                   "per-layer amounts (at most --prune) from a sensitivity scan")
    p.add_argument("--schedule", default=_default("prune_schedule"), choices=list(PRUNE_SCHEDULES),
                   help="gradual: Zhu & Gupta's cubic schedule in --steps rounds")
    p.add_argument("--steps", type=int, default=_default("prune_steps"), help="rounds of the gradual schedule")
    p.add_argument("--finetune-epochs", type=int, default=_default("finetune_epochs"),
                   help="fine-tuning epochs after (each round of) pruning")
    p.add_argument("--finetune-lr", type=float, default=_default("finetune_lr"), help="default: --lr / 10")
    p.add_argument("--exclude", action="append", default=[], metavar="LAYER", help="layer to keep dense, repeatable")
    p.add_argument("--bits", type=int, default=_default("weight_bits"),
                   help="weight bits (1..16; 0 keeps float weights)")
    p.add_argument("--act-bits", type=int, default=None, help="activation bits (default 8 with --bits, else 0)")
    p.add_argument("--granularity", default=_default("quant_granularity"), choices=list(GRANULARITIES))
    p.add_argument("--group-size", type=int, default=_default("group_size"), metavar="G",
                   help="one scale per G consecutive inputs of each output channel (implies per-group)")
    p.add_argument("--quant-method", default=_default("quant_method"), choices=list(QUANT_METHODS),
                   help="gpt only: gptq and awq (weight-only), smoothquant (with --act-bits 8)")
    p.add_argument("--asymmetric", action="store_true", help="asymmetric weight ranges (default symmetric)")
    p.add_argument("--calibration", default=_default("calibration"), choices=list(CALIBRATIONS))
    p.add_argument("--qat", type=int, nargs="?", const=3, default=_default("qat_epochs"), metavar="EPOCHS",
                   help="quantization-aware training epochs after calibration (--qat alone: 3)")
    p.add_argument("--fold-bn", action="store_true", help="fold BatchNorm into the preceding Conv/Linear layer")
    p.add_argument("--ort-quant", default=_default("ort_quant"), choices=list(ORT_QUANT_MODES),
                   help="quantize the exported ONNX model to int8 with ONNX Runtime: dynamic, static (QDQ, "
                        "calibrated on training images) or auto (static for convolutions, dynamic otherwise)")
    p.add_argument("--onnx", metavar="PATH", help="also write the compressed model's ONNX file")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("info", help="parameters, MACs, size and test accuracy of a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--data-root", help="folder with the dataset files, if not the default")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("generate", help="continue a prompt with a GPT checkpoint (greedy, or sampled with a seed)")
    p.add_argument("checkpoint", help="a GPT checkpoint written by `workbench train/compress --model gpt`")
    p.add_argument("--prompt", required=True, help="the text to continue (characters of the model's vocabulary)")
    p.add_argument("--max-new-tokens", type=int, default=200, metavar="N", help="characters to generate (default 200)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); e.g. 0.8 samples")
    p.add_argument("--top-k", type=int, default=None, metavar="K", help="sample among the K likeliest characters")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler (the same seed gives the same text)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("export", help="export a checkpoint to ONNX and print its parity with PyTorch")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True, help="ONNX file to write (e.g. model.onnx)")
    p.add_argument("--data-root", help="folder with the dataset files, if not the default")
    p.add_argument("--opt-level", choices=list(OPT_LEVELS), metavar="LEVEL",
                   help=f"also write the graph as ONNX Runtime optimizes it at this level ({', '.join(OPT_LEVELS)}) "
                        "to OUT with .LEVEL.onnx, and print its operators")
    p.add_argument("--providers", metavar="NAMES",
                   help="run once on these execution providers (auto, or e.g. cuda,cpu) and report which "
                        "provider ran each node")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("bench", help="run the benchmark groups and print/write the measured figures")
    p.add_argument("--json", metavar="PATH", help="write {machine, results, figures} as JSON to PATH")
    p.add_argument("--only", action="append", metavar="GROUP",
                   help="run only this group (repeatable); 'margins' (not run by default) trains every baseline "
                        "over seeds 0..4 and checks each seed against its bar")
    p.add_argument("--check", action="store_true",
                   help="exit with status 1 if a figure misses its bar (workbench.bars.BARS), one line each")
    p.add_argument("--cache", metavar="DIR", help="result cache folder (default $WORKBENCH_CACHE or ~/.cache/workbench)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("edition", help="write the student or instructor edition of the chapters (otter-grader)",
                       description="Student edition: solutions replaced by '...', graders kept, answers removed, "
                                   "plus an autograder per chapter. Instructor edition: solutions and answers kept.")
    p.add_argument("which", choices=["student", "instructor"])
    p.add_argument("notebooks", nargs="*", help="chapter notebooks (default: every chapter in notebooks/)")
    p.add_argument("--out", default="_build/editions", help="folder to write into (default _build/editions)")
    p.set_defaults(func=cmd_edition)

    p = sub.add_parser("autograde", help="score a student's chapter notebook, exercise by exercise",
                       description="Run the chapter's autograder (written by `workbench edition student`) on a "
                                   "student's notebook in a fresh kernel and print the score of each exercise.")
    p.add_argument("submission", help="the student's .ipynb (named like the chapter, e.g. 02_pruning.ipynb)")
    p.add_argument("--autograder", metavar="ZIP", help="default: EDITIONS/autograder/<chapter>.zip")
    p.add_argument("--editions", default="_build/editions", help="where `workbench edition` wrote (default "
                                                                  "_build/editions)")
    p.add_argument("--json", metavar="PATH", help="also write the scores as JSON")
    p.set_defaults(func=cmd_autograde)

    from .serve.cli import add_subcommands as add_serve_subcommands

    add_serve_subcommands(sub)  # serve, registry list|promote|rollback (MLflow/FastAPI load only when run)
    return parser


def cmd_edition(args: argparse.Namespace) -> int:
    from . import editions

    notebooks = args.notebooks or editions.chapters()
    built = editions.build(notebooks, args.out, which=[args.which])
    print(editions.summary(built))
    print(f"{args.which} edition: {Path(args.out) / args.which}"
          + (f" (autograders: {Path(args.out) / 'autograder'})" if args.which == "student" else ""))
    return 0


def cmd_autograde(args: argparse.Namespace) -> int:
    from . import editions

    report = editions.autograde(args.submission, args.autograder, editions=args.editions)
    print(report)
    if args.json:
        from .bench import write_json

        write_json(report.to_dict(), args.json)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `workbench` console script. User errors print one line and return 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except WorkbenchError as exc:
        print(f"workbench {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
