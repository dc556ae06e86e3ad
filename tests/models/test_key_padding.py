"""Attention over padded, masked keys: the same output as timm's, on the real (tiny) Virchow 2 structure."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from timm.layers import Attention

from napari_virchow.models.encoder import load_encoder
from napari_virchow.models.key_padding import (
    KeyPaddedAttention,
    pad_attention_keys,
    padded_attention,
    padded_length,
    padding_pays,
    plain_attention,
    sequence_length,
)

TILES = np.random.default_rng(5).integers(0, 256, size=(2, 224, 224, 3), dtype=np.uint8)


def _tiny() -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # random weights are the point
        enc = load_encoder("virchow2-tiny", "random", device="cpu", dtype="fp32")
    for block in enc.model.blocks:  # layer-scale gammas start at 1e-5: open them so attention matters
        block.ls1.gamma.data.fill_(1.0)
        block.ls2.gamma.data.fill_(1.0)
    return enc


def test_padded_length_rounds_up_to_sixteen() -> None:
    assert [padded_length(n) for n in (1, 16, 17, 257, 261, 272)] == [16, 16, 32, 272, 272, 272]


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_padded_keys_give_the_plain_attention(dtype: torch.dtype, tol: float) -> None:
    qkv = torch.randn(3, 261, 3 * 4 * 16, generator=torch.Generator().manual_seed(0)).to(dtype)
    with torch.inference_mode():
        want = plain_attention(qkv, 4).float()
        for length in (272, 288, 512):
            got = padded_attention(qkv, 4, length).float()
            assert got.shape == want.shape == (3, 4, 261, 16)
            torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def test_a_padded_model_embeds_as_timm_does() -> None:
    enc = _tiny()
    assert sequence_length(enc.model) == 261  # CLS + 4 registers + 16 × 16 patches
    want = enc.embed(TILES)
    assert pad_attention_keys(enc.model, force=True) == len(enc.model.blocks) == 2
    assert all(type(b.attn) is KeyPaddedAttention and b.attn.key_length == 272 for b in enc.model.blocks)
    got = enc.embed(TILES)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    assert pad_attention_keys(enc.model, force=False) == 0  # undone: timm's own blocks again
    assert all(type(b.attn) is Attention for b in enc.model.blocks)
    np.testing.assert_array_equal(enc.embed(TILES), want)


def test_other_shapes_and_masks_take_timms_path() -> None:
    enc = _tiny()
    pad_attention_keys(enc.model, force=True)
    attn = enc.model.blocks[0].attn
    x = torch.randn(2, 261, attn.qkv.in_features)
    mask = torch.zeros(261, 261)
    mask[:, 200:] = float("-inf")
    with torch.inference_mode():
        padded = attn(x, attn_mask=mask)
        attn.__class__ = Attention
        torch.testing.assert_close(padded, attn(x, attn_mask=mask))  # the mask is honoured, not replaced
        attn.__class__ = KeyPaddedAttention
        short = torch.randn(2, 100, attn.qkv.in_features)  # another sequence length
        out = attn(short)
        attn.__class__ = Attention
        torch.testing.assert_close(out, attn(short))


def test_padding_is_decided_by_timing_once_and_only_for_vits() -> None:
    pays = padding_pays(261, 4, 16, torch.bfloat16, batch=1, repeats=1)
    assert isinstance(pays, bool)
    assert padding_pays(261, 4, 16, torch.bfloat16, batch=1, repeats=1) is pays  # kept: loads alike run alike
    assert padding_pays(261, 4, 16, torch.float32) is False  # fp32: never (measured: no gain)
    assert padding_pays(272, 4, 16, torch.bfloat16) is False  # nothing to pad
    assert pad_attention_keys(torch.nn.Sequential(torch.nn.Linear(4, 4))) == 0
    assert sequence_length(torch.nn.Linear(4, 4)) is None
