"""CPU inference blocks: the same numbers as timm's attention and SwiGLU, on the real structure."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from timm.layers import Attention, GluMlp
from torch.nn.functional import scaled_dot_product_attention as sdpa

from napari_virchow.models.cpu_blocks import (
    KEY_BLOCK,
    InplaceGluMlp,
    KeySplitAttention,
    split_key_attention,
    use_cpu_blocks,
)
from napari_virchow.models.encoder import load_encoder
from napari_virchow.models.specs import build_model, get_spec

pytestmark = pytest.mark.filterwarnings("ignore:.*random weights:UserWarning")


def _qkv(n: int, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, n, 16, generator=g).mul(2.0).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("n", [261, 257, 300, 33])
def test_split_key_attention_is_the_softmax_over_all_keys(n: int) -> None:
    q, k, v = _qkv(n, torch.float32)
    want = sdpa(q.double(), k.double(), v.double())
    got = split_key_attention(q, k, v, 16**-0.5)
    assert n % KEY_BLOCK  # a remainder: the split path ran
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.allclose(got.double(), want, atol=2e-5)
    # one key far above the others, among the remaining ones: the merge keeps its weight ~1
    k2 = k.clone()
    k2[..., -1, :] = q.mean(dim=-2) * 20
    want2 = sdpa(q.double(), k2.double(), v.double())
    assert torch.allclose(split_key_attention(q, k2, v, 16**-0.5).double(), want2, atol=2e-5)


def test_split_key_attention_bf16_is_as_close_as_the_fused_kernel() -> None:
    q, k, v = _qkv(261, torch.bfloat16)
    exact = sdpa(q.double(), k.double(), v.double())
    fused = sdpa(q, k, v).double()
    split = split_key_attention(q, k, v, 16**-0.5).double()
    # bf16 rounding (of the probabilities before ``p @ v``, and of the output) dominates both
    assert (split - exact).abs().mean() <= 1.25 * (fused - exact).abs().mean()
    assert (split - exact).abs().max() <= 2.5 * (fused - exact).abs().max()


@pytest.mark.parametrize("n", [256, 64, 20])
def test_whole_blocks_or_fewer_keys_than_a_block_use_the_fused_call(n: int) -> None:
    q, k, v = _qkv(n, torch.float32)
    assert torch.equal(split_key_attention(q, k, v, 16**-0.5), sdpa(q, k, v))


def _tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(get_spec("virchow2-tiny")).eval()
    for block in model.blocks:  # open the layer scales so the blocks change the output
        block.ls1.gamma.data.fill_(1.0)
        block.ls2.gamma.data.fill_(1.0)
    return model


def test_use_cpu_blocks_keeps_timm_numbers_parameters_and_keys() -> None:
    timm_model = _tiny_model()
    fast = copy.deepcopy(timm_model)
    assert use_cpu_blocks(fast) == 2 * len(fast.blocks)
    assert all(type(b.attn) is KeySplitAttention and type(b.mlp) is InplaceGluMlp for b in fast.blocks)
    assert all(isinstance(b.attn, Attention) and isinstance(b.mlp, GluMlp) for b in fast.blocks)
    assert list(fast.state_dict()) == list(timm_model.state_dict())
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want, got = timm_model.forward_features(x), fast.forward_features(x)
    assert got.shape == (3, 261, 48)  # CLS + 4 registers + 256 patches: 261 keys, a remainder of 5
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert use_cpu_blocks(fast) == 0  # already swapped: nothing to do


def test_training_masks_and_grad_run_timm_code() -> None:
    model = _tiny_model()
    fast = copy.deepcopy(model)
    use_cpu_blocks(fast)
    tokens = torch.randn(2, 261, 48, generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(261, 261, dtype=torch.bool)
    mask[:, :200] = True
    attn, ref = fast.blocks[0].attn, model.blocks[0].attn
    with torch.inference_mode():
        assert torch.allclose(attn(tokens, attn_mask=mask), ref(tokens, attn_mask=mask), atol=1e-6)
    x = tokens.clone().requires_grad_(True)
    out = fast.blocks[0].mlp(x)  # with grad: timm's own forward, and fc1's output is not overwritten
    out.sum().backward()
    assert x.grad is not None and torch.allclose(out, model.blocks[0].mlp(tokens), atol=1e-6)


def test_load_encoder_on_a_cpu_swaps_them_in_and_embeds_the_same() -> None:
    enc = load_encoder("virchow2-tiny", "random", device="cpu", dtype="fp32")
    assert all(type(b.attn) is KeySplitAttention for b in enc.model.blocks)
    timm_model = build_model(enc.spec).eval()
    timm_model.load_state_dict(enc.model.state_dict())
    tiles = np.random.default_rng(0).integers(0, 256, size=(2, 224, 224, 3), dtype=np.uint8)
    from napari_virchow.models.encoder import Encoder

    plain = Encoder(enc.spec, timm_model, device=enc.device, dtype=None, weights_id=enc.weights_id,
                    weights_source="random")  # fmt: skip
    np.testing.assert_allclose(enc.embed(tiles), plain.embed(tiles), atol=1e-5, rtol=1e-5)
