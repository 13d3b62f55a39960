"""Keep freed memory in the process on CPU instead of handing it back to the kernel.

glibc serves every allocation above 32 MB with its own ``mmap`` and unmaps it on free. A training
step allocates and frees the same large tensors every time (logits, their gradient, embedding and
output-layer gradients, activations), so each step pays the kernel to zero-fill and fault in
those pages again: ~50 ms per 262 MB tensor on the reference 2-core machine, ~0.5 s of a 2.7 s step
of the 100M preset. Serving large blocks from the heap and never trimming it lets the next step
reuse the same pages (measured: same peak RSS, 2.7 s -> 2.1 s per step; ``bench/step_time.py``).

This is what ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...`` would do from the environment, done
with ``mallopt`` so a plain ``python -m megatron_seed.pretrain`` gets it. It changes allocator
policy for the whole process, so it is applied once, by the training entry points, only when no
CUDA device is used (CUDA tensors have PyTorch's own caching allocator). Other C libraries (musl)
and other systems are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1


def keep_freed_memory() -> bool:
    """Tell glibc malloc to reuse freed large blocks. Returns True if the policy was applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # glibc only: other libcs have other knobs
    except (OSError, AttributeError):
        return False
    # Large blocks from the heap instead of mmap; threads' arenas still fall back to mmap for
    # blocks larger than an arena heap, so no allocation can fail because of this.
    ok = libc.mallopt(_M_MMAP_MAX, 0) == 1
    # Freed memory at the top of the heap is kept (trimmed only above 2 GiB of free top).
    return libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX) == 1 and ok
