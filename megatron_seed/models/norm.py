"""RMSNorm for the local layer spec.

megatron-core's local spec falls back to ``torch.nn.RMSNorm`` (``WrappedTorchNorm``), which refuses
sequence parallelism because its weight is not marked for the tensor-parallel gradient all-reduce.
This one computes the same thing (``torch.nn.functional.rms_norm``) and marks its weight with
``sequence_parallel`` so megatron-core's ``finalize_model_grads`` sums its gradient across TP ranks
(each rank sees only its sequence shard).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class RMSNorm(torch.nn.Module):
    def __init__(self, config, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.config = config
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
