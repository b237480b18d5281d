"""Calibration (cut points) and metrics: pure numpy/sklearn, fast."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score

from edu_filter.classifiers.calibration import ROUND_CUTS, apply_cut_points, best_f1_cut, fit_cut_points
from edu_filter.classifiers.metrics import compute_metrics


def squeezed_predictions(n: int = 3000, seed: int = 0):
    """Labels mostly 1-2 like web data, and a regressor squeezed towards the mean (what ridge heads produce)."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(6, size=n, p=[0.1, 0.45, 0.3, 0.1, 0.04, 0.01]).astype(float)
    raw = 1.5 + 0.3 * (labels - 1.5) + rng.normal(0, 0.3, size=n)
    return labels, raw


def test_round_cuts_are_round_and_clip():
    raw = np.array([-3.0, 0.49, 0.5, 1.2, 2.5, 3.49, 4.5, 7.0, np.nan])
    assert apply_cut_points(raw, ROUND_CUTS).tolist() == [0, 0, 1, 1, 3, 3, 5, 5, 0]
    assert apply_cut_points(raw, None).tolist() == apply_cut_points(raw, ROUND_CUTS).tolist()


def test_best_f1_cut_finds_the_optimum():
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.9, 0.35])
    positive = np.array([0, 0, 0, 1, 1, 1], dtype=bool)
    cut, f1 = best_f1_cut(scores, positive)
    assert 0.3 < cut <= 0.35 and f1 == pytest.approx(1.0)
    # exhaustive check on random data: no threshold does better
    rng = np.random.default_rng(1)
    scores, positive = rng.normal(size=200), rng.random(200) < 0.2
    cut, f1 = best_f1_cut(scores, positive)
    assert f1_score(positive, scores >= cut) == pytest.approx(f1)
    predicted = scores[None, :] >= np.unique(scores)[:, None]  # every possible cut at once
    tp = (predicted & positive).sum(1)
    all_f1 = 2 * tp / (predicted.sum(1) + positive.sum())
    assert all_f1.max() == pytest.approx(f1)


def test_fitted_cut_points_beat_round_and_clip_on_held_out_data():
    labels, raw = squeezed_predictions(seed=0)
    cuts = fit_cut_points(raw, labels)
    assert cuts == sorted(cuts) and len(cuts) == 5
    test_labels, test_raw = squeezed_predictions(seed=1)
    for t in (2, 3, 4):
        calibrated = f1_score(test_labels >= t, apply_cut_points(test_raw, cuts) >= t)
        rounded = f1_score(test_labels >= t, apply_cut_points(test_raw, ROUND_CUTS) >= t)
        assert calibrated >= rounded - 0.02
    assert f1_score(test_labels >= 3, apply_cut_points(test_raw, cuts) >= 3) > 0.5 > f1_score(
        test_labels >= 3, apply_cut_points(test_raw, ROUND_CUTS) >= 3
    )


def test_thresholds_with_too_few_positives_keep_round_cuts():
    labels = np.array([0, 1, 1, 2, 2, 2, 1, 0, 3, 1] * 5, dtype=float)  # no 4s or 5s, five 3s
    raw = labels * 0.5 + 0.3
    cuts = fit_cut_points(raw, labels, min_positives=6)
    assert cuts[2:] == [2.5, 3.5, 4.5]
    assert cuts[:2] == pytest.approx([0.55, 1.05])  # fitted where there is evidence: midway between classes
    assert cuts == sorted(cuts)


def test_compute_metrics_keys_and_values():
    labels = np.array([0, 1, 2, 3, 4, 5, 3, 2], dtype=float)
    raw = np.array([0.2, 1.1, 2.2, 2.9, 4.2, 4.8, 2.2, 1.6])
    ints = apply_cut_points(raw, ROUND_CUTS)
    m = compute_metrics(labels, raw, ints)
    for key in ("n", "mse", "spearman", "pearson", "accuracy", "macro_f1", "binary_f1_at_2", "binary_f1_at_3",
                "binary_f1_at_4", "confusion_matrix", "per_class"):
        assert key in m
    assert m["n"] == 8
    assert m["mse"] == pytest.approx(np.mean((raw - labels) ** 2))
    assert m["accuracy"] == pytest.approx(np.mean(ints == labels))
    assert m["binary_f1_at_3"] == pytest.approx(f1_score(labels >= 3, ints >= 3))
    assert np.asarray(m["confusion_matrix"]).sum() == 8 and np.trace(m["confusion_matrix"]) == int((ints == labels).sum())
    assert m["per_class"]["3"]["support"] == 2
    assert m["uncalibrated"]["binary_f1_at_3"] == m["binary_f1_at_3"]  # same cuts here


def test_a_class_no_document_is_labelled_or_predicted_as_has_no_recall_or_precision():
    """FineWeb validation sets hold no 5: its recall is 0/0, which metrics.json gave as 0.0, a model that missed
    every 5, pulling down any mean over models or folds."""
    labels = np.array([0, 1, 2, 3, 4, 3], dtype=float)
    ints = np.array([0, 1, 2, 3, 3, 3])
    per_class = compute_metrics(labels, ints + 0.1, ints)["per_class"]
    assert per_class["5"] == {"precision": None, "recall": None, "f1": None, "support": 0}
    assert per_class["4"] == {"precision": None, "recall": 0.0, "f1": 0.0, "support": 1}  # never predicted: missed
    assert per_class["3"]["precision"] == pytest.approx(2 / 3) and per_class["3"]["recall"] == 1.0


def test_macro_f1_counts_a_class_predicted_that_no_label_has():
    """As scikit-learn and FineWeb-Edu's classification_report average it: the classes of the labels only (no 5 in
    many validation sets) left out a predicted 5's F1 of 0, and read 0.79 where they read 0.53."""
    labels = np.array([0, 1, 2, 3, 0, 1, 2, 3, 1, 2], dtype=float)
    ints = np.array([0, 1, 2, 3, 0, 1, 5, 5, 1, 4])
    m = compute_metrics(labels, ints.astype(float), ints)
    assert m["macro_f1"] == pytest.approx(f1_score(labels.astype(int), ints, average="macro")) == pytest.approx(0.528, abs=1e-3)


def test_a_threshold_no_label_reaches_has_no_f1_and_a_missed_one_has_zero(capsys):
    """No document labelled 4+: F1@4 is undefined (null, shown as n/a), not a model that misses every positive,
    whether or not documents are scored 4+ (a 0 there pulled down learning-curve means over folds without a 4;
    `sweep` counts it alike); positives all missed make it a real 0."""
    from edu_filter.classifiers.metrics import print_metrics

    labels = np.array([0, 1, 2, 3, 1, 2], dtype=float)
    raw = np.array([0.1, 1.2, 2.1, 2.8, 1.4, 1.9])
    m = compute_metrics(labels, raw, apply_cut_points(raw, ROUND_CUTS))
    assert m["binary_f1_at_4"] is None and m["uncalibrated"]["binary_f1_at_4"] is None
    assert m["binary_f1_at_3"] == pytest.approx(1.0)
    print_metrics(m, "no 4+")
    assert capsys.readouterr().out.count("n/a") == 2  # calibrated and round-and-clip columns of binary_f1_at_4
    over = compute_metrics(labels, raw + 1.5, apply_cut_points(raw + 1.5, ROUND_CUTS))
    assert over["binary_f1_at_4"] is None and over["binary_f1_at_3"] < 1
    under = compute_metrics(labels, raw - 1.5, apply_cut_points(raw - 1.5, ROUND_CUTS))
    assert under["binary_f1_at_3"] == 0.0


def test_a_fractional_label_counts_as_its_integer_score_in_every_metric_and_cut():
    """FineWeb-Edu's float `score`: 2.6 was a 3 for accuracy and the confusion matrix but below 3 for F1@3 and the
    cut points, so one model read as perfect and as missing every 3 at once."""
    labels = np.array([2.6, 2.6, 1.0, 0.0])
    metrics = compute_metrics(labels, [3.1, 3.2, 1.0, 0.1], [3, 3, 1, 0])
    assert metrics["accuracy"] == 1.0 and metrics["binary_f1_at_3"] == 1.0
    rng = np.random.default_rng(0)
    scores = rng.normal(size=400)
    fractional = np.where(scores > 0.8, 2.6, 1.2)  # 2.6 is a 3: the cut for 3 falls near 0.8, not at the default 2.5
    cuts = fit_cut_points(scores, fractional, min_positives=5)
    assert 0.7 < cuts[2] < 0.9


def test_a_half_label_rounds_as_the_cut_points_read_a_raw_score_equal_to_it():
    """Labels averaged over two annotators sit on halves: np.rint made 2.5 a 2 and 3.5 a 4 while the round-and-clip
    cut points read a raw 2.5 as 3, so a model predicting every label exactly scored 0.75 accuracy."""
    labels = np.array([0.5, 1.5, 2.5, 3.5, 4.5])
    metrics = compute_metrics(labels, labels, apply_cut_points(labels, ROUND_CUTS))
    assert metrics["accuracy"] == 1.0 and metrics["binary_f1_at_3"] == 1.0 and metrics["binary_f1_at_4"] == 1.0


@pytest.mark.parametrize("high", [2.0, np.nextafter(3.0, 4.0)])
def test_a_cut_between_adjacent_doubles_keeps_only_the_higher(high):
    """The midpoint of two adjacent doubles rounds onto one of them: onto the lower, the cut kept both groups and
    the F1 it claimed was not the F1 it gave."""
    low = np.nextafter(high, 0.0)
    scores = np.array([high] * 5 + [low] * 5 + [1.0] * 10)
    positive = np.arange(20) < 5
    cut, f1 = best_f1_cut(scores, positive)
    kept = scores >= cut
    assert kept.sum() == 5 and f1 == pytest.approx(f1_score(positive, kept)) == 1.0


def test_the_round_and_clip_baseline_is_fineweb_edus_own_rounding():
    """The baseline column is what a stock model scores with (`round_and_clip`: a half to the even integer, as
    halves fall in bfloat16); it rounded a half up, so for the official classifier the two columns disagreed."""
    labels = np.array([1, 2, 3, 3, 1, 2], dtype=float)
    raw = np.array([1.0, 2.5, 2.5, 3.2, 0.9, 2.0])
    from edu_filter.classifiers.calibration import round_and_clip

    m = compute_metrics(labels, raw, round_and_clip(raw))
    assert m["uncalibrated"]["binary_f1_at_3"] == pytest.approx(2 / 3) == m["binary_f1_at_3"]
