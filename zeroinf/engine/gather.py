"""The input embedding's table stays in host memory when the plan streams anything.

A forward pass reads only B x S rows of the token-embedding table (decode: B rows, a few KiB),
yet streaming the embed unit moves the whole table across PCIe every pass: 0.5 GB for OPT-13B,
1 GB for Llama-3-8B, 3-7% of a streamed pass. So when the plan streams any unit, the embed unit
gets the "host" tier: the prefetcher keeps the whole unit in (pinned) host memory, copies its
other tensors (position table, projections: a few MB) to the device once, and gathers each
pass's rows on the host into pinned staging, one small copy to the device. The table costs no
device memory and no link time; the price is that the host needs the pass's token ids (one
small device-to-host copy, which waits for the previous step's sampling).
"""

from __future__ import annotations

import dataclasses

from zeroinf.format import Checkpoint, TensorEntry, UnitEntry
from zeroinf.models import ModelConfig, get_family
from zeroinf.sizes import align_up

GATHERED_UNIT = "embed"


def table_name(ckpt: Checkpoint) -> str:
    """The HF name of the token-embedding table in the checkpoint's embed unit."""
    cfg = ModelConfig.from_hf(ckpt.config)
    family = get_family(cfg.model_type)
    return dict(family.unit_tensors(cfg))[GATHERED_UNIT][family.EMBED_TABLE]


def host_split(unit: UnitEntry, table: str) -> tuple[TensorEntry, UnitEntry]:
    """(the table's entry in the unit's bytes, the unit without the table: its other tensors
    packed from offset 0, each 4096-aligned, as the device copy holds them; 0 bytes if none)."""
    entry = next(t for t in unit.tensors if t.name == table)
    rest, pos = [], 0
    for t in unit.tensors:
        if t.name != table:
            rest.append(dataclasses.replace(t, offset=pos))
            pos = align_up(pos + t.nbytes)
    return entry, dataclasses.replace(unit, nbytes=pos, tensors=tuple(rest))


def gathered_bytes(ckpt: Checkpoint) -> dict[str, int]:
    """{unit name: bytes that stay on the host when the unit is gathered there} for make_plan:
    the unit's bytes less its device part."""
    unit = next(u for u in ckpt.units if u.name == GATHERED_UNIT)
    _, rest = host_split(unit, table_name(ckpt))
    return {unit.name: unit.nbytes - rest.nbytes}
