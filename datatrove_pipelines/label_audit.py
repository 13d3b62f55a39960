"""Label audit: how far the trained scorer agrees with the oracle, and what it did to each language.

Agreement is measured on the oracle labels the scorer never trained on (the held-out split of
``scorer.train_scorer``, kept in the scorer's directory with the scorer's scores of them): MAE on
the 0-10 scale, Spearman rank correlation (average ranks for ties) and Pearson correlation. The
cut keeps or drops files by rank within a language, so Spearman is the number that says whether
the scorer orders files as the oracle would; MAE alone can look fine for a scorer that predicts
the mean everywhere (``mean_predictor_mae`` is given for comparison).

Per-language histograms of the scorer's scores over every scored file (fixed 0-10 bins, counts)
show where each language's cut fell. ``write_label_audit`` writes ``label_audit.json`` and
``score_histograms_by_language.png`` (when matplotlib is installed) into the curation's output
and returns the headline numbers that ``stats.json`` carries under ``audit``.
"""

from __future__ import annotations

import glob
import json
import math
import os
from typing import Optional, Sequence

import numpy as np

from megatron_seed.data.jsonl import read_jsonl

AUDIT_FILE = "label_audit.json"
PLOT_FILE = "score_histograms_by_language.png"
MIN_FOR_CORRELATION = 3  # two points are always perfectly (anti-)correlated
BINS = 20  # 0.5-wide bins over the 0-10 scale
MAX_PANELS = 12  # languages drawn; every language is in the JSON


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """1-based ranks; tied values share the mean of the ranks they span ([5, 1, 5] -> [2.5, 1, 2.5])."""
    values = np.asarray(values, dtype=float)
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    lo = 0
    while lo < len(order):
        hi = lo
        while hi + 1 < len(order) and values[order[hi + 1]] == values[order[lo]]:
            hi += 1
        ranks[order[lo:hi + 1]] = (lo + hi) / 2 + 1
        lo = hi + 1
    return ranks


def pearson(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
    """Pearson correlation; None where it is undefined (under 2 points, or a constant side)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) != len(y):
        raise ValueError(f"pearson: {len(x)} values against {len(y)}")
    if len(x) < 2:
        return None
    dx, dy = x - x.mean(), y - y.mean()
    norm = math.sqrt(float((dx * dx).sum()) * float((dy * dy).sum()))
    if norm == 0.0:
        return None
    return max(-1.0, min(1.0, float((dx * dy).sum()) / norm))


def spearman(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
    """Spearman rank correlation: Pearson of the average ranks (the tie-correct form)."""
    return pearson(average_ranks(x), average_ranks(y))


def agreement(truth: Sequence[float], predicted: Sequence[float]) -> dict:
    """count, MAE, Spearman and Pearson of ``predicted`` against ``truth``; an undefined number is
    None with the reason in ``reason``."""
    truth, predicted = np.asarray(truth, dtype=float), np.asarray(predicted, dtype=float)
    mae = round(float(np.abs(truth - predicted).mean()), 4) if len(truth) else None
    result = {"count": int(len(truth)), "mae": mae, "spearman": None, "pearson": None, "reason": None}
    if len(truth) < MIN_FOR_CORRELATION:
        result["reason"] = (f"{len(truth)} held-out label(s): correlation needs at least {MIN_FOR_CORRELATION} "
                            "(label more files with --oracle-sample, or hold out more with --audit-fraction)")
    elif np.ptp(truth) == 0:
        result["reason"] = "the held-out oracle ratings are all equal: no ranking to agree with"
    elif np.ptp(predicted) == 0:
        result["reason"] = "the scorer gave every held-out file the same score"
    else:
        result["spearman"], result["pearson"] = spearman(truth, predicted), pearson(truth, predicted)
    return result


def read_scores(scores_folder: str) -> dict[str, list[float]]:
    """{language: scores} over every task file ``QualityScorer`` wrote, in task order."""
    merged: dict[str, list[float]] = {}
    for path in sorted(glob.glob(os.path.join(scores_folder, "*.json"))):
        with open(path) as f:
            for language, values in json.load(f).items():
                merged.setdefault(language, []).extend(values)
    return merged


def language_histograms(per_language: dict[str, list[float]], drop_fraction: float, bins: int = BINS) -> dict:
    """Counts of scores per 0-10 bin per language (the last bin includes 10), with each
    language's mean and cut (the score below which the select stage drops its files)."""
    from datatrove_pipelines.scorer import thresholds_of

    edges = np.linspace(0.0, 10.0, bins + 1)
    cut = thresholds_of(per_language, drop_fraction) if per_language else {}
    by_language = {}
    for language in sorted(per_language, key=lambda k: (-len(per_language[k]), k)):
        values = np.clip(np.asarray(per_language[language], dtype=float), 0.0, 10.0)
        by_language[language] = {"files": int(len(values)),
                                  "mean": round(float(values.mean()), 4) if len(values) else None,
                                  "cut": round(cut.get(language, cut.get("*", 0.0)), 4),
                                  "counts": np.histogram(values, bins=edges)[0].astype(int).tolist()}
    return {"files": sum(h["files"] for h in by_language.values()), "bin_edges": [round(float(e), 4) for e in edges],
            "by_language": by_language}


def held_out_agreement(scorer_dir: Optional[str]) -> dict:
    """The oracle-vs-scorer agreement on the labels held out of the scorer's training, overall
    and per language (count and MAE: correlations of a few files per language say little)."""
    from datatrove_pipelines.scorer import HELD_OUT_FILE

    path = os.path.join(scorer_dir, HELD_OUT_FILE) if scorer_dir else None
    if path is None or not os.path.exists(path):
        result = agreement([], [])
        result["reason"] = (f"no {HELD_OUT_FILE} in the scorer's directory: the scorer was not trained by this "
                            "curation (--scorer), so there are no oracle labels it did not see")
        return result | {"labels": None, "by_language": {}}
    rows = read_jsonl(path)
    result = agreement([r["rating"] for r in rows], [r["predicted"] for r in rows])
    by_language: dict[str, list] = {}
    for r in rows:
        by_language.setdefault(r.get("language") or "unknown", []).append(r)
    result["by_language"] = {language: {"count": len(group), "mae": round(float(np.mean(
        [abs(r["rating"] - r["predicted"]) for r in group])), 4)} for language, group in sorted(by_language.items())}
    metrics_path = os.path.join(scorer_dir, "scorer_metrics.json")
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            result["mean_predictor_mae"] = json.load(f).get("mean_predictor_mae")
    return result | {"labels": path}


def headline(audit: dict) -> dict:
    """The numbers stats.json carries under ``audit``."""
    held = audit["held_out"]
    return {k: held.get(k) for k in ("count", "mae", "mean_predictor_mae", "spearman", "pearson", "reason")} | {
        "scored_files": audit["scores"]["files"]}


def describe(numbers: dict) -> str:
    """One line for the curate log."""
    def num(v):
        return "n/a" if v is None else f"{v:.3f}"

    line = (f"label audit on {numbers['count']} held-out label(s): MAE {num(numbers['mae'])}, "
            f"Spearman {num(numbers['spearman'])}, Pearson {num(numbers['pearson'])}")
    return line + (f" [{numbers['reason']}]" if numbers.get("reason") else "")


def write_label_audit(out: str, scorer_dir: Optional[str], drop_fraction: float) -> dict:
    """label_audit.json (and the per-language PNG) in ``out``; returns the audit."""
    audit = {"held_out": held_out_agreement(scorer_dir),
             "scores": language_histograms(read_scores(os.path.join(out, "scores")), drop_fraction)}
    path = os.path.join(out, AUDIT_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(audit, f, indent=2)
    os.replace(path + ".tmp", path)
    audit["plot"] = plot_histograms(audit["scores"], os.path.join(out, PLOT_FILE))
    return audit


def pyplot(what: str):
    """matplotlib's pyplot on the file-only backend, or None (with a note) where it is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        import sys

        print(f"[curate] matplotlib is not installed: no {what} (pip install matplotlib)", file=sys.stderr,
              flush=True)
        return None
    return plt


def plot_histograms(histograms: dict, path: str) -> Optional[str]:
    """One panel per language (the largest ``MAX_PANELS``): its score counts and its cut."""
    languages = list(histograms["by_language"].items())[:MAX_PANELS]
    if not languages:
        return None
    plt = pyplot(os.path.basename(path))
    if plt is None:
        return None
    edges = np.asarray(histograms["bin_edges"])
    cols = min(3, len(languages))
    rows = math.ceil(len(languages) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for i, (ax, (language, h)) in enumerate(zip(axes.flat, languages)):
        ax.bar(edges[:-1], h["counts"], width=np.diff(edges), align="edge", color="#4472c4")
        ax.axvline(h["cut"], color="#c00000", linestyle="--")
        ax.set_xlim(0, 10)
        ax.set_title(f"{language} ({h['files']} files)", fontsize=9)
        if i + cols >= len(languages):  # no panel below this one
            ax.set_xlabel("quality score (0-10)")
    for ax in list(axes.flat)[len(languages):]:
        ax.set_visible(False)
    shown = len(languages)
    total = len(histograms["by_language"])
    fig.suptitle("scores per language; dashed: the cut" + (f" ({shown} of {total} languages)" if total > shown
                                                            else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
