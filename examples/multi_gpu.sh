#!/usr/bin/env bash
# Several GPUs of one node: each rank keeps 1/N of every streamed unit, copies it over its own
# PCIe link, and an all-gather rebuilds the unit; every rank serves its own share of the records
# and rank 0 merges the output (docs/multi-gpu.md).
#   bash examples/multi_gpu.sh MODEL prompts.jsonl results.jsonl [NGPUS]
set -euo pipefail
model=$1 input=$2 output=$3 n=${4:-$(nvidia-smi -L | wc -l)}
export NCCL_NVLS_ENABLE=0  # NVLink multicast off (some virtualised hosts reject it)
torchrun --nproc-per-node "$n" -m zeroinf.cli.generate --model "$model" --input "$input" \
  --output "$output" --gpu-memory 12GiB --batch-size 32
