"""Attention masks of packed rows, in megatron-core's convention (True = masked out).

Here, below the data layer, because the model's own attention builds the mask of one packed row
from ``cu_seqlens`` (models.attention) and the packed-data code builds it from segment ids
(data.packing): both use this one definition.
"""

from __future__ import annotations


def segment_ids_to_attention_mask(segment_ids):
    """``[b, s]`` segment ids -> megatron-core's ``[b, 1, s, s]`` bool mask, True = masked out:
    query t sees key u only if ``u <= t`` and both are in the same segment (block-diagonal causal)."""
    import torch

    s = segment_ids.shape[-1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril()
    return ~(same & causal)[:, None]
