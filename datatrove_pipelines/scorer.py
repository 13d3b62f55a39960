"""The quality scorer: a Llama with a regression head, trained on oracle labels, scoring every file.

As in the paper: labels rescaled to [0, 1], MSE, one epoch by default; held-out MAE reported on
the 0-10 scale next to the MAE of always predicting the training mean (a scorer that does not
beat that has learned nothing). The scorer's directory keeps the split (``label_split.json``: the
ids trained on and held out) and its scores of the held-out labels (``held_out_predictions.jsonl``),
which the curation's label audit (``label_audit.py``) compares with the oracle's. The base model
is any HF Llama directory: a checkpoint of ours exported with ``tools/convert_checkpoint.py
mcore-to-hf``, a converted HF model, or SmolLM2.

``QualityScorer`` (datatrove step) scores documents in length-sorted batches (GPU when present,
CPU otherwise) into ``metadata["quality_score"]`` (0-10) and writes each task's scores per
language to ``scores_folder``; ``PercentileFilter`` then drops the lowest ``drop_fraction`` of
each language (reason ``low_quality``), using all tasks' scores.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
from collections import defaultdict
from typing import Optional

import numpy as np
from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from datatrove_pipelines.task_files import read_task_json, write_task_json
from megatron_seed.data.jsonl import read_jsonl


def _device():
    import torch

    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _autocast(device):
    """bf16 autocast where the hardware runs bf16 natively; plain fp32 elsewhere (an AVX2-only CPU
    emulates bf16 ~400x slower than fp32: megatron_seed.platform.precision)."""
    import contextlib

    import torch

    from megatron_seed.platform.precision import resolve

    if resolve("auto", device.type) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


SPLIT_FILE = "label_split.json"  # in the scorer's directory: ids trained on and held out
HELD_OUT_FILE = "held_out_predictions.jsonl"  # held-out labels with the trained scorer's scores


def split_labels(rows: list, holdout: float, rng: random.Random) -> tuple[list, list]:
    """(train, held out): a shuffle by ``rng``, then the first ``holdout`` fraction held out, at
    least 1 and at most all but 1 label. The held-out labels are the scorer's test set (its
    metrics and the curation's label audit); training never sees them."""
    rows = list(rows)
    rng.shuffle(rows)
    n_held = min(max(1, int(len(rows) * holdout)), len(rows) - 1)
    return rows[n_held:], rows[:n_held]


def train_scorer(labels_file: str, base_model: str, output_dir: str, epochs: int = 1, lr: float = 1e-4,
                 batch_size: int = 4, max_tokens: int = 512, holdout: float = 0.2, seed: int = 0,
                 num_layers: Optional[int] = None,
                 log=lambda s: print(f"[scorer] {s}", file=sys.stderr, flush=True)) -> dict:
    """Fine-tune ``base_model`` with a regression head on ``labels_file`` rows ({text, rating}).
    ``num_layers`` keeps only the first N transformer layers of the base model: scoring every file
    of a corpus is the curation's largest cost, and it scales with depth (the saved scorer has N
    layers, so scoring uses N too). Returns metrics: held-out MAE (0-10), the mean-predictor's
    MAE, train/held-out sizes."""
    import torch
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    rows = read_jsonl(labels_file)
    if len(rows) < 4:
        raise ValueError(f"{labels_file}: {len(rows)} labelled files; the scorer needs at least 4")
    for n, row in enumerate(rows):
        row.setdefault("id", f"line-{n + 1}")  # the split file names every label
    # One generator for the split and the epoch shuffles: the split is the first draw.
    rng = random.Random(seed)
    train, held = split_labels(rows, holdout, rng)
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    depth = {} if num_layers is None else {"num_hidden_layers": num_layers}
    model = LlamaForSequenceClassification.from_pretrained(base_model, num_labels=1, problem_type="regression",
                                                           dtype=torch.float32, **depth)
    if num_layers is not None:
        log(f"backbone: the first {model.config.num_hidden_layers} layers of {base_model}")
    model.config.pad_token_id = tokenizer.pad_token_id
    # The head learns the deviation from the mean training label: with few labels the fresh head
    # starts at the mean-predictor baseline instead of at 0.
    offset = float(np.mean([r["rating"] for r in train])) / 10.0
    model.config.label_offset = offset
    with torch.no_grad():
        model.score.weight.zero_()  # a fresh head predicts exactly the mean, then learns from there
    device = _device()
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    steps = epochs * math.ceil(len(train) / batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / max(steps, 1))
    step = 0
    trained_on = set()
    for epoch in range(epochs):
        rng.shuffle(train)
        for lo in range(0, len(train), batch_size):
            batch = train[lo:lo + batch_size]
            trained_on.update(r["id"] for r in batch)
            enc = tokenizer([r["text"] for r in batch], truncation=True, max_length=max_tokens, padding=True,
                            return_tensors="pt").to(device)
            target = torch.tensor([r["rating"] / 10.0 - offset for r in batch], device=device)
            with _autocast(device):
                pred = model(**enc).logits.squeeze(-1)
            loss = torch.nn.functional.mse_loss(pred.float(), target)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % 10 == 0 or step == steps:
                log(f"step {step}/{steps} | mse {loss.item():.4f}")
    model.eval()
    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    predicted = score_texts(output_dir, [r["text"] for r in held], max_tokens=max_tokens, model=model,
                            tokenizer=tokenizer)
    truth = np.array([r["rating"] for r in held])
    mean = float(np.mean([r["rating"] for r in train]))
    metrics = {"train": len(train), "held_out": len(held), "held_out_mae": float(np.abs(predicted - truth).mean()),
               "mean_predictor_mae": float(np.abs(mean - truth).mean()), "train_mean_rating": mean}
    with open(os.path.join(output_dir, "scorer_metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    # What the label audit needs: which labels the scorer saw, and its scores of the others.
    with open(os.path.join(output_dir, SPLIT_FILE), "w") as f:
        json.dump({"holdout": holdout, "seed": seed, "train_ids": sorted(trained_on),
                   "held_out_ids": [r["id"] for r in held]}, f)
    with open(os.path.join(output_dir, HELD_OUT_FILE), "w", encoding="utf-8") as f:
        for r, p in zip(held, predicted):
            f.write(json.dumps({"id": r["id"], "language": r.get("language"), "source": r.get("source"),
                                "rating": r["rating"], "predicted": round(float(p), 4)}) + "\n")
    log(f"held-out MAE {metrics['held_out_mae']:.3f} (0-10 scale) vs mean predictor "
        f"{metrics['mean_predictor_mae']:.3f}, {len(train)} train / {len(held)} held-out")
    return metrics


def score_texts(scorer_dir: str, texts: list[str], batch_size: int = 16, max_tokens: int = 512,
                model=None, tokenizer=None) -> np.ndarray:
    """Scores on the 0-10 scale, in input order; batches sorted by length to limit padding."""
    import torch
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    if model is None:
        tokenizer = AutoTokenizer.from_pretrained(scorer_dir)
        model = LlamaForSequenceClassification.from_pretrained(scorer_dir, dtype=torch.float32).to(_device()).eval()
    device = next(model.parameters()).device
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = np.zeros(len(texts))
    with torch.no_grad():
        for lo in range(0, len(order), batch_size):
            idx = order[lo:lo + batch_size]
            enc = tokenizer([texts[i] for i in idx], truncation=True, max_length=max_tokens, padding=True,
                            return_tensors="pt").to(device)
            with _autocast(device):
                pred = model(**enc).logits.squeeze(-1).float() + getattr(model.config, "label_offset", 0.0)
            out[idx] = (pred.clamp(0, 1) * 10).cpu().numpy()
    return out


class QualityScorer(PipelineStep):
    name = "🏅 quality scorer"
    type = "🤖 - INFERENCE"

    def __init__(self, scorer_dir: str, scores_folder: str, batch_size: int = 16, max_tokens: int = 512):
        super().__init__()
        self.scorer_dir = scorer_dir
        self.scores_folder = scores_folder
        self.batch_size = batch_size
        self.max_tokens = max_tokens

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        docs = list(data or [])
        scores = score_texts(self.scorer_dir, [d.text for d in docs], self.batch_size, self.max_tokens) \
            if docs else np.zeros(0)
        per_language = defaultdict(list)
        for doc, score in zip(docs, scores):
            doc.metadata["quality_score"] = round(float(score), 4)
            per_language[doc.metadata.get("language") or "unknown"].append(float(score))
            self.stat_update("scored")
        write_task_json(self.scores_folder, rank, per_language)
        yield from docs


def thresholds(scores_folder: str, world_size: int, drop_fraction: float, min_docs: int = 20) -> dict:
    """Per-language score below which files are dropped: the ``drop_fraction`` quantile of that
    language; languages with fewer than ``min_docs`` files use the quantile over all files."""
    per_language = defaultdict(list)
    for r in range(world_size):
        for language, values in read_task_json(scores_folder, r, "QualityScorer", world_size).items():
            per_language[language] += values
    return thresholds_of(per_language, drop_fraction, min_docs)


def thresholds_of(per_language: dict, drop_fraction: float, min_docs: int = 20) -> dict:
    """:func:`thresholds` of scores already read ({language: [scores]})."""
    everything = [v for values in per_language.values() for v in values]
    overall = float(np.quantile(everything, drop_fraction)) if everything else 0.0
    return {language: float(np.quantile(values, drop_fraction)) if len(values) >= min_docs else overall
            for language, values in per_language.items()} | {"*": overall}


class PercentileFilter(PipelineStep):
    name = "✂️ quality percentile filter"
    type = "🔻 - FILTER"

    def __init__(self, scores_folder: str, scores_world_size: int, drop_fraction: float = 0.1, min_docs: int = 20):
        super().__init__()
        self.scores_folder = scores_folder
        self.scores_world_size = scores_world_size
        self.drop_fraction = drop_fraction
        self.min_docs = min_docs

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        cut = thresholds(self.scores_folder, self.scores_world_size, self.drop_fraction, self.min_docs)
        for doc in data or []:
            self.stat_update("total")
            language = doc.metadata.get("language") or "unknown"
            if doc.metadata["quality_score"] < cut.get(language, cut["*"]):
                self.stat_update("dropped", "dropped_low_quality")
                continue
            self.stat_update("forwarded")
            yield doc
