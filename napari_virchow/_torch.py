"""Import torch in a way that cannot crash a running napari.

torch imports triton (at import, and lazily through timm → torchvision → torch._dynamo) when it is
installed. triton carries its own LLVM; loading it into a process that already mapped another
LLVM — Mesa's software GL (llvmpipe) or AMD's radeonsi, i.e. a napari viewer drawing through Mesa
— segfaults (seen here under Xvfb, from the main thread and from workers). Inference never needs
triton, so :func:`hide_triton_if_unsafe` marks it absent (``sys.modules["triton"] = None``: torch
then treats it as not installed) exactly when another LLVM is already loaded; it runs before this
package imports torch or timm. Import torch in this package only as ``from ._torch import torch``.
"""

from __future__ import annotations

import sys
from types import ModuleType


def llvm_already_loaded() -> bool:
    """Whether a shared LLVM (e.g. Mesa's) is mapped into this process (Linux only)."""
    try:
        with open("/proc/self/maps") as maps:
            return any("libLLVM" in line for line in maps)
    except OSError:  # not Linux: no such clash known
        return False


def hide_triton_if_unsafe() -> bool:
    """Hide triton from torch when loading it would crash this process; True if hidden."""
    if sys.modules.get("triton", False) is None:
        return True
    if "triton" not in sys.modules and llvm_already_loaded():
        sys.modules["triton"] = None  # type: ignore[assignment]
        return True
    return False


def import_timm() -> ModuleType:
    """``import timm`` (which imports torchvision, which may import triton), safely."""
    hide_triton_if_unsafe()
    import timm

    return timm


hide_triton_if_unsafe()

import torch  # noqa: E402

__all__ = ["hide_triton_if_unsafe", "import_timm", "llvm_already_loaded", "torch"]
