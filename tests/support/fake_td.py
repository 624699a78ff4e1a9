"""FakeTD: a TouchDesigner OSC In DAT on loopback that records every Event sent to it."""

from __future__ import annotations

import socket
import threading
import time

from cuepipe.stages.codec import Message, MessageError, decode
from cuepipe.stages.protocol import JOB_EVENTS, STAGE_EVENTS, MessageSpec


class FakeTD:
    """Records every OSC datagram sent to it, as TouchDesigner's OSC In DAT would see them."""

    def __init__(self, specs: tuple[MessageSpec, ...]) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.port: int = self.sock.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.specs = specs
        self.events: list[Message] = []
        self.raw: list[bytes] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fake-td", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                data, _ = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.raw.append(data)
            try:
                self.events.extend(decode(data, self.specs))
            except MessageError as exc:
                self.errors.append(str(exc))

    def names(self) -> list[str]:
        return [e.spec.name for e in self.events]

    def wait_for(self, name: str, timeout: float = 30.0) -> Message:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e in self.events:
                if e.spec.name == name:
                    return e
            time.sleep(0.01)
        raise AssertionError(f"no {name!r} event within {timeout}s; got {self.names()}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


def all_specs() -> tuple[MessageSpec, ...]:
    return STAGE_EVENTS + JOB_EVENTS
