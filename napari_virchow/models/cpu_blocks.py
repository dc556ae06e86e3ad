"""Faster inference for timm ViT blocks on a CPU, same weights and same numbers (within rounding).

Two measured costs of Virchow 2 on a CPU (bf16, batch 8, 2 cores; the linears already run at the
bf16 matmul peak) are not in the matmuls:

- **Attention over 261 keys** (CLS + 4 registers + 256 patches). PyTorch's fused CPU kernel is
  about 2.4x slower for a key length that is not a multiple of its block (261 keys: 0.38 s per batch
  for the 32 blocks, 256 keys: 0.16 s). :func:`split_key_attention` runs the kernel on the largest
  multiple of 32 keys, attends to the few remaining keys directly, and merges the two softmaxes
  exactly through their log-sum-exp (~0.29 s).
- **The SwiGLU gate** allocates two activations the size of the hidden layer per block;
  :class:`InplaceGluMlp` gates in place.

:func:`use_cpu_blocks` swaps these in (``__class__`` only: parameters, state-dict keys and
``isinstance`` checks stay timm's), for inference; anything else (a mask, training, a gated or
causal call, timm's unfused attention) runs timm's own code.
"""

from __future__ import annotations

from typing import Any

from napari_virchow._torch import import_timm, torch

import_timm()  # timm imported the safe way first (see _torch.py)
from timm.layers import Attention, GluMlp  # noqa: E402

F = torch.nn.functional

__all__ = ["InplaceGluMlp", "KeySplitAttention", "split_key_attention", "use_cpu_blocks"]

#: keys handed to the fused kernel come in multiples of this
KEY_BLOCK = 32

_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def split_key_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """``softmax(q kᵀ · scale) v`` for ``(B, H, N, D)`` CPU tensors, with the fused kernel on a whole
    number of :data:`KEY_BLOCK` keys and the rest attended directly.

    The two parts' softmaxes are merged by their log-sum-exp: ``o = o₁ + (o₂ - o₁) σ(lse₂ - lse₁)``,
    which is the softmax over all keys. Falls back to ``F.scaled_dot_product_attention`` when the
    key length is already a multiple (or shorter than one block) or the kernel is missing.
    """
    n = k.shape[-2]
    head = n - n % KEY_BLOCK
    if _flash is None or head == n or head == 0:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    o1, lse1 = _flash(q, k[..., :head, :], v[..., :head, :], scale=scale)
    with torch.autocast("cpu", enabled=False):  # fp32, like the kernel's accumulators, under autocast too
        s2 = torch.matmul(q.float(), k[..., head:, :].float().transpose(-1, -2)).mul_(scale)
        lse2 = torch.logsumexp(s2, dim=-1)
        o2 = torch.matmul(torch.softmax(s2, dim=-1), v[..., head:, :].float())
        w2 = torch.sigmoid(lse2 - lse1.float()).unsqueeze(-1)  # share of the softmax mass on the remaining keys
        return torch.lerp(o1.float(), o2, w2).to(o1.dtype)


class KeySplitAttention(Attention):
    """timm ``Attention`` whose inference forward uses :func:`split_key_attention`."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """timm's attention; at inference without a mask, through :func:`split_key_attention`."""
        if self.training or not self.fused_attn or attn_mask is not None or is_causal or self.gate is not None:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        out = split_key_attention(q, k, v, self.scale).transpose(1, 2).reshape(b, n, self.attn_dim)
        return self.proj_drop(self.proj(self.norm(out)))


class InplaceGluMlp(GluMlp):
    """timm ``GluMlp`` (SwiGLU) that gates in place at inference: no new hidden-size tensors."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """timm's SwiGLU; without grad, the gate and product overwrite ``fc1``'s output."""
        if self.training or torch.is_grad_enabled():
            return super().forward(x)
        h = self.fc1(x)
        x1, x2 = h.chunk(2, dim=self.chunk_dim)
        gate, value = (x2, x1) if self.gate_last else (x1, x2)
        act: Any = self.act
        if isinstance(act, torch.nn.SiLU):
            F.silu(gate, inplace=True)
        else:
            gate.copy_(act(gate))
        return self.drop2(self.fc2(self.norm(self.drop1(gate.mul_(value)))))


def use_cpu_blocks(model: torch.nn.Module) -> int:
    """Swap timm's ``Attention`` and ``GluMlp`` modules of ``model`` for the CPU inference versions
    above; returns the number of modules swapped. Only exact timm classes are swapped."""
    n = 0
    for module in model.modules():
        if type(module) is Attention:
            module.__class__ = KeySplitAttention
            n += 1
        elif type(module) is GluMlp:
            module.__class__ = InplaceGluMlp
            n += 1
    return n
