"""`edu-filter train`: learn LLM-annotated 0-5 scores with a frozen-encoder head, a fine-tuned encoder or fastText.

All three end the same way: cut points fitted on held-out predictions (calibration), the model saved as a
self-describing folder `EduScorer.from_pretrained` reads, `metrics.json` (the evaluate report on the validation
split) and `confusion_matrix.png` beside it, `provenance.json` (settings and input fingerprints, see
`edu_filter.provenance`) and a `README.md` model card; optionally uploaded to the hub.

- head (the FineWeb-Edu recipe): mean-pooled embeddings of a frozen encoder (six evenly spaced layers up to the top,
  concatenated), cached on disk, and a ridge regression whose regularisation is chosen by cross-validation on the
  training split. The ridge (with its feature scaling
  folded in) becomes the model's linear head.
- finetune: the same model, head initialised from that ridge (linear probe, then fine-tune), all weights trained
  with MSE.
- fasttext: fastText over labels 0-5, read as the expected label.

Calibration uses the validation predictions plus, for head and fasttext, out-of-fold predictions on the training
split: about ten times more examples to place the rare high-score cut points (3+ is ~7% of web documents).

Rows with inclusion weights (`score --select active`) are fitted, calibrated and evaluated with them, so the model
behaves on random documents as if trained on the pool the sample was chosen from. A learning curve (the model
refitted on 10/25/50/100% of the labels in repeated cross-validation) says whether more labels still help.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console

from edu_filter.classifiers.calibration import apply_cut_points, fit_cut_points
from edu_filter.classifiers.encoders import KINDS, encoder_hub_id, encoder_identity, resolve_encoder
from edu_filter.classifiers.fasttext_model import FastTextSettings
from edu_filter.classifiers.head import fit_ridge_head, unit_weights
from edu_filter.classifiers.learning_curve import (
    MAIN_THRESHOLD,
    learning_curve,
    plot_learning_curve,
    print_learning_curve,
)
from edu_filter.classifiers.metrics import compute_metrics, plot_confusion_matrix, print_metrics
from edu_filter.documents import read_documents
from edu_filter import provenance

METHODS = ("head", "finetune", "fasttext")
# chunk-max scores each chunk and takes the max, which a head fitted on one vector per document does not learn; it
# stays a scoring-time option (EduScorer.predict(long_docs=...)), outside the calibration train fits.
TRAIN_LONG_DOCS = ("truncate", "chunk-mean")
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
    batch_size: int = 32  # encoding batch
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


def default_pool_layers(num_hidden_layers: int) -> list[int]:
    """Six evenly spaced layers up to the top: every layer of MiniLM (1-6), every other one of BERT-base (2, 4, .. 12).

    Pooling costs nothing at inference (every layer runs anyway). Frozen MiniLM + ridge, repeated 5-fold CV with
    cut points fitted inside each fold: web (2000 Llama-3 rows) Spearman 0.673 / F1@3 0.486 vs 0.670 / 0.474 for
    layers 2, 4, 6 and 0.604 / 0.463 for the top layer alone; code (561 files) Spearman 0.844 / F1@4 0.574 vs
    0.835 / 0.569 and 0.784 / 0.511. Dropping the top layer (2, 4) would save a third of the compute but cost web F1@3.
    """
    n = num_hidden_layers
    return sorted({max(1, round(k * n / 6)) for k in range(1, 7)})


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train/validation indices with every integer score represented in proportion (rare scores merged down)."""
    from sklearn.model_selection import train_test_split

    strata = np.clip(np.rint(labels), 0, 5).astype(int)
    for value in sorted(set(strata.tolist()), reverse=True):
        if (strata == value).sum() < 2 and value > strata.min():
            strata[strata == value] = value - 1
    classes = set(strata.tolist())
    n_val = max(1, int(np.ceil(val_fraction * len(labels))))
    # every class needs two rows, and the validation split room for one of each; otherwise a plain random split
    enough = all((strata == v).sum() >= 2 for v in classes) and n_val >= len(classes)
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
    **options,
) -> dict:
    """Train, calibrate and save a classifier to `output`; returns the validation metrics (also in metrics.json).

    `options` are further `ClassifierTrainConfig` fields (e.g. epochs=1, cache_dir=...). `limit` caps the number of
    training (and validation) documents read, for quick runs. `push_to_hub` (a repository id) uploads the folder
    at the end; whether that can work is checked before any training.
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
    if push_to_hub:
        provenance.check_can_push(push_to_hub)
    output = Path(output)
    rows = read_documents(data, label_field=label_field, require_label=True, limit=limit)
    weights = row_weights(rows, cfg.weight_field)
    if val:
        val_rows = read_documents(val, label_field=label_field, require_label=True, limit=limit)
        train_rows, w_train, w_val = rows, weights, row_weights(val_rows, cfg.weight_field)
    else:
        labels = np.array([r["label"] for r in rows])
        train_idx, val_idx = stratified_split(labels, cfg.val_fraction, seed)
        train_rows, val_rows = [rows[i] for i in train_idx], [rows[i] for i in val_idx]
        w_train, w_val = (None, None) if weights is None else (weights[train_idx], weights[val_idx])
    inputs = provenance.describe_inputs({"train": data, "validation": val})  # the content just read
    if len(train_rows) < 2 * cfg.folds or not val_rows:
        raise ValueError(f"need at least {2 * cfg.folds} training and 1 validation documents, got "
                         f"{len(train_rows)} and {len(val_rows)}")
    train_texts, y_train = [r["text"] for r in train_rows], np.array([r["label"] for r in train_rows])
    val_texts, y_val = [r["text"] for r in val_rows], np.array([r["label"] for r in val_rows])
    weighted = " (weighted by the sample's inclusion weights)" if w_train is not None else ""
    console.print(f"training {cfg.method} ({cfg.kind}) on {len(train_rows)} documents, validating on "
                  f"{len(val_rows)}{weighted}")

    frozen = None
    if cfg.method == "fasttext":
        model, val_pred, oof_pred, info = _train_fasttext(cfg, train_texts, y_train, val_texts, w_train)
    else:
        model, val_pred, oof_pred, info, frozen = _train_encoder_model(cfg, train_texts, y_train, val_texts, output,
                                                                       w_train)

    calib_scores = val_pred if oof_pred is None else np.concatenate([val_pred, oof_pred])
    calib_labels = y_val if oof_pred is None else np.concatenate([y_val, y_train])
    calib_weights = _calibration_weights(w_val, w_train, len(y_val), len(y_train), oof_pred is not None)
    cut_points = fit_cut_points(calib_scores, calib_labels, min_positives=cfg.min_positives, weights=calib_weights)
    model.config.cut_points = cut_points
    remove_other_layout(output, cfg.method)
    model.save_pretrained(output)

    metrics = compute_metrics(y_val, val_pred, apply_cut_points(val_pred, cut_points), weights=w_val)
    if "encoder" in info:
        inputs.append(provenance.describe_input("encoder", info["encoder"]))
    config = {k: v for k, v in asdict(cfg).items() if k != "fasttext" or cfg.method == "fasttext"}
    metrics["training"] = {
        **info,
        "base_model": encoder_hub_id(info["encoder"]) if "encoder" in info else None,
        "config": config,
        "data": [{k: e.get(k) for k in ("role", "path", "fingerprint")} for e in inputs],
        "labels": label_source(train_rows + val_rows, label_field),
        "n_train": len(train_rows),
        "n_val": len(val_rows),
        "weights": None if w_train is None else weight_summary(w_train, cfg.weight_field),
        "cut_points": cut_points,
        "calibration_examples": int(len(calib_scores)),
    }
    curve = None
    if cfg.learning_curve:
        # every label paid for: the training rows, plus the validation rows split off them (not a separate --val)
        curve_rows = train_rows if val else train_rows + val_rows
        curve_w = w_train if val or w_train is None else np.concatenate([w_train, w_val])
        curve = _learning_curve(cfg, curve_rows, curve_w, frozen)
        metrics["learning_curve"] = curve
        plot_learning_curve(curve, output / "learning_curve.png", title=f"{cfg.kind} {curve['model']}: learning curve")
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_confusion_matrix(metrics, output / "confusion_matrix.png", title=f"{cfg.kind} {cfg.method}: validation")
    record = provenance.record_provenance(output, kind="classifier", settings={**config, "limit": limit},
                                          inputs=inputs)
    provenance.write_model_card(output, metrics, json.loads(record.read_text()), repo_id=push_to_hub)
    print_metrics(metrics, title=f"{output} — validation ({len(val_rows)} documents)")
    if curve is not None:
        print_learning_curve(curve, title=f"learning curve ({curve['model']}, {curve['repeats']} x {curve['folds']}"
                             f"-fold CV over {curve['total_labels']:,} labels)")
    if push_to_hub:
        console.print(f"uploaded to {provenance.push_to_hub(output, push_to_hub, repo_type='model')}")
    return metrics


def row_weights(rows: list[dict], weight_field: str | None) -> np.ndarray | None:
    """The rows' inclusion weights, or None when no row has the field (a uniform sample needs none).

    Some rows with and some without is an error: mixing a chosen sample with other rows has no correct weights."""
    if not weight_field:
        return None
    values = [r.get(weight_field) for r in rows]
    missing = sum(v is None for v in values)
    if missing == len(values):
        return None
    if missing:
        raise ValueError(f"{missing} of {len(values)} rows have no '{weight_field}': inclusion weights (written by "
                         f"`score --select active`) must be on every row or none (--weight-field none ignores them)")
    try:
        w = np.array(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"field '{weight_field}' must hold numbers (inclusion weights)") from None
    if not np.isfinite(w).all() or (w <= 0).any():
        raise ValueError(f"field '{weight_field}' must hold positive finite inclusion weights")
    return w


def weight_summary(w: np.ndarray, weight_field: str) -> dict:
    """What the weights did to the sample: its effective size (Kish) and range."""
    return {"field": weight_field, "effective_n": float(w.sum() ** 2 / (w**2).sum()), "min": float(w.min()),
            "max": float(w.max())}


def _calibration_weights(w_val, w_train, n_val: int, n_train: int, with_train: bool):
    """Weights beside the calibration predictions (validation, then out-of-fold training), None when unweighted."""
    if w_val is None and w_train is None:
        return None
    val_part = w_val if w_val is not None else np.full(n_val, float(np.mean(w_train)))
    if not with_train:
        return val_part
    train_part = w_train if w_train is not None else np.full(n_train, float(np.mean(w_val)))
    return np.concatenate([val_part, train_part])


def _learning_curve(cfg: ClassifierTrainConfig, rows: list[dict], w, frozen) -> dict:
    """The learning curve of the frozen-encoder head (for finetune: the linear probe its training starts from, as
    a fine-tune per point would cost hours) or of fastText."""
    y = np.array([r["label"] for r in rows])
    texts = [r["text"] for r in rows]
    main = MAIN_THRESHOLD[cfg.kind]
    if frozen is None:
        # fastText trains slowly on CPUs: one repeat, and cut points placed on a fifth of each subset held out
        # from its fit instead of out-of-fold predictions (about the cost of training itself, not five times it)
        def fit_predict(subset, held):
            order = np.random.default_rng(cfg.seed).permutation(subset)
            fit, calibrate = order[: int(0.8 * len(order))], order[int(0.8 * len(order)):]
            model = _fasttext_fit(cfg, [texts[i] for i in fit], y[fit], _take(w, fit))
            cuts = fit_cut_points(model.predict([texts[i] for i in calibrate]), y[calibrate],
                                  min_positives=cfg.min_positives, weights=_take(w, calibrate))
            return model.predict([texts[i] for i in held]), cuts

        console.print("learning curve: refitting fastText on 10/25/50/100% of the labels in each CV fold")
        curve = learning_curve(y, fit_predict, w, cfg.folds, 1, cfg.seed, min_rows=2 * cfg.folds,
                               main_threshold=main)
        return {"model": "fasttext", **curve}

    x = frozen.embed(texts).astype(np.float64)

    def fit_predict(subset, held):
        (weight, bias), oof, _, _ = fit_ridge_head(x[subset], y[subset], cfg.folds, cfg.seed,
                                                   weights=_take(w, subset))
        cuts = fit_cut_points(oof, y[subset], min_positives=cfg.min_positives, weights=_take(w, subset))
        return x[held] @ weight + bias, cuts

    console.print("learning curve: refitting the head on 10/25/50/100% of the labels in each CV fold")
    curve = learning_curve(y, fit_predict, w, cfg.folds, cfg.curve_repeats, cfg.seed, min_rows=2 * cfg.folds,
                           main_threshold=main)
    return {"model": "head" if cfg.method == "head" else "head (linear probe)", **curve}


def _take(w, index):
    return None if w is None else w[index]


def label_source(rows: list[dict], label_field: str) -> dict:
    """Who labelled the rows and with which prompt, as far as the rows say (`edu-filter score` writes `model` and
    `prompt`; the bundled data names its `annotator`): counts per annotator and per prompt version."""
    annotators = Counter(str(r.get("model") or r.get("annotator")) for r in rows
                         if r.get("model") or r.get("annotator"))
    prompts = Counter(str(r["prompt"]) for r in rows if r.get("prompt"))
    return {"field": label_field, "annotators": dict(annotators.most_common()),
            "prompt_versions": dict(prompts.most_common())}


def remove_other_layout(folder: Path, method: str) -> None:
    """Re-training into a folder that held the other layout (fastText vs transformers) must not leave it behind:
    `EduScorer` would load whichever it finds first."""
    from edu_filter.classifiers.fasttext_model import CONFIG_FILE, MODEL_FILE

    stale = ("config.json", "model.safetensors") if method == "fasttext" else (CONFIG_FILE, MODEL_FILE)
    for name in stale:
        (folder / name).unlink(missing_ok=True)


# --- fastText ---------------------------------------------------------------------------------------------------
def _fasttext_fit(cfg: ClassifierTrainConfig, texts, y, w=None):
    """fastText has no per-example weight: with inclusion weights it trains on a weighted resample of the rows (as
    many draws as rows, with replacement, probability in proportion to weight), which has the weighted loss as its
    expectation."""
    from edu_filter.classifiers.fasttext_model import FastTextRegressor

    settings = FastTextSettings(**{**asdict(cfg.fasttext), "seed": cfg.seed})
    if w is not None:
        draws = np.random.default_rng(cfg.seed).choice(len(y), size=len(y), p=w / w.sum())
        texts, y = [texts[i] for i in draws], y[draws]
    return FastTextRegressor.train(texts, y, settings, kind=cfg.kind)


def _train_fasttext(cfg: ClassifierTrainConfig, texts, y, val_texts, w=None):
    from sklearn.model_selection import KFold

    oof = np.zeros(len(texts))
    for fit_idx, held_idx in KFold(cfg.folds, shuffle=True, random_state=cfg.seed).split(texts):
        fold = _fasttext_fit(cfg, [texts[i] for i in fit_idx], y[fit_idx], _take(w, fit_idx))
        oof[held_idx] = fold.predict([texts[i] for i in held_idx])
    model = _fasttext_fit(cfg, texts, y, w)
    return model, model.predict(val_texts), oof, {"method": "fasttext"}


# --- head and finetune ------------------------------------------------------------------------------------------
@dataclass
class FrozenEncoder:
    """An encoder loaded for the head recipe, with the embedding-cache key its pooled vectors are stored under."""

    name: str  # the path or hub name loaded
    tokenizer: object
    model: object  # EduClassifierForSequenceClassification around the encoder, head untrained
    scorer: object  # EduScorer over `model`
    key: str  # embedding-cache setting key
    cache: object  # EmbeddingCache
    max_length: int
    pool_layers: list[int]

    def embed(self, texts: list[str]) -> np.ndarray:
        from edu_filter.classifiers.embeddings import cached_embeddings

        return cached_embeddings(self.scorer, texts, self.key, self.cache)


def load_frozen_encoder(cfg: ClassifierTrainConfig) -> FrozenEncoder:
    """The encoder `train` pools embeddings from, keyed in the embedding cache exactly as `train` keys them (so
    `score --select active` and `train` share the vectors of the same documents)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from edu_filter.classifiers.embeddings import EmbeddingCache, setting_key
    from edu_filter.classifiers.modeling_edu_classifier import (
        EduClassifierConfig,
        EduClassifierForSequenceClassification,
    )
    from edu_filter.classifiers.scorer import EduScorer

    torch.manual_seed(cfg.seed)
    encoder_name = resolve_encoder(cfg.kind, cfg.encoder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(encoder_name)
        encoder = AutoModel.from_pretrained(encoder_name, dtype=torch.float32)
    except OSError as e:  # no such folder or hub repo, or no weights in it
        raise ValueError(f"cannot load encoder {encoder_name!r}: {e}") from None
    max_positions = getattr(encoder.config, "max_position_embeddings", cfg.max_length)
    max_length = min(cfg.max_length, max_positions)
    if max_length < cfg.max_length:
        console.print(f"max_length {cfg.max_length} exceeds the encoder's {max_positions} positions; using {max_length}")
    pool_layers = cfg.pool_layers or default_pool_layers(encoder.config.num_hidden_layers)
    config = EduClassifierConfig(
        encoder_config=encoder.config.to_dict(),
        encoder_name=cfg.encoder or encoder_name,
        pooling=cfg.pooling,
        pool_layers=pool_layers,
        max_seq_length=max_length,
        long_docs=cfg.long_docs,
        max_chunks=cfg.max_chunks,
        kind=cfg.kind,
        method=cfg.method,
    )
    model = EduClassifierForSequenceClassification(config, encoder=encoder)
    scorer = EduScorer(
        model, tokenizer, max_length=max_length, long_docs=cfg.long_docs, max_chunks=cfg.max_chunks,
        batch_size=cfg.batch_size,
    )
    key = setting_key(
        encoder=encoder_identity(encoder_name), max_length=max_length, pooling=cfg.pooling, pool_layers=pool_layers,
        long_docs=cfg.long_docs, max_chunks=cfg.max_chunks,
    )
    return FrozenEncoder(encoder_name, tokenizer, model, scorer, key, EmbeddingCache(cfg.cache_dir), max_length,
                         pool_layers)


def _train_encoder_model(cfg: ClassifierTrainConfig, texts, y, val_texts, output: Path, w=None):
    """Returns the model, validation predictions, out-of-fold training predictions (head only), info, and the
    frozen encoder (whose cached embeddings the learning curve reuses)."""
    import torch

    frozen = load_frozen_encoder(cfg)
    model, scorer = frozen.model, frozen.scorer
    x_train = frozen.embed(texts)
    head, oof, alpha, flattening = fit_ridge_head(x_train, y, cfg.folds, cfg.seed, weights=w)
    with torch.no_grad():
        model.classifier.weight.copy_(torch.from_numpy(head[0][None, :]))
        model.classifier.bias.fill_(head[1])
    info = {"method": cfg.method, "encoder": model.config.encoder_name, "pool_layers": frozen.pool_layers,
            "ridge_alpha": alpha}
    if w is not None:
        info["weight_flattening"] = flattening  # the power of the weights the fit used (1: fully weighted)
    # the saved tokenizer truncates where the model was trained to read, for users of the plain transformers recipe
    frozen.tokenizer.model_max_length = frozen.max_length
    frozen.tokenizer.save_pretrained(output)

    if cfg.method == "head":
        x_val = frozen.embed(val_texts)
        return model, x_val.astype(np.float64) @ head[0] + head[1], oof, info, frozen

    finetune(model, scorer, texts, y, cfg, w)
    val_pred, _ = scorer.predict(val_texts, show_progress=True)
    return model, val_pred.astype(np.float64), None, info, frozen


def finetune(model, scorer, texts: list[str], y: np.ndarray, cfg: ClassifierTrainConfig, weights=None) -> None:
    """Train every weight with MSE on the first max_length tokens of each document (AdamW, warmup + linear decay);
    with inclusion weights, each document's squared error counts in proportion to its weight."""
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    content_len = scorer.max_length - scorer.framer.num_special
    sequences = [scorer.framer(ids[:content_len]) for ids in scorer.token_ids(texts, content_len)]
    pad_id = scorer.tokenizer.pad_token_id
    device = scorer.device
    model.to(device).train()
    head_params = list(model.classifier.parameters())
    optimizer = torch.optim.AdamW(
        [
            {"params": list(model.encoder.parameters()), "lr": cfg.learning_rate},
            {"params": head_params, "lr": cfg.head_learning_rate},
        ],
        weight_decay=0.01,
    )
    steps_per_epoch = (len(sequences) + cfg.train_batch_size - 1) // cfg.train_batch_size
    total = steps_per_epoch * cfg.epochs
    warmup = max(1, int(cfg.warmup_fraction * total))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (total - step) / max(1, total - warmup)))
    )
    rng = np.random.default_rng(cfg.seed)
    targets = torch.tensor(y, dtype=torch.float32)
    row_weights = torch.tensor(unit_weights(weights, len(y)), dtype=torch.float32)
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.3f}"),
        TimeRemainingColumn(), console=console,
    ) as progress:
        task = progress.add_task("fine-tuning", total=total, loss=float("nan"))
        for _ in range(cfg.epochs):
            order = rng.permutation(len(sequences))
            for start in range(0, len(order), cfg.train_batch_size):
                batch = order[start : start + cfg.train_batch_size]
                width = max(len(sequences[i]) for i in batch)
                input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, i in enumerate(batch):
                    input_ids[row, : len(sequences[i])] = torch.tensor(sequences[i])
                    attention_mask[row, : len(sequences[i])] = 1
                out = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
                errors = (out.logits[:, 0].float() - targets[batch].to(device)) ** 2
                loss = (row_weights[batch].to(device) * errors).mean()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                progress.update(task, advance=1, loss=loss.item())
    model.eval()
