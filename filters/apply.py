"""`edu-filter apply`: score, deduplicate and threshold a corpus as a chain of datatrove stages.

Stages (each a datatrove executor; `OUT/logs/<stage>/` holds its logs, stats and per-task completion markers):

1. `prepare`  read inputs; unreadable rows -> `failed/<reason>/`; n-gram decontamination -> `removed/contaminated/`;
              count tokens; write `work/clean/`; exact-dedup or MinHash signatures.
2. `exact-find`, `exact-filter` (code presets)  exact duplicates -> `removed/duplicate/`.
3. `minhash-buckets`, `minhash-cluster`  FineWeb MinHash (5-grams, 14 x 8).
4. `score`    near duplicates -> `removed/duplicate/`; classifier `score`/`int_score`; write `work/scored/`.
5. `select`   `int_score >= threshold` (or `--keep-top`) -> `kept/` Parquet; the rest -> `removed/below_threshold/`.
6. `report`   `stats.json`, counted from the files on disk.

Dedup runs before scoring: the classifier is by far the most expensive step, so duplicates are dropped before they
cost model time (FineWeb-Edu likewise scored already-deduplicated FineWeb). The price is that a cluster keeps an
arbitrary member, not its best-scored one; near-duplicates score alike, so this rarely changes the kept set.

Resume: a killed run restarted with the same command skips every task with a completion marker and reruns the
others from scratch; every task writes only files named after its rank, which a rerun overwrites, so nothing is
kept twice. `OUT/run_config.json` refuses a restart with different settings.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edu_filter.documents import DocumentError

DEFAULT_WEB_MODEL = "HuggingFaceFW/fineweb-edu-classifier"
DEFAULT_CODE_MODEL = "HuggingFaceTB/python-edu-scorer"
BUNDLED_HUMANEVAL = Path(__file__).resolve().parent.parent / "data" / "code" / "HumanEval.jsonl.gz"

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
COUNT_TOKENIZER = "gpt2"  # what FineWeb's token_count column counts; used when the classifier has no tokenizer


def token_count_tokenizer(model: str, tokenizer: str | None) -> str:
    """The tokenizer `token_count` uses: `tokenizer` if given, else the classifier's own.

    A fastText classifier has none: GPT-2's (FineWeb's token_count), or offline the bundled MiniLM one, with a notice.
    """
    if tokenizer:
        return tokenizer
    from edu_filter.classifiers.fasttext_model import CONFIG_FILE

    if not (Path(model) / CONFIG_FILE).exists():
        return model
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(COUNT_TOKENIZER)
        return COUNT_TOKENIZER
    except Exception as e:  # noqa: BLE001 - offline or no such repo: fall back below
        reason = type(e).__name__
    try:
        from edu_filter.classifiers.encoders import minilm_path

        fallback = minilm_path()
    except ImportError:
        raise ValueError(f"{model} is a fastText model and {COUNT_TOKENIZER} is unavailable ({reason}): give "
                         "--tokenizer for token_count") from None
    from rich.console import Console

    Console(stderr=True).print(f"[yellow]token_count: {COUNT_TOKENIZER} tokenizer unavailable ({reason}), "
                               "counting all-MiniLM-L6-v2 tokens[/]", soft_wrap=True)
    return fallback


@dataclass
class SlurmOptions:
    partition: str = "cpu"
    gpu_partition: str | None = None  # for the score stage; the CPU partition when unset
    time: str = "24:00:00"
    cpus_per_task: int = 4
    mem_per_cpu_gb: int = 4
    gpus_per_task: int = 0  # for the score stage
    venv_path: str | None = None  # `source`d by every job
    sbatch_args: dict = field(default_factory=dict)
    dry_run: bool = False  # write the sbatch scripts and submit.sh, submit nothing


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
    long_docs: str | None = None  # None: the model's saved setting
    max_length: int | None = None
    batch_size: int = 32
    dtype: str | None = None  # scoring precision; None: fp32 on CPU, bf16 on GPU (int8: the CPU fast path)
    tokenizer: str | None = None  # for token_count; the classifier's tokenizer when unset
    text_field: str = "text"
    id_field: str = "id"
    tasks: int = 1
    preset: str | None = None

    def result_settings(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "output"}


def resolve_config(
    inputs: list[str], output: str, model: str | None = None, preset: str | None = None, threshold: int | None = None,
    keep_top: float | None = None, dedup: bool | None = None, exact_dedup: bool | None = None,
    decontaminate: list[str] | None = None, **kwargs,
) -> ApplyConfig:
    """Preset values, overridden by whatever the caller gave explicitly."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    base = PRESETS.get(preset, {"threshold": 3, "model": None, "dedup": True, "exact_dedup": False,
                                "decontaminate": []})
    model = model or base["model"]
    if model is None:
        raise ValueError("give --model (a folder written by `edu-filter train`, or a hub id) or a --preset")
    if keep_top is not None and threshold is not None:
        raise ValueError("give a threshold or keep_top, not both")
    if keep_top is None and threshold is None:
        threshold = base["threshold"]
    if threshold is not None and not 0 <= threshold <= 5:
        raise ValueError(f"threshold must be an int_score between 0 and 5, got {threshold}")
    # scoring options are checked here, before check_resume records them in OUT/run_config.json
    from edu_filter.classifiers.scorer import check_dtype, check_long_docs

    check_dtype(kwargs.get("dtype"))
    if kwargs.get("long_docs") is not None:
        check_long_docs(kwargs["long_docs"])
    decont = [
        str(BUNDLED_HUMANEVAL) if d.lower() == "humaneval" else d
        for d in (decontaminate if decontaminate is not None else base["decontaminate"])
    ]
    for d in decont:
        if not Path(d).exists():
            raise DocumentError(f"decontamination set {d} not found (give a JSONL path with --decontaminate)")
    kwargs["tokenizer"] = token_count_tokenizer(str(model), kwargs.get("tokenizer"))
    return ApplyConfig(
        inputs=[str(i) for i in inputs], output=str(output), model=str(model), threshold=threshold,
        keep_top=keep_top, dedup=base["dedup"] if dedup is None else dedup,
        exact_dedup=base["exact_dedup"] if exact_dedup is None else exact_dedup, decontaminate=decont,
        preset=preset, **kwargs,
    )


def check_resume(cfg: ApplyConfig) -> None:
    """Record the settings; a restart into the same folder must use the same ones (or the outputs would mix)."""
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "run_config.json"
    settings = cfg.result_settings()
    if path.exists():
        previous = json.loads(path.read_text())
        changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
        if changed:
            raise ValueError(
                f"{out} holds a run with different settings ({', '.join(changed)}); use another output folder or "
                "delete it to start over"
            )
    else:
        path.write_text(json.dumps(settings, indent=2))


def build_stages(cfg: ApplyConfig, workers: int, files: list[tuple[str, str]]) -> list[tuple[str, list, int]]:
    """(stage name, pipeline, tasks) in run order, over the input `files` from `expand_inputs`."""
    from datatrove.pipeline.decont.n_grams import NGramsDecontFilter
    from datatrove.pipeline.dedup.exact_dedup import ExactDedupFilter, ExactDedupSignature, ExactFindDedups
    from datatrove.pipeline.dedup.minhash import (
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )

    from edu_filter.filters.dedup import (
        build_decont_index,
        check_hashing,
        decont_config,
        exact_dedup_config,
        fineweb_minhash_config,
    )
    from edu_filter.filters.io import (
        ApplyInputReader,
        InputErrorFilter,
        KeptParquetWriter,
        RankFileReader,
        record_writer,
    )
    from edu_filter.filters.report import WriteApplyStats
    from edu_filter.filters.scoring import (
        CountTokens,
        EduClassifierScorer,
        SaveScores,
        ScoreThresholdFilter,
        cpu_threads_per_task,
    )

    out = cfg.output.rstrip("/")
    work, logs = f"{out}/work", f"{out}/logs"
    if cfg.dedup or cfg.exact_dedup:
        check_hashing()
    minhash = fineweb_minhash_config()
    exact = exact_dedup_config()
    stages = []

    prepare = [
        ApplyInputReader(files, text_key=cfg.text_field, id_key=cfg.id_field),
        InputErrorFilter(exclusion_writer=record_writer(f"{out}/failed", "${filter_reason}/${rank}.jsonl.gz")),
    ]
    if cfg.decontaminate:
        build_decont_index(cfg.decontaminate, f"{work}/decont_index", decont_config())
        prepare.append(NGramsDecontFilter(
            f"{work}/decont_index", config=decont_config(),
            exclusion_writer=record_writer(f"{out}/removed/contaminated"),
        ))
    prepare += [CountTokens(cfg.tokenizer or cfg.model), record_writer(f"{work}/clean")]
    if cfg.exact_dedup:
        prepare.append(ExactDedupSignature(f"{work}/exact/sigs", config=exact))
    elif cfg.dedup:
        prepare.append(MinhashDedupSignature(f"{work}/minhash/sigs", config=minhash))
    stages.append(("prepare", prepare, cfg.tasks))

    scoring_input = f"{work}/clean"
    if cfg.exact_dedup:
        stages.append(("exact-find", [ExactFindDedups(f"{work}/exact/sigs", f"{work}/exact/dups", config=exact)], 1))
        exact_filter = [
            RankFileReader(f"{work}/clean"),
            ExactDedupFilter(f"{work}/exact/dups", config=exact,
                             exclusion_writer=record_writer(f"{out}/removed/duplicate", "exact_${rank}.jsonl.gz")),
            record_writer(f"{work}/unique"),
        ]
        if cfg.dedup:
            exact_filter.append(MinhashDedupSignature(f"{work}/minhash/sigs", config=minhash))
        stages.append(("exact-filter", exact_filter, cfg.tasks))
        scoring_input = f"{work}/unique"
    if cfg.dedup:
        stages.append(("minhash-buckets", [MinhashDedupBuckets(f"{work}/minhash/sigs", f"{work}/minhash/buckets",
                                                               config=minhash)], minhash.num_buckets))
        stages.append(("minhash-cluster", [MinhashDedupCluster(f"{work}/minhash/buckets", f"{work}/minhash/remove",
                                                               config=minhash)], 1))

    score = [RankFileReader(scoring_input)]
    if cfg.dedup:
        score.append(MinhashDedupFilter(
            f"{work}/minhash/remove",
            exclusion_writer=record_writer(f"{out}/removed/duplicate", "near_${rank}.jsonl.gz"),
        ))
    score += [
        EduClassifierScorer(cfg.model, batch_size=cfg.batch_size, max_length=cfg.max_length, long_docs=cfg.long_docs,
                            dtype=cfg.dtype, num_threads=cpu_threads_per_task(workers)),
        SaveScores(f"{work}/scores"),
        record_writer(f"{work}/scored"),
    ]
    stages.append(("score", score, cfg.tasks))
    stages.append(("select", [
        RankFileReader(f"{work}/scored"),
        ScoreThresholdFilter(threshold=cfg.threshold, keep_top=cfg.keep_top, scores_folder=f"{work}/scores",
                             exclusion_writer=record_writer(f"{out}/removed/below_threshold")),
        KeptParquetWriter(f"{out}/kept"),
    ], cfg.tasks))
    stages.append(("report", [WriteApplyStats(out, f"{logs}/prepare", cfg.result_settings())], 1))
    return stages


def _local_executors(stages, logs: str, workers: int):
    from datatrove.executor import LocalPipelineExecutor

    return [
        (name, LocalPipelineExecutor(pipeline, tasks=tasks, workers=min(workers, tasks), logging_dir=f"{logs}/{name}"))
        for name, pipeline, tasks in stages
    ]


def _ray_executors(stages, logs: str, workers: int):
    import ray
    from datatrove.executor.ray import RayPipelineExecutor

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"))
    return [
        (name, RayPipelineExecutor(pipeline, tasks=tasks, workers=min(workers, tasks), logging_dir=f"{logs}/{name}",
                                   cpus_per_task=1, mem_per_cpu_gb=1,
                                   gpus_per_task=1 if name == "score" and _has_gpu() else 0))
        for name, pipeline, tasks in stages
    ]


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _slurm_executors(stages, logs: str, workers: int, opts: SlurmOptions):
    from datatrove.executor.slurm import SlurmPipelineExecutor

    executors, previous = [], None
    for name, pipeline, tasks in stages:
        scoring = name == "score"
        previous = SlurmPipelineExecutor(
            pipeline, tasks=tasks, workers=min(workers, tasks), time=opts.time,
            partition=(opts.gpu_partition or opts.partition) if scoring else opts.partition,
            cpus_per_task=opts.cpus_per_task, mem_per_cpu_gb=opts.mem_per_cpu_gb,
            gpus_per_task=opts.gpus_per_task if scoring else 0, job_name=f"edu-filter-{name}",
            logging_dir=f"{logs}/{name}", depends=None if opts.dry_run else previous, venv_path=opts.venv_path,
            sbatch_args=opts.sbatch_args, slurm_logs_folder=f"{logs}/{name}/slurm_logs", mail_type="NONE",
        )
        executors.append((name, previous))
    return executors


def write_slurm_scripts(executors, out: str) -> Path:
    """What `SlurmPipelineExecutor.launch_job` writes, minus the `sbatch` calls, plus `submit.sh` chaining the stages
    with `afterok` dependencies. Each stage's `executor.pik` is the one its array tasks load."""
    import dill
    from dill import CONTENTS_FMODE

    lines = ["#!/bin/bash", "# Submits the edu-filter apply stages in order, each after the previous one succeeded.",
             "set -euo pipefail", 'cd "$(dirname "$0")"', "dep=()"]
    for i, (name, ex) in enumerate(executors):
        ranks = ex.get_incomplete_ranks()
        if not ranks:
            continue
        with ex.logging_dir.open("executor.pik", "wb") as fh:
            dill.dump(ex, fh, fmode=CONTENTS_FMODE)
        with ex.logging_dir.open("ranks_to_run.json", "w") as fh:
            json.dump(ranks, fh)
        script = ex.get_launch_file_contents(
            ex.get_sbatch_args(len(ranks)),
            f"srun -l -n 1 launch_pickled_pipeline {ex.logging_dir.resolve_paths('executor.pik')}",
        )
        path = Path(out) / "slurm" / f"{i:02d}_{name}.slurm"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(script)
        lines.append(f'jid=$(sbatch --parsable --export=ALL,RUN_OFFSET=0 "${{dep[@]}}" {path.name})')
        lines.append('dep=(--dependency=afterok:"$jid")')
        lines.append(f'echo "{name}: job $jid"')
    submit = Path(out) / "slurm" / "submit.sh"
    submit.parent.mkdir(parents=True, exist_ok=True)
    submit.write_text("\n".join(lines) + "\n")
    submit.chmod(0o755)
    return submit


def run_apply(
    inputs: list[str], output: str, model: str | None = None, preset: str | None = None,
    threshold: int | None = None, keep_top: float | None = None, dedup: bool | None = None,
    exact_dedup: bool | None = None, decontaminate: list[str] | None = None, executor: str = "local",
    tasks: int = 1, workers: int = 1, slurm: SlurmOptions | None = None, show: bool = True, **options,
) -> dict | None:
    """Run (or, for Slurm, submit) the whole apply pipeline; returns stats.json's content when it ran here."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from edu_filter.filters.io import expand_inputs
    from edu_filter.filters.report import stats_table

    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    if tasks < 1 or workers < 1:
        raise ValueError("tasks and workers must be >= 1")
    cfg = resolve_config(inputs, output, model=model, preset=preset, threshold=threshold, keep_top=keep_top,
                         dedup=dedup, exact_dedup=exact_dedup, decontaminate=decontaminate, tasks=tasks, **options)
    files = expand_inputs(cfg.inputs)  # bad inputs fail here, before anything is written
    check_resume(cfg)
    stages = build_stages(cfg, workers, files)
    logs = f"{cfg.output.rstrip('/')}/logs"
    console = Console(stderr=True, quiet=not show)

    if executor == "slurm":
        slurm = slurm or SlurmOptions()
        executors = _slurm_executors(stages, logs, workers, slurm)
        if slurm.dry_run:
            submit = write_slurm_scripts(executors, cfg.output)
            console.print(f"Slurm scripts written; submit with [bold]{submit}[/]")
        else:
            executors[-1][1].run()  # launches the whole dependency chain through sbatch
            console.print(f"Submitted {len(executors)} Slurm stages; stats will be in {cfg.output}/stats.json")
        return None

    executors = _ray_executors(stages, logs, workers) if executor == "ray" else _local_executors(stages, logs, workers)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console) as progress:
        bar = progress.add_task("apply", total=len(executors))
        for name, ex in executors:
            progress.update(bar, description=f"apply: {name} ({ex.world_size} tasks)")
            ex.run()
            incomplete = ex.get_incomplete_ranks(skip_completed=True)
            if incomplete:
                raise RuntimeError(f"stage {name}: tasks {incomplete} did not complete; see {logs}/{name}/logs")
            progress.advance(bar)
    stats = json.loads((Path(cfg.output) / "stats.json").read_text())
    console.print(stats_table(stats))
    return stats
