"""The NDI transport (stages/ndi.py) on loopback: the sender runs in another process (tests/support/ndi_peer.py),
the receiver here, and discovery never needs mDNS (``?url=``, ``?ip=127.0.0.1`` or an ``NDI_CONFIG_DIR``).

Measured here (640x360 BGRA, the peer's smooth-gradient pattern, 2-core x86_64 VM): colour error mean
2.7 levels, p99 12, max 17 (SpeedHQ is lossy); alpha 0 and 255 exact, the ramp within ±1; send ->
receive latency median 1.8 ms, p90 2.1 ms. The bounds below leave room for a slower CI machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import quote

import numpy as np
import psutil
import pytest

from cuepipe.stages.errors import ErrorKind
from cuepipe.stages.ndi import (
    NdiAddress,
    NdiArgumentError,
    NdiNameTakenError,
    NdiReceiver,
    NdiSender,
    NdiSourceNotFoundError,
    NdiUrlError,
    VideoFrame,
    load_ndi,
    ndi_now,
    parse_ndi_url,
    write_ndi_config,
)
from tests.support.env import subprocess_env
from tests.support.ndi_peer import pattern


class Peer:
    """A sender process (``ndi_peer send``): ``info`` is its JSON line (name, source, url)."""

    def __init__(self, name: str, folder: Path, *args: str) -> None:
        self.log = folder / f"{name}-{uuid.uuid4().hex[:4]}.tcs"
        self.err = self.log.with_suffix(".err")
        with open(self.err, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "tests.support.ndi_peer", "send", name, "--log",
                                          str(self.log), *args], stdout=subprocess.PIPE, stderr=err, text=True,
                                         env=subprocess_env())
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.kill()
            pytest.fail(f"the NDI peer did not start: {self.err.read_text()}")
        self.info: dict[str, str] = json.loads(line)

    def timecodes(self) -> set[int]:
        return {int(line) for line in self.log.read_text().split()}

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[Callable[..., Peer]]:
    started: list[Peer] = []

    def start(name: str, *args: str) -> Peer:
        started.append(Peer(name, tmp_path, *args))
        return started[-1]

    yield start
    for p in started:
        p.kill()


def unique_name() -> str:
    return f"cuepipe-test-{uuid.uuid4().hex[:6]}"


def read_n(rx: NdiReceiver, n: int, timeout_s: float = 10.0) -> list[VideoFrame]:
    frames: list[VideoFrame] = []
    deadline = time.monotonic() + timeout_s
    while len(frames) < n and time.monotonic() < deadline:
        frame = rx.read(0.5)
        if frame is not None:
            frames.append(frame)
    assert len(frames) == n, f"{len(frames)} of {n} frames within {timeout_s} s: {rx.stats()}"
    return frames


def check_pixels(image: np.ndarray) -> None:
    """Alpha: 0 and 255 exact, the ramp within ±1; colour within SpeedHQ's loss on this pattern."""
    ref = pattern()
    assert image.shape == ref.shape and image.dtype == np.uint8
    alpha, ref_alpha = image[..., 3].astype(int), ref[..., 3].astype(int)
    assert (alpha[ref_alpha == 0] == 0).all() and (alpha[ref_alpha == 255] == 255).all()
    assert np.abs(alpha - ref_alpha).max() <= 1
    colour = np.abs(image[..., :3].astype(int) - ref[..., :3].astype(int))
    assert colour.mean() <= 5 and colour.max() <= 32, (colour.mean(), colour.max())


def test_frames_arrive_by_direct_address_and_by_extra_ips(peer: Callable[..., Peer]) -> None:
    name = unique_name()
    p = peer(name)
    latencies: list[float] = []
    # ?url= dials the sender's port; ?ip= finds it by name (here the stream part alone) at 127.0.0.1.
    for url in (f"ndi://{quote(p.info['source'])}?url={p.info['url']}", f"ndi://{name}?ip=127.0.0.1"):
        with NdiReceiver(url, connect_timeout_s=5.0) as rx:
            frames = []
            for _ in range(40):
                frame = rx.read(2.0)
                assert frame is not None, rx.stats()
                latencies.append((ndi_now() - frame.timecode) / 1e4)
                frames.append(frame)
            stats = rx.stats()
        assert [f.seq for f in frames] == list(range(40)) and stats.received == 40 and stats.reconnects == 0
        timecodes = [f.timecode for f in frames]
        assert timecodes == sorted(set(timecodes))  # in order, none twice
        assert set(timecodes) <= p.timecodes()  # exactly what the sender set
        assert all(f.timestamp > 0 for f in frames)
        for frame in (frames[0], frames[-1]):
            check_pixels(frame.image)
    assert 0 <= float(np.median(latencies)) < 100, latencies  # ms; ~2 ms measured


def test_iteration_ends_when_closed_from_another_thread(peer: Callable[..., Peer]) -> None:
    name = unique_name()
    peer(name)
    rx = NdiReceiver(f"ndi://{name}?ip=127.0.0.1", connect_timeout_s=5.0)
    seen: list[int] = []
    reader = threading.Thread(target=lambda: seen.extend(f.seq for f in rx))
    reader.start()
    deadline = time.monotonic() + 5.0
    while len(seen) < 5 and time.monotonic() < deadline:
        time.sleep(0.02)
    rx.close()
    reader.join(2.0)
    assert not reader.is_alive() and len(seen) >= 5
    assert rx.read(0.1) is None
    rx.close()  # idempotent


def test_a_taken_sender_name_fails_clearly_and_unique_picks_another(peer: Callable[..., Peer]) -> None:
    name = unique_name()
    peer(name)  # holds the name in another process
    with pytest.raises(NdiNameTakenError) as err:
        NdiSender(name)
    assert err.value.kind is ErrorKind.OUTPUT_ERROR
    assert name in str(err.value) and "unique=True" in str(err.value) and "another name" in str(err.value)
    with NdiSender(name, unique=True) as sender, NdiSender(name, unique=True) as other:
        assert sender.name.startswith(f"{name}-") and other.name.startswith(f"{name}-")
        assert sender.name != other.name and sender.source_name.endswith(f"({sender.name})")
        with pytest.raises(NdiNameTakenError):  # the same holds within one process
            NdiSender(sender.name)


@pytest.mark.parametrize("query", ["ip=127.0.0.1", "url"])
def test_the_receiver_reconnects_when_the_sender_restarts(peer: Callable[..., Peer], query: str) -> None:
    """The sender is killed and restarted under the same name (NDI gives it another port); the
    receiver finds it again, counts one reconnect, and the BGR frames of the new one arrive opaque."""
    name = unique_name()
    first = peer(name)
    query = f"url={first.info['url']}" if query == "url" else query
    with NdiReceiver(f"ndi://{quote(first.info['source'])}?{query}", connect_timeout_s=5.0, stall_s=1.0) as rx:
        read_n(rx, 10)
        first.kill()
        killed_at = ndi_now()
        second = peer(name, "--bgr")
        frames = [f for f in read_n(rx, 20) if f.timecode > killed_at][-5:]
        assert frames and all((f.image[..., 3] == 255).all() for f in frames)
        assert {f.timecode for f in frames} <= second.timecodes()
        stats = rx.stats()
        assert stats.reconnects == 1 and stats.url == second.info["url"] and stats.connections == 1
        assert [f.seq for f in frames] == sorted(f.seq for f in frames)


def test_a_receiver_started_before_its_sender_connects_when_it_appears(peer: Callable[..., Peer]) -> None:
    name = unique_name()
    with NdiReceiver(f"ndi://{name}?ip=127.0.0.1", connect_timeout_s=None) as rx:
        assert rx.read(0.3) is None and rx.stats().connections == 0
        peer(name)
        read_n(rx, 5)
        assert rx.stats().reconnects == 0


def test_a_source_is_found_among_several_sender_processes(peer: Callable[..., Peer]) -> None:
    """On Linux without mDNS every sender process listens on 5960 and a finder asking 127.0.0.1 gets one
    of them, which lists only its own senders: the receiver keeps drawing new finders until it sees its source."""
    names = [unique_name() for _ in range(2)]
    for name in names:
        peer(name)
    for name in names:
        with NdiReceiver(f"ndi://{name}?ip=127.0.0.1", connect_timeout_s=20.0) as rx:
            read_n(rx, 3)


class FakeNdi:
    """Just enough of ``NDIlib`` for NdiReceiver's connection logic, on a clock the test moves."""

    RECV_COLOR_FORMAT_BGRX_BGRA = RECV_BANDWIDTH_HIGHEST = RECV_BANDWIDTH_LOWEST = 0
    FOURCC_VIDEO_TYPE_BGRA, FOURCC_VIDEO_TYPE_BGRX = 1, 2

    def __init__(self) -> None:
        self.t = 0.0
        self.sources: list[SimpleNamespace] = []
        self.connected, self.frames, self.dials, self.finders, self.freed = False, [], [], 0, 0

    FindCreate = RecvCreateV3 = Source = staticmethod(lambda **kw: SimpleNamespace(**kw))

    def find_create_v2(self, settings: object) -> object:
        self.finders += 1
        return object()

    def find_get_current_sources(self, finder: object) -> list[SimpleNamespace]:
        return self.sources

    def find_wait_for_sources(self, finder: object, ms: int) -> None:
        self.t += ms / 1000

    def recv_create_v3(self, settings: object) -> object:
        return object()

    def recv_connect(self, recv: object, source: SimpleNamespace) -> None:
        self.dials.append((round(self.t, 2), source.p_url_address))
        self.connected = any(s.url_address == source.p_url_address for s in self.sources)

    def recv_get_no_connections(self, recv: object) -> int:
        return int(self.connected)

    def recv_capture_v2(self, recv: object, ms: int, *want: bool) -> tuple[object, ...]:
        if self.frames and self.connected:
            return None, self.frames.pop(0), None, None
        self.t += ms / 1000
        return None, None, None, None

    def recv_free_video_v2(self, recv: object, frame: object) -> None:
        self.freed += 1

    def find_destroy(self, finder: object) -> None: ...

    def recv_destroy(self, recv: object) -> None: ...


def test_stall_detection_and_redialling_follow_the_injected_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    import cuepipe.stages.ndi as ndi

    fake = FakeNdi()
    monkeypatch.setattr(ndi, "load_ndi", lambda: fake)
    frame = SimpleNamespace(FourCC=2, data=np.zeros((2, 3, 4), np.uint8), timecode=7, timestamp=8)
    fake.sources = [SimpleNamespace(ndi_name="OTHER (x)", url_address="10.0.0.5:5961")]
    rx = NdiReceiver("ndi://cam?ip=10.0.0.5", connect_timeout_s=None, stall_s=2.0, now=lambda: fake.t)
    assert rx.read(1.3) is None and fake.dials == []
    assert fake.finders == 3  # others listed but not cam: a new finder every 0.5 s
    fake.sources.append(SimpleNamespace(ndi_name="M (cam)", url_address="10.0.0.5:5962"))
    fake.frames += [frame, frame]
    got = rx.read(1.0)
    assert got is not None and got.seq == 0 and got.timecode == 7 and (got.image[..., 3] == 255).all()
    assert rx.read(1.0) is not None and fake.dials == [(1.3, "10.0.0.5:5962")]
    start = fake.t
    assert rx.read(5.0) is None  # connected, but nothing for stall_s: dialled again every stall_s
    assert [t - start for t, _ in fake.dials[1:]] == pytest.approx([2.0, 4.0], abs=0.15)
    fake.frames.append(frame)
    assert rx.read(1.0) is not None and rx.reconnects == 1 and fake.freed == 3
    rx.close()


def test_a_missing_source_fails_after_the_connect_timeout() -> None:
    start = time.monotonic()
    with pytest.raises(NdiSourceNotFoundError) as err:
        NdiReceiver(f"ndi://{unique_name()}?ip=127.0.0.1", connect_timeout_s=0.5)
    assert time.monotonic() - start < 3.0
    assert err.value.kind is ErrorKind.INPUT_MISSING and "?ip=" in str(err.value) and "?url=" in str(err.value)


def test_received_frames_are_freed(peer: Callable[..., Peer], monkeypatch: pytest.MonkeyPatch) -> None:
    """RSS stays flat over 250 frames (each unfreed one would keep 0.9 MB: 230 MB), and every frame
    NDI handed over went back through ``recv_free_video_v2``."""
    lib = load_ndi()
    frees: list[int] = []
    real_free = lib.recv_free_video_v2

    def counting_free(instance: object, frame: object) -> None:
        frees.append(1)
        real_free(instance, frame)

    monkeypatch.setattr(lib, "recv_free_video_v2", counting_free)
    name = unique_name()
    peer(name, "--fps", "200")
    me = psutil.Process()
    with NdiReceiver(f"ndi://{name}?ip=127.0.0.1", connect_timeout_s=5.0) as rx:
        read_n(rx, 50)
        before = me.memory_info().rss
        read_n(rx, 250)
        grown = me.memory_info().rss - before
        assert len(frees) == rx.received == 300
    assert grown < 40 * 2**20, f"RSS grew {grown / 2**20:.0f} MB over 250 frames"


def test_sender_writes_bgr_and_bgra_and_rejects_other_frames() -> None:
    with NdiSender(unique_name(), fps=60) as sender:
        sender.write(np.zeros((8, 16, 3), np.uint8))
        sender.write(np.zeros((8, 16, 4), np.uint8)[:, ::-1])  # not contiguous: copied
        sender.send(np.zeros((8, 16, 4), np.uint8), timecode=ndi_now())
        for bad in (np.zeros((8, 16), np.uint8), np.zeros((8, 16, 4), np.float32), np.zeros((8, 16, 2), np.uint8)):
            with pytest.raises(NdiArgumentError):
                sender.write(bad)
        assert sender.sent == 3 and sender.connections() == 0
        sender.abort()
        sender.close()
        with pytest.raises(Exception, match="closed"):
            sender.write(np.zeros((8, 16, 4), np.uint8))
    with pytest.raises(NdiArgumentError):
        NdiReceiver("ndi://x?ip=127.0.0.1", bandwidth="best")


def test_discovery_from_an_ndi_config_dir(peer: Callable[..., Peer], tmp_path: Path) -> None:
    name = unique_name()
    p = peer(name)
    config = write_ndi_config(tmp_path / "ndi", ["127.0.0.1"])
    assert json.loads(config.read_text()) == {"ndi": {"networks": {"ips": "127.0.0.1", "discovery": ""}}}
    proc = subprocess.run([sys.executable, "-m", "tests.support.ndi_peer", "find", name], capture_output=True,
                          text=True, timeout=30, env=dict(subprocess_env(), NDI_CONFIG_DIR=str(config.parent)))
    assert json.loads(proc.stdout) == {"url": p.info["url"]}, proc.stderr


def test_without_ndi_python_the_error_names_the_extra() -> None:
    code = """
import sys
import cuepipe.stages.ndi as ndi
assert "NDIlib" not in sys.modules  # importing the module does not load NDI
sys.modules["NDIlib"] = None  # as if ndi-python were not installed
for make in (lambda: ndi.NdiSender("x"), lambda: ndi.NdiReceiver("ndi://x?ip=127.0.0.1")):
    try:
        make()
    except ndi.NdiUnavailableError as exc:
        print(exc.kind.value, exc)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                          env=subprocess_env())
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and len(lines) == 2, proc.stdout + proc.stderr
    for line in lines:
        assert line.startswith("provider_unavailable ") and "pip install -e '.[ndi]'" in line


@pytest.mark.parametrize(("text", "expected"), [
    ("ndi://MACHINE%20(cuepipe-demo)", NdiAddress("MACHINE (cuepipe-demo)")),
    ("ndi://MACHINE (cuepipe-demo)/", NdiAddress("MACHINE (cuepipe-demo)")),
    ("NDI://demo?ip=10.0.0.2,10.0.0.3", NdiAddress("demo", ("10.0.0.2", "10.0.0.3"))),
    ("ndi://demo?ip=10.0.0.2&ip=10.0.0.3", NdiAddress("demo", ("10.0.0.2", "10.0.0.3"))),
    ("ndi://demo?url=127.0.0.1:5961", NdiAddress("demo", (), "127.0.0.1:5961")),
    ("ndi://A%20(b)?ip=::1&url=[::1]:5962", NdiAddress("A (b)", ("::1",), "[::1]:5962")),
    ("ndi://T%C3%A9l%C3%A9%20(x%3Fy)?url=studio.local:5961", NdiAddress("Télé (x?y)", (), "studio.local:5961")),
])
def test_parse_ndi_url(text: str, expected: NdiAddress) -> None:
    assert parse_ndi_url(text) == expected
    assert parse_ndi_url(str(expected)) == expected  # str() writes a URL that parses back


@pytest.mark.parametrize(("text", "says"), [
    ("demo", "expected ndi://"),
    ("http://demo", "expected ndi://"),
    ("ndi://", "names no source"),
    ("ndi://%20?ip=127.0.0.1", "names no source"),
    ("ndi://demo?ip=300.1.1.1", "not an IP address"),
    ("ndi://demo?ip=", "not an IP address"),
    ("ndi://demo?url=127.0.0.1", "not HOST:PORT"),
    ("ndi://demo?url=127.0.0.1:99999", "not HOST:PORT"),
    ("ndi://demo?url=a:1&url=b:2", "more than one url="),
    ("ndi://demo?port=5961", "unknown parameter"),
    ("ndi://demo?ip", "malformed query"),
])
def test_parse_ndi_url_rejects(text: str, says: str) -> None:
    with pytest.raises(NdiUrlError, match=says.replace("?", r"\?")) as err:
        parse_ndi_url(text)
    assert err.value.kind is ErrorKind.BAD_ARGUMENT
