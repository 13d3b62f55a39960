"""Generate from a megatron-seed checkpoint (saved at any TP/PP) in one CPU process.

    python -m megatron_seed.generate --load DIR --prompt TEXT [--prompt TEXT ...] [--max-new-tokens N]
        [--temperature T] [--top-p P] [--greedy] [--dtype auto|bf16|fp32] [--seed S]

The tokenizer comes from the checkpoint directory. Only the continuation goes to stdout (one
block per prompt, separated by a blank line when there are several); logs go to stderr.
Prompts are batched. The engine is :mod:`megatron_seed.inference.engine` (KV cache, oneDNN bf16).
"""

from __future__ import annotations

import argparse
import sys
import time

from megatron_seed.platform.cli import add_check_config, config_ok



def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_seed.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint directory (train.save or convert_checkpoint output)")
    p.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto: bf16 where the hardware runs it natively, fp32 elsewhere")
    p.add_argument("--seed", type=int, default=0)
    add_check_config(p)
    args = p.parse_args(argv)
    if config_ok(args, p.prog):
        return 0

    from megatron_seed.checkpoint.layout import tokenizer_spec
    from megatron_seed.data.tokenizer import load_tokenizer
    from megatron_seed.inference.engine import InferenceModel, generate

    spec = tokenizer_spec(args.load)
    if spec is None:
        print(f"[generate] error: {args.load} holds no tokenizer/ directory; copy the tokenizer files there",
              file=sys.stderr)
        return 1
    t0 = time.time()
    tokenizer = load_tokenizer(spec)
    model = InferenceModel.from_checkpoint(args.load, args.dtype)
    print(f"[generate] loaded {args.load}: {model.config.num_layers} layers, vocab {model.config.vocab_size}, "
          f"{str(model.dtype).removeprefix('torch.')}, in {time.time() - t0:.1f} s", file=sys.stderr)
    prompts = [tokenizer.encode(text) for text in args.prompt]
    t0 = time.time()
    outputs = generate(model, prompts, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                       greedy=args.greedy, eos_id=tokenizer.eos, pad_id=tokenizer.pad or 0, seed=args.seed)
    n = sum(len(o) for o in outputs)
    print(f"[generate] {n} tokens in {time.time() - t0:.2f} s ({n / max(time.time() - t0, 1e-9):.1f} tok/s)",
          file=sys.stderr)
    texts = [tokenizer.decode([t for t in out if t != tokenizer.eos]) for out in outputs]
    sys.stdout.write("\n\n".join(texts) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
