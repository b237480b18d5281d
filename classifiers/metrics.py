"""Metrics of a scorer against labels (scikit-learn / scipy), the terminal table and the confusion-matrix plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edu_filter.classifiers.calibration import round_and_clip, to_int_scores
from edu_filter.documents import SCORES, unclipped

CLASSES = list(SCORES)
BINARY_THRESHOLDS = (2, 3, 4)
# the decision each kind's preset makes: FineWeb-Edu keeps int_score >= 3, Python-Edu >= 4
MAIN_THRESHOLD = {"web": 3, "code": 4}
# fewer labelled positives than this at the main threshold, and its F1 (and the cut point placed on them) is noise
MIN_POSITIVES_TO_TRUST = 10


def weighted_ranks(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Mid-ranks under weights: the weight below each value plus half the weight tied with it (all ones: the usual
    average ranks, shifted by a constant)."""
    order = np.argsort(values, kind="stable")
    v, w = values[order], weights[order]
    starts = np.r_[True, v[1:] != v[:-1]]
    group = np.cumsum(starts) - 1
    group_weight = np.bincount(group, weights=w)
    below = np.r_[0.0, np.cumsum(group_weight)[:-1]]
    ranks = np.empty(len(v))
    ranks[order] = (below + group_weight / 2)[group]
    return ranks


def weighted_pearson(a: np.ndarray, b: np.ndarray, weights: np.ndarray) -> float:
    w = weights / weights.sum()
    da, db = a - w @ a, b - w @ b
    return float((w @ (da * db)) / np.sqrt((w @ da**2) * (w @ db**2)))


def _defined(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def compute_metrics(labels, raw_scores, int_scores, weights=None) -> dict:
    """Regression, 6-class and thresholded (`int_score >= t` vs `label >= t`, the label rounded to its integer score
    as everywhere) metrics, JSON-ready.

    `uncalibrated` repeats the threshold F1s with round-and-clip, the FineWeb baseline the calibration must beat.
    Correlations are None (JSON null) when scores or labels are constant, and a thresholded F1 is None when no document
    is labelled at or above the threshold: undefined, not a number (0.0 would read as a model that misses every
    positive, and pull down a mean over folds).
    With `weights` (inclusion weights of a chosen sample) every metric is the weighted estimate of its value on the
    pool the sample was drawn from (Spearman: weighted Pearson of weighted mid-ranks); `n`, the confusion matrix and
    per-class `support` still count documents.
    """
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    labels = np.asarray(labels, dtype=np.float64)
    raw = np.asarray(raw_scores, dtype=np.float64)
    pred = np.asarray(int_scores, dtype=np.int64)
    w = None if weights is None else np.asarray(weights, dtype=np.float64)
    true = to_int_scores(labels)
    constant = np.ptp(raw) == 0 or np.ptp(labels) == 0
    # a class nothing is labelled (or predicted) as has no recall (precision): None, not 0.0 (FineWeb has no 5s, and
    # every metrics.json said its model missed every one)
    precision, recall, f1, _ = precision_recall_fscore_support(
        true, pred, labels=CLASSES, zero_division=np.nan, sample_weight=w
    )
    support = np.bincount(true, minlength=len(CLASSES))

    def binary_f1(predicted_int, t) -> float | None:
        # a label counts as its integer score, as in accuracy and the confusion matrix (FineWeb-Edu's
        # int_score = round(score)): 2.6 is a 3 everywhere
        if not (true >= t).any():
            return None
        return float(f1_score(true >= t, predicted_int >= t, zero_division=0, sample_weight=w))

    if constant:
        spearman = pearson = None
    elif w is None:
        spearman, pearson = float(spearmanr(raw, labels).statistic), float(pearsonr(raw, labels).statistic)
    else:
        spearman = weighted_pearson(weighted_ranks(raw, w), weighted_ranks(labels, w), w)
        pearson = weighted_pearson(raw, labels, w)
    rounded = round_and_clip(raw)  # FineWeb-Edu's own int_score (a half to the even integer), which a stock model gets
    metrics = {
        "n": int(len(labels)),
        "mse": float(np.average((raw - labels) ** 2, weights=w)),
        "spearman": spearman,
        "pearson": pearson,
        "accuracy": float(accuracy_score(true, pred, sample_weight=w)),
        # over every class labelled or predicted, as scikit-learn and FineWeb-Edu's classification_report: a class
        # predicted that no label has (often 5) counts with its F1 of 0
        "macro_f1": float(f1_score(true, pred, average="macro", zero_division=0, sample_weight=w)),
        **{f"binary_f1_at_{t}": binary_f1(pred, t) for t in BINARY_THRESHOLDS},
        "confusion_matrix": confusion_matrix(true, pred, labels=CLASSES).tolist(),
        "per_class": {
            str(c): {
                "precision": _defined(precision[i]),
                "recall": _defined(recall[i]),
                "f1": _defined(f1[i]),
                "support": int(support[i]),
            }
            for i, c in enumerate(CLASSES)
        },
        "uncalibrated": {
            "accuracy": float(accuracy_score(true, rounded, sample_weight=w)),
            **{f"binary_f1_at_{t}": binary_f1(rounded, t) for t in BINARY_THRESHOLDS},
        },
    }
    if w is not None:
        metrics["weighted"] = {"effective_n": float(w.sum() ** 2 / (w**2).sum())}
    return metrics


def metric_warnings(metrics: dict, labels, kind: str | None, data: str = "the validation data") -> list[str]:
    """Why `metrics` on `data` cannot be trusted, one line each (empty: no reason found): fewer than
    MIN_POSITIVES_TO_TRUST documents labelled at or above the kind's main threshold, or a Spearman that is not above 0
    (or undefined: constant scores or labels)."""
    threshold = MAIN_THRESHOLD.get(kind or "web", MAIN_THRESHOLD["web"])
    positives = int(np.count_nonzero(to_int_scores(labels) >= threshold))
    warnings = []
    if positives < MIN_POSITIVES_TO_TRUST:
        warnings.append(f"{data} has {positives} documents labelled {threshold}+ (fewer than {MIN_POSITIVES_TO_TRUST}):"
                        f" F1@{threshold} and the cut point for {threshold} rest on too few; use more labelled data")
    spearman = metrics.get("spearman")
    if spearman is None or not np.isfinite(spearman):  # NaN: a prediction that is not a number
        warnings.append(f"Spearman on {data} is undefined (constant scores or labels): the model ranks nothing")
    elif spearman <= 0:
        warnings.append(f"Spearman on {data} is {spearman:.3f}: the model ranks documents no better than chance")
    return warnings


def print_warnings(warnings: list[str]) -> None:
    """One yellow line per warning, on stderr."""
    from rich.console import Console
    from rich.markup import escape

    console = Console(stderr=True)
    for warning in warnings:
        console.print(f"[yellow]warning: {escape(warning)}[/]", soft_wrap=True)


def print_metrics(metrics: dict, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table()
    table.add_column("metric")
    table.add_column("calibrated", justify="right")
    table.add_column("round-and-clip", justify="right")
    base = metrics.get("uncalibrated", {})
    def shown(value) -> str:
        return str(value) if isinstance(value, int) else "n/a" if value is None else f"{value:.3f}"

    for key in ("n", "mse", "spearman", "pearson", "accuracy", "macro_f1", *(f"binary_f1_at_{t}" for t in BINARY_THRESHOLDS)):
        table.add_row(key, shown(metrics[key]), shown(base[key]) if key in base else "")
    cm = Table(title="confusion matrix (rows: label, columns: int_score)")
    cm.add_column("label")
    for c in CLASSES:
        cm.add_column(str(c), justify="right")
    for c, row in zip(CLASSES, metrics["confusion_matrix"]):
        cm.add_row(str(c), *(str(v) for v in row))
    console = Console()
    console.print(title, soft_wrap=True, highlight=False, style="italic")  # whole: it names the model's folder
    console.print(unclipped(table))
    console.print(unclipped(cm))


def plot_confusion_matrix(metrics: dict, path: str | Path, title: str) -> Path:
    """Row-normalised confusion matrix with counts, as a PNG."""
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend (e.g. a notebook's) alone

    cm = np.asarray(metrics["confusion_matrix"], dtype=np.float64)
    share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig = Figure(figsize=(5.5, 4.5))
    ax = fig.subplots()
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in CLASSES:
        for j in CLASSES:
            if cm[i, j]:
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(CLASSES)
    ax.set_yticks(CLASSES)
    ax.set_xlabel("predicted int_score")
    ax.set_ylabel("label")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="share of label row")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
