"""Deduplication and decontamination settings, on top of datatrove's MinHash, exact-dedup and n-gram decont steps.

MinHash uses the FineWeb settings: 5-gram word shingles, 14 buckets x 8 hashes (pairs above ~0.75 Jaccard are very
likely caught) with 64-bit xxhash. xxhash 4.x breaks datatrove's string hashing and a sha1 64-bit configuration
found none of our planted duplicates, so both are refused here rather than left to fail silently.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
from datatrove.data import Document
from datatrove.io import get_datafolder
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.decont.n_grams import NGramsDecontConfig, NGramsDecontFilter
from datatrove.pipeline.dedup.exact_dedup import ExactDedupConfig
from datatrove.pipeline.dedup.minhash import MinhashConfig
from datatrove.utils.hashing import HashConfig, create_hash_func
from datatrove.utils.text import TextNormConfig, ngrams, simplify_text
from datatrove.utils.typeshelper import Languages
from datatrove.utils.word_tokenizers import load_word_tokenizer

from edu_filter.documents import DocumentError, iter_raw_rows
from edu_filter.filters.minhash import (
    SHINGLES_PER_BLOCK,
    LazyWordSplitter,
    bytes_hash_func,
    shingle_hashes,
    simplify_text_fast,
)


def check_hashing() -> None:
    """Fail early, with the fix, when the installed xxhash would make datatrove's dedup hashing break."""
    import xxhash

    major = int(xxhash.VERSION.split(".")[0])
    if major >= 4:
        raise RuntimeError(
            f"xxhash {xxhash.VERSION} is installed; datatrove 0.10's MinHash hashing needs xxhash<4 "
            "(pip install 'xxhash<4')"
        )


SPARE_FILES = 64  # open files a task needs beyond the ones it merges (its logs, libraries, sockets)


# files the exact-dedup find holds open per task: every signature file, and a .c4_dup and a .c4_cnt output per task
# with duplicates (datatrove keeps each output open to the end); the MinHash merges hold one per task
EXACT_FIND_FILES_PER_TASK = 3


def open_files_needed(tasks: int, per_task: int = 1) -> int:
    return per_task * tasks + SPARE_FILES


def check_open_files(tasks: int, exact: bool = False) -> None:
    """Refused before any work: the merge stages (MinHash buckets and clusters, exact-dedup find) open files per task
    of the signature stage at once, and fail with "Too many open files" after the whole signature pass, where the
    hard limit here is lower (a node's may differ; the soft limit is raised to it by `OpenFilesLimit`)."""
    import resource

    per_task = EXACT_FIND_FILES_PER_TASK if exact else 1
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and open_files_needed(tasks, per_task) > hard:
        merges = "one file per task" if per_task == 1 else f"{per_task} files per task (exact dedup)"
        raise DocumentError(f"--tasks {tasks}: deduplication merges {merges} at once, and this machine lets a process "
                            f"open {hard} files (ulimit -Hn): give --tasks {(hard - SPARE_FILES) // per_task} or "
                            "fewer, or ask for a higher limit")


class OpenFilesLimit(PipelineStep):
    """First step of a merge stage: raises this process's soft limit of open files to what merging `tasks` files
    needs (the hard limit at most). Jobs inherit the login node's soft limit, often 1024, and failed with "Too many
    open files" at the first run of more than ~1,000 tasks, after the whole signature pass."""

    name = "📂 open files limit"
    type = "🔧 - SETUP"

    def __init__(self, tasks: int, per_task: int = 1):
        super().__init__()
        self.tasks, self.per_task = tasks, per_task

    def run(self, data=None, rank: int = 0, world_size: int = 1):  # not a generator: raised before the next step
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = open_files_needed(self.tasks, self.per_task)
        if soft != resource.RLIM_INFINITY and soft < wanted:
            raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            if raised < wanted:
                raise RuntimeError(f"this stage opens {self.per_task * self.tasks} files at once and this node lets a "
                                   f"process open {hard} (ulimit -Hn): run again with --tasks "
                                   f"{(hard - SPARE_FILES) // self.per_task} or fewer")
        return data


class AwaitStageFiles(PipelineStep):
    """Step of a dedup merge stage before datatrove's, which lists the folder the tasks before wrote and reads what it
    finds: a file a shared filesystem lists late (NFS caches a folder's listing for up to a minute, and the next
    stage starts seconds after the last task ends) was left out, its duplicates kept, the counts adding up. Every
    task before always writes its files (`kind`: its signatures per bucket, a bucket task's .dups, the exact
    signatures): waits until the listing holds this task's, then fails naming any still missing."""

    name = "⏳ stage files"
    type = "🫂 - DEDUP"

    def __init__(self, folder: str, kind: str, tasks: int = 1, buckets: int = 1, bucket_workers: int = 1,
                 grace: float | None = None):
        super().__init__()
        self.folder, self.kind, self.tasks = folder, kind, tasks
        self.buckets, self.bucket_workers, self.grace = buckets, bucket_workers, grace

    def expected(self, rank: int) -> tuple[str, set[str]]:
        """(the subfolder listed, the files this task reads there, relative to `folder`)."""
        from datatrove.utils.typeshelper import ExtensionHelperSD

        if self.kind == "minhash-signatures":
            bucket = f"bucket_{rank // self.bucket_workers:03d}"
            return bucket, {f"{bucket}/{r:05d}.minhash.sig" for r in range(self.tasks)}
        if self.kind == "minhash-buckets":
            return "", {f"{b:05d}_{w:02d}.dups" for b in range(self.buckets) for w in range(self.bucket_workers)}
        if self.kind == "exact-signatures":  # one finder: hash range 0000
            return "0000", {f"0000/{r:05d}{ExtensionHelperSD.stage_1_signature}" for r in range(self.tasks)}
        raise ValueError(f"unknown stage files {self.kind!r}")

    def run(self, data=None, rank: int = 0, world_size: int = 1):  # not a generator: checked before the next step
        from edu_filter.filters.executors import COMPLETED_GRACE_S, after_listing_grace

        subfolder, wanted = self.expected(rank)
        folder = get_datafolder(self.folder)

        def missing() -> list[str]:
            folder.invalidate_cache()
            listed = folder.list_files(subdirectory=subfolder) if folder.exists(subfolder) else []
            return sorted(wanted - set(listed))

        grace = COMPLETED_GRACE_S if self.grace is None else self.grace
        left = after_listing_grace(missing, grace, every=min(5.0, grace / 10))
        if left:
            shown = ", ".join(left[:3]) + (f" and {len(left) - 3} more" if len(left) > 3 else "")
            raise DocumentError(f"{self.folder}: {shown} not there, though the stage writing them completed (a "
                                "scratch cleanup, or a filesystem listing them late?): merging without them would "
                                "keep their duplicates. Run again with --overwrite to start over")
        return data


class RecordScratchPeak(PipelineStep):
    """Last step of the last dedup stage before the filter stage (one task): the scratch folder's size now, when it
    holds every signature, for stats.json's peak (`DropDedupScratch` deletes them next). A rerun finding less keeps
    the larger figure."""

    name = "📏 scratch size"
    type = "🫂 - DEDUP"

    def __init__(self, work: str, record: str):
        super().__init__()
        self.work, self.record = work, record

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        from datatrove.utils.logging import logger

        from edu_filter.documents import write_json_whole
        from edu_filter.filters.report import folder_bytes, recorded_scratch

        if data:
            yield from data
        try:
            measured = folder_bytes(self.work)
            if measured > recorded_scratch(self.record):
                Path(self.record).parent.mkdir(parents=True, exist_ok=True)
                write_json_whole(self.record, {"peak_scratch_bytes": measured})
        except OSError as e:  # a statistic: the stage's own work is done; without a record nothing is deleted early
            logger.warning(f"the scratch folder's size could not be recorded ({e}); its signatures stay until the "
                           "report")


class DropDedupScratch(PipelineStep):
    """A step of the stage that removes the duplicates: the signatures and the MinHash buckets are read by no
    later stage, and were kept beside the whole kept dataset until the report (MinHash signatures of FineWeb's 22B
    documents are ~20 TB). Task r deletes the signature files rank r wrote, and task r < buckets the r-th bucket's
    file: a few deletions per task, nothing listed. Only once every stage reading them has all its completion files
    (a chain whose queued jobs never ran would otherwise lose them): the report stage deletes whatever is left."""

    name = "🗑 dedup scratch"
    type = "🫂 - DEDUP"

    def __init__(self, minhash: tuple[str, str, int] | None, exact_sigs: str | None, writers: list[str],
                 readers: list[tuple[str, int]], record: str, bucket_workers: int = 1):
        """`minhash`: (signatures folder, buckets folder, buckets), each bucket merged by `bucket_workers` tasks
        (`SharedMinhashDedupBuckets`); `writers`: the logging folders of the stages
        writing the signatures (this rank's completion is looked up, not the folder listed: 50k files);
        `readers`: (logging folder, tasks) of the stages reading them; `record`: `RecordScratchPeak`'s, without
        which nothing is deleted (the peak would miss them: a stage completed by a run with --keep-work, or by an
        older edu-filter, measured none)."""
        super().__init__()
        self.minhash, self.exact_sigs, self.record = minhash, exact_sigs, record
        self.writers, self.readers, self.bucket_workers = writers, readers, bucket_workers

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        from edu_filter.filters.io import remove_scratch_files

        if (os.path.exists(self.record) and all(completed_tasks(logs) >= tasks for logs, tasks in self.readers)
                and all(os.path.exists(f"{logs}/completions/{rank:05d}") for logs in self.writers)):
            remove_scratch_files(self.files_of(rank))
        if data:
            yield from data

    def files_of(self, rank: int) -> list[str]:
        """What rank `rank` wrote in the signature stages (datatrove's file names), and the bucket stage's task r."""
        from datatrove.utils.typeshelper import ExtensionHelperSD

        files = []
        if self.minhash is not None:
            sigs, buckets, count = self.minhash
            files += [f"{sigs}/bucket_{b:03d}/{rank:05d}.minhash.sig" for b in range(count)]
            if rank < count * self.bucket_workers:  # the bucket stage's task `rank`: its bucket, its worker's range
                bucket, worker = divmod(rank, self.bucket_workers)
                files.append(f"{buckets}/{bucket:05d}_{worker:02d}.dups")
        if self.exact_sigs is not None:  # one finder task: its hash range 0000
            files.append(f"{self.exact_sigs}/0000/{rank:05d}{ExtensionHelperSD.stage_1_signature}")
        return files


# Written by the one task that finds the duplicates (exact-find, minhash-cluster), beside its results: the files it
# wrote. datatrove's filters read a missing results file as "no duplicates in this task": results lost to a scratch
# cleanup (or work/ deleted) before the filter stage ran kept every duplicate, the counts adding up.
DEDUP_RESULTS_MANIFEST = "_written.json"


class RecordDedupResults(PipelineStep):
    """Last step of the task finding the duplicates: lists what it wrote in `DEDUP_RESULTS_MANIFEST`."""

    name = "📋 dedup results"
    type = "🫂 - DEDUP"

    def __init__(self, folder: str):
        super().__init__()
        self.folder = folder

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        if data:
            yield from data
        folder = get_datafolder(self.folder)
        written = sorted(f for f in folder.list_files(recursive=True) if f != DEDUP_RESULTS_MANIFEST)
        with folder.open(DEDUP_RESULTS_MANIFEST, "w") as f:
            json.dump({"files": written}, f)


def missing_dedup_results(folder: str, rank: int | None = None) -> list[str]:
    """What `RecordDedupResults` listed in `folder` and is gone (the list itself, when it is and nothing else is
    there): all of it, or of task `rank` only (its .remove file, or its .c4_dup and .c4_counts files)."""
    from datatrove.utils.typeshelper import ExtensionHelperSD

    data = get_datafolder(folder)
    try:
        with data.open(DEDUP_RESULTS_MANIFEST) as f:
            written = json.load(f)["files"]
    except (OSError, ValueError, KeyError):
        # found by an edu-filter that listed nothing (a run it began, resumed by this one): its files there stand
        older = data.exists("") and any(f != DEDUP_RESULTS_MANIFEST for f in data.list_files(recursive=True))
        return [] if older else [DEDUP_RESULTS_MANIFEST]
    if rank is not None:  # MinHash's .remove; exact dedup's duplicates and counts
        mine = (f"{rank:06d}.remove", f"{rank:05d}{ExtensionHelperSD.stage_2_duplicates}",
                f"{rank:05d}{ExtensionHelperSD.stage_2_counts}")
        return [f for f in written if f.rsplit("/", 1)[-1] in mine and not data.exists(f)]
    present = set(data.list_files(recursive=True)) if data.exists("") else set()
    return [f for f in written if f not in present]


def dedup_results_lost(folder: str, missing: list[str]) -> str:
    shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    return (f"the duplicates the dedup found are gone from {folder} ({shown} missing: a scratch cleanup, or work/ "
            "deleted?): the filter stage would keep every duplicate. Run again with --overwrite to start over")


class CheckDedupResults(PipelineStep):
    """First step of a task reading the duplicates found (before datatrove's filter, which would keep them all
    when their file is gone): fails the task, naming what is missing."""

    name = "🔎 dedup results"
    type = "🫂 - DEDUP"

    def __init__(self, folders: list[str]):
        super().__init__()
        self.folders = folders

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        for folder in self.folders:
            missing = missing_dedup_results(folder, rank)
            if missing:
                raise DocumentError(dedup_results_lost(folder, missing))
        if data:
            yield from data


def completed_tasks(logs: str) -> int:
    """How many tasks of the stage logging to `logs` completed."""
    try:
        return len(os.listdir(os.path.join(logs, "completions")))
    except OSError:
        return 0


def fineweb_minhash_config() -> MinhashConfig:
    return MinhashConfig(
        n_grams=5, num_buckets=14, hashes_per_bucket=8, hash_config=HashConfig(precision=64, hash_fc="xxhash")
    )


def document_text(doc: Document) -> str:
    """Exact-dedup content: the text as is (byte-identical files collapse to one)."""
    return doc.text


def exact_dedup_config() -> ExactDedupConfig:
    return ExactDedupConfig(content_getter=document_text, hash_config=HashConfig(precision=64, hash_fc="xxhash"))


def decont_config(n_grams: int = 12) -> NGramsDecontConfig:
    """datatrove's 12-gram decontamination, adapted to code.

    Prompts are matched too: a HumanEval prompt is a signature plus docstring that does not appear by chance. Numbers
    are not normalised to 0 (datatrove's prose default), which made every file with a dozen numeric literals match
    a HumanEval test list.
    """
    return NGramsDecontConfig(n_grams=n_grams, find_query_ngrams=True, find_overlap_ngrams=True,
                              norm_config=TextNormConfig(norm_numbers=False))


class FastNGramsDecontFilter(LazyWordSplitter, NGramsDecontFilter):
    """datatrove's n-gram decontamination, the same verdicts and metadata, its words split as `FastMinhashSignature`
    splits them: spaCy's Doc per document ran at ~0.3 MB/s per core (in every pass over the input that decontaminates,
    and ~50x a big file's size in memory), ~10x slower than the rest of a pass. Other norm configs or languages keep
    datatrove's own path."""

    name = "💥 N-grams decontaminate (fast)"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        norm = self.config.norm_config
        self._fast_split = (self.language == Languages.english and norm.lowercase and norm.remove_punctuation
                            and norm.norm_whitespace)
        self._hash_bytes = bytes_hash_func(self.config.hash_config)
        self._index = None  # (sorted hashes, the set of each, the sets' names): see `_load_index`

    def _load_index(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """The eval sets' hashes sorted, with the set of each (the last file naming a hash, as datatrove's dict has
        it): ~10 bytes a hash, where datatrove's dict of Python ints took ~150 in every task of every pass (1.5 GB
        a task for a set of 10M n-grams)."""
        from datatrove.utils.binaryio import read_np_from_file

        files = self.index_folder.list_files(glob_pattern="**/*.index.hashes")
        parts = []
        for name in files:
            with self.index_folder.open(name, mode="rb") as f:
                parts.append(read_np_from_file(f, np.dtype(self.config.hash_config.np_descr),
                                               self.index_folder.is_local()).astype(np.uint64, copy=False))
        sets = np.repeat(np.arange(len(parts), dtype=np.int32), [len(p) for p in parts])
        hashes = np.concatenate(parts) if parts else np.zeros(0, np.uint64)
        parts.clear()
        order = np.argsort(hashes, kind="stable")
        hashes, sets = hashes[order], sets[order]
        last = np.ones(len(hashes), dtype=bool)
        last[:-1] = hashes[1:] != hashes[:-1]
        return hashes[last], sets[last], [name.removesuffix(".index.hashes") for name in files]

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if not self._fast_split:
            return super().filter(doc)
        if getattr(self, "_index", None) is None:  # a step pickled in a chain an older edu-filter queued has none
            self._index = self._load_index()
        keys, sets, names = self._index
        if not len(keys):
            return True
        joined = self.splitter.joined(simplify_text_fast(doc.text, self.config.norm_config))
        n = self.config.n_grams
        hashes = shingle_hashes(joined, n, self._hash_bytes).ravel()
        for first in range(0, len(hashes), SHINGLES_PER_BLOCK):  # a block at a time: a long document's positions
            block = hashes[first : first + SHINGLES_PER_BLOCK]
            at = np.minimum(np.searchsorted(keys, block), len(keys) - 1)
            found = np.flatnonzero(keys[at] == block)
            if len(found):  # the first n-gram of the document in an eval set
                task = names[sets[at[found[0]]]]
                doc.metadata["contaminated_ngram"] = _ngram_at(joined, first + int(found[0]), n)
                doc.metadata["contaminated_task"] = task
                self.stat_update(f"contaminated_{task}")
                return False, "contaminated"
        return True


def _ngram_at(joined: str, i: int, n: int) -> str:
    """Words i .. i + n - 1 of space-joined words, found by their offsets (no list of every word)."""
    data = joined.encode("utf-8")
    spaces = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 32)
    start = 0 if i == 0 else int(spaces[i - 1]) + 1
    end = int(spaces[i + n - 1]) if i + n - 1 < len(spaces) else len(data)
    return data[start:end].decode("utf-8")


def _distinctive(gram) -> bool:
    """n-grams of mostly numbers or single letters (digit grids, `0 1 0 0 1 ...`) match unrelated files."""
    return sum(len(tok) > 1 and any(c.isalpha() for c in tok) for tok in gram) >= len(gram) // 3


def _eval_pairs(path: str) -> list[tuple[str | None, str]]:
    """(query, answer) pairs of an eval set: HumanEval-style (prompt, canonical_solution), MBPP-style (text or prompt,
    code), (query, label) or text."""
    pairs = []
    for lineno, row in iter_raw_rows(path):
        if "canonical_solution" in row:
            query, answer = ("prompt", "canonical_solution")
        elif "code" in row and ("text" in row or "prompt" in row):  # MBPP: its description was indexed, not its code
            query, answer = ("text" if "text" in row else "prompt", "code")
        elif "label" in row and "query" in row:
            query, answer = ("query", "label")
        elif isinstance(row.get("text"), str):
            query, answer = (None, "text")
        else:
            raise DocumentError(
                f"{path}:{lineno}: eval rows need prompt+canonical_solution, text+code, query+label or text; got "
                f"{sorted(row)}"
            )
        pairs.append((None if query is None else _eval_text(row.get(query), path, lineno, query),
                      _eval_text(row[answer], path, lineno, answer)))
    return pairs


def _eval_text(value, path: str, lineno: int, field: str) -> str:
    """An eval field as text: a number or a boolean (a class label: 2, true) as written, a list of strings (the
    choices, the accepted answers) a line each, null as nothing."""
    if value is None:
        return ""
    if isinstance(value, (str, int, float, bool)):
        return value if isinstance(value, str) else json.dumps(value)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "\n".join(value)
    raise DocumentError(f"{path}:{lineno}: field {field!r} is a {type(value).__name__}, not text, a number or a list "
                        "of strings")


def build_decont_index(eval_sets: list[str], index_folder: str, config: NGramsDecontConfig | None = None) -> dict:
    """Writes one datatrove `<task>.index.hashes` file per eval set, in the format `NGramsDecontFilter` loads.

    Mirrors datatrove's `NGramsDecontIndexer.compute_hashes` (answer n-grams, n-grams overlapping prompt and answer,
    and here prompt n-grams too) without its lighteval dependency. Returns the number of hashes per task.
    """
    config = config or decont_config()
    tokenizer = load_word_tokenizer(Languages.english)
    hash_func = create_hash_func(config.hash_config)
    folder = Path(index_folder)  # under the run's output, which is local
    n = config.n_grams
    counts = {}
    for path in eval_sets:
        hashes: set[int] = set()
        pairs = _eval_pairs(path)
        unmatched = 0  # items shorter than n words: no document can match them
        for query, answer in pairs:
            answer_tokens = tokenizer.word_tokenize(simplify_text(answer, config.norm_config))
            grams = list(ngrams(answer_tokens, n))
            if query:
                query_tokens = tokenizer.word_tokenize(simplify_text(query, config.norm_config))
                if config.find_query_ngrams:
                    grams.extend(ngrams(query_tokens, n))
                if config.find_overlap_ngrams:
                    grams.extend(
                        query_tokens[-n + 1 + i :] + answer_tokens[: i + 1]
                        for i in range(n - 1)
                        if len(query_tokens) >= n - 1 - i and len(answer_tokens) >= i + 1
                    )
            hashes.update(hash_func(" ".join(g)) for g in grams if _distinctive(g))
            unmatched += not any(_distinctive(g) for g in grams)
        if unmatched:  # said, not silent: a set of short items (labels, one-line tasks) removed nothing
            effect = "it removes nothing" if not hashes else "no document can match those"
            print(f"warning: --decontaminate {path}: {unmatched:,} of its {len(pairs):,} items have fewer than {n} "
                  f"words (after normalisation), the n-grams matched: {effect}", file=sys.stderr, flush=True)
        task = stem = Path(path).name.split(".")[0].replace(" ", "_")
        for k in range(2, len(eval_sets) + 2):  # e1/test.jsonl and e2/test.jsonl: two indexes, not one overwritten
            if task not in counts:
                break
            task = f"{stem}-{k}"
        index = np.array(sorted(hashes), dtype=config.hash_config.np_descr).tobytes()
        target = folder / f"{task}.index.hashes"
        # written whole, and only when it changed: a rerun following its queued chain must not cut short an index
        # that the chain's running tasks load
        if not (target.is_file() and target.read_bytes() == index):
            folder.mkdir(parents=True, exist_ok=True)
            partial = folder.parent / f".partial-{folder.name}-{target.name}"  # outside: every file there is loaded
            partial.write_bytes(index)
            os.replace(partial, target)
        counts[task] = len(hashes)
    return counts
