from __future__ import annotations

import json

import numpy as np
import pytest

from napari_virchow.analysis import index as _search_index
from napari_virchow.analysis.clusters import fit_clusters, pca_rgb
from napari_virchow.analysis.index import IndexEntry, build_index, load_index
from napari_virchow.analysis.similarity import AnalysisError, cosine_similarity, top_k_hits
from napari_virchow.errors import VirchowError
from napari_virchow.slides.fingerprint import fingerprint

DIM = 96
TILE = 448


def grid(side: int, tile: int = TILE) -> np.ndarray:
    i = np.arange(side * side)
    return np.stack([(i % side) * tile, (i // side) * tile], axis=1).astype(np.int64)


def clustered(n: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, DIM)) * 3
    truth = rng.integers(0, k, n)
    return (centres[truth] + rng.normal(size=(n, DIM))).astype(np.float16), truth


def planted_slide(side: int, spots: list[tuple[int, int]], pattern: np.ndarray, seed: int):
    """Random tiles with ``pattern`` (+ noise) planted at the given (col, row) tiles."""
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(side * side, DIM)).astype(np.float32)
    rows = [r * side + c for c, r in spots]
    emb[rows] = pattern + 0.3 * rng.normal(size=(len(rows), DIM))
    return emb.astype(np.float16), rows


def test_clusters_recover_planted_groups() -> None:
    from sklearn.metrics import adjusted_rand_score

    x, truth = clustered(600, 4)
    model = fit_clusters(x, k=4)
    labels = model.predict(x)
    assert set(labels.tolist()) == {1, 2, 3, 4}
    assert adjusted_rand_score(truth, labels) > 0.95
    assert model.counts.sum() == 600 and list(model.counts) == sorted(model.counts, reverse=True)


def test_cluster_labels_stable_when_more_tiles_arrive() -> None:
    x, _ = clustered(800, 5, seed=1)
    model = fit_clusters(x[:300], k=5, sample=200)
    early = model.predict(x[:300])
    np.testing.assert_array_equal(model.predict(x)[:300], early)


def test_more_clusters_than_tiles_is_a_clear_error() -> None:
    x, _ = clustered(5, 2)
    with pytest.raises(AnalysisError, match="cannot make 8 clusters from 5 computed tiles"):
        fit_clusters(x, k=8)


def test_pca_rgb_colours_groups_apart_and_stays_stable() -> None:
    x, truth = clustered(300, 2, seed=2)
    rgb = pca_rgb(x, fit_on=np.arange(200))
    assert rgb.shape == (300, 3) and rgb.dtype == np.uint8
    mean0, mean1 = rgb[truth == 0].mean(axis=0), rgb[truth == 1].mean(axis=0)
    assert np.abs(mean0 - mean1).max() > 100
    np.testing.assert_array_equal(pca_rgb(x[:50], fit_on=x[:200]), rgb[:50])


def test_cosine_similarity_matches_definition_and_averages_queries() -> None:
    x, _ = clustered(50, 3, seed=3)
    xf = x.astype(np.float64)
    s = cosine_similarity(x[7], x)
    ref = xf @ xf[7] / np.linalg.norm(xf, axis=1) / np.linalg.norm(xf[7])
    assert s.dtype == np.float32
    np.testing.assert_allclose(s, ref, atol=1e-5)
    two = cosine_similarity(x[[1, 2]], x)
    q = xf[1] / np.linalg.norm(xf[1]) + xf[2] / np.linalg.norm(xf[2])
    np.testing.assert_allclose(two, xf @ q / np.linalg.norm(xf, axis=1) / np.linalg.norm(q),
                               atol=1e-5)


def test_zero_embedding_gives_zero_similarity_not_nan() -> None:
    x = np.zeros((3, DIM), np.float16)
    x[1, 0] = 1
    assert np.isfinite(cosine_similarity(x[1], x)).all()


def test_top_k_finds_planted_copies_as_distinct_regions() -> None:
    side, pattern = 30, np.random.default_rng(9).normal(size=DIM)
    # Each copy covers a 2 × 2 block: suppression must report one hit per block.
    corners = [(2, 2), (20, 3), (5, 25), (15, 15), (26, 26), (24, 10)]
    spots = [(c + dc, r + dr) for c, r in corners for dc in (0, 1) for dr in (0, 1)]
    emb, rows = planted_slide(side, spots, pattern, seed=4)
    coords = grid(side)
    query_rows = rows[:4]  # the first block is the query region
    scores = cosine_similarity(emb[query_rows], emb)
    hits = top_k_hits(scores, coords, TILE, k=5, min_distance_tiles=2, exclude=query_rows)
    found = {(h.x // TILE, h.y // TILE) for h in hits}
    blocks = {c: {(c[0] + a, c[1] + b) for a in (0, 1) for b in (0, 1)} for c in corners[1:]}
    recall = np.mean([bool(found & cells) for cells in blocks.values()])
    assert recall >= 0.9
    for i, a in enumerate(hits):
        for b in hits[i + 1 :]:
            assert max(abs(a.x - b.x), abs(a.y - b.y)) > 2 * TILE


def test_top_k_without_suppression_returns_neighbours() -> None:
    scores = np.array([1.0, 0.9, 0.8, 0.1])
    coords = grid(2)
    hits = top_k_hits(scores, coords, TILE, k=3, min_distance_tiles=0)
    assert [h.index for h in hits] == [0, 1, 2]


def test_top_k_skips_nan_and_returns_what_exists() -> None:
    scores = np.array([np.nan, 0.5, 0.7, np.nan])
    hits = top_k_hits(scores, grid(2, tile=10_000), 10, k=20)
    assert [h.index for h in hits] == [2, 1]


@pytest.fixture
def two_slides(tmp_path):
    pattern = np.random.default_rng(5).normal(size=DIM)
    a, rows_a = planted_slide(12, [(3, 3)], pattern, seed=6)
    b, rows_b = planted_slide(12, [(9, 2), (2, 10)], pattern, seed=7)
    files = []
    for name in ("a.svs", "b.svs"):
        files.append(tmp_path / name)
        files[-1].write_bytes(b"slide")
    files[1].write_bytes(b"another slide")
    entries = [IndexEntry(str(files[0]), fingerprint(files[0]), a, grid(12), TILE),
               IndexEntry(str(files[1]), fingerprint(files[1]), b, grid(12), TILE)]
    return entries, a[rows_a[0]], files


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_index_finds_pattern_in_other_slide(two_slides, tmp_path, kind: str) -> None:
    entries, query, files = two_slides
    build_index(entries, tmp_path / "idx", encoder="virchow2", weights_id="w1", kind=kind)
    index = load_index(tmp_path / "idx", encoder="virchow2")
    assert index.kind == kind and len(index) == 288
    hits = index.search(query, k=2, exclude_slide=fingerprint(files[0]))
    assert {(h.x // TILE, h.y // TILE) for h in hits} == {(9, 2), (2, 10)}
    assert all(h.slide == str(files[1].resolve()) and h.exists for h in hits)


def test_index_auto_kind_follows_threshold(two_slides, monkeypatch) -> None:
    entries, _, _ = two_slides
    assert build_index(entries, None, encoder="e").kind == "flat"
    monkeypatch.setattr(_search_index, "AUTO_FLAT_MAX", 100)
    assert build_index(entries, None, encoder="e").kind == "hnsw"


def test_index_suppresses_neighbours_per_slide(two_slides) -> None:
    entries, query, _ = two_slides
    hits = build_index(entries, None, encoder="e").search(query, k=10, min_distance_tiles=3)
    for i, a in enumerate(hits):
        for b in hits[i + 1 :]:
            if a.slide == b.slide:
                assert max(abs(a.x - b.x), abs(a.y - b.y)) > 3 * TILE


def test_index_for_another_encoder_is_refused(two_slides, tmp_path) -> None:
    entries, _, _ = two_slides
    build_index(entries, tmp_path / "idx", encoder="virchow2")
    with pytest.raises(AnalysisError, match="INDEX.faiss.*'virchow2'.*'virchow'"):
        load_index(tmp_path / "idx", encoder="virchow")


def test_index_sidecar_is_json_and_npz_without_pickle(two_slides, tmp_path) -> None:
    entries, _, _ = two_slides
    build_index(entries, tmp_path / "cohort.faiss", encoder="virchow2", weights_id="w1")
    meta = json.loads((tmp_path / "cohort.json").read_text())
    assert (meta["encoder"], meta["weights_id"], meta["dim"], meta["kind"]) == (
        "virchow2", "w1", DIM, "flat")
    assert [s["fingerprint"] for s in meta["slides"]] == [e.fingerprint for e in entries]
    assert [s["rel_index"] for s in meta["slides"]] == ["a.svs", "b.svs"]
    with np.load(tmp_path / "cohort.npz", allow_pickle=False) as z:
        assert z["coords"].shape == (288, 2)


def test_moved_slide_hits_flagged_and_reported(two_slides, tmp_path) -> None:
    entries, query, files = two_slides
    index = build_index(entries, tmp_path / "idx", encoder="e")
    files[1].rename(tmp_path / "moved.svs")
    hits = index.search(query, k=3)
    assert any(not h.exists for h in hits) and any(h.exists for h in hits)
    assert index.missing_slides() == [str(files[1].resolve())]
    assert "1 of 2 slides" in index.check_slides() and "b.svs" in index.check_slides()


def test_corrupt_index_names_the_file(two_slides, tmp_path) -> None:
    entries, _, _ = two_slides
    build_index(entries, tmp_path / "idx", encoder="e")
    (tmp_path / "idx" / "INDEX.faiss").write_bytes(b"not faiss")
    with pytest.raises(VirchowError, match="INDEX.faiss"):
        load_index(tmp_path / "idx")


def test_index_save_and_load_never_touch_pickle(two_slides, tmp_path, monkeypatch) -> None:
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used")

    for name in ("load", "loads", "dump", "dumps", "Unpickler", "Pickler"):
        monkeypatch.setattr(pickle, name, refuse)
    entries, query, _ = two_slides
    build_index(entries, tmp_path / "idx", encoder="e")
    assert load_index(tmp_path / "idx", encoder="e").search(query, k=1)
