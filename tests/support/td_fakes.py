"""TD-shaped fakes of the operators the ``td/`` package touches, and a pump standing in for TD's frames.

Only the attributes ``td/`` uses exist: a Table DAT (``numRows``/``numCols``/``setSize``/``[r, c]``
with ``.val``), COMPs (``par.X.eval()``, ``op()``, ``parent()``, ``ext``), CHOP channels (``name``,
``owner``), a Movie File In TOP (``par.file``), a peer (``address``, ``port``). The pump reads a real
UDP socket — the stand-in for TD's OSC In / UDP In port — and feeds each datagram through the
real callback adapters in ``td/callbacks.py``, then runs each COMP's frame callback.

For ``td/build_comp.py`` the fakes also model what building a network touches, after TD's documented
Python API (docs.derivative.ca: COMP Class, OP Class, Par Class, Page Class): ``FakeCOMP.create(type,
name)`` (a type name string such as ``'oscinDAT'``; a taken name gets the next number, as in TD),
``destroy()``, ``nodeX``/``nodeY``, ``dock``/``docked`` (a new OSC In DAT gets a docked
``<name>_callbacks`` Text DAT, as in TD), ``outputConnectors[i].connect()``, ``par.X.expr``/``.mode``
(``FakeParMode``), custom pages (``appendCustomPage`` and ``Page.append<Style>``; TD's naming rule
for custom parameters is enforced), ``initializeExtensions()`` and ``save(path)``. Built-in
parameters exist per operator type (``BUILTIN_PARS``); setting one that does not exist raises, as in TD.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

from pythonosc.osc_packet import OscPacket

from cuepipe.td import callbacks


class FakeParMode:
    """TD's ``ParMode`` members (Par Class: ``mode``)."""

    CONSTANT = "CONSTANT"
    EXPRESSION = "EXPRESSION"
    EXPORT = "EXPORT"
    BIND = "BIND"


class FakePar:
    def __init__(self, name: str, value: Any = "", owner: Any = None) -> None:
        self.name, self.owner = name, owner
        self._val: Any = value
        self._expr = ""
        self.mode: Any = FakeParMode.CONSTANT
        self.menuNames: list[str] = []
        self.menuLabels: list[str] = []
        self.default: Any = None
        self.label = name
        self.readOnly = False
        self.style = ""
        self.page: Any = None
        self.pulses = 0

    @property
    def val(self) -> Any:
        return self._val

    @val.setter
    def val(self, value: Any) -> None:
        """As in TD: setting the constant value puts the parameter in constant mode."""
        self._val = value
        self.mode = FakeParMode.CONSTANT

    @property
    def expr(self) -> str:
        return self._expr

    @expr.setter
    def expr(self, text: str) -> None:
        """As in TD: setting the expression puts the parameter in expression mode."""
        self._expr = text
        self.mode = FakeParMode.EXPRESSION

    def eval(self) -> Any:
        return self.val

    def pulse(self) -> None:
        self.pulses += 1


class FakePars:
    """``comp.par``: attribute access to FakePar objects (missing ones raise AttributeError)."""

    def __init__(self, owner: Any, **values: Any) -> None:
        for name, value in values.items():
            self.__dict__[name] = FakePar(name, value, owner)

    def __setattr__(self, name: str, value: Any) -> None:
        """``op.par.file = 'x'`` sets the parameter's value, as in TD."""
        getattr(self, name).val = value

    def add(self, name: str, value: Any = "", owner: Any = None) -> FakePar:
        """Create (or replace) parameter ``name``: what a Page's ``append...`` does."""
        par = self.__dict__[name] = FakePar(name, value, owner)
        return par

    def names(self) -> list[str]:
        return list(self.__dict__)


#: Built-in parameters (name: default) of the operator types the build script creates, per TD's
#: operator pages on docs.derivative.ca; a fake operator of that type has exactly these.
BUILTIN_PARS: dict[str, dict[str, Any]] = {
    "baseCOMP": {"opshortcut": "", "parentshortcut": "", "ext0object": "", "ext0name": "", "ext0promote": False,
                 "reinitextensions": None, "initextonstart": True, "nodeview": "default", "opviewer": ""},
    "textDAT": {"file": "", "syncfile": False},
    "tableDAT": {"file": ""},
    "oscinDAT": {"active": True, "port": 10000, "localaddress": "", "callbacks": ""},
    "executeDAT": {"active": True, "start": False, "create": False, "exit": False, "framestart": False,
                   "frameend": False},
    "parameterexecuteDAT": {"active": True, "op": "", "pars": "", "custom": True, "builtin": True,
                            "valuechange": True, "onpulse": False},
    "chopexecuteDAT": {"active": True, "chop": "", "offtoon": False, "valuechange": False},
    "datexecuteDAT": {"active": True, "dat": "", "tablechange": False},
}
#: Spelling of the extension parameters in TD builds before ``ext0object`` (tests pass this to
#: ``FakeCOMP(builtins=...)``).
OLD_EXTENSION_PARS = {"opshortcut": "", "parentshortcut": "", "extension1": "", "extname1": "",
                      "promoteextension1": False, "reinitextensions": None, "nodeview": "default", "opviewer": ""}


class FakeConnector:
    """One of ``OP.outputConnectors`` / ``inputConnectors``: ``connect(target)`` is recorded."""

    def __init__(self, owner: FakeOP, index: int) -> None:
        self.owner, self.index = owner, index
        self.connections: list[Any] = []

    def connect(self, target: Any) -> None:
        self.connections.append(target)


class FakeOP:
    def __init__(self, name: str, parent: FakeOP | None = None, OPType: str = "") -> None:
        self.name, self._parent, self.OPType = name, parent, OPType
        self.children: dict[str, FakeOP] = {}
        self.ext = SimpleNamespace()
        self.par = FakePars(self, **BUILTIN_PARS.get(OPType, {}))
        self.nodeX = self.nodeY = 0
        self.viewer = False
        self.valid = True
        self._dock: FakeOP | None = None
        self._docked: list[FakeOP] = []
        self.outputConnectors = [FakeConnector(self, 0)]
        self.inputConnectors = [FakeConnector(self, 0)]
        if parent is not None:
            parent.children[name] = self

    @property
    def type(self) -> str:
        """TD's ``OP.type``: the type without its family, e.g. ``'oscin'``."""
        return self.OPType[:-4] if self.OPType[-4:] in ("COMP", "DAT", "CHOP", "TOP", "SOP", "MAT") else self.OPType

    @property
    def path(self) -> str:
        return (self._parent.path.rstrip("/") if self._parent else "") + "/" + self.name

    def parent(self) -> FakeOP | None:
        return self._parent

    def op(self, name: str) -> Any:
        if name == "..":
            return self._parent
        return self.children.get(name)

    @property
    def dock(self) -> FakeOP | None:
        return self._dock

    @dock.setter
    def dock(self, target: FakeOP | None) -> None:
        if self._dock is not None:
            self._dock._docked.remove(self)
        self._dock = target
        if target is not None:
            target._docked.append(self)

    @property
    def docked(self) -> list[FakeOP]:
        return list(self._docked)

    def destroy(self) -> None:
        """Remove the operator (and, as in TD, undock it); raises if it was already destroyed."""
        if not self.valid:
            raise RuntimeError(f"{self.path} was already destroyed")
        self.dock = None
        for other in list(self._docked):
            other.dock = None
        self.valid = False
        if self._parent is not None:
            self._parent.children.pop(self.name, None)
            destroyed = getattr(self._parent, "destroyed", None)
            if isinstance(destroyed, list):
                destroyed.append(self.name)


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


class FakeDAT(FakeOP):
    """A Text DAT or an Execute-type DAT: ``text`` is its contents."""

    def __init__(self, name: str, parent: FakeOP | None = None, OPType: str = "textDAT") -> None:
        super().__init__(name, parent, OPType)
        self.text = ""


class FakePage:
    """A custom parameter page (TD's Page Class): ``append<Style>(name, label=None, ...)`` returns the
    created ParGroup (here a list of one FakePar) and, with ``replace=True`` (TD's default), replaces a
    parameter of that name."""

    STYLES = ("Str", "StrMenu", "Menu", "Int", "Float", "Toggle", "Pulse", "Momentary", "File", "FileSave",
              "Folder", "OP", "COMP", "TOP", "CHOP", "DAT", "SOP", "MAT", "Python", "Header")

    def __init__(self, comp: FakeCOMP, name: str) -> None:
        self.comp, self.name = comp, name
        self.pars: list[FakePar] = []

    def __getattr__(self, method: str) -> Any:
        style = method.removeprefix("append")
        if not method.startswith("append") or style not in self.STYLES:
            raise AttributeError(method)

        def append(name: str, label: str | None = None, order: Any = None, replace: bool = True,
                    size: int = 1) -> list[FakePar]:
            if not (name[:1].isupper() and name[1:] == name[1:].lower() and name.isalnum()):
                raise ValueError(f"TD custom parameter names are Capitalized, then lowercase: {name!r}")
            if name in self.comp.par.names():
                if not replace:
                    raise ValueError(f"parameter {name} exists")
                self.comp.replaced.append(name)
                self.pars = [p for p in self.pars if p.name != name]
            par = self.comp.par.add(name, "", self.comp)
            par.style, par.label, par.page = style, label if label is not None else name, self
            self.pars.append(par)
            return [par]

        return append


class FakeCOMP(FakeOP):
    """A component as the build script sees it: ``create``, custom pages, extensions, ``save``.

    ``builtins`` replaces the built-in parameters (e.g. ``OLD_EXTENSION_PARS`` for an older TD build).
    Records: ``created`` (type, name) per ``create``, ``destroyed`` names, ``replaced`` custom
    parameter names, ``initialized`` (``initializeExtensions`` calls) and ``saved`` paths."""

    #: OPType -> the docked DAT a new operator of that type gets by itself (its name suffix), as in TD.
    auto_docked: ClassVar[dict[str, str]] = {"oscinDAT": "_callbacks"}

    def __init__(self, name: str, parent: FakeOP | None = None, OPType: str = "baseCOMP",
                 builtins: dict[str, Any] | None = None) -> None:
        super().__init__(name, parent, OPType)
        if builtins is not None:
            self.par = FakePars(self, **builtins)
        self.customPages: list[Any] = []
        self.created: list[tuple[str, str]] = []
        self.destroyed: list[str] = []
        self.replaced: list[str] = []
        self.initialized = 0
        self.saved: list[str] = []

    def create(self, op_type: Any, name: str | None = None, initialize: bool = True) -> FakeOP:
        """TD's ``COMP.create``: a type object or its name as a string; a taken name gets the next number."""
        kind = op_type if isinstance(op_type, str) else getattr(op_type, "__name__", str(op_type))
        base = name or kind[:-3].lower() + "1"
        unique, number = base, 1
        while unique in self.children:
            stem = base.rstrip("0123456789")
            unique, number = f"{stem}{number}", number + 1
        made: FakeOP
        if kind.endswith("COMP"):
            made = FakeCOMP(unique, self, kind)
        elif kind == "tableDAT":
            made = FakeTableDAT(unique, self)
            made.OPType = kind
        elif kind.endswith("DAT"):
            made = FakeDAT(unique, self, kind)
        else:
            made = FakeOP(unique, self, kind)
        self.created.append((kind, unique))
        suffix = self.auto_docked.get(kind)
        if suffix:  # e.g. a new OSC In DAT comes with its own docked callbacks DAT
            helper = FakeDAT(unique + suffix, self, "textDAT")
            helper.dock = made
            if "callbacks" in made.par.names():
                made.par.callbacks = helper.name
        return made

    def appendCustomPage(self, name: str) -> FakePage:
        page = FakePage(self, name)
        self.customPages.append(page)
        return page

    @property
    def customPars(self) -> list[FakePar]:
        return [p for page in self.customPages for p in getattr(page, "pars", [])]

    def initializeExtensions(self, index: int | None = None) -> None:
        self.initialized += 1

    def save(self, filepath: str, createFolders: bool = False, password: str | None = None) -> str:
        """Record the path and write a small stand-in file, as TD writes the .tox."""
        path = Path(filepath)
        if createFolders:
            path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"fake tox of {self.path}: {sorted(self.children)}\n", encoding="utf-8")
        self.saved.append(str(filepath))
        return str(filepath)

    def tree(self) -> dict[str, Any]:
        """{name: (OPType, {child tree})} for comparing two builds."""
        return {name: (child.OPType, child.tree() if isinstance(child, FakeCOMP) else {})
                for name, child in sorted(self.children.items())}


def td_globals(root: FakeCOMP) -> dict[str, Any]:
    """What the build script looks up in TD's global namespace, for a fake network under ``root``
    (``'/'``): ``op(path)``, ``root``, ``ParMode``."""

    def op(path: str) -> Any:
        node: Any = root
        for part in [p for p in path.split("/") if p]:
            node = node.op(part) if node is not None else None
        return node

    return {"op": op, "root": root, "ParMode": FakeParMode}


class FakeComp(FakeCOMP):
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
