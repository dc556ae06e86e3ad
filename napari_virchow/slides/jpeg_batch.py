"""Decode batches of JPEG stored tiles with TorchCodec's ``decode_jpeg`` (nvJPEG on a GPU).

With a decode device, the CPU only reads each stored tile's bytes (``os.pread``); the tiles of a
batch are decoded in one ``decode_jpeg(list_of_byte_tensors, device=...)`` call, by
``torchcodec.decoders`` (0.16 and later; its wheels bundle libjpeg-turbo and nvJPEG). Where
TorchCodec is missing or does not load against this torch, torchvision's ``decode_jpeg`` (the
same API, deprecated since torchvision 0.29) stands in; with neither, imagecodecs decodes.

A TIFF JPEG tile is an abbreviated stream whose tables sit in the page's JPEGTables tag: the
stream decoded is the tables (without their end marker) followed by the tile (without its start
marker). Aperio's RGB-coded JPEG (no JFIF marker) gets an Adobe APP14 marker with "no
transform", so the decoder does not take its RGB for YCbCr, as tifffile/imagecodecs and
OpenSlide do.

``device="cpu"`` runs the same API on the CPU (libjpeg-turbo): that is how the path is tested
without a GPU. On each level's first batch, one tile is decoded both ways and compared with
:data:`JPEG_TOLERANCE` (``SegmentCache.prefetch``); a decoder that disagrees is not used for
that level (logged), so a pixel never depends on an unverified decoder.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from napari_virchow.slides.tiff import TiffLevel

__all__ = ["BACKENDS", "JPEG_TOLERANCE", "JpegBackend", "TorchJpegDecoder", "decoder_for", "decoder_works",
           "jpeg_backend", "jpeg_stream"]

log = logging.getLogger(__name__)

#: largest per-pixel difference from imagecodecs accepted (different IDCT/upsampling kernels)
JPEG_TOLERANCE = 8
#: APP14 "Adobe" segment, transform 0: the three components are RGB, not YCbCr
ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"


#: batch JPEG decoders in order of preference
BACKENDS = ("torchcodec", "torchvision")


class JpegBackend(NamedTuple):
    """A batch ``decode_jpeg``: a list of 1-D uint8 CPU tensors in, CHW uint8 tensors on ``device`` out."""

    name: str
    decode_jpeg: Callable[..., Any]
    rgb: Any  # the `mode` that asks for RGB

    def decode(self, streams: list[Any], device: Any) -> list[Any]:
        """``streams`` decoded to RGB on ``device``."""
        return list(self.decode_jpeg(streams, mode=self.rgb, device=device))


_backend_lock = threading.Lock()
_backends: dict[tuple[str, ...], JpegBackend] = {}


def jpeg_backend(preference: Sequence[str] = BACKENDS) -> JpegBackend:
    """The first batch decoder of ``preference`` that loads here: TorchCodec, else torchvision.

    Raises ImportError when none loads (callers then decode with imagecodecs).
    """
    key = tuple(preference)
    with _backend_lock:
        if key in _backends:
            return _backends[key]
        failures = []
        for name in key:
            try:
                if name == "torchcodec":
                    from torchcodec.decoders import decode_jpeg

                    backend = JpegBackend(name, decode_jpeg, "RGB")
                elif name == "torchvision":
                    from torchvision.io import ImageReadMode
                    from torchvision.io import decode_jpeg as tv_decode_jpeg

                    backend = JpegBackend(name, tv_decode_jpeg, ImageReadMode.RGB)
                else:
                    raise ValueError(f"unknown JPEG decoder {name!r}; choose from {BACKENDS}")
            except (ImportError, OSError, RuntimeError) as exc:  # absent, or built for another torch
                failures.append(f"{name}: {exc}")
                continue
            if failures:
                log.info("batch JPEG decode through %s (%s)", name, "; ".join(failures))
            _backends[key] = backend
            return backend
        raise ImportError("no batch JPEG decoder loads here (" + "; ".join(failures) + ")")


def jpeg_stream(tile: bytes, tables: bytes | None, *, rgb_coded: bool) -> bytes:
    """A complete JPEG stream from a TIFF tile, its page's JPEGTables and its colour coding."""
    body = tile if tables is None else tables[:-2] + tile[2:]
    return body[:2] + ADOBE_RGB + body[2:] if rgb_coded else body


class TorchJpegDecoder:
    """Batch JPEG decode on one torch device; results come back as (h, w, 3) uint8 numpy.

    ``backends``: the decoders to try, in order (see :func:`jpeg_backend`); the first that loads
    decodes. Raises ValueError for a device this machine lacks, or where none loads.
    """

    def __init__(self, device: str, backends: Sequence[str] = BACKENDS) -> None:
        import torch

        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"decode_device={device!r} needs CUDA, which this machine lacks; use None (CPU decode)")
        try:
            self.backend = jpeg_backend(backends)
        except ImportError as exc:
            raise ValueError(f"decode_device={device!r}: {exc}; install torchcodec, or use None (CPU decode)") from exc

    def supports(self, level: TiffLevel) -> bool:
        """Whether ``level`` is 8-bit 3-sample JPEG (callers still :meth:`verify` a first tile)."""
        return level.jpeg_colorspaces is not None

    def decode(self, level: TiffLevel, indices: Sequence[int]) -> list[np.ndarray | None]:
        """Segments ``indices`` of ``level`` decoded (``None`` where the file has none)."""
        import torch

        colorspaces = level.jpeg_colorspaces
        if colorspaces is None:
            raise ValueError(f"{level.path.name}: this level is not RGB JPEG; decode it with imagecodecs")
        rgb_coded = colorspaces[0] == 2
        out: list[np.ndarray | None] = [None] * len(indices)
        streams, where = [], []
        for k, index in enumerate(indices):
            raw = level.read_segment_bytes(int(index))
            if raw is not None:
                stream = jpeg_stream(raw, level.jpegtables, rgb_coded=rgb_coded)
                streams.append(torch.frombuffer(bytearray(stream), dtype=torch.uint8))
                where.append(k)
        if not streams:
            return out
        decoded = self.backend.decode(streams, self.device)
        level.count_decodes(len(streams))
        if len({tuple(img.shape) for img in decoded}) == 1:  # one device-to-host copy per batch
            host = torch.stack(decoded).permute(0, 2, 3, 1).contiguous().cpu().numpy()
            images = [np.ascontiguousarray(host[j]) for j in range(len(decoded))]
        else:
            images = [np.ascontiguousarray(img.permute(1, 2, 0).cpu().numpy()) for img in decoded]
        for k, img in zip(where, images, strict=True):
            out[k] = img
        return out

    def verify(self, level: TiffLevel, index: int, pixels: np.ndarray) -> bool:
        """Whether ``pixels`` (this decoder's segment ``index``) match imagecodecs' within tolerance."""
        reference = level.decode_segment(index)
        ok = (
            reference is not None
            and reference.shape == pixels.shape
            and int(np.abs(reference.astype(np.int16) - pixels).max()) <= JPEG_TOLERANCE
        )
        if not ok:
            log.warning("%s: %s JPEG decode (%s) differs from imagecodecs; decoding this level on the CPU",
                        level.path.name, self.device, self.backend.name)  # fmt: skip
        return bool(ok)


_decoders: dict[str, TorchJpegDecoder] = {}
_decoders_lock = threading.Lock()
_works: dict[str, bool] = {}


def decoder_for(device: str) -> TorchJpegDecoder:
    """The shared decoder of ``device`` (``"cuda"``, ``"cuda:1"``, ``"cpu"``)."""
    with _decoders_lock:
        if device not in _decoders:
            _decoders[device] = TorchJpegDecoder(device)
        return _decoders[device]


def decoder_works(device: str) -> bool:
    """Whether batch JPEG decode runs on ``device`` here (a small JPEG round trip; remembered).

    False where the device is absent, no batch decoder loads (:func:`jpeg_backend`), or it was
    built without the device's decoder (e.g. no nvJPEG): callers then decode with imagecodecs on
    the CPU.
    """
    with _decoders_lock:
        if device in _works:
            return _works[device]
    try:
        import imagecodecs
        import torch

        backend = decoder_for(device).backend
        probe = np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3)
        stream = torch.frombuffer(bytearray(imagecodecs.jpeg8_encode(probe, level=95)), dtype=torch.uint8)
        image = backend.decode([stream], torch.device(device))[0].cpu()
        ok = tuple(image.shape) == (3, 16, 16)
        log.debug("batch JPEG decode on %s through %s: %s", device, backend.name, "works" if ok else "wrong shape")
    except (ImportError, RuntimeError, ValueError, OSError) as exc:
        log.info("batch JPEG decode on %s is not available (%s); decoding on the CPU", device, exc)
        ok = False
    with _decoders_lock:
        _works[device] = ok
    return ok
