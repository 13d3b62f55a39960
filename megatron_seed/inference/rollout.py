"""Rollout engines: what RL samples responses with, and how the policy's weights get there.

The RL objective needs three things from an engine: ``n`` sampled responses per prompt, the
engine's log-prob of every sampled token, and a way to replace the weights with the policy's after
each update (``load_weights`` with HF-named tensors from
:func:`megatron_seed.inference.weight_sync.gather_hf_weights`, tagged with a ``version`` so the
trainer knows which policy produced a batch). :class:`RolloutEngine` is that contract;

* :class:`LocalRolloutEngine` runs our :class:`~megatron_seed.inference.engine.InferenceModel`
  (any machine, the CPU test suite included);
* :class:`VLLMRolloutEngine` runs vLLM (GPU serving at scale). It is written against vLLM's
  documented API but UNVERIFIED: vLLM is not installed here and no test runs it.

Log-prob convention (both engines, and what the trainer recomputes): log_softmax(logits /
temperature)[token] in fp32 over the full vocabulary, not renormalized over the top-p nucleus
(verl / TRL); temperature <= 0 means greedy and log-probs at temperature 1.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Iterable, Optional, Protocol, Union, runtime_checkable

import torch

from megatron_seed.config.schema import ModelConfig

NamedTensors = Union[Mapping[str, torch.Tensor], Iterable[tuple[str, torch.Tensor]]]


@dataclass
class SamplingParams:
    temperature: float = 0.6  # <= 0: greedy
    top_p: float = 1.0
    max_new_tokens: int = 1024
    seed: int = 0

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Rollout:
    token_ids: list[int]   # the generated tokens; the eos token is kept when the response stopped
    logprobs: list[float]  # the engine's log-prob of each of token_ids (see the module docstring)
    finish_reason: str     # "stop": ended with eos; "length": cut at max_new_tokens


@runtime_checkable
class RolloutEngine(Protocol):
    version: Optional[int]  # the ``version`` of the last load_weights; None before the first

    def generate(self, prompt_ids: list[list[int]], n: int, sampling: SamplingParams, eos_id: int,
                 pad_id: int, prompt_seeds: Optional[list[int]] = None) -> list[list[Rollout]]:
        """``n`` rollouts per prompt: ``result[prompt][sample]``. ``prompt_seeds``: one seed per
        prompt, replacing (``sampling.seed``, the prompt's position in the call), so that a prompt's
        rollouts do not depend on which other prompts share the call."""
        ...

    def load_weights(self, named_tensors: NamedTensors, version: int) -> None:
        """Replace the weights with these HF-named tensors (the whole model) and set ``version``."""
        ...


def sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The seed of one rollout's own random stream: the first 8 bytes of
    blake2b(f"{seed}:{prompt_index}:{sample_index}"), little-endian, masked to 63 bits. A rollout's
    tokens depend on (``seed``, its prompt's position in the call, its sample index, the prompt
    and the weights), never on which other rollouts share its batch or on ``batch_size``."""
    digest = hashlib.blake2b(f"{seed}:{prompt_index}:{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def row_seed(seed: int, prompt_seeds: Optional[list[int]], prompt_index: int, sample_index: int) -> int:
    """Row (prompt, sample)'s seed: from the prompt's own seed when given, else from its position."""
    if prompt_seeds is None:
        return sample_seed(seed, prompt_index, sample_index)
    return sample_seed(prompt_seeds[prompt_index], 0, sample_index)


def _as_dict(named_tensors: NamedTensors) -> dict[str, torch.Tensor]:
    return dict(named_tensors.items()) if isinstance(named_tensors, Mapping) else dict(named_tensors)


def _finish_reason(token_ids: list[int], eos_id: Optional[int]) -> str:
    return "stop" if token_ids and eos_id is not None and token_ids[-1] == eos_id else "length"


class LocalRolloutEngine:
    """Rollouts from our InferenceModel, ``batch_size`` rows at a time.

    Rows are (prompt, sample) pairs in prompt-major order (prompt 0's samples, then prompt 1's, ...),
    cut into batches of ``batch_size``; each batch is one left-padded :func:`generate` call.
    Row (i, j) samples from its own generator seeded with :func:`sample_seed` (sampling.seed, i, j),
    so the same call gives the same rollouts whatever ``batch_size`` is, up to rounding-level
    differences in the logits between batch shapes (left padding and matmul blocking differ),
    which can flip a draw that falls on a probability boundary (rare in fp32, less so in bf16).

    ``load_weights`` builds the model on the first call and later copies into its tensors in place
    (:meth:`InferenceModel.update_weights`); the caller's tensors are never aliased.
    """

    def __init__(self, model_config: ModelConfig, dtype: Union[str, torch.dtype] = "auto", batch_size: int = 8):
        from megatron_seed.platform.precision import resolve_dtype

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.config = model_config
        self.dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, "cpu")
        self.batch_size = batch_size
        self.model = None
        self.version: Optional[int] = None

    def load_weights(self, named_tensors: NamedTensors, version: int) -> None:
        from megatron_seed.inference.engine import InferenceModel

        weights = _as_dict(named_tensors)
        if self.model is None:
            # Own copies: the constructor keeps a tensor as is when dtype and layout already match,
            # and update_weights would later write into the caller's tensor.
            weights = {name: t.detach().to("cpu", self.dtype, copy=True) for name, t in weights.items()}
            self.model = InferenceModel(self.config, weights, self.dtype)
        else:
            self.model.update_weights(weights)
        self.version = version

    def generate(self, prompt_ids: list[list[int]], n: int, sampling: SamplingParams, eos_id: int,
                 pad_id: int, prompt_seeds: Optional[list[int]] = None) -> list[list[Rollout]]:
        from megatron_seed.inference.engine import generate

        if self.model is None:
            raise RuntimeError("LocalRolloutEngine.generate before load_weights: there are no weights yet")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        sampling.validate()
        greedy = sampling.temperature <= 0
        rows = [(i, j) for i in range(len(prompt_ids)) for j in range(n)]
        result: list[list[Optional[Rollout]]] = [[None] * n for _ in prompt_ids]
        for lo in range(0, len(rows), self.batch_size):
            part = rows[lo:lo + self.batch_size]
            tokens, logprobs = generate(
                self.model, [list(prompt_ids[i]) for i, _ in part], sampling.max_new_tokens,
                temperature=sampling.temperature, top_p=sampling.top_p, greedy=greedy, eos_id=eos_id,
                pad_id=pad_id, seeds=[row_seed(sampling.seed, prompt_seeds, i, j) for i, j in part],
                return_logprobs=True)
            for (i, j), ids, lps in zip(part, tokens, logprobs):
                result[i][j] = Rollout(ids, lps, _finish_reason(ids, eos_id))
        return result


# ---------------------------------------------------------------------------------------- vLLM
def _import_vllm():
    try:
        import vllm
    except ImportError as e:
        raise ImportError("rl.engine=vllm needs vLLM (>= 0.10.2, for logprobs_mode): `pip install vllm` on a CUDA "
                          "machine, or use rl.engine=local (our InferenceModel)") from e
    return vllm


def _load_weights_on_worker(worker, weights: list) -> int:
    """Runs inside each vLLM worker (``LLM.collective_rpc`` passes the worker as the first
    argument): the model's own ``load_weights`` takes full HF tensors and shards them for its
    tensor-parallel rank."""
    runner = worker.model_runner
    model = runner.model if hasattr(runner, "model") else runner.get_model()
    model.load_weights(weights=weights)
    return len(weights)


class VLLMRolloutEngine:
    """Rollouts from vLLM. UNVERIFIED: written against vLLM's documented API (``vllm.LLM``,
    ``LLM.generate`` with ``TokensPrompt``, ``vllm.SamplingParams``, ``LLM.collective_rpc``,
    ``LLM.reset_prefix_cache``); vLLM is not installed where this was written and no test runs it.

    * Start-up: a config-only HF directory (``config.json`` from our ModelConfig) in a temporary
      folder, ``load_format="dummy"`` (random weights: the real ones come from ``load_weights``),
      ``skip_tokenizer_init=True`` (prompts are token ids; nothing is detokenized).
    * Log-probs: ``logprobs=0`` (the sampled token's) with ``logprobs_mode="processed_logprobs"``:
      log_softmax(logits / temperature) at temperature > 0, raw at greedy, which matches our
      convention with ``top_p == 1``. With ``top_p < 1`` vLLM's processed log-probs are
      renormalized over the nucleus, so they differ from the trainer's by log(nucleus mass):
      use top_p = 1 with this engine, or let the trainer recompute the old log-probs.
    * Seeds: one request per (prompt, sample), seeded with :func:`sample_seed` as the local engine
      (the streams themselves differ from the local engine's: only determinism carries over).
    * Weights: every worker's model gets ``load_weights(weights=[(name, tensor), ...])`` through
      ``collective_rpc`` (tensors are pickled to the worker processes: keep them on CPU), then the
      prefix cache is reset (its KV was computed with the old weights).
    * Inside a torchrun job (colocated with training) vLLM needs its SPMD mode, e.g.
      ``distributed_executor_backend="external_launcher"``; pass it through ``llm_kwargs``.
    """

    def __init__(self, model_config: ModelConfig, dtype: Union[str, torch.dtype] = "auto", batch_size: int = 0,
                 gpu_memory_utilization: float = 0.5, tensor_parallel_size: int = 1, enforce_eager: bool = False,
                 max_model_len: Optional[int] = None, **llm_kwargs):
        vllm = _import_vllm()
        from megatron_seed.convert.hf_llama import hf_config_from_model
        from megatron_seed.platform.precision import resolve_dtype

        torch_dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, "cuda")
        self.config = model_config
        self.batch_size = batch_size  # unused: vLLM schedules its own (continuous) batches
        self.version: Optional[int] = None
        self._dir = tempfile.mkdtemp(prefix="megatron-seed-vllm-")
        with open(os.path.join(self._dir, "config.json"), "w") as f:
            json.dump(hf_config_from_model(model_config, torch_dtype), f, indent=2)
        self.llm = vllm.LLM(model=self._dir, skip_tokenizer_init=True, load_format="dummy",
                            dtype=str(torch_dtype).replace("torch.", ""), tensor_parallel_size=tensor_parallel_size,
                            gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
                            max_model_len=max_model_len or model_config.max_position_embeddings,
                            logprobs_mode="processed_logprobs", **llm_kwargs)

    def load_weights(self, named_tensors: NamedTensors, version: int) -> None:
        items = list(named_tensors.items()) if isinstance(named_tensors, Mapping) else list(named_tensors)
        items = [(name, t.detach().cpu()) for name, t in items]
        self.llm.collective_rpc(_load_weights_on_worker, args=(items,))
        self.llm.reset_prefix_cache()
        self.version = version

    def generate(self, prompt_ids: list[list[int]], n: int, sampling: SamplingParams, eos_id: int,
                 pad_id: int, prompt_seeds: Optional[list[int]] = None) -> list[list[Rollout]]:
        vllm = _import_vllm()
        from vllm.inputs import TokensPrompt

        if self.version is None:
            raise RuntimeError("VLLMRolloutEngine.generate before load_weights: the weights are random")
        sampling.validate()
        prompts, params, where = [], [], []
        for i, ids in enumerate(prompt_ids):
            for j in range(n):
                prompts.append(TokensPrompt(prompt_token_ids=list(ids)))
                params.append(vllm.SamplingParams(
                    n=1, temperature=max(sampling.temperature, 0.0), top_p=sampling.top_p,
                    max_tokens=sampling.max_new_tokens, logprobs=0, seed=row_seed(sampling.seed, prompt_seeds, i, j),
                    stop_token_ids=[eos_id], detokenize=False))
                where.append((i, j))
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        result: list[list[Optional[Rollout]]] = [[None] * n for _ in prompt_ids]
        for (i, j), output in zip(where, outputs):
            completion = output.outputs[0]
            ids = list(completion.token_ids)
            # completion.logprobs: one {token_id: Logprob} per generated token, the sampled one included
            lps = [float(step[token].logprob) for step, token in zip(completion.logprobs, ids)]
            reason = "stop" if completion.finish_reason == "stop" else "length"
            result[i][j] = Rollout(ids, lps, reason)
        return result

    def close(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)


def build_rollout_engine(kind: str, model_config: ModelConfig, **kw) -> RolloutEngine:
    """``kind``: "local" (our InferenceModel, the default) or "vllm" (imports vLLM only here)."""
    if kind in ("local", None, ""):
        return LocalRolloutEngine(model_config, **kw)
    if kind == "vllm":
        return VLLMRolloutEngine(model_config, **kw)
    raise ValueError(f"unknown rollout engine {kind!r}: 'local' or 'vllm'")
