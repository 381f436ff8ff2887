"""The generic registry and the one "unknown choice" message."""

from __future__ import annotations

import pytest

from depthprune.errors import InputError, check_choice
from depthprune.registry import Registry


def test_registry_get_add_and_miss() -> None:
    reg: Registry[int] = Registry("colour")
    assert reg.add("red", 1) == 1
    reg.add("green", 2)
    assert reg.get("green") == 2
    assert reg.names() == ["red", "green"] and list(reg) == ["red", "green"] and len(reg) == 2
    assert "red" in reg and "blue" not in reg
    with pytest.raises(InputError, match=r"^unknown colour 'gren'\. Did you mean: green\? Available: red, green$"):
        reg.get("gren")
    with pytest.raises(InputError, match=r"^unknown colour 'zzz'\. Available: red, green$"):
        reg.get("zzz")  # nothing close: no suggestion
    with pytest.raises(ValueError, match="registered twice"):
        reg.add("red", 3)


def test_check_choice_returns_value_or_names_where() -> None:
    assert check_choice("b", ["a", "b"], "mode") == "b"
    with pytest.raises(InputError, match=r"^unknown mode 'c' in x\.txt\. Available: a, b$"):
        check_choice("c", ["a", "b"], "mode", " in x.txt")
    with pytest.raises(InputError, match=r"Available: none$"):
        check_choice("c", [], "metric")


def test_every_library_registry_is_a_registry() -> None:
    from depthprune.evaluate import TASKS
    from depthprune.score import METRICS
    from depthprune.score.shapley import ESTIMATORS
    from depthprune.score.values import VALUES

    for reg, name in ((METRICS, "cosine"), (ESTIMATORS, "exact"), (VALUES, "loss"), (TASKS, "ppl")):
        assert isinstance(reg, Registry) and name in reg
