"""`edu-filter agreement A B`: how well two annotations of the same documents agree (two LLMs, LLM vs human,
LLM vs classifier).

Rows are joined on their id. Every score must lie on the 0-5 scale (a value outside it, e.g. a 0-10 rating, is refused
naming its file and row). Kappa and the confusion matrix use integer scores: a classifier's `int_score` where its rows
carry one beside the `score` compared (`apply`'s, from the model's calibrated cut points), else the scores rounded (so
regression outputs can be compared too); Spearman and MAE use the values as given. The binary block treats A as the
reference and asks whether both sides keep the same documents at `threshold`: at a whole number, as `apply` keeps
(int_score >= 3 for FineWeb-Edu); at a fractional one, the values as given.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from edu_filter.classifiers.calibration import to_int_scores
from edu_filter.documents import (
    SCORE_RANGE,
    SCORES,
    DocumentError,
    InputError,
    check_writable_output,
    expand_paths,
    id_text,
    in_score_range,
    iter_raw_rows,
    label_value,
    unclipped,
)

LABELS = list(SCORES)


@dataclass
class Scores:
    """One side's rows: {id: value} of its scored rows, the ids of its null ones, FILE:LINE of its first row
    carrying an inclusion `weight` (`score --select active`), {id: int_score} when every scored row has a whole
    `int_score` (a classifier's, from its cut points; else None), and, read against the other side's ids, how many
    scored rows it has that the other side lacks (counted, not held)."""

    scores: dict[str, float] = field(default_factory=dict)
    nulls: set[str] = field(default_factory=set)
    weighted: str | None = None
    classes: dict[str, int] | None = None
    scored_elsewhere: int = 0


def read_scores(paths, field_name: str = "score", id_field: str = "id", only: set[str] | None = None) -> Scores:
    """A side's scores (`Scores`). With `only` (the other side's ids), rows of other ids are checked and counted
    but not held: an apply output of 100M rows against a few thousand LLM labels held ~280 bytes a row. Bad rows
    (no id, a value that is no number on the 0-5 scale, a duplicate id among those held) raise DocumentError naming
    the file and row."""
    side = Scores(classes={} if field_name == "score" else None)
    where: dict[str, str] = {}
    whole_classes = side.classes is not None
    for path in expand_paths([paths] if isinstance(paths, (str, os.PathLike)) else paths):
        for lineno, row in iter_raw_rows(path, id_field):  # integer ids wider than 64 bits read exactly
            doc_id = row.get(id_field)
            if doc_id is None:
                raise DocumentError(f"{path}:{lineno}: field '{id_field}' is missing (needed to join A and B)")
            doc_id = id_text(doc_id)
            if side.weighted is None and row.get("weight") is not None:
                side.weighted = f"{path}:{lineno}"
            given = row.get(field_name, None)
            value = None if given is None else label_value(given)  # "3" as train and evaluate read it
            if value is not None:
                if math.isnan(value):
                    raise DocumentError(f"{path}:{lineno}: field '{field_name}' is not a number: {given!r:.80}")
                if not in_score_range(value):
                    raise DocumentError(f"{path}:{lineno}: field '{field_name}' is {given!r:.80}, outside the "
                                        f"{SCORE_RANGE} scale")
                whole = row.get("int_score")
                if whole_classes and not (isinstance(whole, int) and not isinstance(whole, bool) and whole in SCORES):
                    whole_classes = False
            if only is not None and doc_id not in only:
                side.scored_elsewhere += value is not None
                continue
            if doc_id in where:
                raise DocumentError(f"{path}:{lineno}: duplicate id {doc_id!r} (first at {where[doc_id]})")
            where[doc_id] = f"{path}:{lineno}"
            if value is None:
                side.nulls.add(doc_id)
                continue
            side.scores[doc_id] = float(value)
            if whole_classes:
                side.classes[doc_id] = row["int_score"]
    side.classes = side.classes if whole_classes and side.classes else None
    return side


def _size(paths) -> float:
    """The bytes of a side's files (infinite where one is not a local file: a hub dataset is never the small side)."""
    try:
        return sum(os.path.getsize(p) for p in expand_paths([paths] if isinstance(paths, (str, os.PathLike))
                                                            else paths))
    except OSError:
        return math.inf


def _finite(x) -> float | None:
    """None where a statistic is undefined (e.g. kappa or Spearman when every score is the same)."""
    return None if x is None or math.isnan(x) else float(x)


def agreement_metrics(a: list[float], b: list[float], threshold: float = 3, a_int: list[int] | None = None,
                      b_int: list[int] | None = None) -> dict:
    """Cohen's kappa, quadratic-weighted kappa, Spearman, MAE, exact match, confusion matrix and keep/drop
    agreement at `threshold` for paired scores (A is the reference); `a_int`, `b_int`: a side's own integer scores
    (a classifier's int_score), else its scores rounded."""
    import numpy as np
    from scipy.stats import spearmanr
    from sklearn.metrics import cohen_kappa_score, confusion_matrix, f1_score, precision_score, recall_score

    if not a:
        raise ValueError("no document has a score on both sides: check the ids and --field")
    a_arr, b_arr = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    a_int = to_int_scores(a_arr) if a_int is None else np.asarray(a_int)
    b_int = to_int_scores(b_arr) if b_int is None else np.asarray(b_int)
    # as apply keeps: the rounded score at a whole threshold (2.6 was dropped here while counted a 3 in the matrix)
    whole = float(threshold).is_integer()
    keep_a, keep_b = (a_int >= threshold, b_int >= threshold) if whole else (a_arr >= threshold, b_arr >= threshold)
    with warnings.catch_warnings():  # undefined statistics (constant scores) come back as None, not as warnings
        warnings.simplefilter("ignore")
        rho = spearmanr(a_arr, b_arr).statistic if len(a) > 1 else float("nan")
        kappa = cohen_kappa_score(a_int, b_int, labels=LABELS)
        qwk = cohen_kappa_score(a_int, b_int, labels=LABELS, weights="quadratic")
    return {
        "n": len(a),
        "exact_agreement": float((a_int == b_int).mean()),
        "cohen_kappa": _finite(kappa),
        "quadratic_kappa": _finite(qwk),
        "spearman": _finite(rho),
        "mae": float(np.abs(a_arr - b_arr).mean()),
        "mean_a": float(a_arr.mean()),
        "mean_b": float(b_arr.mean()),
        "confusion_matrix": confusion_matrix(a_int, b_int, labels=LABELS).tolist(),
        "threshold": threshold,
        "kept_a": int(keep_a.sum()),
        "kept_b": int(keep_b.sum()),
        "keep_agreement": float((keep_a == keep_b).mean()),
        # undefined where nothing is kept on the side it divides by: None ("n/a"), as `compute_metrics` and the
        # sweep say it; 0.0 read as "B misses every keep"
        "keep_precision": float(precision_score(keep_a, keep_b)) if keep_b.any() else None,
        "keep_recall": float(recall_score(keep_a, keep_b)) if keep_a.any() else None,
        "keep_f1": float(f1_score(keep_a, keep_b)) if keep_a.any() or keep_b.any() else None,
    }


def agreement(
    a: str | os.PathLike | list,
    b: str | os.PathLike | list,
    field: str = "score",
    field_b: str | None = None,
    id_field: str = "id",
    threshold: float = 3,
    report: str | os.PathLike | None = None,
    show: bool = True,
) -> dict:
    """Compare annotation A with annotation B (joined on id); print tables, optionally write a JSON report."""
    if not in_score_range(threshold):
        raise InputError(f"--threshold must be on the {SCORE_RANGE} scale, got {threshold:g}")
    if report is not None:
        check_writable_output(report, "--report", file=True)
    # the smaller side is held whole, the other read against its ids (memory: the smaller side)
    if _size(a) <= _size(b):
        side_a = read_scores(a, field, id_field)
        side_b = read_scores(b, field_b or field, id_field, only=side_a.scores.keys() | side_a.nulls)
    else:
        side_b = read_scores(b, field_b or field, id_field)
        side_a = read_scores(a, field, id_field, only=side_b.scores.keys() | side_b.nulls)
    scores_a, scores_b, nulls_a, nulls_b = side_a.scores, side_b.scores, side_a.nulls, side_b.nulls
    weighted, classes_a, classes_b = side_a.weighted or side_b.weighted, side_a.classes, side_b.classes
    common = [doc_id for doc_id in scores_a if doc_id in scores_b]
    # a classifier's own int_score (its calibrated cut points), as apply keeps: rounding its score kept what apply drops
    result = agreement_metrics([scores_a[i] for i in common], [scores_b[i] for i in common], threshold,
                               [classes_a[i] for i in common] if classes_a else None,
                               [classes_b[i] for i in common] if classes_b else None)
    result.update(
        a=str(a), b=str(b), field_a=field, field_b=field_b or field,
        int_a="int_score" if classes_a else "rounded", int_b="int_score" if classes_b else "rounded",
        # comparisons lost to a null: a document one side scored that the other holds with a null score (a human
        # subset checked against an LLM pool: the pool's nulls elsewhere cost none), not as missing from it
        null_a=len(scores_b.keys() & nulls_a), null_b=len(scores_a.keys() & nulls_b),
        only_in_a=side_a.scored_elsewhere + len(scores_a.keys() - scores_b.keys() - nulls_b),
        only_in_b=side_b.scored_elsewhere + len(scores_b.keys() - scores_a.keys() - nulls_a),
        # an actively chosen sample holds the rare high scores many times their share: its agreement is not the pool's
        warnings=[f"rows carry inclusion weights ({weighted}: a sample drawn by `score --select active`); these "
                  "figures are of the sample, unweighted, not of the pool it was drawn from"] if weighted else [],
    )
    if report is not None:
        Path(report).parent.mkdir(parents=True, exist_ok=True)
        Path(report).write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    if show:
        print_agreement(result)
    return result


def print_agreement(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    def fmt(x):
        return "n/a" if x is None else f"{x:.3f}"

    console = Console()
    t = Table(title=f"agreement: A={r['a']} ({r['field_a']})  B={r['b']} ({r['field_b']})", show_header=False)
    t.add_column(style="bold")
    t.add_column(justify="right")
    t.add_row("documents compared", f"{r['n']:,}")
    t.add_row("skipped: null in A / null in B", f"{r['null_a']:,} / {r['null_b']:,}")
    t.add_row("skipped: only in A / only in B", f"{r['only_in_a']:,} / {r['only_in_b']:,}")
    t.add_row("exact agreement", fmt(r["exact_agreement"]))
    t.add_row("Cohen's kappa", fmt(r["cohen_kappa"]))
    t.add_row("quadratic-weighted kappa", fmt(r["quadratic_kappa"]))
    t.add_row("Spearman", fmt(r["spearman"]))
    t.add_row("MAE", fmt(r["mae"]))
    t.add_row("mean A / mean B", f"{r['mean_a']:.2f} / {r['mean_b']:.2f}")
    t.add_row(f"kept at >= {r['threshold']:g}: A / B", f"{r['kept_a']:,} / {r['kept_b']:,}")
    t.add_row("keep/drop agreement", fmt(r["keep_agreement"]))
    t.add_row("keep precision / recall / F1 (B vs A)",
              " / ".join(fmt(r[k]) for k in ("keep_precision", "keep_recall", "keep_f1")))
    console.print(unclipped(t))

    cm = Table(title="confusion matrix (rows: A, columns: B)")
    cm.add_column("A \\ B", style="bold")
    for label in LABELS:
        cm.add_column(str(label), justify="right")
    for label, row in zip(LABELS, r["confusion_matrix"]):
        cm.add_row(str(label), *[f"[bold]{v}[/bold]" if i == label and v else str(v) for i, v in enumerate(row)])
    console.print(unclipped(cm))
    for line in r.get("warnings", []):
        console.print(f"[yellow]warning: {line}", soft_wrap=True)
