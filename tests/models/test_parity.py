"""zeroinf's float32 forward vs transformers on the same weights (the oracle): prefill logits
of a left-padded batch, greedy generation, and the logits of every generated step."""

from __future__ import annotations

import pytest
import torch
from driver import Runner, left_padded_batch
from model_cases import CASES, case_checkpoint, case_model

LENGTHS = [7, 3, 11]  # prompts of different lengths -> left padding
NEW_TOKENS = 20
TOL = 1e-4  # max abs diff relative to the reference logits' max abs


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("case", list(CASES))
@torch.no_grad()
def test_matches_transformers(case: str) -> None:
    model = case_model(case)
    runner = Runner(*case_checkpoint(case), dtype=torch.float32)
    ids, mask = left_padded_batch(LENGTHS, model.config.vocab_size, seed=2)

    # Positions as generate() derives them from the mask (forward alone counts the padding).
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    ref = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits  # [B, P, V]
    gen = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    tokens, prefill, steps = runner.generate(ids, mask, NEW_TOKENS)

    real = mask.bool()  # padded positions hold no meaningful logits in either implementation
    assert rel_err(prefill[real], ref[real]) < TOL
    assert torch.equal(tokens, gen.sequences[:, ids.shape[1] :])
    assert rel_err(torch.stack(steps, 1), torch.stack(gen.logits, 1)) < TOL


@pytest.mark.parametrize("case", [c for c in CASES if "window" in c])
@torch.no_grad()
def test_sliding_window_matters(case: str) -> None:
    """The windowed cases would pass vacuously if the window never cut anything off."""
    model = case_model(case)
    config, tensors = case_checkpoint(case)
    unwindowed = {**config, "sliding_window": None, "use_sliding_window": False}
    ids, mask = left_padded_batch(LENGTHS, model.config.vocab_size, seed=2)
    ref = model(input_ids=ids, attention_mask=mask).logits
    _, prefill, _ = Runner(unwindowed, tensors, torch.float32).generate(ids, mask, 1)
    real = mask.bool()
    assert rel_err(prefill[real], ref[real]) > 1e-3
