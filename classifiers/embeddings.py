"""Pooled encoder embeddings, computed once and cached on disk, so re-training a head takes seconds.

The cache is one SQLite file (no pickles): rows keyed by (setting key, text hash) holding float32 vectors. The setting
key covers everything that changes a vector: encoder identity, max_length, pooling, long-document strategy and chunk
cap.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from edu_filter.documents import text_hash

DEFAULT_CACHE_DIR = Path(os.environ.get("EDU_FILTER_CACHE", Path.home() / ".cache" / "edu-filter"))


def setting_key(**settings) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]


LOCK_TIMEOUT_S = 60.0  # how long a reader or writer waits for another process's lock on the cache


class EmbeddingCache:
    """The SQLite file of cached vectors. A cache that cannot be used (locked past the timeout by concurrent trainers,
    a read-only or network filesystem without working locks) is a warning, never a failed run: the vectors are
    computed without it."""

    def __init__(self, cache_dir: str | Path | None = None):
        self.path = Path(cache_dir or DEFAULT_CACHE_DIR) / "embeddings.sqlite"
        self.unusable: str | None = None  # why the cache is skipped, once it had to be
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._connect() as db:
                db.execute(
                    "CREATE TABLE IF NOT EXISTS embeddings (setting TEXT, text_hash TEXT, vector BLOB, "
                    "PRIMARY KEY (setting, text_hash))"
                )
        except (OSError, sqlite3.Error) as e:
            self._skip(e)

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=LOCK_TIMEOUT_S)

    def _skip(self, error: Exception) -> None:
        if self.unusable is None:
            print(f"warning: embedding cache {self.path} cannot be used ({error}); embeddings are computed without "
                  "it (put the cache on a local disk: --cache-dir or EDU_FILTER_CACHE)", file=sys.stderr, flush=True)
        self.unusable = str(error)

    def get(self, setting: str, hashes: list[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        for part in self.get_parts(setting, hashes):
            found.update(part)
        return found

    def get_parts(self, setting: str, hashes: list[str], size: int = 500) -> Iterator[dict[str, np.ndarray]]:
        """The cached vectors of `hashes`, `size` hashes' worth at a time: a caller placing each part where it goes
        never holds the whole cache's answer beside its result (twice the embeddings' memory at 500k labels)."""
        if self.unusable is not None:
            return
        try:
            with self._connect() as db:
                for start in range(0, len(hashes), size):
                    part = hashes[start : start + size]
                    marks = ",".join("?" * len(part))
                    yield {h: np.frombuffer(blob, dtype=np.float32) for h, blob in db.execute(
                        f"SELECT text_hash, vector FROM embeddings WHERE setting = ? AND text_hash IN ({marks})",
                        [setting, *part])}
        except sqlite3.Error as e:
            self._skip(e)

    def put(self, setting: str, vectors: dict[str, np.ndarray]) -> None:
        if self.unusable is not None:
            return
        try:
            with self._connect() as db:
                db.executemany(
                    "INSERT OR REPLACE INTO embeddings VALUES (?, ?, ?)",
                    [(setting, h, np.asarray(v, dtype=np.float32).tobytes()) for h, v in vectors.items()],
                )
        except sqlite3.Error as e:
            self._skip(e)


EMBED_BLOCK = 1024  # texts embedded, then stored, at a time
CACHE_REPORT_BYTES = 1 << 30  # after computing vectors, a cache past this size says where it is and how big


def available_memory(proc: str = "/proc", cgroups: str = "/sys/fs/cgroup") -> int:
    """Bytes of memory this process may still take: what the system can give without swapping (MemAvailable), and
    no more than its control group's limit leaves (a Slurm job's --mem, a container's limit), cgroup v1 or v2."""
    free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open(f"{proc}/meminfo") as fh:
            free = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable:"))
    except (OSError, ValueError, IndexError, StopIteration):
        pass
    try:
        with open(f"{proc}/self/cgroup") as fh:
            lines = [line.strip().split(":", 2) for line in fh if line.count(":") >= 2]
    except OSError:
        return free
    for _, controllers, path in lines:
        if controllers == "":  # v2: one hierarchy
            root, files = cgroups, ("memory.max", "memory.current")
        elif "memory" in controllers.split(","):  # v1: the memory controller's
            root, files = f"{cgroups}/memory", ("memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        parts = [part for part in path.split("/") if part]
        # the group, then every group above it: Slurm puts a task in job_N/step_0/user/task_0, which says "max",
        # and sets --mem on job_N (in a container, the group's own path may not exist below its root)
        for depth in range(len(parts), -1, -1):
            try:
                limit, used = (Path(root, *parts[:depth], name).read_text().strip() for name in files)
            except OSError:
                continue
            if limit.isdigit() and int(limit) < 2**60:  # "max" and v1's 2**63 - 4096: no limit
                free = min(free, max(0, int(limit) - int(used)))
    return free


def result_array(rows: int, dims: int, folder: Path, in_memory_bytes: int) -> np.ndarray:
    """A float32 rows x dims array: in memory up to `in_memory_bytes`, else mapped from a file in `folder` that no
    name points to (gone when the process ends, however it ends), its space reserved first: a pool of 1M documents
    at 4608 dimensions is 17 GB of vectors, 10M 172 GB, which the page cache then holds as far as memory allows."""
    nbytes = rows * dims * 4
    if nbytes <= in_memory_bytes:
        return np.empty((rows, dims), dtype=np.float32)
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
        spill = tempfile.TemporaryFile(dir=folder, prefix="embeddings-")
    except OSError:  # the cache folder is read-only (its cache skipped): the system's temporary folder
        folder = Path(tempfile.gettempdir())
        spill = tempfile.TemporaryFile(dir=folder, prefix="embeddings-")
    try:
        os.posix_fallocate(spill.fileno(), 0, nbytes)  # a full disk now, not a SIGBUS when a page is written
    except OSError as e:
        spill.close()
        raise OSError(e.errno, f"{nbytes / 2**30:.1f} GB of embeddings do not fit in memory ({in_memory_bytes / 2**30:.1f} "
                               f"GB free) nor on the disk of {folder} ({e.strerror}): give a smaller pool, or "
                               "--cache-dir / EDU_FILTER_CACHE on a larger disk") from None
    print(f"embeddings: {nbytes / 2**30:.1f} GB, more than half the free memory: mapped from a file on the disk of "
          f"{folder}, removed when the run ends", file=sys.stderr, flush=True)
    return np.memmap(spill, dtype=np.float32, mode="w+", shape=(rows, dims))


def cached_embeddings(scorer, texts: list[str], setting: str, cache: EmbeddingCache | None,
                      block: int = EMBED_BLOCK, in_memory_bytes: int | None = None) -> np.ndarray:
    """scorer.embed(texts) as float32, reading what the cache has and computing only the rest, `block` texts at a
    time: each block's vectors are stored as soon as they exist, so memory beyond the result stays one block's worth
    (the tokenizer's ids, the encoder's float64 outputs) and a run killed after hours keeps every finished block.
    A result over `in_memory_bytes` (default: half the free memory) is mapped from a file beside the cache."""
    if not texts:
        return scorer.embed([])[0].astype(np.float32)
    if in_memory_bytes is None:
        in_memory_bytes = available_memory() // 2
    spill_folder = cache.path.parent if cache is not None else DEFAULT_CACHE_DIR
    hashes = [text_hash(t) for t in texts]
    positions: dict[str, list[int]] = {}
    for i, h in enumerate(hashes):
        positions.setdefault(h, []).append(i)
    out = None

    def place(vectors: dict[str, np.ndarray]) -> None:
        nonlocal out
        for h, v in vectors.items():
            if out is None:
                out = result_array(len(texts), len(v), spill_folder, in_memory_bytes)
            out[positions[h]] = v

    from edu_filter.documents import progress_bar

    found: set[str] = set()
    with progress_bar(cache is not None and len(positions) > 50 * EMBED_BLOCK) as progress:  # minutes at 1M
        task = progress.add_task("reading cached embeddings", total=len(positions))
        for part in cache.get_parts(setting, sorted(positions)) if cache is not None else ():
            place(part)
            found.update(part)
            progress.advance(task, len(part))
    missing = sorted({h: t for h, t in zip(hashes, texts) if h not in found}.items())
    if missing:
        from concurrent.futures import ThreadPoolExecutor

        parts = [missing[start : start + block] for start in range(0, len(missing), block)]

        def prepare(part):
            return scorer.prepare_embedding([t for _, t in part])

        # on a GPU a thread tokenizes the next block while the GPU embeds this one (the tokenizer releases the GIL)
        background = ThreadPoolExecutor(1) if scorer.prepare_in_background and len(parts) > 1 else None
        with progress_bar(True) as progress, background or contextlib.nullcontext():
            task = progress.add_task("embedding", total=len(missing))
            coming = background.submit(prepare, parts[0]) if background else None
            for i, part in enumerate(parts):
                prepared = coming.result() if background else prepare(part)
                if background and i + 1 < len(parts):
                    coming = background.submit(prepare, parts[i + 1])
                vectors = scorer.embed_prepared(prepared)[0].astype(np.float32)
                new = {h: v for (h, _), v in zip(part, vectors)}
                if cache is not None:
                    cache.put(setting, new)
                place(new)
                progress.advance(task, len(part))
        if cache is not None and cache.unusable is None and cache.path.exists():
            size = cache.path.stat().st_size  # ~20 KB a text at 4608 dimensions: 20 GB for a 1M-document pool
            if size > CACHE_REPORT_BYTES:
                print(f"embedding cache: {size / 2**30:.1f} GB in {cache.path} (delete it to free the space: vectors "
                      "are computed again when needed)", file=sys.stderr, flush=True)
    return out
