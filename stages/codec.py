"""The codec: OSC Messages to datagrams and back, with python-osc.

A ``Message`` is one OSC message decoded against its ``MessageSpec`` (``cuepipe.stages.protocol``):
an Event going out (towards TouchDesigner) or a Command coming in (to the daemon); the codec does not
care which. ``encode`` checks every argument against its spec before anything is sent; ``decode``
turns a datagram (a message or a bundle) into ``Message``s of the specs it is given and raises
``MessageError`` for anything else, never another exception. Stages, the launcher and the daemon all use it; the
addresses are declared in ``stages/protocol.py``, the UDP sender is ``stages/sender.py``, and
TouchDesigner's stdlib codec (``td/osc.py``) is tested byte-identical to this one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pythonosc.osc_message_builder import OscMessageBuilder
from pythonosc.osc_packet import OscPacket, ParseError

from cuepipe.stages.errors import CuepipeError, ErrorKind
from cuepipe.stages.protocol import MessageSpec

#: OSC type tag -> Python type accepted for it.
_TAG_TYPES: dict[str, tuple[type, ...]] = {"i": (int,), "f": (float, int), "s": (str,)}
_INT32 = (-(2**31), 2**31 - 1)


class MessageError(CuepipeError, ValueError):
    """An Event could not be encoded or decoded (wrong address, arity or argument type).

    When decoding got as far as a message, ``address`` and ``params`` hold what could be read, so a
    receiver can still say which request it refuses (e.g. echo a Command's tag).
    """

    kind = ErrorKind.BAD_ARGUMENT

    def __init__(self, message: str, address: str = "", params: Sequence[Any] = ()) -> None:
        super().__init__(message)
        self.address = address
        self.params = tuple(params)


class MalformedPacket(MessageError):
    """The datagram is not a well-formed OSC packet."""


class UnknownAddress(MessageError):
    """A well-formed OSC message at an address none of the given specs has."""


@dataclass(frozen=True)
class Message:
    """One decoded OSC message, an Event or a Command: its spec and its arguments by name (the tail, if
    any, as a tuple)."""

    spec: MessageSpec
    fields: Mapping[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: ``{"event": "job/progress", ...fields}``."""
        out: dict[str, Any] = {"event": self.spec.name}
        for k, v in self.fields.items():
            out[k] = list(v) if isinstance(v, tuple) else v
        return out


def _typed(spec: MessageSpec, name: str, tag: str, value: Any) -> Any:
    """``value`` checked against its OSC type tag (bools are not ints here); floats as float."""
    if isinstance(value, bool) or not isinstance(value, _TAG_TYPES[tag]):
        raise MessageError(f"{spec.name}: argument {name!r} must be {tag}, got {value!r}")
    out: Any = value
    return float(out) if tag == "f" else out


def encode(spec: MessageSpec, **fields: Any) -> bytes:
    """Encode one Event as an OSC datagram, checking every argument against the spec."""
    builder = OscMessageBuilder(address=spec.address)
    for name, tag in spec.args:
        if name not in fields:
            raise MessageError(f"{spec.name}: missing argument {name!r}")
        value = _typed(spec, name, tag, fields[name])
        if tag == "f" and not math.isfinite(value):
            value = 0.0
        elif tag == "i" and not _INT32[0] <= value <= _INT32[1]:
            raise MessageError(f"{spec.name}: argument {name!r} out of int32 range: {value}")
        builder.add_arg(value, tag)
    extra = set(fields) - {n for n, _ in spec.args} - ({spec.tail} if spec.tail else set())
    if extra:
        raise MessageError(f"{spec.name}: unknown argument(s) {sorted(extra)}")
    if spec.tail:
        for item in fields.get(spec.tail, ()):
            builder.add_arg(str(item), "s")
    return bytes(builder.build().dgram)


def _padded_string_end(data: bytes, start: int) -> int:
    end = data.index(b"\0", start)  # ValueError when unterminated
    return end + 4 - (end % 4)


def _check_size(dgram: bytes) -> None:
    """Reject a message whose arguments do not fill it exactly.

    python-osc decodes a truncated trailing float as 0.0 (a PureData leniency); for cuepipe that
    would be silent corruption, so the size the type tags imply must equal the datagram's size.
    """
    pos = _padded_string_end(dgram, 0)
    tags_end = _padded_string_end(dgram, pos)
    tags = dgram[pos:tags_end].rstrip(b"\0").decode("ascii")[1:]
    pos = tags_end
    for tag in tags:
        if tag in "ifrcm":
            pos += 4
        elif tag in "dht":
            pos += 8
        elif tag in "sS":
            pos = _padded_string_end(dgram, pos)
        elif tag == "b":
            size = int.from_bytes(dgram[pos : pos + 4], "big")
            pos += 4 + size + (-size % 4)
        elif tag not in "TFNI[]":
            raise ValueError(f"unknown type tag {tag!r}")
    if pos != len(dgram):
        raise ValueError(f"arguments fill {pos} bytes of a {len(dgram)}-byte message")


def decode(data: bytes, specs: Sequence[MessageSpec]) -> list[Message]:
    """Decode a datagram (a message or a bundle) into Events of the given specs.

    Raises MessageError for anything malformed or unknown; never another exception type.
    """
    by_address = {s.address: s for s in specs}
    try:
        messages = [timed.message for timed in OscPacket(data).messages]
        for msg in messages:
            _check_size(msg.dgram)
    except (ParseError, UnicodeDecodeError, IndexError, ValueError) as exc:
        raise MalformedPacket(f"malformed OSC packet ({len(data)} bytes): {exc}") from None
    events = []
    for msg in messages:
        spec = by_address.get(msg.address)
        params = list(msg.params)
        if spec is None:
            raise UnknownAddress(f"unknown address {msg.address!r}", msg.address, params)
        try:
            events.append(Message(spec, _fields(spec, params)))
        except MessageError as exc:
            raise MessageError(str(exc), msg.address, params) from None
    return events


def _fields(spec: MessageSpec, params: list[Any]) -> dict[str, Any]:
    if len(params) < len(spec.args) or (len(params) > len(spec.args) and not spec.tail):
        raise MessageError(f"{spec.name}: expected {len(spec.args)} arguments, got {len(params)}")
    fields: dict[str, Any] = {}
    for (name, tag), value in zip(spec.args, params, strict=False):
        fields[name] = _typed(spec, name, tag, value)
    if spec.tail:
        tail = params[len(spec.args) :]
        if not all(isinstance(v, str) for v in tail):
            raise MessageError(f"{spec.name}: {spec.tail} must be strings")
        fields[spec.tail] = tuple(tail)
    return fields


def info_json(**info: Any) -> str:
    """The ``info`` argument of ``started``: a compact JSON object (TD: ``json.loads(args[..])``)."""
    return json.dumps(info, separators=(",", ":"), default=str)
