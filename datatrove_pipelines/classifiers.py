"""fastText classifiers for data selection: a recall model, and high-quality models with hard negatives.

Seed-Coder selects data with cheap fastText classifiers in front of the expensive LLM steps: a
*recall* model that finds code-related documents in general text, and *high-quality* models
retrained over 2-3 rounds, each round adding "hard negatives" (documents the previous model
scored high that a judge rejects). Both are :func:`train_classifier`:

    python -m datatrove_pipelines.classifiers train --labelled L.jsonl --output DIR \\
        [--label-field label | --score-field rating --threshold 6] [--holdout 0.2] [--seed 0] \\
        [--pool P.jsonl --judge labels:FILE|heuristic|oracle:URL|HF_DIR|smollm2 --rounds 3 \\
         --candidates-per-round 100]
    python -m datatrove_pipelines.classifiers local-pool --output DIR   # demo pool: classifier_pool.py

* **Labels**: jsonl records with ``text`` (or ``content``), an optional ``id`` and either a label
  (``--label-field``, default ``label``: 1/0, true/false, pos/neg, yes/no) or a score made a label
  by ``score >= --threshold`` (e.g. the oracle's ``labels.jsonl`` from the curation, field
  ``rating``). A record without the field, an empty file or a line that is not JSON is an error
  naming the file and line.
* **Held-out set**: a seeded, per-class fraction of the labelled records, fixed before round 1
  and never trained on, so rounds are compared on the same documents. Reported per round:
  precision and recall at ``--decision-threshold`` (0.5) and ROC AUC of the positive-class
  probability (Mann-Whitney statistic with ties counted half; 0.5 is chance).
* **Hard-negative rounds** (``--pool`` and ``--rounds`` > 1): after each round but the last,
  the model scores the unlabelled pool; the highest-scored documents that it calls positive and
  that are neither labelled nor judged before (``--candidates-per-round`` of them) go to the
  judge; those judged negative join the training set as negatives; those judged positive are
  set aside (never asked again, not added); unknown verdicts (None) are counted.
  Pool documents whose id or text is in the labelled set are left out of the pool, so no
  held-out document can come back as a training example. ``OUTPUT/classifier_rounds.json`` has
  one entry per round; ``OUTPUT/model.bin`` is the last round's model and ``OUTPUT/model.json``
  the preprocessing it needs.
* **Judges** (a judge is any callable ``list[Example] -> list[bool | None]``, True = positive):
  ``labels:FILE`` looks documents up (by id, then by text) in a labelled file: on the demo pool
  this reveals the source-based labels, so it stands in for an annotator who agrees with them;
  ``oracle:SPEC`` asks the curation's LLM oracle (``oracle.py``) with the paper's code-quality
  prompt and calls ``rating >= --judge-threshold`` positive: a judge for the high-quality model
  on code files, not for "is this page about code"; ``heuristic`` (:class:`CodeLikenessJudge`)
  counts lines that look like code: a crude offline rule for tests and demos, not a quality
  judgement.

Preprocessing (:func:`preprocess`, identical at training and at filtering): the first
``max_chars`` characters (10,000), one line, identifiers split at ``_`` and camelCase humps with
``_`` kept as a token (``get_userName`` -> ``get _ user name``), digit runs mapped to ``<num>``,
common multi-character operators kept whole (``==``, ``->``, ``::``, ``**``, ...), every other
punctuation character a token of its own, lowercase. Code is mostly punctuation and compound
identifiers: whitespace tokens (fastText's own) would make ``foo(bar)`` and ``foo(baz)``
unrelated words. Splitting also means no token can start with fastText's ``__label__`` prefix.

Model: fastText supervised, softmax over ``__label__pos``/``__label__neg``, word bigrams;
hashed n-gram buckets cost ``(vocabulary + bucket) * dim * 4`` bytes (2^18 x 32: 34 MB plus the vocabulary).
One training thread by default: fastText's multi-threaded updates are not reproducible. Training
zero-fills allocations (:func:`_zero_filled_allocations`): this fastText build leaves most of its
input matrix uninitialized below 10 threads, which made runs differ and diverge.

:class:`ClassifierFilter` is the datatrove step (used by the curation's ``--quality-classifier``):
it keeps documents whose positive probability is at least the threshold, records it as
``metadata["classifier_score"]`` and counts the others as ``dropped_low_classifier_score``.
datatrove's own fastText filter predicts on raw text (not our tokenization) and may download its
model; this one reads a local file only.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import json
import os
import random
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter

from megatron_seed.data.jsonl import iter_jsonl

POSITIVE = "__label__pos"
NEGATIVE = "__label__neg"
DEFAULT_MAX_CHARS = 10_000
M_PERTURB = -6  # glibc's mallopt parameter (malloc.h)
TRUE_WORDS = {"1", "true", "yes", "pos", "positive"}
FALSE_WORDS = {"0", "false", "no", "neg", "negative"}
# Identifier parts, numbers, the multi-character operators that mark code, any other symbol.
TOKEN = re.compile(r"[^\W\d_]+|\d+|==|!=|<=|>=|->|=>|::|\*\*|//|&&|\|\||\+=|-=|:=|<<|>>|\.\.\.|[^\w\s]|_")
CAMEL = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+")


def log(message: str) -> None:
    print(f"[classifiers] {message}", file=sys.stderr, flush=True)


def preprocess(text: str, max_chars: int = DEFAULT_MAX_CHARS) -> str:
    """One lowercase line of code-aware tokens (see the module docstring)."""
    tokens = []
    for token in TOKEN.findall(text[:max_chars]):
        if token[0].isdigit():
            tokens.append("<num>")
        elif token.isascii() and token[0].isalpha():
            tokens.extend(part.lower() for part in CAMEL.findall(token))
        elif token[0].isalpha():  # camelCase is an ASCII convention; other scripts stay whole
            tokens.append(token.lower())
        else:
            tokens.append(token)
    return " ".join(tokens)


@dataclass
class Example:
    id: str
    text: str
    label: Optional[int] = None  # 1 positive, 0 negative, None unlabelled
    language: Optional[str] = None


def text_key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "replace")).hexdigest()


def _parse_label(value, where: str, field_name: str) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return int(value)
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS | FALSE_WORDS:
        return int(value.strip().lower() in TRUE_WORDS)
    raise ValueError(f"{where}: {field_name}={value!r} is not a label (1/0, true/false, pos/neg, yes/no)")


def read_examples(path: str, label_field: Optional[str] = "label", score_field: Optional[str] = None,
                  threshold: Optional[float] = None) -> list[Example]:
    """Records of a jsonl file. With ``score_field`` the label is ``score >= threshold``; with
    ``label_field`` it is that field; with neither the examples are unlabelled (a pool)."""
    if score_field is not None and threshold is None:
        raise ValueError(f"{path}: a score field ({score_field!r}) needs a threshold (--threshold)")
    examples = []
    name = os.path.basename(path)
    for lineno, data in iter_jsonl(path):
        where = f"{path}:{lineno}"
        text = data.get("text", data.get("content"))
        if not isinstance(text, str):
            raise ValueError(f"{where}: no 'text' (or 'content') string field")
        record_id = str(data.get("id", f"{name}:{lineno}"))
        label = None
        if score_field is not None:
            if not isinstance(data.get(score_field), (int, float)) or isinstance(data.get(score_field), bool):
                raise ValueError(f"{where} (id {record_id}): no numeric {score_field!r} field")
            label = int(data[score_field] >= threshold)
        elif label_field is not None:
            if label_field not in data:
                raise ValueError(f"{where} (id {record_id}): no {label_field!r} field; pass --label-field NAME, "
                                 "or --score-field NAME --threshold X")
            label = _parse_label(data[label_field], f"{where} (id {record_id})", label_field)
        examples.append(Example(record_id, text, label, data.get("language")))
    if not examples:
        raise ValueError(f"{path}: no records")
    return examples


def split_holdout(examples: Sequence[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, held out): ``fraction`` of each class, chosen by a seeded shuffle of the records
    sorted by id, so the split does not depend on the file's order. At least one of each class is
    held out and one kept for training."""
    if not 0 < fraction < 1:
        raise ValueError(f"--holdout must be in (0, 1), not {fraction}")
    rng = random.Random(seed)
    train, held = [], []
    for label in (0, 1):
        group = sorted((e for e in examples if e.label == label), key=lambda e: (e.id, text_key(e.text)))
        if len(group) < 2:
            raise ValueError(f"{len(group)} labelled example(s) of class {label}: at least 2 of each class are "
                             "needed (one to train, one to hold out)")
        rng.shuffle(group)
        n = min(len(group) - 1, max(1, round(len(group) * fraction)))
        held += group[:n]
        train += group[n:]
    return train, held


@dataclass
class FastTextParams:
    """fastText's supervised hyperparameters (its names, in snake case) and our preprocessing's."""

    dim: int = 32
    epoch: int = 10
    lr: float = 0.5
    word_ngrams: int = 2
    min_count: int = 1
    bucket: int = 2 ** 18
    threads: int = 1
    seed: int = 0
    max_chars: int = DEFAULT_MAX_CHARS


@contextlib.contextmanager
def _zero_filled_allocations():
    """Make the C library zero every allocation while fastText trains (glibc's ``M_PERTURB``;
    elsewhere nothing). With fewer than 10 threads fastText initializes only part of its input
    matrix (its ``uniform`` fills one tenth of the rows per thread); the rest is whatever the
    allocator returns: zeros from a fresh mapping, stale floats from reused memory. Measured
    here: in a process that had trained before, a tiny model hit "Encountered NaN" in 23 of 40
    trainings, at lr 0.5 and 0.05 alike, and scores moved between identical runs; zero-filled,
    neither happened. Yields whether zero-filling is on."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        yield False
        return
    on = mallopt(M_PERTURB, 0xFF) == 1  # allocations filled with ~0xFF = 0
    try:
        yield on
    finally:
        mallopt(M_PERTURB, int(os.environ.get("MALLOC_PERTURB_", "0") or 0))


def train_model(examples: Sequence[Example], params: FastTextParams, retries: int = 3, log=log):
    """(fastText supervised model, learning rate it trained at) from labelled examples, written to
    a temporary file, which is how fastText reads its input. Training that diverges (fastText's
    "Encountered NaN", which its maintainers trace to too high a learning rate) is retried with
    the rate halved, up to ``retries`` times."""
    import fasttext

    fd, path = tempfile.mkstemp(suffix=".txt", prefix="fasttext_train_")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for e in examples:
                f.write(f"{POSITIVE if e.label else NEGATIVE} {preprocess(e.text, params.max_chars)}\n")
        lr = params.lr
        for attempt in range(retries + 1):
            try:
                with _zero_filled_allocations() as zeroed:
                    model = fasttext.train_supervised(
                        input=path, dim=params.dim, epoch=params.epoch, lr=lr, wordNgrams=params.word_ngrams,
                        minCount=params.min_count, bucket=params.bucket, thread=params.threads, seed=params.seed,
                        loss="softmax", verbose=0)
                if not zeroed and params.threads < 10:
                    log("this C library cannot zero fastText's uninitialized rows: runs may differ")
                return model, lr
            except RuntimeError as e:
                if "NaN" not in str(e) or attempt == retries:
                    raise RuntimeError(f"fastText training failed at lr {lr}: {e} (lower --lr)") from e
                log(f"fastText diverged (NaN) at lr {lr}; retrying at lr {lr / 2}")
                lr /= 2
    finally:
        os.remove(path)


def positive_probability(model, texts: Sequence[str], max_chars: int = DEFAULT_MAX_CHARS) -> np.ndarray:
    """P(positive) per text, in order."""
    if not texts:
        return np.zeros(0)
    labels, probs = model.predict([preprocess(t, max_chars) for t in texts], k=-1)
    # fastText smooths its softmax by 1e-5, so a certain prediction reads 1.00001.
    return np.clip([dict(zip(ls, ps)).get(POSITIVE, 0.0) for ls, ps in zip(labels, probs)], 0.0, 1.0)


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Area under the ROC curve: the probability that a random positive scores above a random
    negative, ties counting half (the Mann-Whitney U statistic over n_pos * n_neg)."""
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=float)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based rank shared by tied scores
    ranks = average_rank[inverse]
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def binary_metrics(labels: Sequence[int], scores: Sequence[float], threshold: float = 0.5) -> dict:
    """Precision and recall of ``score >= threshold``, ROC AUC and the confusion counts. Precision
    is None when nothing is predicted positive."""
    truth = np.asarray(labels, dtype=bool)
    predicted = np.asarray(scores, dtype=float) >= threshold
    tp, fp = int((predicted & truth).sum()), int((predicted & ~truth).sum())
    fn, tn = int((~predicted & truth).sum()), int((~predicted & ~truth).sum())
    auc = roc_auc(truth, scores)
    return {"n": len(truth), "positives": int(truth.sum()),
            "precision": tp / (tp + fp) if tp + fp else None, "recall": tp / (tp + fn) if tp + fn else None,
            "auc": None if np.isnan(auc) else auc, "tp": tp, "fp": fp, "fn": fn, "tn": tn}


# --------------------------------------------------------------------------------------------- judges

Judge = Callable[[list[Example]], list[Optional[bool]]]


class LabelsJudge:
    """Verdicts looked up in labelled examples, by id and then by text; None when absent."""

    def __init__(self, examples: Sequence[Example]):
        self.by_id = {e.id: bool(e.label) for e in examples}
        self.by_text = {text_key(e.text): bool(e.label) for e in examples}

    def __call__(self, examples: list[Example]) -> list[Optional[bool]]:
        return [self.by_id.get(e.id, self.by_text.get(text_key(e.text))) for e in examples]


class OracleJudge:
    """The curation's LLM oracle (anything with ``rate([(language, text)]) -> [OracleReply]``):
    positive when its rating is at least ``min_rating``; None when it gave no rating."""

    def __init__(self, oracle, min_rating: float = 6.0):
        self.oracle = oracle
        self.min_rating = min_rating

    def __call__(self, examples: list[Example]) -> list[Optional[bool]]:
        replies = self.oracle.rate([(e.language or "code", e.text) for e in examples])
        return [None if r.rating is None else r.rating >= self.min_rating for r in replies]


CODE_LINE = re.compile(r"^\s*(def |class |import |from \S+ import |return\b|#include|>>> |\$ |@\w)"
                       r"|[;{}]\s*$|^\s*[\w.\[\]]+\s*(=|\+=|-=|:=)\s*\S|^\s*[\w.]+\(.*\)\s*;?\s*$|^(\t| {4,})\S")


class CodeLikenessJudge:
    """A crude offline rule, for tests and demos only: positive when at least ``min_fraction`` of
    the non-empty lines look like code (definitions, imports, calls, assignments, braces or
    semicolons at the end, REPL/shell prompts, decorators, indented blocks). It knows nothing of
    quality and mistakes indented prose for code."""

    def __init__(self, min_fraction: float = 0.3):
        self.min_fraction = min_fraction

    def __call__(self, examples: list[Example]) -> list[Optional[bool]]:
        verdicts = []
        for e in examples:
            lines = [line for line in e.text[:DEFAULT_MAX_CHARS].splitlines() if line.strip()]
            code = sum(1 for line in lines if CODE_LINE.search(line))
            verdicts.append(bool(lines) and code / len(lines) >= self.min_fraction)
        return verdicts


def make_judge(spec: str, label_field: Optional[str] = "label", score_field: Optional[str] = None,
               threshold: Optional[float] = None, min_rating: float = 6.0) -> Judge:
    """``labels:FILE`` -> :class:`LabelsJudge` (FILE read with the labelled file's fields),
    ``heuristic`` -> :class:`CodeLikenessJudge`, ``oracle[:SPEC]`` -> :class:`OracleJudge` over
    ``oracle.make_oracle(SPEC)`` (URL, HF dir or smollm2)."""
    kind, _, arg = spec.partition(":")
    if kind == "labels" and arg:
        return LabelsJudge(read_examples(arg, label_field, score_field, threshold))
    if kind == "heuristic":
        return CodeLikenessJudge()
    if kind == "oracle":
        from datatrove_pipelines.oracle import make_oracle

        return OracleJudge(make_oracle(arg or None), min_rating)
    raise ValueError(f"--judge must be labels:FILE, heuristic or oracle[:URL|HF_DIR|smollm2], not {spec!r}")


# ------------------------------------------------------------------------------------------- training

@dataclass
class MiningState:
    """The unlabelled pool still open to mining and what the judge has said so far."""

    open: list[Example]
    hard_negatives: list[Example] = field(default_factory=list)
    judged_positive: int = 0
    judged_unknown: int = 0


def mine_hard_negatives(model, state: MiningState, judge: Judge, count: int, params: FastTextParams,
                        decision_threshold: float = 0.5) -> dict:
    """Score the open pool, send its top ``count`` predicted positives to the judge, keep those
    judged negative as hard negatives (label 0). Judged documents leave the pool either way."""
    scores = positive_probability(model, [e.text for e in state.open], params.max_chars)
    order = [int(i) for i in np.argsort(-scores, kind="stable") if scores[i] >= decision_threshold][:count]
    candidates = [state.open[i] for i in order]
    verdicts = judge(candidates) if candidates else []
    if len(verdicts) != len(candidates):
        raise ValueError(f"the judge returned {len(verdicts)} verdicts for {len(candidates)} documents")
    added = [Example(e.id, e.text, 0, e.language) for e, v in zip(candidates, verdicts) if v is False]
    positive = sum(1 for v in verdicts if v is True)
    unknown = sum(1 for v in verdicts if v is None)
    state.hard_negatives += added
    state.judged_positive += positive
    state.judged_unknown += unknown
    chosen = set(order)
    state.open = [e for i, e in enumerate(state.open) if i not in chosen]
    return {"pool_predicted_positive": int((scores >= decision_threshold).sum()), "pool_scored": len(scores),
            "candidates_judged": len(candidates), "judged_negative": len(added), "judged_positive": positive,
            "judged_unknown": unknown,
            "lowest_candidate_score": float(scores[order[-1]]) if order else None}


def train_classifier(labelled: Sequence[Example], output_dir: str, pool: Optional[Sequence[Example]] = None,
                     judge: Optional[Judge] = None, rounds: int = 1, candidates_per_round: int = 100,
                     holdout: float = 0.2, params: Optional[FastTextParams] = None,
                     decision_threshold: float = 0.5, log=log) -> list[dict]:
    """Train over ``rounds`` rounds (hard negatives mined between rounds when a pool and a judge
    are given); write ``model.bin``, ``model.json`` and ``classifier_rounds.json`` to
    ``output_dir``; return the per-round records."""
    params = params or FastTextParams()
    if rounds < 1:
        raise ValueError(f"--rounds must be at least 1, not {rounds}")
    if rounds > 1 and (pool is None or judge is None):
        raise ValueError("more than one round needs an unlabelled pool (--pool) and a judge (--judge)")
    train, held = split_holdout(labelled, holdout, params.seed)
    known = {e.id for e in labelled} | {text_key(e.text) for e in labelled}
    state = MiningState([e for e in pool or [] if e.id not in known and text_key(e.text) not in known])
    os.makedirs(output_dir, exist_ok=True)
    records, mining = [], {}
    log(f"{len(train)} train / {len(held)} held-out labelled documents, pool {len(state.open)}"
        f" ({len(pool or []) - len(state.open)} pool documents left out as labelled)")
    for r in range(1, rounds + 1):
        t0 = time.time()
        examples = train + state.hard_negatives
        model, lr = train_model(examples, params, log=log)
        train_seconds = time.time() - t0
        held_scores = positive_probability(model, [e.text for e in held], params.max_chars)
        metrics = binary_metrics([e.label for e in held], held_scores, decision_threshold)
        record = {"round": r, "train_positive": sum(1 for e in examples if e.label),
                  "train_negative": sum(1 for e in examples if not e.label),
                  "hard_negatives_total": len(state.hard_negatives),
                  "hard_negatives_added": mining.get("judged_negative", 0), "mining_before_round": mining or None,
                  "held_out": metrics, "lr": lr, "train_seconds": round(train_seconds, 3)}
        log(f"round {r}: {record['train_positive']} positive / {record['train_negative']} negative "
            f"({record['hard_negatives_total']} hard), held-out P {_fmt(metrics['precision'])} "
            f"R {_fmt(metrics['recall'])} AUC {_fmt(metrics['auc'])}")
        if r < rounds:
            t1 = time.time()
            mining = mine_hard_negatives(model, state, judge, candidates_per_round, params, decision_threshold)
            mining["seconds"] = round(time.time() - t1, 3)
            log(f"  mined: {mining['candidates_judged']} candidates judged, {mining['judged_negative']} negative, "
                f"{mining['judged_positive']} positive, {mining['judged_unknown']} unknown")
        records.append(record)
        _write_json(os.path.join(output_dir, "classifier_rounds.json"), records)
    model_path = os.path.join(output_dir, "model.bin")
    model.save_model(model_path)
    _write_json(_sidecar(model_path), {"positive_label": POSITIVE, "max_chars": params.max_chars,
                                       "decision_threshold": decision_threshold, "params": asdict(params),
                                       "trained_lr": records[-1]["lr"],
                                       "rounds": rounds, "final_held_out": records[-1]["held_out"]})
    return records


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _write_json(path: str, obj) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


def _sidecar(model_path: str) -> str:
    return os.path.splitext(model_path)[0] + ".json"


def load_classifier(path: str):
    """(fastText model, config) from a local ``model.bin`` or the directory holding one; the
    config (``model.json`` beside it) gives the preprocessing the model was trained with."""
    import fasttext

    model_path = os.path.join(path, "model.bin") if os.path.isdir(path) else path
    if not os.path.isfile(model_path):
        raise FileNotFoundError(f"{model_path}: no fastText model there (train one with "
                                "python -m datatrove_pipelines.classifiers train)")
    config = {"positive_label": POSITIVE, "max_chars": DEFAULT_MAX_CHARS}
    if os.path.isfile(_sidecar(model_path)):
        with open(_sidecar(model_path)) as f:
            config.update(json.load(f))
    model = fasttext.load_model(model_path)
    if POSITIVE not in model.labels:
        raise ValueError(f"{model_path}: the model has labels {model.labels}, not {POSITIVE}")
    return model, config


class ClassifierFilter(BaseFilter):
    """Keep documents whose positive-class probability is at least ``threshold``; the probability
    goes to ``metadata[metadata_key]``, drops are counted as ``dropped_low_classifier_score``."""

    name = "🎯 fastText classifier filter"
    _requires_dependencies = [("fasttext", "fasttext-numpy2-wheel")]

    def __init__(self, model_path: str, threshold: float = 0.5, metadata_key: str = "classifier_score",
                 batch_size: int = 64, exclusion_writer=None):
        super().__init__(exclusion_writer, batch_size)
        model_file = os.path.join(model_path, "model.bin") if os.path.isdir(model_path) else model_path
        if not os.path.isfile(model_file):  # fail where the step is built, not later in a worker
            raise FileNotFoundError(f"{model_file}: no fastText model there")
        if not 0 <= threshold <= 1:
            raise ValueError(f"the classifier threshold is a probability in [0, 1], not {threshold}")
        self.model_path = model_file
        self.threshold = threshold
        self.metadata_key = metadata_key
        self._model = None  # loaded in the worker: a fastText model does not pickle
        self._max_chars = DEFAULT_MAX_CHARS

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        return self.filter_batch([doc])[0]

    def filter_batch(self, batch: list[Document]) -> list[bool | tuple[bool, str]]:
        if self._model is None:
            self._model, config = load_classifier(self.model_path)
            self._max_chars = config["max_chars"]
        scores = positive_probability(self._model, [d.text for d in batch], self._max_chars)
        results = []
        for doc, score in zip(batch, scores):
            doc.metadata[self.metadata_key] = round(float(score), 5)
            results.append(True if score >= self.threshold else (False, "low_classifier_score"))
        return results


# ------------------------------------------------------------------------------------------------ CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m datatrove_pipelines.classifiers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a classifier (hard-negative rounds with --pool/--judge/--rounds)")
    t.add_argument("--labelled", required=True, help="jsonl: text + label (or a score with --threshold)")
    t.add_argument("--output", required=True, help="directory: model.bin, model.json, classifier_rounds.json")
    t.add_argument("--label-field", default="label")
    t.add_argument("--score-field", default=None, help="label = score >= --threshold (e.g. the oracle's rating)")
    t.add_argument("--threshold", type=float, default=None)
    t.add_argument("--pool", default=None, help="jsonl of unlabelled documents mined for hard negatives")
    t.add_argument("--judge", default=None, help="labels:FILE, heuristic, or oracle[:URL|HF_DIR|smollm2]")
    t.add_argument("--judge-threshold", type=float, default=6.0, help="an oracle rating at least this is positive")
    t.add_argument("--rounds", type=int, default=1)
    t.add_argument("--candidates-per-round", type=int, default=100)
    t.add_argument("--holdout", type=float, default=0.2)
    t.add_argument("--decision-threshold", type=float, default=0.5, help="for the reported precision/recall")
    defaults = FastTextParams()
    for name, value in asdict(defaults).items():
        t.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    pool = sub.add_parser("local-pool", help="build the demo pool from this machine's files (classifier_pool.py)")
    pool.add_argument("--output", required=True)
    pool.add_argument("--seed", type=int, default=0)
    pool.add_argument("--code-files", type=int, default=400, help="standard-library .py files")
    pool.add_argument("--per-package", type=int, default=20, help="docs sampled per site-packages package")
    pool.add_argument("--per-system-package", type=int, default=3, help="files per /usr/share/doc package")
    pool.add_argument("--labelled-fraction", type=float, default=0.3)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "local-pool":
        from datatrove_pipelines.classifier_pool import build_local_pool

        summary = build_local_pool(args.output, args.seed, args.code_files, args.per_package,
                                   args.per_system_package, args.labelled_fraction)
        log(json.dumps(summary["splits"]))
        return 0
    t0 = time.time()
    fields = dict(label_field=args.label_field, score_field=args.score_field, threshold=args.threshold)
    try:  # bad input is the user's to fix: its message (file, line, field) without a traceback
        labelled = read_examples(args.labelled, **fields)
        pool = read_examples(args.pool, label_field=None) if args.pool else None
        judge = make_judge(args.judge, min_rating=args.judge_threshold, **fields) if args.judge else None
        params = FastTextParams(**{name: getattr(args, name) for name in asdict(FastTextParams())})
        records = train_classifier(labelled, args.output, pool, judge, args.rounds, args.candidates_per_round,
                                   args.holdout, params, args.decision_threshold)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    log(f"done in {time.time() - t0:.1f} s: {os.path.join(args.output, 'model.bin')}, "
        f"{len(records)} round(s) in {os.path.join(args.output, 'classifier_rounds.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
