"""The megatron-core CPU layer: patch targets match the pinned release (or fail loudly), scope is
megatron only, modules imported after apply() are covered too."""

import os
import subprocess
import sys
import textwrap

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


def test_replaced_rng_helpers_are_pinned_and_stay_checkable_once_replaced(monkeypatch):
    keys = [f"{r.module}.{r.qualname}" for r in megatron_cpu.REPLACEMENTS]
    assert keys and set(keys) <= set(megatron_cpu.PATCH_HASHES)
    megatron_cpu.apply()
    megatron_cpu.apply()  # idempotent: the hash check still reads upstream's functions, not ours
    assert megatron_cpu.check_patch_targets() == []
    monkeypatch.setitem(megatron_cpu.PATCH_HASHES, keys[0], "0" * 64)
    problems = megatron_cpu.check_patch_targets()
    assert len(problems) == 1 and problems[0].startswith(f"{keys[0]}: source changed upstream")


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


# The tests below apply the layer in a fresh interpreter: apply() changes process-wide state
# (sys.meta_path, megatron-core globals) that must not leak into the rest of the session.

LATE_MODULE = "megatron.core.models.common.embeddings.relative_pos_embedding"
LATE_FUNCTION = "RelativePositionEmbedding._compute_bias"
CHANGED_KEY = "megatron.core.optimizer.clip_grads.clip_grad_by_total_norm_fp32"


def _fresh(code: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != megatron_cpu.ALLOW_UNPINNED_ENV}
    environ.update(env, PYTHONWARNINGS="ignore::UserWarning")
    prelude = "import sys, warnings, torch\nfrom megatron_seed.platform import megatron_cpu\n"
    proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], env=environ,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _fake_upstream_change() -> str:
    return f"""
    megatron_cpu.megatron_core_version = lambda: "0.99.0"
    megatron_cpu.PATCH_HASHES[{CHANGED_KEY!r}] = "0" * 64
    """


@pytest.mark.skipif(torch.cuda.is_available(), reason="the layer does nothing when CUDA exists")
def test_changed_upstream_source_fails_loudly_on_another_version():
    proc = _fresh(_fake_upstream_change() + """
    try:
        megatron_cpu.apply()
    except RuntimeError as err:
        print(err)
    else:
        raise SystemExit("apply() patched a changed function without complaint")
    assert sys.modules["megatron.core.utils"].torch is torch  # nothing half-applied
    """)
    message = proc.stdout
    assert CHANGED_KEY in message and "0.99.0" in message and megatron_cpu.PINNED_MEGATRON_CORE in message
    assert f"{megatron_cpu.ALLOW_UNPINNED_ENV}=1" in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="the layer does nothing when CUDA exists")
def test_opting_in_to_an_unpinned_version_patches_with_a_warning():
    proc = _fresh(_fake_upstream_change() + """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert megatron_cpu.apply() is True
    print("\\n".join(str(w.message) for w in caught if w.category is RuntimeWarning))
    from megatron.core.optimizer import clip_grads
    assert clip_grads.clip_grad_by_total_norm_fp32.__megatron_seed_original__ is not None
    assert sys.modules["megatron.core.utils"].torch.cuda.current_device() == "cpu"
    """, **{megatron_cpu.ALLOW_UNPINNED_ENV: "1"})
    assert CHANGED_KEY in proc.stdout and "patching anyway" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the layer does nothing when CUDA exists")
def test_modules_imported_after_apply_are_shimmed_and_rewritten():
    # The late module gets a (no-op) rewrite registered, so the deferred hash check and rewrite
    # run on import; its real hash is taken here, outside the fresh interpreter.
    want = megatron_cpu.source_sha256(LATE_MODULE, LATE_FUNCTION)
    late_rewrite = f"""
    old = "device = self.relative_attention_bias.weight.device"
    megatron_cpu.SOURCE_REWRITES += (megatron_cpu.SourceRewrite({LATE_MODULE!r}, {LATE_FUNCTION!r},
                                     ((old, old),), "test"),)
    """
    _fresh(late_rewrite + f"""
    megatron_cpu.PATCH_HASHES[{LATE_MODULE + "." + LATE_FUNCTION!r}] = {want!r}
    assert megatron_cpu.apply() is True
    assert {LATE_MODULE!r} not in sys.modules  # else this test checks nothing
    import importlib, inspect
    late = importlib.import_module({LATE_MODULE!r})
    shim = sys.modules["megatron.core.utils"].torch
    assert late.torch is shim and shim is not torch
    assert late.torch.arange(3, device="cuda").device.type == "cpu"
    fn = late.RelativePositionEmbedding._compute_bias
    assert fn.__megatron_seed_original__ is not None and fn.__globals__["torch"] is shim
    assert "relative_attention_bias" in inspect.getsource(late.RelativePositionEmbedding)
    """)
    # the same hash check as at apply(): a changed late function fails its import
    proc = _fresh(late_rewrite + f"""
    megatron_cpu.PATCH_HASHES[{LATE_MODULE + "." + LATE_FUNCTION!r}] = "0" * 64
    megatron_cpu.apply()
    for attempt in range(2):
        try:
            import {LATE_MODULE}
        except RuntimeError as err:
            print(err)
        else:
            raise SystemExit("a changed function in a late module was patched without complaint")
    """)
    assert proc.stdout.count(f"{LATE_MODULE}.{LATE_FUNCTION}: source changed upstream") == 2
