"""Scorers: every saved layout loads through `load_scorer` with one API, predictions come back in input order, long
documents are handled, and loading changes nothing process-wide."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from edu_filter.classifiers import EduScorer, FastTextScorer, load_scorer
from edu_filter.classifiers.calibration import apply_cut_points
from edu_filter.documents import read_documents

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
WEB_VAL = REPO / "data/web/fineweb_edu_llama3_val.jsonl"


@pytest.fixture(scope="module")
def web_texts() -> list[str]:
    return [r["text"] for r in read_documents([WEB_VAL], limit=40)]


def test_predict_returns_float32_in_input_order(web_model, web_texts):
    scorer = load_scorer(web_model, batch_size=8)
    scores, truncated = scorer.predict(web_texts)
    assert scores.dtype == np.float32 and scores.shape == (len(web_texts),)
    assert truncated.dtype == bool and truncated.shape == (len(web_texts),)
    assert np.isfinite(scores).all() and scores.std() > 0.05
    # each document scored on its own gives the same score: batching, sorting and padding change nothing
    for i in (0, 7, 23):
        alone, _ = scorer.predict([web_texts[i]])
        assert alone[0] == pytest.approx(scores[i], abs=1e-4)
    reversed_scores, _ = scorer.predict(web_texts[::-1])
    np.testing.assert_allclose(reversed_scores[::-1], scores, atol=1e-4)


def test_many_texts_are_scored_a_window_at_a_time_with_the_same_scores(web_model, web_texts):
    """`evaluate` (and fine-tuning's validation) tokenized every text into Python lists before scoring any: ~11 GB
    at peak for 450k documents. A window at a time, the same scores and marks, in input order."""
    scorer = load_scorer(web_model, batch_size=8)
    whole, whole_cut = scorer.predict(web_texts)
    for background in (False, True):  # as on a GPU: the next window prepared in a thread
        scorer.prepare_in_background = background
        windowed, cut = scorer.predict_many(web_texts, window=7)
        np.testing.assert_allclose(windowed, whole, atol=1e-5)
        assert np.array_equal(cut, whole_cut) and len(windowed) == len(web_texts)


def test_bfloat16_runs_pool_and_apply_the_head_in_float32(web_model, web_texts):
    """On a GPU the encoder runs in bfloat16 (autocast in train, a bf16 model in apply): the mean pooling counted
    tokens in bfloat16 (301 ones sum to 300) and autocast ran the float32 head in bfloat16."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from edu_filter.classifiers.modeling_edu_classifier import pool

    hidden = torch.full((1, 301, 4), 0.375, dtype=torch.bfloat16)
    assert torch.equal(pool(hidden, torch.ones(1, 301, dtype=torch.long), "mean"), torch.full((1, 4), 0.375))
    model = AutoModelForSequenceClassification.from_pretrained(web_model, trust_remote_code=True).eval()
    enc = AutoTokenizer.from_pretrained(web_model)(web_texts[:4], padding=True, truncation=True, max_length=64,
                                                   return_tensors="pt")
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(**enc).logits
            pooled = model.embed(enc["input_ids"], enc["attention_mask"])
        head = pooled.float() @ model.classifier.weight.T + model.classifier.bias  # float32, outside autocast
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, head)


def test_truncated_marks_documents_longer_than_what_the_model_reads(web_model):
    """Longer than max_length tokens with --long-docs truncate; with the chunk modes, longer than max_chunks chunks
    (a document of two chunks is read whole: apply's `truncated` stat counted it)."""
    scorer = load_scorer(web_model)
    short, long = "Photosynthesis converts light into chemical energy.", "The cell divides. " * 400
    content = scorer.max_length - scorer.framer.num_special
    two_chunks = "The cell divides. " * (content * 2 // 5)  # ~1.6 chunks of 4 tokens a sentence
    assert content < len(scorer.tokenizer(two_chunks, add_special_tokens=False)["input_ids"]) <= 2 * content
    _, truncated = scorer.predict([short, long, two_chunks])
    assert truncated.tolist() == [False, True, True]
    scorer.max_chunks = 2
    for mode in ("chunk-mean", "chunk-max"):
        assert scorer.predict([short, long, two_chunks], long_docs=mode)[1].tolist() == [False, True, False]
    assert scorer.max_length == json.loads((Path(web_model) / "config.json").read_text())["max_seq_length"]


def test_a_max_length_past_the_models_positions_is_refused_at_load_also_for_a_hub_model(tmp_path, minilm_path,
                                                                                         monkeypatch):
    """A hub classifier's --max-length was never checked (apply had pinned it to ORG/NAME@COMMIT, never a folder):
    every scoring task then failed with a bare tensor-size error. The hub cache here is laid out as huggingface_hub
    lays it out, read offline."""
    import huggingface_hub
    from transformers import AutoTokenizer, BertForSequenceClassification

    from edu_filter.classifiers.scorer import check_max_length
    from edu_filter.documents import InputError

    commit = "3" * 40
    snapshot = tmp_path / "hub" / "models--edu--stock" / "snapshots" / commit
    BertForSequenceClassification.from_pretrained(minilm_path, num_labels=1).save_pretrained(snapshot)
    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(snapshot)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(InputError, match="--max-length 1024: edu/stock@3+ reads 3 to 512 tokens"):
        check_max_length(f"edu/stock@{commit}", 1024)
    check_max_length(f"edu/stock@{commit}", 512)
    with pytest.raises(ValueError, match="max_length 1024: .* reads at most 512 tokens per sequence"):
        load_scorer(snapshot, max_length=1024)
    assert load_scorer(snapshot, max_length=256).max_length == 256
    # a RoBERTa-family encoder's positions start after its padding index: 514 read 512 tokens, whatever its tokenizer
    # says (trained at 256 tokens it says 256: 513 and 514 were let through, and every scoring task failed)
    from edu_filter.classifiers.scorer import readable_tokens

    tokenizer = AutoTokenizer.from_pretrained(minilm_path, model_max_length=256)
    roberta = {"model_type": "xlm-roberta", "max_position_embeddings": 514, "pad_token_id": 1}
    assert readable_tokens(roberta, tokenizer) == readable_tokens({"encoder_config": roberta}, tokenizer) == 512
    assert readable_tokens({"model_type": "bert", "max_position_embeddings": 512}, tokenizer) == 512


def test_a_stock_roberta_classifier_whose_tokenizer_names_no_length_reads_what_its_positions_allow(tmp_path,
                                                                                                   minilm_path):
    """A one-logit RoBERTa from the hub whose tokenizer names no model_max_length: 514 tokens were read, past its
    position table, and every document longer than 512 tokens failed its scoring task."""
    from transformers import AutoTokenizer, RobertaConfig, RobertaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    tokenizer.model_max_length = int(1e30)  # what transformers gives a tokenizer that names none
    config = RobertaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=514, pad_token_id=1, num_labels=1)
    RobertaForSequenceClassification(config).save_pretrained(tmp_path / "roberta")
    tokenizer.save_pretrained(tmp_path / "roberta")
    scorer = load_scorer(tmp_path / "roberta")
    assert scorer.max_length == 512
    scores, truncated = scorer.predict(["word " * 2000, "short"])
    assert np.isfinite(scores).all() and truncated.tolist() == [True, False]


ASKS_THE_HUB = """
import sys
from datatrove.data import Document
from edu_filter.classifiers.scorer import load_scorer
from edu_filter.filters.scoring import CountTokens
counted = list(CountTokens("gpt2").run(iter([Document(text="a few words", id="x")])))
scores, _ = load_scorer("edu/stock@" + sys.argv[1]).predict(["a test"])
print(counted[0].metadata["token_count"], len(scores))
"""


def test_a_task_loads_a_cached_tokenizer_and_pinned_classifier_without_asking_the_hub(tmp_path, minilm_path):
    """Every apply task loaded the count tokenizer (gpt2, for a fastText model) and a pinned hub classifier by asking
    the hub first: on compute nodes without internet, ~95 s of retries per task (130 task-hours at 5,000 tasks).
    The hub here is a local server that records what it is asked; the cache holds both, laid out as huggingface_hub
    lays it out."""
    import subprocess
    import sys
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from transformers import AutoConfig, AutoTokenizer, BertForSequenceClassification

    commit = "4" * 40
    for repo in ("models--gpt2", "models--edu--stock"):  # a tokenizer and its config.json, as the hub's gpt2 has
        snapshot = tmp_path / "hub" / repo / "snapshots" / commit
        AutoTokenizer.from_pretrained(minilm_path).save_pretrained(snapshot)
        AutoConfig.from_pretrained(minilm_path).save_pretrained(snapshot)
        (tmp_path / "hub" / repo / "refs").mkdir()
        (tmp_path / "hub" / repo / "refs" / "main").write_text(commit)
    BertForSequenceClassification.from_pretrained(minilm_path, num_labels=1).save_pretrained(
        tmp_path / "hub" / "models--edu--stock" / "snapshots" / commit)
    asked = []

    class Hub(BaseHTTPRequestHandler):
        def do_GET(self):
            asked.append(self.path)
            self.send_error(503)

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_HUB_CACHE=str(tmp_path / "hub"), HF_ENDPOINT=f"http://127.0.0.1:{server.server_port}",
               HF_HUB_ETAG_TIMEOUT="2", HF_HUB_DOWNLOAD_TIMEOUT="2")
    try:
        run = subprocess.run([sys.executable, "-c", ASKS_THE_HUB, commit], env=env, capture_output=True, text=True,
                             timeout=300)
    finally:
        server.shutdown()
    assert run.returncode == 0, run.stderr[-3000:]
    tokens, scored = run.stdout.split()
    assert int(tokens) > 0 and scored == "1"
    assert [path for path in asked if "gpt2" in path or "edu/stock" in path] == [], asked  # nothing about them


def test_long_document_strategies(web_model):
    scorer = load_scorer(web_model)
    lesson = "Photosynthesis is the process by which plants convert light energy into chemical energy. " * 12
    spam = "Buy cheap watches now!!! Best prices, free shipping, click here. " * 12
    doc = spam + lesson  # the first chunks are spam, the educational part comes later
    first, _ = scorer.predict([doc], long_docs="truncate")
    chunk_max, _ = scorer.predict([doc], long_docs="chunk-max")
    chunk_mean, _ = scorer.predict([doc], long_docs="chunk-mean")
    assert chunk_max[0] > first[0]
    assert first[0] - 1e-4 <= chunk_mean[0] <= chunk_max[0] + 1e-4
    # a short document is one chunk: every strategy agrees
    short = [lesson[:200]]
    values = [scorer.predict(short, long_docs=m)[0][0] for m in ("truncate", "chunk-max", "chunk-mean")]
    assert max(values) - min(values) < 1e-4
    with pytest.raises(ValueError, match="long_docs"):
        scorer.predict(short, long_docs="middle")


def test_to_int_score_uses_saved_cut_points(web_model):
    scorer = load_scorer(web_model)
    cuts = json.loads((Path(web_model) / "config.json").read_text())["cut_points"]
    assert scorer.cut_points == cuts and len(cuts) == 5 and cuts == sorted(cuts)
    # float64, as the cut points are: a cut point cast to float32 may round below itself (1 in 2 of them)
    raw = np.array([cuts[0] - 1, cuts[1], np.nextafter(cuts[1], -np.inf), cuts[2] + 1e-3, 99.0])
    ints = scorer.to_int_score(raw)
    assert ints.dtype == np.int64
    assert ints.tolist() == [0, 2, 1, 3, 5]  # a score on a cut point is above it
    assert scorer.to_int_score(raw.astype(np.float32)).tolist()[3:] == [3, 5]  # what a model emits


def test_saved_folder_loads_with_automodel(web_model, web_texts):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(web_model, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(web_model, trust_remote_code=True)
    batch = tokenizer(web_texts[:4], truncation=True, max_length=128, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (4, 1)
    scores, _ = load_scorer(web_model).predict(web_texts[:4], long_docs="truncate")
    np.testing.assert_allclose(logits[:, 0].numpy(), scores, atol=1e-4)


def test_loading_a_classifier_runs_no_code_its_folder_carries(web_model, stock_classifier, web_texts, tmp_path):
    """Tokenizers were loaded with trust_remote_code=True: the Python a hub repository (or a folder) carried ran in
    every scoring and token-counting task, on every node, with the user's credentials. Here an edu-filter
    classifier's modeling file and a stock classifier's tokenizer module are replaced by code that leaves a mark."""
    import shutil

    from datatrove.data import Document

    from edu_filter.classifiers.scorer import check_max_length, load_classifier_tokenizer
    from edu_filter.filters.apply import check_count_tokenizer
    from edu_filter.filters.scoring import CountTokens

    mark = tmp_path / "code-ran"
    hostile = f"open({str(mark)!r}, 'a').write(__name__ + '\\n')\n"
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    shutil.copytree(web_model, ours)
    (ours / "modeling_edu_classifier.py").write_text(hostile)
    shutil.copytree(stock_classifier, theirs)
    config = json.loads((theirs / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (theirs / "tokenizer_config.json").write_text(json.dumps(config))
    (theirs / "tokenization_evil.py").write_text(hostile)

    scores, _ = load_scorer(ours).predict(web_texts[:2])
    assert np.isfinite(scores).all()
    for folder in (ours, theirs):
        assert load_classifier_tokenizer(folder)("a test").input_ids
        check_max_length(folder, 64)
        check_count_tokenizer(str(folder))
        counted = list(CountTokens(str(folder)).run(iter([Document(text="a few words here", id="x")])))
        assert counted[0].metadata["token_count"] > 0
    assert not mark.exists(), mark.read_text()


def test_an_encoder_whose_tokenizer_adds_no_special_tokens_saves_one_that_frames_as_the_scorer(
        tmp_path, minilm_path, embedding_cache_dir, web_texts):
    """starencoder's tokenizer adds no [CLS]/[SEP]; the scorer adds them by hand. The saved tokenizer did not, so
    the plain AutoTokenizer + AutoModelForSequenceClassification recipe read other sequences than the model was
    calibrated on (scores moved by up to 0.16). A MiniLM whose tokenizer lost its post-processor stands in."""
    import shutil

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from edu_filter.train.classifier import train_classifier

    from transformers import PreTrainedTokenizerFast

    encoder = tmp_path / "bare-encoder"
    shutil.copytree(minilm_path, encoder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        (encoder / name).unlink(missing_ok=True)
    backend = AutoTokenizer.from_pretrained(minilm_path).backend_tokenizer
    backend.post_processor = None  # a generic fast tokenizer adding nothing, as starencoder's
    bare = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")
    bare.save_pretrained(encoder)
    assert AutoTokenizer.from_pretrained(encoder)("hello world")["input_ids"] == bare(
        "hello world", add_special_tokens=False)["input_ids"]
    out = tmp_path / "model"
    train_classifier([str(WEB_VAL)], out, kind="web", encoder=str(encoder), max_length=64, limit=60,
                     cache_dir=str(embedding_cache_dir), learning_curve=False)
    model = AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    batch = tokenizer(web_texts[:4], truncation=True, padding=True, return_tensors="pt")
    assert batch["input_ids"][0, 0].item() == tokenizer.convert_tokens_to_ids("[CLS]")
    with torch.no_grad():
        logits = model(**batch).logits
    scores, _ = load_scorer(out).predict(web_texts[:4], long_docs="truncate")
    np.testing.assert_allclose(logits[:, 0].numpy(), scores, atol=1e-4)


def test_official_fineweb_edu_layout(tmp_path, minilm_path, web_texts):
    """A stock BertForSequenceClassification with one logit and no calibration: round-and-clip, like FineWeb-Edu."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(minilm_path, num_labels=1, problem_type="regression")
    with torch.no_grad():
        model.classifier.bias.fill_(2.0)
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(tmp_path)

    scorer = load_scorer(tmp_path, batch_size=4)
    scores, truncated = scorer.predict(web_texts[:6])
    assert scorer.cut_points == [0.5, 1.5, 2.5, 3.5, 4.5] and scorer.max_length == 512
    batch = AutoTokenizer.from_pretrained(tmp_path)(
        web_texts[:6], truncation=True, max_length=512, padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        expected = model.eval()(**batch).logits[:, 0].numpy()
    np.testing.assert_allclose(scores, expected, atol=1e-4)
    official = [int(round(max(0, min(float(s), 5)))) for s in expected]  # FineWeb-Edu's run_edu_bert.py
    np.testing.assert_array_equal(scorer.to_int_score(scores), official)
    assert truncated.any()
    # scored in bfloat16, as FineWeb-Edu was, scores between 2 and 4 fall on a 1/64 grid and exact halves occur: a
    # half goes to the even integer there (2.5 kept at threshold 3 would keep documents FineWeb-Edu dropped)
    halves = np.array([0.5, 1.5, 2.5, 3.5, 4.5, 2.5 + 1 / 64, 2.5 - 1 / 64, -1.0, 7.0, np.nan], dtype=np.float32)
    assert scorer.to_int_score(halves).tolist() == [0, 2, 2, 4, 4, 3, 2, 0, 5, 0]


@pytest.mark.parametrize("config_pad", [None, 0])
def test_a_ready_made_decoder_classifier_scores_each_text_as_alone_whatever_its_batch(tmp_path, config_pad):
    """A Llama-style classifier reads each sequence's last token, found by its config's pad id: with none a padded
    batch raised (every scoring task failed on its first window), with another than the one padded with (here its
    end token) a score depended on the texts batched with it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(["the cat sat on the mat and learned photosynthesis"] * 50, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", model_max_length=512)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=bpe.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=config_pad, bos_token_id=0,
        eos_token_id=1))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    texts = ["the cat", "the cat sat on the mat and learned photosynthesis " * 3, "mat"]
    alone = np.concatenate([load_scorer(tmp_path, device="cpu", batch_size=1).predict([t])[0] for t in texts])
    together, _ = load_scorer(tmp_path, device="cpu", batch_size=3).predict(texts)
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_int8_quantizes_the_encoder_and_keeps_scores_close(web_model, web_texts):
    exact_scorer = load_scorer(web_model)
    int8_scorer = load_scorer(web_model, dtype="int8")
    quantized = [n for n, m in int8_scorer.model.named_modules() if type(m).__name__ == "Linear" and "quantized" in
                 type(m).__module__]
    assert quantized and not any(n.startswith("classifier") for n in quantized)
    assert isinstance(int8_scorer.model.classifier, torch.nn.Linear)  # the head stays fp32
    exact, _ = exact_scorer.predict(web_texts)
    fast, _ = int8_scorer.predict(web_texts)
    diff = np.abs(fast - exact)
    assert 0 < diff.max() < 0.5 and diff.mean() < 0.1  # quantized (not a no-op), yet close
    assert np.corrcoef(fast, exact)[0, 1] > 0.98
    with pytest.raises(ValueError, match="CPU only"):
        load_scorer(web_model, device="meta", dtype="int8")
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_scorer(web_model, dtype="int4")


def test_empty_input_and_empty_text(web_model):
    scorer = load_scorer(web_model)
    scores, truncated = scorer.predict([])
    assert scores.shape == (0,) and truncated.shape == (0,)
    scores, truncated = scorer.predict(["", "Some text about algebra."])
    assert np.isfinite(scores).all() and not truncated.any()


def test_not_a_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not a model folder"):
        load_scorer(tmp_path)


def test_a_misspelled_model_folder_is_named_not_sent_to_the_hub(tmp_path):
    from edu_filter.classifiers.scorer import resolve_model_dir

    for name in (str(tmp_path / "web-clasifier"), "./web-clasifier", "runs/2024/web"):
        with pytest.raises(ValueError, match="no such model folder"):
            resolve_model_dir(name)
    with pytest.raises(ValueError, match="the hub could not provide it"):
        resolve_model_dir("edu-filter-tests/no-such-model")  # offline in tests: a hub id fails cleanly


@pytest.mark.parametrize("layout", ["head", "fasttext", "stock"])
def test_load_scorer_gives_every_layout_the_same_api(layout, request, web_texts):
    folder = request.getfixturevalue({"head": "web_model", "fasttext": "fasttext_model",
                                      "stock": "stock_classifier"}[layout])
    scorer = load_scorer(folder)
    assert type(scorer) is (FastTextScorer if layout == "fasttext" else EduScorer)
    assert scorer.source == str(folder) and scorer.kind == {"head": "web", "fasttext": "code", "stock": None}[layout]
    saved = (Path(folder) / ("fasttext_config.json" if layout == "fasttext" else "config.json")).read_text()
    assert scorer.cut_points == (json.loads(saved).get("cut_points") or [0.5, 1.5, 2.5, 3.5, 4.5])
    scores, truncated = scorer.predict(web_texts[:6], show_progress=False)
    assert scores.dtype == np.float32 and scores.shape == (6,) and np.isfinite(scores).all()
    assert truncated.dtype == bool and truncated.shape == (6,)
    assert truncated.any()  # bundled web pages run past 128 tokens and 4000 characters
    ints = scorer.to_int_score(scores)
    assert ints.dtype == np.int64 and ints.tolist() == apply_cut_points(scores, scorer.cut_points).tolist()
    same, _ = scorer.predict(web_texts[:6], long_docs="truncate")
    np.testing.assert_allclose(same, scores, atol=1e-5)
    empty, none_truncated = scorer.predict([])
    assert empty.shape == (0,) and none_truncated.shape == (0,)
    with pytest.raises(ValueError, match="long_docs must be one of"):
        scorer.predict(web_texts[:1], long_docs="middle")
    assert hasattr(scorer, "embed") == (layout != "fasttext")  # fastText has no embeddings to give


def test_fasttext_scorer_marks_documents_longer_than_what_it_reads(fasttext_model):
    scorer = load_scorer(fasttext_model, device="cpu", dtype="int8", max_length=64)  # options it has no use for
    assert scorer.max_chars == 4000
    scores, truncated = scorer.predict(["def f():\n    return 1\n", "x = 1\n" * 1000])
    assert truncated.tolist() == [False, True] and np.isfinite(scores).all()


def test_the_transformers_loader_names_load_scorer_for_a_fasttext_folder(fasttext_model):
    with pytest.raises(ValueError, match="holds a fastText model: load it with load_scorer"):
        EduScorer.from_pretrained(fasttext_model)


def test_loading_and_scoring_leave_torch_threads_alone(web_model, web_texts):
    """Threads are the caller's choice: a scorer neither sets them when loaded nor when it scores."""
    from edu_filter.classifiers.device import default_num_threads, torch_threads

    before = torch.get_num_threads()
    chosen = default_num_threads() + 1  # not what the scorer used to set them to
    torch.set_num_threads(chosen)
    try:
        scorer = load_scorer(web_model)
        assert torch.get_num_threads() == chosen
        scorer.predict(web_texts[:2])
        scorer.embed(web_texts[:2])
        assert torch.get_num_threads() == chosen
        with torch_threads(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == chosen  # restored after the block
    finally:
        torch.set_num_threads(before)


def test_a_bfloat16_load_computes_the_encoder_in_bfloat16_and_keeps_the_head_float32(web_model, web_texts):
    """The GPU default: the saved encoder config named float32, which the encoder was then built in, while only the
    head (weights ~1e6 after folding the standardisation) was cast to bfloat16."""
    from collections import Counter

    exact = load_scorer(web_model, device="cpu")
    half = load_scorer(web_model, device="cpu", dtype="bfloat16")
    dtypes = Counter((name.split(".")[0], p.dtype) for name, p in half.model.named_parameters())
    assert set(dtypes) == {("encoder", torch.bfloat16), ("classifier", torch.float32)}, dtypes
    assert np.abs(half.predict(web_texts[:8])[0] - exact.predict(web_texts[:8])[0]).max() < 0.1


def test_token_sequences_are_what_truncate_scoring_and_fine_tuning_read(web_model, web_texts):
    """The framed, truncated sequences equal the plain tokenizer's with truncation; padded into one batch they score
    as the scorer does."""
    from transformers import AutoTokenizer

    from edu_filter.classifiers.encoders import pad_batch

    scorer = load_scorer(web_model)
    sequences = scorer.token_sequences(web_texts[:5])
    tokenizer = AutoTokenizer.from_pretrained(web_model, trust_remote_code=True)
    assert sequences == tokenizer(web_texts[:5], truncation=True, max_length=scorer.max_length)["input_ids"]
    input_ids, attention_mask = pad_batch(sequences, tokenizer.pad_token_id)
    lengths = [len(s) for s in sequences]
    assert input_ids.shape == (5, max(lengths)) and attention_mask.sum(1).tolist() == lengths
    assert (input_ids[attention_mask == 0] == tokenizer.pad_token_id).all()
    with torch.no_grad():
        logits = scorer.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].numpy()
    np.testing.assert_allclose(logits, scorer.predict(web_texts[:5], long_docs="truncate")[0], atol=1e-4)


def test_a_long_word_across_the_prefix_bound_reads_as_in_the_whole_text(web_model):
    """Texts are tokenized from a prefix of about 7 characters per wanted token: a base64 run crossing that bound was
    cut into word pieces, where the whole text reads it as one [UNK], so the tokens scored depended on the bound."""
    from transformers import AutoTokenizer

    from edu_filter.classifiers.scorer import CHARS_PER_TOKEN_BOUND

    scorer = load_scorer(web_model)
    bound = (scorer.max_length - 2) * CHARS_PER_TOKEN_BOUND + 100
    filler = "between " * ((bound - 50) // 8)  # one token per 8 characters: the run starts before the last tokens
    text = filler + "q" * 150 + " end of the document"
    assert len(filler) < bound < len(filler) + 150
    tokenizer = AutoTokenizer.from_pretrained(web_model, trust_remote_code=True)
    whole = tokenizer([text], truncation=True, max_length=scorer.max_length)["input_ids"]
    assert tokenizer.unk_token_id in whole[0]  # the run is one [UNK] inside the first max_length tokens
    assert scorer.token_sequences([text]) == whole


def test_sparse_text_is_tokenized_from_longer_prefixes_until_it_has_enough_tokens(web_model, web_texts):
    """A text with far more characters per token than the prefix bound assumes (a whitespace-padded table) reads the
    same first tokens as tokenizing it whole; so does a plain text mixed into the same call."""
    from transformers import AutoTokenizer

    from edu_filter.classifiers.scorer import CHARS_PER_TOKEN_BOUND

    scorer = load_scorer(web_model)
    sparse = "".join(f"cell{i}" + " " * 60 for i in range(3000))  # ~65 characters per token
    assert len(sparse) > 4 * scorer.max_length * CHARS_PER_TOKEN_BOUND  # needs more than one retry
    tokenizer = AutoTokenizer.from_pretrained(web_model, trust_remote_code=True)
    texts = [web_texts[0], sparse, web_texts[1]]
    assert scorer.token_sequences(texts) == tokenizer(texts, truncation=True, max_length=scorer.max_length)["input_ids"]


SCORES_A_HUGE_SPARSE_TEXT = """
import resource, sys
from edu_filter.classifiers import load_scorer
scorer = load_scorer(sys.argv[1])
text = "hello world " + " " * 30_000_000 + "the rest of the document"
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tokens = scorer.token_sequences([text])[0]
_, truncated = scorer.predict([text])
print(scorer.tokenizer.decode(tokens), truncated.tolist(), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024, sep="|")
"""


def test_a_huge_sparse_text_is_read_only_so_far_and_counts_as_truncated(web_model):
    """A text whose start holds too few tokens was tokenized again from ever longer prefixes, at last whole: 30M
    spaces took ~1.6 GB and a minute (a 1 GB one ~55 GB, on every rerun of its task). It is read to
    SPARSE_SCAN_CHARS, and what was read of it is its start's tokens."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", SCORES_A_HUGE_SPARSE_TEXT, str(web_model)], capture_output=True,
                         text=True, timeout=300)
    decoded, truncated, grown_mb = out.stdout.strip().split("|")
    assert (decoded, truncated) == ("[CLS] hello world [SEP]", "[True]"), out.stderr[-2000:]
    assert int(grown_mb) < 400


def test_a_batch_without_padding_scores_the_same_without_an_attention_mask(web_model, web_texts):
    """Unpadded batches go to the encoder with no mask (so SDPA may pick its flash kernel): same vectors as an all-ones
    mask; and the default batch is 32 documents on a CPU, a fixed number of tokens on a GPU."""
    from edu_filter.classifiers.scorer import default_batch_size

    scorer = load_scorer(web_model)
    assert scorer.batch_size == 32 and load_scorer(web_model, batch_size=5).batch_size == 5
    gpu = torch.device("cuda")
    assert (default_batch_size(gpu, 512), default_batch_size(gpu, 8192), default_batch_size(gpu, 10**7)) == (1024, 64, 1)
    sequences = [s[:40] for s in scorer.token_sequences(web_texts[:4])]
    input_ids = torch.tensor(sequences)
    with torch.no_grad():
        masked = scorer.model.embed(input_ids, torch.ones_like(input_ids))
        unmasked = scorer.model.embed(input_ids, None)
    torch.testing.assert_close(unmasked, masked, atol=1e-5, rtol=1e-5)


class MemoryFor(torch.nn.Module):
    """The model behind a device with room for `rows` documents a batch: a bigger batch fails as the CUDA allocator
    fails it (torch.OutOfMemoryError, before any work), which no CPU here can do for real."""

    def __init__(self, model, rows: int):
        super().__init__()
        self.model, self.rows, self.batches = model, rows, []

    def forward(self, input_ids, attention_mask=None):
        self.batches.append(len(input_ids))
        if len(input_ids) > self.rows:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {len(input_ids)} rows")
        return self.model(input_ids=input_ids, attention_mask=attention_mask)


def test_a_batch_the_device_has_no_memory_for_is_scored_in_halves_from_then_on(web_model, web_texts, capfd):
    scorer = load_scorer(web_model, batch_size=16)
    expected, _ = scorer.predict(web_texts)
    scorer.model = MemoryFor(scorer.model, rows=5)
    scores, _ = scorer.predict(web_texts)
    np.testing.assert_allclose(scores, expected, atol=1e-4)  # every document scored once, in input order
    assert scorer.batch_size == 4 and scorer.model.batches[:3] == [16, 8, 4]  # halved until it fits
    assert set(scorer.model.batches[3:]) <= {4} and sum(b for b in scorer.model.batches if b <= 5) == len(web_texts)
    said = capfd.readouterr().err
    assert "a batch of 16 documents did not fit in cpu memory; scoring in batches of 8" in said and "of 4 from" in said
    scorer.model.rows = 0  # not even one document fits: the error is the device's, not a loop
    with pytest.raises(torch.OutOfMemoryError):
        scorer.predict(web_texts[:3])


@pytest.mark.parametrize("background", [False, True])
def test_the_apply_scoring_step_scores_every_window_in_order(web_model, web_texts, background):
    """The datatrove step, window by window: with preparation in a thread (what a GPU scorer does: the next window
    is tokenized while this one is scored) every document comes out once, in input order, with the score the scorer
    gives it, and the stats count every window."""
    from datatrove.data import Document

    from edu_filter.filters.scoring import EduClassifierScorer

    class Step(EduClassifierScorer):
        def load_scorer(self, rank: int = 0):
            scorer = super().load_scorer(rank)
            scorer.prepare_in_background = background
            return scorer

    step = Step(str(web_model), window_size=7, batch_size=4)
    docs = [Document(text=t, id=str(i)) for i, t in enumerate(web_texts[:30])]
    scored = list(step.run(iter(docs)))
    assert [d.id for d in scored] == [str(i) for i in range(30)]
    expected, _ = load_scorer(web_model).predict(web_texts[:30])
    np.testing.assert_allclose([d.metadata["score"] for d in scored], expected, atol=1e-4)
    stats = step.stats.to_dict()["stats"]
    rates = stats["docs_per_second"]  # datatrove leaves "n" out where it equals the total (a rate of 1 each)
    assert stats["scored"]["total"] == 30 and rates.get("n", rates["total"]) == 5  # windows of 7, 7, 7, 7, 2


TOKENIZER_POOL_PROBE = """
import os, sys
from datatrove.data import Document
from edu_filter.filters.scoring import CountTokens, EduClassifierScorer

# as in `apply`'s scoring stage, the token counter tokenizes before the scorer: the pool starts there
count, step = CountTokens(sys.argv[1]), EduClassifierScorer(sys.argv[1], num_threads=1, window_size=32)
docs = [Document(text="words about photosynthesis and light " * 6, id=str(i)) for i in range(32)]
before = len(os.listdir("/proc/self/task"))
assert sum(1 for _ in step.run(count.run(iter(docs)))) == 32
print(len(os.listdir("/proc/self/task")) - before)
"""


@pytest.mark.skipif((os.cpu_count() or 1) < 2 or not Path("/proc/self/task").is_dir(),
                    reason="needs a pool bigger than one thread to tell apart, and /proc to count threads")
def test_the_scoring_step_sizes_the_tokenizers_thread_pool_to_its_cpus(stock_classifier):
    """The rust tokenizer starts one thread per CPU of the node unless told; a scoring task given one CPU starts one,
    and a RAYON_NUM_THREADS the user set is kept. Counted as the threads a real task process gains."""
    import subprocess
    import sys

    def threads_gained(**env) -> int:
        base = {k: v for k, v in os.environ.items() if k != "RAYON_NUM_THREADS"}
        res = subprocess.run([sys.executable, "-c", TOKENIZER_POOL_PROBE, stock_classifier], capture_output=True,
                             text=True, timeout=300, env={**base, "TOKENIZERS_PARALLELISM": "true", **env})
        assert res.returncode == 0, res.stderr[-2000:]
        return int(res.stdout.split()[-1])

    chosen = os.cpu_count() + 3
    # the same process but for the pool: one thread (the task's CPU) against the `chosen` the user asked for
    assert threads_gained(RAYON_NUM_THREADS=str(chosen)) - threads_gained() == chosen - 1


CHECKS_A_FOLDER = """
import sys
from edu_filter.classifiers.scorer import check_classifier_folder
from edu_filter.documents import InputError
try:
    check_classifier_folder(sys.argv[1])
except InputError as e:
    print("refused:", e)
"""


def test_a_model_folder_carrying_its_own_code_is_refused_without_running_it(tmp_path, minilm_path):
    """A config of a model type transformers does not know, with an `auto_map` to the folder's Python: transformers
    asked "Do you wish to run the custom code? [y/N]" mid-run, and a "y" on stdin ran the folder's code."""
    import shutil
    import subprocess
    import sys

    folder = tmp_path / "custom"
    shutil.copytree(minilm_path, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="x_bert", num_labels=1, auto_map={"AutoConfig": "modeling_x.XConfig",
                                                               "AutoModelForSequenceClassification": "modeling_x.X"})
    (folder / "config.json").write_text(json.dumps(config))
    ran = tmp_path / "code-ran"
    (folder / "modeling_x.py").write_text(f"open({str(ran)!r}, 'w').close()\n"
                                          "from transformers import BertConfig as XConfig\n"
                                          "from transformers import BertForSequenceClassification as X\n")
    out = subprocess.run([sys.executable, "-c", CHECKS_A_FOLDER, str(folder)], input="y\ny\n", text=True,
                         capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert not ran.exists()
    assert out.stdout.startswith("refused:") and "cannot read its config.json" in out.stdout


def test_a_ready_made_classifier_whose_tokenizer_adds_no_special_tokens_reads_what_it_was_fine_tuned_on(
        tmp_path, minilm_path, web_texts):
    """A stock classifier on a starencoder-like tokenizer (adding nothing, [CLS]/[SEP] in its vocabulary), as
    the Stack-Edu ones: its fine-tuning and its model card tokenize without framing; [CLS] ... [SEP] added by hand
    moved every score."""
    from transformers import AutoTokenizer, BertForSequenceClassification, PreTrainedTokenizerFast

    backend = AutoTokenizer.from_pretrained(minilm_path).backend_tokenizer
    backend.post_processor = None
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(tmp_path)
    torch.manual_seed(0)
    BertForSequenceClassification.from_pretrained(minilm_path, num_labels=1).save_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    model = BertForSequenceClassification.from_pretrained(tmp_path).eval()
    texts = web_texts[:4]
    batch = tokenizer(texts, truncation=True, max_length=512, padding=True, return_tensors="pt")
    assert tokenizer.convert_tokens_to_ids("[CLS]") not in batch["input_ids"][0].tolist()
    with torch.no_grad():
        expected = model(**batch).logits[:, 0].numpy()
    scores, _ = load_scorer(tmp_path, batch_size=4).predict(texts)
    np.testing.assert_allclose(scores, expected, atol=1e-4)
