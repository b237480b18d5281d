"""Learning curves: validation quality against the number of labels, and whether more labels still help.

Repeated K-fold cross-validation over the labelled rows. In each fold the model is fitted on nested random subsets
(10% of the fold's training rows, 25%, 50%, all of them) and scored on the fold's held-out rows, with cut points
fitted on the subset alone, so each point is what a model trained on that many labels would reach. Nested subsets
make the differences between points paired: the 50% -> 100% gain is measured fold by fold, and its spread across
folds says whether it is larger than the noise. With inclusion weights (an actively chosen sample) the subsets are
uniform subsamples of the sample, the fits and cut points are weighted, and the metrics are weighted estimates for
the pool.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from edu_filter.classifiers.calibration import apply_cut_points, to_int_scores
from edu_filter.classifiers.metrics import MIN_POSITIVES_TO_TRUST, compute_metrics
from edu_filter.documents import unclipped

FRACTIONS = (0.1, 0.25, 0.5, 1.0)
CURVE_METRICS = ("spearman", "binary_f1_at_2", "binary_f1_at_3", "binary_f1_at_4", "mse")

# fit_predict(training indices, held-out indices) -> (raw scores of the held-out rows, cut points)
FitPredict = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, list[float]]]


def learning_curve(
    labels,
    fit_predict: FitPredict,
    weights=None,
    folds: int = 5,
    repeats: int = 2,
    seed: int = 0,
    fractions=FRACTIONS,
    min_rows: int = 10,
    main_threshold: int = 3,
    show_progress: bool = False,
    at_once: int = 1,
) -> dict:
    """Metrics per share of the labels (mean and standard deviation over repeats x folds) and a verdict.

    A share whose subset would hold fewer than `min_rows` rows is left out. `at_once`: fits run side by side in
    threads (for a `fit_predict` that lets go of the GIL, as fastText's does); the curve is the same. JSON-ready."""
    from concurrent.futures import ThreadPoolExecutor
    from edu_filter.classifiers.head import fold_indices
    from edu_filter.documents import progress_bar

    labels = np.asarray(labels, dtype=np.float64)
    w = None if weights is None else np.asarray(weights, dtype=np.float64)
    n = len(labels)
    per_fraction: dict[float, list[dict]] = {f: [] for f in fractions}
    sizes: dict[float, list[int]] = {f: [] for f in fractions}
    # repeats x folds x shares fits, about 15x the rows of the model's own fit: hours at FineWeb-Edu's 450k labels
    # and 4608 dimensions on CPUs (--no-learning-curve skips it), so a bar with the time left
    jobs = []  # (share, its subset, the held-out rows), in the order the curve is made of
    for repeat in range(repeats):
        for k, (fit, held) in enumerate(fold_indices(n, folds, seed + repeat)):
            order = np.random.default_rng([seed, repeat, k]).permutation(fit)
            sizes_here = {f: int(round(f * len(fit))) for f in fractions}
            jobs += [(f, np.sort(order[:size]), held) for f, size in sizes_here.items() if size >= min_rows]
    with progress_bar(show_progress) as bar, ThreadPoolExecutor(max(1, at_once)) as pool:
        task = bar.add_task(f"learning curve: {len(jobs)} fits" + (f", {at_once} at a time" if at_once > 1 else ""),
                            total=len(jobs))
        fitted = (pool.map(lambda job: fit_predict(job[1], job[2]), jobs) if at_once > 1
                  else (fit_predict(subset, held) for _, subset, held in jobs))
        for (f, subset, held), (raw, cuts) in zip(jobs, fitted):  # map keeps the order
            m = compute_metrics(labels[held], raw, apply_cut_points(raw, cuts), None if w is None else w[held])
            per_fraction[f].append({key: m[key] for key in CURVE_METRICS})
            sizes[f].append(len(subset))
            bar.advance(task)
    points = []
    for f in fractions:
        if not per_fraction[f]:
            continue
        point = {"share": f, "labels": int(round(np.mean(sizes[f]))), "fits": len(per_fraction[f])}
        for key in CURVE_METRICS:
            values = np.array([m[key] for m in per_fraction[f] if m[key] is not None], dtype=np.float64)
            point[key] = float(values.mean()) if len(values) else None
            point[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else None
        points.append(point)
    curve = {
        "folds": folds, "repeats": repeats, "total_labels": n, "weighted": w is not None,
        "main_threshold": main_threshold, "points": points,
    }
    positives = int(np.count_nonzero(to_int_scores(labels) >= main_threshold))
    curve["verdict"] = verdict(per_fraction, fractions, main_threshold, positives)
    return curve


def verdict(per_fraction: dict, fractions, main_threshold: int, positives: int | None = None) -> dict:
    """Do more labels still help? The paired gain from half the labels to all of them, fold by fold.

    Still helping when the mean gain in Spearman or in F1 at the main threshold exceeds twice its standard error.
    With fewer than MIN_POSITIVES_TO_TRUST `positives` (labels at the main threshold) no verdict: F1 there is 0 in
    every fold (its cut point never fitted), a gain of 0 ± 0 that read "the curve has flattened" (stop labelling)
    when the data could say nothing about the threshold that matters."""
    if positives is not None and positives < MIN_POSITIVES_TO_TRUST:
        return {"still_helping": None, "text": f"inconclusive: only {positives} labels at {main_threshold}+ (fewer "
                f"than {MIN_POSITIVES_TO_TRUST}): the curve cannot say whether more labels help at the threshold "
                "that matters; label more documents likely to score high"}
    half, full = 0.5, max(fractions)
    if half not in per_fraction or not per_fraction[half] or len(per_fraction[half]) != len(per_fraction[full]):
        return {"still_helping": None, "text": "too few labels for a curve"}
    gains = {}
    for key in ("spearman", f"binary_f1_at_{main_threshold}"):
        pairs = [(a[key], b[key]) for a, b in zip(per_fraction[half], per_fraction[full])
                 if a[key] is not None and b[key] is not None]
        if len(pairs) < 2:
            continue
        diff = np.array([b - a for a, b in pairs])
        gains[key] = {"gain": float(diff.mean()), "se": float(diff.std(ddof=1) / np.sqrt(len(diff)))}
    if not gains:
        return {"still_helping": None, "text": "too few labels for a curve"}
    helping = any(g["gain"] > 2 * g["se"] for g in gains.values())
    names = {"spearman": "Spearman", f"binary_f1_at_{main_threshold}": f"F1@{main_threshold}"}
    change = " and ".join(f"{names[k]} by {g['gain']:+.3f} (± {g['se']:.3f})" for k, g in gains.items())
    if helping:
        text = f"more labels are still helping: doubling from half the labels to all of them changed {change}"
    else:
        text = (f"the curve has flattened: doubling from half the labels to all of them changed {change}, within "
                "the noise; more labels of the same kind are unlikely to help much")
    return {"still_helping": helping, "gains": gains, "text": text}


def print_learning_curve(curve: dict, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("labels", "share", "Spearman", "F1@2", "F1@3", "F1@4", "MSE"):
        table.add_column(column, justify="right")

    def cell(point, key):
        value, spread = point[key], point[f"{key}_std"]
        if value is None:
            return "n/a"
        return f"{value:.3f}" + (f"±{spread:.3f}" if spread is not None else "")  # one word: wrapped whole

    for p in curve["points"]:
        table.add_row(f"{p['labels']:,}", f"{p['share']:.0%}", *(cell(p, key) for key in CURVE_METRICS))
    console = Console()
    console.print(unclipped(table))
    console.print(curve["verdict"]["text"])


def plot_learning_curve(curve: dict, path: str | Path, title: str) -> Path:
    """Spearman and F1 at the main threshold against the number of labels (mean ± sd over the CV fits), as a PNG."""
    from matplotlib.figure import Figure

    t = curve["main_threshold"]
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    x = [p["labels"] for p in curve["points"]]
    for key, label in (("spearman", "Spearman"), (f"binary_f1_at_{t}", f"F1@{t}")):
        y = [p[key] if p[key] is not None else np.nan for p in curve["points"]]
        err = [p[f"{key}_std"] or 0.0 for p in curve["points"]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label)
    ax.set_xscale("log")
    ax.set_xticks(x, [f"{v:,}" for v in x])
    ax.set_xlabel("training labels")
    ax.set_ylabel("cross-validated score")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
