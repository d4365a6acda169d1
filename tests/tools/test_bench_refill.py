"""tools/bench_refill.py on the CPU with a tiny shape (a smoke run: the figures are there and
add up; no timing is asserted)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "bench_refill.py"


def test_bench_refill_cpu_smoke(tmp_path: Path) -> None:
    out = tmp_path / "refill.json"
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    # the probe's cache goes to tmp_path, not the home folder
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ZEROINF_CACHE_DIR": str(tmp_path),
           "PYTHONPATH": path}  # fmt: skip
    argv = ["--model", "tiny-llama", "--device", "cpu", "--prompts", "24", "--batch-size", "4",
            "--max-new", "16", "--gpu-memory", "400KB", "--json", str(out)]  # fmt: skip
    proc = subprocess.run([sys.executable, str(TOOL), *argv], env=env, capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "refill / static" in proc.stdout.splitlines()[-1]  # the table comes last
    res = json.loads(out.read_text())
    assert res["prompts"] == 24 and res["batch"] == 4 and res["new_tokens"] == [8, 16]
    assert res["streamed_bytes_per_pass"] > 0 and res["stream_bytes_per_s"] > 0

    # the same draw as the tool's: static runs each batch of 4 to its longest request
    spec = importlib.util.spec_from_file_location("bench_refill", TOOL)
    assert spec is not None and spec.loader is not None
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    from zeroinf.synthetic import hf_config

    vocab = hf_config("tiny-llama")["vocab_size"]
    reqs = tool.make_requests(tool.parse_args(argv), vocab)
    news = [r.max_new_tokens for r in reqs]
    assert res["requested_tokens"] == sum(news)
    assert res["static"]["passes"] == sum(max(news[i : i + 4]) for i in range(0, 24, 4))
    assert res["refill"]["passes"] >= -(-sum(news) // 4)  # at most 4 rows per pass
    for mode in ("static", "refill"):
        r = res[mode]
        assert r["useful_tokens"] == sum(news)
        for key in ("wall_s", "useful_tok_per_s", "tokens_per_pass", "roofline_s",
                    "roofline_tok_per_s", "ratio_to_roofline"):  # fmt: skip
            assert r[key] > 0, key
        assert r["roofline_s"] == r["passes"] * res["roofline_pass_s"]
    assert res["refill_vs_static"]["passes"] == res["refill"]["passes"] / res["static"]["passes"]
