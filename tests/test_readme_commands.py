"""Every command README.md shows for this project runs as written, up to its config validation.

Extracted from the README (fenced blocks, with their continuation lines, and inline code): each
``python -m megatron_seed.*``, ``python tools/*.py``, ``torchrun ... -m megatron_seed.*`` and
``mpirun ... python -m megatron_seed.*``. Each is run with ``--check-config`` (megatron_seed.platform.cli),
which validates the arguments and, for training, the whole run config, then exits without work.

What is changed, and only this: optional ``[--flag ...]`` brackets are opened (the flags are kept),
placeholders get values (``data.blend=[...]``, ``CKPT``, ``S``, ``CMD``, ``$(nproc)``), the sandbox
token file is a fixture, and so are the .bin/.idx files a config's blends name (empty files: the check
looks for them, it does not read them). Commands run in a scratch folder holding links to examples/
and tools/, as they would in a checkout. torchrun / mpirun commands run as their rank 0 with the environment
the launcher would give it (RANK, WORLD_SIZE, ...), so the world size is validated; the launcher is
not started. The test prints each command it ran and fails if the README's list changes size
unnoticed."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import yaml

from helpers import ROOT, subprocess_env

README = ROOT / "README.md"
OURS = re.compile(r"(?:torchrun\b[^`]*?-m megatron_seed\.|mpirun\b[^`]*?python -m megatron_seed\.|"
                  r"python -m megatron_seed\.|python tools/)")
# How many commands of ours the README shows today; a change is fine, but must be seen here.
EXPECTED_COUNT = 29


def readme_commands() -> list[str]:
    text = README.read_text(encoding="utf-8")
    found = []
    for block in re.findall(r"```[^\n]*\n(.*?)```", text, re.S):
        lines = block.split("\n")
        i = 0
        while i < len(lines):
            line = lines[i]
            while line.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line.rstrip()[:-1] + " " + lines[i].strip()
            found += _ours(line)
            i += 1
    inline = re.sub(r"```.*?```", "", text, flags=re.S)
    for code in re.findall(r"`([^`\n]*(?:\n[^`\n]*)?)`", inline):
        if code.lstrip().startswith(("python ", "torchrun ", "mpirun ")):
            found += _ours(" ".join(code.split()))
    return found


def _ours(line: str) -> list[str]:
    line = re.sub(r"\s+#\s.*$", "", line)  # a trailing comment
    return [part.strip() for part in line.split("&&") if OURS.match(part.strip())]


def _argv(command: str, fixtures: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """The command as argv with --check-config after the program, and the launcher's environment."""
    text = re.sub(r"\[(--[^\]]*)\]", r"\1", command)  # optional flags: keep them
    text = text.replace("data.blend=[...]", "data.blend=[data/fixture_text_document]")
    text = text.replace("$(nproc)", str(os.cpu_count() or 2))
    for name, value in fixtures.items():
        text = text.replace(name, value)
    words = shlex.split(text)
    env = {}
    if words[0] == "torchrun":
        nproc = next(int(w.split("=", 1)[1]) for w in words if w.startswith("--nproc_per_node="))
        env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc)}
        words = ["python"] + words[words.index("-m"):]
    elif words[0] == "mpirun":
        nproc = int(words[words.index("-np") + 1])
        env = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_SIZE": str(nproc)}
        words = words[words.index("python"):]
    assert words[0] == "python", command
    program = 3 if words[1] == "-m" else 2
    return [sys.executable] + words[1:program] + ["--check-config"] + words[program:], env


def _blend_prefixes(node) -> list[str]:
    """Every data.blend prefix a config file names (top level, data:, or a stage's overrides)."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("data.blend", "blend") and isinstance(value, list):
                found += [str(p) for p in value if not isinstance(p, (int, float))]
            else:
                found += _blend_prefixes(value)
    elif isinstance(node, list):
        for item in node:
            found += _blend_prefixes(item)
    return found


def _checkout_like_folder(path, commands: list[str]):
    """A scratch working directory: links to examples/ and tools/, and empty .bin/.idx files for the
    blends the commands and their config files name."""
    path.mkdir()
    for name in ("examples", "tools"):
        (path / name).symlink_to(ROOT / name)
    prefixes = ["data/fixture_text_document"]
    for command in commands:
        for config in re.findall(r"--config (\S+)", command):
            prefixes += _blend_prefixes(yaml.safe_load((ROOT / config).read_text()))
    for prefix in prefixes:
        for suffix in (".bin", ".idx"):
            (path / (prefix + suffix)).parent.mkdir(parents=True, exist_ok=True)
            (path / (prefix + suffix)).touch()
    return path


def test_every_readme_command_passes_its_config_check(tmp_path, capsys):
    commands = readme_commands()
    cwd = _checkout_like_folder(tmp_path / "work", commands)
    token = tmp_path / "sandbox.token"
    token.write_text("t" * 32)
    fixtures = {"/etc/sandbox.token": str(token), "CKPT": str(tmp_path / "ckpt"),
                "-- CMD": "-- true", "--timeout S": "--timeout 5"}
    failures, ran = [], []
    for command in commands:
        argv, launcher_env = _argv(command, fixtures)
        env = subprocess_env()
        env.update(launcher_env)
        proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        ran.append(f"{proc.returncode}  {command}")
        if proc.returncode != 0 or "config ok" not in proc.stdout:
            failures.append(f"{command}\n  ran: {shlex.join(argv)}\n  exit {proc.returncode}: "
                            f"{(proc.stderr or proc.stdout)[-1500:]}")
    with capsys.disabled():
        print(f"\n[readme] {len(ran)} README commands run with --check-config:\n  " + "\n  ".join(ran))
    assert not failures, "\n".join(failures)
    assert len(commands) == EXPECTED_COUNT, (
        f"README shows {len(commands)} commands of ours, the test expects {EXPECTED_COUNT}: update it")


def test_a_wrong_readme_style_command_fails_its_check(tmp_path):
    # The check can fail: the bug the README once had (optimizer.min_lr above a fine-tune's lr).
    argv, _ = _argv("python -m megatron_seed.sft --preset tiny optimizer.lr=2e-5 optimizer.min_lr=3e-5", {})
    proc = subprocess.run(argv, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "optimizer.min_lr must be in [0, optimizer.lr]" in proc.stderr
    assert "config ok" not in proc.stdout
