"""Slide heads (ABMIL) on bags of embeddings: cross-validation, determinism, files, refusals.

Bags here are synthetic embeddings (a few tiles of positive slides shifted along one direction);
the synthetic cohort of real slides and the tiny encoder is in test_mil_slides.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from napari_virchow.analysis.head_files import save_head
from napari_virchow.analysis.heads import fit_head
from napari_virchow.analysis.mil import SlideHead
from napari_virchow.analysis.mil_io import load_slide_head, save_slide_head
from napari_virchow.analysis.mil_train import cv_metric, fit_slide_head
from napari_virchow.errors import HeadError

DIM = 16
META = {"encoder": "virchow2-tiny", "weights_digest": "random-seed7", "mpp": 0.5, "tile_size": 224}


def cohort(n: int = 16, seed: int = 0, classes: tuple[str, ...] = ("normal", "tumour")) -> tuple[list, list, list]:
    """Bags of 30-60 tiles; slides of class k > 0 have 5 tiles shifted along direction k (the planted ones)."""
    rng = np.random.default_rng(seed)
    directions = rng.normal(0, 1, (len(classes), DIM)) * 2.0
    bags, labels, planted = [], [], []
    for i in range(n):
        k = i % len(classes)
        x = rng.normal(0, 1, (int(rng.integers(30, 60)), DIM)).astype(np.float32)
        mask = np.zeros(len(x), bool)
        if k:
            mask[rng.choice(len(x), 5, replace=False)] = True
            x[mask] += directions[k]
        bags.append(x.astype(np.float16))
        labels.append(classes[k])
        planted.append(mask)
    return bags, labels, planted


@pytest.fixture(scope="module")
def fitted() -> tuple[SlideHead, list, list, list]:
    bags, labels, planted = cohort()
    return fit_slide_head(bags, labels, folds=4, epochs=15, **META), bags, labels, planted


def test_cross_validated_auc_with_interval_and_attention_on_planted_tiles(fitted) -> None:
    from sklearn.metrics import roc_auc_score

    head, bags, labels, planted = fitted
    m = head.metrics
    assert m["cv_metric"] == "auc" and m["cv_folds"] == 4 and m["n_slides"] == 16
    assert m["cv_value"] >= 0.95 and m["cv_ci_low"] <= m["cv_value"] <= m["cv_ci_high"] <= 1.0
    assert head.cv_metric == ("auc", m["cv_value"], m["cv_ci_low"], m["cv_ci_high"])
    assert head.classes == ("normal", "tumour") and head.positive_class == "tumour"
    for bag, label, mask in zip(bags, labels, planted, strict=True):
        p = head.predict(bag)
        assert set(p.probabilities) == {"normal", "tumour"} and sum(p.probabilities.values()) == pytest.approx(1)
        assert p.attention.dtype == np.float32 and p.attention.shape == (len(bag),)
        assert float(p.attention.sum()) == pytest.approx(1.0, abs=1e-5)
        assert p.label == label
        if mask.any():
            assert roc_auc_score(mask, p.attention) >= 0.9


def test_two_fits_with_one_seed_are_identical_and_another_seed_differs() -> None:
    bags, labels, _ = cohort(8)
    a = fit_slide_head(bags, labels, folds=2, epochs=3, seed=3, bootstrap=50, **META)
    b = fit_slide_head(bags, labels, folds=2, epochs=3, seed=3, bootstrap=50, **META)
    c = fit_slide_head(bags, labels, folds=2, epochs=3, seed=4, bootstrap=50, **META)
    assert a.state.keys() == b.state.keys()
    assert all(np.array_equal(a.state[k], b.state[k]) for k in a.state)
    assert a.metrics == b.metrics
    pa, pb = a.predict(bags[1]), b.predict(bags[1])
    assert pa.probabilities == pb.probabilities and np.array_equal(pa.attention, pb.attention)
    assert not np.array_equal(a.state["embed.weight"], c.state["embed.weight"])


def test_multi_class_reports_balanced_accuracy() -> None:
    bags, labels, _ = cohort(12, classes=("a", "b", "c"))
    head = fit_slide_head(bags, labels, folds=2, epochs=20, bootstrap=100, **META)
    assert head.metrics["cv_metric"] == "balanced_accuracy" and "cv_auc" not in head.metrics
    assert 0 <= head.metrics["cv_value"] <= 1 and head.classes == ("a", "b", "c")
    assert len(head.predict(bags[0]).probabilities) == 3


def test_fold_column_is_used() -> None:
    bags, labels, _ = cohort(8)
    head = fit_slide_head(bags, labels, fold_ids=["x", "x", "y", "y", "z", "z", "x", "y"], epochs=2, bootstrap=0,
                          **META)  # fmt: skip
    assert head.metrics["cv_folds"] == 3 and head.metrics["cv_bootstrap"] == 0


def test_metrics_match_scikit_learn() -> None:
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    from napari_virchow.analysis.mil_train import _auc, _balanced_accuracy

    rng = np.random.default_rng(0)
    y, s = np.array([0, 1] * 15), np.round(rng.random(30), 1)  # ties included
    assert _auc(y == 1, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    y3, p3 = rng.integers(0, 3, 40), rng.integers(0, 3, 40)
    assert _balanced_accuracy(y3, p3, 3) == pytest.approx(balanced_accuracy_score(y3, p3), abs=1e-12)


def test_bootstrap_interval_is_seeded_and_brackets_the_value() -> None:
    y = np.array([0, 1] * 10)
    p = np.stack([1 - np.linspace(0, 1, 20), np.linspace(0, 1, 20)], axis=1)
    a, b = cv_metric(y, p, bootstrap=200, seed=1), cv_metric(y, p, bootstrap=200, seed=1)
    assert a == b and a["cv_ci_low"] <= a["cv_value"] <= a["cv_ci_high"]


@pytest.mark.parametrize(("labels", "kw", "match"), [
    (["a"] * 8, {}, "every slide is labelled 'a'"),
    (["a", "b"] * 2, {"folds": 5}, "4 slides for 5-fold"),
    (["a"] * 6 + ["b"] * 2, {"folds": 3}, "class 'b' has 2 slide"),
    (["a", "b"] * 4, {"classes": ["a"]}, r"labels \['b'\] are not among the classes"),
    (["a", "b"] * 4, {"fold_ids": [0] * 8}, "every slide is in fold '0'"),
    (["a", ""] * 4, {}, "empty label"),
])  # fmt: skip
def test_refusals(labels: list[str], kw: dict, match: str) -> None:
    bags, _, _ = cohort(len(labels))
    with pytest.raises(HeadError, match=match):
        fit_slide_head(bags, labels, epochs=1, **{**META, **kw})


def test_bad_bags_are_refused() -> None:
    bags, labels, _ = cohort(8)
    with pytest.raises(HeadError, match="slide 3's bag has shape"):
        fit_slide_head([*bags[:2], np.zeros((0, DIM)), *bags[3:]], labels, folds=2, epochs=1, **META)
    with pytest.raises(HeadError, match="different sizes"):
        fit_slide_head([*bags[:2], np.zeros((4, DIM + 1)), *bags[3:]], labels, folds=2, epochs=1, **META)
    with pytest.raises(HeadError, match="7 slides but 8 labels"):
        fit_slide_head(bags[:7], labels, folds=2, epochs=1, **META)


def test_check_compatible_names_what_differs(fitted) -> None:
    head = fitted[0]
    head.check_compatible(encoder="virchow2-tiny", weights_digest="random-seed7", mpp=0.5, tile_size=224)
    with pytest.raises(HeadError, match="trained on 'virchow2-tiny' embeddings .* 'virchow2'"):
        head.check_compatible(encoder="virchow2", weights_digest="random-seed7", mpp=0.5)
    with pytest.raises(HeadError, match="weights random-seed7 .* weights abc"):
        head.check_compatible(encoder="virchow2-tiny", weights_digest="abc", mpp=0.5)
    with pytest.raises(HeadError, match="trained at 0.5 µm/px .* 1 µm/px"):
        head.check_compatible(encoder="virchow2-tiny", weights_digest="random-seed7", mpp=1.0)
    with pytest.raises(HeadError, match="224-px tiles"):
        head.check_compatible(encoder="virchow2-tiny", weights_digest="random-seed7", mpp=0.5, tile_size=256)
    with pytest.raises(HeadError, match=r"shape \(n ≥ 1, 16\)"):
        head.predict(np.zeros((3, 8), np.float32))


def test_file_round_trip_without_pickle(fitted, tmp_path: Path) -> None:
    from safetensors import safe_open

    head, bags, _, _ = fitted
    path = save_slide_head(head, tmp_path / "head.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["head.safetensors"]  # atomic: no temporary left
    with safe_open(str(path), framework="np") as f:
        meta = json.loads(f.metadata()["napari-virchow-slide-head"])
    assert meta["encoder"] == "virchow2-tiny" and meta["weights_digest"] == "random-seed7" and meta["mpp"] == 0.5
    assert meta["tile_size"] == 224 and meta["classes"] == ["normal", "tumour"] and "napari_virchow_version" in meta
    assert meta["metrics"]["cv_value"] == head.metrics["cv_value"]
    loaded = load_slide_head(path)
    assert loaded.classes == head.classes and loaded.metrics == head.metrics and loaded.mpp == head.mpp
    p, q = head.predict(bags[3]), loaded.predict(bags[3])
    assert p.probabilities == q.probabilities and np.array_equal(p.attention, q.attention)


def test_bad_files_are_refused(fitted, tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    head = fitted[0]
    with pytest.raises(HeadError, match="name the file head.safetensors"):
        save_slide_head(head, tmp_path / "head.json")
    nan = SlideHead.__new__(SlideHead)
    nan.__dict__.update(head.__dict__, state={**head.state, "embed.bias": head.state["embed.bias"] * np.nan})
    with pytest.raises(HeadError, match=r"\['embed.bias'\] hold NaN"):
        save_slide_head(nan, tmp_path / "nan.safetensors")
    assert not (tmp_path / "nan.safetensors").exists()
    # a file whose weights were damaged to NaN after saving
    path = save_slide_head(head, tmp_path / "h.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        meta, arrays = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    arrays["classifier.weight"][0, 0] = np.inf
    save_file(arrays, str(tmp_path / "inf.safetensors"), metadata=meta)
    with pytest.raises(HeadError, match="inf.safetensors: .*NaN or infinite"):
        load_slide_head(tmp_path / "inf.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(HeadError, match="junk.safetensors: not a napari-virchow slide head"):
        load_slide_head(tmp_path / "junk.safetensors")
    with pytest.raises(HeadError, match="not found"):
        load_slide_head(tmp_path / "absent.safetensors")
    rng = np.random.default_rng(0)
    probe = fit_head(rng.normal(0, 1, (20, 4)), ["a", "b"] * 10, encoder="virchow2-tiny", cv=2)
    save_head(probe, tmp_path / "probe.safetensors")
    with pytest.raises(HeadError, match="a tile head"):
        load_slide_head(tmp_path / "probe.safetensors")
