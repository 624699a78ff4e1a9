"""Transport: UDP sockets that carry OSC Events. Bytes in, decoded Events out; no domain logic.

The launcher's ear for its stages is an ``EventSocket`` on 127.0.0.1 (port 0: the OS picks a free
one). Its receive buffer is raised because the default loses Events in bursts (measured: of a
10,000-datagram burst 2,400-7,300 arrive with the default buffer, all with 4 MiB), and it reads
whole datagrams up to 64 KB, so a long ``stderr`` tail is never cut.
"""

from __future__ import annotations

import logging
import socket
import sys
import threading
from collections import deque
from collections.abc import Callable, Sequence

from cuepipe.orchestrator import defaults
from cuepipe.stages.codec import Message, MessageError, decode
from cuepipe.stages.protocol import MessageSpec

log = logging.getLogger(__name__)


class EventSocket:
    """A bound UDP socket that decodes what arrives into Events of the given specs."""

    def __init__(self, specs: Sequence[MessageSpec], host: str = "127.0.0.1", port: int = 0,
                 peers: Sequence[str] | None = ("127.0.0.1",)) -> None:
        self.specs = tuple(specs)
        self.peers = frozenset(peers or ())  # empty: any peer
        self.malformed = 0
        self.refused = 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self._raise_receive_buffer()
            if sys.platform == "win32":  # else a reply to a closed port makes the next recvfrom fail
                self.sock.ioctl(socket.SIO_UDP_CONNRESET, False)
            self.sock.bind((host, port))
        except OSError:
            self.sock.close()
            raise
        self.port: int = self.sock.getsockname()[1]
        self.host = host

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _raise_receive_buffer(self) -> None:
        """Ask for a big receive buffer: the default loses thousands of datagrams in a burst.

        Linux caps SO_RCVBUF at net.core.rmem_max; SO_RCVBUFFORCE passes the cap where permitted.
        """
        force = getattr(socket, "SO_RCVBUFFORCE", None)
        if force is not None:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, force, defaults.RECEIVE_BUFFER)
            except OSError:
                force = None
        if force is None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, defaults.RECEIVE_BUFFER)
        self.receive_buffer: int = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        if self.receive_buffer < defaults.RECEIVE_BUFFER:
            log.warning("UDP receive buffer is only %d bytes (asked %d); bursts may lose messages — raise "
                        "net.core.rmem_max", self.receive_buffer, defaults.RECEIVE_BUFFER)

    def datagrams(self, timeout: float) -> list[tuple[bytes, tuple[str, int]]]:
        """Every queued datagram with its sender, waiting up to ``timeout`` for the first (0: no wait).

        Datagrams from peers outside ``peers`` are dropped here (counted in ``refused``).
        """
        out: list[tuple[bytes, tuple[str, int]]] = []
        if timeout > 0:
            self.sock.settimeout(timeout)
        else:
            self.sock.setblocking(False)
        while True:
            try:
                data, peer = self.sock.recvfrom(defaults.MAX_DATAGRAM)
            except (TimeoutError, BlockingIOError):
                return out
            except ConnectionResetError:  # Windows reports an earlier ICMP error here; harmless
                continue
            except OSError:  # closed from another thread
                return out
            self.sock.setblocking(False)  # drain the rest without waiting
            if self.peers and peer[0] not in self.peers:
                self.refused += 1
                log.warning("refused datagram from %s (not in the allow-list)", peer[0])
                continue
            out.append((data, (peer[0], peer[1])))
            if len(out) >= 1024:  # bounded batches keep the caller responsive under floods
                return out

    def receive(self, timeout: float) -> list[Message]:
        """Every queued Event, waiting up to ``timeout`` seconds for the first (0: do not wait)."""
        events: list[Message] = []
        for data, _ in self.datagrams(timeout):
            try:
                events.extend(decode(data, self.specs))
            except MessageError as exc:
                self.malformed += 1
                log.warning("ignoring malformed datagram: %s", exc)
        return events

    def send(self, data: bytes, address: tuple[str, int]) -> None:
        """Send from this socket's port (OSC replies conventionally come from the port asked)."""
        try:
            self.sock.sendto(data, address)
        except (OSError, OverflowError, ValueError) as exc:  # Overflow: a port outside 0..65535
            log.warning("cannot send to %s:%s: %s", address[0], address[1], exc)

    def close(self) -> None:
        self.sock.close()


class EventListener:
    """An EventSocket read by a thread, handing each Event to ``on_event``; ``stop()`` joins it."""

    def __init__(self, specs: Sequence[MessageSpec], on_event: Callable[[Message], None]) -> None:
        self.socket = EventSocket(specs)
        self.on_event = on_event
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cuepipe-event-listener", daemon=True)

    @property
    def address(self) -> str:
        return self.socket.address

    def start(self) -> EventListener:
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            for event in self.socket.receive(0.05):
                self.on_event(event)

    def stop(self) -> None:
        """Deliver what is still queued, then stop the thread and close the socket."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        for event in self.socket.receive(0.0):
            self.on_event(event)
        self.socket.close()


class DatagramQueue:
    """Drains an EventSocket on its own thread into a bounded queue.

    Reading a datagram costs microseconds, handling one (decode, validate, reply) costs far more; a
    thread that only reads keeps the kernel buffer empty during a burst even when the CPU is busy
    with inference, so the burst waits in this queue instead of being dropped by the kernel.
    Overflow of this queue is counted in ``dropped``.
    """

    def __init__(self, sock: EventSocket, limit: int = 100_000) -> None:
        self.socket = sock
        self.dropped = 0
        self._items: deque[tuple[bytes, tuple[str, int]]] = deque()
        self._limit = limit
        self._ready = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cuepipe-datagram-reader", daemon=True)

    def start(self) -> DatagramQueue:
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            batch = self.socket.datagrams(0.1)
            if not batch:
                continue
            with self._ready:
                room = self._limit - len(self._items)
                self._items.extend(batch[:room])
                self.dropped += max(0, len(batch) - room)
                self._ready.notify()

    def get(self, timeout: float) -> list[tuple[bytes, tuple[str, int]]]:
        """Everything queued, waiting up to ``timeout`` for something to arrive."""
        with self._ready:
            if not self._items:
                self._ready.wait(timeout)
            items = list(self._items)
            self._items.clear()
        return items

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
