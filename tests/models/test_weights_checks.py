"""Weights that load but would give wrong embeddings, and paths that are not weights files.

Each is refused at load time with one WeightsError naming the file, never a RuntimeError later or
"embeddings contain NaN" on every slide.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from napari_virchow.errors import WeightsError
from napari_virchow.models.encoder import load_encoder


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        enc = load_encoder("virchow2-tiny", weights="random", device="cpu", dtype="fp32")
    return {k: v.clone() for k, v in enc.model.state_dict().items()}


def _one_nan(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sd = dict(sd)
    key = next(k for k, v in sd.items() if v.ndim == 2)
    sd[key] = sd[key].clone()
    sd[key][0, 0] = float("nan")
    return sd


def _one_inf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sd = {k: v.clone() for k, v in sd.items()}
    sd["cls_token"].view(-1)[3] = float("inf")
    return sd


Edit = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
CASES: dict[str, tuple[Edit, str]] = {
    "int32": (lambda sd: {k: (v * 100).to(torch.int32) for k, v in sd.items()}, "not floating point.*int32"),
    "nan": (_one_nan, "NaN or infinite"),
    "inf": (_one_inf, "NaN or infinite.*cls_token"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_values_are_refused_naming_the_file(case: str, state: dict[str, torch.Tensor], tmp_path: Path) -> None:
    edit, match = CASES[case]
    path = tmp_path / f"{case}.safetensors"
    save_file(edit(state), str(path))
    with pytest.raises(WeightsError, match=match) as info:
        load_encoder("virchow2-tiny", path, device="cpu")
    assert str(path) in str(info.value) and "Fix:" in str(info.value)


def test_half_precision_weights_still_load(state: dict[str, torch.Tensor], tmp_path: Path) -> None:
    path = tmp_path / "bf16.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, str(path))
    enc = load_encoder("virchow2-tiny", path, device="cpu")
    assert enc.weights_source == str(path)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda tmp: Path(os.devnull), "/dev/null is a character device, not a weights file"),
        (lambda tmp: (tmp / "empty.safetensors").touch() or tmp / "empty.safetensors", "is empty \\(0 bytes\\)"),
        (lambda tmp: tmp / "nowhere.safetensors", "not found"),
    ],
    ids=["dev-null", "empty", "missing"],
)
def test_paths_that_are_not_weights_say_what_they_are(make: Callable[[Path], Path], match: str, tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=match):
        load_encoder("virchow2-tiny", make(tmp_path), device="cpu")
