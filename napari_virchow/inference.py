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
from collections import deque
from collections.abc import Generator, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from napari_virchow._torch import torch
from napari_virchow.errors import StoreError
from napari_virchow.models.encoder import Encoder
from napari_virchow.slides.slide import Slide
from napari_virchow.slides.tiling import TileGrid
from napari_virchow.store.claims import shared_batches
from napari_virchow.store.embeddings import EmbeddingStore, StoreKey

__all__ = [
    "BatchResult", "Plan", "default_batch_size", "embed_slide", "estimate_tiles_per_s",
    "iter_embed", "leave_one_core", "open_store", "plan", "resolve_readers", "store_key",
]  # fmt: skip

log = logging.getLogger(__name__)

BBox = Sequence[float]
#: batches read ahead per reader thread (bounded memory: 32 tiles of 224² are 4.8 MB)
PREFETCH_PER_READER = 2


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
    """

    indices: np.ndarray
    embeddings: np.ndarray
    n_done: int
    n_total: int
    n_computed: int
    elapsed: float
    tiles_per_s: float


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


def leave_one_core() -> int:
    """A torch thread count that leaves one core to the UI: ``max(1, cpu_count - 1)``."""
    return max(1, (os.cpu_count() or 1) - 1)


def default_batch_size(device: torch.device | str) -> int:
    """32 on CUDA, 16 on MPS, 8 on CPU (a batch is also the cancel / redraw granularity)."""
    kind = torch.device(device).type
    return {"cuda": 32, "mps": 16}.get(kind, 8)


def resolve_readers(readers: int | Literal["auto"], device: torch.device | str) -> int:
    """Reader threads: ``"auto"`` is 0 (read in the consuming thread) on CPU, 2–8 on a GPU."""
    if readers != "auto":
        if int(readers) != readers or readers < 0:
            raise ValueError(f"readers must be 'auto' or an int >= 0, got {readers!r}")
        return int(readers)
    if torch.device(device).type == "cpu":
        return 0
    return min(8, max(2, (os.cpu_count() or 2) // 2))


def _default_grid(slide: Slide, encoder: Encoder) -> TileGrid:
    return TileGrid(slide, mpp=encoder.spec.mpp, size=encoder.spec.input_size)


def store_key(slide: Slide, encoder: Encoder | str, grid: TileGrid, *, weights_id: str | None = None) -> StoreKey:
    """Cache key of ``slide`` embedded by ``encoder`` (or an encoder name + ``weights_id``) on ``grid``.

    The lattice step is part of the slide's identity: the same file with another µm/px override
    is tiled differently, so it gets its own store rather than a "made by another encoder" refusal.
    """
    name = encoder if isinstance(encoder, str) else encoder.spec.name
    wid = weights_id if weights_id is not None else encoder.weights_id  # type: ignore[union-attr]
    return StoreKey(f"{slide.fingerprint}-step{grid.tile_size_l0}", name, wid, grid.mpp, grid.size)


def open_store(
    slide: Slide,
    encoder: Encoder,
    grid: TileGrid,
    *,
    cache_root: str | os.PathLike[str] | None = None,
    mode: str = "a",
) -> EmbeddingStore:
    """Create or reopen the store of (slide, encoder, grid); one row per lattice tile."""
    return EmbeddingStore.open(
        store_key(slide, encoder, grid), n_tiles=len(grid), dim=encoder.dim,
        root=None if cache_root is None else Path(cache_root), slide_path=str(slide.path),
        coords=grid.coords, tile_size_l0=grid.tile_size_l0, mode=mode,
    )  # fmt: skip


def _requested(grid: TileGrid, bbox: BBox | None, indices: Sequence[int] | None) -> np.ndarray:
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


def _check_store(store: EmbeddingStore, grid: TileGrid, encoder: Encoder) -> None:
    if (store.n_tiles, store.dim) != (len(grid), encoder.dim):
        raise StoreError(
            f"store at {store.path} holds {store.n_tiles} tiles × {store.dim} dims, but this "
            f"grid has {len(grid)} tiles and {encoder.spec.name} {encoder.dim} dims"
        )


def plan(
    slide: Slide,
    encoder: Encoder,
    grid: TileGrid | None = None,
    bbox: BBox | None = None,
    *,
    indices: Sequence[int] | None = None,
    store: EmbeddingStore | None = None,
    batch_size: int | None = None,
    readers: int | Literal["auto"] = "auto",
    cache_root: str | os.PathLike[str] | None = None,
) -> Plan:
    """Count what :func:`iter_embed` with the same arguments would compute (nothing is created)."""
    grid = grid if grid is not None else _default_grid(slide, encoder)
    requested = _requested(grid, bbox, indices)
    if store is not None:
        todo = store.missing(requested)
    elif EmbeddingStore.find(store_key(slide, encoder, grid), root=cache_root) is None:
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


class _Embedder:
    """``encoder.embed`` in sub-batches, halving them for good on CUDA out-of-memory."""

    def __init__(self, encoder: Encoder, batch_size: int) -> None:
        self.encoder, self.batch_size = encoder, batch_size

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        out = np.empty((len(tiles), self.encoder.dim), np.float32)
        i = 0
        while i < len(tiles):
            n = min(self.batch_size, len(tiles) - i)
            try:
                out[i : i + n] = self.encoder.embed(tiles[i : i + n])
                i += n
                continue
            except torch.cuda.OutOfMemoryError as exc:
                if self.batch_size == 1:
                    _note(
                        exc,
                        "even one tile does not fit: free GPU memory, or use dtype='bf16' or device='cpu'",
                    )
                    raise
            # Halve outside the except block, so the exception's frames (and the activations
            # they reference) are gone before the retry.
            self.batch_size = max(1, self.batch_size // 2)
            log.warning("CUDA out of memory: continuing with batches of %d", self.batch_size)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        return out


def _read(grid: TileGrid, idx: np.ndarray) -> np.ndarray:
    try:
        return grid.read_tiles(idx)
    except Exception as exc:
        _note(
            exc,
            f"while reading tiles {idx.tolist()} of {grid.slide.path.name} (level {grid.read_level})",
        )
        raise


def _note(exc: BaseException, text: str) -> None:
    if hasattr(exc, "add_note"):  # Python >= 3.11; on 3.10 the traceback still shows the read
        exc.add_note(text)


def _tile_batches(
    grid: TileGrid, batches: Iterable[np.ndarray], readers: int, cancel: threading.Event | None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(indices, tiles) per batch, read in this thread or prefetched by ``readers`` threads."""
    if readers == 0:
        for idx in batches:
            if cancel is not None and cancel.is_set():
                return
            yield idx, _read(grid, idx)
        return
    pool = ThreadPoolExecutor(readers, thread_name_prefix="napari-virchow-reader")
    pending: deque[tuple[np.ndarray, Future[np.ndarray]]] = deque()
    upcoming = iter(batches)
    try:
        for idx in upcoming:
            pending.append((idx, pool.submit(_read, grid, idx)))
            if len(pending) >= readers * PREFETCH_PER_READER:
                break
        while pending:
            idx, future = pending.popleft()
            tiles = future.result()  # a reader's exception is re-raised here, in the consumer
            nxt = next(upcoming, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(_read, grid, nxt)))
            yield idx, tiles
    finally:
        # Runs on exhaustion, error, and when the consumer closes the generator: queued reads
        # are dropped, running ones finish (one batch per thread), then every thread is joined.
        pool.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def iter_embed(
    slide: Slide,
    encoder: Encoder,
    grid: TileGrid | None = None,
    store: EmbeddingStore | None = None,
    bbox: BBox | None = None,
    *,
    indices: Sequence[int] | None = None,
    batch_size: int | None = None,
    readers: int | Literal["auto"] = "auto",
    cancel: threading.Event | None = None,
    cache_root: str | os.PathLike[str] | None = None,
    threads: int | None = None,
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
    writer: _Writer | None = None
    batches: Generator[np.ndarray, None, None] | None = None
    try:
        _check_store(store, grid, encoder)
        requested = _requested(grid, bbox, indices)
        todo = store.missing(requested)
        if not todo.size:
            return
        size = batch_size or default_batch_size(encoder.device)
        if size < 1:
            raise ValueError(f"batch_size must be >= 1, got {size}")
        n_cached, n_computed = len(requested) - len(todo), 0
        embed = _Embedder(encoder, size)
        # Chunks another live process is computing are skipped, then waited for: two runs share.
        batches = shared_batches(store, todo, size, cancel)
        reader = _tile_batches(grid, batches, resolve_readers(readers, encoder.device), cancel)
        with contextlib.closing(reader), _torch_threads(threads):
            batch, error = _next(reader)
            while batch is not None and not (cancel is not None and cancel.is_set()):
                idx, tiles = batch
                emb = embed(tiles)
                # The next batch is read while this one is written (the write waits on fsync for
                # half its time). The writer thread lives for one batch only: no thread outlives
                # a yield, so a generator abandoned by its consumer leaks nothing, and a batch is
                # yielded only once it is stored.
                writer = _Writer(store, idx, emb)
                batch, error = _next(reader)
                writer.join()
                n_computed += len(idx)
                elapsed = time.perf_counter() - t0
                yield BatchResult(idx, emb, n_cached + n_computed, len(requested), n_computed,
                                  elapsed, n_computed / max(elapsed, 1e-9))  # fmt: skip
            if error is not None and not (cancel is not None and cancel.is_set()):
                raise error
    finally:
        # Ctrl-C (or any exception) may land while a batch is being written: the write finishes
        # before the store, and its cross-process lock, are released. No thread outlives a store.
        if writer is not None:
            writer.finish()
        if batches is not None:
            batches.close()  # releases this run's chunk claims
        if own_store:
            store.close()


class _Writer(threading.Thread):
    """Store one batch in the background; ``join()`` re-raises what the write raised."""

    def __init__(self, store: EmbeddingStore, idx: np.ndarray, emb: np.ndarray) -> None:
        super().__init__(name="napari-virchow-writer", daemon=True)
        self._args, self._error = (store, idx, emb), None
        self.start()

    def run(self) -> None:
        store, idx, emb = self._args
        try:
            store.write(idx, emb)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer by join()
            self._error = exc

    def join(self, timeout: float | None = None) -> None:
        super().join(timeout)
        if self._error is not None:
            raise self._error

    def finish(self) -> None:
        """Wait for the write to end, even through further Ctrl-C (re-raised once it has)."""
        interrupted: BaseException | None = None
        while self.is_alive():
            try:
                super().join()
            except KeyboardInterrupt as exc:  # a second Ctrl-C: the write still completes first
                interrupted = exc
        if interrupted is not None:
            raise interrupted


def _next(
    reader: Iterator[tuple[np.ndarray, np.ndarray]],
) -> tuple[tuple[np.ndarray, np.ndarray] | None, Exception | None]:
    """The next batch, or the reader's exception (raised after the batch before is yielded)."""
    try:
        return next(reader, None), None
    except Exception as exc:
        return None, exc


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
