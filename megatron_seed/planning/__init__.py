"""Plan a run before launching it: per-rank device memory of a layout (:mod:`.memory`)."""

from megatron_seed.planning.memory import MemoryPlan, parse_bytes, plan_memory, suggest

__all__ = ["MemoryPlan", "parse_bytes", "plan_memory", "suggest"]
