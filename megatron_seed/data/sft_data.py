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

Prebuilt prefix: ``tools/preprocess_sft.py`` (:func:`write_sft_prefix`) writes the same files as
``PREFIX_tokens.bin/.idx``, ``PREFIX_loss_mask.bin/.idx``, ``PREFIX_summary.json`` and
``PREFIX_skipped.jsonl``, and ``build_sft_data("PREFIX", ...)`` opens them instead of tokenizing
(:func:`open_sft_prefix`), after checking that they fit the run: same chat tokenizer identity and
``train_on_all_tokens``, no sample longer than ``seq_length``. The summary is renamed into place
last, so only a finished prefix has one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, NamedTuple, Optional, Sequence

import numpy as np

from megatron_seed.config.schema import ConfigError
from megatron_seed.data import readers
from megatron_seed.data.chat import ChatFormatError, ChatTemplateError, ChatTokenizer, conversation_from_record
from megatron_seed.data.indexed import IndexedReader, IndexedWriter, token_dtype

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 2  # 2: the summary records the options and the tokenizer the data was built with
SKIP_REASONS = ("invalid_utf8", "invalid_json", "not_an_object", "missing_key", "wrong_type", "bad_role",
                "empty", "no_assistant_turn", "template_error", "template_unmaskable", "too_long",
                "no_loss_after_truncation")
OVERFLOW_MODES = ("drop", "truncate")
_LOGGED_SKIPS = 20  # every skip is in skipped.jsonl; the log shows the first few


class SFTDataError(ValueError):
    """A bad record under ``strict=True`` (the message names file and line) or an unusable dataset."""


class SFTPrefixError(SFTDataError, ConfigError):
    """A prebuilt prefix that does not fit the run; the message names the prefix and the fix."""


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
    # What the samples depend on, so a prebuilt prefix can be checked against the run that reads it.
    version: int = 0
    seq_length: int = 0
    overflow: str = ""
    train_on_all_tokens: bool = False
    longest: int = 0             # tokens in the longest written sample
    tokenizer: str = ""          # ChatTokenizer.identity: vocabulary, template and control tokens
    template_sha256: str = ""    # of the chat template alone, to tell a template change from a vocabulary one
    tokenizer_spec: str = ""     # as given to tools/preprocess_sft.py (for messages); empty in a cache
    chat_template_file: str = ""

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


class SFTPaths(NamedTuple):
    """The files of built SFT data: ``tokens`` and ``loss_mask`` are indexed-dataset prefixes."""

    tokens: str
    loss_mask: str
    summary: str
    skipped: str

    @classmethod
    def of(cls, path: str) -> "SFTPaths":
        """A directory holds ``tokens``, ``summary.json``, ... (the cache); anything else is a prefix
        for ``PREFIX_tokens``, ``PREFIX_summary.json``, ... (tools/preprocess_sft.py)."""
        name = (lambda n: os.path.join(path, n)) if os.path.isdir(path) else (lambda n: f"{path}_{n}")
        return cls(name("tokens"), name("loss_mask"), name("summary.json"), name("skipped.jsonl"))

    def data_files(self) -> list[str]:
        return [p + ext for p in (self.tokens, self.loss_mask) for ext in (".bin", ".idx")]


class SFTData:
    """Built SFT data, a cache directory or a prebuilt prefix (:class:`SFTPaths`): ``len(data)``
    samples, ``data.lengths`` (tokens per sample), ``data.sample(i)``."""

    def __init__(self, path: str, from_cache: bool = True):
        self.path, self.from_cache = path, from_cache
        self.files = SFTPaths.of(path)
        self._tokens = IndexedReader(self.files.tokens)
        self._mask = IndexedReader(self.files.loss_mask)
        if not np.array_equal(self._tokens.lengths, self._mask.lengths):
            raise SFTDataError(f"{path}: tokens and loss_mask disagree in sample lengths; rebuild it")
        self.summary = SFTSummary(**_read_summary(self.files.summary))

    @property
    def lengths(self) -> np.ndarray:
        return self._tokens.lengths

    def __len__(self) -> int:
        return len(self._tokens)

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """``(ids int64, loss_mask bool)`` of sample ``i``; the mask marks trained target tokens."""
        return self._tokens[i].astype(np.int64), self._mask[i].astype(bool)


def _read_summary(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    if raw.get("version", 0) != CACHE_FORMAT_VERSION:  # before the fields are read: they may differ
        raise SFTDataError(f"{path} is SFT data format {raw.get('version', 0)}, this code reads "
                           f"{CACHE_FORMAT_VERSION}: rebuild it (tools/preprocess_sft.py for a prefix)")
    return raw


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


def _check_options(seq_length: int, overflow: str) -> None:
    if overflow not in OVERFLOW_MODES:
        raise ValueError(f"overflow must be one of {', '.join(OVERFLOW_MODES)}, not {overflow!r}")
    if seq_length < 2:
        raise ValueError(f"seq_length must be at least 2, not {seq_length}")


def sft_prefix(inputs: Sequence[str] | str) -> Optional[str]:
    """The prebuilt prefix ``inputs`` names (one path, not a directory, with ``PREFIX_summary.json``
    and ``PREFIX_tokens.idx``), or None for record files."""
    items = [inputs] if isinstance(inputs, str) else list(inputs)
    if len(items) != 1 or os.path.isdir(items[0]):
        return None
    paths = SFTPaths.of(items[0])
    return items[0] if os.path.exists(paths.summary) and os.path.exists(paths.tokens + ".idx") else None


def build_sft_data(inputs: Sequence[str] | str, tokenizer: ChatTokenizer, cache_dir: str, seq_length: int,
                   overflow: str = "drop", train_on_all_tokens: bool = False, strict: bool = False,
                   rebuild: bool = False, records: Optional["RecordKind"] = None) -> SFTData:
    """Tokenize every record of ``inputs`` once (or reuse the cache) and return the samples; a
    prebuilt prefix (:func:`sft_prefix`) is opened and checked instead (:func:`open_sft_prefix`).

    ``seq_length``: the longest sample kept (a packed row's length). ``overflow``: ``drop`` or
    ``truncate`` samples longer than that. ``train_on_all_tokens``: loss on every token, not only
    on assistant turns. ``strict``: raise :class:`SFTDataError` at the first bad record.
    ``rebuild``: ignore an existing cache. ``records``: how a record becomes samples (default
    :data:`SFT_RECORDS`, one conversation each; DPO passes pairs). Raises :class:`SFTDataError` when
    no record survives."""
    _check_options(seq_length, overflow)
    records = records or SFT_RECORDS
    prefix = sft_prefix(inputs) if records is SFT_RECORDS else None
    if prefix is not None:
        return open_sft_prefix(prefix, tokenizer, seq_length, train_on_all_tokens)
    files = readers.expand_inputs([inputs] if isinstance(inputs, str) else list(inputs))
    options = {"seq_length": seq_length, "overflow": overflow, "train_on_all_tokens": train_on_all_tokens}
    if records is not SFT_RECORDS:
        options["records"] = records.name
    key = cache_key(files, tokenizer, options)
    final = os.path.join(cache_dir, f"{records.name}-{key[:20]}")
    if not rebuild and os.path.exists(os.path.join(final, "summary.json")):
        data = SFTData(final, from_cache=True)
        logger.info("SFT data reused from %s: %s", final, data.summary.line())
        return data
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{final}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        summary = _write(files, tokenizer, SFTPaths.of(tmp), seq_length, overflow, train_on_all_tokens, strict,
                         records)
        summary.key = key
        _dump_summary(summary, os.path.join(tmp, "summary.json"))
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


def write_sft_prefix(inputs: Sequence[str] | str, tokenizer: ChatTokenizer, prefix: str, seq_length: int,
                     overflow: str = "drop", train_on_all_tokens: bool = False, strict: bool = False,
                     tokenizer_spec: str = "", chat_template_file: str = "") -> SFTSummary:
    """Tokenize ``inputs`` into ``PREFIX_tokens``, ``PREFIX_loss_mask``, ``PREFIX_summary.json`` and
    ``PREFIX_skipped.jsonl``, with the cache's records, skips and counts. Files are written under
    ``PREFIX.tmp-<pid>_*`` names and renamed, the summary last, so an interrupted run leaves no
    prefix that looks complete (an older complete one stays whole until the renames start). Raises
    :class:`SFTDataError` when no record survives: ``PREFIX_skipped.jsonl`` then says why, and no
    older prefix is left to be mistaken for this input's."""
    _check_options(seq_length, overflow)
    if os.path.isdir(prefix) or prefix.endswith(("/", os.sep)):
        raise ValueError(f"output prefix {prefix!r} is a directory; give a file prefix such as "
                         f"{os.path.join(prefix, 'sft')}")
    files = readers.expand_inputs([inputs] if isinstance(inputs, str) else list(inputs))
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    final, tmp = SFTPaths.of(prefix), SFTPaths.of(f"{prefix}.tmp-{os.getpid()}")
    try:
        summary = _write(files, tokenizer, tmp, seq_length, overflow, train_on_all_tokens, strict)
        summary.tokenizer_spec, summary.chat_template_file = tokenizer_spec, chat_template_file
        _dump_summary(summary, tmp.summary)
        # The summary marks a prefix complete: the old one goes first, the new one comes last.
        for path in [final.summary] + (final.data_files() if summary.written == 0 else []):
            if os.path.exists(path):
                os.remove(path)
        os.replace(tmp.skipped, final.skipped)
        if summary.written == 0:
            raise SFTDataError(f"no SFT sample survived ({summary.line()}); the reason per record is in "
                               f"{final.skipped}")
        for src, dst in zip(tmp.data_files(), final.data_files()):
            os.replace(src, dst)
        os.replace(tmp.summary, final.summary)
    finally:
        for path in tmp.data_files() + [tmp.summary, tmp.skipped, tmp.tokens + ".idx.tmp",
                                        tmp.loss_mask + ".idx.tmp"]:
            if os.path.exists(path):
                os.remove(path)
    logger.info("SFT data written to %s_*: %s", prefix, summary.line())
    return summary


def open_sft_prefix(prefix: str, tokenizer: ChatTokenizer, seq_length: int,
                    train_on_all_tokens: bool = False) -> SFTData:
    """A prefix written by :func:`write_sft_prefix`, checked against the run that reads it: it must
    have been built with the same chat tokenizer (vocabulary, template, control tokens) and
    ``train_on_all_tokens``, and hold no sample longer than ``seq_length``. Raises
    :class:`SFTPrefixError`, naming the prefix and the fix, when it does not."""
    data = SFTData(prefix, from_cache=True)
    s = data.summary
    built = f"--tokenizer-model {s.tokenizer_spec or '?'}" + (
        f" --chat-template {s.chat_template_file}" if s.chat_template_file else "")
    rebuild = (f"rebuild it with tools/preprocess_sft.py --output-prefix {prefix} and this run's "
               "tokenizer and options")
    if s.tokenizer != tokenizer.identity:
        what = ("its chat template differs" if s.template_sha256 != _sha256(tokenizer.template)
                else "its vocabulary or control tokens differ")
        raise SFTPrefixError(
            f"SFT prefix {prefix} was tokenized with another chat tokenizer ({built}): {what} from this "
            f"run's (data.tokenizer / data.chat_template). Run with the tokenizer and template it was built "
            f"with, or {rebuild}")
    if s.train_on_all_tokens != train_on_all_tokens:
        raise SFTPrefixError(
            f"SFT prefix {prefix} was built with train_on_all_tokens={str(s.train_on_all_tokens).lower()}, this "
            f"run has data.train_on_all_tokens={str(train_on_all_tokens).lower()}: its loss masks would train "
            f"other tokens. Set data.train_on_all_tokens={str(s.train_on_all_tokens).lower()}, or {rebuild}"
            f"{' (--train-on-all-tokens)' if train_on_all_tokens else ''}")
    longest = int(data.lengths.max()) if len(data) else 0
    if longest > seq_length:
        raise SFTPrefixError(
            f"SFT prefix {prefix} holds samples of up to {longest} tokens (built with --seq-length "
            f"{s.seq_length}), more than this run's data.seq_length={seq_length}: set data.seq_length>={longest}, "
            f"or {rebuild} (--seq-length {seq_length})")
    if s.seq_length < seq_length and (s.truncated or s.skipped.get("too_long")):
        logger.warning("SFT prefix %s dropped or cut samples over %d tokens (its --seq-length); this run's rows "
                       "hold %d", prefix, s.seq_length, seq_length)
    logger.info("SFT data read from prefix %s: %s", prefix, s.line())
    return data


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _dump_summary(summary: SFTSummary, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(asdict(summary), f, indent=1)


@dataclass(frozen=True)
class RecordKind:
    """How one record becomes samples: ``encode(record, tokenizer, train_on_all_tokens)`` returns
    its samples (written consecutively, kept or dropped together), raising ChatFormatError /
    ChatTemplateError for a record that cannot be used. The samples of a record share one row, so
    together they must fit ``seq_length``; ``truncate`` cuts each of ``n`` samples to
    ``seq_length // n`` tokens."""

    name: str  # cache directory prefix
    encode: Callable[[object, ChatTokenizer, bool], list]


def _encode_conversation(record, tokenizer: ChatTokenizer, train_on_all_tokens: bool) -> list:
    return [tokenizer.encode_conversation(conversation_from_record(record), train_on_all_tokens)]


SFT_RECORDS = RecordKind("sft", _encode_conversation)


def _write(files: Sequence[str], tokenizer: ChatTokenizer, out: SFTPaths, seq_length: int, overflow: str,
           train_on_all_tokens: bool, strict: bool, records: RecordKind = SFT_RECORDS) -> SFTSummary:
    summary = SFTSummary(files=[os.path.abspath(p) for p in files], version=CACHE_FORMAT_VERSION,
                         seq_length=seq_length, overflow=overflow, train_on_all_tokens=train_on_all_tokens,
                         tokenizer=tokenizer.identity, template_sha256=_sha256(tokenizer.template))
    skipped: Counter = Counter()
    tokens = IndexedWriter(out.tokens, token_dtype(tokenizer.vocab_size))
    masks = IndexedWriter(out.loss_mask, np.uint8)
    with open(out.skipped, "w", encoding="utf-8") as skip_log:
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
                samples = [(s.input_ids, s.loss_mask) for s in records.encode(record, tokenizer, train_on_all_tokens)]
            except ChatFormatError as e:
                skip(source, e.reason, e.detail)
                continue
            except ChatTemplateError as e:
                skip(source, "template_unmaskable", str(e))
                continue
            total = sum(len(ids) for ids, _ in samples)
            what = "tokens" if len(samples) == 1 else f"tokens in {len(samples)} sequences"
            if total > seq_length:
                if overflow == "drop":
                    skip(source, "too_long", f"{total} {what} > seq_length {seq_length}")
                    continue
                share = seq_length // len(samples)
                samples = [(ids[:share], mask[:share]) for ids, mask in samples]
                # mask[0] never matters: the first token is no one's target.
                if not all(mask[1:].any() for _, mask in samples):
                    skip(source, "no_loss_after_truncation", f"{total} {what} cut to {share} each leave a "
                         "sequence with no trained token")
                    continue
                summary.truncated += 1
            for ids, mask in samples:
                tokens.add_document(ids)
                masks.add_document(mask.astype(np.uint8))
                summary.tokens += len(ids)
                summary.loss_tokens += int(mask.sum())
            summary.written += 1
            summary.longest = max(summary.longest, sum(len(ids) for ids, _ in samples))
    tokens.finalize()
    masks.finalize()
    summary.skipped = {r: skipped[r] for r in SKIP_REASONS if skipped[r]}
    if summary.records_in != summary.written + summary.skipped_total:  # a bug here, never a data issue
        raise AssertionError(f"SFT counts do not reconcile: {summary.line()}")
    return summary
