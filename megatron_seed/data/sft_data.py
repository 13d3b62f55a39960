"""SFT records -> tokenized conversations with loss masks, cached once on disk.

    data = build_sft_data(["sft/*.jsonl.gz", "more.parquet"], load_chat_tokenizer("tok/"),
                          cache_dir="cache/", seq_length=4096, overflow="drop")
    ids, mask = data.sample(0)          # int64 ids, bool mask (True: a trained target token)
    print(data.summary.line())          # records in N = written W + skipped S (reason n, ...)

Inputs are jsonl / jsonl.gz / jsonl.zst / parquet files, globs or directories (read by
:mod:`megatron_seed.data.readers`, like preprocessing). A record holds ``messages`` or ``prompt`` +
``completion`` (:func:`~megatron_seed.data.chat.conversation_from_record`). A record that cannot be
used is skipped, counted under its reason and listed with file, line and detail in
``skipped.jsonl``; ``strict=True`` stops at the first instead. A sample longer than ``seq_length``
tokens is dropped (``overflow="drop"``, the default: a truncated reply teaches the model to stop
mid-answer) or cut to ``seq_length`` (``"truncate"``; dropped after all if no trained token is
left). Counts reconcile: records in = written + skipped, checked before the cache is published.

Cache: ``cache_dir/sft-<key>/`` holds ``tokens`` and ``loss_mask`` as megatron-core indexed datasets
(:mod:`megatron_seed.data.indexed`; one sequence per sample, the mask as uint8, so any Megatron
reader opens them), ``summary.json`` and ``skipped.jsonl``. The key hashes the input files' paths,
sizes and modification times, the tokenizer's identity (vocabulary, template, control tokens) and
the options, so any change rebuilds and an unchanged run reuses. The directory is built under a
temporary name and renamed into place, so a concurrent or interrupted build never leaves a cache
that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Iterator, Sequence

import numpy as np

from megatron_seed.data import readers
from megatron_seed.data.chat import ChatFormatError, ChatTemplateError, ChatTokenizer, conversation_from_record
from megatron_seed.data.indexed import IndexedReader, IndexedWriter, token_dtype

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
SKIP_REASONS = ("invalid_utf8", "invalid_json", "not_an_object", "missing_key", "wrong_type", "bad_role",
                "empty", "no_assistant_turn", "template_error", "template_unmaskable", "too_long",
                "no_loss_after_truncation")
OVERFLOW_MODES = ("drop", "truncate")
_LOGGED_SKIPS = 20  # every skip is in skipped.jsonl; the log shows the first few


class SFTDataError(ValueError):
    """A bad record under ``strict=True`` (the message names file and line) or an unusable dataset."""


@dataclass
class SFTSummary:
    records_in: int = 0
    written: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    truncated: int = 0           # among ``written``
    tokens: int = 0              # in written samples
    loss_tokens: int = 0         # of which trained
    files: list[str] = field(default_factory=list)
    key: str = ""

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def line(self) -> str:
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(self.skipped.items()))
        return (f"records in {self.records_in} = written {self.written} + skipped {self.skipped_total}"
                f"{f' ({reasons})' if reasons else ''}; truncated {self.truncated}; tokens {self.tokens} "
                f"(trained {self.loss_tokens})")


@dataclass(frozen=True)
class SFTRecordSource:
    """Where a record came from: file and 1-based line (jsonl) or 0-based row (parquet)."""

    path: str
    line: int
    unit: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}" if self.unit == "line" else f"{self.path} row {self.line}"


class SFTData:
    """A built cache: ``len(data)`` samples, ``data.lengths`` (tokens per sample), ``data.sample(i)``."""

    def __init__(self, path: str, from_cache: bool):
        self.path, self.from_cache = path, from_cache
        self._tokens = IndexedReader(os.path.join(path, "tokens"))
        self._mask = IndexedReader(os.path.join(path, "loss_mask"))
        if not np.array_equal(self._tokens.lengths, self._mask.lengths):
            raise SFTDataError(f"{path}: tokens and loss_mask disagree in sample lengths; delete the directory")
        with open(os.path.join(path, "summary.json"), encoding="utf-8") as f:
            self.summary = SFTSummary(**json.load(f))

    @property
    def lengths(self) -> np.ndarray:
        return self._tokens.lengths

    def __len__(self) -> int:
        return len(self._tokens)

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """``(ids int64, loss_mask bool)`` of sample ``i``; the mask marks trained target tokens."""
        return self._tokens[i].astype(np.int64), self._mask[i].astype(bool)


def iter_records(files: Sequence[str]) -> Iterator[tuple[SFTRecordSource, object]]:
    """``(source, record)`` per record; ``record`` is the parsed object or a
    :class:`~megatron_seed.data.chat.ChatFormatError` for a line that is not JSON."""
    for chunk in readers.iter_chunks(files):
        for raw, line in zip(chunk.records, chunk.line_numbers):
            source = SFTRecordSource(chunk.path, line, chunk.unit)
            if not isinstance(raw, bytes):
                yield source, raw  # parquet row, already a dict
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield source, ChatFormatError("invalid_utf8", f"byte {e.start}: {e.reason}")
                continue
            try:
                yield source, json.loads(text)
            except json.JSONDecodeError as e:
                yield source, ChatFormatError("invalid_json", f"{e.msg} at column {e.colno}")


def cache_key(files: Sequence[str], tokenizer: ChatTokenizer, options: dict) -> str:
    """sha256 of the inputs' (path, size, mtime), the tokenizer identity and the options."""
    stats = [[os.path.abspath(p), os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in files]
    payload = {"version": CACHE_FORMAT_VERSION, "files": stats, "tokenizer": tokenizer.identity,
               "template": tokenizer.template, "options": options}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def build_sft_data(inputs: Sequence[str] | str, tokenizer: ChatTokenizer, cache_dir: str, seq_length: int,
                   overflow: str = "drop", train_on_all_tokens: bool = False, strict: bool = False,
                   rebuild: bool = False) -> SFTData:
    """Tokenize every record of ``inputs`` once (or reuse the cache) and return the samples.

    ``seq_length``: the longest sample kept (a packed row's length). ``overflow``: ``drop`` or
    ``truncate`` samples longer than that. ``train_on_all_tokens``: loss on every token, not only
    on assistant turns. ``strict``: raise :class:`SFTDataError` at the first bad record.
    ``rebuild``: ignore an existing cache. Raises :class:`SFTDataError` when no record survives."""
    if overflow not in OVERFLOW_MODES:
        raise ValueError(f"overflow must be one of {', '.join(OVERFLOW_MODES)}, not {overflow!r}")
    if seq_length < 2:
        raise ValueError(f"seq_length must be at least 2, not {seq_length}")
    files = readers.expand_inputs([inputs] if isinstance(inputs, str) else list(inputs))
    options = {"seq_length": seq_length, "overflow": overflow, "train_on_all_tokens": train_on_all_tokens}
    key = cache_key(files, tokenizer, options)
    final = os.path.join(cache_dir, f"sft-{key[:20]}")
    if not rebuild and os.path.exists(os.path.join(final, "summary.json")):
        data = SFTData(final, from_cache=True)
        logger.info("SFT data reused from %s: %s", final, data.summary.line())
        return data
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{final}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        summary = _write(files, tokenizer, tmp, seq_length, overflow, train_on_all_tokens, strict)
        summary.key = key
        with open(os.path.join(tmp, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(asdict(summary), f, indent=1)
        if summary.written == 0:
            kept = f"{final}.skipped.jsonl"  # outlives the removed build: it says why each record went
            shutil.copyfile(os.path.join(tmp, "skipped.jsonl"), kept)
            raise SFTDataError(f"no SFT sample survived ({summary.line()}); the reason per record is in {kept}")
        if os.path.exists(final):  # rebuild, or another process finished first: ours replaces it
            shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename; a failed build leaves nothing
    logger.info("SFT data written to %s: %s", final, summary.line())
    return SFTData(final, from_cache=False)


def _write(files: Sequence[str], tokenizer: ChatTokenizer, out: str, seq_length: int, overflow: str,
           train_on_all_tokens: bool, strict: bool) -> SFTSummary:
    summary = SFTSummary(files=[os.path.abspath(p) for p in files])
    skipped: Counter = Counter()
    tokens = IndexedWriter(os.path.join(out, "tokens"), token_dtype(tokenizer.vocab_size))
    masks = IndexedWriter(os.path.join(out, "loss_mask"), np.uint8)
    with open(os.path.join(out, "skipped.jsonl"), "w", encoding="utf-8") as skip_log:
        def skip(source: SFTRecordSource, reason: str, detail: str) -> None:
            if strict:
                raise SFTDataError(f"{source}: {reason}: {detail}")
            skipped[reason] += 1
            skip_log.write(json.dumps({"file": source.path, source.unit: source.line, "reason": reason,
                                       "detail": detail}, ensure_ascii=False) + "\n")
            if sum(skipped.values()) <= _LOGGED_SKIPS:
                logger.warning("skipped %s: %s: %s", source, reason, detail)

        for source, record in iter_records(files):
            summary.records_in += 1
            try:
                if isinstance(record, ChatFormatError):
                    raise record
                sample = tokenizer.encode_conversation(conversation_from_record(record), train_on_all_tokens)
            except ChatFormatError as e:
                skip(source, e.reason, e.detail)
                continue
            except ChatTemplateError as e:
                skip(source, "template_unmaskable", str(e))
                continue
            ids, mask = sample.input_ids, sample.loss_mask
            if len(ids) > seq_length:
                if overflow == "drop":
                    skip(source, "too_long", f"{len(ids)} tokens > seq_length {seq_length}")
                    continue
                ids, mask = ids[:seq_length], mask[:seq_length]
                # mask[0] never matters: the first token is no one's target.
                if not mask[1:].any():
                    skip(source, "no_loss_after_truncation", f"{len(sample.input_ids)} tokens cut to "
                         f"{seq_length} leave no trained token")
                    continue
                summary.truncated += 1
            tokens.add_document(ids)
            masks.add_document(mask.astype(np.uint8))
            summary.written += 1
            summary.tokens += len(ids)
            summary.loss_tokens += int(mask.sum())
    tokens.finalize()
    masks.finalize()
    summary.skipped = {r: skipped[r] for r in SKIP_REASONS if skipped[r]}
    if summary.records_in != summary.written + summary.skipped_total:  # a bug here, never a data issue
        raise AssertionError(f"SFT counts do not reconcile: {summary.line()}")
    return summary
