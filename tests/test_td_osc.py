"""td/osc.py and td/protocol.py: the TD side's stdlib OSC codec against python-osc, on the one address space."""

from __future__ import annotations

import contextlib
import functools
import random
import struct
from pathlib import Path
from typing import Any

import pytest
from pythonosc.osc_bundle_builder import IMMEDIATELY, OscBundleBuilder
from pythonosc.osc_message_builder import OscMessageBuilder

import cuepipe.stages.protocol as shared
from cuepipe.stages import codec
from cuepipe.td import osc, protocol

PROGRESS = {"job": "20261122-031500-a1b2", "index": 1, "stage": "matting", "fraction": 0.25, "frame": 12,
            "total": 48, "fps": 9.5, "overall": 0.625}
RUN = {"tag": "btn1", "reply_port": 7000, "pipeline": "matte", "input": "C:/takes/t1.mp4", "priority": 10,
       "sets": ("matting.ratio=0.5",)}


def test_td_uses_the_one_declaration() -> None:
    """td/protocol.py declares no spec: it loads stages/protocol.py by path and re-exports its objects."""
    space = protocol._space
    assert Path(space.__file__).resolve() == Path(shared.__file__).resolve() == protocol.SOURCE
    assert "spec_of(" not in Path(protocol.__file__).read_text(encoding="utf-8")
    names = [n for n in vars(protocol) if n.isupper() and n != "SOURCE"]
    assert {"PREFIX", "JOB_EVENTS", "COMMANDS", "REPLIES", "CMD_RUN", "HEARTBEAT"} <= set(names)
    for name in names:
        if name == "INCOMING":
            continue
        assert getattr(protocol, name) is getattr(space, name), name  # the very objects, not copies
        mine, real = getattr(protocol, name), getattr(shared, name)  # and the orchestrator's values
        assert mine == real if isinstance(mine, str) else _values(mine) == _values(real), name
    assert set(protocol.INCOMING.values()) == set(space.JOB_EVENTS + space.REPLIES)


def _values(specs: Any) -> Any:
    """(address, args, tail) of a spec or of each spec in a table: equal across the two loads."""
    if isinstance(specs, tuple):
        return [_values(s) for s in specs]
    return (specs.address, specs.args, specs.tail)


@pytest.mark.parametrize(("mine", "real", "fields"), [
    (protocol.JOB_PROGRESS, shared.JOB_PROGRESS, PROGRESS),
    (protocol.CMD_RUN, shared.CMD_RUN, RUN),
    (protocol.JOB_DONE, shared.JOB_DONE, {"job": "j", "seconds": 1.5, "outputs": ("/a/ü.mov", "/b.mov")}),
    (protocol.CMD_PING, shared.CMD_PING, {"tag": "", "reply_port": 0}),
])
def test_encode_is_byte_identical_to_python_osc(mine: protocol.Spec, real: shared.MessageSpec,
                                                fields: dict[str, object]) -> None:
    data = protocol.encode(mine, **fields)
    assert data == codec.encode(real, **fields)
    assert codec.decode(data, [real])[0].fields == fields
    (message,) = osc.decode(data)
    assert protocol.parse(message.address, message.args, {mine.address: mine}) == (mine, fields)


def test_decodes_every_type_python_osc_builds() -> None:
    builder = OscMessageBuilder("/x")
    for value, tag in [(1.5, "d"), (2**40, "h"), (True, "T"), (False, "F"), (None, "N"), (b"\x01\x02\x03", "b"),
                       ("é", "s"), (-7, "i"), (0.5, "f")]:
        builder.add_arg(value, tag)
    message = osc.decode(builder.build().dgram)[0]
    assert message == osc.Message("/x", "dhTFNbsif", (1.5, 2**40, True, False, None, b"\x01\x02\x03", "é", -7, 0.5))
    assert osc.decode(osc.encode_message("/y", [1.5, 2**40, True, None, b"ab"], "dhTNb"))[0].args == (
        1.5, 2**40, True, None, b"ab")


def test_nested_bundles_flatten_in_order() -> None:
    inner = OscBundleBuilder(IMMEDIATELY)
    inner.add_content(OscMessageBuilder("/b").build())
    outer = OscBundleBuilder(IMMEDIATELY)
    outer.add_content(OscMessageBuilder("/a").build())
    outer.add_content(inner.build())
    outer.add_content(OscMessageBuilder("/c").build())
    assert [m.address for m in osc.decode(outer.build().dgram)] == ["/a", "/b", "/c"]
    mine = osc.encode_bundle([osc.encode_message("/a", [1]), osc.encode_bundle([osc.encode_message("/b", ["x"])])])
    assert [(m.address, m.args) for m in osc.decode(mine)] == [("/a", (1,)), ("/b", ("x",))]


VALID = codec.encode(shared.JOB_PROGRESS, **PROGRESS)
BAD_UTF8 = osc.encode_message("/cuepipe/v1/job/cancelled", ["j", 0, "s"])[:-4] + b"\xff\xfe\0\0"
MALFORMED = {
    "truncated float": VALID[:-4],
    "trailing bytes": VALID + b"\0\0\0\0",
    "not 4-aligned": VALID[:-1],
    "bad utf-8 argument": BAD_UTF8,
    "bad utf-8 address": b"/\xff\xfe\0,\0\0\0",
    "no address": b",i\0\0\0\0\0\1",
    "unknown type tag": b"/x\0\0,q\0\0\0\0\0\1",
    "unterminated": b"/abc",
    "tags without comma": b"/x\0\0i\0\0\0\0\0\0\1",
    "blob too long": b"/x\0\0,b\0\0\0\0\0\x10ab\0\0",
    "bundle element size": osc.BUNDLE_TAG + b"\0" * 8 + struct.pack(">i", 12) + b"/a\0\0,\0\0\0",
    "negative bundle size": osc.BUNDLE_TAG + b"\0" * 8 + struct.pack(">i", -4),
    "too deep": functools.reduce(lambda inner, _: osc.encode_bundle([inner]), range(12), osc.encode_message("/a")),
    "no type tags": b"/abc\0\0\0\0",
    "empty": b"",
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_raises_only_osc_error(data: bytes) -> None:
    with pytest.raises(osc.OSCError):
        osc.decode(data)


def test_every_truncation_is_rejected() -> None:
    for end in range(len(VALID)):
        with pytest.raises(osc.OSCError):
            osc.decode(VALID[:end])


def test_fuzz_never_raises_anything_else() -> None:
    rng = random.Random(5)
    for _ in range(5000):
        data = bytearray(VALID if rng.random() < 0.7 else rng.randbytes(rng.randrange(0, 64)))
        for _ in range(rng.randrange(1, 4)):
            if data:
                data[rng.randrange(len(data))] = rng.randrange(256)
        with contextlib.suppress(osc.OSCError):  # anything else fails the test
            osc.decode(bytes(data))


def test_parse_rejects_what_the_spec_does_not_allow() -> None:
    good = list(protocol.parse(protocol.JOB_PROGRESS.address, list(PROGRESS.values()))[1].values())
    assert good == list(PROGRESS.values())
    bad: list[tuple[object, object]] = [
        ("/cuepipe/v1/job/nope", []), (None, []), (protocol.JOB_PROGRESS.address, None),
        (protocol.JOB_PROGRESS.address, list(PROGRESS.values())[:-1]),
        (protocol.JOB_PROGRESS.address, [*PROGRESS.values(), "extra"]),
        (protocol.JOB_PROGRESS.address, ["j", "1", "s", 0.1, 1, 2, 3.0, 0.5]),
        (protocol.JOB_PROGRESS.address, ["j", True, "s", 0.1, 1, 2, 3.0, 0.5]),
        (protocol.JOB_DONE.address, ["j", 1.0, 3]),
    ]
    for address, args in bad:
        with pytest.raises(protocol.ProtocolError):
            protocol.parse(address, args)  # type: ignore[arg-type]
    # TD may hand integral numbers over as floats; non-finite floats become 0.0 as on the sending side
    assert protocol.parse(protocol.JOB_CANCELLED.address, ["j", 2.0, "s"])[1]["index"] == 2
    assert protocol.parse(protocol.REPLY_PONG.address, ["t", float("nan")])[1]["uptime"] == 0.0


def test_encode_errors() -> None:
    for address, args, tags in [("x", [], None), ("/x", [2**31], "i"), ("/x", ["a\0b"], "s"), ("/x", [1], "s"),
                                ("/x", [object()], None), ("/x", [1, 2], "i")]:
        with pytest.raises(osc.OSCError):
            osc.encode_message(address, args, tags)
    with pytest.raises(protocol.ProtocolError):
        protocol.encode(protocol.CMD_CANCEL, tag="t", reply_port=1)
    with pytest.raises(protocol.ProtocolError):
        protocol.encode(protocol.CMD_PING, tag="t", reply_port=1, extra=1)
