"""The executor on a real GPU (run on the device machine: pytest -m gpu): the copy stream,
events and pinned memory paths, against transformers' own greedy generate in float32."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import zeroinf
from zeroinf.api import workspace_bytes
from zeroinf.convert import convert
from zeroinf.format import Checkpoint
from zeroinf.models import ModelConfig
from zeroinf.tiny import save_tiny_hf

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("offload", ["cpu", "nvme"])
@pytest.mark.parametrize("prefetch", [1, 2])
def test_gpu_streaming_matches_transformers(tmp_path: Path, family: str, offload: str,
                                            prefetch: int) -> None:  # fmt: skip
    hf = save_tiny_hf(tmp_path / "hf", family, seed=2)
    ckpt = convert(tmp_path / "hf", tmp_path / "zi", progress=False)
    ids = torch.randint(4, hf.config.vocab_size, (4, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[3, :8] = 0
    with torch.no_grad():
        ref = hf.cuda().generate(
            ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=12, do_sample=False,
            min_new_tokens=12, pad_token_id=0,
        ).cpu()  # fmt: skip
    largest = max(u.nbytes for u in Checkpoint(ckpt).units)
    workspace = workspace_bytes(ModelConfig.from_hf(Checkpoint(ckpt).config), 4, 9)
    with zeroinf.load(ckpt, device="cuda", offload=offload, prefetch=prefetch, prefill_tokens=9,
                      gpu_memory=prefetch * largest + workspace) as model:  # fmt: skip
        assert len(model.plan.streamed) == len(model.plan.placements)  # everything streams
        out = model.generate(ids, attention_mask=mask, max_new_tokens=12)
        again = model.generate(ids, attention_mask=mask, max_new_tokens=12)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(again, ref, rtol=0, atol=0)
