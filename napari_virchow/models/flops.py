"""FLOPs of one ViT forward pass per tile: the numerator of a model-FLOP utilisation (MFU).

Counted from the built model's own layers (works on the ``meta`` device): every ``Linear`` of
the blocks applied to every token, the patch-embedding convolution, and the two attention
matmuls (``q @ kᵀ`` and ``attn @ v``) per block. A multiply-add is 2 FLOPs; norms, softmax and
activations are not counted (as in the usual MFU convention). ``torch.utils.flop_counter``
agrees when attention runs unfused; it does not see inside the fused CPU SDPA kernel.
"""

from __future__ import annotations

from typing import Any

from napari_virchow._torch import torch

__all__ = ["vit_flops_per_tile"]


def vit_flops_per_tile(model: Any, input_size: int) -> int:  # a timm VisionTransformer
    """Forward FLOPs for one ``input_size``² tile of a timm ``VisionTransformer`` (features only).

    Virchow 2 (ViT-H/14, SwiGLU, 4 registers) at 224²: ≈ 0.34 TFLOP.
    """
    patch_embed = model.patch_embed
    ph, pw = patch_embed.patch_size
    n_patches = (input_size // ph) * (input_size // pw)
    tokens = n_patches + int(model.num_prefix_tokens)
    width = int(model.embed_dim)
    proj = patch_embed.proj
    flops = 2 * proj.in_channels * ph * pw * proj.out_channels * n_patches
    for block in model.blocks:
        linear = sum(m.in_features * m.out_features for m in block.modules() if isinstance(m, torch.nn.Linear))
        flops += 2 * linear * tokens + 2 * 2 * tokens * tokens * width
    return int(flops)
