"""Patch tokens from the encoder's forward: shapes, registers excluded, the embedding rebuilt exactly."""

from __future__ import annotations

import numpy as np
import pytest

from napari_virchow.errors import WeightsError
from napari_virchow.models.encoder import load_encoder
from napari_virchow.models.tokens import embedding_from_tokens, encode_tokens, patch_px, token_grid_side


@pytest.fixture(scope="module")
def tiny():
    return load_encoder("virchow2-tiny", weights="random", device="cpu", dtype="fp32")


def _tiles(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 224, 224, 3), dtype=np.uint8)


def test_grid_is_16_by_16_patches_of_14_px(tiny) -> None:
    assert patch_px(tiny) == 14
    assert token_grid_side(tiny) == 16


def test_tokens_shapes_and_registers_excluded(tiny) -> None:
    cls, tokens = encode_tokens(tiny, _tiles(3))
    assert cls.shape == (3, 48) and tokens.shape == (3, 16, 16, 48)
    assert cls.dtype == tokens.dtype == np.float32
    assert np.isfinite(tokens).all()
    # the register tokens (positions 1..4) are not among the patch tokens
    import torch

    from napari_virchow.models.encoder import preprocess

    with torch.inference_mode():
        raw = tiny.model.forward_features(preprocess(_tiles(3), tiny.spec)).numpy()
    np.testing.assert_allclose(tokens.reshape(3, 256, 48), raw[:, 5:], rtol=1e-5, atol=1e-5)
    assert not np.allclose(tokens.reshape(3, 256, 48)[:, :4], raw[:, 1:5])


def test_token_rows_follow_patch_rows(tiny) -> None:
    """Changing the pixels of patch (row 2, column 9) changes mostly token [2, 9]."""
    base = _tiles(1, seed=1)
    changed = base.copy()
    changed[0, 28:42, 126:140] = 255 - changed[0, 28:42, 126:140]
    _, a = encode_tokens(tiny, base)
    _, b = encode_tokens(tiny, changed)
    diff = np.linalg.norm(a[0] - b[0], axis=-1)
    assert np.unravel_index(diff.argmax(), diff.shape) == (2, 9)


def test_embedding_from_tokens_is_the_encoders_embedding(tiny) -> None:
    tiles = _tiles(4, seed=2)
    emb = embedding_from_tokens(*encode_tokens(tiny, tiles, batch_size=3))
    np.testing.assert_allclose(emb, tiny.embed(tiles), rtol=1e-5, atol=1e-5)


def test_under_the_encoders_autocast_too() -> None:
    enc = load_encoder("virchow2-tiny", weights="random", device="cpu", dtype="bf16")
    tiles = _tiles(2, seed=3)
    emb = embedding_from_tokens(*encode_tokens(enc, tiles))
    np.testing.assert_allclose(emb, enc.embed(tiles), rtol=1e-4, atol=1e-4)


def test_pooled_encoder_refused() -> None:
    enc = load_encoder("timm:vit_tiny_patch16_224", weights="random", device="cpu", dtype="fp32")
    with pytest.raises(WeightsError, match="CLS"):
        encode_tokens(enc, _tiles(1))
