"""Scoring and thresholding steps: the classifier, the token counter and the score threshold (or keep-top)."""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from collections.abc import Callable
from fractions import Fraction

import numpy as np
from datatrove.data import Document, DocumentsPipeline
from datatrove.io import get_datafolder
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.utils.batching import batched

from edu_filter.filters.progress import holding


TASK_SLOT_ENV = "EDU_FILTER_TASK_SLOT"  # set by the local executor: the running task's worker slot


def gpu_for_task(rank: int, gpus: int) -> str:
    """The GPU of a task on a machine with several: its worker slot's (apply's local executor gives each running task
    a slot no other running task holds), else one no other process holds (`claim_gpu`: datatrove's own executors in a
    pipeline of one's own), else `rank % gpus`. By rank alone two running tasks shared a GPU while another idled: the
    local pool hands ranks out as workers free up."""
    slot = os.environ.get(TASK_SLOT_ENV)
    if slot is None and gpus > 1:
        slot = claim_gpu(gpus)
    return f"cuda:{(int(slot) if slot is not None else rank) % gpus}"


_CLAIMED_GPU: dict[int, tuple[int, object]] = {}  # gpus seen -> (the GPU this process holds, its open lock file)


CLAIM_SHARES = 64  # processes a GPU is claimed by at most (then rank % gpus)


def claim_gpu(gpus: int) -> int | None:
    """The first of the `gpus` visible GPUs that no other process of this user and job on this machine holds, held
    until this process ends (a lock file per visible GPU in the temporary folder; the kernel drops it however the
    process ends); where every one is held, the first held by the fewest (a lock file per share: 8 workers on 4
    GPUs are 2 a GPU, where falling back to rank % gpus put 3 on one); None when none can be claimed. The job and the
    machine name the folder: Slurm numbers each job's GPUs from 0, and a temporary folder may be shared by jobs or
    nodes."""
    import fcntl
    import socket
    import tempfile

    if gpus in _CLAIMED_GPU:
        return _CLAIMED_GPU[gpus][0]
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    job = os.environ.get("SLURM_JOB_ID", "")
    folder = os.path.join(tempfile.gettempdir(), f"edu-filter-gpus-{os.getuid()}-{socket.gethostname()}-{job}")
    try:  # a temporary folder that cannot be written: no claim (rank % gpus), not a failed task
        os.makedirs(folder, exist_ok=True)
    except OSError:
        return None
    for share, index in itertools.product(range(CLAIM_SHARES), range(gpus)):
        physical = visible[index] if index < len(visible) else str(index)
        try:
            lock = open(os.path.join(folder, f"{physical}.lock" if not share else f"{physical}.{share}.lock"), "a")
        except OSError:
            return None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            continue
        _CLAIMED_GPU[gpus] = (index, lock)
        return index
    return None


class EduClassifierScorer(PipelineStep):
    """Writes the classifier's `score` (float) and `int_score` (0-5, through the model's calibration) into each document.

    Any model `load_scorer` reads (transformers or fastText). Documents are scored a window at a time; `EduScorer`
    sorts each window by length so batches carry little padding and runs bf16 + SDPA on GPU. Scoring is the worker's
    job, so the step sets its torch and tokenizer threads (`num_threads`, default: every CPU the worker may use; an
    explicit RAYON_NUM_THREADS sizes the tokenizer's pool instead). One model is loaded per task; with several GPUs
    on a node, see `gpu_for_task`.
    """

    type = "🎓 - SCORER"
    name = "🎓 edu classifier"

    def __init__(
        self,
        model: str,
        batch_size: int | None = None,  # None: the scorer's default for its device (`default_batch_size`)
        window_size: int = 2048,
        max_length: int | None = None,
        long_docs: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        num_threads: int | None = None,
    ):
        super().__init__()
        from edu_filter.classifiers.scorer import check_dtype, check_long_docs

        self.model = model
        self.batch_size = batch_size
        self.window_size = window_size
        self.max_length = max_length
        self.long_docs = check_long_docs(long_docs) if long_docs is not None else None  # None: the model's
        self.device = device
        self.dtype = check_dtype(dtype)
        self.num_threads = num_threads

    def _device(self, rank: int) -> str:
        from edu_filter.classifiers.device import default_device

        if self.device is not None:
            return self.device
        if default_device() == "cuda":
            import torch

            return gpu_for_task(rank, torch.cuda.device_count())
        return "cpu"

    def threads(self) -> int:
        from edu_filter.classifiers.device import default_num_threads

        return self.num_threads or default_num_threads()

    def size_tokenizer_pool(self) -> None:
        """The rust tokenizer's pool starts, on first use, with a thread per CPU of the node: tasks sharing a node
        (Slurm without CPU binding, Ray) would each start one that size. It gets the task's CPUs unless the user set
        RAYON_NUM_THREADS; set before any step of the task tokenizes (the token counter before this step does)."""
        os.environ.setdefault("RAYON_NUM_THREADS", str(self.threads()))

    def load_scorer(self, rank: int = 0):
        """The task's scorer; sets this worker's torch threads."""
        import torch

        from datatrove.utils.logging import logger

        from edu_filter.classifiers import load_scorer

        threads, device = self.threads(), self._device(rank)
        torch.set_num_threads(threads)
        logger.info(f"scoring on {device} with {threads} torch threads and {os.environ.get('RAYON_NUM_THREADS')} "
                    "tokenizer threads")  # what the scheduler's CPUs became
        scorer = load_scorer(self.model, device=device, dtype=self.dtype, max_length=self.max_length,
                             batch_size=self.batch_size)
        # damaged weights score everything NaN, which fails every threshold: every document was removed. Found on a
        # probe, not on a window all NaN (a task's last window may hold one document overflowing in float16)
        probe, _ = scorer.score_prepared(scorer.prepare([DAMAGE_PROBE], self.long_docs))
        if not np.isfinite(probe).all():
            raise RuntimeError(f"the classifier {self.model} scores a plain sentence {probe[0]}: its weights are "
                               "damaged")
        return scorer

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        """Scores window by window. With the model on a GPU, a thread tokenizes the next window while the GPU scores
        this one (the tokenizer releases the GIL), so the GPU waits for the CPU only when the CPU is the slower."""
        from concurrent.futures import ThreadPoolExecutor

        self.size_tokenizer_pool()  # before pulling the first window: the steps upstream run as it is pulled
        scorer, pending = None, None  # pending: the previous window and the future of its preparation
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="edu-tokenize") as pool:
            for window in batched(_taken_in(data), self.window_size):
                if scorer is None:
                    scorer = self.load_scorer(rank)
                texts = [doc.text for doc in window]
                if not scorer.prepare_in_background:
                    yield from self._score(scorer, window, lambda: scorer.prepare(texts, self.long_docs))
                    continue
                prepared = pool.submit(scorer.prepare, texts, self.long_docs)
                if pending is not None:
                    yield from self._score(scorer, *pending)
                pending = (window, prepared.result)
            if pending is not None:
                yield from self._score(scorer, *pending)
        if scorer is not None:  # a pool process runs the next task, maybe on another GPU: this one's memory freed
            from edu_filter.classifiers.device import release_device_memory

            del scorer
            release_device_memory()

    def _score(self, scorer, window: list[Document], prepared: Callable) -> DocumentsPipeline:
        """Scores one window; `prepared()` gives its prepared texts (tokenizing now, or waiting for the thread)."""
        start = time.perf_counter()
        with self.track_time(unit="window"):
            scores, truncated = scorer.score_prepared(prepared())
            # one overflowing in its dtype (float16) goes to failed/non_finite_score (`NonFiniteScoreFilter`)
            int_scores = scorer.to_int_score(np.where(np.isfinite(scores), scores, 0.0))
        elapsed = time.perf_counter() - start
        self.stat_update("scored", value=len(window))
        self.stat_update("truncated", value=int(np.count_nonzero(truncated)))
        # not rounded to a whole number: on a slow CPU a window of a few documents scored at 0 or 1 docs/s
        self.stat_update("docs_per_second", value=round(len(window) / max(elapsed, 1e-9), 2), unit="window")
        holding(-len(window))
        for doc, score, int_score in zip(window, scores, int_scores):
            for key in ("score", "int_score"):  # an input's own (an LLM label, FineWeb-Edu's): kept, as apply keeps it
                if key in doc.metadata and f"input_{key}" not in doc.metadata:
                    doc.metadata[f"input_{key}"] = doc.metadata.pop(key)
            doc.metadata["score"] = float(score)
            doc.metadata["int_score"] = int(int_score)
            yield doc


def _taken_in(data: DocumentsPipeline) -> DocumentsPipeline:
    """`data`, each document counted in the task's progress as held by the scorer (`holding`) once taken in."""
    for doc in data:
        holding(1)
        yield doc


# A fast tokenizer holds ~80 bytes per character of what it encodes at once (alignments, every token): a 1 GB document
# (a book, a dump) needed ~75 GB in one task, and the task died the same way on every rerun. Long texts are counted in
# pieces, and each call to the tokenizer gets at most COUNT_BATCH_CHARS.
COUNT_PIECE_CHARS = 1 << 20
COUNT_BATCH_CHARS = 1 << 23


def count_pieces(text: str) -> list[str]:
    """`text` in `safe_pieces` of at most COUNT_PIECE_CHARS, so that the pieces' counts add up to the text's."""
    from edu_filter.classifiers.scorer import safe_pieces

    return list(safe_pieces(text, COUNT_PIECE_CHARS))


def count_tokens(tokenizer, texts: list[str]) -> list[int]:
    """Tokens per text without special tokens, long texts counted in pieces (COUNT_PIECE_CHARS). A fast tokenizer's
    `encode_batch_fast` skips the offsets nobody reads here (about a quarter cheaper, and token counting is a large
    share of a fastText or GPU run's CPU)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        backend.no_truncation()  # a saved tokenizer.json may pad or truncate; counting needs neither
        backend.no_padding()

        def encode(batch: list[str]) -> list[int]:
            return [len(e.ids) for e in backend.encode_batch_fast(batch, add_special_tokens=False)]
    else:
        def encode(batch: list[str]) -> list[int]:
            return [len(ids) for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]]

    counts = [0] * len(texts)

    def count(batch: list[tuple[int, str]]) -> None:
        for (owner, _), n in zip(batch, encode([piece for _, piece in batch])):
            counts[owner] += n

    batch: list[tuple[int, str]] = []  # (text, piece), at most COUNT_BATCH_CHARS of pieces
    chars = 0
    for i, text in enumerate(texts):
        for piece in count_pieces(text):
            if batch and chars + len(piece) > COUNT_BATCH_CHARS:
                count(batch)
                batch, chars = [], 0
            batch.append((i, piece))
            chars += len(piece)
    if batch:
        count(batch)
    return counts


class CountTokens(PipelineStep):
    """Sets `token_count` (the FineWeb-Edu column) on documents that do not carry one yet, for the token stats."""

    type = "🔢 - TOKENIZER"
    name = "📊 token count"

    def __init__(self, tokenizer: str, batch_size: int = 1000):
        super().__init__()
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        tokenizer = None
        for batch in batched(data, self.batch_size):
            todo = [doc for doc in batch if doc.text and not isinstance(doc.metadata.get("token_count"), int)]
            if todo:
                if tokenizer is None:
                    from edu_filter.classifiers.scorer import load_classifier_tokenizer, split_revision

                    name, revision = split_revision(self.tokenizer)  # a pinned hub classifier: ORG/NAME@COMMIT
                    tokenizer = load_classifier_tokenizer(name, revision)
                    tokenizer.model_max_length = int(1e30)  # counting, not truncating: no over-length warning
                with self.track_time(unit="batch"):
                    encoded = count_tokens(tokenizer, [doc.text for doc in todo])
                for doc, n in zip(todo, encoded):
                    doc.metadata["token_count"] = n
            for doc in batch:
                self.stat_update("tokens", value=doc.metadata.get("token_count", 0) or 0)
                yield doc


DAMAGE_PROBE = "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen."


class NonFiniteScoreFilter(BaseFilter):
    """Right after the scorer: a document it scored not a number (one that overflows in float16) is failed, named,
    not removed as below every threshold nor a task failed on every rerun."""

    name = "🚑 non-finite scores"

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if math.isfinite(doc.metadata["score"]):
            return True
        doc.metadata["input_error"] = (f"the classifier scored it {doc.metadata['score']} (an overflow in its dtype: "
                                       "float32 or bfloat16 score it)")
        return False, "non_finite_score"


HISTOGRAM_LOW, HISTOGRAM_HIGH, HISTOGRAM_BIN = -2.0, 8.0, 1e-4  # scores outside land in the end bins


def score_bins(scores: np.ndarray) -> np.ndarray:
    """The histogram bin of each score (fixed 1e-4 wide bins, so every task's histogram adds up with the others)."""
    n_bins = round((HISTOGRAM_HIGH - HISTOGRAM_LOW) / HISTOGRAM_BIN)
    return np.clip(np.floor((np.asarray(scores, np.float64) - HISTOGRAM_LOW) / HISTOGRAM_BIN), 0, n_bins - 1).astype(
        np.int64)


def bin_low_edge(index: int) -> float:
    return -math.inf if index == 0 else HISTOGRAM_LOW + index * HISTOGRAM_BIN


class ScoreHistogram(PipelineStep):
    """Saves this task's score distribution as a sparse histogram (`{rank:05d}.npz`), so `--keep-top` can find the
    cutoff over all tasks in memory that does not grow with the corpus."""

    type = "🎓 - SCORER"
    name = "📊 score histogram"

    def __init__(self, output_folder: str):
        super().__init__()
        self.output_folder = get_datafolder(output_folder)

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        counts: dict[int, int] = {}
        for window in batched(data, 4096):
            for b in score_bins([doc.metadata["score"] for doc in window]).tolist():
                counts[b] = counts.get(b, 0) + 1
            yield from window
        with self.output_folder.open(f"{rank:05d}.npz", "wb") as fh:
            np.savez(fh, bins=np.fromiter(counts, np.int64, len(counts)),
                     counts=np.fromiter(counts.values(), np.int64, len(counts)))


def load_histogram(folder: str) -> dict[int, int]:
    """Every task's histogram summed, merged 256 files at a time in numpy (a dict loop took ~7 ms per file of 30k
    bins: 6 minutes at 50k tasks)."""
    folder = get_datafolder(folder)
    bins, counts = np.empty(0, np.int64), np.empty(0, np.int64)
    names = sorted(folder.list_files(glob_pattern="*.npz"))
    for start in range(0, len(names), 256):
        parts_bins, parts_counts = [bins], [counts]
        for name in names[start:start + 256]:
            with folder.open(name, "rb") as fh:
                part = np.load(fh)
                parts_bins.append(part["bins"].astype(np.int64))
                parts_counts.append(part["counts"].astype(np.int64))
        bins, where = np.unique(np.concatenate(parts_bins), return_inverse=True)
        counts = np.zeros(len(bins), np.int64)
        np.add.at(counts, where, np.concatenate(parts_counts))
    return dict(zip(bins.tolist(), counts.tolist()))


def keep_top_cutoff(histogram: dict[int, int], fraction: float) -> float:
    """The score cutoff that keeps the top `fraction` of documents: the low edge of the bin where the count from the
    top reaches it (documents sharing that 1e-4 bin are all kept, like ties)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"keep-top fraction must be in (0, 1], got {fraction}")
    n = sum(histogram.values())
    if n == 0:
        return math.inf
    # in exact arithmetic: 0.07 * 100 is 7.000000000000001 in floats, whose ceiling kept an eighth document
    k = max(1, math.ceil(Fraction(str(fraction)) * n))
    seen = 0
    for b in sorted(histogram, reverse=True):
        seen += histogram[b]
        if seen >= k:
            return bin_low_edge(b)
    return -math.inf


class KeepTopCutoff(PipelineStep):
    """The `--keep-top` cutoff, found once over every task's histogram and saved for the `select` tasks
    (`found_file`; each of them used to merge all the histograms, 50k files read by each of 50k tasks), and for
    stats.json (`cutoff_file`)."""

    type = "🎓 - SCORER"
    name = "✂️ keep-top cutoff"

    def __init__(self, histogram_folder: str, fraction: float, cutoff_file: str, found_file: str | None = None):
        super().__init__()
        self.histogram_folder, self.fraction = histogram_folder, fraction
        self.cutoff_file, self.found_file = cutoff_file, found_file

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        cutoff = keep_top_cutoff(load_histogram(self.histogram_folder), self.fraction)
        write_cutoff(self.cutoff_file, cutoff)
        found_file = getattr(self, "found_file", None)  # None in a step pickled by the release that had none
        if found_file:
            folder, name = found_file.rsplit("/", 1)
            with get_datafolder(folder).open(name, "wt") as fh:  # "inf" (nothing scored), "-inf" (every document)
                json.dump({"cutoff": repr(cutoff), "fraction": self.fraction}, fh)
        yield from data or []


def write_cutoff(cutoff_file: str, cutoff: float) -> None:
    """The cutoff as stats.json reports it (None where it is no number: nothing scored, or every document kept)."""
    folder, name = cutoff_file.rsplit("/", 1)
    with get_datafolder(folder).open(name, "wt") as fh:
        json.dump({"keep_top_cutoff": cutoff if math.isfinite(cutoff) else None}, fh)


class ScoreThresholdFilter(BaseFilter):
    """Keeps documents with `int_score >= threshold` (FineWeb-Edu keeps int_score >= 3).

    With `keep_top`, the cutoff is instead the float score that keeps that fraction of all scored documents: read
    from the `found_file` that `KeepTopCutoff` wrote in `apply`'s one-task stage before, so all tasks agree on it;
    without one (a pipeline of one's own, a step pickled in a chain an older edu-filter queued) each task finds it
    from the histograms itself and records it in `cutoff_file` for stats.json, as every task did before. Either way
    the histograms come from `ScoreHistogram` in an earlier stage, finished: in the same stage a task would see only
    the tasks before it. A score that is not a number is removed as `non_finite_score`.
    """

    name = "🎓 score threshold"

    def __init__(self, threshold: int | None = None, keep_top: float | None = None,
                 histogram_folder: str | None = None, cutoff_file: str | None = None, found_file: str | None = None,
                 exclusion_writer=None):
        super().__init__(exclusion_writer=exclusion_writer)
        if (threshold is None) == (keep_top is None):
            raise ValueError("give exactly one of threshold and keep_top")
        if keep_top is not None and histogram_folder is None and found_file is None:
            raise ValueError("keep_top needs the folder of score histograms, or the file KeepTopCutoff writes")
        self.threshold = threshold
        self.keep_top = keep_top
        self.histogram_folder = histogram_folder
        self.cutoff_file = cutoff_file  # where the keep-top cutoff is recorded for stats.json
        self.found_file = found_file
        self.cutoff: float | None = None

    def _keep_top_cutoff(self) -> float:
        found_file = getattr(self, "found_file", None)  # None in a step pickled by an older edu-filter
        if found_file:
            folder, name = found_file.rsplit("/", 1)
            data = get_datafolder(folder)
            found = {}  # stays so where the file is not there: a cutoff stage of the release before wrote none
            if data.exists(name) or self.histogram_folder is None:
                with data.open(name, "rt") as fh:
                    found = json.load(fh)
            if found.get("fraction") == self.keep_top:  # not another run's, left in the folder
                return float(found["cutoff"])
            if self.histogram_folder is None:
                raise ValueError(f"{found_file}: the cutoff of --keep-top {found.get('fraction')}, not {self.keep_top}")
        histogram = load_histogram(self.histogram_folder)
        if not sum(histogram.values()):  # this task scored a document: no histogram holds it (a pipeline of one's own
            # with ScoreHistogram in this same stage, or none at all), and every document was removed
            raise ValueError(f"--keep-top: no scores in the histograms of {self.histogram_folder}: they are written by "
                             "ScoreHistogram in an earlier stage of the run, which must have finished")
        cutoff = keep_top_cutoff(histogram, self.keep_top)
        if self.cutoff_file:
            write_cutoff(self.cutoff_file, cutoff)
        return cutoff

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if not math.isfinite(doc.metadata["score"]):  # apply fails it before (NonFiniteScoreFilter); one's own
            return False, "non_finite_score"          # pipeline: not removed as scoring 0
        if self.keep_top is not None:
            if self.cutoff is None:
                self.cutoff = self._keep_top_cutoff()
            keep = doc.metadata["score"] >= self.cutoff
        else:
            keep = doc.metadata["int_score"] >= self.threshold
        return True if keep else (False, "below_threshold")
