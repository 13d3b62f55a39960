"""Supervised fine-tuning on the one trainer: the loss of a packed batch equals a per-conversation
reference computed with transformers on SmolLM2-135M-Instruct, and layouts agree."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import assert_losses_close, losses, run_pretrain

CONVERSATIONS = [
    {"messages": [{"role": "user", "content": "Write a Python function that adds two numbers."},
                  {"role": "assistant", "content": "def add(a, b):\n    return a + b"}]},
    {"messages": [{"role": "system", "content": "You are a terse coding assistant."},
                  {"role": "user", "content": "Reverse a string in Python."},
                  {"role": "assistant", "content": "s[::-1]"},
                  {"role": "user", "content": "And a list, in place?"},
                  {"role": "assistant", "content": "xs.reverse()"}]},
    {"prompt": "What does `len([1, 2, 3])` return?", "completion": "3"},
]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from megatron_seed.convert.hf_checkpoint import hf_to_mcore
    from datatrove_pipelines.oracle import smollm2_hf_dir

    root = tmp_path_factory.mktemp("smollm2_sft")
    hf = smollm2_hf_dir()
    hf_to_mcore(hf, str(root / "ours"), torch.float32)
    return hf, root / "ours"


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def reference_loss(hf_dir: str) -> tuple[float, int]:
    """Each conversation alone through transformers (float64): apply_chat_template, the model's own forward,
    loss on the tokens each assistant turn adds (its content and <|im_end|>), token-weighted."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    # float64: the reference is the exact value our fp32 run approximates, not another fp32
    # rounding of it (two fp32 implementations disagree by ~1e-5 on a 25-token mean by themselves)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float64).eval()
    end = tok.convert_tokens_to_ids("<|im_end|>")
    total, count = 0.0, 0
    for record in CONVERSATIONS:
        messages = record.get("messages") or [{"role": "user", "content": record["prompt"]},
                                              {"role": "assistant", "content": record["completion"]}]
        ids = list(tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
        mask = [False] * len(ids)
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = tok.apply_chat_template(messages[:i], tokenize=True, add_generation_prompt=True,
                                             return_dict=True)["input_ids"]
            upto = tok.apply_chat_template(messages[:i + 1], tokenize=True, return_dict=True)["input_ids"]
            assert list(upto[:len(before)]) == list(before) and ids[:len(upto)] == list(upto)
            stop = len(upto) - 1 - list(upto)[::-1].index(end)  # the turn's <|im_end|>, not the newline after
            for t in range(len(before), stop + 1):
                mask[t] = True
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        targets = torch.tensor(ids[1:])
        per_token = torch.nn.functional.cross_entropy(logits[:-1], targets, reduction="none")
        keep = torch.tensor(mask[1:])
        total += float(per_token[keep].sum())
        count += int(keep.sum())
    return total / count, count


def test_packed_batch_loss_equals_per_conversation_transformers_reference(smollm2, tmp_path):
    hf, ckpt = smollm2
    data = write_jsonl(tmp_path / "sft.jsonl", CONVERSATIONS)
    run_pretrain(tmp_path / "run", "--preset", "smollm2_135m", f"train.load={ckpt}", "train.finetune=true",
                 f"data.train={data}", f"data.tokenizer={hf}", f"data.cache_dir={tmp_path / 'cache'}",
                 "data.seq_length=192", "train.precision=fp32", "train.steps=1", "train.global_batch_size=1",
                 "train.micro_batch_size=1", "optimizer.lr=0", "optimizer.min_lr=0", "optimizer.warmup_steps=0",
                 module="megatron_seed.sft", timeout=600)
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    want, count = reference_loss(hf)
    assert record["loss_tokens"] == count  # the same tokens carry loss: no more, no fewer
    print(f"packed loss {record['loss']:.8f} vs per-conversation transformers {want:.8f} over {count} tokens")
    assert abs(record["loss"] - want) < 1e-5, (record["loss"], want)
    # all three conversations were packed into the one row
    assert 0.5 < record["packing_efficiency"] <= 1.0


TINY = ("--preset", "tiny", "data.tokenizer=byte", "model.vocab_size=512", "data.seq_length=96",
        "train.precision=fp32", "train.steps=3", "optimizer.lr=1e-3", "optimizer.warmup_steps=0")


def tiny_conversations(n=24):
    rng = __import__("random").Random(0)
    out = []
    for i in range(n):
        words = " ".join(rng.choice(["def", "x", "return", "list", "sort", "(", ")"]) for _ in range(rng.randint(2, 12)))
        out.append({"messages": [{"role": "user", "content": f"task {i}: {words}"},
                                 {"role": "assistant", "content": words[::-1] * rng.randint(1, 3)}]})
    return out


def test_layouts_and_micro_batching_give_the_same_sft_losses(tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", tiny_conversations())
    common = (*TINY, f"data.train={data}", f"data.cache_dir={tmp_path / 'cache'}", "train.global_batch_size=4")
    run_pretrain(tmp_path / "ref", *common, "train.micro_batch_size=4", f"train.save={tmp_path / 'ckpt'}",
                 "train.save_interval=2", module="megatron_seed.sft")
    ref = losses(tmp_path / "ref")
    # exact resume: the data position (packed rows consumed) comes back with the checkpoint
    run_pretrain(tmp_path / "resumed", *common, "train.micro_batch_size=4",
                 f"train.load={tmp_path / 'ckpt' / 'iter_0000002'}", module="megatron_seed.sft")
    assert losses(tmp_path / "resumed") == {3: ref[3]}
    # with a validation set: evaluation runs on its packed rows, training is unchanged
    proc = run_pretrain(tmp_path / "acc", *common, "train.micro_batch_size=1", f"data.valid={data}",
                        "train.eval_interval=3", "train.eval_steps=1", module="megatron_seed.sft")
    assert_losses_close(losses(tmp_path / "acc"), ref, atol=1e-6)
    assert "step 3: validation loss" in proc.stderr + proc.stdout
    run_pretrain(tmp_path / "dp2", *common, "train.micro_batch_size=1", nproc=2, module="megatron_seed.sft")
    assert_losses_close(losses(tmp_path / "dp2"), ref, atol=1e-6)
    run_pretrain(tmp_path / "pp2", *common, "train.micro_batch_size=1", "parallel.pipeline=2", nproc=2,
                 module="megatron_seed.sft")
    assert_losses_close(losses(tmp_path / "pp2"), ref, atol=1e-6)
    run_pretrain(tmp_path / "tp2", *common, "train.micro_batch_size=2", "parallel.tensor=2", nproc=2,
                 module="megatron_seed.sft")
    assert_losses_close(losses(tmp_path / "tp2"), ref, atol=1e-5)
    # THD (Transformer Engine's packed format, here through SDPA): each micro-batch one row of
    # sequences delimited by cu_seqlens, with sequence parallelism splitting that row
    run_pretrain(tmp_path / "thd", *common, "train.micro_batch_size=2", "parallel.tensor=2",
                 "parallel.sequence_parallel=true", "data.packed_format=thd", nproc=2, module="megatron_seed.sft")
    assert_losses_close(losses(tmp_path / "thd"), ref, atol=1e-5)
    # context parallelism: each packed row split over 2 ranks, block-diagonal masks from segment ids
    proc = run_pretrain(tmp_path / "cp2", *common, "train.micro_batch_size=2", "parallel.context=2", nproc=2,
                        module="megatron_seed.sft")
    assert "cp 2" in proc.stderr + proc.stdout
    assert_losses_close(losses(tmp_path / "cp2"), ref, atol=1e-5)
    assert ref[3] < ref[1]  # it learns
    # an SFT checkpoint is an ordinary one: it exports to Hugging Face and loads in transformers
    from transformers import AutoModelForCausalLM

    from megatron_seed.convert.hf_checkpoint import mcore_to_hf

    mcore_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"))
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
    assert model.config.num_hidden_layers == 2 and model.config.vocab_size == 512


def test_packed_format_follows_the_attention(monkeypatch):
    """auto: a mask for our attention, THD for Transformer Engine's (whose causal attention ignores
    a mask: a mask there would let packed samples see each other, so it is refused)."""
    import megatron_seed.models.gpt as gpt
    from megatron_seed.config import ConfigError, run_preset
    from megatron_seed.training.objectives.sft import resolve_packed_format

    run = run_preset("tiny")
    assert resolve_packed_format(run) == "mask"
    monkeypatch.setattr(gpt, "resolve_impl", lambda model: "transformer_engine")
    assert resolve_packed_format(run) == "thd"
    run.data.packed_format = "mask"
    with pytest.raises(ConfigError, match="its causal attention ignores the mask"):
        resolve_packed_format(run)
    run.data.packed_format, run.parallel.context = "auto", 2
    with pytest.raises(ConfigError, match=r"thd \(data.packed_format=auto on the Transformer Engine spec\) is not "
                                          "supported with parallel.context > 1"):
        resolve_packed_format(run)
