"""Isolated execution of model-written code (see runner.py for what is and is not isolated)."""

from megatron_seed.sandbox.runner import STATUSES, Limits, Result, Sandbox

__all__ = ["Sandbox", "Limits", "Result", "STATUSES"]
