"""The objectives the one training loop runs (:mod:`megatron_seed.training.objective` is their seam).

Siblings that share one toolbox: ``pretrain``, ``sft``, ``dpo`` and ``rl`` each import
:mod:`~megatron_seed.training.objectives.common` (packed micro-batches, moving a batch to the device,
the data cache, the masked loss sum, the chat tokenizer, a frozen reference model) and the layers
below training, never one another. Their own helpers sit beside them (``dpo_loss``; ``rl_loss``,
``rl_rewards``, ``rl_sampling``). Each is imported only when ``train.objective`` names it
(:data:`megatron_seed.training.objective.OBJECTIVES`), so nothing is imported here.
"""
