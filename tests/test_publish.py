"""Publishing a Job's outputs is all or nothing, and a Job that started always ends with one Event.

The unit tests inject failures (a full disk while copying across file systems, a refused rename) into
``publish_all`` and check the rollback; the last test reproduces issue 9's full ``--out`` on a real
tmpfs (root only).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cuepipe.orchestrator.foreground import run_job
from cuepipe.orchestrator.pipeline import load_file
from cuepipe.orchestrator.publish import PublishError, publish_all
from cuepipe.stages.codec import Message
from cuepipe.stages.errors import EXIT_FAILED
from tests.support.env import subprocess_env
from tests.support.fake_td import FakeTD
from tests.support.pipelines import pipelines_toml, step

TERMINAL = ("job/done", "job/failed", "job/cancelled")
real_rename = os.rename


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones included) with its content, by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def outputs(tmp_path: Path) -> tuple[list[tuple[Path, Path]], dict[str, bytes], dict[str, bytes]]:
    """Three new outputs (file, folder, file) in a work folder; older outputs at the first two final
    paths, from an earlier run. Returns the pairs and both trees as they are before publishing."""
    work, out = tmp_path / "work", tmp_path / "out"
    (work / "seq").mkdir(parents=True)
    (work / "a.bin").write_bytes(b"new a" * 100)
    for i in range(3):
        (work / "seq" / f"frame_{i:06d}.png").write_bytes(b"new frame %d" % i)
    (work / "c.bin").write_bytes(b"new c" * 100)
    (out / "clip_seq").mkdir(parents=True)
    (out / "clip_a.bin").write_bytes(b"old a")
    (out / "clip_seq" / "frame_000009.png").write_bytes(b"old frame")  # not in the new sequence
    pairs = [(work / "a.bin", out / "clip_a.bin"), (work / "seq", out / "clip_seq"),
             (work / "c.bin", out / "clip_c.bin")]
    return pairs, _tree(work), _tree(out)


def _other_file_system(monkeypatch: pytest.MonkeyPatch, sources: list[Path]) -> None:
    """os.rename of these sources fails as across file systems (EXDEV), so publishing copies them."""

    def rename(a: Any, b: Any) -> None:
        if Path(a) in sources:
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        real_rename(a, b)

    monkeypatch.setattr(os, "rename", rename)


def _fail_when(monkeypatch: pytest.MonkeyPatch, name: str, hit: Callable[[Path, Path], bool], err: int) -> None:
    """Make ``os.<name>`` (or ``shutil.copy2``) raise OSError ``err`` for calls where ``hit(a, b)``;
    copy2 writes half the file first, as a disk that fills up does."""
    module: Any = shutil if name == "copy2" else os
    inner = getattr(module, name)  # os.rename may already be the EXDEV fake

    def fake(a: Any, b: Any, *args: Any, **kwargs: Any) -> Any:
        if hit(Path(a), Path(b)):
            if name == "copy2":
                Path(b).write_bytes(Path(a).read_bytes()[:3])
            raise OSError(err, os.strerror(err))
        return inner(a, b, *args, **kwargs)

    monkeypatch.setattr(module, name, fake)


# (step that fails, index of the output it fails on); "aside" renames an older output out of the way
FAILURES = [("copy", 0), ("copy", 1), ("copy", 2), ("aside", 0), ("aside", 1),
            ("replace", 0), ("replace", 1), ("replace", 2)]


@pytest.mark.parametrize(("step", "index"), FAILURES)
def test_a_failed_publish_changes_nothing(
    outputs: tuple[list[tuple[Path, Path]], dict[str, bytes], dict[str, bytes]],
    monkeypatch: pytest.MonkeyPatch, step: str, index: int,
) -> None:
    """Whatever fails, on whichever output: every final path as before, no temporary, sources kept."""
    pairs, work_before, out_before = outputs
    src, dst = pairs[index]
    # the first output is renamed (one file system), the others copied (another one)
    _other_file_system(monkeypatch, [s for s, _ in pairs[1:]])
    if step == "copy":
        if index == 0:  # a rename that fails, then a copy that fails too
            _other_file_system(monkeypatch, [s for s, _ in pairs])
        # a folder fails on its second frame, so half of it was copied
        _fail_when(monkeypatch, "copy2", lambda a, b: a == src or a == src / "frame_000001.png", errno.ENOSPC)
    elif step == "aside":
        _fail_when(monkeypatch, "rename", lambda a, b: a == dst and b.name.endswith(".old"), errno.EACCES)
    else:
        _fail_when(monkeypatch, "replace", lambda a, b: b == dst, errno.EACCES)
    with pytest.raises(PublishError) as caught:
        publish_all(pairs)
    monkeypatch.undo()
    assert caught.value.index == index
    message = str(caught.value)
    assert src.name in message and str(dst) in message and "nothing was published" in message
    assert os.strerror(errno.ENOSPC if step == "copy" else errno.EACCES) in message
    assert isinstance(caught.value.__cause__, OSError)
    assert _tree(dst.parent) == out_before, "a final path changed, or a temporary was left"
    assert sorted(p.name for p in dst.parent.iterdir()) == ["clip_a.bin", "clip_seq"]
    assert _tree(src.parent) == work_before, "an output was lost from the work folder"


def test_an_incomplete_rollback_keeps_the_older_output(
    outputs: tuple[list[tuple[Path, Path]], dict[str, bytes], dict[str, bytes]], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """If an older output cannot be put back, it is kept under its hidden name and the message says where."""
    pairs, _, _ = outputs
    out = pairs[0][1].parent
    _fail_when(monkeypatch, "replace", lambda a, b: b == pairs[1][1], errno.EACCES)
    _fail_when(monkeypatch, "rename", lambda a, b: a.name.endswith(".old") and b == pairs[0][1], errno.EBUSY)
    with pytest.raises(PublishError) as caught:
        publish_all(pairs)
    monkeypatch.undo()
    kept = [p for p in out.iterdir() if p.name.startswith(".clip_a.bin.")]
    assert len(kept) == 1 and kept[0].read_bytes() == b"old a"
    assert "rollback incomplete" in str(caught.value) and str(kept[0]) in str(caught.value)
    assert not (out / "clip_a.bin").exists()
    assert _tree(out / "clip_seq") == {"frame_000009.png": b"old frame"}


@pytest.mark.parametrize("across", [False, True], ids=["same-fs", "other-fs"])
def test_publish_replaces_older_outputs(
    outputs: tuple[list[tuple[Path, Path]], dict[str, bytes], dict[str, bytes]],
    monkeypatch: pytest.MonkeyPatch, across: bool,
) -> None:
    """Success: every output in place, older ones (file and folder) replaced as a whole, nothing left."""
    pairs, work_before, _ = outputs
    if across:
        _other_file_system(monkeypatch, [s for s, _ in pairs])
    assert publish_all(pairs) == [dst for _, dst in pairs]
    monkeypatch.undo()
    out = pairs[0][1].parent
    assert _tree(out) == {"clip_a.bin": work_before["a.bin"], "clip_c.bin": work_before["c.bin"],
                          **{f"clip_{k}": v for k, v in work_before.items() if k.startswith("seq")}}
    assert list(pairs[0][0].parent.iterdir()) == [], "a published source was left in the work folder"


PIPELINES = pipelines_toml(
    {"stall_timeout": 0},
    three={"description": "one stage writing a file, a folder and a file", "stages": [step("outputs", sizes="%s")]},
)


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    (tmp_path / "pipelines.toml").write_text(PIPELINES % "100,200/,300")
    (tmp_path / "clip.txt").write_text("pretend video")
    return tmp_path


def _run(workspace: Path, out: Path) -> tuple[int, list[Message]]:
    """``cuepipe run three clip.txt`` in this process; returns its exit code and every Event."""
    events: list[Message] = []
    code, _ = run_job(load_file(workspace / "pipelines.toml"), "three", workspace / "clip.txt", [], out=out,
                      json_lines=True, extra_sink=events.append)
    return code, events


def _terminal(events: list[Message]) -> Message:
    ends = [e for e in events if e.spec.name in TERMINAL]
    assert len(ends) == 1, f"expected exactly one terminal Event, got {[e.spec.name for e in events]}"
    return ends[0]


def test_job_fails_once_when_publishing_fails(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A refused rename while publishing: one job/failed output_error, exit 1, older output intact,
    the work folder (outputs and log) kept for diagnosis."""
    out = workspace / "out"
    out.mkdir()
    (out / "clip_out1.bin").write_bytes(b"older run")
    _fail_when(monkeypatch, "replace", lambda a, b: b == out / "clip_out2", errno.EACCES)
    code, events = _run(workspace, out)
    monkeypatch.undo()
    assert code == EXIT_FAILED
    failed = _terminal(events)
    assert (failed.spec.name, failed["kind"], failed["index"], failed["stage"]) == (
        "job/failed", "output_error", 0, "misbehaving")
    assert "clip_out2" in failed["message"] and os.strerror(errno.EACCES) in failed["message"]
    assert sorted(p.name for p in out.iterdir()) == [".cuepipe-work", "clip_out1.bin"]
    assert (out / "clip_out1.bin").read_bytes() == b"older run"
    stage_dir = out / ".cuepipe-work" / failed["job"] / "00-misbehaving"
    assert sorted(p.name for p in stage_dir.iterdir()) == ["out1.bin", "out2", "out3.bin"]


def test_job_fails_once_when_the_launcher_breaks(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An OSError in the launcher after job/started (here: no event socket) still ends in one job/failed."""

    def no_socket(*args: object) -> None:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr("cuepipe.orchestrator.job.EventSocket", no_socket)
    code, events = _run(workspace, workspace / "out")
    assert code == EXIT_FAILED
    assert events[0].spec.name == "job/started"
    failed = _terminal(events)
    assert (failed.spec.name, failed["kind"], failed["index"]) == ("job/failed", "internal", 0)
    assert os.strerror(errno.EMFILE) in failed["message"]


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs (root only), unmounted afterwards."""
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root on Linux")
    mount = tmp_path / "full"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"mount -t tmpfs not permitted here: {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_issue9_full_out_folder_on_another_file_system(workspace: Path, small_tmpfs: Path, fake_td: FakeTD) -> None:
    """Issue 9, defect 3: ``--out`` on a nearly full tmpfs, the work folder on the real disk. Three
    outputs of 1.2 MB do not fit in 3 MiB: the third fails to copy. Before the fix the launcher died
    with a traceback, sent no terminal Event and left the first two at their final paths."""
    (workspace / "pipelines.toml").write_text(PIPELINES % "1200000,1200000/,1200000")
    big = workspace / "big"
    big.mkdir()
    (small_tmpfs / ".cuepipe-work").symlink_to(big)
    (small_tmpfs / "clip_out1.bin").write_bytes(b"older run")
    cmd = [sys.executable, "-m", "cuepipe.orchestrator.cli", "--pipelines", str(workspace / "pipelines.toml"), "run",
           "three", "clip.txt", "--out", str(small_tmpfs), "--json", "--report", fake_td.address]
    proc = subprocess.run(cmd, cwd=workspace, env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == EXIT_FAILED, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    printed = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [e["event"] for e in printed if e["event"] in TERMINAL] == ["job/failed"]
    failed = fake_td.wait_for("job/failed", timeout=5)
    assert failed["kind"] == "output_error"
    assert "clip_out3.bin" in failed["message"] and os.strerror(errno.ENOSPC) in failed["message"]
    assert sorted(p.name for p in small_tmpfs.iterdir()) == [".cuepipe-work", "clip_out1.bin"]
    assert (small_tmpfs / "clip_out1.bin").read_bytes() == b"older run"
    work = big / failed["job"]
    assert sorted(p.name for p in (work / "00-misbehaving").iterdir()) == ["out1.bin", "out2", "out3.bin"]
    assert list(work.glob("*.log")), "the stage's log is kept for diagnosis"
    assert [e.spec.name for e in fake_td.events if e.spec.name in TERMINAL] == ["job/failed"]
