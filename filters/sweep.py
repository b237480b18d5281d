"""`edu-filter sweep`: what each threshold would keep, before committing to one.

Reads scored documents (an `apply` output folder, or any JSONL/Parquet with `score`/`int_score`), prints and saves
the retention table (documents and tokens kept at each `int_score` threshold), a score histogram and a retention
curve; when the rows carry reference labels (an LLM annotation), also precision/recall/F1 of "int_score >= t"
against "label >= positive_threshold".
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edu_filter.documents import DocumentError, expand_paths, iter_raw_rows

LABEL_FIELDS = ("input_score", "label")  # where `apply` keeps an input's own score, and the generic name


def sweep_inputs(paths: list[str]) -> list[str]:
    """An `apply` output folder stands for the documents its threshold was applied to: `kept/` and
    `removed/below_threshold/` (after dedup in the dedup-first order, before it in score-first)."""
    resolved = []
    for p in paths:
        if (Path(p) / "run_config.json").exists():
            resolved += [str(Path(p) / sub) for sub in ("kept", "removed/below_threshold") if (Path(p) / sub).is_dir()]
        else:
            resolved.append(str(p))
    return resolved


def load_scored(paths: list[str], label_field: str | None = None) -> dict[str, np.ndarray]:
    """score, int_score, tokens (token_count, else whitespace words) and label (NaN when absent) per document."""
    scores, ints, tokens, labels = [], [], [], []
    token_unit = "tokens"
    for path in expand_paths(sweep_inputs(paths)):
        for lineno, row in iter_raw_rows(path):
            meta = row.get("metadata") if isinstance(row.get("metadata"), dict) else {}
            row = {**meta, **row}
            if row.get("score") is None or row.get("int_score") is None:
                raise DocumentError(f"{path}:{lineno}: no score/int_score; run `edu-filter apply` first")
            scores.append(float(row["score"]))
            ints.append(int(row["int_score"]))
            if row.get("token_count") is not None:
                tokens.append(int(row["token_count"]))
            else:
                token_unit = "words"
                tokens.append(len(str(row.get("text", "")).split()))
            field = label_field or next((f for f in LABEL_FIELDS if row.get(f) is not None), None)
            labels.append(float(row[field]) if field and row.get(field) is not None else np.nan)
    if not scores:
        raise DocumentError(f"no scored documents in {', '.join(map(str, paths))}")
    return {"score": np.asarray(scores, np.float32), "int_score": np.asarray(ints, np.int64),
            "tokens": np.asarray(tokens, np.int64), "label": np.asarray(labels, np.float64), "token_unit": token_unit}


def retention_table(data: dict, thresholds: list[int], positive_threshold: int = 3) -> list[dict]:
    from sklearn.metrics import precision_recall_fscore_support

    n_tokens = max(1, int(data["tokens"].sum()))
    labelled = ~np.isnan(data["label"])
    rows = []
    for t in thresholds:
        keep = data["int_score"] >= t
        row = {
            "threshold": t,
            "documents": int(keep.sum()),
            "documents_pct": 100 * float(keep.mean()),
            "tokens": int(data["tokens"][keep].sum()),
            "tokens_pct": 100 * float(data["tokens"][keep].sum()) / n_tokens,
        }
        if labelled.any():
            truth = data["label"][labelled] >= positive_threshold
            p, r, f, _ = precision_recall_fscore_support(truth, keep[labelled], average="binary", zero_division=0)
            row |= {"precision": float(p), "recall": float(r), "f1": float(f)}
        rows.append(row)
    return rows


def plot_sweep(data: dict, rows: list[dict], output: Path, positive_threshold: int = 3) -> list[Path]:
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend (e.g. a notebook's) alone

    paths = []
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.hist(data["score"], bins=np.arange(-0.5, 5.75, 0.25), color="#4878a8", edgecolor="white")
    for t in range(1, 6):
        ax.axvline(t - 0.5, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("classifier score (int_score boundaries dotted)")
    ax.set_ylabel("documents")
    ax.set_title(f"Score distribution ({len(data['score']):,} documents)")
    fig.tight_layout()
    paths.append(output / "score_histogram.png")
    fig.savefig(paths[-1], dpi=120)

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    order = np.sort(data["score"])[::-1]
    tok_order = data["tokens"][np.argsort(-data["score"], kind="stable")]
    ax.plot(order, 100 * np.arange(1, len(order) + 1) / len(order), label="documents (float score cutoff)")
    ax.plot(order, 100 * np.cumsum(tok_order) / max(1, tok_order.sum()), label=f"{data['token_unit']}")
    ax.plot([r["threshold"] for r in rows], [r["documents_pct"] for r in rows], "o", color="black",
            label="documents at int_score >= t")
    if "f1" in rows[0]:
        ax.plot([r["threshold"] for r in rows], [100 * r["f1"] for r in rows], "s--", color="#c44e52",
                label=f"F1 of int_score >= t vs label >= {positive_threshold} (x100)")
    ax.set_xlabel("threshold")
    ax.set_ylabel("% kept")
    ax.set_ylim(0, 102)
    ax.set_title("Retention vs threshold")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(output / "retention_curve.png")
    fig.savefig(paths[-1], dpi=120)
    return paths


def run_sweep(paths: list[str], output: str | Path, thresholds: list[int] | None = None,
              label_field: str | None = None, positive_threshold: int = 3, show: bool = True) -> dict:
    """Writes `sweep.json`, `retention.csv`, `score_histogram.png` and `retention_curve.png` into `output`."""
    from rich.console import Console
    from rich.table import Table

    thresholds = sorted(thresholds if thresholds is not None else [0, 1, 2, 3, 4, 5])
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    data = load_scored(paths, label_field)
    rows = retention_table(data, thresholds, positive_threshold)
    plots = plot_sweep(data, rows, output, positive_threshold)

    columns = list(rows[0])
    (output / "retention.csv").write_text(
        "\n".join([",".join(columns)] + [",".join(str(r[c]) for c in columns) for r in rows]) + "\n"
    )
    result = {"documents": len(data["score"]), "token_unit": data["token_unit"],
              "labelled": int((~np.isnan(data["label"])).sum()), "positive_threshold": positive_threshold,
              "rows": rows, "plots": [str(p) for p in plots]}
    (output / "sweep.json").write_text(json.dumps(result, indent=2))

    table = Table(title=f"Retention by threshold ({result['documents']:,} documents)")
    headers = ["int_score >=", "documents", "%", data["token_unit"], "%"]
    if "f1" in rows[0]:
        headers += [f"precision (label>={positive_threshold})", "recall", "F1"]
    for h in headers:
        table.add_column(h, justify="right")
    for r in rows:
        cells = [str(r["threshold"]), f"{r['documents']:,}", f"{r['documents_pct']:.1f}", f"{r['tokens']:,}",
                 f"{r['tokens_pct']:.1f}"]
        if "f1" in r:
            cells += [f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['f1']:.3f}"]
        table.add_row(*cells)
    Console(quiet=not show).print(table)
    return result
