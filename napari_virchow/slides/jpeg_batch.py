"""Decode batches of JPEG stored tiles with ``torchvision.io.decode_jpeg`` (nvJPEG on a GPU).

With a decode device, the CPU only reads each stored tile's bytes (``os.pread``); the tiles of a
batch are decoded in one ``decode_jpeg(list_of_byte_tensors, device=...)`` call. A TIFF JPEG
tile is an abbreviated stream whose tables sit in the page's JPEGTables tag: the stream decoded
is the tables (without their end marker) followed by the tile (without its start marker).
Aperio's RGB-coded JPEG (no JFIF marker) gets an Adobe APP14 marker with "no transform", so
the decoder does not take its RGB for YCbCr, as tifffile/imagecodecs and OpenSlide do.

``device="cpu"`` runs the same API on the CPU (torchvision's libjpeg-turbo): that is how the
path is tested without a GPU. On each level's first batch, one tile is decoded both ways and
compared with :data:`JPEG_TOLERANCE` (``SegmentCache.prefetch``); a decoder that disagrees is
not used for that level (logged), so a pixel never depends on an unverified decoder.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import numpy as np

from napari_virchow.slides.tiff import TiffLevel

__all__ = ["JPEG_TOLERANCE", "TorchJpegDecoder", "decoder_for", "decoder_works", "jpeg_stream"]

log = logging.getLogger(__name__)

#: largest per-pixel difference from imagecodecs accepted (different IDCT/upsampling kernels)
JPEG_TOLERANCE = 8
#: APP14 "Adobe" segment, transform 0: the three components are RGB, not YCbCr
ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"


def jpeg_stream(tile: bytes, tables: bytes | None, *, rgb_coded: bool) -> bytes:
    """A complete JPEG stream from a TIFF tile, its page's JPEGTables and its colour coding."""
    body = tile if tables is None else tables[:-2] + tile[2:]
    return body[:2] + ADOBE_RGB + body[2:] if rgb_coded else body


class TorchJpegDecoder:
    """Batch JPEG decode on one torch device; results come back as (h, w, 3) uint8 numpy."""

    def __init__(self, device: str) -> None:
        import torch

        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"decode_device={device!r} needs CUDA, which this machine lacks; use None (CPU decode)")

    def supports(self, level: TiffLevel) -> bool:
        """Whether ``level`` is 8-bit 3-sample JPEG (callers still :meth:`verify` a first tile)."""
        return level.jpeg_colorspaces is not None

    def decode(self, level: TiffLevel, indices: Sequence[int]) -> list[np.ndarray | None]:
        """Segments ``indices`` of ``level`` decoded (``None`` where the file has none)."""
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

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
        decoded = decode_jpeg(streams, mode=ImageReadMode.RGB, device=self.device)
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
            log.warning("%s: %s JPEG decode differs from imagecodecs; decoding this level on the CPU",
                        level.path.name, self.device)  # fmt: skip
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

    False where the device is absent or torchvision was built without its decoder (e.g. no
    nvJPEG): callers then decode with imagecodecs on the CPU.
    """
    with _decoders_lock:
        if device in _works:
            return _works[device]
    try:
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

        decoder_for(device)
        probe = torch.arange(16 * 16 * 3, dtype=torch.uint8).reshape(3, 16, 16)
        stream = encode_jpeg(probe, quality=95)
        image = decode_jpeg([stream], mode=ImageReadMode.RGB, device=torch.device(device))[0].cpu()
        ok = tuple(image.shape) == (3, 16, 16)
    except (RuntimeError, ValueError, OSError) as exc:
        log.info("batch JPEG decode on %s is not available (%s); decoding on the CPU", device, exc)
        ok = False
    with _decoders_lock:
        _works[device] = ok
    return ok
