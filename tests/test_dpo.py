"""DPO on the one trainer: sequence log-probs equal transformers' on SmolLM2-135M-Instruct, the
first step from the reference is ln 2, precomputed and live references agree, layouts and
micro-batching give the same losses, resume is exact."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from helpers import assert_losses_close, losses, run_pretrain

TINY = ("--preset", "tiny", "data.tokenizer=byte", "model.vocab_size=512", "data.seq_length=96",
        "train.precision=fp32", "optimizer.lr=1e-3", "optimizer.warmup_steps=0")


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def tiny_pairs(n=24):
    rng = random.Random(0)
    out = []
    for i in range(n):
        words = " ".join(rng.choice(["def", "x", "return", "list", "sort", "(", ")"]) for _ in range(rng.randint(2, 10)))
        prompt = f"task {i}: {words}" if i % 3 else [{"role": "system", "content": "be brief"},
                                                     {"role": "user", "content": f"task {i}: {words}"}]
        out.append({"prompt": prompt, "chosen": words[::-1] * rng.randint(1, 2),
                    "rejected": [{"role": "assistant", "content": words + " no"}]})
    return out


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """Two tiny checkpoints: the policy's start (2 steps) and a different reference (4 steps)."""
    root = tmp_path_factory.mktemp("dpo_start")
    for steps in (2, 4):
        run_pretrain(root / f"pre{steps}", *TINY, "data.mock=true", f"train.steps={steps}",
                     f"train.save={root / f'ckpt{steps}'}")
    pairs = tiny_pairs()
    pairs.insert(5, {"prompt": "x", "chosen": "y"})  # no rejected: skipped and counted
    return root / "ckpt2", root / "ckpt4", write_jsonl(root / "pairs.jsonl", pairs)


def dpo(run_dir, ckpt, data, *extra, nproc=1):
    return run_pretrain(run_dir, *TINY, f"train.load={ckpt}", "train.finetune=true", f"data.train={data}",
                        f"data.cache_dir={run_dir.parent / 'cache'}", "data.seq_length=256", "train.steps=3",
                        "train.global_batch_size=4",
                        *extra, nproc=nproc, module="megatron_seed.dpo")


def test_dpo_from_the_reference_starts_at_ln2_and_precomputed_equals_live(start, tmp_path):
    ckpt2, ckpt4, data = start
    proc = dpo(tmp_path / "pre", ckpt2, data, "train.micro_batch_size=4")
    out = proc.stdout + proc.stderr
    # the pair without a rejected side, and two whose two sequences do not fit a row of 256
    assert "records in 25 = written 22 + skipped 3 (missing_key 1, too_long 2)" in out
    assert "reference log-probs from" in out
    first = metrics(tmp_path / "pre")[0]
    # policy == reference at step 1: every reward is 0 and the sigmoid loss is ln 2
    assert abs(first["loss"] - math.log(2)) < 1e-6, first
    assert abs(first["rewards/margins"]) < 1e-6 and first["pairs"] >= 4  # 4 rows of whole pairs
    ref = losses(tmp_path / "pre")
    assert ref[3] < ref[1]  # it learns to prefer chosen
    # the cached reference log-probs are reused by a second run, which trains identically
    proc = dpo(tmp_path / "again", ckpt2, data, "train.micro_batch_size=4")
    assert "reference log-probs reused from" in proc.stdout + proc.stderr
    assert losses(tmp_path / "again") == ref
    dpo(tmp_path / "live", ckpt2, data, "train.micro_batch_size=4", "ref.mode=live")
    assert_losses_close(losses(tmp_path / "live"), ref, atol=1e-6)
    # another reference: not ln 2 any more, and live still equals precomputed
    dpo(tmp_path / "pre4", ckpt2, data, "train.micro_batch_size=4", f"ref.load={ckpt4}")
    dpo(tmp_path / "live4", ckpt2, data, "train.micro_batch_size=4", f"ref.load={ckpt4}", "ref.mode=live")
    other = losses(tmp_path / "pre4")
    assert abs(other[1] - math.log(2)) > 1e-3
    assert_losses_close(losses(tmp_path / "live4"), other, atol=1e-6)


def test_dpo_layouts_micro_batching_and_resume_agree(start, tmp_path):
    ckpt2, _, data = start
    common = ("dpo.beta=0.5", "dpo.sft_weight=0.3")
    dpo(tmp_path / "mb4", ckpt2, data, "train.micro_batch_size=4", *common, f"train.save={tmp_path / 'ckpt'}",
        "train.save_interval=2")
    ref = losses(tmp_path / "mb4")
    dpo(tmp_path / "resumed", ckpt2, data, "train.micro_batch_size=4", *common,
        f"train.load={tmp_path / 'ckpt' / 'iter_0000002'}", "train.finetune=false")
    assert losses(tmp_path / "resumed") == {3: ref[3]}
    dpo(tmp_path / "mb1", ckpt2, data, "train.micro_batch_size=1", *common)
    assert_losses_close(losses(tmp_path / "mb1"), ref, atol=1e-6)
    dpo(tmp_path / "dp2", ckpt2, data, "train.micro_batch_size=1", *common, nproc=2)
    assert_losses_close(losses(tmp_path / "dp2"), ref, atol=1e-6)
    dpo(tmp_path / "pp2", ckpt2, data, "train.micro_batch_size=1", "parallel.pipeline=2", *common, nproc=2)
    assert_losses_close(losses(tmp_path / "pp2"), ref, atol=1e-6)
    dpo(tmp_path / "tp2", ckpt2, data, "train.micro_batch_size=2", "parallel.tensor=2", *common, nproc=2)
    assert_losses_close(losses(tmp_path / "tp2"), ref, atol=1e-5)
    # every TRL metric is logged per step
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected"):
        assert key in metrics(tmp_path / "mb4")[-1]


def test_live_reference_with_pipeline_parallelism_is_a_config_error(start, tmp_path):
    ckpt2, _, data = start
    proc = run_pretrain(tmp_path / "r", *TINY, f"train.load={ckpt2}", "train.finetune=true", f"data.train={data}",
                        "parallel.pipeline=2", "ref.mode=live", nproc=2, module="megatron_seed.dpo", check=False)
    assert proc.returncode != 0 and "ref.mode=live needs parallel.pipeline=1" in proc.stdout + proc.stderr


SMOL_PAIRS = [
    {"prompt": "Write a Python function that adds two numbers.",
     "chosen": "def add(a, b):\n    return a + b", "rejected": "def add(a, b):\n    return a - b"},
    {"prompt": [{"role": "system", "content": "You are a terse coding assistant."},
                {"role": "user", "content": "Reverse a string in Python."}],
     "chosen": [{"role": "assistant", "content": "s[::-1]"}], "rejected": "reversed(s)"},
]


def test_sequence_logps_equal_transformers_on_smollm2(tmp_path):
    """logps/chosen and logps/rejected at step 1 are the sums over completion tokens (content and
    <|im_end|>) of log-probs that transformers computes on the chat-templated conversation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from datatrove_pipelines.oracle import smollm2_hf_dir
    from megatron_seed.convert.hf_checkpoint import hf_to_mcore

    hf = smollm2_hf_dir()
    hf_to_mcore(hf, str(tmp_path / "ours"), torch.float32)
    data = write_jsonl(tmp_path / "pairs.jsonl", SMOL_PAIRS)
    run_pretrain(tmp_path / "run", "--preset", "smollm2_135m", f"train.load={tmp_path / 'ours'}",
                 "train.finetune=true", f"data.train={data}", f"data.tokenizer={hf}", "data.seq_length=256",
                 f"data.cache_dir={tmp_path / 'cache'}", "data.packing=false", "train.micro_batch_size=1",
                 "train.global_batch_size=2", "train.steps=1", "train.precision=fp32", "optimizer.lr=1e-9",
                 "optimizer.min_lr=0", module="megatron_seed.dpo")
    got = metrics(tmp_path / "run")[0]
    tok = AutoTokenizer.from_pretrained(hf)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float64).eval()
    want = {"chosen": [], "rejected": []}
    for pair in SMOL_PAIRS:
        prompt = pair["prompt"] if isinstance(pair["prompt"], list) else [{"role": "user", "content": pair["prompt"]}]
        n_prompt = len(tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False))
        for side in ("chosen", "rejected"):
            reply = pair[side] if isinstance(pair[side], list) else [{"role": "assistant", "content": pair[side]}]
            ids = tok.apply_chat_template(prompt + reply, tokenize=True, return_dict=False)
            # the completion: assistant content and <|im_end|>, not the newline the template adds after it
            end = ids.index(tok.convert_tokens_to_ids("<|im_end|>"), n_prompt) + 1
            with torch.no_grad():
                logits = model(torch.tensor([ids[:end]])).logits[0]
            logp = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:end])[:, None])[:, 0]
            want[side].append(float(logp[n_prompt - 1:].sum()))
    for side in ("chosen", "rejected"):
        mean = sum(want[side]) / len(want[side])
        print(f"logps/{side}: ours {got[f'logps/{side}']:.6f} transformers {mean:.6f}")
        assert abs(got[f"logps/{side}"] - mean) < 1e-4 * max(1.0, abs(mean)), (side, got, want)
    assert abs(got["loss"] - math.log(2)) < 1e-6
