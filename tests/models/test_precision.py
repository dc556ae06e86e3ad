"""Precision paths of the encoder on this machine: fp32, bf16 weights cast once, autocast, compile.

Every path runs the real tiny Virchow 2 structure (random weights, layer-scale gates opened so
the blocks matter) and must stay within cosine 0.999 of fp32.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch
from timm.layers import set_fused_attn, use_fused_attn

from napari_virchow.models.encoder import Encoder, load_encoder, preprocess
from napari_virchow.models.precision import (
    cpu_has_native_bf16,
    describe_dtype,
    fold_layer_scale,
    resolve_dtype,
    use_fused_attention,
    weights_dtype,
)

TILES = np.random.default_rng(1).integers(0, 256, size=(3, 224, 224, 3), dtype=np.uint8)
CPU = torch.device("cpu")
NATIVE_BF16 = cpu_has_native_bf16()


def _load(dtype: str, gamma: float | None = 1.0, **kw: object) -> Encoder:
    """The tiny model with its layer-scale gammas (1e-5 at init) opened to ``gamma``, then cast to
    ``dtype`` as load_encoder does (a cast for inference folds the gammas into the weights)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # random weights are the point
        enc = load_encoder("virchow2-tiny", "random", device="cpu", dtype="fp32", **kw)
    rng = torch.Generator().manual_seed(3)
    for block in enc.model.blocks:  # layer-scale gammas start at 1e-5: open them
        for ls in (block.ls1, block.ls2):
            ls.gamma.data.copy_(torch.rand(ls.gamma.shape, generator=rng) + 0.5 if gamma is None else gamma)
    return enc if dtype == "fp32" else enc.with_dtype(dtype)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def fp32() -> np.ndarray:
    return _load("fp32").embed(TILES)


def test_auto_is_fp16_on_cuda_and_bf16_on_a_native_bf16_cpu() -> None:
    assert resolve_dtype("auto", torch.device("cuda")) is torch.float16  # the model card's choice
    assert resolve_dtype("bf16", torch.device("cuda")) is torch.bfloat16  # selectable
    assert resolve_dtype("auto", CPU) is (torch.bfloat16 if NATIVE_BF16 else None)


def test_weights_are_cast_only_for_bf16_on_a_native_bf16_cpu() -> None:
    assert weights_dtype(torch.bfloat16, CPU) is (torch.bfloat16 if NATIVE_BF16 else torch.float32)
    assert weights_dtype(torch.float16, CPU) is torch.float32  # autocast
    assert weights_dtype(torch.bfloat16, torch.device("cuda")) is torch.float32  # autocast
    assert weights_dtype(None, CPU) is torch.float32
    assert describe_dtype(None) == "fp32" and describe_dtype(torch.bfloat16) == "bfloat16"


@pytest.mark.skipif(not NATIVE_BF16, reason="this CPU has no native bf16: bf16 runs under autocast")
def test_bf16_on_native_cpu_casts_weights_once_and_agrees_with_fp32(fp32: np.ndarray) -> None:
    enc = _load("bf16")
    params = {p.dtype for p in enc.model.parameters()}
    assert params == {torch.bfloat16} and enc.input_dtype is torch.bfloat16 and not enc.autocast
    out = enc.embed(TILES)
    assert out.dtype == np.float32 and not np.array_equal(out, fp32)
    assert _cosine(out, fp32).min() >= 0.999


def test_fp16_autocast_keeps_fp32_weights_and_agrees_with_fp32(fp32: np.ndarray) -> None:
    enc = _load("fp16")
    assert {p.dtype for p in enc.model.parameters()} == {torch.float32} and enc.autocast
    out = enc.embed(TILES)
    assert not np.array_equal(out, fp32) and _cosine(out, fp32).min() >= 0.999


def test_layer_scale_folds_into_the_weights_exactly() -> None:
    """gamma · proj(x) = proj'(x) with proj's rows scaled: the embedding does not change (fp32)."""
    import copy

    enc = _load("fp32", gamma=None)  # a different gamma per channel, not 1
    folded = copy.deepcopy(enc.model)
    assert fold_layer_scale(folded) == len(enc.model.blocks) == 2
    assert all(isinstance(b.ls1, torch.nn.Identity) and isinstance(b.ls2, torch.nn.Identity) for b in folded.blocks)
    assert fold_layer_scale(folded) == 0  # nothing left to fold
    other = Encoder(enc.spec, folded, device=CPU, dtype=None, weights_id=enc.weights_id, weights_source="random")
    np.testing.assert_allclose(other.embed(TILES), enc.embed(TILES), rtol=1e-4, atol=1e-5)
    assert all(hasattr(b.ls1, "gamma") for b in enc.model.blocks)  # the source model is not touched


@pytest.mark.skipif(not NATIVE_BF16, reason="this CPU has no native bf16: weights are not cast")
def test_weights_cast_for_inference_have_layer_scale_folded() -> None:
    ref = _load("fp32", gamma=None)
    bf16 = ref.with_dtype("bf16")
    assert all(isinstance(b.ls1, torch.nn.Identity) for b in bf16.model.blocks)
    out, fp32 = bf16.embed(TILES), ref.embed(TILES)
    assert _cosine(out, fp32).min() >= 0.999
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        loaded = load_encoder("virchow2-tiny", "random", device="cpu", dtype="bf16")  # folded at load too
    assert all(isinstance(b.ls2, torch.nn.Identity) for b in loaded.model.blocks)


def test_with_dtype_shares_the_model_only_when_the_weights_fit() -> None:
    base = _load("fp32")
    fp16 = base.with_dtype("fp16")
    assert fp16.model is base.model  # autocast over the same fp32 weights
    bf16 = base.with_dtype("bf16")
    assert (bf16.model is base.model) is (not NATIVE_BF16)
    assert {p.dtype for p in base.model.parameters()} == {torch.float32}  # never cast in place
    back = bf16.with_dtype("fp32")
    assert {p.dtype for p in back.model.parameters()} == {torch.float32} and back.dtype is None


def test_attention_uses_fused_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    assert use_fused_attn()  # timm's default here
    set_fused_attn(False)  # even where timm was told not to at build time
    try:
        enc = _load("fp32")
    finally:
        set_fused_attn(True)
    blocks = [m for m in enc.model.modules() if hasattr(m, "fused_attn") and hasattr(m, "qkv")]
    assert len(blocks) == len(enc.model.blocks) == 2 and all(b.fused_attn for b in blocks)
    calls: list[int] = []
    real = torch.nn.functional.scaled_dot_product_attention

    def counting(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    enc.embed(TILES[:1])
    assert len(calls) == 2  # one fused call per block
    assert use_fused_attention(torch.nn.Linear(2, 2)) == 0


def test_uint8_tensor_tiles_embed_like_arrays(fp32: np.ndarray) -> None:
    enc = _load("fp32")
    np.testing.assert_allclose(enc.embed(torch.from_numpy(TILES)), fp32, rtol=1e-5, atol=1e-5)
    x = preprocess(torch.from_numpy(TILES), enc.spec)
    np.testing.assert_array_equal(x.numpy(), preprocess(TILES, enc.spec).numpy())
    with pytest.raises(TypeError, match="uint8"):
        enc.embed(torch.zeros((1, 224, 224, 3)))
    with pytest.raises(ValueError, match="batch axis"):
        enc.embed(torch.zeros((224, 224, 3), dtype=torch.uint8))


@pytest.mark.skipif(os.environ.get("NAPARI_VIRCHOW_SKIP_COMPILE") == "1", reason="NAPARI_VIRCHOW_SKIP_COMPILE=1")
def test_compile_flag_runs_the_compiled_forward(fp32: np.ndarray) -> None:
    # ~25 s on 2 shared cores (inductor compiles the tiny model once; its cache makes reruns faster)
    enc = _load("fp32", compile=True)
    assert enc.compiled and enc._forward is not enc.model.forward_features
    out = enc.embed(TILES)
    np.testing.assert_allclose(out, fp32, rtol=1e-3, atol=1e-3)
    assert _cosine(out, fp32).min() >= 0.9999
    assert enc.with_dtype("fp16").compiled  # the flag is kept across precisions
    # every other batch size (a last partial batch, a view of another size, one tile) reuses the graph
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for size in (2, 1):
        out = enc.embed(TILES, batch_size=size)
        np.testing.assert_allclose(out, fp32, rtol=1e-3, atol=1e-3)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
