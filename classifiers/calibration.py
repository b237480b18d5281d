"""From raw regression scores to integer scores 0-5: the cut points saved with every model.

`int_score = number of cut points c1..c5 that the raw score reaches`. Round-and-clip (FineWeb-Edu's rule) is the
cut points 0.5, 1.5, ..., 4.5. Regression to the mean squeezes predictions towards the common scores (1-2 on web
data), so rounding rarely reaches 3+; fitting each cut point to the threshold decision it governs fixes that.
"""

from __future__ import annotations

import numpy as np

from edu_filter.documents import MAX_SCORE, MIN_SCORE, SCORES

ROUND_CUTS = tuple(t - 0.5 for t in SCORES[1:])  # 0.5, 1.5, ..., 4.5


def to_int_scores(values) -> np.ndarray:
    """Labels or raw scores rounded and clipped onto the integer scale (np.int64); a half rounds up (2.5 -> 3), as
    the round-and-clip cut points read it (`score >= 2.5` is 3), so a label averaged over two annotators and a raw
    score equal to it get the same integer score (np.rint's half-to-even made 2.5 a 2 and 3.5 a 4)."""
    return np.clip(np.floor(np.asarray(values, dtype=np.float64) + 0.5), MIN_SCORE, MAX_SCORE).astype(np.int64)


def round_and_clip(scores) -> np.ndarray:
    """FineWeb-Edu's own integer scores, `int(round(max(0, min(score, 5))))` (np.int64; NaN maps to 0), for a stock
    classifier saved without cut points. Python's round sends a half to the even integer (2.5 -> 2), and halves do
    occur: scored in bfloat16 (FineWeb-Edu's own run), scores between 2 and 4 fall on a 1/64 grid, so every score
    within 1/128 of 2.5 is 2.5, and the cut points 0.5, ..., 4.5 would keep it at threshold 3."""
    scores = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=0.0)
    return np.rint(np.clip(scores, MIN_SCORE, MAX_SCORE)).astype(np.int64)


def apply_cut_points(scores: np.ndarray, cut_points) -> np.ndarray:
    """Integer scores 0-5 (np.int64) from raw scores; NaN scores map to 0."""
    scores = np.asarray(scores, dtype=np.float64)
    cuts = np.asarray(cut_points if cut_points is not None else ROUND_CUTS, dtype=np.float64)
    return (scores[:, None] >= cuts[None, :]).sum(axis=1).astype(np.int64)


def best_f1_cut(scores: np.ndarray, positive: np.ndarray, weights=None) -> tuple[float, float]:
    """The cut c maximising F1 of `scores >= c` against `positive`, and that F1.

    Candidates are midpoints between consecutive distinct scores; among equally good ones the middle of the best
    run is taken, so the cut sits in the gap rather than on a training point. With `weights` (inclusion weights of
    a chosen sample) true and false positives are weighted sums: the F1 estimated for the pool the sample came from.
    """
    order = np.argsort(-scores, kind="stable")
    s, pos = scores[order], positive[order].astype(np.float64)
    w = np.ones(len(s)) if weights is None else np.asarray(weights, dtype=np.float64)[order]
    tp = np.cumsum(w * pos)
    predicted = np.cumsum(w)
    f1 = 2 * tp / (predicted + (w * pos).sum())
    # a cut can only fall between distinct scores: keep the last index of each run of equal scores
    last_of_run = np.r_[s[1:] != s[:-1], True]
    idx = np.flatnonzero(last_of_run)
    best = f1[idx].max()
    winners = idx[np.isclose(f1[idx], best)]
    k = winners[len(winners) // 2]
    cut = (s[k] + s[k + 1]) / 2 if k + 1 < len(s) else s[k] - 1e-6
    if k + 1 < len(s) and cut <= s[k + 1]:  # adjacent doubles: their midpoint rounds onto the lower, keeping it
        cut = s[k]
    return float(cut), float(best)


def fit_cut_points(scores, labels, min_positives: int = 5, weights=None) -> list[float]:
    """Monotone cut points c1..c5, each chosen for the best F1 of `int_score >= t` against `label >= t` (the label
    rounded to its integer score, as the metrics count it; weighted F1 when `weights` are given).

    A threshold with fewer than `min_positives` positives (or fewer than `min_positives` negatives) keeps the
    round-and-clip cut: a handful of examples cannot place it reliably. Documents are counted there, not weighted.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = to_int_scores(labels)
    cuts = []
    for t, default in zip(range(1, MAX_SCORE + 1), ROUND_CUTS):
        positive = labels >= t
        if positive.sum() < min_positives or (~positive).sum() < min_positives:
            cuts.append(default)
        else:
            cuts.append(best_f1_cut(scores, positive, weights)[0])
    return [float(c) for c in np.maximum.accumulate(cuts)]
