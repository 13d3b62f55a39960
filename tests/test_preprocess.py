"""tools/preprocess_data.py and tools/merge_datasets.py: megatron-core compatibility, workers,
partitions, input formats, bad records, fill-in-the-middle."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import numpy as np
import pytest

from megatron_seed.data import fim, stdlib_corpus, tokenizer_training
from megatron_seed.data.indexed import IndexedReader, IndexedWriter
from megatron_seed.data.tokenizer import load_tokenizer

from helpers import ROOT, run_cli, subprocess_env


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    stdlib_corpus.write_jsonl(str(root / "code.jsonl"), limit=80)
    records = [json.loads(line) for line in (root / "code.jsonl").read_text().splitlines()]
    tokenizer_training.train_bpe((r["text"] for r in records), 1500, str(root / "tok"))
    return root, [r for r in records if r["text"].strip()]


def preprocess(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = run_cli([sys.executable, "tools/preprocess_data.py", "--log-interval", "0", *args], timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_output_is_read_by_megatron_core_as_the_tokenizers_ids(corpus, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    root, records = corpus
    preprocess("--input", str(root / "code.jsonl"), "--output-prefix", str(tmp_path / "out"),
               "--json-keys", "text", "path", "--tokenizer-type", "HuggingFaceTokenizer",
               "--tokenizer-model", str(root / "tok"), "--append-eod", "--workers", "2")
    tok = load_tokenizer(str(root / "tok"), engine="hf")  # the reference implementation
    for key in ("text", "path"):
        ds = IndexedDataset(str(tmp_path / f"out_{key}_document"))
        assert ds.index.dtype == np.uint16
        assert len(ds) == len(records)
        for i, record in enumerate(records):
            assert ds[i].tolist() == tok.encode(record[key]) + [tok.eod]
    summary = json.loads((tmp_path / "out_summary.json").read_text())
    assert summary["records_in"] == summary["written"] + sum(summary["skipped"].values())
    assert summary["written"] == len(records)


def test_megatron_builder_output_is_read_by_us_and_int32_for_large_vocabularies(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    docs = [np.arange(n, dtype=np.int64) * 977 % 150_000 for n in (5, 1, 300, 17)]
    builder = IndexedDatasetBuilder(str(tmp_path / "mc.bin"), dtype=np.int32)
    for d in docs:
        builder.add_document(d, [len(d)])
    builder.finalize(str(tmp_path / "mc.idx"))
    ours = IndexedReader(str(tmp_path / "mc"))
    assert [ours[i].tolist() for i in range(len(ours))] == [d.tolist() for d in docs]

    writer = IndexedWriter(str(tmp_path / "ours"), np.int32)
    writer.add_documents(np.concatenate(docs), np.array([len(d) for d in docs]))
    writer.finalize()
    assert (tmp_path / "ours.idx").read_bytes() == (tmp_path / "mc.idx").read_bytes()
    assert (tmp_path / "ours.bin").read_bytes() == (tmp_path / "mc.bin").read_bytes()
    mc = IndexedDataset(str(tmp_path / "ours"))
    assert mc.index.dtype == np.int32 and mc[2].tolist() == docs[2].tolist()


def test_one_and_two_workers_and_two_partitions_write_identical_files(corpus, tmp_path):
    root, _ = corpus
    common = ["--input", str(root / "code.jsonl"), "--tokenizer-model", str(root / "tok"), "--append-eod",
              "--fim-rate", "0.5", "--chunk-records", "7"]
    preprocess(*common, "--output-prefix", str(tmp_path / "w1"), "--workers", "1")
    preprocess(*common, "--output-prefix", str(tmp_path / "w2"), "--workers", "2")
    # Two partitions need two input files: split the corpus.
    lines = (root / "code.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "a.jsonl").write_text("".join(lines[:40]))
    (tmp_path / "b.jsonl").write_text("".join(lines[40:]))
    split = ["--input", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), *common[2:]]
    preprocess(*split, "--output-prefix", str(tmp_path / "p2"), "--partitions", "2", "--keep-partitions")
    for ext in (".bin", ".idx"):
        reference = (tmp_path / f"w1_text_document{ext}").read_bytes()
        assert (tmp_path / f"w2_text_document{ext}").read_bytes() == reference
        assert (tmp_path / f"p2_text_document{ext}").read_bytes() == reference
    # Re-running reuses finished partitions (resumable), and still gives the same output.
    proc = preprocess(*split, "--output-prefix", str(tmp_path / "p2"), "--partitions", "2")
    assert proc.stderr.count("already done") == 2
    assert (tmp_path / "p2_text_document.bin").read_bytes() == (tmp_path / "w1_text_document.bin").read_bytes()
    assert not (tmp_path / "p2_part000_text_document.bin").exists()


BAD = [
    (b'{"text": "ok one"}', None),
    (b'{"text": "broken', "invalid_json"),
    (b'{"other": "no text key"}', "missing_key"),
    (b'{"text": 42}', "not_a_string"),
    (b'{"text": "   "}', "empty_text"),
    (b'{"text": "bad \xff\xfe bytes"}', "invalid_utf8"),
    (b'{"text": "lone \\ud800 surrogate"}', "invalid_utf8"),
    (b'["a", "list"]', "not_an_object"),
    (b'{"text": "ok two"}', None),
]


def test_bad_records_are_counted_reported_with_file_and_line_and_strict_stops(corpus, tmp_path):
    root, _ = corpus
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\n".join(line for line, _ in BAD) + b"\n")
    proc = preprocess("--input", str(bad), "--output-prefix", str(tmp_path / "o"),
                      "--tokenizer-model", str(root / "tok"))
    summary = json.loads((tmp_path / "o_summary.json").read_text())
    expected = {}
    for _, reason in BAD:
        if reason:
            expected[reason] = expected.get(reason, 0) + 1
    assert summary["records_in"] == len(BAD) and summary["written"] == 2
    assert {k: v for k, v in summary["skipped"].items() if v} == expected
    assert "records in 9 = written 2 + skipped 7" in proc.stderr
    logged = [json.loads(line) for line in (tmp_path / "o_skipped.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reason"]) for r in logged] == [(i + 1, r) for i, (_, r) in enumerate(BAD) if r]
    assert f"{bad}:2: invalid_json" in proc.stderr

    strict = preprocess("--input", str(bad), "--output-prefix", str(tmp_path / "s"),
                        "--tokenizer-model", str(root / "tok"), "--strict", check=False)
    assert strict.returncode == 1
    assert f"{bad}:2: invalid_json" in strict.stderr and "--strict" in strict.stderr


def test_compressed_and_parquet_inputs_give_the_same_documents(corpus, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    root, records = corpus
    raw = (root / "code.jsonl").read_bytes()
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "c.parquet", row_group_size=16)
    outputs = []
    for name in ("c.jsonl.gz", "c.jsonl.zst", "c.parquet"):
        preprocess("--input", str(tmp_path / name), "--output-prefix", str(tmp_path / name.replace(".", "_")),
                   "--tokenizer-model", str(root / "tok"), "--append-eod", "--workers", "2")
        outputs.append((tmp_path / f"{name.replace('.', '_')}_text_document.bin").read_bytes())
    assert outputs[0] == outputs[1] == outputs[2] and len(outputs[0]) > 10_000
    missing = preprocess("--input", str(tmp_path / "none*.jsonl"), "--output-prefix", str(tmp_path / "x"),
                         check=False)
    assert missing.returncode == 1 and "matches no file" in missing.stderr


def test_fim_is_spm_character_level_reassembles_and_is_deterministic(corpus, tmp_path):
    root, records = corpus
    tok = load_tokenizer(str(root / "tok"))
    for seed in (1, 2):
        preprocess("--input", str(root / "code.jsonl"), "--output-prefix", str(tmp_path / f"s{seed}"),
                   "--tokenizer-model", str(root / "tok"), "--fim-rate", "0.5", "--fim-seed", str(seed))
    ds = IndexedReader(str(tmp_path / "s1_text_document"))
    transformed = 0
    for i, record in enumerate(records):
        ids = ds[i].tolist()
        assert fim.reassemble(ids, tok) == record["text"]
        if ids[0] == tok.fim_suffix:
            transformed += 1
            p, m = ids.index(tok.fim_prefix), ids.index(tok.fim_middle)
            assert 0 < p < m  # <[fim-suffix]> SUFFIX <[fim-prefix]> PREFIX <[fim-middle]> MIDDLE
            suffix, prefix, middle = (tok.decode(ids[1:p]), tok.decode(ids[p + 1:m]), tok.decode(ids[m + 1:]))
            assert prefix + middle + suffix == record["text"]
    assert 0.3 * len(records) < transformed < 0.7 * len(records)
    assert (tmp_path / "s1_text_document.bin").read_bytes() != (tmp_path / "s2_text_document.bin").read_bytes()
    # Character-level cuts: the split points are positions in the string, not token boundaries.
    cuts = [fim.split_points("abcdefgh", fim.fim_rng(7, i)) for i in range(50)]
    assert all("".join((a, b, c)) == "abcdefgh" for a, b, c in cuts)
    assert len({len(a) for a, _, _ in cuts}) > 4
    assert cuts == [fim.split_points("abcdefgh", fim.fim_rng(7, i)) for i in range(50)]


def test_merge_datasets_concatenates_and_refuses_mixed_dtypes(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for name, docs in (("a", [[1, 2, 3], [4]]), ("b", [[5, 6]])):
        w = IndexedWriter(str(tmp_path / name), np.uint16)
        for d in docs:
            w.add_document(d)
        w.finalize()
    proc = subprocess.run([sys.executable, "tools/merge_datasets.py", "--input", str(tmp_path / "a"),
                           str(tmp_path / "b"), "--output-prefix", str(tmp_path / "m")], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    merged = IndexedDataset(str(tmp_path / "m"))
    assert [merged[i].tolist() for i in range(len(merged))] == [[1, 2, 3], [4], [5, 6]]
    w = IndexedWriter(str(tmp_path / "c"), np.int32)
    w.add_document([7])
    w.finalize()
    proc = subprocess.run([sys.executable, "tools/merge_datasets.py", "--input", str(tmp_path / "a"),
                           str(tmp_path / "c"), "--output-prefix", str(tmp_path / "n")], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True)
    assert proc.returncode == 1 and "same tokenizer" in proc.stderr
