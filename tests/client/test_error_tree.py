"""The errors module's docstring draws the whole exception tree, truthfully, once."""

from __future__ import annotations

import inspect
import re

import grpc

from tokenwire import client as tw
from tokenwire.client import _errors

#: "├── Name    CODE, CODE: words" (or the root / a lone class, without the branch).
TREE_LINE = re.compile(r"^    (?P<branch>[├└]── )?(?P<name>[A-Z]\w+) {2,}(?P<text>\S.*)$")


def _public_exceptions() -> dict[str, type[BaseException]]:
    found = {name: getattr(_errors, name) for name in _errors.__all__}
    return {name: obj for name, obj in found.items()
            if inspect.isclass(obj) and issubclass(obj, BaseException)}


def _drawn() -> dict[str, tuple[bool, str]]:
    """Name -> (drawn as a branch under TokenwireError, its text), from the docstring."""
    lines = [TREE_LINE.match(line) for line in (_errors.__doc__ or "").splitlines()]
    drawn = [(m["name"], (bool(m["branch"]), m["text"])) for m in lines if m]
    names = [name for name, _ in drawn]
    assert len(names) == len(set(names)), f"drawn more than once: {names}"
    return dict(drawn)


def test_every_public_exception_has_its_own_docstring() -> None:
    exceptions = _public_exceptions()
    assert len(exceptions) >= 12
    undocumented = [name for name, cls in exceptions.items()
                    if not (vars(cls).get("__doc__") or "").strip()]
    assert not undocumented, f"exceptions without a docstring: {undocumented}"
    # the package exports the same exceptions
    assert {n for n in tw.__all__ if n in exceptions} == set(exceptions)


def test_the_tree_names_every_public_exception_under_its_base() -> None:
    drawn = _drawn()
    exceptions = _public_exceptions()
    assert set(drawn) == set(exceptions), "the docstring's tree and __all__ differ"
    for name, (branch, _) in drawn.items():
        under_root = exceptions[name] is not tw.TokenwireError and issubclass(
            exceptions[name], tw.TokenwireError)
        assert branch == under_root, f"{name} is drawn at the wrong place"


def test_the_tree_gives_the_status_codes_each_class_maps_from() -> None:
    drawn = _drawn()
    codes = {code.name: code for code in grpc.StatusCode}
    named: set[grpc.StatusCode] = set()
    for name, (branch, text) in drawn.items():
        if not branch or name == "OtherError":
            continue
        listed = [codes[word] for word in re.findall(r"[A-Z_]{4,}", text.split(":")[0])]
        assert listed, f"{name}: no status code drawn"
        for code in listed:
            error = _errors.error_for(code, "x")
            assert type(error).__name__ == name, f"{code.name} maps to {type(error).__name__}"
        named.update(listed)
    # OtherError: every code the tree does not name (OK aside)
    assert drawn["OtherError"][1].startswith("any other code")
    for code in set(grpc.StatusCode) - named - {grpc.StatusCode.OK}:
        assert type(_errors.error_for(code, "x")) is tw.OtherError, code.name
