"""fastText classifiers: preprocessing, the AUC (that it can fail), hard-negative rounds, the
datatrove filter step, the curation flags and the errors for bad input. Tiny models (small
buckets and dimension, one thread): the whole file runs in a few seconds."""

from __future__ import annotations

import json
import random

import pytest
from datatrove.data import Document

from datatrove_pipelines.classifiers import (ClassifierFilter, CodeLikenessJudge, Example, FastTextParams,
                                             LabelsJudge, OracleJudge, binary_metrics, load_classifier, main,
                                             preprocess, read_examples, roc_auc, split_holdout, train_classifier,
                                             train_model)
from datatrove_pipelines.oracle import OracleReply

TINY = FastTextParams(dim=8, epoch=20, lr=0.2, bucket=4096, threads=1, seed=0)
CODE_WORDS = ["def", "return", "import", "self", "lambda", "yield", "class", "async", "await", "elif"]
PROSE_WORDS = ["garden", "river", "morning", "bread", "mountain", "letter", "village", "autumn", "song", "harbor"]
SHARED = ["the", "a", "of", "and", "to", "in", "is", "it", "for", "on"]


def doc(rng: random.Random, words: list[str], n: int = 30) -> str:
    """A document mixing class words with words both classes share."""
    return " ".join(rng.choice(words if rng.random() < 0.5 else SHARED) for _ in range(n))


def separable(n: int = 60, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    return [Example(f"d{i}", doc(rng, CODE_WORDS if i % 2 else PROSE_WORDS), i % 2) for i in range(n)]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_preprocess_one_lowercase_line_of_code_tokens():
    text = "def get_userName(self, HTTPServer2):\n    return self.x == 30 ** 2  # __label__pos\nCafé"
    out = preprocess(text)
    assert "\n" not in out and out == out.lower()
    assert out.split() == ["def", "get", "_", "user", "name", "(", "self", ",", "http", "server", "<num>", ")", ":",
                           "return", "self", ".", "x", "==", "<num>", "**", "<num>", "#", "_", "_", "label", "_",
                           "_", "pos", "café"]
    assert not any(t.startswith("__label__") for t in out.split())
    assert preprocess("abcdef" * 10, max_chars=6) == "abcdef"


def test_roc_auc_matches_pairwise_definition_with_ties():
    rng = random.Random(1)
    labels = [rng.random() < 0.4 for _ in range(50)]
    scores = [rng.choice([0.1, 0.3, 0.3, 0.7, 0.9]) for _ in range(50)]
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    pairwise = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
    assert roc_auc(labels, scores) == pytest.approx(pairwise)
    assert roc_auc([1, 1, 0, 0], [0.9, 0.8, 0.2, 0.1]) == 1.0
    assert roc_auc([1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9]) == 0.0
    metrics = binary_metrics([1, 1, 0, 0], [0.9, 0.4, 0.6, 0.1])
    assert (metrics["precision"], metrics["recall"], metrics["tp"], metrics["fp"]) == (0.5, 0.5, 1, 1)
    assert binary_metrics([1, 0], [0.1, 0.2])["precision"] is None  # nothing predicted positive


def test_separable_data_gives_high_auc(tmp_path):
    records = train_classifier(separable(80), str(tmp_path), holdout=0.25, params=TINY, log=lambda s: None)
    held = records[0]["held_out"]
    assert held["n"] == 20 and held["positives"] == 10
    assert held["auc"] > 0.95 and held["precision"] > 0.8 and held["recall"] > 0.8
    assert (tmp_path / "model.bin").exists() and json.loads((tmp_path / "model.json").read_text())["max_chars"] > 0


def test_shuffled_labels_give_chance_auc(tmp_path):
    """Labels independent of the text: the held-out AUC must sit near 0.5, so the metric can
    fail. Averaged over 4 seeds: over 25 such draws the mean had a spread of 0.03 around 0.5."""
    aucs = []
    for seed in range(4):
        rng = random.Random(100 + seed)
        examples = [Example(f"d{i}", doc(rng, CODE_WORDS + PROSE_WORDS), rng.random() < 0.5) for i in range(300)]
        params = FastTextParams(**{**TINY.__dict__, "seed": seed})
        records = train_classifier(examples, str(tmp_path / str(seed)), holdout=0.3, params=params,
                                   log=lambda s: None)
        aucs.append(records[0]["held_out"]["auc"])
    assert abs(sum(aucs) / len(aucs) - 0.5) < 0.12, aucs


def test_holdout_is_fixed_and_stratified():
    examples = separable(40)
    train_a, held_a = split_holdout(examples, 0.25, seed=3)
    train_b, held_b = split_holdout(list(reversed(examples)), 0.25, seed=3)
    assert {e.id for e in held_a} == {e.id for e in held_b}
    assert sum(e.label for e in held_a) == 5 and len(held_a) == 10 and len(train_a) == 30
    with pytest.raises(ValueError, match="class 1"):
        split_holdout([Example("a", "x", 0), Example("b", "y", 0), Example("c", "z", 1)], 0.5, 0)


def test_hard_negative_rounds_add_judged_negatives(tmp_path):
    """The labelled set has no "trap" documents (code words in a prose context); the pool does.
    Round 1 scores them high, the judge rejects them, rounds 2-3 train on them."""
    rng = random.Random(7)
    labelled = separable(60)
    traps = [Example(f"trap{i}", doc(rng, CODE_WORDS, 20) + " " + doc(rng, PROSE_WORDS, 10)) for i in range(20)]
    code = [Example(f"code{i}", doc(rng, CODE_WORDS)) for i in range(20)]
    overlap = [Example(labelled[0].id, labelled[0].text)]  # a labelled document must not be mined
    truth = LabelsJudge([Example(e.id, e.text, 0) for e in traps] + [Example(e.id, e.text, 1) for e in code])
    asked = []

    def judge(batch):
        asked.extend(e.id for e in batch)
        return truth(batch)

    records = train_classifier(labelled, str(tmp_path), traps + code + overlap, judge, rounds=3,
                               candidates_per_round=15, holdout=0.25, params=TINY, log=lambda s: None)
    rounds = json.loads((tmp_path / "classifier_rounds.json").read_text())
    assert rounds == records and [r["round"] for r in rounds] == [1, 2, 3]
    assert labelled[0].id not in asked and len(asked) == len(set(asked))  # nobody is asked twice
    mined = [r["mining_before_round"] for r in rounds[1:]]
    assert all(m["candidates_judged"] <= 15 for m in mined)
    added = sum(m["judged_negative"] for m in mined)
    assert added > 0 and rounds[-1]["hard_negatives_total"] == added
    assert rounds[-1]["train_negative"] == rounds[0]["train_negative"] + added
    assert rounds[-1]["train_positive"] == rounds[0]["train_positive"]  # judged positives are not added
    assert sum(m["judged_positive"] + m["judged_negative"] for m in mined) == len(asked)
    assert all(r["held_out"]["n"] == rounds[0]["held_out"]["n"] for r in rounds)  # same held-out set


def test_judges():
    code = Example("c", "import os\n\ndef f(x):\n    return x + 1\n\nprint(f(2))\n")
    prose = Example("p", "The river ran past the village.\nIn autumn the harbor was quiet.\n")
    assert CodeLikenessJudge()([code, prose]) == [True, False]
    labels = LabelsJudge([Example("c", "other text", 1), Example("x", prose.text, 0)])
    assert labels([code, prose, Example("?", "unknown")]) == [True, False, None]  # by id, by text, absent

    class StubOracle:
        def rate(self, items):
            assert items[0] == ("Python", code.text)
            return [OracleReply(8.0, "reply", ""), OracleReply(2.0, "reply", ""), OracleReply(None, "failed", "")]

    code.language = "Python"
    assert OracleJudge(StubOracle(), min_rating=6)([code, prose, prose]) == [True, False, None]


def test_filter_step_keeps_drops_counts_and_records_scores(tmp_path):
    train_classifier(separable(80), str(tmp_path), holdout=0.25, params=TINY, log=lambda s: None)
    rng = random.Random(11)
    docs = [Document(doc(rng, CODE_WORDS), f"code{i}") for i in range(6)] + \
           [Document(doc(rng, PROSE_WORDS), f"prose{i}") for i in range(4)]
    step = ClassifierFilter(str(tmp_path), threshold=0.5, batch_size=4)
    kept = list(step.run(iter(docs)))
    assert sorted(d.id for d in kept) == [f"code{i}" for i in range(6)]
    assert all(0.0 <= d.metadata["classifier_score"] <= 1.0 for d in docs)
    assert all(d.metadata["classifier_score"] >= 0.5 for d in kept)
    stats = {k: v["total"] if isinstance(v, dict) else v for k, v in step.stats.to_dict()["stats"].items()}
    assert (stats["total"], stats["forwarded"], stats["dropped"]) == (10, 6, 4)
    assert stats["dropped_low_classifier_score"] == 4
    model, config = load_classifier(str(tmp_path / "model.bin"))
    assert config["max_chars"] == TINY.max_chars and "__label__pos" in model.labels


def test_bad_input_names_the_file_and_record(tmp_path):
    missing_label = write_jsonl(tmp_path / "a.jsonl", [{"text": "x", "label": 1}, {"id": "r2", "text": "y"}])
    with pytest.raises(ValueError, match=r"a\.jsonl:2 \(id r2\): no 'label' field"):
        read_examples(missing_label)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=r"empty\.jsonl: no records"):
        read_examples(str(tmp_path / "empty.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"text": "x", "label": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not a JSON record"):
        read_examples(str(tmp_path / "bad.jsonl"))
    weird = write_jsonl(tmp_path / "w.jsonl", [{"text": "x", "label": "maybe"}])
    with pytest.raises(ValueError, match=r"w\.jsonl:1 .*'maybe' is not a label"):
        read_examples(weird)
    no_score = write_jsonl(tmp_path / "s.jsonl", [{"text": "x", "rating": None}])
    with pytest.raises(ValueError, match=r"s\.jsonl:1 .*no numeric 'rating'"):
        read_examples(no_score, score_field="rating", threshold=5)
    with pytest.raises(FileNotFoundError, match="nowhere.bin"):
        ClassifierFilter(str(tmp_path / "nowhere.bin"))
    with pytest.raises(FileNotFoundError, match="nowhere.bin"):
        load_classifier(str(tmp_path / "nowhere.bin"))
    with pytest.raises(ValueError, match="needs an unlabelled pool"):
        train_classifier(separable(20), str(tmp_path / "m"), rounds=2, params=TINY, log=lambda s: None)


def test_cli_trains_from_scores_and_curate_flags(tmp_path):
    """The train subcommand with oracle-style ratings thresholded into labels; the curation's
    --quality-classifier flags parse and a missing model stops it before any stage runs."""
    from datatrove_pipelines import curate

    rows = [{"id": e.id, "text": e.text, "rating": 8 if e.label else 2} for e in separable(40)]
    labelled = write_jsonl(tmp_path / "labels.jsonl", rows)
    out = tmp_path / "model"
    assert main(["train", "--labelled", labelled, "--score-field", "rating", "--threshold", "6", "--output", str(out),
                 "--dim", "8", "--bucket", "4096", "--epoch", "20", "--lr", "0.2"]) == 0
    rounds = json.loads((out / "classifier_rounds.json").read_text())
    assert len(rounds) == 1 and rounds[0]["held_out"]["positives"] == 4
    args = curate.build_parser().parse_args(["--input", "x", "--output", "y", "--quality-classifier", str(out),
                                             "--quality-threshold", "0.7"])
    assert (args.quality_classifier, args.quality_threshold) == (str(out), 0.7)
    assert curate.build_parser().parse_args(["--input", "x", "--output", "y"]).quality_classifier is None
    with pytest.raises(SystemExit, match="no fastText model"):
        curate.main(["--input", "x", "--output", str(tmp_path / "y"), "--quality-classifier",
                     str(tmp_path / "nowhere")])


def test_diverged_training_is_retried_at_a_lower_rate(monkeypatch):
    import fasttext

    real, rates = fasttext.train_supervised, []

    def diverge_once(**kwargs):
        rates.append(kwargs["lr"])
        if len(rates) == 1:
            raise RuntimeError("Encountered NaN.")
        return real(**kwargs)

    monkeypatch.setattr(fasttext, "train_supervised", diverge_once)
    messages = []
    model, lr = train_model(separable(20), TINY, log=messages.append)
    assert rates == [TINY.lr, TINY.lr / 2] and lr == TINY.lr / 2 and "NaN" in messages[0]
    assert "__label__pos" in model.labels


def test_training_is_reproducible_in_a_used_process():
    """This fastText build leaves most of its input matrix uninitialized with one thread; without
    zero-filled allocations, reused memory made identical trainings differ (or hit NaN)."""
    import os

    import numpy as np

    from datatrove_pipelines.classifiers import positive_probability

    examples, texts = separable(40), [e.text for e in separable(10, seed=5)]
    scores = []
    for _ in range(3):
        junk = [os.urandom(200_000) for _ in range(4)]  # leave freed, non-zero memory behind
        del junk
        model, _ = train_model(examples, TINY, retries=0)
        scores.append(positive_probability(model, texts))
    assert np.array_equal(scores[0], scores[1]) and np.array_equal(scores[0], scores[2])


def test_local_pool_labels_by_origin_and_dedups(tmp_path):
    import gzip

    from datatrove_pipelines.classifier_pool import build_local_pool

    def put(path, text):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(gzip.compress(text.encode()) if path.suffix == ".gz" else text.encode())

    body = "x" * 300
    put(tmp_path / "lib/os.py", "import sys\n" + body)
    put(tmp_path / "lib/site-packages/pkg/README.md", "# pkg\n" + body)
    put(tmp_path / "lib/site-packages/pkg-1.0.dist-info/METADATA", "Name: pkg\n\nUsage " + body)
    put(tmp_path / "lib/site-packages/pkg-1.0.dist-info/LICENSE", "MIT " + body)
    put(tmp_path / "doc/libfoo/copyright", "MIT " + body)  # the same text as the LICENSE: kept once
    put(tmp_path / "doc/libfoo/changelog.Debian.gz", "libfoo (1.0) " + body)
    put(tmp_path / "doc/libfoo/README", "libfoo " + body)
    put(tmp_path / "doc/python3-bar/README.md", "bar " + body)
    put(tmp_path / "doc/libfoo/tiny.txt", "short")
    summary = build_local_pool(str(tmp_path / "out"), labelled_fraction=0.5, stdlib=str(tmp_path / "lib"),
                               purelib=str(tmp_path / "lib/site-packages"), system_doc=str(tmp_path / "doc"))
    assert summary["sources"] == {"stdlib_code": 1, "python_package_docs": 3, "python_package_legal": 1,
                                  "system_doc_changelog": 1, "system_doc_prose": 1, "system_doc_legal": 0}
    assert summary["skipped"] == {"duplicate_text": 1, "unreadable_or_size": 1}
    labelled = read_examples(str(tmp_path / "out/labelled.jsonl"))
    pool = read_examples(str(tmp_path / "out/pool.jsonl"), label_field=None)
    hidden = read_examples(str(tmp_path / "out/pool_labels.jsonl"))
    assert len(labelled) + len(pool) == 7 and {e.id for e in pool} == {e.id for e in hidden}
    assert sum(e.label for e in labelled + hidden) == 4
    metadata = next(e for e in labelled + hidden if e.id.endswith("METADATA"))
    assert metadata.text.startswith("Usage")  # the README, without the headers
