"""The `apply` stage: the classifier, dedup and threshold as datatrove pipeline steps, presets and executors.

Names are imported on first use, so the CLI can read `ApplyConfig` defaults without loading torch.
"""

import importlib

_EXPORTS = {
    "PRESETS": "apply",
    "ApplyConfig": "apply",
    "SlurmOptions": "apply",
    "RayOptions": "apply",
    "run_apply": "apply",
    "ApplyInputReader": "io",
    "InputErrorFilter": "io",
    "KeptParquetWriter": "io",
    "CountTokens": "scoring",
    "EduClassifierScorer": "scoring",
    "ScoreThresholdFilter": "scoring",
    "ScoreHistogram": "scoring",
    "NonFiniteScoreFilter": "scoring",
    "KeepTopCutoff": "scoring",
    "keep_top_cutoff": "scoring",
    "run_sweep": "sweep",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
