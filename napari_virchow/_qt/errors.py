"""How the viewer shows errors: expected ones as one plain notification, the rest with a traceback."""

from __future__ import annotations

import re

from napari.utils.notifications import notification_manager, show_error

from napari_virchow.errors import VirchowError

__all__ = ["gui_message", "report"]

MPP_FIELD = "'µm/px override' in the Slide and model panel"

# The core's messages name every way to fix a problem (CLI flag, widget field, Python argument);
# in the viewer only the widget field is useful.
_REWRITES = (
    (re.compile(r"Pass it explicitly: `--mpp-override [^`]*` \(CLI\), the µm/px field in the widget, "
                r"or `Slide\(path, mpp=[^`]*\)`\."),
     f"Type it in {MPP_FIELD} (0.25 for a 40× scan, 0.5 for 20×)."),
    (re.compile(r"\(`--mpp-override`, the µm/px field in the widget, or `Slide\(path, mpp=\.\.\.\)`\)"),
     f"({MPP_FIELD})"),
)  # fmt: skip


def gui_message(exc: BaseException) -> str:
    """The message of an expected error, phrased for the viewer."""
    text = str(exc)
    for pattern, replacement in _REWRITES:
        text = pattern.sub(replacement, text)
    return text


def report(exc: BaseException) -> None:
    """One notification: the whole message for our errors, napari's traceback for bugs."""
    if isinstance(exc, VirchowError):
        show_error(gui_message(exc))
    else:  # a bug: keep the traceback ("View Traceback") so it can be reported
        notification_manager.receive_error(type(exc), exc, exc.__traceback__)
