"""Educational-value classifiers: train (see `edu_filter.train.classifier`), score with `EduScorer`, evaluate."""

from edu_filter.classifiers.scorer import EduScorer

__all__ = ["EduScorer"]
