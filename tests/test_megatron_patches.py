"""The megatron-core patches other than the CPU layer (megatron_seed.platform.megatron_patches).

Each patch depends on upstream functions whose hashes are pinned; a changed hash fails loudly,
and a patch applied a second time changes nothing. Outside platform/, no module assigns into a
megatron-core module or class."""

from __future__ import annotations

import ast
import importlib
import types

import pytest
import torch

from megatron_seed.platform import megatron_cpu
from megatron_seed.platform import megatron_patches as mp

from helpers import ROOT


def test_patch_targets_match_pinned_megatron_core():
    assert megatron_cpu.megatron_core_version() == megatron_cpu.PINNED_MEGATRON_CORE
    assert mp.check_patch_targets() == []
    # every upstream function a patch depends on is pinned, and no hash is left over
    assert {f"{m}.{q}" for p in mp.PATCHES.values() for m, q in p.depends_on} == set(mp.PATCH_HASHES)


@pytest.fixture
def patched(monkeypatch):
    """Every patch verified anew; megatron-core's patched globals start as upstream leaves them
    on CPU and are restored after the test (the patches are process-wide)."""
    monkeypatch.setattr(mp, "_VERIFIED", {})
    monkeypatch.delenv(megatron_cpu.ALLOW_UNPINNED_ENV, raising=False)
    rope_utils = importlib.import_module(mp.ROPE_UTILS)
    filesystem_async = importlib.import_module(mp.FILESYSTEM_ASYNC)
    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", None)
    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb_thd", None)
    bshd = rope_utils._apply_rotary_pos_emb_bshd
    monkeypatch.setattr(rope_utils, "_apply_rotary_pos_emb_bshd", getattr(bshd, mp.ORIGINAL, bshd))
    monkeypatch.setattr(filesystem_async, "_results_queue", None)
    return Targets(rope_utils, filesystem_async)


def _bare_linear():
    """A ColumnParallelLinear instance without parallel state: only what the patch touches."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    layer = ColumnParallelLinear.__new__(ColumnParallelLinear)
    torch.nn.Module.__init__(layer)
    return layer


def _rope(t, freqs, interleaved=False):
    return t


def _rope_thd(t, cu_seqlens, freqs, cp_size=1, cp_rank=0):
    return t


class Targets:
    """What each patch changes, a way to apply it, and a snapshot of its effect."""

    FP8_ATTRS = ("_forward_impl", "get_extra_state", "set_extra_state", "sharded_state_dict")

    def __init__(self, rope_utils, filesystem_async):
        self.rope_utils, self.filesystem_async = rope_utils, filesystem_async
        self.layer = _bare_linear()
        self.dataset = types.SimpleNamespace(masks_and_position_ids_are_cacheable=True)
        self.queues_made = 0

    def _make_queue(self):
        self.queues_made += 1
        return object()

    def apply(self, name: str):
        if name == "fused_rope_slots":
            return mp.fill_fused_rope_slots(_rope, _rope_thd)
        if name == "compiled_rope_bshd":
            return mp.compile_rope_bshd()
        if name == "checkpoint_results_queue":
            return mp.fill_checkpoint_results_queue(self._make_queue)
        if name == "fp8_linear_forward":
            impl = lambda input, weight, *a, **k: input  # noqa: E731 - a fresh object per application
            return mp.replace_linear_forward_impl(self.layer, impl, get_extra_state=lambda: None,
                                                  set_extra_state=lambda state: None,
                                                  sharded_state_dict=lambda *a, **k: {}, name="test")
        if name == "gpt_dataset_mask_cache":
            return mp.disable_gpt_dataset_mask_cache(self.dataset)
        if name == "seed_gpt_model_overrides":
            return mp.verify(name)
        raise AssertionError(f"no test application for patch {name}: add one")

    def snapshot(self, name: str) -> tuple:
        """Identities (not equality) of everything the patch may change."""
        r = self.rope_utils
        return {
            "fused_rope_slots": lambda: (id(r.fused_apply_rotary_pos_emb), id(r.fused_apply_rotary_pos_emb_thd)),
            "compiled_rope_bshd": lambda: (id(r._apply_rotary_pos_emb_bshd),),
            "checkpoint_results_queue": lambda: (id(self.filesystem_async._results_queue), self.queues_made),
            "fp8_linear_forward": lambda: tuple(id(vars(self.layer).get(a)) for a in self.FP8_ATTRS),
            "gpt_dataset_mask_cache": lambda: (self.dataset.masks_and_position_ids_are_cacheable,),
            "seed_gpt_model_overrides": lambda: (),
        }[name]()


PATCH_NAMES = list(mp.PATCHES)
PINNED = [(name, f"{m}.{q}") for name, patch in mp.PATCHES.items() for m, q in patch.depends_on]


@pytest.mark.parametrize("name", PATCH_NAMES)
def test_each_patch_changes_megatron_core_once(patched, name):
    before = patched.snapshot(name)
    patched.apply(name)
    first = patched.snapshot(name)
    if name != "seed_gpt_model_overrides":  # a check only: nothing to assign
        assert first != before, f"patch {name} changed nothing (the test would check nothing)"
    patched.apply(name)
    assert patched.snapshot(name) == first, f"patch {name} is not idempotent"


def test_patch_effects(patched):
    r = patched.rope_utils
    assert mp.fill_fused_rope_slots(_rope, _rope_thd) is True
    assert (r.fused_apply_rotary_pos_emb, r.fused_apply_rotary_pos_emb_thd) == (_rope, _rope_thd)
    assert mp.fused_rope_slot() is _rope
    original = r._apply_rotary_pos_emb_bshd
    assert mp.compile_rope_bshd() is True
    assert getattr(r._apply_rotary_pos_emb_bshd, mp.ORIGINAL) is original
    assert mp.fill_checkpoint_results_queue(patched._make_queue) is True
    assert mp.fill_checkpoint_results_queue(patched._make_queue) is False and patched.queues_made == 1
    assert mp.replace_linear_forward_impl(patched.layer, _rope, _rope, _rope, _rope) is True
    assert mp.replace_linear_forward_impl(patched.layer, _rope_thd, _rope, _rope, _rope) is False
    assert patched.layer._forward_impl is _rope


def test_slots_that_transformer_engine_filled_are_kept(patched):
    te = object()
    patched.rope_utils.fused_apply_rotary_pos_emb = te
    assert mp.fill_fused_rope_slots(_rope, _rope_thd) is True
    assert patched.rope_utils.fused_apply_rotary_pos_emb is te
    assert patched.rope_utils.fused_apply_rotary_pos_emb_thd is _rope_thd


@pytest.mark.parametrize("name,key", PINNED)
def test_a_changed_upstream_function_fails_loudly(patched, monkeypatch, name, key):
    monkeypatch.setitem(mp.PATCH_HASHES, key, "0" * 64)
    before = patched.snapshot(name)
    for attempt in range(2):  # a failure is not remembered as verified
        with pytest.raises(RuntimeError) as err:
            patched.apply(name)
        message = str(err.value)
        assert f"{key}: source changed upstream" in message and name in message
        assert f"{megatron_cpu.ALLOW_UNPINNED_ENV}=1" in message and megatron_cpu.PINNED_MEGATRON_CORE in message
        assert patched.snapshot(name) == before  # nothing applied
    monkeypatch.setenv(megatron_cpu.ALLOW_UNPINNED_ENV, "1")
    with pytest.warns(RuntimeWarning, match="patching anyway"):
        patched.apply(name)


def test_a_vanished_attribute_fails_loudly_or_skips_the_patch(patched, monkeypatch):
    monkeypatch.delattr(patched.filesystem_async, "_results_queue")
    with pytest.raises(RuntimeError, match="_results_queue: no longer exists upstream"):
        mp.fill_checkpoint_results_queue(patched._make_queue)
    monkeypatch.setenv(megatron_cpu.ALLOW_UNPINNED_ENV, "1")
    with pytest.warns(RuntimeWarning, match="no longer exists upstream"):
        assert mp.fill_checkpoint_results_queue(patched._make_queue) is False
    assert patched.queues_made == 0 and not hasattr(patched.filesystem_async, "_results_queue")


def test_a_linear_class_without_extra_state_hooks_is_refused(patched):
    class Plain(torch.nn.Module):
        pass

    with pytest.raises(RuntimeError, match=r"Plain \(layer\) has no extra-state hooks"):
        mp.replace_linear_forward_impl(Plain(), _rope, _rope, _rope, _rope, name="layer")


def test_model_level_callers_are_idempotent(patched):
    from megatron_seed.models import compile as model_compile
    from megatron_seed.models import fp8, kernel_selection

    assert kernel_selection.enable_fused_rope() and kernel_selection.enable_fused_rope()
    assert patched.rope_utils.fused_apply_rotary_pos_emb is kernel_selection._rope_from_freqs
    model_compile.compile_rotary_embedding()
    compiled = patched.rope_utils._apply_rotary_pos_emb_bshd
    model_compile.compile_rotary_embedding()
    assert patched.rope_utils._apply_rotary_pos_emb_bshd is compiled
    chunk = torch.nn.Sequential(_bare_linear())
    assert fp8.enable_fp8_emulation([chunk]) == 1
    emulation = chunk[0]._forward_impl
    assert isinstance(emulation, fp8.Fp8LinearEmulation)
    assert fp8.enable_fp8_emulation([chunk]) == 0  # FP8 is not applied on top of FP8
    assert chunk[0]._forward_impl is emulation and emulation.inner is not emulation


def test_no_module_outside_platform_assigns_into_megatron_core():
    """Names bound to megatron-core modules or classes (imports) are never assignment targets,
    nor setattr/delattr subjects, outside megatron_seed/platform/."""
    package = ROOT / "megatron_seed"
    offenders = []
    for path in sorted(package.rglob("*.py")):
        if path.relative_to(package).parts[0] == "platform":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "megatron":
                names |= {alias.asname or alias.name for alias in node.names}
            elif isinstance(node, ast.Import):
                names |= {alias.asname or alias.name.split(".")[0] for alias in node.names
                          if alias.name.split(".")[0] == "megatron"}

        def root(node):
            while isinstance(node, (ast.Attribute, ast.Subscript)):
                node = node.value
            return node.id if isinstance(node, ast.Name) else None

        for node in ast.walk(tree):
            targets = (node.targets if isinstance(node, (ast.Assign, ast.Delete)) else
                       [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
            hits = [t for t in targets if isinstance(t, (ast.Attribute, ast.Subscript)) and root(t) in names]
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id in ("setattr", "delattr") and node.args and root(node.args[0]) in names):
                hits.append(node)
            offenders += [f"{path.relative_to(ROOT)}:{hit.lineno}" for hit in hits]
    assert not offenders, ("assignments into megatron-core outside megatron_seed/platform/ (make them a "
                           f"patch in megatron_patches): {offenders}")

