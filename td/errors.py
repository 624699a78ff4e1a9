"""The failure vocabulary td/ shares with the rest of cuepipe: ``stages/errors.py``, loaded by path.

So td/'s own errors stand under the same root, ``CuepipeError``, with a failure kind on each, though
TD's Python cannot import ``cuepipe.stages`` (``boot.shared``).
"""

from __future__ import annotations

from typing import Any

from .boot import shared

_errors = shared(__package__, "errors")

CuepipeError: Any = _errors.CuepipeError
ErrorKind: Any = _errors.ErrorKind
