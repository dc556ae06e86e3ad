"""Write sample_data/cmu_small_region_annotations.geojson: two tissue classes on the sample.

The polygons were drawn by the napari-virchow developers, not by a pathologist: level 1 of the
sample was rendered with a 100-px level-0 coordinate grid, and rectangles were placed on regions
that are unmistakably stratified squamous epithelium (Epidermis) or collagen-rich stroma (Dermis).
They are approximate and meant for the demo (a probe needs two classes), not for evaluation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from napari_virchow.io.geojson import Annotation, write_annotations

OUT = Path(__file__).resolve().parents[1] / "sample_data" / "cmu_small_region_annotations.geojson"

#: (x0, y0, x1, y1) level-0 px of the CMU-1 small region
REGIONS = {
    "Epidermis": [(1120, 1760, 1350, 2260), (1540, 2500, 1760, 2920), (560, 2600, 790, 2930)],
    "Dermis": [(1380, 2030, 1620, 2470), (600, 1700, 800, 2150), (900, 2380, 1120, 2700)],
}
COLORS = {"Epidermis": (150, 60, 170), "Dermis": (230, 120, 150)}


def main() -> None:
    items = [
        Annotation(np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]]), name, COLORS[name])
        for name, boxes in REGIONS.items()
        for x0, y0, x1, y1 in boxes
    ]
    print(write_annotations(OUT, items))


if __name__ == "__main__":
    main()
