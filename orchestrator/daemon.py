"""Daemon: ``cuepipe serve`` — Commands in over OSC/UDP, Job Events and replies out.

One thread only reads the command socket (blocking UDP reads with a raised receive buffer and
64 KB datagrams — python-osc's Blocking server without its 8 KB cap) into a queue; the serving
thread hands each decoded Command to its handler in ``commands.TABLE``; the Scheduler runs jobs on their
own threads. Replies are sent from the command port to the sender's host at the reply port it
named. Locked down by default: it binds 127.0.0.1; any other address needs an allow-list of peers,
and inputs must lie under the configured roots. Malformed, oversized and unknown datagrams are
counted and logged; none of them can stop the loop.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cuepipe.orchestrator import commands, defaults
from cuepipe.orchestrator.journal import JobRecord, Journal, JournalError
from cuepipe.orchestrator.pipeline import PipelineFile, describe
from cuepipe.orchestrator.refusal import JobRefused, Refusal
from cuepipe.orchestrator.resident import WorkerPool
from cuepipe.orchestrator.scheduler import RestartPolicy, Scheduler
from cuepipe.orchestrator.transport import DatagramQueue, EventSocket
from cuepipe.orchestrator.worker import ProcessRegistry, reap_leftovers
from cuepipe.stages.codec import MalformedPacket, Message, MessageError, UnknownAddress, decode, encode
from cuepipe.stages.errors import CuepipeError, ErrorKind
from cuepipe.stages.protocol import COMMANDS, HEARTBEAT, PREFIX, REPLY_ERROR, MessageSpec

log = logging.getLogger(__name__)


_MAX_PORT = 65535
_PROCESSES = "processes"  # under --state: the stage processes running now (orchestrator.worker.ProcessRegistry)


def _reply_to(peer: tuple[str, int], port: int) -> tuple[str, int] | None:
    """Where a Command's reply goes: its reply port on the sender's host (0: the datagram's source
    port); None for a port outside 0..65535."""
    if not 0 <= port <= _MAX_PORT:
        return None
    return peer[0], port or peer[1]


def _readable_head(exc: MessageError, peer: tuple[str, int]) -> tuple[str, str, tuple[str, int]]:
    """From a Command that could not be decoded, what can still be read: its tag, its command name
    and where to reply (its reply port when that is a valid one, else the sender's port)."""
    params = exc.params
    tag = params[0] if params and isinstance(params[0], str) else ""
    port = params[1] if len(params) > 1 and isinstance(params[1], int) and not isinstance(params[1], bool) else 0
    command = exc.address.removeprefix(PREFIX + "/")
    return tag, command, _reply_to(peer, port) or peer


def warm_params(pipelines: PipelineFile) -> dict[str, list[dict[str, Any]]]:
    """Per stage, each distinct parameter set of the Steps marked ``warm``: what its resident workers preload."""
    found: dict[str, list[dict[str, Any]]] = {}
    for pipeline in pipelines.pipelines.values():
        for step in pipeline.stages:
            params = {k: str(v) if isinstance(v, Path) else v for k, v in step.params.items()}
            if step.warm and params not in found.setdefault(step.name, []):
                found[step.name].append(params)
    return found


class DaemonError(CuepipeError):
    """The daemon cannot start with this configuration."""

    kind = ErrorKind.CONFIG_INVALID


@dataclass(frozen=True)
class DaemonConfig:
    host: str = defaults.DAEMON_HOST
    port: int = defaults.DAEMON_PORT
    allow: tuple[str, ...] = ()  # peer addresses allowed to send Commands (needed off loopback)
    roots: tuple[Path, ...] = ()  # inputs must lie under one of these (default: the current folder)
    state_dir: Path = Path(".cuepipe-state")
    slots: Mapping[str, int] | None = None
    max_queue: int = defaults.MAX_QUEUE
    policy: RestartPolicy = RestartPolicy.REQUEUE
    heartbeat: float = defaults.HEARTBEAT_INTERVAL
    warm: tuple[str, ...] = ()  # stages to start a resident Worker for at once
    worker_max_jobs: int = defaults.WORKER_MAX_JOBS
    worker_max_rss: int = defaults.WORKER_MAX_RSS
    # watch folders: (pipeline, inbox, output folder or None for the pipeline's own), orchestrator/watch.py
    watch: tuple[tuple[str, Path, Path | None], ...] = ()

    def validate(self) -> None:
        try:
            loopback = ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            loopback = self.host == "localhost"
        if not loopback and not self.allow:
            raise DaemonError(f"binding to {self.host} exposes the daemon to the network: give the peers "
                              "allowed to send commands with --allow ADDRESS (repeatable)")
        from cuepipe.stages import STAGES

        for stage in self.warm:
            if stage not in STAGES:
                raise DaemonError(f"--warm {stage}: unknown stage (known: {', '.join(STAGES)})")
        for peer in self.allow:
            try:
                ipaddress.ip_address(peer)
            except ValueError:
                raise DaemonError(f"--allow needs IP addresses, got {peer!r}") from None


class Daemon:
    def __init__(self, config: DaemonConfig, pipelines: PipelineFile,
                 clock: Callable[[], float] = time.monotonic) -> None:
        config.validate()
        self.config = config
        self.pipelines = pipelines
        self.clock = clock
        self.started = clock()
        self.counters: Counter[str] = Counter()
        self.subscribers: frozenset[tuple[str, int]] = frozenset()  # replaced, never mutated: job threads read it
        self.socket = EventSocket(COMMANDS, config.host, config.port, peers=config.allow or None)
        with contextlib.ExitStack() as undo:  # a failed start closes what it opened, in reverse order
            undo.callback(self.socket.close)
            try:
                self.journal = Journal(config.state_dir / "journal.sqlite3")
                undo.callback(self.journal.close)
                # Stage processes a previous daemon left when it was killed hard (their parent watch stops
                # them within seconds; this is for any that could not notice): killed before anything starts.
                leftovers = reap_leftovers(config.state_dir / _PROCESSES)
                if leftovers:
                    log.warning("killed %d stage process(es) left by the previous daemon: %s", len(leftovers),
                                leftovers)
                from cuepipe.stages.ringshm import sweep as sweep_rings  # numpy: imported when needed

                rings = sweep_rings()  # and the frame rings of streamed jobs whose writers died with it
                if rings:
                    log.warning("removed %d frame ring(s) whose writer had died: %s", len(rings), rings)
                self.pool = WorkerPool(config.state_dir / "workers", max_jobs=config.worker_max_jobs,
                                       max_rss=config.worker_max_rss,
                                       registry=ProcessRegistry(config.state_dir / _PROCESSES),
                                       preloads=warm_params(pipelines))
                undo.callback(self.pool.stop)
                self.scheduler = Scheduler(pipelines, self.journal, self._job_event,
                                           config.slots or defaults.SLOTS, config.roots or (Path.cwd(),),
                                           config.max_queue, config.policy, pool=self.pool)
                for stage in config.warm:
                    self.pool.warm(stage)
                self._watches: list[Any] = self._watch_services()
                undo.callback(self._close_watches)
            except (JournalError, OSError) as exc:  # one clear sentence, not a traceback
                raise DaemonError(f"cannot start: {exc}") from None
            undo.pop_all()
        self._pipelines_json = json.dumps(describe(pipelines), separators=(",", ":"))

    def _watch_services(self) -> list[Any]:
        """One WatchService a ``--watch``: its Jobs run beside the Scheduler's (not in its slots or journal:
        the inbox and the batch journal in the output folder are their record), on the daemon's resident
        Workers, and their Events go to every subscriber, like any Job's."""
        from cuepipe.orchestrator.batch import Runner
        from cuepipe.orchestrator.pipeline import resolve_request
        from cuepipe.orchestrator.watch import Watcher, WatchService

        self._watch_stop = threading.Event()
        services = []
        for name, inbox, out in self.config.watch:
            try:
                pipeline = resolve_request(self.pipelines, name)
            except CuepipeError as exc:
                raise DaemonError(f"--watch {name}={inbox}: {exc}") from None
            if not inbox.is_dir():
                raise DaemonError(f"--watch {name}={inbox}: the inbox is not a folder")
            runner = Runner(pipeline, out or pipeline.out, self._watch_event, cancel=self._watch_stop, pool=self.pool)
            services.append(WatchService(Watcher(inbox), runner))
            log.info("watching %s for %s -> %s", inbox, name, runner.out)
        return services

    def _close_watches(self) -> None:
        for service in self._watches:
            service.runner.close()

    def _watch_event(self, event: Message) -> None:
        self._send(event.spec, event.fields, set(self.subscribers))

    # --- the commands.Context protocol ---------------------------------------------------------

    def uptime(self) -> float:
        return self.clock() - self.started

    def pipelines_json(self) -> str:
        return self._pipelines_json

    def subscribe(self, address: tuple[str, int]) -> None:
        self.subscribers = self.subscribers | {address}

    def unsubscribe(self, address: tuple[str, int]) -> None:
        self.subscribers = self.subscribers - {address}

    # --- out ------------------------------------------------------------------------------------

    def _send(self, spec: MessageSpec, fields: Mapping[str, Any], targets: set[tuple[str, int]]) -> None:
        data = encode(spec, **fields)
        for target in targets:
            self.socket.send(data, target)

    def _job_event(self, event: Message, record: JobRecord) -> None:
        """Job Events go to whoever asked for the job and to every subscriber."""
        targets = set(self.subscribers)
        if record.reply_to:
            targets.add(record.reply_to)
        self._send(event.spec, event.fields, targets)

    def heartbeat(self) -> None:
        queued, running = self.scheduler.counts()
        workers = self.pool.states()
        targets = set(self.subscribers)
        self._send(HEARTBEAT, {"uptime": self.uptime(), "queued": queued, "running": running,
                                        "workers": json.dumps(workers)}, targets)

    # --- in -------------------------------------------------------------------------------------

    def handle(self, data: bytes, peer: tuple[str, int]) -> None:
        """One datagram: decode, dispatch through the table, reply.

        Never raises: whatever goes wrong with one datagram (a hostile reply port, a handler bug, a
        reply that cannot be encoded) is counted and logged, and the daemon serves the next one.
        """
        try:
            self._handle(data, peer)
        except Exception:
            self.counters["internal"] += 1
            log.exception("a datagram from %s:%s could not be handled", peer[0], peer[1])

    def _handle(self, data: bytes, peer: tuple[str, int]) -> None:
        self.counters["datagrams"] += 1
        if len(data) > defaults.MAX_COMMAND_BYTES:
            self.counters["oversized"] += 1
            log.warning("ignoring a %d-byte datagram from %s (limit %d)", len(data), peer[0],
                        defaults.MAX_COMMAND_BYTES)
            return
        try:
            events = decode(data, COMMANDS)
        except MalformedPacket as exc:
            self.counters["malformed"] += 1
            log.warning("malformed datagram from %s: %s", peer[0], exc)
            return
        except MessageError as exc:  # an unknown address, or the wrong arguments for a known one
            unknown = isinstance(exc, UnknownAddress)
            self.counters["unknown" if unknown else "bad_arguments"] += 1
            tag, command, to = _readable_head(exc, peer)
            self._refuse(to, tag, command, Refusal.UNKNOWN_COMMAND if unknown else Refusal.BAD_ARGUMENTS, str(exc))
            return
        for event in events:
            self.counters["commands"] += 1
            tag, command = event["tag"], event.spec.name
            reply_to = _reply_to(peer, event["reply_port"])
            if reply_to is None:
                self.counters["bad_arguments"] += 1
                self._refuse(peer, tag, command, Refusal.BAD_ARGUMENTS,
                             f"reply_port must be 0 (the sender's port) or 1..{_MAX_PORT}, got {event['reply_port']}")
                continue
            try:
                replies = commands.TABLE[event.spec.address](self, event, reply_to)
            except JobRefused as exc:
                self.counters["refused"] += 1
                self._refuse(reply_to, tag, command, exc.reason, exc.message)
                continue
            except Exception as exc:  # a handler bug must not stop the daemon
                self.counters["internal"] += 1
                log.exception("command %s failed", command)
                self._refuse(reply_to, tag, command, Refusal.BAD_ARGUMENTS, f"internal error: {exc}")
                continue
            for spec, fields in replies:
                self._send(spec, fields, {reply_to})

    def _refuse(self, to: tuple[str, int], tag: str, command: str, reason: Refusal, message: str) -> None:
        self._send(REPLY_ERROR, {"tag": tag, "command": command.removeprefix("cmd/"),
                                          "reason": reason.value, "message": message}, {to})

    def serve(self, stop: threading.Event) -> None:
        """Run until ``stop`` is set; then stop the jobs and close everything."""
        log.info("cuepipe serve listening on %s:%d", self.config.host, self.socket.port)
        self.scheduler.dispatch()  # jobs recovered from the journal as queued start now
        next_beat = self.clock()
        watching = [threading.Thread(target=w.serve, args=(self._watch_stop,), name=f"cuepipe-watch-{n}")
                    for n, w in enumerate(self._watches)]
        for thread in watching:
            thread.start()
        inbox = DatagramQueue(self.socket).start()
        try:
            while not stop.is_set():
                for data, peer in inbox.get(0.1):
                    self.handle(data, peer)
                if self.clock() >= next_beat:
                    next_beat = self.clock() + self.config.heartbeat
                    try:
                        self.scheduler.dispatch()  # e.g. keep_running restarts whose backoff has passed
                        self.heartbeat()
                    except Exception:  # contained like a datagram: the daemon keeps serving
                        self.counters["internal"] += 1
                        log.exception("dispatch or heartbeat failed")
        finally:
            inbox.stop()
            self.counters["dropped"] += inbox.dropped
            self._watch_stop.set()  # their running Jobs are cancelled; their inputs stay in the inbox
            for thread in watching:
                thread.join()
            self.close()

    def close(self) -> None:
        self._watch_stop.set()
        self._close_watches()
        self.scheduler.stop()
        self.pool.stop()
        self.journal.close()
        self.socket.close()
        log.info("cuepipe serve stopped; %s", dict(self.counters))
