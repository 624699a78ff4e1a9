"""Pipelines files for tests, built from Python instead of retyped TOML.

    PIPELINES = pipelines_toml({"stall_timeout": 0}, one=[step()], fail=[step("fail")],
                               live={"keep_running": True, "stages": [step("exit3")]})

``step(mode, **params)`` is one step of the misbehaving test stage (``tests/support/misbehaving.py``);
step-table keys (``warm``, ``retries``, ``timeout``, ``stall_timeout``, ``keep``) go beside its params.
A pipeline is a list of steps, or a table with its own keys and ``stages``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

_STEP_KEYS = frozenset({"warm", "retries", "timeout", "stall_timeout", "keep"})


def step(mode: str | None = None, *, stage: str = "misbehaving", **keys: Any) -> dict[str, Any]:
    """One step: ``stage`` with ``mode`` and the other params; step-table keys stay at the top."""
    params = {k: v for k, v in keys.items() if k not in _STEP_KEYS}
    if mode is not None:
        params = {"mode": mode, **params}
    out: dict[str, Any] = {"stage": stage, **{k: v for k, v in keys.items() if k in _STEP_KEYS}}
    if params:
        out["params"] = params
    return out


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, Mapping):
        return "{ " + ", ".join(f"{k} = {_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, Sequence):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(f"no TOML for {v!r}")


def pipelines_toml(defaults: Mapping[str, Any] | None = None,
                   **pipelines: Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> str:
    """A whole pipelines file (``version = 1``, ``[defaults]``, one ``[pipelines.NAME]`` each)."""
    lines = ["version = 1"]
    if defaults:
        lines += ["[defaults]", *(f"{k} = {_value(v)}" for k, v in defaults.items())]
    for name, spec in pipelines.items():
        table: Mapping[str, Any] = spec if isinstance(spec, Mapping) else {"stages": spec}
        lines.append(f"[pipelines.{name}]")
        lines += [f"{k} = {_value(v)}" for k, v in table.items() if k != "stages"]
        for s in table["stages"]:
            lines.append(f"[[pipelines.{name}.stages]]")
            lines += [f"{k} = {_value(v)}" for k, v in s.items()]
    return "\n".join(lines) + "\n"
