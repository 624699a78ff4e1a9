"""The extension of the ``cuepipe`` COMP: its parameters in, jobs and a job table out.

TD instantiates ``CuepipeExt(ownerComp)`` (through ``td/boot.py``). Every operator is reached
through ``self.owner`` — parameters are read with ``ownerComp.par.X`` each time they are needed,
never at import and never cached — so there are no module-level globals bound to operators, and
tests drive the class with TD-shaped fakes. Capitalized members are the public API TD promotes:
``Start`` / ``Cancel`` / ``Trigger`` / ``SubmitTable`` / ``RefreshPipelines`` / ``Update`` (once
per frame) / ``ReceiveOSC`` / ``ReceiveBytes`` and the state ``Jobs``, ``Status``, ``Daemon``,
``Progress``, ``ActiveJob``, ``LastOutput``, ``Pipelines`` (objects with ``.val``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .jobs import JobRow, JobTable, write_table
from .link import DaemonLink
from .parameters import Value, assign, setup_parameters, split_sets
from .start import (
    REPO_ROOT,
    DaemonClient,
    LaunchError,
    LaunchOptions,
    PipelinesQuery,
    ProcessJob,
    default_python,
    last_line,
    new_job_id,
    setup_venv,
    start_daemon,
    start_job,
)

log = logging.getLogger(__name__)

CANCEL_GRACE = 15.0  # seconds after a cancel before the launcher is killed outright
RESUBSCRIBE = 5.0  # seconds between cmd/subscribe while the daemon is not alive


def td_global(name: str) -> Any:
    """One of TD's globals (``app``, ``project``, ``tdu``...) at call time, or None outside TD: from TD's
    ``td`` module, else the builtins TD puts them in; never at import."""
    import builtins

    module = sys.modules.get("td")
    value = getattr(module, name, None) if module is not None else None
    return value if value is not None else getattr(builtins, name, None)


def td_python() -> str:
    """The interpreter TD itself runs (``app.pythonExecutable``), or "" outside TD."""
    app = td_global("app")
    return str(getattr(app, "pythonExecutable", "") or "") if app is not None else ""


class CuepipeExt:
    """Runs pipelines for the COMP it extends and keeps its job table; never blocks TD."""

    def __init__(self, ownerComp: Any, *, now: Callable[[], float] = time.monotonic,
                 dependency: Callable[[Any], Any] | None = None, env: Mapping[str, str] | None = None,
                 auto_refresh: bool = True) -> None:
        self.owner = ownerComp
        self.env = env  # the launcher's environment; None: TD's minus PYTHONHOME/PYTHONPATH
        self._now = now
        self.Jobs = JobTable(now=now)
        hooks = self.Jobs.hooks
        hooks.job_end.append(self._job_end)
        hooks.stage_done.append(lambda row, i, stage, outs: self._callback("onStageDone", row, i, stage, outs))
        hooks.offline.append(self._offline)
        hooks.online.append(self._online)
        hooks.pipelines.append(self._pipelines_json)
        hooks.acked.append(self._acked)
        make = dependency or Value
        self.Status, self.Daemon, self.Progress = make("idle"), make("unknown"), make(0.0)
        self.ActiveJob, self.LastOutput, self.Pipelines = make(""), make(""), make([])
        self.procs: dict[str, ProcessJob] = {}
        self.helpers: dict[str, ProcessJob] = {}  # "daemon" (Start daemon), "venv" (Setup venv)
        self._cancelled_at: dict[str, float] = {}
        self._client: DaemonClient | None = None
        self._query: PipelinesQuery | None = None
        self._submitted: set[tuple[str, str]] = set()
        self._rendered = -1
        self._refresh_due = auto_refresh
        self._subscribed_at: float | None = None

    # ---------------------------------------------------------------------------------- parameters

    def _par(self, name: str, default: Any = None) -> Any:
        try:
            par = getattr(self.owner.par, name, None)
            value = par.eval() if par is not None else None
        except Exception:  # a missing or broken parameter means "use the default"
            value = None
        return default if value is None or (isinstance(value, str) and not value.strip()) else value

    def _mode(self) -> str:
        return str(self._par("Mode", "run")).lower()

    def _python(self) -> str:
        python = str(self._par("Python", "")) or str(default_python(self._repo()))
        own = td_python()
        if own and os.path.normcase(os.path.abspath(python)) == os.path.normcase(os.path.abspath(own)):
            raise LaunchError("Python points at TouchDesigner's own interpreter; set it to the venv's python "
                              "(press Setup venv to make one)")
        return python

    def _repo(self) -> Path:
        return Path(self._par("Repo", REPO_ROOT))

    def _input(self, text: str) -> str:
        """An input as the user typed it: TD project paths (``movies://...``) expanded, and a relative path
        taken against the project's folder (TD's working folder is not documented to be it)."""
        expanded = td_global("tdu")
        if expanded is not None:
            with contextlib.suppress(Exception):  # an older build without expandPath: the path as typed
                text = str(expanded.expandPath(text))
        project = td_global("project")
        folder = getattr(project, "folder", None) if project is not None else None
        if folder and not os.path.isabs(text):
            text = os.path.join(str(folder), text)
        return os.path.abspath(text)

    def _options(self) -> LaunchOptions:
        return LaunchOptions(python=self._python(), report_port=int(self._par("Oscinport", 7000)),
                             pipelines=self._par("Pipelinesfile"), out=self._par("Outdir"), env=self.env)

    def _daemon(self) -> DaemonClient:
        host, port = str(self._par("Daemonhost", "127.0.0.1")), int(self._par("Daemonport", 9000))
        reply = int(self._par("Oscinport", 7000))
        client = self._client
        if client is None or (client.host, client.port, client.reply_port) != (host, port, reply):
            if client is not None:
                client.close()
            client = self._client = DaemonClient(host, port, reply)
        return client

    # ------------------------------------------------------------------------------------- actions

    def Start(self, pipeline: str | None = None, input: str | None = None, sets: Sequence[str] | None = None,
              *, chained: bool = False) -> str | None:
        """Start a job (parameters fill what is not given); returns its row key at once."""
        pipeline = pipeline or str(self._par("Pipeline", ""))
        input = input or str(self._par("Input", ""))
        if not pipeline or not input:
            self._say("choose a pipeline and an input first")
            return None
        sets = list(sets) if sets is not None else split_sets(str(self._par("Sets", "")))
        if self._mode() == "daemon":
            if str(self._par("Daemonhost", "127.0.0.1")) in ("127.0.0.1", "localhost", "::1"):
                input = self._input(input)  # a daemon on this machine reads the paths TD shows
                self._release_movie(input)
            # (a daemon on another machine gets the path as typed: it is that machine's path)
            return self._start_daemon(pipeline, input, sets, chained)
        input = self._input(input)
        self._release_movie(input)
        job = new_job_id()
        row = self.Jobs.add(job, pipeline, input, "run")
        row.chained = chained
        try:
            handle = start_job(self._options(), pipeline, input, sets, job_id=job)
        except LaunchError as exc:
            self.Jobs.fail(job, str(exc))
            self._say(str(exc))
        else:
            row.log = str(handle.log_path)
            self.procs[job] = handle
            self._say(f"started {pipeline} as {job}")
        self._render()
        return job

    def _start_daemon(self, pipeline: str, input: str, sets: list[str], chained: bool) -> str:
        try:
            key = self._daemon().run(pipeline, input, int(self._par("Priority", 10)), sets)
            self.Jobs.daemon.expect_reply(key, "run")
            error = ""
        except (LaunchError, ValueError) as exc:
            key, error = new_job_id(), str(exc)
        row = self.Jobs.add(key, pipeline, input, "daemon")
        row.chained = chained
        if error:
            self.Jobs.fail(key, error)
        self._say(error or f"asked cuepipe serve to run {pipeline}")
        self._render()
        return key

    def Cancel(self, job: str | None = None) -> bool:
        """Cancel ``job`` (default: the newest unfinished one). False if there is nothing to cancel."""
        row = self.Jobs.get(job) if job else next(reversed(self.Jobs.active()), None)
        if row is None or row.final:
            return False
        self.Jobs.request_cancel(row.job)
        handle = self.procs.get(row.job)
        try:
            if handle is not None:
                handle.cancel()
                self._cancelled_at[row.job] = self._now()
            elif row.job not in self.Jobs.daemon.pending and (row.source == "daemon" or self._mode() == "daemon"):
                self._daemon().cancel(row.job)  # a job still waiting for its ack is cancelled on the ack
        except (LaunchError, OSError) as exc:
            self._say(f"cannot cancel {row.job}: {exc}")
        self._render()
        return True

    def Trigger(self, name: str = "") -> str | None:
        """From a CHOP: a channel named ``cancel`` cancels; one named after a pipeline runs it."""
        if name.lower() == "cancel":
            self.Cancel()
            return None
        return self.Start(pipeline=name if name in self.Pipelines.val else None)

    def SubmitTable(self, dat: Any) -> list[str]:
        """Start a job for each row not seen before (header: ``input`` or ``path``, optional ``pipeline``)."""
        if dat.numRows < 1:
            return []
        columns = {str(dat[0, c].val).strip().lower(): c for c in range(dat.numCols)}
        source = columns.get("input", columns.get("path"))
        if source is None:
            self._say(f"table {getattr(dat, 'path', dat)} has no 'input' or 'path' column")
            return []
        started = []
        for r in range(1, dat.numRows):
            input = str(dat[r, source].val).strip()
            pipeline = str(dat[r, columns["pipeline"]].val).strip() if "pipeline" in columns else ""
            if not input or (pipeline, input) in self._submitted:
                continue
            self._submitted.add((pipeline, input))
            job = self.Start(pipeline=pipeline or None, input=input)
            if job:
                started.append(job)
        return started

    def RefreshPipelines(self) -> None:
        """Fill the ``Pipeline`` menu: ``cuepipe pipelines --json`` (run mode) or ``cmd/list`` (daemon)."""
        try:
            if self._mode() == "daemon":
                self.Jobs.daemon.expect_reply(self._daemon().list(), "list")
                return
            if self._query is not None:
                self._query.close()
            self._query = PipelinesQuery(self._python(), self._par("Pipelinesfile"), env=self.env)
        except LaunchError as exc:
            self._say(str(exc))

    def Clear(self) -> None:
        self.Jobs.clear_finished()
        self._render()

    def StartDaemon(self) -> None:
        """Start ``cuepipe serve`` on the Daemon port with the venv's Python (inputs under the project folder
        and the repository; its journal in ``<Repo>/.cuepipe-state``); Mode = daemon then sends jobs there."""
        running = self.helpers.get("daemon")
        if running is not None and running.poll() is None:
            self._say(f"cuepipe serve is already running (pid {running.pid})")
            return
        project = td_global("project")
        roots = [str(r) for r in (getattr(project, "folder", None), self._repo()) if r]
        try:
            self.helpers["daemon"] = start_daemon(self._options(), int(self._par("Daemonport", 9000)),
                                                  self._repo() / ".cuepipe-state", roots)
        except LaunchError as exc:
            self._say(str(exc))
            return
        self._say(f"starting cuepipe serve on port {int(self._par('Daemonport', 9000))}")

    def StopDaemon(self) -> None:
        daemon = self.helpers.get("daemon")
        if daemon is None or daemon.poll() is not None:
            self._say("no cuepipe serve started from here is running")
            return
        daemon.stop()
        self._say("stopping cuepipe serve")

    def SetupVenv(self, base: Sequence[str] | None = None, pip_args: Sequence[str] = ()) -> None:
        """Make ``<Repo>/.venv`` and install cuepipe into it, in the background (never into TD's own
        Python); Status shows the log's last line while it runs, then the result."""
        running = self.helpers.get("venv")
        if running is not None and running.poll() is None:
            self._say("the venv is being set up already")
            return
        try:
            self.helpers["venv"] = setup_venv(self._repo(), base, pip_args)
        except LaunchError as exc:
            self._say(str(exc))
            return
        self._say(f"setting up the venv in {self._repo() / '.venv'} (log: {self.helpers['venv'].log_path})")

    def _poll_helpers(self) -> None:
        for name, handle in list(self.helpers.items()):
            code = handle.poll()
            if name == "venv" and code is None:
                line = last_line(handle.log_path)
                if line:
                    self._say(f"setting up the venv: {line[-120:]}")
            elif code is not None:
                del self.helpers[name]
                if name == "venv":
                    self._say(f"venv ready: {default_python(self._repo())}" if code == 0 else
                              f"venv setup failed (exit code {code}): see {handle.log_path}")
                    if code == 0:
                        self.RefreshPipelines()
                else:
                    self._say(f"cuepipe serve exited (code {code}); its log: {handle.log_path}")

    def OnPulse(self, par: Any) -> None:
        """For a Parameter Execute DAT's ``onPulse(par)``."""
        actions: dict[str, Callable[[], Any]] = {"Start": self.Start, "Cancel": self.Cancel,
                                                 "Refresh": self.RefreshPipelines, "Clear": self.Clear,
                                                 "Startdaemon": self.StartDaemon, "Stopdaemon": self.StopDaemon,
                                                 "Setupvenv": self.SetupVenv}
        action = actions.get(getattr(par, "name", ""))
        if action is not None:
            action()

    # ----------------------------------------------------------------------------------- receiving

    def ReceiveOSC(self, address: Any, args: Any, peer: Any = None) -> bool:
        return self.Jobs.receive(address, args)

    def ReceiveBytes(self, data: Any, peer: Any = None) -> int:
        return self.Jobs.receive_bytes(data)

    def Update(self) -> None:
        """Once per frame: collect exit codes, keep the daemon subscription, apply timeouts, redraw."""
        now = self._now()
        if self._refresh_due:
            self._refresh_due = False
            self.RefreshPipelines()
        for job, handle in list(self.procs.items()):
            code = handle.poll()
            if code is not None:
                self.Jobs.process_exited(job, code)
                del self.procs[job]
                self._cancelled_at.pop(job, None)
            elif job in self._cancelled_at and now - self._cancelled_at[job] > CANCEL_GRACE:
                log.warning("%s ignored its cancel for %.0f s; killing it", job, CANCEL_GRACE)
                handle.kill_tree()
                del self._cancelled_at[job]
        self._poll_helpers()
        self.Jobs.daemon.offline_after = int(self._par("Heartbeats", self.Jobs.daemon.offline_after))
        self.Jobs.tick()
        if self._mode() == "daemon" and self.Jobs.daemon.state != "alive" and (
                self._subscribed_at is None or now - self._subscribed_at >= RESUBSCRIBE):
            self._subscribed_at = now
            try:
                self.Jobs.daemon.expect_reply(self._daemon().subscribe(), "subscribe")
            except LaunchError as exc:
                self._say(str(exc))
        if self._query is not None and self._query.poll():
            if self._query.result is not None:
                self._set_pipelines(self._query.result)
            else:
                self._say(self._query.error)
            self._query = None
        self._render()

    def Close(self, cancel: bool = False) -> None:
        """Release sockets and helpers; running jobs, a daemon and a venv setup go on (``cancel=True``
        cancels the jobs)."""
        if cancel:
            for handle in self.procs.values():
                handle.cancel()
        if self._query is not None:
            self._query.close()
            self._query = None
        if self._client is not None:
            self._client.close()
            self._client = None

    def onDestroyTD(self) -> None:  # TD calls this when the extension is re-initialized
        self.Close()

    # ------------------------------------------------------------------------------- hooks / view

    def _job_end(self, row: JobRow) -> None:
        if row.state == "done" and row.source != "seen" and row.output:
            assign(self.LastOutput, row.output)
            movie = self._par("Movieout")
            if movie is not None:
                movie.par.file = row.output
                reload = getattr(movie.par, "reloadpulse", None)
                if reload is not None:  # the same path as before (a re-run) would not reload by itself
                    reload.pulse()
            following = str(self._par("Nextpipeline", ""))
            if following and not row.chained and row.pipeline != following:
                self.Start(pipeline=following, input=row.output, sets=(), chained=True)
        self._callback({"done": "onJobDone", "cancelled": "onJobCancelled"}.get(row.state, "onJobFailed"), row)

    def _acked(self, row: JobRow) -> None:
        if row.cancel_requested:
            self._daemon().cancel(row.job)

    def _offline(self, daemon: DaemonLink) -> None:
        self._say("cuepipe serve is offline")
        self._callback("onDaemonOffline", daemon)

    def _online(self, daemon: DaemonLink) -> None:
        self.Jobs.daemon.expect_reply(self._daemon().status(""), "status")  # resync what happened meanwhile
        self._callback("onDaemonOnline", daemon)

    def _pipelines_json(self, text: str) -> None:
        data = json.loads(text)
        self._set_pipelines(data if isinstance(data, dict) else {"pipelines": data})

    def _set_pipelines(self, data: Mapping[str, Any]) -> None:
        items = [p for p in data.get("pipelines", []) if isinstance(p, dict) and p.get("name")]
        names = [str(p["name"]) for p in items]
        labels = [f"{p['name']} ({' > '.join(str(s.get('stage')) for s in p.get('stages', []))})" for p in items]
        assign(self.Pipelines, names)
        for menu in ("Pipeline", "Nextpipeline"):
            par = getattr(self.owner.par, menu, None)
            if par is not None:
                par.menuNames, par.menuLabels = names, labels
        self._say(f"{len(names)} pipeline(s)")

    def _callback(self, name: str, *args: Any) -> None:
        dat = self._par("Callbacks")
        function = getattr(getattr(dat, "module", None), name, None) if dat is not None else None
        if callable(function):
            function(self, *args)

    def _release_movie(self, input: str) -> None:
        """Unload the Movie out TOP when it shows this input's output: a re-run publishes the same path,
        which Windows refuses to replace while TD holds the file open. The new output is loaded after
        ``job/done`` (``_job_end``)."""
        movie = self._par("Movieout")
        par = getattr(getattr(movie, "par", None), "file", None)
        shown = str(par.eval()) if par is not None and hasattr(par, "eval") else str(par or "")
        if movie is not None and shown and Path(shown).name.startswith(f"{Path(input).stem}_"):
            movie.par.file = ""

    def _say(self, text: str) -> None:
        assign(self.Status, text)
        status = getattr(self.owner.par, "Status", None)  # the read-only Status parameter, where there is one
        if status is not None and not str(getattr(status, "mode", "")).endswith("EXPRESSION"):  # built: it
            # follows self.Status by expression (td/build_comp.py); a hand-made one is written here
            with contextlib.suppress(Exception):  # an expression-driven Status follows self.Status instead
                status.val = text
        log.info("cuepipe: %s", text)

    def _render(self) -> None:
        if self.Jobs.version == self._rendered:
            return
        self._rendered = self.Jobs.version
        assign(self.Daemon, self.Jobs.daemon.state)
        active = self.Jobs.active()
        latest = active[-1] if active else next(reversed(self.Jobs.rows.values()), None)
        assign(self.ActiveJob, latest.job if latest else "")
        assign(self.Progress, latest.progress if latest else 0.0)
        dat = self._par("Jobtable") or self.owner.op("jobs")
        if dat is not None:
            write_table(dat, self.Jobs.table())

    def SetupParameters(self) -> None:
        """Create the custom page ``Cuepipe`` (run once from the textport; existing parameters stay)."""
        setup_parameters(self.owner)
