"""Make the pictures in README.md and docs/ from the real sample, headless (run under Xvfb).

    xvfb-run -a .venv/bin/python scripts/screenshots.py

Pictures are made by code so they never go stale: rerun after a UI change.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import napari
from qtpy.QtWidgets import QApplication

OUT = Path(__file__).resolve().parents[1] / "docs" / "images"


def settle(viewer: napari.Viewer, rounds: int = 30) -> None:
    """Let Qt paint and napari load the visible chunks before a screenshot."""
    import time

    for _ in range(rounds):
        QApplication.processEvents()
        time.sleep(0.02)


def shot_sample(out: Path) -> Path:
    """The sample slide as napari shows it with the plugin's reader."""
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1100, 800)
    viewer.open_sample("napari-virchow", "cmu_small_region")
    viewer.scale_bar.visible = True
    viewer.reset_view()
    settle(viewer)
    path = out / "sample_slide.png"
    viewer.screenshot(str(path), canvas_only=False, flash=False)
    viewer.close()
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print(shot_sample(args.out))


if __name__ == "__main__":
    main()
