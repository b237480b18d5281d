"""`edu-filter evaluate`: score labelled documents with a saved model and report how well it agrees."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np

from edu_filter.classifiers.metrics import (
    compute_metrics,
    metric_warnings,
    plot_confusion_matrix,
    print_metrics,
    print_warnings,
)
from edu_filter.documents import (
    InputError,
    RunError,
    check_model_name,
    check_writable_output,
    WEIGHT_FIELD,
    inclusion_weights,
    iter_labelled,
    progress_bar,
    say_left_out,
    text_keys,
    TRAINED_TEXTS,
    weight_values,
    weight_summary,
)

EVALUATE_CHUNK = 65_536  # documents read, then scored, at a time: what is held of a held-out set of millions


def trained_texts(model: str) -> np.ndarray | None:
    """The sorted keys of the texts a model `train` saved was fitted on (TRAINED_TEXTS); None for a model without
    them (a hub classifier, or one trained by an edu-filter from before)."""
    path = Path(model) / TRAINED_TEXTS
    try:
        return np.load(path, allow_pickle=False) if path.is_file() else None
    except (OSError, ValueError):  # cut short: no warning rather than no evaluation
        return None


def evaluate_model(
    model: str,
    data: list[str],
    report: str | Path | None = None,
    label_field: str = "score",
    long_docs: str | None = None,
    batch_size: int | None = None,
    dtype: str | None = None,
    num_threads: int | None = None,
    weight_field: str | None = "weight",
    skip_failed: bool = False,
) -> dict:
    """Metrics of `model` on `data` (every row must carry a label, or with `skip_failed` have failed to get one from
    the LLM: those are left out and counted), with warnings when they cannot be trusted; the
    JSON report gets a confusion-matrix PNG beside it. Scoring runs on `num_threads` CPU threads (default: every CPU
    this process may use).

    Rows with inclusion weights (a `score --select active` sample) are evaluated with them, as `train` does: the
    metrics then estimate the model's quality on the pool the sample was drawn from, not on the sample, which holds
    several times the pool's share of high scores."""
    from edu_filter.classifiers.device import torch_threads
    from edu_filter.classifiers.scorer import check_classifier_folder, load_scorer, refuse_transformer_options

    check_model_name(model, "MODEL")
    if Path(model).is_dir():  # before the data is read (a held-out set of millions), with apply's words and status
        check_classifier_folder(model, "MODEL")
    if batch_size is not None and batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {batch_size}")
    refuse_transformer_options(model, dtype=dtype, long_docs=long_docs, batch_size=batch_size)
    if report is not None:
        check_writable_output(report, "--report", file=True)
    from rich.console import Console

    scorer = load_scorer(model, batch_size=batch_size, dtype=dtype)
    left_out: dict[str, int] = {}
    rows = iter_labelled(data, label_field, left_out, skip_failed=skip_failed, weight_field=weight_field)
    required = weight_field != WEIGHT_FIELD  # a field named on the command line
    trained_on = trained_texts(model)
    seen_in_training = 0
    labels, weighed, raws = [], [], []  # each document's label, weight and score: its text is not held
    with torch_threads(num_threads), progress_bar(True) as progress:
        task = progress.add_task("scoring", total=None)
        while chunk := list(itertools.islice(rows, EVALUATE_CHUNK)):
            raw, _ = scorer.predict_many([r["text"] for r in chunk], long_docs=long_docs)
            if not np.isfinite(raw).all():  # taken for int_score 0 (NaN) or 5 (inf) in the F1s, unwarned
                bad = np.flatnonzero(~np.isfinite(raw))
                seen, first = sum(map(len, labels)) + len(chunk), int(bad[0])
                raise RunError(f"the classifier scores {len(bad):,} of {seen:,} documents read so far with no finite "
                               f"number (first: {chunk[first].get('id', f'row {seen - len(chunk) + first}')}, "
                               f"{raw[first]}): an overflow in --dtype float16? float32 or bfloat16 score them; apply "
                               "fails such documents as non_finite_score")
            if trained_on is not None:
                keys = text_keys(r["text"] for r in chunk)
                at = np.minimum(np.searchsorted(trained_on, keys), max(0, len(trained_on) - 1))
                seen_in_training += int(np.count_nonzero(trained_on[at] == keys)) if len(trained_on) else 0
            labels.append(np.array([r["label"] for r in chunk], dtype=np.float64))
            if weight_field:  # checked as they come: a bad weight stops the run before hours of scoring
                weighed.append(weight_values(chunk, weight_field))
                if (inclusion_weights(weighed[-1], weight_field, required) is None) != (
                        inclusion_weights(weighed[0], weight_field, required) is None):
                    inclusion_weights(np.concatenate(weighed), weight_field)  # says how many have none
            raws.append(raw)
            progress.advance(task, len(chunk))
    say_left_out(left_out, sum(map(len, labels)), "DATA", Console(stderr=True))
    if not labels:
        raise ValueError(f"no documents in {', '.join(map(str, data))}")
    weights = inclusion_weights(np.concatenate(weighed), weight_field, required) if weight_field else None
    raw, labels = np.concatenate(raws), np.concatenate(labels)
    metrics = compute_metrics(labels, raw, scorer.to_int_score(raw), weights=weights)
    if weights is not None:
        metrics["weights"] = weight_summary(weights, weight_field)
    metrics["failed_annotations_left_out"] = left_out  # --skip-failed: rows the LLM never labelled, by reason
    metrics["warnings"] = metric_warnings(metrics, labels, scorer.kind, data="the evaluation data")
    if trained_on is not None:
        metrics["trained_on"] = seen_in_training  # documents whose text the model was fitted on
        if seen_in_training:
            metrics["warnings"].append(
                f"{seen_in_training:,} of {len(labels):,} documents evaluated ({seen_in_training / len(labels):.0%}) "
                "are texts the model was trained on: these metrics overstate its quality on documents it has not seen "
                "(evaluate on held-out labels: train's --val, or rows no training file holds)")
    weighted = "" if weights is None else f" (weighted by '{weight_field}': estimates for the pool they were drawn from)"
    print_metrics(metrics, title=f"{model} on {len(labels)} documents{weighted}")
    print_warnings(metrics["warnings"])
    if report is not None:
        report = Path(report)
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(metrics, indent=2))
        plot_confusion_matrix(metrics, report.with_suffix(".png"), title=Path(str(model)).name)
    return metrics
