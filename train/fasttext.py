"""`train --method fasttext`: fastText over labels 0-5, read as the expected label (a fast CPU baseline).

Out-of-fold predictions on the training split (one fastText fit per fold) join the validation ones for calibration.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING

import numpy as np

from edu_filter.classifiers.calibration import fit_cut_points
from edu_filter.classifiers.fasttext_model import FastTextRegressor, FastTextSettings
from edu_filter.classifiers.learning_curve import FitPredict
from edu_filter.train.classifier import TrainedModel, take

if TYPE_CHECKING:
    from edu_filter.train.classifier import ClassifierTrainConfig


def train_fasttext(cfg: ClassifierTrainConfig, texts: list[str], y: np.ndarray, val_texts: list[str],
                   weights=None) -> TrainedModel:
    """fastText fitted on `texts`, with out-of-fold predictions from `cfg.folds` fits on the other folds."""
    from sklearn.model_selection import KFold

    from edu_filter.documents import progress_bar

    oof = np.zeros(len(texts))
    # one thread per fit (deterministic): about an hour a fit at 450k documents, folds + 1 of them, so a bar
    with progress_bar(True) as progress:
        task = progress.add_task(f"fastText: {cfg.folds} fold fits and the final one", total=cfg.folds + 1)
        for fit_idx, held_idx in KFold(cfg.folds, shuffle=True, random_state=cfg.seed).split(texts):
            fold = fit_fasttext(cfg, [texts[i] for i in fit_idx], y[fit_idx], take(weights, fit_idx))
            oof[held_idx] = fold.predict([texts[i] for i in held_idx])
            progress.advance(task)
        model = fit_fasttext(cfg, texts, y, weights)
        progress.advance(task)
    return TrainedModel(model, model.predict(val_texts), oof, {"method": "fasttext"})


def fit_fasttext(cfg: ClassifierTrainConfig, texts: list[str], y: np.ndarray, weights=None) -> FastTextRegressor:
    """fastText has no per-example weight: with inclusion weights it trains on a weighted resample of the rows (as
    many draws as rows, with replacement, probability in proportion to weight), which has the weighted loss as its
    expectation."""
    settings = FastTextSettings(**{**asdict(cfg.fasttext), "seed": cfg.seed})
    if weights is not None:
        draws = np.random.default_rng(cfg.seed).choice(len(y), size=len(y), p=weights / weights.sum())
        texts, y = [texts[i] for i in draws], y[draws]
    return FastTextRegressor.train(texts, y, settings, kind=cfg.kind)


def curve_fit_predict(cfg: ClassifierTrainConfig, texts: list[str], y: np.ndarray, weights=None) -> FitPredict:
    """The learning curve's refit. fastText trains slowly on CPUs, so cut points are placed on a fifth of each
    subset held out from its fit instead of on out-of-fold predictions (about the cost of training itself, not five
    times it)."""

    def fit_predict(subset, held):
        order = np.random.default_rng(cfg.seed).permutation(subset)
        fit, calibrate = order[: int(0.8 * len(order))], order[int(0.8 * len(order)):]
        model = fit_fasttext(cfg, [texts[i] for i in fit], y[fit], take(weights, fit))
        cuts = fit_cut_points(model.predict([texts[i] for i in calibrate]), y[calibrate],
                              min_positives=cfg.min_positives, weights=take(weights, calibrate))
        return model.predict([texts[i] for i in held]), cuts

    return fit_predict
