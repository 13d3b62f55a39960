"""How each language is built and run inside the sandbox (compilers run inside it too)."""

from __future__ import annotations

import os
import shutil
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
