"""SFT conversations -> a prebuilt prefix that ``data.train=PREFIX`` / ``data.valid=PREFIX`` read.

    python tools/preprocess_sft.py --input 'sft/*.jsonl.gz' more.parquet --output-prefix data/sft \\
        --tokenizer-model smollm2 --seq-length 4096 [--chat-template chat.jinja] \\
        [--overflow drop|truncate] [--train-on-all-tokens] [--strict]

writes ``PREFIX_tokens.bin/.idx`` and ``PREFIX_loss_mask.bin/.idx`` (megatron-core indexed datasets,
one sample per sequence, the mask as uint8), ``PREFIX_summary.json`` (records in = written + skipped
per reason, the options and the chat tokenizer's identity) and ``PREFIX_skipped.jsonl`` (file, line
and reason of every skipped record). Records, skips and samples are exactly those of the training
run's own cache (:mod:`megatron_seed.data.sft_data`); a run that reads the prefix checks that its
tokenizer, ``train_on_all_tokens`` and ``data.seq_length`` fit before training.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from megatron_seed.data.sft_data import OVERFLOW_MODES, SFTDataError, write_sft_prefix
from megatron_seed.platform.cli import add_check_config, config_ok


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/preprocess_sft.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, nargs="+",
                   help="files, globs or directories of .jsonl/.jsonl.gz/.jsonl.zst/.parquet conversations")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX_tokens.bin/.idx, PREFIX_loss_mask.bin/"
                   ".idx, PREFIX_summary.json, PREFIX_skipped.jsonl")
    p.add_argument("--tokenizer-model", required=True,
                   help="chat tokenizer: a directory with tokenizer.json, a .gguf file, 'smollm2' or 'byte' "
                        "(the run's data.tokenizer)")
    p.add_argument("--chat-template", default=None,
                   help="Jinja chat template file overriding the tokenizer's own (the run's data.chat_template)")
    p.add_argument("--seq-length", type=int, required=True, help="longest sample kept (the run's data.seq_length)")
    p.add_argument("--overflow", default="drop", choices=OVERFLOW_MODES,
                   help="samples longer than --seq-length: dropped (default) or cut to it")
    p.add_argument("--train-on-all-tokens", action="store_true",
                   help="loss on every token, not only the assistant turns")
    p.add_argument("--strict", action="store_true", help="stop at the first bad record")
    add_check_config(p)
    return p


def main(argv=None) -> int:
    from megatron_seed.data.chat import ChatTemplateError, load_chat_tokenizer

    args = build_parser().parse_args(argv)
    if config_ok(args, "tools/preprocess_sft.py"):
        return 0
    logging.basicConfig(level=logging.INFO, format="[preprocess_sft] %(message)s", stream=sys.stderr)
    try:
        template = None
        if args.chat_template is not None:
            # Read here, whatever the suffix: the run must see the same text for the identities to match.
            with open(args.chat_template, encoding="utf-8") as f:
                template = f.read()
        tokenizer = load_chat_tokenizer(args.tokenizer_model, template)
        summary = write_sft_prefix(args.input, tokenizer, args.output_prefix, args.seq_length, args.overflow,
                                   args.train_on_all_tokens, args.strict, tokenizer_spec=args.tokenizer_model,
                                   chat_template_file=os.path.abspath(args.chat_template) if args.chat_template
                                   else "")
    except (SFTDataError, ChatTemplateError, FileNotFoundError, ValueError) as e:
        print(f"[preprocess_sft] error: {e}", file=sys.stderr)
        return 1
    print(f"[preprocess_sft] done: {summary.line()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
