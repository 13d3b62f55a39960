"""Write the CPU lock: every distribution megatron-seed[EXTRAS] needs, transitively, at the exact
version installed in this environment, plus the build backend (setuptools).

    python tools/write_lock.py --extras test,mpi,data --output requirements-cpu.lock

The closure is walked from megatron-seed's own requirements (markers evaluated here), not taken from
``pip freeze``, so unrelated packages of the environment never enter the lock. install.sh runs this
under LOCK=latest; tools/refresh_lock.sh does that in a fresh venv and runs the test suite.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata as md
import platform
import sys

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# Needed to build the editable install without a download (install.sh: --no-build-isolation).
BUILD = ("setuptools",)


def closure(root: str, extras: list[str]) -> dict[str, str]:
    """{canonical name: installed version} of ``root`` with ``extras``, transitively."""
    pinned: dict[str, str] = {}
    todo = [(root, tuple(extras))]
    seen = set()
    while todo:
        name, with_extras = todo.pop()
        key = (canonicalize_name(name), with_extras)
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            raise SystemExit(f"write_lock: {name} is required but not installed: install first")
        if canonicalize_name(name) != canonicalize_name(root):
            pinned[canonicalize_name(dist.metadata["Name"])] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            envs = [{"extra": e} for e in with_extras] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(env) for env in envs):
                todo.append((req.name, tuple(sorted(req.extras))))
    return pinned


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--extras", default="test,mpi,data")
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    pins = closure("megatron-seed", [e for e in args.extras.split(",") if e])
    for name in BUILD:
        pins[canonicalize_name(name)] = md.version(name)
    header = [
        "# The locked CPU install of megatron-seed[" + args.extras + "]: every package, transitive ones",
        "# included, at the version CI passed with. Written by tools/write_lock.py (LOCK=latest bash",
        "# install.sh); refresh with tools/refresh_lock.sh. Do not edit by hand.",
        f"# Python {platform.python_version()} on {platform.machine()}, {datetime.date.today().isoformat()}",
    ]
    with open(args.output, "w", encoding="utf-8") as f:
        f.write("\n".join(header) + "\n")
        for name in sorted(pins):
            f.write(f"{name}=={pins[name]}\n")
    print(f"[lock] {len(pins)} packages -> {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
