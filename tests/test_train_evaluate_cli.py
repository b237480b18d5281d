"""The `train` and `evaluate` commands end to end through the real CLI (typer), on bundled data."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edu_filter.cli import app
from edu_filter.documents import read_documents, write_documents

REPO = Path(__file__).resolve().parents[1]
CODE_LABELS = REPO / "data/code/python_edu_labels.jsonl"
REPORT_KEYS = {
    "n", "mse", "spearman", "pearson", "accuracy", "macro_f1", "binary_f1_at_2", "binary_f1_at_3", "binary_f1_at_4",
    "confusion_matrix", "per_class",
}
runner = CliRunner()


@pytest.mark.slow
def test_train_then_evaluate_agree(tmp_path, minilm_path, embedding_cache_dir):
    """metrics.json written by train is what evaluate reports for the same validation file: same model, same cuts."""
    rows = read_documents([CODE_LABELS], label_field="score", limit=200)
    train_file = write_documents(rows[:150], tmp_path / "train.jsonl")
    val_file = write_documents(rows[150:], tmp_path / "val.parquet")
    model_dir = tmp_path / "model"
    result = runner.invoke(app, [
        "train", str(train_file), "--val", str(val_file), "--kind", "code", "--encoder", minilm_path,
        "-o", str(model_dir), "--max-length", "128", "--long-docs", "truncate", "--cache-dir", str(embedding_cache_dir),
    ])
    assert result.exit_code == 0, result.output
    assert "binary_f1_at_4" in result.output  # the rich table
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert REPORT_KEYS <= set(metrics) and metrics["n"] == 50
    assert (model_dir / "confusion_matrix.png").stat().st_size > 1000
    assert metrics["spearman"] > 0.3  # a real signal even from 150 files and 128 tokens

    report = tmp_path / "report.json"
    result = runner.invoke(app, ["evaluate", str(model_dir), str(val_file), "--report", str(report)])
    assert result.exit_code == 0, result.output
    evaluated = json.loads(report.read_text())
    assert REPORT_KEYS <= set(evaluated)
    assert evaluated["confusion_matrix"] == metrics["confusion_matrix"]
    for key in ("spearman", "binary_f1_at_2", "binary_f1_at_3", "binary_f1_at_4", "accuracy"):
        assert evaluated[key] == pytest.approx(metrics[key], abs=1e-6)
    assert evaluated["mse"] == pytest.approx(metrics["mse"], rel=1e-4)
    assert report.with_suffix(".png").exists()


@pytest.mark.slow
def test_evaluate_refuses_unlabelled_rows(tmp_path, code_model):
    rows = read_documents([CODE_LABELS], label_field="score", limit=5)
    rows[3].pop("score")
    data = write_documents(rows, tmp_path / "some_unlabelled.jsonl")
    result = runner.invoke(app, ["evaluate", str(code_model), str(data)])
    assert result.exit_code == 2  # bad input: the CLI's usage/input status
    assert "some_unlabelled.jsonl:4" in result.output and "'score' is missing" in result.output


@pytest.mark.slow
def test_rows_the_llm_could_not_annotate_are_left_out_with_skip_failed(tmp_path, code_model):
    """A document the server can never answer (over its context, refused) stopped train and evaluate for good:
    --skip-failed leaves out the rows `score` marked failed, counted by reason; a row with no label and no failure
    (a wrong --label-field, say) is still an error."""
    rows = read_documents([CODE_LABELS], label_field="score", limit=120)
    for i in (3, 40, 77):  # as `score` writes a document whose annotation failed for good
        rows[i] = {**rows[i], "score": None, "error": "http 400: context_length_exceeded"}
    data = write_documents([{k: v for k, v in r.items() if k != "label"} for r in rows], tmp_path / "ann.jsonl")
    for command in (["train", str(data), "-o", str(tmp_path / "m"), "--kind", "code", "--method", "fasttext"],
                    ["evaluate", str(code_model), str(data)]):
        refused = runner.invoke(app, command)
        assert refused.exit_code == 2 and "--skip-failed leaves such rows out" in refused.output, refused.output
        result = runner.invoke(app, [*command, "--skip-failed"])
        assert result.exit_code == 0, result.output
        assert "3 of 120 rows left out, their LLM annotation failed (3 x http 400: context_length_exceeded)" in \
            " ".join(result.output.split())
    metrics = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert metrics["training"]["n_train"] + metrics["n"] == 117
    assert metrics["training"]["failed_annotations_left_out"] == {"http 400: context_length_exceeded": 3}
    all_failed = write_documents([{"id": "a", "text": "x", "score": None, "error": "unparseable"}] * 2,
                                 tmp_path / "failed.jsonl")
    result = runner.invoke(app, ["train", str(all_failed), "-o", str(tmp_path / "m2"), "--skip-failed"])
    assert result.exit_code == 2 and "the LLM annotation of every row failed (2 x unparseable)" in result.output
    rows[5] = {k: v for k, v in rows[5].items() if k != "score"}  # no label, no failure
    write_documents([{k: v for k, v in r.items() if k != "label"} for r in rows], data)
    result = runner.invoke(app, ["evaluate", str(code_model), str(data), "--skip-failed"])
    assert result.exit_code == 2 and "ann.jsonl:6: label field 'score' is missing" in result.output


def test_train_reports_bad_rows_by_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "score": 2}\n{"text": "no label here"}\n')
    result = runner.invoke(app, ["train", str(bad), "-o", str(tmp_path / "m")])
    assert result.exit_code == 2 and "bad.jsonl:2" in result.output
    assert not (tmp_path / "m").exists()


def test_validation_split_is_stratified():
    """Without --val a stratified share is held out: each score keeps its share of the data."""
    from edu_filter.train.classifier import stratified_split

    labels = np.array([r["label"] for r in read_documents([CODE_LABELS], label_field="score")])
    train_idx, val_idx = stratified_split(labels, 0.1, seed=0)
    assert len(set(train_idx) | set(val_idx)) == len(labels) and not set(train_idx) & set(val_idx)
    for score in (1, 2, 3, 4):
        share = np.mean(labels[val_idx] == score)
        assert abs(share - np.mean(labels == score)) < 0.05
    # a validation share leaving training fewer rows than classes: a plain random split (scikit-learn refused it)
    few = np.array([0, 1, 2, 3, 4] * 4 + [2], dtype=float)
    train_idx, val_idx = stratified_split(few, 0.8, seed=0)
    assert (len(train_idx), len(val_idx)) == (4, 17)


@pytest.mark.parametrize("counts", [{0: 30, 1: 40, 2: 20, 3: 9, 5: 1}, {0: 1, 1: 40, 2: 30, 3: 29}])
def test_a_gap_in_the_scale_or_a_single_lowest_row_keeps_the_split_stratified(counts):
    """One 5 and no 4s, or a single 0: the lone row stayed its own stratum and the split fell back to plain random
    (a seed left the validation rows without a single 3)."""
    from edu_filter.train.classifier import stratified_split

    labels = np.array([score for score, n in counts.items() for _ in range(n)], dtype=float)
    for seed in range(20):
        _, val_idx = stratified_split(labels, 0.1, seed=seed)
        held_out = labels[val_idx]
        shares = {"1": int((held_out == 1).sum()), "2": int((held_out == 2).sum()), "3+": int((held_out >= 3).sum())}
        assert shares["1"] >= 2 and shares["2"] >= 1 and shares["3+"] >= 1, (seed, shares)


@pytest.mark.slow
def test_saved_tokenizer_truncates_where_the_model_reads(code_model):
    """The plain transformers recipe (tokenizer with truncation=True, then the model) gives the scorer's scores."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from edu_filter.classifiers import load_scorer

    tokenizer = AutoTokenizer.from_pretrained(code_model, trust_remote_code=True)
    assert tokenizer.model_max_length == 128
    model = AutoModelForSequenceClassification.from_pretrained(code_model, trust_remote_code=True).eval()
    texts = [r["text"] for r in read_documents([REPO / "data/code/thealgorithms_unlabelled.jsonl"], limit=4)]
    expected, truncated = load_scorer(code_model).predict(texts)
    assert truncated.all()
    with torch.no_grad():
        batch = tokenizer(texts, truncation=True, padding=True, return_tensors="pt")
        logits = model(**batch).logits[:, 0].numpy()
    assert logits == pytest.approx(expected, abs=1e-4)


def test_bad_training_options_are_clear_errors(tmp_path):
    from edu_filter.train.classifier import stratified_split, train_classifier

    with pytest.raises(ValueError, match="kind must be one of"):  # before any data is read
        train_classifier(["does-not-exist.jsonl"], tmp_path / "m", kind="prose")
    with pytest.raises(ValueError, match="chunk-max is a scoring-time option"):
        train_classifier(["does-not-exist.jsonl"], tmp_path / "m", long_docs="chunk-max")
    with pytest.raises(ValueError, match="--encoder .*no-encoder: no such file or folder"):  # before data is read
        train_classifier(["does-not-exist.jsonl"], tmp_path / "m", kind="code", encoder=str(tmp_path / "no-encoder"))
    (tmp_path / "not-an-encoder").mkdir()
    with pytest.raises(ValueError, match="cannot load encoder"):
        train_classifier([str(CODE_LABELS)], tmp_path / "m", kind="code", encoder=str(tmp_path / "not-an-encoder"),
                         limit=30)
    labels = np.array([0, 1, 2, 3, 4, 5, 1, 2, 3, 1, 2, 1, 2, 1], dtype=float)  # too few rows for one of each
    train_idx, val_idx = stratified_split(labels, 0.1, seed=0)
    assert len(val_idx) == 2 and sorted([*train_idx, *val_idx]) == list(range(len(labels)))


def test_metric_warnings_name_too_few_positives_and_a_spearman_not_above_zero():
    from edu_filter.classifiers.metrics import compute_metrics, metric_warnings

    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2, 3, 4], 12).astype(float)  # 24 at 3+, 12 at 4+
    scores = labels + rng.normal(0, 0.3, len(labels))
    good = compute_metrics(labels, scores, np.rint(scores).clip(0, 5))
    assert metric_warnings(good, labels, "web") == [] and metric_warnings(good, labels, "code") == []

    few = labels[labels < 4].tolist() + [4.0] * 9  # 9 documents at 4+: too few for code's threshold, plenty for web's
    few_metrics = compute_metrics(few, np.array(few), np.array(few, dtype=int))
    assert metric_warnings(few_metrics, few, "web") == []
    (warning,) = metric_warnings(few_metrics, few, "code", data="the evaluation data")
    assert warning.startswith("the evaluation data has 9 documents labelled 4+ (fewer than 10)")

    backwards = compute_metrics(labels, -scores, np.zeros(len(labels), dtype=int))
    (warning,) = metric_warnings(backwards, labels, "web")
    assert "Spearman on the validation data is -0.9" in warning
    constant = compute_metrics(labels, np.ones(len(labels)), np.ones(len(labels), dtype=int))
    assert "undefined" in metric_warnings(constant, labels, "web")[0]


@pytest.mark.slow
def test_train_and_evaluate_warn_when_validation_has_few_positives(tmp_path, capsys):
    """A tiny labelled set: its validation split holds 2 documents at 3+, too few to trust F1@3 and its cut."""
    from edu_filter.classifiers.evaluate import evaluate_model
    from edu_filter.classifiers.fasttext_model import FastTextSettings
    from edu_filter.train.classifier import train_classifier

    rows = read_documents([REPO / "data/web/fineweb_edu_llama3_train.jsonl"], label_field="score", limit=400)
    high = [r for r in rows if r["label"] >= 3][:6]
    low = [r for r in rows if r["label"] < 3][:54]
    train_file = write_documents(high[:4] + low[:40], tmp_path / "train.jsonl")
    val_file = write_documents(high[4:] + low[40:], tmp_path / "val.jsonl")
    model = tmp_path / "model"
    metrics = train_classifier([str(train_file)], model, kind="web", method="fasttext", val=[str(val_file)],
                               learning_curve=False, fasttext=FastTextSettings(epoch=5))
    # its fits (an hour each at 450k documents) show in a log as they end
    said = capsys.readouterr()
    assert re.search(r"fastText: 5 fold fits and the final one, \d at a time: 6/6", said.out), said.out
    few = "the validation data has 2 documents labelled 3+ (fewer than 10)"
    assert any(w.startswith(few) for w in metrics["warnings"])
    assert json.loads((model / "metrics.json").read_text())["warnings"] == metrics["warnings"]
    printed = [line for line in said.err.splitlines() if line.startswith("warning: ")]
    assert len(printed) == len(metrics["warnings"]) and few in printed[0]
    assert few in (model / "README.md").read_text()  # the model card says it too

    report = tmp_path / "report.json"
    evaluated = evaluate_model(str(model), [str(val_file)], report=report)
    assert any(w.startswith("the evaluation data has 2 documents labelled 3+") for w in evaluated["warnings"])
    assert json.loads(report.read_text())["warnings"] == evaluated["warnings"]
    assert "warning: the evaluation data has 2" in capsys.readouterr().err


@pytest.mark.slow
def test_evaluate_with_inclusion_weights_estimates_the_pool(tmp_path, code_model):
    """A sample holding every file scoring 4+ but a quarter of the rest, each of those weighted 4 (its inclusion
    weight), is evaluated as the whole pool would be; unweighted, the sample's own figures flatter the model."""
    rows = read_documents([CODE_LABELS], label_field="score")
    pool = write_documents(rows, tmp_path / "pool.jsonl")
    negatives = [r for r in rows if r["score"] < 4]
    sample = [{**r, "weight": 1.0} for r in rows if r["score"] >= 4] + [{**r, "weight": 4.0} for r in negatives[::4]]
    sample_file = write_documents(sample, tmp_path / "sample.jsonl")
    figures = {}
    for name, args in (("pool", [str(pool)]), ("weighted", [str(sample_file)]),
                       ("unweighted", [str(sample_file), "--weight-field", "none"])):
        report = tmp_path / f"{name}.json"
        result = runner.invoke(app, ["evaluate", str(code_model), *args, "--report", str(report)])
        assert result.exit_code == 0, result.output
        figures[name] = json.loads(report.read_text())
    assert figures["weighted"]["weights"]["field"] == "weight" and "weights" not in figures["unweighted"]
    # F1@4 on the sample is a ratio of sums, each of which the weights make an unbiased estimate of the pool's
    pool_f1, weighted_f1, unweighted_f1 = (figures[k]["binary_f1_at_4"] for k in ("pool", "weighted", "unweighted"))
    assert abs(weighted_f1 - pool_f1) < 0.08 and abs(weighted_f1 - pool_f1) < abs(unweighted_f1 - pool_f1) / 2


def test_evaluate_reads_and_scores_its_data_a_chunk_at_a_time(tmp_path, fasttext_model, monkeypatch):
    """evaluate held every row and its text, then a second list of the texts, all at once: a held-out set of
    millions took its size in memory and more. It scores a chunk at a time and keeps three numbers a row; the
    metrics are those of one chunk holding everything, and a weight missing from some rows is still refused, in the
    chunk where that shows (before the rest is scored)."""
    from edu_filter.classifiers import evaluate as ev
    from edu_filter.documents import InputError

    rows = read_documents([CODE_LABELS], label_field="score")[:90]
    data = write_documents(rows + [{"id": "blank", "text": " ", "score": 2}], tmp_path / "held.jsonl")
    whole = ev.evaluate_model(str(fasttext_model), [str(data)])
    monkeypatch.setattr(ev, "EVALUATE_CHUNK", 7)
    chunked = ev.evaluate_model(str(fasttext_model), [str(data)])
    assert chunked == whole and chunked["n"] == 90
    mixed = write_documents([{**r, "weight": 2.0} for r in rows[:7]] + rows[7:], tmp_path / "mixed.jsonl")
    with pytest.raises(InputError, match="7 of 14 rows have no 'weight'"):  # the second chunk's
        ev.evaluate_model(str(fasttext_model), [str(mixed)])


def test_evaluate_warns_when_the_data_holds_texts_the_model_was_trained_on(tmp_path, fasttext_model):
    """evaluate of a model on its own training labels (the same annotation dump, or a resample of the pool) gave
    Spearman 0.90 and F1@3 0.99 on random labels, saying nothing. train records the keys of the texts it fitted
    (8 bytes each, no text); evaluate counts the documents among them and warns."""
    from edu_filter.classifiers.evaluate import evaluate_model
    from edu_filter.documents import TRAINED_TEXTS

    rows = read_documents([CODE_LABELS], label_field="score")
    trained = np.load(fasttext_model / TRAINED_TEXTS)
    assert trained.dtype == np.uint64 and 400 < len(trained) < len(rows)  # the training split, not validation
    spaced = [{**r, "text": "  " + r["text"].replace("\n", "\r\n")} for r in rows]  # the same texts, as train sees
    metrics = evaluate_model(str(fasttext_model), [str(write_documents(spaced, tmp_path / "all.jsonl"))])
    assert metrics["trained_on"] == len(trained)
    assert any(f"{len(trained):,} of {len(rows):,} documents evaluated" in w and "trained on" in w
               for w in metrics["warnings"])
    held_out = REPO / "data/code/thealgorithms_unlabelled.jsonl"
    unseen = [{"id": f"u{i}", "text": r["text"], "score": 2} for i, r in enumerate(read_documents([held_out])[:40])]
    metrics = evaluate_model(str(fasttext_model), [str(write_documents(unseen, tmp_path / "unseen.jsonl"))])
    assert metrics["trained_on"] == 0 and not any("trained on" in w for w in metrics["warnings"])
