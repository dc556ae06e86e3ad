"""The per-slide driver of the CLI: one :class:`~napari_virchow.session.SlideSession` per slide.

Every command that embeds goes through :func:`run_slides`: it embeds the missing tissue tiles of
each slide (here, or on a dask cluster with ``--scheduler``), then hands the slide's session to
the command's ``work``. A slide that fails (unreadable, damaged store, full disk, no permission)
prints one line and the others go on; the run ends with a summary naming the failed slides and
exit status 1. Reading never needs write access: a complete cache on a read-only file system
serves every command that only reads it.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from napari_virchow.cli.console import CONSOLE, PROG, one_line
from napari_virchow.cli.options import (
    DEFAULT_ENCODER,
    CliError,
    Parser,
    cohort_parent,
    common_parent,
    config_from_args,
    model_parent,
    point,
    positive_int,
    probability,
    show_progress,
)
from napari_virchow.config import SessionConfig
from napari_virchow.store.cache import resolve_cache_root
from napari_virchow.store.key import mag_name

if TYPE_CHECKING:
    import numpy as np

    from napari_virchow.models.encoder import Encoder
    from napari_virchow.session import SlideSession

log = logging.getLogger(__name__)

__all__ = [
    "CONSOLE", "DEFAULT_ENCODER", "PROG", "CliError", "Parser", "check_writable", "cohort_parent", "common_parent",
    "config_from_args", "embed_missing", "load_encoder", "model_parent", "one_line", "open_session",
    "output_names", "point", "positive_int", "probability", "run_slides", "show_progress", "summary",
]  # fmt: skip


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


def output_names(slides: Sequence[str], suffix: str) -> None:
    """Refuse slides whose outputs ``<stem><suffix>`` would overwrite each other in --out."""
    seen: dict[str, str] = {}
    for s in slides:
        name = Path(s).stem + suffix
        if name in seen and Path(seen[name]).resolve() != Path(s).resolve():
            raise CliError(f"{seen[name]} and {s} would both write {name}; export them to different --out folders")
        seen[name] = s


def load_encoder(config: SessionConfig) -> Encoder:
    """The configured encoder from the process-wide cache every session uses (bad weights fail here)."""
    from napari_virchow.encoder_cache import get_encoder

    return get_encoder(config.encoder, weights=config.weights, device=config.device, dtype=config.dtype,
                       compile=config.compile)


def open_session(slide: str | os.PathLike[str], config: SessionConfig, *,
                 weights_id: str | None = None) -> SlideSession:  # fmt: skip
    """The session of one slide; ``weights_id`` (known from a dask worker) spares loading the encoder to read."""
    from napari_virchow.session import SlideSession

    session = SlideSession(slide, config, weights_id=weights_id)
    try:
        session.grid  # noqa: B018 - a slide without µm/px or smaller than a tile fails here, named
    except BaseException:
        session.close()
        raise
    return session


def embed_missing(session: SlideSession, indices: np.ndarray | None = None, *, progress: bool = True,
                  mpp: float | None = None) -> tuple[int, float]:  # fmt: skip
    """Embed the missing ones of ``indices`` (default: tissue tiles) of level ``mpp`` with a bar;
    (tiles embedded, seconds)."""
    plan = session.plan(indices=indices, mpp=mpp)
    if not plan.n_todo:
        return 0, 0.0  # nothing to write: a read-only cache is fine
    check_writable(session.config.cache_root or resolve_cache_root(), "embedding cache folder",
                   "use --cache DIR with a writable folder (or set NAPARI_VIRCHOW_CACHE)")  # fmt: skip
    t0 = time.perf_counter()
    last = None
    with tqdm(total=plan.n_todo, desc=session.slide.path.name, unit="tile", leave=False, file=sys.stderr,
              disable=None if progress else True) as bar:  # fmt: skip
        for last in session.compute(indices=indices, mpp=mpp):
            bar.update(len(last.indices))
    if last is not None:  # -v: is the encoder fed? (both rates, and whether it waited for pixels)
        log.info("%s: %s", session.slide.path.name, last.feed_note)
    return plan.n_todo, time.perf_counter() - t0


def summary(name: str, n_tissue: int, n_new: int, seconds: float, where: str = "") -> str:
    """One line on what embedding a slide did."""
    head = f"{name}: {n_tissue} tissue tiles"
    if not n_new:
        return f"{head}, all cached{where}"
    return f"{head}, {n_new} embedded now in {seconds:.1f} s ({n_new / max(seconds, 1e-9):.1f} tiles/s){where}"


# --- the per-slide driver -----------------------------------------------------------------------

Work = Callable[["SlideSession"], "str | None"]


def run_slides(slides: Sequence[str], config: SessionConfig, work: Work | None = None, *,
               scheduler: str | None = None, progress: bool = True,
               mpps: Sequence[float] | None = None) -> int:  # fmt: skip
    """Embed every tissue tile of each slide (at each of ``mpps``, default the encoder's own
    magnification), then run ``work(session)`` on it.

    Returns 0 when every slide succeeded, 1 when some failed (each printed one line, and a
    summary names them).
    """
    spec = config.spec
    levels = tuple(mpps) if mpps else (spec.mpp,)
    for m in levels:  # an untrained magnification without the opt-in: one line, before any work
        spec.check_mpp(m, allow_untrained=config.allow_untrained_mpp)
    if scheduler and levels != (spec.mpp,):
        raise CliError(f"--mpp {','.join(f'{m:g}' for m in levels)} with --scheduler is not supported yet: "
                       "embed other magnifications without --scheduler")  # fmt: skip
    failed: list[str] = []
    with tqdm(total=len(slides), desc="slides", unit="slide", file=sys.stderr,
              disable=None if progress and len(slides) > 1 else True) as overall:  # fmt: skip
        for slide, remote in _embedded(slides, config, scheduler):
            try:
                _one_slide(slide, config, work, remote, progress=progress, mpps=levels)
            except Exception as exc:  # noqa: BLE001 - one broken slide must not stop the cohort; reported, exit 1
                failed.append(Path(slide).name)
                CONSOLE.slide_failed(slide, exc)
            overall.update()
    if failed:
        shown = ", ".join(failed[:10]) + (f" and {len(failed) - 10} more" if len(failed) > 10 else "")
        CONSOLE.out(f"{len(slides) - len(failed)} of {len(slides)} slides done, {len(failed)} failed: {shown}")
    return 1 if failed else 0


def _embedded(slides: Sequence[str], config: SessionConfig,
              scheduler: str | None) -> Iterator[tuple[str, dict[str, Any] | None]]:  # fmt: skip
    """(slide, summary of the dask task or None) per slide: the cluster embeds, or this process will."""
    if scheduler:
        from napari_virchow.cli.cluster import embed_on_cluster

        yield from embed_on_cluster(scheduler, slides, config)
        return
    if any(Path(s).exists() for s in slides):  # none there: each says so, not the weights first
        load_encoder(config)  # bad weights fail once, for the whole command (exit 2)
    yield from ((s, None) for s in slides)


def _one_slide(slide: str, config: SessionConfig, work: Work | None, remote: dict[str, Any] | None, *,
               progress: bool, mpps: Sequence[float] = ()) -> None:  # fmt: skip
    if remote is not None:
        if remote.get("error"):
            raise CliError(remote["error"])
        name = Path(slide).name
        CONSOLE.out(summary(name, remote["n_tissue"], remote["n_new"], remote["seconds"], f" on {remote['worker']}"))
        if work is None:
            return  # the client never opens the slide: the cluster did the work
    with open_session(slide, config, weights_id=None if remote is None else remote["weights_id"]) as session:
        if remote is None:
            name = session.slide.path.name
            for m in mpps or (session.default_mpp,):
                where = "" if m == session.default_mpp and len(mpps) <= 1 else f" at {mag_name(m)}"
                n_tissue = session.grid_at(m).n_tissue
                CONSOLE.out(summary(name, n_tissue, *embed_missing(session, progress=progress, mpp=m), where))
        note = work(session) if work is not None else None
        if note:
            CONSOLE.out(note)
