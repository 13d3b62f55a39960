"""Corpus -> Megatron indexed datasets, with Megatron-LM's ``tools/preprocess_data.py`` interface.

    python tools/preprocess_data.py --input 'corpus/*.jsonl.zst' --output-prefix data/code \\
        --json-keys text --append-eod --workers 2 --tokenizer-type HuggingFaceTokenizer \\
        --tokenizer-model tok/ [--fim-rate 0.5] [--strict]

writes ``{output-prefix}_{key}_document.bin/.idx`` for each json key in megatron-core's format
(:mod:`megatron_seed.data.indexed`; uint16 ids below a 65,500 vocabulary, int32 above), plus
``{output-prefix}_summary.json`` (records in = written + skipped per reason) and
``{output-prefix}_skipped.jsonl`` (file, line and reason of every skipped record).

Design: the main process streams raw lines in chunks; workers parse, validate, FIM-transform and
tokenize a chunk in one batched call; results come back in input order, so the output is the same
byte for byte whatever the number of workers. At most ``2 x workers`` chunks are in flight, so
memory does not grow with the corpus. ``--partitions N`` splits the input files into N groups
written separately and merged at the end; finished partitions are kept and skipped on re-run, which
makes long jobs resumable.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from megatron_seed.data import readers
from megatron_seed.data.fim import encode_with_fim
from megatron_seed.data.indexed import IndexedWriter, merge_datasets, token_dtype
from megatron_seed.platform.cli import add_check_config, config_ok

SKIP_REASONS = ("invalid_utf8", "invalid_json", "not_an_object", "missing_key", "not_a_string", "empty_text")
_TOKENIZER_TYPES = ("Auto", "HuggingFaceTokenizer", "SentencePieceTokenizer", "GPTSentencePieceTokenizer",
                    "Llama2Tokenizer", "GPT2BPETokenizer", "ByteTokenizer")


class BadRecord(ValueError):
    pass


@dataclass(frozen=True)
class TokenizerSpec:
    kind: str = "Auto"
    model: Optional[str] = None
    vocab_file: Optional[str] = None
    merge_file: Optional[str] = None
    engine: str = "auto"

    def build(self):
        from megatron_seed.data.tokenizer import HFTokenizer, load_tokenizer

        if self.kind == "ByteTokenizer" or (self.kind == "Auto" and self.model in (None, "byte")):
            return load_tokenizer("byte")
        if self.kind == "GPT2BPETokenizer":
            if not (self.vocab_file and self.merge_file):
                raise ValueError("--tokenizer-type GPT2BPETokenizer needs --vocab-file and --merge-file")
            from tokenizers import Tokenizer, decoders, models, pre_tokenizers

            backend = Tokenizer(models.BPE.from_file(self.vocab_file, self.merge_file))
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            backend.decoder = decoders.ByteLevel()
            return HFTokenizer(backend, self.vocab_file, self.engine, {"eos": "<|endoftext|>"})
        if not self.model:
            raise ValueError(f"--tokenizer-type {self.kind} needs --tokenizer-model")
        if self.kind in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer") \
                and not (self.model.endswith(".model") or os.path.isdir(self.model)):
            raise ValueError(f"--tokenizer-model {self.model} is not a sentencepiece .model file")
        return load_tokenizer(self.model, engine=self.engine)


@dataclass
class Options:
    keys: tuple[str, ...] = ("text",)
    append_eod: bool = False
    fim_rate: float = 0.0
    fim_seed: int = 1234
    verify_every: int = 64


@dataclass
class ChunkResult:
    n_records: int
    nbytes: int
    tokens: dict = field(default_factory=dict)    # key -> (flat ids, per-document lengths)
    skipped: list = field(default_factory=list)   # (path, line, reason, detail)


_WORKER: dict = {}


def _init_worker(spec: TokenizerSpec, options: Options) -> None:
    _WORKER["tokenizer"] = spec.build()
    _WORKER["options"] = options


def _parse(record, keys) -> dict:
    if isinstance(record, bytes):
        try:
            line = record.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadRecord("invalid_utf8", f"byte {e.start}: {e.reason}")
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadRecord("invalid_json", f"{e.msg} at column {e.colno}")
    if not isinstance(record, dict):
        raise BadRecord("not_an_object", f"a JSON {type(record).__name__}, not an object")
    texts = {}
    for key in keys:
        if key not in record:
            raise BadRecord("missing_key", f"no key {key!r} (keys: {', '.join(list(record)[:8])})")
        value = record[key]
        if not isinstance(value, str):
            raise BadRecord("not_a_string", f"{key!r} is a {type(value).__name__}")
        if not value.strip():
            raise BadRecord("empty_text", f"{key!r} is empty or whitespace")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:  # lone surrogates from JSON escapes such as "\ud800"
            raise BadRecord("invalid_utf8", f"{key!r} holds an unpaired surrogate at {e.start}")
        texts[key] = value
    return texts


def process_chunk(chunk: readers.Chunk) -> ChunkResult:
    tokenizer, opt = _WORKER["tokenizer"], _WORKER["options"]
    result = ChunkResult(len(chunk.records), chunk.nbytes)
    kept_texts = {k: [] for k in opt.keys}
    kept_index, kept_lines = [], []
    for offset, (record, line) in enumerate(zip(chunk.records, chunk.line_numbers)):
        try:
            texts = _parse(record, opt.keys)
        except BadRecord as e:
            result.skipped.append((chunk.path, line, e.args[0], e.args[1]))
            continue
        for k in opt.keys:
            kept_texts[k].append(texts[k])
        kept_index.append(chunk.first_index + offset)
        kept_lines.append(line)
    dtype = token_dtype(tokenizer.vocab_size)
    for k in opt.keys:
        docs = encode_with_fim(kept_texts[k], kept_index, tokenizer, opt.fim_rate, opt.fim_seed)
        _verify_sample(tokenizer, kept_texts[k], kept_index, kept_lines, chunk.path, opt)
        if opt.append_eod:
            docs = [d + [tokenizer.eod] for d in docs]
        lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
        flat = np.fromiter((t for d in docs for t in d), dtype=dtype, count=int(lengths.sum()))
        result.tokens[k] = (flat, lengths)
    return result


def _verify_sample(tokenizer, texts, indices, lines, path, opt: Options) -> None:
    """The fast engine is checked against ``tokenizers`` on every ``verify_every``-th record."""
    if getattr(tokenizer, "engine", "") != "tiktoken" or opt.verify_every <= 0:
        return
    picked = [j for j, i in enumerate(indices) if i % opt.verify_every == 0]
    if not picked:
        return
    sample = [texts[j] for j in picked]
    for j, fast, ref in zip(picked, tokenizer.encode_batch(sample), tokenizer.encode_reference(sample)):
        if fast != ref:
            raise RuntimeError(f"{path}:{lines[j]}: the tiktoken engine's ids differ from tokenizers' for "
                               f"this record; rerun with --tokenizer-engine hf")


@dataclass
class Summary:
    records_in: int = 0
    written: int = 0
    skipped: Counter = field(default_factory=Counter)
    bytes_in: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def add(self, other: "Summary") -> None:
        self.records_in += other.records_in
        self.written += other.written
        self.skipped.update(other.skipped)
        self.bytes_in += other.bytes_in
        self.tokens += other.tokens

    def line(self) -> str:
        skipped = ", ".join(f"{r} {self.skipped[r]}" for r in SKIP_REASONS if self.skipped[r]) or "none"
        return (f"records in {self.records_in} = written {self.written} + skipped {sum(self.skipped.values())}"
                f" ({skipped}); {self.tokens} tokens; {self.records_in / max(self.seconds, 1e-9):.0f} docs/s, "
                f"{self.bytes_in / 1e6 / max(self.seconds, 1e-9):.2f} MB/s")

    def to_json(self) -> dict:
        return {"records_in": self.records_in, "written": self.written,
                "skipped": {r: self.skipped[r] for r in SKIP_REASONS}, "bytes_in": self.bytes_in,
                "tokens": self.tokens, "seconds": round(self.seconds, 3)}


def output_prefix(prefix: str, key: str) -> str:
    return f"{prefix}_{key}_document"


def _write_partition(files, prefix, spec, options, workers, chunk_records, strict, log_interval,
                     skipped_log, start_index) -> Summary:
    tokenizer = spec.build()
    writers = {k: IndexedWriter(output_prefix(prefix, k), token_dtype(tokenizer.vocab_size)) for k in options.keys}
    summary, t0, last_log = Summary(), time.time(), 0
    shown = Counter()

    def handle(result: ChunkResult) -> None:
        nonlocal last_log
        for path, line, reason, detail in result.skipped:
            if strict:
                raise BadRecord(f"{path}:{line}: {reason}: {detail} (--strict stops at the first bad record)")
            skipped_log.write(json.dumps({"file": path, "line": line, "reason": reason, "detail": detail}) + "\n")
            if shown[reason] < 5:
                print(f"[preprocess] skip {path}:{line}: {reason}: {detail}", file=sys.stderr)
            shown[reason] += 1
            summary.skipped[reason] += 1
        n_docs = 0
        for k, (flat, lengths) in result.tokens.items():
            writers[k].add_documents(flat, lengths)
            n_docs = len(lengths)
            summary.tokens += int(lengths.sum())
        summary.written += n_docs
        summary.records_in += result.n_records
        summary.bytes_in += result.nbytes
        if log_interval and summary.records_in - last_log >= log_interval:
            last_log = summary.records_in
            summary.seconds = time.time() - t0
            print(f"[preprocess] {summary.records_in} records | {summary.records_in / summary.seconds:.0f} docs/s"
                  f" | {summary.bytes_in / 1e6 / summary.seconds:.2f} MB/s | skipped "
                  f"{sum(summary.skipped.values())}", file=sys.stderr)

    chunks = readers.iter_chunks(files, max_records=chunk_records, start_index=start_index)
    if workers <= 1:
        _init_worker(spec, options)
        for chunk in chunks:
            handle(process_chunk(chunk))
    else:
        # spawn: tokenizers' thread pool does not survive fork, and workers need no parent state.
        with mp.get_context("spawn").Pool(workers, _init_worker, (spec, options)) as pool:
            pending = deque()
            for chunk in chunks:
                pending.append(pool.apply_async(process_chunk, (chunk,)))
                if len(pending) >= 2 * workers:
                    handle(pending.popleft().get())
            while pending:
                handle(pending.popleft().get())
    for writer in writers.values():
        writer.finalize()
    summary.seconds = time.time() - t0
    return summary


def _split_files(files: list[str], partitions: int) -> list[list[str]]:
    """Contiguous groups of similar total size (contiguous keeps global record order)."""
    sizes = [os.path.getsize(f) for f in files]
    target = sum(sizes) / partitions
    groups, current, acc = [], [], 0.0
    for f, s in zip(files, sizes):
        current.append(f)
        acc += s
        if acc >= target * (len(groups) + 1) and len(groups) < partitions - 1:
            groups.append(current)
            current = []
    groups.append(current)
    return [g for g in groups if g]


def run(args: argparse.Namespace) -> Summary:
    files = readers.expand_inputs(args.input)
    spec = TokenizerSpec(args.tokenizer_type, args.tokenizer_model, args.vocab_file, args.merge_file,
                         args.tokenizer_engine)
    tokenizer = spec.build()
    options = Options(tuple(args.json_keys), args.append_eod, args.fim_rate, args.fim_seed, args.verify_every)
    if options.fim_rate > 0:
        encode_with_fim(["ab"], [0], tokenizer, 1.0, 0)  # fails now, not in a worker, if FIM ids are missing
    os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)) or ".", exist_ok=True)
    print(f"[preprocess] {len(files)} input files | tokenizer {tokenizer.name} (vocab {tokenizer.vocab_size}, "
          f"engine {tokenizer.engine}) | keys {', '.join(options.keys)} | workers {args.workers}"
          f"{f' | FIM rate {options.fim_rate}' if options.fim_rate else ''}", file=sys.stderr)
    total = Summary()
    t0 = time.time()
    with open(args.output_prefix + "_skipped.jsonl", "w", encoding="utf-8") as skipped_log:
        groups = _split_files(files, args.partitions) if args.partitions > 1 else [files]
        start_index = 0
        for i, group in enumerate(groups):
            if len(groups) == 1:
                total.add(_write_partition(group, args.output_prefix, spec, options, args.workers,
                                           args.chunk_records, args.strict, args.log_interval, skipped_log, 0))
                continue
            part = f"{args.output_prefix}_part{i:03d}"
            done = part + ".done.json"
            if os.path.exists(done):
                with open(done) as f:
                    summary = _summary_from_json(json.load(f))
                print(f"[preprocess] partition {i}: already done, skipped", file=sys.stderr)
            else:
                summary = _write_partition(group, part, spec, options, args.workers, args.chunk_records,
                                           args.strict, args.log_interval, skipped_log, start_index)
                with open(done + ".tmp", "w") as f:
                    json.dump(summary.to_json(), f)
                os.replace(done + ".tmp", done)  # a partition counts as done only once fully written
            total.add(summary)
            start_index += summary.records_in
        if len(groups) > 1:
            for k in options.keys:
                parts = [output_prefix(f"{args.output_prefix}_part{i:03d}", k) for i in range(len(groups))]
                merge_datasets(parts, output_prefix(args.output_prefix, k))
            if not args.keep_partitions:
                for i in range(len(groups)):
                    part = f"{args.output_prefix}_part{i:03d}"
                    for k in options.keys:
                        for ext in (".bin", ".idx"):
                            os.remove(output_prefix(part, k) + ext)
                    os.remove(part + ".done.json")
    total.seconds = time.time() - t0
    with open(args.output_prefix + "_summary.json", "w") as f:
        json.dump({**total.to_json(), "outputs": [output_prefix(args.output_prefix, k) for k in options.keys],
                   "tokenizer": tokenizer.name, "engine": tokenizer.engine}, f, indent=2)
    print(f"[preprocess] done: {total.line()}", file=sys.stderr)
    return total


def _summary_from_json(state: dict) -> Summary:
    return Summary(state["records_in"], state["written"], Counter(state["skipped"]), state["bytes_in"],
                   state["tokens"])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/preprocess_data.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("input data")
    g.add_argument("--input", required=True, nargs="+",
                   help="files, globs or directories of .jsonl/.jsonl.gz/.jsonl.zst/.parquet")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="keys to extract (one output each)")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", default="Auto", choices=_TOKENIZER_TYPES)
    g.add_argument("--tokenizer-model", default=None,
                   help="tokenizer dir / tokenizer.json / sentencepiece .model / .gguf / 'smollm2' / 'byte'")
    g.add_argument("--vocab-file", default=None, help="GPT2BPETokenizer vocab.json")
    g.add_argument("--merge-file", default=None, help="GPT2BPETokenizer merges.txt")
    g.add_argument("--append-eod", action="store_true", help="append the end-of-document id to each document")
    g.add_argument("--tokenizer-engine", default="auto", choices=("auto", "hf", "tiktoken"),
                   help="byte-level BPE engine; auto = tiktoken when it provably matches tokenizers")
    g.add_argument("--verify-every", type=int, default=64,
                   help="re-encode every N-th record with tokenizers to check the fast engine (0 = off)")
    g = p.add_argument_group("fill-in-the-middle (SPM)")
    g.add_argument("--fim-rate", type=float, default=0.0,
                   help="fraction of documents FIM-transformed (Seed-Coder: 0.5 pretraining, 0.1 continued)")
    g.add_argument("--fim-seed", type=int, default=1234)
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True)
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1)
    g.add_argument("--partitions", type=int, default=1,
                   help="write N partitions and merge them; finished partitions are reused on re-run")
    g.add_argument("--keep-partitions", action="store_true")
    g.add_argument("--chunk-records", type=int, default=256, help="records per worker task")
    g.add_argument("--log-interval", type=int, default=1000)
    g.add_argument("--strict", action="store_true", help="stop at the first bad record")
    add_check_config(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not 0.0 <= args.fim_rate <= 1.0:
        raise SystemExit(f"--fim-rate must be in [0, 1], got {args.fim_rate}")
    if args.workers < 1 or args.partitions < 1:
        raise SystemExit("--workers and --partitions must be at least 1")
    if config_ok(args, "tools/preprocess_data.py"):
        return 0
    try:
        run(args)
    except (BadRecord, FileNotFoundError, ValueError) as e:
        print(f"[preprocess] error: {e}", file=sys.stderr)
        return 1
    return 0
