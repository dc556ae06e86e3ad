"""napari reader and sample contributions, in a real (headless, Xvfb) viewer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_virchow import SlideError
from napari_virchow._reader import METADATA_KEY, napari_get_reader, read_for_napari, read_slides


def test_reader_claims_slides(sample_svs: Path, sample_pyramid: Path) -> None:
    assert napari_get_reader(str(sample_svs)) is read_for_napari
    assert napari_get_reader([sample_svs, sample_pyramid]) is read_for_napari


@pytest.mark.parametrize("name", ["image.png", "notes.txt", "data.zarr"])
def test_reader_ignores_foreign_files(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"x")
    assert napari_get_reader(str(path)) is None


def test_reader_leaves_non_rgb_tiffs_to_napari(tmp_path: Path) -> None:
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, np.zeros((5, 32, 32), np.uint16))
    assert napari_get_reader(str(path)) is None


def test_reader_probe_never_raises(tmp_path: Path) -> None:
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"II*\x00garbage")
    assert napari_get_reader(str(broken)) is None
    assert napari_get_reader(str(tmp_path / "missing.svs")) is read_for_napari  # fails later, clearly


def test_layer_data_has_um_scale_and_metadata(sample_pyramid: Path) -> None:
    [(levels, kwargs, kind)] = read_slides(sample_pyramid)
    assert kind == "image" and kwargs["multiscale"] and kwargs["rgb"]
    assert kwargs["scale"] == pytest.approx((0.499, 0.499))
    assert kwargs["name"] == "cmu_small_region_pyramid"
    meta = kwargs["metadata"][METADATA_KEY]
    assert meta["path"] == str(sample_pyramid) and meta["mpp"] == pytest.approx(0.499)
    assert kwargs["metadata"]["properties"]["openslide.vendor"] == "generic-tiff"
    assert [lvl.shape[:2] for lvl in levels] == [(2967, 2220), (1483, 1110), (741, 555)]


def test_broken_file_raises_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "cut.svs"
    path.write_bytes(b"II*\x00" + bytes(64))
    with pytest.raises(SlideError, match="cut.svs"):
        read_slides(path)


def test_missing_mpp_warns_and_uses_pixel_scale(tmp_path: Path) -> None:
    path = tmp_path / "nompp.tif"
    tifffile.imwrite(path, np.full((512, 512, 3), 200, np.uint8), tile=(256, 256), photometric="rgb")
    with pytest.warns(UserWarning, match="override"):
        [(_, kwargs, _)] = read_slides(path)
    assert kwargs["scale"] == (1.0, 1.0)


def test_viewer_opens_sample_and_shows_tissue(make_napari_viewer) -> None:
    viewer = make_napari_viewer(show=True)
    [layer] = viewer.open_sample("napari-virchow", "cmu_small_region")
    assert layer.multiscale and tuple(layer.scale) == pytest.approx((0.499, 0.499))
    assert str(layer.units[0]) == "micrometer"
    viewer.reset_view()
    shot = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(float)
    # tissue: many pixels that are neither white background nor the black canvas, and pinkish
    tissue = (shot.mean(axis=-1) < 220) & (shot.mean(axis=-1) > 40)
    assert tissue.mean() > 0.1, "screenshot shows no tissue"
    r, g, b = (shot[tissue][:, i].mean() for i in range(3))
    assert r > g and b > g, "H&E tissue is pink/purple"


def test_viewer_opens_svs_through_reader(make_napari_viewer, sample_svs: Path) -> None:
    viewer = make_napari_viewer(show=True)
    [layer] = viewer.open(str(sample_svs), plugin="napari-virchow")
    assert layer.name == "cmu_small_region" and len(layer.data) == 3
