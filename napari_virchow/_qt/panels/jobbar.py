"""The job bar under the panels: progress, status, the "compute N tiles?" question, and Cancel.

It sits outside the scroll area, so Cancel and the question are always in sight, and the question
is asked in place (a wrapped line and two buttons) without widening the dock.
"""

from __future__ import annotations

import time

from qtpy.QtCore import Signal
from qtpy.QtWidgets import QHBoxLayout, QLabel, QProgressBar, QPushButton, QVBoxLayout, QWidget

from napari_virchow import jobs as _jobs
from napari_virchow._qt.panels.base import named

__all__ = ["JobBar", "RateMeter", "duration"]


def duration(seconds: float) -> str:
    """``"40 s"``, ``"7 min"``, ``"1.5 h"``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class RateMeter:
    """Tiles per second measured over the batches of this session (per encoder settings).

    The first batch of a run pays for warm-up (threads, first reads), so a run's rate is measured
    from its first batch to its last; runs add up.
    """

    def __init__(self) -> None:
        self._totals: dict[object, tuple[int, float]] = {}
        self._last: tuple[object, int, float] | None = None  # key, tiles done, time of the last batch

    def start(self) -> None:
        """A run starts: its first batch only sets the clock."""
        self._last = None

    def batch(self, key: object, n_done: int) -> None:
        now = time.perf_counter()
        if self._last is not None and self._last[0] == key and n_done > self._last[1]:
            tiles, secs = self._totals.get(key, (0, 0.0))
            self._totals[key] = (tiles + n_done - self._last[1], secs + now - self._last[2])
        self._last = (key, n_done, now)

    def rate(self, key: object) -> float | None:
        tiles, secs = self._totals.get(key, (0, 0.0))
        return tiles / secs if tiles and secs > 0 else None


class JobBar(QWidget):
    """Progress bar, status line, in-place decision and Cancel."""

    decided = Signal(bool)  # True: compute them all; False: not now

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(6, 2, 6, 4)
        self.progress = named(QProgressBar(), "progress_bar")
        self.progress.setTextVisible(True)
        self.progress.hide()
        self.status = named(QLabel("open a slide, then Compute visible"), "status_label")
        self.status.setWordWrap(True)
        self.question = named(QLabel(), "decision_label")
        self.question.setWordWrap(True)
        self.yes_btn = named(QPushButton("Compute them"), "decision_compute_btn")
        self.no_btn = named(QPushButton("Not now"), "decision_skip_btn")
        self.yes_btn.clicked.connect(lambda: self._decide(True))
        self.no_btn.clicked.connect(lambda: self._decide(False))
        self.cancel_btn = named(QPushButton("Cancel"), "cancel_btn", "stop after this batch; what is computed is kept")
        self.cancel_btn.setEnabled(False)
        answers = QHBoxLayout()
        answers.addWidget(self.yes_btn)
        answers.addWidget(self.no_btn)
        answers.addStretch(1)
        answers.addWidget(self.cancel_btn)
        lay.addWidget(self.progress)
        lay.addWidget(self.status)
        lay.addWidget(self.question)
        lay.addLayout(answers)
        self._transient = False
        self.n_todo: int | None = None
        self._last_batch: _jobs.BatchDone | None = None
        self.ask(None)

    # --- states ------------------------------------------------------------------------------
    def set_status(self, text: str, *, transient: bool = False) -> None:
        self.status.setText(text)
        self._transient = transient

    def set_busy(self, busy: bool) -> None:
        """A job started (progress unknown until its first batch) or ended (bar hidden)."""
        self.cancel_btn.setEnabled(busy)
        if busy:
            self._last_batch = None
            self.progress.setRange(0, 0)  # "working", not a made-up count
            self.progress.setFormat("")
            self.progress.show()
            return
        self.progress.hide()
        if self._transient:  # "fitting the probe …" must not outlive the job
            self.set_status("")

    def ask(self, text: str | None, n_todo: int | None = None) -> None:
        """Show the question (``None`` hides it)."""
        self.n_todo = n_todo if text else None
        for w in (self.question, self.yes_btn, self.no_btn):
            w.setVisible(bool(text))
        self.question.setText(text or "")

    def _decide(self, yes: bool) -> None:
        self.ask(None)
        self.decided.emit(yes)

    # --- job events ----------------------------------------------------------------------------
    def on_stage(self, ev: _jobs.Stage) -> None:
        message = ev.message
        if ev.final and message.startswith("cancelled") and self._last_batch is not None:
            b = self._last_batch
            message = f"cancelled after {b.n_done:,} of {b.n_total:,} tiles; everything computed is kept"
        elif ev.final and self._last_batch is not None and self._last_batch.feed:
            message = f"{message}\n{self._last_batch.feed}"  # the rates of the run just finished stay in sight
        self.set_status(message, transient=not ev.final)

    def on_progress(self, n_done: int, n_total: int, what: str) -> None:
        """Progress of a job's other work (not embedding): ``what`` with ``n_done`` of ``n_total`` tiles."""
        self._last_batch = None  # a cancel now reports the job's own message
        self.progress.setRange(0, n_total)
        self.progress.setValue(n_done)
        self.progress.setFormat("%v / %m tiles")
        self.set_status(f"{what}: {n_done:,} of {n_total:,} tiles", transient=True)

    def on_batch(self, ev: _jobs.BatchDone, rate: float | None) -> None:
        self._last_batch = ev
        self.progress.setRange(0, ev.n_total)
        self.progress.setValue(ev.n_done)
        self.progress.setFormat("%v / %m tiles")
        speed = rate or ev.tiles_per_s
        left = (ev.n_total - ev.n_done) / speed if speed else None
        eta = f" · ≈ {duration(left)} left" if left else ""
        feed = f"\n{ev.feed}" if ev.feed else ""  # is the encoder fed? (both rates, waits for pixels)
        self.set_status(f"embedding: {speed:.1f} tiles/s{eta}{feed}", transient=True)
