"""Continuous refill: when a row finishes, a waiting prompt takes its place, and the new prompt's
prefill rides in the same weight pass as the other rows' decode tokens (each streamed unit
crosses PCIe once for both). DeepSpeed-MII calls this Dynamic SplitFuse.

Rows share one cache index per pass: pass p writes every running row's new token at cache index
t, and a prompt of P tokens admitted in that pass is written at [t - P + 1, t] of its row, so that
from the next pass on it decodes beside the others. A row's cache entries before its prompt are
masked out (positions count only a row's own tokens), so a row never sees its predecessor. When
the write index reaches the cache's end, every row's live window moves left by the oldest live
start (one copy of the KV cache).

Each pass is one call of the streaming loop with one micro-batch spanning the decoding rows
(empty rows and rows being prefilled inside the span ride along, their results dropped) and one
micro-batch per run of adjacent admitted prompts (left padded to the run's longest).

With ranks (engine/distributed.py), every pass all-gathers each streamed unit, so the ranks of a
group must run the same number of passes, but refill cannot know its pass count up front. So
before each pass a rank with work asks the group for one more pass (RankGroup.agree_passes(1),
one small all-reduce MAX): the same agreement that generate() makes once per call (asking for
its max_new_tokens) and that Model.finish() makes with 0 until every rank is done. A rank runs
exactly the agreed number of passes, computing while it has rows and skipping (streaming
without computing, Executor.skip_pass) after that, and only then agrees again; so any mix of
refill, generate and finish on the ranks stays in lockstep. A rank whose own requests are all
done returns (its next call, or finish() in close(), keeps joining until no rank has work).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch

from zeroinf.engine.distributed import RankGroup
from zeroinf.engine.executor import Executor, MicroBatch
from zeroinf.engine.generate import GenerationConfig, sample
from zeroinf.errors import ConfigError
from zeroinf.models.base import LayerKV, build_context


@dataclass
class Request:
    """One prompt: its ids, how many tokens it may add, and (when sampling) its own seed."""

    ids: list[int]
    max_new_tokens: int
    seed: int | None = None
    key: object = None  # the caller's handle, returned with the result


@dataclass
class _Row:
    req: Request
    tokens: list[int] = field(default_factory=list)
    gen: torch.Generator | None = None
    prefill: bool = True  # admitted in this pass: the next pass runs its prompt


def generate_refill(
    executor: Executor,
    requests: Iterable[Request],
    gc: GenerationConfig,
    batch_size: int,
    new_kv: Callable[[int, int], list[LayerKV]],
    device: torch.device,
    cache_tokens: int,
    group: RankGroup | None = None,
) -> Iterator[tuple[Request, list[int]]]:
    """Yield (request, new token ids) as rows finish (EOS included when it stopped a row).

    gc: sampling settings shared by all rows (its max_new_tokens and seed are unused: each
    request carries its own). cache_tokens: KV cache length per row; it must hold the longest
    prompt plus its new tokens. group: this rank's partition group; every pass is agreed with
    the other ranks first (see the module docstring)."""
    waiting = deque(requests)
    for r in waiting:  # every check before the first pass: a rank must not fail mid-agreement
        _check(r)
    longest = max((len(r.ids) + r.max_new_tokens for r in waiting), default=0)
    if longest > cache_tokens:
        raise ConfigError(f"cache_tokens {cache_tokens} < longest prompt + new tokens {longest}")
    if not waiting:
        return  # nothing to compute: no cache; with ranks, finish() joins the others' passes
    rows: list[_Row | None] = [None] * batch_size
    kv = new_kv(batch_size, cache_tokens)  # zero-filled: masked keys meet a zero weight
    mask = torch.zeros(batch_size, cache_tokens, dtype=torch.long, device=device)
    last = torch.zeros(batch_size, dtype=torch.long, device=device)  # each row's newest token
    eos = set(gc.eos_token_id)
    t = -1  # the cache index the next pass writes decode tokens at
    left = 0  # passes agreed with the group and not yet run (a single process: one at a time)
    try:
        while waiting or any(rows) or left:
            if not left:
                left = group.agree_passes(1) if group is not None else 1
            left -= 1
            if not (waiting or any(rows)):
                # another rank's generate() asked for more passes than this rank needs
                executor.skip_pass()
                continue
            for i in range(batch_size):  # admit prompts into free rows
                if rows[i] is None and waiting:
                    rows[i] = _admit(waiting.popleft(), gc, device)
            t += 1
            t = max([t] + [len(r.req.ids) - 1 for r in rows if r is not None and r.prefill])
            if t >= cache_tokens:
                t = _compact(rows, mask, kv, t)
            decoding = [i for i, r in enumerate(rows) if r is not None and not r.prefill]
            admitted = [i for i, r in enumerate(rows) if r is not None and r.prefill]
            parts: list[MicroBatch] = []
            if decoding:
                # One micro-batch spans every decoding row, so each unit's weights are read
                # once for all of them (not once per run of adjacent rows: as rows finish and
                # prompts arrive, runs fragment into dozens). Empty rows and rows being
                # prefilled inside the span ride along: their results are dropped, and their
                # writes at index t are masked (empty) or overwritten by the prefill below,
                # which comes after the span in every unit.
                a, b = decoding[0], decoding[-1] + 1
                mask[decoding, t] = 1
                parts.append(MicroBatch(last[a:b, None], build_context(mask[a:b], t, 1),
                                        [c.rows(a, b) for c in kv]))  # fmt: skip
            # one-token prompts prefill alone: an int8 cache's prefill rule goes by the step's
            # length (models.layers.attend), and generate() prefills them as one-token steps
            alone = {i for i in admitted if len(rows[i].req.ids) == 1}
            for a, b in _adjacent(admitted, alone):
                # prompts of adjacent admitted rows prefill together, left padded to the
                # longest (P): each prompt ends at index t; the padding's keys, written before
                # a row's prompt, stay masked like its predecessor's
                prompts = [rows[i].req.ids for i in range(a, b)]
                P = max(len(q) for q in prompts)
                for i, q in zip(range(a, b), prompts, strict=True):
                    mask[i, :] = 0
                    mask[i, t - len(q) + 1 : t + 1] = 1
                padded = [[0] * (P - len(q)) + q for q in prompts]
                ids = torch.tensor(padded, dtype=torch.long, device=device)
                ctx = build_context(mask[a:b], t - P + 1, P)
                parts.append(MicroBatch(ids, ctx, [c.rows(a, b) for c in kv]))
            out = executor.forward(parts)
            if decoding:  # the span's rows that decode
                out[0] = out[0][torch.tensor(decoding, device=device) - decoding[0]]
            logits = torch.cat(out)  # [rows in `order`, V]
            order = decoding + admitted
            gens = [rows[i].gen for i in order] if gc.do_sample else None  # one per row
            toks = sample(logits, gc, gens)
            last[order] = toks
            for i, tok in zip(order, toks.tolist(), strict=True):  # one host sync per pass
                row = rows[i]
                row.prefill = False
                row.tokens.append(tok)
                if tok in eos or len(row.tokens) == row.req.max_new_tokens:
                    yield row.req, row.tokens
                    rows[i] = None
                    mask[i, :] = 0
    except BaseException:
        # an error, or the caller closing the stream early (GeneratorExit at a yield): the
        # passes this rank agreed to still run, so the others (and this rank's finish()) stay
        # in lockstep
        _skip(executor, left)
        raise


def _skip(executor: Executor, passes: int) -> None:
    try:
        for _ in range(passes):
            executor.skip_pass()
    except BaseException:
        pass  # the error being raised is the one to report


def _check(req: Request) -> None:
    if not req.ids or req.max_new_tokens < 1:
        raise ConfigError("a request needs a non-empty prompt and max_new_tokens >= 1")


def _admit(req: Request, gc: GenerationConfig, device: torch.device) -> _Row:
    gen = None
    if gc.do_sample:
        gen = torch.Generator(device=device)
        gen.manual_seed(req.seed if req.seed is not None else torch.seed())
    return _Row(req, gen=gen)


def _adjacent(indices: list[int], alone: set[int]) -> Iterator[tuple[int, int]]:
    """Sorted row indices -> (start, stop) of each run of consecutive ones; an index in
    `alone` is a run of its own."""
    i = 0
    while i < len(indices):
        j = i
        while (j + 1 < len(indices) and indices[j + 1] == indices[j] + 1
               and indices[j] not in alone and indices[j + 1] not in alone):  # fmt: skip
            j += 1
        yield indices[i], indices[j] + 1
        i = j + 1


def _compact(rows: list[_Row | None], mask: torch.Tensor, kv: list[LayerKV], t: int) -> int:
    """Move every row's live window left by the oldest live start; returns the new index t."""
    live = mask.any(0).nonzero()
    shift = int(live[0]) if len(live) else t
    need = max((len(r.req.ids) for r in rows if r is not None and r.prefill), default=1)
    shift = min(shift, t - need + 1) if any(r is not None and r.prefill for r in rows) else shift
    if shift <= 0:
        raise ConfigError("KV cache full: a row outlives cache_tokens")
    n = mask.shape[1] - shift
    mask[:, :n] = mask[:, shift:].clone()
    mask[:, n:] = 0
    for c in kv:
        for cache in (c.k, c.v, c.k_scale, c.v_scale):  # the scales of an int8 cache too
            if cache is not None:
                cache[:, :, :n] = cache[:, :, shift:].clone()
    return t - shift
