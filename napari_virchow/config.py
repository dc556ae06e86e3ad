"""The package's one configuration object: how a slide is embedded and where its embeddings live.

Light on purpose (no slide, torch or zarr imports), so the CLI can build it before ``--help``
has a reason to wait.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from napari_virchow.models.specs import EncoderSpec

__all__ = ["SessionConfig"]


@dataclass(frozen=True)
class SessionConfig:
    """How to embed a slide: encoder, weights, device, precision, batch size, cache, µm/px override, JPEG decode.

    The one configuration of the package: the widget builds it from its controls, the CLI from
    its flags (``cli.options.config_from_args``), a notebook by hand. Frozen (a dict key) and
    picklable (sent to dask workers).
    """

    encoder: str = "virchow2"
    weights: str | None = None  # file, "random", "hf-hub:REPO", or None (Hugging Face cache / hub)
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int | None = None
    cache_root: Path | None = None  # None: $NAPARI_VIRCHOW_CACHE, else the user cache folder
    tissue_threshold: float | None = None
    threads: int | None = None  # torch threads while embedding (the widget leaves the UI a core)
    mpp_override: float | None = None  # µm per level-0 px for slides opened by the session
    allow_untrained_mpp: bool = False  # opt in to magnifications the encoder was not trained on (recorded)
    #: where JPEG stored tiles are decoded: "auto" (on the encoder's GPU when it has CUDA and the
    #: decoder agrees with imagecodecs, else the CPU), a torch device ("cuda", "cpu": TorchCodec's
    #: batch decoder, torchvision's where TorchCodec does not load), or None (imagecodecs on the CPU)
    decode_device: str | None = "auto"
    #: run the encoder through ``torch.compile`` (inductor; on a CPU with freezing): fuses what the eager
    #: path does not (fp32, CUDA; a bf16 CPU already runs fused linears eagerly and gains nothing); one
    #: graph for every batch size, compiled on the first batch (~30 s for Virchow 2 on 2 CPU cores)
    compile: bool = False

    @property
    def spec(self) -> EncoderSpec:
        """The encoder's spec (input size, µm/px) without loading any weights."""
        from napari_virchow.models.specs import get_spec

        return get_spec(self.encoder)
