"""TouchDesigner callback adapters: TD's exact signatures, each one line into a testable function.

This one file serves every operator: it is the Callbacks DAT of the OSC In DAT / UDP In DAT (a
Text DAT whose ``File`` is this file), and the Execute-type DATs either hold it too or forward to
it with a one-line shim (docs/touchdesigner.md). TD calls only the functions its operator type
knows. The file is standalone — stdlib only, no package imports — because TD loads it as a DAT
module, not as part of a package.

How an adapter reaches the model, without a module-level global bound to an operator: it starts
from an *anchor* operator — the DAT it is given, the parameter's COMP, or ``me`` (the DAT running
the code, which TD provides at call time; a shim passes its own ``me`` explicitly) — and walks up
``parent()`` to the first COMP whose extension ``Cuepipe`` exists (``comp.ext.Cuepipe``). Tests
pass TD-shaped fakes as anchors. Nothing ever raises into TD: a missing extension is logged once,
an exception is logged with its traceback, and the adapter returns None.
"""

from __future__ import annotations

import builtins
import logging
from typing import Any

log = logging.getLogger("cuepipe.td")

EXTENSION = "Cuepipe"  # the COMP's Extension Name
_MAX_DEPTH = 64
_warned: set[str] = set()


def find_model(anchor: Any) -> Any:
    """The ``Cuepipe`` extension of ``anchor`` or of its nearest ancestor; None if there is none."""
    node, depth = anchor, 0
    while node is not None and depth < _MAX_DEPTH:
        try:
            model = getattr(getattr(node, "ext", None), EXTENSION, None)
            if model is not None:
                return model
            parent = getattr(node, "parent", None)
            node = parent() if callable(parent) else None
        except Exception:  # TD raises its own errors for odd operators; treat as "not found"
            return None
        depth += 1
    return None


def call(anchor: Any, method: str, *args: Any) -> Any:
    """``find_model(anchor).<method>(*args)``; logs and returns None instead of raising."""
    try:
        model = find_model(anchor)
        if model is None:
            key = f"{method}:{getattr(anchor, 'path', type(anchor).__name__)}"
            if key not in _warned:
                _warned.add(key)
                log.warning("cuepipe: no COMP with extension %r above %s", EXTENSION, key)
            return None
        return getattr(model, method)(*args)
    except Exception:  # never raise into TouchDesigner's callback
        log.exception("cuepipe: %s failed", method)
        return None


def _me(default: Any = None) -> Any:
    """The callbacks DAT TD is running this file in (``me``), looked up at call time only."""
    found = globals().get("me", getattr(builtins, "me", None))
    return default if found is None else found


def chop_edge(anchor: Any, channel: Any, val: Any, prev: Any) -> Any:
    """A channel crossing 0.5 upwards triggers: ``Trigger(channel name)`` on the model."""
    try:
        rising = float(prev) < 0.5 <= float(val)
        name = str(getattr(channel, "name", ""))
    except (TypeError, ValueError):
        return None
    return call(anchor, "Trigger", name) if rising else None


def table_change(anchor: Any, dat: Any) -> Any:
    """A watched table changed: start a job for each row not submitted before."""
    return call(anchor, "SubmitTable", dat)


def frame_start(anchor: Any) -> Any:
    """Once per frame: exit codes, heartbeat timeout, table redraw (``Update``)."""
    return call(anchor, "Update")


def _channel_anchor(channel: Any) -> Any:
    return _me(getattr(channel, "owner", None))


# --- OSC In DAT -----------------------------------------------------------------------------------
def onReceiveOSC(dat: Any, rowIndex: Any, message: Any, bytes: Any, timeStamp: Any, address: Any, args: Any,
                 peer: Any) -> Any:
    return call(dat, "ReceiveOSC", address, args, peer)


# --- UDP In DAT (Row/Callback Format: One Per Message; ``message`` drops non-ASCII, so read ``bytes``)
def onReceive(dat: Any, rowIndex: Any, message: Any, bytes: Any, peer: Any) -> Any:
    return call(dat, "ReceiveBytes", bytes, peer)


# --- CHOP Execute (enable Off to On, or Value Change — not both) -------------------------------------
def onOffToOn(channel: Any, sampleIndex: Any, val: Any, prev: Any) -> Any:
    return chop_edge(_channel_anchor(channel), channel, 1.0, 0.0)


def onValueChange(channel: Any, sampleIndex: Any = None, val: Any = None, prev: Any = None) -> Any:
    """CHOP Execute's ``(channel, sampleIndex, val, prev)``. A Parameter Execute DAT pointed at this file
    with Value Change on calls it as ``(par, prev)``: a parameter edit starts nothing, so that is ignored
    instead of raising in TD's error log (turn Value Change off: only pulses act)."""
    if val is None and prev is None:  # (par, prev): a Parameter Execute DAT's value change
        return None
    return chop_edge(_channel_anchor(channel), channel, val, prev)


# --- DAT Execute (Table Change on; its DATs: a table of inputs, or a Folder DAT) -----------------------
def onTableChange(dat: Any) -> Any:
    return table_change(_me(dat), dat)


# --- Parameter Execute (Pulse on; Parameters: Start Cancel Refresh Clear) -----------------------------
def onPulse(par: Any) -> Any:
    return call(getattr(par, "owner", None), "OnPulse", par)


# --- Execute DAT (Frame Start on): polls exit codes, heartbeats, redraws the table --------------------
def onFrameStart(frame: Any) -> Any:
    return frame_start(_me())
