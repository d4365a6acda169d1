"""zeroinf-convert: a Hugging Face folder -> a zeroinf checkpoint, or --check an existing one."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import NoReturn

PROG = "zeroinf-convert"
EPILOG = """\
examples:
  zeroinf-convert ~/models/Llama-2-7b-hf ~/ckpt/llama2-7b --dtype float16
  zeroinf-convert --check ~/ckpt/llama2-7b

Errors print one line and exit with status 2. The output is written to DST.partial/ and renamed
to DST when complete: an interrupted or failed run leaves neither behind."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        _fail(f"{message} (see {PROG} --help)")


def _fail(message: str, code: int = 2) -> NoReturn:
    one_line = " ".join(str(message).split("\n"))
    print(f"{PROG}: error: {one_line}", file=sys.stderr)
    raise SystemExit(code)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        usage=f"{PROG} SRC DST [--dtype DTYPE] [--force] [--check]\n       {PROG} --check DST",
        description="Convert a Hugging Face model folder (config.json + *.safetensors or "
        "pytorch_model*.bin) into a zeroinf checkpoint: manifest.json plus one 4096-aligned "
        "file per unit (embedding, each layer, head), streamed and written atomically.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("paths", nargs="*", metavar="SRC DST", help="source HF folder and output folder")
    p.add_argument(
        "--dtype",
        choices=("bfloat16", "float16", "float32"),
        help="store float tensors in this dtype (default: the source's; integer tensors are kept)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing zeroinf checkpoint")
    p.add_argument(
        "--check",
        action="store_true",
        help="verify sizes and CRC32 of every unit file (of DST after converting, or of the one "
        "folder given)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--quantize",
        choices=("int4", "int8"),
        help="store the decoder layers' linear weights group-wise int4/int8 (docs/format.md)",
    )
    p.add_argument("--group-size", type=int, default=64, help="input channels per scale (64)")
    p.add_argument(
        "--quant-scheme", choices=("sym", "asym"), default="sym", help="int4 zero point (sym)"
    )
    p.add_argument("--quantize-head", action="store_true", help="also quantize the LM head")
    return p


def check(folder: Path) -> str:
    """Verify every unit file's size and CRC32; the first bad file raises CheckpointError."""
    from zeroinf.format import Checkpoint

    ckpt = Checkpoint(folder)  # sizes (and the manifest) are checked on open
    ckpt.verify_all()
    total = sum(u.nbytes for u in ckpt.units)
    return f"{folder}: OK ({len(ckpt.units)} units, {total / 1e9:.2f} GB, sizes and CRC32)"


def run(args: argparse.Namespace) -> str:
    from zeroinf.convert import convert

    if args.check and len(args.paths) == 1:
        if args.dtype or args.force:
            _fail("--check DST takes no --dtype/--force (give SRC DST to convert first)")
        return check(Path(args.paths[0]))
    if len(args.paths) != 2:
        _fail(f"expected SRC DST (or --check DST), got {len(args.paths)} path(s)")
    src, dst = (Path(p) for p in args.paths)
    t0 = time.perf_counter()
    quant = None
    if args.quantize:
        from zeroinf.convert import Quantization

        quant = Quantization(int(args.quantize[3:]), args.group_size, args.quant_scheme,
                             args.quantize_head)  # fmt: skip
    out = convert(src, dst, dtype=args.dtype, force=args.force, progress=not args.quiet,
                  quantize=quant)  # fmt: skip
    dt = time.perf_counter() - t0
    from zeroinf.format import Checkpoint

    ckpt = Checkpoint(out)
    total = sum(u.nbytes for u in ckpt.units)
    line = (
        f"{out}: {len(ckpt.units)} units, {total / 1e9:.2f} GB {ckpt.manifest.dtype} "
        f"in {dt:.1f} s ({total / 1e9 / max(dt, 1e-9):.2f} GB/s)"
    )
    if args.check:
        line += "\n" + check(out)
    return line


def main(argv: list[str] | None = None) -> int:
    from zeroinf.errors import ZeroInfError

    try:  # from here on an interrupt (Ctrl-C) says one line, however early it comes
        args = build_parser().parse_args(argv)
        # one write with its newline: an interrupt arriving while the summary is printed (print
        # writes the text and the newline separately) would glue the error line to it
        sys.stdout.write(f"{run(args)}\n")
    except ZeroInfError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        _fail("interrupted (no partial output was left behind)", code=130)
    except OSError as e:
        _fail(f"{e.filename or ''}: {e.strerror or e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
