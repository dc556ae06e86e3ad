"""Slide-level heads: a gated-attention MIL aggregator (ABMIL) over a slide's tile embeddings.

Pathology labels usually exist per slide, not per region. A :class:`SlideHead` turns the bag of
a slide's tissue-tile embeddings into class probabilities, and says which tiles it attended to
(Ilse, Tomczak & Welling 2018, "Attention-based deep multiple instance learning", gated variant):

    h_i = dropout(ReLU(W1 · (x_i - mean) / std))                  (hidden, per tile)
    a_i = softmax_i( w · (tanh(V h_i) ⊙ sigmoid(U h_i)) )          (attention, sums to 1)
    z   = Σ_i a_i h_i  →  logits = C z  →  softmax                 (one slide)

The head is plain arrays (a ``state`` dict of float32 numpy arrays) plus metadata, so its file
(:mod:`napari_virchow.analysis.mil_io`) is inspectable and loading it runs no code. Training
lives in :mod:`napari_virchow.analysis.mil_train`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from napari_virchow.errors import HeadError
from napari_virchow.store.key import canonical_mpp

__all__ = ["AttentionMIL", "SlideHead", "SlidePrediction", "state_of"]

_CHUNK = 8192  # tiles per first-layer matmul at prediction: bounds the float32 copy of a big bag
_SMALL = 2_000_000  # tiles × dim under which one torch thread is faster than several


def _module_class() -> type:
    from napari_virchow._torch import torch

    nn = torch.nn

    class _AttentionMIL(nn.Module):
        """Gated-attention MIL: ``forward(x[n, dim]) -> (logits[n_classes], attention[n])``."""

        def __init__(self, dim: int, n_classes: int, *, hidden: int, attention: int, dropout: float) -> None:
            super().__init__()
            self.register_buffer("mean", torch.zeros(dim))
            self.register_buffer("std", torch.ones(dim))
            self.embed = nn.Linear(dim, hidden)
            self.drop = nn.Dropout(dropout)
            self.attn_v = nn.Linear(hidden, attention)
            self.attn_u = nn.Linear(hidden, attention)
            self.attn_w = nn.Linear(attention, 1)
            self.classifier = nn.Linear(hidden, n_classes)

        def hidden(self, x: torch.Tensor) -> torch.Tensor:
            mean, std = self.get_buffer("mean"), self.get_buffer("std")
            return self.drop(torch.relu(self.embed((x - mean) / std)))

        def pool(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            scores = self.attn_w(torch.tanh(self.attn_v(h)) * torch.sigmoid(self.attn_u(h))).squeeze(-1)
            attention = torch.softmax(scores, dim=0)
            return self.classifier(attention @ h), attention

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.pool(self.hidden(x))

    return _AttentionMIL


_CLASS: type | None = None


def AttentionMIL(dim: int, n_classes: int, *, hidden: int = 128, attention: int = 64,  # noqa: N802 - a class factory
                 dropout: float = 0.25) -> Any:  # fmt: skip
    """A fresh gated-attention MIL torch module, initialised from torch's global RNG.

    ``module(x[n, dim]) -> (logits[n_classes], attention[n])``; ``module.hidden`` / ``module.pool``
    are its two halves. The class is defined on first use, so importing this file does not import torch.
    """
    global _CLASS
    if _CLASS is None:
        _CLASS = _module_class()
    return _CLASS(dim, n_classes, hidden=hidden, attention=attention, dropout=dropout)


@dataclass
class SlidePrediction:
    """One slide's prediction: class → probability, and the attention of each tile of the bag (sums to 1)."""

    probabilities: dict[str, float]
    attention: np.ndarray  # (n,) float32, in the order of the embeddings given

    @property
    def label(self) -> str:
        """The most probable class."""
        return max(self.probabilities, key=lambda c: self.probabilities[c])


@dataclass
class SlideHead:
    """A trained slide-level ABMIL head on embeddings of one encoder + weights at one magnification.

    ``state`` holds the module's tensors as float32 numpy arrays (``mean``, ``std``, ``embed.weight``,
    ...); ``config`` its sizes (``dim``, ``hidden``, ``attention``, ``dropout``). ``metrics`` is
    what :func:`~napari_virchow.analysis.mil_train.fit_slide_head` measured (cross-validated AUC
    or balanced accuracy with its confidence interval, folds, class counts).
    """

    encoder: str
    weights_digest: str
    mpp: float
    tile_size: int
    classes: tuple[str, ...]
    state: dict[str, np.ndarray]
    config: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    positive_class: str | None = None
    _module: Any = field(default=None, init=False, repr=False, compare=False)
    _first: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.mpp = canonical_mpp(self.mpp)
        self.tile_size = int(self.tile_size)
        self.classes = tuple(str(c) for c in self.classes)
        self.state = {str(k): np.asarray(v, dtype=np.float32) for k, v in self.state.items()}
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise HeadError(f"a slide head needs at least two distinct classes, got {list(self.classes)}")
        if self.positive_class is None:
            from napari_virchow.analysis.heads import _default_positive

            self.positive_class = _default_positive(self.classes)
        elif self.positive_class not in self.classes:
            raise HeadError(f"positive class {self.positive_class!r} is not one of {list(self.classes)}")
        bad = [k for k, v in self.state.items() if not np.all(np.isfinite(v))]
        if bad:
            raise HeadError(f"slide head weights {bad} hold NaN or infinite values: training diverged; "
                            "fit the head again (fewer epochs or a smaller learning rate)")  # fmt: skip
        expected = _shapes(self.dim, len(self.classes), int(self.config.get("hidden", 0)),
                           int(self.config.get("attention", 0)))  # fmt: skip
        got = {k: tuple(v.shape) for k, v in self.state.items()}
        if got != expected:
            raise HeadError(f"slide head arrays do not fit its sizes {self.config} and {len(self.classes)} "
                            f"classes (got {got}); the file is damaged: fit the head again")  # fmt: skip

    @property
    def dim(self) -> int:
        """Embedding dimension the head expects."""
        return int(self.config["dim"])

    @property
    def cv_metric(self) -> tuple[str, float, float, float] | None:
        """``(name, value, ci_low, ci_high)`` of the cross-validated metric ("auc" or "balanced_accuracy")."""
        m = self.metrics
        if m.get("cv_metric") is None or m.get("cv_value") is None:
            return None
        return str(m["cv_metric"]), float(m["cv_value"]), float(m["cv_ci_low"]), float(m["cv_ci_high"])

    def check_compatible(self, *, encoder: str, weights_digest: str, mpp: float,
                         tile_size: int | None = None) -> None:  # fmt: skip
        """Raise HeadError naming what differs (encoder, weights, µm/px, tile size) and the fix."""
        if encoder != self.encoder:
            raise HeadError(f"this slide head was trained on '{self.encoder}' embeddings but the slide is embedded "
                            f"with '{encoder}': switch the encoder to '{self.encoder}' or fit a slide head on "
                            f"'{encoder}' embeddings")  # fmt: skip
        if weights_digest != self.weights_digest:
            raise HeadError(f"this slide head was trained on embeddings of '{self.encoder}' weights "
                            f"{self.weights_digest} but the encoder has weights {weights_digest}: load those "
                            "weights or fit a slide head on these")  # fmt: skip
        if canonical_mpp(mpp) != self.mpp:
            raise HeadError(f"this slide head was trained at {self.mpp:g} µm/px but the embeddings are at "
                            f"{canonical_mpp(mpp):g} µm/px: use {self.mpp:g} µm/px embeddings or fit a slide head "
                            f"at {canonical_mpp(mpp):g} µm/px")  # fmt: skip
        if tile_size is not None and int(tile_size) != self.tile_size:
            raise HeadError(f"this slide head was trained on {self.tile_size}-px tiles but the tiles are "
                            f"{tile_size} px: use {self.tile_size}-px tiles or fit a new head")  # fmt: skip

    def module(self) -> Any:
        """The torch module with these weights, in eval mode (built once)."""
        if self._module is None:
            from napari_virchow._torch import torch

            c = self.config
            model = AttentionMIL(self.dim, len(self.classes), hidden=int(c["hidden"]), attention=int(c["attention"]),
                                 dropout=float(c.get("dropout", 0.0)))  # fmt: skip
            model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in self.state.items()})
            self._module = model.eval()
        return self._module

    def _folded(self) -> tuple[Any, Any]:
        """First layer with the standardisation folded in: ``relu(x @ w + b)`` = ``relu(embed((x - mean) / std))``."""
        if self._first is None:
            from napari_virchow._torch import torch

            s = self.state
            weight = s["embed.weight"].astype(np.float64) / s["std"].astype(np.float64)  # (hidden, dim)
            bias = s["embed.bias"] - weight @ s["mean"].astype(np.float64)
            self._first = (torch.from_numpy(np.ascontiguousarray(weight.T, np.float32)),
                           torch.from_numpy(bias.astype(np.float32)))  # fmt: skip
        return self._first

    def predict(self, embeddings: np.ndarray) -> SlidePrediction:
        """Class probabilities of the slide whose tile embeddings (``(n, dim)``, any float) are given."""
        from napari_virchow._torch import torch

        x = np.asarray(embeddings)
        if x.ndim != 2 or x.shape[1] != self.dim or not len(x):
            raise HeadError(f"slide head for '{self.encoder}' expects embeddings of shape (n ≥ 1, {self.dim}), got "
                            f"{x.shape}: embed the slide's tissue tiles with '{self.encoder}' first")  # fmt: skip
        model = self.module()
        threads = torch.get_num_threads()
        if len(x) * self.dim < _SMALL:
            torch.set_num_threads(1)  # thread hand-offs cost more than they save on a small bag
        try:
            with torch.inference_mode():
                w, b = self._folded()
                h = torch.cat([torch.relu(torch.addmm(b, _tensor(x[s : s + _CHUNK]), w))
                               for s in range(0, len(x), _CHUNK)])  # fmt: skip
                logits, attention = model.pool(h)
                p = torch.softmax(logits.double(), dim=0).numpy()
        finally:
            torch.set_num_threads(threads)
        a = attention.double().numpy()
        a = (a / a.sum()).astype(np.float32)
        if not (np.all(np.isfinite(p)) and np.all(np.isfinite(a))):
            raise HeadError("the slide head gave a non-finite prediction: the embeddings hold NaN or "
                            "infinite values; recompute them")  # fmt: skip
        return SlidePrediction({c: float(v) for c, v in zip(self.classes, p, strict=True)}, a)


def _tensor(x: np.ndarray) -> Any:
    """``x`` as a float32 torch tensor (float16 rows are upcast by torch, in parallel)."""
    from napari_virchow._torch import torch

    t = torch.from_numpy(np.ascontiguousarray(x))
    return t if t.dtype == torch.float32 else t.float()


def _shapes(dim: int, n_classes: int, hidden: int, attention: int) -> dict[str, tuple[int, ...]]:
    return {"mean": (dim,), "std": (dim,), "embed.weight": (hidden, dim), "embed.bias": (hidden,),
            "attn_v.weight": (attention, hidden), "attn_v.bias": (attention,),
            "attn_u.weight": (attention, hidden), "attn_u.bias": (attention,),
            "attn_w.weight": (1, attention), "attn_w.bias": (1,),
            "classifier.weight": (n_classes, hidden), "classifier.bias": (n_classes,)}  # fmt: skip


def state_of(model: Any) -> dict[str, np.ndarray]:
    """A module's tensors as float32 numpy arrays (what a SlideHead stores)."""
    return {k: v.detach().cpu().numpy().astype(np.float32, copy=True) for k, v in model.state_dict().items()}


def metrics_json(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """``metrics`` with numpy scalars as Python numbers (JSON-safe)."""
    from napari_virchow.analysis.head_labels import json_safe

    return dict(json_safe(dict(metrics)))
