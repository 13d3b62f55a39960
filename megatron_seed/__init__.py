"""megatron-seed: an open training stack for code LLMs built on megatron-core."""

import warnings

# megatron-core warns at import, once per module, that optional GPU libraries are missing. On a
# CPU machine that is the expected state; the CPU layer (platform/megatron_cpu.py) handles it.
warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).*not installed.*")
warnings.filterwarnings("ignore", message=r".*full scope is deprecated.*")

__version__ = "0.1.0"
