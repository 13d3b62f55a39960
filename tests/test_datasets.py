"""Weighted blends, splits, deterministic shuffles and reused index caches via megatron-core."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from megatron_seed.config.schema import DataConfig
from megatron_seed.data.datasets import build_datasets
from megatron_seed.data.indexed import IndexedWriter


@pytest.fixture
def one_process_group(tmp_path):
    # megatron-core's BlendedDataset asks for the rank when it writes its cache.
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def _write(prefix, n_docs, base, seed):
    rng = np.random.default_rng(seed)
    w = IndexedWriter(prefix, np.uint16)
    for _ in range(n_docs):
        w.add_document((base + rng.integers(0, 50, rng.integers(20, 200))).tolist() + [2])
    w.finalize()


def _build(tmp_path, seed=7):
    data = DataConfig(blend=["0.7", str(tmp_path / "a"), "0.3", str(tmp_path / "b")], split="90,10,0",
                      seq_length=32, cache_dir=str(tmp_path / "cache"))
    data.validate()
    return build_datasets(data, seed, vocab_size=300, eod=2, num_samples=(2000, 100, 0))


def test_blend_weights_splits_determinism_and_cache_reuse(tmp_path, one_process_group):
    # Dataset a holds ids 100..149, dataset b ids 200..249: every sample tells where it came from.
    _write(str(tmp_path / "a"), 400, 100, 0)
    _write(str(tmp_path / "b"), 400, 200, 1)
    train, valid, test = _build(tmp_path)
    assert test is None and len(train) >= 2000 and len(valid) >= 100
    sources = []
    for i in range(2000):
        tokens = train[i]["tokens"].numpy()
        body = tokens[tokens != 2]
        assert ((body >= 100) & (body < 150)).all() or ((body >= 200) & (body < 250)).all()
        sources.append(int(body[0] >= 200))
    assert abs(np.mean(sources) - 0.3) < 0.02
    # The same seed gives the same samples; the index caches are written once and then reused.
    cache_files = sorted(os.listdir(tmp_path / "cache"))
    assert any(f.endswith(".npy") for f in cache_files)
    mtimes = {f: os.path.getmtime(tmp_path / "cache" / f) for f in cache_files}
    again, _, _ = _build(tmp_path)
    assert all(np.array_equal(train[i]["tokens"], again[i]["tokens"]) for i in range(0, 2000, 97))
    assert sorted(os.listdir(tmp_path / "cache")) == cache_files
    assert {f: os.path.getmtime(tmp_path / "cache" / f) for f in cache_files} == mtimes
    # A different seed shuffles differently.
    other, _, _ = _build(tmp_path, seed=8)
    assert any(not np.array_equal(train[i]["tokens"], other[i]["tokens"]) for i in range(20))
