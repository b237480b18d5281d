"""`edu-filter evaluate`: score labelled documents with a saved model and report how well it agrees."""

from __future__ import annotations

import json
from pathlib import Path

from edu_filter.classifiers.metrics import compute_metrics, plot_confusion_matrix, print_metrics
from edu_filter.documents import read_documents


def evaluate_model(
    model: str,
    data: list[str],
    report: str | Path | None = None,
    label_field: str = "score",
    long_docs: str | None = None,
    batch_size: int = 32,
    dtype: str | None = None,
) -> dict:
    """Metrics of `model` on `data` (every row must carry a label); the JSON report gets a confusion-matrix PNG beside it."""
    from edu_filter.classifiers.scorer import EduScorer

    rows = read_documents(data, label_field=label_field, require_label=True)
    if not rows:
        raise ValueError(f"no documents in {', '.join(map(str, data))}")
    scorer = EduScorer.from_pretrained(model, batch_size=batch_size, dtype=dtype)
    raw, _ = scorer.predict([r["text"] for r in rows], long_docs=long_docs, show_progress=True)
    metrics = compute_metrics([r["label"] for r in rows], raw, scorer.to_int_score(raw))
    print_metrics(metrics, title=f"{model} on {len(rows)} documents")
    if report is not None:
        report = Path(report)
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(metrics, indent=2))
        plot_confusion_matrix(metrics, report.with_suffix(".png"), title=Path(str(model)).name)
    return metrics
