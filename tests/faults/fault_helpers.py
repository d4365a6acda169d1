"""Helpers for tests/faults (a module name unique across tests/, as pytest's prepend mode needs):
resource counts, bounded waits, small filesystems, and CLI processes forked from a server that
imported torch once."""

from __future__ import annotations

import gc
import json
import multiprocessing
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from zeroinf.jobs.output import output_key, scan
from zeroinf.jobs.records import Key

T = TypeVar("T")
TIMEOUT = 60.0  # seconds; every wait is bounded, so a hang fails the test instead of the run

# What a CLI imports, so that each forked process starts in a fraction of a second.
PRELOAD = [
    "zeroinf.api", "zeroinf.cli.generate", "zeroinf.cli.convert", "zeroinf.convert",
    "zeroinf.jobs", "transformers", "tokenizers", "jinja2",
    "transformers.models.auto.tokenization_auto", "transformers.tokenization_utils_tokenizers",
    "transformers.tokenization_utils_fast", "transformers.convert_slow_tokenizer",
    "transformers.models.llama.configuration_llama", "tqdm", "fault_helpers",
]  # fmt: skip


def record_cases(name: str, n: int) -> None:
    """Count `n` cases of fault `name` into $ZEROINF_CASES_LOG (docs/reliability.md's table)."""
    log = os.environ.get("ZEROINF_CASES_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"case": name, "n": n}) + "\n")


def open_fds() -> int:
    """File descriptors this process holds (after collecting garbage that may hold some)."""
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


def host_buffers() -> int:
    """zeroinf.io host buffers alive (pinned on a GPU machine; plain mmaps on the CPU)."""
    from zeroinf.io.memory import _HostBuffer

    gc.collect()
    return sum(type(o) is _HostBuffer for o in gc.get_objects())  # (isinstance warns)


def bounded(fn: Callable[[], T], timeout: float = TIMEOUT) -> T:
    """fn() in a thread; fails the test if it has not returned or raised within `timeout`."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the caller
            box["error"] = e

    th = threading.Thread(target=run, daemon=True)
    th.start()
    th.join(timeout)
    assert not th.is_alive(), f"hung: no return within {timeout} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


# ---- small filesystems ----


def mount_tmpfs(folder: Path, nbytes: int) -> bool:
    """A tmpfs of `nbytes` at `folder` (root only); False where mounting is not allowed."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={nbytes}", "tmpfs", str(folder)],
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def resize_tmpfs(folder: Path, nbytes: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={nbytes}", str(folder)], check=True, timeout=30)


def umount(folder: Path) -> None:
    subprocess.run(["umount", str(folder)], check=True, timeout=30)


# ---- CLI processes ----


def ready_marker(log: str) -> Path:
    """The file a CLI process (child) creates as it calls its CLI's main, beside its log."""
    return Path(f"{log}.ready")


def child(prog: str, argv: list[str], log: str, env: dict[str, str], fsize: int | None) -> None:
    """A CLI process: stdout and stderr into `log`, exit status = the CLI's. fsize: the
    RLIMIT_FSIZE a small disk stands in for (writes past it fail with EFBIG)."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(env)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if fsize is not None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a core dump
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    if prog == "convert":
        from zeroinf.cli.convert import main
    else:
        from zeroinf.cli.generate import main
    finished = False
    ready_marker(log).touch()  # in the CLI from here on (Procs.wait_ready)
    try:
        try:
            code = main(argv)
            finished = True  # no signal check between the return and this store
        finally:
            # the CLI is over: a signal now would hit multiprocessing's exit, not the CLI
            signal.signal(signal.SIGINT, signal.SIG_IGN)
    except KeyboardInterrupt:
        if not finished:
            raise
        # an interrupt that arrived as the CLI returned is handled at the next check, inside
        # signal.signal above: the CLI had finished, and its exit status stands
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    raise SystemExit(code)


class Procs:
    """Starts CLI processes from a forkserver that preloaded torch and the CLIs."""

    def __init__(self, folder: Path) -> None:
        self.ctx = multiprocessing.get_context("forkserver")
        self.folder = folder
        self.n = 0

    def start(
        self,
        prog: str,
        argv: list[str],
        env: dict[str, str] | None = None,
        fsize: int | None = None,
    ) -> multiprocessing.process.BaseProcess:
        self.n += 1
        log = str(self.folder / f"{prog}{self.n}.log")
        env = {"OMP_NUM_THREADS": "1", **(env or {})}
        p = self.ctx.Process(target=child, args=(prog, [str(a) for a in argv], log, env, fsize))
        p.start()
        p.log = log  # type: ignore[attr-defined]
        return p

    @staticmethod
    def wait_ready(p: multiprocessing.process.BaseProcess) -> None:
        """Until process `p` (from start) calls its CLI's main: a signal sent before that would
        meet Python's start-up or the child's set-up, not the CLI."""
        log = p.log  # type: ignore[attr-defined]
        deadline = time.monotonic() + TIMEOUT
        while not ready_marker(log).exists():
            assert p.is_alive() and time.monotonic() < deadline, Path(log).read_text()
            time.sleep(0.001)

    def run(self, prog: str, argv: list[str], **kw: Any) -> tuple[int | None, str]:
        """Run to the end: (exit status, log text)."""
        p = self.start(prog, argv, **kw)
        p.join(TIMEOUT)
        if p.is_alive():
            p.kill()
            p.join()
            raise AssertionError(f"{prog} {argv} hung:\n{Path(p.log).read_text()}")
        return p.exitcode, Path(p.log).read_text()


def error_line(log: str, prog: str) -> str:
    """The one line a CLI printed for an error (asserting it is exactly one, no traceback)."""
    assert "Traceback" not in log, log
    lines = [x for x in log.splitlines() if x.startswith(f"{prog}: error: ")]
    assert len(lines) == 1, log
    return lines[0].removeprefix(f"{prog}: error: ")


# ---- batch jobs ----

N_RECORDS = 24


def results(path: Path) -> dict[Key, dict[str, Any]]:
    """Every line of a finished output by key; asserts it is whole and has no repeated key."""
    lines, size = scan(path)
    assert size == path.stat().st_size, f"{path}: torn tail"
    keys = [output_key(o) for o in lines]
    assert len(keys) == len(set(keys)), f"{path}: a record was written twice"
    return dict(zip(keys, lines, strict=True))


def count_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


@dataclass
class Job:
    """zeroinf-generate over N_RECORDS sampled records (one empty prompt, one broken line)."""

    input: Path
    argv: list[str]
    reference: dict[Key, dict[str, Any]]  # an uninterrupted run's results

    def args(self, out: Path, *extra: str) -> list[str]:
        return [*self.argv, "--output", str(out), *extra]
