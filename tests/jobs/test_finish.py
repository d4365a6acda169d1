"""Results lines from raw new tokens: cut at the record's own max_new_tokens, at the first EOS
(kept in token_ids, not in text), or where the text first contains a stop string."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from zeroinf.jobs.job import finish_row
from zeroinf.jobs.records import Request, Sampling

EOS = (2,)


@pytest.fixture(scope="module")
def tok(tiny_hf: Callable[..., Path]):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_hf("llama")), local_files_only=True)


def req(max_new: int = 6, stop: tuple[str, ...] = (), meta: object = None) -> Request:
    return Request(0, 1, "r", (5, 6, 7), max_new, Sampling(), 0, stop, meta)


def words(*ids: int) -> str:
    return " ".join(f"w{i - 4}" for i in ids)  # the tiny vocabulary: id k is "w{k-4}"


def test_length(tok) -> None:
    out = finish_row(req(4, meta={"k": 1}), [10, 11, 12, 13, 14, 15], EOS, tok)
    assert out == {
        "id": "r", "text": words(10, 11, 12, 13), "token_ids": [10, 11, 12, 13],
        "finish_reason": "length", "usage": {"prompt_tokens": 3, "completion_tokens": 4},
        "meta": {"k": 1},
    }  # fmt: skip


def test_eos_and_padding_after_it(tok) -> None:
    out = finish_row(req(), [10, 11, 2, 0, 0, 0], EOS, tok)
    assert (out["text"], out["token_ids"], out["finish_reason"]) == (words(10, 11), [10, 11, 2],
                                                                     "stop")  # fmt: skip
    assert out["usage"]["completion_tokens"] == 3
    # an EOS beyond the record's own max_new_tokens (its batch-mates ran longer) does not count
    out = finish_row(req(2), [10, 11, 2], EOS, tok)
    assert (out["token_ids"], out["finish_reason"]) == ([10, 11], "length")


def test_stop_strings(tok) -> None:
    new = [10, 11, 12, 11, 13, 14]
    out = finish_row(req(stop=(words(11, 12), words(14))), new, EOS, tok)
    assert (out["text"], out["token_ids"], out["finish_reason"]) == (words(10) + " ", [10, 11, 12],
                                                                     "stop")  # fmt: skip
    # the stop string that completes first wins, even if another one starts earlier
    out = finish_row(req(stop=(words(10, 11, 12, 11, 13), words(11))), new, EOS, tok)
    assert (out["text"], out["token_ids"]) == (words(10) + " ", [10, 11])
    out = finish_row(req(stop=("w99",)), new, EOS, tok)
    assert (out["token_ids"], out["finish_reason"]) == (new, "length")


def test_without_tokenizer() -> None:
    out = finish_row(req(stop=("w1",)), [10, 2], EOS, None)
    assert (out["text"], out["token_ids"], out["finish_reason"]) == (None, [10, 2], "stop")
