"""The job bar's progress line says whether the encoder is fed: feed and encoder rates (#16)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests._qt.conftest import wait_idle

pytestmark = pytest.mark.timeout(300)

RATES = re.compile(r"feed ([\d,]+) tiles/s · encoder ([\d,.]+) tiles/s · waited ([\d.]+) s for pixels")


@pytest.mark.drives("compute_btn")
def test_progress_line_shows_feed_and_encoder_rates(qtbot, make_widget, sample_pyramid: Path, ui) -> None:
    w = make_widget(sample_pyramid)
    u = ui(w)
    w.viewer.reset_view()
    u.spin("limit_spin", 100000)
    u.click("compute_btn")
    wait_idle(qtbot, w)
    status = w.jobbar.status.text()
    assert status.startswith("done:")
    m = RATES.search(status)  # the run's rates stay on the final line
    assert m, status
    assert all(float(g.replace(",", "")) > 0 for g in m.groups()[:2])
    last = w.jobbar._last_batch  # the last batch event of that real run: the progress line drawn from it
    assert last is not None and last.feed and RATES.search(last.feed)
    w.jobbar.on_batch(last, None)
    line = w.jobbar.status.text()
    assert line.startswith("embedding:") and last.feed in line
