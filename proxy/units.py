"""Durations and sizes as ops write them in TOML ("250ms", "2s", "10MB")."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BeforeValidator, WithJsonSchema

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB)?\s*$", re.IGNORECASE)
# KB/MB/GB are binary multiples, as nginx's "1m" and Envoy's byte limits are.
_SIZE_UNITS = {None: 1, "b": 1, "kb": 1024, "mb": 1024**2, "gb": 1024**3,
               "kib": 1024, "mib": 1024**2, "gib": 1024**3}


def parse_duration(value: object) -> float:
    """Seconds from "250ms", "2s", "1m", "1h", "1d" or a non-negative number."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as \"250ms\", \"2s\", \"1m\"")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    raise ValueError(f"invalid duration {value!r}: use e.g. \"250ms\", \"2s\", \"1m\", \"1h\" or seconds")


def parse_size(value: object) -> int:
    """Bytes from "512KB", "10MB", "1GB" or a non-negative integer."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as \"512KB\" or \"10MB\"")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            unit = m.group(2).lower() if m.group(2) else None
            return int(float(m.group(1)) * _SIZE_UNITS[unit])
    raise ValueError(f"invalid size {value!r}: use e.g. \"512KB\", \"10MB\" or a number of bytes")


# The JSON Schema says what TOML may hold ("2s" or seconds), not the parsed float.
Duration = Annotated[float, BeforeValidator(parse_duration), WithJsonSchema({
    "anyOf": [{"type": "number", "minimum": 0},
              {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*(ms|s|m|h|d)?\s*$"}],
    "description": 'a duration: "250ms", "2s", "1m", "1h", "1d" or seconds'})]
Size = Annotated[int, BeforeValidator(parse_size), WithJsonSchema({
    "anyOf": [{"type": "integer", "minimum": 0},
              {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*([KkMmGg][Ii]?[Bb]|[Bb])?\s*$"}],
    "description": 'a size: "512KB", "10MB", "1GB" (binary multiples) or bytes'})]
