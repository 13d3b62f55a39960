"""The label audit: rank and linear correlation, the scorer's held-out split, label_audit.json."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from curation_fixtures import GOOD, make_tiny_chat_model
from datatrove_pipelines.label_audit import agreement, average_ranks, pearson, spearman, write_label_audit
from datatrove_pipelines.scorer import HELD_OUT_FILE, SPLIT_FILE, split_labels, train_scorer


def test_spearman_perfect_reversed_ties_and_against_scipy():
    from scipy import stats

    x = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert spearman(x, [v ** 3 for v in x]) == pytest.approx(1.0)  # any increasing map ranks alike
    assert spearman(x, [-v for v in x]) == pytest.approx(-1.0)
    assert average_ranks([5, 1, 5, 3, 5]).tolist() == [4.0, 1.0, 4.0, 2.0, 4.0]
    # Ties: average ranks, so tied ratings on one side still correlate perfectly with the other.
    assert spearman([1, 1, 2, 2], [0.1, 0.1, 0.9, 0.9]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [5, 5, 5, 5]) is None and pearson([1, 2], [3, 3]) is None
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(3, 40))
        a = rng.integers(0, 6, n).astype(float)  # few distinct values: many ties
        b = a + rng.normal(0, 2, n).round(0)
        if np.ptp(a) == 0 or np.ptp(b) == 0:
            continue
        assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)
        assert pearson(a, b) == pytest.approx(stats.pearsonr(a, b).statistic, abs=1e-12)


def test_agreement_says_why_a_correlation_is_missing():
    assert agreement([], []) | {"reason": None} == {"count": 0, "mae": None, "spearman": None, "pearson": None,
                                                    "reason": None}
    two = agreement([2.0, 8.0], [3.0, 7.0])
    assert two["count"] == 2 and two["mae"] == 1.0 and two["spearman"] is None and "at least 3" in two["reason"]
    assert "all equal" in agreement([5, 5, 5], [1, 2, 3])["reason"]
    assert "same score" in agreement([1, 2, 3], [4, 4, 4])["reason"]
    good = agreement([1, 2, 3, 9], [2, 2.5, 3, 7])
    assert good["spearman"] == pytest.approx(1.0) and good["reason"] is None and good["mae"] == 0.875


def test_split_is_seeded_disjoint_and_never_empty():
    rows = [{"id": f"f{i}", "rating": i % 10} for i in range(50)]
    train, held = split_labels(rows, 0.2, random.Random(7))
    assert len(held) == 10 and len(train) == 40
    assert not {r["id"] for r in train} & {r["id"] for r in held}
    assert sorted(r["id"] for r in train + held) == sorted(r["id"] for r in rows)
    assert [r["id"] for r in held] == [r["id"] for r in split_labels(rows, 0.2, random.Random(7))[1]]
    assert len(split_labels(rows[:4], 0.2, random.Random(0))[1]) == 1  # a tiny run still holds one out
    assert len(split_labels(rows[:4], 0.99, random.Random(0))[0]) == 1  # and still trains on one


def test_scorer_never_trains_on_held_out_labels(tmp_path):
    model = make_tiny_chat_model(tmp_path / "tiny", GOOD)
    rows = [{"id": f"repo/f{i}.py", "language": "Python", "rating": float(i % 10), "text": GOOD[i % len(GOOD)]}
            for i in range(12)]
    (tmp_path / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = train_scorer(str(tmp_path / "labels.jsonl"), str(model), str(tmp_path / "scorer"), epochs=2,
                           batch_size=4, max_tokens=64, holdout=0.25, seed=3, log=lambda s: None)
    expected_held = [r["id"] for r in split_labels(rows, 0.25, random.Random(3))[1]]
    split = json.loads((tmp_path / "scorer" / SPLIT_FILE).read_text())
    assert split["held_out_ids"] == expected_held and len(expected_held) == metrics["held_out"] == 3
    # train_ids are the ids of the batches the loop actually fed the model.
    assert sorted(split["train_ids"]) == sorted(set(r["id"] for r in rows) - set(expected_held))
    predictions = [json.loads(line) for line in (tmp_path / "scorer" / HELD_OUT_FILE).read_text().splitlines()]
    assert [p["id"] for p in predictions] == expected_held
    assert all(0 <= p["predicted"] <= 10 and p["language"] == "Python" for p in predictions)
    mae = np.mean([abs(p["rating"] - p["predicted"]) for p in predictions])
    assert mae == pytest.approx(metrics["held_out_mae"], abs=1e-4)


def _scored_output(out, held_out_rows):
    """A curation output after the score stage: per-task score files and a trained scorer's files."""
    (out / "scores").mkdir(parents=True)
    (out / "scores" / "00000.json").write_text(json.dumps({"Python": [0.0, 2.4, 9.9, 10.0], "C": [5.0]}))
    (out / "scores" / "00001.json").write_text(json.dumps({"Python": [4.2, 4.3], "Rust": [7.7, 1.1]}))
    (out / "scorer").mkdir()
    (out / "scorer" / HELD_OUT_FILE).write_text("".join(json.dumps(r) + "\n" for r in held_out_rows))
    (out / "scorer" / "scorer_metrics.json").write_text(json.dumps({"mean_predictor_mae": 2.5}))


def test_label_audit_json_beside_stats_json(tmp_path):
    from datatrove_pipelines.curate import build_parser, write_stats

    out = tmp_path / "out"
    rows = [{"id": f"r/{i}.py", "language": "Python" if i % 2 else "C", "rating": r, "predicted": p}
            for i, (r, p) in enumerate([(2, 2.5), (4, 3.5), (6, 6.5), (8, 8.5)])]
    _scored_output(out, rows)
    write_stats(str(out), build_parser().parse_args(["--input", "x", "--output", str(out)]))
    stats = json.loads((out / "stats.json").read_text())
    audit = json.loads((out / "label_audit.json").read_text())
    assert stats["audit"] == {"count": 4, "mae": 0.5, "mean_predictor_mae": 2.5, "spearman": 1.0,
                              "pearson": pytest.approx(pearson([2, 4, 6, 8], [2.5, 3.5, 6.5, 8.5])), "reason": None,
                              "scored_files": 9}
    assert audit["held_out"]["by_language"] == {"C": {"count": 2, "mae": 0.5}, "Python": {"count": 2, "mae": 0.5}}
    scores = audit["scores"]
    assert list(scores["by_language"]) == ["Python", "Rust", "C"]  # largest first
    assert sum(sum(h["counts"]) for h in scores["by_language"].values()) == scores["files"] == 9
    python = scores["by_language"]["Python"]
    assert python["files"] == 6 and python["counts"][0] == 1 and python["counts"][-1] == 2  # 9.9 and 10.0
    assert python["counts"][8] == 2  # 4.2 and 4.3 in [4.0, 4.5)
    assert len(scores["bin_edges"]) == len(python["counts"]) + 1
    assert (out / "score_histograms_by_language.png").stat().st_size > 1000


def test_label_audit_without_enough_held_out_labels_does_not_fail(tmp_path):
    out = tmp_path / "out"
    _scored_output(out, [{"id": "a", "language": "C", "rating": 3, "predicted": 4.0}])
    audit = write_label_audit(str(out), str(out / "scorer"), 0.1)
    assert audit["held_out"]["count"] == 1 and audit["held_out"]["mae"] == 1.0
    assert audit["held_out"]["spearman"] is None and "at least 3" in audit["held_out"]["reason"]
    given = write_label_audit(str(out), str(tmp_path / "a_given_scorer"), 0.1)  # --scorer: no held-out labels
    assert given["held_out"]["count"] == 0 and "--scorer" in given["held_out"]["reason"]
    assert json.loads((out / "label_audit.json").read_text())["held_out"]["reason"] == given["held_out"]["reason"]
