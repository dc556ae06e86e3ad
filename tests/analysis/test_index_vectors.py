"""The IVF-PQ re-rank file: float16 rows beside the index, one checksum per row, rebuilt from the stores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_virchow.analysis.index import add_slides, build_index, load_index, rebuild_vectors, remove_slide
from napari_virchow.analysis.index_vectors import Vectors, VectorWriter
from napari_virchow.analysis.similarity import AnalysisError, l2_normalize
from tests.analysis.test_index_ivfpq import SIDE, _exact, flip_byte, make_slide

N = SIDE * SIDE


@pytest.fixture
def cohort(tmp_path: Path):
    archive, pattern = tmp_path / "archive", np.random.default_rng(9).normal(size=96) * 3
    cache = archive / "cache"
    entries = [make_slide(archive, cache, f"s{i}.svs", 10 + i, pattern, [5 + i, 300 + i]) for i in range(3)]
    return archive, cache, entries, pattern


def _row_of(index, hit) -> int:
    no = index._slide_no(str(hit.slide))
    return int(index.meta["slides"][no]["vec_start"]) + int(np.flatnonzero(index.tile_index[
        index.row_start[no] : index.row_start[no + 1]] == hit.index)[0])  # fmt: skip


def test_the_rerank_file_holds_the_store_rows_and_gives_exact_scores(cohort) -> None:
    archive, cache, entries, pattern = cohort
    build_index(entries, archive / "idx", encoder="e", kind="ivfpq", cache_root=cache)
    index = load_index(archive / "idx", mmap=True)
    where = index.vectors_path()
    assert where is not None and where.parent == (archive / "idx") and where.stat().st_size == 3 * N * 96 * 2
    rows = np.memmap(where, np.float16, "r", shape=(3 * N, 96))
    np.testing.assert_array_equal(rows[N : 2 * N], np.asarray(entries[1].embeddings[:]))  # the store's own rows
    exact = _exact(entries, l2_normalize(pattern[None])[0])
    hits = index.search(pattern, k=6, min_distance_tiles=0)
    assert sorted((Path(str(h.slide)).name, h.index) for h in hits) == sorted(
        (f"s{i}.svs", t) for i in range(3) for t in (5 + i, 300 + i))
    for h in hits:
        assert h.score == pytest.approx(exact[int(Path(str(h.slide)).stem[1:]) * N + h.index], abs=1e-5)
    assert index.damaged_rows == 0 and index.damage_report() is None


def test_a_flipped_byte_is_reported_and_the_row_read_from_its_store(cohort) -> None:
    archive, cache, entries, pattern = cohort
    build_index(entries, archive / "idx", encoder="e", kind="ivfpq", cache_root=cache)
    index = load_index(archive / "idx")
    good = index.search(pattern, k=6, min_distance_tiles=0)
    top = good[0]
    index.close()
    flip_byte(index.vectors_path(), _row_of(index, top))
    index = load_index(archive / "idx")
    again = index.search(pattern, k=6, min_distance_tiles=0)
    assert [(h.slide, h.index) for h in again] == [(h.slide, h.index) for h in good]
    assert [h.score for h in again] == pytest.approx([h.score for h in good], abs=1e-6)  # the store's row
    assert index.damaged_rows == 1
    report = index.damage_report()
    assert report and "checksum" in report and "--rebuild-vectors" in report and index.vectors_path().name in report
    # Rebuilt from the stores: a new file, the old one deleted on save, no damage left.
    old = index.vectors_path()
    assert rebuild_vectors(index) == 3 * N
    index.save(archive / "idx")
    assert not old.exists() and index.vectors_path().exists()
    index = load_index(archive / "idx")
    rebuilt = index.search(pattern, k=6, min_distance_tiles=0)
    assert [h.index for h in rebuilt] == [h.index for h in good]
    assert [h.score for h in rebuilt] == pytest.approx([h.score for h in good], abs=1e-6)
    assert index.damaged_rows == 0


def test_added_slides_are_appended_removed_ones_dropped_on_rebuild(cohort, tmp_path: Path) -> None:
    archive, cache, entries, pattern = cohort
    built = build_index(entries[:2], archive / "idx", encoder="e", kind="ivfpq", cache_root=cache)
    name = built.vectors_path().name
    add_slides(built, [entries[2]])
    built.save(archive / "idx")
    assert built.vectors_path().name == name and built.vectors_path().stat().st_size == 3 * N * 96 * 2
    index = load_index(archive / "idx")
    assert index.meta["slides"][2]["vec_start"] == 2 * N
    assert {Path(str(h.slide)).name for h in index.search(pattern, k=6, min_distance_tiles=0)} == {
        "s0.svs", "s1.svs", "s2.svs"}
    remove_slide(index, entries[0].path)
    rebuild_vectors(index)
    index.save(archive / "idx")
    index = load_index(archive / "idx")
    assert index.vectors_path().stat().st_size == 2 * N * 96 * 2 and index.meta["slides"][1]["vec_start"] == 0
    hits = index.search(pattern, k=4, min_distance_tiles=0)
    assert sorted((Path(str(h.slide)).name, h.index) for h in hits) == [
        ("s1.svs", 6), ("s1.svs", 301), ("s2.svs", 7), ("s2.svs", 302)]
    # Saved into another folder: the re-rank file goes with it.
    copy = index.save(tmp_path / "elsewhere")
    assert load_index(copy).vectors_path().parent == tmp_path / "elsewhere"


def test_a_missing_rerank_file_is_one_clear_error(cohort) -> None:
    archive, cache, entries, pattern = cohort
    build_index(entries, archive / "idx", encoder="e", kind="ivfpq", cache_root=cache)
    index = load_index(archive / "idx")
    index.vectors_path().unlink()
    with pytest.raises(Exception, match="--rebuild-vectors"):
        index.search(pattern, k=3)


def test_nprobe_and_rerank_overrides_and_manifest(cohort) -> None:
    archive, cache, entries, pattern = cohort
    index = build_index(entries, archive / "idx", encoder="e", kind="ivfpq", cache_root=cache)
    assert {"nlist", "nprobe", "rerank", "pq_m"} <= set(index.meta)
    wide = index.search(pattern, k=6, min_distance_tiles=0, nprobe=index.meta["nlist"], rerank=3 * N)
    exact = _exact(entries, l2_normalize(pattern[None])[0])
    assert [h.score for h in wide] == pytest.approx(np.sort(exact)[::-1][:6].tolist(), abs=1e-5)


def _file_with_rows(tmp_path: Path, n: int = 1500, dim: int = 8):
    rows = np.random.default_rng(3).normal(size=(n, dim)).astype(np.float16)
    writer = VectorWriter(tmp_path / "x.f16", dim)
    writer.append(rows[:700])
    writer.append(rows[700:])
    return tmp_path / "x.f16", rows, writer.close()


def test_rows_read_in_any_order_are_the_rows_written_each_verified(tmp_path: Path) -> None:
    path, rows, crcs = _file_with_rows(tmp_path)
    vectors = Vectors(path, 8, crcs)
    # Scattered rows, a run of consecutive ones longer than one preadv call takes, unsorted, repeated.
    want = np.concatenate([[1499, 3, 0, 42, 41], np.arange(100, 1300), [3]])
    got, ok = vectors.read(want)
    assert ok.all() and vectors.damaged == 0
    np.testing.assert_array_equal(got, rows[want])


def test_a_row_outside_the_file_or_cut_off_is_flagged_never_returned(tmp_path: Path) -> None:
    path, rows, crcs = _file_with_rows(tmp_path)
    vectors = Vectors(path, 8, crcs)
    got, ok = vectors.read(np.array([-1, 5, 1500]))  # e.g. a slide without a vec_start
    assert ok.tolist() == [False, True, False] and not got[[0, 2]].any()
    np.testing.assert_array_equal(got[1], rows[5])
    with open(path, "r+b") as fh:  # truncated after it was opened (another process rewrote it)
        fh.truncate(1000 * 8 * 2)
    got, ok = vectors.read(np.array([10, 999, 1000, 1400]))
    assert ok.tolist() == [True, True, False, False] and not got[2:].any()
    assert vectors.damaged == 2 + 2


def test_a_flipped_byte_in_a_row_read_is_detected(tmp_path: Path) -> None:
    path, rows, crcs = _file_with_rows(tmp_path)
    flip_byte(path, 701, dim=8)
    got, ok = Vectors(path, 8, crcs).read(np.arange(690, 710))  # one run of consecutive rows
    assert np.flatnonzero(~ok).tolist() == [11] and not got[11].any()
    np.testing.assert_array_equal(got[ok], rows[690:710][ok])
    # Scattered rows (750 runs, read by several threads), shuffled: the damaged one is still caught.
    want = np.random.default_rng(1).permutation(np.arange(1, 1500, 2))
    vectors = Vectors(path, 8, crcs)
    got, ok = vectors.read(want)
    assert want[~ok].tolist() == [701] and not got[~ok].any() and vectors.damaged == 1
    np.testing.assert_array_equal(got[ok], rows[want[ok]])


def test_an_older_manifest_loads_a_newer_one_is_one_clear_error(cohort) -> None:
    import json

    archive, cache, entries, pattern = cohort
    build_index(entries, archive / "idx", encoder="e", kind="ivfpq", cache_root=cache)
    meta_file = archive / "idx" / "INDEX.json"
    meta = json.loads(meta_file.read_text())
    assert meta["version"] == 3 and meta["pq_nbits"] == 8 and meta["pq_m"] * meta["pq_nbits"] // 8 == meta["pq_bytes"]
    good = load_index(archive / "idx").search(pattern, k=6, min_distance_tiles=0)
    # As written by 0.2 (format 2): no code size fields; it still loads and answers the same.
    old = {k: v for k, v in meta.items() if k not in ("pq_nbits", "pq_bytes", "train_n")} | {"version": 2}
    meta_file.write_text(json.dumps(old))
    again = load_index(archive / "idx").search(pattern, k=6, min_distance_tiles=0)
    assert [(h.slide, h.index, h.score) for h in again] == [(h.slide, h.index, h.score) for h in good]
    meta_file.write_text(json.dumps(meta | {"version": 99}))
    with pytest.raises(AnalysisError, match="newer napari-virchow.*format 99.*upgrade"):
        load_index(archive / "idx")
