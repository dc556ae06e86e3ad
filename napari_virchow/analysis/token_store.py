"""Compressed patch tokens per slide: a per-slide PCA to ``k`` dims, codes in float16, checksummed.

Storing the 256 × 1280 fp16 tokens of a Virchow 2 tile would take 640 KB; projected on the
slide's first ``k`` principal components (default 48) they take ``256 k · 2`` bytes, plus the
tile's CLS token in float32 (exact): ≈ 29 KB per tile at ``k = 48``. The token map is linear in
the tokens, so it is computed straight from the codes (``W·t ≈ W·μ + z·(P Wᵀ)``), never
decompressing them. The store records ``k``, the PCA's explained variance on its fit sample,
``source = "pca-float16"`` and the encoder/grid it belongs to; the error of the map against the
exact one is measured by the tests and ``benchmarks/bench_token_maps.py``.

Integrity like the embedding store (and with its pieces): every chunk has zstd's checksum and a
crc32c (:func:`~napari_virchow.store.layout.embeddings_codecs`), every file is written atomically
(:class:`~napari_virchow.store.atomic.AtomicLocalStore`), attrs carry a SHA-256 digest, rows are
written before their done flag, and a tile marked done whose chunk is missing, fails its checksum
or holds only zeros is reported as damage, never read as zeros. One writer at a time.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr

from napari_virchow.analysis.heads import LinearHead
from napari_virchow.analysis.token_maps import ClsAttribution, token_terms
from napari_virchow.errors import StoreError
from napari_virchow.store.atomic import AtomicLocalStore
from napari_virchow.store.integrity import DAMAGE, chunk_path
from napari_virchow.store.layout import attrs_digest, embeddings_codecs, flag_codecs, keep_empty, now
from napari_virchow.store.layout import writing_empty_chunks as _empty_chunks
from napari_virchow.store.messages import os_error

__all__ = ["DEFAULT_K", "FORMAT", "TokenStore", "fit_pca"]

FORMAT = "napari-virchow-tokens"
FORMAT_VERSION = 1
DEFAULT_K = 48
_CHUNK_TILES = 16
_SAMPLE = 20000  # tokens the PCA is fitted on


def fit_pca(tokens: np.ndarray, k: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray, float]:
    """``(mean (D,), basis (k, D), explained variance fraction)`` of ``(..., D)`` tokens."""
    x = np.asarray(tokens, np.float32).reshape(-1, np.shape(tokens)[-1])
    if not 1 <= k <= x.shape[1]:
        raise ValueError(f"k must be in 1..{x.shape[1]} (the token width), got {k}")
    if len(x) < 2:
        raise ValueError("the PCA needs at least 2 tokens")
    if len(x) > _SAMPLE:
        x = x[np.random.default_rng(seed).choice(len(x), _SAMPLE, replace=False)]
    mean = x.mean(axis=0, dtype=np.float64)
    xc = x.astype(np.float64) - mean
    evals, evecs = np.linalg.eigh(xc.T @ xc / max(len(x) - 1, 1))
    order = np.argsort(evals)[::-1]
    evals, evecs = np.clip(evals[order], 0, None), evecs[:, order]
    explained = float(evals[:k].sum() / evals.sum()) if evals.sum() > 0 else 1.0
    return mean.astype(np.float32), evecs[:, :k].T.astype(np.float32), explained


class TokenStore:
    """The compressed tokens of one slide's lattice (see the module docstring).

    Create with :meth:`create` (fits the PCA on sample tokens of that slide), reopen with
    :meth:`open`; ``attrs`` holds ``k``, ``explained_variance``, ``source`` and provenance.
    """

    def __init__(self, path: Path, group: zarr.Group, *, writable: bool) -> None:
        self.path, self._group, self.writable = path, group, writable
        self.attrs: dict[str, Any] = dict(group.attrs)
        try:
            self._mean = np.asarray(self._array("mean")[:], np.float32)
            self._basis = np.asarray(self._array("basis")[:], np.float32)
            self._cls, self._codes, self._done = self._array("cls"), self._array("codes"), self._array("done")
        except DAMAGE as exc:
            raise self._damage(f"an array is unreadable ({type(exc).__name__}: {exc})") from exc

    def _array(self, name: str) -> zarr.Array:
        node = self._group[name]
        if not isinstance(node, zarr.Array):
            raise self._damage(f"{name} is not an array")
        return node

    # --- creation / opening -------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        sample_tokens: np.ndarray,
        *,
        n_tiles: int,
        k: int = DEFAULT_K,
        provenance: dict[str, Any] | None = None,
    ) -> TokenStore:
        """A new store at ``path`` for ``n_tiles`` tiles, its PCA fitted on ``(m, g, g, D)`` tokens.

        ``provenance`` (JSON values: encoder, weights id, slide fingerprint, mpp...) is recorded
        and digested with the rest of the attrs. Built in a temp folder and renamed into place.
        """
        path = Path(path)
        sample = np.asarray(sample_tokens, np.float32)
        if sample.ndim != 4 or sample.shape[1] != sample.shape[2]:
            raise ValueError(f"sample_tokens must be (m, g, g, D), got {sample.shape}")
        if path.exists():
            raise StoreError(f"token store {path} already exists; open it with TokenStore.open or delete it")
        g, width = int(sample.shape[1]), int(sample.shape[3])
        mean, basis, explained = fit_pca(sample, min(int(k), width))
        k = basis.shape[0]
        attrs = {"format": FORMAT, "format_version": FORMAT_VERSION, "source": "pca-float16", "k": k,
                 "explained_variance": round(explained, 6), "grid_side": g, "width": width,
                 "n_tiles": int(n_tiles), "pca_sample_tokens": int(min(sample.shape[0] * g * g, _SAMPLE)),
                 "bytes_per_tile": g * g * k * 2 + width * 4, "created": now(), **(provenance or {})}  # fmt: skip
        tmp = path.parent / f".creating-{path.name}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir(parents=True)
            group = zarr.open_group(store=AtomicLocalStore(tmp), mode="w", zarr_format=3)
            group.attrs.update({**attrs, "attrs_digest": attrs_digest(attrs)})
            with _empty_chunks():
                for name, value in (("mean", mean), ("basis", basis)):
                    arr = group.create_array(name, shape=value.shape, dtype="float32", chunks=value.shape,
                                             compressors=embeddings_codecs())  # fmt: skip
                    keep_empty(arr)[...] = value
                rows = max(1, min(_CHUNK_TILES, int(n_tiles)))
                group.create_array("cls", shape=(n_tiles, width), dtype="float32", fill_value=0,
                                   chunks=(rows, width), compressors=embeddings_codecs())  # fmt: skip
                group.create_array("codes", shape=(n_tiles, g * g, k), dtype="float16", fill_value=0,
                                   chunks=(rows, g * g, k), compressors=embeddings_codecs())  # fmt: skip
                done = group.create_array("done", shape=(n_tiles,), dtype="bool", fill_value=False,
                                          chunks=(max(1, int(n_tiles)),), compressors=flag_codecs())  # fmt: skip
                keep_empty(done)[:] = False
            os.rename(tmp, path)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise os_error(exc, path.parent, "creating a token store in") from exc
        return cls.open(path, mode="r+")

    @classmethod
    def open(cls, path: str | os.PathLike[str], mode: Literal["r", "r+"] = "r") -> TokenStore:
        """Open an existing store (``mode`` ``"r"`` or ``"r+"``); its attrs digest is checked."""
        path = Path(path)
        if not (path / "zarr.json").is_file():
            raise StoreError(f"no token store at {path}; create one (enable compressed tokens) or pick the folder")
        try:
            group = zarr.open_group(store=AtomicLocalStore(path, read_only=mode == "r"), mode=mode)
            attrs = dict(group.attrs)
        except DAMAGE as exc:
            raise StoreError(f"token store at {path} is damaged ({type(exc).__name__}: {exc}); delete it") from exc
        if attrs.get("format") != FORMAT:
            raise StoreError(f"{path} is not a token store (format {attrs.get('format')!r}); pick another folder")
        version = attrs.get("format_version", 0)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise StoreError(f"token store {path} is format {version!r}, not one this "
                             f"napari-virchow reads ({FORMAT_VERSION}); upgrade napari-virchow")  # fmt: skip
        body = {k: v for k, v in attrs.items() if k != "attrs_digest"}
        if attrs.get("attrs_digest") != attrs_digest(body):
            raise StoreError(f"token store at {path} is damaged (its attributes fail their digest); delete it")
        return cls(path, group, writable=mode != "r")

    def _damage(self, why: str) -> StoreError:
        return StoreError(f"token store at {self.path} is damaged ({why}); delete it, or recompute the tokens "
                          "of the tiles in view (the token map does so when the store lacks them)")  # fmt: skip

    # --- properties ---------------------------------------------------------------------------
    @property
    def k(self) -> int:
        """PCA dimensions kept."""
        return int(self.attrs["k"])

    @property
    def explained_variance(self) -> float:
        """Fraction of the token variance the ``k`` components explain (on the fit sample)."""
        return float(self.attrs["explained_variance"])

    @property
    def kb_per_tile(self) -> float:
        """Stored bytes per tile before zstd, in KB (1024 bytes)."""
        return int(self.attrs["bytes_per_tile"]) / 1024

    @property
    def n_tiles(self) -> int:
        """Tiles of the lattice the store covers."""
        return int(self.attrs["n_tiles"])

    def done(self) -> np.ndarray:
        """(n_tiles,) bool: tiles whose tokens are stored (verified against its checksum)."""
        if not chunk_path(self.path, self._done, (0,)).is_file():
            raise self._damage("done/c/0 is missing")
        try:
            return np.asarray(self._done[:], bool)
        except DAMAGE as exc:
            raise self._damage(f"done flags fail their checksum ({type(exc).__name__})") from exc

    def missing(self, indices: np.ndarray) -> np.ndarray:
        """Those of ``indices`` not stored yet."""
        idx = self._check_indices(indices)
        return idx[~self.done()[idx]]

    def _check_indices(self, indices: np.ndarray) -> np.ndarray:
        idx = np.asarray(indices, np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.n_tiles):
            raise IndexError(f"tile indices must be in 0..{self.n_tiles - 1} for token store {self.path}")
        return idx

    # --- writing / reading --------------------------------------------------------------------
    def write(self, indices: np.ndarray, cls: np.ndarray, tokens: np.ndarray) -> None:
        """Project and store the tokens ``(n, g, g, D)`` (and CLS ``(n, D)``) of tiles ``indices``."""
        if not self.writable:
            raise StoreError(f"token store {self.path} is open read-only; open it with mode='r+'")
        idx = self._check_indices(indices)
        t = np.asarray(tokens, np.float32)
        g, width = int(self.attrs["grid_side"]), int(self.attrs["width"])
        if t.shape != (len(idx), g, g, width) or np.shape(cls) != (len(idx), width):
            raise ValueError(f"need cls ({len(idx)}, {width}) and tokens ({len(idx)}, {g}, {g}, {width}), "
                             f"got {np.shape(cls)} and {t.shape}")  # fmt: skip
        codes = ((t.reshape(len(idx), g * g, width) - self._mean) @ self._basis.T).astype(np.float16)
        order = np.argsort(idx)
        try:
            self._cls.set_orthogonal_selection((idx[order], slice(None)), np.asarray(cls, np.float32)[order])
            self._codes.set_orthogonal_selection((idx[order], slice(None), slice(None)), codes[order])
            done = self.done()
            done[idx] = True  # after the rows: a crash never leaves a tile done without them
            keep_empty(self._done)[:] = done
        except OSError as exc:
            raise os_error(exc, self.path, "writing tokens to") from exc

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(cls (n, D) float32, codes (n, g·g, k) float32)`` of stored tiles, verified."""
        idx = self._check_indices(indices)
        done = self.done()
        if not done[idx].all():
            raise StoreError(f"{int((~done[idx]).sum())} tile(s) have no stored tokens in {self.path}; "
                             "compute them first (TokenStore.missing lists them)")  # fmt: skip
        rows = int(self._codes.chunks[0])
        for chunk in np.unique(idx // rows):
            for arr, key in ((self._cls, (int(chunk), 0)), (self._codes, (int(chunk), 0, 0))):
                if not chunk_path(self.path, arr, key).is_file():
                    raise self._damage(f"{arr.path} chunk {int(chunk)} is missing")
        try:
            c = np.asarray(self._cls.get_orthogonal_selection((idx, slice(None))), np.float32)
            z = np.asarray(self._codes.get_orthogonal_selection((idx, slice(None), slice(None))), np.float32)
        except DAMAGE as exc:
            raise self._damage(f"a chunk fails its checksum ({type(exc).__name__})") from exc
        empty = ~c.any(axis=1) | ~z.reshape(len(idx), -1).any(axis=1)
        if empty.any():
            raise self._damage(f"{int(empty.sum())} tile(s) marked done hold no tokens")
        return c, z

    def tokens(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(cls, tokens (n, g, g, D))`` decompressed (for similarity; maps use :meth:`token_logits`)."""
        c, z = self.read(indices)
        g = int(self.attrs["grid_side"])
        return c, (z @ self._basis + self._mean).reshape(len(c), g, g, -1)

    def token_logits(
        self, head: LinearHead, indices: np.ndarray, *, attribution: ClsAttribution | None = None
    ) -> np.ndarray:
        """:func:`~napari_virchow.analysis.token_maps.token_logits` from the stored codes, ``(n, n_out, g, g)``."""
        c, z = self.read(indices)
        w_cls, w_patch, b = token_terms(head, int(self.attrs["width"]))
        g = int(self.attrs["grid_side"])
        mean, basis = self._mean.astype(np.float64), self._basis.astype(np.float64)
        tile_part = c.astype(np.float64) @ w_cls.T + b + w_patch @ mean
        if attribution is not None:  # + V·(t_i − mean_j t_j), t ≈ μ + z B: only the codes' deviation counts
            v = attribution.weights.astype(np.float64)
            tile_part = tile_part - z.astype(np.float64).mean(axis=1) @ (basis @ v.T)
            w_patch = w_patch + v
        patch = z.astype(np.float64) @ (basis @ w_patch.T)  # (n, g·g, n_out)
        out = patch.transpose(0, 2, 1) + tile_part[:, :, None]
        return out.reshape(len(c), -1, g, g).astype(np.float32)
