"""Core attention through ``torch.nn.functional.scaled_dot_product_attention``.

A drop-in for megatron-core's ``DotProductAttention`` (same constructor and forward signature,
same [s, b, heads, dim] layout in and [s, b, hidden/tp] out). SDPA picks a fused kernel (flash or
memory-efficient on GPU, a fused CPU kernel on CPU) and handles GQA without materialising
repeated keys and values, which megatron-core's unfused path does. Packed sequences in THD format
(megatron-core's ``PackedSeqParams``: [t, heads, dim] with ``cu_seqlens``) get causal attention
inside each sequence, so the THD data path runs on CPU as it would into Transformer Engine.
"""

from __future__ import annotations

import math
from typing import Optional

import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class SDPAttention(MegatronModule):
    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection=None):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not implement context parallelism; use the "
                             "Transformer Engine spec (model.transformer_impl=transformer_engine)")
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_bias is not None:
            raise ValueError("SDPAttention does not support attention bias")
        mask_type = attn_mask_type or self.attn_mask_type
        thd = packed_seq_params is not None
        if thd:
            if packed_seq_params.qkv_format != "thd" or packed_seq_params.cu_seqlens_q_padded is not None:
                raise ValueError("SDPAttention takes packed sequences in THD format without padding")
            # [t, n, d] (megatron-core squeezed the batch of one) -> [1, t, n, d]
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            attention_mask = _thd_mask(packed_seq_params.cu_seqlens_q, query.shape[0])
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        causal = mask_type == AttnMaskType.causal and attention_mask is None
        mask = None
        if attention_mask is not None:
            mask = ~attention_mask  # megatron masks are True where attention is *not* allowed
        dropout = self.dropout_p if self.training else 0.0
        kwargs = dict(attn_mask=mask, dropout_p=dropout, is_causal=causal, scale=self.softmax_scale,
                      enable_gqa=q.shape[1] != k.shape[1])
        if dropout > 0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = F.scaled_dot_product_attention(q, k, v, **kwargs)
        else:
            out = F.scaled_dot_product_attention(q, k, v, **kwargs)
        # [b, n, s, d] -> [s, b, n*d] ([t, n*d] for THD, as megatron-core expects it back)
        b, n, s, d = out.shape
        out = out.permute(2, 0, 1, 3).reshape(s, b, n * d)
        return out.squeeze(1) if thd else out


def _thd_mask(cu_seqlens, total: int):
    """[1, 1, t, t] megatron-style mask (True: not allowed) of causal attention inside each of the
    packed sequences that ``cu_seqlens`` delimits: the packed-rows mask of one row whose segment
    ids number those sequences."""
    import torch

    from megatron_seed.models.masks import segment_ids_to_attention_mask

    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long().cpu()
    sequence = torch.repeat_interleave(torch.arange(len(lengths)), lengths).to(cu_seqlens.device)
    if sequence.numel() != total:
        raise ValueError(f"packed sequences cover {sequence.numel()} tokens, the input has {total}")
    return segment_ids_to_attention_mask(sequence[None])
