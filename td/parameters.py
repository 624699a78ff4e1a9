"""The ``cuepipe`` COMP's custom parameters, and the small value types the extension exposes.

``PARAMETERS`` is the single list of what the extension reads (``ownerComp.par.<Name>``);
``setup_parameters`` creates them on a COMP once, and docs/touchdesigner.md lists the same table
for people who prefer the Component Editor. Data only — nothing here refers to an operator.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

#: (name, style, label, default, menu): style picks ``Page.append<style>``.
#: One declared parameter: name, style (Pulse, Str, Menu...), label, default, menu (name, label) pairs.
Declared = tuple[str, str, str, Any, tuple[tuple[str, str], ...]]

PARAMETERS: tuple[Declared, ...] = (
    ("Mode", "Menu", "Mode", "run", (("run", "cuepipe run per job"), ("daemon", "cuepipe serve"))),
    ("Repo", "Folder", "cuepipe folder", "", ()),
    ("Python", "File", "Python (venv)", "", ()),
    ("Pipelinesfile", "File", "Pipelines file", "", ()),
    ("Pipeline", "StrMenu", "Pipeline", "", ()),
    ("Input", "File", "Input", "", ()),
    ("Sets", "Str", "Overrides", "", ()),
    ("Outdir", "Folder", "Output folder", "", ()),
    ("Oscinport", "Int", "OSC In port", 7000, ()),
    ("Daemonhost", "Str", "Daemon host", "127.0.0.1", ()),
    ("Daemonport", "Int", "Daemon port", 9000, ()),
    ("Priority", "Int", "Priority (daemon)", 10, ()),
    ("Heartbeats", "Int", "Offline after heartbeats", 3, ()),
    ("Nextpipeline", "StrMenu", "Then run", "", ()),
    ("Movieout", "TOP", "Load output into", "", ()),
    ("Jobtable", "DAT", "Job table", "", ()),
    ("Callbacks", "DAT", "Callbacks DAT", "", ()),
    ("Start", "Pulse", "Start", None, ()),
    ("Cancel", "Pulse", "Cancel", None, ()),
    ("Refresh", "Pulse", "Refresh pipelines", None, ()),
    ("Clear", "Pulse", "Clear finished", None, ()),
)


def setup_parameters(comp: Any, page_name: str = "Cuepipe", parameters: Sequence[Declared] = PARAMETERS) -> list[str]:
    """Create the custom page with ``parameters`` (default ``PARAMETERS``) on ``comp``; existing parameters
    are left alone. Returns the names it created."""
    pages = [p for p in comp.customPages if p.name == page_name]
    page = pages[0] if pages else comp.appendCustomPage(page_name)
    created = []
    for name, style, label, default, menu in parameters:
        if getattr(comp.par, name, None) is not None:
            continue
        par = getattr(page, f"append{style}")(name, label=label)[0]
        if menu:
            par.menuNames, par.menuLabels = [m[0] for m in menu], [m[1] for m in menu]
        if default is not None:
            par.default = par.val = default
        created.append(name)
    return created


class Value:
    """A bindable value (``.val``); pass ``dependency=tdu.Dependency`` to get TD's own kind."""

    def __init__(self, val: Any) -> None:
        self.val = val

    def __repr__(self) -> str:
        return f"Value({self.val!r})"


def assign(value: Any, new: Any) -> None:
    """Set ``value.val`` only when it changes, so bound TD expressions cook only when needed."""
    if value.val != new:
        value.val = new


def split_sets(text: str) -> list[str]:
    """``"a.x=1; b.y=2"`` (``;``, newline or space separated) -> ``["a.x=1", "b.y=2"]``."""
    return [item for item in text.replace(";", " ").split() if item]
