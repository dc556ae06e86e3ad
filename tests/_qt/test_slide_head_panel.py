"""'Slide prediction' driven through Qt: load a slide head, embed what it needs, see probabilities and attention."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from qtpy.QtWidgets import QFileDialog

from napari_virchow import jobs as _jobs
from tests._qt.conftest import cells, drawn_past_slide, wait_idle

pytestmark = pytest.mark.timeout(300)


def _slide_head(path: Path, *, weights_digest: str, mpp: float = 1.0, encoder: str = "virchow2-tiny",
                seed: int = 0) -> Path:  # fmt: skip
    """A real ABMIL slide head (random weights, the tiny encoder's 96-d embeddings) saved to ``path``."""
    import torch

    from napari_virchow.analysis.mil import AttentionMIL, SlideHead, state_of
    from napari_virchow.analysis.mil_io import save_slide_head

    torch.manual_seed(seed)
    state = state_of(AttentionMIL(96, 2, hidden=16, attention=8, dropout=0.0))
    head = SlideHead(encoder=encoder, weights_digest=weights_digest, mpp=mpp, tile_size=224,
                     classes=("benign", "carcinoma"), state=state,
                     config={"dim": 96, "hidden": 16, "attention": 8, "dropout": 0.0},
                     metrics={"cv_metric": "auc", "cv_value": 0.97, "cv_ci_low": 0.9, "cv_ci_high": 1.0})  # fmt: skip
    return save_slide_head(head, path)


def _open_dialog(monkeypatch, path: Path) -> None:
    monkeypatch.setattr(QFileDialog, "getOpenFileName", staticmethod(lambda *a, **k: (str(path), "")))


@pytest.mark.drives("load_slide_head_btn", "predict_slide_btn")
def test_slide_head_embeds_at_its_magnification_and_shows_probability_and_attention(
        qtbot, planted_widget, ui, tmp_path: Path, monkeypatch) -> None:  # fmt: skip
    from napari_virchow.analysis.head_files import save_head
    from napari_virchow.analysis.heads import LinearHead
    from napari_virchow.analysis.mil_io import load_slide_head

    w, u = planted_widget, ui(planted_widget)
    session = w.session()
    assert not u["predict_slide_btn"].isEnabled()  # nothing to predict with yet
    # a tile probe first: its heatmap must stay when the slide head's attention comes
    probe = LinearHead(np.ones((1, 96)) * 0.01, [0.0], ["normal", "tumour"], encoder="virchow2-tiny")
    w.head.load_head(save_head(probe, tmp_path / "probe.safetensors"))
    wait_idle(qtbot, w)
    path = _slide_head(tmp_path / "slide.safetensors", weights_digest=session.weights_id, mpp=1.0)
    _open_dialog(monkeypatch, path)
    u.click("load_slide_head_btn")
    wait_idle(qtbot, w)

    grid = session.grid_at(1.0)  # the head's magnification, not the encoder's 0.5 µm/px
    assert session.missing(grid.tissue_indices, mpp=1.0).size == 0  # every tissue tile embedded at 1 µm/px
    assert "slide head for virchow2-tiny at 10× (1 µm/px): benign vs carcinoma" in w.slide_head.head_label.text()
    assert "cross-validated AUC 0.97 [0.90, 1.00]" in w.slide_head.head_label.text()
    idx, emb = session.embedded(tissue_only=True, mpp=1.0)
    expected = load_slide_head(path).predict(emb)
    text = w.slide_head.prediction_label.text()
    for cls, p in expected.probabilities.items():
        assert f"{cls} {p:.2f}" in text
    assert f"<b>{expected.label} " in text and f"over {len(idx):,} tissue tiles at 10× (1 µm/px)" in text

    attention = w.viewer.layers["attention · planted"]
    t = grid.tile_size_l0
    # one cell per 224-µm tile, split 7× where the slide's edge (256 px into the last tiles) cuts them
    assert t == 448 and tuple(attention.scale) == pytest.approx((t * 0.5 / 7, t * 0.5 / 7))
    assert drawn_past_slide(attention, w.viewer.layers["planted"]) == 0
    rows, cols = grid.grid_shape
    shown = cells(attention, t * 0.5)[:rows, :cols].ravel()
    np.testing.assert_allclose(shown[idx], expected.attention / expected.attention.max(), rtol=1e-5)
    assert np.nanmax(shown) == pytest.approx(1.0) and np.all(np.isnan(np.delete(shown, idx)))
    assert attention.colorbar.visible and w.viewer.canvas.overlays.text.text == "colour bar: attention"
    heat = w.viewer.layers["probability · planted"]  # the tile-level heatmap is still there
    assert heat.visible and not heat.colorbar.visible
    attention.visible = False
    assert heat.colorbar.visible and w.viewer.canvas.overlays.text.text == "colour bar: P(tumour)"

    calls: list[int] = []
    real = session.encoder().embed_tensor
    session.encoder().embed_tensor = lambda x: calls.append(len(x)) or real(x)
    u.click("predict_slide_btn")  # again: everything is stored, nothing is embedded
    wait_idle(qtbot, w)
    assert calls == [] and f"{expected.label} {expected.probabilities[expected.label]:.2f}" in (
        w.slide_head.prediction_label.text())


@pytest.mark.drives("batch_spin", "load_slide_head_btn", "cancel_btn", "predict_slide_btn")
def test_embedding_for_the_slide_head_shows_progress_and_can_be_cancelled(
        qtbot, planted_widget, ui, tmp_path: Path, monkeypatch) -> None:  # fmt: skip
    w, u = planted_widget, ui(planted_widget)
    session = w.session()
    u.spin("batch_spin", 2)  # many small batches: the cancel lands long before the end
    session = w.session()
    _open_dialog(monkeypatch, _slide_head(tmp_path / "slide.safetensors", weights_digest=session.weights_id, mpp=0.5))
    u.click("load_slide_head_btn")
    qtbot.waitUntil(lambda: isinstance(w.last_event, _jobs.BatchDone), timeout=60_000)
    assert w.jobbar.progress.isVisible() and w.jobbar.progress.maximum() == w.last_event.n_total
    u.click("cancel_btn")
    wait_idle(qtbot, w)
    done = session.store().n_done
    assert 0 < done < session.grid.n_tissue  # stopped early; what was embedded is kept
    assert w.jobbar.status.text().startswith("cancelled") and w.slide_head.prediction_label.text() == ""
    assert "attention · planted" not in w.viewer.layers
    u.click("predict_slide_btn")  # the rest, then the prediction
    wait_idle(qtbot, w)
    assert session.store().n_done == session.grid.n_tissue and "attention · planted" in w.viewer.layers


@pytest.mark.drives("load_slide_head_btn")
def test_a_slide_head_that_does_not_fit_is_one_clear_notification(qtbot, planted_widget, ui, tmp_path: Path,
                                                                  monkeypatch) -> None:  # fmt: skip
    w, u = planted_widget, ui(planted_widget)
    shown: list[str] = []
    monkeypatch.setattr("napari_virchow._qt.errors.show_error", shown.append)
    session = w.session()
    digest = session.weights_id
    cases = [
        (_slide_head(tmp_path / "enc.safetensors", weights_digest="x", encoder="virchow2"), "switch the encoder"),
        (_slide_head(tmp_path / "mag.safetensors", weights_digest=digest, mpp=0.25), "cannot give 0.25 µm/px"),
        (_slide_head(tmp_path / "w.safetensors", weights_digest="other-weights"), "other-weights"),
    ]
    (tmp_path / "junk.safetensors").write_bytes(b"not a head")
    cases.append((tmp_path / "junk.safetensors", "junk.safetensors"))
    for path, words in cases:
        _open_dialog(monkeypatch, path)
        u.click("load_slide_head_btn")
        wait_idle(qtbot, w)
        assert len(shown) == 1 and words in shown[0], (words, shown)
        shown.clear()
        assert "attention · planted" not in w.viewer.layers and w.slide_head.prediction_label.text() == ""
    tissue = session.grid_at(1.0).tissue_indices
    assert len(session.missing(tissue, mpp=1.0)) == len(tissue)  # nothing was embedded for a head refused


def test_loading_by_path_is_deterministic(qtbot, planted_widget, tmp_path: Path) -> None:
    """Loading by path (as a script or test does): the same head gives the same numbers twice, at 2 µm/px too."""
    w = planted_widget
    session = w.session()
    path = _slide_head(tmp_path / "slide.safetensors", weights_digest=session.weights_id, mpp=2.0)
    w.slide_head.load(path)
    wait_idle(qtbot, w)
    first = w.slide_head.prediction_label.text()
    w.slide_head.load(path)
    wait_idle(qtbot, w)
    assert first and w.slide_head.prediction_label.text() == first
