"""The batch job loop: records in, results lines out, resumable, shared among ranks.

Parse the input, take this rank's share, skip the keys already written, write the bad records'
error lines, then write each group of rows that the scheduler finishes in one durable write.
With ranks: a barrier, then rank 0 merges the part files.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from zeroinf.jobs.batching import Scheduler, StaticBatcher
from zeroinf.jobs.output import ResultWriter, merge
from zeroinf.jobs.ranks import Ranks, done_keys, existing_parts, part_path, shard, wait_for
from zeroinf.jobs.records import (
    BadRecord,
    Defaults,
    Request,
    Tokenizer,
    prepare,
    read_input,
)

if TYPE_CHECKING:
    from zeroinf.api import Model

log = logging.getLogger("zeroinf")


@dataclass(frozen=True)
class JobConfig:
    input: Path
    output: Path
    defaults: Defaults = field(default_factory=Defaults)
    batch_size: int = 32
    progress: bool = True  # a tqdm bar (rank 0); else one log line per batch
    ranks: Ranks = field(default_factory=Ranks)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size}: must be >= 1")


@dataclass
class Summary:
    records: int = 0  # this rank's share of the input
    done_before: int = 0  # already in the output when the job started
    ok: int = 0
    failed: int = 0
    tokens: int = 0  # completion tokens written by this run
    seconds: float = 0.0
    repaired_bytes: int = 0  # torn tail cut off the output on start
    interrupted: int = 0  # the exit code of the signal that stopped the job (130, 143), or 0
    merged_lines: int | None = None  # rank 0 (or a single process with old part files)

    def line(self, output: Path, ranks: Ranks | None = None) -> str:
        """The summary line: records ok / failed / already done, tokens and tokens/s."""
        who = f"rank {ranks.rank}/{ranks.world}: " if ranks and ranks.world > 1 else ""
        rate = self.tokens / self.seconds if self.seconds > 0 else 0.0
        text = (
            f"{who}{self.ok} ok, {self.failed} failed, {self.done_before} already done of "
            f"{self.records} records; {self.tokens} tokens in {self.seconds:.1f} s "
            f"({rate:.1f} tok/s) -> {output}"
        )
        if self.interrupted:
            left = self.records - self.done_before - self.ok - self.failed
            text += f"; interrupted with {left} to go: rerun the same command to resume"
        if self.merged_lines is not None:
            text += f"; merged the part files ({self.merged_lines} lines)"
        return text


def finish_row(
    req: Request, new: Sequence[int], eos: Collection[int], tok: Tokenizer | None
) -> dict[str, Any]:
    """A results line from a row's raw new tokens: cut at its own max_new_tokens, at the first
    end-of-sequence token (kept in token_ids, not in text) or where the text first contains a
    stop string (the text ends before it; token_ids end with the token that completed it)."""
    gen = list(new[: req.max_new_tokens])
    reason = "length"
    for i, t in enumerate(gen):
        if t in eos:
            gen, reason = gen[: i + 1], "stop"
            break
    body = gen[:-1] if reason == "stop" else gen
    text = tok.decode(body, skip_special_tokens=True) if tok is not None else None
    if req.stop and tok is not None and text is not None:
        hit = _first_stop(body, text, req.stop, tok)
        if hit is not None:
            k, text = hit
            gen, reason = body[:k], "stop"
    out: dict[str, Any] = {
        "id": req.id, "text": text, "token_ids": gen, "finish_reason": reason,
        "usage": {"prompt_tokens": len(req.prompt_ids), "completion_tokens": len(gen)},
    }  # fmt: skip
    if req.meta is not None:
        out["meta"] = req.meta
    return out


def _first_stop(
    body: list[int], full: str, stops: Sequence[str], tok: Tokenizer
) -> tuple[int, str] | None:
    """The fewest tokens whose text contains a stop string, and that text cut before it (what a
    step-by-step check would have stopped at)."""
    if not any(s in full for s in stops):
        return None
    for k in range(1, len(body) + 1):
        text = full if k == len(body) else tok.decode(body[:k], skip_special_tokens=True)
        found = [i for i in (text.find(s) for s in stops) if i >= 0]
        if found:
            return k, text[: min(found)]
    return None


def model_generate(model: Model, eos: Sequence[int]) -> Any:
    """A GenerateFn over the Python API: one left-padded batch of equal sampling settings, one
    seed per row (so a row's tokens do not depend on its batch-mates)."""
    import torch

    def gen(batch: Sequence[Request]) -> list[list[int]]:
        p = max(len(r.prompt_ids) for r in batch)
        ids = torch.zeros(len(batch), p, dtype=torch.long)  # [B, P], left padded
        mask = torch.zeros(len(batch), p, dtype=torch.long)
        for i, r in enumerate(batch):
            ids[i, p - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[i, p - len(r.prompt_ids) :] = 1
        s = batch[0].sampling
        out = model.generate(
            ids, mask, max_new_tokens=max(r.max_new_tokens for r in batch),
            do_sample=not s.greedy, temperature=s.temperature if not s.greedy else 1.0,
            top_k=s.top_k, top_p=s.top_p, eos_token_id=list(eos) or None,
            seed=[r.seed for r in batch] if not s.greedy else None,
        )  # fmt: skip
        return out[:, p:].tolist()

    return gen


def run_job(
    cfg: JobConfig,
    model: Model,
    tok: Tokenizer | None,
    eos: Sequence[int] = (),
    scheduler: Scheduler | None = None,
) -> Summary:
    """Run (or resume) a job with a loaded model. Returns this rank's summary; an interrupt
    (KeyboardInterrupt, carrying `code` 143 for SIGTERM) ends it cleanly with `interrupted` set,
    every finished record on disk and the output ready to resume."""
    t0 = time.perf_counter()
    ranks, s = cfg.ranks, Summary()
    parsed = read_input(str(cfg.input))
    mine = shard(parsed, ranks.rank, ranks.world)
    s.records = len(mine)
    done = done_keys(cfg.output)
    c = model.config
    items = [
        r if isinstance(r, BadRecord) else prepare(r, tok, cfg.defaults, c.max_positions,
                                                    c.vocab_size)
        for r in mine
    ]  # fmt: skip
    s.done_before = sum(r.key in done for r in items)
    requests = [r for r in items if isinstance(r, Request)]
    if scheduler is None:
        scheduler = StaticBatcher(model_generate(model, eos), cfg.batch_size, c.max_positions)
    show = cfg.progress and ranks.rank == 0
    bar = tqdm(total=s.records - s.done_before, unit="rec", desc="generate", disable=not show,
               dynamic_ncols=True, smoothing=0.1)  # fmt: skip
    try:
        with ResultWriter(part_path(cfg.output, ranks.rank, ranks.world)) as w:
            s.repaired_bytes = w.repaired
            if w.repaired:
                log.warning("%s: cut off a torn last line (%d bytes)", w.path, w.repaired)
            bad = [r.to_json() for r in items if isinstance(r, BadRecord) and r.key not in done]
            w.write(bad)
            s.failed = len(bad)
            bar.update(len(bad))
            n_batches = scheduler.total_batches(requests, done)
            for i, rows in enumerate(scheduler.run(requests, done), start=1):
                lines = [finish_row(r, new, eos, tok) for r, new in rows]
                w.write(lines)
                s.ok += len(lines)
                s.tokens += sum(o["usage"]["completion_tokens"] for o in lines)
                s.seconds = time.perf_counter() - t0
                bar.update(len(lines))
                bar.set_postfix_str(f"{s.tokens / s.seconds:.1f} tok/s", refresh=False)
                if not show:
                    _log_batch(i, n_batches, len(lines), s)
    except KeyboardInterrupt as e:
        s.interrupted = getattr(e, "code", 130)
    finally:
        bar.close()
        s.seconds = time.perf_counter() - t0
    if s.interrupted:
        return s
    _gather(cfg, model, parsed, s)
    return s


def _log_batch(i: int, n: int, rows: int, s: Summary) -> None:
    todo = s.records - s.done_before
    finished = s.ok + s.failed
    eta = s.seconds / max(1, finished) * (todo - finished)
    log.info(
        "batch %d/%d: %d records; %d/%d records, %.1f tok/s, ETA %.0f s",
        i, n, rows, finished, todo, s.tokens / max(s.seconds, 1e-9), eta,
    )  # fmt: skip


def _gather(cfg: JobConfig, model: Model, parsed: list[Any], s: Summary) -> None:
    """Ranks: wait for all, then rank 0 folds the part files into the output. A single process
    also folds part files that an earlier multi-rank run left behind."""
    ranks = cfg.ranks
    if ranks.world > 1:
        model.finish()  # keep joining the other ranks' forward passes until all are done
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
        if ranks.rank != 0:
            return
        wait_for(cfg.output, {r.key for r in parsed})
    parts = existing_parts(cfg.output)
    if parts:
        s.merged_lines = merge(cfg.output, parts)
