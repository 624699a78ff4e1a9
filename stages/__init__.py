"""Stages: standalone programs run as ``python -m cuepipe.stages.<name>`` (see docs/stages.md).

``STAGES`` is the registry the orchestrator validates pipelines against. Importing a stage module
is cheap (heavy imports such as onnxruntime happen inside ``run``), so reading its ``PARAMS`` costs
nothing at start-up.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from types import ModuleType

from cuepipe.stages.errors import CuepipeError, ErrorKind

BUILTIN: Mapping[str, str] = {
    "preprocess": "cuepipe.stages.preprocess",
    "matting": "cuepipe.stages.matting",
    "generate": "cuepipe.stages.generate",
    "composite": "cuepipe.stages.composite",
}


class StageRegistryError(CuepipeError, ValueError):
    """``CUEPIPE_STAGES`` is malformed."""

    kind = ErrorKind.CONFIG_INVALID


def _extra(text: str) -> dict[str, str]:
    """``CUEPIPE_STAGES="name=package.module,other=pkg.mod"``: your own stages, no fork needed."""
    out = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, eq, module = item.partition("=")
        if not eq or not name.strip() or not module.strip():
            raise StageRegistryError(f"CUEPIPE_STAGES: expected name=module, got {item!r}")
        out[name.strip()] = module.strip()
    return out


#: Stage name -> module. Every module has NAME, PARAMS, run() and main().
STAGES: Mapping[str, str] = {**BUILTIN, **_extra(os.environ.get("CUEPIPE_STAGES", ""))}


def load(name: str) -> ModuleType:
    """Import a registered stage module; KeyError for an unknown stage name."""
    return importlib.import_module(STAGES[name])
