"""SlideSession as the one application object: lifetime, shared slides and encoders, read-only reads.

Real slides (the planted TIFF), the tiny random Virchow 2 and real zarr stores throughout.
"""

from __future__ import annotations

import os
import pickle
import threading
from pathlib import Path

import numpy as np
import pytest

from napari_virchow import jobs as _jobs
from napari_virchow.analysis.head_files import load_head, save_head
from napari_virchow.analysis.heads import fit_head
from napari_virchow.config import SessionConfig
from napari_virchow.errors import VirchowError
from napari_virchow.session import SlideSession
from napari_virchow.slides.slide import Slide
from napari_virchow.store.cache import lattice_fingerprint, list_stores, slide_fingerprint_of
from tests.conftest import PLANTED_PATTERNS, PLANTED_SIZE

pytestmark = pytest.mark.filterwarnings("ignore:.*random weights:UserWarning")

WHOLE = (0, 0, PLANTED_SIZE, PLANTED_SIZE)


def _config(cache: Path, **kw: object) -> SessionConfig:
    return SessionConfig(encoder="virchow2-tiny", weights="random", device="cpu", dtype="fp32", batch_size=8,
                         cache_root=cache, **kw)  # type: ignore[arg-type]  # fmt: skip


@pytest.fixture(scope="module")
def embedded_cache(planted_slide: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("session-cache")
    with SlideSession(planted_slide, _config(cache)) as session:
        list(session.compute())
    return cache


def test_config_is_picklable_and_hashable(tmp_path: Path) -> None:
    config = _config(tmp_path, mpp_override=0.25)
    assert pickle.loads(pickle.dumps(config)) == config  # sent to dask workers as is
    assert {config: 1}[_config(tmp_path, mpp_override=0.25)] == 1  # the widget keys sessions by it


def test_context_manager_closes_once_and_owns_what_it_opened(planted_slide: Path, tmp_path: Path) -> None:
    with SlideSession(planted_slide, _config(tmp_path)) as session:
        assert session.owns_slide
        session.store()
    session.close()  # idempotent
    with pytest.raises(VirchowError, match="closed"):
        session.store()


def test_a_shared_slide_stays_open(planted_slide: Path, tmp_path: Path) -> None:
    with Slide(planted_slide) as slide:
        with SlideSession(slide, _config(tmp_path)) as session:
            assert not session.owns_slide
            assert len(session.tiles_in(WHOLE))
        assert slide.read_region((0, 0), 0, (8, 8)).shape == (8, 8, 3)  # still usable: not closed by the session


def test_shared_slide_with_another_override_is_refused(planted_slide: Path, tmp_path: Path) -> None:
    with Slide(planted_slide) as slide, pytest.raises(ValueError, match="mpp=0.25"):
        SlideSession(slide, _config(tmp_path, mpp_override=0.25))


def test_one_encoder_per_process(planted_slide: Path, tmp_path: Path) -> None:
    with SlideSession(planted_slide, _config(tmp_path)) as a, SlideSession(planted_slide, _config(tmp_path)) as b:
        assert a.encoder() is b.encoder()


def test_tissue_threshold_regression(planted_slide: Path, tmp_path: Path) -> None:
    # was: TileGrid.with_tissue(threshold) positionally against a keyword-only signature -> TypeError
    with SlideSession(planted_slide, _config(tmp_path)) as session:
        before = session.grid.n_tissue
        grid = session.set_tissue_threshold(0.99)  # above any tissue saturation: (almost) nothing is tissue
        assert grid is session.grid and grid.n_tissue < before
        assert session.config.tissue_threshold == 0.99
        assert session.set_tissue_threshold(None).n_tissue == before


def test_reading_a_complete_cache_opens_it_read_only(planted_slide: Path, embedded_cache: Path) -> None:
    with SlideSession(planted_slide, _config(embedded_cache)) as session:
        idx, emb = session.embedded(tissue_only=True)
        assert len(idx) == session.grid.n_tissue and emb.shape == (len(idx), 96)
        assert list(session.compute()) == []  # nothing to do: never reopened for writing
        assert session.store("r").mode == "r"


def test_missing_does_not_create_a_store(planted_slide: Path, tmp_path: Path) -> None:
    with SlideSession(planted_slide, _config(tmp_path)) as session:
        tiles = session.tiles_in(WHOLE)
        np.testing.assert_array_equal(session.missing(tiles), tiles)
        assert session.plan(indices=tiles).n_todo == len(tiles)
        assert list_stores(tmp_path) == []


def test_store_key_lattice_suffix_round_trips(planted_slide: Path, tmp_path: Path) -> None:
    with SlideSession(planted_slide, _config(tmp_path)) as session:
        key = session.store_key()
        assert key.slide_fingerprint == lattice_fingerprint(session.slide.fingerprint, session.grid.tile_size_l0)
        assert slide_fingerprint_of(key.slide_fingerprint) == session.slide.fingerprint


def test_weights_id_known_spares_the_encoder(planted_slide: Path, embedded_cache: Path) -> None:
    with SlideSession(planted_slide, _config(embedded_cache)) as loaded:
        weights_id = loaded.weights_id
    with SlideSession(planted_slide, _config(embedded_cache), weights_id=weights_id) as session:
        assert len(session.embedded()[0]) and not session.encoder_loaded


def test_cancelled_clustering_keeps_the_previous_clusters(planted_slide: Path, embedded_cache: Path) -> None:
    with SlideSession(planted_slide, _config(embedded_cache)) as session:
        first = session.set_clusters(3)
        cancel = threading.Event()
        events = []
        for ev in _jobs.cluster_job(session, 5, cancel=cancel):
            events.append(ev)
            if isinstance(ev, _jobs.Stage) and "clustering" in ev.message:
                cancel.set()
        assert not [e for e in events if isinstance(e, _jobs.Clustered)]
        assert session.cluster_model is first.model and session.cluster_counts() == first.counts


def test_heatmap_and_query_through_the_session(planted_slide: Path, embedded_cache: Path) -> None:
    with SlideSession(planted_slide, _config(embedded_cache)) as session:
        x0, y0, x1, y1 = PLANTED_PATTERNS[0].box
        query = session.query_indices((x0 + x1) / 2, (y0 + y1) / 2)
        session.set_query(query)
        hits = session.hits(3)
        assert hits and all(h.slide == session.slide_path for h in hits)
        assert query[0] not in [h.index for h in hits]
        idx, emb = session.embedded(tissue_only=True)
        labels = np.where(np.isin(idx, session.tiles_in(PLANTED_PATTERNS[0].box)), "tumour", "normal")
        head = fit_head(emb, labels, encoder="virchow2-tiny", weights_id=session.weights_id, cv=2)
        values = session.set_head(head)
        raster = session.heatmap()
        assert raster is not None and np.nanmax(raster.data) <= 1 and np.isnan(values).sum() < len(values)
        with pytest.raises(VirchowError, match="not a number"):
            session.query_indices(float("nan"), 10)


def test_cv_metrics_are_typed_properties(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    emb = np.concatenate([rng.normal(0, 1, (20, 8)), rng.normal(3, 1, (20, 8))]).astype(np.float32)
    labels = np.array(["a"] * 20 + ["b"] * 20)
    head = fit_head(emb, labels, encoder="virchow2-tiny", cv=3)
    assert head.cv_auc == head.metrics["cv_roc_auc"] and 0.9 < head.cv_auc <= 1.0  # what the widget shows
    assert head.cv_accuracy == head.metrics["cv_accuracy"]
    again = load_head(save_head(head, tmp_path / "h.json"))
    assert again.cv_auc == head.cv_auc
    few = fit_head(emb[18:22], labels[18:22], encoder="virchow2-tiny", cv=1)  # no cross-validation asked
    assert few.cv_auc is None and few.cv_accuracy is None  # too few to cross-validate


def _decoded_by_batch_decoder(session: SlideSession) -> bool | None:
    from napari_virchow.slides.batch_read import segment_cache

    return segment_cache(session.slide._tiff.levels[session.grid.read_level]).decoder_ok


@pytest.mark.timeout(120)
def test_decode_device_reaches_the_pipeline_and_keeps_the_embeddings(sample_pyramid: Path, tmp_path: Path) -> None:
    """config.decode_device sends JPEG tiles through the batch decoder (nvJPEG on a GPU;
    the same API on the CPU here): same embeddings as imagecodecs' decode (#16)."""
    import torch

    runs = {}
    for name in ("cpu", None, "auto"):
        with SlideSession(sample_pyramid, _config(tmp_path / str(name), decode_device=name)) as session:
            idx = session.grid.tissue_indices[:12]
            assert session.decode_device == ("cuda" if name == "auto" and torch.cuda.is_available() else
                                             None if name != "cpu" else "cpu")  # fmt: skip
            runs[name] = np.concatenate([b.embeddings for b in session.compute(indices=idx)])
            used = _decoded_by_batch_decoder(session)
            assert used is (True if session.decode_device else None)  # verified against imagecodecs, then used
    # libjpeg-turbo both ways on the CPU: the same pixels, so the same embeddings
    np.testing.assert_array_equal(runs["cpu"], runs[None])
    if not torch.cuda.is_available():
        np.testing.assert_array_equal(runs["auto"], runs[None])  # auto is the CPU decode without CUDA
        gpu = _config(tmp_path / "gpu", decode_device="cuda")
        with SlideSession(sample_pyramid, gpu) as session, pytest.raises(VirchowError, match="device .cuda.*CUDA"):
            list(session.compute(indices=session.grid.tissue_indices[:2]))


@pytest.mark.timeout(240)
@pytest.mark.skipif(os.environ.get("NAPARI_VIRCHOW_SKIP_COMPILE") == "1", reason="NAPARI_VIRCHOW_SKIP_COMPILE=1")
def test_compile_reaches_the_encoder_and_keeps_the_embeddings(sample_pyramid: Path, tmp_path: Path) -> None:
    """config.compile (``--compile``) runs the session's encoder through torch.compile (#16)."""
    from napari_virchow.cli.app import build_parser
    from napari_virchow.cli.options import config_from_args

    args = build_parser().parse_args(["embed", str(sample_pyramid), "--compile", "--encoder", "virchow2-tiny"])
    assert config_from_args(args).compile and not config_from_args(build_parser().parse_args(
        ["embed", str(sample_pyramid)])).compile  # fmt: skip
    runs = {}
    for compiled in (False, True):
        with SlideSession(sample_pyramid, _config(tmp_path / str(compiled), compile=compiled)) as session:
            assert session.encoder().compiled is compiled
            runs[compiled] = np.concatenate([b.embeddings for b in session.compute(
                indices=session.grid.tissue_indices[:8])])  # fmt: skip
    np.testing.assert_allclose(runs[True], runs[False], rtol=1e-3, atol=1e-3)
