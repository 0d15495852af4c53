"""The generic registry: register, get, list, and the errors a user sees."""

from __future__ import annotations

import pytest

from slidevl.errors import NotFoundError
from slidevl.registry import Registry


def test_register_get_and_list_in_order() -> None:
    things: Registry[type] = Registry("thing")

    @things.register("b")
    class B:
        pass

    @things.register("a")
    class A:
        pass

    assert things.get("a") is A and things.names() == ["b", "a"] and "b" in things and len(things) == 2
    assert things.register("a")(A) is A  # re-registering the same entry (a module re-import) is harmless


def test_unknown_name_lists_the_known_ones() -> None:
    things: Registry[type] = Registry("connector")
    things.register("mlp")(int)
    with pytest.raises(NotFoundError, match="unknown connector 'qformr'; use one of mlp"):
        things.get("qformr")


def test_a_name_cannot_be_taken_twice_or_be_malformed() -> None:
    things: Registry[type] = Registry("thing")
    things.register("x")(int)
    with pytest.raises(ValueError, match="registered twice"):
        things.register("x")(float)
    with pytest.raises(ValueError, match="lower-case"):
        things.register("X")
