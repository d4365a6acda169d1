"""Token generation over the streaming executor: prefill, then one forward pass per token."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from zeroinf.engine.executor import Executor, MicroBatch
from zeroinf.engine.graphs import DecodeGraphs, refresh_context
from zeroinf.errors import ConfigError
from zeroinf.models.base import LayerKV, build_context
from zeroinf.models.layers import precompute


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_token_id: tuple[int, ...] = ()  # empty: generate exactly max_new_tokens
    pad_token_id: int = 0
    seed: int | tuple[int, ...] | None = None  # a tuple: one seed per row

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens}: must be >= 1")
        if self.do_sample and not self.temperature > 0:
            raise ConfigError(f"temperature={self.temperature}: must be > 0 when sampling")
        if self.top_k < 0:
            raise ConfigError(f"top_k={self.top_k}: must be >= 0 (0 disables)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p}: must be in (0, 1]")


@dataclass(frozen=True)
class GenerationStats:
    batch: int
    prompt_len: int
    new_tokens: int
    prefill_s: float
    decode_s: float

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def tokens_per_s(self) -> float:
        return self.batch * self.new_tokens / self.total_s

    @property
    def decode_step_s(self) -> float:
        return self.decode_s / max(1, self.new_tokens - 1)


def sample(
    logits: torch.Tensor, gc: GenerationConfig, gens: list[torch.Generator] | None
) -> torch.Tensor:
    """logits [B, V] float32 -> next token ids [B]. One generator for the batch, or one per row
    (so that a row's tokens do not depend on which other rows share its batch)."""
    if not gc.do_sample:
        return logits.argmax(-1)
    # subtract the maximum first: a tiny temperature then sends the others to -inf, never NaN
    logits = (logits - logits.amax(-1, keepdim=True)) / gc.temperature
    if gc.top_k > 0:
        kth = logits.topk(min(gc.top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if gc.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already reach top_p (the first stays)
        drop = (probs.cumsum(-1) - probs) >= gc.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    if len(gens) == 1:
        return torch.multinomial(probs, 1, generator=gens[0]).squeeze(-1)
    rows = zip(probs, gens, strict=True)
    return torch.cat([torch.multinomial(p[None], 1, generator=g)[0] for p, g in rows])


def generate(
    executor: Executor,
    ids: torch.Tensor,
    attention_mask: torch.Tensor,
    gc: GenerationConfig,
    new_kv: Callable[[int, int], list[LayerKV]],
    progress: bool = False,
    passes: int | None = None,
    prefill_tokens: int | None = None,
    decode_rows: int | None = None,
    cuda_graphs: bool = True,
    state: DecodeState | None = None,
) -> tuple[torch.Tensor, GenerationStats]:
    """ids, attention_mask [B, P] on the compute device (left padded) -> [B, P + N] ids.

    passes: forward passes to run in all (ranks in lockstep agree on it); passes beyond this
    batch's own needs stream the weights without computing.
    prefill_tokens: the prefill runs in micro-batches of rows holding at most this many tokens
    (at least one row), each streamed unit serving all of them, so activation memory stays
    bounded whatever the batch.
    decode_rows: decode in micro-batches of this many rows (None: one), each streamed unit
    serving all of them before it is released (the block schedule).
    cuda_graphs: replay each unit's decode computation as a CUDA graph where the executor
    can (engine/graphs.py).
    state: kept by the caller to reuse the KV cache and the captured graphs in the next call of
    the same shape (None: made for this call only)."""
    b, p = ids.shape
    dev = ids.device
    total = p + gc.max_new_tokens
    chunk_rows = max(1, (prefill_tokens or b * p) // p)
    step_rows = decode_rows or b
    state = state or DecodeState()
    kv = state.prepare(b, total, decode_rows, new_kv)
    mask = torch.ones(b, total, dtype=torch.long, device=dev)
    mask[:, :p] = attention_mask
    out = torch.full((b, total), gc.pad_token_id, dtype=ids.dtype, device=dev)
    out[:, :p] = ids
    eos = torch.tensor(gc.eos_token_id, dtype=ids.dtype, device=dev)
    finished = torch.zeros(b, dtype=torch.bool, device=dev)
    gens = None
    if gc.do_sample:
        seeds = gc.seed if isinstance(gc.seed, tuple) else (gc.seed,)
        if len(seeds) not in (1, b):
            raise ConfigError(f"seed: {len(seeds)} per-row seeds for a batch of {b}")
        gens = [torch.Generator(device=dev) for _ in seeds]
        for g, s in zip(gens, seeds, strict=True):
            g.manual_seed(s if s is not None else torch.seed())
    graphs = None
    if cuda_graphs and executor.graphable:
        if state.graphs is None:
            state.graphs = DecodeGraphs(executor.prefetcher.capture_stream)
        graphs = state.graphs
    clock = _Clock(dev)
    x, start, n = ids, 0, 0
    bar = tqdm(total=gc.max_new_tokens, unit="tok", desc="generate", disable=not progress)
    for i in range(gc.max_new_tokens):
        if i == 0:  # prefill in row chunks: bounded activations
            parts = [
                MicroBatch(x[r : r + chunk_rows], build_context(mask[r : r + chunk_rows], 0, p),
                           [c.rows(r, r + chunk_rows) for c in kv])
                for r in range(0, b, chunk_rows)
            ]  # fmt: skip
            logits = torch.cat(executor.forward(parts))
        else:  # decode: the whole-cache form, the same tensors every step (CUDA graphs)
            parts = []
            for r in range(0, b, step_rows):
                ctx = build_context(mask[r : r + step_rows], start, 1, whole_cache=total)
                precompute(ctx, executor.cfg, executor.dtype)
                parts.append(MicroBatch(x[r : r + step_rows], ctx,
                                        [c.rows(r, r + step_rows) for c in kv]))  # fmt: skip
            if state.static is None:
                state.static = [MicroBatch(mb.ids.clone(), mb.ctx, mb.kv) for mb in parts]
            else:
                for s, mb in zip(state.static, parts, strict=True):
                    s.ids.copy_(mb.ids)
                    refresh_context(s.ctx, mb.ctx)
            logits = torch.cat(executor.forward(state.static, graphs))
        nxt = sample(logits, gc, gens)
        n = i + 1
        if len(gc.eos_token_id):
            nxt = torch.where(finished, torch.full_like(nxt, gc.pad_token_id), nxt)
            finished |= torch.isin(nxt, eos)
        out[:, p + i] = nxt
        if i == 0:
            clock.mark()  # end of prefill (and of the first token's sampling)
        start += x.shape[1]
        x = nxt[:, None]
        bar.update(1)
        if len(gc.eos_token_id) and bool(finished.all()):
            break
    if graphs is not None:
        executor.graph_counts = (graphs.captured, graphs.replayed)
    for _ in range(n, passes or 0):
        executor.skip_pass()
    prefill_s, decode_s = clock.stop()
    bar.close()
    return out[:, : p + n], GenerationStats(b, p, n, prefill_s, decode_s)


class DecodeState:
    """What decode keeps from one generate call to the next of the same shape (batch, cache
    length, micro-batch rows): the KV cache, decode's static micro-batches (the tensors the
    graphs read) and the captured CUDA graphs. A call of another shape starts afresh. The cache
    keeps the last call's keys beyond this call's tokens; decode masks every index it has not
    written, so they get a zero weight."""

    def __init__(self) -> None:
        self.shape: tuple[int, int, int] | None = None  # (batch, cache tokens, decode rows)
        self.kv: list[LayerKV] = []
        self.static: list[MicroBatch] | None = None
        self.graphs: DecodeGraphs | None = None

    def matches(self, batch: int, tokens: int, decode_rows: int | None) -> bool:
        return self.shape == (batch, tokens, decode_rows or batch)

    def prepare(
        self, batch: int, tokens: int, decode_rows: int | None,
        new_kv: Callable[[int, int], list[LayerKV]],
    ) -> list[LayerKV]:  # fmt: skip
        """The KV cache for this shape: the kept one, or (another shape) a new one."""
        if not self.matches(batch, tokens, decode_rows):
            self.clear()
            self.kv = new_kv(batch, tokens)
            self.shape = (batch, tokens, decode_rows or batch)
        return self.kv

    def clear(self) -> None:
        """Free the cache and the graphs (before another shape allocates its own)."""
        if self.graphs is not None:
            self.graphs.close()
        self.shape, self.kv, self.static, self.graphs = None, [], None, None


class _Clock:
    """Prefill / decode split without syncing in the middle (CUDA events on a GPU)."""

    def __init__(self, dev: torch.device) -> None:
        self.cuda = dev.type == "cuda"
        if self.cuda:
            self.events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            self.events[0].record()
        else:
            self.times = [time.perf_counter()]

    def mark(self) -> None:
        if self.cuda:
            self.events[1].record()
        else:
            self.times.append(time.perf_counter())

    def stop(self) -> tuple[float, float]:
        if self.cuda:
            self.events[2].record()
            self.events[2].synchronize()
            e = self.events
            return e[0].elapsed_time(e[1]) / 1e3, e[1].elapsed_time(e[2]) / 1e3
        self.times.append(time.perf_counter())
        t = self.times
        return t[1] - t[0], t[2] - t[1]
