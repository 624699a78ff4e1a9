"""The Stage contract in code: parameter declarations, the named error, Event helpers and ``main``
(one-shot runs and the resident ``--serve`` mode alike: one runtime, one module).

Each stage module declares ``PARAMS`` (name -> ``Param``) and a ``run(**kwargs)`` function, and its
``main()`` is ``stage_main(NAME, PARAMS, run)``. The same ``PARAMS`` build the stage's argv parser
and let the orchestrator validate ``pipelines.toml`` without starting anything. Exit codes:
0 success (``done`` sent), 1 failure (``failed`` sent), 2 bad argument (``failed`` sent),
130 interrupted. See ``docs/stages.md``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import IO, Any

from cuepipe.stages.codec import info_json
from cuepipe.stages.errors import EXIT_BAD_ARGUMENT, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, CuepipeError, ErrorKind
from cuepipe.stages.parentwatch import watch_parent
from cuepipe.stages.protocol import (
    STAGE_DONE,
    STAGE_FAILED,
    STAGE_LIVE,
    STAGE_PROGRESS,
    STAGE_STARTED,
    STAGE_WARNING,
    WarningKind,
)
from cuepipe.stages.sender import EventSender, parse_address

log = logging.getLogger(__name__)

#: The largest frame side (pixels) a stage parameter may ask for: 8K. Larger sizes are typing errors
#: that would cost minutes and gigabytes before failing (100000 px wide: 52 s and 1.6 GB for 2 s).
MAX_FRAME_SIDE = 8192


class StageError(CuepipeError):
    """A failure the stage understands: reported as ``failed`` with this kind and message."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message, kind)


class ParamKind(StrEnum):
    PLAIN = "plain"
    PATH = "path"  # a file that must exist (checked before the pipeline starts)
    MODEL = "model"  # a model name from models/manifest.toml, or a path to an .onnx file
    MEDIA = "media"  # one of the Param's ``words``, a #rrggbb colour, or else a path to a file


_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


@dataclass(frozen=True)
class Param:
    """One stage parameter: its type, default, help, and optional choices / bounds."""

    type: type
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    kind: ParamKind = ParamKind.PLAIN
    words: frozenset[str] = frozenset()  # MEDIA: values (lower case) that are keywords, not files

    def coerce(self, value: Any) -> Any:
        """Return ``value`` as this parameter's type, or raise ValueError saying what was expected.

        Accepts native TOML values and the strings that come from argv or ``--set``.
        """
        if value is None or (isinstance(value, str) and value == "" and self.default is None):
            if self.default is None:
                return None
            raise ValueError(f"expected {self.type.__name__}, got nothing")
        out: Any
        if self.type is bool:
            if isinstance(value, bool):
                out = value
            elif isinstance(value, str) and value.lower() in _TRUE | _FALSE:
                out = value.lower() in _TRUE
            else:
                raise ValueError(f"expected true/false, got {value!r}")
        elif self.type is int:
            if isinstance(value, bool | float):
                raise ValueError(f"expected an integer, got {value!r}")
            try:
                out = int(value)
            except (TypeError, ValueError):
                raise ValueError(f"expected an integer, got {value!r}") from None
        elif self.type is float:
            if isinstance(value, bool):
                raise ValueError(f"expected a number, got {value!r}")
            try:
                out = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"expected a number, got {value!r}") from None
            if not math.isfinite(out):  # nan passes every bound check; inf is never meant
                raise ValueError(f"expected a finite number, got {value!r}")
        else:
            if not isinstance(value, str):
                raise ValueError(f"expected a string, got {value!r}")
            out = value
        if self.choices is not None and out not in self.choices:
            raise ValueError(f"expected one of {', '.join(map(str, self.choices))}; got {out!r}")
        if self.minimum is not None and out < self.minimum:
            raise ValueError(f"must be >= {self.minimum}, got {out!r}")
        if self.maximum is not None and out > self.maximum:
            raise ValueError(f"must be <= {self.maximum}, got {out!r}")
        return out


def option(name: str) -> str:
    """The argv option of a parameter: ``trim_start`` -> ``--trim-start``."""
    return "--" + name.replace("_", "-")


#: The execution providers an inference stage can be asked for (``cuepipe.stages.inference`` maps them to
#: onnxruntime's names), and the ``provider`` parameter every inference stage declares.
PROVIDERS = ("auto", "cpu", "cuda", "tensorrt")
PROVIDER = Param(str, "auto", "execution provider: auto, cpu, cuda or tensorrt", choices=PROVIDERS)

#: ``allow_truncated``, declared by every stage that reads its input to the end (stages.video.check_complete).
ALLOW_TRUNCATED = Param(bool, False, "accept an input that decodes fewer frames than its container declares "
                                     "(a warning instead of input_invalid)")


class StageEvents:
    """Sends one stage's Events; rate-limits ``progress`` (always sends the last frame)."""

    def __init__(
        self,
        stage: str,
        sender: EventSender | None,
        min_interval: float = 0.1,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stage = stage
        self._sender = sender
        self._min_interval = min_interval
        self._now = now
        self._start = now()
        self._last_sent = -1e9
        self._fps = 0.0
        self._mark: tuple[float, int] = (self._start, 0)

    def started(self, **info: Any) -> None:
        self._start = self._now()
        self._mark = (self._start, 0)
        log.info("%s started: %s", self.stage, info)
        if self._sender:
            self._sender.send(STAGE_STARTED, stage=self.stage, pid=os.getpid(), info=info_json(**info))

    def progress(self, frame: int, total: int) -> None:
        """Report that ``frame`` frames of ``total`` (-1: unknown) are finished."""
        t = self._now()
        last = total > 0 and frame == total  # always sent; past an underestimated total, rate-limited
        if not last and t - self._last_sent < self._min_interval:
            return
        mark_t, mark_frame = self._mark
        if t > mark_t and frame > mark_frame:
            instant = (frame - mark_frame) / (t - mark_t)
            self._fps = instant if self._fps == 0.0 else 0.7 * self._fps + 0.3 * instant
        self._mark = (t, frame)
        self._last_sent = t
        fraction = min(1.0, frame / total) if total > 0 else 0.0
        if self._sender:
            self._sender.send(
                STAGE_PROGRESS, stage=self.stage, fraction=fraction, frame=frame, total=total, fps=self._fps
            )

    def done(self, outputs: Sequence[Path], frames: int) -> None:
        seconds = self._now() - self._start
        paths = [str(Path(o).resolve()) for o in outputs]  # absolute, whatever the cwd was
        log.info("%s done: %d frames in %.2fs -> %s", self.stage, frames, seconds, paths)
        if self._sender:
            self._sender.send(
                STAGE_DONE, stage=self.stage, frames=frames, seconds=seconds, outputs=paths
            )

    def failed(self, kind: ErrorKind, message: str) -> None:
        log.error("%s failed (%s): %s", self.stage, kind.value, message)
        if self._sender:
            self._sender.send(STAGE_FAILED, stage=self.stage, kind=kind.value, message=message[:4000])

    def warning(self, kind: WarningKind, message: str) -> None:
        """Something the stage accepted but the operator must hear of (sent before ``done``)."""
        log.warning("%s warning (%s): %s", self.stage, kind.value, message)
        if self._sender:
            self._sender.send(STAGE_WARNING, stage=self.stage, kind=kind.value, message=message[:4000])

    def live(self, frames: int, fps: float, dropped: int, latency_p50: float, latency_p95: float) -> None:
        """A live stage's state (``stages/live.py``, ``LiveStats``): sent about once a second."""
        log.info("%s live: %d frames, %.1f fps, %d dropped, latency p50 %.1f ms p95 %.1f ms", self.stage, frames,
                 fps, dropped, latency_p50, latency_p95)
        if self._sender:
            self._sender.send(STAGE_LIVE, stage=self.stage, frames=frames, fps=fps, dropped=dropped,
                              latency_p50=latency_p50, latency_p95=latency_p95)


@dataclass(frozen=True)
class StageResult:
    """What ``run`` returns: the output files (the first is the next stage's input) and frame count."""

    outputs: tuple[Path, ...]
    frames: int


#: URL schemes of live inputs (``stages/live.py``): a stage's or a Job's input is such a URL or a path.
LIVE_SCHEMES = ("ndi", "camera", "play")


def is_live(value: str | os.PathLike[str]) -> bool:
    """Whether an input names a live source (``ndi://...``, ``camera://N``, ``play://PATH``), not a file."""
    text = str(value)
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme in LIVE_SCHEMES


#: URL scheme of a stream between two stages of one job (``stages/stream.py``): ``ring://NAME``.
STREAM_SCHEME = "ring"


def is_stream(value: str | os.PathLike[str]) -> bool:
    """Whether an input names a stream from the previous stage (``ring://NAME``), not a file."""
    return str(value).startswith(f"{STREAM_SCHEME}://")


def job_input(value: str | os.PathLike[str]) -> Path | str:
    """An input as given: a live or stream URL stays its text (a Path would fold its ``//``), anything else
    a Path."""
    return str(value) if is_live(value) or is_stream(value) else Path(value)


#: ``stream_out``, declared by every stage that can stream its first output to the next stage
#: (``stages/stream.py``); set by the launcher for ``stream = true`` pipelines, never in pipelines.toml.
STREAM_OUT = Param(str, None, "set by the launcher (stream = true): send the first output's frames to this "
                              "frame ring instead of its file")


RunFunction = Callable[..., StageResult]


def build_parser(name: str, params: Mapping[str, Param], doc: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"python -m cuepipe.stages.{name}", description=(doc or "").split("\n\n")[0]
    )
    parser.add_argument("--input", type=job_input,
                        help="input video file or image folder, or a live URL (ndi://, camera://, play://; "
                             "stages that take one say so) (required)")
    parser.add_argument("--output-dir", type=Path, help="folder for the outputs (required)")
    parser.add_argument("--serve", action="store_true",
                        help="stay resident: take jobs as JSON lines on stdin (docs/stages.md, Resident workers)")
    parser.add_argument(
        "--report", action="append", default=[], metavar="HOST:PORT", help="send OSC Events here (repeatable)"
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    for pname, p in params.items():
        shown = "" if p.default is None else f" (default: {p.default})"
        parser.add_argument(option(pname), dest=pname, default=None, metavar=p.type.__name__.upper(),
                            help=p.help + shown)
    return parser


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def stop_on_signals() -> None:
    """Turn the launcher's polite stop (SIGTERM; CTRL_BREAK on Windows) into KeyboardInterrupt, so
    ``with`` blocks run: writers delete their temporary files and reap their ffmpeg."""
    for name in ("SIGTERM", "SIGBREAK"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _interrupt)


def bad_argument(name: str, message: str) -> StageError:
    """A BAD_ARGUMENT error naming the parameter's option (``--trim-start: must be >= 0``)."""
    return StageError(ErrorKind.BAD_ARGUMENT, f"{option(name)}: {message}")


def parse_outputs(text: str, known: Iterable[str]) -> tuple[str, ...]:
    """A stage's ``outputs`` parameter: ``"alpha,composite"`` -> ("alpha", "composite").

    BAD_ARGUMENT for an unknown, repeated or missing name. The order matters: the first output is
    the next stage's input.
    """
    known = tuple(known)
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise bad_argument("outputs", f"name at least one of {', '.join(known)}")
    for n in names:
        if n not in known:
            raise bad_argument("outputs", f"unknown output {n!r}; expected some of {', '.join(known)}")
    if len(set(names)) != len(names):
        raise bad_argument("outputs", f"an output is named twice in {text!r}")
    return names


def coerce_all(name: str, params: Mapping[str, Param], values: Mapping[str, Any]) -> dict[str, Any]:
    """Every declared parameter of stage ``name`` from ``values`` (defaults for the missing ones).

    The one validation path for argv, resident-worker requests and direct ``run()`` calls; raises
    StageError(BAD_ARGUMENT) naming the option.
    """
    unknown = sorted(set(values) - set(params))
    if unknown:
        raise StageError(ErrorKind.BAD_ARGUMENT, f"unknown parameter(s) for {name}: {', '.join(unknown)}")
    out: dict[str, Any] = {}
    for pname, p in params.items():
        value = values.get(pname)
        try:
            out[pname] = p.coerce(p.default if value is None else value)
        except ValueError as exc:
            raise bad_argument(pname, str(exc)) from None
    return out


def accepts_cache(run: RunFunction) -> bool:
    """Whether ``run`` takes a ``cache`` dict that outlives one job (resident Workers keep models in it)."""
    try:
        return "cache" in inspect.signature(run).parameters
    except (TypeError, ValueError):
        return False


def execute(
    name: str, params: Mapping[str, Param], run: RunFunction, input: Path | str, output_dir: Path,
    targets: Sequence[tuple[str, int]], raw: Mapping[str, Any], cache: dict[str, Any] | None = None,
) -> int:
    """Run one job of a stage: coerce parameters, run, send ``done`` or ``failed``; the exit code."""
    with EventSender(targets) as sender:
        events = StageEvents(name, sender)
        try:
            kwargs = coerce_all(name, params, raw)
        except StageError as exc:
            events.failed(exc.kind, exc.message)
            return EXIT_BAD_ARGUMENT
        if cache is not None and accepts_cache(run):
            kwargs["cache"] = cache
        try:
            result = run(input=input, output_dir=output_dir, events=events, **kwargs)
        except CuepipeError as exc:  # StageError, or a library's own (the NDI extra missing, a ring peer gone)
            events.failed(exc.kind, exc.message)
            return EXIT_BAD_ARGUMENT if exc.kind is ErrorKind.BAD_ARGUMENT else EXIT_FAILED
        except KeyboardInterrupt:
            events.failed(ErrorKind.CANCELLED, "interrupted")
            return EXIT_INTERRUPTED
        except Exception as exc:  # the stage's last line of defence: report, never die silently
            log.exception("unexpected error")
            events.failed(ErrorKind.INTERNAL, f"{type(exc).__name__}: {exc}")
            return EXIT_FAILED
        events.done(result.outputs, result.frames)
    return EXIT_OK


class ResidentRequestError(CuepipeError, ValueError):
    """A resident Worker's request line (``serve``) is not a valid job request."""

    kind = ErrorKind.BAD_ARGUMENT


def parse_request(line: str) -> tuple[str, Path | str, Path, list[tuple[str, int]], dict[str, Any]]:
    try:
        req = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ResidentRequestError(f"not JSON: {exc}") from None
    if not isinstance(req, dict):
        raise ResidentRequestError("a request must be a JSON object")
    job, input, output_dir = req.get("job"), req.get("input"), req.get("output_dir")
    report, params = req.get("report", []), req.get("params", {})
    if not all(isinstance(v, str) and v for v in (job, input, output_dir)):
        raise ResidentRequestError("job, input and output_dir must be non-empty strings")
    if not isinstance(report, list) or not isinstance(params, dict):
        raise ResidentRequestError("report must be a list and params an object")
    try:
        targets = [parse_address(str(t)) for t in report]
    except ValueError as exc:
        raise ResidentRequestError(str(exc)) from None
    return str(job), job_input(str(input)), Path(str(output_dir)), targets, params


def _channel() -> IO[str]:
    """Keep the real stdout for completions; point fd 1 (and sys.stdout) at stderr."""
    sys.stdout.flush()
    channel = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return channel


#: A stage's optional preload hook (resident workers): load what ``run`` would, before the first job.
PreloadFunction = Callable[..., None]


def serve(name: str, params: Mapping[str, Param], run: RunFunction, stdin: IO[str] | None = None,
          channel: IO[str] | None = None, preload: PreloadFunction | None = None) -> int:
    """The stage as a resident Worker: one process, many jobs, the model kept loaded between them.

        python -m cuepipe.stages.<name> --serve

    stdin: one JSON request per line —
    ``{"job": "ID", "input": "PATH", "output_dir": "PATH", "report": ["127.0.0.1:PORT"], "params": {...}}``.
    stdout: one JSON line per request once it has finished — ``{"job": "ID", "exit": CODE}`` — the
    same exit codes as a one-shot run. Events go to the request's report addresses exactly as in a
    one-shot run. End of stdin ends the process (exit 0). A ``run`` that accepts ``cache`` gets one
    dict for the whole life of the process, to keep model sessions in.

    stdout is the completion channel, so it is taken over before any job runs: the real stdout is
    kept for the channel and file descriptor 1 is pointed at stderr, so a library that prints
    cannot corrupt it. See docs/stages.md, "Resident workers".

    ``{"preload": {...params}}`` asks the stage's ``preload`` hook (if it has one) to load now what a
    job with these parameters would load (imports, the model session, a first inference), so the
    first trigger does not pay for it. No completion line; a failure is only logged (the job that
    needs it then fails on its own, with its kind).
    """
    stdin = stdin or sys.stdin
    channel = channel or _channel()
    cache: dict[str, Any] = {}
    log.info("%s worker ready (pid %d)", name, os.getpid())
    try:
        for line in stdin:
            if not line.strip():
                continue
            if preload is not None and line.lstrip().startswith('{"preload"'):
                _preload(name, params, preload, line, cache)
                continue
            try:
                job, input, output_dir, targets, raw = parse_request(line)
            except ResidentRequestError as exc:
                log.error("bad request: %s", exc)
                channel.write(json.dumps({"job": None, "exit": EXIT_BAD_ARGUMENT, "error": str(exc)}) + "\n")
                continue
            log.info("job %s: %s", job, input)
            code = execute(name, params, run, input, output_dir, targets, raw, cache)
            channel.write(json.dumps({"job": job, "exit": code}) + "\n")
            channel.flush()
            if code == EXIT_INTERRUPTED:  # stopped by a signal: the process is being stopped
                return code
    except KeyboardInterrupt as exc:  # stopped (a signal) while waiting for a job or preloading: no traceback
        log.info("%s worker stopped: %s", name, exc)
        return EXIT_INTERRUPTED
    return 0


def _preload(name: str, params: Mapping[str, Param], preload: PreloadFunction, line: str,
             cache: dict[str, Any]) -> None:
    started = time.monotonic()
    try:
        raw = json.loads(line)["preload"]
        preload(cache, **coerce_all(name, params, raw if isinstance(raw, dict) else {}))
    except Exception as exc:  # a failed preload only costs the first job its speed
        log.warning("preload failed (the first job loads instead): %s: %s", type(exc).__name__, exc)
    else:
        log.info("preloaded in %.0f ms", (time.monotonic() - started) * 1000)


def stage_main(
    name: str, params: Mapping[str, Param], run: RunFunction, argv: Sequence[str] | None = None,
    doc: str | None = None, preload: PreloadFunction | None = None,
) -> int:
    """Parse argv, run the stage (or serve jobs from stdin with ``--serve``), return the exit code."""
    parser = build_parser(name, params, doc)
    args = parser.parse_args(argv)
    stop_on_signals()
    logging.basicConfig(
        level=args.log_level, stream=sys.stderr, format=f"%(asctime)s {name} %(levelname)s %(message)s"
    )
    if not watch_parent():  # a stage never outlives the launcher that started it (stages/parentwatch.py)
        log.warning("the launcher that started this stage is already gone; not starting")
        return EXIT_INTERRUPTED
    if args.serve:
        return serve(name, params, run, preload=preload)
    if args.input is None or args.output_dir is None:
        parser.error("--input and --output-dir are required (unless --serve)")
    try:
        targets = [parse_address(t) for t in args.report]
    except ValueError as exc:
        parser.error(f"--report: {exc}")
    raw = {pname: getattr(args, pname) for pname in params if getattr(args, pname) is not None}
    return execute(name, params, run, args.input, args.output_dir, targets, raw)
