"""DPO loss functions on sequence log-probabilities: pure torch, one value per preference pair.

**Sequence log-prob.** Every ``*_logps`` argument is, per pair, the *sum over the completion
tokens* of ``log p(token | everything before it)``; prompt tokens and padding contribute nothing.
This is what TRL's ``DPOTrainer`` computes (labels are ``-100`` outside the completion, the
per-token log-probs are zero there, and ``.sum(dim=1)`` adds the rest). The reference log-probs
are constants: they are detached here, as the reference model runs without gradient.

**Formulas.** With the log-ratios ``c = policy_chosen - ref_chosen`` and
``r = policy_rejected - ref_rejected`` and ``delta = c - r``, each loss type matches TRL 1.16's
``DPOTrainer._compute_loss`` (``trl/trainer/dpo_trainer.py``) with ``f_divergence_type="reverse_kl"``
and ``ld_alpha=None``, except where noted:

* ``sigmoid``: DPO (Rafailov et al., 2023, "Direct Preference Optimization: Your Language Model is
  Secretly a Reward Model"): ``-logsigmoid(beta * delta)``. With ``label_smoothing = eps > 0`` it is
  conservative DPO (cDPO; Mitchell, 2023, "A note on DPO with noisy preferences & relationship to
  IPO"): ``-(1 - eps) * logsigmoid(beta * delta) - eps * logsigmoid(-beta * delta)``, the binary
  cross-entropy against a label that is wrong with probability ``eps``. TRL 1.16's ``sigmoid``
  ignores ``label_smoothing`` (its earlier releases applied exactly this formula); 1.16 keeps the
  formula in its ``aot`` loss, which for a single pair is cDPO.
* ``robust``: robust DPO (Chowdhury et al., 2024, "Provably Robust DPO: Aligning Language Models
  with Noisy Feedback"), an unbiased loss under label flips with probability ``eps``:
  ``(-(1 - eps) * logsigmoid(beta * delta) + eps * logsigmoid(-beta * delta)) / (1 - 2 * eps)``.
* ``ipo``: IPO (Azar et al., 2023, "A General Theoretical Paradigm to Understand Learning from Human
  Preferences", Eq. 17, ``beta`` playing tau): ``(c / n_chosen - r / n_rejected - 1 / (2 * beta)) ** 2``
  with ``n`` the completion token counts clamped to at least 1. The per-token normalization is TRL's
  (agreed with the IPO authors, it says); it makes beta comparable across completion lengths.
* ``hinge``: SLiC's hinge on the reward margin (Zhao et al., 2023, "SLiC-HF: Sequence Likelihood
  Calibration with Human Feedback"): ``relu(1 - beta * delta)``.

**Rewards** are TRL's implicit rewards ``beta * c`` and ``beta * r``, detached, for every loss type
(IPO's included: its rewards are not length-normalized).

**Reduction.** TRL averages the per-pair losses over the pairs of its micro-batch. Here every
function returns per-pair values: summed over pairs and divided by the pair count they give the
same mean for any split of a batch into micro-batches and ranks.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "robust", "ipo", "hinge")
# The loss types whose formula has a label-smoothing term; the others would silently ignore it.
LABEL_SMOOTHING_LOSS_TYPES = ("sigmoid", "robust")
METRIC_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected")


def check_dpo_hyperparameters(beta: float, loss_type: str, label_smoothing: float) -> None:
    """Raise ValueError, naming the parameter, for values no loss type accepts."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"DPO beta must be a finite number > 0, got {beta!r}")
    if (isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float))
            or not 0.0 <= label_smoothing < 0.5):
        # At 0.5 a label says nothing (cDPO then pulls chosen and rejected together) and robust DPO
        # divides by zero.
        raise ValueError(f"DPO label_smoothing must be in [0, 0.5), got {label_smoothing!r}")
    if label_smoothing and loss_type not in LABEL_SMOOTHING_LOSS_TYPES:
        raise ValueError(f"DPO label_smoothing={label_smoothing} has no effect with loss_type={loss_type!r}; "
                         f"it applies to {' and '.join(LABEL_SMOOTHING_LOSS_TYPES)} only (set it to 0)")


def _check_pairs(**tensors: Optional[torch.Tensor]) -> None:
    shape = None
    for name, tensor in tensors.items():
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(tensor).__name__}")
        if tensor.dim() != 1:
            raise ValueError(f"{name} must be 1-D (one value per pair), got shape {tuple(tensor.shape)}")
        if shape is None:
            shape = tensor.shape
        elif tensor.shape != shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, the other inputs {tuple(shape)}; "
                             "every input holds one value per pair")


def dpo_losses(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    loss_type: str,
    label_smoothing: float = 0.0,
    chosen_token_counts: Optional[torch.Tensor] = None,
    rejected_token_counts: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair ``(losses, chosen_rewards, rejected_rewards)``, each of shape ``[pairs]``.

    Inputs are sequence log-probs (sums over completion tokens), one per pair. ``loss_type`` is
    one of :data:`LOSS_TYPES` (formulas in the module docstring). ``ipo`` needs the completion
    token counts (``chosen_token_counts`` / ``rejected_token_counts``); the other types ignore
    them. Gradients flow to the policy log-probs only.
    """
    check_dpo_hyperparameters(beta, loss_type, label_smoothing)
    _check_pairs(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                 ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
                 chosen_token_counts=chosen_token_counts, rejected_token_counts=rejected_token_counts)
    for name, tensor in (("policy_chosen_logps", policy_chosen_logps),
                         ("policy_rejected_logps", policy_rejected_logps),
                         ("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
        if not tensor.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {tensor.dtype}")

    chosen_logratios = policy_chosen_logps - ref_chosen_logps.detach()
    rejected_logratios = policy_rejected_logps - ref_rejected_logps.detach()
    delta = chosen_logratios - rejected_logratios
    eps = float(label_smoothing)

    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
        if eps:
            losses = losses * (1 - eps) - F.logsigmoid(-beta * delta) * eps
    elif loss_type == "robust":
        clean = -(1 - eps) * F.logsigmoid(beta * delta)
        flipped = -eps * F.logsigmoid(-beta * delta)
        losses = (clean - flipped) / (1 - 2 * eps)
    elif loss_type == "ipo":
        if chosen_token_counts is None or rejected_token_counts is None:
            raise ValueError("DPO loss_type='ipo' normalizes by completion length: pass chosen_token_counts "
                             "and rejected_token_counts")
        n_chosen = chosen_token_counts.to(chosen_logratios.dtype).clamp(min=1.0)
        n_rejected = rejected_token_counts.to(rejected_logratios.dtype).clamp(min=1.0)
        losses = (chosen_logratios / n_chosen - rejected_logratios / n_rejected - 1 / (2 * beta)) ** 2
    else:  # hinge
        losses = torch.relu(1 - beta * delta)

    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


def dpo_metrics(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """TRL's DPO metrics as per-pair values (detached): name -> tensor of shape ``[pairs]``.

    Summed over pairs and divided by the pair count, each is the mean TRL logs under that name:
    ``rewards/chosen``, ``rewards/rejected`` (the rewards from :func:`dpo_losses`),
    ``rewards/accuracies`` (1 where the chosen reward is strictly greater, so ties count 0),
    ``rewards/margins`` (chosen minus rejected reward), ``logps/chosen``, ``logps/rejected`` (the
    policy's sequence log-probs).
    """
    _check_pairs(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                 chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype),
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": policy_chosen_logps.detach(),
        "logps/rejected": policy_rejected_logps.detach(),
    }


def sft_term(policy_chosen_logps: torch.Tensor, chosen_token_counts: torch.Tensor) -> torch.Tensor:
    """Per-pair NLL of the chosen completion per token: ``-policy_chosen_logps / max(n_chosen, 1)``.

    The objective adds ``sft_weight * sft_term(...)`` to the per-pair DPO losses, which is RPO
    (Pang et al., 2024, "Iterative Reasoning Preference Optimization": DPO plus a length-normalized
    NLL of the chosen answer).

    How TRL computes it: TRL 1.16 has no ``rpo_alpha`` option any more (earlier releases added
    ``rpo_alpha`` times the NLL); RPO is ``loss_type=["sigmoid", "sft"]`` with
    ``loss_weights=[1.0, alpha]``, and its ``sft`` term is ``-chosen_per_token_logps[chosen_mask].mean()``:
    the mean NLL over *all* chosen completion tokens of the micro-batch,
    ``sum_i(-policy_chosen_logps_i) / sum_i(n_i)``, which weights pairs by length and needs the
    batch's token total, so it has no per-pair form. This function's mean over pairs,
    ``mean_i(-policy_chosen_logps_i / n_i)``, weights every pair equally. The two are equal when
    every chosen completion of TRL's micro-batch has the same number of tokens (in particular for
    a micro-batch of one pair); otherwise they differ, and this one does not depend on how a
    batch is split into micro-batches.
    """
    _check_pairs(policy_chosen_logps=policy_chosen_logps, chosen_token_counts=chosen_token_counts)
    if not policy_chosen_logps.is_floating_point():
        raise ValueError(f"policy_chosen_logps must be a floating-point tensor, got {policy_chosen_logps.dtype}")
    # A completion with no tokens has log-prob 0: clamping keeps its term 0 instead of 0/0.
    counts = chosen_token_counts.to(policy_chosen_logps.dtype).clamp(min=1.0)
    return -policy_chosen_logps / counts
