"""Run the real entry points in subprocesses (1 process, 2-process torchrun, 2-rank mpirun).

Every run goes through ``run_process_group``: on a timeout (or Ctrl-C of pytest) the whole process
group ends, torchrun workers and multiprocessing helpers included, not just the direct child.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env() -> dict:
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), PYTHONPATH=str(ROOT))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(var, None)
    return env


def run_cli(cmd: list, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
    timeout=timeout)`` that ends the command's whole process group on timeout and failure."""
    from megatron_seed.platform.processes import run_process_group

    kwargs = {"cwd": ROOT, "env": subprocess_env(), "capture_output": True, "text": True, **kwargs}
    return run_process_group(cmd, timeout=timeout, **kwargs)


def pretrain_cmd(run_dir: Path, *overrides: str, nproc: int = 1, launcher: Optional[str] = None,
                 module: str = "megatron_seed.pretrain") -> list:
    """A training command line (``module``: the entry point); launcher None: a plain process for
    1 rank, torchrun for more."""
    args = [f"train.run_dir={run_dir}", "train.tensorboard=false", *overrides]
    launcher = launcher or ("python" if nproc == 1 else "torchrun")
    if launcher == "python":
        return [sys.executable, "-m", module, *args]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                f"--master_port={free_port()}", "-m", module, *args]
    return ["mpirun", "-np", str(nproc), "--oversubscribe", "--allow-run-as-root",
            sys.executable, "-m", module, *args]


def run_pretrain(run_dir: Path, *overrides: str, nproc: int = 1, launcher: str = "torchrun",
                 check: bool = True, timeout: int = 300, module: str = "megatron_seed.pretrain"
                 ) -> subprocess.CompletedProcess:
    cmd = pretrain_cmd(run_dir, *overrides, nproc=nproc, launcher=launcher if nproc > 1 else None, module=module)
    proc = run_cli(cmd, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records}


def assert_losses_close(got: dict, want: dict, atol: float = 1e-5) -> None:
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    for step in want:
        assert abs(got[step] - want[step]) <= atol, f"step {step}: {got[step]} vs {want[step]}"
