"""A viewer drawing through Mesa (llvmpipe) must survive the plugin importing torch and timm."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import threading
import napari
from qtpy.QtWidgets import QApplication
viewer = napari.Viewer(show=True)
QApplication.processEvents()
viewer.screenshot(canvas_only=True)  # a GL context exists: Mesa's LLVM may now be mapped
from napari_virchow._torch import llvm_already_loaded
print("llvm", llvm_already_loaded())
out = {}
def work():
    from napari_virchow.models.encoder import load_encoder
    import numpy as np
    enc = load_encoder("virchow2-tiny", weights="random")
    out["shape"] = enc.embed(np.zeros((2, 224, 224, 3), np.uint8)).shape
t = threading.Thread(target=work); t.start(); t.join()
print("embedded", out["shape"])
viewer.close()
"""


@pytest.mark.timeout(180)
def test_model_loads_after_the_viewer_started() -> None:
    if not os.environ.get("DISPLAY"):
        pytest.skip("needs a display (run the suite under xvfb-run)")
    # a fresh interpreter: in this one torch and triton were imported long before any viewer
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=170)
    assert out.returncode == 0, f"crashed ({out.returncode}): {out.stderr[-2000:]}"
    assert "embedded (2, 96)" in out.stdout
