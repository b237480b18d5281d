"""Educational-value classifiers: train (see `edu_filter.train.classifier`), score with `load_scorer`, evaluate.

Names are imported on first use, so importing a light submodule (metrics, calibration) does not load torch.
"""

import importlib

_EXPORTS = {"EduScorer": "scorer", "FastTextScorer": "scorer", "load_scorer": "scorer"}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
