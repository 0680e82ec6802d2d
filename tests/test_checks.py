"""``structkd.checks.fits`` / ``check_types``: a config value against its annotation."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import pytest

from structkd.checks import check_types, fits, type_text


@pytest.mark.parametrize(("value", "tp", "ok"), [
    (1, float, True), (1.5, float, True), (True, float, False), ("1", float, False),
    (3, int, True), (3.0, int, False), (False, int, False), (True, bool, True), (1, bool, False),
    ("a", str, True), (None, str, False), (None, float | None, True), ("x", float | None, False),
    ("auto", float | Literal["auto"] | None, True), ("AUTO", Literal["auto"], False),
    (1, Literal[True], False), ([1, 2], tuple[int, int], True), ([1], tuple[int, int], False),
    ([1, "a"], tuple[int, int], False), ((0.1, 2), tuple[float, ...], True),
    ([1, 2], list[int], True), ([1, 2.5], list[int], False), ("ab", Sequence[str], False),
    ({"a": 1}, dict[str, Any], True), ([1], dict[str, Any], False), ("p", Path, True),
    (object(), Any, True),
])
def test_fits(value, tp, ok) -> None:
    assert fits(value, tp) is ok


def test_check_types_names_the_option_the_value_and_the_annotation() -> None:
    hints = {"k": int, "mode": Literal["a", "b"]}
    check_types({"k": 3, "mode": "a", "free": object()}, hints)  # unannotated: the receiver's
    with pytest.raises(ValueError, match=r"^mode='c'; expected one of \['a', 'b'\] \(m\)$"):
        check_types({"k": 3, "mode": "c"}, hints, "m")
    assert type_text(tuple[float, ...]) == "a list of float"
    assert type_text(float | None) == "float or null"
