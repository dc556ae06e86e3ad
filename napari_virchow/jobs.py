"""The widget's long-running work as plain generators (Qt-free, testable without a viewer).

Each job yields small event objects; the widget runs it in a napari ``thread_worker`` and draws
on each event in the UI thread. Jobs check a ``threading.Event`` between batches to cancel.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from napari_virchow.analysis.similarity import Hit
from napari_virchow.errors import VirchowError
from napari_virchow.session import ClusterResult, SlideSession, TrainResult
from napari_virchow.slides.slide import Slide
from napari_virchow.store.key import mag_name

__all__ = [
    "BatchDone", "Clustered", "IndexHits", "Planned", "Queried", "Stage", "TooMany", "Trained",
    "LevelTokenSink", "cluster_job", "compute_job", "index_search_job", "overview_job", "query_job",
    "train_job", "view_job",
]  # fmt: skip

#: receives ``(mpp, indices, cls, patch_tokens)`` of each batch a job embeds, from the same forward pass
LevelTokenSink = Callable[[float, np.ndarray, np.ndarray, np.ndarray], None]


@dataclass(frozen=True)
class Stage:
    """A step started (model load, tissue detection, ...) or a final status line."""

    message: str
    final: bool = False


@dataclass(frozen=True)
class BatchDone:
    """A batch was embedded and stored; ``changed`` overlays need redrawing."""

    n_done: int
    n_total: int
    tiles_per_s: float
    indices: np.ndarray = field(repr=False)
    changed: tuple[str, ...] = ()
    mpp: float | None = None  # the magnification of ``indices`` (None: the encoder's own)
    feed: str = ""  # feed and encoder rates, whether the encoder waited for pixels (BatchResult.feed_note)


@dataclass(frozen=True)
class Planned:
    """The magnification chosen for a view, and how many of its tiles in view are still to compute."""

    mpp: float
    pinned: bool
    n_in_view: int
    n_todo: int
    fits: bool
    overview: bool = False
    n_missing: int | None = None  # tiles in view not cached (None: n_todo); more than n_todo when auto caps a view


@dataclass(frozen=True)
class TooMany:
    """More tiles to compute than the limit: nothing was computed; the user decides."""

    n_todo: int
    n_in_view: int
    limit: int
    eta_s: float


@dataclass(frozen=True)
class Trained:
    """A head was fitted (or loaded) and applied to the embedded tiles."""

    result: TrainResult


@dataclass(frozen=True)
class Clustered:
    """The embedded tiles were clustered."""

    result: ClusterResult


@dataclass(frozen=True)
class Queried:
    """Similarity computed for a query; hits with small RGB thumbnails."""

    hits: list[Hit]
    thumbnails: list[np.ndarray] = field(repr=False)
    query_indices: np.ndarray = field(repr=False)


class Cancelled(Exception):  # noqa: N818 - a signal that ends a job, not an error
    """Raised inside a job when the user cancelled between two stages."""


def _stop_if_cancelled(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled


def cancellable(job: Callable[..., Iterator[object]]) -> Callable[..., Iterator[object]]:
    """End a job quietly with a final "cancelled" stage when it is cancelled between stages."""

    @functools.wraps(job)
    def run(*args: object, **kwargs: object) -> Iterator[object]:
        try:
            yield from job(*args, **kwargs)
        except Cancelled:
            yield Stage("cancelled; everything computed so far is kept", final=True)

    return run


def _load(session: SlideSession, cancel: threading.Event | None = None) -> Iterator[Stage]:
    """Open the model and find tissue (each slow), checking for cancel between them."""
    _stop_if_cancelled(cancel)
    if not session.encoder_loaded:
        yield Stage(f"loading {session.config.encoder} …")
        session.encoder()
        _stop_if_cancelled(cancel)
    if not session.grid_ready:
        yield Stage("finding tissue …")
        session.grid  # noqa: B018 - builds the grid (thumbnail + tissue mask) in this thread
        _stop_if_cancelled(cancel)


def _embed(session: SlideSession, todo: np.ndarray, cancel: threading.Event | None,
           mpp: float | None = None, token_sink: LevelTokenSink | None = None) -> Iterator[BatchDone]:  # fmt: skip
    m = session.default_mpp if mpp is None else mpp
    sink = None if token_sink is None else functools.partial(token_sink, m)
    for batch in session.compute(indices=todo, cancel=cancel, mpp=m, token_sink=sink):
        changed = session.absorb(batch.indices, batch.embeddings, mpp=m)
        yield BatchDone(batch.n_done, batch.n_total, batch.tiles_per_s, batch.indices, tuple(changed), m,
                        batch.feed_note)  # fmt: skip
    _stop_if_cancelled(cancel)


def _load_levels(session: SlideSession, cancel: threading.Event | None, mpps: Sequence[float] = ()) -> Iterator[Stage]:
    """The encoder and the grid of every level offered (plus ``mpps``), each built in this thread."""
    yield from _load(session, cancel)
    levels = (*session.mpps, *mpps)
    if not session.grids_ready(levels):
        yield Stage("finding tissue at each magnification …")
        for m in levels:
            session.grid_at(m)
            _stop_if_cancelled(cancel)


@cancellable
def view_job(session: SlideSession, box: Sequence[float], canvas_px: tuple[int, int], *,
             pinned: float | None = None, limit: int = 2000, force: bool = False,
             cancel: threading.Event | None = None,
             token_sink: LevelTokenSink | None = None) -> Iterator[object]:  # fmt: skip
    """Embed a view at the magnification the screen shows (level of detail, :mod:`napari_virchow.lod`).

    Unpinned, the finest trained level whose tiles in view fit the canvas budget is chosen and at
    most one budget of its missing tiles is computed, centre-out: no question asked. A ``pinned``
    level computes every missing tile in view, asking (:class:`TooMany`) above ``limit``.
    Yields :class:`Planned` first; a view seen before never calls the encoder. ``token_sink``
    receives ``(mpp, indices, cls, patch_tokens)`` of each batch embedded, from the same forward pass.
    """
    yield from _load_levels(session, cancel, () if pinned is None else (pinned,))
    plan = session.plan_view(box, canvas_px, pinned=pinned)
    missing = session.missing(plan.in_view, mpp=plan.mpp)
    todo = missing if pinned is not None else session.view_todo(plan)
    yield Planned(plan.mpp, plan.pinned, len(plan.in_view), len(todo), plan.fits, n_missing=len(missing))
    name = mag_name(plan.mpp)
    if pinned is not None and len(todo) > limit and not force:
        if not session.last_tiles_per_s:
            yield Stage("timing the encoder …")
        yield TooMany(len(todo), len(plan.in_view), limit, len(todo) / session.tiles_per_s())
        return
    if not len(todo):
        yield Stage(f"{len(plan.in_view)} tissue tiles in view, all cached ({name})", final=True)
        return
    t0 = time.perf_counter()
    yield from _embed(session, todo, cancel, plan.mpp, token_sink)
    more = len(missing) - len(todo)
    rest = f"; {more} more in view (move or press again)" if more > 0 else ""
    yield Stage(f"done: {len(todo)} tiles at {name} in {time.perf_counter() - t0:.1f} s{rest}", final=True)


@cancellable
def overview_job(session: SlideSession, *, mpp: float | None = None,
                 cancel: threading.Event | None = None) -> Iterator[object]:  # fmt: skip
    """Embed the whole tissue at a coarse magnification (default 5×, 2 µm/px; else the coarsest offered)."""
    yield from _load_levels(session, cancel)
    m = mpp if mpp is not None else (2.0 if 2.0 in session.mpps else max(session.mpps))
    grid = session.grid_at(m)
    todo = session.missing(grid.tissue_indices, mpp=m)
    yield Planned(m, False, grid.n_tissue, len(todo), True, overview=True)
    if not len(todo):
        yield Stage(f"overview {mag_name(m)}: all {grid.n_tissue} tissue tiles cached", final=True)
        return
    t0 = time.perf_counter()
    yield from _embed(session, todo, cancel, m)
    yield Stage(f"overview {mag_name(m)}: {len(todo)} tiles in {time.perf_counter() - t0:.1f} s", final=True)


@cancellable
def compute_job(session: SlideSession, box: Sequence[float], *, limit: int = 2000, force: bool = False,
                mpp: float | None = None, cancel: threading.Event | None = None) -> Iterator[object]:  # fmt: skip
    """Embed the tissue tiles in ``box`` (level-0 px) that are not stored, centre-out.

    Yields :class:`Stage`, then :class:`BatchDone` per batch, or one :class:`TooMany` when more
    than ``limit`` tiles are missing and ``force`` is false. A view seen before yields only a
    final :class:`Stage` and never calls the encoder.
    """
    yield from _load(session, cancel)
    if mpp is not None:
        yield from _load_levels(session, cancel, (mpp,))
    tiles = session.grid_at(mpp).tiles_in(box)
    plan = session.plan(indices=tiles, mpp=mpp)
    if plan.n_todo > limit and not force:
        if not session.last_tiles_per_s:
            yield Stage("timing the encoder …")
        yield TooMany(plan.n_todo, plan.n_total, limit, plan.eta_s(session.tiles_per_s()))
        return
    if not plan.n_todo:
        yield Stage(f"{len(tiles)} tissue tiles in view, all cached", final=True)
        return
    todo = session.missing(tiles, mpp=mpp)
    t0 = time.perf_counter()
    yield from _embed(session, todo, cancel, mpp)
    yield Stage(f"done: {len(todo)} tiles in {time.perf_counter() - t0:.1f} s", final=True)


@cancellable
def train_job(session: SlideSession, polygons: Sequence[np.ndarray], classes: Sequence[str], *,
              holes: Sequence[Sequence[np.ndarray]] | None = None,
              cancel: threading.Event | None = None) -> Iterator[object]:  # fmt: skip
    """Embed the tiles under the annotations at each magnification they cover, fit one probe per
    magnification, and draw it over every embedded tile. ``holes[i]``: the holes of polygon ``i``
    (their tiles stay unlabelled)."""
    yield from _load_levels(session, cancel)
    idx, labels = session.annotated_tiles(polygons, classes, holes=holes)
    names = sorted(set(labels.tolist()))
    if len(names) < 2:
        have = f"only {names[0]!r}" if names else "no class with tiles under it"
        raise VirchowError(f"annotations cover {have}: draw regions of at least two classes "
                           "(each at least half a tile) and train again")  # fmt: skip
    # Too few tiles at every level: fit at the encoder's own one, whose refusal names the class to annotate more.
    levels = session.annotated_levels(polygons, classes, holes=holes) or {session.default_mpp: idx}
    for m, tiles in levels.items():
        todo = session.missing(tiles, mpp=m)
        if len(todo):
            yield Stage(f"embedding {len(todo)} annotated tiles at {m:g} µm/px …")
            yield from _embed(session, todo, cancel, m)
    yield Stage(f"fitting the probe at {', '.join(f'{m:g}' for m in levels)} µm/px …")
    if session.default_mpp not in levels or len(levels) > 1:
        result = session.train_head_levels(polygons, classes, mpps=list(levels), holes=holes)
    else:
        result = session.train_head(polygons, classes, holes=holes)
    _stop_if_cancelled(cancel)  # a cancel during fitting keeps the previous head
    session.set_head(result.head)
    yield Trained(result)


@cancellable
def cluster_job(session: SlideSession, k: int, *, with_rgb: bool = False, mpp: float | None = None,
                cancel: threading.Event | None = None) -> Iterator[object]:  # fmt: skip
    """K-means over the embedded tiles of level ``mpp`` (and PCA colours)."""
    yield from _load(session, cancel)
    yield Stage(f"clustering into {k} …")
    result = session.fit_clusters(k, with_rgb=with_rgb, mpp=mpp)
    _stop_if_cancelled(cancel)  # k-means is one call: a cancel during it drops its result
    session.use_clusters(result)
    yield Clustered(result)


@cancellable
def query_job(session: SlideSession, x: float, y: float, *, k: int = 20, box: Sequence[float] | None = None,
              mpp: float | None = None, cancel: threading.Event | None = None) -> Iterator[object]:  # fmt: skip
    """Similarity to the tile of level ``mpp`` under level-0 ``(x, y)`` (or the tiles in ``box``),
    embedding it first; searches the embeddings of that level."""
    yield from _load(session, cancel)
    if mpp is not None:
        yield from _load_levels(session, cancel, (mpp,))
    query = session.query_indices(x, y, box, mpp=mpp)
    todo = session.missing(query, mpp=mpp)
    if len(todo):
        yield Stage("embedding the query region …")
        yield from _embed(session, todo, cancel, mpp)
    session.set_query(query, mpp=mpp)
    hits = session.hits(k)
    thumbs = [thumbnail(session, h.x, h.y) for h in hits]
    yield Queried(hits, thumbs, query)


@dataclass(frozen=True)
class IndexHits:
    """Hits from other slides of a cohort index; ``warning`` names slide files that moved;
    ``description``: the index's size, kind, encoder and magnification."""

    hits: list[Hit]
    thumbnails: list[np.ndarray | None] = field(repr=False)
    warning: str | None = None
    description: str = ""


@cancellable
def index_search_job(session: SlideSession, index_path: str, *, k: int = 20,
                     cancel: threading.Event | None = None) -> Iterator[object]:  # fmt: skip
    """Search a cohort index (``napari-virchow index``) with the current query, other slides only.

    The query's magnification must be the index's (``index_path`` may be a folder of indexes, one
    per magnification: the one at the query's is searched).
    """
    from napari_virchow.analysis.index import load_index_for

    if session.query_vector is None:
        raise VirchowError("pick a query first: press 'Pick query' and click a region of the slide")
    yield Stage("searching the index …")
    index = load_index_for(index_path, session.query_mpp, encoder=session.config.encoder, mmap=True)
    try:
        hits = index.search(session.query_vector, k, exclude_slide=session.slide_path, query_mpp=session.query_mpp)
    finally:
        index.close()
    thumbs: list[np.ndarray | None] = []
    for hit in hits:
        if not hit.exists or hit.slide is None:
            thumbs.append(None)
            continue
        try:
            with Slide(hit.slide) as other:
                side = hit.tile_size_l0 or session.grid_at(session.query_mpp).tile_size_l0
                thumbs.append(_tile_picture(other, hit.x, hit.y, side))
        except VirchowError:  # one unreadable slide costs its thumbnail, not the search
            thumbs.append(None)
    notes = " ".join(m for m in (index.check_slides(), index.damage_report()) if m)
    yield IndexHits(hits, thumbs, notes or None, index.describe())


def _tile_picture(slide: Slide, x: int, y: int, tile: int, size: int = 64) -> np.ndarray:
    from PIL import Image

    level = slide.best_level_for_downsample(tile / size)
    ds = slide.level_downsamples[level]
    side = max(int(round(tile / ds)), 1)
    img = Image.fromarray(slide.read_region((int(x), int(y)), level, (side, side)))
    return np.asarray(img.resize((size, size), Image.Resampling.BILINEAR))


def thumbnail(session: SlideSession, x: int, y: int, size: int = 64) -> np.ndarray:
    """A small RGB picture of the tile at level-0 ``(x, y)``."""
    return _tile_picture(session.slide, x, y, session.grid_at(session.query_mpp).tile_size_l0, size)
