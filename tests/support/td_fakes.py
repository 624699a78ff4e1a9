"""TD-shaped fakes of the operators the ``td/`` package touches, and a pump standing in for TD's frames.

Only the attributes ``td/`` uses exist: a Table DAT (``numRows``/``numCols``/``setSize``/``[r, c]``
with ``.val``), COMPs (``par.X.eval()``, ``op()``, ``parent()``, ``ext``), CHOP channels (``name``,
``owner``), a Movie File In TOP (``par.file``), a peer (``address``, ``port``). The pump reads a real
UDP socket — the stand-in for TD's OSC In / UDP In port — and feeds each datagram through the
real callback adapters in ``td/callbacks.py``, then runs each COMP's frame callback.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from types import SimpleNamespace
from typing import Any

from pythonosc.osc_packet import OscPacket

from cuepipe.td import callbacks


class FakePar:
    def __init__(self, name: str, value: Any = "", owner: Any = None) -> None:
        self.name, self.val, self.owner = name, value, owner
        self.menuNames: list[str] = []
        self.menuLabels: list[str] = []
        self.default: Any = None

    def eval(self) -> Any:
        return self.val


class FakePars:
    """``comp.par``: attribute access to FakePar objects (missing ones raise AttributeError)."""

    def __init__(self, owner: Any, **values: Any) -> None:
        for name, value in values.items():
            self.__dict__[name] = FakePar(name, value, owner)

    def __setattr__(self, name: str, value: Any) -> None:
        """``op.par.file = 'x'`` sets the parameter's value, as in TD."""
        getattr(self, name).val = value


class FakeOP:
    def __init__(self, name: str, parent: FakeOP | None = None) -> None:
        self.name, self._parent = name, parent
        self.children: dict[str, FakeOP] = {}
        self.ext = SimpleNamespace()
        self.par = FakePars(self)
        if parent is not None:
            parent.children[name] = self

    @property
    def path(self) -> str:
        return (self._parent.path if self._parent else "") + "/" + self.name

    def parent(self) -> FakeOP | None:
        return self._parent

    def op(self, name: str) -> Any:
        return self.children.get(name)


class FakeCell:
    def __init__(self, val: str = "") -> None:
        self.val = val


class FakeTableDAT(FakeOP):
    """A Table DAT: cells addressed ``dat[r, c]`` (c an index or a header name)."""

    def __init__(self, name: str, parent: FakeOP | None = None, rows: list[list[str]] | None = None) -> None:
        super().__init__(name, parent)
        self.cells = [[FakeCell(v) for v in row] for row in rows or []]

    @property
    def numRows(self) -> int:
        return len(self.cells)

    @property
    def numCols(self) -> int:
        return max((len(r) for r in self.cells), default=0)

    def setSize(self, rows: int, cols: int) -> None:
        self.cells = [[FakeCell() for _ in range(cols)] for _ in range(rows)]

    def _col(self, c: int | str) -> int:
        return c if isinstance(c, int) else [cell.val for cell in self.cells[0]].index(c)

    def __getitem__(self, rc: tuple[int, int | str]) -> FakeCell | None:
        r, c = rc
        try:
            return self.cells[r][self._col(c)]
        except (IndexError, ValueError):
            return None

    def __setitem__(self, rc: tuple[int, int | str], value: str) -> None:
        self.cells[rc[0]][self._col(rc[1])].val = str(value)

    def appendRow(self, values: list[str]) -> None:
        self.cells.append([FakeCell(v) for v in values])

    def rows(self) -> list[dict[str, str]]:
        """Every row below the header as {column: value}."""
        header = [c.val for c in self.cells[0]] if self.cells else []
        return [dict(zip(header, (c.val for c in row), strict=True)) for row in self.cells[1:]]

    def row(self, job: str) -> dict[str, str]:
        return next(r for r in self.rows() if r["job"] == job)


class FakeTOP(FakeOP):
    def __init__(self, name: str, parent: FakeOP | None = None) -> None:
        super().__init__(name, parent)
        self.par = FakePars(self, file="")


class FakeChannel:
    def __init__(self, name: str, owner: FakeOP) -> None:
        self.name, self.owner = name, owner


class FakeComp(FakeOP):
    """The ``cuepipe`` COMP with the children docs/touchdesigner.md wires into it."""

    def __init__(self, name: str = "cuepipe", parent: FakeOP | None = None, **pars: Any) -> None:
        super().__init__(name, parent or FakeOP("project1"))
        self.par = FakePars(self, **pars)
        self.jobs = FakeTableDAT("jobs", self)
        self.oscin = FakeOP("oscin1", self)  # the OSC In DAT
        self.udpin = FakeOP("udpin1", self)  # the UDP In DAT
        self.execute = FakeOP("execute1", self)  # the Execute DAT (Frame Start)

    def pulse(self, name: str) -> Any:
        """What a Parameter Execute DAT does when the pulse parameter ``name`` is pressed."""
        return callbacks.onPulse(FakePar(name, owner=self))


@contextlib.contextmanager
def running_in(dat: FakeOP) -> Iterator[None]:
    """While inside, ``me`` is ``dat`` in the callbacks module, as TD sets it for a callbacks DAT."""
    callbacks.__dict__["me"] = dat
    try:
        yield
    finally:
        callbacks.__dict__.pop("me", None)


def frame(comp: FakeComp, number: int = 0) -> None:
    with running_in(comp.execute):
        callbacks.onFrameStart(number)


class TDPort:
    """A real UDP socket standing in for TD's OSC In / UDP In port."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.02)
        self.port: int = self.sock.getsockname()[1]
        self.received: list[bytes] = []

    def pump(self, udp: Sequence[FakeComp], osc: Sequence[FakeComp] = (), until: Callable[[], bool] = lambda: False,
             timeout: float = 30.0) -> None:
        """Feed datagrams to ``udp`` COMPs as raw bytes (UDP In DAT) and to ``osc`` COMPs decoded
        (OSC In DAT), running every COMP's frame callback after each, until ``until()`` holds."""
        deadline = time.monotonic() + timeout
        count = 0
        while True:
            try:
                data, (host, port) = self.sock.recvfrom(65536)
            except TimeoutError:
                data = b""
            if data:
                self.received.append(data)
                peer = SimpleNamespace(address=host, port=port)
                for comp in udp:
                    message = data.decode("ascii", "ignore")
                    callbacks.onReceive(comp.udpin, count, message, data, peer)
                for comp in osc:
                    for timed in OscPacket(data).messages:
                        msg = timed.message
                        callbacks.onReceiveOSC(comp.oscin, count, f"{msg.address} {msg.params}", data, 0.0,
                                               msg.address, list(msg.params), peer)
                count += 1
            for comp in [*udp, *osc]:
                frame(comp, count)
            if until():
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not reached within {timeout}s")

    def close(self) -> None:
        self.sock.close()
