"""Committed loss golden for the tiny preset, and the run log's contents."""

import json
import math
from pathlib import Path

from helpers import losses, run_pretrain

from megatron_seed.config import run_preset
from megatron_seed.training.metrics import flops_per_token

GOLDEN = Path(__file__).parent / "assets" / "losses" / "tiny.json"
GOLDEN_ARGS = ("train.steps=8", "train.precision=fp32", "optimizer.warmup_steps=2")


def test_tiny_preset_reproduces_committed_losses(tmp_path):
    run_pretrain(tmp_path, *GOLDEN_ARGS)
    want = {int(k): v for k, v in json.loads(GOLDEN.read_text())["losses"].items()}
    got = losses(tmp_path)
    assert sorted(got) == sorted(want)
    for step in want:  # refactors that should not move numbers must reproduce them
        assert abs(got[step] - want[step]) <= 1e-6, (step, got[step], want[step])


def test_metrics_jsonl_and_tensorboard(tmp_path):
    run_pretrain(tmp_path, "train.steps=4", "train.log_interval=2", "train.tensorboard=true")
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    for r in records:
        for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "tflops", "mfu", "peak_mem_gib"):
            assert key in r and r[key] is not None, key
        assert r["tokens_per_s"] > 0 and math.isfinite(r["loss"]) and r["peak_mem_gib"] > 0
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((tmp_path / "config.json").read_text())["train"]["steps"] == 4


def test_flops_formula_counts_matmul_parameters():
    from transformers import LlamaConfig, LlamaForCausalLM

    m = run_preset("tiny").model
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups, tie_word_embeddings=False))
    matmul = sum(p.numel() for n, p in hf.named_parameters() if p.dim() == 2 and "embed_tokens" not in n)
    seq = 128
    assert flops_per_token(m, seq) == 6 * matmul + 6 * m.num_layers * seq * m.hidden_size
    assert m.num_parameters() == sum(p.numel() for p in hf.parameters())
