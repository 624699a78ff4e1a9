"""Pipelines: ``pipelines.toml`` parsed once into frozen dataclasses and validated completely.

Every error names the file, the pipeline, the stage and the key, so an artist can fix the file
without reading code. Nothing is started before the whole file validates.
"""

from __future__ import annotations

import math
import os
import tomllib
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from cuepipe.orchestrator import defaults
from cuepipe.stages import STAGES, load
from cuepipe.stages.errors import CuepipeError, ErrorKind
from cuepipe.stages.sender import parse_address
from cuepipe.stages.stage import Param, ParamKind


class ConfigError(CuepipeError):
    """``pipelines.toml`` is invalid; the message names file, pipeline, stage and key."""

    kind = ErrorKind.CONFIG_INVALID

    def __init__(
        self, file: Path | str, message: str, pipeline: str | None = None,
        stage: str | None = None, key: str | None = None,
    ) -> None:
        where = [str(file)]
        if pipeline is not None:
            where.append(f"pipeline {pipeline!r}")
        if stage is not None:
            where.append(f"stage {stage}")
        if key is not None:
            where.append(f"key {key!r}")
        super().__init__(": ".join([", ".join(where), message]))
        self.file, self.pipeline, self.stage, self.key = str(file), pipeline, stage, key


@dataclass(frozen=True)
class Step:
    """One step of a Pipeline: which Stage program runs, with its parameters and supervision limits.

    (Not a Stage itself: a Stage is the program; the same Stage may be several Steps of a Pipeline.)"""

    name: str
    params: Mapping[str, Any]
    timeout: float
    stall_timeout: float | None
    retries: int
    keep: bool  # also publish this stage's outputs (the last stage's are always published)
    warm: bool = False  # under `cuepipe serve`, run on a resident Worker that keeps its model loaded
    stream: bool = False  # its input streams from the previous Step while that runs (stages/stream.py)

    def label(self, index: int) -> str:
        return f"{index} {self.name!r}"


@dataclass(frozen=True)
class Pipeline:
    name: str
    description: str
    stages: tuple[Step, ...]
    out: Path
    report: tuple[tuple[str, int], ...]
    resource: str = defaults.RESOURCE  # which daemon slot pool the pipeline's jobs use (e.g. cpu, gpu)
    keep_running: bool = False  # the daemon starts it again after it fails (live jobs, exhibitions)

    def groups(self) -> list[tuple[int, ...]]:
        """The Steps' indices in runs that execute together: each Step that streams joins the previous one's."""
        out: list[list[int]] = []
        for index, step in enumerate(self.stages):
            if step.stream and out:
                out[-1].append(index)
            else:
                out.append([index])
        return [tuple(g) for g in out]


@dataclass(frozen=True)
class PipelineFile:
    path: Path
    pipelines: Mapping[str, Pipeline] = field(default_factory=dict)


_STAGE_KEYS = {"stage", "params", "timeout", "stall_timeout", "retries", "keep", "warm", "stream"}
_PIPELINE_KEYS = {"description", "stages", "out", "report", "resource", "keep_running", "stream"}
_DEFAULT_KEYS = {"timeout", "stall_timeout", "retries", "out", "report"}


def find_file(explicit: Path | None = None) -> Path:
    """The pipelines file: ``--pipelines``, ``$CUEPIPE_PIPELINES``, ``./pipelines.toml``, the repo's."""
    for candidate in (explicit, os.environ.get("CUEPIPE_PIPELINES")):
        if candidate:
            return Path(candidate)
    local = Path.cwd() / defaults.PIPELINES_FILE
    return local if local.is_file() else defaults.REPO_ROOT / defaults.PIPELINES_FILE


def stage_params(name: str) -> Mapping[str, Param]:
    params: Mapping[str, Param] = load(name).PARAMS
    return params


def coerce_params(
    file: Path | str, pipeline: str, label: str, stage: str, raw: Mapping[str, Any], base: Path,
) -> dict[str, Any]:
    """Check every parameter against the stage's declared ``PARAMS``; anchor paths at ``base``."""
    declared = stage_params(stage)
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "stream_out":
            raise ConfigError(file, "set by the launcher for a streamed pipeline; declare stream = true instead",
                              pipeline, label, key)
        if key not in declared:
            known = ", ".join(sorted(declared)) or "none"
            raise ConfigError(file, f"unknown parameter (stage {stage!r} takes: {known})", pipeline, label, key)
        try:
            value = declared[key].coerce(value)
        except ValueError as exc:
            raise ConfigError(file, str(exc), pipeline, label, key) from None
        out[key] = _anchor(base, declared[key], value)
    return out


def named_file(param: Param, value: Any) -> Path | None:
    """The file a parameter value names, or None when it names none (a plain parameter, a colour or
    keyword of a MEDIA parameter, a manifest model name, unset).

    The one rule behind anchoring relative paths, the daemon's ``--root`` check and ``cuepipe check``:
    a parameter that can name a file is declared so (``ParamKind``), and every value that is not one
    of its declared words is a path.
    """
    if param.kind is ParamKind.PLAIN or not isinstance(value, str) or not value.strip():
        return None
    text = value.strip()
    if param.kind is ParamKind.MEDIA and (text.startswith("#") or text.lower() in param.words):
        return None
    if param.kind is ParamKind.MODEL:
        from cuepipe.models import load_manifest  # stdlib-only; imported late to keep start-up light

        if text in load_manifest():
            return None
    return Path(text).expanduser()


def _anchor(base: Path, param: Param, value: Any) -> Any:
    """Relative file paths in parameters are relative to the pipelines file (stages run elsewhere).

    A bare word given to a MODEL parameter stays as it is, so a mistyped model name is reported as an
    unknown model, not as a missing file.
    """
    path = named_file(param, value)
    if path is None or path.is_absolute():
        return value
    if param.kind is ParamKind.MODEL and path.suffix.lower() != ".onnx" and path.parent == Path("."):
        return value
    return str((base / path).resolve())


def _number(file: Path, value: Any, what: str, pipeline: str | None, label: str | None, key: str,
            integer: bool = False, positive: bool = False) -> Any:
    """A finite number >= 0 (> 0 with ``positive``): TOML's nan and inf are refused, as is a zero timeout,
    which would kill every stage at once."""
    ok = isinstance(value, int) if integer else isinstance(value, int | float) and math.isfinite(value)
    if isinstance(value, bool) or not ok or value < 0 or (positive and value == 0):
        kind = "an integer" if integer else "a finite number"
        kind += " > 0" if positive else " >= 0"
        raise ConfigError(file, f"{what} must be {kind}, got {value!r}", pipeline, label, key)
    return value


def _reports(file: Path, value: Any, pipeline: str | None) -> tuple[tuple[str, int], ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(file, f'expected a list of "HOST:PORT" strings, got {value!r}', pipeline, key="report")
    try:
        return tuple(parse_address(v) for v in value)
    except ValueError as exc:
        raise ConfigError(file, str(exc), pipeline, key="report") from None


def _stage(file: Path, pipeline: str, index: int, raw: Any, base: Mapping[str, Any], stream: bool = False) -> Step:
    label = str(index)
    if not isinstance(raw, dict):
        raise ConfigError(file, "each stage must be a table", pipeline, label)
    name = raw.get("stage")
    if not isinstance(name, str):
        raise ConfigError(file, "missing stage name", pipeline, label, "stage")
    if name not in STAGES:
        raise ConfigError(file, f"unknown stage {name!r} (known: {', '.join(STAGES)})", pipeline, label, "stage")
    label = f"{index} {name!r}"
    try:
        stage_params(name)
    except ImportError as exc:
        raise ConfigError(file, f"stage module {STAGES[name]!r} cannot be imported: {exc}", pipeline, label,
                          "stage") from None
    for key in raw:
        if key not in _STAGE_KEYS:
            raise ConfigError(file, f"unknown key (allowed: {', '.join(sorted(_STAGE_KEYS))})", pipeline, label, key)
    params = raw.get("params", {})
    if not isinstance(params, dict):
        raise ConfigError(file, "params must be a table", pipeline, label, "params")
    merged = {**base, **{k: raw[k] for k in ("timeout", "stall_timeout", "retries") if k in raw}}
    keep, warm, stream = raw.get("keep", False), raw.get("warm", False), raw.get("stream", stream and index > 0)
    for key, value in (("keep", keep), ("warm", warm), ("stream", stream)):
        if not isinstance(value, bool):
            raise ConfigError(file, f"{key} must be true or false, got {value!r}", pipeline, label, key)
    stall = merged.get("stall_timeout")
    return Step(
        name=name,
        params=MappingProxyType(coerce_params(file, pipeline, label, name, params, file.parent)),
        timeout=float(_number(file, merged["timeout"], "timeout", pipeline, label, "timeout", positive=True)),
        stall_timeout=None if stall in (None, 0) else float(
            _number(file, stall, "stall_timeout", pipeline, label, "stall_timeout")),
        retries=int(_number(file, merged["retries"], "retries", pipeline, label, "retries", integer=True)),
        keep=keep,
        warm=warm,
        stream=stream,
    )


def _check_streams(file: Path, pipeline: str, steps: Sequence[Step]) -> None:
    """Each streamed edge joins a Stage that can stream its output to one that can take a stream."""
    for index, step in enumerate(steps):
        if not step.stream:
            continue
        if index == 0:
            raise ConfigError(file, "the first stage has no stage before it to stream from", pipeline,
                              step.label(index), "stream")
        before = steps[index - 1]
        if "stream_out" not in stage_params(before.name):
            raise ConfigError(file, f"stage {before.name!r} cannot stream its output (set stream = false here)",
                              pipeline, step.label(index), "stream")
        if not getattr(load(step.name), "STREAM_IN", False):
            raise ConfigError(file, f"stage {step.name!r} cannot take a stream (set stream = false here)",
                              pipeline, step.label(index), "stream")


def parse(text: str, path: Path) -> PipelineFile:
    """Parse and validate the whole file; raise ConfigError at the first problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, f"invalid TOML: {exc}") from None
    version = data.get("version", 1)
    if version != 1:
        raise ConfigError(path, f"unsupported version {version!r} (this cuepipe reads version 1)", key="version")
    for key in data:
        if key not in {"version", "defaults", "pipelines"}:
            raise ConfigError(path, "unknown top-level key (allowed: version, defaults, pipelines)", key=key)
    raw_defaults = data.get("defaults", {})
    for key in raw_defaults:
        if key not in _DEFAULT_KEYS:
            raise ConfigError(path, f"unknown key in [defaults] (allowed: {', '.join(sorted(_DEFAULT_KEYS))})",
                              key=key)
    base = {"timeout": defaults.STAGE_TIMEOUT, "stall_timeout": defaults.STALL_TIMEOUT,
            "retries": defaults.STAGE_RETRIES}
    base.update({k: raw_defaults[k] for k in ("timeout", "stall_timeout", "retries") if k in raw_defaults})
    default_out = raw_defaults.get("out", defaults.OUT_DIR)
    default_report = _reports(path, raw_defaults.get("report", []), None)
    pipelines_raw = data.get("pipelines", {})
    if not isinstance(pipelines_raw, dict) or not pipelines_raw:
        raise ConfigError(path, "no pipelines declared (add a [pipelines.NAME] table)", key="pipelines")
    pipelines: dict[str, Pipeline] = {}
    for pname, praw in pipelines_raw.items():
        if not isinstance(praw, dict):
            raise ConfigError(path, "must be a table", pname)
        for key in praw:
            if key not in _PIPELINE_KEYS:
                raise ConfigError(path, f"unknown key (allowed: {', '.join(sorted(_PIPELINE_KEYS))})", pname, key=key)
        stages_raw = praw.get("stages")
        if not isinstance(stages_raw, list) or not stages_raw:
            raise ConfigError(path, "needs at least one [[pipelines.NAME.stages]] entry", pname, key="stages")
        out = praw.get("out", default_out)
        if not isinstance(out, str) or not out:
            raise ConfigError(path, f"out must be a folder path string, got {out!r}", pname, key="out")
        description = praw.get("description", "")
        if not isinstance(description, str):
            raise ConfigError(path, "description must be a string", pname, key="description")
        resource = praw.get("resource", defaults.RESOURCE)
        if not isinstance(resource, str) or not resource:
            raise ConfigError(path, f"resource must be a name such as 'cpu' or 'gpu', got {resource!r}", pname,
                              key="resource")
        keep_running, stream = praw.get("keep_running", False), praw.get("stream", False)
        for key, value in (("keep_running", keep_running), ("stream", stream)):
            if not isinstance(value, bool):
                raise ConfigError(path, f"{key} must be true or false, got {value!r}", pname, key=key)
        steps = tuple(_stage(path, pname, i, s, base, stream) for i, s in enumerate(stages_raw))
        _check_streams(path, pname, steps)
        pipelines[pname] = Pipeline(
            name=pname,
            description=description,
            stages=steps,
            # Relative folders are relative to the pipelines file, not to whatever folder TD runs in.
            out=(path.parent / out).resolve(),
            report=default_report + _reports(path, praw.get("report", []), pname),
            resource=resource,
            keep_running=keep_running,
        )
    return PipelineFile(path=path, pipelines=MappingProxyType(pipelines))


def load_file(path: Path) -> PipelineFile:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(path, "file not found (use --pipelines FILE or set CUEPIPE_PIPELINES)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(path, f"cannot read: {exc}") from None
    return parse(text, path)


def missing_resources(pipeline: Pipeline) -> list[str]:
    """Models and files a pipeline's parameters name that are not present (``cuepipe check``)."""
    from cuepipe.models import ModelError, resolve  # models/ is stdlib-only; imported late to keep start-up light

    problems = []
    for index, stage in enumerate(pipeline.stages):
        declared = stage_params(stage.name)
        for key, param in declared.items():
            value = stage.params.get(key, param.default)
            if value is None:
                continue
            where = f"pipeline {pipeline.name!r}, stage {stage.label(index)}, key {key!r}"
            if param.kind is ParamKind.MODEL:
                try:
                    resolve(str(value))
                except ModelError as exc:
                    problems.append(f"{where}: missing model: {exc}")
            elif (path := named_file(param, value)) is not None and not path.exists():
                problems.append(f"{where}: missing file {value}")
    return problems


def apply_overrides(file: PipelineFile, pipeline: Pipeline, sets: list[str]) -> Pipeline:
    """Apply ``--set STAGE.KEY=VALUE`` (STAGE: a stage name or index) with the same validation."""
    stages = list(pipeline.stages)
    for text in sets:
        target, eq, value = text.partition("=")
        stage_ref, dot, key = target.partition(".")
        if not eq or not dot or not key:
            raise ConfigError("--set", f"expected STAGE.KEY=VALUE, got {text!r}", pipeline.name)
        if stage_ref.isdigit():
            indices = [int(stage_ref)] if int(stage_ref) < len(stages) else []
        else:
            indices = [i for i, s in enumerate(stages) if s.name == stage_ref]
        if not indices:
            names = ", ".join(f"{i} {s.name!r}" for i, s in enumerate(stages))
            raise ConfigError("--set", f"no stage {stage_ref!r} in this pipeline (stages: {names})", pipeline.name)
        for i in indices:
            stage = stages[i]
            label = stage.label(i)
            # A value typed on the command line: relative paths are relative to the current folder.
            params = coerce_params("--set", pipeline.name, label, stage.name, {key: value}, Path.cwd())
            stages[i] = replace(stage, params=MappingProxyType({**stage.params, **params}))
    return replace(pipeline, stages=tuple(stages))


def describe_pipeline(p: Pipeline) -> dict[str, Any]:
    """One Pipeline as JSON-ready data."""
    return {
        "name": p.name,
        "description": p.description,
        "out": str(p.out),
        "stages": [
            {"stage": s.name, "params": dict(s.params), "timeout": s.timeout, "stall_timeout": s.stall_timeout,
             "retries": s.retries, "keep": s.keep, "warm": s.warm, "stream": s.stream}
            for s in p.stages
        ],
    }


def describe(pipelines: PipelineFile) -> dict[str, Any]:
    """The pipelines file as JSON-ready data (what ``cuepipe pipelines --json`` prints for TD)."""
    return {"file": str(pipelines.path), "pipelines": [describe_pipeline(p) for p in pipelines.pipelines.values()]}


class RequestError(CuepipeError):
    """A request cannot run as asked; ``kind`` says why (unknown pipeline, bad override, not allowed,
    missing model or input): what ``cuepipe run`` reports as ``job/failed`` and the daemon as a refusal."""


def under_roots(path: Path, roots: Sequence[Path]) -> bool:
    """True when ``path`` — symlinks and ``..`` resolved — lies inside one of ``roots``."""
    resolved = path.resolve()
    return any(resolved.is_relative_to(root.resolve()) for root in roots)


def resolve_request(pipelines: PipelineFile, name: str, sets: Sequence[str] = (),
                    input: Path | str | None = None, roots: Sequence[Path] | None = None) -> Pipeline:
    """The one way a request becomes a runnable Pipeline, for ``cuepipe run`` and ``cuepipe serve`` alike.

    In order: the pipeline exists; the overrides are valid; with ``roots`` (the daemon), every value
    that names a file and the input lie under them (checked before existence, so a refusal tells
    nothing about files outside); the models and files the pipeline names exist; the input exists.
    A live input (``ndi://``, ``camera://``: no file) is checked only for a first stage that takes
    one; ``play://PATH`` plays a file, so its path is checked like an input's.
    Raises RequestError (or ConfigError for an override) whose ``kind`` says which check failed.
    """
    if name not in pipelines.pipelines:
        raise RequestError(f"unknown pipeline {name!r} in {pipelines.path} (known: {', '.join(pipelines.pipelines)})",
                           ErrorKind.UNKNOWN_PIPELINE)
    pipeline = apply_overrides(pipelines, pipelines.pipelines[name], list(sets))
    if isinstance(input, str):  # a live URL (stages.stage.job_input)
        first = pipeline.stages[0].name
        if not getattr(load(first), "LIVE", False):
            raise RequestError(f"{input}: a live input, but the first stage {first!r} of {name!r} takes files only",
                               ErrorKind.BAD_ARGUMENT)
        scheme, _, rest = input.partition("://")
        # a file to play is checked below like any input (decoded as stages/live.py reads it)
        input = Path(urllib.parse.unquote(rest.split("?", 1)[0])) if scheme == "play" else None
    if roots is not None:
        for stage in pipeline.stages:
            declared = stage_params(stage.name)
            for key, value in stage.params.items():
                path = named_file(declared[key], value)
                if path is not None and not under_roots(path, roots):
                    raise RequestError(f"{stage.name}.{key}: {value} is outside the allowed roots",
                                       ErrorKind.NOT_ALLOWED)
        if input is not None:
            if not input.is_absolute():
                raise RequestError(f"input must be an absolute path, got {str(input)!r}", ErrorKind.BAD_ARGUMENT)
            if not under_roots(input, roots):
                raise RequestError(f"{input} is outside the allowed roots ({', '.join(map(str, roots))})",
                                   ErrorKind.NOT_ALLOWED)
    missing = missing_resources(pipeline)
    if missing:
        raise RequestError("; ".join(missing), ErrorKind.MODEL_MISSING)
    if input is not None and not input.is_file() and not input.is_dir():
        raise RequestError(f"input not found: {input}", ErrorKind.INPUT_MISSING)
    return pipeline
