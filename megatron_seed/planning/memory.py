"""Per-rank device memory of a training layout, computed from the config alone (no torch import).

Every term follows what this project's training stack actually allocates:

* **weights**: this rank's parameters (``ModelConfig.num_parameters()`` split over TP and PP; the
  embedding on the first stage, output layer and final norm on the last; a tied embedding gets a
  copy on the last stage when PP > 1, as megatron-core does) in the params dtype (bf16: 2 bytes,
  fp32: 4).
* **gradients**: megatron-core DDP's grad buffer, fp32 for any params dtype
  (``grad_reduce_in_fp32=True`` in ``training/optimizer_setup.py``): 4 bytes per parameter, full size even
  with the distributed optimizer (it reduce-scatters in place).
* **optimizer state**: Adam's m and v (fp32) plus, for bf16 params, fp32 master weights: 8 or 12
  bytes per parameter, divided by the data-parallel size times the context-parallel size with
  ``parallel.distributed_optimizer`` (megatron-core shards it over the DP x CP group).
* **activations**: the tensors autograd saves for one micro-batch (counted tensor by tensor from
  the local layer spec, see :func:`layer_activation_bytes`) times the micro-batches in flight on
  the rank: 1 without PP, ``min(pp - rank, m)`` for 1F1B, ``min(2 (pp - rank - 1) + (v - 1) pp + 1,
  m v)`` chunks of ``L / (pp v)`` layers for the interleaved schedule (megatron-core's warm-up
  counts). This is Korthikanti et al.'s ``s b h (34 + 5 a s / h)`` per layer, re-derived for GQA,
  SwiGLU, RMSNorm and SDPA (which keeps no ``s x s`` scores, so their ``5 a s / h`` term appears only
  with ``model.attention_backend=megatron``).
* **logits**: the loss phase of the last stage. The chunked cross entropy
  (``models/cross_entropy.py``) holds the lm-head output ``[s, b, vocab / tp]`` in the compute dtype
  and writes its gradient, same size, into a buffer kept for backward; then the output layer's
  backward holds that buffer with ``d hidden`` and a weight-sized ``d weight``. With
  ``model.kernels=triton`` the fused linear cross-entropy holds instead ``d hidden``, a weight-sized
  gradient in the weight's dtype and one chunk of logits.
* **backward working set**: gradients in flight inside one layer's backward (and, with full
  recompute, that layer's recomputed activations), beyond what the loss phase already needed.
* **context parallelism** (``parallel.context``): every term that scales with the sequence uses
  the rank's ``s / cp`` tokens; the context-parallel attention's own saved tensors and working
  buffers (the local ring's fp32 score blocks, Transformer Engine's p2p buffers) are in
  :mod:`megatron_seed.planning.context_parallel`.
* **allowance** (GPU only): CUDA context, cuBLAS/NCCL workspaces and caching-allocator slack:
  ``GPU_CONTEXT_BYTES`` plus ``GPU_FRAGMENTATION`` of the memory freed and re-allocated every step.

Not modelled: FP8 scaling state (weights are counted in bf16), dropout masks (the presets use no
dropout), the batch's token ids (< 0.1%), and on CPU the Python/torch runtime itself.
``megatron_seed.planning.measure`` measures every category on a real run of the layout (what
``python -m megatron_seed.plan --measure`` prints).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from megatron_seed.config.schema import ConfigError, ModelConfig, ObjectiveChecks, RunConfig
from megatron_seed.planning.context_parallel import attention_working_bytes
from megatron_seed.platform import units

GIB = 2**30
# CUDA context (~0.5 GiB on H100), cuBLAS workspaces and NCCL communicator buffers.
GPU_CONTEXT_BYTES = 1 * GIB
# Caching-allocator slack on what is freed and re-allocated every step (activations, logits): the
# reserved-minus-allocated gap measured in Megatron runs is typically a few percent.
GPU_FRAGMENTATION = 0.05
# megatron_seed.models.cross_entropy.DEFAULT_CHUNK_ELEMENTS (repeated: that module imports torch).
CE_CHUNK_ELEMENTS = 1 << 19
# Context parallelism is proposed for long sequences whose activations dominate the rank's memory,
# and only while every rank keeps at least this many tokens of each sequence: with fewer, the
# ring's key/value transfers stop hiding behind the attention compute and recompute or TP cost less.
CP_MIN_LOCAL_TOKENS = 8192


@dataclass(frozen=True)
class Layout:
    """What the plan depends on, resolved from a run config for a device kind."""

    tp: int
    pp: int
    vpp: Optional[int]
    sp: bool
    cp: int  # context parallel: every sequence split over cp ranks
    cp_attention: str  # none | ring (local spec) | te (Transformer Engine's p2p ring)
    dp: int
    distributed_optimizer: bool
    seq_length: int
    micro_batch_size: int
    global_batch_size: int
    micro_batches: int
    recompute: str
    precision: str  # bf16 | fp32 (auto resolved for the device)
    kernels: str  # torch | triton (auto resolved for the device)
    attention: str  # sdpa | megatron
    fused_loss: bool  # Triton fused linear cross-entropy holds the lm-head loss
    device: str  # gpu | cpu

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def local_seq_length(self) -> int:
        """Tokens of each sequence on one rank: everything but the attention's key/value exchange
        runs on these."""
        return self.seq_length // self.cp

    @property
    def compute_bytes(self) -> int:
        return 2 if self.precision == "bf16" else 4


@dataclass
class StageMemory:
    """Peak bytes of one pipeline rank, by category."""

    pipeline_rank: int
    parameters: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    backward_working_set: int
    allowance: int
    layers: int
    micro_batches_in_flight: int  # chunks of ``layers / vpp`` layers with the interleaved schedule

    @property
    def total(self) -> int:
        return (self.weights + self.gradients + self.optimizer + self.activations + self.logits
                + self.backward_working_set + self.allowance)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "total": self.total}


@dataclass
class Suggestion:
    change: str
    overrides: list[str]
    total: int
    fits: bool


@dataclass
class MemoryPlan:
    name: str
    layout: Layout
    stages: list[StageMemory]
    per_layer_activation_bytes: int  # one layer, one micro-batch, as saved in the forward pass
    device_memory: Optional[int] = None
    suggestions: list[Suggestion] = field(default_factory=list)
    combined: Optional[Suggestion] = None  # suggestions applied in order until the layout fits
    notes: list[str] = field(default_factory=list)

    @property
    def worst(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.total)

    @property
    def total(self) -> int:
        return self.worst.total

    @property
    def fits(self) -> Optional[bool]:
        return None if self.device_memory is None else self.total <= self.device_memory

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "layout": {**dataclasses.asdict(self.layout), "world_size": self.layout.world_size,
                       "local_seq_length": self.layout.local_seq_length},
            "per_rank": self.worst.to_dict(),
            "stages": [s.to_dict() for s in self.stages],
            "per_layer_activation_bytes": self.per_layer_activation_bytes,
            "device_memory": self.device_memory,
            "fits": self.fits,
            "suggestions": [dataclasses.asdict(s) for s in self.suggestions],
            "combined": dataclasses.asdict(self.combined) if self.combined else None,
            "notes": list(self.notes),
        }


# ----------------------------------------------------------------------------- layout


def resolve_layout(run: RunConfig, world_size: Optional[int] = None, device: str = "gpu",
                   objective: Optional[ObjectiveChecks] = None) -> Layout:
    """The layout a launch of ``run`` on ``world_size`` ranks (default: one data-parallel replica)
    of ``device`` ("gpu" or "cpu") gets, after the run config's own validation."""
    if device not in ("gpu", "cpu"):
        raise ConfigError(f"device must be 'gpu' or 'cpu', got {device!r}")
    p, t, m = run.parallel, run.train, run.model
    world = world_size if world_size is not None else p.tensor * p.pipeline * p.context
    checked = copy.deepcopy(run)
    # Planning needs no data files: validate the layout as if the data were synthetic.
    checked.data.mock, checked.data.blend, checked.data.train = True, [], None
    checked.validate(world, objective)
    _require_divisible(m.vocab_size, p.tensor, "model.vocab_size", "parallel.tensor")
    precision = t.precision if t.precision != "auto" else ("bf16" if device == "gpu" else "fp32")
    kernels = m.kernels if m.kernels != "auto" else ("triton" if device == "gpu" else "torch")
    dp = run.data_parallel_size(world)
    cp_attention = "none"
    if p.context > 1:
        # On GPU megatron_seed.models.gpt picks Transformer Engine's spec unless told otherwise.
        cp_attention = "te" if device == "gpu" and m.transformer_impl != "local" else "ring"
    return Layout(
        tp=p.tensor, pp=p.pipeline, vpp=p.virtual_pipeline, sp=p.sequence_parallel, cp=p.context,
        cp_attention=cp_attention, dp=dp,
        distributed_optimizer=p.distributed_optimizer, seq_length=run.data.seq_length,
        micro_batch_size=t.micro_batch_size, global_batch_size=t.global_batch_size,
        micro_batches=t.global_batch_size // (t.micro_batch_size * dp), recompute=t.recompute,
        precision=precision, kernels=kernels, attention=m.attention_backend,
        # build_model_chunks keeps the unfused loss under FP8 emulation (it works on the output layer).
        fused_loss=kernels == "triton" and not t.fp8, device=device)


def _require_divisible(value: int, by: int, name: str, by_name: str) -> None:
    if value % by:
        raise ConfigError(f"{name} ({value}) must be divisible by {by_name} ({by}) for the vocab-parallel "
                          "embedding and output layer")


# ----------------------------------------------------------------------------- parameters


def stage_parameters(model: ModelConfig, layout: Layout, rank: int) -> int:
    """Parameters held by pipeline rank ``rank`` on one tensor-parallel rank. Layer, embedding and
    output sizes are taken apart from ``model.num_parameters()`` so the two cannot disagree."""
    h, v, L = model.hidden_size, model.vocab_size, model.num_layers
    embedding = v * h
    output = 0 if model.tie_embeddings else v * h
    per_layer, rest = divmod(model.num_parameters() - embedding - output - h, L)
    assert rest == 0, "ModelConfig.num_parameters() is not layers x per-layer + embeddings + final norm"
    replicated = 2 * h  # the two RMSNorm weights: whole on every tensor-parallel rank
    sharded = per_layer - replicated
    params = (L // layout.pp) * (sharded // layout.tp + replicated)
    if rank == 0:
        params += embedding // layout.tp
    if rank == layout.pp - 1:
        params += h  # final norm
        if not model.tie_embeddings:
            params += output // layout.tp
        elif layout.pp > 1:  # megatron-core keeps a synchronised copy of the tied weight there
            params += embedding // layout.tp
    return params


def optimizer_bytes_per_parameter(layout: Layout) -> int:
    """Adam m and v in fp32, and fp32 master weights when the model's params are bf16."""
    return 12 if layout.precision == "bf16" else 8


# ----------------------------------------------------------------------------- activations


def _norm_bytes_per_element(layout: Layout) -> int:
    """Bytes autograd keeps per element of an RMSNorm input. The Triton kernel saves its input; the
    torch path (``F.rms_norm`` as torch runs it on CPU, a composite of elementwise ops) keeps the
    float32 input and the float32 normalised output, in either precision (measured)."""
    return layout.compute_bytes if layout.kernels == "triton" else 8


def layer_activation_bytes(model: ModelConfig, layout: Layout, micro_batch_size: Optional[int] = None,
                           recompute: Optional[str] = None) -> dict[str, int]:
    """Bytes one transformer layer saves for backward in one micro-batch, by tensor group.

    Local spec, tensor by tensor (``e`` bytes per element, ``n = s b`` tokens, SP region ``/ t``
    with sequence parallelism, TP region always ``/ t``):
    two RMSNorms (input and rstd) and the two column-parallel linears' inputs (qkv, fc1) in the SP
    region; RoPE'd q and k, the whole qkv output (the value is a view of it), the attention output
    (also linear_proj's input) and SDPA's log-sum-exp; fc1's output [n, 2 ffn] (gate and up are
    views of it), silu(gate) (torch SwiGLU only: the Triton kernel recomputes it) and the SwiGLU
    output (fc2's input); RoPE's cos/sin [s, d] per rotated tensor. ``recompute=selective``
    checkpoints core attention: its inputs stay saved, so with SDPA only the log-sum-exp goes; with
    the unfused megatron attention the ``[b, a, s, s]`` softmax (fp32, plus a bf16 copy) goes.
    ``recompute=full`` keeps only each layer's input. With context parallelism ``s`` is the local
    sequence ``s / cp``; the local ring attention also saves its float32 output
    (:mod:`.context_parallel`)."""
    e, t = layout.compute_bytes, layout.tp
    q = t if layout.sp else 1
    b = micro_batch_size or layout.micro_batch_size
    s = layout.local_seq_length
    n = s * b
    h, f, a, d = model.hidden_size, model.ffn_hidden_size, model.num_attention_heads, model.head_dim
    kv = model.num_query_groups * d
    recompute = recompute or layout.recompute
    if recompute == "full":
        return {"layer input": n * e * h // q}
    terms = {
        "norms": 2 * n * (_norm_bytes_per_element(layout) * h + 4) // q,
        "linear inputs": 2 * n * e * h // q,
        "rope": 4 * s * d * e,
    }
    if layout.attention == "megatron" and recompute == "none":
        # q, k and v repeated to all heads (GQA), the context, softmax probabilities in fp32 and,
        # in bf16, the copy the value matmul reads.
        terms["attention"] = n * e * 4 * h // t
        terms["attention scores"] = n * (a // t) * s * (4 + (2 if e == 2 else 0))
    else:
        terms["attention"] = n * e * (3 * h + 3 * kv) // t
        if recompute == "none":
            terms["attention lse"] = n * 4 * (a // t)
            if layout.cp_attention == "ring":
                # Its float32 output; "attention" above already has linear_proj's [s, b, h] copy.
                terms["ring output (fp32)"] = n * 4 * h // t
    terms["mlp"] = n * e * (3 * f + (0 if layout.kernels == "triton" else f)) // t
    return terms


def layer_backward_bytes(model: ModelConfig, layout: Layout) -> int:
    """Bytes above the saved activations at the worst point of one layer's backward, its MLP
    (``e`` bytes per element, ``n`` tokens): the incoming gradient ``[n, h]`` stays alive
    throughout, and on top of it the largest of
    fc2's backward (``d input [n, ffn]`` and ``d weight [h, ffn]``), the SwiGLU backward (two
    ffn-wide gradients) and fc1's backward (``d fc1-output [n, 2 ffn]``, ``d input [n, h]`` and
    ``d weight [2 ffn, h]``, held until DDP's hook adds it to the fp32 grad buffer, while the MLP's
    saved tensors are already freed)."""
    e, t = layout.compute_bytes, layout.tp
    q = t if layout.sp else 1
    n = layout.local_seq_length * layout.micro_batch_size
    h, f = model.hidden_size, model.ffn_hidden_size
    mlp_saved = n * (3 * f + (0 if layout.kernels == "triton" else f)) // t
    fc2 = n * f // t + f * h // t
    swiglu = 2 * n * f // t
    fc1 = 2 * n * f // t + n * h + 2 * f * h // t - mlp_saved
    return e * (n * h // q + max(fc2, swiglu, fc1))


def attention_backward_bytes(model: ModelConfig, layout: Layout) -> int:
    """With context parallelism, the worst point of one layer's attention backward above the saved
    activations: the ring's working set (:func:`.context_parallel.attention_working_bytes`, whole
    ``[b, heads, s/cp, s/cp]`` score blocks on the local spec) with the incoming residual gradient
    and the attention output's gradient alive, less what the layer has freed by then (its MLP
    half's saved tensors and linear_proj's input). With selective recompute the ring's forward runs
    again first and its output and log-sum-exp are alive too. 0 without CP."""
    if layout.cp == 1:
        return 0
    e, t = layout.compute_bytes, layout.tp
    q = t if layout.sp else 1
    n = layout.local_seq_length * layout.micro_batch_size
    h = model.hidden_size
    saved = layer_activation_bytes(model, layout, recompute="none")
    freed = saved["norms"] // 2 + saved["linear inputs"] // 2 + saved["mlp"] + n * e * h // t
    alive = n * e * h // q + n * e * h // t
    if layout.recompute == "selective":
        alive += saved.get("ring output (fp32)", 0) + saved["attention lse"]
    return attention_working_bytes(model, layout) + alive - freed


def loss_phase_bytes(model: ModelConfig, layout: Layout) -> dict[str, int]:
    """Peak of the last stage's lm-head and loss, above the saved activations.

    Unfused (``models/cross_entropy.py``): forward holds the logits, the gradient buffer it fills for
    backward (same size and dtype) and one float32 chunk; backward holds the buffer, ``d hidden``
    and the output layer's weight gradient. Fused (``kernels/fused_linear_cross_entropy.py``): the
    gathered hidden states it saves, ``d hidden`` and ``d weight`` computed in forward (weight's
    dtype) and one chunk of logits about as large as the hidden states."""
    e, t = layout.compute_bytes, layout.tp
    n = layout.local_seq_length * layout.micro_batch_size
    h, v = model.hidden_size, model.vocab_size // t
    weight_grad = v * h * e
    if layout.fused_loss:
        chunk_rows = min(n, _next_power_of_2(-(-n // max(1, -(-v // h)))))
        return {"hidden": n * h * e, "grad hidden": n * h * e, "grad weight": weight_grad,
                "logits chunk": chunk_rows * v * e, "per-token": 9 * n}
    chunk_rows = min(n, max(1, CE_CHUNK_ELEMENTS // v))
    # The previous float32 chunk is still referenced while the next one is made: two are alive
    # whenever there is a next one (several chunks, or the later passes of the TP path).
    chunks = 2 if (t > 1 or chunk_rows < n) else 1
    logits = n * v * e
    # Per token: loss, sum of exps, target logit (fp32), labels and local indices (int64), the
    # in-slice mask; with TP also the row max and the stacked all-reduce buffer.
    per_token = (37 if t == 1 else 53) * n
    forward = 2 * logits + chunks * chunk_rows * v * 4 + per_token
    backward = logits + n * h * e + weight_grad
    return {"forward": forward, "backward": backward}


def _next_power_of_2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def in_flight(layout: Layout, rank: int) -> int:
    """Micro-batches (interleaved: model chunks of micro-batches) whose activations rank ``rank``
    holds at once: megatron-core's warm-up forward passes plus the one in its 1F1B steady state."""
    p, m, v = layout.pp, layout.micro_batches, layout.vpp
    if p == 1:
        return 1
    if v is None:
        return min(p - rank, m)
    return min(2 * (p - rank - 1) + (v - 1) * p + 1, m * v)


# ----------------------------------------------------------------------------- the plan


def plan_stage(model: ModelConfig, layout: Layout, rank: int) -> StageMemory:
    params = stage_parameters(model, layout, rank)
    weights = params * layout.compute_bytes
    gradients = params * 4
    optimizer = params * optimizer_bytes_per_parameter(layout)
    if layout.distributed_optimizer:
        # megatron-core shards it over the data-parallel group *with* context parallelism
        # (get_megatron_optimizer's intra_dp_cp_group): CP ranks hold the same weights.
        optimizer = -(-optimizer // (layout.dp * layout.cp))
    e, n = layout.compute_bytes, layout.local_seq_length * layout.micro_batch_size
    q = layout.tp if layout.sp else 1
    h = model.hidden_size
    chunks = layout.vpp or 1
    layers_per_chunk = model.num_layers // (layout.pp * chunks)
    units = in_flight(layout, rank)
    per_layer = sum(layer_activation_bytes(model, layout).values())
    activations = units * layers_per_chunk * per_layer
    if layout.recompute == "full":
        # RoPE freqs [s, 1, 1, d] fp32, shared (megatron-core caches this rank's s / cp rows).
        activations += layout.local_seq_length * model.head_dim * 4
    if rank > 0 and layout.kernels != "triton" and e == 2:
        # The stage input received from the previous stage stays referenced by the schedule; the
        # fp32 copy the torch RMSNorm saves does not keep it alive.
        activations += units * n * e * h // q
    if layout.attention == "megatron" and layout.recompute == "none":
        activations += layout.seq_length ** 2  # the cached boolean causal mask
    if layout.sp:
        # megatron-core's global buffer for the sequence-parallel all-gathers of the linears'
        # inputs: one [s, b, h] tensor kept between steps and reused by every layer.
        activations += n * e * h
    # Two candidate peaks: the loss phase with everything saved, and the top layer's backward (or,
    # with full recompute, a recomputed layer's) after the head's saved tensors are gone: its MLP
    # or, with context parallelism, possibly its attention.
    backward = max(layer_backward_bytes(model, layout), attention_backward_bytes(model, layout))
    if layout.recompute == "full":
        backward += sum(layer_activation_bytes(model, layout, recompute="none").values())
    logits = working = 0
    if rank == layout.pp - 1:
        head = n * (_norm_bytes_per_element(layout) * h + 4) // q  # final norm
        if not layout.fused_loss:
            head += n * e * h // q  # output layer's input
        activations += head
        loss = loss_phase_bytes(model, layout)
        logits = sum(loss.values()) if layout.fused_loss else max(loss.values())
        working = max(0, backward - head - logits)
    else:
        working = backward
    churn = activations + logits + working
    allowance = (GPU_CONTEXT_BYTES + int(GPU_FRAGMENTATION * churn)) if layout.device == "gpu" else 0
    return StageMemory(pipeline_rank=rank, parameters=params, weights=weights, gradients=gradients,
                       optimizer=optimizer, activations=activations, logits=logits,
                       backward_working_set=working, allowance=allowance,
                       layers=model.num_layers // layout.pp, micro_batches_in_flight=units)


def plan_memory(run: RunConfig, world_size: Optional[int] = None, device: str = "gpu",
                device_memory: Optional[int] = None, with_suggestions: bool = True,
                objective: Optional[ObjectiveChecks] = None) -> MemoryPlan:
    """The per-rank plan of every pipeline stage; with ``device_memory`` (bytes) and a layout that
    does not fit, re-planned suggestions (see :func:`suggest`). ``objective``: the training layer's
    checks of what ``train.objective`` declares (megatron_seed.training.objective.CONFIG_CHECKS), applied
    to the layout asked for; suggestions are checked as layouts only."""
    layout = resolve_layout(run, world_size, device, objective)
    stages = [plan_stage(run.model, layout, r) for r in range(layout.pp)]
    plan = MemoryPlan(name=run.name, layout=layout, stages=stages,
                      per_layer_activation_bytes=sum(layer_activation_bytes(run.model, layout).values()),
                      device_memory=device_memory, notes=_notes(run, layout))
    if with_suggestions and plan.fits is False:
        plan.suggestions, plan.combined = suggest(run, world_size, device, device_memory)
    return plan


def _notes(run: RunConfig, layout: Layout) -> list[str]:
    notes = []
    if run.train.precision == "auto":
        notes.append(f"train.precision=auto planned as {layout.precision} (on a CPU without native bf16 it is fp32)")
    if run.model.kernels == "auto":
        notes.append(f"model.kernels=auto planned as {layout.kernels} (Triton on CUDA when it imports)")
    if layout.device == "gpu" and run.model.transformer_impl != "local":
        notes.append("Transformer Engine layers (model.transformer_impl) are planned with the tensors the "
                     "local spec saves")
    if run.train.fp8:
        notes.append("train.fp8: weights planned in bf16; FP8 copies and scaling state are not counted")
    if layout.recompute == "selective" and layout.attention == "sdpa":
        notes.append("selective recompute only re-runs core attention; SDPA keeps no s x s scores, so it "
                     "saves just the log-sum-exp")
    if layout.device == "gpu":
        notes.append(f"allowance: {GPU_CONTEXT_BYTES / GIB:.1f} GiB CUDA context/workspaces + "
                     f"{GPU_FRAGMENTATION:.0%} of activation and logits memory for allocator fragmentation")
    else:
        notes.append("cpu: the Python/torch runtime (~0.5 GiB resident) is not included")
    if layout.cp > 1:
        notes.append(f"parallel.context={layout.cp}: each rank holds {layout.local_seq_length} tokens of every "
                     "sequence; activations, logits and working sets are planned at that length")
        if layout.cp_attention == "ring":
            block = 4 * layout.micro_batch_size * (run.model.num_attention_heads // layout.tp) \
                * layout.local_seq_length ** 2
            notes.append("the local spec's ring attention also saves its fp32 output, and its backward holds four "
                         f"fp32 [b, heads, s/cp, s/cp] score blocks ({4 * block / 2**20:.1f} MiB)")
        else:
            notes.append("Transformer Engine's ring attention (p2p) is planned like flash attention at s/cp plus "
                         "its key/value send and receive buffers (no FP8)")
    elif layout.seq_length >= 2 * CP_MIN_LOCAL_TOKENS:
        notes.append("parallel.context=N splits every sequence over N ranks: activations and logits / N "
                     "(weights and gradients stay)")
    return notes


# ----------------------------------------------------------------------------- suggestions


def _with(run: RunConfig, **changes) -> RunConfig:
    new = copy.deepcopy(run)
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        setattr(getattr(new, section), key, value)
    return new


def _activations_dominate(run: RunConfig, world: int, device: str) -> bool:
    try:
        w = plan_memory(run, world, device, with_suggestions=False).worst
    except ConfigError:
        return False
    return 2 * (w.activations + w.logits + w.backward_working_set) > w.total - w.allowance


def _candidates(run: RunConfig, world: int, device: str):
    """(description, overrides, changed run) for each single change, least disruptive first;
    ``world``: the ranks ``run`` is planned on."""
    p, t, m = run.parallel, run.train, run.model
    dp = run.data_parallel_size(world)
    if not p.distributed_optimizer and dp * p.context > 1:
        ranks = "data parallel" if p.context == 1 else "DP x CP ranks"
        yield (f"shard the optimizer state over {ranks}", ["parallel.distributed_optimizer=true"],
               _with(run, parallel__distributed_optimizer=True))
    if t.recompute == "none":
        yield ("selective recompute (core attention)", ["train.recompute=selective"],
               _with(run, train__recompute="selective"))
    if t.recompute != "full":
        yield ("full recompute (keep each layer's input only)", ["train.recompute=full"],
               _with(run, train__recompute="full"))
    tp = p.tensor * 2
    if all(x % tp == 0 for x in (m.num_attention_heads, m.num_query_groups, m.ffn_hidden_size,
                                  m.vocab_size, run.data.seq_length)):
        yield (f"tensor parallel {tp} with sequence parallel",
               [f"parallel.tensor={tp}", "parallel.sequence_parallel=true"],
               _with(run, parallel__tensor=tp, parallel__sequence_parallel=True))
    cp = p.context * 2
    if run.data.seq_length // cp >= CP_MIN_LOCAL_TOKENS and _activations_dominate(run, world, device):
        yield (f"context parallel {cp} (split every sequence)", [f"parallel.context={cp}"],
               _with(run, parallel__context=cp))
    pp = p.pipeline * 2
    if m.num_layers % (pp * (p.virtual_pipeline or 1)) == 0:
        yield (f"pipeline parallel {pp}", [f"parallel.pipeline={pp}"], _with(run, parallel__pipeline=pp))
    if t.micro_batch_size > 1:
        mbs = t.micro_batch_size // 2
        yield (f"micro-batch size {mbs}", [f"train.micro_batch_size={mbs}"], _with(run, train__micro_batch_size=mbs))


def _world_for(run: RunConfig, world_size: Optional[int], base_dp: int) -> int:
    """Keep the world size when it was given (data parallelism shrinks), else keep data parallelism."""
    p = run.parallel
    return world_size if world_size else p.tensor * p.pipeline * p.context * base_dp


def _try(run: RunConfig, world: int, device: str) -> Optional[int]:
    try:
        return plan_memory(run, world, device, with_suggestions=False).total
    except ConfigError:
        return None


def suggest(run: RunConfig, world_size: Optional[int], device: str,
            device_memory: int) -> tuple[list[Suggestion], Optional[Suggestion]]:
    """Each single change re-planned, in order of preference, then the changes applied one after
    another (TP, CP, PP and micro-batch repeatedly) until the layout fits."""
    base_dp = run.data_parallel_size(world_size) if world_size else 1
    singles = []
    for change, overrides, new in _candidates(run, _world_for(run, world_size, base_dp), device):
        total = _try(new, _world_for(new, world_size, base_dp), device)
        if total is not None:
            singles.append(Suggestion(change, overrides, total, total <= device_memory))
    current, applied, changes = run, [], []
    best = _try(run, _world_for(run, world_size, base_dp), device)
    for _ in range(16):
        step = None
        for change, overrides, new in _candidates(current, _world_for(current, world_size, base_dp), device):
            total = _try(new, _world_for(new, world_size, base_dp), device)
            # A change that saves under 1% (selective recompute with SDPA) is not worth taking.
            if total is not None and best is not None and total < 0.99 * best:
                step = (change, overrides, new, total)
                break
        if step is None:
            break
        change, overrides, current, best = step
        changes.append(change)
        applied = [o for o in applied if o.split("=")[0] not in {x.split("=")[0] for x in overrides}] + overrides
        if best <= device_memory:
            break
    combined = Suggestion("; ".join(changes), applied, best, best <= device_memory) if changes else None
    return singles, combined


# ----------------------------------------------------------------------------- units and text

def parse_bytes(text: str) -> int:
    """``80GiB``, ``80GB`` (10^9), ``80G`` (GiB), ``81920MiB`` or a plain byte count
    (megatron_seed.platform.units); a ConfigError naming the device memory otherwise."""
    try:
        return units.parse_bytes(text)
    except ValueError:
        raise ConfigError(f"device memory {text!r}: give a size like 80GiB, 80GB or 85899345920") from None


def gib(n: int) -> str:
    """GiB with two decimals; MiB for what would round to almost nothing (small models)."""
    return f"{n / GIB:8.2f} GiB" if n >= GIB // 10 else f"{n / 2**20:8.2f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def format_plan(plan: MemoryPlan) -> str:
    lay, w = plan.layout, plan.worst
    vpp = f" vpp {lay.vpp}" if lay.vpp else ""
    lines = [
        f"memory plan: {plan.name} on {lay.device} | world {lay.world_size} (tp {lay.tp}{' sp' if lay.sp else ''}"
        f"{f' cp {lay.cp}' if lay.cp > 1 else ''} pp {lay.pp}{vpp} dp {lay.dp}) | {lay.precision} | seq "
        f"{lay.seq_length}{f' ({lay.local_seq_length} per rank)' if lay.cp > 1 else ''} x micro-batch "
        f"{lay.micro_batch_size}, {lay.micro_batches} micro-batches | recompute {lay.recompute} | "
        f"kernels {lay.kernels}{' (fused loss)' if lay.fused_loss else ''} | "
        f"distributed optimizer {'on' if lay.distributed_optimizer else 'off'}",
        f"per rank (pipeline rank {w.pipeline_rank}: {_count(w.parameters)} parameters, {w.layers} layers, "
        f"{w.micro_batches_in_flight} micro-batch{'es' if w.micro_batches_in_flight != 1 else ''} in flight):",
    ]
    for label, value in (("weights", w.weights), ("gradients (fp32)", w.gradients),
                         ("optimizer state", w.optimizer), ("activations", w.activations),
                         ("logits / loss", w.logits), ("backward working set", w.backward_working_set),
                         ("allowance", w.allowance)):
        lines.append(f"  {label:<22}{gib(value)}")
    lines.append(f"  {'total':<22}{gib(w.total)}")
    lines.append(f"  (one layer saves {plan.per_layer_activation_bytes / 2**20:.1f} MiB per micro-batch)")
    if len(plan.stages) > 1:
        lines.append("per pipeline rank: " + ", ".join(f"{s.pipeline_rank}: {s.total / GIB:.2f}" for s in plan.stages)
                     + " GiB")
    if plan.device_memory is not None:
        verdict = "fits" if plan.fits else "does NOT fit"
        lines.append(f"{verdict} in {plan.device_memory / GIB:.2f} GiB "
                     f"({'headroom' if plan.fits else 'short by'} {abs(plan.device_memory - plan.total) / GIB:.2f} GiB)")
    if plan.suggestions:
        lines.append("to make it fit (each change alone, re-planned):")
        for i, s in enumerate(plan.suggestions, 1):
            lines.append(f"  {i}. {s.change:<48} {' '.join(s.overrides):<58} -> {s.total / GIB:.2f} GiB"
                         f"{'  fits' if s.fits else ''}")
        if plan.combined:
            c = plan.combined
            lines.append(f"  combined: {' '.join(c.overrides)} -> {c.total / GIB:.2f} GiB"
                         f"{' fits' if c.fits else ' (still does not fit)'}")
    for note in plan.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)
