"""`napari-virchow demo --no-block`: the newcomer's first command, run headless end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.timeout(300)
def test_demo_draws_three_aligned_nonempty_overlays(tmp_path: Path) -> None:
    if not os.environ.get("DISPLAY"):
        pytest.skip("needs a display (run the suite under xvfb-run)")
    env = {**os.environ, "NAPARI_VIRCHOW_CACHE": str(tmp_path / "cache"), "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_OFFLINE": "1"}  # fmt: skip
    out = subprocess.run([sys.executable, "-m", "napari_virchow.cli", "demo", "--no-block"], capture_output=True,
                         text=True, timeout=280, env=env, cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "RANDOM weights" in out.stderr and "--weights PATH" in out.stderr  # never silent about it
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["encoder"] == "virchow2-tiny"
    # the whole-slide overview at 5× first, then 20×: both levels embedded, 5× with far fewer tiles
    tiles = summary["tiles_per_mpp"]
    assert set(tiles) == {"0.5", "2"} and 0 < tiles["2"] * 8 < tiles["0.5"], tiles
    kinds = {layer["kind"]: layer for layer in summary["layers"]}
    assert set(kinds) == {"probability", "clusters", "similarity"}
    # the last view is readable: the heatmap on the slide, the other overlays one click away
    assert {k: layer["visible"] for k, layer in kinds.items()} == {"probability": True, "clusters": False,
                                                                    "similarity": False}  # fmt: skip
    sx0, sy0, sx1, sy1 = summary["slide_extent_um"]
    tile_um = 224 * 0.499
    for layer in kinds.values():
        assert layer["drawn_px"] > 10, layer
        x0, y0, x1, y1 = layer["extent_um"]
        # the overlay grid starts at the slide's corner and ends within one tile of its far edge
        assert abs(x0 - sx0) < 1e-6 and abs(y0 - sy0) < 1e-6, layer
        assert 0 <= x1 - sx1 < tile_um and 0 <= y1 - sy1 < tile_um, layer
        # what is drawn ends at the slide's edge: the sample's last row of tiles (21 µm of slide) is cut there,
        # to within half of an eighth of a tile
        dx0, dy0, dx1, dy1 = layer["drawn_extent_um"]
        assert dx0 >= sx0 - 1e-6 and dy0 >= sy0 - 1e-6, layer
        assert dx1 <= sx1 + tile_um / 16 and dy1 <= sy1 + tile_um / 16, layer
