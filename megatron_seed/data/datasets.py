"""Training datasets: megatron-core GPTDataset blends, split into train/valid/test, and the sampler.

Documents are packed into ``seq_length + 1`` token windows with EOD between them; shuffles are
deterministic in the seed; index caches are written once (``data.cache_dir``) and reused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from megatron_seed.config.schema import DataConfig
from megatron_seed.platform.megatron_patches import disable_gpt_dataset_mask_cache


@dataclass
class _TokenizerInfo:
    """The two facts megatron-core's GPT datasets need from a tokenizer."""

    vocab_size: int
    eod: int
    pad: int = 1

    @property
    def unique_identifiers(self) -> dict:
        return {"class": "megatron_seed", "vocab_size": self.vocab_size, "eod": self.eod}


def build_datasets(data: DataConfig, seed: int, vocab_size: int, eod: int,
                   num_samples: tuple[int, int, int]):
    """(train, valid, test) megatron-core datasets; an entry is None when its split is empty."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
    from megatron.core.datasets.utils import get_blend_from_list

    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=data.seq_length,
        blend=None if data.mock else get_blend_from_list(data.blend),
        split=data.split,
        path_to_cache=data.cache_dir,
        tokenizer=_TokenizerInfo(vocab_size=vocab_size, eod=eod),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mid_level_dataset_surplus=0.005,
    )
    cls = MockGPTDataset if data.mock else GPTDataset
    splits = BlendedMegatronDatasetBuilder(cls, list(num_samples), lambda: True, config).build()
    for split in splits:
        _disable_mask_cache(split)
    return splits


def _disable_mask_cache(dataset) -> None:
    """megatron-core 0.16 GPTDataset caches the first sample's loss mask *after* zeroing that
    sample's pad positions in place, so those zeros leak into every later sample, and which sample
    comes first differs between data-parallel layouts. Recomputing masks per sample is cheap."""
    if dataset is None:
        return
    for child in getattr(dataset, "datasets", ()):
        _disable_mask_cache(child)
    disable_gpt_dataset_mask_cache(dataset)  # pinned and checked, as every change to megatron-core


def micro_batches(dataset, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                  device: Optional[torch.device] = None) -> Iterator[dict]:
    """Endless micro-batches for one data-parallel rank, starting at ``consumed_samples``.

    Global sample order is fixed: each step of all ranks covers the next ``mbs * dp`` samples, rank
    r taking its contiguous ``mbs``. The position is therefore one number (consumed samples), which
    is what checkpoints store to resume exactly.
    """
    n = len(dataset)
    position = consumed_samples
    while True:
        start = position + dp_rank * micro_batch_size
        samples = [dataset[(start + i) % n] for i in range(micro_batch_size)]
        position += micro_batch_size * dp_size
        batch = {key: torch.stack([torch.as_tensor(s[key]) for s in samples])
                 for key in ("tokens", "labels", "loss_mask", "position_ids")}
        yield to_device(batch, device)


def to_device(batch: dict, device) -> dict:
    """``batch``'s tensors on ``device``, copied without blocking; as they are on the CPU (or with no
    device), where a copy would only cost time. Every objective's micro-batches go through here."""
    if device is None or device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
