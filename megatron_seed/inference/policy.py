"""A chat policy to sample from: the inference engine's model plus the chat tokenizer that
renders its prompts, loaded from our checkpoint (with the tokenizer stored beside it) or an HF
directory. Pair building, chat evaluation and the demo load their models through here.
"""

from __future__ import annotations

from typing import Optional

from megatron_seed.checkpoint.layout import tokenizer_spec
from megatron_seed.data.chat import load_chat_tokenizer
from megatron_seed.inference.engine import InferenceModel


def load_policy(checkpoint: Optional[str] = None, hf: Optional[str] = None, tokenizer: Optional[str] = None,
                chat_template: Optional[str] = None, dtype: str = "auto"):
    """(InferenceModel, ChatTokenizer) from our checkpoint (its stored tokenizer) or an HF
    directory; ``tokenizer`` (a load_chat_tokenizer spec) overrides either."""
    if (checkpoint is None) == (hf is None):
        raise ValueError("give exactly one of a checkpoint and an HF directory")
    if checkpoint is not None:
        spec = tokenizer or tokenizer_spec(checkpoint)
        if spec is None:
            raise ValueError(f"{checkpoint} holds no tokenizer/ directory: pass a tokenizer")
        model = InferenceModel.from_checkpoint(checkpoint, dtype)
    else:
        spec = tokenizer or hf
        model = InferenceModel.from_hf(hf, dtype)
    return model, load_chat_tokenizer(spec, chat_template)
