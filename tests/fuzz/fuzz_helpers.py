"""Helpers for tests/fuzz (a module name unique across tests/): one hypothesis profile (fixed
seed, modest example counts, a deadline as the hang check), JSON strategies with the values that
break parsers (huge and negative numbers, NaN, lone surrogates, deep nesting), case counts."""

from __future__ import annotations

import json
import os
from collections import Counter
from datetime import timedelta
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("ZEROINF_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,  # the same cases on every run: CI is reproducible
    deadline=timedelta(seconds=5),  # an example that takes this long counts as a hang
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    database=None,
)

COUNTS: Counter[str] = Counter()  # examples run per fuzz target (docs/reliability.md)


def count(name: str) -> None:
    COUNTS[name] += 1


def record_cases(name: str, n: int) -> None:
    log = os.environ.get("ZEROINF_CASES_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"case": name, "n": n}) + "\n")


# any code point, lone surrogates included (st.text() leaves them out by default)
ANY_CHAR = st.characters(codec=None, categories=None)
texts = st.text(ANY_CHAR, max_size=12) | st.sampled_from(
    ["", "\ud800", "\udc80x", "é", "\u202e", "\x00", "a" * 300, "../x", "/etc/passwd", "embed",
     "layers.0", "head", "float32", "zeroinf", "0-embed.bin"]
)  # fmt: skip
BIG_INTS = st.sampled_from(
    [-1, 0, 1, 4095, 4096, 8192, 2**31, 2**32, 2**63, 2**64, 10 * 2**40, 10**30, 10**400]
)
numbers = (
    st.integers()
    | BIG_INTS
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([0.0, -0.0, 5e-324, 1e-40, 1e308, 0.5, 1.0])
)
scalars = st.none() | st.booleans() | numbers | texts
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=12,
)


def nested(depth: int) -> Any:
    v: Any = 0
    for _ in range(depth):
        v = [v]
    return v


deep_values = st.integers(60, 200).map(nested)  # past any sane nesting, below Python's limit
values = json_values | deep_values


def paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path into a JSON object (for mutations)."""
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += paths(v, (*prefix, i))
    return out


def mutate(obj: Any, path: tuple[Any, ...], action: str, value: Any, key: str) -> Any:
    """A copy of obj with the node at `path` replaced by `value`, deleted, or given a new key."""
    obj = json.loads(json.dumps(obj))
    if not path:
        return value if action != "add" or not isinstance(obj, dict) else {**obj, key: value}
    parent = obj
    for p in path[:-1]:
        parent = parent[p]
    last = path[-1]
    if action == "set":
        parent[last] = value
    elif action == "delete":
        del parent[last]
    elif isinstance(parent[last], dict):
        parent[last][key] = value
    elif isinstance(parent[last], list):
        parent[last].append(value)
    else:
        parent[last] = value
    return obj
