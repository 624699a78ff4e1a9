"""The batch on a Ray cluster (``cuepipe batch ... --engine ray [--address ADDR]``; the optional ``ray`` extra).

Ray is only the distributor: each input is one task (RVM is recurrent, so a clip's frames stay in
order in one process), run by the very code of the local engine (``batch.execute``: a Job with its
stage subprocesses) inside an actor, a ``RayWorker``. An actor keeps its own pool of resident Workers
(``orchestrator/resident.py``), so a ``warm`` Step's model is loaded once per actor, not once per
clip; an ``ActorPool`` hands the inputs to the actors. A ``gpu`` pipeline's actors each ask for one
GPU (Ray places them where GPUs are), a ``cpu`` one's are spread over the nodes.

Files travel as paths: inputs and the output folder must be on a filesystem every node mounts at the
same path (NFS / SMB). Stages write into node-local scratch (the system's temporary folder) and the
Job publishes complete outputs into the shared folder by copy-then-rename, so the share never sees a
half-written file. The driver (where ``cuepipe batch`` runs) alone decides what to run and keeps the
journal and the summary, so resuming, the summary and the report are the local engine's. An actor
that dies mid-clip is restarted and the clip run again (``max_restarts`` / ``max_task_retries``).
Job Events go from the actors straight to the ``--report`` addresses over UDP.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from cuepipe.orchestrator.batch import BatchInput, Item, execute
from cuepipe.stages.errors import CuepipeError, ErrorKind

log = logging.getLogger(__name__)

RETRIES = 2  # a clip is run again this many times after its actor died under it


class RayUnavailableError(CuepipeError):
    """``--engine ray`` without the optional extra, or no cluster at the address."""

    kind = ErrorKind.PROVIDER_UNAVAILABLE


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RayUnavailableError("the Ray engine needs the optional extra: pip install 'cuepipe[ray]'") from None
    return ray


class RayWorker:
    """One actor: resolves the Pipeline on its node (the pipelines file is on the shared filesystem) and runs
    inputs one at a time, keeping resident stage Workers (warm models) between them."""

    def __init__(self, pipelines: str, name: str, sets: Sequence[str], out: str,
                 reports: Sequence[tuple[str, int]]) -> None:
        from cuepipe.orchestrator.batch import warm_pool
        from cuepipe.orchestrator.pipeline import load_file, resolve_request
        from cuepipe.stages.sender import EventSender

        self.pipeline = resolve_request(load_file(Path(pipelines)), name, sets)
        self.out = Path(out)
        self.scratch = Path(tempfile.mkdtemp(prefix="cuepipe-ray-"))  # node-local: stages write here
        self.pool = warm_pool(self.pipeline, self.scratch / "workers")
        self.sender = EventSender(list(reports))

    def run(self, path: str, relative: str) -> Item:
        return execute(self.pipeline, BatchInput(Path(path), Path(relative)), self.out, self.sender.emit,
                       work_root=self.scratch / "work", pool=self.pool)

    def pid(self) -> int:
        return os.getpid()


class RayExecutor:
    """Runs batch inputs on Ray actors; ``run`` yields each (index, Item) as it finishes."""

    def __init__(self, pipelines: Path, name: str, sets: Sequence[str], out: Path, resource: str,
                 actors: int | None = None, address: str | None = None,
                 reports: Sequence[tuple[str, int]] = ()) -> None:
        ray = _ray()
        self.ray = ray
        self.started_here = not ray.is_initialized()
        if self.started_here:
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise RayUnavailableError(f"cannot reach a Ray cluster at {address or 'a new local one'}: {exc}") \
                    from None
        gpu = resource == "gpu"
        total = ray.cluster_resources()
        count = actors or max(1, int(total.get("GPU", 0)) if gpu else len([n for n in ray.nodes() if n["Alive"]]))
        options: dict[str, Any] = {"num_cpus": 1, "max_restarts": -1, "max_task_retries": RETRIES}
        options.update({"num_gpus": 1} if gpu else {"scheduling_strategy": "SPREAD"})
        actor = ray.remote(RayWorker).options(**options)
        self.actors = [actor.remote(str(pipelines), name, list(sets), str(out), list(reports)) for _ in range(count)]
        log.info("ray: %d actor(s) for %s (%s)", count, name, resource)

    def run(self, inputs: Sequence[tuple[int, BatchInput]]) -> Iterator[tuple[int, Item]]:
        from ray.util import ActorPool

        pool = ActorPool(self.actors)
        index = {}
        for n, (i, entry) in enumerate(inputs):
            index[n] = i
            pool.submit(lambda a, v: a.run.remote(str(v[1].path), v[1].relative.as_posix()), (n, entry))
        for n, _ in enumerate(inputs):
            try:
                item: Item = pool.get_next()  # in submission order
            except self.ray.exceptions.RayError as exc:  # the clip failed even after its retries
                entry = inputs[n][1]
                item = Item(str(entry.path), entry.relative.as_posix(), status="failed",
                            kind=ErrorKind.CRASHED.value, error=f"ray: {type(exc).__name__}: {exc}")
            yield index[n], item

    def pids(self) -> list[int]:
        return [int(p) for p in self.ray.get([a.pid.remote() for a in self.actors])]

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        if self.started_here:
            self.ray.shutdown()
