"""'Compute': embed the tiles on screen (once, or following the view), and the tissue mask.

Level of detail (issue 15): unpinned ("auto"), a view is embedded at the finest magnification the
encoder was trained on whose tiles in view fit the canvas budget (:mod:`napari_virchow.lod`), so
every view costs about one screen of tiles and no question is asked; zooming in refines, the
coarser levels staying drawn underneath. A pinned magnification computes every tile in view and
asks above the tile limit. "Overview" embeds the whole tissue at 5× (2 µm/px).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from napari.utils.colormaps import DirectLabelColormap
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSlider,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)  # fmt: skip

from napari_virchow import jobs as _jobs
from napari_virchow._qt.errors import report
from napari_virchow._qt.layers import overlay_name, show_raster
from napari_virchow._qt.panels.base import Host, form, named
from napari_virchow._qt.viewport import visible_box_level0
from napari_virchow.errors import VirchowError
from napari_virchow.session import SlideSession
from napari_virchow.slides.lattice import SlideGeometry

__all__ = ["ComputePanel"]

EMBEDDED_COLOR = "#00e5ff"  # cyan outlines read on H&E pink and purple
#: the magnification control: label → µm/px (None: chosen from the view)
MAGNIFICATIONS = (("auto", None), ("5× (2 µm/px)", 2.0), ("10× (1 µm/px)", 1.0), ("20× (0.5 µm/px)", 0.5),
                  ("40× (0.25 µm/px)", 0.25))  # fmt: skip


class TissueFound:
    """The tile grid and its tissue mask are built."""


@_jobs.cancellable
def find_tissue_job(session: SlideSession, *, cancel: Any = None) -> Iterator[object]:
    """Build the tile grid (thumbnail + tissue mask) off the UI thread."""
    yield _jobs.Stage("finding tissue …")
    session.grid  # noqa: B018 - builds the grid in this thread
    yield TissueFound()


class ComputePanel(QGroupBox):
    """Compute visible / follow view / all in view, the tile limit and the tissue mask."""

    def __init__(self, host: Host, parent: QWidget | None = None) -> None:
        super().__init__("Compute", parent)
        self._host = host
        lay = QVBoxLayout(self)
        row = QHBoxLayout()
        self.compute_btn = named(QPushButton("Compute visible"), "compute_btn",
                                 "embed the tissue tiles on screen that are not cached yet")
        self.compute_btn.clicked.connect(lambda: self.compute_visible())
        self.follow_check = named(QCheckBox("Follow view"), "follow_check", "compute what is on screen as you move")
        self.all_btn = named(QPushButton("All in view…"), "all_btn", "count the tiles on screen and ask first")
        self.all_btn.clicked.connect(self.compute_all_in_view)
        for w in (self.compute_btn, self.all_btn):
            row.addWidget(w)
        lay.addLayout(row)
        lay.addWidget(self.follow_check)
        rows = form()
        self.mag_combo = named(QComboBox(), "mag_combo",
                               "magnification to compute at: auto picks the finest whose tiles on screen fit "
                               "about two screens of tiles; pin one to compute every tile on screen at it")
        for label, mpp in MAGNIFICATIONS:
            self.mag_combo.addItem(label, mpp)
        self.mag_combo.currentIndexChanged.connect(self._mag_changed)
        rows.addRow("magnification", self.mag_combo)
        self.overview_btn = named(QPushButton("Whole-slide overview (5×)"), "overview_btn",
                                  "embed the whole tissue at 5× (2 µm/px): 1/16 of the tiles at 20×")
        self.overview_btn.clicked.connect(self.overview)
        rows.addRow(self.overview_btn)
        self.level_label = named(QLabel(""), "level_label")
        self.level_label.setWordWrap(True)  # a long read-out must not widen the dock
        rows.addRow(self.level_label)
        self.view_mpp: float | None = None  # the level of the last planned view
        #: the plan whose tiles arrive now, and its session (the read-out counts down)
        self._planned: tuple[SlideSession, _jobs.Planned] | None = None
        #: token work a view's compute must also do (the Token resolution panel's view_options), if any
        self.token_options: Callable[[], dict[str, Any] | None] | None = None
        self.limit_spin = named(QSpinBox(minimum=1, maximum=10_000_000, value=2000, singleStep=500), "limit_spin",
                                "more tiles than this are computed only after you confirm")  # fmt: skip
        rows.addRow("ask above (tiles)", self.limit_spin)
        tissue_row = QHBoxLayout()
        self.tissue_check = named(QCheckBox("tissue mask"), "tissue_check", "show which tiles count as tissue")
        self.tissue_check.toggled.connect(lambda _: self.show_tissue())
        self.tissue_slider = named(QSlider(Qt.Orientation.Horizontal, minimum=0, maximum=100), "tissue_slider",
                                   "saturation threshold (0 = Otsu's automatic value)")
        self.tissue_slider.valueChanged.connect(self._tissue_moved)
        self.tissue_slider.sliderReleased.connect(self._tissue_threshold_changed)
        self.tissue_value = named(QLabel("auto"), "tissue_value_label")
        self.tissue_value.setMinimumWidth(self.tissue_value.fontMetrics().horizontalAdvance("0.00 "))
        for w in (self.tissue_check, self.tissue_slider, self.tissue_value):
            tissue_row.addWidget(w)
        lay.addLayout(rows)
        lay.addLayout(tissue_row)

    # --- compute -------------------------------------------------------------------------------
    def visible_box(self) -> tuple[float, float, float, float] | None:
        layer = self._host.slide_layer()
        return None if layer is None else visible_box_level0(self._host.viewer, layer)

    def compute_visible(self, *, force: bool = False) -> None:
        """Embed the tissue tiles on screen that are not cached yet (centre-out)."""
        box = self.visible_box()
        if box is None:
            self._host.set_status("the slide is not on screen" if self._host.slide_layer() else
                                  "no slide layer: open a slide with File ▸ Open (SVS, NDPI, MRXS, TIFF …)")
            return
        self._run_view(box, force=force)

    def _run_view(self, box: tuple[float, float, float, float], *, force: bool = False) -> None:
        """The view's compute job: with token work on (compressed storage, token resolution), the one
        that also stores the view's tokens and draws its token map."""
        extra = self.token_options() if self.token_options is not None else None
        kwargs: dict[str, Any] = {"pinned": self.pinned(), "limit": self.limit_spin.value(), "force": force}
        if extra is None:
            self._host.run(_jobs.view_job, box, self.canvas_px(), **kwargs)
        else:
            from napari_virchow.analysis.token_jobs import view_tokens_job

            self._host.run(view_tokens_job, box, self.canvas_px(), **kwargs, **extra)

    def canvas_px(self) -> tuple[int, int]:
        """The canvas as (width, height) screen px (napari gives (height, width))."""
        h, w = self._host.viewer.canvas.size
        return (max(int(w), 1), max(int(h), 1))

    def offer_magnifications(self, geometry: SlideGeometry | None) -> None:
        """Grey out the magnifications the chosen slide cannot give (finer than its scan, or no whole
        tile), with the reason as the item's tooltip; a pinned one it cannot give goes back to auto."""
        from napari_virchow.lod import UPSAMPLE_TOLERANCE, usable_mpps

        levels = [m for _, m in MAGNIFICATIONS if m is not None]
        usable = set(levels) if geometry is None else set(usable_mpps(geometry, levels))
        model = self.mag_combo.model()
        for i in range(self.mag_combo.count()):
            m, item = self.mag_combo.itemData(i), model.item(i)
            ok = m is None or m in usable
            item.setEnabled(ok)
            if ok or geometry is None:
                item.setToolTip("")
            elif m < geometry.mpp * (1 - UPSAMPLE_TOLERANCE):
                item.setToolTip(f"this slide is scanned at {geometry.mpp:g} µm/px: {m:g} µm/px would be upsampled")
            else:
                item.setToolTip(f"this slide is smaller than one tile at {m:g} µm/px")
        if self.mag_combo.currentData() is not None and self.mag_combo.currentData() not in usable:
            self.mag_combo.setCurrentIndex(0)  # auto

    def pinned(self) -> float | None:
        """The magnification the user pinned (µm/px), or None for auto."""
        return self.mag_combo.currentData()

    def compute_all_in_view(self) -> None:
        """Count the tiles on screen (at the pinned level, else the one in view) and ask before computing them."""
        box = self.visible_box()
        if box is not None:
            self._host.run(_jobs.compute_job, box, limit=0, mpp=self.pinned() or self.view_mpp)

    def follow(self, box: tuple[float, float, float, float]) -> None:
        self._run_view(box)

    def overview(self) -> None:
        """Embed the whole tissue at 5× (the coarsest level when the slide cannot give 5×)."""
        self._host.run(_jobs.overview_job)

    def _mag_changed(self, _index: int) -> None:
        pinned = self.pinned()
        self.level_label.setText("auto: the finest magnification that fits the screen" if pinned is None
                                 else f"pinned at {self.mag_combo.currentText()}")  # fmt: skip
        if pinned is not None:
            self.view_mpp = pinned
        box = self.visible_box()
        if box is not None and self.follow_check.isChecked():
            self.follow(box)

    # --- tissue --------------------------------------------------------------------------------
    def _tissue_moved(self, value: int) -> None:
        self.tissue_value.setText(f"{value / 100:.2f}" if value else "auto")
        if not self.tissue_slider.isSliderDown():  # keyboard or click on the groove: apply now
            self._tissue_threshold_changed()

    def _tissue_threshold_changed(self) -> None:
        try:
            self._host.session().set_tissue_threshold(self.tissue_slider.value() / 100 or None)
        except VirchowError as exc:
            report(exc)
            return
        self.show_tissue()

    def show_tissue(self) -> None:
        slide = self._host.slide_layer()
        viewer = self._host.viewer
        name = overlay_name(slide, "tissue") if slide is not None else None
        if not self.tissue_check.isChecked():
            if name and name in viewer.layers:
                viewer.layers[name].visible = False
            return
        try:
            session = self._host.session()
        except VirchowError as exc:
            report(exc)
            return
        if "grid" not in session.__dict__:  # the tissue mask reads a thumbnail: a worker's job
            self._host.run(find_tissue_job)
            return
        grid = session.grid
        layer = show_raster(viewer, name, session.raster(grid.tissue.astype(np.int32)), kind="labels", opacity=0.35)
        layer.visible = True
        self.tissue_slider.blockSignals(True)
        self.tissue_slider.setValue(int(round(grid.tissue_threshold * 100)))
        self.tissue_slider.blockSignals(False)
        self.tissue_value.setText(f"{grid.tissue_threshold:.2f}")
        self._host.set_status(f"{grid.n_tissue:,} of {len(grid):,} tiles are tissue "
                              f"(saturation threshold {grid.tissue_threshold:.2f})")  # fmt: skip

    def show_embedded(self, session: SlideSession) -> None:
        """Outline what is embedded, so a compute with no overlay on still shows its result."""
        slide = self._host.slide_layer()
        if slide is None:
            return
        from napari_virchow.analysis.lod_rasters import finest_raster
        from napari_virchow.analysis.rasters import upsample
        from napari_virchow.lod import SlideGeometry

        dones = {m: session.done_at(m) for m in session.open_levels()}
        if not dones:
            return
        levels = {m: (d.astype(np.int32), d) for m, d in dones.items()}
        raster, _ = finest_raster(levels, SlideGeometry.of(session.slide), size=session.config.spec.input_size)
        # outlines about 28 level-0 px thick at every level (8 cells per tile at 20×, 32 at 5×)
        raster = upsample(raster, max(2, round(raster.tile_size_l0 / 28)), smooth=None)
        outline = DirectLabelColormap(color_dict={None: "transparent", 0: "transparent", 1: EMBEDDED_COLOR})
        layer = show_raster(self._host.viewer, overlay_name(slide, "embedded"), raster, kind="labels",
                            opacity=0.9, colormap=outline)  # fmt: skip
        layer.contour = 1

    def _show_plan(self, plan: _jobs.Planned, n_done: int) -> None:
        how = "overview" if plan.overview else "pinned" if plan.pinned else "auto"
        left = max(0, (plan.n_todo if plan.n_missing is None else plan.n_missing) - n_done)
        self.level_label.setText(f"{10 / plan.mpp:.3g}× ({plan.mpp:g} µm/px, {how}): {plan.n_in_view:,} tissue tiles "
                                 f"in view, " + (f"{left:,} to compute" if left else "all computed"))  # fmt: skip

    def on_event(self, session: SlideSession, ev: object) -> None:
        if isinstance(ev, _jobs.Planned):
            self.view_mpp = ev.mpp
            self._planned = (session, ev)
            self._show_plan(ev, 0)
        elif isinstance(ev, _jobs.BatchDone) and self._planned is not None:
            planner, plan = self._planned
            if planner is session and ev.mpp == plan.mpp:  # only the planning job's own batches
                self._show_plan(plan, ev.n_done)  # the read-out counts down as tiles arrive
        elif isinstance(ev, _jobs.Stage) and ev.final:
            self._planned = None  # a later job's batches are not this plan's
        if isinstance(ev, TissueFound) and self.tissue_check.isChecked():
            self.show_tissue()
        done_something = isinstance(ev, _jobs.BatchDone) or (isinstance(ev, _jobs.Stage) and ev.final)
        if done_something and session.encoder_loaded:  # the store is open: never load a model here
            with contextlib.suppress(VirchowError):  # a store problem is reported by the job itself
                self.show_embedded(session)
