"""How each language is built and run inside the sandbox (compilers run inside it too)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from functools import lru_cache
from dataclasses import dataclass
from typing import Callable, Optional


@dataclass(frozen=True)
class Language:
    name: str
    filename: str
    tools: tuple[str, ...]          # executables that must be on PATH (or absolute)
    command: Callable[[str], list]  # python executable -> argv (run in the working directory)
    needs_unlimited_address_space: bool = False  # JVM/Go runtimes reserve far more than they use

    def available(self) -> bool:
        return not self.missing()

    def missing(self) -> str:
        absent = [t for t in self.tools if _which(t) is None]
        return f"not found: {', '.join(absent)}" if absent else ""

    def argv(self, python: str) -> list:
        return self.command(python)

    def memory(self, limit: int) -> int:
        return 0 if self.needs_unlimited_address_space else limit


@lru_cache(maxsize=None)  # asked on every run; the toolchains on PATH do not change under a job
def _which(tool: str) -> Optional[str]:
    return tool if os.path.isabs(tool) and os.access(tool, os.X_OK) else shutil.which(tool)


def _sh(script: str) -> list:
    return ["/bin/sh", "-c", script]


LANGUAGES = {
    # -I: no user site, no PYTHON* variables, script directory not trusted beyond the file itself.
    "python": Language("python", "main.py", (), lambda py: [py, "-I", "main.py"]),
    "c": Language("c", "main.c", ("gcc",), lambda py: _sh("gcc -O1 -o main main.c -lm && ./main")),
    "cpp": Language("cpp", "main.cpp", ("g++",), lambda py: _sh("g++ -O1 -o main main.cpp && ./main")),
    "java": Language("java", "Main.java", ("javac", "java"),
                     lambda py: _sh("javac -J-Xmx256m Main.java && java -Xmx256m -Xss8m Main"),
                     needs_unlimited_address_space=True),
    "javascript": Language("javascript", "main.js", ("node",), lambda py: [_which("node") or "node", "main.js"],
                           needs_unlimited_address_space=True),
    "go": Language("go", "main.go", ("go",), lambda py: _sh("go run main.go"), needs_unlimited_address_space=True),
    "rust": Language("rust", "main.rs", ("rustc",),
                     lambda py: _sh(f"{_which('rustc') or 'rustc'} -O -o main main.rs && ./main")),
    "bash": Language("bash", "main.sh", ("bash",), lambda py: ["/bin/bash", "main.sh"]),
}


def toolchain_dirs() -> list[str]:
    """Installation directories of the available toolchains (e.g. ~/.cargo, ~/.rustup), which
    the sandbox binds back read-only when they sit under a hidden directory such as /root."""
    dirs = set()
    for lang in LANGUAGES.values():
        for tool in lang.tools:
            path = _which(tool)
            if path:
                real = os.path.realpath(path)
                dirs.add(os.path.dirname(os.path.dirname(real)))
    home = os.path.expanduser("~")
    for extra in (".rustup", ".cargo"):
        if os.path.isdir(os.path.join(home, extra)) and _which("rustc"):
            dirs.add(os.path.join(home, extra))
    return sorted(dirs)


# What the sandboxed interpreter (started as the sandbox starts it: -I, scrubbed environment)
# reports about itself: prefixes, executable and import path.
_PROBE = ("import json, sys; print(json.dumps([sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,"
          " sys.executable, *sys.path]))")


@lru_cache(maxsize=None)  # one probe per interpreter and process (~0.1 s)
def interpreter_dirs(python: str) -> tuple[str, ...]:
    """Directories the Python interpreter ``python`` needs inside the sandbox: its prefixes (a
    venv's own and the base installation's), the directory of its executable and of the real
    executable behind symlinks, and every directory on its import path (standard library,
    site-packages, what .pth files add). The sandbox binds back read-only those that sit under a
    hidden directory, e.g. a venv under /tmp or /home, or pyenv under /root.

    The import path is asked of the interpreter itself, started with ``-I`` as runs are, rather
    than read from this process's ``sys.path``: entries only this process has (PYTHONPATH, the
    script directory, ``sys.path`` edits such as a project checkout) cannot be imported by a run
    anyway, and binding them would expose them to it."""
    dirs = [os.path.dirname(python), os.path.dirname(os.path.realpath(python))]
    if os.path.realpath(python) == os.path.realpath(sys.executable):
        dirs += [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]
    try:
        out = subprocess.run([python, "-I", "-c", _PROBE], capture_output=True, text=True, timeout=60, check=True,
                             cwd="/", env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}).stdout
        reported = json.loads(out)
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        # Not fatal here (other languages do not need Python); a Python run will then report
        # sandbox_error itself if the interpreter really cannot start.
        sys.stderr.write(f"[sandbox] could not ask {python} for its import path ({e}); binding its prefixes only\n")
        reported = []
    prefixes, executable, path = reported[:4], reported[4:5], reported[5:]
    dirs += prefixes + [os.path.dirname(p) for p in executable] + path
    return tuple(sorted({d for d in dirs if d and os.path.isabs(d) and os.path.isdir(d)}))
