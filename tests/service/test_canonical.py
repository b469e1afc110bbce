"""The fast canonical JSON writes exactly the reference RFC 8785 bytes, or fails as the reference does."""

from __future__ import annotations

from typing import Any

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from service.core import canonical

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**60), max_value=2**60)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)


def _outcome(dumps: Any, value: Any) -> bytes | str:
    try:
        return dumps(value)  # type: ignore[no-any-return]
    except Exception as exc:  # the same refusal, whatever the path
        return type(exc).__name__


@settings(max_examples=600, deadline=None)
@given(_values)
def test_it_writes_the_reference_bytes(value: Any) -> None:
    assert _outcome(canonical.dumps, value) == _outcome(rfc8785.dumps, value)


@pytest.mark.parametrize(
    "value",
    [
        {"b": 1, "a": [True, None, 'x\u0000\u001f\b\f\n\r\t"\\/\u2028é😀'], "c": {"z": -(2**53 - 1)}},
        {"é": 1, "e": 2, "\U0001f600": 3, "\uffff": 4},  # non-ASCII keys: the reference orders them
        {"n": 2**53, "f": 0.1, "g": 1e21, "h": -0.0},  # beyond the exact range, floats: the reference
        ["\ud800"],  # a lone surrogate
    ],
)
def test_the_edges_match_the_reference(value: Any) -> None:
    assert _outcome(canonical.dumps, value) == _outcome(rfc8785.dumps, value)
