"""File ▸ Open: slide files never ask which reader; a broken file is one plain notification."""

from __future__ import annotations

from pathlib import Path

import pytest

from napari_virchow._reader import METADATA_KEY

pytestmark = pytest.mark.timeout(120)


def _open_like_file_menu(viewer, path: Path) -> None:
    # what File ▸ Open does with the chosen files (it pops "Choose reader" on MultipleReaderError)
    from napari._qt.dialogs import qt_reader_dialog

    asked = []
    real = qt_reader_dialog.handle_gui_reading
    qt_reader_dialog.handle_gui_reading = lambda *a, **k: asked.append(a)
    try:
        import napari._qt.qt_viewer as qt_viewer

        qt_viewer.handle_gui_reading, before = qt_reader_dialog.handle_gui_reading, qt_viewer.handle_gui_reading
        viewer.window._qt_viewer._qt_open([str(path)], stack=False)
    finally:
        qt_reader_dialog.handle_gui_reading = real
        qt_viewer.handle_gui_reading = before
    assert not asked, "napari asked which reader to use"


def test_slide_files_open_with_the_plugin_without_asking(make_napari_viewer, sample_svs: Path,
                                                        sample_pyramid: Path) -> None:
    from napari.settings import get_settings

    from napari_virchow._qt.widget import VirchowWidget

    viewer = make_napari_viewer(show=True)
    settings = get_settings().plugins
    settings.extension2reader = {"*.tiff": "napari"}  # a choice the user made stays theirs
    VirchowWidget(viewer)  # the plugin is loaded
    assert settings.extension2reader["*.tiff"] == "napari"
    assert settings.extension2reader["*.svs"] == settings.extension2reader["*.tif"] == "napari-virchow"
    _open_like_file_menu(viewer, sample_svs)
    _open_like_file_menu(viewer, sample_pyramid)
    assert [METADATA_KEY in layer.metadata for layer in viewer.layers] == [True, True]


def test_a_broken_slide_is_one_notification_without_traceback(make_napari_viewer, tmp_path: Path) -> None:
    from napari.utils.notifications import ErrorNotification, notification_manager

    from napari_virchow._reader import prefer_this_reader

    viewer = make_napari_viewer(show=True)
    prefer_this_reader()
    broken = tmp_path / "cut.svs"
    broken.write_bytes(b"II*\x00" + bytes(64))
    seen = []
    notification_manager.notification_ready.connect(seen.append)
    try:
        _open_like_file_menu(viewer, broken)
    finally:
        notification_manager.notification_ready.disconnect(seen.append)
    errors = [n for n in seen if n.severity == "error"]
    assert len(errors) == 1 and "cut.svs" in errors[0].message, [n.message for n in seen]
    assert not isinstance(errors[0], ErrorNotification)  # no "View Traceback"
    assert not len(viewer.layers)


def test_an_unexpected_error_keeps_its_traceback() -> None:
    from napari.utils.notifications import ErrorNotification, notification_manager

    from napari_virchow._qt.errors import gui_message, report
    from napari_virchow.errors import SlideError

    seen = []
    notification_manager.notification_ready.connect(seen.append)
    try:
        report(ZeroDivisionError("a bug"))
    finally:
        notification_manager.notification_ready.disconnect(seen.append)
    assert len(seen) == 1 and isinstance(seen[0], ErrorNotification)
    cli = SlideError("x.tif does not record its resolution (µm per pixel), which analysis needs to tile at the "
                     "model's magnification. Pass it explicitly: `--mpp-override 0.25` (CLI), the µm/px field in "
                     "the widget, or `Slide(path, mpp=0.25)`.")  # fmt: skip
    assert "--mpp" not in gui_message(cli) and "'µm/px override'" in gui_message(cli)
