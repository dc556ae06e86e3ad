"""The embedding pipeline end to end: real Slide, real tiny Virchow 2 encoder, real store on disk."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_virchow.batching import MAX_READERS, Embedder, FeedStats, HostStager, resamples_on_device, tile_batches
from napari_virchow.errors import StoreError
from napari_virchow.inference import (
    BatchResult,
    default_batch_size,
    embed_slide,
    estimate_tiles_per_s,
    iter_embed,
    open_store,
    plan,
    resolve_readers,
)
from napari_virchow.models.encoder import Encoder, load_encoder
from napari_virchow.slides.slide import Slide
from napari_virchow.slides.synthetic import PlantedSource, Region, write_pyramid
from napari_virchow.slides.tiling import TileGrid

REPO = Path(__file__).resolve().parents[1]
PIPELINE_PREFIX = "napari-virchow-"  # reader and writer threads


class CountingEncoder(Encoder):
    """The real encoder, counting calls; optionally raising CUDA OOM for batches above a size."""

    def __init__(self, base: Encoder, *, oom_above: int | None = None) -> None:
        super().__init__(base.spec, base.model, device=base.device, dtype=base.dtype,
                         weights_id=base.weights_id, weights_source=base.weights_source)  # fmt: skip
        self.calls: list[int] = []
        self.oom_above = oom_above

    def embed(self, tiles: np.ndarray, *, batch_size: int | None = None) -> np.ndarray:
        self.calls.append(len(tiles))
        if self.oom_above is not None and len(tiles) > self.oom_above:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return super().embed(tiles, batch_size=batch_size)


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Slide:
    # 6 × 5 tiles of 224 px; the tissue block covers 4 × 3 of them (plus border tiles)
    path = tmp_path_factory.mktemp("inference") / "slide.tif"
    regions = [Region((224, 224, 1120, 896), "tissue"), Region((448, 448, 672, 672), "planted")]
    return Slide(write_pyramid(path, 1344, 1120, PlantedSource(regions), mpp=0.5, levels=2))


@pytest.fixture(scope="module")
def grid(slide: Slide) -> TileGrid:
    return TileGrid(slide)


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "random weights" is the point here
        return load_encoder("virchow2-tiny", weights="random", device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def reference(grid: TileGrid, encoder: Encoder) -> np.ndarray:
    """encoder.embed of every tissue tile, read directly: what the pipeline must reproduce."""
    return encoder.embed(grid.read_tiles(grid.tissue_indices))


def _reference_rows(grid: TileGrid, reference: np.ndarray, idx: np.ndarray) -> np.ndarray:
    pos = np.searchsorted(grid.tissue_indices, idx)
    assert np.array_equal(grid.tissue_indices[pos], idx)
    return reference[pos]


def _pipeline_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(PIPELINE_PREFIX)]


def _thread_count() -> int:
    # zarr's I/O event loop and its executor start lazily and grow on demand (daemon threads
    # owned by zarr, not by the pipeline): leave them out so the count does not depend on order.
    return sum(not t.name.startswith(("zarr_io", "asyncio_")) for t in threading.enumerate())


@pytest.mark.timeout(60)
def test_end_to_end_equals_encoder_on_read_tiles(
    slide: Slide, grid: TileGrid, encoder: Encoder, reference: np.ndarray, tmp_path: Path
) -> None:
    assert 10 <= grid.n_tissue < len(grid)
    results = list(iter_embed(slide, encoder, grid, cache_root=tmp_path, batch_size=4))
    assert all(isinstance(r, BatchResult) for r in results) and len(results) == -(-grid.n_tissue // 4)
    idx = np.concatenate([r.indices for r in results])
    np.testing.assert_array_equal(idx, grid.tissue_indices)  # whole slide: row-major order
    emb = np.concatenate([r.embeddings for r in results])
    assert emb.dtype == np.float32
    np.testing.assert_allclose(emb, reference, rtol=1e-4, atol=1e-5)
    last = results[-1]
    assert last.n_done == last.n_total == last.n_computed == grid.n_tissue and last.tiles_per_s > 0
    assert [r.n_done for r in results] == sorted(r.n_done for r in results)
    with open_store(slide, encoder, grid, cache_root=tmp_path, mode="r") as store:
        done, rows = store.read_done()
        np.testing.assert_array_equal(done, grid.tissue_indices)
        np.testing.assert_allclose(rows, reference, rtol=2e-3, atol=1e-3)  # float16 on disk
        np.testing.assert_array_equal(store.coords, grid.coords)


@pytest.mark.timeout(60)
def test_a_token_sink_gets_each_batchs_tokens_from_the_pass_that_embeds_it(
    slide: Slide, grid: TileGrid, encoder: Encoder, reference: np.ndarray, tmp_path: Path
) -> None:
    from napari_virchow.models.tokens import embedding_from_tokens, encode_tokens

    got: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    results = list(iter_embed(slide, encoder, grid, cache_root=tmp_path, batch_size=4,
                              token_sink=lambda i, c, t: got.append((i.copy(), c, t))))  # fmt: skip
    assert [len(g[0]) for g in got] == [len(r.indices) for r in results]
    for (idx, cls, tok), r in zip(got, results, strict=True):
        np.testing.assert_array_equal(idx, r.indices)
        assert cls.shape == (len(idx), encoder.dim // 2) and tok.shape == (len(idx), 16, 16, encoder.dim // 2)
        np.testing.assert_allclose(embedding_from_tokens(cls, tok), r.embeddings, rtol=1e-5, atol=1e-6)
        want_cls, want_tok = encode_tokens(encoder, grid.read_tiles(idx))  # a pass of their own: the same
        np.testing.assert_allclose(tok, want_tok, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(cls, want_cls, rtol=1e-4, atol=1e-5)
    emb = np.concatenate([r.embeddings for r in results])
    np.testing.assert_allclose(emb, reference, rtol=1e-4, atol=1e-5)  # the embeddings do not change


def test_a_token_sink_needs_an_encoder_with_patch_tokens(slide: Slide, tmp_path: Path) -> None:
    from napari_virchow.errors import WeightsError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        vit = load_encoder("timm:vit_tiny_patch16_224", weights="random", device="cpu", dtype="fp32")
    vit_grid = TileGrid(slide, mpp=vit.spec.mpp, size=vit.spec.input_size)
    with pytest.raises(WeightsError, match="pools its own features"):
        next(iter_embed(slide, vit, vit_grid, cache_root=tmp_path, token_sink=lambda *a: None))
    with open_store(slide, vit, vit_grid, cache_root=tmp_path, mode="r") as store:
        assert len(store.missing(vit_grid.tissue_indices)) == vit_grid.n_tissue  # nothing was stored


@pytest.mark.timeout(60)
@pytest.mark.parametrize("readers", [0, 2])
def test_batches_report_feed_and_encoder_rates(
    slide: Slide, grid: TileGrid, encoder: Encoder, readers: int, tmp_path: Path
) -> None:
    results = list(iter_embed(slide, encoder, grid, cache_root=tmp_path, batch_size=4, readers=readers))
    for r in results:
        assert np.isfinite(r.feed_tiles_per_s) and r.feed_tiles_per_s > 0
        assert np.isfinite(r.encoder_tiles_per_s) and r.encoder_tiles_per_s > 0
    waits = [r.feed_wait_s for r in results]
    assert waits == sorted(waits) and waits[0] > 0  # cumulative; the first batch is always waited for
    assert waits[-1] <= results[-1].elapsed


def test_feed_stats_rates_count_tiles_per_busy_second() -> None:
    stats = FeedStats(readers=2)
    assert np.isnan(stats.feed_tiles_per_s) and np.isnan(stats.encoder_tiles_per_s)
    stats.add_read(8, 2.0)  # two readers busy 1 s each for 4 tiles: 4 tiles/s apiece, 8 together
    stats.add_read(8, 2.0)
    assert stats.feed_tiles_per_s == pytest.approx(8.0)
    stats.add_embed(8, 4.0)
    assert stats.encoder_tiles_per_s == pytest.approx(2.0)
    assert FeedStats(readers=0).readers == 1  # reading in the consumer: one "reader"


def test_host_stager_passes_tiles_through_off_cuda() -> None:
    tiles = np.zeros((2, 8, 8, 3), np.uint8)
    stager = HostStager("cpu")
    assert not stager.enabled and stager(tiles) is tiles
    tensor = torch.zeros((1, 8, 8, 3), dtype=torch.uint8)
    assert stager(tensor) is tensor


@pytest.fixture(scope="module")
def slide_40x(tmp_path_factory: pytest.TempPathFactory) -> Slide:
    """A 0.25 µm/px slide: its 0.5 µm/px tiles are read at 448 px and resampled to 224."""
    path = tmp_path_factory.mktemp("inference40") / "slide40.tif"
    regions = [Region((448, 448, 2240, 1792), "tissue"), Region((896, 896, 1344, 1344), "planted")]
    return Slide(write_pyramid(path, 2688, 2240, PlantedSource(regions), mpp=0.25, levels=2, downsample=4))


@pytest.mark.timeout(60)
def test_tiles_resampled_by_the_encoder_match_those_the_readers_resample(slide_40x: Slide, encoder: Encoder) -> None:
    # What iter_embed does on a GPU: readers send the 448-px tiles as read, the encoder resamples them
    grid = TileGrid(slide_40x)
    assert grid.resized and grid.read_size == 448
    idx = grid.tissue_indices[:6]
    batches = list(tile_batches(grid, [idx[:4], idx[4:]], 1, None, resize=False))
    assert [t.shape for _, t in batches] == [(4, 448, 448, 3), (2, 448, 448, 3)]
    embedder = Embedder(encoder, 4, resize_to=grid.size)
    on_device = np.concatenate([embedder(t) for _, t in batches])
    np.testing.assert_allclose(on_device, encoder.embed(grid.read_tiles(idx)), rtol=1e-5, atol=1e-6)
    assert resamples_on_device("cuda:1") and not resamples_on_device("cpu") and not resamples_on_device("mps")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.timeout(120)
def test_a_cuda_run_at_40x_resamples_on_the_gpu_like_the_cpu(slide_40x: Slide, encoder: Encoder,
                                                            tmp_path: Path) -> None:  # fmt: skip
    grid = TileGrid(slide_40x)
    cuda = copy.deepcopy(encoder)
    cuda = Encoder(cuda.spec, cuda.model.to("cuda"), device=torch.device("cuda"), dtype=None,
                   weights_id=cuda.weights_id, weights_source=cuda.weights_source)  # fmt: skip
    emb = np.concatenate([r.embeddings for r in iter_embed(slide_40x, cuda, grid, cache_root=tmp_path)])
    ref = encoder.embed(grid.read_tiles(grid.tissue_indices))
    cos = (emb * ref).sum(1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(ref, axis=1))
    assert float(cos.min()) > 0.999


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (pinned host memory)")
def test_host_stager_moves_tiles_through_pinned_buffers() -> None:
    rng = np.random.default_rng(0)
    stager = HostStager("cuda", slots=2)
    batches = [rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8) for n in (4, 3, 5, 4)]
    outs = [stager(b) for b in batches]
    torch.cuda.synchronize()
    for b, out in zip(batches, outs, strict=True):
        assert out.device.type == "cuda" and out.dtype == torch.uint8
        np.testing.assert_array_equal(out.cpu().numpy(), b)
    assert all(buf is not None and buf.is_pinned() for buf in stager._buffers)


@pytest.mark.timeout(60)
def test_each_yielded_batch_is_already_stored(slide: Slide, grid: TileGrid, encoder: Encoder, tmp_path: Path) -> None:
    with open_store(slide, encoder, grid, cache_root=tmp_path) as store:
        for r in iter_embed(slide, encoder, grid, store, batch_size=3):
            assert store.done[r.indices].all() and store.n_done == r.n_done


@pytest.mark.timeout(60)
def test_resume_skips_done_tiles(
    slide: Slide, grid: TileGrid, encoder: Encoder, reference: np.ndarray, tmp_path: Path
) -> None:
    counting = CountingEncoder(encoder)
    first = grid.tissue_indices[:5]
    list(iter_embed(slide, counting, grid, indices=first, cache_root=tmp_path, batch_size=8))
    assert counting.calls == [5]
    p = plan(slide, encoder, grid, cache_root=tmp_path, batch_size=4)
    assert (p.n_total, p.n_cached, p.n_todo, p.n_batches) == (grid.n_tissue, 5, grid.n_tissue - 5,
                                                              -(-(grid.n_tissue - 5) // 4))  # fmt: skip
    counting.calls.clear()
    results = list(iter_embed(slide, counting, grid, cache_root=tmp_path, batch_size=4))
    assert sum(counting.calls) == grid.n_tissue - 5
    computed = np.concatenate([r.indices for r in results])
    assert not set(computed.tolist()) & set(first.tolist())
    assert results[0].n_done == 5 + len(results[0].indices) and results[-1].n_done == grid.n_tissue
    counting.calls.clear()
    assert list(iter_embed(slide, counting, grid, cache_root=tmp_path)) == []  # revisit: nothing
    assert counting.calls == []
    assert plan(slide, encoder, grid, cache_root=tmp_path).n_todo == 0


@pytest.mark.timeout(60)
def test_bbox_request_is_centre_out(slide: Slide, grid: TileGrid, encoder: Encoder, tmp_path: Path) -> None:
    box = (500, 400, 1000, 900)
    results = list(iter_embed(slide, encoder, grid, bbox=box, cache_root=tmp_path, batch_size=3))
    np.testing.assert_array_equal(np.concatenate([r.indices for r in results]), grid.tiles_in(box))
    assert results[-1].n_total == len(grid.tiles_in(box))
    assert plan(slide, encoder, grid, cache_root=tmp_path).n_cached == len(grid.tiles_in(box))


@pytest.mark.timeout(60)
def test_cancel_between_batches_leaves_store_consistent(
    slide: Slide, grid: TileGrid, encoder: Encoder, reference: np.ndarray, tmp_path: Path
) -> None:
    cancel = threading.Event()
    seen = []
    for r in iter_embed(slide, encoder, grid, cache_root=tmp_path, batch_size=3, cancel=cancel):
        seen.append(r.indices)
        if len(seen) == 2:
            cancel.set()
    assert len(seen) == 2
    with open_store(slide, encoder, grid, cache_root=tmp_path, mode="r") as store:
        done, rows = store.read_done()
    np.testing.assert_array_equal(done, np.sort(np.concatenate(seen)))
    np.testing.assert_allclose(rows, _reference_rows(grid, reference, done), rtol=2e-3, atol=1e-3)


@pytest.mark.timeout(60)
def test_closing_the_generator_stops_pipeline_threads(
    slide: Slide, grid: TileGrid, encoder: Encoder, tmp_path: Path
) -> None:
    baseline = _thread_count()
    gen = iter_embed(slide, encoder, grid, cache_root=tmp_path, batch_size=2, readers=2)
    first = next(gen)
    assert len(first.indices) == 2 and len(_pipeline_threads()) >= 1
    gen.close()
    assert _pipeline_threads() == [] and _thread_count() == baseline
    with open_store(slide, encoder, grid, cache_root=tmp_path, mode="r") as store:
        assert store.n_done == 2  # prefetched batches were read, never half-stored


@pytest.mark.timeout(60)
def test_threaded_readers_give_the_same_embeddings(
    slide: Slide, grid: TileGrid, encoder: Encoder, reference: np.ndarray, tmp_path: Path
) -> None:
    results = list(iter_embed(slide, encoder, grid, cache_root=tmp_path, batch_size=4, readers=3))
    np.testing.assert_array_equal(np.concatenate([r.indices for r in results]), grid.tissue_indices)
    np.testing.assert_allclose(np.concatenate([r.embeddings for r in results]), reference, rtol=1e-4, atol=1e-5)
    assert _pipeline_threads() == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("readers", [0, 2])
def test_reader_exception_propagates_without_hang(
    slide: Slide, grid: TileGrid, encoder: Encoder, tmp_path: Path, readers: int
) -> None:
    bad = int(grid.tissue_indices[7])
    flaky = copy.copy(grid)
    read_tiles = grid.read_tiles

    def failing(indices: np.ndarray, **options: object) -> np.ndarray:
        if bad in np.asarray(indices).tolist():
            raise OSError(f"input/output error reading tile {bad} (injected)")
        return read_tiles(indices, **options)  # type: ignore[arg-type]

    flaky.read_tiles = failing  # type: ignore[method-assign]
    stored = []
    with pytest.raises(OSError, match="injected") as info:
        for r in iter_embed(slide, encoder, flaky, cache_root=tmp_path, batch_size=2, readers=readers):
            stored.extend(r.indices.tolist())
    assert any("while reading tiles" in note for note in getattr(info.value, "__notes__", ["while reading tiles"]))
    assert _pipeline_threads() == []
    assert stored == grid.tissue_indices[:6].tolist()  # batches before the failing one
    with open_store(slide, encoder, grid, cache_root=tmp_path, mode="r") as store:
        np.testing.assert_array_equal(store.read_done()[0], stored)


@pytest.mark.timeout(60)
def test_cuda_oom_halves_the_batch_and_finishes(
    slide: Slide, grid: TileGrid, encoder: Encoder, reference: np.ndarray, tmp_path: Path
) -> None:
    counting = CountingEncoder(encoder, oom_above=3)
    results = list(iter_embed(slide, counting, grid, cache_root=tmp_path, batch_size=8))
    assert counting.calls[:3] == [8, 4, 2]  # 8 and 4 fail, then batches of 2 for good
    assert max(counting.calls[2:]) <= 2
    assert all(len(r.indices) <= 8 for r in results) and results[0].indices.size == 8
    np.testing.assert_allclose(np.concatenate([r.embeddings for r in results]), reference, rtol=1e-4, atol=1e-5)


@pytest.mark.timeout(60)
def test_oom_with_one_tile_is_raised(slide: Slide, grid: TileGrid, encoder: Encoder, tmp_path: Path) -> None:
    with pytest.raises(torch.cuda.OutOfMemoryError):
        list(iter_embed(slide, CountingEncoder(encoder, oom_above=0), grid, cache_root=tmp_path, batch_size=2))


@pytest.mark.timeout(60)
def test_embed_slide_runs_to_the_end(slide: Slide, encoder: Encoder, grid: TileGrid, tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    with embed_slide(slide, encoder, cache_root=tmp_path, progress=False, threads=1) as store:
        np.testing.assert_array_equal(np.flatnonzero(store.done), grid.tissue_indices)
    assert torch.get_num_threads() == threads  # restored


@pytest.mark.timeout(60)
def test_no_tissue_requests_nothing(slide: Slide, grid: TileGrid, encoder: Encoder, tmp_path: Path) -> None:
    blank = grid.with_tissue(tissue_threshold=1.0)
    counting = CountingEncoder(encoder)
    assert list(iter_embed(slide, counting, blank, cache_root=tmp_path)) == [] and counting.calls == []
    assert plan(slide, encoder, blank, cache_root=tmp_path).n_total == 0


@pytest.mark.timeout(60)
def test_bad_requests(slide: Slide, grid: TileGrid, encoder: Encoder, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not both"):
        next(iter_embed(slide, encoder, grid, bbox=(0, 0, 1, 1), indices=[0], cache_root=tmp_path))
    with pytest.raises(IndexError):
        next(iter_embed(slide, encoder, grid, indices=[len(grid)], cache_root=tmp_path))
    other = TileGrid(slide, size=112)  # another lattice: the store of 224-px tiles does not fit it
    with open_store(slide, encoder, grid, cache_root=tmp_path) as store, pytest.raises(StoreError):
        next(iter_embed(slide, encoder, other, store))


@pytest.mark.timeout(60)
def test_plan_eta_from_a_measured_rate(slide: Slide, grid: TileGrid, encoder: Encoder, tmp_path: Path) -> None:
    rate = estimate_tiles_per_s(encoder, batch_size=2)
    p = plan(slide, encoder, grid, cache_root=tmp_path)
    assert rate > 0 and p.n_todo == grid.n_tissue and p.readers == 0 and p.device == "cpu"
    assert p.eta_s(rate) == pytest.approx(grid.n_tissue / rate)
    assert not any(tmp_path.iterdir())  # planning creates no store


def test_auto_settings_follow_the_device() -> None:
    assert resolve_readers("auto", "cpu") == 0
    cores = os.cpu_count() or 2
    assert resolve_readers("auto", torch.device("cuda")) == min(MAX_READERS, max(2, cores - 1))  # sized to the CPU
    assert resolve_readers(3, "cpu") == 3
    with pytest.raises(ValueError):
        resolve_readers(-1, "cpu")
    assert default_batch_size("cpu") == 8 and default_batch_size("cuda") == 32


CHILD = """
import sys, time, warnings
warnings.simplefilter("ignore")
from napari_virchow.models.encoder import load_encoder
from napari_virchow.inference import iter_embed
from napari_virchow.slides.slide import Slide
enc = load_encoder("virchow2-tiny", weights="random", device="cpu", dtype="fp32")
for r in iter_embed(Slide(sys.argv[1]), enc, cache_root=sys.argv[2], batch_size=2):
    print(r.n_done, flush=True)
    time.sleep(0.1)
"""


@pytest.mark.timeout(90)
def test_sigkill_mid_run_then_resume(
    slide: Slide, grid: TileGrid, encoder: Encoder, reference: np.ndarray, tmp_path: Path
) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(slide.path), str(tmp_path)],
                             stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip
    try:
        assert child.stdout is not None
        for _ in range(3):  # three batches stored, then a kill at an arbitrary point
            assert child.stdout.readline(), "child ended early"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    with open_store(slide, encoder, grid, cache_root=tmp_path, mode="r") as store:
        done, rows = store.read_done()
    assert 6 <= len(done) < grid.n_tissue
    np.testing.assert_allclose(rows, _reference_rows(grid, reference, done), rtol=2e-3, atol=1e-3)
    counting = CountingEncoder(encoder)
    list(iter_embed(slide, counting, grid, cache_root=tmp_path, batch_size=4))
    assert sum(counting.calls) == grid.n_tissue - len(done)
    with open_store(slide, encoder, grid, cache_root=tmp_path, mode="r") as store:
        done, rows = store.read_done()
    np.testing.assert_array_equal(done, grid.tissue_indices)
    np.testing.assert_allclose(rows, reference, rtol=2e-3, atol=1e-3)  # same as an uninterrupted run


@pytest.mark.timeout(120)
def test_another_mpp_override_gets_its_own_store(planted_slide: Path, encoder: Encoder, tmp_path: Path) -> None:
    # same file, other µm/px → another lattice: a separate store, not a "made by another encoder" refusal
    counts = []
    for mpp in (0.5, 0.25):
        with Slide(planted_slide, mpp=mpp) as s:
            grid = TileGrid(s, mpp=0.5, size=224)
            with open_store(s, encoder, grid, cache_root=tmp_path) as store:
                for _ in iter_embed(s, encoder, grid, store, indices=grid.tissue_indices[:2]):
                    pass
                counts.append((len(grid), store.n_done))
    assert counts[0][0] != counts[1][0] and [n for _, n in counts] == [2, 2]
    assert len([p for p in tmp_path.iterdir() if p.is_dir() and not p.name.startswith(".")]) == 2


@pytest.mark.timeout(60)
def test_no_thread_outlives_a_yield_on_cpu(slide: Slide, grid: TileGrid, encoder: Encoder, tmp_path: Path) -> None:
    # a consumer may abandon the generator without closing it (a Qt worker told to quit):
    # with in-thread reading nothing must be left running between batches
    gen = iter_embed(slide, encoder, grid, cache_root=tmp_path, batch_size=2, readers=0)
    next(gen)
    assert _pipeline_threads() == []
    gen.close()


@pytest.mark.timeout(60)
def test_keyboard_interrupt_while_a_batch_is_written_waits_for_the_writer(
    slide: Slide, grid: TileGrid, encoder: Encoder, tmp_path: Path
) -> None:
    """Ctrl-C lands while batch 2 is read and batch 1 is being written: the write ends before iter_embed does."""
    first_of_second = int(grid.tissue_indices[4])
    flaky = copy.copy(grid)
    read_tiles = grid.read_tiles

    def interrupted(indices: np.ndarray, **options: object) -> np.ndarray:
        if first_of_second in np.asarray(indices).tolist():
            raise KeyboardInterrupt
        return read_tiles(indices, **options)  # type: ignore[arg-type]

    flaky.read_tiles = interrupted  # type: ignore[method-assign]
    with open_store(slide, encoder, grid, cache_root=tmp_path) as store:
        real_write = store.write

        def slow_write(idx: np.ndarray, emb: np.ndarray) -> None:
            time.sleep(0.5)  # the fsyncs of a slow disk: still writing when the interrupt arrives
            real_write(idx, emb)

        store.write = slow_write  # type: ignore[method-assign]
        with pytest.raises(KeyboardInterrupt):
            for _ in iter_embed(slide, encoder, flaky, store, batch_size=4, readers=0):
                pass
        assert not [t for t in threading.enumerate() if t.name == "napari-virchow-writer" and t.is_alive()]
        np.testing.assert_array_equal(store.read_done()[0], np.sort(grid.tissue_indices[:4]))  # batch 1 kept
