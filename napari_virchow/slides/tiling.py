"""Tile a slide at the encoder's magnification: a lattice in level-0 px plus a tissue mask.

The grid's lattice is :class:`~napari_virchow.slides.lattice.Lattice` (non-overlapping
``tile_size_l0`` squares anchored at (0, 0), row-major, the partial last row and column kept and read
padded with white); :attr:`TileGrid.tissue` flags the tiles worth embedding. Tile ``i`` therefore
depends only on the slide's size, its µm/px and the tile options, never on tissue detection: the
embedding store is indexed by ``i``, so changing the tissue threshold never invalidates cached
embeddings.

>>> grid = TileGrid(Slide("sample_data/cmu_small_region.svs"))   # 0.5 µm/px, 224 px
>>> grid.grid_shape, grid.read_level, grid.resized
((14, 10), 0, False)
"""

from __future__ import annotations

import copy
import logging
import math
import threading
from collections.abc import Sequence

import numpy as np

from napari_virchow.errors import SlideError
from napari_virchow.slides.batch_read import read_regions
from napari_virchow.slides.jpeg_batch import decoder_for
from napari_virchow.slides.lattice import MIN_TILE_L0, Lattice, SlideGeometry
from napari_virchow.slides.resample import resize_batch
from napari_virchow.slides.slide import Slide

__all__ = ["RESIZE_TOLERANCE", "TileGrid", "detect_tissue"]

log = logging.getLogger(__name__)

#: a pyramid level within ±10 % of the target µm/px is read as is (no resampling)
RESIZE_TOLERANCE = 0.10
#: Otsu's threshold on saturation is clipped to this range: the lower bound keeps tinted glass
#: and JPEG noise out on blank slides; the upper bound keeps pale tissue in when a slide is
#: nearly all tissue (Otsu then splits tissue into pale and dark halves instead of glass/tissue)
SATURATION_CLIP = (0.05, 0.15)
#: pixels this bright in every channel are glass; this dark in every channel, pen or scanner border
NEAR_WHITE, VERY_DARK = 220, 50
#: thumbnail pixels per tile side (bounded) used to measure each tile's tissue fraction
THUMB_PX_PER_TILE, THUMB_SIZE_RANGE = 8, (1024, 4096)
#: tissue is decided on tiles of this µm/px (20×: ``min_tissue`` of a tile's area); a coarser tile is
#: tissue where at least :data:`COARSE_TISSUE_MAJORITY` of its area is tissue tiles of this
#: reference, so every magnification calls the same µm² tissue (a 10 % rule on a 448-µm 5× tile
#: would take in up to 16 times the glass a 112-µm 20× tile does along every tissue border)
TISSUE_REFERENCE_MPP = 0.5
COARSE_TISSUE_MAJORITY = 0.5
#: largest pre-resize batch a reader thread keeps as a scratch buffer between batches
SCRATCH_MAX_BYTES = 64 * 2**20


def detect_tissue(rgb: np.ndarray, *, threshold: float | None = None) -> tuple[np.ndarray, float]:
    """Tissue mask of an RGB thumbnail: saturation above a threshold, not glass, not black.

    Parameters
    ----------
    rgb : numpy.ndarray
        (H, W, 3) uint8 thumbnail.
    threshold : float, optional
        HSV saturation (0–1) above which a pixel is tissue; default Otsu's, clipped to
        :data:`SATURATION_CLIP`.

    Returns
    -------
    mask : numpy.ndarray
        (H, W) bool.
    threshold : float
        The saturation threshold used.
    """
    rgb = np.asarray(rgb)[..., :3]
    mx, mn = rgb.max(axis=-1), rgb.min(axis=-1)
    sat = (mx.astype(np.float32) - mn) / np.maximum(mx, 1).astype(np.float32)
    usable = (mn <= NEAR_WHITE) & (mx >= VERY_DARK)
    if threshold is None:
        from skimage.filters import threshold_otsu

        # Otsu over glass + tissue (black pixels have meaningless saturation); a blank slide
        # gives a degenerate value that the lower clip turns into "no tissue".
        values = sat[mx >= VERY_DARK]
        otsu = float(threshold_otsu(values)) if values.size and np.ptp(values) > 0 else 0.0
        threshold = float(np.clip(otsu, *SATURATION_CLIP))
    elif not 0.0 <= threshold <= 1.0:
        raise ValueError(f"tissue_threshold is a saturation in [0, 1], got {threshold!r}")
    return (sat > threshold) & usable, float(threshold)


def _tile_fractions(mask: np.ndarray, lattice: Lattice, downsample: tuple[float, float]) -> np.ndarray:
    """(n,) float32: the fraction of each tile's *in-slide* footprint that ``mask`` marks.

    ``mask`` covers exactly the slide at ``downsample`` (x, y) level-0 px per mask px, so a partial
    edge tile's fraction is of its part on the slide (the white padding is neither tissue nor area).
    Every tile spans at least one mask px.
    """
    sx, sy = downsample
    th, tw = mask.shape
    t = lattice.tile_size_l0
    ey = np.minimum(np.round(np.arange(lattice.rows + 1) * t / sy).astype(int), th)
    ex = np.minimum(np.round(np.arange(lattice.cols + 1) * t / sx).astype(int), tw)
    ey[1:] = np.maximum(ey[1:], ey[:-1] + 1).clip(max=th)
    ex[1:] = np.maximum(ex[1:], ex[:-1] + 1).clip(max=tw)
    integral = np.zeros((th + 1, tw + 1), np.int32)  # <= 4096² px: int32 is enough
    integral[1:, 1:] = mask.cumsum(0, dtype=np.int32).cumsum(1, dtype=np.int32)
    y0, y1, x0, x1 = ey[:-1, None], ey[1:, None], ex[None, :-1], ex[None, 1:]
    counts = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    area = np.maximum((y1 - y0) * (x1 - x0), 1)
    return (counts / area).astype(np.float32).ravel()


def _paint(flags: np.ndarray, lattice: Lattice, shape: tuple[int, ...], downsample: tuple[float, float]) -> np.ndarray:
    """A mask of ``shape`` (mask px) true where the pixel centre lies in a flagged tile of ``lattice``."""
    sx, sy = downsample
    t = lattice.tile_size_l0
    r = np.minimum(((np.arange(shape[0]) + 0.5) * sy // t).astype(np.int64), lattice.rows - 1)
    c = np.minimum(((np.arange(shape[1]) + 0.5) * sx // t).astype(np.int64), lattice.cols - 1)
    return np.asarray(flags, bool).reshape(lattice.rows, lattice.cols)[r[:, None], c[None, :]]


_local = threading.local()


def _scratch(n: int, side: int) -> np.ndarray | None:
    """A per-thread (n, side, side, 3) uint8 buffer, reused batch after batch (None if huge)."""
    if n * side * side * 3 > SCRATCH_MAX_BYTES:
        return None
    buf = getattr(_local, "buf", None)
    if buf is None or buf.shape[1:] != (side, side, 3) or len(buf) < n:
        buf = _local.buf = np.empty((n, side, side, 3), np.uint8)
    return buf[:n]


class TileGrid:
    """Non-overlapping tiles of ``size`` px at ``mpp`` µm/px over a slide, with a tissue flag.

    Parameters
    ----------
    slide : Slide
        Must know its µm/px (file or override), else :class:`SlideError`.
    mpp, size : float, int
        Target resolution and tile side the encoder expects (Virchow: 0.5 µm/px, 224 px).
    tissue_threshold : float, optional
        Saturation threshold of :func:`detect_tissue` (default: Otsu's).
    min_tissue : float
        Fraction of a tile's in-slide footprint that must be tissue for the tile to count, at
        :data:`TISSUE_REFERENCE_MPP` and finer; a coarser tile counts where most of its area
        (:data:`COARSE_TISSUE_MAJORITY`) is such reference tiles.
    decode_device : str, optional
        Decode JPEG stored tiles in batches (TorchCodec's ``decode_jpeg``) on this torch
        device (e.g. ``"cuda"``: the CPU only reads bytes); default ``None``, imagecodecs on the
        CPU. Checked against imagecodecs on each level's first batch (see
        :mod:`~napari_virchow.slides.jpeg_batch`).

    Attributes
    ----------
    lattice : Lattice
        The tile lattice (partial edge tiles included; ``lattice.partial`` flags them).
    coords : numpy.ndarray
        (n, 2) int64 level-0 (x, y) of every lattice tile's top-left corner, row-major (read-only).
    tissue : numpy.ndarray
        (n,) bool, tiles that count as tissue (see ``min_tissue``); ``tissue_indices`` their indices.
    tissue_fraction : numpy.ndarray
        (n,) float32 tissue fraction of each tile's in-slide footprint in the thumbnail.
    tile_size_l0 : int
        Tile side (and lattice stride) in level-0 px: ``round(size * mpp / slide.mpp)``.
    grid_shape : tuple of int
        (rows, cols) of the lattice.
    read_level, read_size, resized
        Pyramid level tiles are read from, the side read there (px) and whether it is resampled
        to ``size`` (only when no level lies within :data:`RESIZE_TOLERANCE` of ``mpp``).
    tissue_mask : numpy.ndarray
        Thumbnail-resolution bool mask; ``mask_downsample`` = level-0 px per mask px (x, y).
    tissue_threshold : float
        Saturation threshold used.

    Raises
    ------
    SlideError
        No µm/px, the slide is smaller than one tile, or a tile would span fewer than
        :data:`MIN_TILE_L0` slide px (a resolution far coarser than ``mpp``, or a wrong tag).
    """

    def __init__(
        self,
        slide: Slide,
        *,
        mpp: float = 0.5,
        size: int = 224,
        tissue_threshold: float | None = None,
        min_tissue: float = 0.1,
        decode_device: str | None = None,
    ) -> None:
        if not (math.isfinite(mpp) and mpp > 0) or int(size) != size or size < 1:
            raise ValueError(f"need mpp > 0 and an integer size >= 1, got {mpp!r}, {size!r}")
        if not 0.0 <= min_tissue <= 1.0:
            raise ValueError(f"min_tissue is a fraction in [0, 1], got {min_tissue!r}")
        self.slide, self.mpp, self.size, self.min_tissue = slide, float(mpp), int(size), min_tissue
        if decode_device is not None:
            decoder_for(decode_device)  # a device this machine lacks fails here, not mid-run
        self.decode_device = decode_device
        slide_mpp = slide.require_mpp()
        #: the lattice (tile index → level-0 square); coords, tiles_in and index_at are its
        self.lattice = Lattice.at(SlideGeometry(*slide.dimensions, slide_mpp), self.mpp, self.size)
        self.tile_size_l0 = self.lattice.tile_size_l0
        if self.tile_size_l0 < MIN_TILE_L0:
            raise SlideError(
                f"{slide.path.name} {'is given (override)' if slide.mpp_source == 'override' else 'records'} "
                f"{slide_mpp:g} µm/px: a {self.size}-px tile at {self.mpp:g} µm/px "
                f"would be {self.tile_size_l0} px of it, upsampled {self.size / self.tile_size_l0:.0f}×. If the "
                "file's resolution is wrong, pass the right one (`--mpp-override`, the µm/px field in the "
                "widget, or `Slide(path, mpp=...)`); else use a slide scanned at higher magnification."
            )
        w, h = slide.dimensions
        if not self.lattice.has_full_tile:
            raise SlideError(
                f"nothing to tile: {slide.path.name} is {w}×{h} px, smaller than one "
                f"{self.size}-px tile at {self.mpp:g} µm/px ({self.tile_size_l0} px at the "
                f"slide's {slide_mpp:g} µm/px)"
            )
        self.grid_shape = (self.lattice.rows, self.lattice.cols)
        self.coords = self.lattice.coords
        self.read_level, self.read_size = self._choose_level(slide_mpp)
        self.resized = self.read_size != self.size
        side = THUMB_PX_PER_TILE * math.ceil(max(w, h) / self.tile_size_l0)
        self._thumbnail = slide.thumbnail(int(np.clip(side, *THUMB_SIZE_RANGE)))
        th, tw = self._thumbnail.shape[:2]
        self.mask_downsample = (w / tw, h / th)
        self._flag_tissue(tissue_threshold)

    def _choose_level(self, slide_mpp: float) -> tuple[int, int]:
        """(level, px read there): the file level nearest the target without going coarser.

        A level within ±:data:`RESIZE_TOLERANCE` of the target µm/px is read as is, even when
        it is up to 10 % coarser (a scanner's 0.503 µm/px serves 0.5); otherwise the coarsest
        file level not coarser than the target (1 % slack for rounded downsamples) is read and
        resampled, so 1.0 and 2.0 µm/px come from a /4 level where the file has one and never
        decode level 0. The lattice (level-0 px) does not depend on this choice.
        """
        # Only levels stored in the file: the slide's lazily coarsened levels are computed from
        # the file's last level anyway, which costs as much as resampling a read of that level.
        file_ds = self.slide.level_downsamples[: len(self.slide.file_level_dimensions)]
        target = self.mpp / slide_mpp  # level-0 px per output px
        close = [i for i, d in enumerate(file_ds) if abs(d / target - 1) <= RESIZE_TOLERANCE]
        if close:
            return min(close, key=lambda i: abs(math.log(file_ds[i] / target))), self.size
        # Coarsest level not coarser than needed (1 % slack for rounded downsamples): downsample.
        level = max((i for i, d in enumerate(file_ds) if d <= target * 1.01), default=0)
        read = max(1, round(self.tile_size_l0 / file_ds[level]))
        log.info(
            "%s: no level within ±%d %% of %g µm/px; resampling %d px of level %d to %d",
            self.slide.path.name,
            RESIZE_TOLERANCE * 100,
            self.mpp,
            read,
            level,
            self.size,
        )
        return level, read

    def _flag_tissue(self, threshold: float | None) -> None:
        self.tissue_mask, self.tissue_threshold = detect_tissue(self._thumbnail, threshold=threshold)
        self.tissue_fraction = _tile_fractions(self.tissue_mask, self.lattice, self.mask_downsample)
        floor = max(self.min_tissue, 1e-9)
        ref = self._tissue_reference()
        if ref is None:
            self.tissue = self.tissue_fraction >= floor
        else:  # coarser than the reference: most of the tile is reference-level tissue
            ref_tissue = _tile_fractions(self.tissue_mask, ref, self.mask_downsample) >= floor
            painted = _paint(ref_tissue, ref, self.tissue_mask.shape, self.mask_downsample)
            self.tissue = _tile_fractions(painted, self.lattice, self.mask_downsample) >= COARSE_TISSUE_MAJORITY
        self.tissue_indices = np.flatnonzero(self.tissue).astype(np.int64)
        if not self.n_tissue:
            log.warning("%s", self._no_tissue_message())

    def _tissue_reference(self) -> Lattice | None:
        """The lattice at :data:`TISSUE_REFERENCE_MPP` when this grid is coarser than it, else None."""
        if self.mpp <= TISSUE_REFERENCE_MPP * (1 + RESIZE_TOLERANCE):
            return None
        geo = SlideGeometry(self.lattice.width, self.lattice.height, self.slide.require_mpp())
        return Lattice.at(geo, TISSUE_REFERENCE_MPP, self.size)

    def with_tissue(self, *, tissue_threshold: float | None = None, min_tissue: float | None = None) -> TileGrid:
        """The same lattice with tissue re-detected (reuses the thumbnail: no slide reads)."""
        grid = copy.copy(self)
        if min_tissue is not None:
            if not 0.0 <= min_tissue <= 1.0:
                raise ValueError(f"min_tissue is a fraction in [0, 1], got {min_tissue!r}")
            grid.min_tissue = min_tissue
        grid._flag_tissue(tissue_threshold)
        return grid

    # --- geometry -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.coords)

    @property
    def n_tissue(self) -> int:
        """Number of tissue tiles."""
        return len(self.tissue_indices)

    def _no_tissue_message(self) -> str:
        return (
            f"no tissue found in {self.slide.path.name} (saturation threshold "
            f"{self.tissue_threshold:.3f}, min_tissue {self.min_tissue:g}); lower the tissue "
            "threshold if the slide is pale, or check that it is a brightfield H&E slide"
        )

    def require_tissue(self) -> None:
        """Raise a :class:`SlideError` that says how to proceed when no tile is tissue."""
        if not self.n_tissue:
            raise SlideError(self._no_tissue_message())

    def tiles_in(self, bbox: Sequence[float], *, tissue_only: bool = True) -> np.ndarray:
        """Indices of tiles intersecting ``bbox``, nearest to its centre first.

        Parameters
        ----------
        bbox : (x0, y0, x1, y1)
            Level-0 px; may extend beyond the slide.
        tissue_only : bool
            Drop background tiles.

        Returns
        -------
        numpy.ndarray
            int64 indices ordered by the distance of the tile centre to the box centre (ties by
            index, so the order is deterministic).
        """
        return self.lattice.tiles_in(bbox, self.tissue if tissue_only else None)

    def index_at(self, x: float, y: float) -> int | None:
        """Index of the tile containing level-0 point (x, y), or None outside the lattice."""
        return self.lattice.index_at(x, y)

    # --- pixels -------------------------------------------------------------------------------
    def read_tile(self, index: int) -> np.ndarray:
        """Tile ``index`` as (size, size, 3) uint8 at the grid's µm/px."""
        return self.read_tiles([index])[0]

    def read_tiles(self, indices: Sequence[int] | np.ndarray, *, decode_device: str | None = None,
                   resize: bool = True) -> np.ndarray:  # fmt: skip
        """Tiles ``indices`` as (n, size, size, 3) uint8, read as one batch.

        The stored tiles under the batch are decoded once each (see
        :mod:`~napari_virchow.slides.batch_read`), so pass neighbouring tiles together (row-major
        or centre-out, as the pipeline does). When :attr:`resized`, the whole batch is resampled
        at once with :func:`~napari_virchow.slides.resample.resize_batch` (antialiased bicubic).
        ``decode_device`` overrides the grid's :attr:`decode_device` for this read. On levels
        with non-integer downsamples each tile starts at the nearest level pixel (``blend=False``
        of :func:`read_regions`: at most half a level pixel off, and ~12× faster than blending).
        ``resize=False`` returns the tiles as read, (n, read_size, read_size, 3), for a caller
        that resamples them elsewhere (an encoder on a GPU: :func:`~napari_virchow.slides.resample.resize_tensor`).
        """
        idx = np.asarray(indices, dtype=np.int64).ravel()
        bad = idx[(idx < 0) | (idx >= len(self))]
        if bad.size:
            raise IndexError(f"tile {int(bad[0])} out of range 0..{len(self) - 1}")
        rs, device = self.read_size, decode_device or self.decode_device
        if not self.resized or not resize:
            return read_regions(self.slide, self.coords[idx], self.read_level, (rs, rs),
                                decode_device=device, blend=False)
        # the pre-resize pixels go to a buffer this thread reuses: no fresh pages per batch
        scratch = _scratch(len(idx), rs)
        raw = read_regions(self.slide, self.coords[idx], self.read_level, (rs, rs), out=scratch,
                           decode_device=device, blend=False)
        return resize_batch(raw, self.size)

    def __repr__(self) -> str:
        rows, cols = self.grid_shape
        return (
            f"TileGrid({self.slide.path.name!r}, {self.size} px at {self.mpp:g} µm/px = "
            f"{self.tile_size_l0} px level 0, {rows}×{cols} tiles, {self.n_tissue} tissue, "
            f"level {self.read_level}{' resized' if self.resized else ''})"
        )
