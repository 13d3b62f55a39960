"""Ablation: does curation help? Train the tiny model on curated vs uncurated data of equal token
count and compare held-out loss on the highest-scored files.

    python examples/ablate_curation.py --curation runs/demo/curation [--steps 150] [--out runs/ablation]

Uses a curation output directory (``python -m datatrove_pipelines.curate`` or the demo's):
* held-out: the top ``--holdout-fraction`` of files by quality score (from ``stages/4_scored``),
  removed from both training sets;
* curated: the kept files (``kept/``); uncurated: every file the curation read that survived
  only the cheap stages up to scoring (``stages/1_filtered`` minus the held-out) - i.e. without
  dedup or the quality cut - truncated to the curated set's token count;
* one tokenizer (trained on both), the same model, steps, batch and seed for both runs.
Prints held-out loss per token for each run. Whatever the result, it is what it is: with a weak
oracle and a few hundred files, expect differences within noise.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def read_jsonl_gz(folder: str) -> list[dict]:
    rows = []
    for path in sorted(glob.glob(os.path.join(folder, "*.jsonl.gz"))):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            rows += [json.loads(line) for line in f if line.strip()]
    return rows


def write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({"text": row["text"]}) + "\n")


def heldout_loss(checkpoints: str, tokenizer, texts: list[str], max_tokens: int = 256) -> float:
    import torch
    import torch.nn.functional as F

    from megatron_seed.inference.engine import InferenceModel, KVCache

    model = InferenceModel.from_checkpoint(checkpoints, torch.float32)
    total, count = 0.0, 0
    for text in texts:
        ids = tokenizer.encode(text)[:max_tokens]
        if len(ids) < 2:
            continue
        cache = KVCache(model.config, 1, len(ids), torch.float32)
        logits = model.forward(torch.tensor([ids]), torch.arange(len(ids)).unsqueeze(0), cache,
                               torch.ones(1, len(ids), dtype=torch.bool), all_logits=True)[0, :-1]
        total += F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()
        count += len(ids) - 1
    return total / count


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--curation", required=True, help="a curate output directory")
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--holdout-fraction", type=float, default=0.1)
    p.add_argument("--vocab-size", type=int, default=2048)
    args = p.parse_args()

    from megatron_seed.data import preprocess, tokenizer_training
    from megatron_seed.data.tokenizer import load_tokenizer
    from megatron_seed.pretrain import main as pretrain

    scored = read_jsonl_gz(os.path.join(args.curation, "stages", "4_scored"))
    scored.sort(key=lambda r: -r["metadata"]["quality_score"])
    n_hold = max(1, int(len(scored) * args.holdout_fraction))
    held = scored[:n_hold]
    held_ids = {r["id"] for r in held}
    curated = [r for r in read_jsonl_gz(os.path.join(args.curation, "kept")) if r["id"] not in held_ids]
    uncurated = [r for r in read_jsonl_gz(os.path.join(args.curation, "stages", "1_filtered"))
                 if r["id"] not in held_ids]
    os.makedirs(args.out, exist_ok=True)
    tok_dir = os.path.join(args.out, "tokenizer")
    tokenizer_training.train_bpe((r["text"] for r in curated + uncurated), args.vocab_size, tok_dir)
    tokenizer = load_tokenizer(tok_dir)
    budget = sum(len(tokenizer.encode(r["text"])) for r in curated)
    # Uncurated: the same token budget, files in a seeded random order.
    import random

    random.Random(0).shuffle(uncurated)
    picked, used = [], 0
    for r in uncurated:
        if used >= budget:
            break
        picked.append(r)
        used += len(tokenizer.encode(r["text"]))
    results = {}
    for name, rows in (("curated", curated), ("uncurated", picked)):
        jsonl = os.path.join(args.out, f"{name}.jsonl")
        write_jsonl(jsonl, rows)
        prefix = os.path.join(args.out, name)
        preprocess.main(["--input", jsonl, "--output-prefix", prefix, "--tokenizer-model", tok_dir, "--append-eod",
                         "--log-interval", "0"])
        run_dir = os.path.join(args.out, f"run_{name}")
        pretrain(["--preset", "tiny", f"model.vocab_size={args.vocab_size}", f"data.tokenizer={tok_dir}",
                  f"data.blend=[{preprocess.output_prefix(prefix, 'text')}]", "data.mock=false",
                  "data.seq_length=256", f"data.cache_dir={os.path.join(args.out, 'cache_' + name)}",
                  "data.split=100,0,0", f"train.steps={args.steps}", "train.micro_batch_size=4",
                  "train.global_batch_size=8", "train.log_interval=50", "optimizer.lr=3e-3", "optimizer.min_lr=3e-4",
                  "optimizer.warmup_steps=5", f"train.run_dir={run_dir}",
                  f"train.save={os.path.join(run_dir, 'checkpoints')}", "train.tensorboard=false"])
        results[name] = {"files": len(rows), "tokens": sum(len(tokenizer.encode(r["text"])) for r in rows),
                         "heldout_loss": heldout_loss(os.path.join(run_dir, "checkpoints"), tokenizer,
                                                      [r["text"] for r in held])}
    print(f"\nheld-out: the {n_hold} highest-scored files\n\n| data | files | tokens | held-out loss/token |\n"
          "|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['files']} | {r['tokens']} | {r['heldout_loss']:.4f} |")
    with open(os.path.join(args.out, "ablation.json"), "w") as f:
        json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
