"""The CPU speed paths of training: chunked vocab-parallel cross entropy, fused AdamW, allocator
policy. Each is checked against an independent reference (torch's own cross entropy, megatron-core's
cross entropy, torch's multi-tensor AdamW, glibc's own accounting)."""

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from megatron_seed.models.cross_entropy import vocab_parallel_cross_entropy


@pytest.mark.parametrize("chunk_elements", [64, 7 * 50, 1 << 19])  # rows per chunk: 1, 7 (ragged tail), all
def test_cross_entropy_matches_torch_in_fp32(chunk_elements):
    torch.manual_seed(0)
    s, b, v = 13, 3, 50
    logits = torch.randn(s, b, v) * 4
    target = torch.randint(0, v, (s, b))
    weight = torch.rand(s, b)
    ours_in = logits.clone().requires_grad_(True)
    loss = vocab_parallel_cross_entropy(ours_in, target, None, chunk_elements=chunk_elements)
    (loss * weight).sum().backward()
    ref_in = logits.clone().requires_grad_(True)
    ref = F.cross_entropy(ref_in.view(-1, v), target.view(-1), reduction="none").view(s, b)
    (ref * weight).sum().backward()
    assert loss.shape == (s, b) and loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours_in.grad, ref_in.grad, atol=1e-6, rtol=1e-6)
    assert torch.equal(ours_in.detach(), logits)  # float32 logits are not modified in place


def test_cross_entropy_bf16_matches_megatron_core(monkeypatch):
    """bf16 logits: same loss as megatron-core's float32 cross entropy, gradient returned in bf16
    (as its fused path does) within bf16 rounding of the float32 gradient."""
    from megatron_seed.platform import megatron_cpu

    megatron_cpu.apply()
    import torch.distributed as dist
    from megatron.core.tensor_parallel import cross_entropy as mcore_ce

    # megatron-core reads its (global) tensor-parallel group: make it a one-rank world here.
    monkeypatch.setattr(mcore_ce, "get_tensor_model_parallel_group", lambda: None)
    monkeypatch.setattr(mcore_ce, "get_tensor_model_parallel_rank", lambda: 0)
    monkeypatch.setattr(mcore_ce, "get_tensor_model_parallel_world_size", lambda: 1)
    monkeypatch.setattr(dist, "all_reduce", lambda *a, **k: None)

    torch.manual_seed(1)
    s, b, v = 16, 2, 300
    logits = (torch.randn(s, b, v) * 3).bfloat16()
    target = torch.randint(0, v, (s, b))
    weight = torch.rand(s, b)
    ours_in = logits.clone().requires_grad_(True)
    loss = vocab_parallel_cross_entropy(ours_in, target, None, chunk_elements=5 * v)
    (loss * weight).sum().backward()
    ref_in = logits.float().requires_grad_(True)
    ref = mcore_ce.vocab_parallel_cross_entropy(ref_in.clone(), target)
    ref_grad = torch.autograd.grad((ref * weight).sum(), ref_in)[0]
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    assert ours_in.grad.dtype == torch.bfloat16
    torch.testing.assert_close(ours_in.grad.float(), ref_grad, atol=2e-3, rtol=1e-2)


def test_fused_cpu_adam_is_selected_and_matches_torch_foreach(tmp_path):
    # The trainer is built in a child process: it starts a process group, which must not leak
    # into the other tests of this session.
    probe = textwrap.dedent(f"""
        from megatron_seed.config import load_config
        from megatron_seed.training.build import build_run
        from megatron_seed.training.optimizer_setup import _torch_optimizers
        run = load_config(None, ["train.steps=1", "data.mock=true", "train.run_dir={tmp_path}",
                                 "train.tensorboard=false", "train.precision=bf16"], preset="tiny")
        trainer = build_run(run)
        groups = [g for o in _torch_optimizers(trainer.optimizer) for g in o.param_groups]
        print("GROUPS", len(groups), all(g["fused"] and not g["foreach"] for g in groups))
    """)
    from helpers import free_port, subprocess_env

    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env=dict(subprocess_env(), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())))
    line = [l for l in res.stdout.splitlines() if l.startswith("GROUPS")]
    assert line, res.stderr[-3000:]
    n, all_fused = line[0].split()[1:]
    assert int(n) > 0 and all_fused == "True"

    # The fused kernel computes torch's AdamW update (checked against the multi-tensor kernel).
    torch.manual_seed(0)
    params = [torch.randn(n, requires_grad=True) for n in (1000, 77, 4096)]
    twins = [p.detach().clone().requires_grad_(True) for p in params]
    fused = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, foreach=True)
    from megatron_seed.training.optimizer_setup import use_fused_cpu_adam

    class Wrapped:  # the shape of a megatron optimizer: the torch one under .optimizer
        optimizer = fused

    use_fused_cpu_adam(Wrapped())
    ref = torch.optim.AdamW(twins, lr=1e-2, weight_decay=0.1, foreach=True)
    for _ in range(3):
        for p, q in zip(params, twins):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        fused.step()
        ref.step()
    assert fused.param_groups[0]["fused"]
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)


def test_allocator_keeps_large_blocks_in_the_heap():
    """glibc's own accounting: without the policy a 64 MB tensor is an mmap'd block (hblkhd);
    with it, the block comes from the heap and stays there after it is freed."""
    probe = textwrap.dedent("""
        import ctypes, sys, torch
        class MallInfo2(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                        "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
        if sys.argv[1] == "keep":
            from megatron_seed.platform.cpu_allocator import keep_freed_memory
            assert keep_freed_memory()
        x = torch.ones(16 * 2**20)  # 64 MB
        mapped = libc.mallinfo2().hblkhd
        del x
        print(mapped, libc.mallinfo2().fordblks)
    """)
    out = {}
    for mode in ("default", "keep"):
        res = subprocess.run([sys.executable, "-c", probe, mode], capture_output=True, text=True, check=True)
        out[mode] = [int(v) for v in res.stdout.split()]
    mb64 = 64 * 2**20
    assert out["default"][0] >= mb64  # glibc default: served by mmap, returned on free
    assert out["keep"][0] < mb64 and out["keep"][1] >= mb64  # heap block, kept free for reuse


def test_compiled_elementwise_chains_match_eager(tmp_path):
    """train.compile fuses RMSNorm and SwiGLU with torch.compile: same losses as eager (fp32)."""
    from helpers import assert_losses_close, losses, run_pretrain

    args = ("train.steps=3", "train.precision=fp32", "train.log_interval=1")
    run_pretrain(tmp_path / "eager", *args)
    proc = run_pretrain(tmp_path / "compiled", *args, "train.compile=true", timeout=600)
    # tiny preset: 2 layers x (2 RMSNorm + 1 SwiGLU) + the final RMSNorm
    assert "train.compile: 7 modules compiled" in proc.stdout + proc.stderr
    assert_losses_close(losses(tmp_path / "compiled"), losses(tmp_path / "eager"), atol=1e-5)
