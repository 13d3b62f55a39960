"""The memory planner (megatron_seed.planning.memory) against independent numbers: a built model's
parameters and buffers, memory measured while it trains, megatron-core's own schedule and
bytes-per-parameter figures, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from megatron_seed.config import ConfigError, load_config
from megatron_seed.planning.memory import (GIB, in_flight, layer_activation_bytes, loss_phase_bytes, parse_bytes,
                                           plan_memory, resolve_layout, stage_parameters)

# Measured in a child process: building the model starts a process group, which must not leak
# into the other tests of the session.
_MEASURE = """
import json
from megatron_seed.config import load_config
from megatron_seed.planning.measure import measure_training_memory
for overrides in {layouts!r}:
    print("MEASURED", json.dumps([overrides, measure_training_memory(load_config(None, overrides, preset="tiny"))]))
"""
_LAYOUTS = [
    ["train.precision=fp32"],  # the preset: micro-batch 2, 2 micro-batches
    ["train.precision=bf16", "train.micro_batch_size=1", "train.global_batch_size=1", "train.recompute=full",
     "data.seq_length=256"],
]


@pytest.fixture(scope="module")
def measured():
    from helpers import run_cli

    proc = run_cli([sys.executable, "-c", _MEASURE.format(layouts=_LAYOUTS)], timeout=120)
    rows = [json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines() if line.startswith("MEASURED")]
    assert len(rows) == len(_LAYOUTS), proc.stderr[-3000:]
    return rows


def test_weights_gradients_and_optimizer_match_the_built_model(measured):
    for overrides, got in measured:
        stage = plan_memory(load_config(None, overrides, preset="tiny"), device="cpu").stages[0]
        assert stage.weights == got["weights"], overrides  # every parameter of the built model
        assert stage.gradients == got["gradients"], overrides  # megatron DDP's fp32 grad buffer
        # Adam's moments (+ fp32 master weights in bf16); the optimizer also keeps step counters.
        assert abs(stage.optimizer - got["optimizer"]) <= 0.01 * got["optimizer"], (overrides, stage, got)


def test_activations_and_logits_within_15_percent_of_measured_peak(measured):
    """The peak of what the forward and backward passes allocate, counted tensor by tensor while
    the real schedule runs (one micro-batch at a time, PP=1)."""
    for overrides, got in measured:
        stage = plan_memory(load_config(None, overrides, preset="tiny"), device="cpu").stages[0]
        planned = stage.activations + stage.logits + stage.backward_working_set
        assert abs(planned - got["activations_and_logits"]) <= 0.15 * got["activations_and_logits"], (
            overrides, planned, got)


def test_tensor_and_pipeline_split_of_the_parameters():
    """tiny (h 64, ffn 176, 4 heads, 2 KV groups of 16, vocab 272, untied) over TP 2 x PP 2, by hand."""
    run = load_config(None, ["parallel.tensor=2", "parallel.pipeline=2", "train.global_batch_size=8"], preset="tiny")
    layout = resolve_layout(run, world_size=4)
    layer = (64 * (64 + 2 * 32) + 64 * 64 + 64 * 2 * 176 + 176 * 64) // 2 + 2 * 64
    assert stage_parameters(run.model, layout, 0) == layer + 272 * 64 // 2
    assert stage_parameters(run.model, layout, 1) == layer + 272 * 64 // 2 + 64
    # Tied: the last stage keeps its own copy of the embedding when PP > 1, none without PP.
    run.model.tie_embeddings = True
    assert stage_parameters(run.model, resolve_layout(run, world_size=4), 1) == layer + 272 * 64 // 2 + 64
    single = resolve_layout(load_config(None, ["model.tie_embeddings=true"], preset="tiny"))
    assert stage_parameters(run.model, single, 0) == run.model.num_parameters()


def test_bytes_per_parameter_and_the_distributed_optimizer():
    """megatron-core's documented figures: bf16 params with fp32 grads 18 bytes per parameter,
    6 + 12/d with the distributed optimizer; fp32 16 and 8 + 8/d."""
    for precision, plain, sharded in (("bf16", 18, (6, 12)), ("fp32", 16, (8, 8))):
        base = ["train.micro_batch_size=1", "train.global_batch_size=8", f"train.precision={precision}"]
        off = plan_memory(load_config(None, base, preset="llama_100m"), world_size=8).stages[0]
        on = plan_memory(load_config(None, base + ["parallel.distributed_optimizer=true"], preset="llama_100m"),
                         world_size=8).stages[0]
        assert off.weights + off.gradients + off.optimizer == plain * off.parameters
        assert on.weights + on.gradients == sharded[0] * on.parameters
        assert on.optimizer == -(-sharded[1] * on.parameters // 8)
        assert (on.weights, on.gradients, on.activations) == (off.weights, off.gradients, off.activations)


@pytest.mark.parametrize("backend", ["sdpa", "megatron"])
def test_recompute_orders_activations(backend):
    totals = {}
    for recompute in ("none", "selective", "full"):
        run = load_config(None, [f"train.recompute={recompute}", f"model.attention_backend={backend}",
                                 "data.seq_length=4096", "parallel.tensor=8", "parallel.sequence_parallel=true"],
                          preset="seed_coder_8b")
        stage = plan_memory(run, device="gpu").stages[0]
        totals[recompute] = stage.activations
        layer = sum(layer_activation_bytes(run.model, resolve_layout(run)).values())
        if recompute == "full":  # only each layer's input: [s, b, h / tp] in bf16
            assert layer == 2 * 4096 * 4096 // 8
    assert totals["none"] > totals["selective"] > totals["full"]
    if backend == "megatron":  # selective drops the [b, a, s, s] softmax: most of it at 4K
        assert totals["selective"] < 0.5 * totals["none"]


def test_in_flight_micro_batches_follow_megatron_core_schedule():
    from megatron.core.pipeline_parallel.schedules import get_pp_rank_microbatches

    for pp, vpp, micro in ((4, None, 8), (4, None, 2), (4, 2, 8), (2, 3, 4), (4, 2, 4)):
        run = load_config(None, [f"parallel.pipeline={pp}", f"parallel.virtual_pipeline={vpp or 'null'}",
                                 "train.micro_batch_size=1", f"train.global_batch_size={micro}",
                                 "model.num_layers=24"], preset="tiny")
        layout = resolve_layout(run, world_size=pp)
        for rank in range(pp):
            p2p = SimpleNamespace(pp_group=SimpleNamespace(size=lambda: pp, rank=lambda: rank),
                                  virtual_pipeline_model_parallel_size=vpp)
            total, all_warmup, warmup, _ = get_pp_rank_microbatches(micro, vpp or 1, pp, p2p_communicator=p2p)
            assert in_flight(layout, rank) == (total if all_warmup else warmup + 1), (pp, vpp, micro, rank)


def test_fused_loss_holds_weight_sized_gradient_instead_of_logits():
    run = load_config(None, ["data.seq_length=32768", "parallel.tensor=8", "parallel.sequence_parallel=true",
                             "model.kernels=triton"], preset="seed_coder_8b")
    layout = resolve_layout(run)
    fused = loss_phase_bytes(run.model, layout)
    assert fused["grad weight"] == 155136 // 8 * 4096 * 2
    assert fused["logits chunk"] <= 2 * 32768 * 4096 * 2  # about the hidden states' size
    run.model.kernels = "torch"
    unfused = loss_phase_bytes(run.model, resolve_layout(run))
    assert unfused["forward"] >= 2 * 32768 * 155136 // 8 * 2  # logits + the gradient kept for backward
    # The chunk size is the loss module's own (the planner repeats it to stay free of torch).
    from megatron_seed.models import cross_entropy
    from megatron_seed.planning import memory

    assert memory.CE_CHUNK_ELEMENTS == cross_entropy.DEFAULT_CHUNK_ELEMENTS


def _plan_cli(*args: str) -> subprocess.CompletedProcess:
    from helpers import run_cli

    return run_cli([sys.executable, "-m", "megatron_seed.plan", *args], timeout=60)


def test_cli_json_does_not_fit_then_its_suggestion_fits():
    proc = _plan_cli("--preset", "seed_coder_8b", "data.seq_length=32768", "--device-memory", "80GB", "--json")
    assert proc.returncode == 1, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["fits"] is False and plan["device_memory"] == 80 * 10**9
    assert plan["per_rank"]["total"] > plan["device_memory"]
    by_change = {" ".join(s["overrides"]): s["total"] for s in plan["suggestions"]}
    assert by_change["train.recompute=full"] < plan["per_rank"]["total"]
    assert by_change["parallel.tensor=2 parallel.sequence_parallel=true"] < plan["per_rank"]["total"]
    combined = plan["combined"]
    assert combined["fits"] and combined["total"] <= plan["device_memory"]
    again = _plan_cli("--preset", "seed_coder_8b", "data.seq_length=32768", "--device-memory", "80GB", "--json",
                      *combined["overrides"])
    assert again.returncode == 0, again.stderr
    replanned = json.loads(again.stdout)
    assert replanned["fits"] and replanned["per_rank"]["total"] == combined["total"]
    assert replanned["suggestions"] == []


def test_cli_text_and_config_errors():
    proc = _plan_cli("--preset", "seed_coder_8b", "parallel.tensor=8", "parallel.sequence_parallel=true",
                     "data.seq_length=32768", "train.recompute=full")
    assert proc.returncode == 0, proc.stderr
    assert "fits in 80.00 GiB" in proc.stdout and "optimizer state" in proc.stdout
    bad = _plan_cli("--preset", "seed_coder_8b", "parallel.tensor=16")
    assert bad.returncode == 2 and "parallel.tensor" in bad.stderr


def test_parse_bytes():
    assert parse_bytes("80GiB") == 80 * GIB
    assert parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("81920MiB") == 80 * GIB
    assert parse_bytes("1024") == 1024
    with pytest.raises(ConfigError):
        parse_bytes("eighty")
