"""Finding, reading, fingerprinting and checking encoder weights.

Private helper of :mod:`napari_virchow.models.encoder`. Sources, in the order ``load_encoder`` tries
them when no file is given: the Hugging Face cache, then the hub (unless offline). Files are read
without ever running pickled code: safetensors, or ``torch.load(weights_only=True)``.

The Hugging Face location and offline flag are read from the environment at call time, not from
``huggingface_hub.constants`` (fixed when the library is first imported, which timm does early), so
``HF_HOME`` / ``HF_HUB_CACHE`` / ``HF_HUB_OFFLINE`` set later (in tests, in a notebook) still count.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from pickle import UnpicklingError  # the class torch.load raises on refusal; nothing here unpickles

from huggingface_hub import hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
)
from safetensors import SafetensorError
from safetensors.torch import load_file

from napari_virchow._torch import torch
from napari_virchow.errors import WeightsError

logger = logging.getLogger(__name__)

SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt")
# Containers that training scripts wrap a state dict in.
_NESTING_KEYS = ("state_dict", "model_state_dict", "model", "module")
_STRIPPABLE_PREFIXES = ("module.", "model.")
_TRUE = {"1", "on", "yes", "true"}
_FILE_KINDS = {
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a named pipe",
    stat.S_IFSOCK: "a socket",
}


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache directory, resolved from the environment now."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set (now, or when huggingface_hub was imported)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return env in _TRUE or bool(constants.HF_HUB_OFFLINE)


def _hub_fix(repo_id: str) -> str:
    return (
        f"accept the licence at https://huggingface.co/{repo_id} while logged in, run "
        "`hf auth login` (older clients: `huggingface-cli login`) or set HF_TOKEN, "
        "or download the weights elsewhere and pass weights=PATH (CLI: --weights PATH)"
    )


def find_in_hf_cache(repo_id: str, filenames: Sequence[str]) -> Path | None:
    """The first of ``filenames`` present in the local Hugging Face cache for ``repo_id``."""
    cache = hf_cache_dir()
    for name in filenames:
        try:
            found = try_to_load_from_cache(repo_id, name, cache_dir=cache)
        except ValueError as exc:  # HFValidationError: not a valid "org/name"
            raise WeightsError(f"{repo_id!r} is not a Hugging Face repo id: {exc}") from exc
        # try_to_load_from_cache also returns a sentinel object for "known missing".
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def download_from_hub(repo_id: str, filenames: Sequence[str]) -> Path:
    """Download the first of ``filenames`` that ``repo_id`` holds; one clear error otherwise."""
    fix = _hub_fix(repo_id)
    if hub_offline():
        raise WeightsError(
            f"weights for {repo_id} are not in the Hugging Face cache ({hf_cache_dir()}) and "
            f"HF_HUB_OFFLINE is set, so they cannot be downloaded. Fix: unset HF_HUB_OFFLINE on a "
            f"connected machine and {fix}; or copy a cache that holds them into HF_HOME."
        )
    for name in filenames:
        try:
            return Path(hf_hub_download(repo_id, name, cache_dir=hf_cache_dir()))
        except GatedRepoError as exc:
            raise WeightsError(
                f"{repo_id} is a gated repository and this account has no access yet. Fix: {fix}."
            ) from exc
        except RepositoryNotFoundError as exc:
            raise WeightsError(
                f"{repo_id} was not found on the Hugging Face hub, or it is private and no valid "
                f"token was sent. Fix: {fix}."
            ) from exc
        except LocalEntryNotFoundError as exc:
            # Raised by hf_hub_download for connection errors and timeouts, too.
            raise WeightsError(
                f"cannot reach the Hugging Face hub to download {repo_id}/{name}, and it is not in "
                f"the cache ({hf_cache_dir()}). Fix: connect to the internet and {fix}."
            ) from exc
        except EntryNotFoundError:
            logger.info("%s has no %s; trying the next file name", repo_id, name)
            continue
        except HfHubHTTPError as exc:
            raise WeightsError(f"the Hugging Face hub refused {repo_id}/{name}: {exc}") from exc
        except OSError as exc:
            raise WeightsError(
                f"downloading {repo_id}/{name} failed: {exc}. Fix: check the network and free "
                f"disk space in {hf_cache_dir()}, or pass weights=PATH."
            ) from exc
    raise WeightsError(f"{repo_id} holds none of {', '.join(filenames)}; pass weights=PATH.")


def describe_hf_path(repo_id: str, path: Path) -> str:
    """``hf-cache:<repo>@<revision>`` for a file inside the cache's ``snapshots/<rev>/``."""
    parts = path.parts
    rev = parts[parts.index("snapshots") + 1][:12] if "snapshots" in parts else "?"
    return f"hf-cache:{repo_id}@{rev}"


# (resolved path, size, mtime_ns) -> digest; hashing a 2.5 GB checkpoint takes seconds.
_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: str | os.PathLike[str]) -> str:
    """Short hex fingerprint (16 hex = 64 bits of SHA-256) of a file's bytes, streamed.

    SHA-256 because Hugging Face names LFS blobs by the same digest of their content, so the
    fingerprint can be compared with a cache entry by eye. Memoised per (path, size, mtime).
    """
    real = Path(path).resolve()
    st = real.stat()
    key = (str(real), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(real, "rb") as fh:
            while chunk := fh.read(16 << 20):
                h.update(chunk)
        _DIGESTS[key] = h.hexdigest()[:16]
    return _DIGESTS[key]


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """The flat ``{name: tensor}`` dict inside a checkpoint, without ``module.``-style prefixes."""
    for _ in range(2):  # e.g. {"model": {"state_dict": {...}}} -- no deeper
        if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = [obj[k] for k in _NESTING_KEYS if isinstance(obj.get(k), Mapping)]
            if inner:
                obj = inner[0]
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(f"{path} does not hold a state dict (a mapping of names to tensors).")
    sd = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise WeightsError(f"{path} holds no tensors.")
    for prefix in _STRIPPABLE_PREFIXES:
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def _check_regular_file(p: Path) -> None:
    """Refuse, naming what it is, a path that cannot hold weights (missing, device, empty)."""
    try:
        st = p.stat()
    except FileNotFoundError:
        raise WeightsError(f"weights file not found: {p}. Fix: check the path.") from None
    except OSError as exc:
        raise WeightsError(
            f"cannot read weights file {p} ({exc.strerror}). Fix: check the path and permissions."
        ) from exc
    if not stat.S_ISREG(st.st_mode):
        kind = _FILE_KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
        raise WeightsError(f"{p} is {kind}, not a weights file. Fix: pass the .safetensors file itself.")
    if st.st_size == 0:
        raise WeightsError(
            f"weights file {p} is empty (0 bytes): the download or copy is incomplete. Fix: copy it again."
        )


def read_state_dict(path: str | os.PathLike[str]) -> tuple[Path, dict[str, torch.Tensor]]:
    """Read a state dict from a weights file, or from a folder holding ``model.safetensors``.

    Returns
    -------
    (Path, dict)
        The file actually read and its tensors (on CPU).

    Raises
    ------
    WeightsError
        Missing, unreadable, truncated or unsupported file, or a pickle carrying code.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        inside = [p / n for n in ("model.safetensors", "pytorch_model.bin") if (p / n).is_file()]
        if not inside:
            raise WeightsError(f"folder {p} holds neither model.safetensors nor pytorch_model.bin.")
        p = inside[0]
    _check_regular_file(p)
    suffix = p.suffix.lower()
    if suffix in SAFE_SUFFIXES:
        try:
            obj: object = load_file(str(p), device="cpu")
        except (SafetensorError, OSError) as exc:
            raise WeightsError(
                f"cannot read {p} as safetensors ({exc}): the file is truncated or corrupt. "
                "Fix: download or copy it again."
            ) from exc
    elif suffix in PICKLE_SUFFIXES:
        try:
            # weights_only: plain tensors and containers only -- a pickle cannot run code.
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except UnpicklingError as exc:
            if "Unsupported global" not in str(exc):  # not an object pickle: bytes torch cannot parse
                raise WeightsError(
                    f"cannot read {p}: not a PyTorch checkpoint, or truncated or corrupt. "
                    "Fix: download or copy it again, or use a .safetensors file."
                ) from exc
            raise WeightsError(
                f"refused to load {p}: it pickles objects other than tensors, which could run "
                "code when loaded. Fix: use a .safetensors file from a trusted source."
            ) from exc
        except MemoryError:
            raise
        except Exception as exc:  # torch's legacy (non-zip) reader fails on bytes that
            # are no checkpoint with KeyError, IndexError, ValueError, EOFError ...: all mean "unreadable"
            raise WeightsError(
                f"cannot read {p}: truncated or corrupt ({exc!r}). Fix: download or copy it again, "
                "or use a .safetensors file."
            ) from exc
    else:
        raise WeightsError(
            f"unsupported weights file {p}: use .safetensors (preferred) or {'/'.join(PICKLE_SUFFIXES)}."
        )
    return p, _unwrap(obj, p)


def _hint(missing: list[str], unexpected: list[str]) -> str:
    # Virchow and Virchow 2 differ only by the register tokens: name the likely mix-up.
    if "reg_token" in missing:
        return (
            " The checkpoint has no register tokens: it looks like weights of a model without "
            "registers (Virchow v1: use encoder 'virchow')."
        )
    if "reg_token" in unexpected:
        return (
            " The checkpoint has register tokens (reg_token): it looks like Virchow 2 weights (use encoder 'virchow2')."
        )
    return ""


def match_state_dict(
    sd: dict[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    *,
    source: str,
    encoder: str,
    n_shown: int = 5,
) -> dict[str, torch.Tensor]:
    """Check ``sd`` against the model's own ``reference`` state dict (names and shapes).

    A classifier ``head.*`` the headless model lacks is dropped. Any other difference raises one
    ``WeightsError`` listing the first few missing, unexpected and mis-shaped tensors.
    """
    unexpected = [k for k in sd if k not in reference]
    dropped = [k for k in unexpected if k.startswith("head.")]
    if dropped:
        logger.info("%s: dropping classifier tensors %s (the encoder is headless)", source, dropped)
        sd = {k: v for k, v in sd.items() if k not in dropped}
        unexpected = [k for k in unexpected if k not in dropped]
    missing = [k for k in reference if k not in sd]
    shapes = [
        f"{k} {tuple(sd[k].shape)} != {tuple(v.shape)}"
        for k, v in reference.items()
        if k in sd and sd[k].shape != v.shape
    ]
    if not (missing or unexpected or shapes):
        check_values(sd, reference, source=source, n_shown=n_shown)
        return sd

    def first(items: list[str]) -> str:
        more = f" (+{len(items) - n_shown} more)" if len(items) > n_shown else ""
        return ", ".join(items[:n_shown]) + more

    parts = [
        f"{label} {len(items)}: {first(items)}"
        for label, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape mismatches (file != model)", shapes),
        )
        if items
    ]
    raise WeightsError(
        f"weights in {source} do not fit encoder '{encoder}' -- " + "; ".join(parts) + "." + _hint(missing, unexpected)
    )


def check_values(
    sd: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], *, source: str, n_shown: int = 3
) -> None:
    """Refuse tensors that are not floating point where the model's are, and NaN/inf values.

    Weights with NaN or inf load fine and then make every embedding NaN: refused here, at load
    time, naming the file, rather than slide after slide later.
    """
    ints = [f"{k} ({str(v.dtype).removeprefix('torch.')})" for k, v in sd.items()
            if reference[k].is_floating_point() and not v.is_floating_point()]  # fmt: skip
    if ints:
        raise WeightsError(
            f"weights in {source} are not floating point: {len(ints)} tensors such as "
            f"{', '.join(ints[:n_shown])} hold integers (a quantised or wrongly converted file). "
            "Fix: use the original float32/bfloat16/float16 checkpoint."
        )
    bad = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise WeightsError(
            f"weights in {source} contain NaN or infinite values in {len(bad)} tensors "
            f"({', '.join(bad[:n_shown])}{', ...' if len(bad) > n_shown else ''}): the file is corrupt "
            "or comes from a diverged training run. Fix: download or copy the weights again."
        )
