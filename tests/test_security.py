"""Security: no code path can unpickle or eval, exports stay in their folder, tests stay offline."""

from __future__ import annotations

import ast
import os
import socket
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from napari_virchow.analysis.head_files import save_head
from napari_virchow.analysis.heads import LinearHead
from napari_virchow.cli import main
from napari_virchow.io.export import write_features_h5, write_heatmap_tiff
from napari_virchow.io.geojson import OutputPathError, safe_output_path, write_annotations
from napari_virchow.slides.synthetic import SampleSource, write_pyramid

pytestmark = pytest.mark.timeout(30)

PACKAGE = Path(__file__).resolve().parents[1] / "napari_virchow"
#: modules whose import gives a way to run pickled (or marshalled) code
UNPICKLERS = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


# --- the package source, read with ast ---------------------------------------------------------------


def _dotted(node: ast.AST) -> str:
    """``torch.serialization.load`` for the expression of a call's function ('' if not a name)."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _torch_load(name: str) -> bool:
    parts = name.split(".")
    return parts[-1] == "load" and "torch" in parts[:-1]


def unsafe_calls(source: str, filename: str = "<src>") -> list[str]:
    """Every place in ``source`` that could run code from data, as ``file:line: what``."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in UNPICKLERS]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNPICKLERS:
            # only exception classes (to catch torch's refusal); never a loader
            loaders = [a.name for a in node.names if not a.name.endswith("Error")]
            found += [f"{where}: from {node.module} import {name}" for name in loaders]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch"):
            found += [f"{where}: from {node.module} import load" for a in node.names if a.name == "load"]
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            kw = {k.arg: k.value for k in node.keywords}  # **kwargs has arg None: not a literal True
            if name in ("eval", "exec", "builtins.eval", "builtins.exec"):
                found.append(f"{where}: {name}(")
            elif _torch_load(name) and not _is_true(kw.get("weights_only")):
                found.append(f"{where}: {name}( without weights_only=True")
            pickles = kw.get("allow_pickle", ast.Constant(False))
            if not (isinstance(pickles, ast.Constant) and pickles.value is False):
                found.append(f"{where}: {name}(allow_pickle=...)")
    return found


def _sources() -> dict[str, str]:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20  # the whole package, not an empty glob
    return {str(f.relative_to(PACKAGE.parent)): f.read_text(encoding="utf-8") for f in files}


def test_package_never_unpickles_or_evals() -> None:
    found = [hit for name, src in _sources().items() for hit in unsafe_calls(src, name)]
    assert found == []


def test_every_torch_load_is_weights_only() -> None:
    loads = [
        node
        for name, src in _sources().items()
        for node in ast.walk(ast.parse(src, name))
        if isinstance(node, ast.Call) and _torch_load(_dotted(node.func))
    ]
    assert loads, "no torch.load found: the scan above would be vacuous"
    assert all(_is_true(k.value) for node in loads for k in node.keywords if k.arg == "weights_only")


@pytest.mark.parametrize(
    ("source", "flagged"),
    [
        ("import pickle", True),
        ("import dill as d", True),
        ("from pickle import loads", True),
        ("from pickle import UnpicklingError", False),
        ("from torch import load", True),
        ("torch.load(p)", True),
        ("torch.load(p, weights_only=False)", True),
        ("torch.load(p, **kw)", True),
        ("torch.serialization.load(p)", True),
        ("torch.load(p, map_location='cpu', weights_only=True)", False),
        ("np.load(f, allow_pickle=True)", True),
        ("np.load(f, allow_pickle=flag)", True),
        ("np.load(f, allow_pickle=False)", False),
        ("eval('1 + 1')", True),
        ("exec('x = 1')", True),
        ("model.eval()", False),
    ],
)
def test_the_scan_catches_what_it_should(source: str, flagged: bool) -> None:
    assert bool(unsafe_calls(source)) is flagged


# --- exports stay in the chosen folder -----------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["../x.geojson", "{abs}", "a/b.geojson", "..", ".", "", "a\\b.geojson", "C:x.geojson", "x\x00.geojson"],
    ids=["dotdot", "absolute", "subfolder", "parent", "self", "empty", "backslash", "drive", "nul"],
)
def test_export_name_outside_the_folder_is_refused(name: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    name = name.format(abs=tmp_path / "x.geojson")
    with pytest.raises(OutputPathError, match="written inside"):
        safe_output_path(out, name)
    assert list(tmp_path.iterdir()) == []  # refused before anything was created


@pytest.mark.parametrize("existing", [True, False], ids=["symlink-to-file", "dangling-symlink"])
def test_export_over_a_symlink_is_refused(existing: bool, tmp_path: Path) -> None:
    out, victim = tmp_path / "out", tmp_path / "victim.geojson"
    out.mkdir()
    if existing:
        victim.write_text("keep")
    (out / "slide.geojson").symlink_to(victim)
    with pytest.raises(OutputPathError, match="outside"):
        safe_output_path(out, "slide.geojson")
    assert (victim.read_text() == "keep") if existing else not victim.exists()


def test_plain_export_name_is_accepted(tmp_path: Path) -> None:
    assert safe_output_path(tmp_path / "out", "slide..v2.heatmap.tif") == tmp_path / "out" / "slide..v2.heatmap.tif"


WRITERS: dict[str, Callable[[Path], object]] = {
    "geojson": lambda p: write_annotations(p, []),
    "features-h5": lambda p: write_features_h5(p, np.zeros((2, 4)), np.zeros((2, 2)), attrs={"name": "s"}),
    "heatmap-tiff": lambda p: write_heatmap_tiff(p, np.full((2, 2), 0.5), mpp_l0=0.5, tile_size_l0=224,
                                                 slide_dims=(448, 448)),
    "head": lambda p: save_head(LinearHead(np.ones((1, 4)), np.zeros(1), ["a", "b"], encoder="e"), p),
}  # fmt: skip


@pytest.mark.parametrize("writer", list(WRITERS))
def test_writers_replace_a_symlink_never_write_through_it(writer: str, tmp_path: Path) -> None:
    # Defence in depth under safe_output_path: every writer writes a temp file and renames it
    # over the target, which replaces a planted link instead of following it.
    victim = tmp_path / "victim"
    victim.write_text("keep")
    target = tmp_path / "out" / ("x.json" if writer == "head" else "x")
    target.parent.mkdir()
    target.symlink_to(victim)
    WRITERS[writer](target)
    assert victim.read_text() == "keep" and target.is_file() and not target.is_symlink()


@pytest.mark.timeout(60)
def test_cli_export_refuses_a_planted_symlink(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tissue = np.zeros((8, 8, 3), np.uint8) + np.array([190, 70, 150], np.uint8)
    slide = write_pyramid(tmp_path / "slide.tif", 448, 448, SampleSource(tissue), levels=1)  # 2 × 2 tiles
    out, victim = tmp_path / "out", tmp_path / "victim.h5"
    out.mkdir()
    victim.write_text("keep")
    (out / "slide.h5").symlink_to(victim)
    argv = ["export", str(slide), "--out", str(out), "--cache", str(tmp_path / "cache"),
            "--encoder", "virchow2-tiny", "--weights", "random", "--device", "cpu", "--no-progress"]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "would be written outside" in err and "Traceback" not in err
    assert victim.read_text() == "keep" and [p.name for p in out.iterdir()] == ["slide.h5"]


# --- the tests themselves stay offline -------------------------------------------------------------------


def test_no_network_fixture_refuses_other_hosts() -> None:
    with pytest.raises(ConnectionRefusedError, match="must not reach the network"):
        socket.create_connection(("192.0.2.1", 80), timeout=1)  # TEST-NET-1: never routed
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


def test_no_network_fixture_lets_loopback_through() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            conn, _ = server.accept()
            with conn:
                client.sendall(b"ping")
                assert conn.recv(4) == b"ping"
