"""IVF-PQ cohort index on real embedding stores: exact re-ranking, incremental add/remove, moved archives."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from napari_virchow.analysis.index import IndexEntry, add_slides, build_index, load_index, remove_slide
from napari_virchow.analysis.index_ivfpq import StoreRows
from napari_virchow.analysis.similarity import AnalysisError, l2_normalize
from napari_virchow.errors import VirchowError
from napari_virchow.slides.fingerprint import fingerprint
from napari_virchow.store.embeddings import EmbeddingStore
from napari_virchow.store.key import StoreKey

DIM = 96
TILE = 448
SIDE = 24  # 576 tiles per slide


def _grid() -> np.ndarray:
    i = np.arange(SIDE * SIDE)
    return np.stack([(i % SIDE) * TILE, (i // SIDE) * TILE], axis=1).astype(np.int64)


def make_slide(archive: Path, cache: Path, name: str, seed: int, pattern: np.ndarray, spots: list[int]) -> IndexEntry:
    """A slide file, and a real embedding store holding its (clustered) tile embeddings."""
    rng = np.random.default_rng(seed)
    slide = archive / "slides" / name
    slide.parent.mkdir(parents=True, exist_ok=True)
    slide.write_bytes(f"slide {name}".encode())
    centres = np.random.default_rng(0).normal(size=(8, DIM)) * 2
    emb = centres[rng.integers(0, 8, SIDE * SIDE)] + rng.normal(size=(SIDE * SIDE, DIM))
    emb[spots] = pattern + 0.2 * rng.normal(size=(len(spots), DIM))
    key = StoreKey(fingerprint(slide), "virchow2-tiny", "w-test", 0.5, 224)
    with EmbeddingStore.open(key, n_tiles=SIDE * SIDE, dim=DIM, root=cache, coords=_grid(),
                             tile_size_l0=TILE, slide_path=str(slide)) as store:  # fmt: skip
        store.write(np.arange(SIDE * SIDE), emb.astype(np.float16))
        where = store.path
    idx = np.arange(SIDE * SIDE)
    return IndexEntry(str(slide), fingerprint(slide), StoreRows(where, idx), _grid(), TILE, idx, str(where))


@pytest.fixture
def cohort(tmp_path: Path):
    archive, pattern = tmp_path / "archive", np.random.default_rng(9).normal(size=DIM) * 3
    cache = archive / "cache"
    entries = [make_slide(archive, cache, f"s{i}.svs", 10 + i, pattern, [5 + i, 300 + i]) for i in range(3)]
    return archive, cache, entries, pattern


def flip_byte(path: Path, row: int, dim: int = DIM) -> None:
    """Flip one byte inside float16 row ``row`` of a re-rank file."""
    with open(path, "r+b") as fh:
        fh.seek(row * dim * 2 + 7)
        b = fh.read(1)
        fh.seek(row * dim * 2 + 7)
        fh.write(bytes([b[0] ^ 0x5A]))


def _exact(entries: list[IndexEntry], q: np.ndarray) -> np.ndarray:
    return np.concatenate([l2_normalize(np.asarray(e.embeddings[:])) @ q for e in entries])


def test_ivfpq_scores_are_exact_cosines_from_the_stores(cohort) -> None:
    archive, cache, entries, pattern = cohort
    index = build_index(entries, archive / "idx", encoder="virchow2-tiny", weights_id="w-test", kind="ivfpq",
                        cache_root=cache, provenance={"mpp": 0.5, "tile_size": 224, "weights": "random"})  # fmt: skip
    loaded = load_index(archive / "idx", encoder="virchow2-tiny", mmap=True)
    assert loaded.kind == "ivfpq" and len(loaded) == 3 * SIDE * SIDE and loaded.meta["mpp"] == 0.5
    q = l2_normalize(pattern[None])[0]
    hits = loaded.search(pattern, k=6, min_distance_tiles=0)
    exact = _exact(entries, q)
    assert sorted({(Path(str(h.slide)).name, h.index) for h in hits}) == sorted(
        (f"s{i}.svs", t) for i in range(3) for t in (5 + i, 300 + i))
    for h in hits:  # the reported score is the exact cosine of the float16 row, not the PQ estimate
        s = int(Path(str(h.slide)).stem[1:])
        assert h.score == pytest.approx(exact[s * SIDE * SIDE + h.index], abs=1e-5)
    assert index.meta["slides"][0]["store"] and not Path(index.meta["slides"][0]["store"]).is_absolute()
    loaded.close()


def test_auto_kind_uses_ivfpq_past_the_flat_limit_when_stores_exist(cohort, monkeypatch) -> None:
    from napari_virchow.analysis import index as _index

    _, cache, entries, _ = cohort
    monkeypatch.setattr(_index, "AUTO_FLAT_MAX", 100)
    assert build_index(entries, None, encoder="e", cache_root=cache).kind == "ivfpq"


@pytest.mark.parametrize("kind", ["flat", "ivfpq"])
def test_add_and_remove_slides_without_rebuilding(cohort, kind: str) -> None:
    archive, cache, entries, pattern = cohort
    built = build_index(entries[:2], archive / "idx", encoder="e", kind=kind, cache_root=cache)
    trained = built.index.quantizer.ntotal if kind == "ivfpq" else None
    assert add_slides(built, [entries[2]]) == []
    assert add_slides(built, [entries[0]]) == [entries[0].path]  # already indexed: skipped
    assert len(built) == 3 * SIDE * SIDE
    if kind == "ivfpq":
        assert built.index.quantizer.ntotal == trained  # the same trained quantizer, no retraining
    built.save(archive / "idx")
    index = load_index(archive / "idx")
    assert {Path(str(h.slide)).name for h in index.search(pattern, k=6, min_distance_tiles=0)} == {"s0.svs", "s1.svs",
                                                                                                "s2.svs"}  # fmt: skip
    assert remove_slide(index, entries[1].path) == SIDE * SIDE
    index.save(archive / "idx")
    index = load_index(archive / "idx")
    hits = index.search(pattern, k=4, min_distance_tiles=0)
    assert len(index) == 2 * SIDE * SIDE and {Path(str(h.slide)).name for h in hits} == {"s0.svs", "s2.svs"}
    s2 = [h for h in hits if str(h.slide).endswith("s2.svs")]
    assert sorted(h.index for h in s2) == [7, 302]  # rows of slides after the removed one still map right
    with pytest.raises(AnalysisError, match="not in the index"):
        remove_slide(index, entries[1].path)


def test_hnsw_cannot_remove(cohort) -> None:
    _, cache, entries, _ = cohort
    index = build_index(entries, None, encoder="e", kind="hnsw", cache_root=cache)
    with pytest.raises(AnalysisError, match="rebuild"):
        remove_slide(index, entries[0].path)


def test_a_moved_archive_is_found_beside_the_index_or_under_a_new_root(cohort, tmp_path: Path) -> None:
    archive, cache, entries, pattern = cohort
    build_index(entries, archive / "idx", encoder="e", kind="ivfpq", cache_root=cache)
    moved = tmp_path / "moved"
    shutil.move(archive, moved)  # the whole archive: found from the index's own location
    index = load_index(moved / "idx")
    hits = index.search(pattern, k=3, min_distance_tiles=0)
    assert all(h.exists and str(h.slide).startswith(str(moved.resolve())) for h in hits)
    assert index.check_slides() is None and index.cache_root == (moved / "cache").resolve()
    index.close()
    # The index alone copied elsewhere: the slides and the cache are found under --root.
    shutil.copytree(moved / "idx", tmp_path / "lone-idx")
    lone = load_index(tmp_path / "lone-idx", root=moved / "slides", cache_root=moved / "cache")
    assert str(lone.search(pattern, k=1)[0].slide).startswith(str((moved / "slides").resolve()))
    # Without the stores, the re-rank file copied with the index still gives exact scores ...
    lost = load_index(tmp_path / "lone-idx", cache_root=tmp_path / "nowhere")
    shutil.rmtree(moved / "slides")
    assert lost.search(pattern, k=1)[0].score > 0.9
    lost.close()
    # ... but a row failing its checksum must come from its store, which is not there: one clear error.
    flip_byte(lost.vectors_path(), 0)
    lost = load_index(tmp_path / "lone-idx", cache_root=tmp_path / "nowhere")
    with pytest.raises(AnalysisError, match="--cache"):
        lost.search(pattern, k=3 * SIDE * SIDE, min_distance_tiles=0, rerank=3 * SIDE * SIDE)


def test_a_changed_slide_is_reported_and_its_hits_left_out(cohort) -> None:
    archive, cache, entries, pattern = cohort
    build_index(entries, archive / "idx", encoder="e", kind="ivfpq", cache_root=cache)
    Path(entries[0].path).write_bytes(b"another scan under the same name")
    index = load_index(archive / "idx")
    message = index.check_slides()
    assert message and "1 of 3 slides" in message and "s0.svs" in message and "changed" in message
    hits = index.search(pattern, k=4, min_distance_tiles=0)
    assert len(hits) == 4 and not any(str(h.slide).endswith("s0.svs") for h in hits)


def test_a_damaged_store_is_an_error_not_zeros(cohort) -> None:
    archive, cache, entries, pattern = cohort
    index = build_index(entries, None, encoder="e", kind="ivfpq", cache_root=cache)
    for chunk in (Path(str(entries[1].store)) / "embeddings" / "c").rglob("*"):
        if chunk.is_file():
            chunk.write_bytes(b"\0" * 16)
    with pytest.raises(VirchowError):
        for _ in range(3):
            index.search(pattern, k=6, min_distance_tiles=0)
            index.close()


@pytest.mark.timeout(120)
def test_shards_filled_on_a_dask_cluster_merge_into_the_same_index(cohort) -> None:
    from distributed import Client, LocalCluster

    _, cache, entries, pattern = cohort
    local = build_index(entries, None, encoder="e", kind="ivfpq", cache_root=cache)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster, \
            Client(cluster, set_as_default=False) as client:  # fmt: skip
        sharded = build_index(entries, None, encoder="e", kind="ivfpq", cache_root=cache, client=client)
    assert len(sharded) == len(local) == 3 * SIDE * SIDE
    got = [(h.slide, h.index, round(h.score, 5)) for h in sharded.search(pattern, k=6, min_distance_tiles=0)]
    want = [(h.slide, h.index, round(h.score, 5)) for h in local.search(pattern, k=6, min_distance_tiles=0)]
    assert got == want
