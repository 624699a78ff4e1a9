"""Batch: one Pipeline over many inputs (``cuepipe batch``), N Jobs at a time, resumable, summarised.

    cuepipe batch matte footage/ more/take.mov list.txt --out renders/ --jobs 2

Inputs (``collect``): video files; folders, searched recursively for videos and image-sequence folders
(anything else is skipped with a note); list files (``.txt`` / ``.list``: one path a line, ``#``
comments, relative to the list). Each input keeps its place below the folder it was found in, and its
outputs go to the same place below ``--out`` (the output tree mirrors the input tree). One bad input
fails alone, with its reason; the batch goes on.

Resume: every finished input is remembered in the SQLite journal ``<out>/.cuepipe-batch.sqlite3``
(``orchestrator/journal.py``) with the pipeline's *definition* (a hash of its Steps, parameters and
overrides) and the input's *identity*: size, modification time and the sha256 of its first MiB (a
whole-file hash of hundreds of clips would cost minutes on every re-run; a clip re-rendered in place
changes its size or its time). Re-running the same command skips what is done for the same definition
and identity and whose outputs still exist, reruns changed inputs, and redoes everything after a change
of the pipeline or with ``force``. A batch killed hard loses only its running Jobs: outputs are
published atomically (``orchestrator/publish.py``), so nothing partial sits at a final path.

The summary (``Summary``) is printed as a table and written as ``batch_summary.json`` / ``.csv`` in
``--out``, with ``report.html`` beside them (``orchestrator/report.py``: contact sheets, failures
first, where the time went). Exit code 0 only when every input succeeded (or was done before).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cuepipe.orchestrator import defaults
from cuepipe.orchestrator.job import Job, JobState
from cuepipe.orchestrator.journal import Journal
from cuepipe.orchestrator.pipeline import Pipeline, describe_pipeline
from cuepipe.orchestrator.resident import WorkerPool
from cuepipe.stages.codec import Message
from cuepipe.stages.errors import CuepipeError, ErrorKind

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = frozenset({".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".mxf", ".mpg", ".mpeg", ".ts",
                            ".m2ts", ".wmv", ".flv", ".gif"})
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".exr", ".bmp", ".webp", ".dpx"})
LIST_SUFFIXES = frozenset({".txt", ".list"})
PARTIAL_SUFFIXES = frozenset({".part", ".tmp", ".crdownload", ".download", ".partial"})
JOURNAL_NAME = ".cuepipe-batch.sqlite3"
SUMMARY_NAME = "batch_summary"
HEAD_BYTES = 1 << 20  # the part of an input its identity hashes


class BatchError(CuepipeError):
    """The batch cannot run at all (no inputs, a list file that cannot be read); nothing was started."""

    kind = ErrorKind.BAD_ARGUMENT


@dataclass(frozen=True)
class BatchInput:
    path: Path  # absolute
    relative: Path  # below the folder it was found in: its outputs go to the same place below --out


@dataclass
class Item:
    """One input's line of the summary (``batch_summary.json``: ``items``; the report reads it)."""

    input: str
    relative: str
    status: str = "pending"  # done, failed, skipped (done before: resumed), cancelled
    frames: int = 0
    fps: float = 0.0
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)
    bytes: int = 0
    error: str = ""
    kind: str = ""
    stages: list[dict[str, Any]] = field(default_factory=list)
    job: str = ""  # the Job's id (a failed Job's work folder, with each stage's log: <out>/.cuepipe-work/<job>)


def hidden_or_partial(path: Path) -> bool:
    """A name no batch or watch folder takes: hidden, an Office lock file, or a download / copy in progress."""
    return path.name.startswith((".", "~$")) or path.suffix.lower() in PARTIAL_SUFFIXES


def _is_sequence(folder: Path) -> bool:
    """A folder of images (numbered frames) is one input; a folder that holds videos or folders is not."""
    files = [p for p in folder.iterdir() if not hidden_or_partial(p)]
    return bool(files) and all(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in files)


def collect(paths: Iterable[Path], notes: list[str] | None = None) -> list[BatchInput]:
    """Every input named by ``paths`` (module docstring), in a stable order, each once; ``notes`` gets a
    line for everything skipped. A named file is taken whatever its extension (it fails later if it is
    no video); inside folders only videos and image sequences are."""
    notes = notes if notes is not None else []
    found: dict[Path, BatchInput] = {}

    def add(path: Path, root: Path) -> None:
        path = path.resolve()
        found.setdefault(path, BatchInput(path, path.relative_to(root) if path.is_relative_to(root) else
                                          Path(path.name)))

    def walk(folder: Path, root: Path) -> None:
        if _is_sequence(folder):
            add(folder, root)
            return
        for entry in sorted(folder.iterdir(), key=lambda p: p.name):
            if hidden_or_partial(entry):
                notes.append(f"skipped {entry}: hidden or partial")
            elif entry.is_dir():
                walk(entry, root)
            elif entry.suffix.lower() in VIDEO_SUFFIXES:
                add(entry, root)
            else:
                notes.append(f"skipped {entry}: not a video or image sequence")

    for given in paths:
        path = Path(given).expanduser()
        if path.is_dir():
            walk(path, (path.resolve() if not _is_sequence(path) else path.resolve().parent))
        elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
            try:
                lines = path.read_text(encoding="utf-8-sig").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise BatchError(f"cannot read the list {path}: {exc}") from None
            entries = [path.parent / line.strip() for line in lines if line.strip() and not line.startswith("#")]
            for entry in collect(entries, notes):
                found.setdefault(entry.path, entry)
        else:  # a file, or a missing path: it fails alone, with its reason
            add(path, path.resolve().parent)
    return list(found.values())


def identity(path: Path) -> str:
    """What says an input is unchanged: size + mtime + sha256 of the first MiB; for an image folder the
    same of each image's name, size and time."""
    if path.is_dir():
        digest = hashlib.sha256()
        for image in sorted(path.iterdir()):
            st = image.stat()
            digest.update(f"{image.name}:{st.st_size}:{st.st_mtime_ns};".encode())
        return "dir:" + digest.hexdigest()
    st = path.stat()
    with path.open("rb") as f:
        head = hashlib.sha256(f.read(HEAD_BYTES)).hexdigest()
    return f"{st.st_size}:{st.st_mtime_ns}:{head}"


def definition(pipeline: Pipeline) -> str:
    """A hash of what the Pipeline makes (each Step's Stage, parameters with overrides, and which outputs are
    kept; not its name, timeouts or whether it streams): a change redoes the batch."""
    steps = [{k: s[k] for k in ("stage", "params", "keep")} for s in describe_pipeline(pipeline)["stages"]]
    return hashlib.sha256(json.dumps(steps, sort_keys=True, default=str).encode()).hexdigest()


def jobs_allowed(pipeline: Pipeline, asked: int) -> int:
    """Jobs at a time within the resource slots: a ``gpu`` pipeline one per GPU (``CUDA_VISIBLE_DEVICES``,
    else one), any other one at most the cores."""
    if pipeline.resource == "gpu":
        visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",") if d.strip()]
        limit = max(1, len(visible))
    else:
        limit = os.cpu_count() or 1
    if asked > limit:
        log.warning("--jobs %d: %s pipelines run at most %d at a time here", asked, pipeline.resource, limit)
    return max(1, min(asked, limit))


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.exists() else 0


@dataclass
class Summary:
    pipeline: str
    definition: str
    out: str
    started: str
    seconds: float = 0.0
    items: list[Item] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(i.status in ("done", "skipped") for i in self.items)

    def to_json(self) -> dict[str, Any]:
        return {**{k: v for k, v in dataclasses.asdict(self).items() if k != "items"},
                "items": [dataclasses.asdict(i) for i in self.items]}

    def table(self) -> str:
        """The summary as a plain-text table (what ``cuepipe batch`` prints at the end)."""
        rows = [("input", "status", "frames", "fps", "seconds", "outputs", "error")]
        rows += [(i.relative, i.status, str(i.frames), f"{i.fps:.1f}", f"{i.seconds:.1f}", str(len(i.outputs)),
                  (i.kind + ": " + i.error)[:80] if i.error else "") for i in self.items]
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
        total = sum(i.bytes for i in self.items if i.status == "done")  # written by this run
        done = sum(i.status == "done" for i in self.items)
        lines.append(f"{done} done, {sum(i.status == 'skipped' for i in self.items)} done before, "
                     f"{sum(i.status == 'failed' for i in self.items)} failed in {self.seconds:.1f} s; "
                     f"{total / 1e6:.1f} MB written, {total / 1e6 / max(self.seconds, 1e-9):.1f} MB/s, "
                     f"{done * 3600 / max(self.seconds, 1e-9):.0f} clips/hour")
        return "\n".join(lines)

    def write(self, out: Path) -> list[Path]:
        """``batch_summary.json`` and ``.csv`` in ``out``, each by an atomic rename."""
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["input", "status", "frames", "fps", "seconds", "outputs", "bytes", "kind", "error"])
        for i in self.items:
            writer.writerow([i.relative, i.status, i.frames, f"{i.fps:.2f}", f"{i.seconds:.2f}", ";".join(i.outputs),
                             i.bytes, i.kind, i.error])
        written = []
        for suffix, text in ((".json", json.dumps(self.to_json(), indent=2, ensure_ascii=False)),
                             (".csv", buffer.getvalue())):
            path = out / f"{SUMMARY_NAME}{suffix}"
            part = path.with_name(f".{path.name}.part")
            part.write_text(text, encoding="utf-8", newline="")
            os.replace(part, path)
            written.append(path)
        return written


EventSink = Callable[[Message], None]


class Remote(Protocol):
    """Where a batch's Jobs can run instead of here: yields (index, Item) for each (index, input) as it ends."""

    def run(self, inputs: Sequence[tuple[int, BatchInput]]) -> Iterable[tuple[int, Item]]: ...


def warm_pool(pipeline: Pipeline, folder: Path | None = None) -> WorkerPool:
    """Resident Workers for the Pipeline's ``warm`` Steps, preloading their models (logs in a temporary
    folder unless ``folder``)."""
    preloads: dict[str, list[dict[str, Any]]] = {}
    for step in pipeline.stages:
        if step.warm:
            preloads.setdefault(step.name, []).append({k: str(v) if isinstance(v, Path) else v
                                                       for k, v in step.params.items()})
    return WorkerPool(folder or Path(tempfile.mkdtemp(prefix="cuepipe-workers-")), preloads=preloads)


def execute(pipeline: Pipeline, entry: BatchInput, out: Path, sink: EventSink | None = None,
            cancel: threading.Event | None = None, work_root: Path | None = None, python: str | None = None,
            pool: WorkerPool | None = None) -> Item:
    """Run one input's Job and describe it as a summary line: the part of a batch that may run on another
    machine (``orchestrator/rayjobs.py``); deciding whether to run and remembering it stay with ``Runner``."""
    item = Item(str(entry.path), entry.relative.as_posix())
    events: list[Message] = []

    def relay(event: Message) -> None:
        events.append(event)
        if sink is not None:
            sink(event)

    job = Job(pipeline, entry.path, relay, out_dir=out / entry.relative.parent, cancel=cancel,
              work_root=work_root or out / defaults.WORK_DIR_NAME, python=python or sys.executable, pool=pool)
    item.job = job.job_id
    started = time.monotonic()
    result = job.run()
    item.stages = [{"index": e["index"], "stage": e["stage"], "seconds": e["seconds"]}
                   for e in events if e.spec.name == "job/stage_done"]
    item.seconds = next((e["seconds"] for e in events if e.spec.name == "job/done"), time.monotonic() - started)
    item.frames = max((e["frames"] for e in events if e.spec.name == "job/stage_done"), default=0)
    item.fps = item.frames / item.seconds if item.seconds > 0 else 0.0
    if result.state is JobState.DONE:
        item.status, item.outputs = "done", [str(p) for p in result.outputs]
        item.bytes = sum(_size(p) for p in result.outputs)
    else:
        item.status = "cancelled" if result.state is JobState.CANCELLED else "failed"
        item.kind, item.error = (result.kind.value if result.kind else ""), result.message
    return item


class Runner:
    """Runs inputs through the Pipeline, one Job each (any number of threads may call ``run``): what
    ``run_batch`` and the watch folder (``orchestrator/watch.py``) share. Owns the journal of ``out``, and
    so resuming: ``plan`` says whether an input needs its Job, ``record`` remembers a finished one.
    ``close`` it when done."""

    def __init__(self, pipeline: Pipeline, out: Path, sink: EventSink | None = None,
                 cancel: threading.Event | None = None, force: bool = False, python: str | None = None,
                 pool: WorkerPool | None = None) -> None:
        self.pipeline, self.out = pipeline, out.resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.sink, self.force, self.python = sink, force, python or sys.executable
        self._own_pool = pool is None and any(step.warm for step in pipeline.stages)
        # warm Steps keep their model loaded from one input to the next, as under `cuepipe serve`
        self.pool = warm_pool(pipeline) if self._own_pool else pool
        self.cancel = cancel or threading.Event()
        self.definition = definition(pipeline)
        self.journal = Journal(self.out / JOURNAL_NAME)
        self.work_root = self.out / defaults.WORK_DIR_NAME  # one for all inputs, not one per mirrored folder
        self.lock = threading.Lock()  # one Event at a time into the sink

    def plan(self, entry: BatchInput) -> tuple[Item, str]:
        """The input's line and identity; its status is already set (skipped, failed, cancelled) when no Job
        is needed, else "pending"."""
        item = Item(str(entry.path), entry.relative.as_posix())
        if self.cancel.is_set():
            item.status = "cancelled"
            return item, ""
        try:
            key = identity(entry.path)
        except OSError as exc:
            item.status, item.kind, item.error = "failed", ErrorKind.INPUT_MISSING.value, f"cannot read it: {exc}"
            return item, ""
        known = None if self.force else self.journal.recall(item.input, self.definition)
        if known is not None and known[0] == key and all(Path(p).exists() for p in known[1].get("outputs", [])):
            for name in ("frames", "fps", "seconds", "outputs", "bytes", "stages", "job"):
                setattr(item, name, known[1].get(name, getattr(item, name)))
            item.status = "skipped"
        return item, key

    def record(self, item: Item, key: str) -> None:
        if item.status == "done":
            self.journal.remember(item.input, self.definition, key, dataclasses.asdict(item))

    def run(self, entry: BatchInput) -> Item:
        """Plan, run and record one input here; a bug or an unwritable journal fails this input only."""
        item = Item(str(entry.path), entry.relative.as_posix())
        try:
            item, key = self.plan(entry)
            if item.status == "pending":
                item = execute(self.pipeline, entry, self.out, self._relay, self.cancel, self.work_root,
                               self.python, self.pool)
                self.record(item, key)
        except Exception as exc:
            log.exception("batch: %s", entry.path)
            item.status, item.kind, item.error = "failed", ErrorKind.INTERNAL.value, f"{type(exc).__name__}: {exc}"
        return item

    def _relay(self, event: Message) -> None:
        if self.sink is not None:
            with self.lock:
                self.sink(event)

    def close(self) -> None:
        self.journal.close()
        if self._own_pool and self.pool is not None:
            self.pool.stop()
            shutil.rmtree(self.pool.folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.work_root.rmdir()  # only if empty: failed Jobs keep their work folders, for diagnosis


def run_batch(pipeline: Pipeline, inputs: Sequence[BatchInput], out: Path, jobs: int = 1, force: bool = False,
              sink: EventSink | None = None, on_item: Callable[[Item], None] | None = None,
              cancel: threading.Event | None = None, python: str | None = None,
              now: Callable[[], float] = time.monotonic, remote: Remote | None = None) -> Summary:
    """Run ``pipeline`` on every input, ``jobs`` at a time; the Summary (also written into ``out``).

    ``sink`` gets every Job Event; ``on_item`` each input's line once it is settled. ``cancel`` stops
    the running Jobs (they end ``cancelled``) and starts no more. ``remote``: run the Jobs there instead
    (``orchestrator/rayjobs.py``); deciding what to run, the journal and the summary stay here.
    """
    runner = Runner(pipeline, out, sink, cancel, force, python)
    summary = Summary(pipeline.name, runner.definition, str(runner.out), time.strftime("%Y-%m-%dT%H:%M:%S"))
    started = now()

    def settle(entry: BatchInput) -> Item:
        item = runner.run(entry)
        if on_item is not None:
            with runner.lock:
                on_item(item)
        return item

    try:
        if remote is None:
            with ThreadPoolExecutor(max_workers=max(1, jobs), thread_name_prefix="cuepipe-batch") as pool:
                summary.items = list(pool.map(settle, inputs))
        else:
            planned = [runner.plan(entry) for entry in inputs]
            summary.items = [item for item, _ in planned]
            for item, _ in planned:
                if item.status != "pending" and on_item is not None:
                    on_item(item)
            todo = [(i, entry) for i, (entry, (item, _)) in enumerate(zip(inputs, planned, strict=True))
                    if item.status == "pending"]
            for i, item in remote.run(todo):
                runner.record(item, planned[i][1])
                summary.items[i] = item
                if on_item is not None:
                    on_item(item)
    finally:
        runner.close()
        summary.seconds = now() - started
        summary.write(runner.out)
        try:
            from cuepipe.orchestrator.report import write_report  # OpenCV: imported when a batch has run

            write_report(summary.to_json(), runner.out)
        except Exception:  # the report is a view of the summary: never what fails a batch
            log.exception("cannot write the batch report in %s", runner.out)
    return summary
