from __future__ import annotations

import json

import numpy as np
import pytest

from napari_virchow.analysis.head_files import load_head, save_head
from napari_virchow.analysis.heads import LinearHead, MultiScaleHead, fit_head
from napari_virchow.errors import HeadError

DIM = 64


def two_classes(n: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two Gaussian classes, separated along a random direction, stored as float16."""
    rng = np.random.default_rng(seed)
    shift = rng.normal(size=DIM) * 0.6
    x = np.concatenate([rng.normal(size=(n, DIM)), rng.normal(size=(n, DIM)) + shift])
    y = np.array(["stroma"] * n + ["tumour"] * n)
    return x.astype(np.float16), y


@pytest.fixture(scope="module")
def head() -> LinearHead:
    x, y = two_classes()
    return fit_head(x, y, encoder="virchow2", weights_id="abc123")


def test_cross_validated_accuracy_on_separable_classes(head: LinearHead) -> None:
    assert head.metrics["cv_accuracy"] > 0.9
    assert head.metrics["cv_roc_auc"] > 0.95
    assert head.metrics["cv_folds"] == 5


def test_positive_class_defaults_to_tumour_like_name(head: LinearHead) -> None:
    assert head.classes == ["stroma", "tumour"]
    assert head.positive_class == "tumour"


def test_folded_scaler_matches_sklearn_pipeline() -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = two_classes(seed=1)
    head = fit_head(x, y, encoder="e", cv=2)
    ref = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    ref.fit(x.astype(np.float32), y)
    x32 = x.astype(np.float32)
    np.testing.assert_allclose(head.predict_proba(x), ref.predict_proba(x32), atol=1e-5)


def test_predict_proba_shape_dtype_and_rows_sum_to_one(head: LinearHead) -> None:
    x, _ = two_classes(n=5, seed=2)
    p = head.predict_proba(x)
    assert p.shape == (10, 2) and p.dtype == np.float32
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(head.positive_proba(x), p[:, 1])


def test_three_classes_softmax() -> None:
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(3, DIM)) * 2
    x = np.concatenate([c + rng.normal(size=(20, DIM)) for c in centres])
    y = np.repeat([0, 1, 2], 20)
    head = fit_head(x, y, classes=["necrosis", "stroma", "carcinoma"], encoder="e", cv=3)
    assert head.weights.shape == (3, DIM)
    assert head.positive_class == "carcinoma"
    assert head.metrics["cv_accuracy"] > 0.9
    np.testing.assert_allclose(head.predict_proba(x).sum(axis=1), 1.0, rtol=1e-5)


def test_unlabelled_ints_are_ignored_and_folds_reduced() -> None:
    x, y = two_classes(n=10)
    labels = np.where(y == "tumour", 1, 0)
    labels[:7] = -1  # only 3 stroma tiles stay labelled → 3 folds
    head = fit_head(x, labels, classes=["stroma", "tumour"], encoder="e")
    assert head.metrics["cv_folds"] == 3
    assert head.metrics["class_counts"] == {"stroma": 3, "tumour": 10}


def test_one_class_only_is_a_clear_error() -> None:
    x, _ = two_classes(n=5)
    with pytest.raises(HeadError, match=r"only one class \('tumour'\).*second class"):
        fit_head(x, ["tumour"] * 10, encoder="e")


def test_single_sample_class_is_refused() -> None:
    x, _ = two_classes(n=5)
    with pytest.raises(HeadError, match="at least 2 tiles per class"):
        fit_head(x, ["tumour"] * 9 + ["stroma"], encoder="e")


@pytest.mark.parametrize("suffix", [".safetensors", ".json"])
def test_save_load_round_trip(head: LinearHead, tmp_path, suffix: str) -> None:
    path = save_head(head, tmp_path / f"head{suffix}")
    loaded = load_head(path, encoder="virchow2")
    x, _ = two_classes(n=5, seed=4)
    np.testing.assert_allclose(loaded.predict_proba(x), head.predict_proba(x), atol=1e-6)
    assert (loaded.classes, loaded.positive_class, loaded.weights_id) == (
        head.classes, "tumour", "abc123")
    assert loaded.metrics["cv_accuracy"] == pytest.approx(head.metrics["cv_accuracy"])


def test_head_for_another_encoder_is_refused(head: LinearHead, tmp_path) -> None:
    path = save_head(head, tmp_path / "head.safetensors")
    with pytest.raises(HeadError, match="head.safetensors.*'virchow2'.*'virchow'"):
        load_head(path, encoder="virchow")


def test_safetensors_file_holds_no_pickle(head: LinearHead, tmp_path) -> None:
    path = save_head(head, tmp_path / "head.safetensors")
    raw = path.read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert set(header) == {"__metadata__", "weight", "bias"}
    assert b"\x80\x04" not in raw[:2] and b"pickle" not in raw


@pytest.mark.parametrize("content", [b"\x00garbage", b'{"format": "other"}'])
def test_corrupt_file_names_the_file(tmp_path, content: bytes) -> None:
    for suffix in (".safetensors", ".json"):
        path = tmp_path / f"broken{suffix}"
        path.write_bytes(content)
        with pytest.raises(HeadError, match=f"broken{suffix}"):
            load_head(path)


def test_unknown_extension_refused(head: LinearHead, tmp_path) -> None:
    with pytest.raises(HeadError, match=r"\.safetensors or \.json"):
        save_head(head, tmp_path / "head.pkl")


def test_save_and_load_never_touch_pickle(head: LinearHead, tmp_path, monkeypatch) -> None:
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used")

    for name in ("load", "loads", "dump", "dumps", "Unpickler", "Pickler"):
        monkeypatch.setattr(pickle, name, refuse)
    for suffix in (".safetensors", ".json"):
        load_head(save_head(head, tmp_path / f"h{suffix}"), encoder="virchow2")


def _probe(mpp: float, seed: int) -> LinearHead:
    x, y = two_classes(n=30, seed=seed)
    return fit_head(x, y, encoder="virchow2", weights_id="abc123", cv=3, mpp=mpp)


def _multi() -> MultiScaleHead:
    return MultiScaleHead.from_probes([_probe(0.5, 1), _probe(1.0, 2)])


@pytest.mark.parametrize("suffix", [".safetensors", ".json"])
def test_one_probe_per_magnification_round_trips(tmp_path, suffix: str) -> None:
    head = _multi()
    assert head.mpps == (0.5, 1.0) and head.mpp == 0.5
    assert head.for_mpp(1.0) is head.probes[1.0] and head.for_mpp(0.50000001) is head.probes[0.5]
    assert not np.allclose(head.probes[0.5].weights, head.probes[1.0].weights)
    loaded = load_head(save_head(head, tmp_path / f"head{suffix}"), encoder="virchow2")
    assert isinstance(loaded, MultiScaleHead) and loaded.mpps == (0.5, 1.0)
    x, _ = two_classes(n=5, seed=4)
    for m in (0.5, 1.0):
        np.testing.assert_allclose(loaded.for_mpp(m).predict_proba(x), head.for_mpp(m).predict_proba(x), atol=1e-6)
        assert loaded.cv_aucs[m] == pytest.approx(head.probes[m].cv_auc)
        assert loaded.for_mpp(m).mpp == m
    np.testing.assert_allclose(loaded.predict_proba(x), head.probes[0.5].predict_proba(x), atol=1e-6)  # its 0.5 probe
    with pytest.raises(HeadError, match=r"no probe at 2 µm/px \(it has 0.5, 1 µm/px\)"):
        loaded.for_mpp(2.0)


def test_probes_of_other_classes_cannot_share_a_head() -> None:
    x, y = two_classes(n=30, seed=1)
    other = fit_head(x, np.where(y == "tumour", "a", "b"), encoder="virchow2", cv=3, mpp=1.0)
    with pytest.raises(HeadError, match="1 µm/px"):
        MultiScaleHead.from_probes([_probe(0.5, 1), other])


@pytest.mark.parametrize("suffix", [".safetensors", ".json"])
def test_a_format_1_file_loads_as_a_head_at_half_a_micron(tmp_path, suffix: str) -> None:
    """A file as napari-virchow 0.2 wrote it (built by hand: format 1, top-level weight and bias, no mpp)."""
    from safetensors.numpy import save_file

    w, b = np.array([[1.0, -2.0, 0.5]], np.float32), np.array([0.25], np.float32)
    meta = {"format": "napari-virchow-head", "version": 1, "classes": ["normal", "tumour"], "encoder": "virchow2",
            "weights_id": "abc", "positive_class": "tumour", "metrics": {"cv_roc_auc": 0.8}, "dim": 3}
    path = tmp_path / f"old{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps({**meta, "weight": w.tolist(), "bias": b.tolist()}), encoding="utf-8")
    else:
        save_file({"weight": w, "bias": b}, str(path), metadata={"napari-virchow-head": json.dumps(meta)})
    head = load_head(path, encoder="virchow2")
    assert type(head) is LinearHead and head.mpp == 0.5 and head.cv_auc == 0.8
    x = np.array([[1.0, 0.0, 2.0]], np.float32)
    assert head.positive_proba(x)[0] == pytest.approx(1 / (1 + np.exp(-(1.0 + 1.0 + 0.25))))


def test_nearest_probe_for_a_level_without_one() -> None:
    head = _multi()
    assert head.nearest(1.0) is head.probes[1.0] and head.nearest(2.0) is head.probes[1.0]
    assert head.nearest(0.25) is head.probes[0.5] and head.nearest(0.7071) is head.probes[0.5]  # a tie: the finer
