"""Every control of the dock widget is named, documented, and driven by a test through Qt events."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

from napari_virchow._qt import widget as widget_module
from tests._qt.conftest import interactive_children

HERE = Path(__file__).parent


def declared_drives() -> set[str]:
    """objectNames named by ``@pytest.mark.drives`` anywhere in ``tests/_qt`` (whatever is selected)."""
    names: set[str] = set()
    for path in sorted(HERE.glob("test_*.py")):
        module = importlib.import_module(f"tests._qt.{path.stem}")
        for obj in vars(module).values():
            for mark in getattr(obj, "pytestmark", []):
                if mark.name == "drives":
                    names.update(mark.args)
    return names


@pytest.fixture
def controls(planted_widget) -> dict[str, object]:
    found = interactive_children(planted_widget)
    assert len(found) > 30  # the enumeration sees the controls (not only the scroll area)
    return {c.objectName(): c for c in found}


def test_every_control_has_a_snake_case_object_name(planted_widget) -> None:
    unnamed = [f"{type(c).__name__} {getattr(c, 'text', lambda: '')()!r}" for c in interactive_children(planted_widget)
               if not re.fullmatch(r"[a-z][a-z0-9_]*", c.objectName())]  # fmt: skip
    assert not unnamed, f"controls without a snake_case objectName: {unnamed}"
    names = [c.objectName() for c in interactive_children(planted_widget)]
    assert len(names) == len(set(names)), "objectNames must be unique"


def test_every_control_is_listed_in_the_widget_docstring(controls) -> None:
    doc = widget_module.__doc__
    missing = sorted(name for name in controls if f"``{name}``" not in doc)
    assert not missing, f"add these to the docstring of napari_virchow/_qt/widget.py: {missing}"


def test_every_control_is_driven_by_a_test(controls) -> None:
    untested = sorted(set(controls) - declared_drives())
    assert not untested, f"controls no test drives with Qt events (@pytest.mark.drives): {untested}"
    unknown = sorted(declared_drives() - set(controls))
    assert not unknown, f"tests declare controls the widget does not have: {unknown}"
