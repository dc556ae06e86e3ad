"""Embed a cohort on an existing dask.distributed cluster: one task per slide, one encoder per worker.

The client sends each slide path and the :class:`~napari_virchow.session.SessionConfig` (picklable);
a worker runs one :class:`~napari_virchow.session.SlideSession` per slide (the encoder is loaded
once per process by :mod:`napari_virchow.encoder_cache`), embeds the missing tissue tiles into the
store under ``--cache`` and returns a small summary. Slides, weights
and the cache must be reachable from the workers at the same paths (a shared file system).
A task never raises: a broken slide comes back as a summary with ``error`` set, so the other
slides go on.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from napari_virchow.cli.common import CliError, embed_missing, load_encoder, one_line, open_session
from napari_virchow.config import SessionConfig
from napari_virchow.encoder_cache import loaded_encoders
from napari_virchow.errors import VirchowError

__all__ = ["embed_on_cluster", "embed_task", "loaded_encoders"]

#: seconds to wait for the scheduler before giving up with one line
CONNECT_TIMEOUT_S = 20
_threads_set = False


def _use_worker_threads() -> None:
    """Give torch as many threads as the dask worker has, once per process.

    dask's ``nthreads`` is the CPU share the operator gave this worker; torch's default (every
    core) would oversubscribe a machine running several workers (2 workers × 2 cores on 2 cores).
    """
    global _threads_set
    if _threads_set:
        return
    _threads_set = True
    try:
        from distributed import get_worker

        nthreads = int(get_worker().state.nthreads)
    except (ImportError, ValueError, AttributeError):  # not on a worker (called directly)
        return
    from napari_virchow._torch import torch

    torch.set_num_threads(max(1, nthreads))


def embed_task(slide: str, config: SessionConfig | dict[str, Any]) -> dict[str, Any]:
    """Worker side: embed every missing tissue tile of ``slide``; returns a summary, never raises.

    ``config`` is the command's :class:`SessionConfig` (or its fields as a dict).

    Returns
    -------
    dict
        ``slide``, ``n_tissue``, ``n_new``, ``seconds`` (embedding), ``task_seconds`` (with opening
        the slide and loading the encoder), ``weights_id``, ``worker`` (host:pid), ``error`` (one
        line, or None).
    """
    t0 = time.perf_counter()
    out: dict[str, Any] = {"slide": slide, "n_tissue": 0, "n_new": 0, "seconds": 0.0, "weights_id": None,
                           "worker": f"{socket.gethostname()}:{os.getpid()}", "error": None}  # fmt: skip
    try:
        import dask

        config = config if isinstance(config, SessionConfig) else SessionConfig(**config)
        _use_worker_threads()
        encoder = load_encoder(config)
        # Inside a task dask's default scheduler is this cluster: the slide's own dask reads
        # (tissue thumbnail) would be shipped to it and fail, their file handles cannot be pickled.
        with dask.config.set(scheduler="threads"), open_session(slide, config) as session:
            n_new, seconds = embed_missing(session, progress=False)
            out.update(n_tissue=session.grid.n_tissue, n_new=n_new, seconds=seconds, weights_id=encoder.weights_id)
    except VirchowError as exc:
        out["error"] = one_line(exc)
    except Exception as exc:  # noqa: BLE001 - anything else from one slide is still that slide's failure only
        out["error"] = f"{type(exc).__name__}: {one_line(exc)}"
    out["task_seconds"] = time.perf_counter() - t0
    return out


def embed_on_cluster(address: str, slides: Sequence[str],
                     config: SessionConfig) -> Iterator[tuple[str, dict[str, Any]]]:  # fmt: skip
    """Submit one :func:`embed_task` per slide to the scheduler at ``address``.

    Yields
    ------
    (slide, summary)
        As tasks finish (any order); ``slide`` as given. A task lost with its worker comes back
        as a summary with ``error`` set.

    Raises
    ------
    CliError
        The scheduler cannot be reached.
    """
    from distributed import Client, as_completed

    try:
        client = Client(address, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
    except (OSError, TimeoutError, ValueError, TypeError) as exc:
        raise CliError(
            f"cannot reach the dask scheduler at {address!r} ({one_line(exc) or type(exc).__name__}); "
            "check the address (tcp://HOST:8786) and that `dask scheduler` is running"
        ) from exc
    try:
        run = uuid.uuid4().hex[:8]
        futures = {
            client.submit(embed_task, str(Path(s).absolute()), config, key=f"napari-virchow-embed-{run}-{i}",
                          pure=False, retries=0): s
            for i, s in enumerate(slides)
        }  # fmt: skip
        for future in as_completed(futures, loop=client.loop):
            slide = futures[future]
            try:
                result = future.result()
            except Exception as exc:  # noqa: BLE001 - KilledWorker, a task that could not be deserialised, ...
                lost = f"the cluster lost this task ({type(exc).__name__}: {one_line(exc)})"
                result = {"slide": slide, "error": lost}
            yield slide, result
    finally:
        # Closing the client releases unfinished futures, which cancels their tasks (Ctrl-C).
        client.close()
