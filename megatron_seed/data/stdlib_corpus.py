"""This machine's Python standard library as a code corpus (present on every machine).

Used by the demo, the benchmarks and the tests: real code, ~1,800 files / ~31 MB, no download.
"""

from __future__ import annotations

import json
import os
import sys
import sysconfig
from pathlib import Path


def stdlib_files(limit: int = 0, include_tests: bool = False) -> list[Path]:
    """The standard library's own ``.py`` files (no site-packages), sorted; the first ``limit``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts
                   and (include_tests or "test" not in p.parts))
    return files[:limit] if limit else files


def write_jsonl(path: str, limit: int = 0, include_tests: bool = False) -> tuple[int, int]:
    """One ``{"text", "path"}`` record per readable UTF-8 file; returns (files, records written).
    Unreadable or non-UTF-8 files are reported on stderr and left out."""
    files = stdlib_files(limit, include_tests)
    root = sysconfig.get_paths()["stdlib"]
    written = 0
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as out:
        for p in files:
            try:
                text = p.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError) as e:
                print(f"[corpus] skip {p}: {e}", file=sys.stderr)
                continue
            out.write(json.dumps({"text": text, "path": os.path.relpath(p, root)}) + "\n")
            written += 1
    return len(files), written
