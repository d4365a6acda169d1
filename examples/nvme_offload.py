"""Stream the weights from NVMe: O_DIRECT reads of the checkpoint's unit files into a pinned
staging ring, then to the GPU, while the previous unit computes.

    python examples/nvme_offload.py PATH [--nvme-dir /mnt/nvme/zeroinf] [--gpu-memory 8GiB]

With --nvme-dir an HF folder is converted into that directory (put it on the fast drive);
without it the checkpoint's own folder is read. Host memory holds only the staging ring.
"""

from __future__ import annotations

import argparse
import logging

import torch

import zeroinf


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("path")
    p.add_argument(
        "--nvme-dir", help="where the streamable unit files live (default: the checkpoint)"
    )
    p.add_argument("--gpu-memory", default="8GiB")
    p.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with zeroinf.load(a.path, device=a.device, offload="nvme", nvme_dir=a.nvme_dir,
                      gpu_memory=a.gpu_memory) as model:  # fmt: skip
        ids = torch.randint(4, model.config.vocab_size, (8, 32))
        out = model.generate(ids, max_new_tokens=8, progress=True)
        s = model.last_stats
        gbps = model.plan.streamed_bytes * max(1, s.new_tokens - 1) / s.decode_s / 1e9
        print(f"{tuple(out.shape)}: decode {s.decode_step_s:.2f} s/step, {gbps:.2f} GB/s from NVMe")


if __name__ == "__main__":
    main()
