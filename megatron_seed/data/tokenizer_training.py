"""Train a code tokenizer: byte-level BPE (HF ``tokenizers``, default) or sentencepiece BPE.

Both put ``<[begin▁of▁sentence]>`` / ``<[PAD▁TOKEN]>`` / ``<[end▁of▁sentence]>`` at ids 0/1/2 and
have Seed-Coder's FIM tokens ``<[fim-suffix]>`` / ``<[fim-prefix]>`` / ``<[fim-middle]>`` (ids
3/4/5 for BPE; 4/5/6 for sentencepiece, which needs its unknown piece at 3). Both round-trip any
text exactly: byte-level BPE by construction (all 256 bytes are in the vocabulary, no normalizer),
sentencepiece with identity normalization, no dummy prefix, kept whitespace and byte fallback.

The output directory loads with ``transformers.AutoTokenizer.from_pretrained(DIR)`` (BPE:
``tokenizer.json`` + ``tokenizer_config.json``) and with :func:`megatron_seed.data.tokenizer.load_tokenizer`.
"""

from __future__ import annotations

import glob
import json
import os
import sys
from typing import Iterable, Iterator, Sequence

from megatron_seed.data.tokenizer import SPECIAL_TOKENS
from megatron_seed.platform.cli import add_check_config, config_ok

CODE_SUFFIXES = (".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".java", ".js", ".ts", ".go", ".rs",
                 ".rb", ".sh", ".md", ".rst", ".txt", ".toml", ".yaml", ".yml", ".json", ".html", ".css")
BOS, PAD, EOS, FIM_SUFFIX, FIM_PREFIX, FIM_MIDDLE = SPECIAL_TOKENS


def iter_texts(inputs: Sequence[str], json_key: str = "text", suffixes=CODE_SUFFIXES,
               max_bytes: int = 0) -> Iterator[str]:
    """Texts from directories (recursively, files with ``suffixes``), globs, plain files and
    jsonl(.gz/.zst) files (field ``json_key``). Stops after ``max_bytes`` of text when > 0.
    Files that are not UTF-8 are reported and skipped."""
    from megatron_seed.data import readers

    seen = 0
    for spec in inputs:
        if os.path.isdir(spec):
            paths = sorted(p for p in glob.glob(os.path.join(spec, "**", "*"), recursive=True)
                           if p.endswith(suffixes) and os.path.isfile(p))
        else:
            paths = sorted(glob.glob(spec, recursive=True)) if any(c in spec for c in "*?[") else [spec]
        if not paths:
            raise FileNotFoundError(f"tokenizer input {spec!r} matches no file")
        for path in paths:
            if path.endswith(readers.SUFFIXES) and not path.endswith(".json"):
                texts: Iterable[str] = _jsonl_texts(path, json_key)
            else:
                try:
                    with open(path, encoding="utf-8", newline="") as f:
                        texts = [f.read()]
                except (UnicodeDecodeError, OSError) as e:
                    print(f"[train_tokenizer] skip {path}: {e}", file=sys.stderr)
                    continue
            for text in texts:
                yield text
                seen += len(text.encode("utf-8"))
                if max_bytes and seen >= max_bytes:
                    return


def _jsonl_texts(path: str, key: str) -> Iterator[str]:
    from megatron_seed.data import readers

    for chunk in readers.iter_chunks([path]):
        for record, line in zip(chunk.records, chunk.line_numbers):
            try:
                value = (json.loads(record) if isinstance(record, bytes) else record)[key]
            except (ValueError, KeyError, TypeError):
                print(f"[train_tokenizer] skip {path}:{line}: not JSON with a {key!r} string", file=sys.stderr)
                continue
            if isinstance(value, str) and value:
                yield value


def train_bpe(texts: Iterable[str], vocab_size: int, output_dir: str, min_frequency: int = 2,
              model_max_length: int = 8192) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    os.makedirs(output_dir, exist_ok=True)
    tokenizer.save(os.path.join(output_dir, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
        "additional_special_tokens": [FIM_SUFFIX, FIM_PREFIX, FIM_MIDDLE],
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,  # anything else breaks exact round trips of code
        "add_bos_token": False, "add_eos_token": False,
    }
    _write_json(os.path.join(output_dir, "tokenizer_config.json"), config)
    _write_json(os.path.join(output_dir, "special_tokens_map.json"),
                {k: config[k] for k in ("bos_token", "eos_token", "pad_token", "additional_special_tokens")})
    return output_dir


def train_sentencepiece(texts: Iterable[str], vocab_size: int, output_dir: str,
                        max_piece_bytes: int = 16384) -> str:
    import sentencepiece as spm

    def sentences():
        # sentencepiece drops "sentences" longer than max_sentence_length: feed bounded slices.
        for text in texts:
            for i in range(0, len(text), max_piece_bytes // 4):
                yield text[i:i + max_piece_bytes // 4]

    os.makedirs(output_dir, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences(), model_prefix=os.path.join(output_dir, "tokenizer"),
        model_type="bpe", vocab_size=vocab_size, character_coverage=1.0, byte_fallback=True,
        normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, split_digits=False, max_sentence_length=max_piece_bytes,
        bos_id=0, pad_id=1, eos_id=2, unk_id=3,
        bos_piece=BOS, pad_piece=PAD, eos_piece=EOS, unk_piece="<unk>",
        control_symbols=[FIM_SUFFIX, FIM_PREFIX, FIM_MIDDLE], minloglevel=2)
    return output_dir


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="tools/train_tokenizer.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="directories, globs, code files or jsonl(.gz/.zst)")
    p.add_argument("--output", required=True, help="directory to write the tokenizer to")
    p.add_argument("--type", choices=("bpe", "sentencepiece"), default="bpe")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--json-key", default="text", help="field holding the text in jsonl inputs")
    p.add_argument("--max-bytes", type=int, default=0, help="stop reading after this much text (0 = all)")
    p.add_argument("--min-frequency", type=int, default=2)
    add_check_config(p)
    args = p.parse_args(argv)
    if args.vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
        raise SystemExit(f"--vocab-size must exceed {256 + len(SPECIAL_TOKENS)} (256 bytes + special tokens)")
    if config_ok(args, p.prog):
        return 0
    texts = iter_texts(args.input, args.json_key, max_bytes=args.max_bytes)
    if args.type == "bpe":
        train_bpe(texts, args.vocab_size, args.output, args.min_frequency)
    else:
        train_sentencepiece(texts, args.vocab_size, args.output)
    from megatron_seed.data.tokenizer import load_tokenizer

    tok = load_tokenizer(args.output)
    print(f"[train_tokenizer] {args.type} tokenizer, vocab {tok.vocab_size} -> {args.output} "
          f"(encode engine: {tok.engine})", file=sys.stderr)
    return 0
