"""The curation pipeline end to end (datatrove local executor, 2 tasks), the scorer, the oracles."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from curation_fixtures import GOOD, make_corpus, make_tiny_chat_model
from helpers import run_cli


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_chat_model(tmp_path_factory.mktemp("tiny_chat"), GOOD)


def curate(corpus: Path, out: Path, model: Path) -> subprocess.CompletedProcess:
    return run_cli([sys.executable, "-m", "datatrove_pipelines.curate", "--input", str(corpus), "--output",
                           str(out), "--tasks", "2", "--workers", "2", "--oracle", str(model), "--oracle-sample", "20",
                           "--scorer-base", str(model), "--max-tokens", "128", "--vocab-size", "400", "--parquet"], timeout=600)


def test_pipeline_end_to_end_reconciles_and_resumes(tmp_path, tiny_model):
    corpus = tmp_path / "corpus"
    n_files = make_corpus(corpus)["files"]
    proc = curate(corpus, tmp_path / "out", tiny_model)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = tmp_path / "out"
    stats = json.loads((out / "stats.json").read_text())
    assert stats["documents_in"] == n_files and stats["reconciles"]
    assert stats["documents_in"] == stats["kept"] + sum(stats["dropped"].values())
    dropped = stats["dropped"]
    assert dropped["read/skipped_unknown_language"] == 2  # the PNGs
    assert dropped["filter/dropped_contaminated"] == 2  # HumanEval/0's solution, in repo_a and its fork
    assert dropped["filter/dropped_near_match"] == 1  # repo_b/renamed.py: the same solution, renamed
    # contamination.jsonl: one row per decontaminated file, which benchmark item, exact or near.
    rows = [json.loads(line) for line in (out / "contamination.jsonl").read_text().splitlines()]
    assert sorted((r["id"], r["path"], r["benchmark"], r["item"], r["kind"]) for r in rows) == [
        ("repo_a/solution.py", "solution.py", "humaneval", "HumanEval/0", "exact"),
        ("repo_b/renamed.py", "renamed.py", "humaneval", "HumanEval/0", "near"),
        ("repo_fork/solution.py", "solution.py", "humaneval", "HumanEval/0", "exact")]
    assert len(rows) == dropped["filter/dropped_contaminated"] + dropped["filter/dropped_near_match"]
    assert dropped["filter/dropped_syntax_error"] == 2 and dropped["filter/dropped_auto_generated"] == 2
    assert dropped["filter/dropped_data_dominated"] == 2
    assert dropped["exact_filter/dropped_duplicate_repo"] == 6 and dropped["exact_filter/dropped_duplicate_file"] == 1
    assert dropped["near_filter/dropped_near_duplicate"] == 1
    # repo_merged is no file's near copy, but as a repository it nearly copies repo_a: one goes.
    assert dropped["near_repo_apply/dropped_near_duplicate_repo"] == 1
    assert dropped["select/dropped_low_quality"] >= 1
    kept = []
    for path in sorted((out / "kept").glob("*.jsonl.gz")):
        with gzip.open(path, "rt") as f:
            kept += [json.loads(line) for line in f]
    ids = {d["id"] for d in kept}
    assert len(kept) == stats["kept"] > 0
    assert not any(i.startswith("repo_fork/") for i in ids)
    assert "repo_merged/everything.py" not in ids and any(i.startswith("repo_a/") for i in ids)
    assert not ids & {"repo_a/broken.py", "repo_a/migrations.py", "repo_a/table.py", "repo_a/solution.py",
                      "repo_b/copy.py", "repo_b/near.py"}
    assert all(0 <= d["metadata"]["quality_score"] <= 10 for d in kept)
    import pyarrow.parquet as pq

    parquet_ids = {i for path in (out / "kept_parquet").glob("*.parquet") for i in pq.read_table(path)["id"].to_pylist()}
    assert parquet_ids == ids
    labels = [json.loads(line) for line in (out / "labels.jsonl").read_text().splitlines()]
    assert len(labels) >= 4 and all(0 <= r["rating"] <= 10 for r in labels)
    assert json.loads((out / "scorer" / "scorer_metrics.json").read_text())["held_out"] >= 1
    assert (out / "score_histogram.png").stat().st_size > 1000
    # The label audit: the held-out labels (none trained on) against the scorer, beside stats.json.
    split = json.loads((out / "scorer" / "label_split.json").read_text())
    assert not set(split["train_ids"]) & set(split["held_out_ids"])
    assert sorted(split["train_ids"] + split["held_out_ids"]) == sorted(r["id"] for r in labels)
    audit = json.loads((out / "label_audit.json").read_text())
    assert audit["held_out"]["count"] == len(split["held_out_ids"]) == stats["audit"]["count"] >= 1
    assert stats["audit"]["mae"] == audit["held_out"]["mae"] is not None
    assert (audit["held_out"]["spearman"] is None) == (audit["held_out"]["reason"] is not None)
    scored = sum(v for k, v in stats["stages"]["score"].items() if k.endswith("::scored"))
    assert audit["scores"]["files"] == scored == sum(sum(h["counts"]) for h in audit["scores"]["by_language"].values())
    assert (out / "score_histograms_by_language.png").stat().st_size > 1000
    assert "label audit on" in proc.stderr
    repo_docs = []
    for path in sorted((out / "repo_level").glob("*.jsonl.gz")):
        with gzip.open(path, "rt") as f:
            repo_docs += [json.loads(line) for line in f]
    by_repo = {d["metadata"]["repo"]: d for d in repo_docs}
    kept_a = sorted(i.split("/", 1)[1] for i in ids if i.startswith("repo_a/"))
    assert sorted(f["path"] for f in by_repo["repo_a"]["metadata"]["files"]) == kept_a
    assert all(f"# {p}\n" in by_repo["repo_a"]["text"] for p in kept_a)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    assert len(IndexedDataset(str(out / "tokens" / "code_text_document"))) == len(kept)
    # A rerun skips every completed task: the outputs are left as they are.
    before = {p: p.stat().st_mtime for p in (out / "kept").glob("*.jsonl.gz")}
    again = curate(corpus, out, tiny_model)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime for p in (out / "kept").glob("*.jsonl.gz")} == before
    assert again.stderr.count("all tasks") + again.stderr.lower().count("not doing anything") >= len(
        [line for line in again.stderr.splitlines() if line.startswith("[curate] stage ") and "task(s)" in line])


def test_scorer_learns_labels_better_than_the_mean(tmp_path, tiny_model):
    import random

    from datatrove_pipelines.scorer import score_texts, train_scorer

    rng = random.Random(0)
    rows = []
    for i in range(60):
        if i % 2:
            text, rating = f"def f{i}(x):\n    \"\"\"Return x plus {i}.\"\"\"\n    return x + {i}\n", 8 + rng.random()
        else:
            text, rating = "DATA = [" + ", ".join(str(rng.randint(0, 999)) for _ in range(30)) + "]\n", 1 + rng.random()
        rows.append({"text": text, "rating": rating})
    (tmp_path / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = train_scorer(str(tmp_path / "labels.jsonl"), str(tiny_model), str(tmp_path / "scorer"), epochs=3,
                           lr=1e-3, batch_size=8, max_tokens=128)
    assert metrics["held_out_mae"] < 0.5 * metrics["mean_predictor_mae"]
    good, bad = score_texts(str(tmp_path / "scorer"), [rows[1]["text"], rows[0]["text"]])
    assert good > bad


class _FakeChatServer(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint double: answers in the styles real oracles use."""

    replies = ["The code is clean.\nRating: [[8]]", "I cannot rate this.", "Rating: 6/10"]
    seen: list = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append(body)
        reply = self.replies[(len(self.seen) - 1) % len(self.replies)]
        payload = json.dumps({"choices": [{"message": {"content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def test_endpoint_oracle_labeler_counts_unparsable_replies(tmp_path):
    from datatrove.data import Document

    from datatrove_pipelines.oracle import OracleLabeler

    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeChatServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        docs = [Document(text=t, id=f"d{i}", metadata={"language": "Python"}) for i, t in enumerate(GOOD[:3])]
        step = OracleLabeler(str(tmp_path / "labels.jsonl"), f"http://127.0.0.1:{server.server_address[1]}",
                             sample_size=3, model="judge")
        passed = list(step.run(iter(docs)))
    finally:
        server.shutdown()
    assert [d.id for d in passed] == ["d0", "d1", "d2"]  # labelling never drops documents
    rows = [json.loads(line) for line in (tmp_path / "labels.jsonl").read_text().splitlines()]
    assert [r["rating"] for r in rows] == [8.0, 6.0]
    stats = {k: v for k, v in step.stats.to_dict()["stats"].items()}
    assert stats["oracle_rated"] == 3 and stats["oracle_parse_failed"] == 1
    request = _FakeChatServer.seen[0]
    assert request["model"] == "judge" and request["temperature"] == 0.0
    assert "Python code to be assessed: " + GOOD[0] in request["messages"][0]["content"]


def test_repo_level_documents_follow_python_imports():
    from datatrove.data import Document

    from datatrove_pipelines.repo_level import RepoLevelDocuments, dependency_order

    files = [("pkg/app.py", "from pkg.models import User\nfrom .utils import helper\n"),
             ("pkg/models.py", "from . import utils\nclass User:\n    pass\n"),
             ("pkg/utils.py", "def helper():\n    pass\n"),
             ("pkg/__init__.py", "from .app import *\n"),
             ("main.py", "import pkg.app\n"),
             ("a.py", "import b\n"), ("b.py", "import a\n")]  # a cycle, broken by path order
    order = [files[i][0] for i in dependency_order(files)]
    for before, after in [("pkg/utils.py", "pkg/models.py"), ("pkg/models.py", "pkg/app.py"),
                          ("pkg/app.py", "pkg/__init__.py"), ("pkg/app.py", "main.py")]:
        assert order.index(before) < order.index(after), (before, after, order)
    assert sorted(order) == sorted(p for p, _ in files)
    docs = [Document(text=t, id=p, metadata={"repo": "r", "path": p, "language": "Python"}) for p, t in files]
    docs += [Document(text=f"int f{i}(void) {{ return {i}; }}\n", id=f"c{i}.c",
                      metadata={"repo": "r", "path": f"c{i}.c", "language": "C"}) for i in range(4)]
    (repo,) = RepoLevelDocuments(seed=1).run(iter(docs))
    paths = [f["path"] for f in repo.metadata["files"]]
    assert paths[:len(files)] == order and sorted(paths[len(files):]) == [f"c{i}.c" for i in range(4)]
    assert repo.text.index("# pkg/utils.py") < repo.text.index("# pkg/app.py")
