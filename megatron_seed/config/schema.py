"""Typed run configuration. Each dataclass validates itself; :class:`RunConfig` checks how they fit.

A run is a named preset plus ``a.b=value`` overrides (see :mod:`megatron_seed.config.loading`).
Errors say what to change, naming the config key.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Literal, Optional, Protocol


class ConfigError(ValueError):
    """A configuration that cannot run; the message says which key to change."""


class ObjectiveChecks(Protocol):
    """What :meth:`RunConfig.validate` asks of the objective that ``train.objective`` names. Each
    objective declares its needs (megatron_seed.training.objective.Objective.needs and
    check_config); the config sits below training and cannot look them up, so whoever validates a
    run for training passes the answers in (megatron_seed.training.objective.CONFIG_CHECKS).
    Without them, validate checks the layout and token data only."""

    def uses_token_data(self, run: "RunConfig") -> bool:
        """Whether the run's token data (data.blend or data.mock) is checked; False: the objective
        makes its own data."""

    def check_context_parallel(self, run: "RunConfig") -> None:
        """A ConfigError unless the objective's loss can be split with the sequence (parallel.context > 1)."""

    def check(self, run: "RunConfig") -> None:
        """The objective's own checks of the run, after the layout's."""


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


@dataclass
class ModelConfig:
    """Llama-style decoder: RMSNorm, SwiGLU, GQA, RoPE, no biases."""

    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 176
    num_attention_heads: int = 4
    num_query_groups: int = 2
    vocab_size: int = 272
    max_position_embeddings: int = 8192
    rotary_base: float = 500000.0
    norm_epsilon: float = 1e-6
    tie_embeddings: bool = False
    init_std: float = 0.02
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    # "sdpa": torch scaled_dot_product_attention (fast on CPU and GPU); "megatron": megatron-core's
    # unfused DotProductAttention. Ignored by the Transformer Engine spec, which brings its own.
    attention_backend: Literal["sdpa", "megatron"] = "sdpa"
    # "auto": Transformer Engine layers when transformer_engine imports and CUDA is present,
    # megatron-core local layers otherwise.
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    # Triton kernels (kernels/: RMSNorm, SwiGLU, RoPE, fused linear cross-entropy). "auto": Triton
    # on CUDA when triton imports, torch otherwise; "triton" on a CPU needs TRITON_INTERPRET=1 (tests).
    kernels: Literal["auto", "triton", "torch"] = "auto"

    def validate(self) -> None:
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "num_query_groups", "vocab_size", "max_position_embeddings"):
            _require(getattr(self, name) > 0, f"model.{name} must be positive")
        _require(self.hidden_size % self.num_attention_heads == 0,
                 f"model.hidden_size ({self.hidden_size}) must be divisible by "
                 f"model.num_attention_heads ({self.num_attention_heads})")
        _require(self.num_attention_heads % self.num_query_groups == 0,
                 f"model.num_attention_heads ({self.num_attention_heads}) must be divisible by "
                 f"model.num_query_groups ({self.num_query_groups})")
        _require(self.attention_backend in ("sdpa", "megatron"),
                 "model.attention_backend must be 'sdpa' or 'megatron'")
        _require(self.transformer_impl in ("auto", "local", "transformer_engine"),
                 "model.transformer_impl must be 'auto', 'local' or 'transformer_engine'")
        _require(self.kernels in ("auto", "triton", "torch"), "model.kernels must be 'auto', 'triton' or 'torch'")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def num_parameters(self) -> int:
        """Exact parameter count (embeddings counted once when tied)."""
        h, f, v, layers = self.hidden_size, self.ffn_hidden_size, self.vocab_size, self.num_layers
        kv = self.num_query_groups * self.head_dim
        attn = h * h + 2 * h * kv + h * h
        mlp = 3 * h * f
        per_layer = attn + mlp + 2 * h
        embed = v * h * (1 if self.tie_embeddings else 2)
        return layers * per_layer + embed + h


@dataclass
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    # Interleaved pipeline schedule: model chunks per pipeline rank (None = not interleaved).
    virtual_pipeline: Optional[int] = None
    sequence_parallel: bool = False
    # Context parallelism: every sequence split across this many ranks (megatron-core's layout:
    # 2N chunks, rank r holding chunks r and 2N-1-r). Transformer Engine's attention exchanges
    # keys and values on GPU; the local spec uses megatron_seed.models.context_parallel's ring.
    context: int = 1
    distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False

    def validate(self) -> None:
        _require(self.tensor >= 1 and self.pipeline >= 1, "parallel.tensor and parallel.pipeline must be >= 1")
        _require(self.context >= 1, "parallel.context must be >= 1")
        if self.virtual_pipeline is not None:
            _require(self.virtual_pipeline >= 1, "parallel.virtual_pipeline must be >= 1 or null")
            _require(self.pipeline > 1, "parallel.virtual_pipeline needs parallel.pipeline > 1")
        _require(not self.sequence_parallel or self.tensor > 1,
                 "parallel.sequence_parallel needs parallel.tensor > 1")
        _require(not self.overlap_param_gather or self.distributed_optimizer,
                 "parallel.overlap_param_gather needs parallel.distributed_optimizer=true")


@dataclass
class OptimizerConfig:
    lr: float = 3e-4
    # The LR the schedule decays to. Unset, it is a tenth of lr (3e-5 at the default lr), so a
    # fine-tune that only lowers lr (2e-5, 5e-7) never trips the check below; use min_lr_value.
    min_lr: Optional[float] = None
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    # "cosine": linear warmup then cosine to min_lr; "wsd": warmup-stable-decay (decay over the
    # last wsd_decay_steps); "constant": warmup then flat.
    schedule: Literal["cosine", "wsd", "constant", "linear"] = "cosine"
    warmup_steps: int = 0
    decay_steps: Optional[int] = None  # defaults to train.steps
    wsd_decay_steps: int = 0
    wsd_decay_style: Literal["linear", "cosine", "exponential", "minus_sqrt"] = "linear"

    @property
    def min_lr_value(self) -> float:
        # The tenth is taken in decimal so that lr=3e-4 gives exactly 3e-5, the old default.
        return float(Decimal(repr(self.lr)) / 10) if self.min_lr is None else self.min_lr

    def validate(self) -> None:
        _require(self.lr >= 0, "optimizer.lr must be >= 0 (0 re-saves weights unchanged, e.g. to re-shard)")
        _require(self.min_lr is None or 0 <= self.min_lr <= self.lr,
                 "optimizer.min_lr must be in [0, optimizer.lr] (or unset: optimizer.lr / 10)")
        _require(self.weight_decay >= 0, "optimizer.weight_decay must be >= 0")
        _require(self.clip_grad >= 0, "optimizer.clip_grad must be >= 0 (0 disables clipping)")
        _require(self.schedule in ("cosine", "wsd", "constant", "linear"),
                 "optimizer.schedule must be one of cosine, wsd, constant, linear")
        _require(self.warmup_steps >= 0, "optimizer.warmup_steps must be >= 0")
        if self.schedule == "wsd":
            _require(self.wsd_decay_steps > 0, "optimizer.schedule=wsd needs optimizer.wsd_decay_steps > 0")


@dataclass
class DataConfig:
    # Megatron-style blend: ["prefix"] or ["0.7", "prefixA", "0.3", "prefixB"] (weights optional).
    # Each prefix names PREFIX.bin/PREFIX.idx. Empty with mock=true: synthetic tokens.
    blend: list[str] = field(default_factory=list)
    split: str = "98,2,0"
    seq_length: int = 128
    mock: bool = False
    cache_dir: Optional[str] = None
    # Tokenizer spec: logging samples and generation; SFT, DPO and RL render chats with it.
    tokenizer: Optional[str] = None
    # Conversations for SFT, preference pairs for DPO: jsonl / jsonl.gz / parquet files, a glob or a directory.
    train: Optional[str] = None
    valid: Optional[str] = None
    chat_template: Optional[str] = None  # Jinja text or a .jinja file; default: the tokenizer's own
    packing: bool = True  # whole samples packed best-fit-decreasing into seq_length rows
    # How the model keeps packed samples apart: "mask" (a block-diagonal causal mask), "thd"
    # (megatron-core's PackedSeqParams: the micro-batch as one row of sequences delimited by
    # cu_seqlens, what Transformer Engine's attention takes; it ignores a mask), or "auto" (thd
    # on the Transformer Engine spec, mask otherwise).
    packed_format: Literal["auto", "mask", "thd"] = "auto"
    train_on_all_tokens: bool = False  # loss on every token, not only the assistant turns
    overflow: Literal["drop", "truncate"] = "drop"  # samples longer than seq_length

    def validate(self, needs_token_data: bool = True) -> None:
        _require(self.seq_length > 0, "data.seq_length must be positive")
        _require(self.overflow in ("drop", "truncate"), "data.overflow must be 'drop' or 'truncate'")
        _require(self.packed_format in ("auto", "mask", "thd"), "data.packed_format must be 'auto', 'mask' or 'thd'")
        if self.train is not None or not needs_token_data:
            # conversations (their files are checked, with the record at fault, when read), or an
            # objective that makes its own data (its ObjectiveNeeds.token_data is False)
            return
        _require(self.mock or bool(self.blend),
                 "data.blend is empty: give data.blend=[PREFIX] (files PREFIX.bin/.idx, e.g. from "
                 "tools/preprocess_data.py) or data.mock=true for synthetic tokens")
        parts = self.split.split(",")
        _require(len(parts) == 3 and all(p.strip().replace(".", "", 1).isdigit() for p in parts),
                 f"data.split must be three comma-separated numbers like '98,2,0', got {self.split!r}")
        for prefix in self.prefixes():
            for suffix in (".bin", ".idx"):
                _require(os.path.isfile(prefix + suffix),
                         f"data.blend: {prefix + suffix} does not exist; build it with "
                         "tools/preprocess_data.py or fix the prefix")

    def prefixes(self) -> list[str]:
        return [p for p in self.blend if not _is_number(p)]


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


@dataclass
class TrainConfig:
    steps: int = 10
    micro_batch_size: int = 2
    global_batch_size: int = 4
    seed: int = 1234
    # auto: bf16 where the hardware computes it natively (CUDA, CPUs with AVX512-BF16/AMX), fp32
    # elsewhere; resolved at start-up by megatron_seed.platform.precision and logged.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # FP8: Transformer Engine recipes on GPU, emulated on CPU (megatron_seed.models.fp8):
    # null, "hybrid" or "e4m3".
    fp8: Optional[Literal["hybrid", "e4m3"]] = None
    recompute: Literal["none", "full", "selective"] = "none"
    # torch.compile the elementwise chains (RMSNorm, SwiGLU) of the local spec; ~20 s of compile
    # once per process, then faster steps (megatron_seed.models.compile).
    compile: bool = False
    log_interval: int = 1
    run_dir: str = "runs/default"
    save: Optional[str] = None
    save_interval: int = 0
    load: Optional[str] = None
    async_save: bool = False
    # Megatron-LM's --no-save-optim: checkpoints hold the weights (and step, data position, RNG)
    # but no optimizer state or LR schedule, about a third of the bytes under Adam; enough to start
    # the next stage (train.finetune) or to convert, not for an exact resume.
    save_optimizer: bool = True
    eval_interval: int = 0
    eval_steps: int = 2
    tensorboard: bool = True
    # CPU only: keep freed memory for reuse instead of returning it to the kernel every step
    # (megatron_seed.platform.cpu_allocator); ~20% faster steps, same peak memory.
    cpu_reuse_freed_memory: bool = True
    # CPU only: only the main thread runs ops over all intra-op threads; background threads (gloo's
    # workers) run single-threaded, so they never make the OpenMP runtime oversubscribe the cores
    # (megatron_seed.platform.cpu_threads): up to 1.7x faster RL rollouts after a checkpoint load.
    cpu_threads_main_only: bool = True
    # What is trained: a registered objective ("pretrain") or "package.module:function", a factory
    # (run, ctx, tokenizer) -> Objective (megatron_seed.training.objective).
    objective: str = "pretrain"
    # Start from train.load's weights at step 0 (Megatron-LM's --finetune): data position, LR
    # schedule, RNG and objective state start fresh; the optimizer state is loaded only with
    # finetune_load_optimizer. Without it, train.load resumes the run where it stopped.
    finetune: bool = False
    finetune_load_optimizer: bool = False

    def validate(self) -> None:
        _require(self.steps >= 0, "train.steps must be >= 0")
        _require(self.micro_batch_size >= 1, "train.micro_batch_size must be >= 1")
        _require(self.global_batch_size >= 1, "train.global_batch_size must be >= 1")
        _require(self.precision in ("auto", "fp32", "bf16"), "train.precision must be 'auto', 'fp32' or 'bf16'")
        _require(self.recompute in ("none", "full", "selective"),
                 "train.recompute must be none, full or selective")
        _require(self.fp8 in (None, "hybrid", "e4m3"), "train.fp8 must be null, 'hybrid' or 'e4m3'")
        _require(self.log_interval >= 1, "train.log_interval must be >= 1")
        _require(self.save_interval >= 0, "train.save_interval must be >= 0")
        _require(not (self.save_interval and not self.save),
                 "train.save_interval is set but train.save (checkpoint directory) is not")
        _require(isinstance(self.objective, str) and bool(self.objective.strip()),
                 "train.objective must name an objective (e.g. pretrain) or a package.module:function")
        _require(not self.finetune or bool(self.load),
                 "train.finetune=true needs train.load (the checkpoint whose weights to start from)")
        _require(not self.finetune_load_optimizer or self.finetune,
                 "train.finetune_load_optimizer=true needs train.finetune=true (a plain train.load "
                 "restores the optimizer anyway)")


# The loss types of megatron_seed.training.objectives.dpo_loss (kept here so the config imports no torch).
DPO_LOSS_TYPES = ("sigmoid", "robust", "ipo", "hinge")


@dataclass
class DPOConfig:
    """Direct preference optimization (formulas: megatron_seed.training.objectives.dpo_loss)."""

    # Strength of the pull towards the reference; for loss_type=ipo the paper's tau.
    beta: float = 0.1
    loss_type: Literal["sigmoid", "robust", "ipo", "hinge"] = "sigmoid"
    # Probability that a preference label is wrong: cDPO for sigmoid, robust DPO for robust.
    label_smoothing: float = 0.0
    # Weight of the chosen completion's per-token NLL added to the loss (RPO); 0 = plain DPO.
    sft_weight: float = 0.0

    def validate(self) -> None:
        _require(self.loss_type in DPO_LOSS_TYPES, f"dpo.loss_type must be one of {', '.join(DPO_LOSS_TYPES)}")
        _require(math.isfinite(self.beta) and self.beta > 0, f"dpo.beta must be a finite number > 0, got {self.beta}")
        _require(0.0 <= self.label_smoothing < 0.5,
                 f"dpo.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        _require(not self.label_smoothing or self.loss_type in ("sigmoid", "robust"),
                 f"dpo.label_smoothing applies to dpo.loss_type sigmoid and robust only; set it to 0 for "
                 f"dpo.loss_type={self.loss_type}")
        _require(math.isfinite(self.sft_weight) and self.sft_weight >= 0,
                 f"dpo.sft_weight must be a finite number >= 0, got {self.sft_weight}")


@dataclass
class RefConfig:
    """The frozen reference model of DPO."""

    # Checkpoint of the reference weights; empty: the checkpoint the policy starts from (train.load).
    load: str = ""
    # "precomputed": reference log-probs computed ahead of the policy forward steps that use them;
    # "live": computed by the reference model within each forward step, next to the policy.
    mode: Literal["precomputed", "live"] = "precomputed"

    def validate(self) -> None:
        _require(self.mode in ("precomputed", "live"), "ref.mode must be 'precomputed' or 'live'")
        _require(isinstance(self.load, str), "ref.load must be a checkpoint directory or empty (= train.load)")


RL_LOSS_TYPES = ("dapo", "grpo", "dr_grpo")
RL_FORMATS = ("none", "code_block", "think")


@dataclass
class RLConfig:
    """Reinforcement learning from unit-test rewards: GRPO with DAPO's recipe (formulas:
    megatron_seed.training.objectives.rl_loss; the rollout phase: megatron_seed.training.objectives.rl)."""

    # Problems to train on: starter, codeio[:N] or a jsonl of {prompt, tests} / human-eval rows
    # (HumanEval itself is refused: it stays held out).
    problems: str = ""
    prompts_per_step: int = 4  # groups (prompts) per rollout batch
    group_size: int = 8  # rollouts per prompt
    max_new_tokens: int = 256
    temperature: float = 0.6
    top_p: float = 1.0
    # dapo: token-level mean over the whole batch; grpo: mean over sequences of each one's token
    # mean; dr_grpo: token sum / (sequences x max_new_tokens), advantages not scaled by the std.
    loss: Literal["dapo", "grpo", "dr_grpo"] = "dapo"
    clip_low: float = 0.2
    clip_high: float = 0.28
    kl_coef: float = 0.0  # > 0: k3 KL to the reference (ref.load, default train.load)
    updates_per_batch: int = 1  # optimizer steps (mini-batches) per rollout batch
    # Truncated importance sampling: each token's loss x min(pi_trainer / pi_engine, tis_cap); 0 = off.
    tis_cap: float = 0.0
    # DAPO: rollouts cut at max_new_tokens train no tokens (overlong filtering) ...
    overlong_filter: bool = True
    # ... and, with a buffer > 0, replies within the last `overlong_buffer` tokens of the limit
    # lose up to `overlong_penalty` reward linearly (soft overlong punishment).
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0
    dynamic_sampling: bool = True  # drop groups whose rewards are all equal, refill with more prompts
    max_refill_rounds: int = 2  # extra rounds of prompts before training on the groups it has
    # Curriculum: a problem leaves the pool once its pass rate over its rollouts exceeds this.
    retire_pass_rate: float = 0.875
    # Format the reward checks: a final fenced code block, or <think>...</think> before it.
    format: Literal["none", "code_block", "think"] = "code_block"
    format_reward: float = 0.0  # the reward of a reply with a format error (tests not counted)
    # Reward function, "package.module:function" (see rl_rewards.RewardFn).
    reward: str = "megatron_seed.training.objectives.rl_rewards:unit_test_reward"
    test_timeout: float = 5.0  # seconds per program in the sandbox
    sandbox_workers: int = 2
    engine: Literal["local", "vllm"] = "local"
    engine_batch_size: int = 16  # rollouts decoded together by the local engine
    # Every rollout (token ids, reward, verdict, kept or dropped) to train.run_dir/rollouts.jsonl.
    log_rollouts: bool = True

    def validate(self) -> None:
        _require(self.loss in RL_LOSS_TYPES, f"rl.loss must be one of {', '.join(RL_LOSS_TYPES)}")
        _require(self.format in RL_FORMATS, f"rl.format must be one of {', '.join(RL_FORMATS)}")
        _require(self.engine in ("local", "vllm"), "rl.engine must be 'local' or 'vllm'")
        for key in ("prompts_per_step", "group_size", "max_new_tokens", "updates_per_batch", "sandbox_workers",
                    "engine_batch_size"):
            _require(getattr(self, key) >= 1, f"rl.{key} must be at least 1, got {getattr(self, key)}")
        _require(self.group_size >= 2, f"rl.group_size must be at least 2 (advantages compare rollouts of a "
                 f"prompt), got {self.group_size}")
        _require(math.isfinite(self.temperature) and self.temperature > 0,
                 f"rl.temperature must be > 0 (log-probs are of the temperature-scaled policy), got {self.temperature}")
        _require(0 < self.top_p <= 1, f"rl.top_p must be in (0, 1], got {self.top_p}")
        _require(0 <= self.clip_low < 1, f"rl.clip_low must be in [0, 1), got {self.clip_low}")
        _require(self.clip_high >= 0, f"rl.clip_high must be >= 0, got {self.clip_high}")
        _require(self.kl_coef >= 0 and self.tis_cap >= 0, "rl.kl_coef and rl.tis_cap must be >= 0")
        _require(self.max_refill_rounds >= 0, "rl.max_refill_rounds must be >= 0")
        _require(0 < self.retire_pass_rate <= 1, f"rl.retire_pass_rate must be in (0, 1], got {self.retire_pass_rate}")
        _require(0 <= self.overlong_buffer < self.max_new_tokens,
                 f"rl.overlong_buffer must be in [0, rl.max_new_tokens), got {self.overlong_buffer}")
        _require(":" in self.reward, f"rl.reward must be 'package.module:function', got {self.reward!r}")
        _require(self.test_timeout > 0, "rl.test_timeout must be > 0")
        _require((self.prompts_per_step * self.group_size) % self.updates_per_batch == 0,
                 f"rl.updates_per_batch ({self.updates_per_batch}) must divide rl.prompts_per_step x "
                 f"rl.group_size = {self.prompts_per_step * self.group_size} rollouts")

    def rollouts_per_update(self) -> int:
        return self.prompts_per_step * self.group_size // self.updates_per_batch


@dataclass
class RunConfig:
    name: str = "tiny"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    ref: RefConfig = field(default_factory=RefConfig)
    rl: RLConfig = field(default_factory=RLConfig)

    def validate(self, world_size: int, objective: Optional[ObjectiveChecks] = None) -> None:
        """Every section, then how they fit ``world_size`` ranks; with ``objective`` (the training
        layer's CONFIG_CHECKS) also what the objective ``train.objective`` names declares."""
        for part in (self.model, self.parallel, self.optimizer, self.train, self.dpo, self.ref, self.rl):
            part.validate()
        self.data.validate(needs_token_data=objective is None or objective.uses_token_data(self))
        m, p, t = self.model, self.parallel, self.train
        mp = p.tensor * p.pipeline * p.context
        _require(world_size % mp == 0,
                 f"world size {world_size} is not divisible by parallel.tensor x parallel.pipeline x "
                 f"parallel.context = {p.tensor} x {p.pipeline} x {p.context}; launch a multiple of {mp} "
                 "processes or change them")
        dp = world_size // mp
        if p.context > 1:
            self._validate_context_parallel(objective)
        _require(m.num_attention_heads % p.tensor == 0,
                 f"model.num_attention_heads ({m.num_attention_heads}) must be divisible by "
                 f"parallel.tensor ({p.tensor})")
        _require(m.num_query_groups % p.tensor == 0,
                 f"model.num_query_groups ({m.num_query_groups}) must be divisible by "
                 f"parallel.tensor ({p.tensor})")
        _require(m.ffn_hidden_size % p.tensor == 0,
                 f"model.ffn_hidden_size ({m.ffn_hidden_size}) must be divisible by parallel.tensor ({p.tensor})")
        chunks = p.pipeline * (p.virtual_pipeline or 1)
        _require(m.num_layers % chunks == 0,
                 f"model.num_layers ({m.num_layers}) must be divisible by parallel.pipeline x "
                 f"parallel.virtual_pipeline = {chunks}")
        _require(t.global_batch_size % (t.micro_batch_size * dp) == 0,
                 f"train.global_batch_size ({t.global_batch_size}) must be divisible by "
                 f"train.micro_batch_size x data-parallel size = {t.micro_batch_size} x {dp}")
        if p.virtual_pipeline:
            micro = t.global_batch_size // (t.micro_batch_size * dp)
            _require(micro % p.pipeline == 0,
                     f"the interleaved schedule needs the number of micro-batches ({micro}) to be "
                     f"divisible by parallel.pipeline ({p.pipeline}); change train.global_batch_size")
        _require(not p.sequence_parallel or self.data.seq_length % p.tensor == 0,
                 "parallel.sequence_parallel needs data.seq_length divisible by parallel.tensor")
        _require(self.data.seq_length <= m.max_position_embeddings,
                 f"data.seq_length ({self.data.seq_length}) exceeds model.max_position_embeddings "
                 f"({m.max_position_embeddings})")
        if self.data.packed_format == "thd":
            self.check_thd_packing()
        if objective is not None:
            objective.check(self)
        # On GPU Transformer Engine's FP8 needs bf16 (checked once the precision is resolved, in
        # megatron_seed.training.build); the CPU emulation works in either precision.

    def check_thd_packing(self, why: str = "") -> None:
        """What packed rows in THD format need (``why``: how the format was chosen, for the message)."""
        p, t = self.parallel, self.train
        _require(p.context == 1,
                 f"data.packed_format=thd{why} is not supported with parallel.context > 1 (packed rows reach "
                 "the ring attention as segment ids): use model.transformer_impl=local with data.packed_format=mask")
        _require(p.pipeline == 1 or t.micro_batch_size == 1,
                 f"data.packed_format=thd{why} with parallel.pipeline > 1 needs train.micro_batch_size=1 (the "
                 "micro-batch becomes one row, and pipeline stages exchange tensors of a fixed shape)")

    def _validate_context_parallel(self, objective: Optional[ObjectiveChecks]) -> None:
        p, s = self.parallel, self.data.seq_length
        _require(s % (2 * p.context) == 0,
                 f"parallel.context={p.context} cuts each sequence into {2 * p.context} chunks: "
                 f"data.seq_length ({s}) must be divisible by {2 * p.context}")
        _require(not p.sequence_parallel or (s // p.context) % p.tensor == 0,
                 f"parallel.context={p.context} with parallel.sequence_parallel needs data.seq_length / "
                 f"parallel.context ({s // p.context}) divisible by parallel.tensor ({p.tensor})")
        if objective is not None:  # whether its loss splits with the sequence (ObjectiveNeeds.context_parallel)
            objective.check_context_parallel(self)
        _require(self.model.attention_backend == "sdpa",
                 "parallel.context > 1 replaces the core attention; model.attention_backend=megatron "
                 "(megatron-core's DotProductAttention) has no context parallelism: use sdpa")

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.parallel.tensor * self.parallel.pipeline * self.parallel.context)
