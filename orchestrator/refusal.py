"""Refusal: why the daemon refuses a Command (the ``reason`` of ``reply/error``, docs/protocol.md).

``JobRefused`` carries one to the reply; ``refusal_of`` turns a request's failure kind
(``resolve_request``) into the refusal a client gets.
"""

from __future__ import annotations

from enum import StrEnum

from cuepipe.stages.errors import CuepipeError, ErrorKind


class Refusal(StrEnum):
    """Why a Command was refused: the ``reason`` of ``reply/error`` (docs/protocol.md)."""

    UNKNOWN_COMMAND = "unknown_command"
    BAD_ARGUMENTS = "bad_arguments"
    UNKNOWN_PIPELINE = "unknown_pipeline"
    INPUT_MISSING = "input_missing"
    MODEL_MISSING = "model_missing"
    NOT_ALLOWED = "not_allowed"
    QUEUE_FULL = "queue_full"
    UNKNOWN_JOB = "unknown_job"
    UNAVAILABLE = "unavailable"  # the daemon cannot take jobs now (stopping, or its journal cannot be written)


#: How a failed request resolution (``resolve_request``) is refused; any other kind is bad_arguments.
_BY_KIND = {ErrorKind.UNKNOWN_PIPELINE: Refusal.UNKNOWN_PIPELINE, ErrorKind.NOT_ALLOWED: Refusal.NOT_ALLOWED,
             ErrorKind.MODEL_MISSING: Refusal.MODEL_MISSING, ErrorKind.MODEL_INVALID: Refusal.MODEL_MISSING,
             ErrorKind.INPUT_MISSING: Refusal.INPUT_MISSING}


class JobRefused(CuepipeError):
    """A Command is refused; ``reason`` is what the client gets in ``reply/error``."""

    kind = ErrorKind.BAD_ARGUMENT

    def __init__(self, reason: Refusal, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def refusal_of(kind: ErrorKind) -> Refusal:
    """The refusal for a request that failed with ``kind``."""
    return _BY_KIND.get(kind, Refusal.BAD_ARGUMENTS)
