"""EmbeddingStore and the cache: real zarr stores on disk, real processes for kills and races."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from napari_virchow import __version__
from napari_virchow.errors import StoreError
from napari_virchow.store import atomic as atomic_mod
from napari_virchow.store import cache
from napari_virchow.store import embeddings as store_mod
from napari_virchow.store.embeddings import EmbeddingStore, StoreKey, default_cache_root
from napari_virchow.store.layout import attrs_digest

N, DIM, CHUNK = 300, 96, 32
KEY = StoreKey("fp-0001", "virchow2", "sha256:abcd", 0.5, 224)
TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def expected(idx: np.ndarray | list[int]) -> np.ndarray:
    """Deterministic, never-zero row i (a missing row reads as zeros, so it cannot pass)."""
    i = np.asarray(idx, dtype=np.int64)[:, None]
    return (((i * 7 + np.arange(DIM)[None, :]) % 251 + 1) / 256).astype(np.float16)


def open_store(root: Path, key: StoreKey = KEY, **kw: object) -> EmbeddingStore:
    kw.setdefault("n_tiles", N)
    kw.setdefault("dim", DIM)
    kw.setdefault("chunk_rows", CHUNK)
    return EmbeddingStore.open(key, root=root, **kw)  # type: ignore[arg-type]


def assert_done_rows_correct(root: Path) -> np.ndarray:
    with open_store(root, mode="r") as s:
        idx, rows = s.read_done()
    np.testing.assert_array_equal(rows, expected(idx).astype(np.float32))
    return idx


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{TESTS}"}


@pytest.fixture(autouse=True)
def _no_global_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cache.ENV_MAX_GB, raising=False)
    monkeypatch.delenv(cache.ENV_CACHE, raising=False)


# -- basics ------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_create_write_reopen_resume(tmp_path: Path) -> None:
    coords = np.stack([np.arange(N) * 448, np.zeros(N)], axis=1).astype(np.int64)
    with open_store(tmp_path, slide_path="/data/TCGA-A1.svs", coords=coords, tile_size_l0=448) as s:
        assert s.n_done == 0 and s.done.dtype == bool and s.done.shape == (N,)
        s.write(np.arange(0, 100), expected(np.arange(0, 100)).astype(np.float32))
        s.write([250, 5], expected([250, 5]))  # unsorted, overlapping a done row
        assert s.path.name.startswith("TCGA-A1--virchow2--")
    with open_store(tmp_path, coords=coords) as s:  # resume
        assert s.n_done == 101
        np.testing.assert_array_equal(s.missing([3, 100, 250, 299]), [100, 299])
        todo = s.missing()
        assert todo.size == N - 101
        s.write(todo, expected(todo))
        assert s.n_done == N and s.missing().size == 0
        rows = s.read([7, 2, 7])
        assert rows.dtype == np.float32 and rows.shape == (3, DIM)
        np.testing.assert_array_equal(rows, expected([7, 2, 7]).astype(np.float32))
        np.testing.assert_array_equal(s.coords, coords)
        a = s.attrs
        assert (a["encoder"], a["weights_id"], a["mpp"], a["tile_size"]) == ("virchow2", "sha256:abcd", 0.5, 224)
        assert a["tile_size_l0"] == 448 and a["slide_path"] == "/data/TCGA-A1.svs"
        assert a["slide_fingerprint"] == "fp-0001" and a["package_version"] == __version__
        assert a["format_version"] == store_mod.FORMAT_VERSION and a["created"] and a["updated"]
    assert_done_rows_correct(tmp_path)


@pytest.mark.timeout(60)
def test_key_digest_folder_and_roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert len(KEY.digest) == 64 and int(KEY.digest, 16) >= 0
    assert StoreKey("fp-0001", "virchow2", "sha256:abcd", 0.5000000001, 224).digest == KEY.digest
    assert StoreKey("fp-0001", "virchow", "sha256:abcd", 0.5, 224).digest != KEY.digest
    with pytest.raises(ValueError, match="mpp"):
        StoreKey("fp", "virchow2", "w", -1.0, 224)
    monkeypatch.setenv(cache.ENV_CACHE, str(tmp_path / "envroot"))
    assert default_cache_root() == tmp_path / "envroot"
    with EmbeddingStore.open(KEY, n_tiles=10, dim=4, slide_path="/a/b/my slide--x.ndpi") as s:
        assert s.path.parent == tmp_path / "envroot"
        assert s.path.name == f"my_slide-x--virchow2--{KEY.digest[:16]}"
    # The slide was renamed: the store is found by its key, not by its name.
    with EmbeddingStore.open(KEY, n_tiles=10, dim=4, slide_path="/new/name.ndpi", mode="r") as s:
        assert s.path.name.startswith("my_slide-x--")
    monkeypatch.delenv(cache.ENV_CACHE)
    assert default_cache_root().parts[-1] == "embeddings"


@pytest.mark.timeout(60)
def test_modes_and_write_validation(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no embeddings cached"):
        open_store(tmp_path, mode="r")
    with open_store(tmp_path) as s:
        s.write([1, 2], expected([1, 2]))
        with pytest.raises(ValueError, match="NaN"):
            s.write([3], np.full((1, DIM), np.nan))
        with pytest.raises(ValueError, match="NaN"):
            s.write([3], np.full((1, DIM), 1e6))  # overflows float16
        with pytest.raises(ValueError, match="shape"):
            s.write([3, 4], expected([3]))
        with pytest.raises(IndexError):
            s.write([N], expected([0]))
        assert s.n_done == 2
    with open_store(tmp_path, mode="r") as s, pytest.raises(StoreError, match="read-only"):
        s.write([3], expected([3]))
    with open_store(tmp_path, mode="w") as s:  # "w" starts over
        assert s.n_done == 0 and s.coords is None
    coords = np.arange(2 * N).reshape(N, 2)
    with open_store(tmp_path, coords=coords) as s:  # coords given later are written once
        np.testing.assert_array_equal(s.coords, coords)
    with pytest.raises(StoreError, match="coordinates differ"):
        open_store(tmp_path, coords=coords[::-1])


# -- refusals ----------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("change", ["n_tiles", "dim", "coords", "key", "format"])
def test_mismatch_refused(tmp_path: Path, change: str) -> None:
    coords = np.arange(2 * N).reshape(N, 2)
    with open_store(tmp_path, coords=coords) as s:
        s.write([0], expected([0]))
        path = s.path
    kw: dict[str, object] = {"coords": coords}
    if change in ("n_tiles", "dim"):
        kw = {change: {"n_tiles": N + 1, "dim": DIM * 2}[change]}
    elif change == "coords":
        kw["coords"] = coords + 1
    else:
        meta = json.loads((path / "zarr.json").read_text())
        if change == "key":  # e.g. a store folder copied by hand: attrs disagree with the key
            meta["attributes"]["weights_id"] = "sha256:other"
            meta["attributes"]["attrs_digest"] = attrs_digest(meta["attributes"])  # a consistent store
        else:
            meta["attributes"]["format_version"] = store_mod.FORMAT_VERSION + 1
        (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="never mixed") as info:
        open_store(tmp_path, **kw)
    msg = str(info.value)
    assert str(path) in msg and "napari-virchow cache clear" in msg and "--cache" in msg


@pytest.mark.timeout(60)
@pytest.mark.parametrize("damage", ["delete_meta", "garble_meta", "drop_array", "bad_chunk"])
def test_corrupt_store_is_a_store_error(tmp_path: Path, damage: str) -> None:
    with open_store(tmp_path) as s:
        s.write(np.arange(40), expected(np.arange(40)))
        path = s.path
    if damage == "delete_meta":
        (path / "zarr.json").unlink()
    elif damage == "garble_meta":
        (path / "zarr.json").write_text('{"zarr_format": 3, "node_ty')
    elif damage == "drop_array":
        shutil.rmtree(path / "embeddings")
    else:
        (path / "embeddings" / "c" / "0" / "0").write_bytes(b"\x28\xb5\x2f\xfd garbage")
    with pytest.raises(StoreError, match="damaged") as info, open_store(tmp_path, mode="r") as s:
        s.read_done()
    assert str(path) in str(info.value) and "cache clear" in str(info.value)
    # Listing flags damaged metadata (it does not read every chunk) and `cache clear --slide`
    # removes the store either way.
    (info_row,) = cache.list_stores(tmp_path)
    assert info_row.path == path and (info_row.error is None) == (damage == "bad_chunk")
    assert cache.clear(tmp_path, slide=path.name.split("--")[0]) == [path]


# -- permissions (tests run as root: drop to uid 65534 in a child) ------------------------------

_RO_CHILD = """
import json, os, sys
from pathlib import Path
import numpy as np
from napari_virchow.errors import StoreError
from napari_virchow.store.embeddings import EmbeddingStore, StoreKey
from test_store import KEY, N, DIM, CHUNK, expected

ro_root, scratch = Path(sys.argv[1]), Path(sys.argv[2])
# Warm up as root: the interpreter's stdlib lives under /root (mode 700 here), so every lazy
# import (zarr codecs, asyncio threads, error paths) must happen before the uid drop.
with EmbeddingStore.open(KEY, n_tiles=N, dim=DIM, root=scratch, chunk_rows=CHUNK) as s:
    s.write([0], expected([0])); s.read_done()
with EmbeddingStore.open(KEY, n_tiles=N, dim=DIM, root=scratch, mode="r") as s:
    s.read([0])
try:
    EmbeddingStore.open(KEY, n_tiles=N, dim=DIM, root=scratch / "nothing", mode="r")
except StoreError:
    pass
os.setgid(65534); os.setuid(65534)
out = {}
other = StoreKey("fp-new", "virchow2", "w", 0.5, 224)
for name, key, mode in [("create", other, "a"), ("append", KEY, "a")]:
    try:
        EmbeddingStore.open(key, n_tiles=N, dim=DIM, root=ro_root, mode=mode)
        out[name] = "opened"
    except StoreError as exc:
        out[name] = str(exc)
with EmbeddingStore.open(KEY, n_tiles=N, dim=DIM, root=ro_root, mode="r") as s:
    idx, rows = s.read_done()
    out["ok"] = bool((rows == expected(idx).astype(np.float32)).all())
    out["n_done"] = s.n_done
print(json.dumps(out))
"""


@pytest.fixture
def world_readable_dir() -> Iterator[Path]:
    # pytest's tmp_path sits below a 0700 folder that uid 65534 cannot enter.
    path = Path(tempfile.mkdtemp(prefix="nv-store-ro-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.timeout(60)
@pytest.mark.skipif(not hasattr(os, "setuid") or os.geteuid() != 0, reason="needs root to drop")
def test_read_only_folder(world_readable_dir: Path, tmp_path: Path) -> None:
    ro_root = world_readable_dir / "cache"
    with open_store(ro_root) as s:
        s.write(np.arange(50), expected(np.arange(50)))
        path = s.path
    proc = subprocess.run(
        [sys.executable, "-c", _RO_CHILD, str(ro_root), str(tmp_path / "scratch")],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=50,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert str(ro_root) in out["create"] and "--cache DIR" in out["create"]
    assert str(path) in out["append"] and "--cache DIR" in out["append"]
    assert out["ok"] and out["n_done"] == 50


# -- crash safety: SIGKILL at random moments ---------------------------------------------------

_KILL_CHILD = """
import sys
import numpy as np
from napari_virchow.store.embeddings import EmbeddingStore
from test_store import KEY, N, DIM, CHUNK, expected

s = EmbeddingStore.open(KEY, n_tiles=N, dim=DIM, root=sys.argv[1], chunk_rows=CHUNK)
rng = np.random.default_rng(int(sys.argv[2]))
print("ready", flush=True)
while True:
    # Small batches of missing tiles plus a few done ones rewritten (as a second viewer would):
    # a torn rewrite of a chunk would corrupt rows that were already done.
    todo = s.missing()[:6]
    idx = np.concatenate([todo, rng.integers(0, N, 4)])
    s.write(idx, expected(idx))
"""


@pytest.mark.timeout(60)
def test_sigkill_never_leaves_done_without_row(tmp_path: Path) -> None:
    root = tmp_path / "killed"
    rnd = random.Random(1234)
    progress = []
    for attempt in range(5):
        proc = subprocess.Popen(
            [sys.executable, "-c", _KILL_CHILD, str(root), str(attempt)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env(),
        )
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "ready", proc.stderr.read() if proc.stderr else ""
        time.sleep(rnd.uniform(0.02, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert proc.returncode == -signal.SIGKILL
        progress.append(assert_done_rows_correct(root).size)
    assert progress[-1] > 0, progress
    # Resume: write what is missing; the result equals an uninterrupted run, byte for byte.
    with open_store(root) as s:
        assert not list(s.path.rglob(".*.tmp"))  # temp files of killed writers are swept
        todo = s.missing()
        for start in range(0, todo.size, 32):
            s.write(todo[start : start + 32], expected(todo[start : start + 32]))
        idx, rows = s.read_done()
    with open_store(tmp_path / "clean") as s:
        for start in range(0, N, 32):
            s.write(
                np.arange(start, min(N, start + 32)),
                expected(np.arange(start, start + 32))[: min(N, start + 32) - start],
            )
        idx_clean, rows_clean = s.read_done()
    np.testing.assert_array_equal(idx, np.arange(N))
    np.testing.assert_array_equal(idx, idx_clean)
    assert rows.tobytes() == rows_clean.tobytes()


# -- concurrency: two processes, overlapping tiles -----------------------------------------------


def _race_writer(root: str, seed: int, start: multiprocessing.synchronize.Event) -> None:
    rng = np.random.default_rng(seed)
    order = rng.permutation(N)
    with open_store(Path(root)) as s:
        start.wait(30)
        for chunk in np.array_split(order, N // 6):
            s.write(chunk, expected(chunk))


@pytest.mark.timeout(60)
def test_two_processes_write_same_store(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_race_writer, args=(str(tmp_path), seed, start)) for seed in (1, 2)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(50)
        assert p.exitcode == 0
    assert assert_done_rows_correct(tmp_path).size == N


# -- disk full ---------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_disk_full_keeps_earlier_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_put = atomic_mod.atomic_put
    calls = {"n": 0}

    def full_after_one(path: Path, data: bytes, *, exclusive: bool = False) -> None:
        calls["n"] += 1
        if calls["n"] > 1:  # one chunk of the batch lands, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_put(path, data, exclusive=exclusive)

    with open_store(tmp_path) as s:
        first = np.arange(0, 20)  # chunk 0, partly
        s.write(first, expected(first))
        batch = np.arange(20, 90)  # chunks 0, 1, 2: shares chunk 0 with done rows
        monkeypatch.setattr(atomic_mod, "atomic_put", full_after_one)
        with pytest.raises(StoreError, match="disk full while writing embeddings") as info:
            s.write(batch, expected(batch))
        assert str(s.path) in str(info.value) and "--cache DIR" in str(info.value)
        monkeypatch.setattr(atomic_mod, "atomic_put", real_put)
        np.testing.assert_array_equal(np.flatnonzero(s.done), first)
        s.write(batch, expected(batch))  # space freed: the batch goes through
    assert assert_done_rows_correct(tmp_path).size == 90

    monkeypatch.setattr(atomic_mod, "atomic_put", full_after_one)
    with pytest.raises(StoreError, match="disk full while creating"):
        open_store(tmp_path, key=StoreKey("fp-2", "virchow2", "w", 0.5, 224))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no half store left


# -- the cache: listing, clearing, LRU ---------------------------------------------------------


def _make(root: Path, fp: str, encoder: str, slide: str, n_rows: int) -> Path:
    key = StoreKey(fp, encoder, "w1", 0.5, 224)
    with open_store(root, key=key, slide_path=slide) as s:
        s.write(np.arange(n_rows), expected(np.arange(n_rows)))
        return s.path


@pytest.mark.timeout(60)
def test_list_and_clear_filters(tmp_path: Path) -> None:
    a = _make(tmp_path, "fp-a", "virchow2", "/data/slide1.svs", 40)
    b = _make(tmp_path, "fp-a", "virchow", "/data/slide1.svs", 10)
    c = _make(tmp_path, "fp-c", "virchow2", "/data/slide2.svs", 20)
    (tmp_path / "notes").mkdir()  # not a store: never listed, never removed
    infos = {i.path: i for i in cache.list_stores(tmp_path)}
    assert set(infos) == {a, b, c}
    ia = infos[a]
    assert (ia.slide_path, ia.encoder, ia.weights_id, ia.mpp, ia.tile_size) == (
        "/data/slide1.svs",
        "virchow2",
        "w1",
        0.5,
        224,
    )
    assert (ia.n_done, ia.n_tiles, ia.error) == (40, N, None)
    assert ia.size_bytes > 0 and ia.last_used > 0
    assert cache.clear(tmp_path, slide="slide1", encoder="Virchow") == [b]
    assert cache.clear(tmp_path, slide="fp-c") == [c]
    assert cache.clear(tmp_path, slide="/data/slide1.svs") == [a]
    _make(tmp_path, "fp-d", "virchow2", "/data/slide4.svs", 5)
    assert len(cache.clear(tmp_path)) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["notes"]


@pytest.mark.timeout(60)
def test_lru_eviction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = [_make(tmp_path, f"fp-{n}", "virchow2", f"/d/{n}.svs", 64) for n in "abc"]
    a, b, c = paths
    now = time.time()
    for age, p in zip((300, 200, 100), paths, strict=True):
        os.utime(p / "last_used", (now - age, now - age))
    with open_store(tmp_path, key=StoreKey("fp-a", "virchow2", "w1", 0.5, 224), mode="r") as s:
        s.read([0])  # a is now the most recently used
    sizes = {p: cache._size_on_disk(p) for p in paths}
    assert cache.enforce_limit(tmp_path, sizes[a] + sizes[c] + 1) == [b]
    assert cache.enforce_limit(tmp_path, 0, keep=[a]) == [c]
    # A store open in this process (or any other) is never evicted.
    with open_store(tmp_path, key=StoreKey("fp-a", "virchow2", "w1", 0.5, 224)):
        assert cache.enforce_limit(tmp_path, 0) == []
    # Creating a store enforces the limit from the environment, keeping the new store.
    monkeypatch.setenv(cache.ENV_MAX_GB, "1e-9")
    with open_store(tmp_path, key=StoreKey("fp-e", "virchow2", "w1", 0.5, 224)) as s:
        assert [p.name for p in tmp_path.iterdir()] == [s.path.name]


def test_cache_max_bytes_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert cache.cache_max_bytes() == 20e9
    monkeypatch.setenv(cache.ENV_MAX_GB, "1.5")
    assert cache.cache_max_bytes() == 1.5e9
    assert cache.cache_max_bytes(2) == 2e9
    monkeypatch.setenv(cache.ENV_MAX_GB, "lots")
    with pytest.raises(StoreError, match=cache.ENV_MAX_GB):
        cache.cache_max_bytes()


def test_zarr_chunk_writes_go_through_atomic_put(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The crash-safety argument rests on every chunk write being temp file + rename.
    seen: list[str] = []
    real_put = atomic_mod.atomic_put

    def spy(path: Path, data: bytes, *, exclusive: bool = False) -> None:
        seen.append(path.relative_to(s.path).as_posix())
        real_put(path, data, exclusive=exclusive)

    with open_store(tmp_path) as s:
        monkeypatch.setattr(atomic_mod, "atomic_put", spy)
        s.write([0, 40], expected([0, 40]))
    assert {"embeddings/c/0/0", "embeddings/c/1/0", "done/c/0"} <= set(seen)


def test_leftovers_of_killed_processes_are_swept(tmp_path: Path) -> None:
    old = time.time() - 7200
    names = (".removing-x--virchow2--0123456789abcdef-1", ".creating-0123-old", ".creating-new")
    for name in names:
        (tmp_path / name / "embeddings").mkdir(parents=True)
    os.utime(tmp_path / ".creating-0123-old", (old, old))
    cache.enforce_limit(tmp_path, 1e12)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".creating-new"]
