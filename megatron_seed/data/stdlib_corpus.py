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


def site_packages_files(limit: int = 0) -> list[Path]:
    """``.py`` files of the installed third-party packages (purelib), sorted; every k-th one so
    that a limited sample spans many packages."""
    root = Path(sysconfig.get_paths()["purelib"])
    files = sorted(p for p in root.rglob("*.py") if "test" not in p.parts and "tests" not in p.parts)
    if limit and len(files) > limit:
        files = files[::len(files) // limit][:limit]
    return files


def write_jsonl(path: str, limit: int = 0, include_tests: bool = False, site_packages: int = 0) -> tuple[int, int]:
    """One ``{"text", "path", "repo"}`` record per readable UTF-8 file (``repo``: the top-level
    package); the first ``limit`` standard-library files plus ``site_packages`` files of
    installed packages. Returns (files, records written). Unreadable or non-UTF-8 files are
    reported on stderr and left out."""
    files = stdlib_files(limit, include_tests) + (site_packages_files(site_packages) if site_packages else [])
    roots = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["stdlib"]]
    written = 0
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as out:
        for p in files:
            try:
                text = p.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError) as e:
                print(f"[corpus] skip {p}: {e}", file=sys.stderr)
                continue
            root = next(r for r in roots if str(p).startswith(r))
            rel = os.path.relpath(p, root)
            repo = ("stdlib/" if root == roots[1] else "") + (rel.split(os.sep)[0] if os.sep in rel else "_top")
            out.write(json.dumps({"text": text, "path": rel, "repo": repo}) + "\n")
            written += 1
    return len(files), written
