"""Reader faults (zeroinf.io.FaultyReader: EIO, short reads and delays at chosen offsets) during
zeroinf.load and during generation with offload="nvme": a ReadError naming the file and the
offset, bounded in time, and no file descriptor or host buffer left behind; a delay changes
nothing but the time. Also the environment-selected random faults that tools/soak.py uses."""

from __future__ import annotations

import errno
import re
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from fault_helpers import bounded, host_buffers, open_fds, record_cases

import zeroinf
import zeroinf.engine.prefetcher as prefetcher
from zeroinf.errors import ConfigError, ReadError, ZeroInfError
from zeroinf.format import Checkpoint
from zeroinf.io import BACKENDS, FaultyReader

PROMPTS = torch.tensor([[1, 17, 33, 250, 9], [1, 5, 6, 7, 8]])
BUDGET = str(3 * 339968)  # 2 streaming slots + layers.0 resident; layers 1, 2 and head stream
RESIDENT = 1
EMBED = 0  # held whole in host memory, its table's rows gathered there (engine/gather.py)


def available_backends() -> list[str]:
    import importlib

    out = []
    for name in BACKENDS:
        module = {"native": "zeroinf._native_aio", "libaio": "libaio"}.get(name)
        try:
            if module:
                importlib.import_module(module)
        except (ImportError, OSError):
            continue
        out.append(name)
    return out


@pytest.fixture
def faulty(monkeypatch: pytest.MonkeyPatch) -> Callable[..., list[FaultyReader]]:
    """faulty(**FaultyReader kwargs): every reader the prefetcher opens from now on is wrapped
    in a FaultyReader with those faults. Returns the list of readers made."""
    made: list[FaultyReader] = []
    real = prefetcher.open_reader

    def install(**faults: Any) -> list[FaultyReader]:
        def make(backend: str | None = None, *a: Any, **k: Any) -> FaultyReader:
            r = FaultyReader(real(backend, *a, **k), **faults)
            made.append(r)
            return r

        monkeypatch.setattr(prefetcher, "open_reader", make)
        return made

    return install


@pytest.fixture
def no_leaks() -> Iterator[None]:
    """The test leaves as many file descriptors and host buffers as it found."""
    fds, bufs = open_fds(), host_buffers()
    yield
    assert (open_fds(), host_buffers()) == (fds, bufs)


@pytest.fixture(scope="module")
def expected(ckpt: Path) -> torch.Tensor:
    with zeroinf.load(ckpt, device="cpu", gpu_memory=None, progress=False) as m:
        return m.generate(PROMPTS, max_new_tokens=6)


def generate(model: zeroinf.Model) -> torch.Tensor:
    return bounded(partial(model.generate, PROMPTS, max_new_tokens=6))


def unit_file(ckpt: Path, j: int) -> tuple[str, int]:
    u = Checkpoint(ckpt).units[j]
    return str(ckpt / u.file), u.nbytes


def message(path: str, nbytes: int, at: int, why: str) -> str:
    return f"{path}: read of {nbytes} bytes at offset 0 failed at offset {at}: {why}"


EIO = "Input/output error (errno 5)"
EOF = "unexpected end of file (truncated?)"


@pytest.mark.parametrize("offload", ["cpu", "nvme"])
@pytest.mark.parametrize(
    "unit,page,kind",
    [(RESIDENT, 0, "eio"), (RESIDENT, 82, "short"), (0, 5, "eio"), (4, 36, "short")],
)
def test_fault_while_loading(
    ckpt: Path, faulty: Callable[..., Any], no_leaks: None, offload: str, unit: int, page: int,
    kind: str,
) -> None:  # fmt: skip
    """A read at load (the resident unit, the embed unit kept on the host; with offload="cpu"
    also the CPU tier) fails: load raises ReadError naming the file and offset. Streamed NVMe
    units are not read at load."""
    path, nbytes = unit_file(ckpt, unit)
    at = page * 4096
    if kind == "eio":
        faulty(fail_at={(path, at): errno.EIO})
    else:
        faulty(short_at=[(path, at)])
    read_at_load = unit in (RESIDENT, EMBED) or offload == "cpu"
    load = lambda: zeroinf.load(  # noqa: E731
        ckpt, device="cpu", offload=offload, gpu_memory=BUDGET, progress=False
    )
    if not read_at_load:
        bounded(load).close()
        return
    with pytest.raises(ReadError) as e:
        bounded(load)
    assert str(e.value) == message(path, nbytes, at, EIO if kind == "eio" else EOF)
    assert (e.value.path, e.value.offset) == (path, at)
    del e
    record_cases(f"reader {kind} while loading", 1)


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("unit,page,kind", [(2, 3, "eio"), (3, 82, "eio"), (4, 1, "short")])
def test_fault_during_nvme_generation(
    ckpt: Path, faulty: Callable[..., Any], no_leaks: None, backend: str, unit: int, page: int,
    kind: str,
) -> None:  # fmt: skip
    path, nbytes = unit_file(ckpt, unit)
    at = page * 4096
    if kind == "eio":
        faulty(fail_at={(path, at): errno.EIO})
    else:
        faulty(short_at=[(path, at)])
    model = bounded(
        lambda: zeroinf.load(ckpt, device="cpu", offload="nvme", gpu_memory=BUDGET,
                             io_backend=backend, progress=False)
    )  # fmt: skip
    assert [p.tier for p in model.plan.placements] == ["host", "gpu", "nvme", "nvme", "nvme"]
    with pytest.raises(ReadError) as e:
        generate(model)
    assert str(e.value) == message(path, nbytes, at, EIO if kind == "eio" else EOF)
    del e
    with pytest.raises(ZeroInfError):  # and again: the model stays failed, it does not hang
        generate(model)
    bounded(model.close)
    del model
    record_cases(f"reader {kind} during NVMe generation", 1)


def test_later_calls_repeat_the_read_error(ckpt: Path, faulty: Callable[..., Any]) -> None:
    path, nbytes = unit_file(ckpt, 3)
    faulty(fail_at={(path, 8192): errno.EIO})
    model = zeroinf.load(ckpt, device="cpu", offload="nvme", gpu_memory=BUDGET, progress=False)
    try:
        for _ in range(2):
            with pytest.raises(ReadError) as e:
                generate(model)
            assert str(e.value) == message(path, nbytes, 8192, EIO)
            del e
    finally:
        bounded(model.close)
        del model


@pytest.mark.parametrize("offload", ["cpu", "nvme"])
def test_close_frees_buffers_while_the_model_object_lives(ckpt: Path, offload: str) -> None:
    before = host_buffers()
    model = zeroinf.load(ckpt, device="cpu", offload=offload, gpu_memory=None, progress=False)
    model.generate(PROMPTS, max_new_tokens=2)
    model.close()
    after = host_buffers()
    del model  # (so that the failure's traceback does not keep it alive)
    assert after == before


@pytest.mark.parametrize("offload", ["cpu", "nvme"])
def test_delays_change_nothing_but_time(
    ckpt: Path, expected: torch.Tensor, faulty: Callable[..., Any], no_leaks: None, offload: str
) -> None:
    delays = {unit_file(ckpt, j)[0]: 0.02 for j in range(5)}  # every read of every unit
    readers = faulty(delay=delays)
    with bounded(
        lambda: zeroinf.load(ckpt, device="cpu", offload=offload, gpu_memory=BUDGET,
                             progress=False)
    ) as model:  # fmt: skip
        out = generate(model)
    del model
    assert torch.equal(out, expected)
    n = len(readers[0].submitted)
    # nvme: at load the resident and the embed unit, then every pass its 3 streamed units
    assert n >= (5 if offload == "cpu" else 2 + 3 * 6)
    record_cases(f"reader delays ({offload}), reads delayed", n)


def test_env_selected_random_faults(
    ckpt: Path, expected: torch.Tensor, monkeypatch: pytest.MonkeyPatch, no_leaks: None
) -> None:
    """ZEROINF_IO_FAULTS wraps every reader open_reader makes (what tools/soak.py uses)."""
    monkeypatch.setenv("ZEROINF_IO_FAULTS", "delay=1,delay_s=0.005,seed=1")
    with bounded(
        lambda: zeroinf.load(ckpt, device="cpu", offload="nvme", gpu_memory=BUDGET,
                             progress=False)
    ) as model:  # fmt: skip
        assert isinstance(model.prefetcher.reader, FaultyReader)
        assert torch.equal(generate(model), expected)
        assert model.prefetcher.reader.injected["delay"] == len(model.prefetcher.reader.submitted)
    del model
    monkeypatch.setenv("ZEROINF_IO_FAULTS", "eio=1,seed=1")  # every read fails: the first
    with pytest.raises(ReadError) as e:  # is the resident unit's, at load
        bounded(
            lambda: zeroinf.load(ckpt, device="cpu", offload="nvme", gpu_memory=BUDGET,
                                 progress=False)
        )  # fmt: skip
    path, nbytes = unit_file(ckpt, RESIDENT)
    assert re.fullmatch(
        rf"{re.escape(path)}: read of {nbytes} bytes at offset 0 failed at offset \d+: "
        + re.escape(EIO),
        str(e.value),
    ), str(e.value)
    del e
    for spec, words in [
        ("eio=2", "ZEROINF_IO_FAULTS: eio=2.0 not in [0, 1]"),
        ("boom=1", "ZEROINF_IO_FAULTS: 'boom=1' is not one of eio=P, short=P, delay=P, "
                   "delay_s=S, seed=N"),
        ("delay=x", "ZEROINF_IO_FAULTS: 'delay=x': 'x' is not a number"),
    ]:  # fmt: skip
        monkeypatch.setenv("ZEROINF_IO_FAULTS", spec)
        with pytest.raises(ConfigError) as ce:
            zeroinf.load(ckpt, device="cpu", offload="nvme", gpu_memory=BUDGET, progress=False)
        assert str(ce.value) == words
        del ce
    record_cases("reader faults from ZEROINF_IO_FAULTS", 5)
