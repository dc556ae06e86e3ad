"""Each encoder spec lists the magnifications it was trained on; others need an explicit opt-in."""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle

import pytest

from napari_virchow.errors import VirchowError, WeightsError
from napari_virchow.models.specs import EncoderSpec, UntrainedMagnificationError, get_spec


@pytest.mark.parametrize(
    ("name", "mpps"),
    [
        ("virchow2", (0.25, 0.5, 1.0, 2.0)),
        ("virchow2-tiny", (0.25, 0.5, 1.0, 2.0)),
        ("virchow", (0.5,)),
        ("virchow-tiny", (0.5,)),
        ("timm:vit_small_patch16_224", (0.5,)),
    ],
)
def test_trained_magnifications_per_spec(name: str, mpps: tuple[float, ...]) -> None:
    spec = get_spec(name)
    assert spec.trained_mpps == mpps
    assert spec.mpp in spec.trained_mpps  # the default read magnification is a trained one


@pytest.mark.parametrize("mpp", [0.25, 0.5, 1.0, 2.0, 0.5004])
def test_trained_magnification_passes(mpp: float) -> None:
    assert get_spec("virchow2").check_mpp(mpp) is True


def test_untrained_magnification_needs_the_opt_in() -> None:
    with pytest.raises(UntrainedMagnificationError) as info:
        get_spec("virchow").check_mpp(2.0)
    text = str(info.value)
    assert "virchow" in text and "0.5 µm/px" in text and "2 µm/px" in text  # names input and list
    assert "allow_untrained=True" in text  # ... and the fix
    assert isinstance(info.value, WeightsError) and isinstance(info.value, VirchowError)


def test_opt_in_is_logged_and_returned_as_untrained(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert get_spec("virchow2").check_mpp(4.0, allow_untrained=True) is False
    assert "4 µm/px" in caplog.text and "opted in" in caplog.text


def test_provenance_records_the_flag() -> None:
    spec = get_spec("virchow2")
    assert spec.mpp_provenance(2.0) == {"mpp": 2.0, "mpp_trained": True, "trained_mpps": [0.25, 0.5, 1.0, 2.0]}
    untrained = spec.mpp_provenance(8.0, allow_untrained=True)
    assert untrained["mpp_trained"] is False and untrained["mpp"] == 8.0
    json.dumps(untrained)  # store attrs are JSON
    with pytest.raises(UntrainedMagnificationError):
        spec.mpp_provenance(8.0)


@pytest.mark.parametrize("bad", [0, -0.5, float("nan"), float("inf"), True, "0.5"])
def test_bad_mpp_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="positive number"):
        get_spec("virchow2").check_mpp(bad)  # type: ignore[arg-type]


def test_user_adds_magnifications_to_a_timm_spec() -> None:
    spec = get_spec("timm:vit_small_patch16_224")
    with pytest.raises(UntrainedMagnificationError):
        spec.check_mpp(1.0)
    wider = spec.with_trained_mpps(1.0, 2.0)
    assert wider.trained_mpps == (0.5, 1.0, 2.0) and wider.check_mpp(1.0)
    assert spec.trained_mpps == (0.5,)  # the registered spec is unchanged


def test_spec_validates_its_magnifications() -> None:
    with pytest.raises(ValueError, match="not in trained_mpps"):
        EncoderSpec("x", "vit_small_patch16_224", mpp=0.5, trained_mpps=(1.0,))
    with pytest.raises(ValueError, match="positive"):
        EncoderSpec("x", "vit_small_patch16_224", trained_mpps=(0.5, -1.0))


def test_spec_with_magnifications_stays_plain_data() -> None:
    spec = get_spec("virchow2")
    assert json.loads(json.dumps(spec.summary()))["trained_mpps"] == [0.25, 0.5, 1.0, 2.0]
    assert pickle.loads(pickle.dumps(spec)) == spec
    assert dataclasses.replace(spec, description="other").trained_mpps == spec.trained_mpps
