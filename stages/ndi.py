"""NDI transport for live video: receive and send BGRA frames to/from TouchDesigner's NDI In/Out TOPs.

Live video cannot go through files: TD sends its frames over NDI, cuepipe processes them and sends
the result back as another NDI source. This module is that transport and nothing else, as a library:
``NdiReceiver`` (find or dial a source, frames as owned BGRA arrays, reconnect when the sender
restarts) and ``NdiSender`` (a named source; ``write``/``abort`` like ``framepipe.FrameWriter``).
NDI comes from the optional extra ``ndi`` (``ndi-python``, which bundles the NDI runtime, imported
lazily as ``NDIlib``): importing this module works without it; using it raises
``NdiUnavailableError``. Guide, URL syntax and the NDI licence: ``docs/live.md``.

    from cuepipe.stages.ndi import NdiReceiver, NdiSender, parse_ndi_url

    source = parse_ndi_url("ndi://STUDIO%20(TDOut)?ip=192.168.1.20")   # or ?url=192.168.1.20:5961
    with NdiReceiver(source) as rx, NdiSender("cuepipe-out", unique=True) as tx:
        for frame in rx:                       # VideoFrame: image BGRA HxWx4 uint8, timecode, seq
            tx.send(process(frame.image), timecode=frame.timecode)   # latency measurable end to end
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import parse_qs, quote, unquote

import numpy as np

from cuepipe.stages.errors import CuepipeError, ErrorKind
from cuepipe.stages.sender import parse_address

__all__ = ["NdiAddress", "NdiArgumentError", "NdiError", "NdiNameTakenError", "NdiReceiver", "NdiSender",
           "NdiSourceNotFoundError", "NdiUnavailableError", "NdiUrlError", "ReceiverStats", "VideoFrame", "load_ndi",
           "ndi_now", "parse_ndi_url", "write_ndi_config"]

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install -e '.[ndi]' (or pip install ndi-python==6.3.2.6)"
_RETRY_S = 1.0  # how long a connect attempt gets before the receiver tries again
_REFIND_S = 2.0  # a finder that shows nothing this long (others but not ours: a quarter) is replaced (_resolve)
_POLL_MS = 100  # longest single wait inside NDI, so close() from another thread is never kept long
_BANDWIDTHS = {"highest": "RECV_BANDWIDTH_HIGHEST", "lowest": "RECV_BANDWIDTH_LOWEST"}


class NdiError(CuepipeError):
    """An NDI transport failure (the subclasses name the common ones)."""


class NdiUnavailableError(NdiError):
    """The optional NDI extra is not installed, or the NDI runtime does not start on this machine."""

    kind = ErrorKind.PROVIDER_UNAVAILABLE


class NdiArgumentError(NdiError):
    """An argument is wrong: a bandwidth, a sender name or fps, a frame that is not BGR(A) uint8."""

    kind = ErrorKind.BAD_ARGUMENT


class NdiUrlError(NdiArgumentError):
    """An ``ndi://`` source URL is malformed."""


class NdiNameTakenError(NdiError):
    """NDI refused to create a sender: another one on this machine already has that name."""

    kind = ErrorKind.OUTPUT_ERROR


class NdiSourceNotFoundError(NdiError):
    """The source was not found, or could not be connected to, within the connect timeout."""

    kind = ErrorKind.INPUT_MISSING


@functools.cache
def _initialized(lib: ModuleType) -> bool:
    return bool(lib.initialize())


def load_ndi() -> ModuleType:
    """The ``NDIlib`` module, its runtime initialised once per process; NdiUnavailableError if absent."""
    try:
        import NDIlib  # the ndi-python package; optional extra "ndi"
    except ImportError as exc:  # not installed, or libndi cannot load (Linux: needs libavahi-client3)
        raise NdiUnavailableError(f"NDI is not available ({exc}): install the optional extra with "
                                  f"{INSTALL_HINT}; on Linux the NDI runtime also needs libavahi-client3") from exc
    if not _initialized(NDIlib):
        raise NdiUnavailableError(f"the NDI runtime did not initialise on this machine (unsupported CPU?); "
                                  f"it comes from ndi-python: {INSTALL_HINT}")
    return NDIlib


def ndi_now(clock: Callable[[], int] = time.time_ns) -> int:
    """Now in NDI's time unit (100 ns since the Unix epoch): a timecode a receiver can subtract from."""
    return clock() // 100


def write_ndi_config(folder: Path, ips: Sequence[str] = ("127.0.0.1",)) -> Path:
    """Write an NDI ``ndi-config.v1.json`` into ``folder`` that looks for sources at ``ips`` (no mDNS).

    Point ``NDI_CONFIG_DIR`` at the folder before the process first uses NDI; returns the file."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "ndi-config.v1.json"
    path.write_text(json.dumps({"ndi": {"networks": {"ips": ",".join(ips), "discovery": ""}}}), encoding="utf-8")
    return path


@dataclass(frozen=True)
class NdiAddress:
    """Where a source is: its NDI name (``MACHINE (stream)``, or just ``stream``), extra IPs to search
    and/or the sender's own ``HOST:PORT`` to dial without discovery."""

    name: str
    ips: tuple[str, ...] = ()
    url: str | None = None

    def __str__(self) -> str:
        query = [f"ip={','.join(self.ips)}"] if self.ips else []
        query += [f"url={self.url}"] if self.url else []
        return f"ndi://{quote(self.name, safe='()')}" + ("?" + "&".join(query) if query else "")


def parse_ndi_url(text: str) -> NdiAddress:
    """``ndi://NAME[?ip=IP[,IP...]][&url=HOST:PORT]`` (NAME URL-encoded: ``%20`` a space) -> NdiAddress."""
    scheme, sep, rest = text.partition("://")
    if not sep or scheme.lower() != "ndi":
        raise NdiUrlError(f"expected ndi://NAME[?ip=IP,...][&url=HOST:PORT], got {text!r}")
    raw_name, _, query = rest.partition("?")
    name = unquote(raw_name.removesuffix("/")).strip()
    if not name:
        raise NdiUrlError(f"{text!r} names no source: write it as NDI shows it, e.g. ndi://MACHINE%20(stream)")
    try:
        fields = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError as exc:
        raise NdiUrlError(f"malformed query in {text!r}: {exc}") from exc
    unknown = sorted(set(fields) - {"ip", "url"})
    if unknown:
        raise NdiUrlError(f"unknown parameter(s) {unknown} in {text!r}: only ip= and url= are understood")
    ips = tuple(ip.strip() for value in fields.get("ip", []) for ip in value.split(","))
    for ip in ips:
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise NdiUrlError(f"ip={ip!r} in {text!r} is not an IP address") from None
    urls = fields.get("url", [])
    if len(urls) > 1:
        raise NdiUrlError(f"more than one url= in {text!r}")
    url = None
    if urls:
        try:
            host, port = parse_address(urls[0])
        except ValueError:
            raise NdiUrlError(f"url={urls[0]!r} in {text!r} is not HOST:PORT (e.g. 192.168.1.20:5961)") from None
        url = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return NdiAddress(name, ips, url)


def _matches(source: str, wanted: str) -> bool:
    """``MACHINE (stream)`` is wanted as itself or, when ``wanted`` has no machine part, as ``stream``."""
    if source.casefold() == wanted.casefold():
        return True
    return "(" not in wanted and source.endswith(")") and source[source.rfind("(") + 1:-1] == wanted


@dataclass(frozen=True)
class VideoFrame:
    """One received frame: ``image`` is an owned BGRA copy (the NDI frame is already freed)."""

    image: np.ndarray  # HxWx4 uint8, BGRA (alpha 255 where the source has none)
    timecode: int  # the sender's timecode, 100 ns units
    timestamp: int  # NDI's send time, 100 ns since the epoch (or NDIlib.RECV_TIMESTAMP_UNDEFINED)
    seq: int  # this receiver's count, from 0


@dataclass(frozen=True)
class ReceiverStats:
    received: int  # video frames returned by read()
    dropped: int  # video frames NDI dropped for this receiver (recv_get_performance), over all connections
    reconnects: int  # times frames resumed after the source was lost and dialled again
    connections: int  # open connections now (0: not connected)
    url: str | None  # the address last dialled


class NdiReceiver:
    """Receives the video of one NDI source as BGRA frames; reconnects on its own when the sender restarts.

    The constructor connects, waiting up to ``connect_timeout_s`` (None: do not wait; NdiSourceNotFoundError
    after it). A source that is lost (no connection, or no frame for ``stall_s``) is dialled again: about
    once a second while unconnected, every ``stall_s`` while connected but silent; re-found by name first
    when the address has discovery (``?ip=``, or the host of ``?url=``): a restarted sender changes port.
    ``close()`` may be called from another thread; ``read`` then returns None and iteration ends.
    """

    def __init__(self, address: NdiAddress | str, *, bandwidth: str = "highest",
                 connect_timeout_s: float | None = 10.0, stall_s: float = 2.0, recv_name: str | None = None,
                 now: Callable[[], float] = time.monotonic) -> None:
        self.address = parse_ndi_url(address) if isinstance(address, str) else address
        if bandwidth not in _BANDWIDTHS:
            raise NdiArgumentError(f"bandwidth must be one of {sorted(_BANDWIDTHS)}, got {bandwidth!r}")
        self._lib = lib = load_ndi()
        self._now, self._stall_s, self._lock = now, stall_s, threading.Lock()
        self.received = self.reconnects = 0
        self._dropped_base = self._dropped_last = 0
        self._url: str | None = None
        self._dialled_at = self._last_frame_at = -float("inf")
        self._lost, self._draws, self._since_dial = False, 0, 0
        # Discovery re-finds a restarted sender (which may listen on another port): at ?ip= and at the ?url= host.
        extra = [*self.address.ips, *([parse_address(self.address.url)[0]] if self.address.url else [])]
        self._extra_ips = ",".join(extra) or None
        self._find: Any = self._new_finder()
        self._recv: Any = lib.recv_create_v3(lib.RecvCreateV3(
            color_format=lib.RECV_COLOR_FORMAT_BGRX_BGRA, bandwidth=getattr(lib, _BANDWIDTHS[bandwidth]),
            allow_video_fields=False, p_ndi_recv_name=recv_name))
        try:
            if self._recv is None:
                raise NdiError("NDI could not create a receiver")
            if connect_timeout_s is not None:
                self._wait_connected(connect_timeout_s)
        except BaseException:  # a timeout, or Ctrl-C while waiting: nothing of NDI's is left behind
            self.close()
            raise

    def _wait_connected(self, timeout_s: float) -> None:
        deadline = self._now() + timeout_s
        while not self._maintain():
            if self._now() >= deadline:
                seen = [s.ndi_name for s in self._lib.find_get_current_sources(self._find)]
                raise NdiSourceNotFoundError(
                    f"NDI source {str(self.address)!r} not connected within {timeout_s:g} s (sources seen: {seen}). "
                    "Check the name (NDI shows 'MACHINE (stream)'); where mDNS is blocked add ?ip=SENDER_IP "
                    "or dial the sender directly with ?url=HOST:PORT")
            self._lib.find_wait_for_sources(self._find, 20)

    def _new_finder(self) -> Any:
        self._finder_at = self._now()
        finder = self._lib.find_create_v2(self._lib.FindCreate(p_extra_ips=self._extra_ips))
        if finder is None:
            raise NdiError("NDI could not create a finder")
        return finder

    def _resolve(self) -> str | None:
        """The source's address now: found by name if discovery sees it, else the one given.

        A finder that does not see the source is replaced: one that found nobody at an extra IP asks it
        less and less often (7-14 s apart after a minute), and on Linux without mDNS each NDI process
        answers only for its own senders, one process per finder (the kernel picks: docs/live.md)."""
        sources = self._lib.find_get_current_sources(self._find)
        for source in sources:
            if source.url_address and _matches(source.ndi_name, self.address.name):
                return str(source.url_address)
        # Others seen: most likely the wrong process, so draw again soon (every 4th finder waits long, for mDNS).
        quick = bool(sources) and self._draws % 4 != 3
        if self._now() - self._finder_at >= (_REFIND_S / 4 if quick else _REFIND_S):
            self._draws += 1
            self._lib.find_destroy(self._find)
            self._find = None
            self._find = self._new_finder()
        return self.address.url

    def _maintain(self) -> bool:
        """Connected and receiving? Otherwise dial again once the last attempt has had its time."""
        t = self._now()
        connections = self._lib.recv_get_no_connections(self._recv)
        quiet_s = t - max(self._last_frame_at, self._dialled_at)
        if connections > 0 and quiet_s < self._stall_s:
            return True
        if not self._lost and self._since_dial:  # frames came on this connection, and stopped
            self._lost = True
            log.warning("NDI source %s lost (%s); reconnecting", self.address,
                        "no connection" if connections == 0 else f"no frame for {quiet_s:.1f} s")
        url = self._resolve()
        if url is not None and (url != self._url or t - self._dialled_at >= _RETRY_S):  # a new address: at once
            log.info("NDI: connecting to %r at %s", self.address.name, url)
            self._lib.recv_connect(self._recv, self._lib.Source(p_ndi_name=self.address.name, p_url_address=url))
            self._url, self._dialled_at, self._since_dial = url, t, 0
        return False

    def read(self, timeout_s: float = 1.0) -> VideoFrame | None:
        """The next video frame, or None after ``timeout_s`` without one (or once closed)."""
        deadline = self._now() + timeout_s
        lib = self._lib
        while True:
            with self._lock:
                if self._recv is None:
                    return None
                self._maintain()
                wait_ms = math.ceil(min(max(deadline - self._now(), 0.0) * 1000, _POLL_MS))
                _, video, audio, metadata = lib.recv_capture_v2(self._recv, wait_ms, True, False, False)
                if audio is not None:  # not asked for, so NDI should not deliver any: free what it does
                    lib.recv_free_audio_v2(self._recv, audio)
                if metadata is not None:
                    lib.recv_free_metadata(self._recv, metadata)
                if video is not None:
                    try:
                        frame = self._take(video)
                    finally:
                        lib.recv_free_video_v2(self._recv, video)
                    if frame is not None:
                        return frame
            if self._now() >= deadline:
                return None

    def _take(self, video: Any) -> VideoFrame | None:
        """An owned BGRA copy of NDI's frame (a view of its buffer, rows line_stride_in_bytes apart)."""
        lib, fourcc = self._lib, video.FourCC
        if fourcc not in (lib.FOURCC_VIDEO_TYPE_BGRA, lib.FOURCC_VIDEO_TYPE_BGRX):  # asked for, so never expected
            log.warning("NDI delivered a %s frame instead of BGRA; skipped", fourcc)
            return None
        image = np.array(video.data[:, :, :4], dtype=np.uint8, copy=True)
        if fourcc == lib.FOURCC_VIDEO_TYPE_BGRX:
            image[:, :, 3] = 255  # no alpha in the source
        self._last_frame_at = self._now()
        self._since_dial += 1
        if self._lost:
            self._lost = False
            self.reconnects += 1
            log.info("NDI source %s back (reconnect %d)", self.address, self.reconnects)
        frame = VideoFrame(image, int(video.timecode), int(video.timestamp), self.received)
        self.received += 1
        return frame

    def __iter__(self) -> Iterator[VideoFrame]:
        while self._recv is not None:
            frame = self.read(1.0)
            if frame is not None:
                yield frame

    def stats(self) -> ReceiverStats:
        with self._lock:
            if self._recv is not None:
                dropped = int(self._lib.recv_get_performance(self._recv)[1].video_frames)
                if dropped < self._dropped_last:  # NDI's counters restarted with a new connection
                    self._dropped_base += self._dropped_last
                self._dropped_last = dropped
                connections = int(self._lib.recv_get_no_connections(self._recv))
            else:
                connections = 0
            return ReceiverStats(self.received, self._dropped_base + self._dropped_last, self.reconnects,
                                 connections, self._url)

    def close(self) -> None:
        """Destroy the NDI receiver and finder; idempotent, and safe while another thread reads."""
        with self._lock:
            recv, find, self._recv, self._find = getattr(self, "_recv", None), getattr(self, "_find", None), None, None
            if recv is not None:
                self._lib.recv_destroy(recv)
            if find is not None:
                self._lib.find_destroy(find)

    def __enter__(self) -> NdiReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NdiSender:
    """An NDI source named ``name`` (shown as ``MACHINE (name)``) that sends BGRA frames.

    NDI allows one sender per name on a machine: a taken name raises NdiNameTakenError, unless
    ``unique`` appends a short random suffix (``.name`` is the name used). Sends are synchronous
    (NDI is done with the buffer on return). ``clock_video=True`` makes NDI pace sends at ``fps``,
    blocking the caller (and, in ndi-python, holding the GIL) for up to a frame interval.
    """

    def __init__(self, name: str, *, fps: float = 30.0, clock_video: bool = False, unique: bool = False,
                 groups: str | None = None) -> None:
        if not name.strip() or fps <= 0:
            raise NdiArgumentError(f"an NDI sender needs a name and fps > 0, got {name!r} at {fps}")
        self._lib = lib = load_ndi()
        self._rate = (round(fps * 1000), 1000)
        self._lock = threading.Lock()
        self._buffer: np.ndarray | None = None
        self.sent = 0
        for attempt in range(5 if unique else 1):
            self.name = f"{name}-{secrets.token_hex(2)}" if unique else name
            self._send: Any = lib.send_create(lib.SendCreate(p_ndi_name=self.name, p_groups=groups,
                                                             clock_video=clock_video, clock_audio=False))
            if self._send is not None:
                break
            log.debug("NDI sender name %r taken (attempt %d)", self.name, attempt + 1)
        else:
            raise NdiNameTakenError(f"NDI refused to create a sender named {name!r}: another sender on this machine "
                                    "already uses that name (NDI allows one per name). Pick another name, or pass "
                                    "unique=True to append a short suffix")
        self.source_name = str(lib.send_get_source_name(self._send).ndi_name)
        log.info("NDI sender %r is up as %r", self.name, self.source_name)

    def _bgra(self, frame: np.ndarray) -> np.ndarray:
        if not (isinstance(frame, np.ndarray) and frame.dtype == np.uint8 and frame.ndim == 3
                and frame.shape[2] in (3, 4) and frame.size):
            got = f"{getattr(frame, 'shape', type(frame).__name__)} {getattr(frame, 'dtype', '')}"
            raise NdiArgumentError(f"NDI sends BGRA HxWx4 or BGR HxWx3 uint8 frames, got {got}")
        if frame.shape[2] == 4:
            return np.ascontiguousarray(frame)
        if self._buffer is None or self._buffer.shape[:2] != frame.shape[:2]:
            self._buffer = np.full((*frame.shape[:2], 4), 255, np.uint8)
        self._buffer[:, :, :3] = frame
        return self._buffer

    def send(self, frame: np.ndarray, timecode: int | None = None) -> None:
        """Send one frame; ``timecode`` (100 ns units, e.g. the received frame's) reaches the receiver as is."""
        lib = self._lib
        with self._lock:  # the BGR buffer is reused, and close() must not destroy a sender mid-send
            if self._send is None:
                raise NdiError(f"NDI sender {self.name!r} is closed")
            video = lib.VideoFrameV2(FourCC=lib.FOURCC_VIDEO_TYPE_BGRA, frame_rate_N=self._rate[0],
                                     frame_rate_D=self._rate[1],
                                     timecode=lib.SEND_TIMECODE_SYNTHESIZE if timecode is None else timecode)
            video.data = self._bgra(frame)  # the frame object keeps the array alive; the send is synchronous
            lib.send_send_video_v2(self._send, video)
            self.sent += 1

    def write(self, frame: np.ndarray) -> None:
        """``framepipe.FrameWriter``: send with a timecode NDI synthesises."""
        self.send(frame)

    def connections(self, timeout_s: float = 0.0) -> int:
        """How many receivers are connected (waiting up to ``timeout_s`` for the first)."""
        with self._lock:  # (a send waits meanwhile)
            if self._send is None:
                return 0
            return int(self._lib.send_get_no_connections(self._send, int(timeout_s * 1000)))

    def abort(self) -> None:
        """``framepipe.FrameWriter``: stop sending at once (nothing is buffered, so the same as close)."""
        self.close()

    def close(self) -> None:
        """Destroy the NDI sender (receivers see the source go); idempotent."""
        with self._lock:
            send, self._send = getattr(self, "_send", None), None
            if send is not None:
                self._lib.send_destroy(send)

    def __enter__(self) -> NdiSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
