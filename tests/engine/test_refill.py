"""Continuous refill: a finished row's place goes to the next prompt, whose prefill shares the
weight pass with the other rows' decode. Oracle: one-prompt-at-a-time generate() (float32,
greedy), itself checked against transformers in test_executor.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import zeroinf
from zeroinf.convert import convert
from zeroinf.engine import refill
from zeroinf.engine.prefetcher import Trace
from zeroinf.engine.refill import Request
from zeroinf.format import Checkpoint
from zeroinf.tiny import save_tiny_hf


@pytest.fixture(scope="module", params=["llama", "opt"])
def ckpt(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp(f"refill-{request.param}")
    save_tiny_hf(d / "hf", request.param, seed=21, tokenizer=False)
    return Path(convert(d / "hf", d / "zi", progress=False))


def requests(vocab: int, n: int = 9) -> list[Request]:
    g = torch.Generator().manual_seed(5)
    out = []
    for i in range(n):
        length = int(torch.randint(1, 12, (1,), generator=g))
        ids = torch.randint(4, vocab, (length,), generator=g).tolist()
        out.append(Request(ids, max_new_tokens=int(torch.randint(1, 10, (1,), generator=g)), key=i))
    return out


def one_at_a_time(model: zeroinf.Model, r: Request, eos: int | None = None) -> list[int]:
    out = model.generate(torch.tensor([r.ids]), max_new_tokens=r.max_new_tokens, eos_token_id=eos)
    return out[0, len(r.ids) :].tolist()


@pytest.mark.parametrize("batch_size", [1, 3, 4])
def test_refill_equals_one_prompt_at_a_time(ckpt: Path, batch_size: int) -> None:
    largest = max(u.nbytes for u in Checkpoint(ckpt).units)
    trace = Trace()
    with zeroinf.load(ckpt, device="cpu", gpu_memory=2 * largest, trace=trace) as model:
        reqs = requests(model.config.vocab_size)
        got = {r.key: toks for r, toks in model.generate_stream(reqs, batch_size=batch_size)}
        passes = sum(1 for w, u, _ in trace.events if w == "compute_start" and u == 0)
        want = {r.key: one_at_a_time(model, r) for r in reqs}
    assert got == want
    # refill shares passes: fewer weight passes than generating the batches one after another
    if batch_size > 1:
        assert passes < sum(r.max_new_tokens for r in reqs)


def test_refill_stops_at_eos_and_compacts_the_cache(
    ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    compactions = []
    real = refill._compact
    monkeypatch.setattr(refill, "_compact", lambda *a: compactions.append(1) or real(*a))
    with zeroinf.load(ckpt, device="cpu", gpu_memory=None) as model:
        reqs = requests(model.config.vocab_size, n=12)
        free = {r.key: one_at_a_time(model, r) for r in reqs}
        eos = next(t[1] for t in free.values() if len(t) > 2)  # a token some row emits second
        want = {r.key: one_at_a_time(model, r, eos) for r in reqs}
        for r in reqs:  # generate() pads after EOS; refill returns the tokens up to EOS
            toks = want[r.key]
            want[r.key] = toks[: toks.index(eos) + 1] if eos in toks else toks
        got = {r.key: t for r, t in model.generate_stream(reqs, batch_size=2, eos_token_id=eos)}
    assert got == want
    assert any(eos in t for t in got.values())
    assert compactions  # the cache (2 x the longest request) filled up and moved left


def test_refill_sampling_is_per_request(ckpt: Path) -> None:
    """A sampled row's tokens depend on its own seed only, not on its batch-mates."""
    with zeroinf.load(ckpt, device="cpu", gpu_memory=None) as model:
        reqs = [Request(r.ids, r.max_new_tokens, seed=100 + i, key=i)
                for i, r in enumerate(requests(model.config.vocab_size))]  # fmt: skip
        kw = dict(do_sample=True, temperature=0.8, top_p=0.9)
        a = {r.key: t for r, t in model.generate_stream(reqs, batch_size=3, **kw)}
        b = {r.key: t for r, t in model.generate_stream(reqs[::-1], batch_size=2, **kw)}
    assert a == b
