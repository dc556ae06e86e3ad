"""Shared fixtures: the real sample slide, synthetic pyramids, and a network guard."""

from __future__ import annotations

import ipaddress
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from napari_virchow.slides.synthetic import PlantedSource, Region, write_pyramid

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DIR = ROOT / "sample_data"

#: planted layout of the synthetic slide (level-0 px): a tissue block with two pattern copies
PLANTED_SIZE = 2048
PLANTED_TISSUE = Region((256, 256, 1792, 1792), "tissue")
PLANTED_PATTERNS = [Region((448, 448, 896, 896), "planted"), Region((1152, 1152, 1600, 1600), "planted")]


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refuse connections to anything but loopback and unix sockets (dask.distributed still works)."""
    def loopback(address: object) -> bool:
        host = str(address[0]) if isinstance(address, tuple) else str(address)
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host.split("%")[0]).is_loopback
        except ValueError:  # a host name other than localhost would resolve anywhere
            return False

    def guard(real):
        def guarded(self: socket.socket, address: object, *args: object) -> object:
            if self.family in (socket.AF_INET, socket.AF_INET6) and not loopback(address):
                raise ConnectionRefusedError(f"tests must not reach the network (tried {address})")
            return real(self, address, *args)

        return guarded

    for name in ("connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, name, guard(getattr(socket.socket, name)))
    real_sendto = socket.socket.sendto

    def sendto(self: socket.socket, data: bytes, *args: object) -> int:
        address = args[-1]
        if self.family in (socket.AF_INET, socket.AF_INET6) and not loopback(address):
            raise ConnectionRefusedError(f"tests must not reach the network (tried {address})")
        return real_sendto(self, data, *args)

    monkeypatch.setattr(socket.socket, "sendto", sendto)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def sample_svs() -> Path:
    """The real CMU-1 small region, Aperio SVS (one level, 0.499 µm/px)."""
    return SAMPLE_DIR / "cmu_small_region.svs"


@pytest.fixture(scope="session")
def sample_pyramid() -> Path:
    """The same region as a 3-level tiled-JPEG pyramidal TIFF."""
    return SAMPLE_DIR / "cmu_small_region_pyramid.tif"


@pytest.fixture(scope="session")
def planted_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2048² synthetic slide at 0.5 µm/px: white background, a tissue block, two planted copies."""
    path = tmp_path_factory.mktemp("slides") / "planted.tif"
    source = PlantedSource([PLANTED_TISSUE, *PLANTED_PATTERNS])
    return write_pyramid(path, PLANTED_SIZE, PLANTED_SIZE, source, mpp=0.5, levels=3)


def run_as_nobody(func: Callable[[], str], timeout: float = 60.0) -> str:
    """Run ``func`` in a forked child that has dropped root to uid/gid 65534; return its text.

    The tests run as root, which may read and write everything, so permission cases need an
    unprivileged process. A fork (not a fresh interpreter) because the interpreter itself lives
    under /root, which "nobody" cannot traverse.
    """
    if os.geteuid() != 0:
        pytest.skip("needs root to drop privileges")
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_fd)
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            text = func()
        except BaseException as exc:  # noqa: BLE001 - report everything to the parent
            text = f"child raised {type(exc).__name__}: {exc}"
        os.write(write_fd, text.encode())
        os._exit(0)
    os.close(write_fd)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        raise TimeoutError("unprivileged child did not finish")
    with os.fdopen(read_fd, "rb") as f:
        return f.read().decode()


@pytest.fixture
def make_widget(make_napari_viewer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Factory: a shown viewer with ``slide_path`` open and the Virchow widget docked.

    The widget uses the tiny same-structure encoder with random weights and a private cache.
    """

    def make(slide_path: Path):
        from napari_virchow._qt.widget import VirchowWidget

        monkeypatch.setenv("NAPARI_VIRCHOW_CACHE", str(tmp_path / "cache"))
        viewer = make_napari_viewer(show=True)
        viewer.open(str(slide_path), plugin="napari-virchow")
        widget = VirchowWidget(viewer)
        viewer.window.add_dock_widget(widget)
        widget.encoder_combo.setCurrentText("virchow2-tiny")
        widget.random_check.setChecked(True)
        return widget

    return make
