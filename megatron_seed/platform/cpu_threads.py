"""On CPU, let only the main thread fan out over the intra-op threads; background threads run single.

Why: PyTorch's CPU wheels use GNU OpenMP. Every thread that runs a parallel op (a large copy, a
matmul) gets its own OpenMP team, which lives as long as that thread. gloo's worker threads are
such threads: an ``all_gather`` of a large tensor (``all_gather_object`` of a checkpoint's load
plan, an RL step's rollouts) copies it in a gloo thread, with a team of ``torch.get_num_threads()``.
From then on the process manages more OpenMP threads than it has CPUs, and libgomp throttles its
spin-waiting (100 spins instead of ~300,000, not configurable upward): every parallel region's
barrier puts the idle threads to sleep and wakes them with a futex. A bandwidth-bound loop of small
ops pays for that on every op: SmolLM2-135M decoding 8 rows went from 3.4 s to 5.7 s per 128
tokens after one such ``all_gather`` (2-core Xeon, bf16), and 45,000 context switches per call.

The fix keeps background threads from making teams: PyTorch gives every thread, on its first
parallel op, the process-wide intra-op thread count (``torch.set_num_threads``). That count is set
to 1 and the main thread alone keeps N: its OpenMP ICV (``omp_set_num_threads``, which is per
thread) and MKL's count (``mkl_set_num_threads_local``, per thread too). The main thread's own
lazy initialization is forced first, so it does not take the 1 later.

Applied once by the training entry points on CPU (``train.cpu_threads_main_only``); a no-op on
other parallel backends, without libgomp, with one thread, or off the main thread. A later
``torch.set_num_threads`` call by the user sets every thread's count again, as usual.
"""

from __future__ import annotations

import ctypes
import os
import threading
from typing import Optional

import torch


def _loaded_library(fragment: str) -> Optional[str]:
    """The path of a shared library this process has mapped whose file name contains ``fragment``."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rstrip("\n").split(maxsplit=5)[-1]
                if path.startswith("/") and fragment in os.path.basename(path):
                    return path
    except OSError:
        return None
    return None


def _main_thread_setters(n: int):
    """Per-thread setters for OpenMP and MKL on this build, or a reason why not."""
    if "OpenMP" not in torch.__config__.parallel_info().split("ATen parallel backend:")[-1]:
        return None, "ATen's parallel backend is not OpenMP"
    torch_cpu = _loaded_library("libtorch_cpu")
    if torch_cpu is None:
        return None, "libtorch_cpu is not mapped in this process"
    # Looked up through libtorch_cpu's handle, dlsym finds the OpenMP runtime ATen is bound to,
    # even when another copy of libgomp (a system one, loaded by another package) is mapped too.
    lib = ctypes.CDLL(torch_cpu)
    if not hasattr(lib, "omp_set_num_threads"):
        return None, "omp_set_num_threads is not reachable from libtorch_cpu"
    setters = [lambda: lib.omp_set_num_threads(ctypes.c_int(n))]
    if torch.backends.mkl.is_available():
        if not hasattr(lib, "mkl_set_num_threads_local"):
            return None, "MKL is linked but mkl_set_num_threads_local is not exported"
        # MKL's exported entry point takes its argument by reference (Fortran convention).
        setters.append(lambda: lib.mkl_set_num_threads_local(ctypes.byref(ctypes.c_int(n))))
    return setters, ""


def keep_intra_op_threads_on_main() -> str:
    """Apply the policy (see the module docstring). Returns what was done, for the run's log."""
    if threading.current_thread() is not threading.main_thread():
        return "not applied: not called from the main thread"
    n = torch.get_num_threads()
    if n <= 1:
        return "not needed: 1 intra-op thread"
    setters, why = _main_thread_setters(n)
    if setters is None:
        return f"not applied: {why}"
    torch.ones(1 << 16).add_(1)  # the main thread's lazy intra-op initialization happens now, with n
    torch.set_num_threads(1)  # what every other thread takes on its first parallel op
    for set_for_this_thread in setters:
        set_for_this_thread()
    if torch.get_num_threads() != n:  # the per-thread setter did not reach ATen: undo
        torch.set_num_threads(n)
        return "not applied: the per-thread OpenMP setting did not take"
    return f"main thread {n} intra-op threads, other threads 1"
