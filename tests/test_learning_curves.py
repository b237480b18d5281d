"""Learning curves in `train`, and the weighted fit, cut points and metrics they (and active samples) rest on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edu_filter.classifiers.calibration import apply_cut_points, fit_cut_points
from edu_filter.classifiers.head import fit_ridge_head
from edu_filter.classifiers.learning_curve import learning_curve
from edu_filter.classifiers.metrics import compute_metrics

REPO = Path(__file__).resolve().parents[1]
WEB_TRAIN = REPO / "data/web/fineweb_edu_llama3_train.jsonl"


def scored_sample(n: int, seed: int):
    """Labels 0-5 skewed low like web data, raw scores that track them, integer weights 1-3."""
    rng = np.random.default_rng(seed)
    labels = np.clip(np.rint(rng.gamma(2.0, 0.7, n)), 0, 5)
    raw = labels + rng.normal(0, 0.8, n)
    weights = rng.integers(1, 4, n)
    return labels, raw, weights


def test_weighted_metrics_equal_the_metrics_of_duplicated_rows():
    labels, raw, w = scored_sample(400, 0)
    ints = apply_cut_points(raw, [0.5, 1.5, 2.5, 3.5, 4.5])
    weighted = compute_metrics(labels, raw, ints, weights=w)
    repeated = compute_metrics(np.repeat(labels, w), np.repeat(raw, w), np.repeat(ints, w))
    for key in ("mse", "spearman", "pearson", "accuracy", "macro_f1", "binary_f1_at_2", "binary_f1_at_3",
                "binary_f1_at_4"):
        assert weighted[key] == pytest.approx(repeated[key], abs=1e-9), key
    assert weighted["uncalibrated"] == pytest.approx(repeated["uncalibrated"], abs=1e-9)
    assert weighted["n"] == 400 and sum(map(sum, weighted["confusion_matrix"])) == 400  # documents, not weight
    assert weighted["weighted"]["effective_n"] < 400
    assert compute_metrics(labels, raw, ints)["spearman"] != pytest.approx(weighted["spearman"], abs=1e-6)


def test_weighted_cut_points_equal_the_cut_points_of_duplicated_rows():
    labels, raw, w = scored_sample(600, 1)
    weighted = fit_cut_points(raw, labels, min_positives=1, weights=w)
    assert weighted == pytest.approx(fit_cut_points(np.repeat(raw, w), np.repeat(labels, w), min_positives=1))
    # weighting the high labels down moves the cuts up: fewer predicted positives pay off
    down = np.where(labels >= 3, 0.2, 1.0)
    assert fit_cut_points(raw, labels, weights=down)[2] > fit_cut_points(raw, labels)[2]


def test_weighted_ridge_head_is_scikit_learns_weighted_ridge():
    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(2)
    for n, p in ((120, 300), (300, 40)):  # the kernel and the primal form
        x = rng.normal(size=(n, p)).astype(np.float32)
        y = x[:, :5].sum(axis=1) + rng.normal(size=n)
        w = rng.uniform(0.2, 5.0, n)
        (weight, bias), oof, alpha, flattening = fit_ridge_head(x, y, folds=5, seed=0, weights=w)
        fit_w = w**flattening
        scaler = StandardScaler().fit(x, sample_weight=fit_w)
        reference = Ridge(alpha=alpha).fit(scaler.transform(x), y, sample_weight=fit_w / fit_w.mean())
        assert x.astype(np.float64) @ weight + bias == pytest.approx(reference.predict(scaler.transform(x)),
                                                                     abs=1e-4)
        assert np.corrcoef(oof, y)[0, 1] > 0.5  # out-of-fold predictions, not noise


def test_ridge_head_from_sums_over_row_blocks_is_the_direct_fit_in_bounded_memory(monkeypatch):
    """More rows than features (FineWeb-Edu's 450k annotations): the fit sums Gram matrices over blocks of rows and
    gives the direct fit's alpha, flattening, coefficients and out-of-fold predictions, holding less extra memory
    than the float32 embeddings themselves (the direct route holds two float64 copies)."""
    import tracemalloc

    from edu_filter.classifiers import head

    rng = np.random.default_rng(4)
    x = (0.3 + 0.05 * rng.normal(size=(500, 30))).astype(np.float32)  # offset like pooled embeddings
    x[:, 7] = -12.3  # a constant feature: scale 1 and no weight, as in the direct fit
    y = 10 * x[:, :5].sum(axis=1) + rng.normal(size=500)
    w = rng.uniform(0.2, 5.0, 500)
    monkeypatch.setattr(head, "GRAM_BLOCK", 37)  # blocks that cut across folds
    for weights in (None, w):
        (weight, bias), oof, alpha, flattening = head.fit_ridge_head(x, y, 5, 0, weights=weights)
        (direct_weight, direct_bias), direct_oof, direct_alpha, direct_flattening = head._fit_ridge_head(
            x, y, 5, 0, weights)
        assert (alpha, flattening) == (direct_alpha, direct_flattening)
        assert weight == pytest.approx(direct_weight, rel=1e-5, abs=1e-6) and bias == pytest.approx(direct_bias)
        assert oof == pytest.approx(direct_oof, abs=1e-8) and weight[7] == 0
    monkeypatch.setattr(head, "GRAM_BLOCK", 4096)
    x = rng.normal(size=(40000, 300)).astype(np.float32)
    y = x[:, :5].sum(axis=1) + rng.normal(size=40000)
    tracemalloc.start()
    try:
        head.fit_ridge_head(x, y, 5, 0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < x.nbytes, (peak, x.nbytes)


def test_weighted_cross_validation_chooses_how_much_the_fit_follows_the_weights():
    """Weights unrelated to the labels only add noise to a well-specified fit: mostly a flatter fit wins. Where a
    linear fit is wrong and the sample is thin in the region that bends, the full weights win every time."""
    noise_only, needed = [], []
    for seed in range(10):
        rng = np.random.default_rng(seed)
        x = rng.normal(size=(300, 10))
        y = x @ rng.normal(size=10) + rng.normal(0, 1, 300)
        noise_only.append(fit_ridge_head(x, y, 5, 0, weights=rng.pareto(1.5, 300) + 0.05)[3])
        x = rng.normal(size=(300, 3))
        bend = x[:, 0] > 1.0
        y = x[:, 1] + np.where(bend, 3 * x[:, 0], 0) + rng.normal(0, 0.3, 300)
        needed.append(fit_ridge_head(x, y, 5, 0, weights=np.where(bend, 20.0, 1.0))[3])
    assert sum(f < 1 for f in noise_only) >= 7, noise_only
    assert needed == [1.0] * 10
    assert fit_ridge_head(x, y, 5, 0)[3] == 1.0  # no weights: nothing to flatten


def ridge_fit_predict(x, y):
    def fit_predict(subset, held):
        (weight, bias), oof, _, _ = fit_ridge_head(x[subset], y[subset], 5, 0)
        return x[held] @ weight + bias, fit_cut_points(oof, y[subset])

    return fit_predict


def test_learning_curve_tells_a_rising_curve_from_a_flat_one():
    rng = np.random.default_rng(3)
    n = 600
    # many weak features: each extra label still teaches the ridge something
    x = rng.normal(size=(n, 300))
    latent = x @ rng.normal(0, 0.15, 300)
    y = np.clip(np.rint(1.4 + latent + rng.normal(0, 0.4, n)), 0, 5)
    rising = learning_curve(y, ridge_fit_predict(x, y), repeats=1)
    assert [p["share"] for p in rising["points"]] == [0.1, 0.25, 0.5, 1.0]
    assert [p["labels"] for p in rising["points"]] == [48, 120, 240, 480]
    assert rising["points"][-1]["spearman"] > rising["points"][0]["spearman"] + 0.2
    assert rising["verdict"]["still_helping"] is True and "still helping" in rising["verdict"]["text"]

    # one strong feature and label noise: a few dozen labels already fit it
    x1 = rng.normal(size=(n, 2))
    y1 = np.clip(np.rint(1.4 + x1[:, 0] + rng.normal(0, 0.6, n)), 0, 5)
    flat = learning_curve(y1, ridge_fit_predict(x1, y1), repeats=1)
    assert flat["verdict"]["still_helping"] is False and "flattened" in flat["verdict"]["text"]
    assert abs(flat["points"][-1]["spearman"] - flat["points"][-2]["spearman"]) < 0.02

    # the same flat data with 3 labels at the main threshold: F1@3 is 0 in every fold, which read "flattened"
    few = np.minimum(y1, 2)
    few[np.flatnonzero(y1 >= 3)[:3]] = 3
    inconclusive = learning_curve(few, ridge_fit_predict(x1, few), repeats=1)
    assert inconclusive["verdict"]["still_helping"] is None
    assert inconclusive["verdict"]["text"].startswith("inconclusive: only 3 labels at 3+")


@pytest.mark.slow
def test_train_reports_the_learning_curve(tmp_path, minilm_path, embedding_cache_dir, capsys):
    from edu_filter.train.classifier import train_classifier

    out = tmp_path / "web"
    metrics = train_classifier(
        [str(WEB_TRAIN)], out, kind="web", encoder=minilm_path, max_length=128, limit=300,
        cache_dir=str(embedding_cache_dir), val_fraction=0.2,
    )
    curve = json.loads((out / "metrics.json").read_text())["learning_curve"]
    assert curve == metrics["learning_curve"]
    assert curve["model"] == "head" and curve["total_labels"] == 300 and curve["repeats"] == 2
    labels = [p["labels"] for p in curve["points"]]
    assert labels == [24, 60, 120, 240] and [p["fits"] for p in curve["points"]] == [10] * 4
    assert curve["points"][-1]["spearman"] > curve["points"][0]["spearman"]  # 240 labels beat 24
    assert curve["verdict"]["still_helping"] in (True, False) and curve["verdict"]["text"]
    assert (out / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "learning curve" in printed and curve["verdict"]["text"][:40] in printed.replace("\n", " ")

    quiet = train_classifier(
        [str(WEB_TRAIN)], tmp_path / "no-curve", kind="web", encoder=minilm_path, max_length=128, limit=300,
        cache_dir=str(embedding_cache_dir), val_fraction=0.2, learning_curve=False,
    )
    assert "learning_curve" not in quiet and not (tmp_path / "no-curve" / "learning_curve.png").exists()
    assert quiet["spearman"] == metrics["spearman"]  # the curve is a report: it changes nothing in the model


@pytest.mark.slow
def test_a_run_stopped_during_its_learning_curve_leaves_a_finished_model_with_its_record(tmp_path, minilm_path,
                                                                                        embedding_cache_dir,
                                                                                        monkeypatch):
    """The curve (hours at 450k labels) came before metrics.json, provenance and the card: a job stopped during it
    left a model folder apply took for finished with no training record, and fine-tuning's checkpoint was gone."""
    from edu_filter.classifiers.scorer import load_scorer
    from edu_filter.train import classifier

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt  # as SIGINT or a time limit stops it there

    monkeypatch.setattr(classifier, "_learning_curve", stopped)
    out = tmp_path / "web"
    with pytest.raises(KeyboardInterrupt):
        classifier.train_classifier([str(WEB_TRAIN)], out, kind="web", encoder=minilm_path, max_length=128,
                                    limit=300, cache_dir=str(embedding_cache_dir), val_fraction=0.2)
    metrics = json.loads((out / "metrics.json").read_text())
    assert "learning_curve" not in metrics and metrics["spearman"] > 0 and metrics["training"]["n_train"] == 240
    assert (out / "provenance.json").exists() and (out / "README.md").exists()
    assert load_scorer(str(out)).predict(["Photosynthesis turns light into sugar."])[0].shape == (1,)


@pytest.mark.slow
def test_fasttext_learning_curve(tmp_path):
    from edu_filter.classifiers.fasttext_model import FastTextSettings
    from edu_filter.train.classifier import train_classifier

    metrics = train_classifier(
        [str(REPO / "data/code/python_edu_labels.jsonl")], tmp_path / "ft", kind="code", method="fasttext",
        limit=150, fasttext=FastTextSettings(epoch=5, max_chars=2000),
    )
    curve = metrics["learning_curve"]
    assert curve["model"] == "fasttext" and curve["repeats"] == 1 and curve["main_threshold"] == 4
    assert [p["labels"] for p in curve["points"]] == [12, 30, 60, 120]
    assert all(p["spearman"] is not None and -1 <= p["spearman"] <= 1 for p in curve["points"])
    assert curve["verdict"]["text"] and (tmp_path / "ft" / "learning_curve.png").exists()


def test_fasttext_curve_fits_side_by_side_make_the_same_curve(capsys):
    """The curve's 20 fastText fits ran one after another; in threads (fastText lets go of the GIL) the curve is
    the one they made one after another, point for point."""
    from edu_filter.classifiers.fasttext_model import FastTextSettings
    from edu_filter.documents import read_documents
    from edu_filter.train.classifier import ClassifierTrainConfig
    from edu_filter.train.fasttext import curve_fit_predict

    rows = read_documents([REPO / "data/code/python_edu_labels.jsonl"], label_field="score")[:150]
    texts, y = [r["text"] for r in rows], np.array([r["label"] for r in rows])
    cfg = ClassifierTrainConfig(kind="code", method="fasttext", fasttext=FastTextSettings(epoch=3, max_chars=2000))
    curves = [learning_curve(y, curve_fit_predict(cfg, texts, y), repeats=1, min_rows=10, show_progress=True,
                             at_once=at_once) for at_once in (1, 3)]
    assert curves[0] == curves[1] and len(curves[0]["points"]) == 4
    assert "learning curve: 20 fits, 3 at a time: 20/20" in " ".join(capsys.readouterr().out.split())


@pytest.mark.slow
def test_the_curve_reuses_the_fits_embeddings(tmp_path, minilm_path, monkeypatch):
    """The curve's refits read the vectors the model's own fit computed: it embedded (or read from the cache:
    minutes at 450k labels) every text a second time, and with an unusable cache encoded them all again."""
    from edu_filter.classifiers.frozen_encoder import FrozenEncoder
    from edu_filter.train.classifier import train_classifier

    embedded = []
    real_embed = FrozenEncoder.embed

    def counted(self, texts):  # the real encoder runs; the texts it is given are counted
        embedded.append(len(texts))
        return real_embed(self, texts)

    monkeypatch.setattr(FrozenEncoder, "embed", counted)
    (tmp_path / "not-a-cache").write_text("a file where the cache folder should be: the cache is unusable")
    train_classifier([str(WEB_TRAIN)], tmp_path / "web", kind="web", encoder=minilm_path, max_length=64, limit=120,
                     cache_dir=str(tmp_path / "not-a-cache" / "cache"), val_fraction=0.25)
    assert sum(embedded) == 120  # 90 training, 30 validation texts, once each
