"""GRPO / DAPO / Dr. GRPO loss math on per-token log-probabilities: pure torch.

Every function matches TRL 1.16's ``GRPOTrainer`` (``trl/trainer/grpo_trainer.py``) with
``importance_sampling_level="token"``, ``top_entropy_quantile=1.0``, ``off_policy_mask_threshold=None``,
``delta=None``, ``use_bias_correction_kl=False`` and no entropy bonus; ``tests/test_rl_loss.py`` runs
TRL's own ``_compute_loss`` on the same inputs.

* :func:`group_advantages`: the advantages of ``_generate_and_score_completions``
  (``multi_objective_aggregation="sum_then_normalize"``, ``scale_rewards`` "group" or "none").
* :func:`policy_loss`: the per-token clipped surrogate of ``_compute_loss``'s
  ``loss_type in ["grpo", "bnpo", "dr_grpo", "dapo", "luspo"]`` branch (PPO's clip with DAPO's
  decoupled ``clip_low`` / ``clip_high``, TRL's ``epsilon`` / ``epsilon_high``), times TRL's vLLM
  importance-sampling ratio, plus ``beta`` times the k3 KL estimator; and the clip statistics of its
  ``clip_ratio/*`` metrics.
* :func:`truncated_is_weights`: TRL's ``vllm_importance_sampling_mode="token_truncate"`` ratio.
* :func:`reduce_loss`: the ``grpo`` / ``dapo`` / ``dr_grpo`` reductions, as a numerator and a
  denominator that add up over micro-batches and ranks.

**Tensors.** ``[B, T]`` holds one row per rollout and one column per token position; ``mask`` is 1
on the response tokens that carry loss and 0 elsewhere (prompt, padding, a truncated response under
overlong filtering). Values outside the mask must be finite (they are multiplied by 0).
"""

from __future__ import annotations

from typing import Literal, Optional

import torch

LOSS_TYPES = ("dapo", "grpo", "dr_grpo")
# TRL adds this to the group std before dividing (grpo_trainer.py: ``advantages / (std_rewards + 1e-4)``).
STD_EPS = 1e-4


def group_advantages(rewards: torch.Tensor, scale: Literal["group", "none"] = "group") -> torch.Tensor:
    """Group-relative advantages ``[num_groups, group_size]`` from rewards of the same shape.

    ``reward - group mean``, divided by ``group std + 1e-4`` when ``scale="group"`` (GRPO; Shao et
    al., 2024, "DeepSeekMath") and not divided when ``scale="none"`` (Dr. GRPO; Liu et al., 2025,
    "Understanding R1-Zero-Like Training", which drops the std for its question-difficulty bias).
    The std is TRL's ``nanstd``: with Bessel's correction (divides by n - 1). As in TRL, a NaN
    reward (a rollout no reward function could score) is left out of its group's mean and std and
    gets advantage 0, as does every rollout of a group with fewer than two scored rewards when
    scaling (its std is undefined); a group of one has std 0 (TRL's ``num_generations == 1`` case).
    """
    if scale not in ("group", "none"):
        raise ValueError(f"scale must be 'group' or 'none', got {scale!r}")
    if rewards.dim() != 2 or not rewards.is_floating_point():
        raise ValueError(f"rewards must be a float [num_groups, group_size] tensor, got {rewards.dtype} "
                         f"{tuple(rewards.shape)}")
    mean = torch.nanmean(rewards, dim=1, keepdim=True)
    advantages = rewards - mean
    if scale == "group":
        if rewards.size(1) > 1:
            count = (~torch.isnan(rewards)).sum(dim=1, keepdim=True)
            var = torch.nanmean(advantages ** 2, dim=1, keepdim=True) * count / (count - 1)
            std = torch.where(count > 1, var, torch.nan).sqrt()
        else:
            std = torch.zeros_like(mean)
        advantages = advantages / (std + STD_EPS)
    return torch.nan_to_num(advantages, nan=0.0)


def truncated_is_weights(trainer_logps: torch.Tensor, engine_logps: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance-sampling weights ``min(exp(trainer - engine), cap)``, detached.

    They correct for the rollout engine sampling from a slightly different distribution than the
    trainer's (different kernels, precision): TRL's ``vllm_importance_sampling_correction`` with
    ``vllm_importance_sampling_mode="token_truncate"`` and ``vllm_importance_sampling_clip_min=None``
    (truncated IS, Yao et al., 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL
    Training"). ``trainer_logps`` are the trainer's log-probs of the sampled tokens before the update
    (TRL's ``old_per_token_logps``). As in TRL, a NaN difference (the engine could not score a
    token) gives weight 1. TRL also zeroes the difference outside the mask (weight 1 there); here
    those positions keep their value, which the mask removes from the loss anyway.
    """
    if not cap > 0:
        raise ValueError(f"cap must be > 0, got {cap!r}")
    diff = torch.nan_to_num((trainer_logps - engine_logps).detach(), nan=0.0)
    return torch.exp(diff).clamp(max=cap)


def policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    ref_logps: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
    is_weights: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token loss ``[B, T]`` (zero outside ``mask``) and per-token statistics.

    With ``r = exp(logps - old_logps)`` and ``A`` the advantage (``[B]``, one per rollout, or
    ``[B, T]``), the loss is ``-min(r * A, clamp(r, 1 - clip_low, 1 + clip_high) * A)``, times
    ``is_weights`` when given, plus ``kl_coef * (exp(ref - logps) - (ref - logps) - 1)`` (Schulman's
    k3 estimator of KL(policy || reference), unweighted) when ``kl_coef > 0``: TRL's ``_compute_loss``
    branch for ``grpo`` / ``dapo`` / ``dr_grpo`` in that order. Gradients flow to ``logps`` only.

    ``stats`` (detached, ``[B, T]``, zero outside the mask, so a sum over tokens divided by the
    mask's sum is TRL's logged mean): ``clipped_low`` where ``r < 1 - clip_low`` and ``A < 0``,
    ``clipped_high`` where ``r > 1 + clip_high`` and ``A > 0`` (the tokens whose gradient the clip
    removes; TRL's ``clip_ratio/low_mean`` and ``clip_ratio/high_mean``), ``clipped`` either of the
    two (``clip_ratio/region_mean``), and ``kl`` (the k3 values, TRL's ``kl``) when ``kl_coef > 0``.
    """
    if not 0 <= clip_low < 1 or not clip_high >= 0:
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got {clip_low!r}, {clip_high!r}")
    if not kl_coef >= 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef!r}")
    if kl_coef > 0 and ref_logps is None:
        raise ValueError("kl_coef > 0 needs ref_logps")
    if logps.dim() != 2 or old_logps.shape != logps.shape or mask.shape != logps.shape:
        raise ValueError(f"logps, old_logps and mask must share one [B, T] shape, got {tuple(logps.shape)}, "
                         f"{tuple(old_logps.shape)}, {tuple(mask.shape)}")
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    advantages = advantages.detach().to(logps.dtype)
    m = mask.to(logps.dtype)

    ratio = torch.exp(logps - old_logps.detach())
    clipped_ratio = torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    per_token = -torch.min(ratio * advantages, clipped_ratio * advantages)
    if is_weights is not None:
        per_token = per_token * is_weights.detach()
    stats = {}
    if kl_coef > 0:
        delta = ref_logps.detach() - logps
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + kl_coef * kl
        stats["kl"] = kl.detach() * m
    with torch.no_grad():
        low = (ratio < 1 - clip_low) & (advantages < 0)
        high = (ratio > 1 + clip_high) & (advantages > 0)
        stats["clipped_low"] = low.to(m.dtype) * m
        stats["clipped_high"] = high.to(m.dtype) * m
        stats["clipped"] = (low | high).to(m.dtype) * m
    return per_token * m, stats


def reduce_loss(
    loss_type: str,
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    rows_valid: torch.Tensor,
    max_new_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss_sum, normalizer)`` of a micro-batch, to be summed over micro-batches and ranks.

    The loss of a step is ``sum(loss_sum) / max(sum(normalizer), 1)`` over all its micro-batches
    on all ranks, which is TRL's loss of the whole batch at once, however it is split (TRL itself
    rescales each micro-batch's loss by its accumulation and process counts to the same end):

    * ``dapo``: ``sum(l * m) / sum(m)``, a mean over all response tokens of the batch (DAPO; Yu et
      al., 2025; TRL's ``dapo`` normalizes by ``num_items_in_batch``, the generation batch's tokens);
    * ``grpo``: the mean over rollouts of each rollout's mean over its tokens: numerator
      ``sum_i(sum_t l*m / max(sum_t m, 1))``, normalizer the rollout count (TRL's ``grpo``);
    * ``dr_grpo``: ``sum(l * m) / (rollouts * max_new_tokens)`` (Dr. GRPO; TRL's ``dr_grpo`` with
      ``max_completion_length``).

    ``rows_valid`` ``[B]`` marks the rows that are rollouts; other rows (padding to a fixed batch
    size) count nowhere. A rollout whose mask is all zero (a truncated response under overlong
    filtering) is still a rollout: it adds nothing to ``loss_sum`` but counts in ``grpo``'s and
    ``dr_grpo``'s normalizer, as TRL keeps such rows in its batch. ``normalizer`` is an int64 count.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown RL loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
    if per_token_loss.dim() != 2 or mask.shape != per_token_loss.shape or rows_valid.shape != mask.shape[:1]:
        raise ValueError(f"need per_token_loss and mask [B, T] and rows_valid [B], got "
                         f"{tuple(per_token_loss.shape)}, {tuple(mask.shape)}, {tuple(rows_valid.shape)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    valid = rows_valid.bool()
    keep = mask.bool() & valid.unsqueeze(1)
    token_losses = per_token_loss * keep.to(per_token_loss.dtype)
    if loss_type == "grpo":
        per_row = token_losses.sum(dim=1) / keep.sum(dim=1).clamp(min=1).to(per_token_loss.dtype)
        return per_row.sum(), valid.sum()
    if loss_type == "dapo":
        return token_losses.sum(), keep.sum()
    return token_losses.sum(), valid.sum() * max_new_tokens
