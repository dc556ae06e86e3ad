"""Attention over keys padded to a length PyTorch's CPU flash kernel runs fast, the padding masked out.

Virchow 2 attends over 261 tokens (CLS, 4 registers, 16 × 16 patches). In bf16 on a CPU, PyTorch's
fused ``scaled_dot_product_attention`` takes ~1.7× as long at 261 keys as at 272 keys with the 11
extra masked out (measured, 2 threads, batch 8: 12.9 vs 7.6 ms per block), while at 257 or 197
keys padding gains nothing or loses. Padded keys carry ``-inf`` in an additive mask, so they get
zero weight: the output is that of the unpadded attention (up to the kernel's rounding). Queries
are not padded, so no FLOPs are spent on rows that are thrown away.

Because the gain depends on the kernel, :func:`pad_attention_keys` times both on the model's own
shape, and pads only where padding measured faster (:func:`padding_pays`). The decision is timed
once per shape and dtype in a process and kept: every encoder loaded from the same weights then
computes the same embeddings, bit for bit. fp32 weights are never padded (measured: no gain).
"""

from __future__ import annotations

import functools
import time
from typing import Any

from timm.layers import Attention

from napari_virchow._torch import torch

__all__ = ["KeyPaddedAttention", "pad_attention_keys", "padded_attention", "padded_length", "padding_pays",
           "plain_attention", "sequence_length"]

#: keys are padded up to a multiple of this
MULTIPLE = 16


def padded_length(n: int, multiple: int = MULTIPLE) -> int:
    """``n`` rounded up to a multiple of ``multiple``."""
    return -(-int(n) // multiple) * multiple


class KeyPaddedAttention(Attention):
    """timm's :class:`~timm.layers.Attention` with keys and values padded to :attr:`key_length`.

    Made from a built block by :func:`pad_attention_keys` (the class is swapped; weights untouched).
    Sequences of another length, an explicit ``attn_mask``, causal attention or training run timm's
    own forward.
    """

    key_length: int
    tokens: int

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                **kwargs: Any) -> torch.Tensor:  # fmt: skip
        """timm's forward, with the attention itself over padded keys (:func:`padded_attention`)."""
        batch, n, _ = x.shape
        if self.tokens != n or attn_mask is not None or is_causal or self.training or kwargs:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal, **kwargs)
        out = padded_attention(self.qkv(x), self.num_heads, self.key_length)
        out = self.norm(out.transpose(1, 2).reshape(batch, n, self.attn_dim))
        return self.proj_drop(self.proj(out))


def plain_attention(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """Fused attention of a (B, N, 3·width) q | k | v projection as timm computes it: (B, heads, N, head_dim)."""
    batch, n, three_width = qkv.shape
    q, k, v = qkv.reshape(batch, n, 3, heads, three_width // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def padded_attention(qkv: torch.Tensor, heads: int, key_length: int) -> torch.Tensor:
    """:func:`plain_attention` over keys and values zero-padded to ``key_length``, masked out."""
    batch, n, three_width = qkv.shape
    width = three_width // 3
    head_dim = width // heads
    q = qkv[..., :width].reshape(batch, n, heads, head_dim).transpose(1, 2)
    # a contiguous copy of k | v with zero rows appended (zeros, not garbage: 0 · NaN would be NaN); only
    # the appended rows are filled, where F.pad would zero the whole buffer first
    kv = qkv.new_empty(batch, key_length, 2 * width)
    kv[:, :n] = qkv[..., width:]
    kv[:, n:] = 0
    k, v = kv.reshape(batch, key_length, 2, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=_mask(n, key_length, q))


_masks: dict[tuple[int, int, torch.dtype, torch.device], torch.Tensor] = {}


def _mask(n: int, length: int, like: torch.Tensor) -> torch.Tensor:
    """(n, length) additive mask: 0 for the ``n`` real keys, ``-inf`` for the padding (cached)."""
    key = (n, length, like.dtype, like.device)
    mask = _masks.get(key)
    if mask is None:
        mask = torch.zeros(n, length, dtype=like.dtype, device=like.device)
        mask[:, n:] = float("-inf")
        _masks[key] = mask
    return mask


def _eligible(module: torch.nn.Module) -> bool:
    # q/k norms and gates would see padded rows (or change the layout): leave those blocks alone
    return (
        type(module) in (Attention, KeyPaddedAttention)
        and isinstance(module.q_norm, torch.nn.Identity)
        and isinstance(module.k_norm, torch.nn.Identity)
        and getattr(module, "gate", None) is None
        and bool(getattr(module, "fused_attn", False))
    )


@functools.cache
def padding_pays(tokens: int, heads: int, head_dim: int, dtype: torch.dtype, *, batch: int = 4,
                 repeats: int = 3) -> bool:  # fmt: skip
    """Whether :func:`padded_attention` (keys padded to :func:`padded_length`) ran clearly faster
    (by 10 %) than :func:`plain_attention` on a random ``(batch, tokens, 3·heads·head_dim)``
    projection in ``dtype`` on this CPU, best of ``repeats`` each; timed once per arguments in a
    process (the answer is kept, so encoders loaded alike run alike). Never for fp32."""
    length = padded_length(tokens)
    if length == tokens or dtype == torch.float32:
        return False
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(batch, tokens, 3 * heads * head_dim, generator=gen).to(dtype)

    def best(run: Any) -> float:
        run()  # kernel selection, allocator
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            run()
            times.append(time.perf_counter() - t)
        return min(times)

    with torch.inference_mode():
        t_plain = best(lambda: plain_attention(qkv, heads))
        t_padded = best(lambda: padded_attention(qkv, heads, length))
    return t_padded < 0.9 * t_plain


def sequence_length(model: torch.nn.Module) -> int | None:
    """Tokens a timm ViT attends over (patches + prefix tokens), ``None`` for other models."""
    embed = getattr(model, "patch_embed", None)
    patches, prefix = getattr(embed, "num_patches", None), getattr(model, "num_prefix_tokens", None)
    return int(patches) + int(prefix) if isinstance(patches, int) and isinstance(prefix, int) else None


def pad_attention_keys(model: torch.nn.Module, *, force: bool | None = None) -> int:
    """Make the timm attention blocks of ``model`` pad their keys (:class:`KeyPaddedAttention`) where
    that measured faster on a CPU (:func:`padding_pays`, timed once on the first block's shape and the
    weights' dtype), and plain timm blocks elsewhere (e.g. after a cast to a dtype where it does not
    pay). ``force`` decides without timing. Returns the blocks that pad."""
    blocks: list[Any] = [m for m in model.modules() if _eligible(m)]  # timm's blocks are untyped
    tokens = sequence_length(model)
    if not blocks or tokens is None:
        return 0
    first = blocks[0]
    length = padded_length(tokens)
    if force is not None:
        pays = force
    else:
        on_cpu = first.qkv.weight.device.type == "cpu"
        pays = on_cpu and padding_pays(tokens, int(first.num_heads), int(first.head_dim), first.qkv.weight.dtype)
    pays = pays and length != tokens
    for block in blocks:
        if pays:
            block.__class__ = KeyPaddedAttention
            block.key_length, block.tokens = length, tokens
        else:
            block.__class__ = Attention
    return len(blocks) if pays else 0
