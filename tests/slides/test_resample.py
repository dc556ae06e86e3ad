"""The one resampling filter (antialiased bicubic, torch, whole batches) against PIL's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from napari_virchow.slides.resample import FILTER, resize_batch
from napari_virchow.slides.slide import Slide


@pytest.fixture(scope="module")
def tissue(sample_svs: Path) -> np.ndarray:
    with Slide(sample_svs) as slide:
        return slide.read_region((600, 900), 0, (1024, 1024))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("side", [448, 373, 627, 112, 224])
def test_matches_pil_bicubic(tissue: np.ndarray, side: int) -> None:
    crops = np.stack([tissue[y : y + side, x : x + side] for y, x in [(0, 0), (17, 301), (390, 90)]])
    got = resize_batch(crops, 224)
    assert got.shape == (3, 224, 224, 3) and got.dtype == np.uint8
    pil = np.stack([np.asarray(Image.fromarray(c).resize((224, 224), Image.Resampling.BICUBIC)) for c in crops])
    diff = np.abs(got.astype(int) - pil)
    assert FILTER == "bicubic" and diff.max() <= 1 and diff.mean() < 0.05  # rounding only
    if side == 224:
        assert got is crops  # nothing to do


@pytest.mark.timeout(60)
def test_shrinking_is_antialiased() -> None:
    # 1-px black/white stripes shrunk 4×: an antialiased filter gives flat grey, a plain one aliases
    stripes = np.zeros((1, 896, 896, 3), np.uint8)
    stripes[:, :, ::2] = 255
    out = resize_batch(stripes, 224)[0, 8:-8, 8:-8].astype(int)
    assert abs(out.mean() - 127.5) < 2 and out.std() < 2


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match=r"\(n, h, w, 3\) uint8"):
        resize_batch(np.zeros((2, 8, 8), np.uint8), 4)
    assert resize_batch(np.zeros((0, 8, 8, 3), np.uint8), 4).shape == (0, 4, 4, 3)


@pytest.mark.timeout(60)
def test_the_accelerators_float_kernel_agrees_with_the_uint8_one(tissue: np.ndarray) -> None:
    # GPUs have no uint8 kernel: they resample floats and round back (run here on the CPU)
    import torch

    from napari_virchow.slides.resample import resize_tensor

    batch = torch.from_numpy(np.stack([tissue[:448, :448], tissue[300:748, 500:948]]))
    uint8 = resize_tensor(batch, 224)
    floats = resize_tensor(batch, 224, kernel="float")
    assert uint8.shape == floats.shape == (2, 224, 224, 3) and floats.dtype == torch.uint8
    diff = (uint8.int() - floats.int()).abs()
    assert int(diff.max()) <= 1 and float(diff.float().mean()) < 0.05
    np.testing.assert_array_equal(uint8.numpy(), resize_batch(batch.numpy(), 224))  # one filter, one kernel
    assert resize_tensor(uint8, 224) is uint8  # already the size
    with pytest.raises(ValueError, match=r"\(n, h, w, 3\) uint8"):
        resize_tensor(batch.float(), 224)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
def test_a_height_and_width_and_bilinear_match_pil(tissue: np.ndarray, mode: str) -> None:
    # what encoder preprocessing asks for: shorter side to 224 of a 256×300 tile, either filter
    import torch

    from napari_virchow.slides.resample import resize_tensor

    crops = np.stack([tissue[:256, :300], tissue[500:756, 200:500]])
    pil_filter = Image.Resampling.BICUBIC if mode == "bicubic" else Image.Resampling.BILINEAR
    pil = np.stack([np.asarray(Image.fromarray(c).resize((262, 224), pil_filter)) for c in crops])
    for kernel in ("uint8", "float"):
        got = resize_tensor(torch.from_numpy(crops), (224, 262), kernel=kernel, mode=mode)  # type: ignore[arg-type]
        assert tuple(got.shape) == (2, 224, 262, 3)
        assert int(np.abs(got.numpy().astype(int) - pil).max()) <= 1, kernel
    with pytest.raises(ValueError, match="mode must be"):
        resize_tensor(torch.from_numpy(crops), 224, mode="lanczos")  # type: ignore[arg-type]
