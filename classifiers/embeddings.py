"""Pooled encoder embeddings, computed once and cached on disk, so re-training a head takes seconds.

The cache is one SQLite file (no pickles): rows keyed by (setting key, text hash) holding float32 vectors. The setting
key covers everything that changes a vector: encoder identity, max_length, pooling, long-document strategy and chunk
cap.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from pathlib import Path

import numpy as np

DEFAULT_CACHE_DIR = Path(os.environ.get("EDU_FILTER_CACHE", Path.home() / ".cache" / "edu-filter"))


def text_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()


def setting_key(**settings) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]


class EmbeddingCache:
    def __init__(self, cache_dir: str | Path | None = None):
        self.path = Path(cache_dir or DEFAULT_CACHE_DIR) / "embeddings.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS embeddings (setting TEXT, text_hash TEXT, vector BLOB, "
                "PRIMARY KEY (setting, text_hash))"
            )

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=60)

    def get(self, setting: str, hashes: list[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        with self._connect() as db:
            for start in range(0, len(hashes), 500):
                part = hashes[start : start + 500]
                marks = ",".join("?" * len(part))
                for h, blob in db.execute(
                    f"SELECT text_hash, vector FROM embeddings WHERE setting = ? AND text_hash IN ({marks})",
                    [setting, *part],
                ):
                    found[h] = np.frombuffer(blob, dtype=np.float32)
        return found

    def put(self, setting: str, vectors: dict[str, np.ndarray]) -> None:
        with self._connect() as db:
            db.executemany(
                "INSERT OR REPLACE INTO embeddings VALUES (?, ?, ?)",
                [(setting, h, np.asarray(v, dtype=np.float32).tobytes()) for h, v in vectors.items()],
            )


def cached_embeddings(scorer, texts: list[str], setting: str, cache: EmbeddingCache | None) -> np.ndarray:
    """scorer.embed(texts), reading what the cache has and computing (then storing) only the rest."""
    if cache is None:
        return scorer.embed(texts, show_progress=True)[0].astype(np.float32)
    hashes = [text_hash(t) for t in texts]
    found = cache.get(setting, sorted(set(hashes)))
    missing = sorted({h: t for h, t in zip(hashes, texts) if h not in found}.items())
    if missing:
        vectors = scorer.embed([t for _, t in missing], show_progress=True)[0].astype(np.float32)
        new = {h: v for (h, _), v in zip(missing, vectors)}
        cache.put(setting, new)
        found.update(new)
    return np.stack([found[h] for h in hashes])
