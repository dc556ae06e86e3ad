"""Run the Qt-free jobs of :mod:`napari_virchow.jobs` in napari workers, one at a time.

A job is a generator ``job(session, *args, cancel=event, **kwargs)`` yielding small event objects;
the runner starts it in a ``thread_worker`` and re-emits each event in the UI thread. A new request
while one runs cancels the running job (at its next batch) and starts once it has ended, so two jobs
never write to a store at once and nothing blocks the UI thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

from napari.qt.threading import create_worker
from qtpy.QtCore import QObject, Signal

from napari_virchow.session import SlideSession

__all__ = ["JobRunner"]

Job = Callable[..., Iterator[object]]


class JobRunner(QObject):
    """One worker at a time; ``event(session, ev)``, ``failed(exc)``, ``busy_changed(bool)``."""

    event = Signal(object, object)
    failed = Signal(object)
    busy_changed = Signal(bool)

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.worker: Any = None
        self.session: SlideSession | None = None
        self._cancel = threading.Event()
        self._pending: Callable[[], None] | None = None
        self.cancelled = False  # the last job was cancelled by the user

    @property
    def busy(self) -> bool:
        return self.worker is not None

    def run(self, session: SlideSession, job: Job, *args: Any, **kwargs: Any) -> None:
        """Start ``job`` now, or after the running one (which is cancelled) has ended."""
        if self.worker is not None:
            self._pending = lambda: self.run(session, job, *args, **kwargs)
            self._cancel.set()
            return
        self._cancel = threading.Event()
        self.cancelled = False
        # _ignore_errors: the widget decides how an error is shown (see errors.report)
        worker = create_worker(job, session, *args, cancel=self._cancel, _start_thread=False,
                               _ignore_errors=True, **kwargs)  # fmt: skip
        worker.yielded.connect(lambda ev: self.event.emit(session, ev))
        worker.errored.connect(self.failed.emit)
        worker.finished.connect(self._finished)
        self.worker, self.session = worker, session
        self.busy_changed.emit(True)
        worker.start()

    def cancel(self) -> bool:
        """Stop the running job after its current batch (what is stored stays stored).

        Only the job's cancel event is set (no ``worker.quit()``): the job then ends on its own,
        so its ``finally`` blocks run now — store closed, session lock released — instead of
        whenever an abandoned generator happens to be collected. Returns whether a job was running.
        """
        self._pending = None
        self._cancel.set()
        self.cancelled = self.worker is not None
        return self.cancelled

    def _finished(self) -> None:
        self.worker = self.session = None
        pending, self._pending = self._pending, None
        if pending is not None:
            pending()
        if self.worker is None:
            self.busy_changed.emit(False)
