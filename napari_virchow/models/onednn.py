"""A ViT's linear layers on a CPU through oneDNN with bias and activation fused, in eager mode.

Eager ``nn.Linear`` on a CPU adds its bias in a pass of its own, and timm's SwiGLU MLP
(:class:`~timm.layers.GluMlp`, Virchow 2's) runs SiLU and the gate product as two more passes over a
(tokens × 3,416) tensor per block. oneDNN fuses both into the matmul as post-ops; PyTorch exposes
them as ``torch.ops.mkldnn._linear_pointwise``, the op inductor's freezing pass emits for CPU
linears (``--compile`` gets the same fusion by compiling: there these modules trace as timm's).
:func:`fuse_linears` swaps the classes of the built modules (weights untouched, no copies: the two
halves of ``fc1`` are row slices):

- :class:`OneDnnLinear`: ``x @ W.T + b`` in one oneDNN call;
- :class:`OneDnnGluMlp`: ``silu(x @ Wa.T + ba)`` (swish post-op), times ``x @ Wg.T + bg`` (binary
  ``mul`` post-op on the second matmul), then ``fc2``: three calls, no elementwise passes.

Measured on Virchow 2 (random weights, bf16 weights, batch 8, interleaved with timm's modules in one
run): 1.25× per batch at 2 threads, 1.19× at 1 thread. Used for bf16 weights on a CPU only (where
it was measured), after a check on the model's own first MLP that the fused op agrees with the
plain one; anything else keeps (or gets back) PyTorch's and timm's own modules.
"""

from __future__ import annotations

from typing import Any

from timm.layers import GluMlp

from napari_virchow._torch import torch

__all__ = ["OneDnnGluMlp", "OneDnnLinear", "fuse_linears", "fused_linear_available"]


def _pointwise() -> Any:
    return getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)


def fused_linear_available() -> bool:
    """Whether this PyTorch has oneDNN's fused linear op (``torch.ops.mkldnn._linear_pointwise``)."""
    try:
        return torch.backends.mkldnn.is_available() and _pointwise() is not None
    except (AttributeError, RuntimeError):
        return False


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _plain(module: torch.nn.Module) -> bool:
    """Whether to run the module's own forward: under ``torch.compile`` (inductor fuses by itself),
    in training (dropout, gradients: the fused op has no backward) or with gradients on its weights."""
    return (
        torch.compiler.is_compiling()
        or module.training
        or (torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters()))
    )


class OneDnnLinear(torch.nn.Linear):
    """:class:`torch.nn.Linear` with the bias added inside oneDNN's matmul."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ weight.T + bias`` in one oneDNN call (PyTorch's own under ``torch.compile``, which fuses itself)."""
        if _plain(self):
            return super().forward(x)
        out = _pointwise()(_rows(x), self.weight, self.bias, "none", [], "")
        return out.reshape(*x.shape[:-1], self.out_features)


class OneDnnGluMlp(GluMlp):
    """timm's SwiGLU :class:`~timm.layers.GluMlp` (``act(x1) * x2``, SiLU) with SiLU and the gate
    product fused into the ``fc1`` matmuls as oneDNN post-ops."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``fc2(silu(fc1_a(x)) * fc1_b(x))``, as :class:`GluMlp` computes it (timm's own under ``torch.compile``)."""
        if _plain(self):
            return super().forward(x)
        op = _pointwise()
        rows, hidden = _rows(x), self.fc2.in_features
        w, b = self.fc1.weight, self.fc1.bias
        act = op(rows, w[:hidden], None if b is None else b[:hidden], "swish", [], "")
        gated = op.binary(rows, act, w[hidden:], None if b is None else b[hidden:], "mul")
        out = op(gated, self.fc2.weight, self.fc2.bias, "none", [], "")
        return out.reshape(*x.shape[:-1], self.fc2.out_features)


def _glu_eligible(m: Any) -> bool:  # timm's modules are untyped
    return bool(
        type(m) in (GluMlp, OneDnnGluMlp)
        and isinstance(m.act, torch.nn.SiLU)
        and not m.gate_last
        and m.chunk_dim == -1
        and isinstance(m.norm, torch.nn.Identity)
        and type(m.fc1) in (torch.nn.Linear, OneDnnLinear)
        and type(m.fc2) in (torch.nn.Linear, OneDnnLinear)
    )


def _agrees(mlp: Any) -> bool:
    """The fused MLP gives the plain one's output on random input (a broken op is not used)."""
    weight = mlp.fc1.weight
    x = torch.randn(37, mlp.fc1.in_features, generator=torch.Generator().manual_seed(0)).to(weight.dtype)
    cls = mlp.__class__
    with torch.inference_mode():
        mlp.__class__ = GluMlp
        want = mlp(x).float()
        mlp.__class__ = OneDnnGluMlp
        try:
            got = mlp(x).float()
        except RuntimeError:
            return False
        finally:
            mlp.__class__ = cls
    tol = 1e-4 if weight.dtype == torch.float32 else 3e-2
    return bool(torch.allclose(got, want, rtol=tol, atol=tol * float(want.abs().max())))


def fuse_linears(model: torch.nn.Module, *, force: bool | None = None) -> int:
    """Swap ``model``'s plain linears and SwiGLU MLPs for their oneDNN-fused classes where that pays
    (bf16 weights on a CPU, the op present and agreeing), back to PyTorch's / timm's elsewhere.

    ``force`` decides without looking at device and dtype (the agreement check still runs).
    Returns the modules now fused.
    """
    linears = [m for m in model.modules() if type(m) in (torch.nn.Linear, OneDnnLinear)]
    mlps = [m for m in model.modules() if _glu_eligible(m)]
    if not linears:
        return 0
    weight = linears[0].weight
    wanted = force if force is not None else (weight.device.type == "cpu" and weight.dtype == torch.bfloat16)
    fuse = bool(wanted) and fused_linear_available() and weight.device.type == "cpu"
    if fuse and mlps:
        fuse = _agrees(mlps[0])
    for m in linears:
        m.__class__ = OneDnnLinear if fuse else torch.nn.Linear
    for m in mlps:
        m.__class__ = OneDnnGluMlp if fuse else GluMlp
    return len(linears) + len(mlps) if fuse else 0
