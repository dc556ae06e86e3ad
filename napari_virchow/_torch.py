"""Import torch in a way that cannot crash a running napari.

torch imports triton (through torchvision → torch._dynamo) when it is installed. triton carries its
own LLVM; loading it into a process that already mapped another LLVM — Mesa's software GL
(llvmpipe) or AMD's radeonsi, i.e. a napari viewer drawing through Mesa — segfaults (seen here
under Xvfb, with triton imported on the main thread as well as in a worker). Inference never needs
triton, so in that case it is hidden from torch before the first import. Import torch in this
package only as ``from ._torch import torch``.
"""

from __future__ import annotations

import sys


def _llvm_already_loaded() -> bool:
    try:
        with open("/proc/self/maps") as maps:
            return any("libLLVM" in line for line in maps)
    except OSError:  # not Linux: no Mesa LLVM clash to avoid
        return False


if "triton" not in sys.modules and _llvm_already_loaded():
    sys.modules["triton"] = None  # type: ignore[assignment]  # import triton -> ImportError

import torch  # noqa: E402

__all__ = ["torch"]
