"""A small OSC 1.0 codec (stdlib only) for TouchDesigner's UDP In DAT path and for sending Commands.

TouchDesigner's OSC In DAT decodes OSC itself; a UDP In DAT hands over raw ``bytes``, and TD's
Python must not depend on python-osc, so this module encodes and decodes OSC here. Decoding is
strict: every argument must fill the message exactly (a truncated trailing float is an error, not
0.0), strings must be UTF-8, and anything malformed raises ``OSCError`` — never another exception.

Encodes ``s i f`` (plus ``d h T F N b`` when asked); decodes ``s S i f d h t b c T F N I`` and
bundles (nested), which are flattened into their messages in order.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import CuepipeError, ErrorKind

BUNDLE_TAG = b"#bundle\0"
_INT32 = (-(2**31), 2**31 - 1)
_MAX_DEPTH = 8  # nested bundles deeper than this are refused (a hostile packet must not recurse far)


class OSCError(CuepipeError, ValueError):
    """A datagram is not valid OSC 1.0, or a value cannot be encoded with its type tag."""

    kind = ErrorKind.BAD_ARGUMENT


@dataclass(frozen=True)
class Message:
    """One decoded OSC message: its address, type tags (without the comma) and arguments."""

    address: str
    tags: str
    args: tuple[Any, ...]


# ---------------------------------------------------------------------------------------- encoding


def _pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


def _string(text: str) -> bytes:
    raw = text.encode("utf-8")
    if b"\0" in raw:
        raise OSCError(f"OSC strings cannot contain NUL: {text!r}")
    return _pad(raw + b"\0")


def infer_tag(value: Any) -> str:
    """The type tag a Python value is sent with: str s, int i, float f, bool T/F, None N, bytes b."""
    if isinstance(value, bool):
        return "T" if value else "F"
    if isinstance(value, int):
        return "i"
    if isinstance(value, float):
        return "f"
    if isinstance(value, str):
        return "s"
    if isinstance(value, bytes | bytearray):
        return "b"
    if value is None:
        return "N"
    raise OSCError(f"cannot send {type(value).__name__} {value!r} over OSC")


def _argument(tag: str, value: Any) -> bytes:
    if tag in "TFN":
        return b""
    if tag == "s":
        if not isinstance(value, str):
            raise OSCError(f"tag s needs a str, got {value!r}")
        return _string(value)
    if tag == "i":
        if isinstance(value, bool) or not isinstance(value, int) or not _INT32[0] <= value <= _INT32[1]:
            raise OSCError(f"tag i needs an int32, got {value!r}")
        return struct.pack(">i", value)
    if tag == "h":
        if isinstance(value, bool) or not isinstance(value, int):
            raise OSCError(f"tag h needs an int, got {value!r}")
        return struct.pack(">q", value)
    if tag in "fd":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise OSCError(f"tag {tag} needs a number, got {value!r}")
        return struct.pack(">f" if tag == "f" else ">d", float(value))
    if tag == "b":
        if not isinstance(value, bytes | bytearray):
            raise OSCError(f"tag b needs bytes, got {value!r}")
        return struct.pack(">i", len(value)) + _pad(bytes(value))
    raise OSCError(f"cannot encode type tag {tag!r}")


def encode_message(address: str, args: Sequence[Any] = (), tags: str | None = None) -> bytes:
    """One OSC message. ``tags`` (e.g. ``"sis"``) fixes the types; None infers them from the values."""
    if not address.startswith("/"):
        raise OSCError(f"an OSC address starts with '/': {address!r}")
    tags = "".join(infer_tag(v) for v in args) if tags is None else tags
    if len(tags) != len(args):
        raise OSCError(f"{len(tags)} type tags for {len(args)} arguments")
    body = b"".join(_argument(tag, value) for tag, value in zip(tags, args, strict=True))
    return _string(address) + _string("," + tags) + body


def encode_bundle(elements: Iterable[bytes], timetag: int = 1) -> bytes:
    """A bundle of already-encoded messages or bundles (timetag 1 means "immediately")."""
    parts = [BUNDLE_TAG, struct.pack(">Q", timetag)]
    for element in elements:
        if len(element) % 4:
            raise OSCError("bundle elements must be multiples of 4 bytes")
        parts += [struct.pack(">i", len(element)), element]
    return b"".join(parts)


# ---------------------------------------------------------------------------------------- decoding


class _Reader:
    """Reads OSC's 4-byte-aligned fields from a buffer, raising OSCError when it runs out."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, size: int) -> bytes:
        end = self.pos + size
        if size < 0 or end > len(self.data):
            raise OSCError(f"truncated: needed {size} bytes at offset {self.pos} of {len(self.data)}")
        chunk, self.pos = self.data[self.pos : end], end
        return chunk

    def string(self) -> str:
        end = self.data.find(b"\0", self.pos)
        if end < 0:
            raise OSCError(f"unterminated string at offset {self.pos}")
        raw = self.data[self.pos : end]
        self.take(end - self.pos + 4 - (end - self.pos) % 4)  # the string, its NUL and the padding
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise OSCError(f"string at offset {end - len(raw)} is not UTF-8: {exc.reason}") from None


def _decode_argument(reader: _Reader, tag: str) -> Any:
    if tag == "i":
        return struct.unpack(">i", reader.take(4))[0]
    if tag == "f":
        return struct.unpack(">f", reader.take(4))[0]
    if tag in "sS":
        return reader.string()
    if tag == "d":
        return struct.unpack(">d", reader.take(8))[0]
    if tag in "ht":
        return struct.unpack(">q" if tag == "h" else ">Q", reader.take(8))[0]
    if tag == "b":
        size = struct.unpack(">i", reader.take(4))[0]
        blob = reader.take(size)
        reader.take(-size % 4)
        return blob
    if tag == "c":
        return chr(struct.unpack(">I", reader.take(4))[0] & 0x10FFFF)
    constants = {"T": True, "F": False, "N": None, "I": float("inf")}
    if tag in constants:
        return constants[tag]
    raise OSCError(f"unsupported type tag {tag!r}")


def decode_message(data: bytes) -> Message:
    """Decode one OSC message (not a bundle); its arguments must fill it exactly."""
    reader = _Reader(data)
    address = reader.string()
    if not address.startswith("/"):
        raise OSCError(f"not an OSC address: {address[:40]!r}")
    tags = reader.string()  # required: a message without type tags is treated as malformed
    if not tags.startswith(","):
        raise OSCError(f"type tag string must start with ',': {tags[:40]!r}")
    args = tuple(_decode_argument(reader, tag) for tag in tags[1:])
    if reader.pos != len(data):
        raise OSCError(f"{len(data) - reader.pos} unexpected bytes after the arguments of {address}")
    return Message(address, tags[1:], args)


def decode(data: bytes, _depth: int = 0) -> list[Message]:
    """Every message in a datagram: one message, or a (nested) bundle's messages in order."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise OSCError(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) % 4:
        raise OSCError(f"OSC packets are multiples of 4 bytes, got {len(data)}")
    if not data.startswith(BUNDLE_TAG):
        return [decode_message(data)]
    if _depth >= _MAX_DEPTH:
        raise OSCError("bundles nested too deeply")
    reader = _Reader(data)
    reader.take(len(BUNDLE_TAG) + 8)  # the "#bundle" tag and the timetag, which TD-side code ignores
    messages: list[Message] = []
    while reader.pos < len(data):
        size = struct.unpack(">i", reader.take(4))[0]
        if size <= 0 or size % 4:
            raise OSCError(f"bad bundle element size {size}")
        messages += decode(reader.take(size), _depth + 1)
    return messages
