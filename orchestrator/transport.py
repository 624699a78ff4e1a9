"""Transport: UDP sockets that carry OSC Events. Bytes in, decoded Events out; no domain logic.

The launcher's ear for its stages is an ``EventSocket`` on 127.0.0.1 (port 0: the OS picks a free
one). Its receive buffer is raised because the default loses Events in bursts (REFERENCE.md), and
it reads whole datagrams up to 64 KB, so a long ``stderr`` tail is never cut.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Sequence

from orchestrator import defaults
from stages.events import Event, EventError, EventSpec, decode

log = logging.getLogger(__name__)


class EventSocket:
    """A bound UDP socket that decodes what arrives into Events of the given specs."""

    def __init__(self, specs: Sequence[EventSpec], host: str = "127.0.0.1", port: int = 0,
                 peers: Sequence[str] = ("127.0.0.1",)) -> None:
        self.specs = tuple(specs)
        self.peers = frozenset(peers)
        self.malformed = 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, defaults.RECEIVE_BUFFER)
            self.sock.bind((host, port))
        except OSError:
            self.sock.close()
            raise
        self.port: int = self.sock.getsockname()[1]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def receive(self, timeout: float) -> list[Event]:
        """Every queued Event, waiting up to ``timeout`` seconds for the first (0: do not wait)."""
        events: list[Event] = []
        if timeout > 0:
            self.sock.settimeout(timeout)
        else:
            self.sock.setblocking(False)
        while True:
            try:
                data, peer = self.sock.recvfrom(defaults.MAX_DATAGRAM)
            except (TimeoutError, BlockingIOError):
                return events
            except ConnectionResetError:  # Windows reports an earlier ICMP error here; harmless
                continue
            except OSError:  # closed from another thread
                return events
            self.sock.setblocking(False)  # drain the rest without waiting
            if peer[0] not in self.peers:
                log.warning("ignoring datagram from %s", peer[0])
                continue
            try:
                events.extend(decode(data, self.specs))
            except EventError as exc:
                self.malformed += 1
                log.warning("ignoring malformed datagram: %s", exc)

    def close(self) -> None:
        self.sock.close()


class EventListener:
    """An EventSocket read by a thread, handing each Event to ``on_event``; ``stop()`` joins it."""

    def __init__(self, specs: Sequence[EventSpec], on_event: Callable[[Event], None]) -> None:
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
