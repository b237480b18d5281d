"""`train --method head` (the FineWeb-Edu recipe): a ridge regression on a frozen encoder's pooled embeddings.

The embeddings (six evenly spaced layers up to the top, mean-pooled and concatenated) are cached on disk, so
re-training takes seconds. The ridge's regularisation is chosen by cross-validation on the training split, and its
out-of-fold predictions join the validation ones for calibration. The ridge, with its feature scaling folded in,
becomes the model's linear head: the saved folder is an ordinary transformers model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from edu_filter.classifiers.calibration import fit_cut_points
from edu_filter.classifiers.frozen_encoder import FrozenEncoder, load_frozen_encoder
from edu_filter.classifiers.head import RowsOf, fit_ridge_head
from edu_filter.classifiers.learning_curve import FitPredict
from edu_filter.train.classifier import TrainedModel, take

if TYPE_CHECKING:
    from edu_filter.train.classifier import ClassifierTrainConfig


def train_head(cfg: ClassifierTrainConfig, texts: list[str], y: np.ndarray, val_texts: list[str],
               weights=None) -> TrainedModel:
    """The frozen encoder with a ridge head fitted on its embeddings of `texts`."""
    frozen = load_frozen_encoder(**cfg.frozen_encoder_options())
    x = frozen.embed(texts + val_texts)  # one array: the fit and validation read views of it, the curve all of it
    frozen, head, oof, info, _ = fit_head(cfg, texts, y, weights, frozen=frozen, x=x[:len(texts)])
    val_x = x[len(texts):]  # predicted a block at a time: a float64 copy of 45k x 4608 is 1.7 GB
    val_pred = np.concatenate([val_x[i:i + 4096].astype(np.float64) @ head[0] for i in range(0, len(val_x), 4096)]
                              or [np.zeros(0)]) + head[1]
    return TrainedModel(frozen.model, val_pred, oof, info, frozen, embeddings=x)


def fit_head(cfg: ClassifierTrainConfig, texts: list[str], y: np.ndarray, weights=None, frozen=None,
             x: np.ndarray | None = None):
    """The frozen encoder with the ridge head set in its model; returns (frozen, (weight, bias), out-of-fold
    predictions, info, the embeddings of `texts`). Fine-tuning starts from this model (a linear probe first)."""
    import torch

    frozen = frozen or load_frozen_encoder(**cfg.frozen_encoder_options())
    x = frozen.embed(texts) if x is None else x
    head, oof, alpha, flattening = fit_ridge_head(x, y, cfg.folds, cfg.seed, weights=weights)
    model = frozen.model
    with torch.no_grad():
        model.classifier.weight.copy_(torch.from_numpy(head[0][None, :]))
        model.classifier.bias.fill_(head[1])
    info = {"method": cfg.method, "encoder": model.config.encoder_name, "pool_layers": frozen.pool_layers,
            "ridge_alpha": alpha, "dtype": frozen.dtype}
    if weights is not None:
        info["weight_flattening"] = flattening  # the power of the weights the fit used (1: fully weighted)
    return frozen, head, oof, info, x


def curve_fit_predict(cfg: ClassifierTrainConfig, frozen: FrozenEncoder, texts: list[str], y: np.ndarray,
                      weights=None, x: np.ndarray | None = None) -> FitPredict:
    """The learning curve's refit: the ridge head on a subset's embeddings (`x` when the fit has them, else the
    cached ones), cut points from its out-of-fold predictions."""
    if x is None:
        x = frozen.embed(texts)  # float32: the fit reads it in float64 blocks

    def fit_predict(subset, held):
        (weight, bias), oof, _, _ = fit_ridge_head(RowsOf(x, subset), y[subset], cfg.folds, cfg.seed,
                                                   weights=take(weights, subset))
        cuts = fit_cut_points(oof, y[subset], min_positives=cfg.min_positives, weights=take(weights, subset))
        held = np.asarray(held)
        pred = np.concatenate([x[held[i:i + 4096]].astype(np.float64) @ weight for i in range(0, len(held), 4096)]
                              ) if len(held) else np.zeros(0)
        return pred + bias, cuts

    return fit_predict
