"""The precision policy picks bf16 only where the hardware computes it natively, on either CPU kind.

A CPU with native bf16 is made to behave like an AVX2-only one with ONEDNN_MAX_CPU_ISA=AVX2
ATEN_CPU_CAPABILITY=avx2; on an AVX2-only CPU that environment changes nothing. Either way the
policy must then pick fp32, and the emulation must really make bf16 slow (checked here with a
bigger matmul than the policy's probe, timed independently)."""

import json
import sys
import time

import pytest
import torch

from helpers import run_cli, subprocess_env

AVX2_ONLY = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def _matmul_seconds(dtype, n=512):
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return best


def _python(code: str, env_extra: dict) -> str:
    env = dict(subprocess_env(), **env_extra)
    proc = run_cli([sys.executable, "-c", code], env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


PROBE_AND_MEASURE = """
import json, time, warnings, torch
from megatron_seed.platform import precision
def t(dtype, n=512):
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype); a @ b
    best = 1e9
    for _ in range(3):
        s = time.perf_counter(); a @ b; best = min(best, time.perf_counter() - s)
    return best
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    explicit = precision.choose("bf16")
    precision.resolve("bf16")
auto = precision.choose("auto")
from megatron_seed.inference.engine import InferenceModel
print(json.dumps({"auto": auto.precision, "reason": auto.reason, "explicit": explicit.precision,
                  "explicit_reason": explicit.reason, "warnings": [str(w.message) for w in caught],
                  "ratio": t(torch.bfloat16) / t(torch.float32),
                  "engine_default": str(InferenceModel.__init__.__defaults__)}))
"""


def test_avx2_only_cpu_gets_fp32_and_explicit_bf16_warns():
    out = json.loads(_python(PROBE_AND_MEASURE, AVX2_ONLY).strip().splitlines()[-1])
    # the emulated environment really is slow at bf16 (independent of the policy's own probe)
    assert out["ratio"] > 10, out
    assert out["auto"] == "fp32" and "emulates bf16" in out["reason"], out
    # an explicit bf16 still runs bf16, with a warning that says how much slower it is
    assert out["explicit"] == "bf16"
    assert any("no native bf16" in w and "slower than fp32" in w for w in out["warnings"]), out["warnings"]


def test_auto_matches_what_this_cpu_measures():
    from megatron_seed.platform import precision

    choice = precision.choose("auto", "cpu")
    native = _matmul_seconds(torch.bfloat16) < _matmul_seconds(torch.float32)
    assert choice.precision == ("bf16" if native else "fp32"), (choice, native)
    assert precision.choose("fp32", "cpu").precision == "fp32"
    with pytest.raises(ValueError, match="precision must be one of"):
        precision.choose("fp16")


def test_inference_engine_and_training_follow_the_policy(tmp_path):
    code = """
import torch
from megatron_seed.config.schema import ModelConfig
from megatron_seed.inference.engine import InferenceModel
m = ModelConfig(num_layers=1, hidden_size=16, ffn_hidden_size=32, num_attention_heads=2, num_query_groups=1, vocab_size=32)
h, f, kv = 16, 32, 8
w = {"model.embed_tokens.weight": torch.randn(32, h), "model.norm.weight": torch.ones(h),
     "model.layers.0.input_layernorm.weight": torch.ones(h), "model.layers.0.post_attention_layernorm.weight": torch.ones(h),
     "model.layers.0.self_attn.q_proj.weight": torch.randn(h, h), "model.layers.0.self_attn.k_proj.weight": torch.randn(kv, h),
     "model.layers.0.self_attn.v_proj.weight": torch.randn(kv, h), "model.layers.0.self_attn.o_proj.weight": torch.randn(h, h),
     "model.layers.0.mlp.gate_proj.weight": torch.randn(f, h), "model.layers.0.mlp.up_proj.weight": torch.randn(f, h),
     "model.layers.0.mlp.down_proj.weight": torch.randn(h, f)}
print(InferenceModel(m, w).dtype, InferenceModel(m, w, "bf16").dtype)
"""
    assert _python(code, AVX2_ONLY).split() == ["torch.float32", "torch.bfloat16"]
    # training: train.precision=auto (the default) resolves to fp32 there, logged with its reason
    cmd = [sys.executable, "-m", "megatron_seed.pretrain", "--preset", "tiny", "train.steps=1",
           "train.precision=auto", f"train.run_dir={tmp_path}", "train.tensorboard=false"]
    proc = run_cli(cmd, env=dict(subprocess_env(), **AVX2_ONLY), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "config.json").read_text())["train"]["precision"] == "fp32"
    assert "auto -> fp32" in proc.stderr
