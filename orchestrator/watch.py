"""Watch folder: files dropped into an inbox are run through a Pipeline, then moved to ``done/`` or ``failed/``.

    cuepipe watch matte D:/inbox --out D:/renders [--settle 2] [--polling] [--report 127.0.0.1:7000]

A file is taken only once it is complete: at once when the system says its writer closed it (Linux),
or when it was renamed inside the inbox (from a partial name; one moved in from another folder is
reported as merely created), and otherwise when its size and modification time have not
changed for ``settle`` seconds (every copy over a network share: SMB and NFS send no events, which is
what ``polling`` is for, with watchdog's polling observer). Hidden files and partial names (``*.part``,
``*.tmp``, ``*.crdownload``, ``~$...``) are never taken; a file that is not a video (by its extension)
is left where it is, with one note in the log.

After its Job, the input moves to ``<inbox>/done/`` or ``<inbox>/failed/`` (sub-folders mirrored),
a failure with ``<name>.error.txt`` beside it saying why. Outputs go below ``--out`` as with
``cuepipe batch`` (``orchestrator/batch.py``: ``Runner``), and every Job's Events go to the report
addresses, so TouchDesigner sees a watched folder like any other job. Restarting is safe: finished
inputs have left the inbox (and are in the journal), and whatever is still in it (the file that was
running when the watcher was killed included) is looked at again from the start.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import FileClosedEvent, FileMovedEvent, FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from cuepipe.orchestrator.batch import VIDEO_SUFFIXES, BatchInput, Item, Runner, hidden_or_partial

log = logging.getLogger(__name__)

DONE, FAILED = "done", "failed"
SETTLE_S = 2.0  # default: unchanged this long counts as complete where no event says so


@dataclass
class _Candidate:
    size: int
    mtime: int
    since: float  # when size and mtime were last seen to change
    complete: bool = False  # closed after writing, or moved in


class _Events(FileSystemEventHandler):
    """watchdog's thread -> a queue of (path, complete) the Watcher drains; nothing else happens here."""

    def __init__(self, inbox: queue.SimpleQueue[tuple[Path, bool]]) -> None:
        self.inbox = inbox

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:  # a folder created or moved in: what is in it may have come before its watch
            if event.event_type in ("created", "moved"):
                path = event.dest_path if event.event_type == "moved" else event.src_path
                self.inbox.put((Path(os.fsdecode(path)), False))
            return
        if isinstance(event, FileMovedEvent):
            self.inbox.put((Path(os.fsdecode(event.dest_path)), True))
        elif event.event_type in ("created", "modified", "closed"):
            self.inbox.put((Path(os.fsdecode(event.src_path)), isinstance(event, FileClosedEvent)))


class Watcher:
    """Which files of ``inbox`` are complete (module docstring). ``start`` / ``stop``; ``ready`` returns each
    complete file once. Files present at start are looked at like new ones. ``now`` is injectable."""

    def __init__(self, inbox: Path, settle_s: float = SETTLE_S, polling: bool = False,
                 now: Callable[[], float] = time.monotonic) -> None:
        self.inbox = inbox.resolve()
        self.settle_s, self.now = settle_s, now
        self._events: queue.SimpleQueue[tuple[Path, bool]] = queue.SimpleQueue()
        self._observer = (PollingObserver(timeout=min(1.0, settle_s)) if polling else Observer())
        self._observer.schedule(_Events(self._events), str(self.inbox), recursive=True)
        self._candidates: dict[Path, _Candidate] = {}
        self._noted: set[Path] = set()

    def start(self) -> None:
        self._observer.start()
        for path in sorted(self.inbox.rglob("*")):  # what was there before: complete or not, we cannot know
            if path.is_file():
                self._events.put((path, False))

    def stop(self) -> None:
        self._observer.stop()
        self._observer.join()

    def _wanted(self, path: Path) -> bool:
        try:
            relative = path.relative_to(self.inbox)
        except ValueError:
            return False
        if relative.parts[0] in (DONE, FAILED) or any(hidden_or_partial(Path(p)) for p in relative.parts):
            return False
        if path.suffix.lower() not in VIDEO_SUFFIXES:
            if path not in self._noted:
                self._noted.add(path)
                log.info("watch: %s is not a video (by its extension): left where it is", path)
            return False
        return True

    def ready(self) -> list[Path]:
        """The files that became complete since the last call (each once)."""
        while True:
            try:
                path, complete = self._events.get_nowait()
            except queue.Empty:
                break
            if path.is_dir():
                for inside in sorted(path.rglob("*")):
                    if inside.is_file() and self._wanted(inside):
                        self._see(inside, False)
            elif self._wanted(path):
                self._see(path, complete)
        t, out = self.now(), []
        for path, c in list(self._candidates.items()):
            try:
                st = path.stat()
            except OSError:  # gone (moved away or deleted before it was complete)
                del self._candidates[path]
                continue
            if (st.st_size, st.st_mtime_ns) != (c.size, c.mtime):
                c.size, c.mtime, c.since = st.st_size, st.st_mtime_ns, t
                continue
            if c.complete or t - c.since >= self.settle_s:
                del self._candidates[path]
                out.append(path)
        return out

    def _see(self, path: Path, complete: bool) -> None:
        try:
            st = path.stat()
        except OSError:
            return
        c = self._candidates.get(path)
        if c is None:
            self._candidates[path] = _Candidate(st.st_size, st.st_mtime_ns, self.now(), complete)
        elif complete:
            c.complete = True


def _free(path: Path) -> Path:
    """``path``, or ``name (2).ext``, ``name (3).ext``... when it is taken."""
    n = 2
    candidate = path
    while candidate.exists():
        candidate = path.with_name(f"{path.stem} ({n}){path.suffix}")
        n += 1
    return candidate


def file_away(inbox: Path, path: Path, item: Item, logs: Path | None = None) -> Path:
    """Move a settled input to ``done/`` or ``failed/`` (with ``<name>.error.txt`` beside a failure, naming
    ``logs``: the failed Job's work folder)."""
    folder = inbox / (DONE if item.status in ("done", "skipped") else FAILED) / path.relative_to(inbox).parent
    folder.mkdir(parents=True, exist_ok=True)
    target = _free(folder / path.name)
    shutil.move(str(path), str(target))
    if folder.parts[len(inbox.parts)] == FAILED:
        note = target.with_name(f"{target.name}.error.txt")
        where = f"\nthe stages' logs: {logs}\n" if logs is not None and logs.exists() else ""
        note.write_text(f"{item.kind}: {item.error}\n{where}", encoding="utf-8")
    return target


class WatchService:
    """A Watcher feeding a Runner, ``jobs`` inputs at a time: ``step`` once (tests) or ``serve`` until stopped.

    ``on_item`` gets each settled input's line and where the input went.
    """

    def __init__(self, watcher: Watcher, runner: Runner, jobs: int = 1,
                 on_item: Callable[[Item, Path], None] | None = None) -> None:
        self.watcher, self.runner, self.on_item = watcher, runner, on_item
        self._pool = ThreadPoolExecutor(max_workers=max(1, jobs), thread_name_prefix="cuepipe-watch")
        self._running: dict[Path, Future[None]] = {}

    def step(self) -> None:
        for path, future in list(self._running.items()):
            if future.done():
                del self._running[path]
                future.result()
        for path in self.watcher.ready():
            if path not in self._running:
                self._running[path] = self._pool.submit(self._one, path)

    def _one(self, path: Path) -> None:
        inbox = self.watcher.inbox
        item = self.runner.run(BatchInput(path, path.relative_to(inbox)))
        if item.status == "cancelled":
            return  # stopped: it stays in the inbox and is taken again after a restart
        try:
            target = file_away(inbox, path, item, self.runner.work_root / item.job if item.job else None)
        except OSError as exc:
            log.error("watch: cannot move %s out of the inbox: %s", path, exc)
            target = path
        log.info("watch: %s %s -> %s", item.status, path, target)
        if self.on_item is not None:
            with self.runner.lock:
                self.on_item(item, target)

    def busy(self) -> bool:
        return bool(self._running)

    def serve(self, stop: threading.Event, interval: float = 0.25) -> None:
        """Take files until ``stop`` is set (the Runner's cancel stops the running Jobs)."""
        self.watcher.start()
        try:
            while not stop.wait(interval):
                self.step()
        finally:
            self.close()

    def close(self) -> None:
        self.watcher.stop()
        self._pool.shutdown(wait=True)
        self.runner.close()
