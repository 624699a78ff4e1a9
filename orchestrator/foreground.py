"""Running one Job in the foreground, as ``cuepipe run`` and ``cuepipe demo`` do: its Events go to the
report addresses and the terminal, Ctrl-C / SIGTERM (or a closed standard input) cancel it, and the
outcome becomes the command's exit code.

Exit codes: 0 done; 1 a stage failed; 2 the request itself is wrong (invalid pipelines file, unknown
pipeline, bad ``--set``, missing input or model); 130 cancelled.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cuepipe.orchestrator.job import Job, JobResult, JobState
from cuepipe.orchestrator.pipeline import ConfigError, Pipeline, PipelineFile, find_file, load_file, resolve_request
from cuepipe.orchestrator.terminal import EventDisplay
from cuepipe.stages.codec import Message
from cuepipe.stages.errors import EXIT_BAD_ARGUMENT, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, CuepipeError, ErrorKind
from cuepipe.stages.protocol import JOB_FAILED, NO_EXIT_CODE, new_job_id
from cuepipe.stages.sender import EventSender


@contextmanager
def cancel_on_signals(cancel: threading.Event) -> Iterator[None]:
    """Ctrl-C / SIGTERM (SIGBREAK on Windows) set ``cancel``; the Job stops its stage and reports."""
    names = ["SIGINT", "SIGTERM", "SIGBREAK"]
    signals = [getattr(signal, n) for n in names if hasattr(signal, n)]
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in signals:
            previous[sig] = signal.signal(sig, lambda *_: cancel.set())
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def cancel_on_eof(cancel: threading.Event) -> None:
    """Set ``cancel`` when standard input closes: how TouchDesigner (or any parent) cancels a run on
    Windows, where a GUI process cannot send CTRL_BREAK. A parent that dies closes it too, so an
    orphaned job stops instead of running on. The thread ends with the process (it only reads)."""

    def wait_for_eof() -> None:
        # os.read on the descriptor, not sys.stdin: a daemon thread blocked inside the buffered reader
        # holds its lock, and CPython aborts (SIGABRT) when it finds that lock held at shutdown.
        with contextlib.suppress(OSError, ValueError):
            fd = sys.stdin.fileno()
            while os.read(fd, 4096):
                pass
        cancel.set()

    threading.Thread(target=wait_for_eof, name="cuepipe-cancel-on-eof", daemon=True).start()


def run_job(
    pipelines: PipelineFile | None,
    name: str,
    input: Path | str,
    reports: Sequence[tuple[str, int]],
    sets: Sequence[str] = (),
    out: Path | None = None,
    json_lines: bool = False,
    keep_work: bool = False,
    config_error: ConfigError | None = None,
    extra_sink: Callable[[Message], None] | None = None,
    job_id: str | None = None,
    eof_cancels: bool = False,
    cancel: threading.Event | None = None,
) -> tuple[int, JobResult | None]:
    """Run one Job with Events to ``reports`` and the terminal; returns (exit code, result).

    The request is resolved as the daemon resolves it (``resolve_request``, without roots); a request
    that cannot run fails before any stage with one ``job/failed`` (index -1) and exit code 2.
    """
    pipeline: Pipeline | None = None
    failure: CuepipeError | None = config_error
    if pipelines is not None and failure is None:
        try:
            pipeline = resolve_request(pipelines, name, sets)
        except CuepipeError as exc:
            failure = exc
    targets = list(reports) + (list(pipeline.report) if pipeline else [])
    with EventSender(targets) as sender, EventDisplay(json_lines) as display:
        def sink(event: Message) -> None:
            sender.emit(event)
            display.show(event)
            if extra_sink:
                extra_sink(event)

        job_id = job_id or new_job_id()
        if pipeline is None:
            kind, message = (failure.kind, str(failure)) if failure else (ErrorKind.CONFIG_INVALID, "no pipelines")
            sink(Message(JOB_FAILED, {"job": job_id, "index": -1, "stage": "", "exit_code": NO_EXIT_CODE,
                                    "kind": kind.value, "message": message}))
            return EXIT_BAD_ARGUMENT, None
        cancel = cancel or threading.Event()  # also set by Ctrl-C / SIGTERM, and closed stdin with eof_cancels
        if eof_cancels:
            cancel_on_eof(cancel)
        job = Job(pipeline, input, sink, out_dir=out, job_id=job_id, cancel=cancel, keep_work=keep_work)
        with cancel_on_signals(cancel):
            result = job.run()
    if result.state is JobState.DONE:
        return EXIT_OK, result
    if result.state is JobState.CANCELLED:
        return EXIT_INTERRUPTED, result
    if result.stage_index < 0:  # rejected before any stage ran: the request was wrong
        return EXIT_BAD_ARGUMENT, result
    return EXIT_FAILED, result


def load_pipelines(path: Path | None) -> tuple[PipelineFile | None, ConfigError | None]:
    try:
        return load_file(find_file(path)), None
    except ConfigError as exc:
        return None, exc
