"""Batch jobs: JSONL records in, results lines out, resumable and shared among ranks.

`zeroinf-generate` (zeroinf.cli.generate) is the command line over `run_job`."""

from __future__ import annotations

from zeroinf.jobs.batching import Scheduler, StaticBatcher, plan_batches
from zeroinf.jobs.job import JobConfig, Summary, finish_row, model_generate, run_job
from zeroinf.jobs.output import ResultWriter, merge, scan
from zeroinf.jobs.ranks import Ranks, part_path, shard
from zeroinf.jobs.records import (
    BadRecord,
    Defaults,
    JobError,
    Request,
    Sampling,
    parse_lines,
    prepare,
    read_input,
    record_seed,
)

__all__ = [
    "BadRecord", "Defaults", "JobConfig", "JobError", "Ranks", "Request", "ResultWriter",
    "Sampling", "Scheduler", "StaticBatcher", "Summary", "finish_row", "merge", "model_generate",
    "parse_lines", "part_path", "plan_batches", "prepare", "read_input", "record_seed", "run_job",
    "scan", "shard",
]  # fmt: skip
