"""`score --select active`: rounds chosen by the classifier so far, within the budget, resumable, with inclusion
weights that make the chosen sample stand for the pool."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import orjson
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from llm_test_server import LLMTestServer, directive, label_table  # noqa: E402

from edu_filter.annotate.active import (  # noqa: E402
    ActiveSelector,
    inclusion_probabilities,
    round_sizes,
    systematic_sample,
)
from edu_filter.annotate.score import score_documents  # noqa: E402
from edu_filter.documents import DocumentError, read_documents  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WEB_TRAIN = REPO / "data/web/fineweb_edu_llama3_train.jsonl"
FAST = {"retry_backoff": 0.01, "timeout": 5.0, "max_retries": 3, "show_progress": False}
MAX_LENGTH = 128


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def bundled_pool(n: int) -> tuple[list[dict], dict[str, int]]:
    """The first n bundled Llama-3-labelled web documents without their labels, and the labels by id."""
    rows = read_documents([WEB_TRAIN], label_field="score", limit=n)
    return [{"id": r["id"], "text": r["text"]} for r in rows], {r["id"]: int(r["label"]) for r in rows}


def directive_pool(n: int, **behaviour_of) -> list[dict]:
    """n documents the test server scores i % 6, with `behaviour_of[id]` (e.g. {"fail500": 99}) for some."""
    ids = [f"d{i:03d}" for i in range(n)]
    return [{"id": d, "text": f"Lesson {d}. " + directive(d, score=i % 6, **behaviour_of.get(d, {}))}
            for i, d in enumerate(ids)]


@pytest.fixture
def real_encoder(minilm_path, embedding_cache_dir) -> dict:
    """The settings that make `score --select active` embed the pool with the offline MiniLM, as train would."""
    return {"encoder": minilm_path, "max_length": MAX_LENGTH, "embedding_cache": str(embedding_cache_dir)}


def synthetic_pool(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings and 0-5 labels a linear head can partly learn, ~8% at 3 or more, like web data."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 24))
    latent = x @ rng.normal(0, 0.15, 24)
    y = np.clip(np.rint(1.1 + latent + rng.normal(0, 0.5, n)), 0, 5)
    return x, y


# --- the draw and its weights -------------------------------------------------------------------------------------
def test_round_sizes_and_probabilities():
    assert round_sizes(500, 5, None) == [100] * 5
    assert round_sizes(60, 3, 10) == [10, 25, 25]
    assert round_sizes(7, 3, None) == [3, 2, 2] and sum(round_sizes(101, 4, 50)) == 101
    with pytest.raises(ValueError, match="--seed-size"):
        round_sizes(10, 3, 11)
    assert round_sizes(5, 10**9, 2) == [2, 1, 1, 1]  # rounds beyond the budget are none (not a list of 10**9)
    with pytest.raises(ValueError, match="--seed-size .* --rounds 1"):  # read by nothing: refused
        round_sizes(10, 1, 5)
    priority = np.r_[np.full(10, 100.0), np.ones(90)]
    pi = inclusion_probabilities(priority, 20, uniform_share=0.3)
    assert pi.sum() == pytest.approx(20) and pi.max() <= 1.0
    assert (pi[:10] == 1.0).all()  # the share of the high-priority ones exceeds 1: taken for sure
    assert pi[10:].min() >= 0.3 * 20 / 100  # the uniform share is a floor: no weight can explode


def test_a_large_pool_is_clustered_from_a_sample_of_its_rows():
    """PCA over the whole pool copied and centred every embedding; above PCA_FIT_ROWS it is fitted on a sample and
    applied in blocks, and still separates what is apart."""
    from edu_filter.annotate.active import PCA_FIT_ROWS, cluster_labels

    rng = np.random.default_rng(0)
    n = PCA_FIT_ROWS + 5000
    centres = rng.normal(0, 10, (4, 48)).astype(np.float32)
    truth = rng.integers(0, 4, n)
    embeddings = centres[truth] + rng.normal(0, 0.5, (n, 48)).astype(np.float32)
    labels = cluster_labels(embeddings, seed=0)
    assert labels.shape == (n,) and labels.min() >= 0
    for c in range(4):  # every cluster found lies within one true group
        assert len(set(truth[labels == c])) <= 1


def test_systematic_sample_has_exactly_the_inclusion_probabilities_it_is_given():
    rng = np.random.default_rng(0)
    pi = inclusion_probabilities(rng.gamma(0.5, 1.0, 40), 12, uniform_share=0.2)
    order = rng.permutation(40)
    draws = 20_000
    counts = np.zeros(40)
    for _ in range(draws):
        picked = systematic_sample(pi, order, rng)
        assert len(picked) == 12 and len(set(picked.tolist())) == 12
        counts[picked] += 1
    se = np.sqrt(pi * (1 - pi) / draws) + 1e-9
    assert np.abs(counts / draws - pi).max() < 1e-12 + (4 * se).max()
    assert (np.abs(counts / draws - pi) <= 4 * se + 1e-12).all()


def test_weighted_active_sample_estimates_pool_totals_without_bias():
    """Over repeated active selections, weighted sums over the chosen documents average to the pool's totals
    (documents, labels, documents at 3+), although the selection is strongly biased towards high scores."""
    x, y = synthetic_pool(300, seed=1)
    truth = {"documents": 300.0, "labels": y.sum(), "high": (y >= 3).sum()}
    estimates = {k: [] for k in truth}
    high_in_sample = []
    for seed in range(60):
        selector = ActiveSelector(x, budget=60, rounds=4, seed=seed)
        labels = np.full(len(y), np.nan)
        for r in range(selector.rounds):
            choice = selector.choose(r, labels)
            selector.record(choice)
            labels[choice.indices] = y[choice.indices]
        chosen = np.flatnonzero(selector.chosen_round >= 0)
        assert len(chosen) == 60 and Counter(selector.chosen_round[chosen].tolist()) == {0: 15, 1: 15, 2: 15, 3: 15}
        w = selector.weights()[chosen]
        estimates["documents"].append(w.sum())
        estimates["labels"].append(w @ y[chosen])
        estimates["high"].append(w @ (y[chosen] >= 3))
        high_in_sample.append((y[chosen] >= 3).mean())
    for key, values in estimates.items():
        values = np.array(values)
        se = values.std(ddof=1) / np.sqrt(len(values))
        assert abs(values.mean() - truth[key]) < 4 * se + 1e-9, (key, values.mean(), truth[key], se)
        assert se < 0.1 * truth[key]  # and precise enough for that check to mean something
    # the draw does favour the rare high scores
    assert np.mean(high_in_sample) > 1.2 * truth["high"] / 300


# --- through an LLM server --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def labelled_pool(tmp_path_factory):
    docs, labels = bundled_pool(240)
    folder = tmp_path_factory.mktemp("pool")
    return write_jsonl(folder / "pool.jsonl", docs), labels


@pytest.mark.slow
def test_active_score_spends_the_budget_in_rounds_and_writes_weights(labelled_pool, tmp_path, minilm_path,
                                                                     embedding_cache_dir, monkeypatch):
    import time

    from edu_filter.annotate import score as score_module
    from edu_filter.classifiers import frozen_encoder
    from edu_filter.classifiers.frozen_encoder import FrozenEncoder
    from edu_filter.train.classifier import train_classifier

    embedded, embed, asking, score_async = [], FrozenEncoder.embed, [], score_module._score_async
    loads, load = [], frozen_encoder.load_frozen_encoder
    monkeypatch.setattr(frozen_encoder, "load_frozen_encoder", lambda *a, **k: loads.append(1) or load(*a, **k))

    def slow_embedding(self, texts):  # the pool's embedding, made to take a known time
        embedded.append((len(texts), bool(asking)))  # whether the backend (a vLLM server on the GPU) was started
        time.sleep(1.0)
        return embed(self, texts)

    monkeypatch.setattr(FrozenEncoder, "embed", slow_embedding)
    monkeypatch.setattr(score_module, "_score_async", lambda *args, **kwargs: asking.append(1) or score_async(
        *args, **kwargs))

    pool_path, labels = labelled_pool
    server = LLMTestServer(labels=label_table(
        [{"id": i, "text": d["text"], "score": labels[i]} for d in read_jsonl(pool_path) for i in [d["id"]]]
    )).start()
    try:
        out = tmp_path / "active.jsonl"
        options = dict(base_url=server.base_url, model="m", sample=60, select="active", rounds=3,
                       encoder=minilm_path, max_length=MAX_LENGTH, embedding_cache=str(embedding_cache_dir), **FAST)
        summary = score_documents([str(pool_path)], out, **options)
        assert len(server.requests) == 60 and set(server.requests.values()) == {1}  # the budget, each asked once
        # the pool embedded before any request (before a vLLM server takes the GPU), in the time shown as preparing
        assert embedded == [(240, False)] and summary.prepared_seconds >= 1.0 and summary.seconds > 0
        assert len(loads) == 1  # the encoder that gave the embeddings' key embedded the pool (it was loaded twice)
        rows = read_jsonl(out)
        pool_ids = [d["id"] for d in read_jsonl(pool_path)]
        assert [r["id"] for r in rows] == [i for i in pool_ids if i in server.requests]  # pool order
        assert all(r["score"] == labels[r["id"]] and r["error"] is None for r in rows)
        assert Counter(r["round"] for r in rows) == {0: 20, 1: 20, 2: 20}
        assert summary.documents == 60 and "3 rounds (20, 20, 20)" in summary.selection
        weights = np.array([r["weight"] for r in rows])
        assert (weights > 0).all() and 0.6 * 240 < weights.sum() < 1.4 * 240  # an estimate of the pool's size
        # the rare high scores are sought: more of them than a uniform draw of 60 expects
        high_pool = sum(v >= 3 for v in labels.values())
        assert sum(r["score"] >= 3 for r in rows) > 1.3 * high_pool * 60 / 240
        record = json.loads(out.with_name(out.name + ".provenance.json").read_text())
        assert record["settings"]["select"] == "active" and record["settings"]["rounds"] == [20, 20, 20]

        # the same call again: every round replayed from the cache, nothing asked, nothing embedded (the pool was
        # embedded again, hours for millions of documents, for answers all in the cache), the same output
        embedded.clear()
        loads.clear()
        score_documents([str(pool_path)], out, **options)
        assert sum(server.requests.values()) == 60 and read_jsonl(out) == rows and embedded == [] and len(loads) == 1
    finally:
        server.stop()

    # train reads the weights: they enter the fit, the cut points and the metrics
    common = dict(kind="web", encoder=minilm_path, max_length=MAX_LENGTH, cache_dir=str(embedding_cache_dir),
                  val_fraction=0.2, learning_curve=False)
    weighted = train_classifier([str(out)], tmp_path / "weighted", **common)
    plain = train_classifier([str(out)], tmp_path / "plain", weight_field=None, **common)
    assert weighted["training"]["weights"]["effective_n"] < 48 and plain["training"]["weights"] is None
    assert weighted["weighted"]["effective_n"] < 12  # the validation metrics are weighted estimates too
    assert weighted["training"]["ridge_alpha"] != plain["training"]["ridge_alpha"] or (
        weighted["training"]["cut_points"] != plain["training"]["cut_points"])


def test_active_needs_a_budget_and_sane_rounds(labelled_pool, tmp_path):
    pool_path, _ = labelled_pool
    server = LLMTestServer().start()
    try:
        with pytest.raises(ValueError, match="needs --sample"):
            score_documents([str(pool_path)], tmp_path / "o.jsonl", base_url=server.base_url, model="m",
                            select="active", **FAST)
        with pytest.raises(ValueError, match="--seed-size"):
            score_documents([str(pool_path)], tmp_path / "o.jsonl", base_url=server.base_url, model="m",
                            select="active", sample=10, seed_size=20, **FAST)
        with pytest.raises(ValueError, match="--select must be one of"):
            score_documents([str(pool_path)], tmp_path / "o.jsonl", base_url=server.base_url, model="m",
                            select="greedy", sample=10, **FAST)
        assert server.requests == Counter()
    finally:
        server.stop()


def test_draws_replay_on_a_reordered_pool_and_a_changed_pool_is_refused_before_asking(server, tmp_path,
                                                                                    real_encoder):
    """The draws are recorded by id: the same documents in another order replay them; a document added (or edited)
    would make their weights wrong and new draws would spend the budget again, so the run stops, asking nothing."""
    docs = directive_pool(60)
    src, out = tmp_path / "pool.jsonl", tmp_path / "out.jsonl"
    options = dict(base_url=server.base_url, model="test-model", sample=20, select="active", rounds=2, **FAST,
                   **real_encoder)
    score_documents([str(write_jsonl(src, docs))], out, **options)
    rows = read_jsonl(out)
    assert len(server.requests) == 20 and sum(server.requests.values()) == 20

    score_documents([str(write_jsonl(src, docs[::-1]))], out, **options)
    assert sum(server.requests.values()) == 20 and read_jsonl(out) == rows[::-1]  # every round replayed

    write_jsonl(src, [*docs, {"id": "new", "text": "Appended. " + directive("new", score=5)}])
    # the installed command in its own process, as users run it (an in-process run would show the weight-loading
    # bars that the command turns off, whenever an earlier test imported transformers first)
    command = [sys.executable, "-m", "edu_filter.cli", "score", str(src), "-o", str(out), "--model", "test-model",
               "--sample", "20", "--select", "active", "--rounds", "2", "--encoder", real_encoder["encoder"],
               "--max-length", str(MAX_LENGTH), "--embedding-cache", real_encoder["embedding_cache"]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command + ["--base-url", server.base_url], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert "draws from another pool" in result.stderr and "new --cache" in result.stderr
    assert sum(server.requests.values()) == 20 and read_jsonl(out) == rows[::-1]
    # with a server it would launch itself (vLLM takes minutes), the refusal comes before the launch
    launched = tmp_path / "launched"
    script = tmp_path / "serve.py"
    script.write_text(f"import pathlib\npathlib.Path({str(launched)!r}).write_text('started')\n")
    result = subprocess.run(command + ["--backend", "script", "--server-script", str(script)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "draws from another pool" in result.stderr, result.stderr
    assert not launched.exists()


def test_failed_documents_of_an_active_sample_are_flagged_for_a_rerun(server, tmp_path, real_encoder, capsys):
    """A request that failed for good leaves a weighted row without a score: the summary warns, train's reader says
    what happened and what to do, and the same command again asks only for it."""
    docs = directive_pool(40, **{f"d{i:03d}": {"fail500": 2} for i in range(0, 40, 3)})
    src, out = write_jsonl(tmp_path / "pool.jsonl", docs), tmp_path / "out.jsonl"
    options = dict(base_url=server.base_url, model="m", sample=20, select="active", rounds=2, progress_every=60,
                   **{**FAST, "max_retries": 1, "show_progress": True}, **real_encoder)
    first = score_documents([str(src)], out, **options)
    failed = [r["id"] for r in read_jsonl(out) if r["score"] is None]
    assert failed and first.documents - first.scored == len(failed)
    assert f"warning: {len(failed)} documents of the active sample have no score" in capsys.readouterr().err
    with pytest.raises(DocumentError, match="annotation failed .http 500.*same `edu-filter score` command again.*"
                                            "skew its weights"):
        read_documents([out], label_field="score", require_label=True)

    before = server.requests.copy()
    score_documents([str(src)], out, **options)
    assert set(server.requests - before) == set(failed)  # the server stops failing after 2 requests
    said = capsys.readouterr().err
    assert all(r["score"] is not None for r in read_jsonl(out)) and "warning" not in said
    assert "earlier selections drew" not in said  # the same selection: replayed
    # a larger budget is another selection: said, not silently drawn anew over the answers paid for
    score_documents([str(src)], tmp_path / "more.jsonl", cache=str(out) + ".cache.sqlite", **{**options, "sample": 30})
    assert "holds 20 documents this pool's earlier selections drew, with other settings" in " ".join(
        capsys.readouterr().err.split())


def test_active_progress_counts_each_round_on_its_own(server, tmp_path, real_encoder, capsys):
    docs = directive_pool(60)
    src = write_jsonl(tmp_path / "pool.jsonl", docs)
    score_documents([str(src)], tmp_path / "out.jsonl", base_url=server.base_url, model="m", sample=30,
                    select="active", rounds=3, progress_every=60, **{**FAST, "show_progress": True}, **real_encoder)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("scoring: ")]
    assert [line.split(" documents")[0] for line in lines] == ["scoring: 10/10"] * 3  # not 20/10, 30/10


@pytest.mark.slow
def test_active_run_killed_with_sigkill_resumes_asking_only_for_missing_answers(labelled_pool, tmp_path,
                                                                                minilm_path, embedding_cache_dir):
    pool_path, labels = labelled_pool
    table = label_table([{"id": d["id"], "text": d["text"], "score": labels[d["id"]]} for d in read_jsonl(pool_path)])
    server = LLMTestServer(delay=0.05, labels=table).start()
    try:
        out = tmp_path / "OUT.jsonl"
        cmd = [sys.executable, "-m", "edu_filter.cli", "score", str(pool_path), "-o", str(out), "--base-url",
               server.base_url, "--model", "m", "--sample", "60", "--select", "active", "--rounds", "3",
               "--concurrency", "4", "--encoder", minilm_path, "--max-length", str(MAX_LENGTH),
               "--embedding-cache", str(embedding_cache_dir)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while sum(server.answered.values()) < 30 and time.monotonic() < deadline:  # inside the second round
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert not out.exists()
        with sqlite3.connect(tmp_path / "OUT.jsonl.cache.sqlite") as db:
            stored = {doc_id for (doc_id,) in db.execute("SELECT doc_id FROM answers")}
            drawn = dict(db.execute("SELECT doc_id, round FROM selections"))
        assert 20 < len(stored) < 60 and set(drawn.values()) == {0, 1}  # killed in round 2, after its draw
        before = server.requests.copy()

        server.delay = 0.0
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
        asked_again = server.requests - before
        rows = read_jsonl(out)
        assert len(rows) == 60 and len(server.requests) == 60  # the server never saw more than the budget
        assert {r["id"]: r["round"] for r in rows if r["round"] < 2} == drawn  # the recorded draws were replayed
        for row in rows:
            assert asked_again[row["id"]] == (0 if row["id"] in stored else 1), row["id"]
            assert row["score"] == labels[row["id"]]
    finally:
        server.stop()


def test_a_server_this_run_starts_is_known_by_the_name_it_serves_under():
    """A model moved and served under its old name (the way to replay its answers): the recorded rounds and a
    changed pool were looked up under the new path, so a full replay embedded the whole pool before the server."""
    from edu_filter.annotate.score import ScoreConfig

    moved = ScoreConfig(backend="vllm", model="/models/new-path", server_args=["served-model-name=OLD", "tp=2"])
    assert moved.served_model_name() == "OLD"
    assert ScoreConfig(backend="vllm", model="/models/m").served_model_name() == "/models/m"


def test_a_round_another_run_drew_first_is_the_one_both_use(tmp_path):
    """Two `--select active` runs into other outputs may share one answer cache: the second to record a round failed
    with a traceback (a UNIQUE constraint), and two draws would spend the budget twice. The round drawn first is
    the one both use; a cache that cannot be written is one clear error."""
    import sqlite3

    from edu_filter.annotate.cache import AnswerCache
    from edu_filter.documents import RunError

    path = tmp_path / "answers.sqlite"
    with AnswerCache(path, {"run": "a"}) as first, AnswerCache(path, {"run": "a"}) as second:
        assert first.selection("k") == second.selection("k") == {}  # both read the draws before either drew
        mine = first.record_selection("k", 0, [("d1", 0.5), ("d2", 0.25)], "pool")
        assert second.record_selection("k", 0, [("d3", 0.5)], "pool") == mine == [("d1", 0.5), ("d2", 0.25)]
        assert second.selection("k") == {0: [("d1", 0.5), ("d2", 0.25)]}
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock past the wait
        second._db.execute("PRAGMA busy_timeout=100")
        with pytest.raises(RunError, match="the answer cache .* cannot be written .*database is locked"):
            second.record_selection("k", 1, [("d4", 1.0)], "pool")
        other.execute("ROLLBACK")
        other.close()
