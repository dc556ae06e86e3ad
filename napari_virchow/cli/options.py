"""Command-line options defined once: the parser class, value types, shared option groups, and the
mapping of flags onto the package's one configuration object, :class:`~napari_virchow.session.SessionConfig`.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from napari_virchow.cli.console import CONSOLE, PROG, one_line
from napari_virchow.config import SessionConfig
from napari_virchow.errors import VirchowError

__all__ = [
    "DEFAULT_ENCODER", "MAX_UPSAMPLING", "CliError", "Parser", "cohort_parent", "common_parent", "config_from_args",
    "finite_float", "model_parent", "point", "positive_float", "positive_int", "probability", "show_progress",
]  # fmt: skip

DEFAULT_ENCODER = "virchow2"
#: an --mpp-override that makes tiles read at more than this upsampling needs --force
MAX_UPSAMPLING = 2.0


class CliError(VirchowError):
    """Bad command-line input: inconsistent options, unwritable --out, unreachable scheduler..."""


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line: ``napari-virchow embed: error: ... (see --help)``."""

    def error(self, message: str) -> NoReturn:
        """Exit with status 2 and one line naming the error and ``--help``."""
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see `{self.prog} --help`)\n")


# --- value types ----------------------------------------------------------------------------------


def _number(kind: type, *, low: float, strict: bool, high: float | None = None) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        ok = (value > low if strict else value >= low) and (high is None or value <= high)
        if not ok or not math.isfinite(value):  # NaN and inf too
            bound = f"> {low:g}" if strict else f">= {low:g}"
            raise argparse.ArgumentTypeError(f"must be {bound}{f' and <= {high:g}' if high else ''}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


positive_int = _number(int, low=0, strict=True)
positive_float = _number(float, low=0, strict=True)
probability = _number(float, low=0, strict=False, high=1)


def finite_float(text: str) -> float:
    """A finite number (level-0 px): ``nan`` and ``inf`` are refused with the fix."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of level-0 pixels, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number of level-0 pixels, got {text!r}")
    return value


finite_float.__name__ = "float"


def point(text: str) -> tuple[float, float]:
    """``"X,Y"`` → (x, y) in level-0 px, both finite."""
    parts = text.replace(" ", "").split(",")
    try:
        x, y = (float(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected X,Y in level-0 pixels, got {text!r}") from None
    if not (math.isfinite(x) and math.isfinite(y)):
        raise argparse.ArgumentTypeError(f"expected X,Y as finite level-0 pixel coordinates, got {text!r}")
    return x, y


# --- shared option groups -----------------------------------------------------------------------------


def mpp_list(text: str) -> tuple[float, ...]:
    """``--mpp 0.5,2.0``: magnifications in µm/px, comma-separated (each a positive number)."""
    values = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"--mpp takes positive µm/px separated by commas (e.g. 0.5,2.0), "
                                             f"got {text!r}")  # fmt: skip
        values.append(value)
    return tuple(dict.fromkeys(values))


def add_mpp_options(p: argparse.ArgumentParser, *, several: bool = True, help_text: str | None = None) -> None:
    """``--mpp`` (the magnifications to embed at; default the encoder's own) and ``--allow-untrained-mpp``;
    ``help_text`` replaces the help of ``--mpp``."""
    what = "magnifications in µm/px, comma-separated (e.g. 0.5,2.0)" if several else "magnification in µm/px"
    p.add_argument("--mpp", type=mpp_list, default=None, metavar="UM" + ("[,UM…]" if several else ""),
                   help=help_text or f"{what}, each one of the encoder's trained ones (Virchow 2: 0.25, 0.5, 1, "
                        "2 µm/px = 40×/20×/10×/5×); default its own (0.5). 2.0 covers the whole tissue in 1/16 of "
                        "the tiles")
    p.add_argument("--allow-untrained-mpp", action="store_true",
                   help="allow a magnification the encoder was not trained on (recorded in the store)")


def common_parent() -> Parser:
    """``--cache DIR`` and ``-v``: every subcommand has them."""
    p = Parser(add_help=False)
    p.add_argument(
        "--cache", metavar="DIR",
        help="embedding store root (default: $NAPARI_VIRCHOW_CACHE, else the user cache folder); "
        "a read-only folder works for commands whose embeddings are all cached",
    )  # fmt: skip
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details and tracebacks")
    return p


def model_parent() -> Parser:
    """Encoder, weights, device, precision, batch size, µm/px override, progress bars."""
    p = Parser(add_help=False)
    g = p.add_argument_group("encoder and slides")
    g.add_argument("--encoder", metavar="NAME", help=f"encoder (default {DEFAULT_ENCODER}); see `{PROG} encoders`")
    g.add_argument(
        "--weights", metavar="PATH|random|hf-hub:REPO",
        help="weights file or folder, 'random' (tests), or a hub repo (default: Hugging Face cache)",
    )  # fmt: skip
    g.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda:0, ... (default auto)")
    g.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="precision: auto = fp16 autocast on CUDA, bf16 weights on a CPU with native bf16, "
                        "else fp32 (default auto)")  # fmt: skip
    g.add_argument("--decode-device", default="auto", metavar="auto|none|cpu|cuda[:N]",
                   help="where JPEG stored tiles are decoded: auto (nvJPEG on the encoder's GPU, else imagecodecs on "
                        "the CPU), none (imagecodecs), or a torch device for TorchCodec's batch decoder "
                        "(cpu: its CPU path; default auto)")  # fmt: skip
    g.add_argument("--compile", action="store_true",
                   help="run the encoder through torch.compile: fuses what the eager path does not (fp32, CUDA; "
                        "no faster on a CPU with bf16), after a first batch that compiles for up to a minute; "
                        "for long runs")  # fmt: skip
    g.add_argument("--batch-size", type=positive_int, metavar="N",
                   help="tiles per batch (default: by device; capped to what fits in memory, with a note)")  # fmt: skip
    g.add_argument(
        "--mpp-override", type=positive_float, metavar="X",
        help="µm per level-0 pixel, for slides that do not record it (applies to every slide given)",
    )  # fmt: skip
    g.add_argument("--force", action="store_true",
                   help=f"accept an --mpp-override that upsamples tiles more than {MAX_UPSAMPLING:g}×")  # fmt: skip
    g.add_argument("--no-progress", action="store_true", help="no progress bars (default: shown on a terminal)")
    return p


def cohort_parent() -> Parser:
    """``--scheduler ADDRESS``: embed on an existing dask.distributed cluster."""
    p = Parser(add_help=False)
    p.add_argument(
        "--scheduler", metavar="ADDRESS",
        help="embed on this dask.distributed scheduler (e.g. tcp://10.0.0.5:8786), one task per slide; "
        "slides, weights and --cache must be reachable from the workers at the same paths",
    )  # fmt: skip
    return p


# --- flags -> SessionConfig -------------------------------------------------------------------------------


def show_progress(args: argparse.Namespace) -> bool:
    """Whether progress bars are wanted (``--no-progress`` not given)."""
    return not getattr(args, "no_progress", False)


def _weights(args: argparse.Namespace) -> str | None:
    weights = getattr(args, "weights", None)
    if weights and weights != "random" and not weights.startswith("hf-hub:") and Path(weights).exists():
        weights = str(Path(weights).expanduser().absolute())  # workers may have another cwd
    return weights


def _check_upsampling(mpp: float | None, target_mpp: float, force: bool) -> None:
    """Refuse an override that makes each tile an upsampled patch of the slide, unless ``--force``."""
    if mpp is None or force or target_mpp / mpp >= 1 / MAX_UPSAMPLING:
        return
    raise CliError(f"--mpp-override {mpp:g} µm/px would upsample every tile {mpp / target_mpp:.3g}× (the encoder "
                   f"reads {target_mpp:g} µm/px; more than {MAX_UPSAMPLING:g}× needs --force): check the value "
                   "(scanners record about 0.25 at 40×, 0.5 at 20×), or add --force if it is right")  # fmt: skip


def _capped_batch_size(batch_size: int | None, encoder: str, device: str) -> int | None:
    if batch_size is None:
        return None
    from napari_virchow.batching import cap_batch_size
    from napari_virchow.models.encoder import resolve_device
    from napari_virchow.models.specs import get_spec

    size, note = cap_batch_size(batch_size, get_spec(encoder), resolve_device(device))
    if note:
        CONSOLE.warn(f"--batch-size: {note}")
    return size


def config_from_args(args: argparse.Namespace, *, encoder: str | None = None) -> SessionConfig:
    """The :class:`SessionConfig` of a command's flags (paths absolute: workers may have another cwd).

    ``encoder`` is the default when ``--encoder`` is not given. Refuses an ``--mpp-override``
    implying more than 2× upsampling without ``--force``; caps ``--batch-size`` to memory.
    """
    from napari_virchow.models.specs import get_spec
    from napari_virchow.store.cache import resolve_cache_root

    spec = get_spec(getattr(args, "encoder", None) or encoder or DEFAULT_ENCODER)  # unknown: one line
    mpp = getattr(args, "mpp_override", None)
    _check_upsampling(mpp, spec.mpp, bool(getattr(args, "force", False)))
    device = getattr(args, "device", "auto")
    return SessionConfig(
        encoder=spec.name, weights=_weights(args), device=device, dtype=getattr(args, "dtype", "auto"),
        batch_size=_capped_batch_size(getattr(args, "batch_size", None), spec.name, device),
        cache_root=resolve_cache_root(getattr(args, "cache", None)), mpp_override=mpp,
        allow_untrained_mpp=bool(getattr(args, "allow_untrained_mpp", False)),
        decode_device=_decode_device(getattr(args, "decode_device", "auto")),
        compile=bool(getattr(args, "compile", False)),
    )  # fmt: skip


def _decode_device(value: str | None) -> str | None:
    return None if value is None or value.strip().lower() == "none" else value.strip()
