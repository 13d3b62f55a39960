"""The CPU demo: this machine's Python standard library -> .bin/.idx -> a tiny pretraining run.

    python -m megatron_seed.demo [--out runs/demo] [--max-files N] [key.sub=value ...]

Reads the standard library's own ``.py`` files (a real code corpus present on every machine),
tokenizes them with the byte tokenizer into a Megatron indexed dataset, and pretrains the
``tiny`` preset on it, printing loss, throughput and the run directory.
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
from pathlib import Path


def stdlib_files(limit: int):
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts)
    return files[:limit] if limit else files


def build_corpus(prefix: str, limit: int) -> tuple[int, int, int]:
    """Returns (files read, documents written, files skipped as unreadable/non-UTF-8)."""
    from megatron_seed.data.indexed import write_documents
    from megatron_seed.data.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    files = stdlib_files(limit)
    skipped = 0

    def documents():
        nonlocal skipped
        for path in files:
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                skipped += 1
                continue
            if text.strip():
                yield tok.encode(text)
            else:
                skipped += 1

    written = write_documents(prefix, documents(), tok.vocab_size, tok.eod)
    return len(files), written, skipped


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_seed.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--max-files", type=int, default=400, help="standard-library files to use (0 = all)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    out = Path(args.out)
    prefix = str(out / "data" / "stdlib_text_document")
    n_in, n_out, n_skip = build_corpus(prefix, args.max_files)
    print(f"[demo] corpus: {n_in} standard-library files -> {n_out} documents ({n_skip} skipped) "
          f"-> {prefix}.bin/.idx", file=sys.stderr)
    from megatron_seed.pretrain import main as pretrain

    return pretrain([
        "--preset", "tiny", f"data.blend=[{prefix}]", "data.mock=false", "data.seq_length=256",
        f"data.cache_dir={out / 'data' / 'cache'}", "data.split=95,5,0",
        "train.steps=30", "train.micro_batch_size=4", "train.global_batch_size=8",
        "train.log_interval=5", "train.eval_interval=15", "train.eval_steps=1",
        "optimizer.lr=3e-3", "optimizer.min_lr=3e-4", "optimizer.warmup_steps=3",
        f"train.run_dir={out}", f"train.save={out / 'checkpoints'}", *args.overrides,
    ])


if __name__ == "__main__":
    sys.exit(main())
