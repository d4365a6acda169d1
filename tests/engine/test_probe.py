"""The machine probe: measured once, then read from its JSON cache (and the log says so);
refresh measures again; a corrupt cache is measured over with a warning. No timing is asserted:
only that the measured rates are positive and finite."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch

from zeroinf.engine import probe as probe_mod
from zeroinf.engine.probe import (
    Rates,
    cache_path,
    measure,
    measure_cpu_attention_with_h2d,
    measure_disk,
    probe,
)

CPU = torch.device("cpu")
FAKE = Rates("fake", 1e12, 2e12, 3e10, 3e10, 1e10)
# Every optional field set, so a round trip through the cache covers them all
FULL = Rates("full", 1e12, 2e12, 3e10, 3e10, 1e10, 5e9, 8e9, 6e10, 7e9, 2e10)


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[tuple[int, int]]:
    """A cache folder of its own, and measure() replaced by a counter returning FAKE."""
    monkeypatch.setenv("ZEROINF_CACHE_DIR", str(tmp_path))
    calls: list[tuple[int, int]] = []

    def fake(device: torch.device, k: int, n: int, *args: object) -> Rates:
        calls.append((k, n))
        return FAKE

    monkeypatch.setattr(probe_mod, "measure", fake)
    return calls


def test_second_call_reads_the_cache(counted: list, caplog: pytest.LogCaptureFixture) -> None:
    assert probe(CPU, 64, 128, torch.float16) == FAKE
    assert cache_path().is_file() and len(counted) == 1
    with caplog.at_level(logging.INFO, logger="zeroinf"):
        assert probe(CPU, 64, 128, torch.float16) == FAKE
    assert len(counted) == 1
    assert f"using cached probe from {cache_path()}" in caplog.text


def test_every_field_round_trips(
    counted: list, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(probe_mod, "measure", lambda *args: FULL)
    with caplog.at_level(logging.INFO, logger="zeroinf"):
        assert probe(CPU, 64, 128, torch.float16) == FULL
        assert "CPU attention beside H2D 7.0 GB/s, H2D beside it 20.0 GB/s" in caplog.text
        assert probe(CPU, 64, 128, torch.float16) == FULL  # read back from the cache
    assert "using cached probe" in caplog.text


def test_key_holds_dtype_and_shape(counted: list) -> None:
    probe(CPU, 64, 128, torch.float16)
    probe(CPU, 64, 128, torch.bfloat16)
    probe(CPU, 64, 256, torch.float16)
    probe(CPU, 64, 128, torch.float16)
    assert len(counted) == 3
    entries = json.loads(cache_path().read_text())["entries"]
    assert len(entries) == 3 and all(torch.__version__ in k for k in entries)


def test_refresh_measures_again(counted: list) -> None:
    probe(CPU, 64, 128, torch.float16)
    probe(CPU, 64, 128, torch.float16, refresh=True)
    assert len(counted) == 2


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        "[]",
        '{"format": "other"}',
        '{"format": "zeroinf-probe/1"}',
        '{"format": "zeroinf-probe/3", "entries": {}}',
    ],
)
def test_corrupt_cache_is_measured_over(
    counted: list, caplog: pytest.LogCaptureFixture, text: str
) -> None:
    path = cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    with caplog.at_level(logging.WARNING, logger="zeroinf"):
        assert probe(CPU, 64, 128, torch.float16) == FAKE
    assert "unreadable" in caplog.text and len(counted) == 1
    probe(CPU, 64, 128, torch.float16)  # the rewritten cache serves the next call
    assert len(counted) == 1


def test_bad_entry_is_measured_over(counted: list, caplog: pytest.LogCaptureFixture) -> None:
    probe(CPU, 64, 128, torch.float16)
    raw = json.loads(cache_path().read_text())
    for e in raw["entries"].values():
        e["rates"] = {"flops": 1.0}  # fields missing
    cache_path().write_text(json.dumps(raw))
    with caplog.at_level(logging.WARNING, logger="zeroinf"):
        assert probe(CPU, 64, 128, torch.float16) == FAKE
    assert "unusable" in caplog.text and len(counted) == 2


def test_measure_on_cpu_gives_positive_rates(tmp_path: Path) -> None:
    (tmp_path / "unit.bin").write_bytes(b"\1" * (1 << 20))
    r = measure(CPU, 64, 96, torch.float32, disk_dir=tmp_path, io_backend="threadpool")
    values = [r.flops, r.hbm_bytes_per_s, r.h2d_bytes_per_s, r.d2h_bytes_per_s,
              r.cpu_attn_bytes_per_s, r.disk_bytes_per_s]  # fmt: skip
    assert all(v > 0 and math.isfinite(v) for v in values)
    assert r.cpu_attn_h2d_bytes_per_s is None and r.h2d_cpu_attn_bytes_per_s is None  # GPU only
    assert r.stream_bytes_per_s("cpu") == r.h2d_bytes_per_s
    assert r.stream_bytes_per_s("nvme") == min(r.disk_bytes_per_s, r.h2d_bytes_per_s)


def test_host_memory_over_tensors_reads_their_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Over a run's cache the probe reads the tensors' own memory, every byte of it: with one
    second a read the rate is their byte count; a strided tensor (which a copy would replace
    by fresh memory) is refused."""
    seen: list[float] = []

    def one_second(fn: object, device: torch.device, repeat: int = 9) -> float:
        seen.append(1.0)
        return 1.0

    monkeypatch.setattr(probe_mod, "seconds", one_second)
    cache = [torch.randn(2, 3, 8, 4, dtype=torch.float16), torch.randn(5, 4)]
    assert probe_mod.measure_host_memory(CPU, 0, over=cache) == 2 * 3 * 8 * 4 * 2 + 5 * 4 * 4
    assert seen
    with pytest.raises(RuntimeError):
        probe_mod.measure_host_memory(CPU, 0, over=[torch.randn(4, 6)[:, :4]])


def test_measure_disk_needs_a_file(tmp_path: Path) -> None:
    from zeroinf.errors import ConfigError

    (tmp_path / "small").write_bytes(b"x" * 100)  # under one 4096-byte block
    with pytest.raises(ConfigError, match="no file of 4096 bytes"):
        measure_disk(tmp_path, "threadpool")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_attention_with_h2d_gives_positive_rates() -> None:
    attn, h2d = measure_cpu_attention_with_h2d(torch.device("cuda"), torch.float16, 0.3)
    assert attn > 0 and h2d > 0 and math.isfinite(attn) and math.isfinite(h2d)
