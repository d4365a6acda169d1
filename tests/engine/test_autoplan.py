"""zeroinf.load(batch_size="auto"): the planner sizes the batch within the whole gpu_memory
budget, and what it loads generates exactly what an explicitly planned model does."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import zeroinf
from zeroinf.convert import convert
from zeroinf.errors import ConfigError, PlanError
from zeroinf.format import Checkpoint

PROMPT, NEW = 7, 6


@pytest.fixture(scope="module")
def ckpt(tiny_hf: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(convert(tiny_hf("llama"), tmp_path_factory.mktemp("auto") / "zi", progress=False))


def test_auto_batch_generates_what_an_explicit_batch_does(ckpt: Path) -> None:
    budget = 3 * max(u.nbytes for u in Checkpoint(ckpt).units) + (2 << 20)
    with zeroinf.load(ckpt, device="cpu", gpu_memory=budget, batch_size="auto",
                      prompt_len=PROMPT, max_new_tokens=NEW, progress=False) as m:  # fmt: skip
        plan = m.plan
        assert m.batch_size == plan.batch >= 1 and m.micro_batch == plan.micro_batch
        assert plan.gpu_bytes <= budget and plan.kv_bytes == m.kv_bytes(m.batch_size, PROMPT + NEW)
        assert plan.predicted_tok_s > 0 and "predicted:" in str(plan)
        ids = torch.randint(4, m.config.vocab_size, (m.batch_size, PROMPT),
                            generator=torch.Generator().manual_seed(0))  # fmt: skip
        out = m.generate(ids, max_new_tokens=NEW)
    with zeroinf.load(ckpt, device="cpu", gpu_memory=None, batch_size=m.batch_size,
                      progress=False) as ref:  # fmt: skip
        assert ref.batch_size == m.batch_size and ref.plan.kv_bytes == 0
        assert torch.equal(ref.generate(ids, max_new_tokens=NEW), out)


def test_explicit_batch_keeps_the_weights_budget(ckpt: Path) -> None:
    budget = 3 * max(u.nbytes for u in Checkpoint(ckpt).units)
    with zeroinf.load(ckpt, device="cpu", gpu_memory=budget, progress=False) as a:
        placements = a.plan.placements
        assert a.batch_size is None and a.micro_batch is None
    with zeroinf.load(ckpt, device="cpu", gpu_memory=budget, batch_size=4, progress=False) as b:
        assert b.plan.placements == placements and b.batch_size == 4


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": "auto", "max_new_tokens": 4}, "batch_size='auto' needs prompt_len"),
        ({"batch_size": "auto", "prompt_len": 4}, "batch_size='auto' needs max_new_tokens"),
        ({"batch_size": "many"}, "batch_size='many': an integer >= 1"),
        ({"batch_size": 0}, "batch_size=0"),
    ],
)
def test_bad_batch_arguments(ckpt: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        zeroinf.load(ckpt, device="cpu", progress=False, **kwargs)


def test_auto_budget_too_small_names_the_numbers(ckpt: Path) -> None:
    with pytest.raises(PlanError, match=r"gpu_memory 64.00 KiB cannot hold 1 streaming slot"):
        zeroinf.load(ckpt, device="cpu", gpu_memory="64KiB", batch_size="auto",
                     prompt_len=PROMPT, max_new_tokens=NEW, progress=False)  # fmt: skip
