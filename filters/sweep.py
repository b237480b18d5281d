"""`edu-filter sweep`: what each threshold would keep, before committing to one.

Reads scored documents (an `apply` output folder, or any JSONL/Parquet with `score`/`int_score`), prints and saves
the retention table (documents and tokens kept at each `int_score` threshold), a score histogram and a retention
curve; when the rows carry reference labels (an LLM annotation), also precision/recall/F1 of "int_score >= t"
against "label >= positive_threshold".

Both plots have the classifier's raw score on the x-axis. `int_score >= t` is `score >= c_t` for the model's cut
point c_t, so a threshold is drawn where its cut point lies: the model's own cut points when the apply output names
the model (its config.json or fasttext_config.json), else the boundaries the data shows.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from edu_filter.classifiers.calibration import ROUND_CUTS, to_int_scores
from edu_filter.documents import (
    MAX_SCORE,
    MIN_SCORE,
    SCORE_RANGE,
    SCORES,
    DocumentError,
    InputError,
    check_writable_output,
    expand_paths,
    in_score_range,
    iter_raw_rows,
)

LABEL_FIELDS = ("input_score", "label")  # where `apply` keeps an input's own score, and the generic name


def is_apply_output(path: str | Path) -> bool:
    return (Path(path) / "run_config.json").exists()


def sweep_inputs(paths: list[str]) -> list[str]:
    """An `apply` output folder stands for the documents its threshold was applied to: `kept/` and
    `removed/below_threshold/` (after dedup in the dedup-first order, before it in score-first)."""
    resolved = []
    for p in paths:
        if is_apply_output(p):
            resolved += [str(Path(p) / sub) for sub in ("kept", "removed/below_threshold") if (Path(p) / sub).is_dir()]
        else:
            resolved.append(str(p))
    return resolved


def load_scored(paths: list[str], label_field: str | None = None) -> dict[str, np.ndarray]:
    """score, int_score, tokens (token_count, else whitespace words) and label (NaN when absent) per document.

    A `label_field` named explicitly must be present in the data (else DocumentError naming the fields there are);
    labels must lie on the 0-5 scale."""
    scores, ints, tokens, labels = [], [], [], []
    token_unit = "tokens"
    fields_seen: set[str] = set()
    for path in expand_paths(sweep_inputs(paths)):
        for lineno, row in iter_raw_rows(path):
            meta = row.get("metadata") if isinstance(row.get("metadata"), dict) else {}
            row = {**meta, **row}
            if len(fields_seen) < 200:
                fields_seen.update(k for k in row if k != "metadata")
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
            label = row.get(field) if field else None
            if label is not None:
                try:
                    label = float(label)
                except (TypeError, ValueError):
                    label = math.nan
                if not in_score_range(label):  # NaN fails too
                    raise DocumentError(f"{path}:{lineno}: label field '{field}' is {row.get(field)!r}, not a "
                                        f"number on the {SCORE_RANGE} scale")
            labels.append(np.nan if label is None else label)
    if not scores:
        raise DocumentError(f"no scored documents in {', '.join(map(str, paths))}")
    if label_field is not None and label_field not in fields_seen:
        raise DocumentError(f"--label-field {label_field!r}: no such field in {', '.join(map(str, paths))} (fields: "
                            f"{', '.join(sorted(fields_seen))})")
    return {"score": np.asarray(scores, np.float32), "int_score": np.asarray(ints, np.int64),
            "tokens": np.asarray(tokens, np.int64), "label": np.asarray(labels, np.float64), "token_unit": token_unit}


def model_cut_points(paths: list[str]) -> tuple[list[float] | None, str | None]:
    """The cut points of the model an apply output folder was made with (from its stats.json or run_config.json):
    the `cut_points` of its config.json or fasttext_config.json, round-and-clip for a model saved without any.
    (None, None) when no input is an apply output, or its model cannot be found here."""
    for p in paths:
        model = None
        for name in ("stats.json", "run_config.json"):
            record = Path(p) / name
            if record.exists():
                try:
                    model = json.loads(record.read_text()).get("settings", {}).get("model")
                except (OSError, ValueError):
                    continue
                if model:
                    break
        if not model:
            continue
        for config_name in ("fasttext_config.json", "config.json"):
            config = _model_file(model, config_name)
            if config is not None:
                try:
                    cuts = json.loads(config.read_text()).get("cut_points")
                except (OSError, ValueError):
                    continue
                return (list(map(float, cuts)) if cuts else list(ROUND_CUTS)), str(model)
    return None, None


def _model_file(model: str, name: str) -> Path | None:
    """A file of a local model folder, or of a hub model already in the local hub cache (never downloaded)."""
    local = Path(model) / name
    if local.is_file():
        return local
    if Path(model).exists() or model.count("/") != 1:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, name)
    except Exception:  # noqa: BLE001 - not a valid repo id: no cut points to draw
        return None
    return Path(cached) if isinstance(cached, str) else None


def data_cut_points(data: dict) -> list[float]:
    """Cut points as the data shows them: for t = 1..5 the lowest score with int_score >= t (NaN when none)."""
    cuts = []
    for t in SCORES[1:]:
        above = data["score"][data["int_score"] >= t]
        cuts.append(float(above.min()) if above.size else math.nan)
    return cuts


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
            truth = to_int_scores(data["label"][labelled]) >= positive_threshold  # a label counts as its int score
            p, r, f, _ = precision_recall_fscore_support(truth, keep[labelled], average="binary", zero_division=0)
            row |= {"precision": float(p), "recall": float(r), "f1": float(f)}
        rows.append(row)
    return rows


def threshold_positions(rows: list[dict], cuts: list[float], low: float) -> list[float]:
    """Where each threshold row sits on the score axis: its cut point c_t (t = 0 keeps everything: `low`)."""
    return [low if r["threshold"] <= MIN_SCORE else cuts[r["threshold"] - 1] for r in rows]


def plot_sweep(data: dict, rows: list[dict], output: Path, positive_threshold: int = 3,
               cut_points: list[float] | None = None, cuts_from: str | None = None) -> list[Path]:
    """Score histogram with the cut points, and retention against the score cutoff with every threshold drawn at its
    cut point; `cut_points` are the model's (from `cuts_from`), else the boundaries the data shows."""
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend (e.g. a notebook's) alone

    cuts = list(cut_points) if cut_points is not None else data_cut_points(data)
    where = f"int_score cut points of {Path(cuts_from).name}" if cuts_from else "int_score boundaries in the data"
    paths = []
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    low = min(float(data["score"].min()), MIN_SCORE - 0.5)
    high = max(float(data["score"].max()), MAX_SCORE + 0.5)
    ax.hist(data["score"], bins=np.linspace(low, high, 61), color="#4878a8", edgecolor="white")
    for t, c in enumerate(cuts, start=1):
        if math.isfinite(c):
            ax.axvline(c, color="#c44e52", lw=0.8, ls=":", label=where if t == 1 else None)
            ax.annotate(str(t), (c, 1), xycoords=("data", "axes fraction"), xytext=(2, -10),
                        textcoords="offset points", fontsize=8, color="#c44e52")
    ax.set_xlabel("classifier score (int_score t from the dotted line t)")
    ax.set_ylabel("documents")
    ax.set_title(f"Score distribution ({len(data['score']):,} documents)")
    if any(math.isfinite(c) for c in cuts):
        ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    paths.append(output / "score_histogram.png")
    fig.savefig(paths[-1], dpi=120)

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    order = np.argsort(-data["score"], kind="stable")
    ranked = data["score"][order]
    ax.plot(ranked, 100 * np.arange(1, len(ranked) + 1) / len(ranked), label="documents with score >= x")
    ax.plot(ranked, 100 * np.cumsum(data["tokens"][order]) / max(1, data["tokens"].sum()),
            label=f"{data['token_unit']} with score >= x")
    xs = threshold_positions(rows, cuts, float(ranked[-1]))
    shown = [(x, r) for x, r in zip(xs, rows) if math.isfinite(x)]
    ax.plot([x for x, _ in shown], [r["documents_pct"] for _, r in shown], "o", color="black",
            label=f"int_score >= t, at cut point t ({where})")
    for x, r in shown:
        ax.annotate(f">={r['threshold']}", (x, r["documents_pct"]), xytext=(4, 4), textcoords="offset points",
                    fontsize=8)
    if "f1" in rows[0]:
        ax.plot([x for x, _ in shown], [100 * r["f1"] for _, r in shown], "s--", color="#c44e52",
                label=f"F1 of int_score >= t vs label >= {positive_threshold} (x100)")
    ax.set_xlabel("classifier score cutoff x")
    ax.set_ylabel("% kept")
    ax.set_ylim(0, 102)
    ax.set_title("Retention vs score cutoff")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(output / "retention_curve.png")
    fig.savefig(paths[-1], dpi=120)
    return paths


def run_sweep(paths: list[str], output: str | Path, thresholds: list[int] | None = None,
              label_field: str | None = None, positive_threshold: int = 3, show: bool = True) -> dict:
    """Writes `sweep.json`, `retention.csv`, `score_histogram.png` and `retention_curve.png` into `output`.

    Options and the output folder are checked, and the data read, before the folder is created."""
    from rich.console import Console
    from rich.table import Table

    thresholds = sorted(set(thresholds if thresholds is not None else SCORES))
    bad = [t for t in thresholds if not in_score_range(t)]
    if bad or not thresholds:
        raise InputError(f"thresholds must be int_scores in {SCORE_RANGE}, got {thresholds}")
    if not in_score_range(positive_threshold):
        raise InputError(f"--positive-threshold must be in {SCORE_RANGE}, got {positive_threshold}")
    output = Path(output)
    check_writable_output(output, "-o/--output")
    data = load_scored(paths, label_field)
    cut_points, cuts_from = model_cut_points(paths)
    rows = retention_table(data, thresholds, positive_threshold)
    output.mkdir(parents=True, exist_ok=True)
    plots = plot_sweep(data, rows, output, positive_threshold, cut_points, cuts_from)

    columns = list(rows[0])
    (output / "retention.csv").write_text(
        "\n".join([",".join(columns)] + [",".join(str(r[c]) for c in columns) for r in rows]) + "\n"
    )
    result = {"documents": len(data["score"]), "token_unit": data["token_unit"],
              "labelled": int((~np.isnan(data["label"])).sum()), "positive_threshold": positive_threshold,
              "cut_points": cut_points if cut_points is not None else data_cut_points(data),
              "cut_points_from": f"model {cuts_from}" if cuts_from else "data",
              "rows": rows, "plots": [str(p) for p in plots]}
    (output / "sweep.json").write_text(json.dumps(_json_safe(result), indent=2))

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


def _json_safe(value):
    """NaN (a cut point no document reaches) as null: sweep.json stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value
