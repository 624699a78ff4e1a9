"""The TouchDesigner side (stdlib only; imports without TD's ``op``/``me``/``mod``)."""
