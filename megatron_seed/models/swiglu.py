"""SwiGLU as a module in megatron-core's MLP activation slot (local layer spec).

megatron-core's MLP computes the gated activation inline (``glu`` inside ``MLP.forward``), which
leaves nothing to hand to ``torch.compile``. Its activation-module slot
(``MLPSubmodules.activation_func``, enabled by ``TransformerConfig.use_te_activation_func``; TE
is only the usual provider, not a requirement) receives the whole fc1 output [s, b, 2 * ffn / tp]
and returns [s, b, ffn / tp], exactly what this module computes: ``silu(gate) * up``. Same
arithmetic as megatron-core's inline path; one module that ``megatron_seed.models.compile`` can fuse.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule


class SwiGLU(MegatronModule):  # a MegatronModule: it takes part in sharded_state_dict (empty)
    def __init__(self, config):
        super().__init__(config=config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = torch.chunk(x, 2, dim=-1)
        return F.silu(gate) * up
