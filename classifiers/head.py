"""The regression head of the frozen-encoder recipe: a ridge on standardised embeddings, optionally weighted.

Weights are the inclusion weights of a sample chosen with known probabilities (`score --select active`): with them
the weighted loss is an unbiased estimate of the loss over the whole pool the sample was drawn from, not over the
sample. The cross-validation that picks the regularisation scores every candidate by that pool estimate, and it
also picks how strongly the fit itself is weighted (see `fit_ridge_head`). Without weights every row counts once.

One symmetric eigendecomposition per cross-validation fold gives the solutions for every alpha of the search: of
the fold's kernel matrix when there are fewer rows than features, which is what lets active selection refit the head
after every round and `train` draw learning curves from dozens of fits, ~25x cheaper than scikit-learn's
`Ridge(alpha, sample_weight=w)` on the same standardised features (the same estimator). With more rows than features
(FineWeb-Edu's ~450k annotations) the folds' feature Gram matrices are summed over blocks of rows instead: memory
beyond the float32 embeddings stays a few d x d matrices, where the kernel route's float64 copies of the embeddings
would take ~8x their size, and BLAS threads are used for it.
"""

from __future__ import annotations

import numpy as np

ALPHAS = np.logspace(-1, 5, 25)
FLATTENING = (1.0, 0.5, 0.0)  # powers of the inclusion weights the fit may use, the full weights first
GRAM_BLOCK = 8192  # rows converted to float64 at a time when summing Gram matrices
THREADED_FLOPS = 5e10  # below this (rows x features^2) one BLAS thread is faster on a busy machine


def unit_weights(weights, n: int) -> np.ndarray:
    """Weights scaled to mean 1 (None: all ones), so the alpha grid means the same with and without weights."""
    if weights is None:
        return np.ones(n)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n,) or not np.isfinite(w).all() or (w <= 0).any():
        raise ValueError("weights must be one positive finite number per row")
    return w / w.mean()


# A feature whose spread is below this share of the median feature's counts as constant (scale 1): an encoder's
# degenerate dimension (a LayerNorm weight near 0: std 7e-10 in MiniLM's last layer) standardised to unit variance
# got a raw weight of -2e6, harmless on the frozen encoder, but fine-tuning moves that LayerNorm weight by about the
# learning rate a step, and the logits by tens (the loss went from 0.5 to 20,000 in one step)
CONSTANT_SCALE_SHARE = 1e-3


def _constant_to_one(scale: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """`scale` with the features that count as constant set to 1, as StandardScaler does."""
    floor = np.maximum(1e-12 * np.maximum(1.0, np.abs(mean)), CONSTANT_SCALE_SHARE * np.median(scale))
    return np.where(scale < floor, 1.0, scale)


def _weighted_standardiser(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted mean and standard deviation per feature (constant features get scale 1, as StandardScaler does)."""
    mean = w @ x / w.sum()
    var = w @ (x - mean) ** 2 / w.sum()
    return mean, _constant_to_one(np.sqrt(var), mean)


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


def _held_out_r2(w: np.ndarray, y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Weighted R² of one held-out fold's predictions, one per alpha column (RidgeCV's score; minus the residual
    where the fold's labels are constant)."""
    total = w @ (y - (w @ y) / w.sum()) ** 2
    residual = w @ (y[:, None] - pred) ** 2
    return 1 - residual / total if total > 0 else -residual


def fold_indices(n: int, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(fit, held-out) index pairs of a shuffled K-fold split (scikit-learn's KFold, so splits match it)."""
    from sklearn.model_selection import KFold

    return list(KFold(folds, shuffle=True, random_state=seed).split(np.arange(n)))


class RowsOf:
    """Rows `index` of a matrix, gathered a block at a time as the Gram fit reads them: a subset's fit (the learning
    curve's, an active round's) without a copy of its rows (0.8x the embeddings at the curve's largest point)."""

    def __init__(self, x: np.ndarray, index: np.ndarray):
        self.x, self.index = x, np.asarray(index)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.index), self.x.shape[1]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, rows):
        return self.x[self.index[rows]]

    def __array__(self, dtype=None, copy=None):  # the direct fit (fewer rows than features) takes a copy anyway
        return np.asarray(self.x[self.index], dtype=dtype)


def fit_ridge_head(x: np.ndarray | RowsOf, y: np.ndarray, folds: int, seed: int, weights=None):
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

    n, d = np.shape(x)
    # small matrices: threaded BLAS on a busy machine was measured ~80x slower; large ones need the threads
    with threadpool_limits(1 if n * d * d < THREADED_FLOPS else None):
        if n > d:
            return _fit_ridge_head_by_gram(x, y, folds, seed, weights)
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
            r2 += _held_out_r2(w[held], y[held], pred)
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


def _blocks(n: int):
    return (slice(start, min(start + GRAM_BLOCK, n)) for start in range(0, n, GRAM_BLOCK))


def _fold_sums(x, y, w, fold_of: np.ndarray, folds: int, shift: np.ndarray) -> dict[str, np.ndarray]:
    """Per fold, the weighted sums a ridge fit needs, of x - shift: sum w x x^T, sum w x, sum w x y, sum w, sum w y.

    The shift (about the features' mean) keeps variances computed from sums exact: sums of raw x lose a constant
    feature's zero variance to rounding of the order of its squared mean."""
    d = x.shape[1]
    sums = {"xx": np.zeros((folds, d, d)), "x": np.zeros((folds, d)), "xy": np.zeros((folds, d)),
            "w": np.zeros(folds), "y": np.zeros(folds)}
    for rows in _blocks(len(y)):
        xb = np.asarray(x[rows], dtype=np.float64) - shift
        for k in np.unique(fold_of[rows]):
            mine = fold_of[rows] == k
            xk, yk, wk = xb[mine], y[rows][mine], w[rows][mine]
            sums["xx"][k] += (xk * wk[:, None]).T @ xk
            sums["x"][k] += wk @ xk
            sums["xy"][k] += (wk * yk) @ xk
            sums["w"][k] += wk.sum()
            sums["y"][k] += wk @ yk
    return sums


def _scale_from_sums(total: dict, shift: np.ndarray) -> np.ndarray:
    """The scale of `_weighted_standardiser` over all rows, from their sums around `shift`."""
    mean = total["x"] / total["w"]
    return _constant_to_one(np.sqrt(np.maximum(np.diag(total["xx"]) / total["w"] - mean**2, 0.0)), mean + shift)


def _centred_system(part: dict, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """From the sums of the rows a ridge is fitted on: the weighted, centred Gram matrix of the standardised features
    and their cross product with y, and the rows' weighted mean of x and of y."""
    mean_x, mean_y = part["x"] / part["w"], part["y"] / part["w"]
    centred = (part["xx"] - part["w"] * np.outer(mean_x, mean_x)) / np.outer(scale, scale)
    cross = (part["xy"] - mean_x * part["y"]) / scale
    return centred, cross, mean_x, float(mean_y)


def _ridge_from_sums(part: dict, scale: np.ndarray, alphas) -> tuple[np.ndarray, np.ndarray, float]:
    """Ridge on standardised features from the sums of the rows it is fitted on: coefficients on raw features (one
    column per alpha), the rows' weighted mean of x and of y (predictions: (x - mean_x) @ coefficients + mean_y, x
    shifted as the sums were)."""
    centred, cross, mean_x, mean_y = _centred_system(part, scale)
    eigval, eigvec = np.linalg.eigh(centred)
    eigval = np.maximum(eigval, 0.0)
    coef = eigvec @ ((eigvec.T @ cross)[:, None] / (eigval[:, None] + np.asarray(alphas, dtype=np.float64)[None, :]))
    return coef / scale[:, None], mean_x, mean_y


def _fit_ridge_head_by_gram(x, y, folds: int, seed: int, weights):
    """`_fit_ridge_head` (same search, same result) from per-fold sums over blocks of rows, for more rows than
    features: x is read in float32 blocks, never copied whole."""
    x = x if isinstance(x, RowsOf) else np.asarray(x)
    y = np.asarray(y, dtype=np.float64)
    w = unit_weights(weights, len(y))
    splits = fold_indices(len(y), folds, seed)
    fold_of = np.empty(len(y), dtype=np.int64)
    for k, (_, held) in enumerate(splits):
        fold_of[held] = k
    shift = np.asarray(x[:GRAM_BLOCK], dtype=np.float64).mean(axis=0)
    best = None  # (score, flattening, alpha index, out-of-fold predictions, sums of all rows)
    for flattening in FLATTENING if weights is not None else (1.0,):
        fit_w = unit_weights(w**flattening, len(y))
        sums = _fold_sums(x, y, fit_w, fold_of, folds, shift)
        total = {name: value.sum(axis=0) for name, value in sums.items()}
        scale = _scale_from_sums(total, shift)
        fitted = [_ridge_from_sums({name: total[name] - sums[name][k] for name in sums}, scale, ALPHAS)
                  for k in range(folds)]
        pred = np.zeros((len(y), len(ALPHAS)))
        for rows in _blocks(len(y)):
            xb = np.asarray(x[rows], dtype=np.float64) - shift
            for k in np.unique(fold_of[rows]):
                mine = np.flatnonzero(fold_of[rows] == k)
                coef, mean_x, mean_y = fitted[k]
                pred[rows.start + mine] = (xb[mine] - mean_x) @ coef + mean_y
        r2 = sum(_held_out_r2(w[held], y[held], pred[held]) for _, held in splits)
        k = int(np.argmax(r2))  # the first of equals, as GridSearchCV ranks them
        if best is None or r2[k] > best[0]:
            best = (r2[k], flattening, k, pred[:, k].copy(), total, scale)
    _, flattening, k, oof, total, scale = best
    centred, cross, mean_x, mean_y = _centred_system(total, scale)
    coef = np.linalg.solve(centred + ALPHAS[k] * np.eye(len(scale)), cross)
    weight = coef / scale
    bias = float(mean_y - weight @ (mean_x + shift))
    return (weight.astype(np.float32), bias), oof, float(ALPHAS[k]), flattening
