"""FP8 numerics by emulation on CPU (checked against torch's own FP8 GEMM), delayed scaling as
Transformer Engine defines it, and the selection/config plumbing of the Transformer Engine path."""

from __future__ import annotations

import pytest
import torch

from megatron_seed.config.schema import ModelConfig, ParallelConfig, TrainConfig
from megatron_seed.models import fp8, gpt

from helpers import losses, run_pretrain

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
    reference = torch._scaled_mm((x * sx).to(E4M3), (w * sw).to(E4M3).t(), scale_a=torch.tensor(1 / sx),
                                 scale_b=torch.tensor(1 / sw), out_dtype=torch.float32)
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
    monkeypatch.setattr(gpt, "transformer_engine_available", lambda: True)
    assert gpt.resolve_impl(model) == "transformer_engine"
    config = gpt.build_transformer_config(model, ParallelConfig(), TrainConfig(precision="bf16", fp8="hybrid"))
    assert (config.fp8, config.fp8_recipe, config.fp8_margin, config.fp8_amax_history_len,
            config.fp8_amax_compute_algo) == ("hybrid", "delayed", 0, 1, "most_recent")
    assert config.masked_softmax_fusion
    monkeypatch.setattr(gpt, "transformer_engine_available", lambda: False)
    local = gpt.build_transformer_config(model, ParallelConfig(), TrainConfig(precision="bf16", fp8="hybrid"))
    assert local.fp8 is None  # the local path gets the emulation instead of TE's FP8
