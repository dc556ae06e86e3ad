"""FLOPs per tile (the MFU numerator) against torch's own counter, and Virchow 2's ≈ 0.34 TFLOP."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from napari_virchow.models.encoder import build_model, load_encoder
from napari_virchow.models.flops import vit_flops_per_tile


@pytest.mark.parametrize("name", ["virchow2-tiny", "virchow-tiny"])
def test_flops_match_torch_flop_counter_with_unfused_attention(name: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = load_encoder(name, "random", device="cpu", dtype="fp32").model
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False  # explicit q @ kᵀ and attn @ v: the counter sees them
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model.forward_features(torch.zeros(2, 3, 224, 224))
    assert counter.get_total_flops() == 2 * vit_flops_per_tile(model, 224)


def test_virchow2_is_about_a_third_of_a_teraflop_per_tile() -> None:
    with torch.device("meta"):
        model = build_model("virchow2")
    flops = vit_flops_per_tile(model, 224)
    # 32 blocks × 261 tokens × (4·1280² + 1280·6832 + 3416·1280) MACs + attention + patch embedding
    analytic = 2 * 32 * (261 * 1280 * (4 * 1280 + 6832 + 3416) + 2 * 261**2 * 1280) + 2 * 588 * 1280 * 256
    assert flops == analytic and 0.33e12 < flops < 0.35e12
