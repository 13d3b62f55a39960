"""DPO losses, rewards, metrics and the SFT term against TRL's own loss code, called for real.

TRL 1.16 computes the DPO loss inside ``DPOTrainer._compute_loss(model, inputs, return_outputs)``.
It is called here unbound, on a stand-in trainer carrying the attributes that method reads, with a
stand-in model whose per-token log-probs are a float64 leaf tensor; the reference log-probs come
in as precomputed. Nothing of TRL's formulas is restated here: every expected value is TRL's output.
"""

import math
import typing
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from trl.trainer.dpo_trainer import DPOTrainer

from megatron_seed.config.schema import DPO_LOSS_TYPES, DPOConfig
from megatron_seed.training.objectives.dpo_loss import LOSS_TYPES, METRIC_KEYS, dpo_losses, dpo_metrics, sft_term

TOL = dict(rtol=0, atol=1e-10)
# The order in which TRL 1.16 passes the per-pair metric tensors to accelerator.gather.
TRL_GATHER_ORDER = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                    "logps/chosen", "logps/rejected")


def make_batch(pairs, seq=12, seed=0, equal_chosen_lengths=False):
    """Random pairs in TRL's layout: rows [chosen..., rejected...], completion after a prompt."""
    g = torch.Generator().manual_seed(seed)
    completion_mask = torch.zeros(2 * pairs, seq, dtype=torch.long)
    attention_mask = torch.zeros(2 * pairs, seq, dtype=torch.long)
    fixed = int(torch.randint(1, seq - 4, (1,), generator=g))
    for row in range(2 * pairs):
        prompt = int(torch.randint(1, 4, (1,), generator=g))
        n = int(torch.randint(1, seq - prompt + 1, (1,), generator=g))
        if equal_chosen_lengths and row < pairs:
            n = fixed
        completion_mask[row, prompt:prompt + n] = 1
        attention_mask[row, :prompt + n] = 1
    token_logps = -3 * torch.rand(2 * pairs, seq - 1, generator=g, dtype=torch.float64)
    ref = -3 * seq / 2 * torch.rand(2 * pairs, generator=g, dtype=torch.float64)
    return SimpleNamespace(pairs=pairs, completion_mask=completion_mask, attention_mask=attention_mask,
                           token_logps=token_logps, ref_chosen=ref[:pairs], ref_rejected=ref[pairs:])


def trl_loss(batch, leaf, rows, loss_types, *, beta, label_smoothing=0.0, loss_weights=None):
    """TRL's loss on the pairs ``rows`` of ``batch``; the policy's token log-probs are ``leaf``'s rows.

    Returns (loss, the stand-in trainer's logged metrics, the per-pair tensors TRL gathered).
    """
    rows = torch.as_tensor(rows)
    both = torch.cat([rows, rows + batch.pairs])
    completion_mask = batch.completion_mask[both]
    shift_mask = completion_mask[:, 1:].to(leaf.dtype)
    zeros = torch.zeros_like(shift_mask)

    def model(**kwargs):
        # Zero outside the completion, as TRL's fused LM head returns for labels of -100.
        return SimpleNamespace(log_probs=leaf[both] * shift_mask, entropy=zeros, mean_logits=zeros,
                               is_top1=zeros.bool())

    gathered = []

    def gather(tensor):
        gathered.append(tensor)
        return tensor

    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather=gather, gather_for_metrics=lambda t: t),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=list(loss_types), loss_weights=loss_weights or [1.0] * len(loss_types), beta=beta,
        label_smoothing=label_smoothing, use_weighting=False, _metrics={"train": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1, args=SimpleNamespace())
    inputs = {"input_ids": torch.zeros_like(completion_mask), "attention_mask": batch.attention_mask[both],
              "completion_mask": completion_mask, "ref_chosen_logps": batch.ref_chosen[rows],
              "ref_rejected_logps": batch.ref_rejected[rows]}
    loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    metrics = {k: v[0] for k, v in trainer._metrics["train"].items()}
    return loss, metrics, dict(zip(TRL_GATHER_ORDER, gathered))


def ours(batch, leaf, **kwargs):
    """Our per-pair losses and rewards from the same token log-probs (sum over completion tokens)."""
    shift_mask = batch.completion_mask[:, 1:].to(leaf.dtype)
    seq_logps = (leaf * shift_mask).sum(dim=1)
    counts = batch.completion_mask.sum(dim=1)
    chosen, rejected = seq_logps.chunk(2)
    losses, chosen_rewards, rejected_rewards = dpo_losses(
        chosen, rejected, batch.ref_chosen, batch.ref_rejected, chosen_token_counts=counts[:batch.pairs],
        rejected_token_counts=counts[batch.pairs:], **kwargs)
    return losses, chosen_rewards, rejected_rewards, chosen, rejected


# (our loss_type, label_smoothing, TRL's loss_type). TRL 1.16's "sigmoid" ignores label_smoothing;
# the cDPO formula lives on in its "aot" loss, which for a single pair (sorting one value changes
# nothing) is cDPO: that case is compared one pair per TRL call only.
CASES = [("sigmoid", 0.0, "sigmoid"), ("sigmoid", 0.1, "aot"), ("robust", 0.1, "robust"), ("ipo", 0.0, "ipo"),
         ("hinge", 0.0, "hinge")]


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("loss_type,label_smoothing,trl_type", CASES)
def test_losses_and_gradients_match_trl(loss_type, label_smoothing, trl_type, beta):
    batch = make_batch(pairs=6, seed=int(beta * 10) + len(loss_type))
    mine = batch.token_logps.clone().requires_grad_(True)
    losses, chosen_rewards, rejected_rewards, _, _ = ours(batch, mine, beta=beta, loss_type=loss_type,
                                                          label_smoothing=label_smoothing)
    assert losses.shape == (6,) and losses.dtype == torch.float64
    losses.sum().backward()

    # One pair per TRL call: its per-pair loss, and the gradient of the sum over pairs.
    theirs = batch.token_logps.clone().requires_grad_(True)
    per_pair = []
    for i in range(batch.pairs):
        loss, _, gathered = trl_loss(batch, theirs, [i], [trl_type], beta=beta, label_smoothing=label_smoothing)
        per_pair.append(loss)
        torch.testing.assert_close(chosen_rewards[i:i + 1], gathered["rewards/chosen"], **TOL)
        torch.testing.assert_close(rejected_rewards[i:i + 1], gathered["rewards/rejected"], **TOL)
    torch.stack(per_pair).sum().backward()
    torch.testing.assert_close(losses.detach(), torch.stack(per_pair).detach(), **TOL)
    torch.testing.assert_close(mine.grad, theirs.grad, **TOL)
    assert mine.grad.abs().sum() > 0

    if trl_type == "aot":
        return  # for several pairs "aot" sorts across pairs: no longer cDPO
    # The whole batch in one TRL call: its loss is the mean over pairs.
    mine.grad = None
    losses, *_ = ours(batch, mine, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    losses.mean().backward()
    theirs = batch.token_logps.clone().requires_grad_(True)
    loss, _, _ = trl_loss(batch, theirs, range(batch.pairs), [trl_type], beta=beta, label_smoothing=label_smoothing)
    loss.backward()
    torch.testing.assert_close(losses.mean().detach(), loss.detach(), **TOL)
    torch.testing.assert_close(mine.grad, theirs.grad, **TOL)


def test_trl_sigmoid_ignores_label_smoothing_so_cdpo_differs_from_it():
    # Why cDPO is compared with TRL's "aot": were TRL's "sigmoid" to smooth labels again, this fails.
    batch = make_batch(pairs=4, seed=3)
    leaf = batch.token_logps.clone()
    plain, _, _ = trl_loss(batch, leaf, range(4), ["sigmoid"], beta=0.3)
    smoothed, _, _ = trl_loss(batch, leaf, range(4), ["sigmoid"], beta=0.3, label_smoothing=0.2)
    assert torch.equal(plain, smoothed)
    losses, *_ = ours(batch, leaf, beta=0.3, loss_type="sigmoid", label_smoothing=0.2)
    assert abs(losses.mean().item() - plain.item()) > 1e-3


@pytest.mark.parametrize("loss_type,label_smoothing,trl_type", [c for c in CASES if c[2] != "aot"])
def test_metrics_match_trl(loss_type, label_smoothing, trl_type):
    batch = make_batch(pairs=8, seed=11)
    leaf = batch.token_logps.clone()
    losses, chosen_rewards, rejected_rewards, chosen, rejected = ours(
        batch, leaf, beta=0.2, loss_type=loss_type, label_smoothing=label_smoothing)
    metrics = dpo_metrics(chosen, rejected, chosen_rewards, rejected_rewards)
    assert tuple(metrics) == METRIC_KEYS
    _, logged, gathered = trl_loss(batch, leaf, range(8), [trl_type], beta=0.2, label_smoothing=label_smoothing)
    for name in METRIC_KEYS:
        torch.testing.assert_close(metrics[name], gathered[name].to(metrics[name].dtype), **TOL)
        # Summed over pairs and divided by their count: the value TRL logs under the same name.
        assert metrics[name].sum().item() / 8 == pytest.approx(logged[name], rel=0, abs=1e-10), name
    assert 0 < metrics["rewards/accuracies"].sum() < 8  # the random pairs exercise both outcomes


def test_policy_equal_to_reference_gives_ln2():
    logps = -torch.rand(5, dtype=torch.float64) * 40
    other = -torch.rand(5, dtype=torch.float64) * 40
    losses, chosen_rewards, rejected_rewards = dpo_losses(logps, other, logps, other, beta=0.1, loss_type="sigmoid")
    assert torch.equal(losses, torch.full((5,), math.log(2), dtype=torch.float64))
    assert not chosen_rewards.any() and not rejected_rewards.any()
    metrics = dpo_metrics(logps, other, chosen_rewards, rejected_rewards)
    assert not metrics["rewards/accuracies"].any()  # equal rewards are not a correct ranking


def test_metrics_hand_checked():
    chosen_rewards = torch.tensor([1.0, 0.5, -1.0, 0.0])
    rejected_rewards = torch.tensor([0.5, 0.5, -2.0, 0.25])
    chosen = torch.tensor([-3.0, -4.0, -5.0, -6.0], requires_grad=True)
    rejected = torch.tensor([-7.0, -8.0, -9.0, -1.0])
    m = dpo_metrics(chosen, rejected, chosen_rewards, rejected_rewards)
    assert m["rewards/accuracies"].tolist() == [1.0, 0.0, 1.0, 0.0]  # strictly greater only
    assert m["rewards/margins"].tolist() == [0.5, 0.0, 1.0, -0.25]
    assert m["rewards/chosen"].tolist() == [1.0, 0.5, -1.0, 0.0]
    assert m["rewards/rejected"].tolist() == [0.5, 0.5, -2.0, 0.25]
    assert m["logps/chosen"].tolist() == [-3.0, -4.0, -5.0, -6.0]
    assert m["logps/rejected"].tolist() == [-7.0, -8.0, -9.0, -1.0]
    assert not any(v.requires_grad for v in m.values())


def test_rewards_are_beta_times_log_ratio_and_detached():
    pc = torch.tensor([-2.0, -3.0], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([-4.0, -1.0], dtype=torch.float64, requires_grad=True)
    rc, rr = torch.tensor([-3.0, -3.0], dtype=torch.float64), torch.tensor([-2.0, -2.0], dtype=torch.float64)
    losses, cr, rj = dpo_losses(pc, pr, rc, rr, beta=0.5, loss_type="hinge")
    assert cr.tolist() == [0.5, 0.0] and rj.tolist() == [-1.0, 0.5]
    assert not cr.requires_grad and not rj.requires_grad and losses.requires_grad
    # hinge relu(1 - beta * delta): delta = [3, -1] -> [0, 1.5]; the first pair is past the margin.
    assert losses.tolist() == [0.0, 1.5]


def test_reference_gets_no_gradient():
    pc, pr = torch.randn(3, dtype=torch.float64, requires_grad=True), torch.randn(3, dtype=torch.float64)
    rc, rr = torch.randn(3, dtype=torch.float64, requires_grad=True), torch.randn(3, dtype=torch.float64)
    losses, _, _ = dpo_losses(pc, pr, rc, rr, beta=0.1, loss_type="sigmoid")
    losses.sum().backward()
    assert pc.grad is not None and rc.grad is None


def test_sft_term_matches_trl_with_equal_chosen_lengths():
    # RPO in TRL 1.16: loss_type ["sigmoid", "sft"] with loss_weights [1, alpha].
    batch = make_batch(pairs=5, seed=7, equal_chosen_lengths=True)
    alpha = 0.7
    mine = batch.token_logps.clone().requires_grad_(True)
    losses, _, _, chosen, _ = ours(batch, mine, beta=0.1, loss_type="sigmoid")
    total = losses + alpha * sft_term(chosen, batch.completion_mask[:5].sum(dim=1))
    total.mean().backward()
    theirs = batch.token_logps.clone().requires_grad_(True)
    loss, _, _ = trl_loss(batch, theirs, range(5), ["sigmoid", "sft"], beta=0.1, loss_weights=[1.0, alpha])
    loss.backward()
    torch.testing.assert_close(total.mean().detach(), loss.detach(), **TOL)
    torch.testing.assert_close(mine.grad, theirs.grad, **TOL)


def test_sft_term_with_unequal_lengths_weights_pairs_equally():
    batch = make_batch(pairs=5, seed=8)
    leaf = batch.token_logps.clone()
    counts = batch.completion_mask[:5].sum(dim=1)
    assert len(set(counts.tolist())) > 1
    _, _, _, chosen, _ = ours(batch, leaf, beta=0.1, loss_type="sigmoid")
    per_pair = sft_term(chosen, counts)
    for i in range(5):  # a one-pair micro-batch: equal
        loss, _, _ = trl_loss(batch, leaf, [i], ["sft"], beta=0.1)
        torch.testing.assert_close(per_pair[i], loss, **TOL)
    # A several-pair micro-batch: TRL's token mean is the length-weighted mean of the per-pair terms.
    loss, _, _ = trl_loss(batch, leaf, range(5), ["sft"], beta=0.1)
    weighted = (per_pair * counts).sum() / counts.sum()
    torch.testing.assert_close(weighted, loss, **TOL)
    assert abs(per_pair.mean().item() - loss.item()) > 1e-6


def test_sft_term_of_an_empty_completion_is_zero():
    assert sft_term(torch.tensor([0.0, -6.0]), torch.tensor([0, 3])).tolist() == [0.0, 2.0]


def _pairs(n=3):
    return [torch.zeros(n, dtype=torch.float64) for _ in range(4)]


@pytest.mark.parametrize("kwargs,message", [
    ({"loss_type": "kto"}, "unknown DPO loss_type 'kto'; valid: sigmoid, robust, ipo, hinge"),
    ({"beta": 0.0}, "beta must be a finite number > 0"),
    ({"beta": -0.1}, "beta must be a finite number > 0"),
    ({"beta": float("inf")}, "beta must be a finite number > 0"),
    ({"beta": float("nan")}, "beta must be a finite number > 0"),
    ({"label_smoothing": 0.5}, r"label_smoothing must be in \[0, 0.5\)"),
    ({"label_smoothing": -0.01}, r"label_smoothing must be in \[0, 0.5\)"),
    ({"loss_type": "hinge", "label_smoothing": 0.1}, "no effect with loss_type='hinge'"),
    ({"loss_type": "ipo"}, "pass chosen_token_counts and rejected_token_counts"),
])
def test_bad_hyperparameters_raise(kwargs, message):
    args = {"beta": 0.1, "loss_type": "sigmoid", **kwargs}
    with pytest.raises(ValueError, match=message):
        dpo_losses(*_pairs(), **args)


def test_bad_shapes_raise():
    a, b, c, _ = _pairs()
    with pytest.raises(ValueError, match="ref_rejected_logps has shape \\(4,\\)"):
        dpo_losses(a, b, c, torch.zeros(4, dtype=torch.float64), beta=0.1, loss_type="sigmoid")
    with pytest.raises(ValueError, match="must be 1-D"):
        dpo_losses(a[None], b[None], c[None], c[None], beta=0.1, loss_type="sigmoid")
    with pytest.raises(ValueError, match="chosen_token_counts has shape"):
        dpo_losses(a, b, c, c, beta=0.1, loss_type="ipo", chosen_token_counts=torch.ones(2),
                   rejected_token_counts=torch.ones(3))


def test_config_loss_types_are_the_loss_functions():
    assert DPO_LOSS_TYPES == LOSS_TYPES
    assert typing.get_args(typing.get_type_hints(DPOConfig)["loss_type"]) == LOSS_TYPES
