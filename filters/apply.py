"""`edu-filter apply`: score, deduplicate and threshold a corpus as a chain of datatrove stages.

Two orders, chosen by what is expensive (`--order`, `auto` by default):

* **dedup-first** (a transformer classifier on CPUs): duplicates are dropped before they cost model time.
  `signatures` (read, drop unreadable rows and contaminated ones, MinHash signatures) -> `minhash-buckets` ->
  `minhash-cluster` -> `filter` (read again; failed/contaminated/duplicate rows to their folders; count tokens;
  score; threshold; kept Parquet).
* **score-first** (a fastText model, or any classifier on a GPU: scoring is cheaper than MinHash): `score` (read,
  failed/contaminated aside, count tokens, score, threshold; survivors to scratch) -> the dedup chain over the
  survivors only -> `filter` (duplicates aside, kept Parquet). Only the survivors ever reach MinHash.

Exact dedup (python-edu) adds `exact-signatures` and `exact-find` before the MinHash signatures, which skip exact
duplicates. Every pass over the same rows reads them in the same order, so datatrove's dedup filters, which address a
document by its position in the stream, need no intermediate copy of the corpus (score-first's survivors and
`--keep-top`'s scored documents are one: a task's file is deleted once the task reading it last is complete, by the
executor, so no rerun reads it again). A fixed threshold is applied in the
pass that scores; `--keep-top` saves a score histogram per task, finds the cutoff once in a one-task
`keep-top-cutoff` stage and selects in a `select` stage (`--order auto` deduplicates first with `--keep-top`, so the
fraction is of the deduplicated documents; an explicit score-first takes it of every scored document). The `report`
stage writes `stats.json` from the writers' own counts and then deletes the scratch folder `work/`
(`--keep-work` keeps it); stats.json records its peak size.

A cluster keeps one member (in dedup-first an arbitrary one, in score-first one that passed the threshold); since
near-duplicates score alike, the order changes little beyond that.

Resume: a killed run restarted with the same command skips every task with a completion marker and reruns the
others from scratch; every task writes only files named after its rank, which a rerun overwrites, so nothing is
kept twice. `OUT/run_config.json` records the settings, the inputs by resolved path, size and modification time,
and the classifier by a hash of its files: a restart with anything changed is refused, naming it (`--overwrite`
starts over).
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from edu_filter.documents import (
    SCORE_RANGE,
    DocumentError,
    InputError,
    bundled_data,
    check_model_name,
    check_named_path,
    check_writable_output,
    in_score_range,
    PARTIAL_PREFIX,
    one_line,
    write_json_whole,
    writing_alone,
)

if TYPE_CHECKING:
    from edu_filter.filters.io import InputSplit

DEFAULT_WEB_MODEL = "HuggingFaceFW/fineweb-edu-classifier"
DEFAULT_CODE_MODEL = "HuggingFaceTB/python-edu-scorer"

PRESETS: dict[str, dict] = {
    # FineWeb-Edu: the classifier's int_score >= 3, MinHash dedup.
    "fineweb-edu": {"threshold": 3, "model": DEFAULT_WEB_MODEL, "dedup": True, "exact_dedup": False,
                    "decontaminate": []},
    # FineWeb-Edu-score-2: the larger, less strict release.
    "fineweb-edu-score-2": {"threshold": 2, "model": DEFAULT_WEB_MODEL, "dedup": True, "exact_dedup": False,
                            "decontaminate": []},
    # Python-Edu (SmolLM corpus): code classifier, int_score >= 4, exact + near dedup, HumanEval decontamination.
    "python-edu": {"threshold": 4, "model": DEFAULT_CODE_MODEL, "dedup": True, "exact_dedup": True,
                   "decontaminate": ["humaneval"]},
}
EXECUTORS = ("local", "slurm", "ray")
# the scratch folder's size when the dedup stages' signatures were deleted, before the filter stage wrote its output
SCRATCH_RECORD = "{logs}/dedup_scratch.json"
COUNT_TOKENIZER = "gpt2"  # what FineWeb's token_count column counts; used when the classifier has no tokenizer


def check_count_tokenizer(tokenizer: str) -> None:
    """A --tokenizer loads here as the token counting loads it, before any work: a typo used to fail the final
    stage, after the whole dedup."""
    from edu_filter.classifiers.scorer import load_classifier_tokenizer, split_revision

    name, revision = split_revision(tokenizer)
    check_named_path(name, "--tokenizer")
    try:
        load_classifier_tokenizer(name, revision)
    except Exception as e:  # noqa: BLE001 - no such repo, offline, not a tokenizer
        raise InputError(f"--tokenizer {tokenizer}: cannot load it ({type(e).__name__}: {one_line(str(e))})") from None


def recorded_settings(output: str, overwrite: bool) -> dict:
    """The settings of the run `output` holds, which a resume keeps where they were chosen for it (`auto`, a
    fallback); none with `overwrite`, or where no readable record is there."""
    from edu_filter.filters.sweep import run_settings

    return {} if overwrite else run_settings(output)


def token_count_tokenizer(model: str, tokenizer: str | None, recorded: dict | None = None) -> str:
    """The tokenizer `token_count` uses: `tokenizer` if given, else the classifier's own.

    A fastText classifier has none: GPT-2's (FineWeb's token_count), or offline the bundled MiniLM one, with a notice.
    A resumed run (`recorded`: its settings) keeps the one it recorded for the same model: GPT-2 cached since would
    have changed the settings, and the resume was refused (only --overwrite went on, losing every finished stage).
    """
    if tokenizer:
        check_count_tokenizer(tokenizer)
        return tokenizer
    from edu_filter.classifiers.fasttext_model import CONFIG_FILE

    if not (Path(model) / CONFIG_FILE).exists():
        return model
    recorded = recorded or {}
    if (recorded.get("model") == model and isinstance(recorded.get("tokenizer"), str)
            and Path(recorded["tokenizer"]).is_dir()):
        return recorded["tokenizer"]
    from transformers import AutoTokenizer

    from edu_filter.classifiers.encoders import hub_offline

    reason = "offline and not in the hub cache"
    for local_only in (True, False):  # the cache first: no network round trips when it is there
        if not local_only and hub_offline():
            break
        try:
            AutoTokenizer.from_pretrained(COUNT_TOKENIZER, local_files_only=local_only, trust_remote_code=False)
            return COUNT_TOKENIZER
        except Exception as e:  # noqa: BLE001 - not cached, offline or no such repo: fall back below
            reason = type(e).__name__
    try:
        from edu_filter.classifiers.encoders import minilm_path

        fallback = minilm_path()
    except ImportError:
        raise InputError(f"{model} is a fastText model and {COUNT_TOKENIZER} is unavailable ({reason}): give "
                         "--tokenizer for token_count") from None
    from rich.console import Console

    Console(stderr=True).print(f"[yellow]token_count: {COUNT_TOKENIZER} tokenizer unavailable ({reason}), "
                               "counting all-MiniLM-L6-v2 tokens[/]", soft_wrap=True)
    return fallback


ORDERS = ("auto", "dedup-first", "score-first")
# files and folders an apply output holds; --overwrite deletes exactly these
OUTPUT_ENTRIES = ("kept", "removed", "failed", "work", "logs", "slurm", "stats.json", "run_config.json", "README.md",
                  "provenance.json")
APPLY_LOCK = ".apply.lock"  # held by the run writing the output (`writing_alone`), kept when outputs are removed


@dataclass
class SlurmOptions:
    partition: str | None = None  # None: the cluster's default partition
    gpu_partition: str | None = None  # for the scoring stage; the CPU partition when unset
    time: str = "24:00:00"
    cpus_per_task: int = 4
    mem_gb: int | None = None  # per task; None: 4 GB per CPU (a scoring task's CPUs for its tasks, others' for theirs)
    # the minhash-cluster stage's one task, which holds every near-duplicate pair in memory (None: mem_gb)
    cluster_mem_gb: int | None = None
    # and its time limit (None: time): one task reads every bucket's pairs, for hours where the others take minutes
    cluster_time: str | None = None
    # a scoring task's time limit (None: time): scoring takes hours where a MinHash or filter task takes minutes, and
    # a shorter limit gets the many CPU tasks scheduled sooner (backfill, QOS limits on time x CPUs)
    gpu_time: str | None = None
    gpus_per_task: int = 0  # for the scoring stage
    # CPUs of a scoring task (None: cpus_per_task). On a GPU they tokenize for it: 16 threads tokenize ~5,500 docs/s,
    # one H200 scores ~3,500 at 512 tokens, while the other stages' tasks use one core each.
    gpu_cpus_per_task: int | None = None
    venv_path: str | None = None  # an activate script `source`d by every job; None: the submitting environment
    qos: str | None = None
    account: str | None = None
    # other sbatch options for every job: {"constraint": "h100", "exclusive": ""}, or ["constraint=h100", "exclusive"]
    sbatch_args: dict | list[str] = field(default_factory=dict)
    # sbatch options of the scoring stage's jobs alone, over those above: a GPU partition's own QOS, account or
    # constraint (constraint=h100 in --slurm-arg sent the CPU stages to GPU nodes, a GPU QOS got them refused)
    gpu_sbatch_args: dict | list[str] = field(default_factory=dict)
    dry_run: bool = False  # write the sbatch scripts and submit.sh, submit nothing
    # tasks per array job, a stage with more spanning several; None: the cluster's MaxArraySize (Slurm's default,
    # 1001, where no cluster says)
    max_array_size: int | None = None
    # tasks each array task runs, one after another: each array task counts as a job against the cluster's
    # MaxSubmitJobs, so 50k tasks in jobs of 10 are 5k jobs per stage (the time limit is then for 10 tasks)
    tasks_per_job: int = 1
    # resolved by the checks: a scoring task's memory (mem_gb where given; else 4 GB per scoring CPU: 4 GB over
    # --slurm-gpu-cpus 16 was 256 MB a CPU for 16 tokenizer threads, a window of documents and the CUDA context)
    scoring_mem_gb: int | None = None

    @property
    def scoring_cpus(self) -> int:
        return self.gpu_cpus_per_task or self.cpus_per_task


@dataclass
class RayOptions:
    """What each Ray task asks the cluster for (`--executor ray`); the cluster is RAY_ADDRESS's, or a local instance."""

    cpus_per_task: int = 1
    # CPUs of a scoring task (None: cpus_per_task): its torch threads on CPU; on a GPU they tokenize for it
    gpu_cpus_per_task: int | None = None
    # memory a task asks, in GB (None: 2 per CPU it asks, datatrove's default); Ray packs a node's tasks by it
    mem_gb: int | None = None
    # the minhash-cluster stage's one task, which holds every near-duplicate pair in memory (None: as mem_gb)
    cluster_mem_gb: int | None = None
    # GPUs of a scoring task: None, one where a live node has GPUs when the run starts; 1, one even where none has
    # (an autoscaler whose GPU workers are at zero adds one); 0, none (score on CPUs)
    gpus: int | None = None

    @property
    def scoring_cpus(self) -> int:
        return self.gpu_cpus_per_task or self.cpus_per_task

    def memory_gb(self, cpus: int, clusters: bool = False) -> int:
        """What a task asking `cpus` CPUs asks of memory (the minhash-cluster stage's with `clusters`)."""
        return (self.cluster_mem_gb if clusters else None) or self.mem_gb or 2 * cpus


@dataclass
class ApplyConfig:
    """Everything that decides what ends up in `kept/` (stored in OUT/run_config.json to guard resumes)."""

    inputs: list[str]
    output: str
    model: str
    threshold: int | None = None
    keep_top: float | None = None
    dedup: bool = True
    exact_dedup: bool = False
    decontaminate: list[str] = field(default_factory=list)
    order: str = "dedup-first"  # resolved: dedup-first or score-first
    long_docs: str | None = None  # None: the model's saved setting
    max_length: int | None = None
    batch_size: int | None = None  # documents per scoring batch; None: 32 on CPU, 1024 at 512 tokens on GPU
    dtype: str | None = None  # scoring precision; None: fp32 on CPU, bf16 on GPU (int8: the CPU fast path)
    tokenizer: str | None = None  # for token_count; the classifier's tokenizer when unset
    text_field: str = "text"
    id_field: str = "id"
    tasks: int = 1
    preset: str | None = None
    keep_work: bool = False

    def result_settings(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("output", "keep_work")}


def is_fasttext_model(model: str) -> bool:
    from edu_filter.classifiers.fasttext_model import CONFIG_FILE

    return (Path(model) / CONFIG_FILE).exists()


def resolve_order(order: str, model: str, on_gpu: bool, keep_top: float | None = None) -> str:
    """`auto`: score first when scoring is cheaper than MinHash (fastText, or a GPU), dedup first otherwise; with
    `--keep-top` dedup first always: the fraction is of the deduplicated documents, whichever machine runs it (score
    first took it of every scored document, duplicates too, and kept less once they went)."""
    if order not in ORDERS:
        raise InputError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    if order != "auto":
        return order
    if keep_top is not None:
        return "dedup-first"
    return "score-first" if on_gpu or is_fasttext_model(model) else "dedup-first"


def pin_hub_model(model: str, recorded: dict) -> str:
    """A hub classifier as `ORG/NAME@COMMIT`, the commit its files come from now: the tasks of one run (Slurm jobs
    start hours apart, on other nodes) and its resumes all score with those files while the hub repository moves
    on. A resumed run (`recorded`: its settings) keeps the commit it recorded when given the same unpinned id."""
    from edu_filter.classifiers.scorer import resolve_model_dir, split_revision

    name, revision = split_revision(model)
    if revision is None:
        recorded = recorded.get("model")
        if isinstance(recorded, str) and split_revision(recorded)[0] == name != recorded:  # name@revision
            return recorded
    try:
        return f"{name}@{resolve_model_dir(model).name}"
    except ValueError as e:
        raise DocumentError(f"model {model}: {e}") from None


def check_hub_model(model: str) -> None:
    """A hub id must resolve (from the cache when offline) before anything runs, not in the middle of a stage."""
    from transformers import AutoConfig

    from edu_filter.classifiers.scorer import split_revision

    try:
        name, revision = split_revision(model)
        AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - any reason: not found, offline and not cached, gated, bad config
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DocumentError(f"model {model}: not a local folder, and it cannot be loaded from the hub ({reason})") from None


def _local_path(path: str) -> str:
    return path if "://" in str(path) else os.path.abspath(path)


def check_output_apart(inputs: list[str], output: str) -> None:
    """Refuses an output folder inside a local input folder (a resumed run would read its own output as input) or
    an input inside the output (`--overwrite` would delete it)."""
    if "://" in str(output):
        return
    from edu_filter.documents import glob_split

    out = os.path.realpath(output)
    for inp in inputs:
        if "://" in str(inp):
            continue
        where = os.path.realpath(inp)
        split = glob_split(str(inp)) if not os.path.exists(inp) else None
        if split is not None:
            # a glob the shell left: its folder before the first wildcard, where the pattern matches the output, a
            # folder above it (whose files are read), or a folder on the way to it
            root, below = os.path.realpath(split[0] or "."), split[1].split("/")
            inside = out == root or out.startswith(root.rstrip(os.sep) + os.sep)
            parts = os.path.relpath(out, root).split(os.sep) if inside and out != root else []
            if inside and ("**" in below or not parts or all(
                    fnmatch.fnmatchcase(part, level) for part, level in zip(parts, below))):
                raise InputError(f"-o/--output {output} is where the input {inp} matches: the next run would read "
                                 "the output as input; write it elsewhere, or narrow the pattern")
            continue
        if out == where or out.startswith(where.rstrip(os.sep) + os.sep):
            raise InputError(f"-o/--output {output} is inside the input {inp}: the next run would read the output as "
                             "input; write it outside the input folders")
        if where.startswith(out.rstrip(os.sep) + os.sep):
            raise InputError(f"the input {inp} is inside -o/--output {output}: write the output elsewhere")


def model_kind(model: str | os.PathLike) -> str | None:
    """What a local classifier folder was trained on (`train --kind`: web or code), from its config; None for a
    hub id or a classifier trained elsewhere (the official ones record none)."""
    from edu_filter.classifiers.fasttext_model import CONFIG_FILE

    for name in ("config.json", CONFIG_FILE):
        path = Path(model) / name
        if path.is_file():
            with contextlib.suppress(ValueError, OSError):
                found = json.loads(path.read_text())
                return found.get("kind") if isinstance(found, dict) else None
    return None


def resolve_config(
    inputs: list[str], output: str, model: str | None = None, preset: str | None = None, threshold: int | None = None,
    keep_top: float | None = None, dedup: bool | None = None, exact_dedup: bool | None = None,
    decontaminate: list[str] | None = None, order: str = "auto", on_gpu: bool = False, overwrite: bool = False,
    **kwargs,
) -> ApplyConfig:
    """Preset values, overridden by whatever the caller gave explicitly; local paths made absolute. A run resumed
    into `output` (not `overwrite`) keeps what was chosen for it: the order `auto` chose, the count tokenizer."""
    if preset is not None and preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    base = PRESETS.get(preset, {"threshold": 3, "model": None, "dedup": True, "exact_dedup": False,
                                "decontaminate": []})
    model = model or base["model"]
    if model is None:
        raise InputError("give --model (a folder written by `edu-filter train`, or a hub id) or a --preset")
    if keep_top is not None and threshold is not None:
        raise InputError("give a threshold or keep_top, not both")
    if keep_top is not None and not 0 < keep_top <= 1:
        raise InputError(f"--keep-top must be a fraction in (0, 1], got {keep_top}")
    by_kind = keep_top is None and threshold is None and preset is None and model_kind(model) == "code"
    if keep_top is None and threshold is None:
        # a code classifier of ours with no preset: Python-Edu's cut, not FineWeb-Edu's
        threshold = PRESETS["python-edu"]["threshold"] if by_kind else base["threshold"]
    if threshold is not None and not in_score_range(threshold):
        raise InputError(f"threshold must be an int_score in {SCORE_RANGE}, got {threshold}")
    if order not in ORDERS:  # before the token-count tokenizer is loaded (and says so)
        raise InputError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    recorded = recorded_settings(output, overwrite)
    model = str(model)
    if Path(model).exists():
        from edu_filter.classifiers.scorer import check_classifier_folder

        model = os.path.abspath(model)
        check_classifier_folder(model)  # found only by the scoring tasks, after the whole MinHash dedup had run
    else:
        from edu_filter.classifiers.scorer import split_revision

        check_model_name(split_revision(model)[0], "model")
        check_hub_model(model)
        model = pin_hub_model(model, recorded)
    if by_kind and recorded.get("model") == model and recorded.get("keep_top") is None and \
            recorded.get("threshold") == base["threshold"]:
        threshold = base["threshold"]  # a run begun when a code classifier's default cut was 3 resumes as it began
    # scoring options are checked here, before check_resume records them in OUT/run_config.json
    from edu_filter.classifiers.scorer import (
        check_dtype,
        check_long_docs,
        check_max_length,
        refuse_transformer_options,
    )

    refuse_transformer_options(model, **{k: kwargs.get(k) for k in ("dtype", "max_length", "long_docs", "batch_size")})
    check_max_length(model, kwargs.get("max_length"))
    check_dtype(kwargs.get("dtype"))
    if kwargs.get("long_docs") is not None:
        check_long_docs(kwargs["long_docs"])
    given = [d for d in decontaminate or [] if d.lower() != "none"]
    # a set given adds to the preset's (python-edu: HumanEval): replacing them let MBPP in and HumanEval back out;
    # `none` drops the preset's
    dropped = len(given) < len(decontaminate or [])

    def eval_sets(names: list[str]) -> list[str]:
        return list(dict.fromkeys(
            str(bundled_data("code/HumanEval.jsonl.gz")) if d.lower() == "humaneval" else _local_path(d) for d in names))

    decont = eval_sets(given if dropped else [*base["decontaminate"], *given])
    if (given and not dropped and recorded.get("preset") == preset and recorded.get("model") == model
            and recorded.get("decontaminate") == eval_sets(given)):
        decont = eval_sets(given)  # a run begun when a set given replaced the preset's resumes as it began
    for d in decont:
        if not Path(d).exists():
            raise DocumentError(f"decontamination set {d} not found (give a JSONL path with --decontaminate)")
    tokenizer = token_count_tokenizer(model, kwargs.get("tokenizer"), recorded)
    kwargs["tokenizer"] = os.path.abspath(tokenizer) if Path(tokenizer).exists() else tokenizer
    dedup = base["dedup"] if dedup is None else dedup
    exact_dedup = base["exact_dedup"] if exact_dedup is None else exact_dedup
    return ApplyConfig(
        inputs=[_local_path(str(i)) for i in inputs], output=_local_path(str(output)).rstrip("/"), model=model,
        threshold=threshold, keep_top=keep_top, dedup=dedup, exact_dedup=exact_dedup, decontaminate=decont,
        order=(recorded["order"] if order == "auto" and recorded.get("order") in ORDERS[1:]  # a GPU then, or none
               else resolve_order(order, model, on_gpu, keep_top)) if dedup or exact_dedup else "dedup-first",
        preset=preset,
        **kwargs,
    )


def fingerprint_inputs(files: list[tuple[str, str]]) -> dict:
    """{file: [size, mtime]} for every input file (fsspec metadata for remote ones), FOOTER_THREADS at a time: one
    after another, 100k files on S3 were ~40 minutes of HEAD requests at every start and resume."""
    from concurrent.futures import ThreadPoolExecutor

    from edu_filter.filters.io import FOOTER_THREADS, file_fingerprint
    from edu_filter.provenance import _in_order_with_bar

    with ThreadPoolExecutor(FOOTER_THREADS) as pool:
        return dict(_in_order_with_bar(pool, lambda file: file_fingerprint(*file), files, "reading the inputs' sizes"))


def run_record(cfg: ApplyConfig, files: list[tuple[str, str]], used: list[dict]) -> dict:
    """What a resume must match: the settings, every input file's size and mtime, and the provenance fingerprints
    (`used`, from `provenance.describe_inputs`) of the classifier and the decontamination sets; a hub id or remote
    path stands for itself."""
    fingerprints = {role: {e["path"]: e["fingerprint"] or e["path"] for e in used if e["role"] == role}
                    for role in ("classifier", "decontamination")}
    return {
        "settings": cfg.result_settings(),
        "input_files": fingerprint_inputs(files),
        "model_fingerprint": next(iter(fingerprints["classifier"].values())),
        "decontaminate_files": fingerprints["decontamination"],
        # what `sweep` counts as educational by default (label >= 4 for code), where the model folder may be gone
        "model_kind": model_kind(cfg.model),
    }


# Settings a resume may change: the scoring batch size changes speed and memory, not which documents are kept (scores
# agree to float rounding), so a run started on CPUs can be finished on GPUs with their bigger batches.
RESUME_NEUTRAL = ("batch_size",)


def _what_changed(previous: dict, current: dict) -> str:
    if "settings" not in previous:
        return "it was made by an older edu-filter"
    old, new = previous["settings"], current["settings"]
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in RESUME_NEUTRAL)
    if changed:
        return "settings: " + ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in changed)
    if previous.get("model_fingerprint") != current["model_fingerprint"]:
        return f"the classifier's files changed ({current['settings']['model']})"
    old_files, new_files = previous.get("input_files", {}), current["input_files"]
    for f in sorted(set(old_files) | set(new_files)):
        if f not in new_files:
            return f"input {f} is gone"
        if f not in old_files:
            return f"input {f} is new"
        if old_files[f] != new_files[f]:
            return f"input {f} changed (size or modification time)"
    if previous.get("decontaminate_files") != current["decontaminate_files"]:
        return "a decontamination set changed"
    if previous.get("input_split") != current.get("input_split"):  # tasks finished before hold other rows
        return "an older edu-filter split the input among the tasks another way"
    if previous.get("input_parts") != current.get("input_parts"):
        return ("the input files are cut into other parts than when the run was planned (a Parquet footer or a gzipped "
                "file's start that read then and not now, or the other way)")
    return ""


def resumed_record(output: str, overwrite: bool) -> dict | None:
    """The record of the run in `output` this one resumes (not with `overwrite`); None where there is none, or one
    that does not read (`prepare_output` reports it)."""
    try:
        recorded = json.loads((Path(output) / "run_config.json").read_text())
    except (OSError, ValueError):
        return None
    return recorded if isinstance(recorded, dict) and not overwrite else None


def split_planned_the_old_way(recorded: dict | None) -> bool:
    """Whether the run resumed (`resumed_record`'s) was planned when a split input was dealt to the tasks
    round-robin, and an input that could not be split was read by every task: its finished tasks hold those rows,
    so the rest must read theirs the same way."""
    from edu_filter.filters.io import CONTIGUOUS

    split = recorded.get("input_split") if recorded is not None else None
    return recorded is not None and not (isinstance(split, str) and split.endswith(CONTIGUOUS))


def stage_values_of_run(recorded: dict | None) -> str | None:
    """How the files between stages hold values JSON has no type for: as this edu-filter does (`STAGE_VALUES`), or,
    for a run begun by an edu-filter from before and resumed (`recorded`, None), as text, the way its finished tasks'
    files hold them: read into the same kept files, the two ways typed a column as strings in some files and not in
    others."""
    from edu_filter.filters.io import STAGE_VALUES

    return STAGE_VALUES if recorded is None else recorded.get("stage_values")


def bucket_workers_of_run(cfg: ApplyConfig, recorded: dict | None, given: int | None) -> int:
    """Tasks sharing each MinHash bucket's merge: a resumed run's own (`recorded`; 1 where an older edu-filter
    planned it), whose finished bucket tasks are numbered by it; `given`, or one per 100 tasks (`bucket_workers`),
    for a new run. Which pairs are found does not depend on it."""
    from edu_filter.filters.minhash import bucket_workers

    if recorded is None:
        return given or bucket_workers(cfg.tasks)
    planned = recorded.get("bucket_workers", 1)
    if given is not None and given != planned and cfg.dedup:
        raise InputError(f"--bucket-workers {given}: the run in {cfg.output} was planned with {planned}, by which its "
                         "finished bucket tasks are numbered; leave it out to resume, or add --overwrite")
    return planned


def prepare_output(cfg: ApplyConfig, files: list[tuple[str, str]], used: list[dict], overwrite: bool = False,
                   input_split: str | None = None, input_parts: str | None = None,
                   stage_values: str | None = None, bucket_workers: int = 1) -> dict:
    """Record what this run is made of (and return it); a restart into the same folder must be made of the same
    things, its input split among the tasks the same way (`input_split`: see `filters.io.InputSplit`)."""
    from edu_filter.filters.executors import refuse_tasks_left_running

    out = Path(cfg.output)
    if "://" in cfg.output:
        raise DocumentError(f"--output {cfg.output}: apply writes to a local or shared filesystem path")
    if out.exists() and not out.is_dir():
        raise DocumentError(f"--output {out} is a file")
    path = out / "run_config.json"
    if out.exists() and any(p.name != APPLY_LOCK for p in out.iterdir()) and not path.exists():
        strangers = sorted(p.name for p in out.iterdir() if not is_output_entry(p))
        if strangers or not overwrite:
            what = ", ".join(strangers[:3]) or "a partial apply output"
            raise DocumentError(f"--output {out} is not empty and holds no apply run ({what}); give an empty or new "
                                "folder" + ("" if strangers else ", or --overwrite"))
        refuse_tasks_left_running(out)
        remove_outputs(out)
    current = run_record(cfg, files, used)
    if input_split:
        current["input_split"] = input_split
    if input_parts:
        current["input_parts"] = input_parts
    if stage_values:
        current["stage_values"] = stage_values
    current["bucket_workers"] = bucket_workers
    if path.exists():
        try:
            previous = json.loads(path.read_text())
            changed = _what_changed(previous, current) if isinstance(previous, dict) else "run_config.json holds no record"
        except (OSError, ValueError) as e:  # cut short by a kill, or edited: --overwrite still starts over
            changed = f"run_config.json does not read: {one_line(str(e))}"
        if changed and not overwrite:
            raise DocumentError(f"{out} holds a run made differently ({changed}); add --overwrite to start over, "
                                "or use another output folder")
        if changed or overwrite:
            finished = sum(len(list(d.iterdir())) for d in (out / "logs").glob("*/completions") if d.is_dir())
            if not changed and finished:  # the same run: it would have resumed
                print(f"note: --overwrite starts over: the {finished} finished tasks of the run in {out}, made the "
                      "way this one is, are discarded (without --overwrite it resumes)", file=sys.stderr, flush=True)
            refuse_tasks_left_running(out)
            remove_outputs(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_json_whole(path, current)  # a kill mid-write would leave a record no resume reads
    except OSError as e:
        raise DocumentError(f"--output {out}: cannot write there ({e.strerror})") from None
    return current


WRITTEN_WHOLE = ("run_config.json", "stats.json", "provenance.json")  # by `write_json_whole`, under a hidden name first


def is_output_entry(path: Path) -> bool:
    """Whether `path` in an output folder is apply's: OUTPUT_ENTRIES, its lock, and the hidden file a record is
    written to before it takes its name, left by a kill."""
    name = path.name
    return name in (*OUTPUT_ENTRIES, APPLY_LOCK) or (
        name.startswith(PARTIAL_PREFIX) and name.removeprefix(PARTIAL_PREFIX) in WRITTEN_WHOLE and path.is_file())


def remove_outputs(out: Path) -> None:
    for target in list(out.iterdir()):
        if not is_output_entry(target) or target.name == APPLY_LOCK:
            continue
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink()


@dataclass
class Stage:
    name: str
    pipeline: list
    tasks: int
    scores: bool = False  # runs the classifier
    gpu: bool = False  # runs a classifier that scores on a GPU (not fastText): asks one where the cluster has some
    clusters: bool = False  # MinHash's cluster stage: one task holding every near-duplicate pair (its own memory)
    # a merge over the whole corpus (MinHash's 14 bucket merges, each hours at terabytes): one task per Slurm array
    # task whatever --slurm-tasks-per-job, which would run them one after another within one --slurm-time, and
    # saves a few jobs where it is for the stages of thousands
    merges: bool = False


def build_stages(cfg: ApplyConfig, files: list[tuple[str, str]], threads_per_task: int = 1,
                 provenance_inputs: list[dict] | None = None, input_fingerprints: dict | None = None,
                 split: InputSplit | None = None, on_gpu: bool = True, tagged: bool = True,
                 bucket_workers: int = 1) -> list[Stage]:
    """The stages of one run, in order, over the input `files` from `expand_inputs` (see the module docstring);
    every pass over them checks `input_fingerprints` (`run_record`'s) first; `tagged`: `RecordWriter`'s. Without
    `on_gpu` the scorer is told to use the CPU: a task the scheduler gave no GPU still sees the node's (Ray does not
    hide them from a task asking none, nor Slurm without device constraints), and would load a model onto a GPU
    another job holds."""
    from datatrove.pipeline.dedup.exact_dedup import ExactDedupFilter, ExactDedupSignature, ExactFindDedups
    from datatrove.pipeline.dedup.minhash import MinhashDedupFilter

    from edu_filter.filters.dedup import (
        EXACT_FIND_FILES_PER_TASK,
        AwaitStageFiles,
        CheckDedupResults,
        DropDedupScratch,
        FastNGramsDecontFilter,
        OpenFilesLimit,
        RecordDedupResults,
        RecordScratchPeak,
        build_decont_index,
        check_hashing,
        decont_config,
        exact_dedup_config,
        fineweb_minhash_config,
    )
    from edu_filter.filters.io import (
        ApplyInputReader,
        ClearUnfinishedAttempt,
        CountedJsonlWriter,
        DropTaskScratch,
        InputErrorFilter,
        KeptParquetWriter,
        RankFileReader,
        RecordWriter,
        input_field_types,
    )
    from edu_filter.filters.minhash import (
        ArrayMinhashDedupCluster,
        FastMinhashSignature,
        SharedMinhashDedupBuckets,
    )
    from edu_filter.filters.progress import TaskProgressTime
    from edu_filter.filters.report import WriteApplyStats
    from edu_filter.filters.scoring import (CountTokens, EduClassifierScorer, KeepTopCutoff, NonFiniteScoreFilter,
                                             ScoreHistogram, ScoreThresholdFilter)
    from edu_filter.filters.sweep import SUMMARY_FOLDER, ScoreSummaryWriter

    out = cfg.output
    work, logs, counts = f"{out}/work", f"{out}/logs", f"{out}/logs/counts"
    if cfg.dedup or cfg.exact_dedup:
        check_hashing()
    if cfg.decontaminate and not os.path.exists(f"{out}/stats.json"):  # a finished run: no stage reads it again
        build_decont_index(cfg.decontaminate, f"{work}/decont_index", decont_config())
    minhash, exact = fineweb_minhash_config(), exact_dedup_config()

    def progress(stage: str) -> str:
        return f"{logs}/{stage}/progress"

    def removed(reason: str, filename: str = "${rank}.jsonl.gz", counts_name: str | None = None):
        return CountedJsonlWriter(f"{out}/removed/{reason}", f"removed/{reason}", counts, filename, counts_name)

    def input_pass(stage: str, final: bool) -> list:
        """Reading the input: unreadable and contaminated rows are dropped, and written out only in the final pass."""
        steps = [
            ApplyInputReader(files, text_key=cfg.text_field, id_key=cfg.id_field, progress_folder=progress(stage),
                             counts_folder=counts if final else None, fingerprints=input_fingerprints, split=split),
            InputErrorFilter(exclusion_writer=CountedJsonlWriter(
                f"{out}/failed", "failed/${filter_reason}", counts, "${filter_reason}/${rank}.jsonl.gz", "failed")
                if final else None),
        ]
        if final:
            steps.append(CountTokens(cfg.tokenizer or cfg.model))
        if cfg.decontaminate:
            steps.append(FastNGramsDecontFilter(f"{work}/decont_index", config=decont_config(),
                                                exclusion_writer=removed("contaminated") if final else None))
        return steps

    def scoring() -> list:
        scorer = [EduClassifierScorer(cfg.model, batch_size=cfg.batch_size, max_length=cfg.max_length,
                                      long_docs=cfg.long_docs, dtype=cfg.dtype, num_threads=threads_per_task,
                                      device=None if on_gpu else "cpu"),
                  NonFiniteScoreFilter(exclusion_writer=CountedJsonlWriter(
                      f"{out}/failed", "failed/${filter_reason}", counts, "${filter_reason}/scored_${rank}.jsonl.gz",
                      "failed-scored")),
                  ScoreSummaryWriter(f"{out}/{SUMMARY_FOLDER}")]  # what `sweep` reads instead of the documents
        if cfg.keep_top is not None:  # selection waits for every task's scores
            return [*scorer, ScoreHistogram(f"{work}/histograms"), RecordWriter(f"{work}/scored", tagged=tagged)]
        return [*scorer, ScoreThresholdFilter(threshold=cfg.threshold, exclusion_writer=removed("below_threshold"))]

    def dropped(folder: str) -> list:
        """The step dropping a task's file of `folder` once the task that reads it last is complete."""
        return [] if cfg.keep_work else [DropTaskScratch([folder])]

    def select_stages(then: list) -> list[Stage]:
        """The cutoff found once over every task's histogram, then each task's scored documents selected by it."""
        cutoff_file, found_file = f"{logs}/extra/keep_top.json", f"{work}/keep_top_cutoff.json"
        # the scored documents are all in work/ now, before the select tasks drop theirs: stats.json's peak counts them
        measured = [] if cfg.keep_work else [RecordScratchPeak(work, SCRATCH_RECORD.format(logs=logs))]
        return [Stage("keep-top-cutoff", [KeepTopCutoff(f"{work}/histograms", cfg.keep_top, cutoff_file, found_file),
                                          *measured], 1, merges=True),
                Stage("select", [
                    RankFileReader(f"{work}/scored", progress_folder=progress("select")),
                    ScoreThresholdFilter(keep_top=cfg.keep_top, histogram_folder=f"{work}/histograms",
                                         cutoff_file=cutoff_file, found_file=found_file,
                                         exclusion_writer=removed("below_threshold")),
                    *then,
                    *dropped(f"{work}/scored"),
                ], cfg.tasks)]

    def dedup_chain(source, tail: list, final_scores: bool) -> list[Stage]:
        """Exact and near dedup over the stream `source(stage, final)`; the last stage removes duplicates, then `tail`."""
        exact_sigs, exact_dups = f"{work}/exact/sigs", f"{work}/exact/dups"
        near_sigs, near_buckets = f"{work}/minhash/sigs", f"{work}/minhash/buckets"
        near_remove = f"{work}/minhash/remove"
        stages = []
        if cfg.exact_dedup:
            stages += [
                Stage("exact-signatures", source("exact-signatures", False)
                      + [ExactDedupSignature(exact_sigs, config=exact)], cfg.tasks),
                Stage("exact-find", [OpenFilesLimit(cfg.tasks, EXACT_FIND_FILES_PER_TASK),
                                     AwaitStageFiles(exact_sigs, "exact-signatures", cfg.tasks),
                                     ExactFindDedups(exact_sigs, exact_dups, config=exact),
                                     RecordDedupResults(exact_dups)], 1, merges=True),
            ]
        if cfg.dedup:
            skip_exact = [CheckDedupResults([exact_dups]), ExactDedupFilter(exact_dups, config=exact)] if (
                cfg.exact_dedup) else []
            stages += [
                Stage("minhash-signatures", source("minhash-signatures", False) + skip_exact
                      + [FastMinhashSignature(near_sigs, config=minhash)], cfg.tasks),
                Stage("minhash-buckets", [OpenFilesLimit(cfg.tasks),
                                          AwaitStageFiles(near_sigs, "minhash-signatures", cfg.tasks,
                                                          bucket_workers=bucket_workers),
                                          SharedMinhashDedupBuckets(near_sigs, near_buckets, config=minhash)],
                      minhash.num_buckets * bucket_workers, merges=True),
                Stage("minhash-cluster", [OpenFilesLimit(cfg.tasks),  # a .remove file per task, held to the end
                                          AwaitStageFiles(near_buckets, "minhash-buckets",
                                                          buckets=minhash.num_buckets, bucket_workers=bucket_workers),
                                          ArrayMinhashDedupCluster(near_buckets, near_remove, config=minhash),
                                          RecordDedupResults(near_remove)],
                      1, clusters=True, merges=True),
            ]
        found = [folder for folder, on in ((exact_dups, cfg.exact_dedup), (near_remove, cfg.dedup)) if on]
        final = [CheckDedupResults(found), *source("filter", True)]
        if cfg.exact_dedup:
            final.append(ExactDedupFilter(exact_dups, config=exact, exclusion_writer=removed(
                "duplicate", "exact_${rank}.jsonl.gz", "duplicate-exact")))
        if cfg.dedup:
            final.append(MinhashDedupFilter(near_remove, exclusion_writer=removed(
                "duplicate", "near_${rank}.jsonl.gz", "duplicate-near")))
        if not cfg.keep_work:  # the signatures go once read, the last stage reading them having measured them
            stages[-1].pipeline.append(RecordScratchPeak(work, SCRATCH_RECORD.format(logs=logs)))
            writing = ("exact-signatures", "minhash-signatures")
            final.append(DropDedupScratch(
                (near_sigs, near_buckets, minhash.num_buckets) if cfg.dedup else None,
                exact_sigs if cfg.exact_dedup else None,
                [f"{logs}/{stage.name}" for stage in stages if stage.name in writing],
                [(f"{logs}/{stage.name}", stage.tasks) for stage in stages if stage.name not in writing],
                SCRATCH_RECORD.format(logs=logs), bucket_workers=bucket_workers))
        stages.append(Stage("filter", final + tail, cfg.tasks, scores=final_scores))
        return stages

    kept = [KeptParquetWriter(f"{out}/kept", counts_folder=counts, misfits=CountedJsonlWriter(
        f"{out}/failed", "failed/${filter_reason}", counts, "${filter_reason}/kept_${rank}.jsonl.gz", "failed-kept"),
        field_types=input_field_types(files, cfg.text_field, cfg.id_field))]
    deduplicating = cfg.dedup or cfg.exact_dedup
    if not deduplicating or cfg.order == "dedup-first":
        if cfg.keep_top is None:
            stages = dedup_chain(input_pass, scoring() + kept, final_scores=True) if deduplicating else [
                Stage("filter", input_pass("filter", True) + scoring() + kept, cfg.tasks, scores=True)]
        else:
            stages = dedup_chain(input_pass, scoring(), final_scores=True) if deduplicating else [
                Stage("filter", input_pass("filter", True) + scoring(), cfg.tasks, scores=True)]
            stages += select_stages(kept)
    else:  # score-first: only what passes the threshold is deduplicated
        survivors = [RecordWriter(f"{work}/survivors", tagged=tagged)]

        def survivors_pass(stage: str, final: bool) -> list:
            return [RankFileReader(f"{work}/survivors", progress_folder=progress(stage))]

        if cfg.keep_top is None:
            stages = [Stage("score", input_pass("score", True) + scoring() + survivors, cfg.tasks, scores=True)]
        else:
            stages = [Stage("score", input_pass("score", True) + scoring(), cfg.tasks, scores=True),
                      *select_stages(survivors)]
        stages += dedup_chain(survivors_pass, kept + dropped(f"{work}/survivors"), final_scores=False)
    from edu_filter.provenance import command_line

    stages.append(Stage("report", [WriteApplyStats(out, cfg.result_settings(), keep_work=cfg.keep_work,
                                                   extra_folder=f"{logs}/extra", provenance_inputs=provenance_inputs,
                                                   command=command_line(),
                                                   scratch_record=SCRATCH_RECORD.format(logs=logs))], 1, merges=True))
    for stage in stages:
        stage.gpu = stage.scores and not is_fasttext_model(cfg.model)
        reader = next((step for step in stage.pipeline if getattr(step, "progress_folder", None)), None)
        if reader is not None:  # its time moves on while the task's last documents are scored and written
            stage.pipeline.append(TaskProgressTime(reader.progress_folder))
        clear = ClearUnfinishedAttempt(stage.pipeline, counts)
        if clear.targets or clear.count_names:
            stage.pipeline.insert(0, clear)
    return stages


def report_again_without_stats(out: str) -> None:
    """A finished run whose stats.json is gone or unreadable (deleted, or cut short by an older version) has its
    report stage run again: skipped as done, it left every rerun failing on the missing file."""
    done, stats = Path(out) / "logs" / "report" / "completions" / "00000", Path(out) / "stats.json"
    if not done.exists():
        return
    try:
        json.loads(stats.read_text())
    except (OSError, ValueError):
        print(f"note: {stats} is missing or unreadable: the report stage runs again to rebuild it", file=sys.stderr,
              flush=True)
        done.unlink()


def check_dedup_results_kept(out: str, stages: list) -> None:
    """Before any work: a resumed run whose duplicates were found, and not yet removed by every task, still has what
    was found (datatrove's filter reads a missing file as "no duplicates" and keeps them all)."""
    from edu_filter.filters.dedup import (
        CheckDedupResults,
        RecordDedupResults,
        completed_tasks,
        dedup_results_lost,
        missing_dedup_results,
    )

    def completed(stage) -> bool:
        return completed_tasks(f"{out}/logs/{stage.name}") >= stage.tasks

    finders = {step.folder: stage for stage in stages for step in stage.pipeline
               if isinstance(step, RecordDedupResults)}
    for stage in stages:
        for check in (step for step in stage.pipeline if isinstance(step, CheckDedupResults)):
            for folder in check.folders:
                if completed(finders[folder]) and not completed(stage):
                    if missing := missing_dedup_results(folder):
                        raise DocumentError(dedup_results_lost(folder, missing))


def check_named_fields(files: list[tuple[str, str]], text_field: str, id_field: str) -> None:
    """A --text-field (or a --id-field other than `id`) that no row of the first input has is a typo, not a corpus
    of rows without text: every document would go to failed/no_text, or be named by its line."""
    from edu_filter.filters.io import first_input_fields

    seen = first_input_fields(files)
    if seen is None:
        return
    where, names = seen
    for option, name in (("--text-field", text_field), ("--id-field", id_field if id_field != "id" else None)):
        if name is not None and names and name not in names:
            shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
            raise DocumentError(f"{option} {name!r}: no such field in {where} (fields: {shown})")


# The command-line names of each executor's options, to say which were given for another executor.
SLURM_FLAGS = {"partition": "--slurm-partition", "gpu_partition": "--slurm-gpu-partition", "time": "--slurm-time",
               "cpus_per_task": "--slurm-cpus", "mem_gb": "--slurm-mem-gb", "gpus_per_task": "--slurm-gpus",
               "gpu_cpus_per_task": "--slurm-gpu-cpus", "venv_path": "--slurm-venv", "qos": "--slurm-qos",
               "account": "--slurm-account", "sbatch_args": "--slurm-arg", "gpu_sbatch_args": "--slurm-gpu-arg",
               "dry_run": "--dry-run",
               "max_array_size": "--slurm-max-array", "cluster_mem_gb": "--slurm-cluster-mem-gb",
               "tasks_per_job": "--slurm-tasks-per-job", "cluster_time": "--slurm-cluster-time",
               "gpu_time": "--slurm-gpu-time"}
RAY_FLAGS = {"cpus_per_task": "--ray-cpus", "gpu_cpus_per_task": "--ray-gpu-cpus", "mem_gb": "--ray-mem-gb",
             "gpus": "--ray-gpus", "cluster_mem_gb": "--ray-cluster-mem-gb"}


def refuse_other_executors_options(executor: str, slurm: SlurmOptions | None, ray: RayOptions | None) -> None:
    """Options of Slurm or Ray given to a run on another executor are refused, naming them: ignored, a run meant for
    the cluster (its GPUs, its partition) would run on this machine's CPUs instead, for hours, unnoticed."""
    for name, opts, defaults, flags in (("slurm", slurm, SlurmOptions(), SLURM_FLAGS),
                                        ("ray", ray, RayOptions(), RAY_FLAGS)):
        if executor == name or opts is None:
            continue
        given = [flag for key, flag in flags.items()
                 if getattr(opts, key) != getattr(defaults, key)
                 and (key not in ("sbatch_args", "gpu_sbatch_args") or getattr(opts, key))]
        if given:
            raise InputError(f"{', '.join(given)} {'is an option' if len(given) == 1 else 'are options'} of "
                             f"--executor {name}, and this run uses --executor {executor}: give --executor {name}, "
                             f"or leave {'it' if len(given) == 1 else 'them'} out")


def run_apply(
    inputs: list[str], output: str, model: str | None = None, preset: str | None = None,
    threshold: int | None = None, keep_top: float | None = None, dedup: bool | None = None,
    exact_dedup: bool | None = None, decontaminate: list[str] | None = None, executor: str = "local",
    tasks: int = 1, workers: int | None = None, slurm: SlurmOptions | None = None, order: str = "auto",
    overwrite: bool = False, wait: bool = False, verbose: bool = False, push_to_hub: str | None = None,
    show: bool = True, ray: RayOptions | None = None, bucket_workers: int | None = None, **options,
) -> dict | None:
    """Run (or, for Slurm, submit and with `wait` follow) the whole apply pipeline; returns stats.json's content
    when the run finished here. `bucket_workers`: tasks sharing each MinHash bucket's merge (None: `bucket_workers`
    of the tasks; a resumed run keeps its own). From a script of your own, call it under
    `if __name__ == "__main__":`: datatrove's worker processes import the script again (forkserver, spawn)."""
    from rich.console import Console

    from edu_filter.filters import executors as ex
    from edu_filter.filters.io import expand_inputs, input_split, reading_factor

    if executor not in EXECUTORS:
        raise InputError(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    if tasks < 1 or (workers is not None and workers < 1):
        raise InputError("tasks and workers must be >= 1")
    if bucket_workers is not None and not 1 <= bucket_workers <= 99:
        # datatrove numbers a bucket's files with two digits: from the 100th, the cluster stage reads them out of
        # order, and another copy of a duplicate would be kept than with fewer
        raise InputError(f"--bucket-workers must be 1 to 99, got {bucket_workers}")
    for name in ("batch_size", "max_length"):
        if options.get(name) is not None and options[name] < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {options[name]}")
    refuse_other_executors_options(executor, slurm, ray)
    if executor != "slurm" and wait:
        raise InputError("--wait follows a Slurm chain; local and Ray runs always wait")
    if executor == "slurm" and verbose:  # heard nowhere: the jobs log on the cluster's nodes
        raise InputError("--verbose shows a local or Ray run's datatrove logs as it goes; a Slurm chain's tasks log "
                         "in OUT/logs on the nodes (`edu-filter status OUT` says how it goes)")
    if push_to_hub and executor == "slurm" and not wait:
        raise InputError("--push-to-hub uploads the finished dataset: with Slurm it needs --wait")
    if slurm is not None and slurm.dry_run and wait:  # exited 0 having followed and uploaded nothing
        raise InputError("--dry-run writes the scripts and submits nothing: --wait (and --push-to-hub) have no chain "
                         "to follow; run the same command without --dry-run, or submit.sh and then the command "
                         "with --wait")
    check_writable_output(output, "-o/--output", folder=True)
    check_output_apart([str(i) for i in inputs], str(output))
    glob_chars = sorted(set(os.path.abspath(output)) & set("*?[]"))
    if glob_chars:  # datatrove and fsspec find a stage's files by glob patterns that start with the output path
        raise InputError(f"-o/--output {os.path.abspath(output)}: holds {' '.join(map(repr, glob_chars))}, which file "
                         "patterns under it would read as wildcards (the counts of a run found nothing); use another "
                         "name")
    from edu_filter import provenance

    if push_to_hub:
        provenance.check_can_push(push_to_hub)  # before any work
    console = Console(stderr=True, quiet=not show)
    slurm, ray = slurm or SlurmOptions(), ray or RayOptions()
    if executor == "slurm":
        ex.check_script_path(str(output), "-o/--output")
        slurm = ex.check_slurm_request(slurm)  # before anything is read or written
    if executor == "ray":
        ex.check_ray_request(ray)
    files = expand_inputs([_local_path(str(i)) for i in inputs])  # bad inputs fail here, before anything is written
    if not files:
        raise DocumentError(f"no JSONL or Parquet files in {', '.join(map(str, inputs))}")
    local = [os.path.join(folder, name) for folder, name in files if "://" not in folder]
    if len(local) == len(files) and all(os.path.getsize(f) == 0 for f in local):
        raise DocumentError(f"the input is empty ({', '.join(map(str, inputs))})")
    check_named_fields(files, options.get("text_field") or "text", options.get("id_field") or "id")
    gpu_flags = {"slurm": ("--slurm-gpus", "--slurm-gpu-cpus", slurm.gpus_per_task),
                 "ray": ("--ray-gpus", "--ray-gpu-cpus", ray.gpus)}
    if executor in gpu_flags and gpu_flags[executor][2] and model and is_fasttext_model(model):  # presets: hub models
        flag, cpus_flag, gpus = gpu_flags[executor]
        raise InputError(f"{flag} {gpus}: {model} is a fastText model, which scores on CPUs: each scoring task "
                         f"would hold a GPU idle (leave {flag} out; {cpus_flag} still sizes the scoring tasks)")
    if executor == "ray":  # connected before the order is chosen: it depends on whether the cluster has GPUs
        ex.connect_ray(ray, verbose=verbose)
    on_gpu = ex.scoring_on_gpu(executor, slurm, ray)
    if executor == "ray" and ray.gpus is None:  # decided once: a GPU node idle through a dedup-first MinHash may be
        ray = replace(ray, gpus=int(on_gpu))     # scaled away before the scoring stage asks again
    cfg = resolve_config(inputs, output, model=model, preset=preset, threshold=threshold, keep_top=keep_top,
                         dedup=dedup, exact_dedup=exact_dedup, decontaminate=decontaminate, order=order,
                         on_gpu=on_gpu, tasks=tasks, overwrite=overwrite, **options)
    # options of a deduplication the run does not do: accepted and ignored, --order was recorded as dedup-first
    if not (cfg.dedup or cfg.exact_dedup) and order != "auto":
        raise InputError(f"--order {order} orders scoring and deduplication, and this run does not deduplicate "
                         "(--no-dedup)")
    if not cfg.dedup and bucket_workers is not None:
        raise InputError("--bucket-workers shares MinHash's bucket merges, and this run does no MinHash dedup")
    given = [flag for flag, value in (("--slurm-cluster-mem-gb", slurm.cluster_mem_gb),
                                      ("--slurm-cluster-time", slurm.cluster_time),
                                      ("--ray-cluster-mem-gb", ray.cluster_mem_gb)) if value is not None]
    if given and not cfg.dedup:  # heard, they would say the run has a stage it has not
        raise InputError(f"{', '.join(given)}: {'sizes' if len(given) == 1 else 'size'} the minhash-cluster stage, "
                         "which a run without MinHash dedup does not have; leave "
                         f"{'it' if len(given) == 1 else 'them'} out, or drop --no-dedup")
    if cfg.dedup or cfg.exact_dedup:
        from edu_filter.filters.dedup import check_open_files

        check_open_files(cfg.tasks, exact=cfg.exact_dedup)
    # the same command with --wait while its chain runs (the login node's process was killed, a closed SSH session):
    # follows that chain instead of refusing; its settings must be the run's (prepare_output), nothing is submitted
    following = (executor == "slurm" and wait and not slurm.dry_run and not overwrite and ex.slurm_answers()
                 and bool(ex.queued_jobs(cfg.output)))
    if executor == "slurm":
        if not following:  # a dry run too: it rewrites the ranks the queued jobs would run
            ex.refuse_if_queued(cfg.output, dry_run=slurm.dry_run)
    elif (Path(cfg.output) / "slurm").is_dir() and ex.slurm_answers():
        ex.refuse_if_queued(cfg.output)  # a local or Ray run would rewrite the files the queued jobs use
    # one run of an output at a time: a second one (--overwrite, another node of a shared file system) removed the
    # first's files as it wrote them, its kept documents lost or made under two thresholds
    with writing_alone(Path(cfg.output), "-o/--output", lock=Path(cfg.output) / APPLY_LOCK):
        used = provenance.describe_inputs({"documents": cfg.inputs, "classifier": cfg.model,
                                           "decontamination": cfg.decontaminate})
        recorded = resumed_record(cfg.output, overwrite)  # read once: it lists every input file
        split = input_split(files, cfg.tasks, contiguous=not split_planned_the_old_way(recorded))
        reads = (split.reads(cfg.tasks) if split else [cfg.tasks if len(files) < cfg.tasks else 1] * len(files))
        factor = reading_factor(files, reads)  # the cost grows with the tasks
        if factor != 0:
            how = "an unknown multiple" if factor is None else f"{factor:.1f}x"
            console.print(f"[yellow]warning: up to {max(reads)} of the {cfg.tasks} tasks read one input file and keep "
                          "their share of its rows (a gzipped JSONL file cannot be entered midway: every task dealt a "
                          "part of it reads it whole; so do tasks sharing a part where the parts are fewer than the "
                          f"tasks): {how} the reading of one pass; give more files (plain JSONL, Parquet), or fewer "
                          "--tasks, where reading dominates[/]", soft_wrap=True)
        stage_values = stage_values_of_run(recorded)
        bucket_workers = bucket_workers_of_run(cfg, recorded, bucket_workers)
        record = prepare_output(cfg, files, used, overwrite=overwrite, input_split=split.name if split else None,
                                input_parts=split.digest if split and split.contiguous else None,
                                stage_values=stage_values, bucket_workers=bucket_workers)
        if executor == "ray":
            ex.refuse_unshared_ray_output(cfg.output)  # run_config.json is written: asked from every node
        report_again_without_stats(cfg.output)
        local_workers = workers or 1
        scoring_at_once = min(local_workers, cfg.tasks)  # --workers 64 over --tasks 1 scored on one of 64 cores
        threads = ex.cpu_threads_per_task(executor, scoring_at_once, slurm, ray)
        stages = build_stages(cfg, files, threads_per_task=threads, provenance_inputs=used,
                              input_fingerprints=record["input_files"], split=split, on_gpu=on_gpu,
                              tagged=stage_values is not None, bucket_workers=bucket_workers)
        ex.save_stage_list(cfg.output, stages)
        check_dedup_results_kept(cfg.output, stages)
        if cfg.dedup or cfg.exact_dedup:
            why = ("scoring is cheaper than MinHash here" if cfg.order == "score-first" else
                   "--keep-top: the fraction is of the deduplicated documents" if cfg.keep_top is not None
                   else "the classifier is the costly step")
            console.print(f"apply: {cfg.order} ({why}); {len(stages)} stages; logs in {cfg.output}/logs",
                          soft_wrap=True)

        if executor == "slurm":
            if following:
                console.print(f"the chain of {cfg.output} is queued or running: following it", soft_wrap=True)
                stats = ex.wait_for_chain(cfg.output, console)
            else:
                stats = ex.run_slurm(stages, cfg.output, workers, slurm, wait=wait, console=console)
        else:
            # tasks at once: locally 1 unless given; on Ray no limit unless given (Ray packs them by their resources)
            at_once = workers if executor == "ray" else local_workers
            stats = ex.run_here(stages, cfg.output, executor, at_once, console=console, verbose=verbose, ray=ray)
        if push_to_hub and stats is not None:
            provenance.write_dataset_card(cfg.output, stats, repo_id=push_to_hub)  # loads from the hub, named after it
            url = provenance.push_to_hub(cfg.output, push_to_hub, repo_type="dataset")
            console.print(f"uploaded to {url}")
        return stats
