"""Fitting a slide head: k-fold cross-validation over slides, a bootstrap confidence interval, a final fit.

Training sees one slide's bag at a time (``bags[i]`` is read when needed, so a lazy sequence
over stores keeps memory bounded by one slide's tiles), and is deterministic given ``seed``:
each model is initialised, shuffled and dropped out from its own seeded generators under
``torch.use_deterministic_algorithms``.

The cross-validated metric is the ROC AUC of the positive class (two classes) or the balanced
accuracy (more classes), computed once over the out-of-fold predictions of every slide. Its 95 %
confidence interval is a percentile bootstrap over slides: ``bootstrap`` resamples of the slides
with replacement (seeded), the metric recomputed on each, resamples lacking a class skipped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

import numpy as np

from napari_virchow.analysis.mil import AttentionMIL, SlideHead, _tensor, metrics_json, state_of
from napari_virchow.errors import HeadError

__all__ = ["Progress", "check_folds", "cv_metric", "fit_slide_head"]

#: ``progress(stage, done, total)``: stage is "fold 2/5" or "final", done/total count epochs (0: starting)
Progress = Callable[[str, int, int], None]
_SMALL = 2_000_000  # tiles × dim under which one torch thread trains faster than several


def fit_slide_head(
    bags: Sequence[Any],
    labels: Sequence[str],
    *,
    encoder: str,
    weights_digest: str,
    mpp: float,
    tile_size: int,
    folds: int = 5,
    fold_ids: Sequence[Hashable] | None = None,
    seed: int = 0,
    epochs: int = 20,
    lr: float = 5e-4,
    weight_decay: float = 1e-4,
    hidden: int = 128,
    attention: int = 64,
    dropout: float = 0.25,
    max_tiles: int | None = 8192,
    bootstrap: int = 1000,
    classes: Sequence[str] | None = None,
    positive_class: str | None = None,
    threads: int | None = None,
    progress: Progress | None = None,
) -> SlideHead:
    """Cross-validate an ABMIL slide head over slides, then fit it on every slide.

    Parameters
    ----------
    bags
        Per slide, its tissue tiles' embeddings ``(n_i, dim)`` (float16/32; read one at a time).
    labels
        Per slide, its class name.
    encoder, weights_digest, mpp, tile_size
        What produced the embeddings (recorded on the head, checked before it predicts).
    folds
        Stratified folds over slides (ignored when ``fold_ids`` gives each slide's fold).
    seed
        Seeds folds, initialisation, shuffling, dropout, tile sampling and the bootstrap.
    epochs, lr, weight_decay, hidden, attention, dropout
        Training (AdamW, one slide per step, class-balanced cross-entropy) and sizes.
    max_tiles
        At most this many tiles of a slide per step (a seeded random subset); None: all.
    bootstrap
        Resamples for the confidence interval (0: none).
    threads
        torch threads while training (restored after); None: one for small bags, else torch's default.
    progress
        Called as ``progress(stage, epochs_done, epochs)`` before the first epoch (0) and after each.

    Returns
    -------
    SlideHead
        ``metrics``: ``cv_metric`` ("auc" or "balanced_accuracy"), ``cv_value``, ``cv_ci_low``,
        ``cv_ci_high`` (95 %), ``cv_folds``, ``cv_balanced_accuracy``, ``n_slides``, ``class_counts``
        and the training settings.
    """
    names = [str(x).strip() for x in labels]
    n = len(names)
    if len(bags) != n:
        raise HeadError(f"{len(bags)} slides but {n} labels: give one label per slide")
    if any(not x for x in names):
        raise HeadError(f"slide {names.index('') + 1} has an empty label: give every slide a class")
    order = sorted(set(names)) if classes is None else [str(c) for c in classes]
    unknown = sorted(set(names) - set(order))
    if unknown:
        raise HeadError(f"labels {unknown} are not among the classes {order}: fix the labels or the classes")
    if len(set(names)) < 2:
        raise HeadError(f"every slide is labelled '{names[0] if names else ''}': a slide head needs slides of at "
                        "least two classes")  # fmt: skip
    order = [c for c in order if c in set(names)]
    y = np.asarray([order.index(c) for c in names], np.int64)
    counts = {c: int((y == i).sum()) for i, c in enumerate(order)}
    splits = _splits(y, folds, fold_ids, seed, counts)
    dim, n_tiles, mean, std = _scan(bags)
    settings = {"epochs": int(epochs), "lr": float(lr), "weight_decay": float(weight_decay),
                "max_tiles": max_tiles, "seed": int(seed)}  # fmt: skip
    run = {**settings, "threads": threads}
    sizes = {"dim": dim, "hidden": int(hidden), "attention": int(attention), "dropout": float(dropout)}

    def train(idx: np.ndarray, model_seed: int, stage: str) -> Any:
        return _train(bags, y, idx, len(order), mean, std, sizes, run, model_seed, int(n_tiles[idx].max()),
                      lambda e: progress(stage, e, epochs) if progress else None)  # fmt: skip

    positive = positive_class
    if positive is None:
        from napari_virchow.analysis.heads import _default_positive

        positive = _default_positive(order)
    oof = np.zeros((n, len(order)), np.float64)
    for k, (tr, te) in enumerate(splits):
        model = train(tr, seed * 1000 + k + 1, f"fold {k + 1}/{len(splits)}")
        with _deterministic(threads or small_threads(int(n_tiles[te].max()), dim)):
            for i in te:
                oof[i] = _predict(model, bags[i])
    metrics = cv_metric(y, oof, positive=order.index(positive), bootstrap=bootstrap, seed=seed)
    metrics.update(cv_folds=len(splits), n_slides=n, class_counts=counts, **settings)
    model = train(np.arange(n), seed * 1000, "final")
    return SlideHead(encoder=encoder, weights_digest=weights_digest, mpp=mpp, tile_size=tile_size,
                     classes=tuple(order), state=state_of(model), config=sizes, metrics=metrics_json(metrics),
                     positive_class=positive)  # fmt: skip


def check_folds(labels: Sequence[str], *, folds: int = 5, fold_ids: Sequence[Hashable] | None = None,
                seed: int = 0) -> int:  # fmt: skip
    """The number of folds :func:`fit_slide_head` would use for these labels; HeadError (as it would raise)
    when they cannot be cross-validated, so a caller can refuse before embedding anything."""
    names = [str(x).strip() for x in labels]
    order = sorted(set(names))
    if len(order) < 2:
        raise HeadError(f"every slide is labelled '{names[0] if names else ''}': a slide head needs slides of at "
                        "least two classes")  # fmt: skip
    y = np.asarray([order.index(c) for c in names], np.int64)
    counts = {c: int((y == i).sum()) for i, c in enumerate(order)}
    return len(_splits(y, folds, fold_ids, seed, counts))


def cv_metric(y: np.ndarray, proba: np.ndarray, *, positive: int = 1, bootstrap: int = 1000,
              seed: int = 0, level: float = 0.95) -> dict[str, Any]:  # fmt: skip
    """Metric of out-of-fold ``proba`` (n, k) against ``y`` with a percentile-bootstrap interval over slides."""
    k = proba.shape[1]
    if k == 2:
        name = "auc"

        def score(t: np.ndarray, p: np.ndarray) -> float:
            return _auc(t == positive, p[:, positive])
    else:
        name = "balanced_accuracy"

        def score(t: np.ndarray, p: np.ndarray) -> float:
            return _balanced_accuracy(t, p.argmax(axis=1), k)

    value = score(y, proba)
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(int(bootstrap)):
        pick = rng.integers(0, len(y), len(y))
        if len(np.unique(y[pick])) == k:
            samples.append(score(y[pick], proba[pick]))
    lo, hi = (np.quantile(samples, [(1 - level) / 2, (1 + level) / 2]) if samples else (np.nan, np.nan))
    out = {"cv_metric": name, "cv_value": value, "cv_ci_low": float(lo), "cv_ci_high": float(hi),
           "cv_ci_level": level, "cv_bootstrap": len(samples),
           "cv_balanced_accuracy": _balanced_accuracy(y, proba.argmax(axis=1), k)}  # fmt: skip
    if name == "auc":
        out["cv_auc"] = value
    return out


def _auc(positive: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC (Mann-Whitney U with average ranks for ties), as scikit-learn's ``roc_auc_score``."""
    from scipy.stats import rankdata

    pos = np.asarray(positive, bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    ranks = rankdata(score)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _balanced_accuracy(y: np.ndarray, pred: np.ndarray, k: int) -> float:
    """Mean recall over the classes present in ``y`` (scikit-learn's ``balanced_accuracy_score``)."""
    present = [c for c in range(k) if np.any(y == c)]
    return float(np.mean([np.mean(pred[y == c] == c) for c in present]))


def _splits(y: np.ndarray, folds: int, fold_ids: Sequence[Hashable] | None, seed: int,
            counts: dict[str, int]) -> list[tuple[np.ndarray, np.ndarray]]:  # fmt: skip
    n = len(y)
    if fold_ids is not None:
        ids = list(fold_ids)
        if len(ids) != n:
            raise HeadError(f"{len(ids)} fold ids for {n} slides: give one fold per slide, or none")
        keys = sorted({str(f) for f in ids})
        if len(keys) < 2:
            raise HeadError(f"every slide is in fold '{keys[0]}': give at least two folds, or no fold column")
        out = []
        for key in keys:
            te = np.flatnonzero([str(f) == key for f in ids])
            tr = np.setdiff1d(np.arange(n), te)
            if len(np.unique(y[tr])) < 2:
                raise HeadError(f"without fold '{key}' the other slides hold only one class: spread every "
                                "class over several folds")  # fmt: skip
            out.append((tr, te))
        return out
    if folds < 2:
        raise HeadError(f"{folds} fold(s): cross-validation needs at least 2 folds")
    if n < folds:
        raise HeadError(f"{n} slides for {folds}-fold cross-validation: use at most {n} folds or add slides")
    rare = min(counts, key=lambda c: counts[c])
    if counts[rare] < folds:
        raise HeadError(f"class '{rare}' has {counts[rare]} slide(s), fewer than the {folds} folds: use at most "
                        f"{counts[rare]} folds or add slides of '{rare}'")  # fmt: skip
    from sklearn.model_selection import StratifiedKFold

    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [(tr, te) for tr, te in splitter.split(np.zeros(n), y)]


def _scan(bags: Sequence[Any]) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """One pass over the bags: (dim, tiles per bag, per-dimension mean, std over every tile).

    The moments are unsupervised, so all folds share them.
    """
    dims, sizes = set(), []
    total = sq = None
    for i in range(len(bags)):
        x = np.asarray(bags[i])
        if x.ndim != 2 or x.shape[0] == 0:
            raise HeadError(f"slide {i + 1}'s bag has shape {x.shape}: each slide needs (n ≥ 1 tiles, dim) "
                            "embeddings (embed its tissue tiles first)")  # fmt: skip
        dims.add(int(x.shape[1]))
        if len(dims) != 1:
            raise HeadError(f"slides have embeddings of different sizes {sorted(dims)}: embed every slide with one "
                            "encoder")  # fmt: skip
        x64 = x.astype(np.float64)
        total = x64.sum(axis=0) + (0 if total is None else total)
        sq = (x64 * x64).sum(axis=0) + (0 if sq is None else sq)
        sizes.append(len(x))
    count = float(sum(sizes))
    mean = np.asarray(total) / count
    std = np.sqrt(np.maximum(np.asarray(sq) / count - mean * mean, 0.0))
    std[std < 1e-6] = 1.0
    return dims.pop(), np.asarray(sizes, np.int64), mean.astype(np.float32), std.astype(np.float32)


@contextlib.contextmanager
def _deterministic(threads: int | None) -> Iterator[None]:
    """Deterministic algorithms, a private RNG state, and ``threads`` torch threads, all restored after."""
    from napari_virchow._torch import torch

    before, n_before = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    if threads:
        torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.use_deterministic_algorithms(before)
        torch.set_num_threads(n_before)


def small_threads(n_tiles: int, dim: int) -> int | None:
    """One torch thread for small bags (thread hand-offs cost more than they save there), else torch's default."""
    return 1 if n_tiles * dim < _SMALL else None


def _train(bags: Sequence[Any], y: np.ndarray, idx: np.ndarray, n_classes: int, mean: np.ndarray,
           std: np.ndarray, sizes: dict[str, Any], settings: dict[str, Any], seed: int, largest: int,
           on_epoch: Callable[[int], None]) -> Any:  # fmt: skip
    from napari_virchow._torch import torch

    counts = np.bincount(y[idx], minlength=n_classes).astype(np.float64)
    weight = torch.tensor(np.where(counts > 0, len(idx) / np.maximum(counts, 1) / n_classes, 0.0), dtype=torch.float32)
    rng = np.random.default_rng(seed)
    cap = settings["max_tiles"]
    threads = settings.get("threads") or small_threads(min(largest, cap or largest), sizes["dim"])
    with _deterministic(threads):
        torch.manual_seed(seed)
        model = AttentionMIL(sizes["dim"], n_classes, hidden=sizes["hidden"], attention=sizes["attention"],
                             dropout=sizes["dropout"])  # fmt: skip
        model.mean.copy_(torch.from_numpy(mean))
        model.std.copy_(torch.from_numpy(std))
        opt = torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=settings["weight_decay"])
        model.train()
        on_epoch(0)
        for epoch in range(settings["epochs"]):
            for i in rng.permutation(idx):
                x = np.asarray(bags[i])
                if cap is not None and len(x) > cap:
                    x = x[np.sort(rng.choice(len(x), cap, replace=False))]
                logits, _ = model(_tensor(x))
                loss = torch.nn.functional.cross_entropy(logits[None], torch.tensor([int(y[i])]), weight=weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            on_epoch(epoch + 1)
    return model.eval()


def _predict(model: Any, bag: Any) -> np.ndarray:
    from napari_virchow._torch import torch

    with torch.inference_mode():
        logits, _ = model(_tensor(np.asarray(bag)))
        return torch.softmax(logits.double(), dim=0).numpy()
