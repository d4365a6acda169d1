"""zeroinf-generate: a JSONL file of prompts -> a JSONL file of completions, resumable."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from zeroinf.jobs import Defaults, Ranks
    from zeroinf.jobs.records import Tokenizer

PROG = "zeroinf-generate"
EPILOG = """\
input lines (JSONL), one of:
  {"id": "a", "prompt": "Summarise: ..."}
  {"id": "b", "messages": [{"role": "user", "content": "..."}]}   (the chat template)
  {"id": 3, "input_ids": [1, 415, 2936]}
  optional per record: max_new_tokens, temperature, top_k, top_p, seed, stop, meta

output lines, in any order:
  {"id", "text", "token_ids", "finish_reason": "stop"|"length",
   "usage": {"prompt_tokens", "completion_tokens"}}      (+ "meta" when the record had one)
  {"id", "error"}   a bad record (with "line" when its id is missing, invalid or repeated)

Every finished batch is appended and fsynced. Rerun the same command after a crash or Ctrl-C:
ids already in OUTPUT are skipped and a torn last line is cut off, so no record is lost or
repeated, and with the same --seed the outputs are the same as an uninterrupted run's (each
record samples from its own seed, derived from --seed and its id). Under torchrun each rank
runs every WORLD_SIZE-th record into OUTPUT.rank<r>; rank 0 merges them into OUTPUT.

examples:
  zeroinf-generate --model ~/ckpt/llama2-7b --input prompts.jsonl --output out.jsonl
  zeroinf-generate --model ~/models/Mistral-7B-Instruct --input q.jsonl --output a.jsonl \\
      --chat --temperature 0.7 --top-p 0.9 --max-new-tokens 256 --gpu-memory 8GiB
  torchrun --nproc-per-node 4 -m zeroinf.cli.generate --model M --input I --output O"""

log = logging.getLogger("zeroinf")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        _fail(f"{message} (see {PROG} --help)")


def _fail(message: str, code: int = 2) -> NoReturn:
    print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr)
    raise SystemExit(code)


def _batch_size(v: str) -> int | str:
    if v == "auto":
        return v
    if not v.isdigit() or int(v) < 1:
        raise argparse.ArgumentTypeError(f"{v!r}: an integer >= 1 or 'auto'")
    return int(v)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Generate completions for a JSONL file of prompts with a model larger than "
        "the GPU (weights streamed from pinned CPU memory or NVMe). Resumable.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    io = p.add_argument_group("files")
    io.add_argument("--model", required=True, help="a zeroinf checkpoint or a Hugging Face folder")
    io.add_argument("--input", required=True, help="JSONL records (see below)")
    io.add_argument("--output", required=True, help="JSONL results, appended to and resumed")
    m = p.add_argument_group("placement")
    m.add_argument("--device", help="cuda:N or cpu (default: cuda:0 if available, else cpu)")
    m.add_argument("--offload", choices=("cpu", "nvme"), default="cpu",
                   help="where streamed layers live (default: cpu, pinned memory)")  # fmt: skip
    m.add_argument("--gpu-memory", default="12GiB",
                   help="device budget, e.g. 12GiB (default). With --batch-size auto: the whole "
                   "budget (weights, KV cache, activations), 'all' = the memory free now; with "
                   "a number: the weights' budget (KV cache on top), 'all' = every layer "
                   "resident")  # fmt: skip
    m.add_argument("--nvme-dir", help="with --offload nvme: convert an HF folder into this folder")
    m.add_argument("--prefetch", type=int, default=2, help="layers streamed ahead (default: 2)")
    m.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                   help="weights dtype (default: the checkpoint's)")  # fmt: skip
    m.add_argument("--kv-dtype", choices=("int8",),
                   help="store the KV cache as int8 (about half the bytes: larger batches; "
                   "lossy, so off by default)")  # fmt: skip
    m.add_argument("--kv-tier", choices=("gpu", "cpu", "split"),
                   help="where the KV cache lives: gpu, cpu (host memory: larger batches, "
                   "attention on the CPU), or split (the planner's layers on each, with "
                   "--batch-size auto); default: the planner's choice with --batch-size auto, "
                   "else gpu")  # fmt: skip
    g = p.add_argument_group("generation (a record's own fields override these)")
    g.add_argument("--batch-size", type=_batch_size, default="auto",
                   help="records per batch, or 'auto' (default): the planner's batch for the "
                   "longest pending prompt and the largest max_new_tokens within "
                   "--gpu-memory")  # fmt: skip
    g.add_argument("--max-new-tokens", type=int, default=128, help="default: 128")
    g.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy (default); > 0 samples")  # fmt: skip
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default: 1.0 = off)")
    g.add_argument("--top-k", type=int, default=0, help="top-k sampling (default: 0 = off)")
    g.add_argument("--seed", type=int, default=0,
                   help="job seed; each record samples from a seed derived from it and the "
                   "record's id (default: 0)")  # fmt: skip
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end a completion where its text contains TEXT (repeatable)")  # fmt: skip
    g.add_argument("--chat", action="store_true",
                   help="render 'prompt' records through the tokenizer's chat template as one "
                   "user message ('messages' records always are)")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bar, a log line per batch")
    p.add_argument(
        "--refill",
        action="store_true",
        help="continuous refill: a finished row's place goes to the next record, whose prefill "
        "shares the weight pass with the other rows' decode (under torchrun: each rank its "
        "share of the records, the ranks agreeing before every pass)",
    )
    return p


def check_args(a: argparse.Namespace) -> None:
    """Bad flags and paths exit 2 before anything heavy is imported."""
    if a.max_new_tokens < 1:
        _fail(f"--max-new-tokens {a.max_new_tokens}: must be >= 1")
    if not a.temperature >= 0:
        _fail(f"--temperature {a.temperature}: must be >= 0 (0 = greedy)")
    if not 0 < a.top_p <= 1:
        _fail(f"--top-p {a.top_p}: must be in (0, 1]")
    if a.top_k < 0:
        _fail(f"--top-k {a.top_k}: must be >= 0")
    if not 0 <= a.seed < 2**63:
        _fail(f"--seed {a.seed}: must be in [0, 2**63)")
    if a.prefetch < 1:
        _fail(f"--prefetch {a.prefetch}: must be >= 1")
    if any(not s for s in a.stop):
        _fail("--stop: stop strings must be non-empty")
    model, inp, out = Path(a.model), Path(a.input), Path(a.output)
    if not model.is_dir():
        _fail(f"--model {model}: {'not a folder' if model.exists() else 'no such folder'}")
    if not (model / "config.json").is_file() and not (model / "manifest.json").is_file():
        _fail(f"--model {model}: neither a zeroinf checkpoint nor a Hugging Face folder "
              "(no manifest.json or config.json)")  # fmt: skip
    if not inp.is_file():
        _fail(f"--input {inp}: {'not a file' if inp.exists() else 'no such file'}")
    if not os.access(inp, os.R_OK):
        _fail(f"--input {inp}: not readable")
    if out.exists() and not out.is_file():
        _fail(f"--output {out}: not a file")
    if not out.parent.is_dir():
        _fail(f"--output {out}: no such folder {out.parent}")
    if out.exists() and out.resolve() == inp.resolve():
        _fail(f"--output {out}: is the input file")
    if not os.access(out.parent, os.W_OK) or out.exists() and not os.access(out, os.W_OK):
        _fail(f"--output {out}: not writable")


def load_tokenizer(*folders: Path) -> Any:
    """The checkpoint's tokenizer from local files (the converter copies them beside the
    manifest); None when no folder holds one."""
    from transformers import AutoTokenizer

    for folder in dict.fromkeys(folders):
        has_files = any(folder.glob("tokenizer*")) or any(folder.glob("*.model"))
        if not has_files:
            continue
        try:
            # Never run code from the model folder: without an explicit False, transformers
            # asks on stdin whether to run a folder's custom tokenizer code (and a "y" there,
            # e.g. from `yes |`, would run it).
            return AutoTokenizer.from_pretrained(
                str(folder), local_files_only=True, trust_remote_code=False
            )
        except Exception as e:  # a broken tokenizer is reported, then text records fail alone
            log.warning("%s: cannot load the tokenizer (%s)", folder, " ".join(str(e).split()))
    return None


def eos_ids(folders: list[Path], tok: Any) -> tuple[int, ...]:
    """End-of-sequence ids: generation_config.json's (an id or a list), else the tokenizer's."""
    for folder in folders:
        f = folder / "generation_config.json"
        if f.is_file():
            eos = json.loads(f.read_text()).get("eos_token_id")
            if eos is not None:
                return tuple(eos) if isinstance(eos, list) else (int(eos),)
    if tok is not None and tok.eos_token_id is not None:
        return (int(tok.eos_token_id),)
    return ()


class _Terminated(KeyboardInterrupt):
    code = 143


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Terminated()


def job_shape(
    a: argparse.Namespace, tok: Tokenizer | None, defaults: Defaults, ranks: Ranks
) -> tuple[int, int, int]:
    """(longest prompt in tokens, largest max_new_tokens, count) over this rank's records not yet
    written: what --batch-size auto plans for. The longest prompt sizes every row's KV cache, so
    no batch of the job (each is sorted by length) needs more memory than the plan."""
    from zeroinf.jobs import BadRecord, prepare, read_input, shard
    from zeroinf.jobs.ranks import done_keys

    done = done_keys(Path(a.output))
    mine = shard(read_input(a.input), ranks.rank, ranks.world)
    todo = [r for r in mine if not isinstance(r, BadRecord) and r.key not in done]
    # positions and vocabulary are checked when the job prepares the records for real
    reqs = [prepare(r, tok, defaults, sys.maxsize, sys.maxsize) for r in todo]
    reqs = [q for q in reqs if not isinstance(q, BadRecord)]
    if not reqs:
        return 1, defaults.max_new_tokens, 0
    return max(len(q.prompt_ids) for q in reqs), max(q.max_new_tokens for q in reqs), len(reqs)


def run(a: argparse.Namespace) -> int:
    import torch

    import zeroinf
    from zeroinf.jobs import Defaults, JobConfig, Ranks, Sampling, run_job

    ranks = Ranks.from_env()
    device = a.device
    if device is None:
        device = "cuda:0" if torch.cuda.is_available() else "cpu"
        if device == "cpu":
            log.warning("no CUDA device: generating on the CPU (slow); --device cpu hides this")
    elif device == "cuda":
        device = "cuda:0"
    defaults = Defaults(
        max_new_tokens=a.max_new_tokens, sampling=Sampling(a.temperature, a.top_k, a.top_p),
        seed=a.seed, stop=tuple(a.stop), chat=a.chat,
    )  # fmt: skip
    tok = load_tokenizer(Path(a.model))
    if tok is None and (a.chat or a.stop):
        _fail(f"--model {a.model}: no tokenizer files, so --chat and --stop cannot work")
    if a.chat and not tok.chat_template:
        _fail(f"--chat: the tokenizer in {a.model} has no chat template")
    if tok is None:
        log.warning("%s: no tokenizer; only input_ids records can run, text is null", a.model)
    gpu_memory = None if a.gpu_memory == "all" else a.gpu_memory
    planned: dict[str, Any] = {}
    if a.batch_size == "auto":
        prompt_len, new, todo = job_shape(a, tok, defaults, ranks)
        planned = dict(batch_size="auto", prompt_len=prompt_len, max_new_tokens=new,
                       max_batch_size=max(1, todo))  # fmt: skip
    model = zeroinf.load(
        a.model, device=device, offload=a.offload, gpu_memory=gpu_memory, nvme_dir=a.nvme_dir,
        prefetch=a.prefetch, dtype=a.dtype, progress=not a.quiet, kv_dtype=a.kv_dtype,
        kv_tier=a.kv_tier, **planned,
    )  # fmt: skip
    batch = a.batch_size
    if batch == "auto":
        batch = model.batch_size
        log.info(
            "--batch-size auto: %d records per batch, planned for %d pending records, the "
            "longest prompt (%d tokens) and the largest max_new_tokens (%d): predicted %.1f tok/s",
            batch, todo, prompt_len, new, model.plan.predicted_tok_s,
        )  # fmt: skip
    cfg = JobConfig(Path(a.input), Path(a.output), defaults, batch, not a.quiet, ranks)
    summary = None
    try:
        folders = [Path(a.model), model.checkpoint.path]
        eos = eos_ids(folders, tok)
        scheduler = None
        if a.refill:
            from zeroinf.jobs.refill import RefillScheduler

            scheduler = RefillScheduler(model, batch, eos)
        summary = run_job(cfg, model, tok, eos, scheduler)
    finally:
        try:
            model.close()
        except KeyboardInterrupt as e:  # the job is over: report it, with the interrupt's code
            if summary is None:
                raise
            summary.interrupted = summary.interrupted or getattr(e, "code", 130)
    # one write with its newline (print writes them apart: a signal between them would glue
    # the next line onto the summary, as zeroinf-convert once did)
    sys.stdout.write(f"{PROG}: {summary.line(cfg.output, ranks)}\n")
    sys.stdout.flush()
    return summary.interrupted


def main(argv: list[str] | None = None) -> int:
    from zeroinf.errors import ZeroInfError

    main_thread = threading.current_thread() is threading.main_thread()
    old_term = signal.getsignal(signal.SIGTERM) if main_thread else None
    try:  # from here on an interrupt (Ctrl-C) says one line, however early it comes
        a = build_parser().parse_args(argv)
        check_args(a)
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        if old_term is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _on_sigterm)  # batch schedulers stop jobs with SIGTERM
        return run(a)
    except ZeroInfError as e:
        _fail(str(e))
    except KeyboardInterrupt as e:  # outside the job loop (loading): no write was under way
        code = getattr(e, "code", 130)
        print(f"{PROG}: interrupted; records already written are kept: rerun the same command "
              "to resume", file=sys.stderr)  # fmt: skip
        return code
    except OSError as e:
        _fail(f"{e.filename or ''}: {e.strerror or e}")
    finally:
        if old_term is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, old_term)


if __name__ == "__main__":
    sys.exit(main())
