"""A stage as a resident Worker: one process, many jobs, the model kept loaded between them.

    python -m stages.<name> --serve

stdin: one JSON request per line —
``{"job": "ID", "input": "PATH", "output_dir": "PATH", "report": ["127.0.0.1:PORT"], "params": {...}}``.
stdout: one JSON line per request once it has finished — ``{"job": "ID", "exit": CODE}`` — the
same exit codes as a one-shot run. Events go to the request's report addresses exactly as in a
one-shot run. End of stdin ends the process (exit 0). A ``run`` that accepts ``cache`` gets one
dict for the whole life of the process, to keep model sessions in.

stdout is the completion channel, so it is taken over before any job runs: the real stdout is kept
for the channel and file descriptor 1 is pointed at stderr, so a library that prints cannot
corrupt it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from stages.events import parse_address
from stages.stage import EXIT_BAD_ARGUMENT, EXIT_INTERRUPTED, Param, RunFunction, execute

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request line is not a valid job request."""


def parse_request(line: str) -> tuple[str, Path, Path, list[tuple[str, int]], dict[str, Any]]:
    try:
        req = json.loads(line)
    except json.JSONDecodeError as exc:
        raise RequestError(f"not JSON: {exc}") from None
    if not isinstance(req, dict):
        raise RequestError("a request must be a JSON object")
    job, input, output_dir = req.get("job"), req.get("input"), req.get("output_dir")
    report, params = req.get("report", []), req.get("params", {})
    if not all(isinstance(v, str) and v for v in (job, input, output_dir)):
        raise RequestError("job, input and output_dir must be non-empty strings")
    if not isinstance(report, list) or not isinstance(params, dict):
        raise RequestError("report must be a list and params an object")
    try:
        targets = [parse_address(str(t)) for t in report]
    except ValueError as exc:
        raise RequestError(str(exc)) from None
    return str(job), Path(str(input)), Path(str(output_dir)), targets, params


def _channel() -> IO[str]:
    """Keep the real stdout for completions; point fd 1 (and sys.stdout) at stderr."""
    sys.stdout.flush()
    channel = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return channel


def serve(name: str, params: Mapping[str, Param], run: RunFunction, stdin: IO[str] | None = None,
          channel: IO[str] | None = None) -> int:
    stdin = stdin or sys.stdin
    channel = channel or _channel()
    cache: dict[str, Any] = {}
    log.info("%s worker ready (pid %d)", name, os.getpid())
    for line in stdin:
        if not line.strip():
            continue
        try:
            job, input, output_dir, targets, raw = parse_request(line)
        except RequestError as exc:
            log.error("bad request: %s", exc)
            channel.write(json.dumps({"job": None, "exit": EXIT_BAD_ARGUMENT, "error": str(exc)}) + "\n")
            continue
        log.info("job %s: %s", job, input)
        code = execute(name, params, run, input, output_dir, targets, raw, cache)
        channel.write(json.dumps({"job": job, "exit": code}) + "\n")
        channel.flush()
        if code == EXIT_INTERRUPTED:  # stopped by a signal: the process is being stopped
            return code
    return 0
