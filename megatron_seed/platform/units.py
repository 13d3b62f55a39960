"""Byte sizes written by people: one rule for every flag and config key that takes one.

``4194304`` (bytes), ``4k``/``4M``/``80G``/``1T`` and ``4KiB``/``4MiB``/``80GiB``/``1TiB`` are powers
of 1024; ``4KB``/``4MB``/``80GB``/``1TB`` are powers of 1000 (what a disk or a GPU's spec sheet says).
Case does not matter; a fraction is allowed (``1.5GiB``).
"""

from __future__ import annotations

import re

_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """Bytes of a size like ``80GiB``, ``80GB``, ``4M`` or ``4194304``; ValueError otherwise."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (e.g. 4MiB, 80GB or 4194304)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])
