"""Slide-head (ABMIL) benchmark: training time per epoch, prediction time per slide, peak RSS, CV AUC.

A synthetic cohort of ``--slides`` slides with ``--tiles`` tiles × ``--dim`` (default 200 × 5,000 ×
2560, the issue's size), embeddings generated, not computed, in memory: each slide's bag is
``--tiles`` rows drawn (seeded per slide) from a fixed pool of 20,000 Gaussian float16 rows (the
store's dtype), and half the slides ("tumour") have 5 % of their tiles shifted along one direction.
A bag is generated when training asks for it (a lazy sequence, as the CLI reads bags from the
stores), so memory holds one slide's tiles at a time: the whole cohort would be
``slides × tiles × dim × 2`` bytes (5.1 GB at the default size). Generating a bag costs about what
reading it from a store would; it is included in the epoch time and measured on its own too.

``fit_slide_head`` runs as the CLI does (``--folds``-fold cross-validation, then a final fit);
``train_s_per_epoch`` is the mean wall time of an epoch of the final fit (one step per slide, all
``--slides`` of them); ``train_ms_per_slide_step`` is the mean step over every epoch of every fit.
``predict_ms_per_slide`` is the median of ``SlideHead.predict`` over ``--predict`` slides (bag
generation excluded). ``peak_rss_mb`` is this process's peak resident memory.

Usage::

    python benchmarks/bench_mil.py                       # 200 × 5000 × 2560, 3 folds, 2 epochs
    python benchmarks/bench_mil.py --slides 40 --tiles 2000 --epochs 5

The last printed line is ``{"predict_ms_per_slide", "train_s_per_epoch", "peak_rss_mb", "cv_auc", ...}``.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

POOL = 20_000


class SyntheticBags(Sequence[np.ndarray]):
    """Bag ``i``: ``tiles`` seeded rows of a float16 pool; tumour slides get 5 % of their tiles shifted."""

    def __init__(self, slides: int, tiles: int, dim: int, *, shift: float = 4.0, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.pool = rng.standard_normal((POOL, dim), dtype=np.float32).astype(np.float16)
        u = rng.standard_normal(dim)
        self.direction = (u / np.linalg.norm(u) * shift).astype(np.float32)  # ``shift`` noise SDs along u
        self.slides, self.tiles, self.seed = slides, tiles, seed
        self.labels = ["tumour" if i % 2 else "normal" for i in range(slides)]

    def __len__(self) -> int:
        return self.slides

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        rng = np.random.default_rng((self.seed, int(i)))
        bag = self.pool[rng.integers(0, POOL, self.tiles)]
        if self.labels[i] == "tumour":
            k = max(1, self.tiles // 20)
            rows = rng.choice(self.tiles, k, replace=False)
            bag[rows] = (bag[rows].astype(np.float32) + self.direction).astype(np.float16)
        return bag


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slides", type=int, default=200)
    parser.add_argument("--tiles", type=int, default=5000)
    parser.add_argument("--dim", type=int, default=2560)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--predict", type=int, default=20, help="slides timed for prediction")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()

    from napari_virchow._torch import torch
    from napari_virchow.analysis.mil_train import fit_slide_head

    if args.threads:
        torch.set_num_threads(args.threads)
    bags = SyntheticBags(args.slides, args.tiles, args.dim)
    t0 = time.perf_counter()
    n_gen = min(10, args.slides)
    for i in range(n_gen):
        bags[i]
    gen_ms = (time.perf_counter() - t0) / n_gen * 1e3
    print(f"cohort: {args.slides} slides × {args.tiles} tiles × {args.dim} float16 "
          f"({args.slides * args.tiles * args.dim * 2 / 1e9:.2f} GB if held; generated per access, "
          f"{gen_ms:.1f} ms per bag); torch threads {torch.get_num_threads()}", flush=True)  # fmt: skip

    epochs: list[float] = []  # every epoch, folds and final
    final: list[float] = []  # the final fit's: one epoch over every slide
    last = [time.perf_counter()]

    def progress(stage: str, done: int, total: int) -> None:
        now = time.perf_counter()
        if done:
            epochs.append(now - last[0])
            if stage == "final":
                final.append(now - last[0])
            print(f"  {stage}: epoch {done}/{total} {now - last[0]:.1f} s", flush=True)
        last[0] = now

    t_fit = time.perf_counter()
    head = fit_slide_head(bags, bags.labels, encoder="synthetic", weights_digest="synthetic", mpp=0.5, tile_size=224,
                          folds=args.folds, epochs=args.epochs, seed=0, progress=progress)  # fmt: skip
    fit_s = time.perf_counter() - t_fit
    m = head.metrics
    steps = args.epochs * (args.slides + (args.folds - 1) * args.slides)  # each fold trains on (k-1)/k of them
    print(f"fit: {fit_s:.1f} s for {len(epochs)} epochs ({args.folds} folds + final); cross-validated AUC "
          f"{m['cv_value']:.3f} (95% CI {m['cv_ci_low']:.3f}–{m['cv_ci_high']:.3f})", flush=True)  # fmt: skip

    times = []
    for i in range(min(args.predict, args.slides)):
        bag = bags[i]
        t = time.perf_counter()
        head.predict(bag)
        times.append((time.perf_counter() - t) * 1e3)
    predict_ms = float(np.median(times))
    print(f"predict: median {predict_ms:.1f} ms per slide of {args.tiles} tiles (min {min(times):.1f}, "
          f"max {max(times):.1f})", flush=True)  # fmt: skip
    print(json.dumps({
        "predict_ms_per_slide": round(predict_ms, 2),
        "train_s_per_epoch": round(float(np.mean(final)), 3),
        "train_ms_per_slide_step": round(float(np.sum(epochs)) / steps * 1e3, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "cv_auc": round(float(m["cv_value"]), 4),
        "cv_auc_ci": [round(float(m["cv_ci_low"]), 4), round(float(m["cv_ci_high"]), 4)],
        "slides": args.slides, "tiles": args.tiles, "dim": args.dim, "folds": args.folds, "epochs": args.epochs,
        "bag_generation_ms": round(gen_ms, 2),
        "cohort_gb_if_held": round(args.slides * args.tiles * args.dim * 2 / 1e9, 2),
        "torch_threads": torch.get_num_threads(),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
