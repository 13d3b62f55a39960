"""Layout-independent initialisation writes every parameter, whatever megatron-core's sharded
state dicts are made of.

megatron-core builds some entries (SwiGLU's gate/up halves of ``linear_fc1``) through a
ShardedTensorFactory: temporary views, new objects on every call. With two model chunks on a rank
(interleaved pipeline), the first chunk's temporaries are freed before the second chunk's are
built, and CPython hands their ids to the new ones. An ``id()``-based "already written" check then
skipped parameters of the second chunk now and then, which made PP2+VPP2 runs differ from one
process intermittently. These chunks reproduce that shape of state dict on purpose."""

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor

from megatron_seed.models import init


class FactoryLikeChunk(torch.nn.Module):
    """One layer's fused gate/up weight whose sharded state dict is rebuilt from fresh views on
    every call, as megatron-core's SwiGLU factory does."""

    def __init__(self, layer: int, num_layers: int, rows: int = 8, cols: int = 4):
        super().__init__()
        self.layer, self.num_layers, self.half = layer, num_layers, rows // 2
        self.weight = torch.nn.Parameter(torch.full((rows, cols), float("nan")))

    def sharded_state_dict(self):
        gate, up = self.weight.detach()[:self.half], self.weight.detach()[self.half:]
        return {
            "gate": ShardedTensor.from_rank_offsets("decoder.layers.mlp.linear_fc1.weight", gate,
                                                   (0, self.layer, self.num_layers), (1, 0, 1),
                                                   replica_id=(0, 0, 0), prepend_axis_num=1),
            "up": ShardedTensor.from_rank_offsets("decoder.layers.mlp.linear_fc1.weight", up,
                                                 (0, self.layer, self.num_layers), (1, 1, 2),
                                                 replica_id=(0, 0, 0), prepend_axis_num=1),
        }


def _expected(chunk: FactoryLikeChunk, seed: int, std: float) -> torch.Tensor:
    """The same rule, computed independently: one N(0, std) tensor per layer, seeded by its key."""
    key = "decoder.layers.mlp.linear_fc1.weight"
    full = init._full_tensor(key, (2 * chunk.half, chunk.weight.shape[1]), f"{key}@({chunk.layer},)", seed, std,
                             chunk.num_layers)
    return full


def test_every_chunk_of_a_rank_is_initialised():
    chunks = [FactoryLikeChunk(layer, 8) for layer in range(8)]
    init.init_parameters(chunks, seed=3, std=0.02, num_layers=8)
    for chunk in chunks:
        assert not torch.isnan(chunk.weight).any(), f"layer {chunk.layer} left uninitialised"
        torch.testing.assert_close(chunk.weight.detach(), _expected(chunk, 3, 0.02), rtol=0, atol=0)


def test_a_tensor_reachable_twice_is_written_once():
    """A tied weight reachable under two keys keeps the value of the first key."""
    weight = torch.nn.Parameter(torch.zeros(4, 4))

    class Tied(torch.nn.Module):
        def sharded_state_dict(self):
            return {"a": ShardedTensor.from_rank_offsets("embedding.word_embeddings.weight", weight.detach()),
                    "b": ShardedTensor.from_rank_offsets("output_layer.weight", weight.detach(), replica_id=1)}

    init.init_parameters([Tied()], seed=0, std=1.0, num_layers=1)
    want = init._full_tensor("embedding.word_embeddings.weight", (4, 4), "embedding.word_embeddings.weight@()",
                             0, 1.0, 1)
    torch.testing.assert_close(weight.detach(), want, rtol=0, atol=0)
