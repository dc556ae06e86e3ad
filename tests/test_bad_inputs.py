"""Bad inputs, one table: each either opens (warning where analysis needs more) or fails with the
package's own exception whose message names the file and the fix. Then the same inputs through
the CLI (one line on stderr, non-zero exit, no traceback) and through the dock widget (a status
message, never an exception escaping to Qt, nothing computed lost)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import tracemalloc
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from safetensors.torch import save_file

from napari_virchow._reader import slide_layer_data
from napari_virchow._torch import torch
from napari_virchow.analysis.head_files import load_head, save_head
from napari_virchow.analysis.heads import LinearHead
from napari_virchow.analysis.index import build_index, load_index
from napari_virchow.analysis.similarity import AnalysisError
from napari_virchow.cli import main
from napari_virchow.errors import HeadError, SlideError, StoreError, VirchowError, WeightsError
from napari_virchow.io.geojson import AnnotationError, read_annotations
from napari_virchow.models.encoder import Encoder, load_encoder
from napari_virchow.slide_cohort import CohortError
from napari_virchow.slides.slide import Slide
from napari_virchow.slides.synthetic import SampleSource, write_pyramid
from napari_virchow.slides.tiling import TileGrid
from napari_virchow.store.embeddings import EmbeddingStore, StoreKey
from tests.conftest import SAMPLE_DIR, run_as_nobody

REPO = Path(__file__).resolve().parents[1]
SAMPLE_SVS = SAMPLE_DIR / "cmu_small_region.svs"
SAMPLE_TIF = SAMPLE_DIR / "cmu_small_region_pyramid.tif"
MARKER = "payload-ran"  # the pickle payload would create this file next to the weights
KEY = StoreKey("fp-bad-inputs", "virchow2-tiny", "random-seed1", 0.5, 224)
TINY = ["--encoder", "virchow2-tiny", "--weights", "random", "--device", "cpu", "--dtype", "fp32", "--no-progress"]

Action = Callable[[], object]
Make = Callable[[Path], tuple[Path, Action]]


@dataclass(frozen=True)
class Opens:
    """The file opens lazily; analysis may still need more (then SlideError with ``analysis``)."""

    file_levels: int
    levels: int  # more than file_levels: coarser levels are added lazily
    backend: str
    warning: str | None = None  # what the napari reader warns about at open
    analysis: str | None = None  # TileGrid's SlideError (what analysis needs); None: it tiles


@dataclass(frozen=True)
class Fails:
    """Opening/loading raises ``error``; the message names the file and contains ``fix``."""

    error: type[VirchowError]
    fix: str
    as_nobody: bool = False  # run the action as uid 65534 (the tests run as root)


# --- inputs ---------------------------------------------------------------------------------------


@cache
def _tiny(name: str) -> Encoder:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "random weights" is the point
        return load_encoder(name, weights="random", device="cpu", dtype="fp32")


def _plain(width: int, height: int, mpp: float | None) -> Make:
    def make(tmp: Path) -> tuple[Path, Action]:
        tissue = np.zeros((10, 10, 3), np.uint8) + np.array([200, 80, 160], np.uint8)
        path = write_pyramid(tmp / f"plain-{width}x{height}.tif", width, height, SampleSource(tissue), mpp=mpp,
                             levels=1)  # fmt: skip
        return path, lambda: Slide(path)

    return make


def _stripped(tmp: Path) -> tuple[Path, Action]:
    # 6000 × 5000 RGB (90 MB of pixels) in 64-row zlib strips: OpenSlide reads tiled TIFFs only
    img = np.zeros((5000, 6000, 3), np.uint8)
    img[..., 0], img[..., 1] = 200, (np.arange(6000) % 200)[None]
    path = tmp / "stripped.tif"
    tifffile.imwrite(path, img, rowsperstrip=64, compression="zlib", compressionargs={"level": 1},
                     photometric="rgb", resolution=(2e4, 2e4), resolutionunit="CENTIMETER")  # fmt: skip
    return path, lambda: Slide(path)


def _implausible_resolution(tmp: Path) -> tuple[Path, Action]:
    # 1 px per cm (10 000 µm/px): a wrong tag, which would make every slide pixel a tile
    path = tmp / "wrong-resolution.tif"
    tifffile.imwrite(path, np.full((1500, 2000, 3), 180, np.uint8), tile=(256, 256), photometric="rgb",
                     resolution=(1, 1), resolutionunit="CENTIMETER")  # fmt: skip
    return path, lambda: Slide(path)


def _file(name: str, data: bytes) -> Make:
    def make(tmp: Path) -> tuple[Path, Action]:
        path = tmp / name
        path.write_bytes(data)
        return path, lambda: Slide(path)

    return make


def _truncated_svs(tmp: Path) -> tuple[Path, Action]:
    path = tmp / "cut.svs"
    data = SAMPLE_SVS.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])
    return path, lambda: Slide(path)


def _float_tiff(tmp: Path) -> tuple[Path, Action]:
    path = tmp / "fluorescence.tif"
    tifffile.imwrite(path, np.zeros((64, 64), np.float32))
    return path, lambda: Slide(path)


def _png(tmp: Path) -> tuple[Path, Action]:
    from PIL import Image

    path = tmp / "photo.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(path)
    return path, lambda: Slide(path)


def _unreadable(tmp: Path) -> tuple[Path, Action]:
    path = tmp / "locked.svs"
    shutil.copy(SAMPLE_SVS, path)
    path.chmod(0o000)
    return path, lambda: Slide(path)


def _weights_of_v1(tmp: Path) -> tuple[Path, Action]:
    path = tmp / "virchow-tiny.safetensors"
    save_file(_tiny("virchow-tiny").model.state_dict(), str(path))
    return path, lambda: load_encoder("virchow2-tiny", path, device="cpu")


def _text_as_weights(tmp: Path) -> tuple[Path, Action]:
    path = tmp / "readme.pth"
    path.write_text("see the lab wiki for the weights\n")
    return path, lambda: load_encoder("virchow2-tiny", path, device="cpu")


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: code run by the loader."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, ...]]:
        return (open, (str(self.marker), "w"))


def _pickle_payload(tmp: Path) -> tuple[Path, Action]:
    path = tmp / "evil.pth"
    torch.save({"weight": torch.zeros(2), "x": _Payload(tmp / MARKER)}, path)
    return path, lambda: load_encoder("virchow2-tiny", path, device="cpu")


def _head_of_other_encoder(tmp: Path) -> tuple[Path, Action]:
    path = tmp / "v1-head.safetensors"
    save_head(LinearHead(np.ones((1, 96)), np.zeros(1), ["normal", "tumour"], encoder="virchow-tiny"), path)
    return path, lambda: load_head(path, encoder="virchow2-tiny")


def _unreadable_head(tmp: Path) -> tuple[Path, Action]:
    path = tmp / "shared-head.safetensors"
    save_head(LinearHead(np.ones((1, 96)), np.zeros(1), ["normal", "tumour"], encoder="virchow2-tiny"), path)
    path.chmod(0o000)
    return path, lambda: load_head(path, encoder="virchow2-tiny")


def _head_with_bad_version(tmp: Path) -> tuple[Path, Action]:
    path = tmp / "edited-head.json"
    path.write_text(json.dumps({"format": "napari-virchow-head", "version": "2.0", "weight": [[1.0]], "bias": [0.0],
                                "classes": ["normal", "tumour"], "encoder": "virchow2-tiny"}))  # fmt: skip
    return path, lambda: load_head(path, encoder="virchow2-tiny")


def _store(root: Path) -> Path:
    with EmbeddingStore.open(KEY, n_tiles=8, dim=4, root=root) as store:
        store.write(np.arange(4), np.ones((4, 4), np.float32))
        return store.path


def _corrupt_store(tmp: Path) -> tuple[Path, Action]:
    path = _store(tmp / "cache")
    (path / "zarr.json").write_text('{"zarr_format": 3, "node_ty')  # cut mid-write by hand
    return path, lambda: EmbeddingStore.open(KEY, n_tiles=8, dim=4, root=tmp / "cache", mode="r")


def _read_only_store(tmp: Path) -> tuple[Path, Action]:
    path = _store(tmp / "cache")  # folders 0755 owned by root: read-only for uid 65534
    return path, lambda: EmbeddingStore.open(KEY, n_tiles=8, dim=4, root=tmp / "cache", mode="a")


def _corrupt_index(tmp: Path) -> tuple[Path, Action]:
    rng = np.random.default_rng(0)
    entry = {"path": str(SAMPLE_TIF), "fingerprint": "fp", "embeddings": rng.normal(size=(6, 8)).astype(np.float32),
             "coords": np.arange(12).reshape(6, 2) * 224, "tile_size_l0": 224}  # fmt: skip
    build_index([entry], tmp / "idx", encoder="virchow2-tiny")
    path = tmp / "idx" / "INDEX.faiss"
    path.write_bytes(path.read_bytes()[:40])  # cut short
    return path, lambda: load_index(tmp / "idx")


def _geojson(name: str, text: str) -> Make:
    def make(tmp: Path) -> tuple[Path, Action]:
        path = tmp / name
        path.write_text(text)
        return path, lambda: read_annotations(path)

    return make


def _cohort_csv(name: str, rows: list[tuple[str, str]]) -> Make:
    def make(tmp: Path) -> tuple[Path, Action]:
        from napari_virchow.slide_cohort import read_cohort_csv

        path = tmp / name
        path.write_text("slide,label\n" + "".join(f"{s.replace('TMP', str(tmp))},{lab}\n" for s, lab in rows))
        return path, lambda: read_cohort_csv(path)

    return make


def _slide_head_file(tmp: Path, name: str) -> Path:
    from napari_virchow.analysis.mil_io import save_slide_head
    from napari_virchow.analysis.mil_train import fit_slide_head

    rng = np.random.default_rng(0)
    bags = [rng.normal(size=(5, 96)).astype(np.float32) for _ in range(4)]
    head = fit_slide_head(bags, ["normal", "tumour"] * 2, encoder="virchow2-tiny", weights_digest="random-seed1",
                          mpp=0.5, tile_size=224, folds=2, epochs=1, bootstrap=0)  # fmt: skip
    return save_slide_head(head, tmp / name)


def _slide_head_with_inf(tmp: Path) -> tuple[Path, Action]:
    from safetensors import safe_open
    from safetensors.numpy import save_file as save_np

    from napari_virchow.analysis.mil_io import load_slide_head

    path = _slide_head_file(tmp, "diverged.safetensors")
    with safe_open(str(path), framework="np") as f:
        meta, arrays = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    arrays["embed.weight"][0, 0] = np.inf
    save_np(arrays, str(path), metadata=meta)
    return path, lambda: load_slide_head(path)


def _probe_as_slide_head(tmp: Path) -> tuple[Path, Action]:
    from napari_virchow.analysis.mil_io import load_slide_head

    path = tmp / "probe.safetensors"
    save_head(LinearHead(np.ones((1, 96)), np.zeros(1), ["normal", "tumour"], encoder="virchow2-tiny"), path)
    return path, lambda: load_slide_head(path)


POINT_ONLY = json.dumps({"type": "FeatureCollection", "features": [
    {"type": "Feature", "geometry": {"type": "Point", "coordinates": [10, 10]}, "properties": {}}]})  # fmt: skip

ROWS: dict[str, tuple[Make, Opens | Fails]] = {
    # --- must open ---------------------------------------------------------------------------
    "no-mpp": (_plain(600, 500, None), Opens(1, 1, "tifffile", warning="override", analysis="override")),
    "smaller-than-one-tile": (_plain(100, 80, 0.5), Opens(1, 1, "tifffile", analysis="nothing to tile")),
    "single-level-svs": (lambda tmp: (SAMPLE_SVS, lambda: Slide(SAMPLE_SVS)), Opens(1, 3, "tifffile")),
    "large-stripped-tiff": (_stripped, Opens(1, 4, "tifffile")),
    "implausible-resolution": (_implausible_resolution, Opens(1, 2, "tifffile", analysis="pass the right one")),
    # --- must fail with the package's exception, naming the file and the fix --------------------------
    "text-renamed-svs": (_file("notes.svs", b"not a slide\n" * 50), Fails(SlideError, "picked the right file")),
    "truncated-svs": (_truncated_svs, Fails(SlideError, "copy it again from the scanner")),
    "zero-bytes": (_file("empty.svs", b""), Fails(SlideError, "copy the slide again")),
    "missing-file": (lambda tmp: (tmp / "gone.svs", lambda: Slide(tmp / "gone.svs")),
                     Fails(SlideError, "check the path")),
    "unsupported-png": (_png, Fails(SlideError, "convert it to a pyramidal tiff")),
    "unsupported-float-tiff": (_float_tiff, Fails(SlideError, "convert it to an 8-bit rgb")),
    "unreadable-file": (_unreadable, Fails(SlideError, "ask for read access", as_nobody=True)),
    "weights-of-another-model": (_weights_of_v1, Fails(WeightsError, "use encoder 'virchow'")),
    "pickle-weights-with-payload": (_pickle_payload, Fails(WeightsError, "use a .safetensors file")),
    "text-renamed-weights": (_text_as_weights, Fails(WeightsError, "download or copy it again")),
    "head-of-another-encoder": (_head_of_other_encoder, Fails(HeadError, "fit a new head on 'virchow2-tiny'")),
    "head-with-bad-version": (_head_with_bad_version, Fails(HeadError, "fit a new head")),
    "unreadable-head": (_unreadable_head, Fails(HeadError, "pick the right file", as_nobody=True)),
    "corrupt-store": (_corrupt_store, Fails(StoreError, "napari-virchow cache clear")),
    "read-only-store-folder": (_read_only_store, Fails(StoreError, "--cache dir", as_nobody=True)),
    "corrupt-index": (_corrupt_index, Fails(AnalysisError, "rebuild it with `napari-virchow index`")),
    "geojson-not-json": (_geojson("drawn.geojson", "{not json"), Fails(AnnotationError, "export them from qupath")),
    "geojson-no-polygons": (_geojson("points.geojson", POINT_ONLY), Fails(AnnotationError, "draw areas")),
    "cohort-missing-slide": (_cohort_csv("missing.csv", [(str(SAMPLE_TIF), "benign"), ("TMP/gone.svs", "tumour")]),
                             Fails(CohortError, "fix the paths")),
    "cohort-one-class": (_cohort_csv("one-class.csv", [(str(SAMPLE_TIF), "benign"), (str(SAMPLE_SVS), "benign")]),
                         Fails(CohortError, "at least two classes")),
    "cohort-duplicate-slide": (_cohort_csv("twice.csv", [(str(SAMPLE_TIF), "benign"), (str(SAMPLE_TIF), "tumour")]),
                               Fails(CohortError, "list each slide once")),
    "slide-head-with-inf": (_slide_head_with_inf, Fails(HeadError, "fit the head again")),
    "probe-as-slide-head": (_probe_as_slide_head, Fails(HeadError, "fit-slide-head")),
}  # fmt: skip


@pytest.fixture
def tmp() -> Iterator[Path]:
    """A scratch folder uid 65534 can enter (pytest's tmp_path sits below a 0700 folder)."""
    path = Path(tempfile.mkdtemp(prefix="nv-bad-inputs-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _outcome(action: Action, expected: type[VirchowError]) -> dict[str, object]:
    """What ``action`` raised, as plain data (so it can come back from an unprivileged child)."""
    try:
        action()
    except Exception as exc:  # noqa: BLE001 - the test inspects whatever it was
        return {"type": type(exc).__name__, "ours": isinstance(exc, expected), "message": str(exc)}
    return {"type": None, "ours": False, "message": "no error"}


def _as_nobody(action: Action, expected: type[VirchowError]) -> dict[str, object]:
    return json.loads(run_as_nobody(lambda: json.dumps(_outcome(action, expected))))


# --- the table --------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("make", "expect"), list(ROWS.values()), ids=list(ROWS))
def test_bad_input(make: Make, expect: Opens | Fails, tmp: Path) -> None:
    path, action = make(tmp)
    if isinstance(expect, Fails):
        got = (_as_nobody if expect.as_nobody else _outcome)(action, expect.error)
        assert got["ours"], f"expected {expect.error.__name__}, got {got['type']}: {got['message']}"
        message = str(got["message"])
        assert path.name in message, f"message does not name {path.name}: {message}"
        assert expect.fix in message.lower(), f"message does not say {expect.fix!r}: {message}"
        assert not (tmp / MARKER).exists(), "a pickle payload ran"
        return
    tracemalloc.start()
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            slide = action()
            assert isinstance(slide, Slide)
            levels, _, kind = slide_layer_data(slide)  # what napari gets: lazy dask levels
        tile = slide.read_region((0, 0), 0, (224, 224))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    with slide:
        assert kind == "image" and tile.shape == (224, 224, 3) and slide.backend == expect.backend
        assert (len(slide.file_level_dimensions), len(levels)) == (expect.file_levels, expect.levels)
        assert peak < 32e6, f"opening and reading one tile took {peak / 1e6:.0f} MB: not lazy"
        messages = [str(w.message) for w in seen if issubclass(w.category, UserWarning)]
        if expect.warning is None:
            assert not messages
        else:
            assert any(expect.warning in m and path.name in m for m in messages), messages
        if expect.analysis is None:
            assert len(TileGrid(slide)) > 0
            return
        with pytest.raises(SlideError, match=expect.analysis) as info:
            TileGrid(slide)
        assert path.name in str(info.value)


# --- the CLI: one line on stderr, non-zero exit, no traceback -------------------------------------------

CLI_ROWS: dict[str, tuple[Callable[[Path, Path], list[str]], int]] = {
    "text-renamed-svs": (lambda path, tmp: ["embed", str(path), *TINY, "--cache", str(tmp / "c")], 1),
    "no-mpp": (lambda path, tmp: ["embed", str(path), *TINY, "--cache", str(tmp / "c")], 1),
    "weights-of-another-model": (lambda path, tmp: ["embed", str(SAMPLE_TIF), "--encoder", "virchow2-tiny",
                                                    "--weights", str(path), "--no-progress", "--cache", str(tmp / "c")],
                                 2),
    "corrupt-index": (lambda path, tmp: ["search", str(path.parent), "--slide", str(SAMPLE_TIF), "--x", "0",
                                         "--y", "0", "--cache", str(tmp / "c")], 2),
    "geojson-not-json": (lambda path, tmp: ["fit-head", str(SAMPLE_TIF), "--annotations", str(path), "--out",
                                            str(tmp / "head.json"), *TINY, "--cache", str(tmp / "c")], 2),
    **{row: (lambda path, tmp: ["fit-slide-head", str(path), "--out", str(tmp / "h.safetensors"), *TINY, "--cache",
                                str(tmp / "c")], 2)
       for row in ("cohort-missing-slide", "cohort-one-class", "cohort-duplicate-slide")},
    "slide-head-with-inf": (lambda path, tmp: ["predict", str(path), str(SAMPLE_TIF), *TINY, "--cache",
                                               str(tmp / "c")], 2),
}  # fmt: skip


def _one_error_line(err: str, name: str) -> str:
    lines = err.splitlines()
    assert all(line.startswith("napari-virchow: ") for line in lines), err
    errors = [line for line in lines if line.startswith("napari-virchow: error: ")]
    assert len(errors) == 1 and name in errors[0], err
    return errors[0]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("row", list(CLI_ROWS))
def test_cli_bad_input_is_one_line(row: str, tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make, expect = ROWS[row]
    argv, status = CLI_ROWS[row]
    path, _ = make(tmp)
    assert main(argv(path, tmp)) == status
    out, err = capsys.readouterr()
    line = _one_error_line(err, path.name)
    fix = expect.analysis if isinstance(expect, Opens) else expect.fix
    assert fix is not None and fix in line.lower()
    assert "Traceback" not in out + err


@pytest.mark.timeout(60)
def test_cli_subprocess_bad_input_is_one_line(tmp: Path) -> None:
    path, _ = _corrupt_index(tmp)
    done = subprocess.run(
        [sys.executable, "-m", "napari_virchow.cli", *CLI_ROWS["corrupt-index"][0](path, tmp)],
        capture_output=True, text=True, timeout=50, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "rebuild it" in _one_error_line(done.stderr, path.name)
    assert "Traceback" not in done.stdout + done.stderr


# --- the widget: a status message, never an exception escaping to Qt, nothing lost ------------------------


@pytest.mark.timeout(120)
def test_widget_bad_weights_is_a_message_and_keeps_the_store(make_widget: Any, qtbot: Any, tmp: Path) -> None:
    w = make_widget(SAMPLE_TIF)
    w.limit_spin.setValue(10_000)
    w.compute.mag_combo.setCurrentText("20× (0.5 µm/px)")  # the store checked below is the 20× one
    w.compute_visible()
    qtbot.waitUntil(lambda: w._worker is None, timeout=60_000)
    computed = w.session()
    done = computed.store().done.copy()
    assert done.sum() > 0

    weights, _ = _weights_of_v1(tmp)  # typed in by hand: Virchow (v1) weights for Virchow 2
    w.weights_edit.setText(str(weights))
    w.random_check.setChecked(False)
    w.compute_visible()  # an exception escaping a Qt slot would fail this test (pytest-qt)
    qtbot.waitUntil(lambda: w._worker is None, timeout=60_000)
    status = w.status.text()
    assert status.startswith("error:") and weights.name in status and "use encoder 'virchow'" in status

    w.random_check.setChecked(True)  # back to the model that computed: everything is still there
    assert w.session() is computed
    np.testing.assert_array_equal(computed.store().done, done)
    w.compute_visible()
    qtbot.waitUntil(lambda: w._worker is None, timeout=60_000)
    assert "all cached" in w.status.text()
