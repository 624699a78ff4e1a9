"""The shared-memory segment under a frame ring (``stages/ring.py``): layout, geometry, errors, liveness.

Why a module of its own: everything here is about the segment as the operating system sees it, and
is the same for both ends - how big it is and where each field lives, how it is created, attached
and unlinked on Linux, macOS and Windows, and how one end tells whether the other's process still
exists. ``stages/ring.py`` builds the writer / reader protocol on it; use that module, not this one.

Layout (native-endian int64 fields; the header and every slot start on a 64-byte boundary)::

    offset 0     header: 4 lines of 64 bytes (HEADER); lines 0-1 are written once, by the creator
      line 0     magic b"CPRING01", version, slots, width, height, channels, dtype code, policy code
      line 1     slot stride, frame nbytes, writer pid, writer creation time (µs since the epoch), info length
      line 2     head: frames published; writer state (open / closed: end of stream / aborted)  - writer
      line 3     tail: frames consumed; reader state (none / attached / closed), reader pid and creation
    offset 256   info: up to 4 KiB the creator writes once (stages/stream.py: JSON with fps, frame count, audio)
    offset 4352 + i * stride: slot i; frame seq s (1, 2, ...) lives in slot (s - 1) % slots
      +0         lock (seqlock: odd while the writer writes the slot), seq, timestamp_ns, width, height,
                 channels, nbytes
      +64        the frame, height x width x channels of dtype, C order; stride = 64 + nbytes rounded to 64

Segment lifetime: the *creator* (the writer) owns the name and unlinks it in ``close``; its
``multiprocessing`` resource tracker, a process of its own, unlinks it if the creator dies without
closing (SIGKILL included). Python < 3.13 registers an *attached* segment with the attacher's tracker
too, which would unlink the writer's segment when the reader exits: ``attach`` unregisters it again
(3.13+: ``track=False``), except in the creating process itself, whose one entry is the creator's. A
reader that finds the writer dead unlinks the name as well: a tracker is killed together with its
writer when a whole process tree is. Windows has neither unlink nor trackers: a segment lives until
its last handle closes, so nothing can be left behind there. Linux ``/dev/shm`` is only looked at to refuse
a ring that does not fit (tmpfs would kill the writer with SIGBUS on the first page that does not).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import sys
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory

import numpy as np
import numpy.typing as npt
import psutil

from cuepipe.stages.errors import CuepipeError, ErrorKind
from cuepipe.stages.parentwatch import same_creation

__all__ = ["EndOfStream", "RingAborted", "RingClosed", "RingError", "RingGeometry", "RingGeometryError",
           "RingNotFound", "RingPeerGone", "RingPolicy", "RingTimeout"]

log = logging.getLogger(__name__)

MAGIC = int.from_bytes(b"CPRING01", "little")
VERSION = 2  # 2: the info area
LINE = 64  # bytes: the alignment of the header lines, the slots and the frames
HEADER = 4 * LINE
INFO = 4096  # bytes: the creator's description of what flows (``Segment.info``)
FRAMES = HEADER + INFO  # where slot 0 starts
DTYPES = ("uint8", "uint16", "float16", "float32")  # a dtype's code is its index + 1
NAME_PREFIX = "cp"  # + 12 hex digits: 14 characters, well under macOS's 31 for a POSIX shm name
_NAME_RE = re.compile(r"[A-Za-z0-9_]{1,30}")
_SHM_DIR = "/dev/shm"  # Linux only, and only for the free-space check


class H(IntEnum):
    """Header fields: int64 indices into the header (8 a line)."""

    MAGIC, VERSION, SLOTS, WIDTH, HEIGHT, CHANNELS, DTYPE, POLICY = range(8)  # line 0
    STRIDE, NBYTES, WRITER_PID, WRITER_CREATED, INFO_LEN = range(8, 13)  # line 1
    HEAD, WRITER_STATE = range(16, 18)  # line 2: the writer's
    TAIL, READER_STATE, READER_PID, READER_CREATED = range(24, 28)  # line 3: the reader's


class S(IntEnum):
    """Slot header fields: int64 indices into a slot's first line."""

    LOCK, SEQ, TIMESTAMP, WIDTH, HEIGHT, CHANNELS, NBYTES = range(7)


class WriterState(IntEnum):
    OPEN = 1
    CLOSED = 2  # end of stream: the reader drains what is published, then gets EndOfStream
    ABORTED = 3  # the reader fails at once


class ReaderState(IntEnum):
    NONE = 0  # no reader attached yet
    ATTACHED = 1
    CLOSED = 2  # the reader is done: the writer's next put fails


class RingPolicy(StrEnum):
    """What the writer does when every slot holds an unread frame."""

    BLOCK = "block"  # wait for the reader to free a slot (offline work: nothing is lost), with a timeout
    DROP_OLDEST = "drop_oldest"  # overwrite the oldest unread frame and count a drop (a live source never waits)


class RingError(CuepipeError):
    """Root of the frame ring's errors. Where a ring is a stage's input the reader's errors are reported
    as ``input_invalid``, where it is its output the writer's as ``output_error``."""

    kind = ErrorKind.INTERNAL


class RingGeometryError(RingError, ValueError):
    """A ring's slots / size / channels / dtype / policy / name, or a frame that does not match them."""

    kind = ErrorKind.BAD_ARGUMENT


class RingNotFound(RingError):
    """No ring of that name: never created, or already closed (the creator unlinked it)."""

    kind = ErrorKind.INPUT_MISSING


class RingTimeout(RingError, TimeoutError):
    """A wait (a free slot, a frame, a reader) ran past its timeout; the other end is alive but stuck."""


class RingPeerGone(RingError):
    """The process at the other end died (its pid is gone, or is another process now) without closing."""


class RingClosed(RingError):
    """This end was closed already, or the reader closed the ring while the writer still writes."""


class RingAborted(RingError):
    """The writer aborted (``RingWriter.abort``: its work failed); the reader fails at once, undrained."""


class EndOfStream(RingError):
    """The writer closed the ring and the reader has read every frame it published."""


@dataclass(frozen=True)
class RingGeometry:
    """How many slots, and the one frame shape and dtype every slot holds."""

    slots: int
    width: int
    height: int
    channels: int
    dtype: np.dtype

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.height, self.width, self.channels

    @property
    def nbytes(self) -> int:
        return self.width * self.height * self.channels * self.dtype.itemsize

    @property
    def stride(self) -> int:
        return LINE + -(-self.nbytes // LINE) * LINE

    @property
    def size(self) -> int:
        return FRAMES + self.slots * self.stride

    @classmethod
    def make(cls, slots: int, width: int, height: int, channels: int, dtype: npt.DTypeLike) -> RingGeometry:
        try:
            dt = np.dtype(dtype)
        except TypeError as exc:
            raise RingGeometryError(f"not a dtype: {dtype!r}") from exc
        if dt.name not in DTYPES:
            raise RingGeometryError(f"dtype {dt.name} is not one of {', '.join(DTYPES)}")
        for label, value, top in (("slots", slots, 1024), ("width", width, 16384), ("height", height, 16384),
                                  ("channels", channels, 16)):
            if not isinstance(value, int) or not 1 <= value <= top:
                raise RingGeometryError(f"{label} must be an integer in 1..{top}, got {value!r}")
        return cls(slots, width, height, channels, dt)


def new_name() -> str:
    return NAME_PREFIX + secrets.token_hex(6)


def check_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise RingGeometryError(f"a ring name is 1-30 letters, digits or '_' (macOS limit), got {name!r}")
    return name


def create_segment(name: str, size: int) -> SharedMemory:
    """A new segment, tracked by this process's resource tracker (the crash safety net); FileExistsError
    if the name is taken."""
    if sys.platform.startswith("linux") and os.path.isdir(_SHM_DIR):
        st = os.statvfs(_SHM_DIR)
        if st.f_bavail * st.f_frsize < size:
            raise RingError(f"a ring of {size} bytes does not fit: {st.f_bavail * st.f_frsize} bytes free in "
                            f"{_SHM_DIR} (in Docker: --shm-size)", ErrorKind.OUTPUT_ERROR)
    return SharedMemory(name=name, create=True, size=size)


def attach_segment(name: str) -> SharedMemory:
    """An existing segment, not tracked by this process: its exit must not unlink the creator's segment.
    (In the creating process itself the tracker's one entry is the creator's: it stays.)"""
    try:
        if sys.version_info >= (3, 13):
            return SharedMemory(name=name, track=False)
        shm = SharedMemory(name=name)
    except FileNotFoundError as exc:
        raise RingNotFound(f"no frame ring named {name!r} (not created yet, or closed)") from exc
    if os.name == "posix":
        at = H.WRITER_PID * 8
        creator = int.from_bytes(shm.buf[at:at + 8], sys.byteorder) if shm.buf and shm.size >= HEADER else 0
        if creator != os.getpid():
            resource_tracker.unregister(getattr(shm, "_name", "/" + name), "shared_memory")
    return shm


def unlink_orphan(name: str) -> None:
    """Unlink the segment of a writer that died (POSIX): its tracker may have died with it (a process
    tree killed as a whole). Opening it tracked and unlinking registers and unregisters it here: balanced."""
    if os.name != "posix":
        return  # Windows: the segment goes with its last handle
    try:
        orphan = SharedMemory(name=name)
    except FileNotFoundError:
        return
    orphan.close()
    try:
        orphan.unlink()
        log.info("unlinked frame ring %s after its writer died", name)
    except FileNotFoundError:  # the writer's tracker was quicker: take back the registration made here
        resource_tracker.unregister(getattr(orphan, "_name", "/" + name), "shared_memory")


def sweep(folder: str = _SHM_DIR) -> list[str]:
    """Unlink every ring in ``folder`` whose writer process is gone; the names removed.

    For what nothing else catches: a writer killed together with its resource tracker (a whole
    process tree, or a daemon's group, killed hard) when no launcher was left to remove the ring.
    Linux only: it is the one system that lists its POSIX segments (``/dev/shm``); macOS cannot list
    them (the trackers and the launcher's ``unlink_orphan`` remain), and on Windows a segment goes
    with its last handle. A ring whose creator has not written its identity yet is left alone.
    """
    if not sys.platform.startswith("linux") or not os.path.isdir(folder):
        return []
    removed = []
    for entry in sorted(os.listdir(folder)):
        if not re.fullmatch(rf"{NAME_PREFIX}[0-9a-f]{{12}}", entry):
            continue
        try:
            shm = attach_segment(entry)
        except (RingNotFound, OSError, ValueError):
            continue
        try:
            if shm.size < HEADER:
                continue
            fields = np.ndarray((HEADER // 8,), np.int64, buffer=shm.buf)
            pid, created = int(fields[H.WRITER_PID]), int(fields[H.WRITER_CREATED])
            del fields
        finally:
            shm.close()
        if pid and not alive(pid, created):
            unlink_orphan(entry)
            removed.append(entry)
    return removed


def exists(name: str) -> bool:
    """Whether a segment of that name exists (attached without tracking, and closed again)."""
    try:
        attach_segment(check_name(name)).close()
    except RingNotFound:
        return False
    return True


def identity(pid: int | None = None) -> tuple[int, int]:
    """``(pid, creation time in µs)`` of this process (or ``pid``): what an end writes into the header."""
    proc = psutil.Process(pid)
    return proc.pid, round(proc.create_time() * 1e6)


def alive(pid: int, created_us: int) -> bool:
    """Whether that very process (pid and creation time: a reused pid is not it) still runs."""
    if pid == os.getpid():
        return True
    try:
        proc = psutil.Process(pid)
        return same_creation(proc.create_time(), created_us / 1e6) and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:  # ZombieProcess included
        return False
    except psutil.AccessDenied:  # another user's process: it exists
        return True


class Segment:
    """One mapped ring: its SharedMemory, geometry and policy, and numpy views on the header, the slot
    headers and the frames. ``close`` drops the views before the mapping (one with live views cannot close)."""

    def __init__(self, shm: SharedMemory) -> None:
        self.shm, self.name = shm, shm.name
        self.header = np.ndarray((HEADER // 8,), np.int64, buffer=shm.buf)
        self.raw = np.ndarray((HEADER + INFO,), np.uint8, buffer=shm.buf) if shm.size >= HEADER + INFO else \
            np.zeros(HEADER + INFO, np.uint8)  # a segment too small for a ring: attach refuses it below
        self.meta: list[np.ndarray] = []
        self.data: list[np.ndarray] = []
        self.geometry = RingGeometry(0, 0, 0, 0, np.dtype("uint8"))  # set by create / attach
        self.policy = RingPolicy.BLOCK

    @classmethod
    def create(cls, geometry: RingGeometry, policy: RingPolicy, name: str | None, info: bytes = b"") -> Segment:
        """A new ring's segment, its header and ``info`` (<= INFO bytes) written (the writer's identity included)."""
        if len(info) > INFO:
            raise RingGeometryError(f"a ring's info holds at most {INFO} bytes, got {len(info)}")
        while True:
            ring_name = check_name(name) if name is not None else new_name()
            try:
                seg = cls(create_segment(ring_name, geometry.size))
                break
            except FileExistsError as exc:
                if name is not None:
                    raise RingGeometryError(f"a shared memory segment named {name!r} exists already") from exc
        try:
            h = seg.header  # zero-filled by the system
            h[H.SLOTS:H.POLICY + 1] = (geometry.slots, geometry.width, geometry.height, geometry.channels,
                                       DTYPES.index(geometry.dtype.name) + 1, list(RingPolicy).index(policy) + 1)
            h[H.STRIDE:H.WRITER_CREATED + 1] = (geometry.stride, geometry.nbytes, *identity())
            seg.raw[HEADER:HEADER + len(info)] = np.frombuffer(info, np.uint8)
            h[H.INFO_LEN] = len(info)
            h[H.WRITER_STATE] = WriterState.OPEN
            h[H.VERSION] = VERSION
            h[H.MAGIC] = MAGIC  # last: a ring is valid once its magic is there
            seg.map(geometry, policy)
        except BaseException:
            seg.close(unlink=True)
            raise
        return seg

    @classmethod
    def attach(cls, name: str) -> Segment:
        """An existing ring's segment, geometry and policy read from its header (RingNotFound, RingError)."""
        seg = cls(attach_segment(check_name(name)))
        try:
            h = seg.header
            if seg.shm.size >= HEADER and h[H.MAGIC] == 0:  # its creator has not finished its header yet
                raise RingNotFound(f"frame ring {name!r} is being created")
            if seg.shm.size < HEADER or h[H.MAGIC] != MAGIC or h[H.VERSION] != VERSION:
                raise RingError(f"{name!r} is not a frame ring of version {VERSION}", ErrorKind.INPUT_INVALID)
            if not 1 <= h[H.DTYPE] <= len(DTYPES) or not 1 <= h[H.POLICY] <= len(RingPolicy):
                raise RingError(f"frame ring {name}: corrupt header", ErrorKind.INPUT_INVALID)
            geometry = RingGeometry.make(int(h[H.SLOTS]), int(h[H.WIDTH]), int(h[H.HEIGHT]), int(h[H.CHANNELS]),
                                         DTYPES[int(h[H.DTYPE]) - 1])
            if ((h[H.STRIDE], h[H.NBYTES]) != (geometry.stride, geometry.nbytes) or seg.shm.size < geometry.size
                    or not 0 <= h[H.INFO_LEN] <= INFO):
                raise RingError(f"frame ring {name}: corrupt header", ErrorKind.INPUT_INVALID)
            seg.map(geometry, list(RingPolicy)[int(h[H.POLICY]) - 1])
        except BaseException:
            seg.close(unlink=False)
            raise
        return seg

    def map(self, geometry: RingGeometry, policy: RingPolicy) -> None:
        self.geometry, self.policy = geometry, policy
        for i in range(geometry.slots):
            offset = FRAMES + i * geometry.stride
            self.meta.append(np.ndarray((LINE // 8,), np.int64, buffer=self.shm.buf, offset=offset))
            self.data.append(np.ndarray(geometry.shape, geometry.dtype, buffer=self.shm.buf, offset=offset + LINE))

    @property
    def info(self) -> bytes:
        """What the creator wrote into the info area."""
        return self.raw[HEADER:HEADER + int(self.header[H.INFO_LEN])].tobytes()

    def close(self, unlink: bool) -> None:
        self.raw = np.zeros(HEADER + INFO, np.uint8)
        self.header = np.zeros(HEADER // 8, np.int64)  # detached: later stray reads see zeros, not the mapping
        self.meta, self.data = [], []
        try:
            self.shm.close()
        except BufferError:  # a borrowed frame is still referenced by the caller: unmapped when it goes
            log.warning("frame ring %s: a borrowed frame outlives the ring; its mapping stays until it is freed",
                        self.name)
            _LINGERING.append(self.shm)
        if unlink and os.name == "posix":
            with contextlib.suppress(FileNotFoundError):
                self.shm.unlink()


#: Segments whose mapping a caller's view still holds (closing them would fail); freed at exit.
_LINGERING: list[SharedMemory] = []
