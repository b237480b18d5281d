"""Training methods (fasttext, finetune), the output folder and option checks, the embedding cache, encoder defaults
and sequence framing."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edu_filter.classifiers import EduScorer, load_scorer
from edu_filter.documents import InputError, read_documents

REPO = Path(__file__).resolve().parents[1]
CODE_LABELS = REPO / "data/code/python_edu_labels.jsonl"
WEB_TRAIN = REPO / "data/web/fineweb_edu_llama3_train.jsonl"
WEB_VAL = REPO / "data/web/fineweb_edu_llama3_val.jsonl"
CLI = str(Path(sys.executable).parent / "edu-filter")


@pytest.mark.slow
def test_fasttext_trains_saves_and_predicts(tmp_path):
    from edu_filter.classifiers.fasttext_model import FastTextSettings
    from edu_filter.train.classifier import train_classifier

    out = tmp_path / "ft"
    settings = FastTextSettings(epoch=10, max_chars=4000)
    metrics = train_classifier([str(CODE_LABELS)], out, kind="code", method="fasttext", fasttext=settings)
    assert (out / "model.bin").exists() and not (out / "config.json").exists()
    assert (out / "model.bin").stat().st_size < 100e6  # bounded hashed n-gram table, not fastText's 2M rows
    # whole, read from its headers; cut anywhere (in its dictionary fastText's loader allocated without end): not
    from edu_filter.classifiers.fasttext_model import model_file_whole

    whole = (out / "model.bin").read_bytes()
    assert model_file_whole(out / "model.bin")
    for cut in (0, 50, 4096, len(whole) // 2, len(whole) - 1):
        (tmp_path / "cut.bin").write_bytes(whole[:cut])
        assert not model_file_whole(tmp_path / "cut.bin"), cut
    damaged = bytearray(whole)
    damaged[72:76] = (-1_000_000).to_bytes(4, "little", signed=True)  # its label count
    (tmp_path / "cut.bin").write_bytes(bytes(damaged))
    assert not model_file_whole(tmp_path / "cut.bin")
    config = json.loads((out / "fasttext_config.json").read_text())
    assert config["method"] == "fasttext" and config["cut_points"] == metrics["training"]["cut_points"]
    card = " ".join((out / "README.md").read_text().split())  # a code model's card: its rubric and threshold
    assert "Python-Edu style additive rubric" in card and "Keep `int_score >= 4`" in card and "--threshold 4" in card
    assert "FineWeb-Edu" not in card

    rows = read_documents([CODE_LABELS], label_field="score")
    scorer = load_scorer(out)  # through the binding: fasttext's own predict breaks under NumPy 2
    texts = [r["text"] for r in rows[:100]]
    scores, truncated = scorer.predict(texts)
    assert scores.dtype == np.float32 and truncated.tolist() == [len(t) > 4000 for t in texts]
    assert ((scores >= 0) & (scores <= 5)).all() and scores.std() > 0.05
    labels = np.array([r["label"] for r in rows[:100]])
    assert scores[labels >= 3].mean() > scores[labels <= 2].mean()  # mostly training documents: it must fit them
    assert metrics["spearman"] > 0.2  # held out: weak but real


@pytest.mark.slow
def test_fasttext_fits_side_by_side_give_the_model_of_fits_one_after_another(tmp_path, monkeypatch, capsys):
    """The fold fits and the final one ran one after another on one thread (~4 h at 450k documents); side by side,
    each still on one thread, they give the same models, out-of-fold predictions and cut points. As many run at
    once as there are CPUs, and as their training files fit in half the free temporary space."""
    import shutil
    from collections import namedtuple

    from edu_filter.classifiers.fasttext_model import FastTextSettings
    from edu_filter.train import fasttext as ft
    from edu_filter.train.classifier import train_classifier

    def train(out: str) -> dict:
        return train_classifier([str(CODE_LABELS)], tmp_path / out, kind="code", method="fasttext",
                                fasttext=FastTextSettings(epoch=3, max_chars=2000), learning_curve=False)

    from edu_filter.classifiers.device import default_num_threads

    side_by_side = train("side")
    said = " ".join(capsys.readouterr().out.split())
    assert f"5 fold fits and the final one, {min(6, default_num_threads())} at a time" in said, said
    monkeypatch.setattr(ft, "fits_at_once", lambda *args: 1)
    alone = train("alone")
    assert side_by_side["training"]["cut_points"] == alone["training"]["cut_points"]
    assert {k: v for k, v in side_by_side.items() if isinstance(v, float)} == {
        k: v for k, v in alone.items() if isinstance(v, float)}
    texts = [r["text"] for r in read_documents([CODE_LABELS], label_field="score")[:50]]
    assert np.array_equal(load_scorer(tmp_path / "side").predict(texts)[0],
                          load_scorer(tmp_path / "alone").predict(texts)[0])
    monkeypatch.undo()
    monkeypatch.setattr("edu_filter.classifiers.device.default_num_threads", lambda: 8)
    monkeypatch.setattr("edu_filter.classifiers.embeddings.available_memory", lambda: 64 * 2**30)
    settings = FastTextSettings(max_chars=2000)
    assert ft.fits_at_once(["x" * 1000] * 2, settings, 6) == 6
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 8200, 8200))
    assert ft.fits_at_once(["x" * 1000] * 2, settings, 6) == 2  # two files of ~2 KB in half of 8.2 KB
    assert ft.fits_at_once(["é" * 1000] * 2, settings, 6) == 1  # ~4 KB each in UTF-8
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 0, 10**12))
    monkeypatch.setattr("edu_filter.classifiers.embeddings.available_memory", lambda: 2 * 2**30)
    assert ft.fits_at_once(["x" * 1000] * 2, settings, 6) == 1  # a fit's matrices take ~0.7 GB


def test_a_text_labelled_twice_is_never_on_both_sides_of_a_split(tmp_path, capsys):
    """Labels with repeated texts (a second annotation pass appended) put copies in training and validation: the
    validation metrics scored documents the model was fitted on. Each text is now one row with its mean label, and
    --val texts are left out of training. A copy apart only in whitespace (a trailing newline, CRLF line ends: the same
    page crawled twice) is the same text: on random labels such pairs gave a validation Spearman of 0.88."""
    from edu_filter.classifiers.fasttext_model import FastTextSettings
    from edu_filter.documents import write_documents
    from edu_filter.train.classifier import merge_repeated_texts, train_classifier

    rows = read_documents([CODE_LABELS], label_field="score")
    doubled = write_documents([{**r, "id": f"{r['id']}-{k}", "score": r["label"] if k else min(5, r["label"] + 1),
                                "text": r["text"] if k else r["text"].replace("\n", "\r\n") + "\n"}
                               for k in range(2) for r in rows], tmp_path / "doubled.jsonl")
    merged, weights = merge_repeated_texts(read_documents([doubled], label_field="score"), None, "DATA")
    assert len(merged) == len(rows) and weights is None
    assert [m["label"] for m in merged[:5]] == [min(5, r["label"] + 1) / 2 + r["label"] / 2 for r in rows[:5]]
    _, w = merge_repeated_texts(read_documents([doubled], label_field="score"), np.arange(1, 2 * len(rows) + 1.0),
                                "DATA")
    assert w[0] == (1 + len(rows) + 1) / 2  # a text counts once, weighted or not
    settings = FastTextSettings(epoch=3, max_chars=2000)
    metrics = train_classifier([str(doubled)], tmp_path / "ft", kind="code", method="fasttext", fasttext=settings,
                               learning_curve=False)
    assert metrics["training"]["n_train"] + metrics["n"] == len(rows)
    assert metrics["training"]["repeated_texts_merged"] == len(rows)  # every row read accounted for
    assert "561 documents repeat the text of another" in " ".join(capsys.readouterr().err.split())
    val = write_documents([{**r, "score": r["label"], "text": f"  {r['text']}"} for r in rows[:100]],
                          tmp_path / "val.jsonl")
    metrics = train_classifier([str(doubled)], tmp_path / "ft-val", kind="code", method="fasttext",
                               fasttext=settings, val=[str(val)], learning_curve=False)
    assert "100 training documents are also in --val: left out of training" in " ".join(
        capsys.readouterr().err.split())
    assert metrics["training"]["n_train"] == len(rows) - 100 and metrics["n"] == 100
    training = metrics["training"]
    assert (training["repeated_texts_merged"], training["train_rows_in_val"]) == (len(rows), 100)
    assert training["n_train"] + training["n_val"] + training["repeated_texts_merged"] + training[
        "train_rows_in_val"] == 2 * len(rows) + 100  # the rows of DATA and of --val


def test_a_fasttext_fit_killed_midway_leaves_no_training_file_behind(tmp_path):
    """Each fit wrote a named copy of its training texts in the temporary folder (~2 GB at 450k web documents, up to
    six fits at once): a kill (SIGKILL, a Slurm time limit) left them all there. The file has no name now."""
    import signal
    import time

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    fit = ("import sys, numpy as np\n"
           "from edu_filter.classifiers.fasttext_model import FastTextRegressor, FastTextSettings\n"
           "from edu_filter.documents import read_documents\n"
           "rows = read_documents([sys.argv[1]], label_field='score') * 10\n"
           "FastTextRegressor.train([r['text'] for r in rows], np.array([r['label'] for r in rows]), "
           "FastTextSettings())\n")
    run = subprocess.Popen([sys.executable, "-c", fit, str(WEB_TRAIN)], env={**os.environ, "TMPDIR": str(tmp)})

    def files_open_in_tmp() -> list[str]:
        links = []
        for fd in Path(f"/proc/{run.pid}/fd").glob("*"):
            try:
                links.append(os.readlink(fd))
            except OSError:
                pass
        return [link for link in links if link.startswith(str(tmp))]

    deadline = time.monotonic() + 120
    while run.poll() is None and not files_open_in_tmp() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # written some
    assert run.poll() is None and files_open_in_tmp(), "the fit ended, or never opened its training file"
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert list(tmp.rglob("*")) == []


def test_fasttext_predict_matches_label_probabilities(tmp_path):
    """The expected value equals sum(p_k * k) from fastText's own probabilities."""
    from edu_filter.classifiers.fasttext_model import FastTextRegressor, FastTextSettings, fasttext_line

    rows = read_documents([CODE_LABELS], label_field="score", limit=120)
    model = FastTextRegressor.train([r["text"] for r in rows], [r["label"] for r in rows], FastTextSettings(epoch=5))
    text = rows[0]["text"] + "\nprint('__label__5 is text, not a label')"
    pairs = model.model.f.predict(fasttext_line(text) + "\n", -1, 0.0, "strict")
    expected = sum(p * float(label.removeprefix("__label__")) for p, label in pairs) / sum(p for p, _ in pairs)
    assert model.predict([text])[0] == pytest.approx(expected, abs=1e-6)
    model.config.cut_points = [0.5, 1.5, 2.5, 3.5, 4.5]
    model.save_pretrained(tmp_path / "m")
    again = FastTextRegressor.from_pretrained(tmp_path / "m")
    assert again.predict([text])[0] == pytest.approx(expected, abs=1e-6)


@pytest.mark.slow
def test_finetune_trains_the_encoder(tmp_path, minilm_path, embedding_cache_dir, monkeypatch):
    """... and holds no copy of the linear probe's training embeddings while it trains (8 GB at 450k labels)."""
    import weakref

    from transformers import AutoModel, AutoModelForSequenceClassification

    from edu_filter.train import finetune
    from edu_filter.train.classifier import train_classifier

    probe_embeddings, fit_head, train = [], finetune.fit_head, finetune.finetune

    def fit_head_watched(*args, **kwargs):
        fitted = fit_head(*args, **kwargs)
        probe_embeddings.append(weakref.ref(fitted[4]))
        return fitted

    def finetune_watched(*args, **kwargs):
        assert probe_embeddings and probe_embeddings[0]() is None, "the probe's embeddings are still held"
        return train(*args, **kwargs)

    monkeypatch.setattr(finetune, "fit_head", fit_head_watched)
    monkeypatch.setattr(finetune, "finetune", finetune_watched)
    out = tmp_path / "ft"
    metrics = train_classifier(
        [str(CODE_LABELS)], out, kind="code", method="finetune", encoder=minilm_path, max_length=48, limit=50,
        epochs=1, train_batch_size=8, val_fraction=0.2, cache_dir=str(embedding_cache_dir),
    )
    assert metrics["training"]["method"] == "finetune" and np.isfinite(metrics["mse"])
    # the validation split scored at each fifth of the run (5 steps), the last point the final metrics' own
    monitored = metrics["training"]["validation_during_training"]
    assert [p["step"] for p in monitored] == [1, 2, 3, 4, 5] and monitored[-1]["mse"] == metrics["mse"]
    assert len({p["mse"] for p in monitored}) == 5  # the encoder moved between them
    # it starts from the ridge head, whose raw weights on MiniLM's degenerate dimensions (std ~1e-9) were ~1e6: the
    # first step moved their LayerNorm weights and the loss went from 0.5 to thousands (validation MSE 5,000)
    assert metrics["mse"] < 3, metrics["mse"]
    tuned = AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=True)
    assert tuned.config.method == "finetune" and tuned.config.long_docs == "truncate"
    original = AutoModel.from_pretrained(minilm_path)
    changed = [
        name for name, p in original.state_dict().items()
        if "pooler" not in name and not torch.equal(p, tuned.encoder.state_dict()[name])
    ]
    assert len(changed) > 50  # the encoder itself was trained, not only the head
    scores, _ = load_scorer(out).predict(["def add(a, b):\n    return a + b\n"])
    assert np.isfinite(scores).all()
    # the learning curve embedded the validation rows after the encoder was trained: through the trained model they
    # went into the cache under the frozen encoder's key, and every later head run read them
    from edu_filter.classifiers.frozen_encoder import load_frozen_encoder
    from edu_filter.documents import read_documents

    texts = [r["text"] for r in read_documents([CODE_LABELS], limit=50)]
    options = dict(kind="code", encoder=minilm_path, max_length=48)
    cached = load_frozen_encoder(**options, cache_dir=str(embedding_cache_dir)).embed(texts)
    fresh = load_frozen_encoder(**options, cache_dir=str(tmp_path / "fresh-cache")).embed(texts)
    assert np.abs(cached - fresh).max() < 1e-4


@pytest.mark.slow
def test_fine_tuning_holds_token_ids_packed(minilm_path):
    """Every sequence as Python ints took 42 B a token (~8 GB at 500k documents); packed int32 with offsets, made a
    block of texts at a time, they are the same ids."""
    from transformers import AutoModel, AutoTokenizer

    from edu_filter.classifiers.modeling_edu_classifier import EduClassifierConfig, EduClassifierForSequenceClassification
    from edu_filter.classifiers.scorer import EduScorer
    from edu_filter.train.finetune import packed_sequences

    encoder = AutoModel.from_pretrained(minilm_path)
    model = EduClassifierForSequenceClassification(EduClassifierConfig(encoder_config=encoder.config.to_dict()), encoder)
    scorer = EduScorer(model, AutoTokenizer.from_pretrained(minilm_path), max_length=32)
    texts = [r["text"] for r in read_documents([WEB_TRAIN], label_field="score")[:7]] + ["", "short"]
    ids, offsets = packed_sequences(scorer, texts, block=3)
    assert ids.dtype == np.int32 and len(offsets) == len(texts) + 1
    assert [ids[offsets[i]:offsets[i + 1]].tolist() for i in range(len(texts))] == scorer.token_sequences(texts)


def test_a_sigterm_during_a_validation_pass_stops_it_within_a_window(minilm_path, monkeypatch):
    """The validation pass inside the fine-tuning loop ran whole before the loop looked at SIGTERM: minutes on a
    large split, past the 30 s Slurm grants before SIGKILL, and the checkpoint of the step was never saved."""
    import threading

    from transformers import AutoModel, AutoTokenizer

    from edu_filter.classifiers.modeling_edu_classifier import EduClassifierConfig, EduClassifierForSequenceClassification
    from edu_filter.classifiers.scorer import EduScorer
    from edu_filter.train import finetune

    encoder = AutoModel.from_pretrained(minilm_path)
    model = EduClassifierForSequenceClassification(EduClassifierConfig(encoder_config=encoder.config.to_dict()), encoder)
    scorer = EduScorer(model.eval(), AutoTokenizer.from_pretrained(minilm_path), max_length=16)
    texts = [f"document number {i}" for i in range(10)]
    monkeypatch.setattr(finetune, "VALIDATION_WINDOW", 4)
    stop, windows = threading.Event(), []
    score = scorer.predict_many

    def scored_then_stopped(batch, *args, **kwargs):  # a SIGTERM arriving while the first window is scored
        windows.append(len(batch))
        stop.set()
        return score(batch, *args, **kwargs)

    whole = finetune._scores_unless_stopped(scorer, texts, threading.Event())
    assert np.allclose(whole, score(texts)[0], atol=1e-5)
    monkeypatch.setattr(scorer, "predict_many", scored_then_stopped)
    assert finetune._scores_unless_stopped(scorer, texts, stop) is None and windows == [4]


def test_a_validation_point_a_sigterm_cut_short_is_measured_when_the_run_resumes(tmp_path, minilm_path):
    """A SIGTERM during the pass at step 2 saved the checkpoint at step 2 without its point; the resumed run skipped
    every step up to 2, and the point was never measured."""
    from transformers import AutoModel, AutoTokenizer

    from edu_filter.classifiers.modeling_edu_classifier import EduClassifierConfig, EduClassifierForSequenceClassification
    from edu_filter.classifiers.scorer import EduScorer
    from edu_filter.train.classifier import ClassifierTrainConfig
    from edu_filter.train.finetune import _save, finetune, validation_key

    encoder = AutoModel.from_pretrained(minilm_path)
    model = EduClassifierForSequenceClassification(EduClassifierConfig(encoder_config=encoder.config.to_dict()), encoder)
    scorer = EduScorer(model, AutoTokenizer.from_pretrained(minilm_path), max_length=16)
    texts, y = [f"training document {i}" for i in range(20)], np.arange(20) % 6
    validation = ([f"held-out document {i}" for i in range(6)], np.arange(6) % 6, None)
    cfg = ClassifierTrainConfig(kind="code", epochs=1, train_batch_size=4)  # 5 steps: points at 1, 2, 3 and 4
    optimizer = torch.optim.AdamW([{"params": list(model.encoder.parameters())},
                                   {"params": list(model.classifier.parameters())}])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    checkpoint = tmp_path / "checkpoint"
    _save(checkpoint, model, optimizer, schedule, 2, torch.device("cpu"), [{"step": 1, "mse": 1.0, "spearman": 0.1}],
          validation_key(*validation))  # stopped during the pass at step 2
    history = finetune(scorer, texts, y, cfg, checkpoint=checkpoint, validation=validation)
    assert [point["step"] for point in history] == [1, 2, 3, 4]


def test_bfloat16_training_computes_in_bfloat16_caches_apart_and_saves_float32(tmp_path, minilm_path):
    """On a GPU the encoder computes in bfloat16 while training (as apply scores there); on a CPU it may be asked
    for. Its vectors are close to float32's but cached apart, fine-tuning trains under autocast, and the saved
    weights stay float32."""
    from safetensors import safe_open

    from edu_filter.classifiers.frozen_encoder import load_frozen_encoder
    from edu_filter.train.classifier import train_classifier

    texts = [r["text"] for r in read_documents([WEB_TRAIN], label_field="score")[:6]]
    options = {"encoder": minilm_path, "max_length": 64, "cache_dir": str(tmp_path / "cache")}
    default, exact, bf16 = (load_frozen_encoder(**options, dtype=d) for d in (None, "float32", "bfloat16"))
    assert default.dtype == "float32" and default.key == exact.key  # on a CPU; existing caches stay valid
    assert bf16.key != exact.key
    a, b = exact.embed(texts), bf16.embed(texts)
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() > 0.99 and np.abs(a - b).max() > 1e-3  # bfloat16's own vectors, not float32's cached ones
    with pytest.raises(ValueError, match="--dtype must be one of float32, bfloat16"):
        load_frozen_encoder(**options, dtype="float16")

    out = tmp_path / "ft"
    metrics = train_classifier([str(CODE_LABELS)], out, kind="code", method="finetune", max_length=32, limit=20,
                               epochs=1, train_batch_size=8, val_fraction=0.2, dtype="bfloat16",
                               learning_curve=False, **{k: v for k, v in options.items() if k != "max_length"})
    assert metrics["training"]["dtype"] == "bfloat16" and np.isfinite(metrics["mse"])  # what the encoder ran in
    with safe_open(out / "model.safetensors", "pt") as saved:
        assert {saved.get_tensor(name).dtype for name in saved.keys()} == {torch.float32}
    with pytest.raises(ValueError, match="--dtype"):
        train_classifier([str(CODE_LABELS)], tmp_path / "x", kind="code", method="head", dtype="half")


def test_a_diverged_training_stops_and_saves_nothing(tmp_path, minilm_path, embedding_cache_dir, monkeypatch):
    """A fine-tune whose loss went NaN trained on for hours; its NaN predictions made NaN cut points, apply then
    removed every document, and metrics.json said Spearman NaN with no warning."""
    from edu_filter.classifiers.metrics import metric_warnings
    from edu_filter.documents import RunError
    from edu_filter.train import classifier
    from edu_filter.train.classifier import train_classifier

    out = tmp_path / "m"
    options = dict(kind="code", encoder=minilm_path, max_length=16, limit=24, val_fraction=0.2, learning_curve=False,
                   cache_dir=str(embedding_cache_dir))
    with pytest.raises(RunError, match=r"fine-tuning diverged at step \d: the loss is nan"):
        train_classifier([str(CODE_LABELS)], out, method="finetune", epochs=3, train_batch_size=4,
                         learning_rate=1e9, **options)
    assert not out.exists()
    # a model whose validation predictions are not numbers (a head or fine-tune that overflows in its dtype)
    method = classifier.train_method

    def overflowing(*args, **kwargs):
        trained = method(*args, **kwargs)
        trained.val_pred[1] = np.nan
        return trained

    monkeypatch.setattr(classifier, "train_method", overflowing)
    with pytest.raises(RunError, match="gives 1 of 5 validation documents a score that is not a number"):
        train_classifier([str(CODE_LABELS)], out, **options)
    assert not out.exists()
    assert "undefined" in metric_warnings({"spearman": float("nan")}, np.arange(6).repeat(10), "code")[0]


def test_embedding_cache_is_reused(tmp_path, minilm_path, monkeypatch, capsys):
    from transformers import AutoModel, AutoTokenizer

    from edu_filter.classifiers import embeddings

    from edu_filter.classifiers.embeddings import EmbeddingCache, cached_embeddings, text_hash
    from edu_filter.classifiers.modeling_edu_classifier import EduClassifierConfig, EduClassifierForSequenceClassification

    encoder = AutoModel.from_pretrained(minilm_path)
    model = EduClassifierForSequenceClassification(EduClassifierConfig(encoder_config=encoder.config.to_dict()), encoder)
    scorer = EduScorer(model, AutoTokenizer.from_pretrained(minilm_path), max_length=64)
    texts = ["Fractions name parts of a whole.", "Cheap flights!", "Fractions name parts of a whole."]
    cache = EmbeddingCache(tmp_path)
    monkeypatch.setattr(embeddings, "CACHE_REPORT_BYTES", 1000)  # 20 GB for a 1M pool: said where, and how big
    first = cached_embeddings(scorer, texts, "k1", cache)
    assert f"GB in {cache.path} (delete it to free the space" in " ".join(capsys.readouterr().err.split())
    np.testing.assert_allclose(first, scorer.embed(texts)[0], atol=1e-5)
    assert np.array_equal(first[0], first[2])
    # everything is cached now: no encoder is needed at all (None would fail if it were called)
    np.testing.assert_array_equal(cached_embeddings(None, texts, "k1", EmbeddingCache(tmp_path)), first)
    with pytest.raises(AttributeError):
        cached_embeddings(None, texts, "another-setting", cache)

    # block by block: a run interrupted in its second block keeps the first block's vectors
    class InterruptedSecondBlock:
        prepare_in_background = False
        calls = 0

        def prepare_embedding(self, block_texts):
            return scorer.prepare_embedding(block_texts)

        def embed_prepared(self, prepared):
            self.calls += 1
            if self.calls == 2:
                raise KeyboardInterrupt
            return scorer.embed_prepared(prepared)

    more = [f"Lesson {i}: how plants make sugar from light." for i in range(5)]
    with pytest.raises(KeyboardInterrupt):
        cached_embeddings(InterruptedSecondBlock(), more, "k2", cache, block=2)
    assert len(cache.get("k2", [text_hash(t) for t in more])) == 2
    np.testing.assert_allclose(cached_embeddings(scorer, more, "k2", cache, block=2), scorer.embed(more)[0], atol=1e-5)

    # as on a GPU: a thread tokenizes the next block while this one is embedded, with the same vectors
    import threading

    class TokenizingAside:
        prepare_in_background = True

        def __init__(self):
            self.threads = set()

        def prepare_embedding(self, block_texts):
            self.threads.add(threading.get_ident())
            return scorer.prepare_embedding(block_texts)

        def embed_prepared(self, prepared):
            return scorer.embed_prepared(prepared)

    aside = TokenizingAside()
    others = [f"Chapter {i}: the water cycle, step by step." for i in range(7)]
    np.testing.assert_allclose(cached_embeddings(aside, others, "k3", None, block=2), scorer.embed(others)[0],
                               atol=1e-5)
    assert aside.threads and threading.get_ident() not in aside.threads


def test_cached_vectors_are_placed_a_part_at_a_time(tmp_path):
    """The whole cache's answer was held as a dict beside the result: twice the embeddings' memory (18 GB instead of
    9 at 500k labels). Parts are placed as they are read. (All vectors cached: the scorer is never asked.)"""
    import tracemalloc

    from edu_filter.classifiers import embeddings

    texts = [f"document {i}" for i in range(20_000)]
    vectors = np.random.default_rng(0).normal(size=(len(texts), 384)).astype(np.float32)
    cache = embeddings.EmbeddingCache(tmp_path)
    cache.put("k", {embeddings.text_hash(t): v for t, v in zip(texts, vectors)})
    tracemalloc.start()
    out = embeddings.cached_embeddings(None, texts, "k", cache)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    np.testing.assert_array_equal(out, vectors)
    assert peak < 1.3 * out.nbytes, peak / out.nbytes


def test_embeddings_past_the_free_memory_are_mapped_from_a_file_that_vanishes_with_the_process(tmp_path, capsys):
    """A pool of 1M documents held 17 GB of vectors in memory (10M: 172 GB) before `score --select active` chose
    anything: past half the free memory they are mapped from an unnamed file beside the cache, the same values."""
    import subprocess
    import sys

    from edu_filter.classifiers import embeddings

    texts = [f"document {i}" for i in range(3000)]
    vectors = np.random.default_rng(0).normal(size=(len(texts), 384)).astype(np.float32)
    cache = embeddings.EmbeddingCache(tmp_path)
    cache.put("k", {embeddings.text_hash(t): v for t, v in zip(texts, vectors)})
    mapped = embeddings.cached_embeddings(None, texts, "k", cache, in_memory_bytes=vectors.nbytes - 1)
    assert isinstance(mapped, np.memmap) and np.array_equal(mapped, vectors)
    assert "embeddings: 0.0 GB, more than half the free memory: mapped from a file" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["embeddings.sqlite"]  # no name left behind
    held = embeddings.cached_embeddings(None, texts, "k", cache, in_memory_bytes=vectors.nbytes)
    assert not isinstance(held, np.memmap) and np.array_equal(held, vectors)
    with pytest.raises(OSError, match="do not fit in memory .* nor on the disk of"):
        embeddings.result_array(10**9, 10**6, tmp_path, 0)  # 4 PB
    blocked = tmp_path / "a-file"
    blocked.write_text("")  # a cache folder that cannot be made (as on a read-only disk): the system's temp folder
    assert embeddings.result_array(10, 4, blocked / "cache", 0).shape == (10, 4)
    # killed with the file mapped: nothing is left on the disk
    killed = subprocess.run([sys.executable, "-c", "import os, signal, numpy as np; from pathlib import Path; "
                             "from edu_filter.classifiers.embeddings import result_array; "
                             f"x = result_array(1000, 384, Path({str(tmp_path / 'spill')!r}), 0); x[:] = 1; "
                             "os.kill(os.getpid(), signal.SIGKILL)"], capture_output=True, text=True)
    assert killed.returncode == -9 and list((tmp_path / "spill").iterdir()) == [], killed.stderr


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_free_memory_is_what_the_control_group_leaves(tmp_path, version):
    """A Slurm job given --mem=64G on a node with 1 TB free: the node's MemAvailable said a 172 GB pool fitted, and
    the job's control group killed it. Slurm sets the limit on the job's group and runs the task in one below it
    that says "max": only the task's own group was read. (A /proc and a cgroup tree laid out as the kernel shows
    them.)"""
    from edu_filter.classifiers.embeddings import available_memory

    proc, groups = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(f"MemTotal: {2**30} kB\nMemAvailable: {2**30 - 1024} kB\n")  # ~1 TB
    job, task = "/system.slice/slurmstepd.scope/job_42", "/step_0/user/task_0"
    no_limit = "max\n" if version == "v2" else "9223372036854771712\n"
    if version == "v2":
        (proc / "self/cgroup").write_text(f"0::{job}{task}\n")
        place, files = groups / job.lstrip("/"), ("memory.max", "memory.current")
    else:
        (proc / "self/cgroup").write_text(f"5:devices:/\n4:memory:{job}{task}\n0::/\n")
        place, files = groups / "memory" / job.lstrip("/"), ("memory.limit_in_bytes", "memory.usage_in_bytes")
    (place / task.lstrip("/")).mkdir(parents=True)
    for below in (place / "step_0", place / "step_0/user", place / task.lstrip("/")):
        (below / files[0]).write_text(no_limit)
        (below / files[1]).write_text(f"{2**30}\n")
    (place / files[0]).write_text(f"{64 * 2**30}\n")
    (place / files[1]).write_text(f"{4 * 2**30}\n")
    assert available_memory(str(proc), str(groups)) == 60 * 2**30
    (place / task.lstrip("/") / files[0]).write_text(f"{8 * 2**30}\n")  # the tightest of them
    assert available_memory(str(proc), str(groups)) == 7 * 2**30
    (place / task.lstrip("/") / files[0]).write_text(no_limit)
    (place / files[0]).write_text(no_limit)  # no limit
    assert available_memory(str(proc), str(groups)) == (2**30 - 1024) * 1024


def test_pooled_layers_are_the_encoders_hidden_states_pooled_without_keeping_them(minilm_path):
    """Pooling each layer as its block returns gives exactly what pooling the encoder's own hidden states gives
    (embeddings, middle layers, the top; padded rows and an unpadded batch), and leaves no hook behind, even when the
    forward fails (a batch out of memory is retried in halves)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from edu_filter.classifiers.modeling_edu_classifier import (
        EduClassifierConfig, EduClassifierForSequenceClassification, pool,
    )

    encoder = AutoModel.from_pretrained(minilm_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    blocks = encoder.encoder.layer

    def hooks():  # transformers keeps hooks of its own once hidden states were asked for
        return [(len(b._forward_hooks), len(b._forward_pre_hooks)) for b in blocks]

    batch = tokenizer(["Fractions name parts of a whole.", "Cheap flights to anywhere, book now and save big!!"],
                      padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()
    asked = []  # what the model asks the encoder for
    encoder.register_forward_pre_hook(lambda m, args, kwargs: asked.append(kwargs.get("output_hidden_states")),
                                      with_kwargs=True)
    for layers, pooling in (([0, 3, 6], "mean"), ([1, 2, 3, 4, 5, 6], "mean"), ([2, -1], "cls")):
        model = EduClassifierForSequenceClassification(
            EduClassifierConfig(encoder_config=encoder.config.to_dict(), pool_layers=layers, pooling=pooling), encoder)
        for mask in (batch["attention_mask"], None):
            ids = batch["input_ids"] if mask is not None else batch["input_ids"][:, :5]
            with torch.no_grad():
                hidden = encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
                full_mask = mask if mask is not None else torch.ones_like(ids)
                expected = torch.cat([pool(hidden[i], full_mask, pooling) for i in layers], dim=-1)
                before, asked[:] = hooks(), []
                torch.testing.assert_close(model.embed(ids, mask), expected, rtol=0, atol=1e-6)
                assert hooks() == before and asked == [None]  # one pass, not asked to keep its hidden states
    with pytest.raises(IndexError, match="0..6"), torch.no_grad():  # MiniLM has hidden states 0-6
        EduClassifierForSequenceClassification(EduClassifierConfig(
            encoder_config=encoder.config.to_dict(), pool_layers=[2, 7]), encoder).embed(batch["input_ids"])

    def out_of_memory(block, args, output):
        raise torch.OutOfMemoryError("CUDA out of memory")

    failing = blocks[4].register_forward_hook(out_of_memory)
    before = hooks()
    with pytest.raises(torch.OutOfMemoryError), torch.no_grad():
        model.embed(batch["input_ids"], batch["attention_mask"])
    assert hooks() == before
    failing.remove()


def test_a_locked_embedding_cache_is_a_warning_not_a_failed_run(tmp_path, minilm_path, monkeypatch, capsys):
    """Trainers sharing one cache (a home folder on a cluster): a lock held past the timeout skips the cache for the
    rest of the run instead of failing it after the embeddings were computed."""
    import sqlite3

    from transformers import AutoModel, AutoTokenizer

    from edu_filter.classifiers import embeddings
    from edu_filter.classifiers.modeling_edu_classifier import EduClassifierConfig, EduClassifierForSequenceClassification

    encoder = AutoModel.from_pretrained(minilm_path)
    model = EduClassifierForSequenceClassification(EduClassifierConfig(encoder_config=encoder.config.to_dict()), encoder)
    scorer = EduScorer(model, AutoTokenizer.from_pretrained(minilm_path), max_length=64)
    texts = [f"Lesson {i}: how plants make sugar from light." for i in range(4)]
    monkeypatch.setattr(embeddings, "LOCK_TIMEOUT_S", 0.2)
    cache = embeddings.EmbeddingCache(tmp_path)
    other = sqlite3.connect(tmp_path / "embeddings.sqlite", isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")  # another trainer writing
    vectors = embeddings.cached_embeddings(scorer, texts, "k", cache, block=2)
    np.testing.assert_allclose(vectors, scorer.embed(texts)[0], atol=1e-5)
    warning = capsys.readouterr().err
    assert warning.count("warning: embedding cache") == 1 and "locked" in warning and "--cache-dir" in warning
    other.execute("COMMIT")
    other.close()
    fresh = embeddings.EmbeddingCache(tmp_path)  # the next run uses it again
    embeddings.cached_embeddings(scorer, texts, "k", fresh)
    assert len(fresh.get("k", [embeddings.text_hash(t) for t in texts])) == 4 and fresh.unusable is None


def test_default_encoder_falls_back_offline_with_one_line_notice(capsys, monkeypatch, minilm_path):
    from edu_filter.classifiers import encoders

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert encoders.resolve_encoder("code") == minilm_path
    notice = capsys.readouterr().err.strip()
    assert "bigcode/starencoder" in notice and "all-MiniLM-L6-v2" in notice and len(notice.splitlines()) == 1
    assert encoders.resolve_encoder("web", "my/encoder") == "my/encoder"
    with pytest.raises(ValueError, match="kind"):
        encoders.resolve_encoder("images")


HUB_ANSWERS = """
import http.server, os, subprocess, sys, threading
class Hub(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(int(sys.argv[1]))
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"error": "planned"}')
    do_HEAD = do_GET
    def log_message(self, *args):
        pass
hub = http.server.HTTPServer(("127.0.0.1", 0), Hub)
threading.Thread(target=hub.serve_forever, daemon=True).start()
port = hub.server_port if sys.argv[1] != "0" else 9  # 0: nothing listens (the discard port)
env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0",
       "HF_HOME": sys.argv[2]}
run = subprocess.run([sys.executable, "-c", "from edu_filter.classifiers.encoders import resolve_encoder; "
                      "print(resolve_encoder('web'))"], env=env, capture_output=True, text=True, timeout=120)
print(run.returncode, run.stdout.strip(), " ".join(run.stderr.split())[-600:])
"""


@pytest.mark.parametrize("status", [0, 401, 500])
def test_the_default_encoder_falls_back_only_where_the_hub_is_out_of_reach(status, tmp_path, minilm_path):
    """Any hub failure (a 429, a 5xx, a gated repository, a full disk) trained on all-MiniLM-L6-v2 instead of the
    kind's encoder behind one yellow line. A hub on 127.0.0.1 that answers with an error, and an address nothing
    listens on, stand for the two."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", HUB_ANSWERS, str(status), str(tmp_path / "hf")], capture_output=True,
                         text=True, timeout=300)
    code, said = run.stdout.split(" ", 1)
    if status == 0:
        assert code == "0" and said.startswith(minilm_path), said
        assert "Snowflake/snowflake-arctic-embed-m unavailable (download failed" in said
    else:
        assert code == "1" and f"{status}" in said and "could not be downloaded" in said, said
        assert "HF_HUB_OFFLINE=1" in said


def test_a_refused_connection_wrapped_as_an_http_error_is_the_hub_out_of_reach():
    """huggingface_hub before 1.0 wraps a refused connection in a LocalEntryNotFoundError that is an HfHubHTTPError
    (its class tree rebuilt here): read as the hub answering, an offline machine's `train` stopped instead of falling
    back."""
    from edu_filter.classifiers.encoders import _hub_out_of_reach

    class HfHubHTTPError(OSError):
        pass

    class LocalEntryNotFoundError(HfHubHTTPError, FileNotFoundError):
        pass

    def wrapped(cause: BaseException) -> BaseException:
        try:
            try:
                raise cause
            except OSError as e:
                raise LocalEntryNotFoundError("cannot find the requested files") from e
        except LocalEntryNotFoundError as e:
            return e

    assert _hub_out_of_reach(wrapped(ConnectionRefusedError(111, "Connection refused")))
    assert not _hub_out_of_reach(wrapped(HfHubHTTPError("500 Server Error")))


def test_framing_for_a_tokenizer_without_special_tokens(tmp_path):
    """starencoder-like: a GPT-2 style BPE that adds no special tokens and has no pad token, [CLS]/[SEP] in vocab."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from edu_filter.classifiers.encoders import SequenceFramer, prepare_tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "[PAD]", "[CLS]", "[SEP]", "[MASK]"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    bpe.train_from_iterator(["def f(x):\n    return x + 1\n"] * 20, trainer=trainer)
    tokenizer = prepare_tokenizer(PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>"))
    vocab = tokenizer.get_vocab()
    assert tokenizer.pad_token == "[PAD]"
    framer = SequenceFramer(tokenizer)
    ids = tokenizer("return x", add_special_tokens=False)["input_ids"]
    assert framer(ids) == [vocab["[CLS]"], *ids, vocab["[SEP]"]] and framer.num_special == 2


def test_framing_for_bert(minilm_path):
    from transformers import AutoTokenizer

    from edu_filter.classifiers.encoders import SequenceFramer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    framer = SequenceFramer(tokenizer)
    ids = tokenizer("hello world", add_special_tokens=False)["input_ids"]
    assert framer(ids) == tokenizer("hello world")["input_ids"] and framer.num_special == 2


TRANSFORMERS_FILES = ("config.json", "model.safetensors", "modeling_edu_classifier.py", "tokenizer_config.json")
FASTTEXT_FILES = ("model.bin", "fasttext_config.json")


def quick_fasttext(out: Path, **kwargs) -> dict:
    from edu_filter.classifiers.fasttext_model import FastTextSettings
    from edu_filter.train.classifier import train_classifier

    return train_classifier([str(CODE_LABELS)], out, kind="code", method="fasttext", limit=120, learning_curve=False,
                            fasttext=FastTextSettings(epoch=3, max_chars=2000), **kwargs)


def quick_head(out: Path, encoder: str, cache_dir: Path, **kwargs) -> dict:
    from edu_filter.train.classifier import train_classifier

    return train_classifier([str(CODE_LABELS)], out, kind="code", encoder=encoder, max_length=32, limit=60,
                            learning_curve=False, cache_dir=str(cache_dir), val_fraction=0.2, **kwargs)


def test_a_lock_that_cannot_be_made_is_said_and_the_run_goes_on(tmp_path, capsys):
    """An output handed out inside a folder this user cannot write: making the lock beside it failed the run, after
    the output itself had been found writable."""
    from edu_filter.documents import held_alone, writing_alone

    (tmp_path / "a-file").write_text("")
    with held_alone(tmp_path / "a-file" / ".out.lock", str) as no_lock:
        assert isinstance(no_lock, OSError)
    ran = []
    with writing_alone(tmp_path / "out", lock=tmp_path / "a-file" / ".out.lock"):
        ran.append(True)
    assert ran and "nothing stops a second run" in capsys.readouterr().err


def test_a_second_train_into_a_folder_being_written_is_refused_naming_the_first(tmp_path):
    """Two runs into one -o (a job resubmitted while the first runs): the second replaced the first's model, and the
    first, ending its learning curve, wrote its metrics, card and provenance beside the other's weights."""
    import re

    from edu_filter.documents import RunError, writing_alone
    from edu_filter.train.classifier import train_classifier

    out = tmp_path / "model"
    with writing_alone(out):  # the first run, holding it
        with pytest.raises(RunError, match=re.escape(f"-o/--output {out} is being written by another run (process "
                                                     f"{os.getpid()}")):
            train_classifier([str(CODE_LABELS)], out, kind="code", method="fasttext", limit=40)
    assert not out.exists()


def test_a_model_whose_learning_curve_was_cut_short_is_said_to_be_finished(tmp_path):
    """A run stopped during its learning curve (hours at 450k labels) leaves a saved, usable model: the same command
    was refused as for any model, which read as if the training had been lost."""
    from edu_filter.train.classifier import check_output

    out = tmp_path / "model"
    out.mkdir()
    for name in ("config.json", "provenance.json", "README.md"):
        (out / name).write_text("{}")
    metrics = {"mse": 0.5, "training": {"config": {"learning_curve": True}}}
    (out / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(ValueError, match="holds a finished model whose learning curve was cut short .* usable"):
        check_output(out, overwrite=False)
    (out / "metrics.json").write_text(json.dumps({**metrics, "learning_curve": {"points": []}}))
    with pytest.raises(ValueError, match="already holds a model; give --overwrite"):
        check_output(out, overwrite=False)
    check_output(out, overwrite=True)


def test_a_model_saved_without_its_record_is_not_taken_for_a_finished_one(tmp_path):
    """A run killed (or out of disk) between saving the model and writing metrics.json, provenance.json and the
    card left a loadable model that the same command refused as finished: applied or pushed with no metrics, no
    lineage and no card."""
    from edu_filter.train.classifier import check_output

    out = tmp_path / "model"
    quick_fasttext(out)
    check_output(out, overwrite=True)
    with pytest.raises(ValueError, match="already holds a model; give --overwrite"):
        check_output(out, overwrite=False)
    for name in ("README.md", "provenance.json", "metrics.json"):  # the card is written last
        (out / name).unlink()
        with pytest.raises(ValueError, match=f"a model whose run stopped before writing its record .*{name}.* "
                                             "--overwrite trains it again"):
            check_output(out, overwrite=False)
    check_output(out, overwrite=True)


@pytest.mark.slow
def test_an_occupied_output_is_refused_unless_overwrite_and_overwrite_leaves_no_old_file(
    tmp_path, minilm_path, embedding_cache_dir
):
    from edu_filter.train.classifier import train_classifier

    out = tmp_path / "model"
    out.mkdir()  # an empty folder is fine
    quick_fasttext(out)
    assert all((out / name).exists() for name in FASTTEXT_FILES)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    # refused before the data is read (it does not exist), the model left as it was
    with pytest.raises(ValueError, match=r"already holds a model; give --overwrite") as error:
        train_classifier(["does-not-exist.jsonl"], out, kind="code", method="fasttext")
    assert str(out) in str(error.value) and "\n" not in str(error.value)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    # what is not a model's is never removed: --overwrite is refused, naming it, before any work
    (out / "notes-of-the-old-run.txt").write_text("the old model's")
    with pytest.raises(ValueError, match=r"holds a model and notes-of-the-old-run\.txt, which are not a model's"):
        quick_head(out, minilm_path, embedding_cache_dir, overwrite=True)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name in before} == before
    (out / "notes-of-the-old-run.txt").unlink()
    # fastText replaced by a head model: nothing of the fastText model stays
    metrics = quick_head(out, minilm_path, embedding_cache_dir, overwrite=True)
    assert metrics["training"]["method"] == "head"
    assert not any((out / name).exists() for name in FASTTEXT_FILES)
    assert all((out / name).exists() for name in TRANSFORMERS_FILES)
    assert type(load_scorer(out)) is EduScorer

    # and back: no transformers file stays beside the fastText model
    metrics = quick_fasttext(out, overwrite=True)
    assert metrics["training"]["method"] == "fasttext"
    assert not any((out / name).exists() for name in TRANSFORMERS_FILES + ("tokenizer.json", "vocab.txt"))
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*FASTTEXT_FILES, "metrics.json", "confusion_matrix.png", "provenance.json", "README.md", "trained_texts.npy"])
    assert json.loads((out / "metrics.json").read_text())["training"]["method"] == "fasttext"

    # a disk that fills while the model is saved (a file-size limit stands in): one error line, and the model
    # there stays whole. The save was written in place: a head's folder was left with config.json alone (apply
    # ran the whole dedup before failing), the old model deleted first; fastText reported no failed write, and its
    # cut-short model.bin scored every document NaN (apply removed them all, train exited 0)
    def full_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, 4 << 20))

    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for args in (["--encoder", minilm_path, "--max-length", "32", "--cache-dir", str(embedding_cache_dir),
                  "--overwrite"], ["--method", "fasttext"]):
        target = out if "--overwrite" in args else tmp_path / "new-model"
        proc = subprocess.run([CLI, "train", str(CODE_LABELS), "-o", str(target), "--kind", "code", "--limit", "60",
                               "--no-learning-curve", *args], capture_output=True, text=True, preexec_fn=full_disk,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert proc.stderr.strip().splitlines()[-1].startswith("error: "), proc.stderr[-3000:]
        assert not target.with_name(target.name + ".partial").exists()
    assert "not written whole" in proc.stderr and not target.exists()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # the output may be the working directory (or a mount point), which cannot be renamed: saved inside it; what a
    # save cut short left there is no file of the user's
    here = tmp_path / "here"
    (here / ".saving").mkdir(parents=True)
    proc = subprocess.run([CLI, "train", str(CODE_LABELS), "-o", ".", "--kind", "code", "--limit", "60",
                           "--no-learning-curve", "--method", "fasttext"], capture_output=True, text=True, cwd=here,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in here.iterdir()) == sorted(
        [*FASTTEXT_FILES, "metrics.json", "confusion_matrix.png", "provenance.json", "README.md", "trained_texts.npy"])


def test_overwrite_never_empties_a_folder_that_holds_no_model(tmp_path):
    from edu_filter.train.classifier import train_classifier

    folder = tmp_path / "my-project"
    folder.mkdir()
    (folder / "data.jsonl").write_text("{}\n")
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="is not empty and holds no model .*data.jsonl"):
            train_classifier([str(CODE_LABELS)], folder, kind="code", method="fasttext", overwrite=overwrite)
    assert [p.name for p in folder.iterdir()] == ["data.jsonl"]
    # a model kept beside the labels it was trained on, retrained into the same folder: the labels, notes and
    # subfolders were deleted with the old model
    (folder / "config.json").write_text("{}")
    (folder / "sub").mkdir()
    with pytest.raises(ValueError, match=r"data\.jsonl lies inside the output folder"):
        train_classifier([str(folder / "data.jsonl")], folder, kind="code", method="fasttext", overwrite=True)
    with pytest.raises(ValueError, match=r"holds a model and data\.jsonl, sub/, which are not a model's"):
        train_classifier([str(CODE_LABELS)], folder, kind="code", method="fasttext", overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "data.jsonl", "sub"]
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ValueError, match="is a file"):
        train_classifier([str(CODE_LABELS)], tmp_path / "a-file", kind="code", method="fasttext")


@pytest.mark.parametrize("option, value, method", [
    ("encoder", "some/encoder", "fasttext"),
    ("pool_layers", [2, 4], "fasttext"),
    ("long_docs", "chunk-mean", "fasttext"),
    ("max_length", 128, "fasttext"),
    ("cache_dir", "/tmp/cache", "fasttext"),
    ("epochs", 5, "fasttext"),
    ("learning_rate", 1e-4, "head"),
    ("epochs", 1, "head"),
    ("fasttext", "settings", "head"),
    ("fasttext", "settings", "finetune"),
])
def test_options_the_method_would_ignore_are_refused_before_any_work(tmp_path, option, value, method):
    from edu_filter.classifiers.fasttext_model import FastTextSettings
    from edu_filter.train.classifier import train_classifier

    value = FastTextSettings(epoch=3) if value == "settings" else value
    with pytest.raises(ValueError, match=rf"^{option} does not apply to method {method} \(only to ") as error:
        train_classifier(["does-not-exist.jsonl"], tmp_path / "m", method=method, **{option: value})
    assert "\n" not in str(error.value)
    assert not (tmp_path / "m").exists()


def test_finetuning_for_chunk_mean_scoring_is_refused_before_any_work(tmp_path):
    """Fine-tuning reads each document's first max_length tokens; a model saved to score the mean of every chunk
    would be used on another view of the documents than the one it learned."""
    from edu_filter.train.classifier import train_classifier

    with pytest.raises(InputError, match="--long-docs chunk-mean with --method finetune: .*--long-docs truncate"):
        train_classifier([str(WEB_TRAIN)], tmp_path / "m", method="finetune", long_docs="chunk-mean")
    assert not (tmp_path / "m").exists()


def test_defaults_given_explicitly_are_not_refused(tmp_path):
    """The CLI passes every option's default whatever the method: only values that differ are refused."""
    from edu_filter.documents import DocumentError
    from edu_filter.train.classifier import train_classifier

    cli_defaults = {"encoder": None, "max_length": 512, "long_docs": "truncate", "pool_layers": None, "epochs": 2,
                    "learning_rate": 3e-5, "cache_dir": None, "weight_field": "weight", "learning_curve": True}
    for method in ("head", "finetune", "fasttext"):
        with pytest.raises(DocumentError, match="does-not-exist.jsonl: no such file"):  # got as far as reading
            train_classifier(["does-not-exist.jsonl"], tmp_path / "m", method=method, **cli_defaults)
    with pytest.raises(ValueError, match="^val_fraction does not apply when validation data is given"):
        train_classifier(["does-not-exist.jsonl"], tmp_path / "m", val=["v.jsonl"], val_fraction=0.3)
    with pytest.raises(ValueError, match="^curve_repeats does not apply without a learning curve"):
        train_classifier(["does-not-exist.jsonl"], tmp_path / "m", learning_curve=False, curve_repeats=3)


@pytest.mark.parametrize("names_a_length", [True, False])
def test_a_roberta_encoder_reads_the_512_tokens_its_514_positions_allow(tmp_path, minilm_path, names_a_length):
    """RoBERTa-family encoders have 2 more positions than tokens (offset by the padding index): capped at the
    positions, 514 tokens ran past the table and every long document failed. A tokenizer that names no length
    (transformers gives it 1e30) let 514 through to the encoder: training died in its embeddings."""
    from transformers import AutoTokenizer, RobertaConfig, RobertaModel

    from edu_filter.classifiers.frozen_encoder import load_frozen_encoder

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    tokenizer.model_max_length = 512 if names_a_length else int(1e30)
    config = RobertaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=514,
                           pad_token_id=tokenizer.pad_token_id if names_a_length else 1)
    RobertaModel(config).save_pretrained(tmp_path / "roberta")
    tokenizer.save_pretrained(tmp_path / "roberta")
    frozen = load_frozen_encoder("web", str(tmp_path / "roberta"), max_length=1024, cache_dir=str(tmp_path / "c"))
    assert frozen.max_length == 512
    vectors = frozen.embed(["word " * 2000])  # far longer than 512 tokens
    assert vectors.shape == (1, 32 * len(frozen.pool_layers)) and np.isfinite(vectors).all()


def test_an_encoder_trained_in_place_does_not_reuse_the_old_ones_cached_vectors(tmp_path, minilm_path):
    """The cache key read each weights file's size and first MiB (the embeddings): a checkpoint whose deeper layers
    changed at the same path kept the key, and the old vectors were served as its own."""
    import shutil

    import torch
    from transformers import AutoModel

    from edu_filter.classifiers.encoders import encoder_identity

    folder = tmp_path / "encoder"
    shutil.copytree(minilm_path, folder)
    before = encoder_identity(str(folder))
    assert encoder_identity(str(folder)) == before  # stable
    model = AutoModel.from_pretrained(folder)
    with torch.no_grad():
        model.encoder.layer[-1].output.dense.weight.add_(0.01)  # continued training, deep layers only
    model.save_pretrained(folder)
    assert encoder_identity(str(folder)) != before
    # one small tensor changed and saved in place (a bias): the sampled blocks all missed it
    before = encoder_identity(str(folder))
    with torch.no_grad():
        model.encoder.layer[3].attention.output.LayerNorm.bias.add_(0.5)
    model.save_pretrained(folder)
    assert encoder_identity(str(folder)) != before
    before = encoder_identity(str(folder))  # the tokenizer changed: every vector changes
    cased = (folder / "tokenizer_config.json").read_text().replace('"do_lower_case": true', '"do_lower_case": false')
    assert '"do_lower_case": false' in cased
    (folder / "tokenizer_config.json").write_text(cased)
    assert encoder_identity(str(folder)) != before


def test_a_hub_encoder_updated_since_does_not_reuse_the_old_commits_vectors(tmp_path, minilm_path, monkeypatch):
    """A hub encoder was keyed by its name alone: after the repository moved on, the cache served the vectors of
    the old weights. The key names the commit the cached files come from (hub cache layout, read offline)."""
    import shutil

    from huggingface_hub import constants

    from edu_filter.classifiers.encoders import encoder_identity

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    repo = tmp_path / "hub" / "models--edu--encoder"
    (repo / "refs").mkdir(parents=True)
    for commit in ("1" * 40, "2" * 40):
        shutil.copytree(minilm_path, repo / "snapshots" / commit)
        (repo / "refs" / "main").write_text(commit)
        assert encoder_identity("edu/encoder") == f"edu/encoder@{commit}"
    assert encoder_identity("edu/not-cached") == "edu/not-cached"
    # and the classifier trained on it records that commit: by the name alone, an update was invisible to lineage
    from edu_filter.train.classifier import train_classifier

    train_classifier([str(CODE_LABELS)], tmp_path / "model", kind="code", encoder="edu/encoder", max_length=32,
                     limit=40, learning_curve=False, cache_dir=str(tmp_path / "cache"))
    recorded = json.loads((tmp_path / "model" / "provenance.json").read_text())["inputs"]
    assert [e["path"] for e in recorded if e["role"] == "encoder"] == [f"edu/encoder@{'2' * 40}"]


def test_validation_metrics_take_no_cut_point_from_the_validation_labels(tmp_path, minilm_path, embedding_cache_dir):
    """Cut points fitted on the rows they then score report an F1 no new document gets. The same model and
    validation texts with the labels shuffled among them must give the same integer scores in the metrics (the
    saved model's cut points may use every label)."""
    from edu_filter.documents import read_documents, write_documents
    from edu_filter.train.classifier import train_classifier

    val = read_documents([WEB_VAL], label_field="score", limit=150)
    labels = [r["label"] for r in val]
    shuffled = labels[50:] + labels[:50]
    predicted, how = [], []
    for name, column in (("val", labels), ("shuffled", shuffled)):
        path = write_documents([{"id": r["id"], "text": r["text"], "score": y} for r, y in zip(val, column)],
                               tmp_path / f"{name}.jsonl")
        metrics = train_classifier([str(WEB_TRAIN)], tmp_path / name, kind="web", encoder=minilm_path,
                                   max_length=64, limit=200, val=str(path), learning_curve=False,
                                   cache_dir=str(embedding_cache_dir))
        predicted.append(np.array(metrics["confusion_matrix"]).sum(axis=0).tolist())  # int scores per class
        how.append(metrics["training"].get("metric_cut_points"))
    assert predicted[0] == predicted[1]
    assert how == ["out-of-fold training predictions"] * 2


def test_a_chunk_mean_models_card_says_the_plain_recipe_reads_the_first_chunk(tmp_path, minilm_path,
                                                                           embedding_cache_dir):
    """The card gave the AutoModel recipe without a word: it scores the first chunk only, while the cut points were
    fitted on chunk-mean scores (int_score differed on 20% of long documents)."""
    from edu_filter.train.classifier import train_classifier

    options = {"encoder": minilm_path, "max_length": 64, "limit": 60, "cache_dir": str(embedding_cache_dir),
               "learning_curve": False}
    train_classifier([str(WEB_TRAIN)], tmp_path / "mean", kind="web", long_docs="chunk-mean", **options)
    train_classifier([str(WEB_TRAIN)], tmp_path / "first", kind="web", **options)
    mean, first = (" ".join((tmp_path / m / "README.md").read_text().split()) for m in ("mean", "first"))
    assert "reads each document's first 64 tokens only" in mean and "`chunk-mean` scores" in mean
    assert "first 64 tokens only" not in first


@pytest.mark.parametrize("rows, dims", [(600, 20), (30, 40)])  # the Gram fit and the direct one
def test_a_subset_fit_from_row_indices_equals_the_fit_on_a_copy_of_the_rows(rows, dims):
    """The learning curve and each active round fit a subset of the embeddings: gathered a block at a time instead
    of copied (0.8x the embeddings at the curve's largest point), with the same head and out-of-fold predictions."""
    from edu_filter.classifiers.head import RowsOf, fit_ridge_head

    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows * 2, dims)).astype(np.float32)
    y = np.clip(x[:, 0] * 1.5 + 2 + rng.normal(0, 0.3, rows * 2), 0, 5)
    subset = np.sort(rng.choice(rows * 2, rows, replace=False))
    w = rng.lognormal(0, 0.5, rows)
    for weights in (None, w):
        (a_w, a_b), a_oof, a_alpha, _ = fit_ridge_head(x[subset], y[subset], 5, 0, weights=weights)
        (b_w, b_b), b_oof, b_alpha, _ = fit_ridge_head(RowsOf(x, subset), y[subset], 5, 0, weights=weights)
        assert a_alpha == b_alpha and np.array_equal(a_w, b_w) and a_b == b_b and np.array_equal(a_oof, b_oof)


def small_bert(folder: Path, tokenizer_from: str) -> str:
    """A 2-layer BERT (random weights) with MiniLM's tokenizer: the fine-tuning loop's behaviour, not its quality,
    at a tenth of MiniLM's checkpoint (each step's save of MiniLM and its optimizer took most of a run)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=128, max_position_embeddings=512)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.mark.slow
def test_finetuning_killed_midway_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path, minilm_path):
    """50k steps at FineWeb-Edu's scale were lost whole to a kill: the same command now goes on from the last of
    its checkpoints, and ends with the weights the uninterrupted run has (the order of batches, dropout and the
    optimizer restored). SIGTERM (a Slurm time limit) saves the step it stopped at and exits 143."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    cli = str(Path(sys.executable).parent / "edu-filter")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    encoder = small_bert(tmp_path / "encoder", minilm_path)

    def command(out, cache):
        return [cli, "train", str(CODE_LABELS), "-o", str(out), "--kind", "code", "--method", "finetune",
                "--encoder", encoder, "--max-length", "32", "--limit", "60", "--epochs", "8",
                "--no-learning-curve", "--cache-dir", str(cache)]  # 32 steps: a checkpoint at every one

    clean = subprocess.run(command(tmp_path / "clean", tmp_path / "cache-clean"), env=env, capture_output=True,
                           text=True, timeout=600)
    assert clean.returncode == 0, clean.stderr[-3000:]
    weights = load_file(tmp_path / "clean" / "model.safetensors")
    cache, out = tmp_path / "cache-stopped", tmp_path / "stopped"
    last = 0
    for stop in ("SIGTERM", "SIGKILL"):  # stopped by a time limit, then killed once resumed
        run = subprocess.Popen(command(out, cache), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
        deadline, step = time.time() + 500, last
        while time.time() < deadline and run.poll() is None and step < last + 4:
            for saved in (cache / "finetune").glob("*/step.json"):
                try:
                    step = json.loads(saved.read_text())["step"]
                except (OSError, ValueError):
                    pass
            time.sleep(0.05)
        if stop == "SIGKILL":
            os.killpg(run.pid, signal.SIGKILL)
            assert run.wait() == -signal.SIGKILL
        else:
            run.send_signal(signal.SIGTERM)
            assert run.wait(timeout=120) == 128 + signal.SIGTERM
            step = json.loads(next((cache / "finetune").glob("*/step.json")).read_text())["step"]  # where it stopped
        assert last + 4 <= step < 28, (stop, step)
        assert not (out / "model.safetensors").exists()
        last = step
    (cache / "finetune" / "0123abandoned").mkdir()  # another run's, never resumed: named at the end, kept
    resumed = subprocess.run(command(out, cache), env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    said = " ".join(resumed.stdout.split() + resumed.stderr.split())
    assert "fine-tuning: resuming at step" in said and "1 checkpoint(s) of other fine-tuning runs" in said
    again = load_file(out / "model.safetensors")
    assert again.keys() == weights.keys() and all(torch.equal(weights[k], again[k]) for k in weights)
    assert [p.name for p in (cache / "finetune").iterdir()] == ["0123abandoned"]  # its own is gone
    # the validation points measured before each stop came back with the checkpoint: the same as the clean run's
    monitored = [json.loads((o / "metrics.json").read_text())["training"]["validation_during_training"]
                 for o in (tmp_path / "clean", out)]
    assert [p["step"] for p in monitored[0]] == [6, 12, 19, 25, 32] and monitored[1] == monitored[0]


def test_a_finished_finetune_names_abandoned_checkpoints_not_those_a_running_fine_tune_holds(tmp_path):
    """A run finishing named every other checkpoint folder as "killed and not resumed ... delete": a run still going
    in the same cache was among them, and deleted on that advice it started over once killed."""
    import fcntl

    from edu_filter.train import finetune

    folder = tmp_path / "finetune"
    for name in ("mine", "live", "live.partial", "dead"):
        (folder / name).mkdir(parents=True)
    (folder / "dead" / "step.json").write_bytes(b"x" * 2**20)
    (folder / "dead.lock").touch()  # its run was killed: the kernel dropped the lock
    with open(folder / "live.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with finetune.console.capture() as captured:
            finetune.remove_checkpoint(folder / "mine")
    said = " ".join(captured.get().split())
    assert "1 checkpoint(s) of other fine-tuning runs" in said and "0.0 GB" in said, said
    assert sorted(p.name for p in folder.iterdir()) == ["dead", "dead.lock", "live", "live.lock", "live.partial"]


def test_a_finetuning_checkpoint_cut_short_is_started_over_not_failed_on(tmp_path, capsys):
    """A node crash can leave renamed files that were never written out: every rerun failed on loading them."""
    from edu_filter.train.finetune import _resume, _save, validation_key

    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.AdamW(model.parameters())
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    folder = tmp_path / "finetune" / "key"
    point = {"step": 5, "mse": 0.5, "spearman": 0.6}
    validation = validation_key(["a page", "another"], [1.0, 3.0])
    _save(folder, model, optimizer, schedule, 7, torch.device("cpu"), [point], validation)
    assert _resume(folder, model, optimizer, schedule, torch.device("cpu"), validation) == (7, [point])
    # a --val file replaced before the resume: the points measured on the old one are not the new one's
    replaced = validation_key(["a page", "another"], [1.0, 4.0])
    assert _resume(folder, model, optimizer, schedule, torch.device("cpu"), replaced) == (7, [])
    assert "the validation data changed since step 7: its 1 earlier validation point(s) are left out" in " ".join(
        capsys.readouterr().err.split())
    (folder / "model.safetensors").write_bytes(b"cut")
    assert _resume(folder, model, optimizer, schedule, torch.device("cpu")) == (0, [])
    assert "cannot be read" in capsys.readouterr().err and not folder.exists()


def test_a_second_finetuning_run_of_the_same_checkpoint_is_refused_while_the_first_runs(tmp_path):
    """Two processes writing one checkpoint folder rename each other's copies away; a killed first run's lock is
    gone with it (the same command then resumes)."""
    import os
    import subprocess
    import sys

    from edu_filter.documents import RunError
    from edu_filter.train.finetune import only_run_of

    folder = tmp_path / "finetune" / "key"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from edu_filter.train.finetune import only_run_of\n"
         f"with only_run_of(Path({str(folder)!r})):\n    print('held', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunError, match=f"process {holder.pid} on .* is fine-tuning the same model"):
            with only_run_of(folder):
                pass
    finally:
        holder.kill()
        holder.wait()
    with only_run_of(folder):  # the killed holder's lock went with it
        with pytest.raises(RunError, match=f"process {os.getpid()} on"):
            with only_run_of(folder):
                pass


def test_finetuning_goes_on_unlocked_where_the_filesystem_takes_no_locks(tmp_path, monkeypatch, capsys):
    """NFS without lockd refuses flock with ENOLCK (Lustre mounted noflock: ENOSYS): a fine-tuning that ran before
    the lock was added must not fail on it. (The refusal is the kernel's; here it is raised where flock is called.)"""
    import errno
    import fcntl

    from edu_filter.train.finetune import only_run_of

    def refused(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refused)
    ran = []
    with only_run_of(tmp_path / "finetune" / "key"):
        ran.append(True)
    assert ran and "takes no file locks (No locks available)" in " ".join(capsys.readouterr().err.split())


def test_fine_tuning_without_a_usable_checkpoint_folder_goes_on_without_checkpoints(tmp_path, capsys):
    """A read-only home or a --cache-dir under a file: the embedding cache went on without its cache, but the
    checkpoint folder failed the run after the whole embedding (hours at 450k labels). Checked first now."""
    from edu_filter.train.classifier import ClassifierTrainConfig
    from edu_filter.train.finetune import checkpoints_usable

    (tmp_path / "a_file").write_text("")
    assert not checkpoints_usable(ClassifierTrainConfig(cache_dir=str(tmp_path / "a_file" / "cache")))
    said = " ".join(capsys.readouterr().err.split())
    assert "fine-tuning without checkpoints" in said and "a killed run starts over" in said
    assert checkpoints_usable(ClassifierTrainConfig(cache_dir=str(tmp_path / "cache")))
    assert not list((tmp_path / "cache" / "finetune").iterdir())  # its probe gone

