"""Byte sizes as people write them, parsed and printed without importing torch.

>>> parse_bytes("2GiB"), parse_bytes("512MB"), human(3 * 2**20)
(2147483648, 512000000, '3.0 MiB')
"""

from __future__ import annotations

import re

from interventions.core.errors import SpecError

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str | int, field: str = "memory") -> int:
    """``"512MB"``, ``"2GiB"``, ``"1.5g"`` or a plain number of bytes."""
    if isinstance(text, int) and not isinstance(text, bool) and text > 0:
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if m is None or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise SpecError(field, text, "a positive size such as 512MB, 2GiB or 1500000000 (units: "
                        "B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError
