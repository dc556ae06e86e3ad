"""Token maps: a linear head's evidence per 14-px patch token, whose mean is the tile's logit.

A :class:`~napari_virchow.analysis.heads.LinearHead` scores an embedding ``e = cls ⊕ mean_i(t_i)``
as ``W e + b`` (the standardisation of :func:`fit_head` is already folded into ``W`` and ``b``).
Splitting ``W = [W_cls | W_patch]``, by linearity

    logit = b + W_cls·cls + W_patch·mean_i(t_i) = mean_i (b + W_cls·cls + W_patch·t_i),

so each token's term ``b + W_cls·cls + W_patch·t_i`` is the head's evidence at token resolution
and the ``g × g`` grid of them averages exactly to the tile's logit(s). For two classes the head
has one row (the logit of ``classes[1]``); the positive-class logit is its negation when the
positive class is ``classes[0]``. For more classes there is one logit per class.

The CLS term ``W_cls·cls`` is tile-level evidence: spread evenly over the tile's tokens it draws the
tile lattice into the token map (a mostly-tissue tile pulls its few tumour tokens down). Adding any
per-tile zero-mean term keeps the invariant, so :func:`fit_cls_attribution` offers a second,
documented view: the CLS term regressed (ridge, over the slide's embedded tiles) on the mean patch
token, ``W_cls·cls ≈ a + V·mean_i(t_i)``, and each token given ``V·(t_i − mean_j t_j)`` on top: the
CLS evidence attributed to the tokens that predict it. Its ``r2`` says how linear that is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from napari_virchow.analysis.heads import LinearHead
from napari_virchow.errors import HeadError

__all__ = ["ClsAttribution", "fit_cls_attribution", "positive_token_logits", "token_logits", "token_probability",
           "token_terms"]


def token_terms(head: LinearHead, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(W_cls, W_patch, b)`` of ``head`` for tokens of ``width`` dims (embedding = 2 × width)."""
    if head.dim != 2 * width:
        raise HeadError(
            f"head for encoder '{head.encoder}' expects {head.dim}-d embeddings, but these tokens are "
            f"{width}-d (CLS ⊕ mean token = {2 * width}-d): use a head fitted on this encoder"
        )
    w = head.weights.astype(np.float64)
    return w[:, :width], w[:, width:], head.bias.astype(np.float64)


def _check(cls: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    c, t = np.asarray(cls), np.asarray(tokens)
    if c.ndim != 2 or t.ndim != 4 or t.shape[0] != c.shape[0] or t.shape[-1] != c.shape[1]:
        raise HeadError(f"need cls (N, D) and tokens (N, g, g, D), got {c.shape} and {t.shape}")
    return c, t


@dataclass(frozen=True)
class ClsAttribution:
    """``V (n_out, D)``: the head's CLS term as a linear function of the mean patch token.

    ``r2`` (one per output) is the fraction of the CLS term's variance over the fit tiles it explains.
    """

    weights: np.ndarray
    r2: tuple[float, ...]
    n_tiles: int


def fit_cls_attribution(head: LinearHead, embeddings: np.ndarray, *, ridge: float = 1e-3) -> ClsAttribution:
    """Ridge regression of ``W_cls·cls`` on ``mean_i(t_i)`` over tile ``embeddings`` ``(n, 2D)``.

    ``ridge`` is relative to the mean feature variance (scale-free). Needs at least 2 tiles.
    """
    e = np.asarray(embeddings, np.float64)
    if e.ndim != 2 or e.shape[1] != head.dim:
        raise HeadError(f"need ({head.dim}-d) embeddings of the head's encoder, got {e.shape}")
    if len(e) < 2:
        raise HeadError("the CLS attribution needs the embeddings of at least 2 tiles: compute more tiles")
    width = e.shape[1] // 2
    w_cls, _, _ = token_terms(head, width)
    y = e[:, :width] @ w_cls.T  # (n, n_out)
    x = e[:, width:] - e[:, width:].mean(axis=0)
    yc = y - y.mean(axis=0)
    gram = x.T @ x
    lam = ridge * max(float(np.trace(gram)) / width, 1e-12)
    v = np.linalg.solve(gram + lam * np.eye(width), x.T @ yc).T  # (n_out, D)
    resid = ((yc - x @ v.T) ** 2).sum(axis=0)
    total = (yc**2).sum(axis=0)
    r2 = tuple(float(1 - r / t) if t > 0 else 1.0 for r, t in zip(resid, total, strict=True))
    return ClsAttribution(v, r2, len(e))


def token_logits(
    head: LinearHead, cls: np.ndarray, tokens: np.ndarray, *, attribution: ClsAttribution | None = None
) -> np.ndarray:
    """Per-token logits ``(N, n_out, g, g)`` float32; ``mean over (g, g)`` = the tile's logits.

    ``n_out`` is 1 for a two-class head (logit of ``classes[1]``), else one per class. With
    ``attribution``, each token also gets ``V·(t_i − mean_j t_j)`` (zero mean per tile: the
    invariant holds; see the module docstring).
    """
    c, t = _check(cls, tokens)
    w_cls, w_patch, b = token_terms(head, c.shape[1])
    if attribution is not None:
        tile_part_extra = -(t.reshape(len(t), -1, t.shape[-1]).mean(axis=1, dtype=np.float64) @ attribution.weights.T)
        w_patch = w_patch + attribution.weights
    else:
        tile_part_extra = np.zeros((len(c), w_patch.shape[0]))
    tile_part = c.astype(np.float64) @ w_cls.T + b + tile_part_extra  # (N, n_out): shared by a tile's tokens
    n, g = t.shape[0], t.shape[1]
    out = np.empty((n, w_patch.shape[0], g, g), np.float32)
    for start in range(0, n, 64):  # bounds the float64 copy of the tokens
        block = t[start : start + 64].astype(np.float64)
        patch = np.einsum("nrcd,kd->nkrc", block, w_patch)
        out[start : start + 64] = patch + tile_part[start : start + 64, :, None, None]
    return out


def positive_token_logits(head: LinearHead, logits: np.ndarray) -> np.ndarray:
    """The positive class's per-token logit ``(N, g, g)`` from :func:`token_logits` output.

    Two classes: the logit (negated when the positive class is ``classes[0]``). More classes: the
    positive class's logit (its mean over tokens is that class's tile logit).
    """
    column = head.classes.index(str(head.positive_class))
    if len(head.classes) == 2:
        return logits[:, 0] if column == 1 else -logits[:, 0]
    return logits[:, column]


def token_probability(head: LinearHead, logits: np.ndarray) -> np.ndarray:
    """P(positive class) per token ``(N, g, g)`` float32: sigmoid / softmax of the token logits,
    on the same [0, 1] scale (and so the same colormap and threshold) as the tile heatmap."""
    if len(head.classes) == 2:
        z = np.clip(positive_token_logits(head, logits), -80.0, 80.0)
        return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    column = head.classes.index(str(head.positive_class))
    return (e[:, column] / e.sum(axis=1)).astype(np.float32)
