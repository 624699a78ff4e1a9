"""The TouchDesigner side (stdlib only; imports without TD's ``op``/``me``/``mod``).

Inside TD this folder is loaded by ``boot.py`` under the name ``cuepipe_td`` (``td`` is TD's own
module there), so modules import each other relatively. ``docs/touchdesigner.md`` wires it up:
``extension.CuepipeExt`` for the COMP, ``callbacks`` for the operators' callbacks, ``start``
to start ``cuepipe run`` / talk to ``cuepipe serve``, ``jobs`` for the job table model.
"""
