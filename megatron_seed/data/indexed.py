"""Megatron indexed datasets (``PREFIX.bin`` + ``PREFIX.idx``), read and written without torch.

The format is megatron-core's (``megatron/core/datasets/indexed_dataset.py``, version 1):

    .idx: b"MMIDIDX\\x00\\x00" | <Q version=1 | <B dtype code | <Q sequence count | <Q document count
          | int32 sequence lengths | int64 sequence byte offsets | int64 document indices
    .bin: the token ids of every sequence, back to back, in the dtype of the .idx

Here one document is one sequence (no sentence splitting), so document indices are 0..N. The
tests check that megatron-core's ``IndexedDataset`` reads what :class:`IndexedWriter` writes and
that :class:`IndexedReader` reads what megatron-core's ``IndexedDatasetBuilder`` writes. Keeping
this torch-free keeps preprocessing a CPU tool (Megatron-LM's imports Transformer Engine) and lets
whole chunks of documents be written with one call.
"""

from __future__ import annotations

import os
import shutil
import struct
from typing import Iterable

import numpy as np

INDEX_HEADER = b"MMIDIDX\x00\x00"
_DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6,
                np.float32: 7, np.uint16: 8}
_CODE_DTYPES = {v: k for k, v in _DTYPE_CODES.items()}


def token_dtype(vocab_size: int):
    """uint16 while every id fits (as Megatron-LM chooses), int32 otherwise."""
    return np.uint16 if vocab_size < 65500 else np.int32


class IndexedWriter:
    """Streams documents to ``prefix.bin``; ``finalize()`` writes ``prefix.idx``. The .idx is
    written last, so an interrupted write never leaves a pair that looks complete."""

    def __init__(self, prefix: str, dtype):
        self.prefix, self.dtype = prefix, np.dtype(dtype).type
        if self.dtype not in _DTYPE_CODES:
            raise ValueError(f"unsupported token dtype {dtype}")
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        if os.path.exists(prefix + ".idx"):
            os.remove(prefix + ".idx")
        self._bin = open(prefix + ".bin", "wb")
        self._lengths: list[np.ndarray] = []

    def add_documents(self, flat_ids: np.ndarray, lengths: np.ndarray) -> None:
        """Several documents at once: ``flat_ids`` concatenated, ``lengths[i]`` ids each."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != len(flat_ids):
            raise ValueError(f"lengths sum to {int(lengths.sum())} but {len(flat_ids)} ids were given")
        if len(lengths) and lengths.max() > np.iinfo(np.int32).max:
            raise ValueError("a document longer than 2^31 tokens does not fit the .idx format")
        self._bin.write(np.asarray(flat_ids, dtype=self.dtype).tobytes(order="C"))
        self._lengths.append(lengths.astype(np.int32))

    def add_document(self, ids: Iterable[int]) -> None:
        ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=self.dtype)
        self.add_documents(ids, np.array([len(ids)]))

    def add_index(self, prefix: str) -> None:
        """Append a whole existing dataset (same dtype)."""
        other = IndexedReader(prefix)
        if other.dtype != self.dtype:
            raise ValueError(f"{prefix} holds {np.dtype(other.dtype).name} tokens, this dataset "
                             f"{np.dtype(self.dtype).name}: merge datasets made with the same tokenizer")
        if not np.array_equal(other.document_indices, np.arange(len(other.document_indices))):
            raise ValueError(f"{prefix} has multi-sequence documents, which merging here does not support")
        self._lengths.append(other.lengths.copy())
        with open(prefix + ".bin", "rb") as f:
            shutil.copyfileobj(f, self._bin)

    def finalize(self) -> int:
        """Writes the .idx; returns the document count."""
        self._bin.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1].astype(np.int64) * np.dtype(self.dtype).itemsize, out=pointers[1:])
        tmp = self.prefix + ".idx.tmp"
        with open(tmp, "wb") as f:
            f.write(INDEX_HEADER)
            f.write(struct.pack("<Q", 1))
            f.write(struct.pack("<B", _DTYPE_CODES[self.dtype]))
            f.write(struct.pack("<Q", len(lengths)))
            f.write(struct.pack("<Q", len(lengths) + 1))
            f.write(lengths.astype(np.int32).tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(np.arange(len(lengths) + 1, dtype=np.int64).tobytes(order="C"))
        os.replace(tmp, self.prefix + ".idx")
        return len(lengths)


class IndexedReader:
    """Memory-mapped read access: ``len(reader)`` sequences, ``reader[i]`` -> numpy ids."""

    def __init__(self, prefix: str):
        for ext in (".bin", ".idx"):
            if not os.path.exists(prefix + ext):
                raise FileNotFoundError(f"{prefix}{ext} does not exist")
        with open(prefix + ".idx", "rb") as f:
            header = f.read(9)
            if header != INDEX_HEADER:
                raise ValueError(f"{prefix}.idx is not a Megatron index (header {header!r})")
            (version,) = struct.unpack("<Q", f.read(8))
            if version != 1:
                raise ValueError(f"{prefix}.idx has index version {version}; only 1 is supported")
            (code,) = struct.unpack("<B", f.read(1))
            (n_seq,) = struct.unpack("<Q", f.read(8))
            (n_doc,) = struct.unpack("<Q", f.read(8))
            offset = f.tell()
        self.dtype = _CODE_DTYPES[code]
        idx = np.memmap(prefix + ".idx", mode="r", dtype=np.uint8)
        self.lengths = np.frombuffer(idx, np.int32, n_seq, offset)
        self.pointers = np.frombuffer(idx, np.int64, n_seq, offset + 4 * n_seq)
        self.document_indices = np.frombuffer(idx, np.int64, n_doc, offset + 12 * n_seq)
        size = os.path.getsize(prefix + ".bin")
        self._bin = np.memmap(prefix + ".bin", mode="r", dtype=np.uint8) if size else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        return np.frombuffer(self._bin, self.dtype, int(self.lengths[i]), int(self.pointers[i]))


def merge_datasets(prefixes: list[str], output_prefix: str) -> int:
    """Concatenate indexed datasets made with the same tokenizer; returns the document count."""
    if not prefixes:
        raise ValueError("merge_datasets: no input prefixes")
    readers = [IndexedReader(p) for p in prefixes]  # fails early, naming the missing file
    writer = IndexedWriter(output_prefix, readers[0].dtype)
    for prefix in prefixes:
        writer.add_index(prefix)
    return writer.finalize()
