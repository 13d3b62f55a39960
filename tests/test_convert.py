"""HF <-> megatron-seed conversion through the real converter, on tiny random Llama configs:
logits, losses after training in our stack, bitwise round trips through TP=2 x PP=2, errors."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F

from megatron_seed.convert.hf_checkpoint import hf_to_mcore, mcore_to_hf

from helpers import run_cli, run_pretrain

CONFIGS = {  # name -> (heads, kv heads, hidden, tied)
    "gqa_untied": (4, 2, 64, False),
    "gqa_tied": (4, 2, 64, True),
    "mha": (4, 4, 64, False),
    "mqa_6_heads": (6, 1, 48, True),
}


def make_hf(folder, heads, kv, hidden, tied, layers=2, vocab=300, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden + 32, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                         tie_word_embeddings=tied, rope_theta=10000.0, max_position_embeddings=256,
                         rms_norm_eps=1e-5)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # non-trivial norms, so a swapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    return model.eval()


def safetensors(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def megatron_logits(ckpt, tokens):
    from megatron_seed.checkpoint.reader import load_megatron_model
    from megatron_seed.platform.distributed import single_process

    with single_process(), torch.no_grad():
        gpt = load_megatron_model(str(ckpt))
        positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
        return gpt(tokens, positions, None)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_hf_to_ours_gives_transformers_logits_and_converts_back_bitwise(name, tmp_path):
    hf = make_hf(tmp_path / "hf", *CONFIGS[name])
    hf_to_mcore(str(tmp_path / "hf"), str(tmp_path / "ours"), torch.float32)
    tokens = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(tokens).logits
    got = megatron_logits(tmp_path / "ours", tokens)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    mcore_to_hf(str(tmp_path / "ours"), str(tmp_path / "back"))
    original, back = safetensors(tmp_path / "hf"), safetensors(tmp_path / "back")
    assert sorted(original) == sorted(back)
    assert all(torch.equal(original[k], back[k]) for k in original)


def test_trained_in_our_stack_then_exported_the_hf_loss_equals_ours(tmp_path):
    from transformers import AutoModelForCausalLM

    heads, kv, hidden, tied = CONFIGS["gqa_untied"]
    make_hf(tmp_path / "hf", heads, kv, hidden, tied)
    hf_to_mcore(str(tmp_path / "hf"), str(tmp_path / "init"), torch.float32)
    model_args = ["model.num_layers=2", f"model.hidden_size={hidden}", f"model.ffn_hidden_size={2 * hidden + 32}",
                  f"model.num_attention_heads={heads}", f"model.num_query_groups={kv}", "model.vocab_size=300",
                  "model.rotary_base=10000", "model.norm_epsilon=1e-5"]
    run_pretrain(tmp_path / "run", "--preset", "tiny", *model_args, "data.mock=true", "data.seq_length=32",
                 "train.precision=fp32", "train.steps=3", f"train.load={tmp_path / 'init'}",
                 f"train.save={tmp_path / 'trained'}", "train.save_interval=3", "optimizer.lr=1e-2",
                 "optimizer.warmup_steps=0")
    mcore_to_hf(str(tmp_path / "trained"), str(tmp_path / "exported"))
    original, exported = safetensors(tmp_path / "hf"), safetensors(tmp_path / "exported")
    assert not torch.equal(original["model.layers.0.mlp.down_proj.weight"],
                           exported["model.layers.0.mlp.down_proj.weight"])  # training moved the weights
    batch = torch.randint(0, 300, (2, 33), generator=torch.Generator().manual_seed(3))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "exported"), dtype=torch.float32).eval()
    with torch.no_grad():
        hf_loss = F.cross_entropy(hf(batch[:, :-1]).logits.flatten(0, 1), batch[:, 1:].flatten())
    our_logits = megatron_logits(tmp_path / "trained", batch[:, :-1])
    our_loss = F.cross_entropy(our_logits.flatten(0, 1), batch[:, 1:].flatten())
    assert abs(hf_loss.item() - our_loss.item()) < 1e-5


def test_round_trip_through_a_tp2_pp2_run_is_bitwise(tmp_path):
    heads, kv, hidden, tied = CONFIGS["gqa_untied"]
    make_hf(tmp_path / "hf", heads, kv, hidden, tied, layers=4)
    proc = run_cli([sys.executable, "tools/convert_checkpoint.py", "hf-to-mcore", "--input",
                           str(tmp_path / "hf"), "--output", str(tmp_path / "ours"), "--tp", "2", "--pp", "2"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # One step at learning rate 0 on 4 processes re-saves the weights from a TP=2 x PP=2 layout.
    run_pretrain(tmp_path / "run", "--preset", "tiny", "model.num_layers=4", f"model.hidden_size={hidden}",
                 f"model.ffn_hidden_size={2 * hidden + 32}", "model.vocab_size=300", "model.rotary_base=10000",
                 "model.norm_epsilon=1e-5", "parallel.tensor=2", "parallel.pipeline=2", "data.mock=true",
                 "data.seq_length=16", "train.precision=fp32", "train.steps=1", "train.global_batch_size=2",
                 "train.micro_batch_size=1", "optimizer.lr=0", "optimizer.min_lr=0", "optimizer.warmup_steps=0",
                 f"train.load={tmp_path / 'ours'}", f"train.save={tmp_path / 'tp2pp2'}", "train.save_interval=1",
                 nproc=4, timeout=600)
    common = json.loads((tmp_path / "tp2pp2" / "iter_0000001" / "metadata.json").read_text())
    assert common["sharded_backend"] == "torch_dist"
    proc = run_cli([sys.executable, "tools/convert_checkpoint.py", "mcore-to-hf", "--input",
                           str(tmp_path / "tp2pp2"), "--output", str(tmp_path / "back")], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    original, back = safetensors(tmp_path / "hf"), safetensors(tmp_path / "back")
    assert sorted(original) == sorted(back)
    assert all(torch.equal(original[k], back[k]) for k in original)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(tmp_path / "back"))  # loads as a plain HF checkpoint


def test_unsupported_models_and_bad_layouts_fail_with_reasons(tmp_path):
    make_hf(tmp_path / "hf", 4, 2, 64, False)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())

    def convert(cfg, *extra):
        (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
        return run_cli([sys.executable, "tools/convert_checkpoint.py", "hf-to-mcore", "--input",
                               str(tmp_path / "hf"), "--output", str(tmp_path / "out"), *extra], timeout=300)

    proc = convert({**config, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]})
    assert proc.returncode == 1 and "not supported" in proc.stderr and "Llama" in proc.stderr
    proc = convert({**config, "attention_bias": True})
    assert proc.returncode == 1 and "attention_bias" in proc.stderr
    proc = convert(config, "--tp", "3")
    assert proc.returncode == 1 and "--tp 3 must divide" in proc.stderr
    proc = convert({**config, "intermediate_size": 100})
    assert proc.returncode == 1 and "shape mismatch" in proc.stderr and "linear_fc1" in proc.stderr


def test_export_in_bf16_shards_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    make_hf(tmp_path / "hf", 4, 2, 64, False, layers=3)
    hf_to_mcore(str(tmp_path / "hf"), str(tmp_path / "ours"), torch.float32)
    mcore_to_hf(str(tmp_path / "ours"), str(tmp_path / "back"), torch.bfloat16, max_shard_bytes=60_000)
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and not list((tmp_path / "back").glob("*.partial"))
    original = safetensors(tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "back"))
    assert model.dtype == torch.bfloat16
    state = model.state_dict()
    assert all(torch.equal(state[k], v.to(torch.bfloat16)) for k, v in original.items())
