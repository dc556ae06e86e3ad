"""Device and precision of an encoder: where it runs, in which dtype, and how.

Two ways to run in reduced precision, chosen per device by :func:`weights_dtype`:

- **autocast** (CUDA, MPS, CPUs without bf16 instructions): fp32 weights, each matmul cast by
  ``torch.autocast``. On CUDA the default is fp16, as the Virchow model cards recommend
  (``dtype="bf16"`` selects bf16).
- **cast weights** (CPUs with native bf16: AVX512-BF16, AMX, Arm BF16): the weights are cast to
  bf16 once at load, and the input with them, so no forward pass re-casts 632 M parameters (under
  autocast a new context casts every weight again, each call). Layer scale is folded into the
  weights before that cast (:func:`fold_layer_scale`): one elementwise pass less per branch.

Attention always goes through PyTorch's fused ``scaled_dot_product_attention``
(:func:`use_fused_attention`).
"""

from __future__ import annotations

import platform

from napari_virchow._torch import torch
from napari_virchow.errors import WeightsError

__all__ = [
    "cpu_has_native_bf16", "describe_dtype", "fold_layer_scale", "precision_phrase", "resolve_device", "resolve_dtype",
    "use_fused_attention", "weights_dtype",
]  # fmt: skip


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> cuda, else mps, else cpu; other values checked against what is present."""
    if isinstance(device, str) and device.strip().lower() == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise WeightsError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps.") from exc
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise WeightsError(
            f"device {device!r} requested but CUDA has {torch.cuda.device_count()} "
            "usable GPU(s) here. Fix: device='auto' or 'cpu'."
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise WeightsError("device 'mps' requested but not available. Fix: device='auto'.")
    return dev


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 instructions (AVX512-BF16, AMX, Arm BF16): bf16 pays there."""
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(cpu, probe, None)
        if fn is not None and fn():
            return True
    if platform.machine().lower() in ("arm64", "aarch64"):
        # oneDNN only claims bf16 on Arm when the core has the BF16 extension.
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


_DTYPES: dict[str, torch.dtype | None] = {
    "fp32": None,
    "float32": None,
    "float": None,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype | None:
    """Reduced-precision dtype for ``device`` (``None`` = plain fp32).

    ``"auto"``: fp16 on CUDA (the Virchow model cards' recommendation), bf16 on CPUs with native
    bf16, fp32 elsewhere. Explicit ``"fp32"``, ``"bf16"``, ``"fp16"`` or a ``torch.dtype`` pass through.
    """
    if dtype is None or dtype == torch.float32:
        return None
    if isinstance(dtype, torch.dtype):
        if dtype in (torch.bfloat16, torch.float16):
            return dtype
        raise WeightsError(f"unsupported dtype {dtype}; use fp32, bf16 or fp16.")
    key = str(dtype).strip().lower()
    if key == "auto":
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else None
    if key not in _DTYPES:
        raise WeightsError(f"unknown dtype {dtype!r}; use auto, fp32, bf16 or fp16.")
    return _DTYPES[key]


def weights_dtype(dtype: torch.dtype | None, device: torch.device) -> torch.dtype:
    """The dtype the weights are kept in: ``dtype`` itself for bf16 on a CPU with native bf16
    (cast once, no autocast), fp32 otherwise (autocast to ``dtype`` per call, or plain fp32)."""
    if dtype is torch.bfloat16 and device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def describe_dtype(dtype: torch.dtype | None) -> str:
    """``"bfloat16"``, ``"float16"`` or ``"fp32"``."""
    return str(dtype).removeprefix("torch.") if dtype else "fp32"


def precision_phrase(dtype: torch.dtype | None, kept: torch.dtype | None) -> str:
    """How an encoder runs, for people: ``"bfloat16 weights (cast once)"``, ``"float16 autocast"``, ``"float32"``.

    ``dtype`` is :func:`resolve_dtype`'s answer, ``kept`` the weights' dtype (:func:`weights_dtype`).
    """
    if dtype is None or dtype is torch.float32:
        return "float32"
    name = describe_dtype(dtype)
    return f"{name} weights (cast once)" if kept is dtype else f"{name} autocast"


def use_fused_attention(model: torch.nn.Module) -> int:
    """Route every timm attention block of ``model`` through ``F.scaled_dot_product_attention``.

    timm decides per block at construction (``timm.layers.use_fused_attn()``, off when
    ``TIMM_FUSED_ATTN=0``); this turns it on regardless. Returns the number of blocks seen.
    """
    n = 0
    for module in model.modules():
        if hasattr(module, "fused_attn") and hasattr(module, "qkv"):
            module.fused_attn = True  # type: ignore[assignment]  # timm's plain bool attribute
            n += 1
    return n


def fold_layer_scale(model: torch.nn.Module) -> int:
    """Fold each block's layer scale into the linear layer before it, for inference; returns blocks folded.

    A ViT block adds ``gamma * proj(attn)`` and ``gamma * fc2(mlp)``: the same as ``proj`` and
    ``fc2`` with weights and bias scaled row-wise by ``gamma`` (exact in real arithmetic; done in
    the weights' current dtype, before any cast), so the extra elementwise pass per branch goes.
    ``ls1``/``ls2`` become identities. Blocks of another shape are left as they are.
    """
    n = 0
    with torch.no_grad():
        for block in model.modules():
            pairs = [(getattr(block, ls, None), getattr(getattr(block, branch, None), name, None))
                     for ls, branch, name in (("ls1", "attn", "proj"), ("ls2", "mlp", "fc2"))]  # fmt: skip
            if not all(_foldable(scale, linear) for scale, linear in pairs):
                continue
            for (scale, linear), ls in zip(pairs, ("ls1", "ls2"), strict=True):
                assert scale is not None and linear is not None  # _foldable
                gamma = scale.gamma.to(linear.weight.dtype)
                linear.weight.mul_(gamma[:, None])
                if linear.bias is not None:
                    linear.bias.mul_(gamma)
                setattr(block, ls, torch.nn.Identity())
            n += 1
    return n


def _foldable(scale: object, linear: object) -> bool:
    return (
        isinstance(scale, torch.nn.Module) and isinstance(getattr(scale, "gamma", None), torch.Tensor)
        and isinstance(linear, torch.nn.Linear) and scale.gamma.shape == (linear.out_features,)
    )  # fmt: skip
