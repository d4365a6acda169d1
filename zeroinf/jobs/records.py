"""Input records of a batch job: one JSON object per line, parsed and validated into Requests.

A line is `{"id": ..., "prompt": "..."}`, `{"id": ..., "messages": [...]}` or
`{"id": ..., "input_ids": [...]}`, with optional per-record `max_new_tokens`, `temperature`,
`top_k`, `top_p`, `seed`, `stop` and a free-form `meta` copied to the output. A bad line becomes a
BadRecord (written as an error line); it never stops the job.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from zeroinf.errors import ZeroInfError

RecordId = str | int
Key = tuple[str, str]  # ("id", canonical JSON of the id) or ("line", line number)

CONTENT_FIELDS = ("prompt", "messages", "input_ids")
OPTION_FIELDS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop")
FIELDS = ("id", *CONTENT_FIELDS, *OPTION_FIELDS, "meta")


class JobError(ZeroInfError):
    """A batch job cannot go on: unreadable input, an output file that is not ours to repair."""


def id_key(record_id: RecordId) -> Key:
    return ("id", json.dumps(record_id))


def line_key(line: int) -> Key:
    return ("line", str(line))


def record_seed(base: int, record_id: RecordId) -> int:
    """A record's sampling seed from the job seed and its id alone, so that its tokens depend on
    neither its batch-mates, nor the batch size, nor where a previous run was interrupted."""
    h = hashlib.blake2b(f"{base}\0{json.dumps(record_id)}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & (2**63 - 1)


@dataclass(frozen=True)
class Sampling:
    """How a record's tokens are chosen; records with equal Sampling may share a batch."""

    temperature: float = 0.0  # 0: greedy
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature={self.temperature}: must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: must be >= 0 (0 disables)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")
        if self.greedy and (self.top_k, self.top_p) != (0, 1.0):
            # top_k/top_p do not change a greedy pick; normalise so greedy records batch together
            object.__setattr__(self, "top_k", 0)
            object.__setattr__(self, "top_p", 1.0)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Defaults:
    """Job-wide settings (the command line) that a record's own fields override."""

    max_new_tokens: int = 128
    sampling: Sampling = field(default_factory=Sampling)
    seed: int = 0
    stop: tuple[str, ...] = ()
    chat: bool = False  # render "prompt" records through the tokenizer's chat template

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: must be >= 1")
        if any(not s for s in self.stop):
            raise ValueError("stop: stop strings must be non-empty")


@dataclass(frozen=True)
class RawRecord:
    """A parsed line before tokenization (content is exactly one of the three kinds)."""

    index: int  # 0-based position among the input's non-blank lines (sharding across ranks)
    line: int  # 1-based line number in the input file (messages)
    id: RecordId
    prompt: str | None
    messages: tuple[dict[str, Any], ...] | None
    input_ids: tuple[int, ...] | None
    options: dict[str, Any]
    meta: Any = None

    @property
    def key(self) -> Key:
        return id_key(self.id)


@dataclass(frozen=True)
class Request:
    """A record ready to generate: token ids and its resolved settings."""

    index: int
    line: int
    id: RecordId
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    sampling: Sampling
    seed: int
    stop: tuple[str, ...] = ()
    meta: Any = None

    @property
    def key(self) -> Key:
        return id_key(self.id)


@dataclass(frozen=True)
class BadRecord:
    """A record that gets an error line. by_line: the id is missing, invalid or a duplicate, so
    the error line carries the line number and is keyed by it (a resume recognises it)."""

    index: int
    line: int
    id: Any
    error: str
    by_line: bool = False

    @property
    def key(self) -> Key:
        return line_key(self.line) if self.by_line else id_key(self.id)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id}
        if self.by_line:
            out["line"] = self.line
        out["error"] = self.error
        return out


Parsed = RawRecord | BadRecord


def parse_line(text: str, index: int, line: int) -> Parsed:
    """One input line -> RawRecord, or BadRecord with a message naming the line and field."""
    where = f"line {line}"
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return BadRecord(index, line, None, f"{where}: not valid JSON ({e.msg})", by_line=True)
    except (ValueError, RecursionError) as e:  # a number past Python's 4300 digits, deep nesting
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e).split(":")[0]
        return BadRecord(index, line, None, f"{where}: not valid JSON ({why})", by_line=True)
    problem = _unwritable(obj)
    if problem:  # the line could not be written back (as meta, id or error line): refuse it
        return BadRecord(index, line, None, f"{where}: {problem}", by_line=True)
    if not isinstance(obj, dict):
        return BadRecord(index, line, None, f"{where}: not a JSON object", by_line=True)
    rid = obj.get("id")
    if isinstance(rid, bool) or not isinstance(rid, str | int) or rid == "":
        what = (
            "missing"
            if "id" not in obj
            else f"{_short(json.dumps(rid))} is not a string or integer"
        )
        return BadRecord(index, line, rid, f'{where}: "id" {what}', by_line=True)

    def bad(msg: str) -> BadRecord:
        return BadRecord(index, line, rid, f"{where}: {msg}")

    unknown = [k for k in obj if k not in FIELDS]
    if unknown:
        return bad(f"unknown field {_short(repr(unknown[0]))} (fields: {', '.join(FIELDS)})")
    kinds = [k for k in CONTENT_FIELDS if k in obj]
    if len(kinds) != 1:
        return bad('needs exactly one of "prompt", "messages", "input_ids"')
    prompt = messages = input_ids = None
    if kinds[0] == "prompt":
        prompt = obj["prompt"]
        if not isinstance(prompt, str):
            return bad('"prompt" must be a string')
        if not prompt.strip():
            return bad("empty prompt")
    elif kinds[0] == "messages":
        msgs = obj["messages"]
        ok = isinstance(msgs, list) and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in msgs
        )
        if not ok or not msgs:
            return bad('"messages" must be a non-empty list of {"role", "content"} objects')
        messages = tuple(msgs)
    else:
        ids = obj["input_ids"]
        if not isinstance(ids, list) or not all(_is_int(t) and t >= 0 for t in ids):
            return bad('"input_ids" must be a list of non-negative integers')
        if not ids:
            return bad("empty prompt (no input_ids)")
        input_ids = tuple(ids)
    options = {k: obj[k] for k in OPTION_FIELDS if k in obj and obj[k] is not None}
    msg = _check_options(options)
    if msg:
        return bad(msg)
    return RawRecord(index, line, rid, prompt, messages, input_ids, options, obj.get("meta"))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    try:  # an integer past the float range (1e400 written out) is not a usable number
        return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)
    except OverflowError:
        return False


MAX_DEPTH = 64  # JSON nesting a record may have (messages and meta need a handful)


def _short(text: str, limit: int = 60) -> str:
    """`text` cut to `limit` characters, for a one-line message."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _unwritable(obj: Any) -> str | None:
    """Why a parsed line could not be written back as JSON (UTF-8), or None: nesting deeper than
    MAX_DEPTH (json would hit the recursion limit writing it) or a string holding a lone
    surrogate escape such as "\\ud800" (not Unicode: it has no UTF-8 encoding)."""
    stack = [(obj, 1)]
    while stack:
        v, depth = stack.pop()
        if depth > MAX_DEPTH:
            return f"nested deeper than {MAX_DEPTH} levels"
        if isinstance(v, dict):
            stack.extend((k, depth) for k in v)
            stack.extend((x, depth + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, depth + 1) for x in v)
        elif isinstance(v, str):
            try:
                v.encode()
            except UnicodeEncodeError as e:
                bad = e.object[e.start : e.end].encode("unicode_escape").decode()
                return f"text holds {bad}, a lone surrogate escape (not valid Unicode)"
    return None


def _check_options(o: dict[str, Any]) -> str | None:
    if "max_new_tokens" in o and not (_is_int(o["max_new_tokens"]) and o["max_new_tokens"] >= 1):
        return '"max_new_tokens" must be an integer >= 1'
    if "temperature" in o and not (_is_num(o["temperature"]) and o["temperature"] >= 0):
        return '"temperature" must be a number >= 0 (0 = greedy)'
    if "top_k" in o and not (_is_int(o["top_k"]) and o["top_k"] >= 0):
        return '"top_k" must be an integer >= 0'
    if "top_p" in o and not (_is_num(o["top_p"]) and 0 < o["top_p"] <= 1):
        return '"top_p" must be a number in (0, 1]'
    if "seed" in o and not (_is_int(o["seed"]) and 0 <= o["seed"] < 2**63):
        return '"seed" must be an integer in [0, 2**63)'
    if "stop" in o:
        stop = [o["stop"]] if isinstance(o["stop"], str) else o["stop"]
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            return '"stop" must be a non-empty string or a list of them'
        o["stop"] = tuple(stop)
    return None


def parse_lines(lines: Iterable[str]) -> list[Parsed]:
    """Every non-blank line, in order. A repeated id is an error on every line after the first
    (all ranks parse the whole input, so they agree on which occurrence runs)."""
    out: list[Parsed] = []
    first: dict[Key, int] = {}
    for n, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        rec = parse_line(text, len(out), n)
        if not (isinstance(rec, BadRecord) and rec.by_line):
            if rec.key in first:
                msg = (
                    f"line {n}: duplicate id {json.dumps(rec.id)} (first on line {first[rec.key]})"
                )
                rec = BadRecord(rec.index, n, rec.id, msg, by_line=True)
            else:
                first[rec.key] = n
        out.append(rec)
    return out


def read_input(path: str) -> list[Parsed]:
    """Parse a JSONL file; a line that is not UTF-8 is a bad record, not a crash."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise JobError(f"--input {path}: {e.strerror or e}") from None
    lines = []
    for raw in data.split(b"\n"):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            lines.append("\x00not utf-8")  # json.loads rejects it: "line N: not valid JSON"
    return parse_lines(lines)


class Tokenizer(Protocol):
    """What a job needs from a Hugging Face tokenizer."""

    chat_template: Any

    def __call__(self, text: str, add_special_tokens: bool = ...) -> Any: ...

    def apply_chat_template(self, messages: Any, **kwargs: Any) -> Any: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


def prepare(
    raw: RawRecord,
    tok: Tokenizer | None,
    defaults: Defaults,
    max_positions: int,
    vocab_size: int,
) -> Request | BadRecord:
    """Tokenize a record (through the chat template for messages, and for prompts with --chat)
    and resolve its settings; a record the model cannot take becomes a BadRecord."""

    def bad(msg: str) -> BadRecord:
        return BadRecord(raw.index, raw.line, raw.id, f"line {raw.line}: {msg}")

    if raw.input_ids is not None:
        ids = raw.input_ids
        if max(ids) >= vocab_size:
            return bad(f"input_ids: token {max(ids)} is outside the vocabulary of {vocab_size}")
    else:
        if tok is None:
            return bad("text records need a tokenizer; the model folder has none (use input_ids)")
        msgs = raw.messages
        if msgs is None and defaults.chat:
            msgs = ({"role": "user", "content": raw.prompt},)
        if msgs is not None:
            if not tok.chat_template:
                return bad("messages need a chat template; the tokenizer has none")
            try:
                text = tok.apply_chat_template(
                    list(msgs), add_generation_prompt=True, tokenize=False
                )
            except Exception as e:  # a template raising on this record's messages
                return bad(f"chat template failed: {' '.join(str(e).split())}")
        else:
            text = raw.prompt
        try:  # a tokenizer raising on one record's text fails that record alone
            ids = tuple(tok(text, add_special_tokens=msgs is None)["input_ids"])
        except Exception as e:
            return bad(f"tokenizer failed: {' '.join(str(e).split())[:200]}")
        if not ids:
            return bad("empty prompt (0 tokens)")
    o = raw.options
    new = o.get("max_new_tokens", defaults.max_new_tokens)
    if len(ids) + new > max_positions:
        return bad(
            f"prompt of {len(ids)} tokens + max_new_tokens {new} exceeds the model's "
            f"{max_positions} positions"
        )
    d = defaults.sampling
    sampling = Sampling(
        float(o.get("temperature", d.temperature)), o.get("top_k", d.top_k),
        float(o.get("top_p", d.top_p)),
    )  # fmt: skip
    seed = o["seed"] if "seed" in o else record_seed(defaults.seed, raw.id)
    stop = o.get("stop", defaults.stop)
    return Request(raw.index, raw.line, raw.id, ids, new, sampling, seed, stop, raw.meta)
