"""Streaming record readers for preprocessing: jsonl, jsonl.gz, jsonl.zst and parquet.

Readers hand out *chunks* of raw records (undecoded jsonl lines, or parquet rows as dicts) with
their file and line/row numbers; JSON parsing and validation happen in the workers. Memory is one
chunk per in-flight worker, whatever the corpus size.
"""

from __future__ import annotations

import glob
import gzip
import io
import os
from dataclasses import dataclass, field
from typing import Iterator, Sequence, Union

SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst", ".parquet")


@dataclass
class Chunk:
    path: str
    first_index: int         # global record index of records[0], across all inputs
    records: list[Union[bytes, dict]] = field(default_factory=list)
    line_numbers: list[int] = field(default_factory=list)  # 1-based line (jsonl) / 0-based row (parquet)
    nbytes: int = 0

    @property
    def unit(self) -> str:
        return "row" if self.path.endswith(".parquet") else "line"


def expand_inputs(inputs: Sequence[str]) -> list[str]:
    """Files named by paths, globs and directories (searched recursively for supported suffixes),
    in sorted order per argument. Errors name the argument that matched nothing."""
    files: list[str] = []
    for spec in inputs:
        if os.path.isdir(spec):
            found = sorted(p for p in glob.glob(os.path.join(spec, "**", "*"), recursive=True)
                           if p.endswith(SUFFIXES) and os.path.isfile(p))
        elif any(c in spec for c in "*?["):
            found = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        else:
            found = [spec] if os.path.isfile(spec) else []
        if not found:
            raise FileNotFoundError(f"--input {spec!r} matches no file (supported: {', '.join(SUFFIXES)})")
        for path in found:
            if not path.endswith(SUFFIXES):
                raise ValueError(f"{path}: unsupported input type; expected one of {', '.join(SUFFIXES)}")
        files += found
    return files


def _open_text_lines(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        try:
            import zstandard
        except ImportError as e:
            raise ImportError(f"{path}: reading .zst needs the zstandard package (pip install zstandard)") from e
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def iter_chunks(files: Sequence[str], max_records: int = 256, max_bytes: int = 8 << 20,
                start_index: int = 0) -> Iterator[Chunk]:
    index = start_index
    for path in files:
        if path.endswith(".parquet"):
            yield from _parquet_chunks(path, max_records, index)
            import pyarrow.parquet as pq

            index += pq.ParquetFile(path).metadata.num_rows
            continue
        chunk = Chunk(path, index)
        with _open_text_lines(path) as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue  # blank lines are layout, not records
                chunk.records.append(line)
                chunk.line_numbers.append(line_no)
                chunk.nbytes += len(line)
                index += 1
                if len(chunk.records) >= max_records or chunk.nbytes >= max_bytes:
                    yield chunk
                    chunk = Chunk(path, index)
        if chunk.records:
            yield chunk


def _parquet_chunks(path: str, max_records: int, index: int) -> Iterator[Chunk]:
    import pyarrow.parquet as pq

    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=max_records):
        rows = batch.to_pylist()
        yield Chunk(path, index, rows, list(range(row, row + len(rows))), batch.nbytes)
        row += len(rows)
        index += len(rows)

