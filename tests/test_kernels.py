"""The Triton kernels (kernels/) under Triton's interpreter, against plain-torch references.

Every kernel computes in float32 internally. The interpreter stores float32 -> bf16 by truncation
(a compiled kernel rounds), so bf16 results may differ from the reference by one bf16 ulp:
bf16 cases use torch's bf16 tolerances (rtol 1.6e-2), float32 cases 1e-5.
"""

import os

import pytest
import torch
import torch.nn.functional as F

import megatron_seed_kernels as kernels

DTYPES = [torch.float32, torch.bfloat16]


def close(got, want, dtype):
    """Elementwise |got - want| <= atol + rtol |want| (torch.testing.assert_close's rule, written out:
    it is seconds faster on the 50M-element weight gradients here)."""
    rtol, atol = (1e-5, 1e-5) if dtype == torch.float32 else (1.6e-2, 1e-2)
    assert got.shape == want.shape, (got.shape, want.shape)
    error = (got.double() - want.double()).abs()
    excess = error - (atol + rtol * want.double().abs())
    worst = int(excess.argmax())
    assert float(excess.reshape(-1)[worst].detach()) <= 0, (
        f"element {worst}: got {float(got.reshape(-1)[worst])}, want {float(want.reshape(-1)[worst])}")


def leaf(t, dtype):
    return t.to(dtype).requires_grad_()


def float64_grads(fn, *tensors, grad_out=None):
    """Output and input gradients of ``fn`` evaluated in float64 (the independent reference)."""
    xs = [t.detach().double().requires_grad_() for t in tensors]
    out = fn(*xs)
    outs = out if isinstance(out, tuple) else (out,)
    grads = grad_out if isinstance(grad_out, tuple) else (grad_out,)
    torch.autograd.backward([o for o in outs], [g.double() for g in grads])
    return out, [x.grad for x in xs]


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_forward_and_all_gradients(dtype):
    torch.manual_seed(0)
    x = leaf(torch.randn(2, 37, 1000) * 3, dtype)  # 74 rows: not a multiple of the row block
    w = leaf(torch.rand(1000) + 0.5, dtype)
    y = kernels.rms_norm(x, w, 1e-5)
    dy = torch.randn_like(y)
    y.backward(dy)

    def ref(x, w):  # written out here, independent of the kernel module's own reference
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    want, (dx, dw) = float64_grads(ref, x, w, grad_out=dy)
    assert y.dtype == dtype and y.shape == x.shape
    close(y, want, dtype)
    close(x.grad, dx, dtype)
    # the weight gradient sums 74 rows: bf16 inputs carry their own rounding into it
    torch.testing.assert_close(w.grad.double(), dw, rtol=1e-4 if dtype == torch.float32 else 3e-2,
                               atol=1e-4 if dtype == torch.float32 else 0.5)
    if dtype == torch.float32:  # and torch's own RMSNorm agrees
        torch.testing.assert_close(y, F.rms_norm(x, (1000,), w, 1e-5), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_on_the_halves_of_a_fused_projection(dtype):
    torch.manual_seed(1)
    fused = leaf(torch.randn(3, 7, 2 * 333) * 2, dtype)
    gate, up = torch.chunk(fused, 2, dim=-1)  # strided views, as megatron-core's MLP hands them over
    out = kernels.swiglu(gate, up)
    d_out = torch.randn_like(out)
    out.backward(d_out)
    want, (d_fused,) = float64_grads(lambda f: F.silu(f[..., :333]) * f[..., 333:], fused, grad_out=d_out)
    close(out, want, dtype)
    close(fused.grad, d_fused, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_on_q_and_k_matches_megatron_core(dtype):
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    torch.manual_seed(2)
    seq, batch, heads, kv_heads, dim = 11, 3, 6, 2, 24  # GQA; rows not a multiple of the block
    q = leaf(torch.randn(seq, batch, heads, dim), dtype)
    k = leaf(torch.randn(seq, batch, kv_heads, dim), dtype)
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    freqs = torch.outer(torch.arange(seq).float(), inv)
    freqs = torch.cat([freqs, freqs], -1)[:, None, None, :]  # megatron-core's [seq, 1, 1, dim]
    cos, sin = freqs.cos(), freqs.sin()
    q_out, k_out = kernels.apply_rope(q, k, cos.to(dtype), sin.to(dtype))
    dq_out, dk_out = torch.randn_like(q_out), torch.randn_like(k_out)
    torch.autograd.backward([q_out, k_out], [dq_out, dk_out])
    (q_want, k_want), (dq, dk) = float64_grads(
        lambda q, k: (_apply_rotary_pos_emb_bshd(q, freqs.double()), _apply_rotary_pos_emb_bshd(k, freqs.double())),
        q, k, grad_out=(dq_out, dk_out))
    close(q_out, q_want, dtype)
    close(k_out, k_want, dtype)
    close(q.grad, dq, dtype)
    close(k.grad, dk, dtype)


def test_rope_rejects_wrong_shapes():
    q = torch.randn(4, 1, 2, 8)
    with pytest.raises(ValueError, match="cos must be"):
        kernels.apply_rope(q, None, torch.randn(5, 1, 1, 8), torch.randn(5, 1, 1, 8))
    with pytest.raises(ValueError, match="head_dim must be even"):
        kernels.apply_rope(torch.randn(4, 1, 2, 7), None, torch.randn(4, 1, 1, 7), torch.randn(4, 1, 1, 7))


def _ce_inputs(rows, hidden, vocab, dtype, seed=3):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) / hidden ** 0.5
    labels = torch.randint(0, vocab, (rows,), generator=g)
    labels[::5] = -100
    return leaf(h, dtype), leaf(w, dtype), labels


@pytest.mark.parametrize("dtype,accum_dtype,vocab", [(torch.float32, None, 50257), (torch.bfloat16, None, 50257),
                                                     (torch.bfloat16, torch.float32, 5003)])
def test_linear_cross_entropy_at_gpt2_vocab(dtype, accum_dtype, vocab):
    # hidden 1000, vocab 50,257 (not a multiple of the vocab block), 23 tokens in chunks of 8
    h, w, labels = _ce_inputs(23, 1000, vocab, dtype)
    loss = kernels.linear_cross_entropy(h, w, labels, chunk_rows=8, accum_dtype=accum_dtype)
    loss.backward()
    want, (dh, dw) = float64_grads(lambda h, w: F.cross_entropy(h @ w.t(), labels, ignore_index=-100), h, w,
                                   grad_out=torch.ones(()))
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss.double(), want, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-5)
    close(h.grad, dh, dtype)
    close(w.grad, dw, dtype)
    assert float(w.grad[:, 0].abs().sum()) > 0 and float(h.grad[::5].abs().sum()) == 0  # ignored rows: no gradient


def test_linear_cross_entropy_other_ignore_index_and_default_chunks():
    h, w, labels = _ce_inputs(40, 64, 300, torch.float32, seed=4)
    labels = torch.where(labels == -100, 7777, labels)
    loss = kernels.linear_cross_entropy(h, w, labels, ignore_index=7777)
    torch.testing.assert_close(loss, F.cross_entropy(h @ w.t(), labels, ignore_index=7777), rtol=1e-5, atol=1e-6)


def test_linear_cross_entropy_all_rows_ignored():
    h, w, _ = _ce_inputs(9, 32, 100, torch.float32)
    loss = kernels.linear_cross_entropy(h, w, torch.full((9,), -100))
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert h.grad.abs().max() == 0 and w.grad.abs().max() == 0


def test_per_token_loss_with_uneven_incoming_gradient_recomputes_exactly():
    """Weights differing per token cannot reuse the forward-time gradients: backward recomputes."""
    h, w, labels = _ce_inputs(30, 48, 211, torch.float32, seed=5)
    per_token = kernels.linear_cross_entropy_per_token(h, w, labels, chunk_rows=7)
    weights = torch.rand(30)
    (per_token * weights).sum().backward()

    def ref(h, w):
        return F.cross_entropy(h @ w.t(), labels, ignore_index=-100, reduction="none")

    want, (dh, dw) = float64_grads(ref, h, w, grad_out=weights)
    torch.testing.assert_close(per_token.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad.double(), dh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), dw, rtol=1e-5, atol=1e-6)


def test_linear_cross_entropy_under_no_grad_computes_only_the_loss():
    h, w, labels = _ce_inputs(12, 16, 50, torch.float32)
    with torch.no_grad():
        loss = kernels.linear_cross_entropy(h, w, labels)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, F.cross_entropy((h @ w.t()).detach(), labels), rtol=1e-5, atol=1e-6)


def _vocab_parallel_worker(rank, world, init_file):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        h, w, labels = _ce_inputs(21, 40, 2 * 157, torch.float32, seed=6)
        labels[3] = 156  # the first id of rank 1's slice, and the last of rank 0's
        labels[4] = 157
        local_w = w.detach()[rank * 157:(rank + 1) * 157].clone().requires_grad_()
        weights = torch.rand(21, generator=torch.Generator().manual_seed(9))
        for uneven in (False, True):
            h.grad, local_w.grad = None, None
            per_token = kernels.linear_cross_entropy_per_token(h, local_w, labels, tp_group=dist.group.WORLD,
                                                               chunk_rows=8)
            (per_token * (weights if uneven else 1.0)).sum().backward()
            dist.all_reduce(h.grad)  # megatron-core's copy-to-TP-region backward does this in the model

            def ref(h, w):
                return F.cross_entropy(h @ w.t(), labels, ignore_index=-100, reduction="none")

            want, (dh, dw) = float64_grads(ref, h, w, grad_out=weights if uneven else torch.ones(21))
            torch.testing.assert_close(per_token.double(), want, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(h.grad.double(), dh, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(local_w.grad.double(), dw[rank * 157:(rank + 1) * 157], rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()


def test_vocab_parallel_loss_over_two_ranks(tmp_path):
    import torch.multiprocessing as mp

    assert os.environ.get("TRITON_INTERPRET") == "1"  # inherited by the spawned ranks
    mp.spawn(_vocab_parallel_worker, args=(2, str(tmp_path / "init")), nprocs=2, join=True, daemon=True)


def test_kernel_selection(monkeypatch):
    from megatron_seed.config.loading import load_config
    from megatron_seed.models.kernel_selection import resolve_kernels

    assert resolve_kernels("torch") == "torch"
    if not torch.cuda.is_available():
        assert resolve_kernels("auto") == "torch"  # never the interpreter in a training run
        assert resolve_kernels("triton") == "triton"  # allowed here only because the tests interpret
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="model.kernels=triton needs a CUDA GPU"):
            resolve_kernels("triton")
    with pytest.raises(Exception, match="model.kernels"):
        load_config(preset="tiny", overrides=["model.kernels=cuda"])
