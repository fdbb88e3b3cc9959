"""Byte sizes as people write them, parsed and printed without importing torch.

>>> parse_bytes("2GiB"), parse_bytes("512MB"), human(3 * 2**20)
(2147483648, 512000000, '3.0 MiB')
"""

from __future__ import annotations

import re

from interventions.core.errors import SpecError

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


#: The largest size a budget may name (1 PiB): beyond any machine, yet far from float overflow.
MAX_BYTES = 2**50


def parse_bytes(text: str | int, field: str = "memory") -> int:
    """``"512MB"``, ``"2GiB"``, ``"1.5g"`` or a plain number of bytes."""
    allowed = ("a positive size of at most 1 PiB such as 512MB, 2GiB or 1500000000 (units: B, KB, MB, GB, TB, "
               "KiB, MiB, GiB, TiB)")
    if isinstance(text, int) and not isinstance(text, bool):
        size = text
    else:
        m = re.fullmatch(r"\s*(\d{1,20}(?:\.\d{1,20})?)\s*([a-zA-Z]*)\s*", str(text))
        if m is None or m.group(2).lower() not in _UNITS:
            raise SpecError(field, text, allowed)
        size = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if not 0 < size <= MAX_BYTES:
        raise SpecError(field, text, allowed)
    return size


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError
