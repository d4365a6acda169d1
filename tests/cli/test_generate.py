"""zeroinf-generate in-process: results equal the Python API's for the same prompts (whatever
the batching), bad records get error lines while the job goes on, a torn output is repaired
and resumed, --chat and --stop work, and bad flags exit 2 with one line."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import zeroinf
from zeroinf.cli.generate import main
from zeroinf.convert import convert
from zeroinf.format import Checkpoint
from zeroinf.jobs.records import record_seed

PREFIX = "zeroinf-generate: error: "
EOS = 2  # the tiny checkpoints' generation_config.json


@pytest.fixture(scope="module")
def ckpt(tiny_hf: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(convert(tiny_hf("llama"), tmp_path_factory.mktemp("gen") / "zi", progress=False))


@pytest.fixture(scope="module")
def model(ckpt: Path) -> Iterator[Any]:
    with zeroinf.load(ckpt, device="cpu", gpu_memory=None, progress=False) as m:
        yield m


@pytest.fixture(scope="module")
def tok(ckpt: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(ckpt), local_files_only=True)


def streaming_budget(ckpt: Path) -> str:
    """Room for the prefetch slots and little else: most layers stream."""
    return str(3 * max(u.nbytes for u in Checkpoint(ckpt).units))


def write_jsonl(path: Path, objs: list[Any]) -> Path:
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs))
    return path


def run_cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def read_results(path: Path) -> dict[Any, dict]:
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    keys = [(o.get("line"), json.dumps(o["id"])) if "line" in o else json.dumps(o["id"])
            for o in lines]  # fmt: skip
    assert len(keys) == len(set(keys)), "a record was written twice"
    return dict(zip(keys, lines, strict=True))


def api_result(model: Any, tok: Any, rid: Any, ids: list[int], max_new: int, temperature: float,
               top_k: int, top_p: float, seed: int) -> dict:  # fmt: skip
    """Oracle: the Python API on this one prompt, cut at EOS and decoded."""
    out = model.generate([ids], max_new_tokens=max_new, do_sample=temperature > 0,
                         temperature=temperature or 1.0, top_k=top_k, top_p=top_p,
                         eos_token_id=EOS, seed=[seed])[0, len(ids):].tolist()  # fmt: skip
    gen, reason = out, "length"
    if EOS in out:
        gen, reason = out[: out.index(EOS) + 1], "stop"
    body = gen[:-1] if reason == "stop" else gen
    return {"id": rid, "text": tok.decode(body, skip_special_tokens=True), "token_ids": gen,
            "finish_reason": reason,
            "usage": {"prompt_tokens": len(ids), "completion_tokens": len(gen)}}  # fmt: skip


def chat_ids(tok: Any, messages: list[dict]) -> list[int]:
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


RECORDS: list[Any] = [
    *(
        {"id": i, "prompt": " ".join(f"w{(7 * i + j) % 300}" for j in range(1 + 3 * i % 11))}
        for i in range(9)
    ),
    {"id": "chat", "messages": [{"role": "user", "content": "w4 w5"}]},
    {"id": "ids", "input_ids": [9, 8, 7, 6], "max_new_tokens": 3, "temperature": 0.5, "seed": 11},
    {"id": "k", "prompt": "w8 w9", "top_k": 3, "max_new_tokens": 9},
    {"id": "greedy", "prompt": "w8 w9 w10", "temperature": 0},
    {"id": "empty", "prompt": ""},
    {"id": "long", "prompt": "w3 " * 252},
    "{not json",
    {"id": 2, "prompt": "w1"},
]
ARGS = ("--max-new-tokens", 6, "--temperature", 0.8, "--top-p", 0.9, "--seed", 5)


def expected(model: Any, tok: Any) -> dict[Any, dict]:
    exp = {}
    for r in RECORDS[:13]:
        if "messages" in r:
            ids = chat_ids(tok, r["messages"])
        else:
            ids = r.get("input_ids") or tok(r["prompt"])["input_ids"]
        seed = r.get("seed", record_seed(5, r["id"]))
        exp[json.dumps(r["id"])] = api_result(
            model, tok, r["id"], ids, r.get("max_new_tokens", 6), r.get("temperature", 0.8),
            r.get("top_k", 0), 0.9, seed,
        )  # fmt: skip
    errors = [
        {"id": "empty", "error": "line 14: empty prompt"},
        {"id": "long", "error": "line 15: prompt of 252 tokens + max_new_tokens 6 exceeds the "
         "model's 256 positions"},
        {"id": None, "line": 16, "error": "line 16: not valid JSON (Expecting property name "
         "enclosed in double quotes)"},
        {"id": 2, "line": 17, "error": "line 17: duplicate id 2 (first on line 3)"},
    ]  # fmt: skip
    for e in errors:
        exp[(e["line"], json.dumps(e["id"])) if "line" in e else json.dumps(e["id"])] = e
    return exp


@pytest.fixture(scope="module")
def oracle(model: Any, tok: Any) -> dict[Any, dict]:
    return expected(model, tok)


@pytest.mark.parametrize("batch,refill", [("3", False), ("1", False), ("3", True)])
def test_results_equal_the_python_api(ckpt: Path, oracle: dict, tmp_path: Path, batch: str,
                                      refill: bool,
                                      capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    inp = write_jsonl(tmp_path / "in.jsonl", RECORDS)
    out = tmp_path / "out.jsonl"
    code, stdout, err = run_cli(capsys, "--model", ckpt, "--input", inp, "--output", out,
                                "--device", "cpu", "--gpu-memory", streaming_budget(ckpt),
                                "--batch-size", batch, *ARGS,
                                *(["--refill"] if refill else []))  # fmt: skip
    assert code == 0, err
    assert read_results(out) == oracle  # the error lines too: the job went on past them
    summary = stdout.strip().splitlines()[-1]
    assert summary.startswith("zeroinf-generate: 13 ok, 4 failed, 0 already done of 17 records;")
    tokens = sum(o["usage"]["completion_tokens"] for o in oracle.values() if "usage" in o)
    assert f"; {tokens} tokens in " in summary


def test_resume_repairs_a_torn_line_and_skips_done_ids(
    ckpt: Path, oracle: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", RECORDS)
    out = tmp_path / "out.jsonl"
    # what a crash leaves: some records done (one of them an error line), then half a line
    done = [oracle[json.dumps(3)], oracle[json.dumps("chat")], oracle[json.dumps("empty")]]
    torn = json.dumps(oracle[json.dumps(5)])[:40]
    out.write_text("".join(json.dumps(o) + "\n" for o in done) + torn)
    code, stdout, err = run_cli(capsys, "--model", ckpt, "--input", inp, "--output", out,
                                "--device", "cpu", "--batch-size", 4, *ARGS)  # fmt: skip
    assert code == 0, err
    assert read_results(out) == oracle
    assert out.read_text().startswith("".join(json.dumps(o) + "\n" for o in done))
    assert "11 ok, 3 failed, 3 already done of 17 records" in stdout
    # a second resume has nothing to do
    code, stdout, _ = run_cli(capsys, "--model", ckpt, "--input", inp, "--output", out,
                              "--device", "cpu", *ARGS)  # fmt: skip
    assert code == 0 and "0 ok, 0 failed, 17 already done" in stdout
    assert read_results(out) == oracle


def test_chat_and_stop(ckpt: Path, model: Any, tok: Any, tmp_path: Path,
                       capsys: pytest.CaptureFixture[str], caplog: Any) -> None:  # fmt: skip
    prompts = {"a": "w10 w11", "b": "w12"}
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": k, "prompt": p} for k, p in prompts.items()])
    refs = {
        k: api_result(model, tok, k, chat_ids(tok, [{"role": "user", "content": p}]), 8, 0, 0, 1,
                      0)
        for k, p in prompts.items()
    }  # fmt: skip
    # stop at the third generated word of "a": its text ends before the first occurrence
    stop = refs["a"]["text"].split()[2]
    out = tmp_path / "out.jsonl"
    with caplog.at_level(logging.INFO, logger="zeroinf"):
        code, _, err = run_cli(capsys, "--model", ckpt, "--input", inp, "--output", out,
                               "--device", "cpu", "--chat", "--stop", stop, "--stop", "w999",
                               "--max-new-tokens", 8, "--quiet")  # fmt: skip
    assert code == 0, err
    assert "generate:" not in err  # --quiet: no progress bar ...
    assert any(m.startswith("batch 1/1: 2 records") for m in caplog.messages)  # ... log lines
    got = read_results(out)
    for k, ref in refs.items():
        o = got[json.dumps(k)]
        assert o["usage"]["prompt_tokens"] == ref["usage"]["prompt_tokens"]  # the template's
        pos = ref["text"].find(stop)
        if pos >= 0:  # word-level vocabulary: k tokens decode to k words joined by spaces
            k = len(ref["text"][: pos + len(stop)].split())
            assert o["text"] == ref["text"][:pos]
            assert o["token_ids"] == ref["token_ids"][:k]
            assert o["finish_reason"] == "stop"
        else:
            assert o == ref


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(PREFIX), err
    return lines[0]


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"--model": "{tmp}/nope"}, "--model {tmp}/nope: no such folder"),
        ({"--model": "{tmp}"}, "neither a zeroinf checkpoint nor a Hugging Face folder"),
        ({"--input": "{tmp}/nope.jsonl"}, "--input {tmp}/nope.jsonl: no such file"),
        ({"--input": "{tmp}"}, "not a file"),
        ({"--output": "{tmp}/no/out.jsonl"}, "no such folder {tmp}/no"),
        ({"--output": "{tmp}/in.jsonl"}, "is the input file"),
        ({"--batch-size": "0"}, "--batch-size: '0': an integer >= 1 or 'auto'"),
        ({"--batch-size": "many"}, "--batch-size"),
        ({"--temperature": "-1"}, "--temperature -1.0: must be >= 0"),
        ({"--top-p": "1.5"}, "--top-p 1.5: must be in (0, 1]"),
        ({"--top-k": "-2"}, "--top-k -2"),
        ({"--max-new-tokens": "0"}, "--max-new-tokens 0"),
        ({"--offload": "disk"}, "--offload: invalid choice"),
        ({"--stop": ""}, "--stop"),
        ({"--gpu-memory": "lots"}, "gpu_memory: cannot parse size 'lots'"),
        ({"--bogus": "1"}, "unrecognized arguments: --bogus"),
        ({"--model": None}, "the following arguments are required: --model"),
    ],
)
def test_bad_flags_exit_2_with_one_line(ckpt: Path, tmp_path: Path, change: dict, needle: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "prompt": "w1"}])
    flags = {"--model": str(ckpt), "--input": "{tmp}/in.jsonl", "--output": "{tmp}/out.jsonl",
             "--device": "cpu"}  # fmt: skip
    flags.update(change)
    argv = [x.replace("{tmp}", str(tmp_path)) for k, v in flags.items() if v is not None
            for x in (k, v)]  # fmt: skip
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert needle.replace("{tmp}", str(tmp_path)) in one_error_line(err)
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_exits_2(ckpt: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "prompt": "w1"}])
    code, _, err = run_cli(capsys, "--model", ckpt, "--input", inp, "--output",
                           tmp_path / "out.jsonl", "--device", "cuda")  # fmt: skip
    assert code == 2 and "CUDA is not available" in one_error_line(err)


def test_kv_dtype_int8_equals_the_python_api(
    ckpt: Path,
    tok: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--kv-dtype int8 reaches zeroinf.load, and greedy results equal the Python API's with
    kv_dtype="int8"."""
    seen = []
    real_load = zeroinf.load

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("kv_dtype"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(zeroinf, "load", spy)
    recs = [{"id": i, "prompt": " ".join(f"w{(7 * i + j) % 40}" for j in range(3 + i))}
            for i in range(6)]  # fmt: skip
    inp = write_jsonl(tmp_path / "in.jsonl", recs)
    out = tmp_path / "out.jsonl"
    code, _, err = run_cli(capsys, "--model", ckpt, "--input", inp, "--output", out,
                           "--device", "cpu", "--gpu-memory", streaming_budget(ckpt),
                           "--batch-size", "2", "--max-new-tokens", 12, "--temperature", 0,
                           "--kv-dtype", "int8")  # fmt: skip
    assert code == 0, err
    assert seen == ["int8"]
    with real_load(ckpt, device="cpu", gpu_memory=None, progress=False, kv_dtype="int8") as m:
        want = {json.dumps(r["id"]): api_result(m, tok, r["id"], tok(r["prompt"])["input_ids"],
                                                12, 0, 0, 1.0, 0)
                for r in recs}  # fmt: skip
    assert read_results(out) == want
