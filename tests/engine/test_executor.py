"""The streaming executor against transformers' own generate (float32, greedy) for every family,
tier, prefetch depth and budget; plus ordering of copies and compute from a recorded trace."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

import zeroinf
from zeroinf.convert import convert
from zeroinf.engine.gather import gathered_bytes
from zeroinf.engine.prefetcher import Trace
from zeroinf.errors import ConfigError, PlanError
from zeroinf.format import Checkpoint
from zeroinf.tiny import save_tiny_hf

FAMILIES = ["llama", "mistral", "qwen2", "opt", "mixtral", "gpt_neox"]
NEW = 8


def prompts(vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A left-padded batch of 3 prompts of lengths 7, 4 and 1."""
    g = torch.Generator().manual_seed(seed)
    lengths = [7, 4, 1]
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, -n:] = torch.randint(4, vocab, (n,), generator=g)
        mask[i, -n:] = 1
    return ids, mask


@pytest.fixture(scope="module", params=FAMILIES)
def family_ckpt(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """(converted checkpoint, transformers' greedy output) per family."""
    d = tmp_path_factory.mktemp(request.param)
    hf = save_tiny_hf(d / "hf", request.param, seed=1)
    ckpt = convert(d / "hf", d / "zi", progress=False)
    ids, mask = prompts(hf.config.vocab_size)
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                          min_new_tokens=NEW, pad_token_id=0)  # fmt: skip
    return Path(ckpt), ids, mask, ref


def budgets(ckpt: Path, prefetch: int) -> dict[str, int | None]:
    """gpu_memory for no unit streamed, some, and all (all but the embed unit, whose table
    stays on the host once anything streams: only its other tensors take device memory)."""
    c = Checkpoint(ckpt)
    kept = gathered_bytes(c)
    sizes = {u.name: u.nbytes for u in c.units}
    others = [nb for name, nb in sizes.items() if name not in kept]
    all_streamed = prefetch * max(others) + sum(sizes[name] - kept[name] for name in kept)
    # room for the smallest unit besides the slots (with prefetch 3 and 3 layers, the whole
    # model but the table then fits: nothing streams, the table still stays on the host)
    some = all_streamed + min(others)
    return {"none": None, "some": some, "all": all_streamed}


@pytest.mark.parametrize("offload", ["cpu", "nvme"])
@pytest.mark.parametrize("prefetch", [1, 2, 3])
@pytest.mark.parametrize("streamed", ["none", "some", "all"])
def test_matches_transformers(family_ckpt, offload: str, prefetch: int, streamed: str) -> None:
    ckpt, ids, mask, ref = family_ckpt
    budget = budgets(ckpt, prefetch)[streamed]
    with zeroinf.load(ckpt, device="cpu", offload=offload, gpu_memory=budget,
                      prefetch=prefetch) as model:  # fmt: skip
        n_streamed = len(model.plan.streamed)
        assert n_streamed > 0 or streamed != "all"
        assert n_streamed == 0 or streamed != "none"
        assert (n_streamed == len(model.plan.placements) - 1) == (streamed == "all")
        tiers = {p.unit: p.tier for p in model.plan.placements}
        assert tiers["embed"] == ("gpu" if streamed == "none" else "host")
        out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW)
        again = model.generate(ids, attention_mask=mask, max_new_tokens=NEW)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(again, ref, rtol=0, atol=0)


def test_embed_table_stays_on_the_host(family_ckpt) -> None:
    """Once anything streams, the embed unit is never copied to the device: its table's rows
    are gathered on the host, its other tensors stay resident, outputs are unchanged."""
    ckpt, ids, mask, ref = family_ckpt
    trace = Trace()
    with zeroinf.load(ckpt, device="cpu", gpu_memory=budgets(ckpt, 2)["all"],
                      trace=trace) as model:  # fmt: skip
        embed = model.plan.placements[0]
        assert embed.tier == "host" and embed.host_only == gathered_bytes(Checkpoint(ckpt))["embed"]
        table = model.prefetcher.tables[0]
        assert table.shape == (model.config.vocab_size, table.shape[1])
        assert model.prefetcher.resident[0].numel() == embed.device_bytes
        out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW)
    assert trace.index("copy_start", 0) == -1 and trace.index("copy_start", 1) >= 0
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_eos_stops_and_pads_like_transformers(tmp_path: Path) -> None:
    hf = save_tiny_hf(tmp_path / "hf", "llama", seed=3)
    ckpt = convert(tmp_path / "hf", tmp_path / "zi", progress=False)
    ids, mask = prompts(hf.config.vocab_size, seed=3)
    with torch.no_grad():
        free = hf.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                           min_new_tokens=NEW, pad_token_id=0)  # fmt: skip
    eos = int(free[0, ids.shape[1] + 2])  # a token row 0 emits third: it stops there
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                          eos_token_id=eos, pad_token_id=0)  # fmt: skip
    with zeroinf.load(ckpt, device="cpu", gpu_memory=None) as model:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=eos,
                             pad_token_id=0)  # fmt: skip
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_sampling_reproducible_with_seed(tmp_path: Path) -> None:
    hf = save_tiny_hf(tmp_path / "hf", "llama", seed=4)
    ckpt = convert(tmp_path / "hf", tmp_path / "zi", progress=False)
    ids, mask = prompts(hf.config.vocab_size)
    kw = dict(attention_mask=mask, max_new_tokens=NEW, do_sample=True, temperature=0.9,
              top_p=0.9, top_k=50)  # fmt: skip
    with zeroinf.load(ckpt, device="cpu", gpu_memory=None) as model:
        a = model.generate(ids, seed=7, **kw)
        b = model.generate(ids, seed=7, **kw)
        c = model.generate(ids, seed=8, **kw)
        greedy = model.generate(ids, attention_mask=mask, max_new_tokens=NEW)
        top1 = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=True,
                              top_k=1, seed=1)  # fmt: skip
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(top1, greedy)  # top_k=1 sampling is greedy decoding


def test_copies_overlap_compute_and_never_run_late(tmp_path: Path) -> None:
    """Trace ordering, not timings: the copy of the next streamed unit is issued while unit j
    computes (the compute of j waits for it, and would time out if copies ran serially), and no
    compute starts before its own unit's copy completed."""
    hf = save_tiny_hf(tmp_path / "hf", "llama", seed=5)
    ckpt = convert(tmp_path / "hf", tmp_path / "zi", progress=False)
    ids, mask = prompts(hf.config.vocab_size)
    trace = Trace()
    prefetch = 2
    budget = budgets(Path(ckpt), prefetch)["all"]
    with zeroinf.load(ckpt, device="cpu", gpu_memory=budget, prefetch=prefetch,
                      trace=trace) as model:  # fmt: skip
        order = [j for j, p in enumerate(model.plan.placements) if p in model.plan.streamed]
        real_layer = model.family.layer

        def wait_copy_started(unit: int, occurrence: int) -> bool:
            deadline = time.monotonic() + 10
            while trace.index("copy_start", unit, occurrence) < 0:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.001)
            return True

        real_head = model.family.head

        def hold() -> None:
            """Hold this compute until the copy of the next streamed unit was issued."""
            computes = [e for e in trace.events if e[0] == "compute_start"]
            j = computes[-1][1]
            g = len(computes) - 1  # position of this compute in the cyclic streamed order
            nxt = order[(g + 1) % len(order)]
            occ = (g + 1) // len(order)
            assert wait_copy_started(nxt, occ), (
                f"copy of unit {nxt} was not issued while unit {j} computed"
            )

        class Family:  # the real math, with compute held until the next copy was issued
            embed = model.family.embed

            @staticmethod
            def layer(h, w, kv, ctx, cfg):  # noqa: ANN001, ANN205
                hold()
                return real_layer(h, w, kv, ctx, cfg)

            @staticmethod
            def head(h, w, cfg):  # noqa: ANN001, ANN205
                # the first pass's only: the copy after the last pass's head need not come
                # (the job may end there); the overlap is asserted on the first pass below
                if sum(e[0] == "compute_start" for e in trace.events) <= len(order):
                    hold()
                return real_head(h, w, cfg)

        model.executor.family = Family
        model.generate(ids, attention_mask=mask, max_new_tokens=3)
    ev = [(w, u) for w, u, _ in trace.events]
    for j in order:
        starts = [i for i, e in enumerate(ev) if e == ("compute_start", j)]
        dones = [i for i, e in enumerate(ev) if e == ("copy_done", j)]
        assert len(starts) == 3  # one per forward pass
        for k, s in enumerate(starts):
            assert dones[k] < s, f"unit {j} computed before its copy completed"
    # the overlap itself: in the first pass, the copy of the next streamed unit is issued
    # before the compute of unit j completes (possibly even before it starts)
    for pos, j in enumerate(order):
        nxt = order[(pos + 1) % len(order)]
        wraps = pos + 1 == len(order)  # the next pass's first unit: its second fill
        assert trace.index("copy_start", nxt, int(wraps)) < trace.index("compute_done", j), (j, nxt)


def test_bad_input_errors(tmp_path: Path) -> None:
    hf = save_tiny_hf(tmp_path / "hf", "opt", seed=6)
    ckpt = convert(tmp_path / "hf", tmp_path / "zi", progress=False)
    largest = max(u.nbytes for u in Checkpoint(ckpt).units)
    with pytest.raises(PlanError, match=r"gpu_memory .* slot"):
        zeroinf.load(ckpt, device="cpu", gpu_memory=2 * largest - 1, prefetch=2)
    with zeroinf.load(ckpt, device="cpu", gpu_memory=None) as model:
        limit = hf.config.max_position_embeddings
        with pytest.raises(ConfigError, match="positions"):
            model.generate(torch.ones(1, limit, dtype=torch.long), max_new_tokens=1)
        with pytest.raises(ConfigError, match="non-empty"):
            model.generate(torch.ones(0, 4, dtype=torch.long))
        with pytest.raises(ConfigError, match="left padded"):
            model.generate(torch.ones(1, 4, dtype=torch.long),
                           attention_mask=torch.tensor([[1, 1, 1, 0]]))  # fmt: skip
        with pytest.raises(ConfigError, match="max_new_tokens"):
            model.generate(torch.ones(1, 4, dtype=torch.long), max_new_tokens=0)


@pytest.mark.parametrize("prefill_tokens", [1, 7, 14])
def test_prefill_in_row_chunks_matches(family_ckpt, prefill_tokens: int) -> None:
    """The block schedule: prefill micro-batches of 1, 1 and 2 rows share each streamed unit."""
    ckpt, ids, mask, ref = family_ckpt
    budget = budgets(ckpt, 2)["all"]
    with zeroinf.load(ckpt, device="cpu", gpu_memory=budget,
                      prefill_tokens=prefill_tokens) as model:  # fmt: skip
        out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
