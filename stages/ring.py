"""Frame ring: lossless stage-to-stage video through shared memory, one writer and one reader process.

Why: two stages on one machine hand frames over with no codec and no pipe copying them through the
kernel. The writer copies a frame into a slot of a ``multiprocessing.shared_memory`` segment
(``put``); the reader copies it out (``get``) or reads it in place (``borrow``). Bit-exact, each
frame with its sequence number (1, 2, ...), capture timestamp (int ns) and size. Issue 12, part 2.

Usage::

    # the writer creates the ring, owns its name and unlinks it when done
    with RingWriter.create(slots=4, width=1920, height=1080, channels=4, policy="block") as ring:
        start_reader(ring.name)                   # e.g. in the reader's argv ("cp" + 12 hex digits)
        ring.wait_for_reader(timeout_s=10)        # close() unlinks the name: attach before it
        for image in frames:                      # (1080, 1920, 4) uint8
            ring.put(image, timestamp_ns=t)       # block: waits for a free slot
    # leaving the block: close() = end of stream; after an exception abort(): the reader fails at once

    # the reader, in another process
    with RingReader.attach(name) as ring:         # geometry and policy come from the header
        for frame in ring:                        # RingFrame(seq, timestamp_ns, image): a copy
            ...                                   # stops at end of stream, after the last frame
        with ring.borrow() as frame:              # zero copy (policy block only): see borrow()
            model(frame.image)

Policies (``RingPolicy``): ``block`` - ``put`` on a full ring waits until the reader frees a slot
(offline work: nothing is lost); ``drop_oldest`` - ``put`` never waits: it overwrites the oldest
unread frame, counts a drop and returns False, and the reader skips to the oldest frame still there
(a live source: the reader always gets increasing seqs, the newest frames).

Memory layout (``stages/ringshm.py``, which also owns the segment's life on each platform)::

    0      header, 4 lines of 64 B: geometry and policy | writer pid | head, writer state | tail, reader
    256    info: up to 4 KiB the writer describes the stream with (``create(info=...)``, ``ring.info``)
    4352   slot 0: 64 B slot header (lock, seq, timestamp_ns, width, height, channels, nbytes), frame
    ...    slot i at 4352 + i * stride; stride = 64 + frame bytes rounded up to 64; seq s in slot (s-1) % slots

Synchronisation, single producer / single consumer, no cross-process lock: ``head`` (frames
published) is written by the writer only, ``tail`` (frames consumed) by the reader only. Each slot
has a seqlock: the writer makes the slot's ``lock`` odd, writes the frame and its header, makes it
even again, then advances ``head``; the reader keeps a copy only if ``lock`` was even and unchanged
around it and the slot still held the seq it wanted - a frame overwritten under the reader
(``drop_oldest``) is discarded and counted as ``torn``, never returned. This relies on each process's
stores becoming visible in program order, as on x86-64; Python has no memory fence, and on ARM64 the
interpreter's work between the stores orders them in practice (not a guarantee: the torn-read test of
tests/test_ring.py checks it on the machine it runs on).

Waiting: a few yields, then sleeps from 0.2 ms doubling to 2 ms. Every wait has a timeout
(``RingTimeout``) and watches the other end: its state in the header every round (``RingClosed``,
``RingAborted``), and every 0.1 s that its process still exists (pid and creation time, so a reused
pid is no alive peer): ``RingPeerGone``. A reader first drains what a closed or dead writer had
published. The clock (``now``) is injectable; the writer's default capture time is ``time.time_ns()``.

Borrowing: ``borrow()`` lends the slot itself, read-only, until its ``with`` block ends; only then
may the writer reuse that slot. Do not keep ``frame.image`` (or a view of it) past the block: after
it the writer overwrites the memory, and after ``close`` the mapping is gone (a view that outlives the
ring keeps the mapping alive, with a warning). Not under ``drop_oldest``: there the writer would
overwrite a borrowed slot without waiting. One frame out at a time.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType

import numpy as np
import numpy.typing as npt

from cuepipe.stages.errors import ErrorKind
from cuepipe.stages.framepipe import ClosedOrAborted
from cuepipe.stages.ringshm import (
    EndOfStream,
    H,
    ReaderState,
    RingAborted,
    RingClosed,
    RingError,
    RingGeometry,
    RingGeometryError,
    RingNotFound,
    RingPeerGone,
    RingPolicy,
    RingTimeout,
    S,
    Segment,
    WriterState,
    alive,
    exists,
    identity,
    unlink_orphan,
)

__all__ = ["EndOfStream", "RingAborted", "RingClosed", "RingError", "RingFrame", "RingGeometry",
           "RingGeometryError", "RingNotFound", "RingPeerGone", "RingPolicy", "RingReader", "RingStats",
           "RingTimeout", "RingWriter", "exists"]

DEFAULT_TIMEOUT_S = 10.0
_CHECK_S = 0.1  # how often a waiting end checks that the other end's process exists
_SPINS = 8  # yields before the first sleep
_SLEEP_MIN_S, _SLEEP_MAX_S = 0.0002, 0.002

Clock = Callable[[], float]


@dataclass(frozen=True)
class RingFrame:
    seq: int  # 1, 2, ... in the order the writer put them
    timestamp_ns: int  # the capture time the writer gave (default: time.time_ns() at put)
    image: np.ndarray  # height x width x channels; read-only and in the ring when borrowed


@dataclass(frozen=True)
class RingStats:
    frames: int  # writer: published; reader: returned
    dropped: int  # writer: unread frames it overwrote (drop_oldest); reader: seqs it skipped (overwritten)
    waited_s: float  # time spent waiting: writer for a free slot (block), reader for a frame
    torn: int = 0  # reader: copies discarded because the writer rewrote the slot meanwhile


def _pause(rounds: int) -> None:
    """Rounds 1-8 of a wait yield the CPU; then sleeps of 0.2, 0.4, 0.8, 1.6 ms, then 2 ms a round."""
    time.sleep(0 if rounds <= _SPINS else min(_SLEEP_MIN_S * 2 ** min(rounds - _SPINS - 1, 4), _SLEEP_MAX_S))


class _End:
    """What both ends share: the segment, geometry, clock, waiting with a timeout and the peer check."""

    _peer = "peer"  # "reader" / "writer": the other end, in messages
    _kind = ErrorKind.INTERNAL  # how this end's failures are reported
    _PID, _CREATED = H.READER_PID, H.READER_CREATED  # where the other end's identity is

    def __init__(self, seg: Segment, timeout_s: float, now: Clock) -> None:
        self._seg, self.name, self.geometry, self.policy = seg, seg.name, seg.geometry, seg.policy
        self.timeout_s, self._now = timeout_s, now
        self._closed = False
        self.info = seg.info  # what the writer described the stream with (create's ``info``)
        self._next_check = 0.0
        self._frames = self._dropped = self._torn = 0
        self._waited_s = 0.0

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def stats(self) -> RingStats:
        return RingStats(self._frames, self._dropped, self._waited_s, self._torn)

    def _deadline(self, timeout_s: float | None) -> float:
        return self._now() + (self.timeout_s if timeout_s is None else timeout_s)

    def _check_open(self) -> None:
        if self._closed:
            raise RingClosed(f"frame ring {self.name}: this {type(self).__name__} is closed")

    def _peer_gone(self) -> bool:
        """Whether the other end's process is gone; looked at every _CHECK_S at most."""
        t = self._now()
        if t < self._next_check:
            return False
        self._next_check = t + _CHECK_S
        pid = int(self._seg.header[self._PID])
        return pid != 0 and not alive(pid, int(self._seg.header[self._CREATED]))

    def _watch(self) -> bool:
        """Raise for what the other end said in the header; whether its process is gone."""
        raise NotImplementedError

    def _gone(self) -> RingPeerGone:
        pid = int(self._seg.header[self._PID])
        return RingPeerGone(f"frame ring {self.name}: its {self._peer} (pid {pid}) died without closing it",
                            self._kind)

    def _wait(self, ready: Callable[[], bool], deadline: float, what: str) -> None:
        """Return once ``ready()``; RingTimeout after ``deadline``, the peer's errors as they come."""
        start, rounds = self._now(), 0
        try:
            while not ready():
                if self._watch():
                    if ready():  # it published (or freed) just before it died: take that first
                        break
                    raise self._gone()
                if self._now() >= deadline:
                    why = "is alive but stuck" if self._seg.header[self._PID] else "has not attached"
                    raise RingTimeout(f"frame ring {self.name}: no {what} in time (the {self._peer} {why})",
                                      self._kind)
                rounds += 1
                _pause(rounds)
        finally:
            self._waited_s += self._now() - start


class RingWriter(_End, ClosedOrAborted):
    """The end that creates the ring, puts frames and unlinks it. Use it as a context manager."""

    _peer, _kind = "reader", ErrorKind.OUTPUT_ERROR

    @classmethod
    def create(cls, slots: int, width: int, height: int, channels: int = 4,
               policy: RingPolicy | str = RingPolicy.BLOCK, *, dtype: npt.DTypeLike = "uint8",
               name: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S, now: Clock = time.monotonic,
               info: bytes = b"") -> RingWriter:
        """A new ring named ``name`` (default: ``cp`` + 12 random hex digits); ``timeout_s``: put's default;
        ``info``: up to 4 KiB for the reader (``RingReader.info``), e.g. the frame rate."""
        geometry = RingGeometry.make(slots, width, height, channels, dtype)
        try:
            policy = RingPolicy(policy)
        except ValueError as exc:
            raise RingGeometryError(f"policy must be one of {', '.join(RingPolicy)}, got {policy!r}") from exc
        return cls(Segment.create(geometry, policy, name, info), timeout_s, now)

    def _watch(self) -> bool:
        state = self._seg.header[H.READER_STATE]
        if state == ReaderState.CLOSED:
            raise RingClosed(f"frame ring {self.name}: the reader closed it", self._kind)
        return state == ReaderState.ATTACHED and self._peer_gone()

    def wait_for_reader(self, timeout_s: float | None = None) -> None:
        """Return once a reader has attached (RingTimeout if none does)."""
        self._check_open()
        self._wait(lambda: self._seg.header[H.READER_STATE] != ReaderState.NONE, self._deadline(timeout_s),
                   "reader attached")

    def put(self, frame: np.ndarray, timestamp_ns: int | None = None, timeout_s: float | None = None) -> bool:
        """Publish a copy of ``frame`` (the ring's shape and dtype). False: under ``drop_oldest`` it took the
        slot of an unread frame (counted in ``stats.dropped``). Under ``block`` it waits for a free slot
        up to ``timeout_s`` (default: the ring's)."""
        self._check_open()
        g = self.geometry
        if frame.shape != g.shape or frame.dtype != g.dtype:
            raise RingGeometryError(f"frame ring {self.name} takes {g.shape} {g.dtype} frames, got "
                                    f"{frame.shape} {frame.dtype}")
        stamp = time.time_ns() if timestamp_ns is None else timestamp_ns
        h, seq = self._seg.header, self._frames + 1
        oldest = seq - g.slots  # the frame whose slot this one takes: free once the reader consumed it
        if self._watch():
            raise self._gone()
        dropped = int(h[H.TAIL]) < oldest
        if dropped and self.policy is RingPolicy.BLOCK:
            self._wait(lambda: int(h[H.TAIL]) >= oldest, self._deadline(timeout_s), "free slot")
            dropped = False
        i = (seq - 1) % g.slots
        meta, lock = self._seg.meta[i], int(self._seg.meta[i][S.LOCK])
        meta[S.LOCK] = lock + 1  # odd: being written
        meta[S.SEQ:S.NBYTES + 1] = (seq, stamp, g.width, g.height, g.channels, g.nbytes)
        np.copyto(self._seg.data[i], frame)
        meta[S.LOCK] = lock + 2
        h[H.HEAD] = self._frames = seq
        self._dropped += int(dropped)
        return not dropped

    def close(self) -> None:
        """End of stream: the reader gets what was published, then EndOfStream. Unlinks the name."""
        self._finish(WriterState.CLOSED)

    def abort(self) -> None:
        """The work failed: the reader gets RingAborted at once, unread frames or not. Unlinks the name."""
        self._finish(WriterState.ABORTED)

    def _finish(self, state: WriterState) -> None:
        if not self._closed:
            self._closed = True
            self._seg.header[H.WRITER_STATE] = state
            self._seg.close(unlink=True)



class RingReader(_End):
    """The end that attaches to a ring by name and takes its frames in order. Use it as a context manager."""

    _peer, _kind = "writer", ErrorKind.INPUT_INVALID
    _PID, _CREATED = H.WRITER_PID, H.WRITER_CREATED

    def __init__(self, seg: Segment, timeout_s: float, now: Clock) -> None:
        super().__init__(seg, timeout_s, now)
        self._tail = 0  # frames consumed (or skipped): the next one is seq _tail + 1
        self._borrowed = False

    @classmethod
    def attach(cls, name: str, *, timeout_s: float = DEFAULT_TIMEOUT_S, now: Clock = time.monotonic) -> RingReader:
        """The one reader of ring ``name``; ``timeout_s``: get's default. RingNotFound if there is none."""
        seg = Segment.attach(name)
        try:
            h = seg.header
            if h[H.READER_STATE] != ReaderState.NONE:
                raise RingError(f"frame ring {name} has had its reader (one reader a ring)", ErrorKind.BAD_ARGUMENT)
            h[H.READER_PID:H.READER_CREATED + 1] = identity()
            h[H.READER_STATE] = ReaderState.ATTACHED
        except BaseException:
            seg.close(unlink=False)
            raise
        return cls(seg, timeout_s, now)

    def _check_aborted(self) -> None:
        if self._seg.header[H.WRITER_STATE] == WriterState.ABORTED:
            raise RingAborted(f"frame ring {self.name}: the writer aborted", self._kind)

    def _watch(self) -> bool:
        self._check_aborted()
        return self._seg.header[H.WRITER_STATE] == WriterState.OPEN and self._peer_gone()

    def _gone(self) -> RingPeerGone:
        unlink_orphan(self.name)
        return super()._gone()

    def get(self, timeout_s: float | None = None) -> RingFrame:
        """The next frame, copied out of the ring. EndOfStream after the last one; RingTimeout after
        ``timeout_s`` (default: the ring's) without one."""
        frame = self._next(timeout_s, copy=True)
        self._consume(frame.seq)
        return frame

    @contextlib.contextmanager
    def borrow(self, timeout_s: float | None = None) -> Iterator[RingFrame]:
        """The next frame, in place and read-only, until the ``with`` block ends (see the module's rules)."""
        if self.policy is not RingPolicy.BLOCK:
            raise RingError(f"frame ring {self.name}: borrow needs policy block (under {self.policy} the writer "
                            "overwrites without waiting); use get()", ErrorKind.BAD_ARGUMENT)
        frame = self._next(timeout_s, copy=False)
        self._borrowed = True
        try:
            yield frame
        finally:
            self._borrowed = False
            if not self._closed:
                self._consume(frame.seq)

    def __iter__(self) -> Iterator[RingFrame]:
        """Every frame (copies) until end of stream."""
        while True:
            try:
                frame = self.get()
            except EndOfStream:
                return
            yield frame

    def _next(self, timeout_s: float | None, copy: bool) -> RingFrame:
        self._check_open()
        if self._borrowed:
            raise RingError(f"frame ring {self.name}: leave the borrow block first", ErrorKind.BAD_ARGUMENT)
        h, slots, deadline = self._seg.header, self.geometry.slots, self._deadline(timeout_s)
        while True:
            self._check_aborted()
            head, want = int(h[H.HEAD]), self._tail + 1
            if head < want:
                if h[H.WRITER_STATE] == WriterState.CLOSED and int(h[H.HEAD]) < want:  # state, then head
                    raise EndOfStream(f"frame ring {self.name}: end of stream after {self._tail} frames")
                self._wait(functools.partial(self._published, want), deadline, "frame")
            elif head - want >= slots:  # drop_oldest overwrote it (and more): skip to the oldest still there
                self._dropped += head - slots + 1 - want
                self._tail = head - slots
            elif (frame := self._read(want, copy)) is not None:
                return frame
            else:  # the writer is rewriting that slot: wait until it publishes, then skip
                self._torn += 1
                self._wait(functools.partial(self._published, head + 1), deadline, "frame")

    def _published(self, seq: int) -> bool:
        """Whether frame ``seq`` is published, or the writer publishes no more."""
        return int(self._seg.header[H.HEAD]) >= seq or self._seg.header[H.WRITER_STATE] != WriterState.OPEN

    def _read(self, seq: int, copy: bool) -> RingFrame | None:
        """Slot ``seq``'s frame, or None if it is being written or no longer holds ``seq`` (seqlock)."""
        i = (seq - 1) % self.geometry.slots
        meta, data = self._seg.meta[i], self._seg.data[i]
        lock = int(meta[S.LOCK])
        if lock & 1 or int(meta[S.SEQ]) != seq:
            return None
        stamp, nbytes = int(meta[S.TIMESTAMP]), int(meta[S.NBYTES])
        image = data.copy() if copy else data.view()
        if int(meta[S.LOCK]) != lock:
            return None
        if nbytes != self.geometry.nbytes:
            raise RingError(f"frame ring {self.name}: slot {i} holds {nbytes} bytes, not {self.geometry.nbytes}",
                            ErrorKind.INPUT_INVALID)
        image.flags.writeable = copy
        return RingFrame(seq, stamp, image)

    def _consume(self, seq: int) -> None:
        self._tail = seq
        self._frames += 1
        self._seg.header[H.TAIL] = seq

    def close(self) -> None:
        """Detach (the ring stays the writer's; its next put fails with RingClosed)."""
        if not self._closed:
            self._closed = True
            self._seg.header[H.READER_STATE] = ReaderState.CLOSED
            self._seg.close(unlink=False)

    def __enter__(self) -> RingReader:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

