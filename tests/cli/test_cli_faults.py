"""Fault-injection table for the command line (issue 13, items 5-9): one row per fault.

Each row provokes a real fault on small files (a full tmpfs, a read-only mount, a damaged store,
bad numbers) and asserts the outcome: the correct data, or one clear error line, with nothing
wrong written and nothing lost. The other slides of a cohort always go on.
"""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest

from napari_virchow.cli import app as cli
from napari_virchow.config import SessionConfig
from napari_virchow.io.geojson import Annotation, write_annotations
from napari_virchow.session import SlideSession
from napari_virchow.slides.synthetic import PlantedSource, Region, write_pyramid
from napari_virchow.store.cache import list_stores
from tests.cli.conftest import fill, remount_read_only, tmpfs
from tests.conftest import PLANTED_PATTERNS

pytestmark = pytest.mark.filterwarnings("ignore:.*random weights:UserWarning")

TINY = ["--encoder", "virchow2-tiny", "--weights", "random", "--no-progress"]
CONFIG = SessionConfig(encoder="virchow2-tiny", weights="random", device="cpu")


@dataclass(frozen=True)
class World:
    big: Path  # the planted slide: 81 tissue tiles, its features do not fit in 24 kB
    small: Path  # 9 tissue tiles: its features do
    blank: Path  # no tissue at all
    fresh: Path  # never embedded
    cache: Path  # big and small embedded, complete


@dataclass(frozen=True)
class Result:
    rc: int
    out: str
    err: str
    where: Path  # the row's scratch folder (outputs)

    @property
    def errors(self) -> list[str]:
        assert "Traceback" not in self.err and "please report it" not in self.err, self.err
        return [line for line in self.err.splitlines() if ": error: " in line]


def _square(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], float)


@pytest.fixture(scope="module")
def world(planted_slide: Path, tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("faults")
    regions = [Region((224, 224, 896, 896)), Region((448, 448, 672, 672), "planted")]
    small = write_pyramid(root / "small.tif", 1120, 1120, PlantedSource(regions, seed=2), mpp=0.5, levels=2)
    blank = write_pyramid(root / "blank.tif", 1120, 1120, PlantedSource([]), mpp=0.5, levels=2)
    fresh = write_pyramid(root / "fresh.tif", 896, 896, PlantedSource([Region((0, 0, 896, 896))], seed=5),
                          mpp=0.5, levels=2)  # fmt: skip
    cache = root / "cache"
    assert cli.main(["embed", str(planted_slide), str(small), *TINY, "--cache", str(cache)]) == 0
    return World(planted_slide, small, blank, fresh, cache)


def _stored(slide: Path, cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """(tissue tile indices, embeddings) as the cache holds them: the reference outputs must match."""
    with SlideSession(slide, SessionConfig(**{**CONFIG.__dict__, "cache_root": cache})) as session:
        return session.embedded(tissue_only=True)


def _h5_matches(path: Path, slide: Path, cache: Path) -> None:
    idx, emb = _stored(slide, cache)
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["features"][:], emb)
        assert len(f["coords"]) == len(idx)


def _no_temp_files(folder: Path) -> None:
    assert not [p for p in folder.rglob(".*.tmp")], list(folder.rglob("*"))


def _copy_cache(world: World, where: Path) -> Path:
    import shutil

    return Path(shutil.copytree(world.cache, where / "cache"))


# --- rows ------------------------------------------------------------------------------------------

Argv = Callable[[World, Path, contextlib.ExitStack], list[object]]
Check = Callable[[World, Result], None]


def _export_full_disk(w: World, where: Path, stack: contextlib.ExitStack) -> list[object]:
    out = stack.enter_context(tmpfs(where / "out", "600k"))
    fill(out, 24 * 1024)
    return ["export", w.big, w.small, *TINY, "--cache", w.cache, "--out", out]


def _check_export_full_disk(w: World, r: Result) -> None:
    out = r.where / "out"
    assert r.rc == 1 and len(r.errors) == 1
    assert w.big.name in r.errors[0] and "disk full" in r.errors[0] and "nothing was written" in r.errors[0]
    assert not (out / f"{w.big.stem}.h5").exists()
    _h5_matches(out / f"{w.small.stem}.h5", w.small, w.cache)  # the slide that fits is written, correct
    _no_temp_files(out)
    assert f"1 of 2 slides done, 1 failed: {w.big.name}" in r.out


def _damaged_cache(w: World, where: Path) -> Path:
    """A copy of the cache whose store of the small slide has its embedding chunks cut short."""
    cache = _copy_cache(w, where)
    store = next(p for p in cache.iterdir() if p.name.startswith(w.small.stem))
    for chunk in (store / "embeddings" / "c").rglob("*"):
        if chunk.is_file():
            chunk.write_bytes(chunk.read_bytes()[:40])  # e.g. a copy that stopped
    return cache


def _export_damaged_store(w: World, where: Path, stack: contextlib.ExitStack) -> list[object]:
    return ["export", w.small, w.big, *TINY, "--cache", _damaged_cache(w, where), "--out", where / "out"]


def _check_export_damaged_store(w: World, r: Result) -> None:
    assert r.rc == 1 and len(r.errors) == 1 and w.small.name in r.errors[0] and "damaged" in r.errors[0]
    assert not (r.where / "out" / f"{w.small.stem}.h5").exists()
    _h5_matches(r.where / "out" / f"{w.big.stem}.h5", w.big, w.cache)


def _read_only(command: str, *extra: object) -> Argv:
    def argv(w: World, where: Path, stack: contextlib.ExitStack) -> list[object]:
        ro = stack.enter_context(tmpfs(where / "ro", "64m"))
        _copy_cache(w, ro)
        remount_read_only(ro)
        slides = [w.big, w.small] if command != "fit-head" else [w.big]
        return [command, *slides, *TINY, "--cache", ro / "cache", *(a(w, where) if callable(a) else a for a in extra)]

    return argv


def _out(name: str) -> Callable[[World, Path], Path]:
    return lambda w, where: where / name


def _annotations(w: World, where: Path) -> Path:
    return write_annotations(where / "a.geojson", [
        Annotation(_square(*PLANTED_PATTERNS[0].box), "Tumor"), Annotation(_square(*PLANTED_PATTERNS[1].box), "Tumor"),
        Annotation(_square(256, 1344, 1120, 1792), "Stroma"), Annotation(_square(1344, 256, 1792, 1120), "Stroma"),
    ])  # fmt: skip


def _check_embed_read_only(w: World, r: Result) -> None:
    assert r.rc == 0 and not r.errors and r.out.count("all cached") == 2, r.err


def _check_export_read_only(w: World, r: Result) -> None:
    assert r.rc == 0 and not r.errors, r.err
    _h5_matches(r.where / "out" / f"{w.big.stem}.h5", w.big, w.cache)
    _h5_matches(r.where / "out" / f"{w.small.stem}.h5", w.small, w.cache)


def _check_index_read_only(w: World, r: Result) -> None:
    assert r.rc == 0 and not r.errors, r.err
    n = len(_stored(w.big, w.cache)[0]) + len(_stored(w.small, w.cache)[0])
    assert f"indexed {n} tiles of 2 slides" in r.out


def _check_fit_head_read_only(w: World, r: Result) -> None:
    assert r.rc == 0 and not r.errors, r.err
    assert "ROC AUC" in r.out and (r.where / "head.json").is_file()  # LinearHead.cv_auc, read by the CLI


def _read_only_missing_tiles(w: World, where: Path, stack: contextlib.ExitStack) -> list[object]:
    ro = stack.enter_context(tmpfs(where / "ro", "64m"))
    _copy_cache(w, ro)
    remount_read_only(ro)
    return ["embed", w.fresh, w.small, *TINY, "--cache", ro / "cache"]


def _check_read_only_missing_tiles(w: World, r: Result) -> None:
    assert r.rc == 1 and len(r.errors) == 1 and w.fresh.name in r.errors[0], r.err
    assert "cannot write to the embedding cache folder" in r.errors[0] and "--cache DIR" in r.errors[0]
    assert f"{w.small.name}: 9 tissue tiles, all cached" in r.out  # the other slide went on
    assert f"1 of 2 slides done, 1 failed: {w.fresh.name}" in r.out


def _index_full_disk(w: World, where: Path, stack: contextlib.ExitStack) -> list[object]:
    out = stack.enter_context(tmpfs(where / "out", "600k"))
    fill(out, 24 * 1024)
    return ["index", w.big, w.small, *TINY, "--cache", w.cache, "--out", out / "idx"]


def _check_index_full_disk(w: World, r: Result) -> None:
    assert r.rc == 2 and len(r.errors) == 1 and "disk full" in r.errors[0] and "idx" in r.errors[0], r.err
    assert "faiss" not in r.err
    left = sorted(p.name for p in (r.where / "out").rglob("*") if p.name != "filler" and p.is_file())
    assert left == [], left  # no lone INDEX.npz, no temporary file


def _usage_error(option: str) -> Check:
    def check(w: World, r: Result) -> None:
        assert r.rc == 2 and len(r.err.strip().splitlines()) == 1 and option in r.err and "finite" in r.err, r.err
        assert "please report it" not in r.err

    return check


def _search(x: str) -> Argv:
    def argv(w: World, where: Path, stack: contextlib.ExitStack) -> list[object]:
        return ["search", where / "no-index", "--slide", w.big, "--x", x, "--y", "10", *TINY, "--cache", w.cache]

    return argv


def _check_no_tissue(w: World, r: Result) -> None:
    assert r.rc == 2 and len(r.errors) == 1, r.err
    assert "nothing to index" in r.errors[0] and f"no tissue was found in {w.blank.name}" in r.errors[0]
    assert not (r.where / "idx").exists() or not list((r.where / "idx").iterdir())


def _check_needs_force(w: World, r: Result) -> None:
    assert r.rc == 2 and len(r.errors) == 1 and "--force" in r.errors[0] and "upsample" in r.errors[0], r.err
    assert list_stores(r.where / "cache") == []  # refused before anything was created


def _check_huge_override(w: World, r: Result) -> None:
    assert r.rc == 1 and len(r.errors) == 1 and "records" not in r.errors[0], r.err
    assert "override" in r.errors[0] and "1e+09" in r.errors[0]


def _check_batch_capped(w: World, r: Result) -> None:
    assert r.rc == 0 and not r.errors, r.err
    assert "batch size 100000000 would need about" in r.err and "the embeddings are the same" in r.err
    idx, emb = _stored(w.small, r.where / "cache")
    ref_idx, ref = _stored(w.small, w.cache)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(emb, ref, rtol=2e-3, atol=1e-3)


@dataclass(frozen=True)
class Fault:
    """One row: how to provoke the fault (argv, may mount file systems), what must be true after."""

    argv: Argv
    check: Check
    umask: int | None = None


FAULTS: dict[str, Fault] = {
    # (5) one slide's failure never loses the others; no segfault after h5py's ENOSPC
    "export-two-slides-to-a-full-disk": Fault(_export_full_disk, _check_export_full_disk),
    "export-with-a-damaged-store": Fault(_export_damaged_store, _check_export_damaged_store),
    # (6) a complete cache on a read-only file system serves every reading command
    "embed-on-read-only-complete-cache": Fault(_read_only("embed"), _check_embed_read_only),
    "export-from-read-only-cache": Fault(_read_only("export", "--out", _out("out")), _check_export_read_only),
    "index-from-read-only-cache": Fault(_read_only("index", "--out", _out("idx")), _check_index_read_only),
    "fit-head-from-read-only-cache": Fault(_read_only("fit-head", "--annotations", _annotations, "--out",
                                                      _out("head.json")), _check_fit_head_read_only),
    "read-only-cache-with-tiles-to-compute": Fault(_read_only_missing_tiles, _check_read_only_missing_tiles),
    # (7) index on a full disk: one line, all index files or none
    "index-to-a-full-disk": Fault(_index_full_disk, _check_index_full_disk),
    # (8) unclear messages
    "search-x-nan": Fault(_search("nan"), _usage_error("--x")),
    "search-x-inf": Fault(_search("inf"), _usage_error("--x")),
    "export-query-nan": Fault(lambda w, d, s: ["export", w.small, *TINY, "--cache", w.cache, "--out", d / "out",
                                               "--query", "nan,nan"], _usage_error("--query")),
    "index-over-slides-without-tissue": Fault(lambda w, d, s: ["index", w.blank, *TINY, "--cache", d / "cache",
                                                               "--out", d / "idx"], _check_no_tissue),
    "mpp-override-1e9-is-not-what-the-file-records": Fault(
        lambda w, d, s: ["embed", w.small, *TINY, "--cache", d / "cache", "--mpp-override", "1e9", "--force"],
        _check_huge_override),
    # (9) guard rails
    "mpp-override-upsampling-needs-force": Fault(
        lambda w, d, s: ["embed", w.small, *TINY, "--cache", d / "cache", "--mpp-override", "5"], _check_needs_force),
    "batch-size-capped-by-memory": Fault(
        lambda w, d, s: ["embed", w.small, *TINY, "--cache", d / "cache", "--batch-size", "100000000"],
        _check_batch_capped),
}  # fmt: skip


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", list(FAULTS))
def test_fault(name: str, world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fault = FAULTS[name]
    with contextlib.ExitStack() as stack:
        argv = [str(a) for a in fault.argv(world, tmp_path, stack)]
        capsys.readouterr()
        rc = cli.main(argv)
        out, err = capsys.readouterr()
        fault.check(world, Result(rc, out, err, tmp_path))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_outputs_honour_the_umask(umask: int, world: World, tmp_path: Path) -> None:
    before = os.umask(umask)
    try:
        assert cli.main(["export", str(world.small), *TINY, "--cache", str(world.cache), "--out", str(tmp_path)]) == 0
    finally:
        os.umask(before)
    assert stat.S_IMODE((tmp_path / f"{world.small.stem}.h5").stat().st_mode) == 0o666 & ~umask


@pytest.mark.timeout(120)
def test_export_after_errors_exits_without_noise(world: World, tmp_path: Path) -> None:
    """A real process: after a damaged store and a full disk, no crash, no asyncio or h5py noise at exit."""
    cache = _damaged_cache(world, tmp_path)
    with tmpfs(tmp_path / "out", "600k") as out:
        fill(out, 24 * 1024)  # the small slide's store is damaged, the big one's features do not fit
        argv = ["export", world.small, world.big, *TINY, "--cache", cache, "--out", out]
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
        proc = subprocess.run([sys.executable, "-m", "napari_virchow.cli", *map(str, argv)], capture_output=True,
                              text=True, timeout=100, env=env)  # fmt: skip
        assert proc.returncode == 1, proc.stderr  # not 139 (segfault), not 0
        lines = [ln for ln in proc.stderr.splitlines() if "random weights" not in ln]
        assert len(lines) == 2 and all(": error: " in ln for ln in lines), proc.stderr  # one line per slide
        assert "Task was destroyed" not in proc.stderr and "Traceback" not in proc.stderr
        _no_temp_files(out)
