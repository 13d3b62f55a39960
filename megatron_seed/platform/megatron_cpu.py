"""The megatron-core CPU layer: run megatron-core on CPU with gloo when no CUDA device exists.

megatron-core assumes CUDA throughout (``torch.cuda.current_device()`` as a device, CUDA RNG
state, CUDA streams, literal ``device="cuda"`` tensors, ``tensor.type() == 'torch.cuda.FloatTensor'``
checks). This module makes those spots work on CPU **without touching torch itself** and without
wrapping every torch call:

1. ``torch`` shim. Every loaded ``megatron.core.*`` module gets, in place of its global name
   ``torch``, a module object that is a copy of ``torch`` whose ``cuda`` attribute is a CPU
   stand-in (``current_device() -> "cpu"``, no-op ``synchronize``/streams/events, RNG state
   mapped to the CPU generator) and whose tensor factories map ``device="cuda"`` to CPU. Code
   outside megatron-core (ours, transformers, user code) keeps seeing the real ``torch``; inside
   megatron-core attribute look-ups cost exactly what they cost before (a module-dict look-up).
2. Function rewrites. A handful of functions compare ``tensor.type()`` with CUDA type names or call
   ``.cuda()`` on tensors. These are recompiled from their own source with literal replacements,
   after checking the source hash recorded for the pinned megatron-core version: if upstream
   changed a patched function, :func:`apply` raises instead of silently patching something else
   (on any megatron-core version). ``MEGATRON_SEED_ALLOW_UNPINNED_MEGATRON=1`` opts in to trying
   the patches anyway, with a warning naming each changed function.
3. RNG helpers. ``tensor_parallel.random._get_cuda_rng_state/_set_cuda_rng_state`` index CUDA
   generators; they are replaced with the CPU generator's get/set, so the model-parallel RNG
   tracker forks the CPU generator exactly as it forks a CUDA one (their upstream source is
   hash-checked like the rewrites: :data:`REPLACEMENTS`).

The other changes megatron-seed makes to megatron-core (fused-RoPE slots, the compiled RoPE
function, the checkpoint results queue, FP8 emulation on linear layers, ...) are in
``megatron_seed.platform.megatron_patches``. They are pinned and checked with the helpers in this
module (:func:`check_source`, :func:`report_problems`).

Modules imported after :func:`apply` get the same treatment: an import hook on ``sys.meta_path``
shims each ``megatron.core.*`` module when it finishes loading, and runs the rewrites that live in
it (hash check included).

Nothing is applied when CUDA is available. :func:`apply` is idempotent; call it before building
models or optimizers (``megatron_seed.platform.distributed.initialize`` does).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import importlib.abc
import inspect
import os
import sys
import textwrap
import types
import warnings
from dataclasses import dataclass

import torch

PINNED_MEGATRON_CORE = "0.16.1"
ALLOW_UNPINNED_ENV = "MEGATRON_SEED_ALLOW_UNPINNED_MEGATRON"

# Imported (and shimmed) by apply(). Any other ``megatron.core.*`` module is shimmed too: those
# already in ``sys.modules`` at apply time directly, later ones by the import hook.
MODULES_TO_IMPORT = (
    "megatron.core.parallel_state",
    "megatron.core.utils",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.data",
    "megatron.core.transformer.utils",
    "megatron.core.fusions.fused_softmax",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.common.embeddings.rope_utils",
    "megatron.core.models.common.language_module.language_module",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.optimizer_param_scheduler",
    "megatron.core.dist_checkpointing.serialization",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.strategies.torch",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.async_utils",
)


@dataclass(frozen=True)
class SourceRewrite:
    """Recompile ``module.qualname`` from its own source with literal ``replacements``.

    The upstream source's sha256 for :data:`PINNED_MEGATRON_CORE` is kept in
    :data:`PATCH_HASHES`; it is how a change upstream is noticed (:func:`check_patch_targets`).
    """

    module: str
    qualname: str
    replacements: tuple[tuple[str, str], ...]
    why: str


_HALF_TYPES = (
    ("['torch.cuda.HalfTensor', 'torch.cuda.BFloat16Tensor']",
     "['torch.HalfTensor', 'torch.BFloat16Tensor']"),
)
_ALL_TYPES = _HALF_TYPES + (("== 'torch.cuda.FloatTensor'", "== 'torch.FloatTensor'"),)

SOURCE_REWRITES = (
    SourceRewrite(
        "megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32",
        (("== 'torch.cuda.FloatTensor'", "== 'torch.FloatTensor'"),),
        "asserts every grad is a CUDA float tensor",
    ),
    SourceRewrite(
        "megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params.__init__",
        _ALL_TYPES, "sorts params into fp16/bf16/fp32 groups by CUDA tensor type names",
    ),
    SourceRewrite(
        "megatron.core.optimizer.distrib_optimizer",
        "DistributedOptimizer._build_model_and_main_param_groups",
        _ALL_TYPES, "sorts params into fp16/bf16/fp32 groups by CUDA tensor type names",
    ),
    SourceRewrite(
        "megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.__init__",
        _HALF_TYPES, "marks 16-bit params by CUDA tensor type names",
    ),
    SourceRewrite(
        "megatron.core.optimizer.distrib_optimizer",
        "DistributedOptimizer.get_parameter_state_dp_zero",
        (("send_tensor = send_tensor.cuda()", "pass"),),
        "moves optimizer-state shards to CUDA before gathering them for a reshardable checkpoint",
    ),
    SourceRewrite(
        "megatron.core.models.common.language_module.language_module",
        "LanguageModule.setup_embeddings_and_output_layer",
        (("weight.data = weight.data.cuda()", "pass"),),
        "moves tied embeddings to CUDA before the first/last pipeline stage all-reduce",
    ),
    SourceRewrite(
        "megatron.core.models.common.embeddings.rope_utils", "get_pos_emb_on_this_cp_rank",
        ((".cuda(non_blocking=True)", ""),), "moves the context-parallel index to CUDA",
    ),
    SourceRewrite(
        "megatron.core.tensor_parallel.data", "broadcast_data",
        (("data[key].cuda()", "data[key]"),), "moves broadcast data to CUDA",
    ),
    SourceRewrite(
        "megatron.core.utils", "local_multi_tensor_scale",
        (("dst.copy_(src * scale)", "dst.mul_(scale) if src is dst else dst.copy_(src * scale)"),),
        "speed, not correctness: the fallback for apex's multi_tensor_scale (used by grad clipping "
        "to scale grads in place) allocates a temporary per tensor; ~50 ms per step at 100M params",
    ),
)


@dataclass(frozen=True)
class Replacement:
    """``module.qualname`` is replaced by a function of ours (its upstream source is hash-checked)."""

    module: str
    qualname: str
    why: str


REPLACEMENTS = (
    Replacement("megatron.core.tensor_parallel.random", "_get_cuda_rng_state",
                "reads a CUDA generator's state; on CPU the CPU generator's"),
    Replacement("megatron.core.tensor_parallel.random", "_set_cuda_rng_state",
                "sets a CUDA generator's state; on CPU the CPU generator's"),
)


# --------------------------------------------------------------------------------------------
# 1. the torch shim


class _NullStream:
    """Stands in for ``torch.cuda.Stream``: every operation is already ordered on CPU."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def synchronize(self):
        pass

    def record_event(self, event=None):
        return _NullEvent()

    def query(self):
        return True


class _NullEvent(_NullStream):
    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def elapsed_time(self, other):
        return 0.0


def _cpu_device(device):
    """Map a CUDA device spec (``"cuda"``, ``"cuda:1"``, ``torch.device("cuda")``, an int) to CPU."""
    if device is None:
        return None
    if isinstance(device, int):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


def _with_cpu_device(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    return wrapper


def _cpu_autocast(device_type, *args, **kwargs):
    return torch.autocast("cpu" if device_type == "cuda" else device_type, *args, **kwargs)


def _build_cuda_stand_in() -> types.ModuleType:
    cuda = types.ModuleType("torch.cuda")
    cuda.__dict__.update(torch.cuda.__dict__)
    cuda.__dict__.update(
        is_available=lambda: False,
        current_device=lambda: "cpu",
        device_count=lambda: 0,
        set_device=lambda device: None,
        synchronize=lambda device=None: None,
        empty_cache=lambda: None,
        current_stream=lambda device=None: _NullStream(),
        default_stream=lambda device=None: _NullStream(),
        Stream=_NullStream,
        Event=_NullEvent,
        stream=lambda s=None: contextlib.nullcontext(),
        device=lambda d=None: contextlib.nullcontext(),
        get_rng_state=lambda device=None: torch.get_rng_state(),
        set_rng_state=lambda state, device=None: torch.set_rng_state(state),
        manual_seed=lambda seed: torch.manual_seed(seed),
        manual_seed_all=lambda seed: torch.manual_seed(seed),
        memory_allocated=lambda device=None: 0,
        max_memory_allocated=lambda device=None: 0,
        memory_reserved=lambda device=None: 0,
        max_memory_reserved=lambda device=None: 0,
        reset_peak_memory_stats=lambda device=None: None,
        nvtx=types.SimpleNamespace(
            range_push=lambda *a, **k: None,
            range_pop=lambda *a, **k: None,
            range=lambda *a, **k: contextlib.nullcontext(),
        ),
    )
    return cuda


def _build_torch_shim() -> types.ModuleType:
    shim = types.ModuleType("torch")
    shim.__dict__.update(torch.__dict__)
    shim.cuda = _build_cuda_stand_in()
    for name in ("tensor", "zeros", "ones", "empty", "full", "arange", "empty_like",
                 "zeros_like", "ones_like", "randn", "rand", "randint", "as_tensor", "eye"):
        setattr(shim, name, _with_cpu_device(getattr(torch, name)))
    shim.autocast = _cpu_autocast
    return shim


# --------------------------------------------------------------------------------------------
# 2. source rewrites


def _resolve(module_name: str, qualname: str):
    owner = importlib.import_module(module_name)
    parts = qualname.split(".")
    for part in parts[:-1]:
        owner = getattr(owner, part)
    return owner, parts[-1], owner.__dict__[parts[-1]]


def source_sha256(module_name: str, qualname: str) -> str:
    _, _, fn = _resolve(module_name, qualname)
    fn = getattr(fn, "__megatron_seed_original__", fn)
    return hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()


def _rewrite(rw: SourceRewrite, torch_shim: types.ModuleType, strict: bool = True) -> None:
    owner, name, fn = _resolve(rw.module, rw.qualname)
    if getattr(fn, "__megatron_seed_original__", None) is not None:
        return
    source = textwrap.dedent(inspect.getsource(fn))
    for old, new in rw.replacements:
        if old not in source:
            message = (f"megatron-core CPU layer: {rw.module}.{rw.qualname} no longer contains {old!r}; "
                       "the CPU patch list in megatron_seed/platform/megatron_cpu.py must be updated")
            if strict:
                raise RuntimeError(message)
            # Opted in to an unpinned megatron-core: upstream may have dropped the CUDA-only code
            # this rewrite targets, so running the function unpatched is the best try left.
            warnings.warn(f"{message}; left unpatched ({rw.why})", RuntimeWarning, stacklevel=2)
            return
        source = source.replace(old, new)
    module = sys.modules[rw.module]
    namespace = dict(module.__dict__)
    namespace["torch"] = torch_shim
    if "." in rw.qualname:  # methods using zero-argument super() need __class__ in scope
        namespace["__class__"] = owner
        source = source.replace("super().", "super(__class__, self).")
    exec(compile(source, f"<megatron_cpu:{rw.module}.{rw.qualname}>", "exec"), namespace)
    new_fn = namespace[name]
    new_fn.__megatron_seed_original__ = fn
    new_fn.__module__ = fn.__module__
    new_fn.__qualname__ = fn.__qualname__
    setattr(owner, name, new_fn)
    # Modules that imported the function by name hold the original: rebind them too.
    for mod_name, mod in list(sys.modules.items()):
        if mod_name.startswith("megatron.core") and mod is not None:
            for attr, value in list(mod.__dict__.items()):
                if value is fn:
                    setattr(mod, attr, new_fn)


# --------------------------------------------------------------------------------------------
# 3. RNG helpers


def _get_cpu_rng_state(device=None, clone: bool = False, graph_safe: bool = False):
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state, device=-1, graph_safe: bool = False):
    torch.set_rng_state(new_state)


# --------------------------------------------------------------------------------------------


_STATE: dict = {"applied": False}


def needed() -> bool:
    return not torch.cuda.is_available()


def megatron_core_version() -> str:
    from megatron.core.package_info import __version__

    return __version__


def unpinned_allowed() -> bool:
    return os.environ.get(ALLOW_UNPINNED_ENV, "") == "1"


def check_source(module: str, qualname: str, hashes: dict[str, str], why: str) -> str | None:
    """None when ``module.qualname`` has the source whose sha256 ``hashes`` records for the pinned
    release, else why not. Shared by every megatron-core patch of ours (here and in
    ``megatron_patches``)."""
    try:
        got = source_sha256(module, qualname)
    except (ImportError, AttributeError, KeyError, OSError, TypeError) as err:
        return f"{module}.{qualname}: cannot be found ({err})"
    want = hashes.get(f"{module}.{qualname}")
    if want != got:
        return (f"{module}.{qualname}: source changed upstream (sha256 {got[:12]}, "
                f"pinned {str(want)[:12]}); review the patch ({why})")
    return None


def _check(rw: SourceRewrite | Replacement) -> str | None:
    """None when ``rw``'s target has the source recorded for the pinned release, else why not."""
    return check_source(rw.module, rw.qualname, PATCH_HASHES, rw.why)


def check_patch_targets() -> list[str]:
    """Return one message per patched function whose upstream source differs from the pinned one
    (importing every patched module)."""
    return [problem for problem in map(_check, SOURCE_REWRITES + REPLACEMENTS) if problem is not None]


def report_problems(problems: list[str], strict: bool, layer: str = "megatron-core CPU layer",
                    where: str = "megatron_seed/platform/megatron_cpu.py") -> None:
    """Raise (strict) or warn about patch targets that differ from the pinned megatron-core.
    ``layer`` names the patches in the message, ``where`` the file that holds them and their hashes."""
    if not problems:
        return
    head = (f"{layer}: megatron-core {megatron_core_version()} differs from "
            f"{PINNED_MEGATRON_CORE}, the version its patches were written and checked for, in:\n  "
            + "\n  ".join(problems))
    if strict:
        raise RuntimeError(
            f"{head}\nInstall megatron-core=={PINNED_MEGATRON_CORE}, or set {ALLOW_UNPINNED_ENV}=1 to try "
            "the patches anyway (then review each function above against its patch in "
            f"{where} and record its new hash in PATCH_HASHES).")
    warnings.warn(f"{head}\n{ALLOW_UNPINNED_ENV}=1: patching anyway; results are unverified.",
                  RuntimeWarning, stacklevel=3)


def apply(strict: bool | None = None) -> bool:
    """Make megatron-core run on CPU. Returns True when patches were applied (no CUDA).

    ``strict`` (default: unless ``MEGATRON_SEED_ALLOW_UNPINNED_MEGATRON=1``) makes a patched
    function whose source differs from the pinned release an error; otherwise it is a warning and
    the patches are tried anyway. The check covers the installed version whatever it is.
    """
    if not needed():
        return False
    if _STATE["applied"]:
        _shim_loaded_modules(_STATE["shim"])
        return True
    for name in MODULES_TO_IMPORT:
        importlib.import_module(name)
    if strict is None:
        strict = not unpinned_allowed()
    # Rewrites in modules nobody imported yet run when they are imported (_MegatronImportHook).
    loaded = [rw for rw in SOURCE_REWRITES if rw.module in sys.modules]
    report_problems([problem for problem in map(_check, loaded + list(REPLACEMENTS)) if problem is not None],
                    strict)
    shim = _build_torch_shim()
    _STATE.update(shim=shim, strict=strict, pending=[rw for rw in SOURCE_REWRITES if rw not in loaded])
    _shim_loaded_modules(shim)
    for rw in loaded:
        _rewrite(rw, shim, strict)
    random = sys.modules["megatron.core.tensor_parallel.random"]
    for name, ours in (("_get_cuda_rng_state", _get_cpu_rng_state), ("_set_cuda_rng_state", _set_cpu_rng_state)):
        ours.__megatron_seed_original__ = random.__dict__[name]  # what the hash check reads
        setattr(random, name, ours)
    if not any(isinstance(finder, _MegatronImportHook) for finder in sys.meta_path):
        sys.meta_path.insert(0, _MegatronImportHook())
    _STATE["applied"] = True
    return True


def _shim_loaded_modules(shim: types.ModuleType) -> None:
    for name, module in list(sys.modules.items()):
        if name.startswith("megatron.core") and module is not None:
            _shim_module(module, shim)


def _shim_module(module: types.ModuleType, shim: types.ModuleType) -> None:
    if module.__dict__.get("torch") is torch:
        module.torch = shim


def _after_import(module: types.ModuleType) -> None:
    """What apply() does to loaded modules, for one ``megatron.core`` module loaded after it."""
    shim = _STATE["shim"]
    _shim_module(module, shim)
    mine = [rw for rw in _STATE["pending"] if rw.module == module.__name__]
    if not mine:
        return
    # A strict failure propagates out of the import (the module is not left half-patched), and
    # the rewrite stays pending so a second import attempt fails the same way.
    report_problems([problem for problem in map(_check, mine) if problem is not None], _STATE["strict"])
    _STATE["pending"] = [rw for rw in _STATE["pending"] if rw.module != module.__name__]
    for rw in mine:
        _rewrite(rw, shim, _STATE["strict"])


class _PostImportLoader:
    """Wraps a module's loader: runs :func:`_after_import` once the module body has executed.
    Everything else (``get_source``, resource readers, ...) is the wrapped loader's."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _after_import(module)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _MegatronImportHook(importlib.abc.MetaPathFinder):
    """Finds ``megatron.core.*`` modules with the other finders and wraps their loaders."""

    def find_spec(self, fullname, path, target=None):
        if not fullname.startswith("megatron.core."):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if hasattr(loader, "exec_module") and not isinstance(loader, _PostImportLoader):
            spec.loader = _PostImportLoader(loader)
        return spec


# sha256 of each rewritten or replaced function's source in megatron-core PINNED_MEGATRON_CORE.
PATCH_HASHES: dict[str, str] = {
    "megatron.core.optimizer.distrib_optimizer.DistributedOptimizer.get_parameter_state_dp_zero": (
        "812c52ea4568b0ffae6132290b6bffe247fa0c44e42835be3e1ae55cbadd838b"
    ),
    "megatron.core.optimizer.clip_grads.clip_grad_by_total_norm_fp32": (
        "8edb9da5365045a5d1c21c4ca81697412bbdbab725209db8df00dc90d03363e1"
    ),
    "megatron.core.optimizer.optimizer.Float16OptimizerWithFloat16Params.__init__": (
        "1d470dedcf8e2f0ee8cf6e02bef57a96debdbc7bebbad78a52b50001d9b8b839"
    ),
    "megatron.core.optimizer.distrib_optimizer.DistributedOptimizer._build_model_and_main_param_groups": (
        "1b9f0ec06718f817fe8ce6b8bc62ae2a4e096a3cf599a19511ce9d9355f3b7f8"
    ),
    "megatron.core.optimizer.distrib_optimizer.DistributedOptimizer.__init__": (
        "3275f640fc1b7377182f3907efc162ae4df4ad14c267417c78041d53b9fb2adf"
    ),
    "megatron.core.models.common.language_module.language_module.LanguageModule.setup_embeddings_and_output_layer": (
        "005bdd3315b0611b09dabea160e81a72cb455fc211020af407edf97e57064e35"
    ),
    "megatron.core.models.common.embeddings.rope_utils.get_pos_emb_on_this_cp_rank": (
        "ab7c5cb71dce22a97126819ff1c36167f807010688467298c84e05e318461bcd"
    ),
    "megatron.core.utils.local_multi_tensor_scale": (
        "a271d86b61250d2f00bad84f72ecd194291f5be4a5e1c80a24703dafe25d9171"
    ),
    "megatron.core.tensor_parallel.data.broadcast_data": (
        "cb3b8422f27722ef81048de6be2941656936718155280b92a35d9aacaba1e651"
    ),
    "megatron.core.tensor_parallel.random._get_cuda_rng_state": (
        "aa26caaa069c5c4feff0f9f4e69f0f2ab6d6fc7940f71c3a6d0fe9303447d3dc"
    ),
    "megatron.core.tensor_parallel.random._set_cuda_rng_state": (
        "b179c9d95438b61c1d9b58e8e13cc6534f2ae2f870d991c42438de53829ed398"
    ),
}
