"""The memory planner (megatron_seed.planning.memory) against independent numbers: a built model's
parameters and buffers, memory measured while it trains, megatron-core's own schedule and
bytes-per-parameter figures, and the CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest

from megatron_seed.config import ConfigError, load_config
from megatron_seed.planning.memory import (GIB, format_plan, in_flight, layer_activation_bytes, loss_phase_bytes,
                                           parse_bytes, plan_memory, resolve_layout, stage_parameters)

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


# ----------------------------------------------------------------------------- context parallelism

_8B_32K = ["data.seq_length=32768", "parallel.tensor=8", "parallel.sequence_parallel=true"]


@pytest.mark.parametrize("device", ["gpu", "cpu"])
def test_context_parallel_halves_the_activations(device):
    """Every saved tensor scales with the rank's tokens, s / cp. With Transformer Engine (gpu) the
    saved set is flash attention's, so CP=2 holds exactly half; the local ring (cpu) also saves its
    float32 output, [s / cp, b, h / tp] per layer."""
    one = plan_memory(load_config(None, _8B_32K, preset="seed_coder_8b"), device=device).worst
    run = load_config(None, _8B_32K + ["parallel.context=2"], preset="seed_coder_8b")
    two = plan_memory(run, device=device).worst
    ring = 0 if device == "gpu" else 32 * 4 * (32768 // 2) * 4096 // 8
    assert two.activations == one.activations // 2 + ring
    assert two.logits < one.logits and two.total < one.total
    assert (two.weights, two.gradients, two.optimizer) == (one.weights, one.gradients, one.optimizer)
    layout = resolve_layout(run, device=device)
    assert (layout.cp, layout.local_seq_length, layout.world_size, layout.dp) == (2, 16384, 16, 1)
    assert layout.cp_attention == ("te" if device == "gpu" else "ring")


def test_context_parallel_shards_the_distributed_optimizer_over_dp_x_cp():
    """megatron-core's distributed optimizer shards over the data-parallel group with context
    parallelism: 32 ranks of TP 2 x CP 4 are DP 4, and the state is split 16 ways."""
    base = ["parallel.tensor=2", "parallel.context=4", "train.micro_batch_size=1", "train.global_batch_size=8"]
    off = plan_memory(load_config(None, base, preset="llama_100m"), world_size=32, device="cpu").worst
    on = plan_memory(load_config(None, base + ["parallel.distributed_optimizer=true"], preset="llama_100m"),
                     world_size=32, device="cpu")
    assert on.layout.dp == 4 and on.layout.micro_batches == 2
    assert on.worst.optimizer == -(-off.optimizer // 16)
    # Even without data parallelism (8 ranks: DP 1) the state is split over the CP ranks.
    alone = plan_memory(load_config(None, base + ["parallel.distributed_optimizer=true"], preset="llama_100m"),
                        world_size=8, device="cpu")
    assert alone.layout.dp == 1 and alone.worst.optimizer == -(-off.optimizer // 4)
    text, layout = format_plan(on), on.to_dict()["layout"]
    assert "world 32 (tp 2 cp 4 pp 1 dp 4)" in text and "512 (128 per rank)" in text
    assert (layout["cp"], layout["local_seq_length"], layout["world_size"]) == (4, 128, 32)


@pytest.mark.parametrize("overrides, world, message", [
    (["parallel.context=2", "data.seq_length=66"], None, "divisible by 4"),
    (["parallel.context=2", "parallel.tensor=4", "parallel.sequence_parallel=true", "model.num_query_groups=4",
      "data.seq_length=36"], None, "data.seq_length / parallel.context (18) divisible by parallel.tensor (4)"),
    (["parallel.context=2"], 3, "parallel.context = 1 x 1 x 2"),
    (["parallel.context=2", "model.attention_backend=megatron"], None, "use sdpa"),
])
def test_invalid_context_parallel_layouts_are_config_errors(overrides, world, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        plan_memory(load_config(None, overrides, preset="tiny"), world, device="cpu")


def test_context_parallel_is_suggested_for_long_sequences_only():
    long = ["data.seq_length=131072", "model.max_position_embeddings=131072", "parallel.tensor=8",
            "parallel.sequence_parallel=true"]
    plan = plan_memory(load_config(None, long, preset="seed_coder_8b"), device_memory=80 * GIB)
    by_change = {" ".join(s.overrides): s for s in plan.suggestions}
    cp = by_change["parallel.context=2"]
    assert cp.fits and cp.total == plan_memory(load_config(None, long + ["parallel.context=2"],
                                                           preset="seed_coder_8b")).total
    short = plan_memory(load_config(None, ["data.seq_length=8192"], preset="seed_coder_8b"), device_memory=80 * GIB)
    assert short.suggestions and not any("parallel.context" in " ".join(s.overrides) for s in short.suggestions)


_MEASURE_CP = """
import json
from megatron_seed.config import load_config
from megatron_seed.planning.measure import measure_training_memory
got = measure_training_memory(load_config(None, {overrides!r}, preset="tiny"))
if got["rank"] == 0:
    print("MEASURED", json.dumps(got))
"""


def test_context_parallel_measured_on_two_ranks(tmp_path):
    """tiny with CP=2 (the ring attention on two gloo ranks) at 512 tokens, where the ring's
    float32 score blocks are about a third of the peak."""
    from helpers import free_port, run_cli

    overrides = ["parallel.context=2", "data.seq_length=512"]
    script = tmp_path / "measure_cp.py"
    script.write_text(_MEASURE_CP.format(overrides=overrides))
    proc = run_cli([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                    f"--master_port={free_port()}", str(script)], timeout=120)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("MEASURED")]
    assert proc.returncode == 0 and len(lines) == 1, proc.stderr[-3000:]
    got = json.loads(lines[0].split(" ", 1)[1])
    stage = plan_memory(load_config(None, overrides, preset="tiny"), device="cpu").stages[0]
    assert (stage.weights, stage.gradients) == (got["weights"], got["gradients"])
    assert abs(stage.optimizer - got["optimizer"]) <= 0.01 * got["optimizer"]
    planned = stage.activations + stage.logits + stage.backward_working_set
    assert stage.backward_working_set > 0.3 * planned  # the ring's blocks are what is measured here
    assert abs(planned - got["activations_and_logits"]) <= 0.15 * got["activations_and_logits"], (planned, got)


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
