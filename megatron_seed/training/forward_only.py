"""One forward-only pass of megatron-core's schedule, the way the trainer validates and objectives
score micro-batches with a model they do not step (DPO's reference log-probs, RL's old and
reference log-probs).

The pass runs the schedule that training runs, so a model split over pipeline stages (interleaved
chunks included) scores as it trains. What a caller collects is what its loss function returns
third (megatron-core's ``(loss, num_tokens, report)``): the schedule hands those back, one per
micro-batch in order, on the last pipeline stage.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Union

import torch


@torch.no_grad()
def forward_only(run, chunks: list, forward_step: Callable, data_iterator: Union[Iterator, list[Iterator]],
                 num_microbatches: int) -> list[Any]:
    """The third element of what ``forward_step``'s loss functions return, one per micro-batch in
    order, from one forward-only pass of megatron-core's schedule over the model ``chunks``; ``[]``
    on every pipeline stage but the last. ``forward_step`` and ``data_iterator`` follow
    megatron-core's contract (one iterator, or one per chunk); micro-batches are
    ``run.train.micro_batch_size`` rows of ``run.data.seq_length`` tokens (the pipeline's message
    shape). The chunks score in eval mode and get back the mode they were in."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    modes = [chunk.training for chunk in chunks]
    for chunk in chunks:
        chunk.eval()
    try:
        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=data_iterator, model=chunks,
            num_microbatches=num_microbatches, seq_length=run.data.seq_length,
            micro_batch_size=run.train.micro_batch_size, forward_only=True)
    finally:
        for chunk, mode in zip(chunks, modes):
            chunk.train(mode)
