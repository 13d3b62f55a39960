"""Our checkpoints: one home for what training writes and loads and what conversion reads and writes.

A checkpoint directory (what ``train.save`` and ``tools/convert_checkpoint.py`` write)::

    model_config.json     the ModelConfig (needed to read without a run config)
    tokenizer/            tokenizer files, when known (HF tokenizer files or the "byte" marker)
    hf_config/            config.json / generation_config.json of the HF model it came from
    iter_0000000/         megatron-core dist_checkpointing (global tensors, any TP/PP)
    latest

Modules:

* ``layout``: the names above, the model config and tokenizer files, ``iteration_dir`` /
  ``latest_checkpoint``, and ``publish`` (``iter_N.partial`` -> ``iter_N``, then ``latest``), the
  one step every writer uses to make a save visible.
* ``checkpointer``: ``Checkpointer`` (sharded, atomic, optionally async saves and loads at any
  TP/PP during training), ``TrainState`` and ``read_train_state``.
* ``reader``: ``CheckpointReader`` (global tensors layer by layer, no process group),
  ``write_model_checkpoint`` (a one-process model filled tensor by tensor, e.g. by a converter),
  ``load_megatron_model`` (one-process evaluation) and ``CheckpointFormatError``.

This package imports neither ``megatron_seed.training`` nor ``megatron_seed.convert``: both use it.
"""
