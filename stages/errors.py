"""Failure kinds and the one exception root: the vocabulary every layer shares (stdlib only).

``ErrorKind`` is the ``kind`` argument of every ``failed`` Event (``docs/protocol.md``, "Failure
kinds"). ``CuepipeError`` is the root of every error cuepipe raises on purpose, in every layer
(models, stages, orchestrator), and carries the kind it is reported as, so a caller converts an
error into an Event, an exit code or a refusal by reading ``exc.kind``, never by re-deciding it.
This module imports nothing of the project: models, stages and the orchestrator all stand on it.
"""

from __future__ import annotations

from enum import StrEnum

#: The exit codes of every cuepipe program, a stage as well as ``cuepipe run`` and the other commands:
#: 0 success; 1 a failure that was reported; 2 the request or an argument was wrong (nothing ran);
#: 130 interrupted (Ctrl-C, SIGTERM / CTRL_BREAK, a cancel, a launcher that died).
EXIT_OK, EXIT_FAILED, EXIT_BAD_ARGUMENT, EXIT_INTERRUPTED = 0, 1, 2, 130


class ErrorKind(StrEnum):
    """Why a Stage or Job failed: the ``kind`` argument of every ``failed`` Event."""

    BAD_ARGUMENT = "bad_argument"  # argv / parameter value rejected
    INPUT_MISSING = "input_missing"  # input path does not exist
    INPUT_INVALID = "input_invalid"  # exists but is not a readable video / has no frames
    MODEL_MISSING = "model_missing"
    MODEL_INVALID = "model_invalid"
    PROVIDER_UNAVAILABLE = "provider_unavailable"  # asked-for GPU provider not installed
    OUTPUT_ERROR = "output_error"  # cannot write the output
    INTERNAL = "internal"  # unexpected exception inside the stage
    STREAM_BROKEN = "stream_broken"  # the stage streaming to or from this one failed or vanished (stages/stream.py)
    # Set by the launcher, never by a stage itself:
    CRASHED = "crashed"  # non-zero exit or killed by a signal without a failed Event
    NO_DONE = "no_done"  # exited 0 but never sent ``done``
    TIMEOUT = "timeout"  # killed after its per-stage timeout
    STALLED = "stalled"  # killed after no Event for stall_timeout seconds
    CANCELLED = "cancelled"
    CONFIG_INVALID = "config_invalid"  # pipelines.toml or an override is invalid
    UNKNOWN_PIPELINE = "unknown_pipeline"
    NOT_ALLOWED = "not_allowed"  # a path outside the daemon's --root folders


class CuepipeError(Exception):
    """The root of every error cuepipe raises on purpose; ``kind`` is how it is reported.

    Subclasses set a class-level default ``kind``; an instance may carry a more precise one.
    """

    kind: ErrorKind = ErrorKind.INTERNAL

    def __init__(self, message: str, kind: ErrorKind | None = None) -> None:
        super().__init__(message)
        self.message = message
        if kind is not None:
            self.kind = kind
