"""Write Megatron indexed datasets (.bin/.idx) with megatron-core's own builder."""

from __future__ import annotations

import os
from typing import Iterable

import numpy as np


def token_dtype(vocab_size: int):
    """uint16 while every id fits (as Megatron-LM chooses), int32 otherwise."""
    return np.uint16 if vocab_size < 65500 else np.int32


def write_documents(prefix: str, documents: Iterable[list[int]], vocab_size: int, eod: int | None) -> int:
    """Write token-id documents (each followed by ``eod`` when given); returns the document count."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=token_dtype(vocab_size))
    count = 0
    for ids in documents:
        if eod is not None:
            ids = list(ids) + [eod]
        builder.add_document(np.asarray(ids, dtype=np.int64), [len(ids)])
        count += 1
    builder.finalize(prefix + ".idx")
    return count
