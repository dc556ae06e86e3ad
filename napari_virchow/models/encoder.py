"""Tile encoders: a registry of model specs, preprocessing, weight loading and embedding.

Registered names (``list_encoders()``):

- ``virchow``: Virchow (v1), ViT-H/14 with a SwiGLU MLP; embedding = CLS ⊕ mean(patch tokens),
  2560-d. Weights: Hugging Face ``paige-ai/Virchow`` (gated).
- ``virchow2``: Virchow 2, the same plus 4 register tokens, which the embedding excludes; 2560-d.
  Weights: ``paige-ai/Virchow2`` (gated).
- ``virchow-tiny`` / ``virchow2-tiny``: the same structures at width 48, depth 2 (96-d), with no
  published weights: for tests and demos, ``load_encoder("virchow2-tiny", weights="random")``
  builds one in milliseconds.
- ``timm:<architecture>`` (not listed, resolved on demand): any timm model, e.g.
  ``timm:vit_small_patch16_224``; embedding = the model's pooled features (``num_classes=0``);
  preprocessing from the architecture's pretrained config; 0.5 µm/px.

``load_encoder`` also accepts an :class:`EncoderSpec`, so a variant is a
``dataclasses.replace(get_spec("virchow2"), ...)`` away (e.g. another ``hf_repo``).

Weights (``weights=``): a file (``.safetensors`` preferred; ``.bin/.pth/.pt`` are read with
``torch.load(weights_only=True)``), a folder holding ``model.safetensors``, ``"hf-hub:<repo>"``,
``"random"`` (seeded from the name, with a loud warning), or ``None``: the Hugging Face cache,
then the hub unless ``HF_HUB_OFFLINE`` is set. Every failure is one ``WeightsError`` with the fix.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from napari_virchow._torch import torch
from napari_virchow.errors import WeightsError
from napari_virchow.models import weights as _weights
from napari_virchow.models.key_padding import pad_attention_keys
from napari_virchow.models.onednn import fuse_linears
from napari_virchow.models.precision import (
    cpu_has_native_bf16,
    describe_dtype,
    fold_layer_scale,
    resolve_device,
    resolve_dtype,
    use_fused_attention,
    weights_dtype,
)
from napari_virchow.models.specs import (
    HF_PREFIX,
    IMAGENET_MEAN,
    IMAGENET_STD,
    TIMM_PREFIX,
    EncoderSpec,
    build_model,
    get_spec,
    list_encoders,
    register_encoder,
)

F = torch.nn.functional

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TIMM_PREFIX",
    "Encoder",
    "EncoderSpec",
    "build_model",
    "cpu_has_native_bf16",
    "get_spec",
    "list_encoders",
    "load_encoder",
    "preprocess",
    "register_encoder",
    "resolve_device",
    "resolve_dtype",
    "weights_status",
]

logger = logging.getLogger(__name__)


def _check_tiles(tiles: object) -> np.ndarray | torch.Tensor:
    if isinstance(tiles, torch.Tensor):
        arr: np.ndarray | torch.Tensor = tiles
        dtype, shape = str(tiles.dtype).removeprefix("torch."), tuple(tiles.shape)
    else:
        arr = np.asarray(tiles)
        dtype, shape = str(arr.dtype), arr.shape
    if dtype != "uint8":
        raise TypeError(
            f"tiles must be uint8 RGB (0-255), got dtype {dtype}; convert e.g. with (x * 255).round().astype(np.uint8)."
        )
    if len(shape) != 4 or shape[-1] != 3:
        hint = " (a single tile? add a batch axis: tile[None])" if len(shape) == 3 else ""
        hint = " (RGBA? drop alpha: tiles[..., :3])" if len(shape) == 4 and shape[-1] == 4 else hint
        raise ValueError(f"tiles must have shape (N, H, W, 3), got {shape}{hint}.")
    return arr


def _resize(x: torch.Tensor, size: int, interpolation: str) -> torch.Tensor:
    """uint8 (N, H, W, 3): shorter side to ``size``, then centre crop -- timm's eval transform
    (crop_pct 1.0) on PIL images, which resize in uint8 (rows, then columns, antialiased):
    :func:`~napari_virchow.slides.resample.resize_tensor` agrees with PIL within ±1 grey level."""
    from napari_virchow.slides.resample import resize_tensor

    h, w = x.shape[1:3]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if interpolation == "nearest":
        nchw = F.interpolate(x.permute(0, 3, 1, 2), size=(nh, nw), mode="nearest")
        x = nchw.permute(0, 2, 3, 1)
    else:
        x = resize_tensor(x, (nh, nw), mode="bilinear" if interpolation == "bilinear" else "bicubic")
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[:, top : top + size, left : left + size]


def preprocess(
    tiles: np.ndarray | torch.Tensor, spec: EncoderSpec, *, device: torch.device | str | None = None
) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` tiles -> normalised float32 ``(N, 3, S, S)`` for ``spec``.

    Resize to ``spec.input_size`` only if needed (shorter side, then centre crop, in uint8 as
    timm's transforms on PIL images do; tiles read at ``spec.mpp`` need none); scale to [0, 1];
    subtract ``spec.mean``, divide by ``spec.std``.
    The uint8 tiles go to ``device`` first (a quarter of the float transfer; ``non_blocking``
    from pinned memory); every later step runs there.
    """
    arr = _check_tiles(tiles)
    if isinstance(arr, torch.Tensor):
        x = arr.to(device, non_blocking=True)
    else:
        if not arr.flags.writeable:  # torch.from_numpy warns on read-only (zarr/dask) buffers
            arr = arr.copy()
        x = torch.from_numpy(np.ascontiguousarray(arr)).to(device)
    s = spec.input_size
    if x.shape[0] == 0:
        return torch.zeros((0, 3, s, s), dtype=torch.float32, device=x.device)
    if tuple(x.shape[1:3]) != (s, s):
        x = _resize(x, s, spec.interpolation)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(spec.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


class Encoder:
    """A loaded model with its spec, device and precision; ``embed`` tiles to vectors.

    Attributes
    ----------
    spec : EncoderSpec
    model : torch.nn.Module
        In eval mode, on ``device``; parameters in fp32, or in bf16 on a CPU with native bf16
        (see :mod:`napari_virchow.models.precision`). ``model.forward_features`` gives tokens.
    device : torch.device
    dtype : torch.dtype or None
        Compute dtype (autocast, or the weights' own), ``None`` for fp32.
    weights_id : str
        Short hex digest of the weights file, or ``random-seed<N>``: part of cache keys.
    weights_source : str
        Where the weights came from (a path, ``hf-cache:<repo>@<rev>``, ``random``).
    compiled : bool
        Whether the forward pass runs through ``torch.compile`` (``load_encoder(compile=True)``).
    """

    def __init__(
        self,
        spec: EncoderSpec,
        model: torch.nn.Module,
        *,
        device: torch.device,
        dtype: torch.dtype | None,
        weights_id: str,
        weights_source: str,
        compile: bool = False,
    ) -> None:
        self.spec, self.model, self.device, self.dtype = spec, model, device, dtype
        self.weights_id, self.weights_source = weights_id, weights_source
        self.compiled = bool(compile)
        param = next(iter(model.parameters()), None)
        #: dtype the input is cast to: the weights' own
        self.input_dtype = param.dtype if param is not None else torch.float32
        # autocast only where the weights were not cast to the compute dtype themselves
        self.autocast = dtype is not None and dtype != self.input_dtype
        # timm API; Module.__getattr__ says Tensor
        forward: Callable[[torch.Tensor], torch.Tensor] = (
            model.forward_features if spec.pooling == "cls+mean" else model.forward  # type: ignore[assignment]
        )
        # On a CPU, inductor's freezing turns the (inference-only) weights into constants it can
        # prepack for oneDNN and fuse bias and elementwise work into (the compiled graph holds them).
        options: dict[str, str | int | bool | Callable[..., Any]] | None = (
            {"freezing": True} if device.type == "cpu" else None
        )
        self._forward = _one_graph_per_shape(torch.compile(forward, options=options)) if compile else forward

    @property
    def dim(self) -> int:
        """Embedding length."""
        return self.spec.dim

    def __repr__(self) -> str:
        how = " autocast" if self.autocast else ""
        return (
            f"Encoder({self.spec.name!r}, dim={self.dim}, device={self.device}, "
            f"dtype={describe_dtype(self.dtype)}{how}, weights={self.weights_source} [{self.weights_id}])"
        )

    def with_dtype(self, dtype: str | torch.dtype | None) -> Encoder:
        """The same encoder under another precision.

        The model is shared when its weights' dtype fits the new precision, else a copy is cast
        (e.g. fp32 -> bf16 weights on a CPU with native bf16).
        """
        new = resolve_dtype(dtype, self.device)
        want = weights_dtype(new, self.device)
        model = self.model
        if want != self.input_dtype:
            model = _for_inference(copy.deepcopy(model), want, self.device)  # padding and fusion decided again
        return Encoder(
            self.spec,
            model,
            device=self.device,
            dtype=new,
            weights_id=self.weights_id,
            weights_source=self.weights_source,
            compile=self.compiled,
        )

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    @torch.inference_mode()
    def embed_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Embed preprocessed ``(N, 3, S, S)`` input (see :func:`preprocess`).

        Returns
        -------
        torch.Tensor
            float32 ``(N, dim)`` on ``self.device``.
        """
        return self.pool(self.forward_features(x))

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """The embedding of a :meth:`forward_features` output: CLS ⊕ mean(patch tokens), registers
        excluded, for ``cls+mean`` pooling; the output itself otherwise."""
        if self.spec.pooling == "cls+mean":
            patches = features[:, self.spec.num_prefix_tokens :]  # registers excluded
            return torch.cat([features[:, 0], patches.mean(dim=1)], dim=1)
        return features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The model's output for preprocessed ``(N, 3, S, S)`` input, float32 on ``self.device``:
        ``(N, tokens, D)`` (CLS, registers, patches) for ``cls+mean`` pooling, else ``(N, dim)``.

        The one forward pass :meth:`embed_tensor` pools and :mod:`napari_virchow.models.tokens`
        reads patch tokens from, under this encoder's precision (and compiled graph, if any).
        """
        x = x.to(self.device, self.input_dtype, non_blocking=True)
        with self._autocast():
            return self._forward(x).float()

    def embed(self, tiles: np.ndarray | torch.Tensor, *, batch_size: int | None = None) -> np.ndarray:
        """Embed uint8 RGB tiles ``(N, H, W, 3)``.

        Parameters
        ----------
        tiles : numpy.ndarray or torch.Tensor
            uint8, any H and W (resized to ``spec.input_size`` if they differ); a tensor may
            already be on the device (GPU-decoded tiles, or a pinned transfer).
        batch_size : int, optional
            Tiles per forward pass; default all at once.

        Returns
        -------
        numpy.ndarray
            float32 ``(N, dim)``; ``(0, dim)`` for an empty batch.
        """
        arr = _check_tiles(tiles)
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        step = batch_size or max(len(arr), 1)
        out = np.empty((len(arr), self.dim), dtype=np.float32)
        for i in range(0, len(arr), step):
            x = preprocess(arr[i : i + step], self.spec, device=self.device)
            out[i : i + step] = self.embed_tensor(x).cpu().numpy()
        return out


def _one_graph_per_shape(compiled: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``compiled`` with the batch dimension marked dynamic: one graph serves every batch size.

    A graph compiled for one batch size is compiled again (about 30 s for Virchow 2 on a CPU) for
    each new size: the last partial batch of a run, every view with another number of tiles. A
    batch of one, which dynamo would give a graph of its own, runs as a batch of two (itself twice).
    Inputs are made inference tensors first: a graph's guards also tell those from other tensors.
    """

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            batch = torch.cat([x, x]) if x.shape[0] == 1 else x if x.is_inference() else x.clone()
            torch._dynamo.mark_dynamic(batch, 0)
            return compiled(batch)[: x.shape[0]]

    return forward


def _seed(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=4).digest(), "little")


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    # Seed timm's init without disturbing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _resolve_weights_path(
    spec: EncoderSpec, weights: str | os.PathLike[str] | None
) -> tuple[os.PathLike[str] | str, str]:
    """(path to read, description) for a file, folder, ``hf-hub:<repo>`` or ``None``."""
    if weights is not None and not str(weights).startswith(HF_PREFIX):
        return weights, os.fspath(weights)
    repo = str(weights)[len(HF_PREFIX) :] if weights is not None else spec.hf_repo
    if not repo:
        raise WeightsError(
            f"encoder {spec.name!r} has no published weights. Fix: pass weights=PATH, or "
            "weights='random' for a randomly initialised model (tests, demos)."
        )
    found = _weights.find_in_hf_cache(repo, spec.hf_filenames)
    if found is None:
        found = _weights.download_from_hub(repo, spec.hf_filenames)
    return found, _weights.describe_hf_path(repo, found)


def load_encoder(
    name: str | EncoderSpec,
    weights: str | os.PathLike[str] | None = None,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = "auto",
    compile: bool = False,
) -> Encoder:
    """Build an encoder and load its weights.

    Parameters
    ----------
    name : str or EncoderSpec
        A registered name, ``timm:<architecture>``, or a spec.
    weights : str or path, optional
        File or folder, ``"hf-hub:<repo>"``, ``"random"``, or ``None`` for the Hugging Face
        cache, then the hub (see the module docstring).
    device : str or torch.device
        ``"auto"`` (cuda > mps > cpu), ``"cpu"``, ``"cuda:0"``...
    dtype : str, torch.dtype or None
        Precision: ``"auto"`` (fp16 autocast on CUDA, bf16 weights on a CPU with native bf16,
        else fp32), ``"fp32"``, ``"bf16"``, ``"fp16"``; see :mod:`napari_virchow.models.precision`.
    compile : bool
        Run the forward pass through ``torch.compile`` (the first batch compiles, once for every batch size:
        about 30 s for Virchow 2 on 2 quiet CPU cores; inductor's cache makes later loads
        faster). On a CPU with inductor's ``freezing`` (weights become prepacked constants of
        the compiled graph, which holds a copy of them). Off by default.

    Raises
    ------
    WeightsError
        Unknown encoder or device, weights missing, gated, offline, unreadable or not fitting.
    """
    spec = get_spec(name) if isinstance(name, str) else name
    dev = resolve_device(device)
    compute_dtype = resolve_dtype(dtype, dev)
    if isinstance(weights, str) and weights == "random":
        seed = _seed(spec.name)
        with _seeded(seed):
            model = build_model(spec)
        weights_id, source = f"random-seed{seed}", "random"
        msg = f"{spec.name}: random weights (seed {seed}) -- embeddings are NOT those of the real model"
        logger.warning(msg)
        warnings.warn(msg, UserWarning, stacklevel=2)
    else:
        path, source = _resolve_weights_path(spec, weights)
        path, sd = _weights.read_state_dict(path)
        # Built on meta and filled with the file's tensors: no 2.5 GB random init to throw away.
        with torch.device("meta"):
            model = build_model(spec)
        sd = _weights.match_state_dict(sd, model.state_dict(), source=source, encoder=spec.name)
        model.load_state_dict(sd, strict=True, assign=True)
        if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
            # Non-persistent buffers are not in a state dict: build for real, then copy in.
            with _seeded(_seed(spec.name)):
                model = build_model(spec)
            model.load_state_dict(sd, strict=True)
        weights_id = _weights.file_digest(path)
        logger.info("%s: loaded weights %s (%s)", spec.name, source, weights_id)
    model = _for_inference(model, weights_dtype(compute_dtype, dev), dev)
    return Encoder(spec, model, device=dev, dtype=compute_dtype, weights_id=weights_id, weights_source=source,
                   compile=compile)  # fmt: skip


def _for_inference(model: torch.nn.Module, weights: torch.dtype, device: torch.device) -> torch.nn.Module:
    """``model`` as an :class:`Encoder` runs it: layer scale folded into the weights before a cast to
    reduced-precision ``weights`` (in the weights' current dtype, fp32 first), on ``device`` in eval
    mode without gradients, attention through fused SDPA, and on a CPU the attention keys padded and
    the linears fused with their bias and activation where that measured faster for this dtype."""
    if weights != torch.float32:
        fold_layer_scale(model)  # gamma folded into proj / fc2 (a no-op once folded)
    model = model.to(device=device, dtype=weights).eval().requires_grad_(False)
    use_fused_attention(model)
    pad_attention_keys(model)  # timed on this dtype: it pays in bf16 at 261 keys, not in fp32
    fuse_linears(model)  # bf16 weights on a CPU: bias and SwiGLU fused into oneDNN's matmuls
    return model


def weights_status(spec: EncoderSpec | str) -> dict[str, Any]:
    """Where ``load_encoder(spec)`` would find weights without downloading (nothing is read)."""
    spec = get_spec(spec) if isinstance(spec, str) else spec
    status: dict[str, Any] = {"hf_repo": spec.hf_repo, "found": False, "where": None}
    if spec.hf_repo is None:
        status["where"] = "none published (weights='random' or a file)"
        return status
    path = _weights.find_in_hf_cache(spec.hf_repo, spec.hf_filenames)
    if path is not None:
        status.update(found=True, where=_weights.describe_hf_path(spec.hf_repo, path), path=str(path))
    else:
        url = f"https://huggingface.co/{spec.hf_repo}"
        status["where"] = (
            f"not cached; HF_HUB_OFFLINE is set ({url})"
            if _weights.hub_offline()
            else f"not cached; fetched from {url} on first use"
        )
    return status
