"""The npe2 manifest at the repository root is the one napari loads, editable and from a wheel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHECK = r"""
import json, importlib.resources
from npe2 import PluginManager, PluginManifest
from npe2.cli import validate  # noqa: F401  (the CLI's own entry point exists)
mf = PluginManifest.from_distribution("napari-virchow")
mf.validate_imports()
pm = PluginManager.instance(); pm.discover()
m = pm.get_manifest("napari-virchow")
print(json.dumps({
    "package_dir": str(importlib.resources.files("napari_virchow")),
    "readers": [r.command for r in m.contributions.readers],
    "samples": [s.key for s in m.contributions.sample_data],
    "widgets": [w.command for w in (m.contributions.widgets or [])],
    "patterns": m.contributions.readers[0].filename_patterns,
}))
"""


def _check(env: dict[str, str] | None = None, cwd: Path | None = None) -> dict:
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=env, cwd=cwd, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _assert_contributions(info: dict) -> None:
    assert info["readers"] == ["napari-virchow.get_reader"]
    assert {"cmu_small_region", "cmu_small_region_svs"} <= set(info["samples"])
    assert "*.svs" in info["patterns"] and "*.mrxs" in info["patterns"]
    assert info["widgets"] == ["napari-virchow.widget"]


def test_npe2_validate_editable_install() -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    out = subprocess.run(["npe2", "validate", "napari-virchow"], capture_output=True, text=True, timeout=120,
                         cwd=ROOT, env=env)  # fmt: skip
    assert out.returncode == 0 and "valid" in out.stdout, out.stdout + out.stderr
    _assert_contributions(_check())


def test_wheel_carries_manifest_and_sample(tmp_path: Path) -> None:
    pytest.importorskip("hatchling")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-w", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    [wheel] = tmp_path.glob("napari_virchow-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert zf.read("napari_virchow/napari.yaml") == (ROOT / "napari_virchow" / "napari.yaml").read_bytes()
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        assert "napari_virchow:napari.yaml" in zf.read(entry_points).decode()
        assert "napari_virchow/sample_data/cmu_small_region_pyramid.tif" in names
        zf.extractall(tmp_path / "site")
    # the unpacked wheel first on the path: its dist-info and package shadow the editable install
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    info = _check(env, cwd=tmp_path)  # not the repo root, whose package would come first
    assert info["package_dir"].startswith(str(tmp_path / "site"))
    _assert_contributions(info)


def test_manifest_is_a_real_file_and_the_repo_has_no_symlinks() -> None:
    # Windows checkouts turn symlinks into text files holding the target path: npe2 would then
    # read "../napari.yaml" as the manifest.
    assert not (ROOT / "napari_virchow" / "napari.yaml").is_symlink()
    listing = subprocess.run(["git", "ls-files", "-s"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    if listing.returncode != 0:
        pytest.skip("not a git checkout")
    links = [line.split("\t")[1] for line in listing.stdout.splitlines() if line.startswith("120000")]
    assert links == []
