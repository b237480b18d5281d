"""The regression head of the frozen-encoder recipe: a ridge on standardised embeddings, optionally weighted.

Weights are the inclusion weights of a sample chosen with known probabilities (`score --select active`): with them
the weighted loss is an unbiased estimate of the loss over the whole pool the sample was drawn from, not over the
sample. The cross-validation that picks the regularisation scores every candidate by that pool estimate, and it
also picks how strongly the fit itself is weighted (see `fit_ridge_head`). Without weights every row counts once.

The ridge is solved in its kernel form, once per cross-validation fold for every alpha of the search: one symmetric
eigendecomposition of the fold's Gram matrix gives the solutions for all alphas. That is the same estimator as
scikit-learn's `Ridge(alpha, sample_weight=w)` on the same standardised features, ~25x cheaper, which is what lets
active selection refit the head after every round and `train` draw learning curves from dozens of fits.
"""

from __future__ import annotations

import numpy as np

ALPHAS = np.logspace(-1, 5, 25)
FLATTENING = (1.0, 0.5, 0.0)  # powers of the inclusion weights the fit may use, the full weights first


def unit_weights(weights, n: int) -> np.ndarray:
    """Weights scaled to mean 1 (None: all ones), so the alpha grid means the same with and without weights."""
    if weights is None:
        return np.ones(n)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n,) or not np.isfinite(w).all() or (w <= 0).any():
        raise ValueError("weights must be one positive finite number per row")
    return w / w.mean()


def _weighted_standardiser(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted mean and standard deviation per feature (constant features get scale 1, as StandardScaler does)."""
    mean = w @ x / w.sum()
    var = w @ (x - mean) ** 2 / w.sum()
    scale = np.sqrt(var)
    scale[scale < 1e-12 * np.maximum(1.0, np.abs(mean))] = 1.0
    return mean, scale


def _ridge_path(x_fit, y_fit, w_fit, x_out, alphas) -> np.ndarray:
    """Predictions on `x_out` of weighted ridge fits on (x_fit, y_fit, w_fit), one column per alpha.

    Weighted centring, then rows scaled by sqrt(w): ridge with sample weights. Kernel form when rows < features,
    primal otherwise; either way one eigendecomposition serves every alpha."""
    sw = w_fit / w_fit.sum()
    x_mean, y_mean = sw @ x_fit, sw @ y_fit
    root = np.sqrt(w_fit)[:, None]
    xc, yc = (x_fit - x_mean) * root, (y_fit - y_mean) * root[:, 0]
    out = x_out - x_mean
    if xc.shape[0] <= xc.shape[1]:
        eigval, eigvec = np.linalg.eigh(xc @ xc.T)
        a = out @ xc.T @ eigvec
        c = eigvec.T @ yc
    else:
        eigval, eigvec = np.linalg.eigh(xc.T @ xc)
        a = out @ eigvec
        c = eigvec.T @ (xc.T @ yc)
    eigval = np.maximum(eigval, 0.0)
    return a @ (c[:, None] / (eigval[:, None] + np.asarray(alphas)[None, :])) + y_mean


def _ridge_coefficients(x, y, w, alpha) -> tuple[np.ndarray, float]:
    sw = w / w.sum()
    x_mean, y_mean = sw @ x, sw @ y
    root = np.sqrt(w)[:, None]
    xc, yc = (x - x_mean) * root, (y - y_mean) * root[:, 0]
    if xc.shape[0] <= xc.shape[1]:
        coef = xc.T @ np.linalg.solve(xc @ xc.T + alpha * np.eye(len(xc)), yc)
    else:
        coef = np.linalg.solve(xc.T @ xc + alpha * np.eye(xc.shape[1]), xc.T @ yc)
    return coef, float(y_mean - x_mean @ coef)


def fold_indices(n: int, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(fit, held-out) index pairs of a shuffled K-fold split (scikit-learn's KFold, so splits match it)."""
    from sklearn.model_selection import KFold

    return list(KFold(folds, shuffle=True, random_state=seed).split(np.arange(n)))


def fit_ridge_head(x: np.ndarray, y: np.ndarray, folds: int, seed: int, weights=None):
    """Ridge on standardised embeddings; returns ((weight, bias) on raw embeddings, out-of-fold predictions, alpha,
    flattening).

    Alpha is chosen by K-fold cross-validation: weighted R² on the held-out folds, averaged over folds, as RidgeCV
    scores. With weights, the fit uses them raised to a flattening power (1: fully weighted, 0: unweighted) chosen
    in the same search, while every held-out score stays fully weighted: an unbiased estimate of the pool's error
    for each candidate (importance-weighted cross-validation). Selection on the embeddings alone leaves the labels'
    relation to them unchanged, so a flatter fit can be as right and less noisy; the search takes it only where
    the pool's estimated error says so. Full weighting wins ties.
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):  # small matrices: threaded BLAS on a busy machine was measured ~80x slower
        return _fit_ridge_head(x, y, folds, seed, weights)


def _fit_ridge_head(x, y, folds: int, seed: int, weights):
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    w = unit_weights(weights, len(y))
    splits = fold_indices(len(y), folds, seed)
    best = None  # (score, flattening, alpha index, out-of-fold predictions, mean, scale)
    for flattening in FLATTENING if weights is not None else (1.0,):
        fit_w = unit_weights(w**flattening, len(y))
        mean, scale = _weighted_standardiser(x, fit_w)
        xs = (x - mean) / scale
        fold_preds = []
        r2 = np.zeros(len(ALPHAS))
        for fit, held in splits:
            pred = _ridge_path(xs[fit], y[fit], fit_w[fit], xs[held], ALPHAS)
            fold_preds.append(pred)
            wh, yh = w[held], y[held]
            total = wh @ (yh - (wh @ yh) / wh.sum()) ** 2
            residual = wh @ (yh[:, None] - pred) ** 2
            r2 += 1 - residual / total if total > 0 else -residual
        k = int(np.argmax(r2))  # the first of equals, as GridSearchCV ranks them
        if best is None or r2[k] > best[0]:
            oof = np.zeros(len(y))
            for (_, held), pred in zip(splits, fold_preds):
                oof[held] = pred[:, k]
            best = (r2[k], flattening, k, oof, mean, scale)
    _, flattening, k, oof, mean, scale = best
    fit_w = unit_weights(w**flattening, len(y))
    coef, intercept = _ridge_coefficients((x - mean) / scale, y, fit_w, ALPHAS[k])
    weight = coef / scale
    bias = float(intercept - weight @ mean)
    return (weight.astype(np.float32), bias), oof, float(ALPHAS[k]), flattening
