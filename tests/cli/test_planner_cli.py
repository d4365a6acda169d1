"""The planner on the command line: zeroinf-bench --plan-only prints the plan and its
prediction without generating, a bench run records the prediction beside the measured figures,
and zeroinf-generate --batch-size auto plans for the job's longest prompt."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from zeroinf.cli import bench
from zeroinf.cli.generate import main as generate_main
from zeroinf.convert import convert

TINY = ["--model", "tiny-llama", "--device", "cpu", "--prompt-len", "16", "--gen-len", "4"]


def test_plan_only_auto(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "plan.json"
    argv = [*TINY, "--gpu-memory", "4MiB", "--batch-size", "auto", "--plan-only", "--json", out]
    assert bench.main([str(a) for a in argv]) == 0
    text = capsys.readouterr().out
    r = json.loads(out.read_text())
    assert f"batch {r['batch']} = " in text and "predicted: prefill" in text
    assert r["gpu_bytes"] <= r["gpu_budget"] == 4 << 20 and r["kv_bytes"] > 0
    assert r["predicted_tok_per_s"] > 0 and r["measured"]["h2d_bytes_per_s"] > 0


def test_plan_only_sweep(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "plan.json"
    argv = [*TINY, "--gpu-memory", "4MiB", "--batch-size", "2,8", "--plan-only", "--json", out]
    assert bench.main([str(a) for a in argv]) == 0
    rows = json.loads(out.read_text())
    assert [r["batch"] for r in rows] == [2, 8] and rows[0]["kv_bytes"] == 0
    assert rows[1]["predicted_tok_per_s"] > 0
    assert capsys.readouterr().out.count("predicted prefill") == 2


def test_plan_only_budget_too_small(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [*TINY, "--gpu-memory", "64KiB", "--batch-size", "auto", "--plan-only"]
    assert bench.main(argv) == 2
    assert "zeroinf-bench: error: gpu_memory 64.00 KiB cannot hold" in capsys.readouterr().err


def test_bench_records_prediction_beside_measurement(tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    argv = [*TINY, "--gpu-memory", "4MiB", "--batch-size", "auto", "--json", out]
    assert bench.main([str(a) for a in argv]) == 0
    r = json.loads(out.read_text())
    assert r["predicted_tok_per_s"] > 0 and r["total_tok_per_s"] > 0
    assert r["prediction_error"] == pytest.approx(
        r["predicted_tok_per_s"] / r["total_tok_per_s"] - 1
    )
    assert r["micro_batch"] >= 1 and r["predicted_step_s"] > 0


def test_generate_auto_plans_for_the_longest_prompt(
    tiny_hf: Callable[..., Path], tmp_path: Path, caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    ckpt = convert(tiny_hf("llama"), tmp_path / "zi", progress=False)
    records = [{"id": i, "input_ids": list(range(5, 5 + n))} for i, n in enumerate([3, 9, 5])]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in records))
    outs = {}
    for batch in ("auto", "1"):
        out = tmp_path / f"out-{batch}.jsonl"
        argv = ["--model", ckpt, "--input", inp, "--output", out, "--device", "cpu",
                "--max-new-tokens", "4", "--batch-size", batch, "--quiet"]  # fmt: skip
        with caplog.at_level(logging.INFO, logger="zeroinf"):
            assert generate_main([str(a) for a in argv]) == 0
        outs[batch] = sorted(json.loads(x)["token_ids"] for x in out.read_text().splitlines())
    capsys.readouterr()
    assert "planned for 3 pending records, the longest prompt (9 tokens)" in caplog.text
    assert "largest max_new_tokens (4)" in caplog.text
    assert outs["auto"] == outs["1"]
