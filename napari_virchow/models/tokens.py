"""Patch tokens from the encoder's forward pass: CLS and the ``g × g`` patch-token grid per tile.

Virchow's embedding is CLS ⊕ mean(patch tokens); the same ``forward_features`` call that makes it
also yields each 14-px patch's token (16 × 16 per 224-px tile). :func:`encode_tokens` returns them,
register tokens excluded, under the encoder's own precision, so that
``embedding_from_tokens(*encode_tokens(enc, tiles))`` is what ``enc.embed(tiles)`` returns.

Tokens come from :meth:`Encoder.forward_features <napari_virchow.models.encoder.Encoder.forward_features>`,
the forward pass the embeddings are pooled from (same precision, same compiled graph), so the
pipeline can keep a batch's tokens from the pass that embeds it (``iter_embed(token_sink=...)``).
"""

from __future__ import annotations

import numpy as np

from napari_virchow._torch import torch
from napari_virchow.errors import WeightsError
from napari_virchow.models.encoder import Encoder, preprocess

__all__ = ["embed_with_tokens", "embedding_from_tokens", "encode_tokens", "patch_px", "split_tokens",
           "token_grid_side"]


def patch_px(encoder: Encoder) -> int:
    """Side of one patch in model-input px (14 for Virchow / Virchow 2)."""
    embed = getattr(encoder.model, "patch_embed", None)
    size = getattr(embed, "patch_size", None)
    if size is None:
        raise WeightsError(
            f"encoder {encoder.spec.name!r} has no ViT patch embedding (model.patch_embed.patch_size): "
            "token maps need a ViT encoder such as virchow2."
        )
    side = size[0] if isinstance(size, (tuple, list)) else size
    return int(side)


def token_grid_side(encoder: Encoder) -> int:
    """Tokens per tile side: ``input_size // patch`` (16 for Virchow 2 at 224 px)."""
    if encoder.spec.pooling != "cls+mean":
        raise WeightsError(
            f"encoder {encoder.spec.name!r} pools its own features ({encoder.spec.pooling}); token maps need "
            "an encoder whose embedding is CLS ⊕ mean(patch tokens), e.g. virchow2."
        )
    p = patch_px(encoder)
    side = encoder.spec.input_size // p
    if side * p != encoder.spec.input_size:
        raise WeightsError(f"input size {encoder.spec.input_size} is not a multiple of the {p}-px patch")
    return side


def encode_tokens(
    encoder: Encoder, tiles: np.ndarray, *, batch_size: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """CLS and patch tokens of uint8 RGB tiles ``(N, H, W, 3)``.

    Returns
    -------
    cls : numpy.ndarray
        float32 ``(N, D)``.
    tokens : numpy.ndarray
        float32 ``(N, g, g, D)``, row-major like the patches (token ``[r, c]`` is the patch at rows
        ``r·p .. r·p + p - 1``, columns ``c·p ..``); register tokens excluded.
    """
    side = token_grid_side(encoder)
    arr = np.asarray(tiles)
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    width = encoder.spec.dim // 2
    cls = np.empty((len(arr), width), np.float32)
    tokens = np.empty((len(arr), side, side, width), np.float32)
    step = batch_size or max(len(arr), 1)
    for i in range(0, len(arr), step):
        x = preprocess(arr[i : i + step], encoder.spec, device=encoder.device)
        with torch.inference_mode():
            out = encoder.forward_features(x)
        cls[i : i + step], tokens[i : i + step] = split_tokens(encoder, out)
    return cls, tokens


def embed_with_tokens(encoder: Encoder, tiles: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Embeddings ``(N, dim)``, CLS and patch tokens (as :func:`encode_tokens`) of uint8 tiles from
    one forward pass: the embeddings are exactly those :meth:`Encoder.embed` returns for the same batch."""
    token_grid_side(encoder)  # a clear error for encoders without patch tokens, before the forward pass
    x = preprocess(tiles, encoder.spec, device=encoder.device)
    with torch.inference_mode():
        features = encoder.forward_features(x)
        emb = encoder.pool(features).cpu().numpy()
    cls, tokens = split_tokens(encoder, features)
    return emb, cls, tokens


def split_tokens(encoder: Encoder, features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """CLS ``(N, D)`` and patch tokens ``(N, g, g, D)``, float32 numpy, of one
    :meth:`Encoder.forward_features <napari_virchow.models.encoder.Encoder.forward_features>` output."""
    side = token_grid_side(encoder)
    n_prefix = encoder.spec.num_prefix_tokens
    if features.ndim != 3 or features.shape[1] != n_prefix + side * side:
        raise WeightsError(
            f"encoder {encoder.spec.name!r} returned features of shape {tuple(features.shape)}, expected "
            f"{n_prefix} prefix + {side}×{side} patch tokens per tile"
        )
    cls = features[:, 0].cpu().numpy()
    tokens = features[:, n_prefix:].reshape(len(features), side, side, -1).cpu().numpy()
    return cls, tokens


def embedding_from_tokens(cls: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """CLS ⊕ mean(patch tokens): the tile embedding, ``(N, 2D)`` float32."""
    t = np.asarray(tokens, np.float32)
    mean = t.reshape(t.shape[0], -1, t.shape[-1]).mean(axis=1)
    return np.concatenate([np.asarray(cls, np.float32), mean], axis=1)
