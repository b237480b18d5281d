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
    """fastText fitted on `texts`, with out-of-fold predictions from `cfg.folds` fits on the other folds. The fits
    run side by side (`fits_at_once`), each on one thread: the same model as one after another (fastText's own
    threads would make each fit depend on their timing), in about a sixth of the time on six CPUs."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from sklearn.model_selection import KFold

    from edu_filter.documents import progress_bar

    oof = np.zeros(len(texts))
    folds = list(KFold(cfg.folds, shuffle=True, random_state=cfg.seed).split(texts))

    def fold_predictions(fit_idx, held_idx) -> np.ndarray:
        fold = fit_fasttext(cfg, [texts[i] for i in fit_idx], y[fit_idx], take(weights, fit_idx))
        return fold.predict([texts[i] for i in held_idx])

    at_once = fits_at_once(texts, cfg.fasttext, len(folds) + 1)
    # about an hour a fit at 450k documents, so a bar
    with progress_bar(True) as progress, ThreadPoolExecutor(at_once) as pool:  # fastText lets go of the GIL
        task = progress.add_task(f"fastText: {cfg.folds} fold fits and the final one, {at_once} at a time",
                                 total=len(folds) + 1)
        final = pool.submit(fit_fasttext, cfg, texts, y, weights)
        held = {pool.submit(fold_predictions, fit_idx, held_idx): held_idx for fit_idx, held_idx in folds}
        try:
            for done in as_completed([final, *held]):
                if done is not final:
                    oof[held[done]] = done.result()
                progress.advance(task)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)  # the fits not started yet; the running ones end first
            raise
        model = final.result()
    return TrainedModel(model, model.predict(val_texts), oof, {"method": "fasttext"})


FIT_WORDS = 2_000_000  # words a fit's dictionary may hold (FineWeb-sized labels), for its memory


def fits_at_once(texts: list[str], settings: FastTextSettings, fits: int) -> int:
    """How many fastText fits run side by side: one per CPU this process may use, as long as their training files
    (each about the texts' UTF-8 size, in the temporary folder) fit in half its free space, and their dictionaries
    and (words + buckets) x dim matrices in half the memory left."""
    import shutil
    import tempfile

    from edu_filter.classifiers.device import default_num_threads
    from edu_filter.classifiers.embeddings import available_memory

    file_bytes = sum(len(t[:settings.max_chars].encode()) for t in texts) + 16 * len(texts)
    free = shutil.disk_usage(tempfile.gettempdir()).free
    fit_memory = (FIT_WORDS + settings.bucket) * settings.dim * 4 + FIT_WORDS * 64
    return max(1, min(fits, default_num_threads(), free // 2 // max(1, file_bytes),
                      available_memory() // 2 // fit_memory))


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
