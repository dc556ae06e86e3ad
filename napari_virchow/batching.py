"""Batches of the embedding pipeline: sizes, reader threads, the encoder call, the store writer.

The pieces :func:`napari_virchow.inference.iter_embed` is made of, each small enough to test on
its own: how many tiles a batch holds (by device, capped by a memory estimate), how many reader
threads prefetch, the pinned host buffers uint8 tiles cross to a GPU through (and where a 40×
tile is resampled: on the GPU with CUDA, by the readers elsewhere), the encoder call
that halves its batch on CUDA out-of-memory, the feed and encoder rates (:class:`FeedStats`),
and the one-batch writer thread that stores batch k while batch k + 1 is read.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Generator, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Literal

import numpy as np

from napari_virchow._torch import torch
from napari_virchow.slides.resample import resize_batch, resize_tensor

if TYPE_CHECKING:
    from napari_virchow.models.encoder import Encoder
    from napari_virchow.models.specs import EncoderSpec
    from napari_virchow.slides.tiling import TileGrid
    from napari_virchow.store.embeddings import EmbeddingStore

__all__ = [
    "PREFETCH_PER_READER", "FeedStats", "HostStager", "batch_bytes", "cap_batch_size", "default_batch_size",
    "leave_one_core", "memory_budget", "resamples_on_device", "resolve_readers",
]  # fmt: skip

log = logging.getLogger("napari_virchow.inference")

#: batches read ahead per reader thread (bounded memory: 32 tiles of 224² are 4.8 MB)
PREFETCH_PER_READER = 2


def leave_one_core() -> int:
    """A torch thread count that leaves one core to the UI: ``max(1, cpu_count - 1)``."""
    return max(1, (os.cpu_count() or 1) - 1)


def default_batch_size(device: torch.device | str) -> int:
    """32 on CUDA, 16 on MPS, 8 on CPU (a batch is also the cancel / redraw granularity)."""
    kind = torch.device(device).type
    return {"cuda": 32, "mps": 16}.get(kind, 8)


#: most reader threads ``"auto"`` starts (decoding releases the GIL; beyond this, memory for prefetch)
MAX_READERS = 16


def resolve_readers(readers: int | Literal["auto"], device: torch.device | str) -> int:
    """Reader threads: ``"auto"`` is 0 (read in the consuming thread) on CPU; on a GPU, sized to
    the CPU: every core but the one feeding the GPU, at least 2, at most :data:`MAX_READERS`."""
    if readers != "auto":
        if int(readers) != readers or readers < 0:
            raise ValueError(f"readers must be 'auto' or an int >= 0, got {readers!r}")
        return int(readers)
    if torch.device(device).type == "cpu":
        return 0
    return min(MAX_READERS, max(2, (os.cpu_count() or 2) - 1))


# --- memory ---------------------------------------------------------------------------------------


def batch_bytes(spec: EncoderSpec, n: int) -> int:
    """Peak bytes to embed ``n`` tiles in one batch: tiles, float32 input, one ViT block's activations.

    An estimate for capping batch sizes, not a measurement: under ``inference_mode`` only one
    block's activations are alive at a time (tokens × width for the residual stream, q/k/v and
    norms, tokens × hidden for the MLP, and the attention matrix).
    """
    kw = spec.model_kwargs
    width = int(kw.get("embed_dim", 1280))
    hidden = int(width * float(kw.get("mlp_ratio", 4.0)))
    heads = int(kw.get("num_heads", 16))
    patch = int(kw.get("patch_size", 14))
    tokens = (spec.input_size // patch) ** 2 + spec.num_prefix_tokens
    pixels = spec.input_size**2 * 3
    per_tile = pixels * (1 + 2 * 4) + 4 * tokens * (6 * width + 2 * hidden) + 4 * heads * tokens**2
    return int(n) * per_tile


def _available_host_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else free pages; None when unknown."""
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/meminfo", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    with contextlib.suppress(AttributeError, ValueError, OSError):
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return None


def memory_budget(device: torch.device | str) -> int | None:
    """Bytes one batch may use: 80 % of free GPU memory on CUDA, half the available RAM otherwise."""
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free * 0.8)
    available = _available_host_bytes()
    return None if available is None else available // 2


def cap_batch_size(requested: int, spec: EncoderSpec, device: torch.device | str) -> tuple[int, str | None]:
    """``requested``, or the largest batch the memory estimate allows, with a note saying why."""
    budget = memory_budget(device)
    if budget is None or batch_bytes(spec, requested) <= budget:
        return requested, None
    fits = max(1, budget // batch_bytes(spec, 1))
    if fits >= requested:
        return requested, None
    gb = batch_bytes(spec, requested) / 1e9
    return fits, (f"batch size {requested} would need about {gb:.1f} GB for {spec.name} on {torch.device(device)}; "
                  f"using {fits} (what fits in {budget / 1e9:.1f} GB): the embeddings are the same")  # fmt: skip


# --- the encoder call -------------------------------------------------------------------------------


def note(exc: BaseException, text: str) -> None:
    """Add ``text`` to the traceback of ``exc`` (Python >= 3.11; on 3.10 nothing is added)."""
    if hasattr(exc, "add_note"):
        exc.add_note(text)


class FeedStats:
    """Feed and encoder rates of one run, so that a starved encoder shows.

    ``feed_tiles_per_s``: tiles the readers delivered per second of reading, per reader thread
    summed (what the feed could sustain if never blocked). ``encoder_tiles_per_s``: tiles per
    second inside the encoder calls alone (transfer, preprocessing, model). ``wait_s``: seconds
    the encoder loop spent waiting for tiles. The encoder never waits when the feed rate is
    above its rate; with readers=0 (CPU) reading and encoding alternate, so it always waits.
    """

    def __init__(self, readers: int) -> None:
        self.readers = max(1, readers)
        self._lock = threading.Lock()
        self.tiles_read = self.tiles_embedded = 0
        self.read_s = self.embed_s = self.wait_s = 0.0

    def add_read(self, n: int, seconds: float) -> None:
        """Called by a reader (any thread) after reading ``n`` tiles in ``seconds``."""
        with self._lock:
            self.tiles_read += n
            self.read_s += seconds

    def add_embed(self, n: int, seconds: float) -> None:
        """Called by the consumer after embedding ``n`` tiles in ``seconds``."""
        self.tiles_embedded += n
        self.embed_s += seconds

    @property
    def feed_tiles_per_s(self) -> float:
        """Tiles/s the readers delivered (NaN before the first read)."""
        with self._lock:
            busy = self.read_s / self.readers
            return self.tiles_read / busy if busy > 0 else float("nan")

    @property
    def encoder_tiles_per_s(self) -> float:
        """Tiles/s of the encoder alone (NaN before the first batch)."""
        return self.tiles_embedded / self.embed_s if self.embed_s > 0 else float("nan")


class HostStager:
    """uint8 tiles -> ``device`` through pinned host buffers and ``non_blocking`` copies (CUDA).

    A ring of ``slots`` page-locked buffers, each reused once the copy out of it has finished
    (a CUDA event), so the host never waits on a transfer it does not depend on and the GPU
    copies by DMA. Elsewhere, and for tiles already in a tensor (GPU-decoded), tiles pass through.
    """

    def __init__(self, device: torch.device | str, slots: int = 2) -> None:
        self.device = torch.device(device)
        self.enabled = self.device.type == "cuda" and torch.cuda.is_available()
        self._buffers: list[torch.Tensor | None] = [None] * slots
        self._events: list[torch.cuda.Event | None] = [None] * slots
        self._next = 0

    def __call__(self, tiles: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """``tiles`` on the device (CUDA), or unchanged."""
        if not self.enabled or isinstance(tiles, torch.Tensor):
            return tiles
        arr = np.ascontiguousarray(tiles)
        i, self._next = self._next, (self._next + 1) % len(self._buffers)
        event, buf = self._events[i], self._buffers[i]
        if event is not None:
            event.synchronize()  # the copy out of this slot (two batches ago) is done
        if buf is None or buf.numel() < arr.size:
            buf = self._buffers[i] = torch.empty(arr.size, dtype=torch.uint8, pin_memory=True)
        host = buf[: arr.size].view(arr.shape)
        host.numpy()[...] = arr
        out = host.to(self.device, non_blocking=True)
        self._events[i] = torch.cuda.Event()
        self._events[i].record()  # type: ignore[union-attr]
        return out


def resamples_on_device(device: torch.device | str) -> bool:
    """Whether tiles read at another size are resampled on the encoder's ``device`` rather than by the readers.

    On CUDA the readers send tiles as read (a 40× tile read for 20× is 4× the bytes, a transfer
    the GPU makes by DMA) and resampling costs the CPU nothing: at 40× it was a fifth of a
    reader's time (~0.3 ms a tile). Elsewhere the reader threads resample (MPS included: torch
    may lack its antialiased bicubic kernel there).
    """
    return torch.device(device).type == "cuda"


class Embedder:
    """``encoder.embed`` in sub-batches, halving them for good on CUDA out-of-memory.

    Tiles reach the device through ``stager`` (pinned, non-blocking on CUDA); each call's
    tiles and seconds go to ``stats``. With ``resize_to``, tiles of another side are resampled
    to it where the stager put them (the GPU: :func:`~napari_virchow.slides.resample.resize_tensor`,
    the lattice's one filter): readers then send them as read (see :func:`resamples_on_device`).
    """

    def __init__(self, encoder: Encoder, batch_size: int, stats: FeedStats | None = None,
                 resize_to: int | None = None) -> None:  # fmt: skip
        self.encoder, self.batch_size = encoder, batch_size
        self.stager = HostStager(encoder.device)
        self.stats = stats
        self.resize_to = resize_to

    def __call__(self, tiles: np.ndarray | torch.Tensor) -> np.ndarray:
        return self._timed(tiles, False)[0]

    def with_tokens(self, tiles: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Embeddings, CLS and patch tokens (:func:`~napari_virchow.models.tokens.split_tokens`) of
        ``tiles`` from one forward pass each: the embeddings are those ``self(tiles)`` returns."""
        emb, cls, tok = self._timed(tiles, True)
        assert cls is not None and tok is not None  # asked for
        return emb, cls, tok

    def _timed(self, tiles: np.ndarray | torch.Tensor,
               tokens: bool) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:  # fmt: skip
        t0 = time.perf_counter()
        staged = self.stager(tiles)  # on the device (CUDA), else the host array as it came
        if self.resize_to is not None:  # both return tiles already resize_to px as they are
            n = self.resize_to
            staged = resize_tensor(staged, n) if isinstance(staged, torch.Tensor) else resize_batch(staged, n)
        out = self._embed(staged, tokens)
        if self.stats is not None:
            self.stats.add_embed(len(tiles), time.perf_counter() - t0)  # embed() returned host arrays: synced
        return out

    def _forward(self, tiles: np.ndarray | torch.Tensor,
                 tokens: bool) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:  # fmt: skip
        if not tokens:
            return self.encoder.embed(tiles), None, None
        from napari_virchow.models.tokens import embed_with_tokens

        return embed_with_tokens(self.encoder, tiles)

    def _embed(self, tiles: np.ndarray | torch.Tensor,
               tokens: bool) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:  # fmt: skip
        out = np.empty((len(tiles), self.encoder.dim), np.float32)
        cls_parts: list[np.ndarray] = []
        tok_parts: list[np.ndarray] = []
        i = 0
        while i < len(tiles):
            n = min(self.batch_size, len(tiles) - i)
            try:
                out[i : i + n], cls, tok = self._forward(tiles[i : i + n], tokens)
                if cls is not None and tok is not None:
                    cls_parts.append(cls)
                    tok_parts.append(tok)
                i += n
                continue
            except torch.cuda.OutOfMemoryError as exc:
                if self.batch_size == 1:
                    note(exc, "even one tile does not fit: free GPU memory, or use dtype='bf16' or device='cpu'")
                    raise
            # Halve outside the except block, so the exception's frames (and the activations
            # they reference) are gone before the retry.
            self.batch_size = max(1, self.batch_size // 2)
            log.warning("CUDA out of memory: continuing with batches of %d", self.batch_size)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if not tokens:
            return out, None, None
        return out, np.concatenate(cls_parts), np.concatenate(tok_parts)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``threads`` inside the block (None: unchanged), restored after."""
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --- reading -------------------------------------------------------------------------------------------


def _read(grid: TileGrid, idx: np.ndarray, stats: FeedStats | None = None,
          decode_device: str | None = None, resize: bool = True) -> np.ndarray:  # fmt: skip
    t0 = time.perf_counter()
    try:
        tiles = grid.read_tiles(idx, decode_device=decode_device, resize=resize)
    except Exception as exc:
        note(exc, f"while reading tiles {idx.tolist()} of {grid.slide.path.name} (level {grid.read_level})")
        raise
    if stats is not None:
        stats.add_read(len(idx), time.perf_counter() - t0)
    return tiles


def tile_batches(
    grid: TileGrid,
    batches: Iterable[np.ndarray],
    readers: int,
    cancel: threading.Event | None,
    stats: FeedStats | None = None,
    decode_device: str | None = None,
    resize: bool = True,
) -> Generator[tuple[np.ndarray, np.ndarray], None, None]:
    """(indices, tiles) per batch, read in this thread or prefetched by ``readers`` threads;
    each read's tiles and seconds go to ``stats``; JPEG decoded on ``decode_device`` (None: the grid's);
    ``resize=False``: tiles as read (the encoder resamples them on its device, see :class:`Embedder`)."""
    if readers == 0:
        for idx in batches:
            if cancel is not None and cancel.is_set():
                return
            yield idx, _read(grid, idx, stats, decode_device, resize)
        return
    pool = ThreadPoolExecutor(readers, thread_name_prefix="napari-virchow-reader")
    pending: deque[tuple[np.ndarray, Future[np.ndarray]]] = deque()
    upcoming = iter(batches)
    try:
        for idx in upcoming:
            pending.append((idx, pool.submit(_read, grid, idx, stats, decode_device, resize)))
            if len(pending) >= readers * PREFETCH_PER_READER:
                break
        while pending:
            idx, future = pending.popleft()
            tiles = future.result()  # a reader's exception is re-raised here, in the consumer
            nxt = next(upcoming, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(_read, grid, nxt, stats, decode_device, resize)))
            yield idx, tiles
    finally:
        # Runs on exhaustion, error, and when the consumer closes the generator: queued reads
        # are dropped, running ones finish (one batch per thread), then every thread is joined.
        pool.shutdown(wait=True, cancel_futures=True)


def next_batch(
    reader: Iterator[tuple[np.ndarray, np.ndarray]],
) -> tuple[tuple[np.ndarray, np.ndarray] | None, Exception | None]:
    """The next batch, or the reader's exception (raised after the batch before is yielded)."""
    try:
        return next(reader, None), None
    except Exception as exc:  # noqa: BLE001 - re-raised by the consumer, after the batch before
        return None, exc


# --- writing -------------------------------------------------------------------------------------------


class Writer(threading.Thread):
    """Store one batch in the background; ``join()`` re-raises what the write raised."""

    def __init__(self, store: EmbeddingStore, idx: np.ndarray, emb: np.ndarray) -> None:
        super().__init__(name="napari-virchow-writer", daemon=True)
        self._args = (store, idx, emb)
        self._error: BaseException | None = None
        self.start()

    def run(self) -> None:
        store, idx, emb = self._args
        try:
            store.write(idx, emb)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer by join()
            self._error = exc

    def join(self, timeout: float | None = None) -> None:
        """Wait for the write; re-raise its exception here, in the consumer."""
        super().join(timeout)
        if self._error is not None:
            raise self._error

    def settle(self) -> None:
        """Wait for the write on an exit path that is already raising: its own error is dropped.

        A further Ctrl-C while waiting does not cut the write short: it is re-raised once the
        write has ended, so the store is never closed under a write in flight.
        """
        interrupted: KeyboardInterrupt | None = None
        while self.is_alive():
            try:
                super().join()
            except KeyboardInterrupt as exc:
                interrupted = exc
        if interrupted is not None:
            raise interrupted
