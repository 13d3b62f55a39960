"""Continuing one row of a finished generation from its KV cache gives the logits of a fresh
forward over the whole sequence (the oracle's rating fallback relies on it)."""

import torch

from megatron_seed.inference.engine import InferenceModel, continue_row, generate

from test_convert import make_hf


def test_continue_row_equals_a_fresh_forward(tmp_path):
    hf = make_hf(tmp_path / "hf", heads=4, kv=2, hidden=64, tied=False)
    model = InferenceModel.from_hf(str(tmp_path / "hf"), torch.float32)
    prompts = [[5, 9, 11, 3, 7, 8, 2], [4, 6], [10, 12, 14, 16]]  # left padding differs per row
    # eos 1 stops rows at different steps; the cache keeps running for the others
    outs, state = generate(model, prompts, 12, greedy=True, eos_id=1, return_state=True)
    extra = [20, 21, 22]
    for row, out in enumerate(outs):
        reply = [t for t in out if t != 1]
        for kept in (reply, reply[:3]):  # the whole reply, and a prefix of it
            got = continue_row(model, state, row, kept, extra)
            ids = torch.tensor([prompts[row] + kept + extra])
            with torch.no_grad():
                want = hf(input_ids=ids).logits[0, -1].float()
            torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
