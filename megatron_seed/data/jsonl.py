"""Records of jsonl(.gz) files, read one way everywhere: a bad line is an error naming file and line.

Benchmarks, oracle labels, problem sets, classifier examples and our own resumable outputs are all
jsonl; a user's file with one broken line should say where, not raise a bare JSONDecodeError.
"""

from __future__ import annotations

import gzip
import json
import os
from typing import Iterator


def iter_jsonl(path: str) -> Iterator[tuple[int, dict]]:
    """``(line number, record)`` for every non-blank line of ``path`` (gzip when it ends in .gz).

    Raises FileNotFoundError for a missing file and ValueError ``"{path}:{line}: ..."`` for a line
    that is not a JSON object or a file that is not UTF-8."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:  # bytes, decoded line by line, so a bad byte names its line
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not UTF-8 text (byte {e.start + 1}: {e.reason})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not a JSON record ({e.msg} at character {e.pos + 1})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{line_no}: a JSON {type(record).__name__}, not an object")
            yield line_no, record


def read_jsonl(path: str) -> list[dict]:
    """Every record of ``path`` (:func:`iter_jsonl`)."""
    return [record for _, record in iter_jsonl(path)]
