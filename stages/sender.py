"""Sending Events over UDP: ``EventSender`` and the ``HOST:PORT`` report addresses it sends to.

A Stage sends its Events to its ``--report`` addresses, the launcher relays Job Events to its own,
both through ``EventSender``; the datagrams come from ``cuepipe.stages.codec``.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence
from typing import Any

from cuepipe.stages.codec import Message, encode
from cuepipe.stages.protocol import MessageSpec

log = logging.getLogger(__name__)


def parse_address(text: str) -> tuple[str, int]:
    """Parse ``HOST:PORT`` (``[v6]:PORT`` for IPv6) into a (host, port) pair."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


class EventSender:
    """Sends Events over UDP to any number of report addresses; never raises on network errors.

    A lost Event must not kill a Stage that is doing its work, so send errors are logged once per
    target and otherwise ignored (UDP gives no delivery guarantee anyway).
    """

    def __init__(self, targets: Sequence[tuple[str, int]]) -> None:
        self._targets: list[tuple[socket.socket, Any]] = []
        self._sockets: dict[int, socket.socket] = {}
        self._warned: set[int] = set()
        for host, port in targets:
            family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
            if family not in self._sockets:
                self._sockets[family] = socket.socket(family, socket.SOCK_DGRAM)
            self._targets.append((self._sockets[family], sockaddr))

    def send(self, spec: MessageSpec, **fields: Any) -> None:
        data = encode(spec, **fields)
        for i, (sock, addr) in enumerate(self._targets):
            try:
                sock.sendto(data, addr)
            except OSError as exc:
                if i not in self._warned:
                    self._warned.add(i)
                    log.warning("cannot send events to %s: %s", addr, exc)

    def emit(self, event: Message) -> None:
        self.send(event.spec, **event.fields)

    def close(self) -> None:
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()
        self._targets.clear()

    def __enter__(self) -> EventSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
