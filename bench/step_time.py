"""Training-step time and peak memory on CPU: megatron-seed vs a plain Hugging Face step.

    python bench/step_time.py [--presets tiny,llama_100m] [--steps 4] [--warmup 1]

Ours: the pretraining Trainer's step (megatron-core GPTModel, local spec + SDPA, megatron DDP and
optimizer, grad clipping) in the precision the policy picks for this CPU
(megatron_seed.platform.precision: bf16 weights with fp32 main params where bf16 is native, fp32
elsewhere; ``--precision`` overrides it for both sides). Reference: transformers
``LlamaForCausalLM`` of the same shape, fp32 weights, bf16 autocast when the precision is bf16 (plain
fp32 otherwise), torch AdamW, grad clipping, measured in the same run on the same CPU. Each side runs in its own subprocess so peak RSS is its own.
Prints median step seconds, peak RSS and the ratio (reference time / our time; > 1 = we are faster).

Our trainer keeps freed memory in the process on CPU (``train.cpu_reuse_freed_memory``, see
megatron_seed/platform/cpu_allocator.py). The reference is the plain step the goal is stated
against; a second reference line runs the same HF step with that allocator policy too, so the
share of the gain that is allocator policy, and the share that is the training stack, are both visible.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from isolated import SideFailed, peak_rss_gib, report, run_side

SHAPES = {  # preset -> (seq, micro-batch)
    "tiny": (64, 2),
    "llama_100m": (512, 4),
}


def _time_steps(step, steps: int, warmup: int) -> dict:
    """Median seconds of ``step()`` after ``warmup`` untimed calls, and this process's peak RSS."""
    times = []
    for i in range(steps + warmup):
        t0 = time.perf_counter()
        step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "peak_rss_gib": peak_rss_gib()}


def _ours(preset: str, steps: int, warmup: int, overrides: list, precision: str) -> dict:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    from megatron_seed.config import load_config
    from megatron_seed.training.build import build_run

    seq, mbs = SHAPES[preset]
    run = load_config(None, [f"train.steps={steps + warmup}", f"data.seq_length={seq}", "data.mock=true",
                             f"train.micro_batch_size={mbs}", f"train.global_batch_size={mbs}",
                             f"train.precision={precision}", "train.run_dir=/tmp/bench_step_time",
                             "train.tensorboard=false", *overrides], preset=preset)
    trainer = build_run(run)
    it = trainer._iterators(0, 0)
    return _time_steps(lambda: trainer.train_step(it), steps, warmup)


def _hf(preset: str, steps: int, warmup: int, precision: str, keep_freed_memory: bool = False) -> dict:
    import contextlib

    import torch

    if keep_freed_memory:
        from megatron_seed.platform.cpu_allocator import keep_freed_memory as keep

        keep()
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_seed.config import run_preset

    m = run_preset(preset).model
    seq, mbs = SHAPES[preset]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups, rope_theta=m.rotary_base, rms_norm_eps=m.norm_epsilon,
        tie_word_embeddings=m.tie_embeddings, attn_implementation="sdpa"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    tokens = torch.randint(0, m.vocab_size, (mbs, seq))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext():
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return _time_steps(step, steps, warmup)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--presets", default="tiny,llama_100m")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--ours", default="train.compile=true",
                        help="space-separated overrides for our run (default: compile the elementwise chains)")
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                        help="both sides; auto = what megatron_seed.platform.precision picks on this CPU")
    parser.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    from megatron_seed.platform.precision import choose, cpu_description

    choice = choose(args.precision, "cpu")
    precision = choice.precision
    if args._child:
        side, preset = args._child
        if side == "ours":
            result = _ours(preset, args.steps, args.warmup, args.ours.split(), precision)
        else:
            result = _hf(preset, args.steps, args.warmup, precision, keep_freed_memory=side == "hf_keep")
        report(result)
        return 0
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    print(f"CPU: {cpu_description()} | precision {precision} ({choice.reason})", flush=True)
    ref_name = "HF bf16-autocast" if precision == "bf16" else "HF fp32"
    for preset in args.presets.split(","):
        results = {}
        for side in ("hf", "hf_keep", "ours"):
            try:
                results[side] = run_side(f"{preset} {side}", [__file__, "--_child", side, preset, "--steps",
                                                              str(args.steps), "--warmup", str(args.warmup),
                                                              "--ours", args.ours, "--precision", precision], env)
            except SideFailed as err:
                print(err, file=sys.stderr)
                return 1
        ours, ref = results["ours"], results["hf"]
        print(f"{preset:>11}: ours {ours['median_s']:.4f} s/step, peak {ours['peak_rss_gib']:.2f} GiB | "
              f"{ref_name} {ref['median_s']:.4f} s/step, peak {ref['peak_rss_gib']:.2f} GiB | "
              f"speed-up {ref['median_s'] / ours['median_s']:.2f}x | memory ratio "
              f"{ours['peak_rss_gib'] / ref['peak_rss_gib']:.2f}", flush=True)
        keep = results["hf_keep"]
        print(f"{'':>11}  ({ref_name} with the same allocator policy: {keep['median_s']:.4f} s/step, "
              f"peak {keep['peak_rss_gib']:.2f} GiB | speed-up {keep['median_s'] / ours['median_s']:.2f}x)",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
