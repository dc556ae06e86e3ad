"""The CLI console's warning hook: one line each; napari's and npe2's pydantic deprecations dropped."""

from __future__ import annotations

import warnings

import npe2.manifest.schema
import pytest
from pydantic.warnings import PydanticDeprecatedSince20

import napari_virchow.session
from napari_virchow.cli.console import Console, is_dependency_pydantic_deprecation


def _deprecation(text: str) -> PydanticDeprecatedSince20:
    return PydanticDeprecatedSince20(text)


@pytest.mark.parametrize("replay", [False, True])
def test_hook_drops_only_dependency_pydantic_deprecations(capsys, replay: bool) -> None:
    """Warned directly, or recorded and replayed through ``warnings.showwarning`` as napari/npe2 do."""
    npe2_file, ours = npe2.manifest.schema.__file__, napari_virchow.session.__file__
    sent = [
        (_deprecation("allow_mutation is deprecated"), npe2_file, 101),  # npe2's: dropped
        (UserWarning("the slide has no tissue"), ours, 10),  # another warning: shown
        (_deprecation("ours is deprecated"), ours, 20),  # a pydantic deprecation not from napari/npe2: shown
        (UserWarning("a napari user warning"), npe2_file, 30),  # napari/npe2's other warnings: shown
    ]
    with Console().session(verbose=False):
        if replay:
            with warnings.catch_warnings(record=True) as recorded:
                warnings.simplefilter("always")
                for w, filename, lineno in sent:
                    warnings.warn_explicit(w, type(w), filename, lineno)
            for r in recorded:
                warnings.showwarning(r.message, r.category, r.filename, r.lineno)
        else:
            for w, filename, lineno in sent:
                warnings.warn_explicit(w, type(w), filename, lineno)
    err = capsys.readouterr().err
    assert "allow_mutation" not in err
    for text in ("the slide has no tissue", "ours is deprecated", "a napari user warning"):
        assert f"napari-virchow: warning: {text}" in err


def test_only_the_pydantic_deprecation_category_from_napari_or_npe2() -> None:
    npe2_file = npe2.manifest.schema.__file__
    assert is_dependency_pydantic_deprecation(PydanticDeprecatedSince20, npe2_file)
    assert not is_dependency_pydantic_deprecation(DeprecationWarning, npe2_file)
    assert not is_dependency_pydantic_deprecation(PydanticDeprecatedSince20, napari_virchow.session.__file__)
    assert not is_dependency_pydantic_deprecation(PydanticDeprecatedSince20, "<string>")
