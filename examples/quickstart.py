"""Offloaded generation in a few lines.

    python examples/quickstart.py                   # the built-in tiny model, made locally
    python examples/quickstart.py PATH [--gpu-memory 12GiB] [--offload cpu|nvme]

PATH is a Hugging Face folder (config.json + safetensors, converted once into a cache folder) or
a zeroinf checkpoint made by zeroinf-convert.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import torch

import zeroinf


def tiny_model() -> tuple[Path, int]:
    """The embedded default: a tiny Llama made locally by transformers, and a budget that keeps
    a quarter of it resident and streams the rest through two slots, as a big model would on a
    small GPU."""
    from zeroinf.convert import ensure_converted
    from zeroinf.format import Checkpoint
    from zeroinf.tiny import save_tiny_hf

    path = Path(tempfile.gettempdir()) / "zeroinf-tiny-llama"
    if not (path / "config.json").exists():
        save_tiny_hf(path, "llama")
    sizes = [u.nbytes for u in Checkpoint(ensure_converted(path)).units]
    return path, 2 * max(sizes) + sum(sizes) // 4


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("path", nargs="?", help="HF folder or zeroinf checkpoint (default: tiny model)")
    p.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    p.add_argument("--offload", default="cpu", choices=("cpu", "nvme"))
    p.add_argument("--gpu-memory", default=None, help="weights budget (default: 12GiB)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the plan, the io backend

    path, budget = (Path(a.path), a.gpu_memory or "12GiB") if a.path else tiny_model()
    budget = a.gpu_memory or budget
    try:
        with zeroinf.load(path, device=a.device, offload=a.offload, gpu_memory=budget) as model:
            ids = torch.randint(4, model.config.vocab_size, (a.batch_size, 16))
            out = model.generate(ids, max_new_tokens=a.max_new_tokens, progress=True)
            s = model.last_stats
    except zeroinf.ZeroInfError as e:
        raise SystemExit(f"quickstart: error: {e}") from None
    print(
        f"generated {tuple(out.shape)}: {s.tokens_per_s:.1f} tok/s "
        f"(prefill {s.prefill_s:.2f} s, decode {s.decode_step_s * 1e3:.1f} ms/step)"
    )


if __name__ == "__main__":
    main()
