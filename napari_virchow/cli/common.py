"""Shared pieces of the CLI: option groups defined once, the per-slide driver, messages, progress.

Every command that embeds goes through :func:`run_slides`: it embeds the missing tissue tiles of
each slide (here, or on a dask cluster with ``--scheduler``), then hands the slide and its store
to the command's ``work``. A slide that fails prints one line and the others go on; the exit
status is then 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np
from tqdm import tqdm

from napari_virchow.cli.console import CONSOLE, PROG, one_line
from napari_virchow.errors import VirchowError

if TYPE_CHECKING:
    from napari_virchow.models.encoder import Encoder
    from napari_virchow.models.specs import EncoderSpec
    from napari_virchow.store.embeddings import EmbeddingStore

__all__ = [
    "CONSOLE", "CliError", "Parser", "RunOptions", "SlideJob", "check_writable", "cohort_parent",
    "common_parent", "get_encoder", "model_parent", "one_line", "output_names", "run_slides", "summary",
]  # fmt: skip

DEFAULT_ENCODER = "virchow2"


class CliError(VirchowError):
    """Bad command-line input: inconsistent options, unwritable --out, unreachable scheduler..."""


# --- parser and shared option groups ----------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line: ``napari-virchow embed: error: ... (see --help)``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see `{self.prog} --help`)\n")


def _number(kind: type, *, low: float, strict: bool, high: float | None = None) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        ok = (value > low if strict else value >= low) and (high is None or value <= high)
        if not ok or value != value:  # NaN
            bound = f"> {low:g}" if strict else f">= {low:g}"
            raise argparse.ArgumentTypeError(f"must be {bound}{f' and <= {high:g}' if high else ''}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


positive_int = _number(int, low=0, strict=True)
positive_float = _number(float, low=0, strict=True)
probability = _number(float, low=0, strict=False, high=1)


def point(text: str) -> tuple[float, float]:
    """``"X,Y"`` → (x, y) in level-0 px."""
    parts = text.replace(" ", "").split(",")
    try:
        x, y = (float(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected X,Y in level-0 pixels, got {text!r}") from None
    return x, y


def common_parent() -> argparse.ArgumentParser:
    """``--cache DIR`` and ``-v``: every subcommand has them."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--cache", metavar="DIR",
        help="embedding store root (default: $NAPARI_VIRCHOW_CACHE, else the user cache folder)",
    )  # fmt: skip
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details and tracebacks")
    return p


def model_parent() -> argparse.ArgumentParser:
    """Encoder, weights, device, precision, batch size, µm/px override, progress bars."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("encoder and slides")
    g.add_argument("--encoder", metavar="NAME", help=f"encoder (default {DEFAULT_ENCODER}); see `{PROG} encoders`")
    g.add_argument(
        "--weights", metavar="PATH|random|hf-hub:REPO",
        help="weights file or folder, 'random' (tests), or a hub repo (default: Hugging Face cache)",
    )  # fmt: skip
    g.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda:0, ... (default auto)")
    g.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"), help="autocast precision")
    g.add_argument("--batch-size", type=positive_int, metavar="N", help="tiles per batch (default: by device)")
    g.add_argument(
        "--mpp-override", type=positive_float, metavar="X",
        help="µm per level-0 pixel, for slides that do not record it (applies to every slide given)",
    )  # fmt: skip
    g.add_argument("--no-progress", action="store_true", help="no progress bars (default: shown on a terminal)")
    return p


def cohort_parent() -> argparse.ArgumentParser:
    """``--scheduler ADDRESS``: embed on an existing dask.distributed cluster."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--scheduler", metavar="ADDRESS",
        help="embed on this dask.distributed scheduler (e.g. tcp://10.0.0.5:8786), one task per slide; "
        "slides, weights and --cache must be reachable from the workers at the same paths",
    )  # fmt: skip
    return p


# --- resolved options -------------------------------------------------------------------------


@dataclass(frozen=True)
class RunOptions:
    """The model options of a command, resolved (absolute paths): also what a worker receives."""

    encoder: str = DEFAULT_ENCODER
    weights: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int | None = None
    mpp: float | None = None
    cache: str = ""
    progress: bool = True

    @classmethod
    def from_args(cls, args: argparse.Namespace, *, encoder: str | None = None) -> RunOptions:
        """From parsed options; ``encoder`` is the default when ``--encoder`` is not given."""
        from napari_virchow.models.specs import get_spec
        from napari_virchow.store.cache import default_cache_root

        name = get_spec(getattr(args, "encoder", None) or encoder or DEFAULT_ENCODER).name  # unknown: one line
        weights = getattr(args, "weights", None)
        if weights and weights != "random" and not weights.startswith("hf-hub:") and Path(weights).exists():
            weights = str(Path(weights).expanduser().absolute())  # workers may have another cwd
        cache = Path(args.cache).expanduser().absolute() if args.cache else default_cache_root()
        return cls(name, weights, getattr(args, "device", "auto"), getattr(args, "dtype", "auto"),
                   getattr(args, "batch_size", None), getattr(args, "mpp_override", None), str(cache),
                   not getattr(args, "no_progress", False))  # fmt: skip

    @property
    def spec(self) -> EncoderSpec:
        from napari_virchow.models.specs import get_spec

        return get_spec(self.encoder)


def check_writable(folder: str | os.PathLike[str], what: str, fix: str) -> Path:
    """Create ``folder`` and prove it writable now, before minutes of work are spent."""
    path = Path(folder).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise CliError(f"cannot write to the {what} {path} ({exc.strerror or exc}); {fix}") from exc
    return path


def check_cache(opts: RunOptions) -> None:
    """Refuse an unwritable store root with the fix, before the encoder is loaded."""
    check_writable(opts.cache, "embedding cache folder", "use --cache DIR with a writable folder "
                   "(or set NAPARI_VIRCHOW_CACHE)")  # fmt: skip


def output_names(slides: Sequence[str], suffix: str) -> None:
    """Refuse slides whose outputs ``<stem><suffix>`` would overwrite each other in --out."""
    seen: dict[str, str] = {}
    for s in slides:
        name = Path(s).stem + suffix
        if name in seen and Path(seen[name]).resolve() != Path(s).resolve():
            raise CliError(f"{seen[name]} and {s} would both write {name}; export them to different --out folders")
        seen[name] = s


# --- encoders: loaded once per process (CLI, or dask worker) ---------------------------------------

_ENCODERS: dict[tuple[Any, ...], Encoder] = {}
_ENCODERS_LOCK = threading.Lock()


def get_encoder(opts: RunOptions) -> Encoder:
    """The encoder for ``opts``, loaded on first use and kept for the life of the process.

    A dask worker runs many slide tasks: loading Virchow 2 (2.5 GB) once per worker instead of
    once per slide. A weights file that changes on disk (size or mtime) is loaded again.
    """
    stamp = None
    if opts.weights and os.path.isfile(opts.weights):
        st = os.stat(opts.weights)
        stamp = (st.st_size, st.st_mtime_ns)
    key = (opts.encoder, opts.weights, stamp, opts.device, opts.dtype)
    with _ENCODERS_LOCK:  # held while loading: concurrent tasks wait instead of loading twice
        if key not in _ENCODERS:
            from napari_virchow.models.encoder import load_encoder

            _ENCODERS[key] = load_encoder(opts.encoder, weights=opts.weights, device=opts.device, dtype=opts.dtype)
        return _ENCODERS[key]


# --- one slide ----------------------------------------------------------------------------------


class SlideJob:
    """A slide of a command: the open slide, its tile grid at the encoder's µm/px, its store."""

    def __init__(self, path: str | os.PathLike[str], opts: RunOptions) -> None:
        from napari_virchow.slides.slide import Slide
        from napari_virchow.slides.tiling import TileGrid

        self.path, self.opts, self.spec = Path(path), opts, opts.spec
        self.name = self.path.name
        self.slide = Slide(self.path, mpp=opts.mpp)
        try:
            self.grid = TileGrid(self.slide, mpp=self.spec.mpp, size=self.spec.input_size)
        except BaseException:
            self.slide.close()
            raise

    def open_store(self, weights_id: str, *, mode: str = "a") -> EmbeddingStore:
        """The store of this slide under (encoder, ``weights_id``): found by key, no model needed."""
        from napari_virchow.inference import store_key
        from napari_virchow.store.embeddings import EmbeddingStore

        g = self.grid
        key = store_key(self.slide, self.spec.name, g, weights_id=weights_id)
        return EmbeddingStore.open(
            key, n_tiles=len(g), dim=self.spec.dim, root=self.opts.cache, slide_path=str(self.path.resolve()),
            coords=g.coords, tile_size_l0=g.tile_size_l0, mode="r" if mode == "r" else "a",
        )  # fmt: skip

    def embed(self, store: EmbeddingStore, indices: np.ndarray | None = None) -> tuple[int, float]:
        """Embed the missing ones of ``indices`` (default: tissue tiles); (tiles embedded, seconds)."""
        from napari_virchow.inference import iter_embed

        todo = store.missing(self.grid.tissue_indices if indices is None else np.asarray(indices, np.int64))
        if not len(todo):
            return 0, 0.0
        encoder = get_encoder(self.opts)
        t0 = time.perf_counter()
        with tqdm(total=len(todo), desc=self.name, unit="tile", leave=False, file=sys.stderr,
                  disable=None if self.opts.progress else True) as bar:  # fmt: skip
            for batch in iter_embed(self.slide, encoder, self.grid, store, indices=todo,
                                    batch_size=self.opts.batch_size):  # fmt: skip
                bar.update(len(batch.indices))
        return len(todo), time.perf_counter() - t0

    def embedded_tissue(self, store: EmbeddingStore) -> tuple[np.ndarray, np.ndarray]:
        """Tissue tiles whose embedding is stored: (grid indices, float32 embeddings)."""
        idx = self.grid.tissue_indices
        idx = idx[store.done[idx]]
        return idx, store.read(idx)

    def close(self) -> None:
        self.slide.close()

    def __enter__(self) -> SlideJob:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def summary(name: str, n_tissue: int, n_new: int, seconds: float, where: str = "") -> str:
    """One line on what embedding a slide did."""
    head = f"{name}: {n_tissue} tissue tiles"
    if not n_new:
        return f"{head}, all cached{where}"
    return f"{head}, {n_new} embedded now in {seconds:.1f} s ({n_new / max(seconds, 1e-9):.1f} tiles/s){where}"


# --- the per-slide driver -----------------------------------------------------------------------

Work = Callable[["SlideJob", "EmbeddingStore"], "str | None"]


def run_slides(slides: Sequence[str], opts: RunOptions, work: Work | None = None, *,
               scheduler: str | None = None) -> int:  # fmt: skip
    """Embed every tissue tile of each slide, then run ``work(job, store)`` on it.

    Returns 0 when every slide succeeded, 1 when some failed (each printed one line).
    """
    check_cache(opts)
    failed = 0
    with tqdm(total=len(slides), desc="slides", unit="slide", file=sys.stderr,
              disable=None if opts.progress and len(slides) > 1 else True) as overall:  # fmt: skip
        if scheduler:
            from napari_virchow.cli.cluster import embed_on_cluster

            done = embed_on_cluster(scheduler, slides, replace(opts, progress=False))
        else:
            get_encoder(opts)  # bad weights fail once, for the whole command (exit 2)
            done = ((s, None) for s in slides)
        for slide, remote in done:
            try:
                _one_slide(slide, opts, work, remote)
            except Exception as exc:  # one broken slide must not stop the cohort; reported, exit 1
                failed += 1
                CONSOLE.slide_failed(slide, exc)
            overall.update()
    if failed:
        CONSOLE.out(f"{len(slides) - failed} of {len(slides)} slides done, {failed} failed")
    return 1 if failed else 0


def _one_slide(slide: str, opts: RunOptions, work: Work | None, remote: dict[str, Any] | None) -> None:
    if remote is not None:
        if remote.get("error"):
            raise CliError(remote["error"])
        name = Path(slide).name
        CONSOLE.out(summary(name, remote["n_tissue"], remote["n_new"], remote["seconds"], f" on {remote['worker']}"))
        if work is None:
            return  # the client never opens the slide: the cluster did the work
    with SlideJob(slide, opts) as job:
        weights_id = remote["weights_id"] if remote is not None else get_encoder(opts).weights_id
        with job.open_store(weights_id) as store:
            if remote is None:
                CONSOLE.out(summary(job.name, job.grid.n_tissue, *job.embed(store)))
            note = work(job, store) if work is not None else None
            if note:
                CONSOLE.out(note)
