"""The streaming loop. It exists once: every forward pass (prefill or decode) runs through
`Executor.forward`, which walks the units in order, asks the prefetcher for each unit's bytes
and hands the model its tensors."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from functools import partial
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F

from zeroinf.engine.graphs import DecodeGraphs
from zeroinf.engine.prefetcher import Prefetcher
from zeroinf.errors import CheckpointError
from zeroinf.format import DTYPES, TensorEntry, UnitEntry
from zeroinf.models.base import Context, LayerKV, QuantWeight
from zeroinf.models.host_attention import finish_host_work


@dataclass
class MicroBatch:
    """Rows that go through the units together: ids [B_k, S], their context and KV views."""

    ids: torch.Tensor
    ctx: Context
    kv: list[LayerKV]


class Executor:
    def __init__(self, prefetcher: Prefetcher, family: ModuleType, cfg: Any) -> None:
        self.prefetcher, self.family, self.cfg = prefetcher, family, cfg
        units = prefetcher.units
        tables = dict(family.unit_tensors(cfg))
        # Per unit: (local key, manifest entries) pairs, so views need no name lookups. A
        # quantized weight has its parts (qweight, scales[, zeros]) and becomes a QuantWeight.
        q = prefetcher.ckpt.manifest.quantization
        quantized = set(q["tensors"]) if q else set()
        parts = (
            ("qweight", "scales", "zeros") if q and q["scheme"] == "asym" else ("qweight", "scales")
        )
        self._layout: list[list[tuple[str, Any]]] = []
        for j, u in enumerate(units):
            by_name = {t.name: t for t in u.tensors}
            for hf in tables[u.name].values():
                if hf not in by_name and f"{hf}.qweight" not in by_name:
                    raise CheckpointError(
                        f"{prefetcher.ckpt.path}: unit {u.name!r} has no tensor {hf!r}, which "
                        f"the {cfg.model_type} model needs"
                    )
            host_table = j in prefetcher.tables  # its device buffer holds the other tensors
            if host_table:
                by_name = {t.name: t for t in prefetcher.device_units[j].tensors}
            entries = []
            for key, hf in tables[u.name].items():
                if host_table and key == family.EMBED_TABLE:
                    continue
                # a tied embedding may be quantized as the head's copy and float in the embed
                if hf in quantized and f"{hf}.qweight" in by_name:
                    entries.append((key, tuple(by_name[f"{hf}.{p}"] for p in parts)))
                else:
                    entries.append((key, by_name[hf]))
            self._layout.append(entries)
        self._views: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        # decode with CUDA graphs: (micro-batch, ids shape) -> the rows buffer the graph reads
        self._row_buffers: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}
        self.kinds = [_kind(u) for u in units]
        self.dtype = DTYPES[prefetcher.ckpt.manifest.dtype]  # activations' dtype
        self.host_pass_s = 0.0
        self.graph_counts = (0, 0)  # CUDA graphs (captured, replayed) by the last generate call

    def _weights(self, j: int, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        """Tensor views into unit j's buffer, cached per (unit, buffer)."""
        key = (j, buf.data_ptr())
        w = self._views.get(key)
        if w is None:
            w = {
                k: QuantWeight(*(_view(buf, e) for e in t))
                if isinstance(t, tuple)
                else _view(buf, t)
                for k, t in self._layout[j]
            }
            self._views[key] = w
        return w

    def forward(
        self, batches: list[MicroBatch], graphs: DecodeGraphs | None = None
    ) -> list[torch.Tensor]:
        """The block schedule: each unit, once on the device, serves every micro-batch before it
        is released. ids [B_k, S] per micro-batch -> float32 logits of the last position
        [B_k, V] per micro-batch. With `graphs`, each unit's computation per micro-batch is a
        replayed CUDA graph (the batches' tensors must then be the same from pass to pass)."""
        t0 = time.perf_counter()
        xs: list[torch.Tensor] = [mb.ids for mb in batches]
        layer = 0
        for j, kind in enumerate(self.kinds):
            buf = self.prefetcher.acquire(j)
            w = self._weights(j, buf)
            try:
                for k, mb in enumerate(batches):
                    if kind == "embed":  # ids [B_k, S] -> the table's rows [B_k, S, E]
                        xs[k] = self._rows(j, w, xs[k], k if graphs is not None else None)
                    fn = partial(self._unit, kind, w, mb, layer)
                    xs[k] = fn(xs[k]) if graphs is None else graphs.run(j, buf, k, fn, xs[k])
            except BaseException:
                self._skip_rest_of_pass(j)
                finish_host_work(raise_errors=False)  # no host KV work outlives a failed pass
                raise
            layer += kind == "layer"
            self.prefetcher.release(j)
        finish_host_work()  # the host KV tier's writes and attentions are done when a pass ends
        self.host_pass_s = time.perf_counter() - t0  # host time to issue the pass (tracing)
        return xs

    def _rows(
        self, j: int, w: dict[str, Any], ids: torch.Tensor, static: int | None
    ) -> torch.Tensor:
        """The embedding table's rows for ids [B, S] -> [B, S, E]: gathered on the host when
        the table stays there (engine/gather.py), else on the device. Outside the unit's CUDA
        graph either way; `static` (decode with graphs: the micro-batch index) writes them
        into the same buffer every step, which the graph reads."""
        host = j in self.prefetcher.tables
        table = self.prefetcher.tables[j] if host else w[self.family.EMBED_TABLE]  # [V, E]
        out = None
        if static is not None:
            key = (static, tuple(ids.shape))
            out = self._row_buffers.get(key)
            if out is None:
                out = torch.empty(*ids.shape, table.shape[1], dtype=table.dtype, device=ids.device)
                self._row_buffers[key] = out
        if host:
            return self.prefetcher.gather_rows(j, ids, out)
        if out is None:
            return F.embedding(ids, table)
        torch.index_select(table, 0, ids.reshape(-1), out=out.view(-1, table.shape[1]))
        return out

    def _unit(
        self, kind: str, w: dict[str, Any], mb: MicroBatch, layer: int, x: torch.Tensor
    ) -> torch.Tensor:
        if kind == "embed":
            return self.family.embed(x, w, mb.ctx, self.cfg)
        if kind == "layer":
            return self.family.layer(x, w, mb.kv[layer], mb.ctx, self.cfg)
        return self.family.head(x[:, -1:], w, self.cfg)[:, -1]

    @property
    def graphable(self) -> bool:
        """Whether decode passes can run as CUDA graphs: on a GPU, for a family whose decode
        has no data-dependent shapes (Mixtral's routing has), unless ZEROINF_CUDA_GRAPHS=0."""
        return (
            self.prefetcher.cuda
            and getattr(self.family, "CUDA_GRAPHS", True)
            and os.environ.get("ZEROINF_CUDA_GRAPHS", "1") != "0"
        )

    def release_views(self) -> None:
        self._views.clear()
        self._row_buffers.clear()

    def skip_pass(self) -> None:
        """A forward pass that computes nothing: the units still stream (and, with ranks, join
        their all-gathers), keeping this rank in lockstep with ranks that have work."""
        for j in range(len(self.kinds)):
            self.prefetcher.acquire(j)
            self.prefetcher.release(j)

    def _skip_rest_of_pass(self, failed: int) -> None:
        """Keep the prefetcher's cyclic order aligned after a failed pass: hand back the failed
        unit and drain the units this pass would still have used."""
        pf = self.prefetcher
        if pf._error is not None:
            return
        try:
            pf.release(failed)
            for j in range(failed + 1, len(self.kinds)):
                pf.acquire(j)
                pf.release(j)
        except BaseException:
            pass  # the original error is the one to report


def _view(buf: torch.Tensor, t: TensorEntry) -> torch.Tensor:
    return buf[t.offset : t.offset + t.nbytes].view(DTYPES[t.dtype]).view(t.shape)


def _kind(u: UnitEntry) -> str:
    if u.name == "embed":
        return "embed"
    if u.name == "head":
        return "head"
    return "layer"
