"""GRPO / DAPO / Dr. GRPO loss math against TRL's own loss code, called for real.

TRL 1.16 computes the loss in ``GRPOTrainer._compute_loss(model, inputs)``. It is called here
unbound, on a stand-in trainer carrying the attributes that method reads, whose
``_get_per_token_logps_and_entropies`` returns rows of a float64 leaf tensor: TRL's own arithmetic
runs on the same log-probs as ours, and every expected loss, gradient and metric is TRL's output.
TRL's advantages are inline in ``_generate_and_score_completions`` (no function to call), so they
are checked against the GRPO paper's formula written out here.
"""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from trl.trainer.grpo_trainer import GRPOTrainer
from trl.trainer.utils import nanstd

from megatron_seed.training.objectives.rl_loss import (LOSS_TYPES, group_advantages, policy_loss, reduce_loss,
                                                       truncated_is_weights)

TOL = dict(rtol=0, atol=1e-10)
MAX_NEW = 16  # TRL's max_completion_length; longer than any completion below, as in TRL
CLIP_LOW, CLIP_HIGH = 0.2, 0.28


def make_batch(rows=8, seq=10, seed=0):
    """Random rollouts: completion masks of varying lengths (row 2 all zero: a masked truncated
    completion), ratios spread across both clip bounds, one advantage per rollout."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, seq + 1, (rows,), generator=g)
    lengths[2] = 0
    mask = (torch.arange(seq) < lengths.unsqueeze(1)).int()
    logps = -3 * torch.rand(rows, seq, generator=g, dtype=torch.float64)
    old = logps + 0.3 * torch.randn(rows, seq, generator=g, dtype=torch.float64)
    ref = logps + 0.2 * torch.randn(rows, seq, generator=g, dtype=torch.float64)
    advantages = torch.randn(rows, generator=g, dtype=torch.float64)
    is_weights = 0.5 + 1.5 * torch.rand(rows, seq, generator=g, dtype=torch.float64)
    return SimpleNamespace(rows=rows, mask=mask, logps=logps, old=old, ref=ref, advantages=advantages,
                           is_weights=is_weights)


def trl_loss(batch, leaf, rows, *, loss_type, beta, use_is, ga=1, num_processes=1):
    """TRL's loss on the rollouts ``rows`` of ``batch`` as one micro-batch of a step of ``ga``
    accumulation steps on each of ``num_processes`` ranks; the policy's log-probs are ``leaf``'s rows.

    Returns (loss, the stand-in trainer's logged metrics)."""
    rows = torch.as_tensor(rows)
    mask = batch.mask[rows]

    def get_logps(model, input_ids, attention_mask, logits_to_keep, **kwargs):
        assert logits_to_keep == mask.size(1)
        return leaf[rows], torch.zeros(mask.shape, dtype=leaf.dtype), None

    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=get_logps, aux_loss_enabled=False, top_entropy_quantile=1.0,
        off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta, loss_type=loss_type,
        epsilon_low=CLIP_LOW, epsilon_high=CLIP_HIGH, use_vllm=use_is, vllm_importance_sampling_correction=use_is,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=ga,
        max_completion_length=MAX_NEW, _entropy_bonus_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        accelerator=SimpleNamespace(num_processes=num_processes, gather=lambda t: t,
                                    reduce=lambda t, reduction: t),  # one rank's view
        # TRL's default steps_per_generation is gradient_accumulation_steps: one generation batch per step.
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=ga))
    inputs = {
        "prompt_ids": torch.zeros(len(rows), 3, dtype=torch.long), "prompt_mask": torch.ones(len(rows), 3, dtype=torch.int),
        "completion_ids": torch.zeros_like(mask, dtype=torch.long), "completion_mask": mask,
        "advantages": batch.advantages[rows], "old_per_token_logps": batch.old[rows],
        # TRL gathers the loss tokens of the whole generation batch (all ranks, all micro-batches).
        "num_items_in_batch": batch.mask.sum(),
    }
    if beta:
        inputs["ref_per_token_logps"] = batch.ref[rows]
    if use_is:
        inputs["importance_sampling_ratio"] = batch.is_weights[rows]
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    return loss, {k: v[0] for k, v in trainer._metrics["train"].items()}


def our_loss(batch, leaf, parts, *, loss_type, beta, use_is, rows_valid=None):
    """Our step loss: each part (a list of rows) is a micro-batch; sum(loss_sum) / sum(normalizer)."""
    rows_valid = torch.ones(batch.rows, dtype=torch.bool) if rows_valid is None else rows_valid
    total, norm, all_stats = 0, 0, []
    for rows in parts:
        rows = torch.as_tensor(rows)
        per_token, stats = policy_loss(
            leaf[rows], batch.old[rows], batch.advantages[rows], batch.mask[rows], clip_low=CLIP_LOW,
            clip_high=CLIP_HIGH, ref_logps=batch.ref[rows], kl_coef=beta,
            is_weights=batch.is_weights[rows] if use_is else None)
        loss_sum, normalizer = reduce_loss(loss_type, per_token, batch.mask[rows], rows_valid[rows], MAX_NEW)
        assert normalizer.dtype == torch.int64 and not normalizer.requires_grad
        total, norm = total + loss_sum, norm + normalizer
        all_stats.append(stats)
    return total / norm.clamp(min=1), all_stats


def split(rows, parts):
    return [list(range(rows))[i::parts] for i in range(parts)]


@pytest.mark.parametrize("use_is", [False, True])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_and_gradients_match_trl(loss_type, beta, use_is):
    batch = make_batch(seed=len(loss_type) + int(beta * 100) + use_is)
    mine = batch.logps.clone().requires_grad_(True)
    loss, _ = our_loss(batch, mine, [range(batch.rows)], loss_type=loss_type, beta=beta, use_is=use_is)
    loss.backward()
    assert mine.grad[batch.mask == 0].eq(0).all() and mine.grad.abs().sum() > 0

    # (ranks, accumulation steps): the batch in 1, 2 or 4 equal micro-batches, as TRL splits it.
    for num_processes, ga in [(1, 1), (1, 2), (2, 1), (2, 2)]:
        theirs = batch.logps.clone().requires_grad_(True)
        # The ranks' gradients are averaged (DDP), each rank's micro-batch gradients summed.
        trl_total = sum(trl_loss(batch, theirs, rows, loss_type=loss_type, beta=beta, use_is=use_is, ga=ga,
                                 num_processes=num_processes)[0]
                        for rows in split(batch.rows, num_processes * ga)) / num_processes
        trl_total.backward()
        torch.testing.assert_close(loss.detach(), trl_total.detach(), **TOL)
        torch.testing.assert_close(mine.grad, theirs.grad, **TOL)

        split_leaf = batch.logps.clone().requires_grad_(True)
        split_loss, _ = our_loss(batch, split_leaf, split(batch.rows, num_processes * ga), loss_type=loss_type,
                                 beta=beta, use_is=use_is)
        split_loss.backward()
        torch.testing.assert_close(split_loss.detach(), trl_total.detach(), **TOL)
        torch.testing.assert_close(split_leaf.grad, theirs.grad, **TOL)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_unequal_splits_and_padding_rows_change_nothing(loss_type):
    batch = make_batch(seed=5)
    whole = batch.logps.clone().requires_grad_(True)
    expected, _ = our_loss(batch, whole, [range(8)], loss_type=loss_type, beta=0.04, use_is=True)
    expected.backward()

    # Four padding rows (not rollouts) with nonzero masks and log-probs, and uneven micro-batches.
    padded = make_batch(rows=12, seed=6)
    for name in ("mask", "logps", "old", "ref", "advantages", "is_weights"):
        getattr(padded, name)[[0, 1, 2, 3, 5, 6, 8, 9]] = getattr(batch, name)
    assert padded.mask[[4, 7, 10, 11]].sum() > 0
    rows_valid = torch.ones(12, dtype=torch.bool)
    rows_valid[[4, 7, 10, 11]] = False
    leaf = padded.logps.clone().requires_grad_(True)
    loss, _ = our_loss(padded, leaf, [[0, 4], [1, 2, 3, 5, 6, 7, 8], [9, 10, 11]], loss_type=loss_type,
                       beta=0.04, use_is=True, rows_valid=rows_valid)
    loss.backward()
    torch.testing.assert_close(loss.detach(), expected.detach(), **TOL)
    torch.testing.assert_close(leaf.grad[[0, 1, 2, 3, 5, 6, 8, 9]], whole.grad, **TOL)
    assert leaf.grad[[4, 7, 10, 11]].eq(0).all()


def test_all_zero_mask_row_counts_as_a_rollout_except_in_dapo():
    # Row 1 is a rollout with no loss tokens (truncated, overlong-filtered); row 2 is padding.
    per_token = torch.tensor([[1.0, 3.0, 5.0], [7.0, 7.0, 7.0], [9.0, 9.0, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 1]])
    valid = torch.tensor([True, True, False])
    s, n = reduce_loss("grpo", per_token, mask, valid, 4)
    assert (s.item(), n.item()) == (2.0, 2)  # mean of the row means (2 and 0): 1
    s, n = reduce_loss("dapo", per_token, mask, valid, 4)
    assert (s.item(), n.item()) == (4.0, 2)
    s, n = reduce_loss("dr_grpo", per_token, mask, valid, 4)
    assert (s.item(), n.item()) == (4.0, 8)


def test_clip_stats_and_metrics_match_trl():
    batch = make_batch(rows=16, seed=9)
    leaf = batch.logps.clone()
    _, stats = our_loss(batch, leaf, [range(16)], loss_type="dapo", beta=0.04, use_is=False)
    _, logged = trl_loss(batch, leaf, range(16), loss_type="dapo", beta=0.04, use_is=False)
    tokens = batch.mask.sum().item()
    for ours, theirs in [("clipped_low", "clip_ratio/low_mean"), ("clipped_high", "clip_ratio/high_mean"),
                         ("clipped", "clip_ratio/region_mean"), ("kl", "kl")]:
        # TRL takes the clip fractions in float32 (``is_low_clipped.float()``).
        assert stats[0][ours].sum().item() / tokens == pytest.approx(logged[theirs], rel=1e-6, abs=0), ours
    assert 0 < stats[0]["clipped_low"].sum() and 0 < stats[0]["clipped_high"].sum()  # both bounds exercised
    assert all(not v.requires_grad for v in stats[0].values())


def test_clip_stats_count_what_they_claim():
    ratios = torch.tensor([0.5, 0.79, 0.81, 1.0, 1.27, 1.29, 2.0], dtype=torch.float64)
    old = torch.zeros(3, 7, dtype=torch.float64)
    logps = ratios.log().expand(3, 7).clone().requires_grad_(True)
    advantages = torch.tensor([-1.0, 1.0, 0.0], dtype=torch.float64)
    mask = torch.ones(3, 7)
    mask[0, 0] = 0  # outside the mask nothing is counted
    per_token, stats = policy_loss(logps, old, advantages, mask, clip_low=0.2, clip_high=0.28)
    assert stats["clipped_low"].tolist() == [[0, 1, 0, 0, 0, 0, 0], [0] * 7, [0] * 7]
    assert stats["clipped_high"].tolist() == [[0] * 7, [0, 0, 0, 0, 0, 1, 1], [0] * 7]
    assert stats["clipped"].tolist() == [[0, 1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1, 1], [0] * 7]
    assert "kl" not in stats
    # "Clipped" means the clip took the token's gradient away; every other token (A != 0) keeps one.
    per_token.sum().backward()
    kept = (mask.bool() & (advantages != 0).unsqueeze(1)).float() - stats["clipped"]
    assert torch.equal(logps.grad != 0, kept.bool())
    # A < 0: -min(-r, -clamp(r)) = max(r, clamp(r)); A > 0: -min(r, clamp(r)).
    torch.testing.assert_close(per_token[0, 1:], torch.maximum(ratios, ratios.clamp(0.8, 1.28))[1:], **TOL)
    torch.testing.assert_close(per_token[1], -torch.minimum(ratios, ratios.clamp(0.8, 1.28)), **TOL)


def test_policy_loss_checks_inputs_and_takes_per_token_advantages():
    x = torch.zeros(2, 3, dtype=torch.float64)
    mask = torch.ones(2, 3)
    with pytest.raises(ValueError, match="ref_logps"):
        policy_loss(x, x, torch.ones(2), mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="clip_low"):
        policy_loss(x, x, torch.ones(2), mask, clip_low=1.0)
    with pytest.raises(ValueError, match="loss_type"):
        reduce_loss("bnpo", x, mask, torch.ones(2, dtype=torch.bool), 4)
    logps = torch.randn(2, 3, dtype=torch.float64)
    adv = torch.tensor([0.5, -2.0], dtype=torch.float64)
    a, _ = policy_loss(logps, x, adv, mask)
    b, _ = policy_loss(logps, x, adv.unsqueeze(1).expand(2, 3), mask)
    assert torch.equal(a, b)


def paper_advantages(rewards, scale):
    """GRPO's outcome advantage (Shao et al., 2024, DeepSeekMath, section 4.1.2):
    A_i = (r_i - mean(r)) / std(r), with TRL's 1e-4 added to the std and its sample std
    (grpo_trainer.py: ``advantages = rewards - mean_grouped_rewards`` then
    ``advantages = advantages / (std_rewards + 1e-4)``, std from ``nanstd``); Dr. GRPO drops the std."""
    out = []
    for group in rewards.tolist():
        mean = sum(group) / len(group)
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (len(group) - 1)) if len(group) > 1 else 0.0
        out.append([(r - mean) / (std + 1e-4) if scale == "group" else r - mean for r in group])
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("scale", ["group", "none"])
def test_group_advantages_match_the_paper_formula(scale):
    g = torch.Generator().manual_seed(1)
    rewards = torch.randn(5, 8, generator=g, dtype=torch.float64)
    rewards[1] = torch.tensor([0.0, 1, 1, 0, 0, 0, 1, 0])  # pass/fail rewards
    rewards[2] = 1.0  # a group with one reward: advantage 0
    adv = group_advantages(rewards, scale)
    torch.testing.assert_close(adv, paper_advantages(rewards, scale), **TOL)
    assert adv[2].eq(0).all()
    # TRL's std is the sample std (Bessel's correction), as the reference above assumes. (Its
    # correction factor count / (count - 1) divides int tensors, so it is float32 even for float64
    # rewards: equal to 1e-7 only.)
    torch.testing.assert_close(nanstd(rewards, dim=1), rewards.std(dim=1, correction=1), rtol=1e-7, atol=0)
    assert not torch.allclose(nanstd(rewards, dim=1), rewards.std(dim=1, correction=0), rtol=1e-3)
    torch.testing.assert_close(group_advantages(rewards[:, :1], scale), torch.zeros(5, 1, dtype=torch.float64))


def test_group_advantages_leave_out_unscored_rewards_as_trl_does():
    rewards = torch.tensor([[1.0, math.nan, 0.0, 0.0], [math.nan, 1.0, math.nan, math.nan]], dtype=torch.float64)
    adv = group_advantages(rewards)
    torch.testing.assert_close(adv[0, [0, 2, 3]], paper_advantages(torch.tensor([[1.0, 0.0, 0.0]]), "group")[0],
                               **TOL)
    assert adv[0, 1] == 0 and adv[1].eq(0).all()  # no std from a single scored reward
    assert group_advantages(rewards, "none")[1].tolist() == [0.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="scale"):
        group_advantages(rewards, "batch")


def test_truncated_is_weights():
    trainer = torch.tensor([[-1.0, -2.0, -0.5, -1.0]], dtype=torch.float64, requires_grad=True)
    engine = torch.tensor([[-1.5, -1.0, -3.0, math.nan]], dtype=torch.float64)
    w = truncated_is_weights(trainer, engine, cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[math.exp(0.5), math.exp(-1.0), 2.0, 1.0]], dtype=torch.float64),
                               **TOL)
    assert not w.requires_grad  # a constant weight, as TRL's is computed without gradient
    with pytest.raises(ValueError, match="cap"):
        truncated_is_weights(trainer, engine, cap=0.0)


@pytest.fixture
def tensor_parallel_of_one(tmp_path):
    from megatron.core import parallel_state

    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    yield
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


def test_token_logps_and_entropy_at_chosen_positions_equal_plain_torch(tensor_parallel_of_one):
    """The trainer's log-probs (and their gradient) and entropies, computed only where the loss needs
    them, equal a plain float64 log_softmax over the whole tensor there; elsewhere they are 0."""
    from megatron_seed.training.objectives.rl import token_logps_and_entropy

    g = torch.Generator().manual_seed(0)
    b, s, v, temperature = 2, 37, 301, 0.6
    logits = (torch.randn(b, s, v, generator=g) * 4).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, v, (b, s), generator=g)
    where = torch.zeros(b, s)
    where[0, 5:30] = 1
    where[1, 11:12] = 1
    logps, ent = token_logps_and_entropy(logits, labels, temperature, where=where)

    ref_logits = logits.detach().double().requires_grad_()
    logp_all = torch.log_softmax(ref_logits / temperature, dim=-1)
    ref = logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1) * where
    ref_ent = -(logp_all.exp() * logp_all).sum(-1).detach() * where
    torch.testing.assert_close(logps.double(), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=0, atol=1e-4)
    weights = torch.randn(b, s, generator=g)
    (logps * weights).sum().backward()
    (ref * weights).sum().backward()
    # The gradient is stored in the logits' bf16: within its rounding of the float64 gradient.
    torch.testing.assert_close(logits.grad.double(), ref_logits.grad, rtol=2 ** -8, atol=1e-5)
    assert float(logits.grad[where == 0].abs().max()) == 0.0
    full, full_ent = token_logps_and_entropy(logits.detach(), labels, temperature)
    torch.testing.assert_close(full * where, logps.detach(), rtol=0, atol=0)
    torch.testing.assert_close(full_ent * where, ent, rtol=0, atol=1e-6)
