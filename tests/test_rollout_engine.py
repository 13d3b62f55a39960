"""The rollout layer RL builds on: generate's log-probs, the local rollout engine, and the
in-memory weight sync from megatron-core chunks (one process, and TP=2 / PP=2 / PP=2+VPP=2 under
a 2-process torchrun on gloo).

Oracles are independent of the code under test: transformers' LlamaForCausalLM for log-probs,
megatron-core's own forward (and its pipeline schedule) for the gathered weights, and a
checkpoint written by megatron-core's dist_checkpointing and read back by CheckpointReader."""

from __future__ import annotations

import json
import sys
import zlib

import pytest
import torch

from megatron_seed.config.schema import ModelConfig
from megatron_seed.convert.hf_llama import model_config_from_hf
from megatron_seed.inference.engine import InferenceModel, KVCache, generate
from megatron_seed.inference.rollout import (LocalRolloutEngine, RolloutEngine, SamplingParams,
                                             build_rollout_engine, sample_seed)

PROMPTS = [[5, 9, 11, 3, 7], [4, 6], [10, 12, 14, 16, 18, 20, 1]]


def tiny_hf(tied: bool = False, seed: int = 0, scale: float = 15.0):
    """A 2-layer GQA Llama with non-trivial norms and an output layer scaled up so the next-token
    distributions are peaked (top-p truncates, temperature matters)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, tie_word_embeddings=tied, rope_theta=10000.0,
                         max_position_embeddings=256, rms_norm_eps=1e-5)
    model = LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
        model.lm_head.weight.mul_(scale)
    return model


def hf_weights(model) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def our_config(model) -> ModelConfig:
    return model_config_from_hf(model.config.to_dict())


# ------------------------------------------------------------------------------ generate's log-probs
@pytest.mark.parametrize("temperature,top_p,greedy", [(0.6, 0.7, False), (0.6, 1.0, False), (1.0, 1.0, True)])
def test_generate_logprobs_equal_a_full_transformers_forward(temperature, top_p, greedy):
    hf = tiny_hf()
    model = InferenceModel(our_config(hf), hf_weights(hf), torch.float32)
    out, logps = generate(model, PROMPTS, 12, temperature=temperature, top_p=top_p, greedy=greedy, seed=3,
                          return_logprobs=True)
    # The flag changes nothing about what is sampled, and without it the return is the old one.
    plain = generate(model, PROMPTS, 12, temperature=temperature, top_p=top_p, greedy=greedy, seed=3)
    assert plain == out and isinstance(plain, list)
    t = 1.0 if greedy else temperature
    truncated = 0
    for prompt, ids, lps in zip(PROMPTS, out, logps):
        assert len(ids) == len(lps) == 12
        with torch.no_grad():
            logits = hf(input_ids=torch.tensor([prompt + ids])).logits[0].float()
        steps = logits[len(prompt) - 1:len(prompt) - 1 + len(ids)] / t
        want = torch.log_softmax(steps, -1).gather(-1, torch.tensor(ids).unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(torch.tensor(lps), want, atol=1e-5, rtol=0)
        # top-p must have cut something, or a renormalized log-prob would pass unnoticed
        probs = torch.softmax(steps, -1).sort(-1, descending=True).values
        truncated += int(((probs.cumsum(-1) - probs < top_p) & (probs > 1e-3)).sum() < (probs > 1e-3).sum())
    assert truncated > 0 if top_p < 1 else truncated == 0


def test_generate_return_shapes():
    hf = tiny_hf()
    model = InferenceModel(our_config(hf), hf_weights(hf), torch.float32)
    out = generate(model, PROMPTS, 3, greedy=True)
    out_state = generate(model, PROMPTS, 3, greedy=True, return_state=True)
    both = generate(model, PROMPTS, 3, greedy=True, return_state=True, return_logprobs=True)
    assert len(out_state) == 2 and out_state[0] == out and hasattr(out_state[1], "cache")
    assert len(both) == 3 and both[0] == out and len(both[1]) == len(PROMPTS) and hasattr(both[2], "cache")


# ------------------------------------------------------------------------------ local rollout engine
def engine_for(hf, batch_size=4, dtype=torch.float32) -> LocalRolloutEngine:
    engine = LocalRolloutEngine(our_config(hf), dtype, batch_size=batch_size)
    engine.load_weights(hf_weights(hf), version=1)
    return engine


def flat(rollouts):
    return [(r.token_ids, r.finish_reason) for group in rollouts for r in group]


def test_local_engine_samples_n_per_prompt_stops_at_eos_and_is_seeded_per_rollout():
    hf = tiny_hf()
    engine = engine_for(hf, batch_size=4)
    assert isinstance(engine, RolloutEngine)
    sampling = SamplingParams(temperature=0.8, top_p=0.95, max_new_tokens=10, seed=11)
    free = engine.generate(PROMPTS, 3, sampling, eos_id=-1, pad_id=0)
    assert [len(g) for g in free] == [3, 3, 3]
    for group in free:
        assert len({tuple(r.token_ids) for r in group}) > 1, "n samples of one prompt should differ"
        for r in group:
            assert len(r.token_ids) == len(r.logprobs) == 10 and r.finish_reason == "length"
            assert all(lp <= 0 for lp in r.logprobs)
    # same seed, same rollouts, whatever the batch size; another seed, other rollouts
    for batch_size in (1, 7):
        other = LocalRolloutEngine(engine.config, torch.float32, batch_size=batch_size)
        other.load_weights(hf_weights(hf), version=1)
        again = other.generate(PROMPTS, 3, sampling, eos_id=-1, pad_id=0)
        assert flat(again) == flat(free)
        for a, b in zip(sum(again, []), sum(free, [])):
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
    reseeded = engine.generate(PROMPTS, 3, SamplingParams(0.8, 0.95, 10, seed=12), eos_id=-1, pad_id=0)
    assert flat(reseeded) != flat(free)
    # a token sampled mid-way in some rollouts but not all becomes eos: those stop right there
    seen = [set(r.token_ids[1:]) for g in free for r in g]
    eos = next(t for t in sorted(set().union(*seen)) if sum(t in s for s in seen) < len(seen))
    stopped = engine.generate(PROMPTS, 3, sampling, eos_id=eos, pad_id=0)
    reasons = set()
    for a, b in zip(sum(stopped, []), sum(free, [])):
        if eos in b.token_ids:
            k = b.token_ids.index(eos) + 1
            assert a.token_ids == b.token_ids[:k] and a.finish_reason == "stop"
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs[:k]), atol=1e-6, rtol=0)
        else:
            assert a.token_ids == b.token_ids and a.finish_reason == "length"
        reasons.add(a.finish_reason)
    assert reasons == {"stop", "length"}


# bf16: on CPUs with oneDNN the engine keeps packed weight copies, which a refresh must redo
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_local_engine_load_weights_bumps_the_version_and_changes_the_policy(dtype):
    hf1, hf2 = tiny_hf(seed=0), tiny_hf(seed=1)
    engine = engine_for(hf1, dtype=dtype)
    with pytest.raises(RuntimeError):
        LocalRolloutEngine(engine.config, torch.float32).generate(PROMPTS, 1, SamplingParams(), 0, 0)
    w1 = hf_weights(hf1)
    sampling = SamplingParams(temperature=0.6, top_p=0.9, max_new_tokens=8, seed=5)
    first = engine.generate(PROMPTS, 2, sampling, eos_id=-1, pad_id=0)
    assert engine.version == 1
    engine.load_weights(iter(hf_weights(hf2).items()), version=2)  # (name, tensor) pairs work too
    assert engine.version == 2
    second = engine.generate(PROMPTS, 2, sampling, eos_id=-1, pad_id=0)
    assert flat(second) != flat(first)
    fresh = engine_for(hf2, dtype=dtype)  # the in-place refresh gives exactly a model built from the new weights
    want = fresh.generate(PROMPTS, 2, sampling, eos_id=-1, pad_id=0)
    assert flat(second) == flat(want)
    assert [r.logprobs for g in second for r in g] == [r.logprobs for g in want for r in g]
    for name, t in hf_weights(hf1).items():  # the first weights given were copied, never written
        assert torch.equal(w1[name], t), name
    with pytest.raises(KeyError):
        engine.load_weights({"model.embed_tokens.weight": w1["model.embed_tokens.weight"]}, version=3)


def test_greedy_rollouts_are_the_argmax_path():
    hf = tiny_hf()
    engine = engine_for(hf)
    got = engine.generate(PROMPTS, 2, SamplingParams(temperature=0.0, max_new_tokens=6), eos_id=-1, pad_id=0)
    for prompt, group in zip(PROMPTS, got):
        ids = list(prompt)
        for _ in range(6):
            with torch.no_grad():
                ids.append(int(hf(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        assert [r.token_ids for r in group] == [ids[len(prompt):]] * 2


def test_build_rollout_engine_and_the_vllm_import_error():
    config = ModelConfig()
    assert isinstance(build_rollout_engine("local", config, dtype=torch.float32, batch_size=2), LocalRolloutEngine)
    with pytest.raises(ValueError):
        build_rollout_engine("sglang", config)
    assert "vllm" not in sys.modules  # importing the rollout module never imports vLLM
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install vllm"):
            build_rollout_engine("vllm", config)
    assert sample_seed(0, 1, 2) != sample_seed(0, 2, 1) and sample_seed(0, 1, 2) == sample_seed(0, 1, 2)


# ------------------------------------------------------------------------------ weight sync
def sync_config(tied: bool) -> ModelConfig:
    return ModelConfig(num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
                       vocab_size=256, rotary_base=10000.0, norm_epsilon=1e-5, tie_embeddings=tied,
                       transformer_impl="local", max_position_embeddings=256)


@torch.no_grad()
def perturb_norms(chunks) -> None:
    """Norm weights away from 1 (init gives ones), the same on every rank that holds a copy: each
    full tensor is drawn from a generator seeded by its key and layer, then sliced."""
    from megatron_seed.checkpoint.checkpointer import unwrap
    from megatron_seed.models.init import _iter_sharded_tensors

    for chunk in chunks:
        for sh in _iter_sharded_tensors(unwrap(chunk).sharded_state_dict()):
            if sh.data is None or "norm" not in sh.key or "_extra_state" in sh.key:
                continue
            k = sh.prepend_axis_num
            g = torch.Generator().manual_seed(zlib.crc32(f"{sh.key}@{tuple(sh.global_offset[:k])}".encode()))
            full = torch.rand(sh.global_shape[k:], generator=g) + 0.5
            index = tuple(slice(o, o + s) for o, s in zip(sh.global_offset[k:], sh.local_shape))
            sh.data.copy_(full[index].reshape(sh.data.shape))


def engine_logits(config: ModelConfig, weights: dict, tokens: torch.Tensor) -> torch.Tensor:
    model = InferenceModel(config, weights, torch.float32)
    b, s = tokens.shape
    positions = torch.arange(s).unsqueeze(0).expand(b, s)
    return model.forward(tokens, positions, KVCache(config, b, s, torch.float32), torch.ones(b, s, dtype=torch.bool),
                         all_logits=True)


class Wrapper(torch.nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module


@pytest.mark.parametrize("tied", [False, True])
def test_gather_in_one_process_equals_the_checkpoint_read_back(tmp_path, tied):
    from megatron.core import dist_checkpointing

    from megatron_seed.checkpoint.layout import iteration_dir, write_model_config
    from megatron_seed.checkpoint.reader import CheckpointReader
    from megatron_seed.config.schema import ParallelConfig, TrainConfig
    from megatron_seed.convert.hf_checkpoint import iter_hf_tensors
    from megatron_seed.convert.hf_llama import to_hf
    from megatron_seed.inference.weight_sync import gather_hf_weights
    from megatron_seed.models.gpt import build_model_chunks
    from megatron_seed.platform.distributed import single_process

    config = sync_config(tied)
    with single_process():
        chunks = build_model_chunks(config, ParallelConfig(), TrainConfig(precision="fp32"), seq_length=32, seed=3)
        perturb_norms(chunks)
        got = gather_hf_weights(chunks, config)
        wrapped = gather_hf_weights([Wrapper(Wrapper(chunks[0]))], config)  # as DDP(Float16Module(gpt))
        target = iteration_dir(str(tmp_path), 0)
        (tmp_path / "iter_0000000").mkdir()
        dist_checkpointing.save({"model": chunks[0].sharded_state_dict()}, target)
    write_model_config(str(tmp_path), config)
    want = dict(iter_hf_tensors(CheckpointReader(str(tmp_path)), to_hf))
    assert sorted(got) == sorted(want) == sorted(wrapped)
    assert all(torch.equal(got[name], wrapped[name]) for name in got)
    assert ("lm_head.weight" in got) == (not tied)
    for name in want:
        assert got[name].dtype == torch.float32 and torch.equal(got[name], want[name]), name
    assert any(not torch.all(t == 1) for n, t in got.items() if "norm" in n)


LAYOUTS = {"tp2": (2, 1, None), "pp2": (1, 2, None), "pp2_vpp2": (1, 2, 2)}


def test_weight_sync_under_tp2_pp2_and_vpp_gives_megatrons_own_logits(tmp_path):
    from helpers import ROOT, free_port, run_cli

    out = tmp_path / "results.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(ROOT / "tests" / "test_rollout_engine.py"), str(out)]
    proc = run_cli(cmd, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    results = json.loads(out.read_text())
    assert sorted(results) == sorted(f"{layout}/{tied}" for layout in LAYOUTS for tied in ("untied", "tied"))
    for case, r in results.items():
        assert r["keys_ok"] and r["buckets_agree"], (case, r)
        assert r["same_on_every_rank"], (case, r)
        assert r["max_abs_diff"] <= 1e-5, (case, r)
        assert r["logit_scale"] > 0.1, (case, r)  # a meaningful comparison, not zeros against zeros


# ------------------------------------------------------------------------------ the torchrun worker
def _megatron_logits(chunks, tokens: torch.Tensor, ctx) -> torch.Tensor | None:
    """megatron-core's own forward of the chunks: the model itself for one stage (TP shards
    all-gathered), its forward-only pipeline schedule otherwise. None on ranks without logits."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    b, s = tokens.shape
    positions = torch.arange(s).unsqueeze(0).expand(b, s)
    collected = []
    with torch.no_grad():
        if ctx.pp == 1:
            collected.append(chunks[0](tokens, positions, None))
        else:
            def forward_step(data_iterator, model):
                batch = next(data_iterator)
                output = model(batch, positions[:1], None)

                def collect(logits):
                    collected.append(logits.detach())
                    return logits.sum() * 0, torch.ones((), dtype=torch.int), {}

                return output, collect

            iterators = [iter(tokens.split(1)) for _ in chunks]
            get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iterators[0] if len(chunks) == 1 else iterators,
                model=chunks, num_microbatches=b, seq_length=s, micro_batch_size=1, forward_only=True)
    if not collected:
        return None
    logits = torch.cat(collected)
    if ctx.tp > 1:
        group = parallel_state.get_tensor_model_parallel_group()
        parts = [torch.empty_like(logits) for _ in range(ctx.tp)]
        torch.distributed.all_gather(parts, logits.contiguous(), group=group)
        logits = torch.cat(parts, dim=-1)
    return logits


def _worker(out_path: str) -> None:
    from megatron_seed.config.schema import ParallelConfig, TrainConfig
    from megatron_seed.inference.weight_sync import gather_hf_weights
    from megatron_seed.models.gpt import build_model_chunks
    from megatron_seed.platform.distributed import initialize, shutdown

    results = {}
    for layout, (tp, pp, vpp) in LAYOUTS.items():
        ctx = initialize(tp=tp, pp=pp, vpp=vpp)
        for tied in (False, True):
            config = sync_config(tied)
            chunks = build_model_chunks(config, ParallelConfig(tensor=tp, pipeline=pp, virtual_pipeline=vpp),
                                        TrainConfig(precision="fp32"), seq_length=24, seed=3)
            for chunk in chunks:
                chunk.eval()
            perturb_norms(chunks)
            weights = gather_hf_weights(chunks, config)
            small = gather_hf_weights(chunks, config, bucket_bytes=4096)  # many buckets per rank
            tokens = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
            theirs = _megatron_logits(chunks, tokens, ctx)
            found: list = [None] * ctx.world_size
            torch.distributed.all_gather_object(found, theirs)
            theirs = next(t for t in found if t is not None)
            ours = engine_logits(config, weights, tokens)
            digest = sorted((name, float(t.double().sum()), tuple(t.shape)) for name, t in weights.items())
            digests: list = [None] * ctx.world_size
            torch.distributed.all_gather_object(digests, digest)
            expected = {"model.embed_tokens.weight", "model.norm.weight"} | ({"lm_head.weight"} if not tied else set())
            expected |= {f"model.layers.{i}.{n}" for i in range(config.num_layers) for n in (
                "input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
                "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")}
            diffs: list = [None] * ctx.world_size
            torch.distributed.all_gather_object(diffs, float((ours - theirs).abs().max()))
            results[f"{layout}/{'tied' if tied else 'untied'}"] = {
                "keys_ok": set(weights) == expected == set(small),
                "buckets_agree": all(torch.equal(small[n], weights[n]) for n in weights), "same_on_every_rank": all(d == digests[0] for d in digests),
                "max_abs_diff": max(diffs), "logit_scale": float(theirs.abs().max())}
    if ctx.rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    shutdown()


if __name__ == "__main__":
    _worker(sys.argv[1])


def test_per_row_sampler_draws_from_the_temperature_scaled_distribution():
    # The inverse-CDF sampler used with per-row seeds at top_p 1: draw frequencies match
    # softmax(logits / T), a -inf logit is never drawn, and the returned log-probs are exact.
    from megatron_seed.inference.engine import _sample_rows

    logits = torch.tensor([[2.0, 0.5, float("-inf"), -1.0, 1.0]])
    rows = 5000
    generators = [torch.Generator().manual_seed(i) for i in range(rows)]
    tokens, logps = _sample_rows(logits.expand(rows, -1), 0.7, generators)
    want = torch.softmax(logits[0] / 0.7, -1)
    freq = torch.bincount(tokens, minlength=5).double() / rows
    assert freq[2] == 0
    assert torch.allclose(freq, want.double(), atol=0.02), (freq, want)
    assert torch.allclose(logps, torch.log_softmax(logits[0] / 0.7, -1)[tokens], atol=1e-6)
