"""`edu-filter train`: learn LLM-annotated 0-5 scores with a frozen-encoder head, a fine-tuned encoder or fastText.

Each method is a module of this package (`head`, `finetune`, `fasttext`) with one function of the same shape: a
model, its validation predictions, out-of-fold training predictions where it has them, and what it did. What follows
is shared: cut points fitted on held-out predictions (calibration), the model saved as a self-describing folder
`load_scorer` reads, `metrics.json` (the evaluate report on the validation split, with warnings when it is too small
to trust) and `confusion_matrix.png` beside it, `provenance.json` (settings and input fingerprints, see
`edu_filter.provenance`) and a `README.md` model card; optionally uploaded to the hub.

Calibration uses the validation predictions plus, for head and fasttext, out-of-fold predictions on the training
split: about ten times more examples to place the rare high-score cut points (3+ is ~7% of web documents).

Rows with inclusion weights (`score --select active`) are fitted, calibrated and evaluated with them, so the model
behaves on random documents as if trained on the pool the sample was chosen from. A learning curve (the model
refitted on 10/25/50/100% of the labels in repeated cross-validation) says whether more labels still help.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
from rich.console import Console

from edu_filter import provenance
from edu_filter.classifiers.calibration import apply_cut_points, fit_cut_points, to_int_scores
from edu_filter.classifiers.encoders import KINDS, SequenceFramer, encoder_hub_id, encoder_identity
from edu_filter.classifiers.fasttext_model import CONFIG_FILE as FASTTEXT_CONFIG
from edu_filter.classifiers.fasttext_model import MODEL_FILE as FASTTEXT_MODEL
from edu_filter.classifiers.fasttext_model import FastTextSettings
from edu_filter.classifiers.frozen_encoder import check_train_dtype
from edu_filter.classifiers.learning_curve import learning_curve, plot_learning_curve, print_learning_curve
from edu_filter.classifiers.metrics import (
    MAIN_THRESHOLD,
    compute_metrics,
    metric_warnings,
    plot_confusion_matrix,
    print_metrics,
    print_warnings,
)
from edu_filter.documents import (
    InputError,
    RunError,
    check_named_path,
    check_not_empty,
    check_writable_output,
    read_labelled,
    repeat_key,
    TRAINED_TEXTS,
    WEIGHT_FIELD,
    row_weights,
    synced,
    text_keys,
    weight_summary,
    write_json_whole,
    writing_alone,
)

METHODS = ("head", "finetune", "fasttext")
# chunk-max scores each chunk and takes the max, which a head fitted on one vector per document does not learn; it
# stays a scoring-time option (EduScorer.predict(long_docs=...)), outside the calibration train fits.
TRAIN_LONG_DOCS = ("truncate", "chunk-mean")
ENCODER_METHODS = ("head", "finetune")
# options only some methods read: given to another method (set to anything but the default) they are refused
OPTION_METHODS = {
    **{name: ENCODER_METHODS for name in ("encoder", "max_length", "pooling", "pool_layers", "long_docs",
                                          "max_chunks", "batch_size", "cache_dir", "curve_repeats", "dtype")},
    **{name: ("finetune",) for name in ("epochs", "learning_rate", "head_learning_rate", "train_batch_size",
                                        "warmup_fraction")},
    "fasttext": ("fasttext",),
}
# a folder holding any of these holds a model `train` wrote (or began to write): --overwrite may replace it
MODEL_MARKERS = ("config.json", "model.safetensors", "tokenizer_config.json", FASTTEXT_CONFIG, FASTTEXT_MODEL,
                 "metrics.json", "provenance.json")
console = Console(stderr=True)


@dataclass
class ClassifierTrainConfig:
    kind: str = "web"
    method: str = "head"
    encoder: str | None = None  # path or hub name; None: the kind's default (offline: MiniLM)
    label_field: str = "score"
    max_length: int = 512
    seed: int = 0
    val_fraction: float = 0.1  # split off (stratified) when no validation data is given
    pooling: str = "mean"
    pool_layers: list[int] | None = None  # hidden states pooled and concatenated; None: default_pool_layers()
    long_docs: str = "truncate"  # or chunk-mean: measured no better on web, and 2-4x the cost
    max_chunks: int = 8
    batch_size: int | None = None  # encoding batch; None: 32 documents on a CPU, a token budget on a GPU
    dtype: str | None = None  # what the encoder computes in (autocast); None: bfloat16 on a GPU, float32 on a CPU
    cache_dir: str | None = None  # embedding cache; None: ~/.cache/edu-filter
    folds: int = 5  # cross-validation folds (ridge alpha, out-of-fold calibration predictions)
    min_positives: int = 5  # fewer positives at a threshold: keep the round-and-clip cut
    # inclusion weights (written by `score --select active`) used in the fit, the cut points and the metrics, when
    # the rows have them; None ignores them
    weight_field: str | None = "weight"
    learning_curve: bool = True  # validation metrics at 10/25/50/100% of the labels (repeated CV)
    curve_repeats: int = 2  # repeats of the K-fold split behind each point of the curve
    # finetune
    epochs: int = 2
    learning_rate: float = 3e-5
    head_learning_rate: float = 1e-3
    train_batch_size: int = 16
    warmup_fraction: float = 0.1
    # fasttext
    fasttext: FastTextSettings = field(default_factory=FastTextSettings)

    def frozen_encoder_options(self) -> dict:
        """The settings `classifiers.frozen_encoder.load_frozen_encoder` takes, as this config has them."""
        return {"kind": self.kind, "encoder": self.encoder, "max_length": self.max_length, "pooling": self.pooling,
                "pool_layers": self.pool_layers, "long_docs": self.long_docs, "max_chunks": self.max_chunks,
                "batch_size": self.batch_size, "cache_dir": self.cache_dir, "seed": self.seed, "method": self.method,
                "dtype": self.dtype}


@dataclass
class TrainedModel:
    """What a method's training function returns; the rest of `train` is the same for every method."""

    model: object  # EduClassifierForSequenceClassification or FastTextRegressor: config.cut_points, save_pretrained
    val_pred: np.ndarray  # raw scores of the validation documents
    oof_pred: np.ndarray | None  # out-of-fold raw scores of the training documents, for calibration; None: none
    info: dict  # what the method did, recorded in metrics.json under "training"
    frozen: object = None  # head and finetune: the FrozenEncoder (its tokenizer is saved, its vectors feed the curve)
    # head: the frozen vectors of the training then the validation texts, one array the learning curve reuses (read
    # again from the cache they took minutes at 450k labels, and an unusable cache embedded everything twice)
    embeddings: np.ndarray | None = None
    checkpoint: Path | None = None  # finetune: its checkpoint folder, removed once the model is saved


def check_options(cfg: ClassifierTrainConfig, has_val: bool) -> None:
    """A ValueError naming the first option this run would ignore: one only another method reads, `val_fraction`
    beside validation data, `curve_repeats` without a learning curve. Only values other than the default can be
    told from an option left alone, so only those are refused."""
    defaults = ClassifierTrainConfig()
    for f in fields(ClassifierTrainConfig):
        methods = OPTION_METHODS.get(f.name)
        if methods and cfg.method not in methods and getattr(cfg, f.name) != getattr(defaults, f.name):
            raise ValueError(f"{f.name} does not apply to method {cfg.method} (only to {', '.join(methods)})")
    if has_val and cfg.val_fraction != defaults.val_fraction:
        raise ValueError("val_fraction does not apply when validation data is given")
    if not cfg.learning_curve and cfg.curve_repeats != defaults.curve_repeats:
        raise ValueError("curve_repeats does not apply without a learning curve")
    # values no run can use (0 epochs saved the starting model as trained; a negative learning rate trained away
    # from the labels), named as the options are
    for name, ok, what in (("epochs", cfg.epochs >= 1, ">= 1"), ("learning_rate", cfg.learning_rate > 0, "> 0"),
                           ("head_learning_rate", cfg.head_learning_rate > 0, "> 0"),
                           ("train_batch_size", cfg.train_batch_size >= 1, ">= 1"),
                           ("warmup_fraction", 0 <= cfg.warmup_fraction < 1, "in [0, 1)"),
                           ("seed", 0 <= cfg.seed < 2**32, "in [0, 2**32)"), ("folds", cfg.folds >= 2, ">= 2"),
                           ("val_fraction", 0 < cfg.val_fraction < 1, "in (0, 1)")):
        if not ok:
            raise InputError(f"--{name.replace('_', '-')} must be {what}, got {getattr(cfg, name)}")


# what a model folder holds (edu-filter's, a transformers one, fastText's): `--overwrite` removes these alone
MODEL_FILE = re.compile(r"[^/]+\.(json|safetensors|bin|png|model)|README\.md|modeling_\w+\.py|(vocab|merges)\.txt|"
                        + re.escape(TRAINED_TEXTS))


SAVING = ".saving"  # inside the output folder: the new model, written whole before the old one goes


def save_whole(output: Path, write: Callable[[Path], None]) -> None:
    """`write(folder)` of the new model into OUTPUT/.saving, synced, then the old model's files removed and the new
    ones moved in: a full disk mid-save left a folder of config.json alone (apply ran the whole dedup before its
    first scoring task failed) and, with --overwrite, no old model either. Inside the folder, not beside it: the
    output may be the working directory or a mount point, which cannot be renamed."""
    partial, created = output / SAVING, not output.exists()
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        write(partial)
        synced(partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        if created:
            shutil.rmtree(output, ignore_errors=True)
        raise
    for entry in output.iterdir():  # only a model's files: `check_output`
        if entry != partial:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    for entry in partial.iterdir():
        entry.rename(output / entry.name)
    partial.rmdir()
    synced(output, files=False)


RECORD_FILES = ("metrics.json", provenance.PROVENANCE_FILE, provenance.CARD_FILE)  # `write_record`'s, the card last


def _curve_cut_short(output: Path) -> bool:
    """Whether `output`'s model was saved by a run asked for a learning curve that it never wrote (stopped during
    the curve: hours at 450k labels, after the model and its metrics)."""
    try:
        metrics = json.loads((output / "metrics.json").read_text())
    except (OSError, ValueError):
        return False
    asked = metrics.get("training", {}).get("config", {}).get("learning_curve")
    return bool(asked) and "learning_curve" not in metrics


def check_output(output: Path, overwrite: bool, inputs: Iterable[str | os.PathLike] = ()) -> None:
    """An absent or empty folder is fine; one holding a model only with `overwrite`, and one holding anything else
    never (overwrite replaces a model folder, it does not empty any folder it is pointed at: the labels kept beside
    the model they trained, notes, a subfolder went with it). No input may lie inside it."""
    if output.exists() and not output.is_dir():
        raise ValueError(f"{output} is a file, not a model folder")
    entries = [p for p in output.iterdir() if p.name != SAVING] if output.exists() else []  # a save cut short's
    if not entries:
        return
    inside = [str(i) for i in inputs if output.resolve() in Path(i).resolve().parents]
    if inside:
        raise ValueError(f"{inside[0]} lies inside the output folder {output}, which training replaces; give "
                         "another folder")
    if not any((output / name).exists() for name in MODEL_MARKERS):
        names = ", ".join(sorted(p.name for p in entries)[:3])
        raise ValueError(f"{output} is not empty and holds no model ({names}); give an empty or new folder")
    if not overwrite:
        unrecorded = [name for name in RECORD_FILES if not (output / name).is_file()]
        if unrecorded:  # killed, or a full disk, between the model's save and its record: it read as finished
            raise ValueError(f"{output} holds a model whose run stopped before writing its record "
                             f"({', '.join(unrecorded)} missing: no metrics, lineage or card); --overwrite trains it "
                             "again, or give another folder")
        if _curve_cut_short(output):
            raise ValueError(f"{output} holds a finished model whose learning curve was cut short (the run stopped "
                             "after saving the model: it is usable as it is); --overwrite trains it again, curve "
                             "included, or give another folder")
        raise ValueError(f"{output} already holds a model; give --overwrite to replace it, or another folder")
    other = sorted(p.name + "/" * p.is_dir() for p in entries if p.is_dir() or not MODEL_FILE.fullmatch(p.name))
    if other:
        raise ValueError(f"{output} holds a model and {', '.join(other[:3])}{' ...' * (len(other) > 3)}, which are "
                         "not a model's: --overwrite replaces a model, it does not empty a folder; move them, or give "
                         "another folder")


def check_cache_outside(cfg: ClassifierTrainConfig, output: Path) -> None:
    """The embedding cache and a fine-tune's checkpoints may not lie inside the output folder: saving the model
    empties it (hours of embeddings gone), and a run killed before then left a folder holding only the cache, which
    the same command then refused as not a model's."""
    if cfg.method == "fasttext":
        return
    from edu_filter.classifiers.embeddings import DEFAULT_CACHE_DIR

    cache, out = Path(cfg.cache_dir or DEFAULT_CACHE_DIR).resolve(), output.resolve()
    if cache == out or out in cache.parents:
        raise InputError(f"the cache folder {cfg.cache_dir or DEFAULT_CACHE_DIR} (--cache-dir, or EDU_FILTER_CACHE) "
                         f"lies inside the output folder {output}, which saving the model empties: give a cache "
                         "folder outside it")


def merge_repeated_texts(rows: list[dict], weights: np.ndarray | None,
                         what: str) -> tuple[list[dict], np.ndarray | None]:
    """One row per distinct text, its label the (weighted) mean of the rows that repeat it, its inclusion weight their
    mean: a text counts once, weighted or not (a re-annotation pass appended labels the same document again). A
    text on both sides of a split made validation and cross-validation score documents the model was fitted on
    (Spearman 0.39 -> 0.81 with the bundled labels doubled)."""
    by_text: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_text.setdefault(repeat_key(r["text"]), []).append(i)
    groups = list(by_text.values())  # in the order the texts first come
    if len(groups) == len(rows):
        return rows, weights
    w = np.ones(len(rows)) if weights is None else weights
    merged = []
    for members in groups:
        row = dict(rows[members[0]])
        if len(members) > 1:
            row["label"] = float(np.average([rows[i]["label"] for i in members], weights=w[members]))
        merged.append(row)
    console.print(f"[yellow]{what}: {len(rows) - len(groups)} documents repeat the text of another; each text is "
                  "trained and validated once, with the mean of its labels[/]")
    return merged, None if weights is None else np.array([w[m].mean() for m in groups])


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train/validation indices with every integer score represented in proportion (rare scores merged down)."""
    from sklearn.model_selection import train_test_split

    strata = to_int_scores(labels)
    # a score held by one row joins the nearest score below that has rows (above, for the lowest), until every
    # stratum has two: a gap in the scale (no 4s, one 5) or a single lowest row must not turn stratification off
    while len(set(strata.tolist())) > 1:
        values, counts = np.unique(strata, return_counts=True)
        if counts.min() >= 2:
            break
        k = int(np.argmin(counts))
        strata[strata == values[k]] = values[k - 1] if k > 0 else values[1]
    classes = set(strata.tolist())
    n_val = max(1, int(np.ceil(val_fraction * len(labels))))
    # every class needs two rows, and each side room for one of each; otherwise a plain random split
    enough = all((strata == v).sum() >= 2 for v in classes) and min(n_val, len(labels) - n_val) >= len(classes)
    stratify = strata if enough else None
    return train_test_split(np.arange(len(labels)), test_size=n_val, random_state=seed, stratify=stratify)


def train_classifier(
    data: list[str],
    output: str | Path,
    kind: str = "web",
    method: str = "head",
    encoder: str | None = None,
    val: list[str] | None = None,
    label_field: str = "score",
    max_length: int = 512,
    seed: int = 0,
    limit: int | None = None,
    push_to_hub: str | None = None,
    overwrite: bool = False,
    skip_failed: bool = False,
    **options,
) -> dict:
    """Train, calibrate and save a classifier to `output`; returns the validation metrics (also in metrics.json).

    `options` are further `ClassifierTrainConfig` fields (e.g. epochs=1, cache_dir=...). `limit` caps the number of
    training (and validation) documents read, for quick runs. `output` must be absent or empty, or hold a model and
    `overwrite` be set: then every file of that model is removed before the new one is written. `push_to_hub` (a
    repository id) uploads the folder at the end. Options, the output folder and whether the upload can work are
    checked before any data is read. `skip_failed` leaves out rows `score` could not annotate (see `read_labelled`).
    """
    cfg = ClassifierTrainConfig(
        kind=kind, method=method, encoder=encoder, label_field=label_field, max_length=max_length, seed=seed, **options
    )
    if cfg.method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {cfg.method!r}")
    if cfg.kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {cfg.kind!r}")
    if cfg.long_docs not in TRAIN_LONG_DOCS:
        raise ValueError(f"train long_docs must be one of {TRAIN_LONG_DOCS}, got {cfg.long_docs!r} "
                         "(chunk-max is a scoring-time option)")
    if cfg.method == "finetune" and cfg.long_docs == "chunk-mean":
        # the encoder would learn the first max_length tokens of each document and then score the mean of its chunks
        raise InputError("--long-docs chunk-mean with --method finetune: fine-tuning trains the encoder on each "
                         "document's first --max-length tokens, and the saved model would score the mean of every "
                         "chunk with it; give --long-docs truncate, or --method head for chunk-mean")
    check_train_dtype(cfg.dtype)
    check_options(cfg, has_val=bool(val))
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be >= 1, got {limit}")
    if cfg.encoder:
        check_named_path(cfg.encoder, "--encoder")
    output = Path(output)
    check_writable_output(output, "-o/--output")
    # held to the end: a second run into the same folder (a job resubmitted while the first runs) replaced the
    # first's model while the first, in its learning curve, then wrote its metrics and card beside the other's
    with writing_alone(output):
        check_output(output, overwrite, [*data, *(val or [])])
        check_cache_outside(cfg, output)
        check_not_empty(data, "DATA")
        if val:
            check_not_empty(val, "--val")
        if push_to_hub:
            provenance.check_can_push(push_to_hub)
        splits = read_splits(cfg, data, val, limit, skip_failed)
        train_rows, w_train, val_rows, w_val = splits.train_rows, splits.w_train, splits.val_rows, splits.w_val
        inputs = provenance.describe_inputs({"train": data, "validation": val})  # the content just read
        if len(train_rows) < 2 * cfg.folds or not val_rows:
            raise ValueError(f"need at least {2 * cfg.folds} training and 1 validation documents, got "
                             f"{len(train_rows)} and {len(val_rows)}")
        train_texts, y_train = [r["text"] for r in train_rows], np.array([r["label"] for r in train_rows])
        val_texts, y_val = [r["text"] for r in val_rows], np.array([r["label"] for r in val_rows])
        weighted = " (weighted by the sample's inclusion weights)" if w_train is not None else ""
        console.print(f"training {cfg.method} ({cfg.kind}) on {len(train_rows)} documents, validating on "
                      f"{len(val_rows)}{weighted}")

        trained = train_method(cfg, train_texts, y_train, val_texts, w_train, y_val, w_val)
        val_pred, oof_pred, info = trained.val_pred, trained.oof_pred, trained.info
        for what, predictions in (("validation", val_pred), ("out-of-fold training", oof_pred)):
            if predictions is not None and not np.isfinite(predictions).all():  # NaN cut points: apply removes all
                raise RunError(f"the trained model gives {np.count_nonzero(~np.isfinite(predictions)):,} of "
                               f"{len(predictions):,} {what} documents a score that is not a number: training diverged "
                               "(a lower --learning-rate, or --dtype float32); nothing was saved")
        calib_scores = val_pred if oof_pred is None else np.concatenate([val_pred, oof_pred])
        calib_labels = y_val if oof_pred is None else np.concatenate([y_val, y_train])
        calib_weights = _calibration_weights(w_val, w_train, len(y_val), len(y_train), oof_pred is not None)
        cut_points = fit_cut_points(calib_scores, calib_labels, min_positives=cfg.min_positives, weights=calib_weights)
        trained.model.config.cut_points = cut_points
        trained_on = np.unique(text_keys(train_texts))  # `evaluate` warns of data the model was fitted on
        save_whole(output, lambda folder: (save_model(trained, folder), np.save(folder / TRAINED_TEXTS, trained_on)))

        held_out = _held_out_int_scores(val_pred, y_val, w_val, oof_pred, y_train, w_train, cfg)
        metrics = compute_metrics(y_val, val_pred, held_out, weights=w_val)
        metrics["warnings"] = metric_warnings(metrics, y_val, cfg.kind)
        if "encoder" in info:  # a hub name with the commit its weights came from, as the embedding cache keys it
            encoder = info["encoder"] if Path(info["encoder"]).is_dir() else encoder_identity(info["encoder"])
            inputs.append(provenance.describe_input("encoder", encoder))
        config = {k: v for k, v in asdict(cfg).items() if k != "fasttext" or cfg.method == "fasttext"}
        metrics["training"] = {
            **info,
            "base_model": encoder_hub_id(info["encoder"]) if "encoder" in info else None,
            "config": config,
            "data": [{k: e.get(k) for k in ("role", "path", "fingerprint")} for e in inputs],
            "labels": label_source(splits.labelled, label_field),
            "n_train": len(train_rows),
            "n_val": len(val_rows),
            "weights": None if w_train is None else weight_summary(w_train, cfg.weight_field),
            "failed_annotations_left_out": splits.left_out,  # --skip-failed: rows the LLM never labelled, by reason
            # with n_train, n_val and the failed left out, every row read: n_train + n_val + these + failed
            "repeated_texts_merged": splits.merged, "train_rows_in_val": splits.in_val,
            "cut_points": cut_points,
            "calibration_examples": int(len(calib_scores)),
            # the metrics' own integer scores come from cut points fitted without the validation labels
            "metric_cut_points": "out-of-fold training predictions" if oof_pred is not None else "the other half of "
                                 "the validation rows",
        }

        def write_record() -> None:
            """metrics.json, the confusion matrix, provenance and the model card: written before the learning curve
            (hours at 450k labels) and again with it, so a run killed during the curve leaves a finished model."""
            write_json_whole(output / "metrics.json", metrics)
            plot_confusion_matrix(metrics, output / "confusion_matrix.png",
                                  title=f"{cfg.kind} {cfg.method}: validation")
            record = provenance.record_provenance(output, kind="classifier", settings={**config, "limit": limit},
                                                  inputs=inputs)
            provenance.write_model_card(output, metrics, json.loads(record.read_text()), repo_id=push_to_hub)

        write_record()
        if trained.checkpoint is not None:  # the model and its record are saved: nothing left to resume
            from edu_filter.train.finetune import remove_checkpoint

            remove_checkpoint(trained.checkpoint)
        curve = None
        if cfg.learning_curve:
            # every label paid for: the training rows, plus the validation rows split off them (not a separate --val)
            curve_rows = train_rows if val else train_rows + val_rows
            curve_w = w_train if val or w_train is None else np.concatenate([w_train, w_val])
            curve = _learning_curve(cfg, curve_rows, curve_w, trained)
            metrics["learning_curve"] = curve
            plot_learning_curve(curve, output / "learning_curve.png",
                                title=f"{cfg.kind} {curve['model']}: learning curve")
            write_record()
        print_metrics(metrics, title=f"{output} — validation ({len(val_rows)} documents)")
        if curve is not None:
            print_learning_curve(curve, title=f"learning curve ({curve['model']}, {curve['repeats']} x {curve['folds']}"
                                 f"-fold CV over {curve['total_labels']:,} labels)")
        print_warnings(metrics["warnings"])
        if push_to_hub:
            console.print(f"uploaded to {provenance.push_to_hub(output, push_to_hub, repo_type='model')}")
        return metrics


@dataclass
class LabelledSplits:
    """The rows a run trains and validates on, with their inclusion weights (None: unweighted) and what reading
    them left out or merged (recorded in metrics.json so that every row read is accounted for)."""

    train_rows: list[dict]
    w_train: np.ndarray | None
    val_rows: list[dict]
    w_val: np.ndarray | None
    labelled: list[dict]  # every label read, for who labelled them
    left_out: dict[str, int]  # rows the LLM never labelled (--skip-failed), by reason
    merged: int  # rows that are another's text
    in_val: int  # training rows also in --val, left out of training


def read_splits(cfg: ClassifierTrainConfig, data: list[str], val: list[str] | None, limit: int | None,
                skip_failed: bool) -> LabelledSplits:
    """The training and validation rows of DATA (and --val): repeated texts merged, training rows that are also in
    --val left out, or without --val a stratified split of DATA."""
    annotation = ("model", "annotator", "prompt")  # what label_source reads
    rows, left_out = read_labelled(data, cfg.label_field, limit, skip_failed, "DATA", console, cfg.weight_field,
                                   annotation)
    labelled = list(rows)  # every label read, for who labelled them
    required = cfg.weight_field != WEIGHT_FIELD
    rows, weights = merge_repeated_texts(rows, row_weights(rows, cfg.weight_field, required), "DATA")
    merged, in_val = len(labelled) - len(rows), 0  # rows that are another's text, training rows also in --val
    if val:
        val_rows, val_left_out = read_labelled(val, cfg.label_field, limit, skip_failed, "--val", console,
                                               cfg.weight_field, annotation)
        left_out = {k: left_out.get(k, 0) + val_left_out.get(k, 0) for k in {*left_out, *val_left_out}}
        labelled += val_rows
        read_val = len(val_rows)
        val_rows, w_val = merge_repeated_texts(val_rows, row_weights(val_rows, cfg.weight_field), "--val")
        merged += read_val - len(val_rows)
        held = {repeat_key(r["text"]) for r in val_rows}
        kept = [i for i, r in enumerate(rows) if repeat_key(r["text"]) not in held]
        in_val = len(rows) - len(kept)
        if len(kept) < len(rows):
            console.print(f"[yellow]{len(rows) - len(kept)} training documents are also in --val: left out of "
                          "training, so the validation metrics are of documents the model did not see[/]")
        train_rows, w_train = [rows[i] for i in kept], None if weights is None else weights[kept]
    else:
        labels = np.array([r["label"] for r in rows])
        train_idx, val_idx = stratified_split(labels, cfg.val_fraction, cfg.seed)
        train_rows, val_rows = [rows[i] for i in train_idx], [rows[i] for i in val_idx]
        w_train, w_val = (None, None) if weights is None else (weights[train_idx], weights[val_idx])
    return LabelledSplits(train_rows, w_train, val_rows, w_val, labelled, left_out, merged, in_val)


def train_method(cfg: ClassifierTrainConfig, texts: list[str], y: np.ndarray, val_texts: list[str],
                 weights=None, y_val: np.ndarray | None = None, w_val=None) -> TrainedModel:
    """The model of `cfg.method` trained on (texts, y), with its predictions on `val_texts` (fine-tuning also
    measures them against `y_val` as it goes)."""
    if cfg.method == "fasttext":
        from edu_filter.train.fasttext import train_fasttext as train
    elif cfg.method == "finetune":
        from edu_filter.train.finetune import train_finetune

        return train_finetune(cfg, texts, y, val_texts, weights, y_val, w_val)
    else:
        from edu_filter.train.head import train_head as train
    return train(cfg, texts, y, val_texts, weights)


def save_model(trained: TrainedModel, output: Path) -> None:
    """The model, and for an encoder model its tokenizer, set to truncate where the model was trained to read (for
    users of the plain transformers recipe)."""
    trained.model.save_pretrained(output)
    if trained.frozen is not None:
        tokenizer = trained.frozen.tokenizer
        tokenizer.model_max_length = trained.frozen.max_length
        frame_like_the_scorer(tokenizer)
        tokenizer.save_pretrained(output)


def frame_like_the_scorer(tokenizer) -> None:
    """A tokenizer that adds no special tokens itself (starencoder's), where the scorer frames every sequence with
    [CLS] ... [SEP] by hand, gets a post-processor that adds them: `AutoTokenizer` + `AutoModelForSequenceClassification`
    then read what the model was trained and calibrated on (unframed, scores moved by up to 0.16)."""
    from tokenizers import processors

    framer = SequenceFramer(tokenizer)
    if tokenizer("a")["input_ids"] == framer(tokenizer("a", add_special_tokens=False)["input_ids"]):
        return
    if not getattr(tokenizer, "is_fast", False) or len(framer.prefix) != 1 or len(framer.suffix) != 1:
        raise ValueError(f"{type(tokenizer).__name__} frames sequences in a way edu-filter cannot save")
    cls, sep = (tokenizer.convert_ids_to_tokens(i) for i in (framer.prefix[0], framer.suffix[0]))
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B {sep}",
        special_tokens=[(cls, framer.prefix[0]), (sep, framer.suffix[0])])
    if tokenizer("a")["input_ids"] != framer(tokenizer("a", add_special_tokens=False)["input_ids"]):
        raise ValueError(f"{type(tokenizer).__name__} does not take the [CLS] ... [SEP] framing")


def _held_out_int_scores(val_pred, y_val, w_val, oof_pred, y_train, w_train, cfg) -> np.ndarray:
    """The validation rows' integer scores for the metrics, from cut points their own labels took no part in: fitted
    on the out-of-fold training predictions, or (fine-tuning has none) on the other half of the validation rows.
    Cut points fitted on the rows they then score report an F1 no new document gets (on noise, 0.19 for 0.11)."""
    if oof_pred is not None:
        return apply_cut_points(val_pred, fit_cut_points(oof_pred, y_train, min_positives=cfg.min_positives,
                                                         weights=w_train))
    order = np.random.default_rng(cfg.seed).permutation(len(val_pred))
    halves = order[: len(order) // 2], order[len(order) // 2 :]
    ints = np.zeros(len(val_pred), dtype=np.int64)
    for scored, fitted in (halves, halves[::-1]):
        if len(scored):
            cuts = fit_cut_points(val_pred[fitted], y_val[fitted], min_positives=cfg.min_positives,
                                  weights=None if w_val is None else w_val[fitted]) if len(fitted) else None
            ints[scored] = apply_cut_points(val_pred[scored], cuts)
    return ints


def _calibration_weights(w_val, w_train, n_val: int, n_train: int, with_train: bool):
    """Weights beside the calibration predictions (validation, then out-of-fold training), None when unweighted."""
    if w_val is None and w_train is None:
        return None
    val_part = w_val if w_val is not None else np.full(n_val, float(np.mean(w_train)))
    if not with_train:
        return val_part
    train_part = w_train if w_train is not None else np.full(n_train, float(np.mean(w_val)))
    return np.concatenate([val_part, train_part])


def _learning_curve(cfg: ClassifierTrainConfig, rows: list[dict], w, trained: TrainedModel) -> dict:
    """The learning curve of fastText, or of the frozen-encoder head (for finetune: the linear probe its training
    starts from, as a fine-tune per point would cost hours)."""
    y = np.array([r["label"] for r in rows])
    texts = [r["text"] for r in rows]
    main = MAIN_THRESHOLD[cfg.kind]
    if cfg.method == "fasttext":
        from edu_filter.train.fasttext import curve_fit_predict, fits_at_once

        console.print("learning curve: refitting fastText on 10/25/50/100% of the labels in each CV fold")
        # fastText trains slowly on CPUs: one repeat, its fits side by side
        curve = learning_curve(y, curve_fit_predict(cfg, texts, y, w), w, cfg.folds, 1, cfg.seed,
                               min_rows=2 * cfg.folds, main_threshold=main, show_progress=True,
                               at_once=fits_at_once(texts, cfg.fasttext, cfg.folds * 4))
        return {"model": "fasttext", **curve}

    from edu_filter.classifiers.frozen_encoder import load_frozen_encoder
    from edu_filter.train.head import curve_fit_predict

    frozen = trained.frozen
    if cfg.method == "finetune":  # the trained encoder's vectors are not the frozen ones its cache key names
        frozen = load_frozen_encoder(**cfg.frozen_encoder_options())
    # the curve's rows are the training rows, then validation's where it was split off them: views, not copies
    vectors = None if trained.embeddings is None else trained.embeddings[:len(rows)]
    fit_predict = curve_fit_predict(cfg, frozen, texts, y, w, vectors)
    console.print("learning curve: refitting the head on 10/25/50/100% of the labels in each CV fold (about 15x "
                  "the rows of the fit above; --no-learning-curve skips it)")
    curve = learning_curve(y, fit_predict, w, cfg.folds, cfg.curve_repeats, cfg.seed, min_rows=2 * cfg.folds,
                           main_threshold=main, show_progress=True)
    return {"model": "head" if cfg.method == "head" else "head (linear probe)", **curve}


def take(w, index):
    """`w[index]`, or None for no weights."""
    return None if w is None else w[index]


def label_source(rows: list[dict], label_field: str) -> dict:
    """Who labelled the rows and with which prompt, as far as the rows say (`edu-filter score` writes `model` and
    `prompt`; the bundled data names its `annotator`): counts per annotator and per prompt version."""
    annotators = Counter(str(r.get("model") or r.get("annotator")) for r in rows
                         if r.get("model") or r.get("annotator"))
    prompts = Counter(str(r["prompt"]) for r in rows if r.get("prompt"))
    return {"field": label_field, "annotators": dict(annotators.most_common()),
            "prompt_versions": dict(prompts.most_common())}
