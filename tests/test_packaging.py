"""The wheel holds every module of the source tree and declares the console script: an installed
(non-editable) megatron-seed must run exactly what the repository runs."""

from __future__ import annotations

import configparser
import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from helpers import ROOT

# Source folders, and the import names the wheel installs from them (kernels/ holds megatron_seed_kernels).
PACKAGES = ("megatron_seed", "kernels", "datatrove_pipelines")
IMPORT_NAMES = {"megatron_seed", "megatron_seed_kernels", "datatrove_pipelines"}
# Files code opens by path (e.g. the sandbox launcher) must be in the wheel too; no other non-.py
# file is read at run time today. A new data file used by the code belongs in this list.
DATA_FILES = ("megatron_seed/sandbox/launcher.py", "megatron_seed/sandbox/zygote.py",
              "megatron_seed/evaluate/assets/starter_problems.jsonl", "datatrove_pipelines/rules/gitleaks.toml")


def _build_wheel(tmp_path: Path) -> Path:
    # Built from a copy: an in-tree build writes build/ and *.egg-info into a checkout that other
    # processes are using at the same time.
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in PACKAGES:
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    shutil.copy(ROOT / "setup.py", src / "setup.py")
    shutil.copy(ROOT / "pyproject.toml", src / "pyproject.toml")
    out = tmp_path / "dist"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "--no-index", "-q", "-w", str(out), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    (wheel,) = out.glob("megatron_seed-*.whl")
    return wheel


def test_wheel_holds_every_module_and_the_entry_point(tmp_path):
    wheel = _build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        entry_text = zf.read(entry_points).decode()
    # kernels/megatron_seed_kernels/x.py installs as megatron_seed_kernels/x.py
    sources = {p.relative_to(ROOT).as_posix().removeprefix("kernels/") for name in PACKAGES
               for p in (ROOT / name).rglob("*.py") if "__pycache__" not in p.parts}
    assert "megatron_seed/models/gpt.py" in sources  # the tree walk itself found the modules
    missing = sorted(sources - names)
    assert not missing, f"not in the wheel (a directory without __init__.py?): {missing}"
    assert not sorted(set(DATA_FILES) - names)
    top_level = {n.split("/")[0].removesuffix(".py") for n in names if ".dist-info/" not in n}
    assert top_level == IMPORT_NAMES, top_level
    # No import name of the wheel belongs to another installed distribution: "kernels" (Hugging Face's,
    # which transformers imports) once did, and broke every transformers import from the repository.
    owners = importlib.metadata.packages_distributions()
    clashes = {name: owners[name] for name in top_level if set(owners.get(name, [])) - {"megatron-seed"}}
    assert not clashes, f"the wheel's import names are other distributions' too: {clashes}"
    parser = configparser.ConfigParser()
    parser.read_string(entry_text)
    assert parser["console_scripts"]["megatron-seed-pretrain"] == "megatron_seed.pretrain:main"

    # Installed from the wheel alone (no repository on the path), the console script starts and
    # the training modules import from the installed copy.
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                    str(target), str(wheel)], check=True, capture_output=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    script = subprocess.run([str(target / "bin" / "megatron-seed-pretrain"), "--help"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert script.returncode == 0 and "--preset" in script.stdout, script.stderr[-2000:]
    probe = subprocess.run([sys.executable, "-c", "import megatron_seed.training.build as b; print(b.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr[-4000:]
    assert Path(probe.stdout.strip()).is_relative_to(target)
