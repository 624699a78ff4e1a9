"""td/jobs.py (the job table model) and the callback adapters' promise never to raise into TD."""

from __future__ import annotations

import time
from typing import Any

import pytest

from cuepipe.td import callbacks, osc, protocol
from cuepipe.td.extension import CuepipeExt
from cuepipe.td.jobs import COLUMNS, JobRow, JobTable, write_table
from tests.support.td_fakes import FakeChannel, FakeComp, FakeOP, FakePar, FakeTableDAT, running_in


class Clock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def send(table: JobTable, spec: protocol.Spec, **fields: Any) -> bool:
    """Deliver one message the way a UDP In DAT would: as encoded bytes."""
    return table.receive_bytes(protocol.encode(spec, **fields)) == 1


def test_rows_follow_the_job_events() -> None:
    table = JobTable(now=Clock(), wall=lambda: 1000.0)
    stage_done: list[tuple[str, int, tuple[str, ...]]] = []
    ended: list[tuple[str, str]] = []
    table.hooks.stage_done.append(lambda row, i, stage, outs: stage_done.append((row.job, i, outs)))
    table.hooks.job_end.append(lambda row: ended.append((row.job, row.state)))
    table.add("J", "two", "/in.mp4")
    assert table.table() == [list(COLUMNS), ["J", "two", "", "starting", "0.000", "", "", "", ""]]
    send(table, protocol.JOB_STARTED, job="J", pipeline="two", input="/in.mp4", stages=2)
    send(table, protocol.JOB_STAGE_STARTED, job="J", index=0, stage="prep", attempt=1, pid=5, info="{}")
    send(table, protocol.JOB_STAGE_FAILED, job="J", index=0, stage="prep", attempt=1, exit_code=3, kind="crashed",
         message="exit 3", stderr="boom", retrying=1)
    assert table.rows["J"].error == "prep attempt 1: crashed (exit 3): exit 3 — retrying"
    send(table, protocol.JOB_PROGRESS, job="J", index=0, stage="prep", fraction=0.5, frame=1, total=2, fps=20.0,
         overall=0.25)
    send(table, protocol.JOB_STAGE_DONE, job="J", index=0, stage="prep", frames=2, seconds=0.1, outputs=["/w/a"])
    row = table.rows["J"]
    assert (row.state, row.stage, row.progress, row.fps, row.stderr) == ("running", "prep", 0.5, 20.0, "boom")
    assert row.cells()[2] == "1/2 prep" and row.cells()[8] == time.strftime("%H:%M:%S", time.localtime(1000.0))
    send(table, protocol.JOB_DONE, job="J", seconds=1.0, outputs=["/out/a.mov", "/out/b.png"])
    send(table, protocol.JOB_DONE, job="J", seconds=1.0, outputs=["/other"])  # duplicate: changes nothing
    send(table, protocol.JOB_PROGRESS, job="J", index=1, stage="x", fraction=0.1, frame=1, total=9, fps=1.0,
         overall=0.55)  # a late straggler cannot reopen a finished row
    row = table.rows["J"]
    assert (row.state, row.output, row.error, row.progress) == ("done", "/out/a.mov", "", 1.0)
    assert stage_done == [("J", 0, ("/w/a",))] and ended == [("J", "done")]


def test_a_live_job_shows_its_rate_and_latency_where_an_output_would_be() -> None:
    table = JobTable(now=Clock())
    send(table, protocol.JOB_STARTED, job="L", pipeline="live", input="ndi://td-camera", stages=1)
    assert send(table, protocol.JOB_LIVE, job="L", index=0, stage="matting", frames=300, fps=29.9, dropped=4,
                latency_p50=27.0, latency_p95=31.2)
    cells = table.rows["L"].cells()
    assert cells[COLUMNS.index("state")] == "running" and cells[COLUMNS.index("fps")] == "29.9"
    assert cells[COLUMNS.index("output")] == "live: 300 frames, 4 dropped, latency 27 / 31 ms (p50 / p95)"
    send(table, protocol.JOB_CANCELLED, job="L", index=0, stage="matting")
    assert table.rows["L"].state == "cancelled"


def test_a_warning_shows_in_the_error_column_until_an_error_does() -> None:
    table = JobTable(now=Clock())
    send(table, protocol.JOB_STARTED, job="W", pipeline="prep", input="/in.mp4", stages=1)
    for _ in range(2):  # by report and as a subscriber: shown once
        assert send(table, protocol.JOB_WARNING, job="W", index=0, stage="preprocess", kind="input_truncated",
                    message="decoded 11 of 50 frames")
    send(table, protocol.JOB_DONE, job="W", seconds=1.0, outputs=["/out/a.mkv"])
    row = table.rows["W"]
    assert row.state == "done" and row.warnings == ("preprocess: input_truncated: decoded 11 of 50 frames",)
    assert row.cells()[COLUMNS.index("error")] == "warning: preprocess: input_truncated: decoded 11 of 50 frames"
    row.error = "a real error"
    assert row.cells()[COLUMNS.index("error")] == "a real error"


def test_failure_and_cancel_rows() -> None:
    table = JobTable(now=Clock())
    send(table, protocol.JOB_FAILED, job="F", index=0, stage="matting", exit_code=1, kind="model_missing",
         message="fetch it")
    send(table, protocol.JOB_FAILED, job="R", index=-1, stage="", exit_code=-1, kind="unknown_pipeline", message="no")
    send(table, protocol.JOB_CANCELLED, job="C", index=0, stage="matting")
    assert table.rows["F"].error == "model_missing at matting (exit 1): fetch it"
    assert table.rows["R"].error == "unknown_pipeline: no"
    assert [r.state for r in table.rows.values()] == ["failed", "failed", "cancelled"]
    assert all(r.source == "seen" for r in table.rows.values())  # rows for jobs TD did not start


def test_daemon_goes_offline_after_n_silent_heartbeats() -> None:
    clock = Clock()
    table = JobTable(now=clock, heartbeat_interval=1.0, offline_after=3)
    events: list[str] = []
    table.hooks.offline.append(lambda d: events.append("offline"))
    table.hooks.online.append(lambda d: events.append("online"))
    table.tick()
    assert table.daemon.state == "unknown"  # never heard of: not "offline"
    table.add("D", source="daemon", state="running")
    send(table, protocol.HEARTBEAT, uptime=1.0, queued=2, running=1, workers='[{"stage": "m"}]')
    assert (table.daemon.state, table.daemon.queued, table.daemon.running) == ("alive", 2, 1)
    clock.t += 3.0
    table.tick()
    assert table.daemon.state == "alive"
    clock.t += 0.01
    table.tick()
    table.tick()
    assert table.daemon.state == "offline" and table.rows["D"].state == "offline" and events == ["offline"]
    send(table, protocol.REPLY_PONG, tag="t", uptime=2.0)  # any reply proves it is back
    assert table.daemon.state == "alive" and table.rows["D"].state == "running" and events == ["offline", "online"]
    table.daemon.offline_after = 10
    clock.t += 5
    table.tick()
    assert table.daemon.state == "alive"


@pytest.mark.parametrize(("code", "cancel", "state", "text"), [
    (0, False, "failed", "job/done never arrived"),
    (2, False, "failed", "rejected the request (exit 2)"),
    (1, False, "failed", "exited 1 without a final Event"),
    (130, False, "cancelled", ""),
    (-9, True, "cancelled", "no job/cancelled"),
])
def test_launcher_exit_without_final_event(code: int, cancel: bool, state: str, text: str) -> None:
    clock = Clock()
    table = JobTable(now=clock, exit_grace=2.0)
    table.add("J").log = "/tmp/J.log"
    if cancel:
        table.request_cancel("J")
        assert table.rows["J"].state == "cancelling"
    table.process_exited("J", code)
    clock.t += 1.9
    table.tick()
    assert table.rows["J"].state in ("starting", "cancelling")  # Events may still be on their way
    clock.t += 0.1
    table.tick()
    assert table.rows["J"].state == state and text in table.rows["J"].error


def test_final_event_within_the_grace_wins() -> None:
    clock = Clock()
    table = JobTable(now=clock)
    table.add("J")
    table.process_exited("J", 0)
    send(table, protocol.JOB_DONE, job="J", seconds=1.0, outputs=["/o"])
    clock.t += 10
    table.tick()
    assert (table.rows["J"].state, table.rows["J"].error) == ("done", "")


def test_no_events_warning() -> None:
    clock = Clock()
    table = JobTable(now=clock, no_event_warning=10)
    table.add("J")
    clock.t += 10.5
    table.tick()
    assert table.rows["J"].state == "starting" and "no Events after 10 s" in table.rows["J"].error


def test_ack_renames_the_placeholder_even_after_an_event_overtook_it() -> None:
    table = JobTable(now=Clock())
    acked: list[str] = []
    table.hooks.acked.append(lambda row: acked.append(row.job))
    table.add("tag1", "matte", "/in.mp4", source="daemon")
    table.daemon.expect_reply("tag1", "run")
    send(table, protocol.JOB_STARTED, job="J9", pipeline="matte", input="/in.mp4", stages=1)
    send(table, protocol.REPLY_ACK, tag="tag1", command="run", job="J9", detail="")
    assert list(table.rows) == ["J9"] and table.rows["J9"].source == "daemon" and acked == ["J9"]
    assert table.rows["J9"].state == "running" and not table.daemon.pending


def test_hook_errors_are_contained_and_rows_are_capped() -> None:
    table = JobTable(now=Clock(), max_rows=3)
    table.hooks.job_end.append(lambda row: 1 / 0)  # type: ignore[func-returns-value]
    for i in range(5):
        assert send(table, protocol.JOB_CANCELLED, job=f"J{i}", index=0, stage="s")
    table.add("live")
    assert list(table.rows) == ["J3", "J4", "live"]
    table.clear_finished()
    assert list(table.rows) == ["live"]


def test_malformed_and_unknown_are_counted_not_raised() -> None:
    table = JobTable(now=Clock())
    assert table.receive_bytes(b"\xff\x00garbage") == 0
    assert table.receive_bytes(osc.encode_message("/other/app", [1])) == 0
    assert not table.receive("/cuepipe/v1/job/done", [1, 2])
    assert not table.receive(None, None)
    assert not table.receive("/cuepipe/v1/job/progress", "not a list of args")
    assert (table.malformed, table.unknown, table.received) == (4, 1, 5)
    assert table.rows == {}


def test_write_table_touches_only_changed_cells() -> None:
    dat = FakeTableDAT("jobs")
    assert write_table(dat, [["a", "b"], ["1", "2"]]) == 4
    assert write_table(dat, [["a", "b"], ["1", "3"]]) == 1
    assert write_table(dat, [["a", "b"]]) == 2 and dat.numRows == 1
    row = JobRow("J", fps=0.0)
    assert len(row.cells()) == len(COLUMNS)


# --- the adapters: whatever arrives, nothing raises into TouchDesigner -----------------------------


@pytest.fixture
def comp() -> FakeComp:
    made = FakeComp(Mode="run", Oscinport=9, Python="/nonexistent/python")
    made.ext.Cuepipe = CuepipeExt(made, auto_refresh=False)
    return made


def test_garbage_through_every_adapter(comp: FakeComp) -> None:
    peer = FakeOP("peer")
    junk: list[Any] = [b"", b"\xff" * 7, b"/cuepipe/v1/job/done\0\0\0\0,sf\0", "text", None, 12,
                       b"/cuepipe/v1/job/cancelled\0\0\0,s\0\0\xff\xfe\0\0", bytearray(b"#bundle\0")]
    for i, data in enumerate(junk):
        assert callbacks.onReceive(comp.udpin, i, "", data, peer) in (0, None)
    for address, args in [("/cuepipe/v1/job/done", None), (None, None), (5, [1]), ("/cuepipe/v1/job/started", [1] * 4),
                          ("/cuepipe/v1/job/progress", [object()] * 8), ("", []), ("/cuepipe/v1/daemon/heartbeat", [])]:
        assert callbacks.onReceiveOSC(comp.oscin, 0, "", b"", 0.0, address, args, peer) in (False, None)
    ext: CuepipeExt = comp.ext.Cuepipe
    assert ext.Jobs.malformed + ext.Jobs.unknown >= 12 and ext.Jobs.rows == {}
    with running_in(comp.execute):
        callbacks.onFrameStart(1)
        assert callbacks.onValueChange(FakeChannel("x", comp), 0, "not a number", None) is None
        assert callbacks.onTableChange(FakeTableDAT("t", comp)) == []
        assert callbacks.onTableChange(FakeTableDAT("t", comp, [["wrong"], ["x"]])) == []


def test_adapters_without_extension_or_with_a_broken_one(comp: FakeComp, monkeypatch: pytest.MonkeyPatch) -> None:
    stray = FakeOP("stray", FakeOP("root"))
    assert callbacks.onReceiveOSC(stray, 0, "", b"", 0.0, "/a", [], None) is None
    assert callbacks.onReceive(None, 0, "", b"", None) is None
    assert callbacks.onPulse(FakePar("Start", owner=None)) is None
    assert callbacks.onFrameStart(0) is None  # no ``me``: outside TD

    class Hostile:
        @property
        def ext(self) -> Any:
            raise RuntimeError("td.tdError: invalid operator")

    assert callbacks.find_model(Hostile()) is None

    def explode(*args: Any) -> Any:
        raise RuntimeError("bug")

    monkeypatch.setattr(comp.ext.Cuepipe, "ReceiveBytes", explode)
    assert callbacks.onReceive(comp.udpin, 0, "", b"x", None) is None


def test_start_with_a_missing_interpreter_fails_the_row(comp: FakeComp) -> None:
    job = comp.pulse("Start")  # no pipeline / input parameters: says so instead
    assert job is None and "choose a pipeline" in comp.ext.Cuepipe.Status.val
    job = comp.ext.Cuepipe.Start(pipeline="p", input="in.mp4")
    row = comp.jobs.row(job)
    assert row["state"] == "failed" and "cannot start '/nonexistent/python'" in row["error"]
