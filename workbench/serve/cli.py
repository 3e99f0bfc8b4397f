"""The `serve` and `registry` subcommands of the `workbench` CLI (also ``python -m workbench.serve``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

from ..errors import WorkbenchError
from . import DEFAULT_HOST, DEFAULT_PORT, require_extra

__all__ = ["add_subcommands", "check_exposure", "main"]

_LOOPBACK_NAMES = ("localhost", "localhost.")


def _registry(args: argparse.Namespace):
    require_extra()
    from .registry import Registry

    return Registry(args.registry)


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost: it may resolve to anything


def check_exposure(host: str, api_key: str | None, insecure: bool) -> str | None:
    """Refuse to serve beyond this machine without an API key; return the warning to print, if any.

    Raises:
        WorkbenchError: `host` is not a loopback address, no key is set and `insecure` is not.
    """
    if api_key or _is_loopback(host):
        return None
    if not insecure:
        raise WorkbenchError(f"refusing to listen on {host} without an API key: anyone who can reach it could "
                             f"predict and reload models; set WORKBENCH_API_KEY (or --api-key), or pass --insecure")
    return (f"workbench serve: warning: listening on {host} without an API key (--insecure): anyone who can reach "
            f"this port can call every route, /admin/reload included")


def cmd_serve(args: argparse.Namespace) -> None:
    require_extra()
    warning = check_exposure(args.host, args.api_key, args.insecure)  # before loading anything: fail fast
    from .app import ServeSettings, create_app, run_server

    settings = ServeSettings(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_rows=args.max_rows,
                             max_body_bytes=args.max_body_bytes, api_key=args.api_key or None,
                             poll_seconds=args.poll_seconds, threads=args.threads,
                             body_timeout_s=args.body_timeout_s)
    if args.model is None and args.gpt is None:
        raise WorkbenchError("nothing to serve: give --model (an ONNX model or NAME@ALIAS) and/or --gpt (a GPT checkpoint)")
    engine = None
    where = f"http://{args.host}:{args.port}"
    if args.gpt is not None:
        from ..llm import checkpoint
        from .generate import GenerateSettings, GenerationEngine, create_generate_app

        model, tok, _ = checkpoint.load(args.gpt)
        gen_settings = GenerateSettings(max_batch=args.max_batch, max_body_bytes=args.max_body_bytes,
                                        api_key=args.api_key or None, body_timeout_s=args.body_timeout_s)
        if args.model is None:
            app = create_generate_app(model, tok, gen_settings)
            banner = (f"serving the GPT {args.gpt} on {where}: POST /generate (server-sent events), GET /health "
                      f"/metrics; up to {args.max_batch} sequences decoded together"
                      + (", API key required" if gen_settings.api_key else ""))
            if warning:
                print(warning, file=sys.stderr, flush=True)
            return run_server(app, host=args.host, port=args.port, log_level=args.log_level, banner=banner)
        engine = GenerationEngine(model, tok, gen_settings)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    registry = None
    if not args.model.endswith(".onnx"):
        registry = _registry(args)
    app = create_app(args.model, settings, registry=registry, generator=engine)
    m = app.state.server.model
    banner = (f"serving {m.name}/{m.version} ({args.model}) on {where}: POST /predict"
              + (" /generate" if engine is not None else "") + ", GET /health /model /metrics; "
              f"batches of <= {settings.max_batch} rows, wait <= {settings.max_wait_ms:g} ms"
              + (", API key required" if settings.api_key else ""))
    run_server(app, host=args.host, port=args.port, log_level=args.log_level, banner=banner)


def cmd_registry_list(args: argparse.Namespace) -> None:
    reg = _registry(args)
    names = [args.name] if args.name else reg.models()
    rows = [v for name in names for v in reg.versions(name)]
    if args.json:
        print(json.dumps([v.to_dict() for v in rows], indent=1))
        return
    if not rows:
        print(f"no registered models in {reg.uri}")
        return
    header = f"{'model':<20} {'ver':>4}  {'aliases':<20} {'accuracy':>8}  {'ORT p50':>9}  {'ONNX KB':>8}  description"
    print(header)
    for v in rows:
        s = v.summary()
        acc = f"{s['accuracy']:.4f}" if s["accuracy"] is not None else "-"
        lat = f"{s['ort_p50_us']:.0f} us" if s["ort_p50_us"] is not None else "-"
        kb = f"{s['onnx_kb']:.1f}" if s["onnx_kb"] is not None else "-"
        flags = " (rolled back)" if v.tags.get("rolled_back") else (" (rejected)" if v.tags.get("rejected") else "")
        print(f"{v.name:<20} {v.version:>4}  {s['aliases'] or '-':<20} {acc:>8}  {lat:>9}  {kb:>8}  "
              f"{s['description']}{flags}")


def cmd_registry_promote(args: argparse.Namespace) -> None:
    v = _registry(args).promote(args.name, args.version)
    print(f"{v.name}: champion is now version {v.version} (accuracy {v.metrics.get('accuracy', float('nan')):.4f}); "
          f"servers on {v.name}@champion swap at their next poll")


def cmd_registry_rollback(args: argparse.Namespace) -> None:
    v = _registry(args).rollback(args.name)
    print(f"{v.name}: rolled back; champion is version {v.version} again")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"expected seconds in (0, 3600] (--body-timeout-s or "
                                         f"$WORKBENCH_BODY_TIMEOUT_S), got {text!r}")
    return value


def add_subcommands(sub: Any) -> None:
    """Add ``serve`` and ``registry list|promote|rollback`` to an argparse subparsers object.

    Cheap: nothing of MLflow or FastAPI is imported until a subcommand runs.
    """
    registry_help = "MLflow tracking URI of the registry (default $WORKBENCH_REGISTRY_URI or a SQLite file " \
                    "under $WORKBENCH_CACHE/registry)"
    p = sub.add_parser("serve", help="serve a registered model over HTTP (FastAPI + ONNX Runtime)",
                       description="Serve NAME@ALIAS from the registry (hot-swapped when the alias moves) or an "
                                   ".onnx file, with dynamic batching and Prometheus metrics at /metrics.")
    p.add_argument("--model", metavar="REF",
                   help="NAME@ALIAS (e.g. digits-mlp@champion), NAME/VERSION, or a path to an .onnx file")
    p.add_argument("--gpt", metavar="CHECKPOINT",
                   help="also (or only) serve POST /generate, streaming this GPT's tokens as server-sent events "
                        "(a checkpoint of `workbench train/compress --model gpt`); --max-batch sequences decode together")
    p.add_argument("--registry", metavar="URI", help=registry_help)
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to listen on (default {DEFAULT_HOST}: this machine only; 0.0.0.0 in a container, "
                        f"which needs an API key or --insecure)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--max-batch", type=_positive, default=32, help="most rows per ONNX Runtime call (1: no batching)")
    p.add_argument("--max-wait-ms", type=float, default=2.0, help="longest a request waits for a batch to fill")
    p.add_argument("--max-rows", type=_positive, default=256, help="most examples in one request")
    p.add_argument("--max-body-bytes", type=_positive, default=1 << 20, help="largest request body")
    p.add_argument("--api-key", default=os.environ.get("WORKBENCH_API_KEY"),
                   help="require this key in the X-API-Key header (default $WORKBENCH_API_KEY; none: open, "
                        "allowed on loopback only unless --insecure)")
    p.add_argument("--insecure", action="store_true",
                   help="serve beyond loopback without an API key (prints a warning); only behind something that "
                        "authenticates")
    p.add_argument("--body-timeout-s", type=_seconds, default=os.environ.get("WORKBENCH_BODY_TIMEOUT_S", "10"),
                   help="longest wait for a request's headers, then its body; more is a 408 and the connection is "
                        "closed (default $WORKBENCH_BODY_TIMEOUT_S or 10)")
    p.add_argument("--poll-seconds", type=float, default=5.0,
                   help="how often to check whether the alias moved (0: only on POST /admin/reload)")
    p.add_argument("--threads", type=_positive, default=1, help="ONNX Runtime intra-op threads")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("registry", help="list, promote and roll back registered models",
                       description="The MLflow model registry: versions with their metrics, the champion alias, "
                                   "promotion and rollback.")
    rsub = p.add_subparsers(dest="registry_command", required=True, metavar="ACTION")
    q = rsub.add_parser("list", help="registered models and their versions")
    q.add_argument("name", nargs="?", help="only this model")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.add_argument("--registry", metavar="URI", help=registry_help)
    q.set_defaults(func=cmd_registry_list)
    q = rsub.add_parser("promote", help="make a version the champion (its sha256 is verified first)")
    q.add_argument("name")
    q.add_argument("version", type=_positive)
    q.add_argument("--registry", metavar="URI", help=registry_help)
    q.set_defaults(func=cmd_registry_promote)
    q = rsub.add_parser("rollback", help="put the previous champion back")
    q.add_argument("name")
    q.add_argument("--registry", metavar="URI", help=registry_help)
    q.set_defaults(func=cmd_registry_rollback)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m workbench.serve``: the same subcommands without the rest of the CLI."""
    parser = argparse.ArgumentParser(prog="python -m workbench.serve", description=__doc__.split("(")[0].strip())
    add_subcommands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except WorkbenchError as exc:
        print(f"workbench {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
