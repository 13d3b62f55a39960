"""The megatron-core CPU layer: patch targets match the pinned release, scope is megatron only."""

import sys

import pytest
import torch

from megatron_seed.platform import megatron_cpu


def test_patch_targets_match_pinned_megatron_core():
    assert megatron_cpu.megatron_core_version() == megatron_cpu.PINNED_MEGATRON_CORE
    assert megatron_cpu.check_patch_targets() == []


def test_a_changed_upstream_function_is_reported(monkeypatch):
    key = next(iter(megatron_cpu.PATCH_HASHES))
    monkeypatch.setitem(megatron_cpu.PATCH_HASHES, key, "0" * 64)
    problems = megatron_cpu.check_patch_targets()
    assert len(problems) == 1 and "source changed upstream" in problems[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the layer does nothing when CUDA exists")
def test_shim_is_scoped_to_megatron_core():
    assert megatron_cpu.apply() is True
    mcore_utils = sys.modules["megatron.core.transformer.utils"]
    # inside megatron-core, literal CUDA devices land on CPU ...
    mask = mcore_utils.get_default_causal_mask(4)
    assert mask.device.type == "cpu" and mask.dtype == torch.bool and bool(mask[0, 1]) and not bool(mask[1, 0])
    assert mcore_utils.torch.cuda.current_device() == "cpu"
    # ... while the real torch (ours, transformers, user code) is untouched
    assert torch.cuda.current_device is not mcore_utils.torch.cuda.current_device
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(1, device="cuda")


def test_rewritten_function_keeps_behaviour():
    megatron_cpu.apply()
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.full((4,), 2.0)
    clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=8.0)
    assert torch.allclose(p.grad, torch.full((4,), 2.0 * 1.0 / (8.0 + 1e-6)))
