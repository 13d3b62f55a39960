"""Triton kernels (kernels/) vs torch eager, torch.compile and Liger-Kernel; memory of the fused
linear cross-entropy at Seed-Coder-8B's shapes.

    python bench/kernel_bench.py                       # memory figures on any machine; speed on a GPU
    python bench/kernel_bench.py --tokens 8192 --hidden 4096 --vocab 155136 --ffn 14336

Memory (any machine): the lm-head + loss, forward and backward, of one micro-batch, measured with
torch's ``MemTracker`` under ``FakeTensorMode`` (every allocation is accounted, nothing is
computed), so Seed-Coder-8B's shapes need no GPU and no 20 GB of RAM. Three ways to the loss:
plain torch (bf16 logits, float32 ``F.cross_entropy``), megatron-core-style (bf16 logits and a
chunked vocab-parallel cross entropy: megatron_seed.models.cross_entropy, the CPU path) and the
fused kernel (``megatron_seed_kernels.linear_cross_entropy``). Fake tensors have no values, so for the fused one
the two Triton launches (which only write into buffers already allocated) are skipped and
backward takes the branch the mean loss takes. A real run at a small token count checks that the
fake accounting equals the real one.

Speed (GPU only): forward + backward of each kernel against torch eager, ``torch.compile`` of the
same reference, and Liger-Kernel when it imports, with ``triton.testing.do_bench`` and
``torch.cuda.max_memory_allocated``; ratios are against torch eager measured in the same run.
Without a GPU the script says so: timings of Triton's interpreter are not performance numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if not torch.cuda.is_available():
    # Without a GPU the fused kernel's memory is checked on CPU tensors, through the interpreter
    # (kernels/ is imported later, inside the functions).
    os.environ.setdefault("TRITON_INTERPRET", "1")

GIB = 2 ** 30


def describe_machine() -> str:
    if torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name()} (torch {torch.__version__})"
    from megatron_seed.platform.precision import cpu_description

    return f"{cpu_description()}, {os.cpu_count()} cores, no GPU (torch {torch.__version__})"


def commit() -> str:
    with contextlib.suppress(Exception):
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip()
    return "unknown"


# ----------------------------------------------------------------------------------------- memory
def _plain_torch_loss(h, w, labels):
    return F.cross_entropy((h @ w.t()).float(), labels)


def _megatron_style_loss(h, w, labels):
    from megatron_seed.models.cross_entropy import vocab_parallel_cross_entropy

    return vocab_parallel_cross_entropy(h @ w.t(), labels).mean()


def _fused_loss(h, w, labels):
    import megatron_seed_kernels as kernels

    return kernels.linear_cross_entropy(h, w, labels)


@contextlib.contextmanager
def _fused_kernel_without_launches():
    """Under fake tensors: the Triton launches are skipped (they allocate nothing), and backward
    takes the uniform-gradient branch (the one the mean loss takes)."""
    import megatron_seed_kernels.fused_linear_cross_entropy as flce

    class _NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    saved = flce._row_stats, flce._logits_to_grad, flce._uniform_counted_gradient
    flce._row_stats = flce._logits_to_grad = _NoLaunch()
    flce._uniform_counted_gradient = lambda g, counted: g.new_ones(())
    try:
        yield
    finally:
        flce._row_stats, flce._logits_to_grad, flce._uniform_counted_gradient = saved


def peak_bytes(loss_fn, tokens: int, hidden: int, vocab: int, fake: bool) -> int:
    """Peak bytes allocated by forward + backward of ``loss_fn`` beyond its inputs (gradients included)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    mode = FakeTensorMode() if fake else contextlib.nullcontext()
    with mode:
        g = None if fake else torch.Generator().manual_seed(0)
        h = (torch.randn(tokens, hidden, generator=g) if g else torch.randn(tokens, hidden)).bfloat16().requires_grad_()
        w = ((torch.randn(vocab, hidden, generator=g) if g else torch.randn(vocab, hidden)) * 0.02).bfloat16()
        w.requires_grad_()
        labels = torch.randint(0, vocab, (tokens,), generator=g) if g else torch.randint(0, vocab, (tokens,))
    tracker = MemTracker()
    # Registered up front: views of the inputs (W.t()) would otherwise be counted as new memory.
    tracker.track_external(h, w, labels)
    inputs = sum(t.numel() * t.element_size() for t in (h, w, labels))
    patch = _fused_kernel_without_launches() if fake and loss_fn is _fused_loss else contextlib.nullcontext()
    with mode, patch, tracker:
        loss_fn(h, w, labels).backward()
    return int(tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]) - inputs


def memory_report(tokens: int, hidden: int, vocab: int, real_check: bool = True) -> None:
    print(f"\n== lm-head + cross-entropy memory: {tokens} tokens x hidden {hidden} -> vocab {vocab}, bf16 ==")
    print("peak bytes allocated by forward + backward beyond h and W (W's gradient included); "
          "MemTracker under FakeTensorMode")
    paths = [("plain torch (bf16 logits, fp32 F.cross_entropy)", _plain_torch_loss),
             ("megatron-style (bf16 logits, chunked vocab-parallel CE)", _megatron_style_loss),
             ("fused (megatron_seed_kernels.linear_cross_entropy)", _fused_loss)]
    peaks = {name: peak_bytes(fn, tokens, hidden, vocab, fake=True) for name, fn in paths}
    fused = peaks[paths[-1][0]]
    for name, peak in peaks.items():
        print(f"  {name:58s} {peak / GIB:8.2f} GiB   {peak / fused:5.2f}x the fused")
    logits = tokens * vocab
    print(f"  (for scale: the bf16 logits alone are {2 * logits / GIB:.2f} GiB, in float32 {4 * logits / GIB:.2f} GiB; "
          f"W's float32 gradient accumulator {4 * vocab * hidden / GIB:.2f} GiB)")

    if torch.cuda.is_available() or not real_check:
        return
    small = 256
    print(f"check of the accounting: a real CPU run at {small} tokens against the fake one")
    for name, fn in paths[::2]:
        real, fake = (peak_bytes(fn, small, hidden, vocab, fake=f) for f in (False, True))
        print(f"  {name:58s} real {real / GIB:.3f} GiB, fake {fake / GIB:.3f} GiB")


# ------------------------------------------------------------------------------------------ speed
def _liger():
    try:
        import liger_kernel.transformers.functional as liger
    except Exception as e:  # noqa: BLE001 - optional comparison
        return None, f"liger-kernel not usable: {type(e).__name__}"
    return liger, ""


def speed_cases(tokens: int, hidden: int, vocab: int, ffn: int, heads: int, kv_heads: int, head_dim: int):
    import megatron_seed_kernels as kernels

    dev, bf16 = "cuda", torch.bfloat16
    x = torch.randn(tokens, hidden, device=dev, dtype=bf16, requires_grad=True)
    w_norm = torch.rand(hidden, device=dev, dtype=bf16, requires_grad=True)
    gate = torch.randn(tokens, ffn, device=dev, dtype=bf16, requires_grad=True)
    up = torch.randn(tokens, ffn, device=dev, dtype=bf16, requires_grad=True)
    q = torch.randn(tokens, 1, heads, head_dim, device=dev, dtype=bf16, requires_grad=True)
    k = torch.randn(tokens, 1, kv_heads, head_dim, device=dev, dtype=bf16, requires_grad=True)
    freqs = torch.outer(torch.arange(tokens, device=dev).float(),
                        1.0 / 500000 ** (torch.arange(0, head_dim, 2, device=dev).float() / head_dim))
    freqs = torch.cat([freqs, freqs], -1)[:, None, None, :]
    cos, sin = freqs.cos().to(bf16), freqs.sin().to(bf16)
    w_out = (torch.randn(vocab, hidden, device=dev) * 0.02).to(bf16).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), device=dev)
    liger, why = _liger()
    # Liger's RoPE takes Hugging Face's layout [batch, heads, seq, dim] and cos/sin [1, seq, dim].
    q_hf = q.detach().permute(1, 2, 0, 3).contiguous().requires_grad_()
    k_hf = k.detach().permute(1, 2, 0, 3).contiguous().requires_grad_()
    cos_hf, sin_hf = cos[:, 0, 0, :][None], sin[:, 0, 0, :][None]

    def rope_ref(q, k, cos, sin):
        return kernels.apply_rope_reference(q, k, cos, sin)

    return {
        "rms_norm": (f"[{tokens}, {hidden}]", {
            "ours (Triton)": lambda: kernels.rms_norm(x, w_norm, 1e-6),
            "torch eager": lambda: kernels.rms_norm_reference(x, w_norm, 1e-6),
            "torch.compile": lambda: torch.compile(kernels.rms_norm_reference)(x, w_norm, 1e-6),
            "Liger": (lambda: liger.liger_rms_norm(x, w_norm, 1e-6, in_place=False)) if liger else why}),
        "swiglu": (f"[{tokens}, {ffn}]", {
            "ours (Triton)": lambda: kernels.swiglu(gate, up),
            "torch eager": lambda: kernels.swiglu_reference(gate, up),
            "torch.compile": lambda: torch.compile(kernels.swiglu_reference)(gate, up),
            "Liger": (lambda: liger.liger_swiglu(gate, up)) if liger else why}),
        "apply_rope": (f"q [{tokens}, 1, {heads}, {head_dim}], k [.., {kv_heads}, ..]", {
            "ours (Triton)": lambda: kernels.apply_rope(q, k, cos, sin),
            "torch eager": lambda: rope_ref(q, k, cos, sin),
            "torch.compile": lambda: torch.compile(rope_ref)(q, k, cos, sin),
            "Liger": (lambda: liger.liger_rope(q_hf, k_hf, cos_hf, sin_hf)) if liger else why}),
        "linear_cross_entropy": (f"[{tokens}, {hidden}] x [{vocab}, {hidden}]", {
            "ours (Triton)": lambda: kernels.linear_cross_entropy(x, w_out, labels),
            "torch eager": lambda: F.cross_entropy((x @ w_out.t()).float(), labels),
            "torch.compile": lambda: torch.compile(lambda a, b, c: F.cross_entropy((a @ b.t()).float(), c))(
                x, w_out, labels),
            "Liger": (lambda: liger.liger_fused_linear_cross_entropy(x, w_out, labels)) if liger else why}),
    }


def _fwd_bwd(fn):
    out = fn()
    outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o is not None]
    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])


def speed_report(args) -> None:
    if not torch.cuda.is_available():
        print("\n== speed: no GPU here, not measured (Triton's interpreter runs the kernels on CPU for the "
              "tests; its timings say nothing about GPU speed) ==")
        return
    import triton.testing

    cases = speed_cases(args.tokens, args.hidden, args.vocab, args.ffn, args.heads, args.kv_heads, args.head_dim)
    for kernel, (shape, candidates) in cases.items():
        print(f"\n== {kernel} {shape}, bf16, forward + backward ==")
        results = {}
        for name, fn in candidates.items():
            if isinstance(fn, str):
                print(f"  {name:16s} n/a ({fn})")
                continue
            try:
                _fwd_bwd(fn)  # warm-up, compile
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                ms = triton.testing.do_bench(lambda: _fwd_bwd(fn), warmup=10, rep=50)
                results[name] = (ms, torch.cuda.max_memory_allocated() - base)
            except Exception as e:  # noqa: BLE001 - one candidate failing must not hide the others
                print(f"  {name:16s} failed: {type(e).__name__}: {str(e)[:200]}")
        eager = results.get("torch eager")
        for name, (ms, mem) in results.items():
            ratio = f"{eager[0] / ms:5.2f}x eager speed, {mem / max(eager[1], 1):5.2f}x eager memory" if eager else ""
            print(f"  {name:16s} {ms:8.3f} ms  peak +{mem / GIB:6.2f} GiB   {ratio}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=155136)
    p.add_argument("--ffn", type=int, default=14336)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--skip-real-check", action="store_true",
                   help="without a GPU: skip the real CPU run that checks the fake-tensor accounting (~2 min)")
    args = p.parse_args(argv)
    print(f"bench/kernel_bench.py | {describe_machine()} | commit {commit()}")
    memory_report(args.tokens, args.hidden, args.vocab, real_check=not args.skip_real_check)
    speed_report(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
