"""Context parallelism on CPU: the ring attention against plain causal attention over the whole
sequence, and against block-diagonal attention over packed rows (forward and every gradient,
GQA, 2 gloo ranks); SFT under CP is in test_sft.py. The sequence layout against
megatron-core's own, and a training run split across context-parallel and data-parallel ranks
(with the distributed optimizer, saved and resumed) against one process. The start-up errors of
layouts it cannot run are with the other config errors in test_config.py."""

import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from helpers import assert_losses_close, losses, run_pretrain
from megatron_seed.models.context_parallel import rank_positions, split_sequence


def _ring_worker(rank: int, world: int, init_file: str, result_dir: str):
    import torch.distributed as dist

    from megatron_seed.models.context_parallel import ring_attention

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        b, heads, groups, seq, dim = 2, 6, 2, 24, 8  # 3 query heads per key/value group
        q = torch.randn(b, heads, seq, dim, dtype=torch.float64, requires_grad=True)
        k = torch.randn(b, groups, seq, dim, dtype=torch.float64, requires_grad=True)
        v = torch.randn(b, groups, seq, dim, dtype=torch.float64, requires_grad=True)
        grad_out = torch.randn(b, heads, seq, dim, dtype=torch.float64)
        # the reference: causal attention over the whole sequence in one process, float64
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        ref.backward(grad_out)
        local = [split_sequence(t.detach(), rank, world, dim=2).requires_grad_() for t in (q, k, v)]
        out = ring_attention(*local, dist.group.WORLD)
        out.backward(split_sequence(grad_out, rank, world, dim=2))
        errors = {"out": (out - split_sequence(ref.detach(), rank, world, dim=2)).abs().max().item()}
        for name, mine, full in zip("qkv", local, (q, k, v)):
            errors[f"d{name}"] = (mine.grad - split_sequence(full.grad, rank, world, dim=2)).abs().max().item()
        # packed rows (SFT): block-diagonal causal by segment ids, against SDPA with the dense mask
        from megatron_seed.models.masks import segment_ids_to_attention_mask

        segments = torch.tensor([[1] * 5 + [2] * 9 + [3] * 7 + [0] * 3, [1] * 13 + [2] * 11])
        for t in (q, k, v):
            t.grad = None
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=~segment_ids_to_attention_mask(segments),
                                             enable_gqa=True)
        ref.backward(grad_out)
        local = [split_sequence(t.detach(), rank, world, dim=2).requires_grad_() for t in (q, k, v)]
        out = ring_attention(*local, dist.group.WORLD, segments=split_sequence(segments, rank, world))
        out.backward(split_sequence(grad_out, rank, world, dim=2))
        errors["packed out"] = (out - split_sequence(ref.detach(), rank, world, dim=2)).abs().max().item()
        for name, mine, full in zip("qkv", local, (q, k, v)):
            errors[f"packed d{name}"] = (mine.grad - split_sequence(full.grad, rank, world, dim=2)).abs().max().item()
        torch.save(errors, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ring_attention_matches_causal_attention_over_the_whole_sequence(tmp_path):
    mp.spawn(_ring_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True, daemon=True)
    for rank in range(2):
        errors = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert set(errors) == {"out", "dq", "dk", "dv", "packed out", "packed dq", "packed dk", "packed dv"}
        for name, err in errors.items():  # computed in float32 against a float64 reference
            assert err < 1e-5, (rank, name, err)


class _Group:  # what megatron-core's slicer reads of a process group
    def __init__(self, rank, size):
        self._rank, self._size = rank, size

    def rank(self):
        return self._rank

    def size(self):
        return self._size


@pytest.mark.parametrize("cp", [2, 3])
def test_sequence_layout_is_megatron_cores(cp):
    from megatron_seed.platform import megatron_cpu

    megatron_cpu.apply()  # megatron-core's slicer moves its index to CUDA; on CPU it runs patched
    from megatron.core.models.common.embeddings.rope_utils import get_pos_emb_on_this_cp_rank

    seq = 12 * cp
    positions = torch.arange(seq)
    seen = []
    for rank in range(cp):
        theirs = get_pos_emb_on_this_cp_rank(positions[:, None], 0, _Group(rank, cp))[:, 0]
        assert torch.equal(split_sequence(positions[None], rank, cp)[0], theirs)
        assert torch.equal(rank_positions(seq // cp, rank, cp), theirs)
        seen.append(theirs)
    assert torch.equal(torch.cat(seen).sort().values, positions)  # every token on exactly one rank


COMMON = ("train.precision=fp32", "train.micro_batch_size=2", "train.global_batch_size=8",
          "model.num_layers=2", "optimizer.decay_steps=6")


def test_context_and_data_parallel_run_resumes_and_matches_one_process(tmp_path):
    """CP=2 x DP=2 (4 ranks, GQA, distributed optimizer): 3 steps, saved, resumed to 6: every
    loss equals the one-process run's."""
    run_pretrain(tmp_path / "one", *COMMON, "train.steps=6")
    layout = ("parallel.context=2", "parallel.distributed_optimizer=true")
    first = run_pretrain(tmp_path / "cp", *COMMON, *layout, "train.steps=3", f"train.save={tmp_path / 'ckpt'}",
                         nproc=4)
    assert "dp 2 cp 2" in first.stdout + first.stderr
    resumed = run_pretrain(tmp_path / "cp_resumed", *COMMON, *layout, "train.steps=6",
                           f"train.load={tmp_path / 'ckpt'}", nproc=4)
    assert "resumed from" in resumed.stdout + resumed.stderr
    got = {**losses(tmp_path / "cp"), **losses(tmp_path / "cp_resumed")}
    want = losses(tmp_path / "one")
    assert_losses_close(got, want, atol=1e-5)
    assert want[6] < want[1]
