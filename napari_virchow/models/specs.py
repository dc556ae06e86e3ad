"""Encoder specs and their registry (private; the public names are re-exported by ``encoders``).

Specs are plain data and the registry needs neither torch nor timm: ``list_encoders`` and
``get_spec`` for registered names import nothing heavy (the widget lists names at start-up).
timm and torch are imported inside the functions that build models.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from napari_virchow.errors import WeightsError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TIMM_PREFIX = "timm:"
HF_PREFIX = "hf-hub:"
Pooling = Literal["cls+mean", "pooled"]
#: relative tolerance within which a µm/px counts as one of a spec's trained magnifications
MPP_MATCH = 0.01


class UntrainedMagnificationError(WeightsError):
    """A magnification (µm/px) the encoder was not trained on, asked for without the opt-in."""


@dataclass(frozen=True)
class EncoderSpec:
    """Everything needed to build a model, feed it tiles and turn its output into an embedding.

    Attributes
    ----------
    name, architecture : str
        Registry name and the timm architecture built with ``model_kwargs``.
    input_size : int
        Square input side in px; ``mpp`` is the µm/px tiles must be read at.
    mean, std, interpolation
        Normalisation (applied after scaling to [0, 1]) and the resize filter.
    pooling : {"cls+mean", "pooled"}
        ``cls+mean``: CLS token ⊕ mean of the tokens after the ``num_prefix_tokens`` prefix
        (CLS + registers); ``pooled``: the model's own pooled features.
    dim : int
        Embedding length. ``hf_repo`` / ``hf_filenames``: where the weights live on the hub.
    trained_mpps : tuple of float
        Magnifications (µm/px) the model was trained on, finest first; default ``(mpp,)``.
        Embedding at another one needs ``allow_untrained=True`` (see :meth:`check_mpp`).
    """

    name: str
    architecture: str
    model_kwargs: Mapping[str, Any] = field(default_factory=dict, hash=False)
    input_size: int = 224
    mpp: float = 0.5
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"
    pooling: Pooling = "cls+mean"
    num_prefix_tokens: int = 1
    dim: int = 2560
    hf_repo: str | None = None
    hf_filenames: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")
    description: str = ""
    trained_mpps: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        # A private copy, so a caller's dict cannot change the spec later. (A plain dict, not a
        # read-only proxy: specs must pickle, e.g. to dask workers. Treat it as read-only.)
        object.__setattr__(self, "model_kwargs", dict(self.model_kwargs))
        mpps = tuple(self.trained_mpps) or (self.mpp,)
        for m in (self.mpp, *mpps):
            if not (isinstance(m, (int, float)) and math.isfinite(m) and m > 0):
                raise ValueError(f"spec {self.name!r}: magnifications are positive µm/px, got {m!r}")
        object.__setattr__(self, "trained_mpps", tuple(sorted({round(float(m), 6) for m in mpps})))
        if not self._trained(self.mpp):
            raise ValueError(f"spec {self.name!r}: its mpp {self.mpp:g} is not in trained_mpps {self.trained_mpps}")

    # --- magnifications ---------------------------------------------------------------------
    def _trained(self, mpp: float) -> bool:
        return any(abs(math.log(mpp / t)) <= MPP_MATCH for t in self.trained_mpps)

    def with_trained_mpps(self, *mpps: float) -> EncoderSpec:
        """This spec with ``mpps`` added to its trained magnifications (e.g. a timm model the
        user knows was trained at 1.0 µm/px too)."""
        return dataclasses.replace(self, trained_mpps=(*self.trained_mpps, *mpps))

    def check_mpp(self, mpp: float, *, allow_untrained: bool = False) -> bool:
        """Whether tiles at ``mpp`` µm/px match a trained magnification (``True``), or are an
        explicit opt-in outside them (``False``, logged); record the answer in provenance.

        Raises
        ------
        UntrainedMagnificationError
            ``mpp`` is not a trained magnification and ``allow_untrained`` is false.
        ValueError
            ``mpp`` is not a positive number.
        """
        if isinstance(mpp, bool) or not (isinstance(mpp, (int, float)) and math.isfinite(mpp) and mpp > 0):
            raise ValueError(f"mpp must be a positive number of µm/px, got {mpp!r}")
        if self._trained(mpp):
            return True
        trained = ", ".join(f"{m:g}" for m in self.trained_mpps)
        if not allow_untrained:
            raise UntrainedMagnificationError(
                f"{self.name} was trained at {trained} µm/px, not at {mpp:g} µm/px. Pick one of those, "
                "or opt in explicitly (`--allow-untrained-mpp` (CLI), `allow_untrained=True` (Python)): the "
                "embeddings are then recorded in the store's provenance as made at an untrained magnification."
            )
        log.warning("%s: embedding at %g µm/px, outside its trained %s µm/px (opted in)", self.name, mpp, trained)
        return False

    def mpp_provenance(self, mpp: float, *, allow_untrained: bool = False) -> dict[str, Any]:
        """JSON attrs recording the magnification of a store: ``mpp``, ``mpp_trained`` (False
        only for an explicit opt-in) and the spec's ``trained_mpps``; raises like :meth:`check_mpp`."""
        trained = self.check_mpp(mpp, allow_untrained=allow_untrained)
        return {"mpp": round(float(mpp), 6), "mpp_trained": trained, "trained_mpps": list(self.trained_mpps)}

    def summary(self) -> dict[str, Any]:
        """JSON-ready description (classes in ``model_kwargs`` by name)."""
        out = dataclasses.asdict(dataclasses.replace(self, model_kwargs={}))
        out["model_kwargs"] = {k: _jsonable(v) for k, v in self.model_kwargs.items()}
        out["mean"], out["std"] = list(self.mean), list(self.std)
        out["hf_filenames"] = list(self.hf_filenames)
        out["trained_mpps"] = list(self.trained_mpps)
        return out


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return getattr(value, "__name__", None) or repr(value)


_REGISTRY: dict[str, Callable[[], EncoderSpec]] = {}


def register_encoder(name: str) -> Callable[[Callable[[], EncoderSpec]], Callable[[], EncoderSpec]]:
    """Decorator registering a zero-argument factory that returns the spec called ``name``."""

    def deco(fn: Callable[[], EncoderSpec]) -> Callable[[], EncoderSpec]:
        if name in _REGISTRY:
            raise ValueError(f"encoder {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return deco


def _virchow_kwargs(*, reg_tokens: int, **size: int) -> dict[str, Any]:
    # Paige's model cards: SwiGLUPacked + SiLU are passed at build time, not stored in config.json;
    # a plain GELU MLP builds a different (771 M) model.
    return {
        "img_size": 224,
        "mlp_ratio": 5.3375,
        "mlp_layer": "SwiGLUPacked",  # names, resolved by build_model: specs stay plain data
        "act_layer": "silu",
        "init_values": 1e-5,
        "reg_tokens": reg_tokens,
        "global_pool": "",
        "num_classes": 0,
        "dynamic_img_size": True,
        **size,
    }


#: Virchow 2 was trained on mixed magnifications: 40×, 20×, 10× and 5×
VIRCHOW2_MPPS = (0.25, 0.5, 1.0, 2.0)

# Width 48: int(48 * 5.3375) = 256 is even, as the packed SwiGLU (split in two halves) needs.
_TINY = {"embed_dim": 48, "depth": 2, "num_heads": 2}


@register_encoder("virchow")
def _virchow() -> EncoderSpec:
    return EncoderSpec(
        "virchow",
        "vit_huge_patch14_224",
        _virchow_kwargs(reg_tokens=0),
        hf_repo="paige-ai/Virchow",
        description="Virchow (Paige), ViT-H/14, CLS ⊕ mean patch tokens",
    )


@register_encoder("virchow2")
def _virchow2() -> EncoderSpec:
    return EncoderSpec(
        "virchow2",
        "vit_huge_patch14_224",
        _virchow_kwargs(reg_tokens=4),
        num_prefix_tokens=5,
        hf_repo="paige-ai/Virchow2",
        trained_mpps=VIRCHOW2_MPPS,
        description="Virchow 2 (Paige), ViT-H/14 + 4 registers, CLS ⊕ mean patch tokens",
    )


@register_encoder("virchow-tiny")
def _virchow_tiny() -> EncoderSpec:
    return EncoderSpec(
        "virchow-tiny",
        "vit_huge_patch14_224",
        _virchow_kwargs(reg_tokens=0, **_TINY),
        dim=96,
        description="Virchow structure at width 48, depth 2; no weights (tests, demos)",
    )


@register_encoder("virchow2-tiny")
def _virchow2_tiny() -> EncoderSpec:
    return EncoderSpec(
        "virchow2-tiny",
        "vit_huge_patch14_224",
        _virchow_kwargs(reg_tokens=4, **_TINY),
        num_prefix_tokens=5,
        dim=96,
        trained_mpps=VIRCHOW2_MPPS,
        description="Virchow 2 structure at width 48, depth 2; no weights (tests, demos)",
    )


def list_encoders() -> list[str]:
    """Registered encoder names (``timm:<architecture>`` is accepted on top of these)."""
    return sorted(_REGISTRY)


def _suggest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


@functools.lru_cache(maxsize=64)
def _timm_spec(arch: str) -> EncoderSpec:
    from napari_virchow._torch import import_timm, torch

    timm = import_timm()

    base, _tag = timm.models.split_model_name_tag(arch)
    if not timm.is_model(base):
        raise WeightsError(
            f"timm has no architecture {base!r}."
            + _suggest(base, timm.list_models())
            + " List them with timm.list_models()."
        )
    # Built on `meta`: no memory, no init; only to read the pretrained config and feature size.
    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False, num_classes=0)
    cfg = model.pretrained_cfg
    _, h, w = cfg.get("input_size", (3, 224, 224))
    if h != w:
        raise WeightsError(f"timm:{arch} expects {h}x{w} inputs; only square tiles are supported.")
    dim = getattr(model, "head_hidden_size", None) or model.num_features
    return EncoderSpec(
        f"{TIMM_PREFIX}{arch}",
        arch,
        {"num_classes": 0},
        input_size=int(h),
        mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(cfg.get("std", IMAGENET_STD)),
        interpolation=str(cfg.get("interpolation", "bicubic")),
        pooling="pooled",
        num_prefix_tokens=int(getattr(model, "num_prefix_tokens", 0)),
        dim=int(dim),
        hf_repo=cfg.get("hf_hub_id") or None,
        hf_filenames=(
            (cfg["hf_hub_filename"],) if cfg.get("hf_hub_filename") else ("model.safetensors", "pytorch_model.bin")
        ),
        description=f"timm {arch}, pooled features",
    )


def get_spec(name: str) -> EncoderSpec:
    """The spec registered as ``name`` (case-insensitive), ``timm:<arch>`` or ``hf-hub:<repo>``.

    Raises
    ------
    WeightsError
        Unknown name; the message suggests close ones.
    """
    if name.startswith(TIMM_PREFIX):
        return _timm_spec(name[len(TIMM_PREFIX) :])
    key = name.strip().lower()
    if key in _REGISTRY:
        return _REGISTRY[key]()
    specs = [fn() for fn in _REGISTRY.values()]
    by_repo = {f"{HF_PREFIX}{s.hf_repo}".lower(): s for s in specs if s.hf_repo}
    if key in by_repo or f"{HF_PREFIX}{key}" in by_repo:
        return by_repo.get(key) or by_repo[f"{HF_PREFIX}{key}"]
    raise WeightsError(
        f"unknown encoder {name!r}."
        + _suggest(key, list_encoders())
        + f" Known: {', '.join(list_encoders())}, or timm:<architecture>."
    )


def _resolve_layers(spec: EncoderSpec) -> dict[str, Any]:
    """``model_kwargs`` with layer names replaced by the classes (timm's ViT takes only callables
    for ``mlp_layer``). Names, because SwiGLUPacked is a functools.partial: by name, specs stay
    JSON-able and compare equal after pickling."""
    from timm.layers import GluMlp, Mlp, SwiGLU, SwiGLUPacked, get_act_layer

    mlp_layers = {"SwiGLUPacked": SwiGLUPacked, "SwiGLU": SwiGLU, "GluMlp": GluMlp, "Mlp": Mlp}
    kwargs = dict(spec.model_kwargs)
    mlp = kwargs.get("mlp_layer")
    if isinstance(mlp, str):
        if mlp not in mlp_layers:
            raise WeightsError(f"spec {spec.name!r}: unknown mlp_layer {mlp!r}; use one of {sorted(mlp_layers)}.")
        kwargs["mlp_layer"] = mlp_layers[mlp]
    act = kwargs.get("act_layer")
    if isinstance(act, str):
        try:
            kwargs["act_layer"] = get_act_layer(act)
        except (KeyError, ValueError) as exc:
            raise WeightsError(f"spec {spec.name!r}: unknown act_layer {act!r}.") from exc
    return kwargs


def build_model(spec: EncoderSpec | str) -> torch.nn.Module:
    """Build the randomly initialised model of ``spec`` on the current default device.

    Use ``with torch.device("meta"): build_model("virchow2")`` to inspect a full-size model
    without memory.
    """
    from napari_virchow._torch import import_timm

    timm = import_timm()

    spec = get_spec(spec) if isinstance(spec, str) else spec
    model = timm.create_model(spec.architecture, pretrained=False, **_resolve_layers(spec))
    if spec.pooling == "cls+mean":
        # A custom spec could disagree with what it builds; the slicing below would then be wrong.
        n_prefix, width = getattr(model, "num_prefix_tokens", None), getattr(model, "embed_dim", 0)
        if n_prefix != spec.num_prefix_tokens or 2 * width != spec.dim:
            raise WeightsError(
                f"spec {spec.name!r} says {spec.num_prefix_tokens} prefix tokens and dim "
                f"{spec.dim}, but the model has {n_prefix} prefix tokens and width {width}."
            )
    return model.eval()
