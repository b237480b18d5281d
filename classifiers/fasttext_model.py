"""fastText baseline: a linear bag-of-n-grams classifier over labels 0-5, read as a regressor.

The raw score is the expected label under fastText's label probabilities, so it ranks and calibrates like the
encoder models. Saved as `model.bin` (fastText's own format) plus `fasttext_config.json` (labels, calibration,
training settings).

fasttext-wheel 0.9.2's Python `predict` fails under NumPy 2 (`np.array(..., copy=False)`), and the binding's
`multilinePredict` returns every label with the top probability; so prediction calls the binding's single-line
`model.f.predict`, which returns (probability, label) pairs, and builds the arrays here.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import struct
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edu_filter.classifiers.calibration import to_int_scores
from edu_filter.documents import SCORES, write_json_whole

MODEL_FILE = "model.bin"
CONFIG_FILE = "fasttext_config.json"
_WHITESPACE = re.compile(r"\s+")
LABEL_PREFIX = "__label__"
PROBE_TEXT = "def mean(values): return sum(values) / len(values)  # the average of a list of numbers"


def fasttext_line(text: str) -> str:
    """One lowercased line: fastText reads one example per line, splits on whitespace, and would take any word
    starting with `__label__` (it occurs in real code) for a label."""
    return _WHITESPACE.sub(" ", text.lower()).replace(LABEL_PREFIX, "_label_").strip()


@dataclass
class FastTextSettings:
    """Training settings (saved with the model)."""

    epoch: int = 25
    lr: float = 0.3
    word_ngrams: int = 2
    dim: int = 64
    bucket: int = 200_000  # hashed n-gram rows (fastText's default 2M makes a 500 MB .bin); raise for huge corpora
    min_count: int = 2
    max_chars: int = 20_000  # only the start of a document is read, like the encoder models' truncation
    seed: int = 0


@dataclass
class FastTextConfig:
    kind: str = "web"
    method: str = "fasttext"
    labels: list[int] = field(default_factory=lambda: list(SCORES))
    cut_points: list[float] | None = None
    settings: FastTextSettings = field(default_factory=FastTextSettings)


@contextlib.contextmanager
def training_file():
    """(a text file open for writing, the path fastText reads it by): on Linux a file with no name in the temporary
    folder, read through /proc/self/fd, so a fit killed (SIGKILL, a Slurm time limit) leaves nothing behind (a
    named copy of the training texts, ~2 GB at 450k web documents, stayed per fit per kill); elsewhere a named
    file in a folder removed after the fit."""
    if os.path.isdir("/proc/self/fd"):
        with tempfile.TemporaryFile("w+", encoding="utf-8") as fh:
            yield fh, f"/proc/self/fd/{fh.fileno()}"
        return
    with tempfile.TemporaryDirectory(prefix="edu-filter-fasttext-") as folder:
        path = os.path.join(folder, "train.txt")
        with open(path, "w", encoding="utf-8") as fh:
            yield fh, path


class FastTextRegressor:
    def __init__(self, model, config: FastTextConfig):
        self.model = model
        self.config = config

    @property
    def cut_points(self):
        return self.config.cut_points

    @classmethod
    def train(cls, texts: list[str], labels, settings: FastTextSettings, kind: str = "web") -> "FastTextRegressor":
        import fasttext

        int_labels = to_int_scores(labels)
        with training_file() as (fh, path):
            for text, label in zip(texts, int_labels):
                fh.write(f"{LABEL_PREFIX}{label} {fasttext_line(text[: settings.max_chars])}\n")
            fh.flush()
            model = fasttext.train_supervised(
                input=path, epoch=settings.epoch, lr=settings.lr, wordNgrams=settings.word_ngrams,
                dim=settings.dim, bucket=settings.bucket, minCount=settings.min_count, seed=settings.seed, thread=1,
                verbose=0,
            )
        return cls(model, FastTextConfig(kind=kind, labels=sorted(set(int_labels.tolist())), settings=settings))

    def predict(self, texts: list[str]) -> np.ndarray:
        """Expected label under the predicted label distribution, per text."""
        if not texts:
            return np.zeros(0, dtype=np.float64)
        values = np.empty(len(texts), dtype=np.float64)
        for i, text in enumerate(texts):
            pairs = self.model.f.predict(fasttext_line(text[: self.config.settings.max_chars]) + "\n", -1, 0.0, "replace")
            probs = np.array([p for p, _ in pairs], dtype=np.float64)
            label_values = np.array([float(label.removeprefix(LABEL_PREFIX)) for _, label in pairs])
            values[i] = float(label_values @ probs / probs.sum())
        return values

    def save_pretrained(self, folder: str | Path) -> Path:
        """Saved and read back: fastText's save reports no failed write, and a model.bin a full disk cut short
        loaded without error and scored every document NaN (apply then removed them all as below the threshold)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.model.save_model(str(folder / MODEL_FILE))
        probe = [PROBE_TEXT]
        intact = model_file_whole(folder / MODEL_FILE) and np.array_equal(
            FastTextRegressor(_load_quietly(folder / MODEL_FILE), self.config).predict(probe), self.predict(probe))
        if not intact:
            raise OSError(f"{folder / MODEL_FILE} was not written whole (a full disk, a quota?)")
        write_json_whole(folder / CONFIG_FILE, asdict(self.config))
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "FastTextRegressor":
        folder = Path(folder)
        raw = json.loads((folder / CONFIG_FILE).read_text())
        raw["settings"] = FastTextSettings(**raw.get("settings", {}))
        if not model_file_whole(folder / MODEL_FILE):
            raise OSError(f"{folder / MODEL_FILE} is not a whole fastText model (cut short?)")
        return cls(_load_quietly(folder / MODEL_FILE), FastTextConfig(**raw))


FASTTEXT_MAGIC = (793712314).to_bytes(4, "little")  # the first bytes of every fastText .bin model
HEADER_BYTES = 92  # magic, version, the 12 int32 and 1 double arguments, the dictionary's counts


def model_file_whole(path: str | Path) -> bool:
    """Whether a (not quantized) fastText model.bin is whole, read from its header and the headers of its two
    matrices, which end it: fastText loads a file cut in its dictionary by allocating without end (a node's
    memory, before the job is killed), and one cut in a matrix as NaN weights."""
    with open(path, "rb") as fh:
        head = fh.read(HEADER_BYTES)
        if len(head) < HEADER_BYTES or head[:4] != FASTTEXT_MAGIC:
            return False
        dim, bucket = struct.unpack_from("<i", head, 8)[0], struct.unpack_from("<i", head, 40)[0]
        words, labels = struct.unpack_from("<ii", head, 68)
        if min(dim, words, labels) < 1 or bucket < 0:  # a damaged header
            return False
        size = os.fstat(fh.fileno()).st_size
        output_at = size - 16 - 4 * labels * dim  # each matrix: rows, columns (int64), then float32 values
        input_at = output_at - 1 - 16 - 4 * (words + bucket) * dim  # a quantization flag byte between them
        if input_at < HEADER_BYTES:
            return False
        for at, shape in ((input_at, (words + bucket, dim)), (output_at, (labels, dim))):
            fh.seek(at)
            header = fh.read(16)
            if len(header) < 16 or struct.unpack("<qq", header) != shape:
                return False
    return True



def _load_quietly(path: Path):
    import fasttext

    # its warning that load_model returns no WordVectorModel (nothing asked one): a line per apply task
    fasttext.FastText.eprint = lambda *args, **kwargs: None
    return fasttext.load_model(str(path))
