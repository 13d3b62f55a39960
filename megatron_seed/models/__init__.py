"""The model: megatron-core GPT with our layer specs, FP8 emulation, CPU kernels."""
