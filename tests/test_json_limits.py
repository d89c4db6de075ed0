"""workers/pipeline/json_limits.py: nesting depth measured and bounded without recursion."""
from __future__ import annotations

import json

import pytest

from workers.pipeline.json_limits import JSONTooDeep, check_depth, json_depth, loads_bounded, openers_at_most


def test_depth_counts_arrays_and_objects_without_recursing():
    assert [json_depth(v) for v in (1, "x", None, [], {}, {"a": 1}, [[1], [[2]]], {"a": {"b": [{}]}})] == [
        0, 0, 0, 1, 1, 1, 3, 4]
    deep: list = []
    for _ in range(100_000):  # far past the recursion limit
        deep = [deep]
    assert json_depth(deep) == 100_001
    assert json_depth(deep, stop_after=32) == 33
    with pytest.raises(JSONTooDeep, match="^nested more than 32 levels deep$"):
        check_depth(deep)
    check_depth([[[]]], max_depth=3)


def test_loads_bounded_turns_any_depth_into_one_value_error():
    assert loads_bounded('{"a": [1, {"b": null}]}') == {"a": [1, {"b": None}]}
    for text in ("[" * 100_000, "[" * 33 + "]" * 33, '{"a": ' * 40 + "1" + "}" * 40):
        with pytest.raises(JSONTooDeep):
            loads_bounded(text)
    assert loads_bounded("[" * 32 + "]" * 32) == json.loads("[" * 32 + "]" * 32)
    with pytest.raises(json.JSONDecodeError):
        loads_bounded("{nope")
    assert openers_at_most('{"a": [1]}', 2) and not openers_at_most('{"a": [[1]]}', 2)
