"""Token maps of linear heads: the mean of each tile's 16 × 16 token logits is the tile's logit."""

from __future__ import annotations

import numpy as np
import pytest

from napari_virchow.analysis.heads import LinearHead, fit_head
from napari_virchow.analysis.token_maps import positive_token_logits, token_logits, token_probability
from napari_virchow.errors import HeadError
from napari_virchow.models.encoder import load_encoder
from napari_virchow.models.tokens import embedding_from_tokens, encode_tokens


def _tiles(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    tiles = rng.integers(0, 256, (n, 224, 224, 3), dtype=np.uint8)
    tiles[: n // 2, :, :, 1] //= 3  # two kinds of tiles, so a probe has something to fit
    return tiles


def _tile_logits(head: LinearHead, emb: np.ndarray) -> np.ndarray:
    return emb.astype(np.float64) @ head.weights.T.astype(np.float64) + head.bias


@pytest.fixture(scope="module")
def tiny():
    return load_encoder("virchow2-tiny", weights="random", device="cpu", dtype="fp32")


def test_fitted_probe_mean_token_logit_is_tile_logit(tiny) -> None:
    """A probe from fit_head (standardisation folded into W, b), on the encoder's own embeddings."""
    tiles = _tiles(12)
    head = fit_head(tiny.embed(tiles), np.repeat([0, 1], 6), ["normal", "tumour"], encoder="virchow2-tiny")
    cls, tokens = encode_tokens(tiny, tiles)
    logits = token_logits(head, cls, tokens)
    assert logits.shape == (12, 1, 16, 16)
    tile = _tile_logits(head, tiny.embed(tiles))  # the encoder's embedding path, not the tokens
    np.testing.assert_allclose(logits.mean(axis=(2, 3)), tile, atol=1e-4)
    # the positive class's logit (sigmoid = the heatmap's probability; positive_proba works in
    # float32, whose rounding on folded weights is ~1e-3 in logit, so compare within that)
    z = positive_token_logits(head, logits).mean(axis=(1, 2))
    np.testing.assert_allclose(z, tile[:, 0], atol=1e-4)
    np.testing.assert_allclose(1 / (1 + np.exp(-z)), head.positive_proba(tiny.embed(tiles)), atol=1e-3)
    assert not np.allclose(logits[:, 0], logits[:, 0, :1, :1])  # the tokens do differ


def test_multiclass_per_class_logits(tiny) -> None:
    tiles = _tiles(9, seed=1)
    emb = tiny.embed(tiles)
    head = fit_head(emb, np.repeat([0, 1, 2], 3), ["a", "b", "c"], encoder="virchow2-tiny", positive_class="c")
    logits = token_logits(head, *encode_tokens(tiny, tiles))
    assert logits.shape == (9, 3, 16, 16)
    np.testing.assert_allclose(logits.mean(axis=(2, 3)), _tile_logits(head, emb), atol=1e-4)
    np.testing.assert_allclose(positive_token_logits(head, logits).mean(axis=(1, 2)), _tile_logits(head, emb)[:, 2],
                               atol=1e-4)  # fmt: skip
    p = token_probability(head, logits)
    assert p.shape == (9, 16, 16) and ((p >= 0) & (p <= 1)).all()


def test_positive_class_first_negates_the_logit(tiny) -> None:
    tiles = _tiles(4, seed=2)
    emb = tiny.embed(tiles)
    rng = np.random.default_rng(0)
    head = LinearHead(rng.normal(size=(1, 96)), [0.3], ["tumour", "stroma"], encoder="virchow2-tiny")
    assert head.positive_class == "tumour"
    z = positive_token_logits(head, token_logits(head, *encode_tokens(tiny, tiles))).mean(axis=(1, 2))
    p = 1 / (1 + np.exp(-z))
    np.testing.assert_allclose(p, head.positive_proba(emb), atol=1e-5)


def test_head_of_another_width_refused(tiny) -> None:
    head = LinearHead(np.ones((1, 2560)), [0.0], ["a", "b"], encoder="virchow2")
    with pytest.raises(HeadError, match="2560"):
        token_logits(head, *encode_tokens(tiny, _tiles(1)))


def test_virchow2_structure_random_weights_fp32() -> None:
    """The real Virchow 2 architecture (ViT-H/14, 4 registers, SwiGLUPacked, 631 M parameters)
    with random weights, in fp32, forward on 2 tiles (≈ 12 s here, under the 60 s allowed): the mean
    token logit equals the logit of the encoder's own 2560-d embedding to 1e-4."""
    enc = load_encoder("virchow2", weights="random", device="cpu", dtype="fp32")
    assert sum(p.numel() for p in enc.model.parameters()) == 631_239_424
    tiles = _tiles(2, seed=3)
    cls, tokens = encode_tokens(enc, tiles)
    assert cls.shape == (2, 1280) and tokens.shape == (2, 16, 16, 1280)
    emb = enc.embed(tiles)
    np.testing.assert_allclose(embedding_from_tokens(cls, tokens), emb, rtol=1e-4, atol=1e-4)
    rng = np.random.default_rng(1)
    # a standardised-scale head, like fit_head's folded ones: large weights on small dimensions
    scale = 1.0 / (emb.std(axis=0) + 1e-3)
    head = LinearHead(rng.normal(size=(3, 2560)) * scale / 50, rng.normal(size=3), ["a", "b", "c"],
                      encoder="virchow2")  # fmt: skip
    logits = token_logits(head, cls, tokens)
    np.testing.assert_allclose(logits.mean(axis=(2, 3)), _tile_logits(head, emb), atol=1e-4)


def test_cls_attribution_keeps_the_tile_logit_and_moves_evidence_to_tokens(tiny) -> None:
    """The CLS-attributed view: still averaging to the tile logit, and no longer the plain map."""
    from napari_virchow.analysis.token_maps import fit_cls_attribution

    tiles = _tiles(12, seed=3)
    emb = tiny.embed(tiles)
    head = fit_head(emb, np.repeat([0, 1], 6), ["normal", "tumour"], encoder="virchow2-tiny")
    att = fit_cls_attribution(head, emb)
    assert att.weights.shape == (1, 48) and att.n_tiles == 12 and 0.0 <= att.r2[0] <= 1.0
    cls, tokens = encode_tokens(tiny, tiles)
    plain = token_logits(head, cls, tokens)
    moved = token_logits(head, cls, tokens, attribution=att)
    np.testing.assert_allclose(moved.mean(axis=(2, 3)), _tile_logits(head, emb), atol=1e-4)
    assert np.abs(moved - plain).max() > 1e-2
    # the extra term is V·(t_i − mean t): checked against its definition
    mean = tokens.mean(axis=(1, 2)) @ att.weights.T
    extra = np.einsum("nrcd,kd->nkrc", tokens, att.weights) - mean[:, :, None, None]
    np.testing.assert_allclose(moved - plain, extra, atol=1e-3)


def test_cls_attribution_refuses_too_few_tiles(tiny) -> None:
    from napari_virchow.analysis.token_maps import fit_cls_attribution

    head = LinearHead(np.ones((1, 96)), [0.0], ["a", "b"], encoder="virchow2-tiny")
    with pytest.raises(HeadError, match="at least 2 tiles"):
        fit_cls_attribution(head, np.ones((1, 96)))
    with pytest.raises(HeadError, match="96"):
        fit_cls_attribution(head, np.ones((4, 50)))
