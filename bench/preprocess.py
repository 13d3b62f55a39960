"""Preprocessing throughput and peak memory: tools/preprocess_data.py vs datatrove, same run.

    python bench/preprocess.py [--workers 2] [--scales 1,4] [--vocab-size 32000] [--repeats 1]

Corpus: this machine's Python standard library (every ``.py`` file, tests included: ~1,800 files,
~31 MB) as jsonl, split into 4 shards (datatrove parallelises over files); scale k repeats it k
times. Tokenizer: a byte-level BPE trained here on that code. Both sides write Megatron .bin/.idx
with an EOD after each document, with the same number of worker processes:

  * ours      ``tools/preprocess_data.py --workers W --append-eod`` (tiktoken engine, verified);
  * ours-hf   the same with ``--tokenizer-engine hf`` (shows what the engine contributes);
  * datatrove ``JsonlReader -> MegatronDocumentTokenizer`` on ``LocalPipelineExecutor(workers=W)``.

Peak memory is the largest summed RSS of each run's process tree (sampled every 20 ms).
Prints docs/s, MB/s, peak MB, and ours / datatrove ratios. Token totals must agree.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

DATATROVE_SCRIPT = textwrap.dedent("""
    import sys
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.tokens import MegatronDocumentTokenizer

    if __name__ == "__main__":  # datatrove's forkserver re-imports this file
        data, out, tokenizer, eos, workers, tasks = sys.argv[1:7]
        LocalPipelineExecutor(pipeline=[
            JsonlReader(data, glob_pattern="*.jsonl"),
            MegatronDocumentTokenizer(out, tokenizer_name_or_path=tokenizer, eos_token=eos),
        ], tasks=int(tasks), workers=int(workers), logging_dir=out + "/logs", skip_completed=False).run()
""")


def measure(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak summed RSS of the process tree in MB)."""
    import psutil

    peak = 0.0
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    done = threading.Event()

    def sample():
        nonlocal peak
        parent = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                rss = sum(p.memory_info().rss for p in [parent, *parent.children(recursive=True)])
                peak = max(peak, rss / 2**20)
            except psutil.Error:
                pass
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return seconds, peak


def make_corpus(folder: str, scale: int, shards: int = 4) -> tuple[int, int]:
    """(documents, bytes of text) written as ``shards`` jsonl files."""
    from megatron_seed.data.stdlib_corpus import write_jsonl

    whole = os.path.join(folder, "whole.jsonl.tmp")
    write_jsonl(whole, include_tests=True)
    with open(whole, encoding="utf-8") as f:
        lines = [line for line in f if json.loads(line)["text"].strip()]
    os.remove(whole)
    lines = lines * scale
    per = (len(lines) + shards - 1) // shards
    for i in range(shards):
        with open(os.path.join(folder, f"shard{i}.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(lines[i * per:(i + 1) * per])
    return len(lines), sum(len(json.loads(line)["text"].encode()) for line in lines)


def datatrove_tokens(out: str) -> int:
    from megatron_seed.data.indexed import IndexedReader

    total = 0
    for name in os.listdir(out):
        if name.endswith(".idx"):
            total += int(IndexedReader(os.path.join(out, name[:-4])).lengths.sum())
    return total


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--scales", default="1,4")
    p.add_argument("--vocab-size", type=int, default=32000)
    args = p.parse_args()

    from megatron_seed.data import tokenizer_training
    from megatron_seed.data.stdlib_corpus import stdlib_files
    from megatron_seed.data.tokenizer import SPECIAL_TOKENS

    work = tempfile.mkdtemp(prefix="bench_preprocess_")
    tok_dir = os.path.join(work, "tokenizer")
    texts = (f.read_text(encoding="utf-8", errors="replace") for f in stdlib_files(600))
    tokenizer_training.train_bpe(texts, args.vocab_size, tok_dir)
    eos = SPECIAL_TOKENS[2]
    rows = []
    for scale in (int(s) for s in args.scales.split(",")):
        data = os.path.join(work, f"data_x{scale}")
        os.makedirs(data)
        docs, nbytes = make_corpus(data, scale)
        print(f"[bench] scale x{scale}: {docs} documents, {nbytes / 1e6:.1f} MB", file=sys.stderr)
        results = {}
        for name in ("ours", "ours-hf", "datatrove"):
            out = os.path.join(work, f"out_{name}_x{scale}")
            if name == "datatrove":
                script = os.path.join(work, "datatrove_run.py")
                with open(script, "w") as f:
                    f.write(DATATROVE_SCRIPT)
                cmd = [sys.executable, script, data, out, os.path.join(tok_dir, "tokenizer.json"), eos,
                       str(args.workers), "4"]
            else:
                cmd = [sys.executable, "tools/preprocess_data.py", "--input", data, "--output-prefix",
                       os.path.join(out, "code"), "--tokenizer-model", tok_dir, "--append-eod",
                       "--workers", str(args.workers), "--log-interval", "0"]
                if name == "ours-hf":
                    cmd += ["--tokenizer-engine", "hf"]
            seconds, peak = measure(cmd)
            if name == "datatrove":
                tokens = datatrove_tokens(out)
            else:
                with open(os.path.join(out, "code_summary.json")) as f:
                    tokens = json.load(f)["tokens"]
            results[name] = (seconds, peak, tokens)
            print(f"[bench] x{scale} {name:9s} {seconds:6.2f} s  {docs / seconds:7.0f} docs/s  "
                  f"{nbytes / 1e6 / seconds:6.2f} MB/s  peak {peak:6.0f} MB  {tokens} tokens", file=sys.stderr)
        rows.append((scale, docs, nbytes, results))

    from megatron_seed.platform.precision import cpu_description

    print(f"\nCPU: {cpu_description()}\n\n| corpus | run | docs/s | MB/s | peak MB | tokens |\n|---|---|---|---|---|---|")
    for scale, docs, nbytes, results in rows:
        for name, (seconds, peak, tokens) in results.items():
            print(f"| x{scale} ({docs} docs) | {name} | {docs / seconds:.0f} | {nbytes / 1e6 / seconds:.2f} | "
                  f"{peak:.0f} | {tokens} |")
    print()
    for scale, docs, nbytes, results in rows:
        ours, dt = results["ours"], results["datatrove"]
        same = "equal" if ours[2] == dt[2] else f"DIFFER ({ours[2]} vs {dt[2]})"
        print(f"x{scale}: ours / datatrove docs/s = {dt[0] / ours[0]:.2f}x (goal >= 1.5x); "
              f"ours-hf / datatrove = {dt[0] / results['ours-hf'][0]:.2f}x; token totals {same}")
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        print(f"peak memory x{last[0]} / x{first[0]}: ours {last[3]['ours'][1] / first[3]['ours'][1]:.2f}, "
              f"datatrove {last[3]['datatrove'][1] / first[3]['datatrove'][1]:.2f} (flat = 1.0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
