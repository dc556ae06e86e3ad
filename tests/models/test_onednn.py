"""oneDNN-fused linears and SwiGLU MLPs: the same embeddings as PyTorch's and timm's modules."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from timm.layers import GluMlp

from napari_virchow.models.encoder import Encoder, load_encoder
from napari_virchow.models.onednn import OneDnnGluMlp, OneDnnLinear, fuse_linears, fused_linear_available
from napari_virchow.models.precision import cpu_has_native_bf16

TILES = np.random.default_rng(7).integers(0, 256, size=(2, 224, 224, 3), dtype=np.uint8)
NATIVE_BF16 = cpu_has_native_bf16()

pytestmark = pytest.mark.skipif(not fused_linear_available(), reason="this PyTorch has no oneDNN fused linear")


def _tiny(dtype: str = "fp32") -> Encoder:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # random weights are the point
        enc = load_encoder("virchow2-tiny", "random", device="cpu", dtype="fp32")
    for block in enc.model.blocks:  # open the layer-scale gammas (1e-5 at init) so the blocks matter
        block.ls1.gamma.data.fill_(1.0)
        block.ls2.gamma.data.fill_(1.0)
    return enc if dtype == "fp32" else enc.with_dtype(dtype)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


def test_fused_modules_embed_as_torch_and_timm_do() -> None:
    enc = _tiny()
    assert type(enc.model.blocks[0].mlp) is GluMlp  # fp32 weights: left as they are
    want = enc.embed(TILES)
    n = fuse_linears(enc.model, force=True)
    blocks = enc.model.blocks
    assert all(type(b.mlp) is OneDnnGluMlp and type(b.attn.qkv) is OneDnnLinear for b in blocks)
    assert n == sum(type(m) is OneDnnLinear for m in enc.model.modules()) + len(blocks)
    np.testing.assert_allclose(enc.embed(TILES), want, rtol=1e-4, atol=1e-4)
    assert fuse_linears(enc.model, force=False) == 0  # undone: the plain modules again
    assert not any(type(m) in (OneDnnLinear, OneDnnGluMlp) for m in enc.model.modules())
    np.testing.assert_array_equal(enc.embed(TILES), want)


@pytest.mark.skipif(not NATIVE_BF16, reason="bf16 weights are cast only on a CPU with native bf16")
def test_bf16_weights_on_a_cpu_are_fused_at_load_and_agree() -> None:
    fused = _tiny("bf16")
    assert type(fused.model.blocks[0].mlp) is OneDnnGluMlp and type(fused.model.blocks[0].attn.proj) is OneDnnLinear
    got = fused.embed(TILES)
    fuse_linears(fused.model, force=False)
    assert _cosine(got, fused.embed(TILES)) > 0.9999  # bf16 rounding only
    assert _cosine(got, _tiny().embed(TILES)) > 0.999  # and as close to fp32 as bf16 gets
    back = fused.with_dtype("fp32")  # cast back: fp32 weights keep the plain modules
    assert type(back.model.blocks[0].mlp) is GluMlp


@pytest.mark.skipif(not NATIVE_BF16, reason="bf16 weights are cast only on a CPU with native bf16")
@pytest.mark.timeout(300)
def test_compile_traces_fused_modules_as_timms() -> None:
    eager = _tiny("bf16")
    assert type(eager.model.blocks[0].mlp) is OneDnnGluMlp
    compiled = Encoder(eager.spec, eager.model, device=eager.device, dtype=eager.dtype, weights_id=eager.weights_id,
                       weights_source=eager.weights_source, compile=True)  # fmt: skip
    assert _cosine(compiled.embed(TILES), eager.embed(TILES)) > 0.999


def test_only_swiglu_mlps_of_timms_layout_are_fused() -> None:
    gate_last = GluMlp(16, 32, act_layer=torch.nn.SiLU, gate_last=True)
    gelu = GluMlp(16, 32, act_layer=torch.nn.GELU, gate_last=False)
    model = torch.nn.Sequential(gate_last, gelu)
    x = torch.randn(3, 5, 16)
    want = model(x)
    assert fuse_linears(model, force=True) == 4  # their four linears, neither MLP
    assert type(gate_last) is GluMlp and type(gelu) is GluMlp and type(gate_last.fc1) is OneDnnLinear
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
    assert fuse_linears(torch.nn.Sequential(torch.nn.ReLU())) == 0


def test_training_and_gradients_take_the_plain_path() -> None:
    mlp = GluMlp(16, 32, act_layer=torch.nn.SiLU, gate_last=False)
    fuse_linears(mlp, force=True)
    assert type(mlp) is OneDnnGluMlp
    x = torch.randn(4, 16, requires_grad=True)
    mlp.train()
    mlp(x).sum().backward()  # the fused op has no backward: training runs timm's forward
    assert x.grad is not None and mlp.fc1.weight.grad is not None
    mlp.eval()
    with torch.no_grad():
        fused = mlp(x)
    mlp.__class__ = GluMlp
    with torch.no_grad():
        torch.testing.assert_close(fused, mlp(x), rtol=1e-5, atol=1e-5)
