"""Preference pairs (TRL's format) -> tokenized chosen / rejected sequences, cached once on disk.

    data = build_pair_data(["pairs.jsonl"], load_chat_tokenizer("tok/"), cache_dir="cache/", seq_length=2048)
    (chosen_ids, chosen_mask), (rejected_ids, rejected_mask) = data.pair(0)

A record holds ``prompt`` (a string, a user turn, or a list of messages) and ``chosen`` /
``rejected`` (a string, an assistant turn, or assistant messages). Each side is rendered as SFT
renders ``{"prompt": prompt, "completion": side}`` (megatron_seed.data.chat): the same chat
template, the mask on the completion's assistant content and end-of-turn tokens only, which are
the tokens a sequence's log-prob sums over. Bad records are skipped and counted per reason with
file and line (``skipped.jsonl``), as for SFT; a pair is kept or dropped whole. Its two sequences
share a training row, so together they must fit ``seq_length`` (``overflow=truncate`` cuts each to
``seq_length // 2`` tokens instead of dropping the pair). The cache is the SFT cache layout with
sample ``2j`` the chosen and ``2j + 1`` the rejected sequence of pair ``j``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Sequence

import numpy as np

from megatron_seed.data.chat import ChatFormatError, ChatTokenizer, conversation_from_record
from megatron_seed.data.sft_data import RecordKind, SFTData, build_sft_data


def _encode_pair(record, tokenizer: ChatTokenizer, train_on_all_tokens: bool) -> list:
    if not isinstance(record, Mapping):
        raise ChatFormatError("not_an_object", f"a JSON {type(record).__name__}, not an object")
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in record]
    if missing:
        raise ChatFormatError("missing_key", f"a pair needs prompt, chosen and rejected; missing {', '.join(missing)} "
                              f"(keys: {sorted(record)[:8]})")
    samples = []
    for side in ("chosen", "rejected"):
        try:
            conversation = conversation_from_record({"prompt": record["prompt"], "completion": record[side]})
        except ChatFormatError as e:
            raise ChatFormatError(e.reason, f"{side}: {e.detail}") from None
        samples.append(tokenizer.encode_conversation(conversation, train_on_all_tokens))
    return samples


PAIR_RECORDS = RecordKind("dpo", _encode_pair)


class PairData:
    """Built pairs: ``len(data)`` pairs, ``data.lengths`` (tokens of both sequences per pair),
    ``data.pair(j)`` = ((chosen ids, mask), (rejected ids, mask)); what PackedPairDataset packs."""

    def __init__(self, samples: SFTData):
        if len(samples) % 2:
            raise ValueError(f"{samples.path}: {len(samples)} sequences, not whole pairs; delete it to rebuild")
        self.samples, self.summary, self.path = samples, samples.summary, samples.path
        self._lengths = samples.lengths[0::2].astype(np.int64) + samples.lengths[1::2]

    @property
    def lengths(self) -> np.ndarray:
        return self._lengths

    def __len__(self) -> int:
        return len(self._lengths)

    def pair(self, j: int):
        return self.samples.sample(2 * j), self.samples.sample(2 * j + 1)


def build_pair_data(inputs: Sequence[str] | str, tokenizer: ChatTokenizer, cache_dir: str, seq_length: int,
                    overflow: str = "drop", strict: bool = False, rebuild: bool = False) -> PairData:
    """Tokenize every pair of ``inputs`` once (or reuse the cache); see the module docstring."""
    return PairData(build_sft_data(inputs, tokenizer, cache_dir, seq_length, overflow=overflow, strict=strict,
                                   rebuild=rebuild, records=PAIR_RECORDS))
