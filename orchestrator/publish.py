"""Publishing a Job's final outputs: all or nothing, each by an atomic rename.

Why a module of its own: it is the one place that decides what a reader of the output folder can
see. No partial file and no partial set ever sits at the final paths, whatever fails (a full disk,
another file system, a folder output such as a PNG sequence), and a failed publish leaves the
previous outputs where they were.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cuepipe.stages.errors import CuepipeError, ErrorKind

log = logging.getLogger(__name__)


class PublishError(CuepipeError, OSError):
    """Publishing failed and was rolled back; ``index`` is the (src, dst) pair that failed."""

    kind = ErrorKind.OUTPUT_ERROR

    def __init__(self, message: str, index: int) -> None:
        super().__init__(message)
        self.index = index


@dataclass
class _Output:
    """One output being published, and how far it got (what a rollback must undo)."""

    src: Path
    dst: Path
    part: Path  # hidden temporary beside dst: same file system, so phase 2 is renames only
    copied: bool = False  # phase 1 copied src (another file system) instead of renaming it
    staged: bool = False  # part holds the whole output
    old: Path | None = None  # the previous output at dst, renamed aside in phase 2
    placed: bool = False  # part was renamed to dst


def _beside(dst: Path, tag: str) -> Path:
    return dst.with_name(f".{dst.name}.{secrets.token_hex(4)}.{tag}")


def _remove(path: Path) -> None:
    """Remove a file, link or folder (a PNG sequence); a missing one is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _stage(src: Path, part: Path) -> bool:
    """Put ``src`` at ``part``: a rename on one file system, else a copy that leaves ``src`` in place
    (so a failed publish keeps it in the work folder). Returns whether it copied."""
    try:
        os.rename(src, part)
        return False
    except OSError:  # EXDEV (another file system), or a rename this file system refuses: copy
        pass
    if src.is_dir():
        shutil.copytree(src, part, copy_function=shutil.copy2)
    else:
        shutil.copy2(src, part)
    return True


def _roll_back(outputs: list[_Output]) -> list[str]:
    """Undo a partial publish, last output first: previous outputs back at their final paths, renamed
    sources back in the work folder, copies removed. Returns what could not be undone."""
    problems: list[str] = []
    for out in reversed(outputs):
        try:
            if out.placed:
                os.rename(out.dst, out.part)
                out.placed = False
            if out.old is not None:
                os.rename(out.old, out.dst)
                out.old = None
        except OSError as exc:
            problems.append(f"{out.dst}: {exc}" + (f" (previous output kept at {out.old})" if out.old else ""))
        if out.placed:  # the new output could not be taken back: nothing is at out.part
            continue
        try:
            if out.staged and not out.copied:
                try:
                    os.rename(out.part, out.src)
                    continue
                except OSError:
                    log.warning("cannot move %s back to %s; removing it", out.part, out.src, exc_info=True)
            if os.path.lexists(out.part):
                _remove(out.part)
        except OSError as exc:
            problems.append(f"{out.part}: {exc}")
    return problems


def publish_all(pairs: Sequence[tuple[Path, Path]]) -> list[Path]:
    """Publish each ``(src, dst)`` pair (files, or folders such as PNG sequences): all or nothing.

    Phase 1 puts every source at a hidden temporary beside its final path (a rename, or a copy across
    file systems, where a full disk shows). Phase 2 renames any previous output aside (a folder cannot
    be replaced in one rename on every OS) and each temporary into place. On any failure both phases
    are undone — previous outputs restored, nothing new at a final path, no temporary left — and
    ``PublishError`` names the output and the error. Previous outputs are deleted only at the end.
    """
    outputs = [_Output(src, dst, _beside(dst, "part")) for src, dst in pairs]
    failed = 0
    try:
        for failed, out in enumerate(outputs):  # noqa: B007 - read in the except clause
            out.dst.parent.mkdir(parents=True, exist_ok=True)
            out.copied = _stage(out.src, out.part)
            out.staged = True
        for failed, out in enumerate(outputs):  # noqa: B007
            if os.path.lexists(out.dst):
                old = _beside(out.dst, "old")
                os.rename(out.dst, old)
                out.old = old
            os.replace(out.part, out.dst)
            out.placed = True
    except BaseException as exc:
        problems = _roll_back(outputs)
        if not isinstance(exc, Exception):
            raise
        out = outputs[failed]
        message = f"cannot publish {out.src.name} as {out.dst}: {exc}; nothing was published"
        if problems:
            message += f"; rollback incomplete: {'; '.join(problems)}"
        raise PublishError(message, failed) from exc
    for out in outputs:  # committed: what is left is cleanup, whose failure only leaves a hidden file
        for leftover in (out.old, out.src if out.copied else None):
            if leftover is not None:
                try:
                    _remove(leftover)
                except OSError:
                    log.warning("cannot remove %s", leftover, exc_info=True)
    return [out.dst for out in outputs]


def publish(src: Path, dst: Path) -> Path:
    """Move ``src`` (a file, or a folder such as a PNG sequence) to ``dst`` atomically (``publish_all``)."""
    return publish_all([(src, dst)])[0]
