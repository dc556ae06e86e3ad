"""The embedding pipeline: tiles of a :class:`TileGrid` -> encoder -> :class:`EmbeddingStore`.

:func:`iter_embed` is the one entry point of the CLI and the viewer: it yields a
:class:`BatchResult` after each batch is stored, so callers draw, report progress or stop
between batches. Reading overlaps the encoder only where that pays: on a GPU a pool of reader
threads prefetches a few batches; on a CPU the model already uses every core (a reader thread or
DataLoader worker steals from it: 0.91 / 0.84 of encoder-only vs 0.98 for a plain loop, ViT-S on
2 cores), so tiles are read in the consuming thread. Either way one writer thread stores batch k
while batch k + 1 is read (the store's fsyncs are I/O wait), and batch k is yielded once stored.

torch's thread count is process-wide; the library never changes it unless asked with
``threads=`` (e.g. ``threads=leave_one_core()`` keeps a core for a UI), and restores it after.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from napari_virchow.batching import (
    PREFETCH_PER_READER,
    Embedder,
    FeedStats,
    Writer,
    default_batch_size,
    leave_one_core,
    next_batch,
    resamples_on_device,
    resolve_readers,
    tile_batches,
    torch_threads,
)
from napari_virchow.models.encoder import Encoder
from napari_virchow.slides.jpeg_batch import decoder_for
from napari_virchow.slides.slide import Slide
from napari_virchow.slides.tiling import TileGrid
from napari_virchow.store.claims import shared_batches
from napari_virchow.store.embeddings import EmbeddingStore
from napari_virchow.stores import check_store, open_store, store_key

__all__ = [
    "PREFETCH_PER_READER", "BatchResult", "Plan", "default_batch_size", "embed_slide", "estimate_tiles_per_s",
    "TokenSink", "feed_note", "iter_embed", "leave_one_core", "plan", "resolve_readers",
]  # fmt: skip

log = logging.getLogger(__name__)

BBox = Sequence[float]
#: receives ``(indices, cls, patch_tokens)`` of each stored batch (:func:`iter_embed`'s ``token_sink``)
TokenSink = Callable[[np.ndarray, np.ndarray, np.ndarray], None]


@dataclass(frozen=True)
class BatchResult:
    """One stored batch of :func:`iter_embed`.

    Attributes
    ----------
    indices : numpy.ndarray
        int64 tile indices of this batch (into the grid and the store).
    embeddings : numpy.ndarray
        float32 (len(indices), dim) as the encoder returned them (the store keeps float16).
    n_done, n_total : int
        Tiles of this request now in the store (including those cached before the run), and
        tiles requested.
    n_computed : int
        Tiles embedded by this run so far.
    elapsed, tiles_per_s : float
        Seconds since the run started, and ``n_computed / elapsed``.
    feed_tiles_per_s : float
        Tiles/s the readers delivered so far (tiles read ÷ reading seconds per reader thread).
    encoder_tiles_per_s : float
        Tiles/s of the encoder alone so far (transfer, preprocessing and model; no reading).
    feed_wait_s : float
        Seconds the encoder loop has waited for tiles so far. With reader threads (GPU) it stays
        near 0 while ``feed_tiles_per_s`` is above ``encoder_tiles_per_s``; on a CPU tiles are
        read between batches, so it is the reading time.
    """

    indices: np.ndarray
    embeddings: np.ndarray
    n_done: int
    n_total: int
    n_computed: int
    elapsed: float
    tiles_per_s: float
    feed_tiles_per_s: float = float("nan")
    encoder_tiles_per_s: float = float("nan")
    feed_wait_s: float = 0.0

    @property
    def feed_note(self) -> str:
        """Both rates and whether the encoder waited for pixels, e.g. for a progress line."""
        return feed_note(self.feed_tiles_per_s, self.encoder_tiles_per_s, self.feed_wait_s, self.elapsed)


def feed_note(feed: float, encoder: float, wait_s: float, elapsed: float) -> str:
    """``"feed 850 tiles/s · encoder 12.1 tiles/s · waited 0.40 s for pixels (4 % of 10.0 s)"``.

    Rates and seconds as in :class:`BatchResult`; the encoder is starved when the feed rate is
    below its own, and the wait is a large share of the run.
    """
    if not (np.isfinite(feed) and np.isfinite(encoder)):
        return "feed and encoder rates not measured yet"
    share = 100 * wait_s / elapsed if elapsed > 0 else 0.0
    return (f"feed {feed:,.0f} tiles/s · encoder {encoder:,.1f} tiles/s · "
            f"waited {wait_s:.2f} s for pixels ({share:.0f} % of {elapsed:.1f} s)")  # fmt: skip


@dataclass(frozen=True)
class Plan:
    """What :func:`iter_embed` would do: tiles requested, already cached, to compute."""

    n_total: int
    n_cached: int
    n_todo: int
    batch_size: int
    readers: int
    device: str

    @property
    def n_batches(self) -> int:
        """Encoder batches needed (before any out-of-memory halving)."""
        return -(-self.n_todo // self.batch_size)

    def eta_s(self, tiles_per_s: float) -> float:
        """Expected seconds at ``tiles_per_s`` (e.g. from :func:`estimate_tiles_per_s`)."""
        return self.n_todo / tiles_per_s if tiles_per_s > 0 else float("inf")


def _default_grid(slide: Slide, encoder: Encoder) -> TileGrid:
    return TileGrid(slide, mpp=encoder.spec.mpp, size=encoder.spec.input_size)


def _requested(grid: TileGrid, bbox: BBox | None, indices: Sequence[int] | np.ndarray | None) -> np.ndarray:
    if bbox is not None and indices is not None:
        raise ValueError("pass bbox or indices, not both")
    if bbox is not None:
        return grid.tiles_in(bbox)
    if indices is None:
        return grid.tissue_indices
    idx = np.asarray(indices, dtype=np.int64).ravel()
    if idx.size and (idx.min() < 0 or idx.max() >= len(grid)):
        raise IndexError(f"tile index out of range 0..{len(grid) - 1}")
    _, first = np.unique(idx, return_index=True)
    return idx[np.sort(first)]  # de-duplicated, caller's order kept


def plan(
    slide: Slide,
    encoder: Encoder,
    grid: TileGrid | None = None,
    bbox: BBox | None = None,
    *,
    indices: Sequence[int] | np.ndarray | None = None,
    store: EmbeddingStore | None = None,
    batch_size: int | None = None,
    readers: int | Literal["auto"] = "auto",
    cache_root: str | os.PathLike[str] | None = None,
) -> Plan:
    """Count what :func:`iter_embed` with the same arguments would compute (nothing is created)."""
    grid = grid if grid is not None else _default_grid(slide, encoder)
    requested = _requested(grid, bbox, indices)
    root = None if cache_root is None else Path(cache_root)
    if store is not None:
        todo = store.missing(requested)
    elif EmbeddingStore.find(store_key(slide, encoder, grid), root=root) is None:
        todo = requested
    else:
        with open_store(slide, encoder, grid, cache_root=cache_root, mode="r") as found:
            todo = found.missing(requested)
    return Plan(len(requested), len(requested) - len(todo), len(todo),
                batch_size or default_batch_size(encoder.device),
                resolve_readers(readers, encoder.device), str(encoder.device))  # fmt: skip


def estimate_tiles_per_s(encoder: Encoder, *, batch_size: int | None = None) -> float:
    """Time one batch of random tiles (after a one-tile warm-up) to predict throughput."""
    n = batch_size or default_batch_size(encoder.device)
    rng = np.random.default_rng(0)
    s = encoder.spec.input_size
    tiles = rng.integers(0, 256, (n, s, s, 3), dtype=np.uint8)
    encoder.embed(tiles[:1])
    t0 = time.perf_counter()
    encoder.embed(tiles)
    return n / max(time.perf_counter() - t0, 1e-9)


def iter_embed(
    slide: Slide,
    encoder: Encoder,
    grid: TileGrid | None = None,
    store: EmbeddingStore | None = None,
    bbox: BBox | None = None,
    *,
    indices: Sequence[int] | np.ndarray | None = None,
    batch_size: int | None = None,
    readers: int | Literal["auto"] = "auto",
    cancel: threading.Event | None = None,
    cache_root: str | os.PathLike[str] | None = None,
    threads: int | None = None,
    decode_device: str | None = None,
    token_sink: TokenSink | None = None,
) -> Iterator[BatchResult]:
    """Embed the requested tiles not yet in the store, yielding after each stored batch.

    Parameters
    ----------
    slide, encoder
        What to embed and with what.
    grid : TileGrid, optional
        Default: ``TileGrid(slide, mpp=encoder.spec.mpp, size=encoder.spec.input_size)``.
    store : EmbeddingStore, optional
        Default: :func:`open_store` under ``cache_root`` (opened and closed by this call).
    bbox : (x0, y0, x1, y1), optional
        Level-0 px: only tissue tiles intersecting it, nearest its centre first.
    indices : sequence of int, optional
        Exactly these tiles (tissue or not), in this order. Default: every tissue tile.
    batch_size : int, optional
        Tiles per batch; default :func:`default_batch_size`. Halved on CUDA out-of-memory.
    readers : int or "auto"
        Reader threads (0: read in the consuming thread); see :func:`resolve_readers`.
    cancel : threading.Event, optional
        Checked between batches; when set, the run stops after the current batch. Closing
        the generator (or leaving a ``for`` loop) stops it too, reader threads included.
    threads : int, optional
        torch intra-op threads during the run (restored after); default: left unchanged.
    decode_device : str, optional
        Decode JPEG stored tiles in batches on this torch device (``"cuda"``: nvJPEG), as
        ``TileGrid(decode_device=...)`` does; default: the grid's own setting.
    token_sink : callable, optional
        Called with ``(indices, cls, patch_tokens)`` of each batch once its embeddings are
        stored, from the same forward pass (:func:`~napari_virchow.models.tokens.embed_with_tokens`):
        token maps and the compressed token store need no second pass. Encoders without patch
        tokens raise :class:`~napari_virchow.errors.WeightsError` before any tile is read.

    Yields
    ------
    BatchResult
        After each batch is written to the store (rows, then done flags: a kill never leaves
        a tile marked done without its row). Nothing is yielded, and the encoder is never
        called, when every requested tile is already stored.

    Raises
    ------
    SlideError
        No µm/px, slide smaller than a tile, unreadable pixels (raised by the consumer, with
        the tile indices, also when a reader thread hit it).
    StoreError
        Cache not writable, or the store belongs to another grid.
    """
    t0 = time.perf_counter()
    grid = grid if grid is not None else _default_grid(slide, encoder)
    own_store = store is None
    store = store if store is not None else open_store(slide, encoder, grid, cache_root=cache_root)
    writer: Writer | None = None
    batches: Generator[np.ndarray, None, None] | None = None
    try:
        check_store(store, grid, encoder)
        requested = _requested(grid, bbox, indices)
        todo = store.missing(requested)
        if not todo.size:
            return
        size = batch_size or default_batch_size(encoder.device)
        if size < 1:
            raise ValueError(f"batch_size must be >= 1, got {size}")
        n_cached, n_computed = len(requested) - len(todo), 0
        if token_sink is not None:
            from napari_virchow.models.tokens import token_grid_side

            token_grid_side(encoder)  # an encoder without patch tokens fails here, before any batch
        n_readers = resolve_readers(readers, encoder.device)
        stats = FeedStats(n_readers)
        # a CUDA encoder resamples 40× tiles itself: the readers only read and decode
        on_device = grid.resized and resamples_on_device(encoder.device)
        embed = Embedder(encoder, size, stats, resize_to=grid.size if on_device else None)
        # Chunks another live process is computing are skipped, then waited for: two runs share.
        batches = shared_batches(store, todo, size, cancel)
        if decode_device is not None and decode_device != grid.decode_device:
            decoder_for(decode_device)  # a device this machine lacks fails here, before any batch
        reader = tile_batches(grid, batches, n_readers, cancel, stats, decode_device, resize=not on_device)
        with contextlib.closing(reader), torch_threads(threads):
            t_wait = time.perf_counter()
            batch, error = next_batch(reader)
            stats.wait_s += time.perf_counter() - t_wait
            while batch is not None and not (cancel is not None and cancel.is_set()):
                idx, tiles = batch
                tokens: tuple[np.ndarray, np.ndarray] | None = None
                if token_sink is None:
                    emb = embed(tiles)
                else:
                    emb, cls, tok = embed.with_tokens(tiles)
                    tokens = (cls, tok)
                # The next batch is read while this one is written (the write waits on fsync for
                # half its time). The writer thread lives for one batch only: no thread outlives
                # a yield, so a generator abandoned by its consumer leaks nothing, and a batch is
                # yielded only once it is stored.
                writer = Writer(store, idx, emb)
                t_wait = time.perf_counter()
                try:
                    batch, error = next_batch(reader)
                except BaseException:  # KeyboardInterrupt while reading: the write ends before the store closes
                    writer.settle()
                    raise
                stats.wait_s += time.perf_counter() - t_wait
                writer.join()
                writer = None
                if token_sink is not None and tokens is not None:
                    token_sink(idx, *tokens)  # the embeddings are stored: their tokens follow
                n_computed += len(idx)
                elapsed = time.perf_counter() - t0
                yield BatchResult(idx, emb, n_cached + n_computed, len(requested), n_computed,
                                  elapsed, n_computed / max(elapsed, 1e-9), stats.feed_tiles_per_s,
                                  stats.encoder_tiles_per_s, stats.wait_s)  # fmt: skip
            if error is not None and not (cancel is not None and cancel.is_set()):
                raise error
    finally:
        # Ctrl-C (or any exception) may land while a batch is being written: the write finishes
        # before the store, and its cross-process lock, are released. No thread outlives a store.
        if writer is not None:
            writer.settle()
        if batches is not None:
            batches.close()  # releases this run's chunk claims
        if own_store:
            store.close()


def embed_slide(
    slide: Slide,
    encoder: Encoder,
    grid: TileGrid | None = None,
    *,
    store: EmbeddingStore | None = None,
    cache_root: str | os.PathLike[str] | None = None,
    batch_size: int | None = None,
    readers: int | Literal["auto"] = "auto",
    cancel: threading.Event | None = None,
    threads: int | None = None,
    progress: bool = True,
) -> EmbeddingStore:
    """Embed every tissue tile of ``slide`` (resuming), with a tqdm progress bar.

    Returns
    -------
    EmbeddingStore
        Open for reading and writing; the caller closes it (``with embed_slide(...) as s:``).
    """
    from tqdm.auto import tqdm

    grid = grid if grid is not None else _default_grid(slide, encoder)
    opened = store is None
    store = store if store is not None else open_store(slide, encoder, grid, cache_root=cache_root)
    try:
        todo = len(store.missing(grid.tissue_indices))
        with tqdm(total=todo, unit="tile", desc=slide.path.name, disable=not progress) as bar:
            for result in iter_embed(slide, encoder, grid, store, batch_size=batch_size,
                                     readers=readers, cancel=cancel, threads=threads):  # fmt: skip
                bar.update(len(result.indices))
    except BaseException:
        if opened:
            store.close()
        raise
    return store
