"""A fresh install works beside whatever else it brings: no module of ours shadows an installed
package from any folder that lands on sys.path, transformers' Llama and our Triton kernels both
import from each of them, the environment is consistent (pip check) and is the committed lock."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch

from helpers import ROOT

# Folders that become sys.path[0]: the root (python -m ..., pytest), and each script folder
# (python bench/x.py puts bench/ first; tools/ and bench/ scripts also insert the root).
SCRIPT_FOLDERS = ("", "bench", "tools", "examples", "tests")
LOCK = ROOT / "requirements-cpu.lock"


def _top_level_modules(folder: Path) -> set[str]:
    names = set()
    for p in folder.iterdir():
        if p.suffix == ".py":
            names.add(p.stem)
        elif (p / "__init__.py").is_file():  # a regular package; a folder without one never shadows
            names.add(p.name)
    return names


def _lock() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name] = version
    return pins


def test_no_module_of_ours_shadows_an_installed_package_or_the_standard_library():
    owners = importlib.metadata.packages_distributions()
    assert "transformers" in owners  # the mapping is real, not empty
    hits = []
    for folder in SCRIPT_FOLDERS:
        for name in sorted(_top_level_modules(ROOT / folder)):
            others = set(owners.get(name, [])) - {"megatron-seed"}
            if others or name in sys.stdlib_module_names:
                hits.append(f"{folder or '.'}/{name} shadows {sorted(others) or 'the standard library'}")
    assert not hits, hits


def test_transformers_llama_and_our_kernels_import_from_every_script_folder():
    # Hugging Face's kernels is what transformers imports; the check means something only beside it.
    assert importlib.metadata.version("kernels"), "Hugging Face's kernels package is not installed"
    probe = (
        "import json, sys, os\n"
        "folder = os.getcwd()\n"
        f"sys.path[:0] = [{str(ROOT)!r}, folder]  # as bench/ and tools/ scripts arrange it\n"
        "from transformers.models.llama.modeling_llama import LlamaForCausalLM\n"
        "import kernels, megatron_seed_kernels\n"
        "print(json.dumps({'hf_kernels': kernels.__file__, 'ours': megatron_seed_kernels.__file__,\n"
        "                  'rms_norm': megatron_seed_kernels.rms_norm.__module__}))\n")
    for folder in SCRIPT_FOLDERS:
        proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT / folder, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, f"from {folder or '.'}/: {proc.stderr[-3000:]}"
        found = json.loads(proc.stdout.strip().splitlines()[-1])
        assert not Path(found["hf_kernels"]).is_relative_to(ROOT), f"from {folder or '.'}/: {found}"
        assert found["ours"] == str(ROOT / "kernels" / "megatron_seed_kernels" / "__init__.py"), found
        assert found["rms_norm"] == "megatron_seed_kernels.rms_norm_triton"


def test_pip_check_is_clean_for_our_packages():
    proc = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=300)
    ours = set(_lock()) | {"megatron-seed"}
    # Lines about packages of this environment that have nothing to do with ours (a system Python's
    # own tools) are not this project's to fix; any line naming one of ours fails.
    bad = [line for line in proc.stdout.splitlines()
           if {w.lower().replace("_", "-") for w in line.replace(",", " ").split()} & ours]
    assert not bad, proc.stdout


def test_the_environment_is_the_lock_and_the_lock_is_complete():
    tools_lock = importlib.util.spec_from_file_location("write_lock", ROOT / "tools" / "write_lock.py")
    write_lock = importlib.util.module_from_spec(tools_lock)
    tools_lock.loader.exec_module(write_lock)
    pins = _lock()
    needed = write_lock.closure("megatron-seed", ["test", "mpi", "data"])
    assert "torch" in needed and "transformers" in needed and "kernels" in needed
    missing = sorted(set(needed) - set(pins))
    assert not missing, f"needed but not in {LOCK.name} (run tools/refresh_lock.sh): {missing}"
    if torch.version.cuda is None:  # the lock is the CPU install's; a CUDA machine keeps its own torch
        differ = {name: (pins[name], version) for name, version in needed.items() if pins[name] != version}
        assert not differ, f"installed versions differ from {LOCK.name} (locked, installed): {differ}"
