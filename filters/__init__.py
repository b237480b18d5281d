"""The `apply` stage: the classifier, dedup and threshold as datatrove pipeline steps, presets and executors."""

from edu_filter.filters.apply import PRESETS, ApplyConfig, SlurmOptions, run_apply
from edu_filter.filters.io import ApplyInputReader, InputErrorFilter, KeptParquetWriter
from edu_filter.filters.scoring import CountTokens, EduClassifierScorer, ScoreThresholdFilter, keep_top_cutoff
from edu_filter.filters.sweep import run_sweep

__all__ = [
    "PRESETS",
    "ApplyConfig",
    "ApplyInputReader",
    "CountTokens",
    "EduClassifierScorer",
    "InputErrorFilter",
    "KeptParquetWriter",
    "ScoreThresholdFilter",
    "SlurmOptions",
    "keep_top_cutoff",
    "run_apply",
    "run_sweep",
]
