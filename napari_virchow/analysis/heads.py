"""Linear probes ("heads") on tile embeddings: fit and predict, one probe or one per magnification.

A head is plain ``weights`` / ``bias`` arrays plus metadata; :mod:`~napari_virchow.analysis.head_files`
saves and loads it as inspectable data (``.safetensors`` or ``.json``), never with pickle.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from napari_virchow.analysis.head_labels import clean_labels as _clean_labels
from napari_virchow.analysis.head_labels import json_safe as _json_safe
from napari_virchow.errors import HeadError
from napari_virchow.store.key import canonical_mpp

__all__ = ["FORMAT1_MPP", "HEAD_FORMAT", "HEAD_VERSION", "LinearHead", "MultiScaleHead", "fit_head"]

HEAD_FORMAT = "napari-virchow-head"
HEAD_VERSION = 2  # 2: one probe per magnification ("levels"); 1: a single probe, read as 0.5 µm/px
FORMAT1_MPP = 0.5  # the magnification every head of format 1 was fitted at
_POSITIVE_WORDS = ("tumour", "tumor", "cancer", "carcinoma", "malignan", "metasta", "positive")
_CHUNK = 65536  # rows per matmul: bounds the float32 copy of a float16 store


def _default_positive(classes: Sequence[str]) -> str:
    for name in classes:
        if any(word in name.lower() for word in _POSITIVE_WORDS):
            return name
    return classes[1] if len(classes) > 1 else classes[0]


@dataclass
class LinearHead:
    """A linear classifier on embeddings of one encoder.

    ``weights`` is ``(1, dim)`` for two classes (logit of ``classes[1]``) and ``(n_classes, dim)``
    otherwise (softmax); ``bias`` has one entry per row of ``weights``.
    """

    weights: np.ndarray
    bias: np.ndarray
    classes: list[str]
    encoder: str
    weights_id: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    positive_class: str | None = None
    mpp: float = FORMAT1_MPP  # the magnification (µm/px) of the embeddings it was fitted on

    def __post_init__(self) -> None:
        self.mpp = canonical_mpp(self.mpp)
        self.weights = np.atleast_2d(np.asarray(self.weights, dtype=np.float32))
        self.bias = np.asarray(self.bias, dtype=np.float32).reshape(-1)
        self.classes = [str(c) for c in self.classes]
        n_out = 1 if len(self.classes) == 2 else len(self.classes)
        if len(self.classes) < 2 or self.weights.shape[0] != n_out or self.bias.shape != (n_out,):
            raise HeadError(
                f"head shapes do not fit {len(self.classes)} classes: weights "
                f"{self.weights.shape}, bias {self.bias.shape} (expected {n_out} rows)"
            )
        if self.positive_class is None:
            self.positive_class = _default_positive(self.classes)
        elif self.positive_class not in self.classes:
            raise HeadError(f"positive class {self.positive_class!r} is not one of {self.classes}")

    @property
    def dim(self) -> int:
        """Embedding dimension the head expects."""
        return int(self.weights.shape[1])

    @property
    def cv_auc(self) -> float | None:
        """Cross-validated ROC AUC from fitting (one-vs-rest macro for > 2 classes); None if not cross-validated."""
        value = self.metrics.get("cv_roc_auc")
        return None if value is None else float(value)

    @property
    def cv_accuracy(self) -> float | None:
        """Cross-validated accuracy from fitting; None if not cross-validated."""
        value = self.metrics.get("cv_accuracy")
        return None if value is None else float(value)

    def predict_proba(self, embeddings: np.ndarray) -> np.ndarray:
        """Class probabilities, ``(n, n_classes)`` float32, columns in ``classes`` order."""
        x = np.asarray(embeddings)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise HeadError(
                f"head for encoder '{self.encoder}' expects embeddings of shape (n, {self.dim}), "
                f"got {x.shape}; were they computed with another encoder?"
            )
        out = np.empty((x.shape[0], len(self.classes)), dtype=np.float32)
        for start in range(0, x.shape[0], _CHUNK):
            logits = x[start : start + _CHUNK].astype(np.float32) @ self.weights.T + self.bias
            if len(self.classes) == 2:
                # Clip so exp never overflows on extreme logits.
                p1 = 1.0 / (1.0 + np.exp(-np.clip(logits[:, 0], -80.0, 80.0)))
                out[start : start + _CHUNK, 0] = 1.0 - p1
                out[start : start + _CHUNK, 1] = p1
            else:
                logits -= logits.max(axis=1, keepdims=True)
                e = np.exp(logits)
                out[start : start + _CHUNK] = e / e.sum(axis=1, keepdims=True)
        return out

    def positive_proba(self, embeddings: np.ndarray) -> np.ndarray:
        """Probability of ``positive_class`` per tile, ``(n,)`` float32 (what the heatmap shows)."""
        column = self.classes.index(str(self.positive_class))
        return self.predict_proba(embeddings)[:, column]

    def metadata(self) -> dict[str, Any]:
        """Everything but the arrays, JSON-serialisable."""
        return {
            "format": HEAD_FORMAT,
            "version": HEAD_VERSION,
            "classes": self.classes,
            "encoder": self.encoder,
            "weights_id": self.weights_id,
            "positive_class": self.positive_class,
            "metrics": _json_safe(self.metrics),
            "dim": self.dim,
            "mpp": self.mpp,
        }


@dataclass
class MultiScaleHead(LinearHead):
    """One probe per magnification (µm/px), same classes and encoder; build with :meth:`from_probes`.

    As a LinearHead it is its default probe (0.5 µm/px when it has one, else the finest), so code
    that knows one probe keeps working; :meth:`for_mpp` gives the probe of another level.
    """

    probes: dict[float, LinearHead] = field(default_factory=dict)

    @classmethod
    def from_probes(cls, probes: dict[float, LinearHead] | Sequence[LinearHead]) -> MultiScaleHead:
        """Group probes by their ``mpp`` (or the dict's keys); they must share classes and encoder."""
        items = probes.items() if isinstance(probes, dict) else [(p.mpp, p) for p in probes]
        by_mpp = {canonical_mpp(m): p for m, p in items}
        if not by_mpp:
            raise HeadError("a multi-magnification head needs at least one probe")
        first = next(iter(by_mpp.values()))
        def shape(h: LinearHead) -> tuple[Any, ...]:
            return h.classes, h.encoder, h.positive_class, h.dim

        for m, p in by_mpp.items():
            if shape(p) != shape(first):
                raise HeadError(f"the probe at {m:g} µm/px has classes {p.classes} on '{p.encoder}' (dim {p.dim}); "
                                f"every level needs {first.classes} on '{first.encoder}' (dim {first.dim})")
            p.mpp = m
        by_mpp = dict(sorted(by_mpp.items()))
        home = by_mpp.get(canonical_mpp(FORMAT1_MPP)) or next(iter(by_mpp.values()))
        return cls(weights=home.weights, bias=home.bias, classes=home.classes, encoder=home.encoder,
                   weights_id=home.weights_id, metrics=home.metrics, positive_class=home.positive_class,
                   mpp=home.mpp, probes=by_mpp)  # fmt: skip

    @property
    def mpps(self) -> tuple[float, ...]:
        """The magnifications (µm/px) it has a probe for, finest first."""
        return tuple(self.probes)

    @property
    def cv_aucs(self) -> dict[float, float | None]:
        """Cross-validated ROC AUC per magnification (None where not cross-validated)."""
        return {m: p.cv_auc for m, p in self.probes.items()}

    def for_mpp(self, mpp: float) -> LinearHead:
        """The probe fitted at ``mpp`` µm/px; HeadError naming the levels it has when there is none."""
        m = canonical_mpp(mpp)
        if m not in self.probes:
            have = ", ".join(f"{x:g}" for x in self.probes)
            raise HeadError(f"this head has no probe at {m:g} µm/px (it has {have} µm/px): train it on "
                            f"annotated tiles embedded at {m:g} µm/px, or view a level it has")  # fmt: skip
        return self.probes[m]

    def nearest(self, mpp: float) -> LinearHead:
        """The probe at ``mpp``, else the one of the nearest magnification (in log scale; the finer on a tie).

        What an overlay uses at a level the head was not fitted at, as a single-probe head is used
        at every level.
        """
        m = canonical_mpp(mpp)
        if m in self.probes:
            return self.probes[m]
        return self.probes[min(self.probes, key=lambda x: (abs(np.log2(x / m)), x))]

    def metadata(self) -> dict[str, Any]:
        """Shared fields, plus ``levels``: metrics per magnification (keys are ``f"{mpp:g}"``)."""
        meta = super().metadata()
        meta["levels"] = {f"{m:g}": {"metrics": _json_safe(p.metrics), "weights_id": p.weights_id}
                          for m, p in self.probes.items()}  # fmt: skip
        return meta




def fit_head(
    embeddings: np.ndarray,
    labels: np.ndarray | Sequence[Any],
    classes: Sequence[str] | None = None,
    *,
    encoder: str,
    weights_id: str | None = None,
    C: float = 1.0,  # noqa: N803 - scikit-learn's name for the inverse regularisation strength
    cv: int = 5,
    positive_class: str | None = None,
    seed: int = 0,
    mpp: float = FORMAT1_MPP,
) -> LinearHead:
    """Fit a logistic-regression probe with cross-validated accuracy and ROC AUC.

    Inputs are standardised (per-dimension mean/std) and the scaler is folded into the saved
    weights: Virchow embeddings concatenate the CLS token and the mean patch token, whose
    dimensions have very different scales, and without standardisation the L2 penalty ``C``
    would act mostly on the large ones. Folding keeps the head a single matmul.

    Parameters
    ----------
    embeddings : (n, dim) array
    labels : (n,) class names, or ints indexing ``classes``; negative ints / empty names are
        unlabelled and ignored.
    classes : class order (defaults to sorted names present); names without samples are dropped.
    encoder : name of the encoder that produced the embeddings (stored and checked on load).
    C : inverse L2 regularisation strength.
    cv : maximum number of stratified folds (reduced when a class has few samples).
    mpp : magnification (µm/px) of the embeddings, recorded on the head.

    Returns
    -------
    LinearHead
        ``metrics`` holds ``cv_accuracy``, ``cv_roc_auc`` (one-vs-rest macro for >2 classes),
        ``cv_folds``, ``n_samples`` and ``class_counts``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x_all = np.asarray(embeddings)
    if x_all.ndim != 2:
        raise ValueError(f"embeddings must be (n, dim), got shape {x_all.shape}")
    names, keep, order = _clean_labels(labels, classes)
    if keep.shape[0] != x_all.shape[0]:
        raise ValueError(f"{keep.shape[0]} labels for {x_all.shape[0]} embeddings")
    x = x_all[keep].astype(np.float32)
    present = set(names.tolist())
    unknown = present - set(order)
    if unknown:
        raise ValueError(f"labels {sorted(unknown)} are not in classes {order}")
    order = [c for c in order if c in present]
    if len(order) < 2:
        only = f" ('{order[0]}')" if order else ""
        raise HeadError(
            f"annotations contain only one class{only}; draw at least one region of a second class"
        )
    counts = {c: int((names == c).sum()) for c in order}
    rare = [c for c, n in counts.items() if n < 2]
    if rare:
        raise HeadError(
            f"class {rare[0]!r} has only {counts[rare[0]]} labelled tile; a head needs at least "
            f"2 tiles per class: draw a larger region of {rare[0]!r}"
        )
    index = {c: i for i, c in enumerate(order)}
    y = np.asarray([index[c] for c in names], dtype=np.int64)

    def model() -> Any:
        return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))

    folds = min(cv, min(counts.values()))
    metrics: dict[str, Any] = {"n_samples": int(len(y)), "class_counts": counts}
    if folds >= 2:
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        proba = cross_val_predict(model(), x, y, cv=splitter, method="predict_proba")
        metrics["cv_folds"] = folds
        metrics["cv_accuracy"] = float(accuracy_score(y, proba.argmax(axis=1)))
        if len(order) == 2:
            metrics["cv_roc_auc"] = float(roc_auc_score(y, proba[:, 1]))
        else:
            metrics["cv_roc_auc"] = float(roc_auc_score(y, proba, multi_class="ovr"))
    fitted = model().fit(x, y)
    scaler, lr = fitted[0], fitted[1]
    # logit = w·(x - mu)/sigma + b = (w/sigma)·x + (b - w·mu/sigma)
    w = lr.coef_ / scaler.scale_
    b = lr.intercept_ - w @ scaler.mean_
    return LinearHead(
        weights=w.astype(np.float32),
        bias=b.astype(np.float32),
        classes=order,
        encoder=encoder,
        weights_id=weights_id,
        metrics=metrics,
        positive_class=positive_class,
        mpp=mpp,
    )
