"""Memory terms of context parallelism's attention (``parallel.context > 1``), for the planner.

Everything outside core attention simply runs on ``s / cp`` tokens per rank (megatron-core's
layout: 2 cp chunks, rank r holding chunks r and 2 cp - 1 - r), which
:mod:`megatron_seed.planning.memory` handles by planning at the local sequence length. What differs
is the attention itself, in two implementations:

* **ring** (local spec: CPU, or a GPU without Transformer Engine): ``_RingAttention`` in
  ``megatron_seed/models/context_parallel.py``. It computes in float32 and saves ``q, k, v`` (the
  tensors the SDPA path saves too), its **float32 output** and the log-sum-exp. Its forward and
  backward hold whole ``[b, heads / tp, s / cp, s / cp]`` float32 score blocks, one key/value block
  at a time: this is its working set, counted tensor by tensor below and checked against
  allocation counts of the real function.
* **te** (GPU with Transformer Engine): ``AttnFuncWithCPAndKVP2P``, the ring megatron-core selects by
  default (``cp_comm_type`` p2p). It saves what flash attention saves (q, the last key/value block
  received, the output, the log-sum-exp), the same sizes as without CP at ``s / cp``, so the saved
  tensors are planned like the GPU path without CP. On top come its point-to-point buffers,
  counted from its source (Transformer Engine 2.x, non-FP8): see :func:`te_ring_working_bytes`.

Sizes: ``e`` bytes per compute element, ``b`` the micro-batch, ``s`` the local sequence ``s / cp``,
``a = heads / tp``, ``g = query groups / tp``, ``d`` the head dimension.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # memory imports this module; the layout is only needed for its fields
    from megatron_seed.config.schema import ModelConfig
    from megatron_seed.planning.memory import Layout


def _shape(model: ModelConfig, layout: Layout) -> tuple[int, int, int, int, int]:
    t = layout.tp
    return (layout.micro_batch_size, model.num_attention_heads // t, model.num_query_groups // t,
            layout.local_seq_length, model.head_dim)


def ring_working_bytes(model: ModelConfig, layout: Layout) -> int:
    """Peak above the saved activations inside the local ring's backward (``cp >= 2``), as the
    function allocates it. Four float32 score blocks ``[b, a, s, s]`` are alive at once: the
    previous step's probabilities and score gradient stay referenced while the next step's
    probabilities (scores, scaled, masked, exponentiated) and ``dO V^T - delta`` are made. Beside
    them: the float32 query gradient, the key/value blocks expanded to all heads (GQA), one
    step's value gradient at all heads and the previous key gradient, the travelling
    ``[4, b, g, s, d]`` buffer (keys, values, their gradients) twice (the one received and the one
    just sent, which the send request keeps), the row sums ``delta`` and, in bf16, float32 copies
    of q and of the output gradient. The forward holds three blocks and fewer vectors, so it is
    never the larger."""
    b, a, g, s, d = _shape(model, layout)
    block = 4 * b * a * s * s
    q = 4 * b * a * s * d
    kv = 4 * b * g * s * d
    expanded = 2 * q if g < a else 0
    # Two moments compete: making the score gradient (this step's value gradient at all heads) and
    # masking the next step's scores (the [s, s] boolean mask; the previous value gradient, summed
    # over the heads of a group).
    at_gradient = q + expanded + q + kv + 8 * kv
    at_scores = q + expanded + 2 * kv + 8 * kv + s * s
    rows = 4 * b * a * s + 2 * 8 * s  # delta, and the int64 positions of the query and key blocks
    upcast = 2 * q if layout.compute_bytes == 2 else 0
    return 4 * block + max(at_gradient, at_scores) + rows + upcast


def te_ring_working_bytes(model: ModelConfig, layout: Layout) -> int:
    """Peak of Transformer Engine's p2p ring above what it saves (assumed: TE 2.x
    ``AttnFuncWithCPAndKVP2P``, bf16/fp16, no FP8, flash or cuDNN kernels that keep no scores).
    Forward: the list of received key/value blocks (``cp`` of them, each ``[2, b, s, g, d]``) and
    the per-step outputs (``cp`` x ``[b, s, a, d]``) live until the corrected float32 output is
    made. Backward: a ``dq`` buffer, two ``[2, key/value]`` send/receive pairs (blocks and their
    gradients) and one step's ``dq, dk, dv``. Both are placed at the attention backward's point of
    the step, a slight overestimate for the forward (fewer activations are alive then); at
    realistic sizes either is far below the MLP's backward or the loss phase."""
    b, a, g, s, d = _shape(model, layout)
    e, cp = layout.compute_bytes, layout.cp
    q, kv = e * b * a * s * d, 2 * e * b * g * s * d  # q-sized; k and v together
    forward = cp * kv + cp * q + 4 * b * a * s * d + cp * 4 * b * a * s  # + fp32 output, per-step lse
    backward = q + 4 * kv + q + kv
    return max(forward, backward)


def attention_working_bytes(model: ModelConfig, layout: Layout) -> int:
    """Working set of one layer's context-parallel core attention (0 without CP)."""
    if layout.cp == 1:
        return 0
    if layout.cp_attention == "te":
        return te_ring_working_bytes(model, layout)
    return ring_working_bytes(model, layout)
