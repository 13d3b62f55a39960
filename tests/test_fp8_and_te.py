"""FP8 numerics by emulation on CPU (checked against torch's own FP8 GEMM), delayed scaling as
Transformer Engine defines it, and the selection/config plumbing of the Transformer Engine path."""

from __future__ import annotations

import types

import pytest
import torch

from megatron_seed.config.schema import ModelConfig, ParallelConfig, TrainConfig
from megatron_seed.models import fp8, gpt, optimize

from helpers import assert_losses_close, losses, run_pretrain

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def test_quantize_dequantize_saturates_and_keeps_fp8_precision():
    x = torch.tensor([1e4, -1e4, 0.0, 1.0, 0.3, -2.5e-3])
    out = fp8.quantize_dequantize(x, E4M3, 1.0)
    assert out[0] == 448 and out[1] == -448 and out[2] == 0 and out[3] == 1
    y = torch.randn(10_000) * 3
    scale = 448 / y.abs().max().item()
    normal = y.abs() * scale >= 2 ** -6  # below E4M3's smallest normal, precision is absolute
    rel = ((fp8.quantize_dequantize(y, E4M3, scale) - y).abs() / y.abs())[normal].max()
    assert 0 < rel <= 2 ** -4 + 1e-6  # 3 mantissa bits: round-to-nearest error is at most 1/16
    rel5 = ((fp8.quantize_dequantize(y, E5M2, 1.0) - y).abs() / y.abs())[y.abs() > 1e-3].max()
    assert 2 ** -4 < rel5 <= 2 ** -3 + 1e-6  # 2 mantissa bits


def test_delayed_scaling_follows_transformer_engines_formula():
    recipe = fp8.Fp8Recipe(margin=1, amax_history_len=3, amax_compute_algo="max")
    state = fp8.ScalingState(E4M3, recipe)
    assert state.scale() == 1.0  # no history yet
    for amax in (2.0, 8.0, 4.0, 1.0):
        state.record(torch.tensor([amax, -amax / 2]))
    assert state.history == [8.0, 4.0, 1.0]
    assert state.scale() == pytest.approx(448 / 8.0 / 2)
    recent = fp8.ScalingState(E4M3, fp8.Fp8Recipe(amax_history_len=3, amax_compute_algo="most_recent"))
    for amax in (2.0, 8.0, 4.0):
        recent.record(torch.tensor([amax]))
    assert recent.scale() == pytest.approx(448 / 4.0)


def test_emulated_fp8_gemm_equals_torch_scaled_mm():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(32, 64, generator=g) * 5, torch.randn(48, 64, generator=g) * 0.02
    sx, sw = 448 / x.abs().max().item(), 448 / w.abs().max().item()
    emulated = fp8.quantize_dequantize(x, E4M3, sx) @ fp8.quantize_dequantize(w, E4M3, sw).t()
    xq, wq = (x * sx).to(E4M3), (w * sw).to(E4M3)
    # torch's own FP8 tensors, multiplied exactly in float64: a reference on every CPU
    exact = (xq.double() / sx) @ (wq.double() / sw).t()
    torch.testing.assert_close(emulated.double(), exact, atol=1e-5, rtol=1e-5)
    try:  # and torch's FP8 GEMM where oneDNN has one for this CPU (not on AVX2-only CPUs)
        reference = torch._scaled_mm(xq, wq.t(), scale_a=torch.tensor(1 / sx), scale_b=torch.tensor(1 / sw),
                                     out_dtype=torch.float32)
    except RuntimeError as err:
        assert "primitive descriptor" in str(err), err
    else:
        torch.testing.assert_close(emulated, reference, atol=1e-5, rtol=1e-5)
    assert (emulated - x @ w.t()).abs().max() > 1e-3  # and it is not the full-precision product


def test_fp8_emulated_training_tracks_bf16_and_quantizes_gradients(tmp_path):
    common = ("train.steps=6", "train.precision=bf16")
    run_pretrain(tmp_path / "bf16", *common)
    run_pretrain(tmp_path / "hybrid", *common, "train.fp8=hybrid")
    run_pretrain(tmp_path / "e4m3", *common, "train.fp8=e4m3")
    base, hybrid, e4m3 = losses(tmp_path / "bf16"), losses(tmp_path / "hybrid"), losses(tmp_path / "e4m3")
    assert hybrid != base and e4m3 != hybrid  # quantization is active, gradients too (E5M2 vs E4M3)
    for step in base:
        assert abs(hybrid[step] - base[step]) / base[step] < 0.01
        assert abs(e4m3[step] - base[step]) / base[step] < 0.01


def test_transformer_engine_selection_and_fp8_recipe_in_the_config(monkeypatch):
    model = ModelConfig()
    assert gpt.resolve_impl(model) == "local"  # no CUDA/TE here
    with pytest.raises(RuntimeError, match="Transformer Engine is not usable"):
        gpt.resolve_impl(ModelConfig(transformer_impl="transformer_engine"))
    monkeypatch.setattr(optimize, "transformer_engine_available", lambda: True)
    assert gpt.resolve_impl(model) == "transformer_engine"
    config = gpt.build_transformer_config(model, ParallelConfig(), TrainConfig(precision="bf16", fp8="hybrid"))
    assert (config.fp8, config.fp8_recipe, config.fp8_margin, config.fp8_amax_history_len,
            config.fp8_amax_compute_algo) == ("hybrid", "delayed", 0, 1, "most_recent")
    assert config.masked_softmax_fusion
    monkeypatch.setattr(optimize, "transformer_engine_available", lambda: False)
    local = gpt.build_transformer_config(model, ParallelConfig(), TrainConfig(precision="bf16", fp8="hybrid"))
    assert local.fp8 is None  # the local path gets the emulation instead of TE's FP8


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_fp8_emulated_run_resumes_exactly(tmp_path, precision):
    """The amax histories are model state: a resumed run scales its first FP8 GEMMs as the
    uninterrupted run does (with fresh histories step 3 would quantize with scale 1)."""
    full, resumed, ckpt = (tmp_path / n for n in ("full", "resumed", "ckpt"))
    opts = ("train.steps=4", f"train.precision={precision}", "train.fp8=hybrid")
    # Saving does not change a run's losses (test_checkpoint), so the straight run also saves.
    run_pretrain(full, *opts, f"train.save={ckpt}", "train.save_interval=2")
    run_pretrain(resumed, *opts, f"train.load={ckpt}/iter_0000002")
    want = losses(full)
    assert_losses_close(losses(resumed), {3: want[3], 4: want[4]}, atol=0.0)


def test_fp8_tp2_histories_are_per_rank_and_resume_exactly(tmp_path):
    """At TP=2 each rank's histories differ (its own weight shard, its own half of the row-parallel
    inputs): both ranks' histories are saved and each rank gets its own back. The same checkpoint
    also loads at TP=1 (histories merged by max)."""
    full, resumed, tp1, ckpt = (tmp_path / n for n in ("full", "resumed", "tp1", "ckpt"))
    opts = ("train.steps=4", "train.precision=fp32", "train.fp8=hybrid", "parallel.tensor=2")
    run_pretrain(full, *opts, f"train.save={ckpt}", "train.save_interval=2", nproc=2)
    run_pretrain(resumed, *opts, f"train.load={ckpt}/iter_0000002", nproc=2)
    want = losses(full)
    assert_losses_close(losses(resumed), {3: want[3], 4: want[4]}, atol=0.0)
    run_pretrain(tp1, "train.steps=3", "train.precision=fp32", "train.fp8=hybrid", f"train.load={ckpt}/iter_0000002")
    assert abs(losses(tp1)[3] - want[3]) < 1e-2


def _emulated(recipe=None):
    """An emulated layer around a plain fp32/bf16 GEMM (what megatron's _forward_impl computes
    at TP=1 for these arguments)."""
    layer = types.SimpleNamespace(_forward_impl=lambda x, w, *a, **k: x @ w.t())
    return fp8.Fp8LinearEmulation(layer, recipe or fp8.Fp8Recipe())


def test_fp8_emulation_quantizes_around_an_fp32_gemm():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(8, 32, generator=g) * 3).requires_grad_(True)
    w = (torch.randn(16, 32, generator=g) * 0.05).requires_grad_(True)
    dy = torch.randn(8, 16, generator=g) * 1e-3
    emulation = _emulated()
    scales = []
    for _ in range(2):  # step 1 runs at scale 1 (no history), step 2 at the recorded amax
        scales.append((emulation.input.scale(), emulation.weight.scale(), emulation.grad.scale()))
        x.grad = w.grad = None
        y = emulation(x, w)
        y.backward(dy)
    assert scales[0] == (1.0, 1.0, 1.0)
    s_x, s_w, s_g = scales[1]
    assert s_x == pytest.approx(448 / x.abs().max().item()) and s_g == pytest.approx(57344 / dy.abs().max().item())
    xq, wq = fp8.quantize_dequantize(x.detach(), E4M3, s_x), fp8.quantize_dequantize(w.detach(), E4M3, s_w)
    gq = fp8.quantize_dequantize(dy, E5M2, s_g)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, xq @ wq.t(), atol=0, rtol=0)
    torch.testing.assert_close(x.grad, gq @ wq, atol=0, rtol=0)
    torch.testing.assert_close(w.grad, gq.t() @ xq, atol=0, rtol=0)
    assert (y - x @ w.t()).abs().max() > 1e-3 and (gq - dy).abs().max() > 0  # really quantized
    # the quantization itself is fp32 math whatever the run precision: bf16 gives the same FP8
    # values, rounded to bf16 once at the end
    xb = x.detach().bfloat16()
    torch.testing.assert_close(fp8.quantize_dequantize(xb, E4M3, s_x),
                               fp8.quantize_dequantize(xb.float(), E4M3, s_x).bfloat16(), atol=0, rtol=0)


def test_fp8_extra_state_round_trip_and_layout_change():
    recipe = fp8.Fp8Recipe(amax_history_len=2, amax_compute_algo="max")
    a = _emulated(recipe)
    a.input.history, a.weight.history, a.grad.history = [1.0, 2.0], [0.5, 0.25], [1e-3, 2e-3]
    b = _emulated(recipe)
    b.set_extra_state(a.get_extra_state())
    assert b.histories() == a.histories() and b.input.scale() == a.input.scale()
    b.set_extra_state(None)  # a checkpoint from a run without FP8: histories stay as they are
    assert b.histories() == a.histories()
    # saved at TP=2: both ranks' entries; loaded on one rank, the max over them, most recent aligned
    saved = {"format": fp8.EXTRA_STATE_FORMAT, "layout": [2, 1], "ranks": [
        {"tp_rank": 0, "dp_rank": 0, "input": [1.0, 4.0], "weight": [3.0, 1.0], "grad": [9.0]},
        {"tp_rank": 1, "dp_rank": 0, "input": [2.0, 3.0], "weight": [1.0, 2.0], "grad": [7.0, 8.0]}]}
    b.set_extra_state(saved)
    assert b.histories() == {"input": [2.0, 4.0], "weight": [3.0, 2.0], "grad": [7.0, 9.0]}
    with pytest.raises(ValueError, match="format"):
        b.set_extra_state({"format": "other/9"})
