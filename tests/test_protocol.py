"""The OSC address space (docs/protocol.md) checked against fixed byte packets.

The packets below were written from the OSC 1.0 spec by hand (padding to 4 bytes, big-endian int32
and float32), not produced by our encoder, so encoder and decoder are both tested against bytes.
"""

from __future__ import annotations

import re
import struct

import pytest

from cuepipe.orchestrator.refusal import Refusal
from cuepipe.stages.codec import MessageError, decode, encode
from cuepipe.stages.errors import ErrorKind
from cuepipe.stages.protocol import (
    CMD_RUN,
    COMMANDS,
    JOB_EVENTS,
    JOB_FAILED,
    JOB_PROGRESS,
    JOB_WARNING,
    PREFIX,
    REPLIES,
    STAGE_DONE,
    STAGE_EVENTS,
    STAGE_LIVE,
    STAGE_PROGRESS,
    STAGE_WARNING,
    MessageSpec,
    WarningKind,
)
from tests.support.env import ROOT

STAGE_PROGRESS_PACKET = (
    b"/cuepipe/v1/stage/progress\x00\x00,sfiif\x00\x00preprocess\x00\x00"
    b"?\x00\x00\x00\x00\x00\x00\x18\x00\x00\x000Bu\x00\x00"
)
STAGE_DONE_PACKET = (
    b"/cuepipe/v1/stage/done\x00\x00,sifss\x00\x00matting\x00\x00\x00\x000@ \x00\x00"
    b"/w/alpha.mp4\x00\x00\x00\x00/w/comp.mp4\x00"
)
JOB_FAILED_PACKET = (
    b"/cuepipe/v1/job/failed\x00\x00,sisiss\x0020261122-031500-a1b2\x00\x00\x00\x00"
    b"\x00\x00\x00\x01matting\x00\xff\xff\xff\xf7crashed\x00killed by signal SIGKILL\x00\x00\x00\x00"
)
JOB_PROGRESS_PACKET = (
    b"/cuepipe/v1/job/progress\x00\x00\x00\x00,sisfiiff\x00\x00\x0020261122-031500-a1b2\x00\x00\x00\x00"
    b"\x00\x00\x00\x01matting\x00>\x80\x00\x00\x00\x00\x00\x0c\x00\x00\x000A\x18\x00\x00? \x00\x00"
)
STAGE_WARNING_PACKET = (
    b"/cuepipe/v1/stage/warning\x00\x00\x00,sss\x00\x00\x00\x00preprocess\x00\x00input_truncated\x00"
    b"decoded 11 of 50 frames\x00"
)
JOB_WARNING_PACKET = (
    b"/cuepipe/v1/job/warning\x00,sisss\x00\x0020261122-031500-a1b2\x00\x00\x00\x00\x00\x00\x00\x00"
    b"preprocess\x00\x00input_truncated\x00decoded 11 of 50 frames\x00"
)
STAGE_LIVE_PACKET = (
    b"/cuepipe/v1/stage/live\x00\x00,sififf\x00matting\x00\x00\x00\x01,"
    b"A\xf0\x00\x00\x00\x00\x00\x03B\x1c\x00\x00BH\x00\x00"
)
CMD_RUN_PACKET = (
    b"/cuepipe/v1/cmd/run\x00,sissis\x00btn1\x00\x00\x00\x00\x00\x00\x1bXmatte\x00\x00\x00"
    b"/takes/t1.mp4\x00\x00\x00\x00\x00\x00\nmatting.ratio=0.5\x00\x00\x00"
)

CASES: list[tuple[bytes, MessageSpec, dict[str, object]]] = [
    (STAGE_PROGRESS_PACKET, STAGE_PROGRESS,
     {"stage": "preprocess", "fraction": 0.5, "frame": 24, "total": 48, "fps": 61.25}),
    (STAGE_DONE_PACKET, STAGE_DONE,
     {"stage": "matting", "frames": 48, "seconds": 2.5, "outputs": ("/w/alpha.mp4", "/w/comp.mp4")}),
    (JOB_FAILED_PACKET, JOB_FAILED,
     {"job": "20261122-031500-a1b2", "index": 1, "stage": "matting", "exit_code": -9, "kind": "crashed",
      "message": "killed by signal SIGKILL"}),
    (JOB_PROGRESS_PACKET, JOB_PROGRESS,
     {"job": "20261122-031500-a1b2", "index": 1, "stage": "matting", "fraction": 0.25, "frame": 12,
      "total": 48, "fps": 9.5, "overall": 0.625}),
    (STAGE_WARNING_PACKET, STAGE_WARNING,
     {"stage": "preprocess", "kind": "input_truncated", "message": "decoded 11 of 50 frames"}),
    (JOB_WARNING_PACKET, JOB_WARNING,
     {"job": "20261122-031500-a1b2", "index": 0, "stage": "preprocess", "kind": "input_truncated",
      "message": "decoded 11 of 50 frames"}),
    (STAGE_LIVE_PACKET, STAGE_LIVE,
     {"stage": "matting", "frames": 300, "fps": 30.0, "dropped": 3, "latency_p50": 39.0, "latency_p95": 50.0}),
    (CMD_RUN_PACKET, CMD_RUN,
     {"tag": "btn1", "reply_port": 7000, "pipeline": "matte", "input": "/takes/t1.mp4", "priority": 10,
      "sets": ("matting.ratio=0.5",)}),
]
ALL = STAGE_EVENTS + JOB_EVENTS + COMMANDS + REPLIES


@pytest.mark.parametrize(("packet", "spec", "fields"), CASES, ids=[c[1].name for c in CASES])
def test_encode_matches_fixed_packet(packet: bytes, spec: MessageSpec, fields: dict[str, object]) -> None:
    assert encode(spec, **fields) == packet


@pytest.mark.parametrize(("packet", "spec", "fields"), CASES, ids=[c[1].name for c in CASES])
def test_decode_fixed_packet(packet: bytes, spec: MessageSpec, fields: dict[str, object]) -> None:
    [event] = decode(packet, ALL)
    assert event.spec is spec
    assert dict(event.fields) == fields


def test_decode_bundle() -> None:
    bundle = b"#bundle\x00" + b"\x00\x00\x00\x00\x00\x00\x00\x01"
    for packet in (STAGE_PROGRESS_PACKET, JOB_FAILED_PACKET):
        bundle += struct.pack(">i", len(packet)) + packet
    assert [e.spec for e in decode(bundle, ALL)] == [STAGE_PROGRESS, JOB_FAILED]


@pytest.mark.parametrize("packet", [
    b"", b"garbage", b"/cuepipe/v1/stage/progress\x00\x00",  # no type tags
    STAGE_PROGRESS_PACKET[:-4],  # truncated argument
    b"/\xff\xfe\x00,\x00\x00\x00",  # invalid UTF-8 address
    b"/cuepipe/v1/stage/nope\x00\x00,\x00\x00\x00",  # unknown address
    b"/cuepipe/v1/stage/failed\x00\x00\x00\x00,sss\x00\x00\x00\x00x\x00\x00\x00",  # too few arguments
    b"/cuepipe/v1/stage/failed\x00\x00\x00\x00,iss\x00\x00\x00\x00\x00\x01y\x00\x00\x00z\x00\x00\x00",  # wrong type
])
def test_malformed_packets_raise_event_error_only(packet: bytes) -> None:
    with pytest.raises(MessageError):
        decode(packet, ALL)


def test_encode_rejects_wrong_arguments() -> None:
    with pytest.raises(MessageError, match="missing argument 'fps'"):
        encode(STAGE_PROGRESS, stage="x", fraction=0.5, frame=1, total=2)
    with pytest.raises(MessageError, match="must be i"):
        encode(STAGE_PROGRESS, stage="x", fraction=0.5, frame="1", total=2, fps=1.0)
    with pytest.raises(MessageError, match="unknown argument"):
        encode(STAGE_PROGRESS, stage="x", fraction=0.5, frame=1, total=2, fps=1.0, extra=3)
    with pytest.raises(MessageError, match="int32"):
        encode(STAGE_PROGRESS, stage="x", fraction=0.5, frame=2**40, total=2, fps=1.0)


def test_docs_declare_exactly_the_code_address_space() -> None:
    """docs/protocol.md is the single written source: every spec is in it, with the same arguments."""
    text = (ROOT / "docs" / "protocol.md").read_text()
    rows = dict(re.findall(r"^\| `(/cuepipe/v1/[a-z_/]+)` \| `([^`]*)` \|", text, re.MULTILINE))
    for spec in ALL:
        assert spec.address in rows, f"{spec.address} is not documented"
        documented = [a.strip() for a in rows[spec.address].split(",")]
        expected = [f"{tag} {name}" for name, tag in spec.args] + ([f"s… {spec.tail}"] if spec.tail else [])
        assert documented == expected, spec.address
    assert set(rows) == {s.address for s in ALL}, "docs list an Event the code does not declare"
    for kind in ErrorKind:
        assert f"| `{kind.value}` |" in text, f"failure kind {kind.value} undocumented"
    for warning in WarningKind:
        assert f"| `{warning.value}` |" in text, f"warning kind {warning.value} undocumented"
    for reason in Refusal:
        assert f"| `{reason.value}` |" in text, f"refusal reason {reason.value} undocumented"


def test_one_address_space() -> None:
    """stages/protocol.py holds every address once, all under the version prefix."""
    addresses = [spec.address for spec in ALL]
    assert len(addresses) == len(set(addresses))
    assert all(a.startswith(PREFIX + "/") for a in addresses)
