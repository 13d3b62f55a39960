"""Triton kernels (GPU), each to come with a plain-torch reference. None yet: on CPU the
elementwise chains are fused by ``torch.compile`` (megatron_seed.models.compile), on GPU by
Transformer Engine's layers."""
