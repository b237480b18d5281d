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
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from edu_filter.classifiers.calibration import ROUND_CUTS, to_int_scores
from edu_filter.documents import (
    FOLDER_SUFFIXES,
    MAX_SCORE,
    MIN_SCORE,
    PARQUET_SUFFIXES,
    SCORE_RANGE,
    SCORES,
    DocumentError,
    InputError,
    WEIGHT_FIELD,
    check_writable_output,
    expand_paths,
    _has_suffix,
    progress_bar,
    in_score_range,
    is_hub_path,
    label_value,
    iter_parquet_batches,
    iter_raw_rows,
    local_files_under,
    parquet_rows,
    PARQUET_BATCH_ROWS,
    unclipped,
)
from edu_filter.filters.scoring import HISTOGRAM_BIN, HISTOGRAM_HIGH, HISTOGRAM_LOW, bin_low_edge, score_bins

LABEL_FIELDS = ("input_score", "label")  # where `apply` keeps an input's own score, and the generic name
NO_LABELS = "none"  # --label-field none: sweep without labels (an input's `label` is a topic or class id)
SUMMARY_FOLDER = "logs/summaries"  # in an apply output: what sweep reads instead of its documents
N_BINS = round((HISTOGRAM_HIGH - HISTOGRAM_LOW) / HISTOGRAM_BIN)


def label_fields(label_field: str | None) -> tuple[str, ...]:
    """The fields labels are read from: LABEL_FIELDS by default, the one named, or none."""
    if label_field is None:
        return LABEL_FIELDS
    return () if label_field.lower() == NO_LABELS else (label_field,)


def is_apply_output(path: str | Path) -> bool:
    return (Path(path) / "run_config.json").exists()


def read_run_config(path: str | Path) -> dict:
    """An apply output's run_config.json; empty where no readable record is there."""
    try:
        record = json.loads((Path(path) / "run_config.json").read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def recorded_settings(record: dict) -> dict:
    """The settings a run_config.json record (`read_run_config`) holds; none where it holds none."""
    settings = record.get("settings")
    return settings if isinstance(settings, dict) else {}


def run_settings(path: str | Path) -> dict:
    """The settings an apply output's run_config.json records; none where no readable record is there."""
    return recorded_settings(read_run_config(path))


def recorded_model_kind(record: dict) -> str | None:
    """The kind (web, code) of the model an apply output was scored with, as its run_config.json record says; from
    the model folder for a run recorded before it said (None where the folder is gone: moved, a cluster's scratch
    cleared)."""
    from edu_filter.filters.apply import model_kind

    if "model_kind" in record:
        return record["model_kind"]
    model = recorded_settings(record).get("model")
    return model_kind(model) if isinstance(model, str) else None


def kind_positive_threshold(paths: list[str]) -> int:
    """The label that counts as educational by default: 4 where every input is an apply output made for code
    (`--preset python-edu`, or a `train --kind code` model: Python-Edu's threshold), else 3 (FineWeb-Edu's). A
    Python-Edu output was scored against label >= 3 unless told, its t=4 row not evaluate's F1 at 4."""
    from edu_filter.filters.apply import PRESETS

    records = [read_run_config(p) for p in paths]  # read once each: it lists every input file of the run
    code = [recorded_settings(r).get("preset") == "python-edu" or recorded_model_kind(r) == "code" for r in records]
    return PRESETS["python-edu"]["threshold"] if code and all(code) else 3


def sweep_inputs(paths: list[str]) -> list[str]:
    """An `apply` output folder stands for the documents its threshold was applied to: `kept/`,
    `removed/below_threshold/` and `failed/schema_mismatch/` (kept rows Parquet could not hold), and in the
    score-first order `removed/duplicate/` too (the threshold came first, so the duplicates of kept documents were
    scored and passed it; in dedup-first they were never scored).

    A run that has not finished (no stats.json yet) is refused: its folders hold part of the documents, and rows of
    a killed attempt that its resume replaces. Its folders named one by one are read as they are."""
    resolved = []
    for p in paths:
        if is_apply_output(p):
            if not (Path(p) / "stats.json").exists():
                raise InputError(f"{p}: this apply run has not finished (no stats.json yet; `edu-filter status {p}` "
                                 "shows its stages), so its folders hold part of its documents and maybe rows of a "
                                 "killed attempt: sweep it when it has finished (run the same apply command again "
                                 f"to finish it), or name {Path(p) / 'kept'} and the removed/ folders to read them "
                                 "as they are")
            settings = run_settings(p)
            subs = ["kept", "removed/below_threshold", "failed/schema_mismatch"]
            if settings.get("order") == "score-first" and (settings.get("dedup") or settings.get("exact_dedup")):
                subs.append("removed/duplicate")
            # a destination with no files (nothing kept at threshold 5, or a kill's leftovers cleared) holds none
            resolved += [str(Path(p) / sub) for sub in subs if (Path(p) / sub).is_dir()
                         and any(_has_suffix(name, FOLDER_SUFFIXES) for name in local_files_under(Path(p) / sub))]
        else:
            resolved.append(str(p))
    return resolved


def sweep_files(paths: list[str]) -> list[str]:
    """The files the inputs stand for, each once however often they are named (an output folder and its kept/)."""
    files, seen = [], set()
    for f in expand_paths(sweep_inputs(paths)):
        key = f if is_hub_path(f) else os.path.realpath(f)
        if key not in seen:
            seen.add(key)
            files.append(f)
    return files


SCORE_FIELDS = ("score", "int_score", "token_count", "metadata")  # read from every file; the text only without counts
CHUNK_ROWS = 65_536  # rows summarised at a time
FIELD_SAMPLE_ROWS = 1000  # rows of each file whose fields are listed when --label-field names none of them


@dataclass
class ScoredSummary:
    """All that `sweep` reports about any number of scored documents, in memory that does not grow with them:
    documents and tokens per int_score, the lowest score of each int_score, a fixed-bin score histogram (the
    1e-4 bins of `--keep-top`) and, for labelled rows, the (int_score, label) matrix. Shares, histogram and matrix
    are weighted by inclusion weights when the rows carry them (a `score --select active` sample), so they estimate
    the pool the sample was drawn from."""

    documents: int = 0
    token_unit: str = "tokens"
    weight_field: str | None = None  # set when the rows carried weights
    docs: np.ndarray = field(default_factory=lambda: np.zeros(len(SCORES), np.int64))
    tokens: np.ndarray = field(default_factory=lambda: np.zeros(len(SCORES), np.int64))
    weighted_docs: np.ndarray = field(default_factory=lambda: np.zeros(len(SCORES)))
    weighted_tokens: np.ndarray = field(default_factory=lambda: np.zeros(len(SCORES)))
    lowest: np.ndarray = field(default_factory=lambda: np.full(len(SCORES), np.inf))
    hist_docs: np.ndarray = field(default_factory=lambda: np.zeros(N_BINS))
    hist_tokens: np.ndarray = field(default_factory=lambda: np.zeros(N_BINS))
    score_min: float = math.inf
    score_max: float = -math.inf
    labelled: int = 0
    confusion: np.ndarray = field(default_factory=lambda: np.zeros((len(SCORES), len(SCORES))))
    summaries_of: list[str] = field(default_factory=list)  # apply outputs read from their summaries

    def add(self, score: np.ndarray, ints: np.ndarray, tokens: np.ndarray, label: np.ndarray, weight: np.ndarray):
        ints = np.clip(ints, MIN_SCORE, MAX_SCORE)
        n = len(SCORES)
        self.documents += len(score)
        self.docs += np.bincount(ints, minlength=n)
        self.tokens += np.bincount(ints, weights=tokens, minlength=n).astype(np.int64)
        self.weighted_docs += np.bincount(ints, weights=weight, minlength=n)
        self.weighted_tokens += np.bincount(ints, weights=weight * tokens, minlength=n)
        np.minimum.at(self.lowest, ints, score)
        bins = score_bins(score)
        self.hist_docs += np.bincount(bins, weights=weight, minlength=N_BINS)
        self.hist_tokens += np.bincount(bins, weights=weight * tokens, minlength=N_BINS)
        self.score_min, self.score_max = min(self.score_min, float(score.min())), max(self.score_max, float(score.max()))
        has = ~np.isnan(label)
        self.labelled += int(has.sum())
        if has.any():
            np.add.at(self.confusion, (ints[has], to_int_scores(label[has])), weight[has])

    ARRAYS = ("docs", "tokens", "weighted_docs", "weighted_tokens", "hist_docs", "hist_tokens", "confusion")

    def merge(self, other: "ScoredSummary") -> None:
        for name in self.ARRAYS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.documents += other.documents
        self.labelled += other.labelled
        self.lowest = np.minimum(self.lowest, other.lowest)
        self.score_min, self.score_max = min(self.score_min, other.score_min), max(self.score_max, other.score_max)


SUMMARY_BINS_MERGED = 10  # apply's summaries keep the histogram in 1e-3 bins (plots only): 10x smaller files


class ScoreSummaryWriter(PipelineStep):
    """Right after the scorer: what `sweep` would read back from the output folders about the documents the
    threshold sees, summed per task into `FOLDER/<rank>.npz` (tens of KB). `sweep` of a finished apply output adds
    these up instead of reading every kept and removed document (on a crawl, terabytes of removed JSONL). A row
    `sweep` would refuse (a bad weight, a label off the scale) marks the summary unusable: sweep then reads the
    documents and names the row. A label off the scale (a topic id) is counted apart: `sweep --label-field none`,
    which reads no labels, still adds the summaries up (it read every document, the one way out of that refusal)."""

    name = "📊 sweep summary"
    type = "📊 - STATS"

    def __init__(self, folder: str, weight_field: str = "weight"):
        super().__init__()
        self.folder = folder
        self.weight_field = weight_field

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        from datatrove.io import get_datafolder

        summary, chunk, refused, label_refused = ScoredSummary(), [], 0, 0
        counted, weighted = {True: None, False: None}, {True: None, False: None}  # rows with / without them seen
        for doc in data or []:
            if not refused:
                row = doc.metadata
                if isinstance(row.get("metadata"), dict):  # an input's own nesting, merged as sweep reads it back
                    row = {**row["metadata"], **row}
                try:
                    chunk.append(_summary_values(row, "", 0, None, self.weight_field, counted, weighted))
                except (DocumentError, InputError):
                    try:  # read without its label, as --label-field none reads it
                        chunk.append(_summary_values(row, "", 0, NO_LABELS, self.weight_field, counted, weighted))
                        label_refused = 1
                    except (DocumentError, InputError):
                        refused = 1
                if len(chunk) == CHUNK_ROWS:
                    summary.add(*_columns(chunk))
                    chunk = []
            yield doc
        if chunk:
            summary.add(*_columns(chunk))
        coarse = {name: getattr(summary, name).reshape(-1, SUMMARY_BINS_MERGED).sum(1)
                  for name in ("hist_docs", "hist_tokens")}
        with get_datafolder(self.folder).open(f"{rank:05d}.npz", "wb") as fh:
            np.savez_compressed(fh, **{name: getattr(summary, name) for name in ScoredSummary.ARRAYS}
                                | coarse,
                                lowest=summary.lowest, range=np.array([summary.score_min, summary.score_max]),
                                # then whether rows with / without token counts, with / without weights were seen
                                counts=np.array([summary.documents, summary.labelled, refused,
                                                 *(seen[has] is not None for seen in (counted, weighted)
                                                   for has in (True, False)), label_refused]))


def summary_from_apply(path: str | Path, labels: bool = True) -> tuple[ScoredSummary, bool] | None:
    """(summary, weighted) of a finished apply output from the summaries its scoring tasks wrote, or None where
    they cannot stand for its documents: a run made before they were written, a task's missing or unreadable,
    rows sweep would refuse (it then reads the documents and names the row), or documents that do not add up to
    what stats.json says the folders hold. Without `labels` (--label-field none), labels off the scale do not
    matter and none are counted."""
    import zipfile

    settings = run_settings(path)
    tasks = settings.get("tasks")
    folder = Path(path) / SUMMARY_FOLDER
    if not tasks or not all((folder / f"{rank:05d}.npz").is_file() for rank in range(tasks)):
        return None
    total, rows = ScoredSummary(), np.zeros(6, np.int64)
    for rank in range(tasks):
        one = ScoredSummary()
        try:
            with np.load(folder / f"{rank:05d}.npz") as saved:
                for name in ScoredSummary.ARRAYS:
                    setattr(one, name, saved[name].astype(getattr(one, name).dtype))
                for name in ("hist_docs", "hist_tokens"):  # the mass of each 1e-3 bin in its first 1e-4 bin
                    fine = np.zeros(N_BINS)
                    fine[::SUMMARY_BINS_MERGED] = saved[name]
                    setattr(one, name, fine)
                one.lowest = saved["lowest"]
                one.score_min, one.score_max = (float(v) for v in saved["range"])
                one.documents, one.labelled, *counts = (int(v) for v in saved["counts"])
        except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile):
            return None
        rows += counts if len(counts) == 6 else [*counts, counts[0]]  # older ones: any refusal, maybe a label's
        total.merge(one)
    refused, _, uncounted, weighted, unweighted, label_refused = rows
    if (refused or (labels and label_refused) or uncounted or (weighted and unweighted)
            or total.documents != _threshold_saw(path, settings)):
        return None
    if not labels:
        total.confusion[:] = 0
        total.labelled = 0
    return total, bool(weighted)


def _threshold_saw(path: str | Path, settings: dict) -> int | None:
    """The documents stats.json counts in the folders `sweep_inputs` reads."""
    try:
        stats = json.loads((Path(path) / "stats.json").read_text())
        where = [stats["kept"], stats["removed"].get("below_threshold"), stats["failed"].get("schema_mismatch")]
        if settings.get("order") == "score-first" and (settings.get("dedup") or settings.get("exact_dedup")):
            where.append(stats["removed"].get("duplicate"))
        return sum(n["documents"] for n in where if n)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_scored(paths: list[str], label_field: str | None = None, weight_field: str | None = "weight",
                show: bool = False) -> ScoredSummary:
    """The summary of scored documents (apply output folders, scored JSONL/Parquet), read a chunk at a time; from
    Parquet only the columns it needs (not the text, where token counts are there). Tokens are `token_count`, or
    whitespace words when no row has one (a mix of the two units is refused).

    A `label_field` named explicitly must be present in the data (else DocumentError naming the fields there are);
    labels must lie on the 0-5 scale. Weights (`weight_field`, when any row has it) must be on every row."""
    wanted = [*SCORE_FIELDS, *label_fields(label_field), *([weight_field] if weight_field else [])]
    summary = ScoredSummary()
    chunk: list[tuple] = []
    fields_seen: set[str] = set()
    counted = {True: None, False: None}  # a row with / without token_count: where first seen
    weighted = {True: None, False: None}
    summarised = {}  # finished apply outputs whose tasks' summaries stand for their documents, by real path
    # the summaries hold the default label fields and weights (histograms weighted): --label-field none and, for
    # an unweighted output, --weight-field none read the same from them
    no_labels = label_field is not None and label_field.lower() == NO_LABELS
    if (label_field is None or no_labels) and weight_field in ("weight", None):
        for p in paths:
            real = Path(p).resolve()
            inside = [q for q in paths if real in Path(q).resolve().parents]
            if real not in summarised and is_apply_output(p) and (Path(p) / "stats.json").exists() and not inside:
                found = summary_from_apply(p, labels=not no_labels)
                if found is not None and not (weight_field is None and found[1]):
                    summarised[real] = found
    files = sweep_files([p for p in paths if Path(p).resolve() not in summarised])
    summary.summaries_of = [str(p) for p in summarised]
    for p, (part, part_weighted) in summarised.items():
        summary.merge(part)
        if part.documents:
            counted[True] = counted[True] or str(p)
            weighted[part_weighted] = weighted[part_weighted] or str(p)

    def choose(parquet) -> list[str]:
        names = parquet.schema_arrow.names
        fields_seen.update(names[:200])
        counted_everywhere = "token_count" in names and not _may_hold_nulls(parquet, "token_count")
        return ([c for c in wanted if c in names and (c != "metadata" or _nests_any(parquet, c, wanted))]
                + (["text"] if "text" in names and not counted_everywhere else []))

    def batch_rows(chosen: list[str]) -> int:
        """Numbers only: many rows at a time; with the texts (their words counted): a few MB, not 65k documents."""
        return PARQUET_BATCH_ROWS if "text" in chosen else CHUNK_ROWS

    def add_rows(path: str, numbered_rows) -> None:
        nonlocal chunk
        for lineno, row in numbered_rows:
            if isinstance(row.get("metadata"), dict):  # datatrove's nesting
                row = {**row["metadata"], **row}
            if lineno <= FIELD_SAMPLE_ROWS and len(fields_seen) < 200:
                fields_seen.update(k for k in row if k != "metadata")
            elif label_field is not None and label_field in row:  # labels on a few late rows only
                fields_seen.add(label_field)
            chunk.append(_summary_values(row, path, lineno, label_field, weight_field, counted, weighted))
            if len(chunk) == CHUNK_ROWS:
                summary.add(*_columns(chunk))
                chunk = []

    def add_batches(path: str) -> None:
        for first, batch in iter_parquet_batches(path, columns=choose, batch_size=batch_rows):
            values = _batch_values(batch, label_field, weight_field)
            if values is None:  # a value to look at: row by row, which names the row
                add_rows(path, enumerate(parquet_rows(batch), start=first))
                continue
            *arrays, has_count, has_weight = values  # every value checked at once: summed without Python rows
            counted[has_count] = counted[has_count] or f"{path}:{first}"
            weighted[has_weight] = weighted[has_weight] or f"{path}:{first}"
            summary.add(*arrays)

    with progress_bar(show and bool(files)) as progress:  # none: all from apply's summaries
        task = progress.add_task("reading scores", total=len(files))
        for path in files:
            if _has_suffix(path, PARQUET_SUFFIXES) and not is_hub_path(path):
                add_batches(path)
            else:
                add_rows(path, iter_raw_rows(path))
            progress.advance(task)
    if chunk:
        summary.add(*_columns(chunk))
    if not summary.documents:
        raise DocumentError(f"no scored documents in {', '.join(map(str, paths))}")
    if label_fields(label_field) == (label_field,) and label_field not in fields_seen:
        raise DocumentError(f"--label-field {label_field!r}: no such field in {', '.join(map(str, paths))} (fields: "
                            f"{', '.join(sorted(fields_seen))})")
    if counted[True] and counted[False]:
        raise DocumentError(f"some rows have a token_count ({counted[True]}) and some do not ({counted[False]}): "
                            "their tokens and words cannot be added up; sweep files of one kind at a time")
    if weighted[True] and weighted[False]:
        raise InputError(f"some rows have inclusion weights in '{weight_field}' ({weighted[True]}) and some do not "
                         f"({weighted[False]}): weights must be on every row or none (--weight-field none ignores "
                         "them)")
    if weight_field not in (None, WEIGHT_FIELD) and not weighted[True]:  # a typo swept unweighted
        raise InputError(f"--weight-field {weight_field!r}: no such field in {', '.join(map(str, paths))}")
    summary.token_unit = "words" if counted[False] else "tokens"
    summary.weight_field = weight_field if weighted[True] else None
    return summary


def _batch_values(batch, label_field: str | None, weight_field: str | None) -> tuple | None:
    """(score, int_score, tokens, label (NaN: none), weight, has token counts, has weights) of a Parquet record
    batch, or None when a value needs a look row by row (a null score or count, a label off the scale, a text
    type): `_summary_values` then reads those rows and names the one at fault."""
    import pyarrow as pa
    import pyarrow.compute as pc

    names = batch.schema.names
    if "metadata" in names and batch.column("metadata").null_count < batch.num_rows:
        return None  # datatrove's nesting: the row path merges it

    def numbers(name: str, nulls: bool = False):
        if name not in names:
            return None
        column = batch.column(name)
        if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)) or (
                column.null_count and not nulls):
            return None
        return column.cast(pa.float64())

    score, ints = numbers("score"), numbers("int_score")
    counts = numbers("token_count")
    if score is None or ints is None or counts is None or any(
            not pc.all(pc.is_finite(c)).as_py() for c in (score, ints, counts)) or (
            len(ints) and not MIN_SCORE <= pc.min(ints).as_py() <= pc.max(ints).as_py() <= MAX_SCORE):
        return None  # no token counts (words are counted from the text), or a value the row path names
    label = pa.nulls(batch.num_rows, pa.float64())
    for name in label_fields(label_field):
        if name in names and not pa.types.is_null(batch.column(name).type):
            column = numbers(name, nulls=True)
            if column is None or pc.any(pc.is_nan(column)).as_py():
                return None
            label = pc.coalesce(label, column)
    label = label.fill_null(math.nan).to_numpy(zero_copy_only=False)
    given = label[~np.isnan(label)]
    if ((given < MIN_SCORE) | (given > MAX_SCORE)).any():
        return None
    weight = None
    if weight_field in names and batch.column(weight_field).null_count < batch.num_rows:  # all null: no weights
        weight = numbers(weight_field)
        if weight is None:  # some rows without a weight, or weights that are not numbers
            return None
        weight = weight.to_numpy(zero_copy_only=False)
        if not (np.isfinite(weight).all() and (weight > 0).all()):
            return None
    return (score.to_numpy(zero_copy_only=False), ints.to_numpy(zero_copy_only=False).astype(np.int64),
            np.trunc(counts.to_numpy(zero_copy_only=False)), label,  # whole tokens, as int() in the row path
            np.ones(batch.num_rows) if weight is None else weight, True, weight is not None)


def _nests_any(parquet, column: str, wanted: list[str]) -> bool:
    """Whether a struct (or map) column may hold any of the `wanted` fields: datatrove's `metadata` column of kept
    documents holds the input's own fields, read row by row to merge them (55x slower) only when one counts here."""
    import pyarrow as pa

    kind = parquet.schema_arrow.field(column).type
    if pa.types.is_map(kind):
        return True
    return pa.types.is_struct(kind) and any(kind.field(i).name in wanted for i in range(kind.num_fields))


def _may_hold_nulls(parquet, column: str) -> bool:
    """Whether the footer does not rule out a null in `column` (no statistics: it may)."""
    for g in range(parquet.metadata.num_row_groups):
        group = parquet.metadata.row_group(g)
        chunk = next((group.column(j) for j in range(group.num_columns) if group.column(j).path_in_schema == column),
                     None)
        stats = chunk.statistics if chunk is not None else None
        if stats is None or not stats.has_null_count or stats.null_count:
            return True
    return False


def _summary_values(row: dict, path: str, lineno: int, label_field: str | None, weight_field: str | None,
                    counted: dict, weighted: dict) -> tuple:
    """(score, int_score, tokens, label or NaN, weight) of one row, checked."""
    where = f"{path}:{lineno}"
    if row.get("score") is None or row.get("int_score") is None:
        has = [f for f in ("score", "int_score") if row.get(f) is not None]
        raise DocumentError(f"{where}: needs both score and int_score (apply's output; this row has "
                            f"{' and '.join(has) or 'neither'}); run `edu-filter apply` first")
    try:
        score = float(row["score"])
    except (TypeError, ValueError):
        score = math.nan
    if not math.isfinite(score):
        raise DocumentError(f"{where}: score {row['score']!r} is not a finite number")
    has_count = row.get("token_count") is not None
    counted[has_count] = counted[has_count] or where
    try:
        ints = int(row["int_score"])
        tokens = int(row["token_count"]) if has_count else len(str(row.get("text", "")).split())
    except (TypeError, ValueError, OverflowError):
        raise DocumentError(f"{where}: int_score {row['int_score']!r} and token_count {row.get('token_count')!r} "
                            "must be whole numbers") from None
    if not MIN_SCORE <= ints <= MAX_SCORE:  # counted as a 5 (or a 0) before
        raise DocumentError(f"{where}: int_score {ints} is outside {SCORE_RANGE}")
    field_name = next((f for f in label_fields(label_field) if row.get(f) is not None), None)
    label = row.get(field_name) if field_name else None
    if label is not None:
        label = label_value(label)
        if not in_score_range(label):  # NaN fails too
            found = "" if label_field else (f" (taken as the label by default: name the field holding 0-5 labels "
                                            f"with --label-field, or give --label-field {NO_LABELS})")
            raise DocumentError(f"{where}: label field '{field_name}' is {row.get(field_name)!r}, not a number on "
                                f"the {SCORE_RANGE} scale{found}")
    weight = row.get(weight_field) if weight_field else None
    weighted[weight is not None] = weighted[weight is not None] or where
    if weight is not None:
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            weight = math.nan
        if not (math.isfinite(weight) and weight > 0):
            raise InputError(f"{where}: '{weight_field}' is {row.get(weight_field)!r}: inclusion weights must be "
                             "positive numbers")
    return score, ints, tokens, math.nan if label is None else label, weight or 1.0


def _columns(chunk: list[tuple]) -> tuple[np.ndarray, ...]:
    score, ints, tokens, label, weight = zip(*chunk)
    return (np.asarray(score, np.float64), np.asarray(ints, np.int64), np.asarray(tokens, np.float64),
            np.asarray(label, np.float64), np.asarray(weight, np.float64))


def model_cut_points(paths: list[str]) -> tuple[list[float] | None, str | None]:
    """The cut points of the model an apply output folder was made with (from its stats.json or run_config.json):
    the `cut_points` of its config.json or fasttext_config.json, round-and-clip for a model saved without any.
    (None, None) when no input is an apply output, or its model cannot be found here, or its files are no longer
    those the run scored with (retrained in place: its cut points would be another model's)."""
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
        if not model or not _same_model_files(p, model):
            continue
        for config_name in ("fasttext_config.json", "config.json"):
            config = _model_file(model, config_name)
            if config is not None:
                try:
                    cuts = json.loads(config.read_text()).get("cut_points")
                except (OSError, ValueError):
                    continue
                if cuts:
                    return list(map(float, cuts)), str(model)
                # apply scored it with FineWeb-Edu's round(): a half goes to the even integer (2.5 is a 2, 3.5 a 4),
                # which the cut points 0.5 ... 4.5 alone would misstate
                return list(ROUND_CUTS), f"{model} (saved without cut points: its score rounded, a half to even)"
    return None, None


def _same_model_files(run: str | Path, model: str) -> bool:
    """Whether a local model folder still fingerprints as the run recorded it (a hub model is pinned to a commit)."""
    try:
        recorded = json.loads((Path(run) / "run_config.json").read_text()).get("model_fingerprint")
    except (OSError, ValueError):
        return True  # an output folder copied without its record: nothing to compare with
    if recorded is None or not Path(model).exists():
        return True
    from edu_filter.provenance import ProvenanceError, describe_inputs

    try:
        entry = describe_inputs({"classifier": model})[0]
    except ProvenanceError:
        return False
    return (entry["fingerprint"] or entry["path"]) == recorded


def _model_file(model: str, name: str) -> Path | None:
    """A file of a local model folder, or of a hub model already in the local hub cache (never downloaded)."""
    local = Path(model) / name
    if local.is_file():
        return local
    from edu_filter.classifiers.scorer import split_revision

    repo, revision = split_revision(model)  # apply records a hub model pinned: ORG/NAME@COMMIT
    if Path(model).exists() or repo.count("/") != 1:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(repo, name, revision=revision)
    except Exception:  # noqa: BLE001 - not a valid repo id: no cut points to draw
        return None
    return Path(cached) if isinstance(cached, str) else None


def data_cut_points(summary: ScoredSummary) -> list[float]:
    """Cut points as the data shows them: for t = 1..5 the lowest score with int_score >= t (NaN when none)."""
    return [float(v) if math.isfinite(v) else math.nan for v in np.minimum.accumulate(summary.lowest[::-1])[::-1][1:]]


def retention_table(summary: ScoredSummary, thresholds: list[int], positive_threshold: int = 3) -> list[dict]:
    """Documents and tokens kept at each int_score threshold (shares weighted when the rows carry weights) and, with
    labels, precision, recall and F1 of "int_score >= t" against "label >= positive_threshold" (None where
    undefined: no document kept, or no labelled positive; a 0 would read as a model missing every positive)."""
    total_docs, total_tokens = summary.weighted_docs.sum(), max(summary.weighted_tokens.sum(), 1e-12)
    rows = []
    for t in thresholds:
        row = {
            "threshold": t,
            "documents": int(summary.docs[t:].sum()),
            "documents_pct": 100 * float(summary.weighted_docs[t:].sum() / total_docs),
            "tokens": int(summary.tokens[t:].sum()),
            "tokens_pct": 100 * float(summary.weighted_tokens[t:].sum() / total_tokens),
        }
        if summary.labelled:
            kept, positive = summary.confusion[t:, :], summary.confusion[:, positive_threshold:]
            tp = float(summary.confusion[t:, positive_threshold:].sum())
            precision = tp / kept.sum() if kept.sum() > 0 else None
            recall = tp / positive.sum() if positive.sum() > 0 else None
            # 2TP / (kept + positives): 0 when positives exist and none is kept; undefined without positives, as
            # in `compute_metrics`
            f1 = 2 * tp / (kept.sum() + positive.sum()) if positive.sum() > 0 else None
            row |= {"precision": precision, "recall": recall, "f1": f1}
        rows.append(row)
    return rows


def threshold_positions(rows: list[dict], cuts: list[float], low: float) -> list[float]:
    """Where each threshold row sits on the score axis: its cut point c_t (t = 0 keeps everything: `low`)."""
    return [low if r["threshold"] <= MIN_SCORE else cuts[r["threshold"] - 1] for r in rows]


def plot_sweep(summary: ScoredSummary, rows: list[dict], output: Path, positive_threshold: int = 3,
               cut_points: list[float] | None = None, cuts_from: str | None = None) -> list[Path]:
    """`score_histogram.png` and `retention_curve.png` (`sweep_figures`) in `output`, each with its whole legend."""
    paths = []
    for name, fig in sweep_figures(summary, rows, positive_threshold, cut_points, cuts_from):
        paths.append(output / name)
        fig.savefig(paths[-1], dpi=120, bbox_inches="tight")  # the legend below the axes included
    return paths


def sweep_figures(summary: ScoredSummary, rows: list[dict], positive_threshold: int = 3,
                  cut_points: list[float] | None = None, cuts_from: str | None = None) -> list[tuple[str, object]]:
    """Score histogram with the cut points, and retention against the score cutoff with every threshold drawn at its
    cut point; `cut_points` are the model's (from `cuts_from`), else the boundaries the data shows. The legends sit
    below the axes: inside, a model's name (and "saved without cut points: ...") hid the thresholds' numbers and ran
    past the figure's edge."""
    import textwrap

    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend (e.g. a notebook's) alone

    cuts = list(cut_points) if cut_points is not None else data_cut_points(summary)
    where = f"int_score cut points of {Path(cuts_from).name}" if cuts_from else "int_score boundaries in the data"
    weighted = f", weighted by '{summary.weight_field}'" if summary.weight_field else ""
    filled = np.flatnonzero(summary.hist_docs)  # the 1e-4 bins holding documents, low to high
    edges = np.array([max(bin_low_edge(b), summary.score_min) for b in filled])

    def legend_below(ax) -> None:
        for handle in ax.get_legend_handles_labels()[0]:
            handle.set_label(textwrap.fill(handle.get_label(), 90))
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)

    figures = []
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    low = min(summary.score_min, MIN_SCORE - 0.5)
    high = max(summary.score_max, MAX_SCORE + 0.5)
    ax.hist(edges, bins=np.linspace(low, high, 61), weights=summary.hist_docs[filled], color="#4878a8",
            edgecolor="white")
    for t, c in enumerate(cuts, start=1):
        if math.isfinite(c):
            ax.axvline(c, color="#c44e52", lw=0.8, ls=":", label=where if t == 1 else None)
            ax.annotate(str(t), (c, 1), xycoords=("data", "axes fraction"), xytext=(2, -10),
                        textcoords="offset points", fontsize=8, color="#c44e52")
    ax.set_xlabel("classifier score (int_score t from the dotted line t)")
    ax.set_ylabel("documents")
    ax.set_title(f"Score distribution ({summary.documents:,} documents{weighted})")
    if any(math.isfinite(c) for c in cuts):
        legend_below(ax)
    figures.append(("score_histogram.png", fig))

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    down = filled[::-1]  # high to low: the share with score >= each bin's low edge
    ax.plot(edges[::-1], 100 * np.cumsum(summary.hist_docs[down]) / summary.hist_docs.sum(),
            label="documents with score >= x")
    ax.plot(edges[::-1], 100 * np.cumsum(summary.hist_tokens[down]) / max(summary.hist_tokens.sum(), 1e-12),
            label=f"{summary.token_unit} with score >= x")
    xs = threshold_positions(rows, cuts, summary.score_min)
    shown = [(x, r) for x, r in zip(xs, rows) if math.isfinite(x)]
    ax.plot([x for x, _ in shown], [r["documents_pct"] for _, r in shown], "o", color="black",
            label=f"int_score >= t, at cut point t ({where})")
    for x, r in shown:
        ax.annotate(f">={r['threshold']}", (x, r["documents_pct"]), xytext=(4, 4), textcoords="offset points",
                    fontsize=8)
    if "f1" in rows[0]:
        f1 = [(x, r["f1"]) for x, r in shown if r["f1"] is not None]
        ax.plot([x for x, _ in f1], [100 * v for _, v in f1], "s--", color="#c44e52",
                label=f"F1 of int_score >= t vs label >= {positive_threshold} (x100)")
    ax.set_xlabel("classifier score cutoff x")
    ax.set_ylabel("% kept")
    ax.set_ylim(0, 102)
    ax.set_title(f"Retention vs score cutoff{weighted}")
    legend_below(ax)
    ax.grid(alpha=0.3)
    figures.append(("retention_curve.png", fig))
    return figures


def run_sweep(paths: list[str], output: str | Path, thresholds: list[int] | None = None,
              label_field: str | None = None, positive_threshold: int | None = None,
              weight_field: str | None = "weight", show: bool = True) -> dict:
    """Writes `sweep.json`, `retention.csv`, `score_histogram.png` and `retention_curve.png` into `output`.

    Options and the output folder are checked, and the data read, before the folder is created.
    `positive_threshold` None: the kind's (`kind_positive_threshold`)."""
    from rich.console import Console
    from rich.table import Table

    thresholds = sorted(set(thresholds if thresholds is not None else SCORES))
    bad = [t for t in thresholds if not in_score_range(t)]
    if bad or not thresholds:
        raise InputError(f"thresholds must be int_scores in {SCORE_RANGE}, got {thresholds}")
    if positive_threshold is None:
        positive_threshold = kind_positive_threshold(paths)
    if not in_score_range(positive_threshold):
        raise InputError(f"--positive-threshold must be in {SCORE_RANGE}, got {positive_threshold}")
    if label_field in SCORE_FIELDS[:2]:  # the classifier's own: precision and recall of it against itself
        raise InputError(f"--label-field {label_field}: the classifier's own score in what sweep reads; labels are "
                         "another field (an input's own score is kept as input_score by apply, the default)")
    output = Path(output)
    check_writable_output(output, "-o/--output", folder=True)
    summary = load_scored(paths, label_field, weight_field, show=show)
    cut_points, cuts_from = model_cut_points(paths)
    rows = retention_table(summary, thresholds, positive_threshold)
    output.mkdir(parents=True, exist_ok=True)
    plots = plot_sweep(summary, rows, output, positive_threshold, cut_points, cuts_from)

    columns = list(rows[0])
    (output / "retention.csv").write_text(
        "\n".join([",".join(columns)] + [",".join("" if r[c] is None else str(r[c]) for c in columns)
                                         for r in rows]) + "\n"
    )
    result = {"documents": summary.documents, "token_unit": summary.token_unit, "labelled": summary.labelled,
              "weight_field": summary.weight_field, "positive_threshold": positive_threshold,
              "cut_points": cut_points if cut_points is not None else data_cut_points(summary),
              "cut_points_from": f"model {cuts_from}" if cuts_from else "data",
              # numbers from the per-task summaries apply wrote (the histogram plot in 1e-3 bins), not the documents
              "read_from_summaries": summary.summaries_of,
              "rows": rows, "plots": [str(p) for p in plots]}
    (output / "sweep.json").write_text(json.dumps(_json_safe(result), indent=2))

    weighted = f"; shares and P/R/F1 weighted by '{summary.weight_field}'" if summary.weight_field else ""
    table = Table(title=f"Retention by threshold ({result['documents']:,} documents{weighted})")
    headers = ["int_score >=", "documents", "%", summary.token_unit, "%"]
    if "f1" in rows[0]:
        headers += [f"precision (label>={positive_threshold})", "recall", "F1"]
    for h in headers:
        table.add_column(h, justify="right")
    for r in rows:
        cells = [str(r["threshold"]), f"{r['documents']:,}", f"{r['documents_pct']:.1f}", f"{r['tokens']:,}",
                 f"{r['tokens_pct']:.1f}"]
        if "f1" in r:
            cells += ["n/a" if r[k] is None else f"{r[k]:.3f}" for k in ("precision", "recall", "f1")]
        table.add_row(*cells)
    Console(quiet=not show).print(unclipped(table))
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
