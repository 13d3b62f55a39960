"""Run a Hugging Face byte-level BPE tokenizer on tiktoken's engine, with identical output.

Tokenizing is what bounds preprocessing on CPU (``tokenizers`` encodes ~4.5 MB/s on 2 cores here;
tiktoken's engine ~3x that). Both implement byte-level BPE: split text with a regex, map each piece
to bytes, merge adjacent parts by priority. They agree when

  * the HF pipeline is no normalizer + ``ByteLevel(use_regex=True)`` (the GPT-2 split regex) or
    ``Split(regex) + ByteLevel(use_regex=False)``, a plain BPE model (no dropout, no
    ``ignore_merges``, no continuing-subword prefix/suffix);
  * merge priority equals token-id order: the i-th merge creates a token whose id is larger than
    every earlier merge's (tiktoken ranks *are* token ids), each merge creates a distinct token,
    and every multi-byte token in the vocabulary is some merge's result.

``to_tiktoken`` checks all of that and returns ``(None, reason)`` otherwise, in which case callers
use ``tokenizers``. What cannot be checked statically (a pair whose concatenation is a token reached
through a different merge) is checked on data: ``tools/preprocess_data.py`` re-encodes a sample of
documents with ``tokenizers`` and stops on any difference, and the tests compare whole corpora.
"""

from __future__ import annotations

import json

# The regex of HF's ByteLevel pre-tokenizer with use_regex=True (GPT-2's), in tiktoken's syntax.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table, as HF's ByteLevel uses it."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _pattern(pre: dict | None) -> tuple[str | None, str]:
    if pre is None:
        return None, "no pre-tokenizer"
    if pre["type"] == "ByteLevel":
        if not pre.get("use_regex", True):
            return None, "ByteLevel without regex splits nothing"
        if pre.get("add_prefix_space"):
            return None, "ByteLevel(add_prefix_space=True) changes the text"
        return GPT2_PATTERN, ""
    if pre["type"] == "Sequence" and len(pre["pretokenizers"]) == 2:
        split, byte_level = pre["pretokenizers"]
        if (split["type"] == "Split" and "Regex" in split.get("pattern", {})
                and split.get("behavior") == "Isolated" and not split.get("invert")
                and byte_level["type"] == "ByteLevel" and not byte_level.get("use_regex", True)
                and not byte_level.get("add_prefix_space")):
            return split["pattern"]["Regex"], ""
    return None, f"pre-tokenizer {pre['type']} has no tiktoken equivalent"


def to_tiktoken(backend):
    """``(tiktoken.Encoding, "")`` equivalent to ``backend`` (a ``tokenizers.Tokenizer``), or
    ``(None, reason)``."""
    try:
        import tiktoken
    except ImportError:
        return None, "tiktoken is not installed"
    spec = json.loads(backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        return None, f"model type {model.get('type')} is not BPE"
    if spec.get("normalizer") is not None:
        return None, "the tokenizer has a normalizer"
    if model.get("dropout") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") \
            or model.get("byte_fallback") or model.get("ignore_merges"):
        return None, "BPE options (dropout/prefix/suffix/byte_fallback/ignore_merges) are set"
    pattern, reason = _pattern(spec.get("pre_tokenizer"))
    if pattern is None:
        return None, reason

    decode_char = {c: b for b, c in _bytes_to_unicode().items()}
    specials = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    vocab = model["vocab"]
    try:
        ranks = {bytes(decode_char[ch] for ch in token): i for token, i in vocab.items() if token not in specials}
    except KeyError:
        return None, "the vocabulary holds tokens outside the byte-level alphabet"
    if len(ranks) != len(vocab) - sum(1 for t in vocab if t in specials):
        return None, "two vocabulary entries map to the same bytes"
    if any(bytes([b]) not in ranks for b in range(256)):
        return None, "the vocabulary lacks some of the 256 single bytes"

    merged_ids, last = set(), -1
    for merge in model["merges"]:
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        token_id = vocab.get(left + right)
        if token_id is None or token_id <= last or token_id in merged_ids:
            return None, "merge order differs from token-id order"
        merged_ids.add(token_id)
        last = token_id
    multi_byte = {i for b, i in ranks.items() if len(b) > 1}
    if multi_byte != merged_ids:
        return None, "some multi-byte tokens are not produced by merges"
    # Special tokens are never produced by encode_ordinary; they are listed so decode knows them.
    encoding = tiktoken.Encoding("megatron_seed", pat_str=pattern, mergeable_ranks=ranks,
                                 special_tokens={k: v for k, v in specials.items() if v not in ranks.values()})
    return encoding, ""
