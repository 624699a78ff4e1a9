"""WorkerPool: resident stage Workers that keep their model loaded between jobs (``cuepipe serve``).

A cold stage pays for Python start-up, imports and model loading on every trigger; a resident
Worker (``python -m cuepipe.stages.<name> --serve``, see ``cuepipe.stages.stage.serve``) pays once. The pool leases an
idle Worker of the right stage to a Job, or starts one; after the job it takes it back, unless the
Worker must be recycled (after ``max_jobs`` jobs, or above ``max_rss`` bytes of memory) or died.
A Worker that died is replaced, after a backoff that grows with consecutive crashes, so a stage that
crashes on start-up cannot spin. A Worker killed on purpose (cancel, timeout) is replaced without
backoff. The Job sees a ``ResidentTask``, which answers like a ``Worker`` (poll, stop, tail, ...).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil

from cuepipe.orchestrator import defaults
from cuepipe.orchestrator.worker import ProcessRegistry, Worker, stage_env
from cuepipe.stages import STAGES

log = logging.getLogger(__name__)


class ResidentWorker:
    """One resident stage process and the thread that reads its completion lines."""

    def __init__(self, stage: str, worker: Worker) -> None:
        self.stage = stage
        self.worker = worker
        self.jobs = 0
        self.job: str | None = None
        self.job_log_start = 0  # where the current job's lines start in the shared log
        self._completions: queue.Queue[dict[str, Any]] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name=f"cuepipe-resident-{stage}", daemon=True)

    def start(self) -> None:
        self.worker.start()
        self._reader.start()

    def _read(self) -> None:
        stdout = self.worker.stdout
        if stdout is None:
            return
        with contextlib.suppress(OSError, ValueError):  # the pipe closes when the process dies
            for line in stdout:
                try:
                    self._completions.put(json.loads(line))
                except json.JSONDecodeError:
                    log.warning("resident %s wrote a non-JSON line: %r", self.stage, line[:200])

    @property
    def alive(self) -> bool:
        if self.worker.poll() is not None:
            return False
        try:  # killed, but its other threads still exiting: a zombie not yet reapable, as good as dead
            return psutil.Process(self.worker.pid).status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def _send(self, request: Mapping[str, Any]) -> bool:
        """One JSON line to the worker's stdin; False if it cannot take it (its process is gone)."""
        stdin = self.worker.stdin
        if stdin is None:
            return False
        try:
            stdin.write(json.dumps(request) + "\n")
            stdin.flush()
        except (OSError, ValueError):
            return False
        return True

    def preload(self, params: Mapping[str, Any]) -> None:
        """Ask the worker to load what a job with ``params`` needs, before any job (``stages.stage.serve``);
        a dead worker is found out by the next lease."""
        self._send({"preload": {k: v for k, v in params.items() if v is not None}})

    def submit(self, job: str, input: Path | str, output_dir: Path, port: int, params: Mapping[str, Any]) -> bool:
        """Hand the worker a job; False if it could not take it (its process is gone)."""
        request = {"job": job, "input": str(input), "output_dir": str(output_dir),
                   "report": [f"127.0.0.1:{port}"], "params": {k: v for k, v in params.items() if v is not None}}
        self.job_log_start = self.worker.log_size()
        if not self._send(request):
            return False
        self.job = job
        return True

    def finished(self) -> int | None:
        """The job's exit code once the worker reported it (or the process's, if it died)."""
        while True:
            try:
                done = self._completions.get_nowait()
            except queue.Empty:
                break
            if done.get("job") == self.job:
                self.job = None
                self.jobs += 1
                return int(done.get("exit", 1))
        code = self.worker.poll()
        if code is not None:  # died mid-job; read what it may still have written
            self._reader.join(timeout=1)
            while not self._completions.empty():
                done = self._completions.get_nowait()
                if done.get("job") == self.job:
                    return int(done.get("exit", 1))
            return code if code != 0 else 1
        return None

    def rss(self) -> int:
        try:
            return int(psutil.Process(self.worker.pid).memory_info().rss)
        except psutil.Error:
            return 0

    def stop(self, grace: float = defaults.KILL_GRACE) -> int:
        code = self.worker.stop(grace)
        self._reader.join(timeout=2)
        return code


class WorkerPool:
    def __init__(self, folder: Path, python: str = sys.executable, max_jobs: int = defaults.WORKER_MAX_JOBS,
                 max_rss: int = defaults.WORKER_MAX_RSS, backoff_max: float = 30.0,
                 now: Callable[[], float] = time.monotonic, registry: ProcessRegistry | None = None,
                 preloads: Mapping[str, Sequence[Mapping[str, Any]]] | None = None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        # per stage, the parameter sets its new workers preload (the warm Steps' params): model, ratio...
        self.preloads = dict(preloads or {})
        self.folder = folder
        self.registry = registry  # resident processes are recorded there (and Jobs' cold ones too)
        self.python = python
        self.max_jobs = max_jobs
        self.max_rss = max_rss
        self.backoff_max = backoff_max
        self.now = now
        self._lock = threading.Lock()
        self._idle: dict[str, list[ResidentWorker]] = {}
        self._busy: set[ResidentWorker] = set()
        self._crashes: dict[str, int] = {}
        self._numbers = itertools.count(1)
        self.started = 0

    def backoff(self, stage: str) -> float:
        crashes = self._crashes.get(stage, 0)
        return 0.0 if crashes == 0 else min(self.backoff_max, 2.0 ** (crashes - 1))

    def lease(self, stage: str, cancel: threading.Event | None = None) -> ResidentWorker:
        """An idle worker of ``stage``, or a new one (after the crash backoff, if any)."""
        with self._lock:
            idle = self._idle.get(stage, [])
            while idle:
                resident = idle.pop()
                if resident.alive:
                    self._busy.add(resident)
                    return resident
                resident.stop(0.5)
            delay = self.backoff(stage)
        if delay:
            log.warning("resident %s crashed %d times in a row; waiting %.0fs before the next", stage,
                        self._crashes[stage], delay)
            (cancel or threading.Event()).wait(delay)
        number = next(self._numbers)
        worker = Worker([self.python, "-m", STAGES[stage], "--serve"], self.folder,
                        self.folder / f"{stage}-{number}.log", env=stage_env(), now=self.now, pipes=True,
                        registry=self.registry)
        resident = ResidentWorker(stage, worker)
        resident.start()
        for params in self.preloads.get(stage, ()):
            resident.preload(params)
        self.started += 1
        with self._lock:
            self._busy.add(resident)
        return resident

    def release(self, resident: ResidentWorker, crashed: bool = False) -> None:
        """Take a worker back after a job: keep it idle, recycle it, or count its crash."""
        with self._lock:
            self._busy.discard(resident)
            if crashed or not resident.alive:
                self._crashes[resident.stage] = self._crashes.get(resident.stage, 0) + 1
                keep = False
            else:
                self._crashes[resident.stage] = 0
                rss = resident.rss()
                keep = resident.jobs < self.max_jobs and rss <= self.max_rss
                if not keep:
                    log.info("recycling resident %s after %d jobs (%d MB)", resident.stage, resident.jobs, rss >> 20)
            if keep:
                self._idle.setdefault(resident.stage, []).append(resident)
        if not keep:
            resident.stop()

    def discard(self, resident: ResidentWorker) -> int:
        """Kill a worker on purpose (cancel, timeout); the next lease starts a fresh one."""
        with self._lock:
            self._busy.discard(resident)
        return resident.stop()

    def warm(self, stage: str) -> None:
        """Start a worker now so the first trigger does not pay for the start."""
        self.release(self.lease(stage))

    def states(self) -> list[dict[str, Any]]:
        with self._lock:
            idle = [(r, "idle") for rs in self._idle.values() for r in rs]
            busy = [(r, "busy") for r in self._busy]
        return [{"stage": r.stage, "state": s, "pid": r.worker.pid, "jobs": r.jobs} for r, s in idle + busy]

    def stop(self) -> None:
        with self._lock:
            everyone = [r for rs in self._idle.values() for r in rs] + list(self._busy)
            self._idle.clear()
            self._busy.clear()
        for resident in everyone:
            resident.stop()


class ResidentTask:
    """One job on a leased resident worker, answering the Job like a ``Worker`` does."""

    def __init__(self, pool: WorkerPool, resident: ResidentWorker, now: Callable[[], float]) -> None:
        self.pool = pool
        self.resident = resident
        self.started_at = now()
        self._discarded = False
        # Every job of a resident worker writes to one log: this job's tail is only its own part.
        self._log_start = resident.job_log_start
        self._log_end: int | None = None

    @property
    def pid(self) -> int:
        return self.resident.worker.pid

    def poll(self) -> int | None:
        return self.resident.finished()

    def scan(self, every: float = 0.5) -> None:
        self.resident.worker.scan(every)

    def stop(self, grace: float = defaults.KILL_GRACE) -> int:
        self._discarded = True
        return self.pool.discard(self.resident)

    def cleanup(self) -> None:
        if not self._discarded:
            self._log_end = self.resident.worker.log_size()  # released, the worker may take the next job
            self.pool.release(self.resident, crashed=not self.resident.alive)

    def tail(self, lines: int = defaults.STDERR_TAIL_LINES) -> str:
        return self.resident.worker.tail(lines, since=self._log_start, until=self._log_end)
