"""recnix.hooks.hookjson against the standard library's json, on generated values both ways."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from recnix.hooks import hookjson

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=30,
)


@given(values)
def test_json_reads_what_hookjson_writes(value: object) -> None:
    assert json.loads(hookjson.dumps(value)) == value


@given(values, st.booleans())
def test_hookjson_reads_what_json_writes(value: object, ensure_ascii: bool) -> None:
    assert hookjson.loads(json.dumps(value, ensure_ascii=ensure_ascii)) == value
    assert hookjson.loads(json.dumps(value, indent=2)) == value


def test_a_control_reply_as_the_service_writes_it() -> None:
    reply = {"ok": True, "socket_dir": "/run/recnix/s-1", "messages": ["added \u00e9 \U0001f600"]}
    assert hookjson.loads(json.dumps(reply)) == reply


MALFORMED = ["", "{", '{"a" 1}', "[1,", '"open', "nul", '"\\x"', "1 2", "{1: 2}"]


@pytest.mark.parametrize("bad", MALFORMED)
def test_malformed_input_raises_value_error(bad: str) -> None:
    with pytest.raises(ValueError):
        hookjson.loads(bad)


@pytest.mark.parametrize("bad", [float("nan"), {1: 2}, object()])
def test_values_without_a_json_form_are_refused(bad: object) -> None:
    with pytest.raises((ValueError, TypeError)):
        hookjson.dumps(bad)
