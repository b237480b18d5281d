"""The `edu-filter` command line. Each command only parses options and calls one library function.

One error contract for every command (`command` below registers a command with it): a problem prints one red line
`error: ...` on stderr, never a traceback, and the exit status says what kind it was:

* 2, bad usage or bad input, knowable before any work: `documents.InputError` (DocumentError, PromptError,
  BackendSetupError, ...) and the library's other ValueErrors (its option checks, ProvenanceError), ImportError (a
  missing optional dependency);
* 1, a failure while running: `documents.RunError` (BackendError, ...), a failing pipeline stage (StageFailed), an
  OSError (a full disk).

Anything else is a bug and keeps its traceback. Options are checked, and output paths tested for writing, before
any work, so a bad invocation leaves no half-made output behind. The defaults of score, train and apply come from the
library's config dataclasses (`ScoreConfig`, `ApplyConfig`, `SlurmOptions`, `RayOptions`, `ClassifierTrainConfig`),
so they are written once; ablate, evaluate, agreement and sweep repeat their library functions' (reading them would
import torch here), and a test holds the two the same.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Optional

# transformers 5 draws a "Loading weights" bar for every model it loads (also in apply's worker processes, which
# inherit the environment); the commands draw their own progress. HF_HUB_DISABLE_PROGRESS_BARS=0 brings them back.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import typer  # noqa: E402
from typer.core import TyperCommand, TyperGroup  # noqa: E402

from edu_filter.annotate.score import ScoreConfig  # noqa: E402
from edu_filter.documents import (  # noqa: E402
    MAX_SCORE,
    MIN_SCORE,
    SCORE_RANGE,
    SCORES,
    InputError,
    RunError,
    one_line,
    saved_work_under,
)
from edu_filter.filters.apply import ApplyConfig, RayOptions, SlurmOptions  # noqa: E402
from edu_filter.train.classifier import ClassifierTrainConfig, train_classifier  # noqa: E402



def plain_types(params: list) -> list:
    """Help without Python type names where they say nothing: none for on/off flags (--help included), <path>... for
    the repeatable path arguments (instead of <list[str]>); list options name their items with a metavar."""
    for param in params:
        if getattr(param, "is_flag", False):
            param.display_type_rich = lambda ctx: None
        elif getattr(param, "param_type_name", "") == "argument" and param.nargs != 1:
            param.display_type_rich = lambda ctx: "<path>..."
    return params


RICH_HELP_MIN_WIDTH = 90  # narrower, rich's option table cut the longest names (`--slurm-gpu-parti…`)


class Command(TyperCommand):
    def get_params(self, ctx):
        return plain_types(super().get_params(ctx))

    def format_help(self, ctx, formatter):
        """rich's help on a terminal wide enough; click's plain help (which wraps, cutting nothing) on a narrow one
        or a pipe (`--help | less`, a job's log: 80 columns)."""
        from rich.console import Console

        if Console().width < RICH_HELP_MIN_WIDTH:
            return super(TyperCommand, self).format_help(ctx, formatter)  # click's own
        return super().format_help(ctx, formatter)


class Group(TyperGroup):
    def get_params(self, ctx):
        return plain_types(super().get_params(ctx))


app = typer.Typer(cls=Group, add_completion=False, no_args_is_help=True,
                  help="Educational-value filters for LLM pretraining data.")

EXIT_BAD_INPUT, EXIT_FAILED = 2, 1


def exit_status(error: BaseException) -> int | None:
    """2 for bad usage or input, 1 for a failure while running, None for anything else (a bug: re-raised), and for
    a write to a standard output whose reader has gone (`| head`): click ends that quietly, as it does one at exit."""
    if isinstance(error, (ValueError, ImportError)):  # InputError and the library's option checks
        return EXIT_BAD_INPUT
    if isinstance(error, BrokenPipeError) and stdout_reader_gone():
        return None
    failures: tuple[type[BaseException], ...] = (RunError, OSError)
    executors = sys.modules.get("edu_filter.filters.executors")  # a StageFailed can only come from a loaded module
    if executors is not None:
        failures += (executors.StageFailed,)
    safetensors = sys.modules.get("safetensors")  # its error for a failed write (a full disk), not an OSError
    if safetensors is not None:
        failures += (safetensors.SafetensorError,)
    return EXIT_FAILED if isinstance(error, failures) else None


def stdout_reader_gone() -> bool:
    """Whether standard output is a pipe whose reading end was closed (its poll reports an error)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), 0)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def error_line(error: BaseException) -> str:
    """The error's message on one line, whole (documents.one_line cuts it), or its type where it says nothing."""
    return one_line(str(error), limit=sys.maxsize) or type(error).__name__


OUTPUT_OPTIONS = ("output", "report")  # the parameters naming what a command writes


def first_missing(path) -> Path | None:
    """The outermost part of `path` that does not exist yet (what writing to it would create), or None."""
    if path is None or "://" in str(path):
        return None
    missing = None
    for candidate in (Path(path).absolute(), *Path(path).absolute().parents):
        if candidate.exists():
            return missing
        missing = candidate
    return missing


def run_lock(name: str) -> bool:
    """A lock file a run held while writing its output (`documents.writing_alone`, `.OUTPUT.lock`): not its work."""
    return name.startswith(".") and name.endswith(".lock")


def remove_created(paths: list[Path]) -> None:
    """Remove what a command refused for bad input created anyway: only paths that did not exist when it began."""
    import shutil

    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists() or path.is_symlink():
            path.unlink(missing_ok=True)


def command(*args, **kwargs):
    """`app.command`, with the error contract: known errors become one `error: ...` line and exit status 2 or 1; a
    command refused with an InputError leaves no output it had begun to create (only paths that did not exist when
    it started are removed, nor where the command saved work a rerun resumes: `holds_saved_work`); other bad input
    (exit 2, a library's ValueError, which may come after real work) leaves only the new folders it wrote nothing
    into."""

    def register(fn):
        @functools.wraps(fn)
        def run(*a, **kw):
            new = [m for m in (first_missing(kw.get(name)) for name in OUTPUT_OPTIONS) if m is not None]
            try:
                return fn(*a, **kw)
            except Exception as e:  # noqa: BLE001 - sorted by exit_status; anything else is re-raised
                status = exit_status(e)
                if status is None:
                    raise
                if isinstance(e, InputError):  # found before any work, or after work saved for a rerun
                    remove_created([path for path in new if not saved_work_under(path)])
                elif status == EXIT_BAD_INPUT:  # a bad value found by a library, maybe after work: folders only
                    remove_created([path for path in new if path.is_dir() and not any(  # nothing written yet
                        name for _, _, files in os.walk(path) for name in files if not run_lock(name))])
                typer.secho(f"error: {error_line(e)}", fg=typer.colors.RED, err=True)
                raise typer.Exit(status) from None

        return app.command(*args, cls=Command, **kwargs)(run)

    return register


def parse_ints(text: str, option: str, low: int | None = None, high: int | None = None) -> list[int]:
    """`0,1,2` -> [0, 1, 2]; anything else is an InputError naming the option."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InputError(f"{option} expects comma-separated whole numbers such as 0,1,2, got {text!r}") from None
    if not values:
        raise InputError(f"{option} expects comma-separated whole numbers such as 0,1,2, got {text!r}")
    bad = [v for v in values if (low is not None and v < low) or (high is not None and v > high)]
    if bad:
        bound = f"outside {low}-{high}" if low is not None and high is not None else (
            f"below {low}" if low is not None else f"above {high}")
        raise InputError(f"{option}: {bad[0]} is {bound}")
    return values


TRAIN, SCORE, APPLY, SLURM, RAY = ClassifierTrainConfig, ScoreConfig, ApplyConfig, SlurmOptions, RayOptions  # defaults


# --- train / evaluate (classifiers) ----------------------------------------------------------------------------------
@command()
def train(
    data: list[str] = typer.Argument(..., metavar="DATA", show_default=False,
                                     help="Labelled JSONL/Parquet files or folders."),
    output: Path = typer.Option(..., "-o", "--output", help="Model folder to write (absent or empty, or --overwrite)."),
    kind: str = typer.Option(TRAIN.kind, help="web or code: picks the default encoder."),
    method: str = typer.Option(TRAIN.method, help="head (frozen encoder + regression head), finetune or fasttext."),
    encoder: Optional[str] = typer.Option(TRAIN.encoder, help="Encoder path or hub name (overrides the --kind default)."),
    val: Optional[list[str]] = typer.Option(None, metavar="<path>",
                                            help="Validation data (repeatable); split off from DATA when absent."),
    label_field: str = typer.Option(TRAIN.label_field, help=f"Field holding the {SCORE_RANGE} label."),
    max_length: int = typer.Option(TRAIN.max_length, help="Tokens per sequence (saved with the model)."),
    long_docs: str = typer.Option(TRAIN.long_docs, help="truncate, or chunk-mean for a head (saved as the model's default; chunk-max: choose it when scoring)."),
    pool_layers: Optional[str] = typer.Option(
        None, metavar="<n,n,...>",
        help="Comma-separated hidden layers to pool and concatenate (default: six evenly spaced, up to the top).",
    ),
    epochs: int = typer.Option(TRAIN.epochs, help="finetune: passes over the training data."),
    learning_rate: float = typer.Option(TRAIN.learning_rate, help="finetune: encoder learning rate."),
    dtype: Optional[str] = typer.Option(
        TRAIN.dtype, help="head, finetune: what the encoder computes in, float32 or bfloat16 (autocast: the saved "
        "weights stay float32). Default: bfloat16 on a GPU, as apply scores there; float32 on a CPU.",
        show_default=False,
    ),
    cache_dir: Optional[str] = typer.Option(TRAIN.cache_dir, help="Embedding cache (default ~/.cache/edu-filter)."),
    limit: Optional[int] = typer.Option(None, help="Read at most this many documents (quick runs)."),
    seed: int = typer.Option(TRAIN.seed),
    weight_field: str = typer.Option(
        TRAIN.weight_field or "none",
        help="Field holding inclusion weights (written by score --select active), used in the fit, the cut points "
        "and the metrics when the rows have it; 'none' ignores it.",
    ),
    learning_curve: bool = typer.Option(TRAIN.learning_curve,
                                        help="Report validation metrics at 10/25/50/100% of the labels."),
    push_to_hub: Optional[str] = typer.Option(
        None, help="Upload the model folder to this hub repository (ORG/NAME; token from `hf auth login` or HF_TOKEN)."
    ),
    overwrite: bool = typer.Option(False, help="Replace the model an -o folder already holds."),
    skip_failed: bool = typer.Option(False, help="Leave out rows whose LLM annotation failed (score's `error`), counted, instead of stopping."),
):
    """Train a classifier on LLM-annotated scores; writes the model, metrics.json, a confusion-matrix PNG, a learning
    curve PNG, a README.md model card and provenance.json."""
    layers = parse_ints(pool_layers, "--pool-layers", low=0) if pool_layers else None
    train_classifier(
        data, output, kind=kind, method=method, encoder=encoder, val=val, label_field=label_field,
        max_length=max_length, seed=seed, limit=limit, long_docs=long_docs, epochs=epochs,
        learning_rate=learning_rate, dtype=dtype, cache_dir=cache_dir, pool_layers=layers, push_to_hub=push_to_hub,
        weight_field=None if weight_field.lower() == "none" else weight_field, learning_curve=learning_curve,
        overwrite=overwrite, skip_failed=skip_failed,
    )


@command()
def evaluate(
    model: str = typer.Argument(..., metavar="MODEL", help="Model folder (or hub id)."),
    data: list[str] = typer.Argument(..., metavar="DATA", show_default=False,
                                     help="Labelled JSONL/Parquet files or folders."),
    report: Optional[Path] = typer.Option(None, help="Write the metrics JSON here (and a confusion-matrix PNG beside it)."),
    label_field: str = typer.Option("score", help=f"Field holding the {SCORE_RANGE} label."),
    long_docs: Optional[str] = typer.Option(None, help="truncate, chunk-mean or chunk-max (default: the model's)."),
    batch_size: Optional[int] = typer.Option(None, help="Documents per scoring batch (default 32 on CPU; on GPU "
                                             "524,288 tokens' worth: 1024 at 512 tokens).", show_default=False),
    dtype: Optional[str] = typer.Option(None, help="float32, bfloat16, float16 or int8 (CPU fast path); default fp32 on CPU, bf16 on GPU."),
    weight_field: str = typer.Option("weight", help="Inclusion weights of an actively chosen sample, used when rows carry them; none ignores them."),
    skip_failed: bool = typer.Option(False, help="Leave out rows whose LLM annotation failed (score's `error`), counted, instead of stopping."),
):
    """Evaluate a classifier against labels: table in the terminal, JSON report."""
    from edu_filter.classifiers.evaluate import evaluate_model

    evaluate_model(model, data, report=report, label_field=label_field, long_docs=long_docs, batch_size=batch_size,
                   dtype=dtype, weight_field=None if weight_field.lower() == "none" else weight_field,
                   skip_failed=skip_failed)


# --- score / agreement (LLM annotation) ------------------------------------------------------------------------------
@command()
def score(
    ctx: typer.Context,
    data: Optional[list[str]] = typer.Argument(None, metavar="DATA", show_default=False,
                                               help="JSONL/Parquet files or folders of documents."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Annotated output (.jsonl, .jsonl.gz, .parquet)."),
    prompt: str = typer.Option(SCORE.prompt, help="web (FineWeb-Edu), code (Python-Edu), a version id, or a file with {extract}."),
    show_prompt: Optional[str] = typer.Option(None, metavar="<name>",
                                              help="Print the named prompt (web, code, file) and exit."),
    backend: str = typer.Option(SCORE.backend, help="openai (any OpenAI-compatible URL), vllm, sglang, script, transformers."),
    base_url: Optional[list[str]] = typer.Option(
        None, metavar="<url>", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1. Repeat it for several servers of one "
        "model: each request goes to the least busy, and a server lost mid-run is left out."
    ),
    model: Optional[str] = typer.Option(
        SCORE.model, help="Served name, hub id, folder or .gguf file (openai: optional when the server serves one model)."
    ),
    api: str = typer.Option(SCORE.api, help="chat (/v1/chat/completions) or completion (/v1/completions)."),
    api_key_env: str = typer.Option(SCORE.api_key_env, help="Environment variable holding the API key."),
    concurrency: int = typer.Option(SCORE.concurrency, help="Requests in flight per server (batch size for transformers)."),
    timeout: float = typer.Option(
        SCORE.timeout, help="Seconds without any answer from the server before a request is retried (queued requests "
        "back off concurrency instead)."
    ),
    max_retries: int = typer.Option(SCORE.max_retries, help="Retries on 5xx, timeouts and connection errors (429s are waited out apart, up to 20 more)."),
    retry_backoff: float = typer.Option(SCORE.retry_backoff, help="First retry delay in seconds (doubles each retry, jittered)."),
    max_reasks: int = typer.Option(SCORE.max_reasks, help="Extra questions when an answer is unparseable, ambiguous or cut off."),
    temperature: float = typer.Option(SCORE.temperature),
    top_p: float = typer.Option(SCORE.top_p),
    max_tokens: int = typer.Option(SCORE.max_tokens, help="Maximum new tokens per answer."),
    max_chars: Optional[int] = typer.Option(
        SCORE.max_chars, help="Cut documents to this many characters, and further to fit the server's context (counted)."
    ),
    sample: Optional[int] = typer.Option(
        SCORE.sample, help="Annotate N documents: a reproducible random sample (only N are held; of Parquet input only "
        "the row groups holding them are read), or with --select active the budget of documents the LLM may see."
    ),
    seed: int = typer.Option(SCORE.seed, help="Seed for --sample (and transformers sampling)."),
    select: str = typer.Option(
        SCORE.select, help="random (a uniform sample), or active: rounds chosen by a classifier trained on the labels "
        "so far, each row weighted so that train undoes the choice."
    ),
    rounds: int = typer.Option(SCORE.rounds, help="--select active: rounds the budget is spent in (the first one uniform)."),
    seed_size: Optional[int] = typer.Option(SCORE.seed_size, help="--select active: documents in the first, uniform "
                                            "round (default: an equal share of the budget)."),
    kind: Optional[str] = typer.Option(SCORE.kind, help="--select active: web or code, the encoder as in train "
                                       "(default: from --prompt)."),
    encoder: Optional[str] = typer.Option(SCORE.encoder, help="--select active: encoder path or hub name (as in train)."),
    max_length: int = typer.Option(SCORE.max_length, help="--select active: tokens per document the encoder reads "
                                   "(as in train)."),
    embedding_cache: Optional[str] = typer.Option(SCORE.embedding_cache, help="--select active: embedding cache, "
                                                  "shared with train (default ~/.cache/edu-filter)."),
    cache: Optional[Path] = typer.Option(None, help="Resume cache (default: OUTPUT.cache.sqlite)."),
    text_field: str = typer.Option(SCORE.text_field),
    id_field: str = typer.Option(SCORE.id_field),
    max_model_len: int = typer.Option(SCORE.max_model_len, help="vllm/sglang: context length of the started server."),
    tensor_parallel: int = typer.Option(SCORE.tensor_parallel, help="vllm/sglang: GPUs per model."),
    server_script: Optional[str] = typer.Option(SCORE.server_script, help="script backend: Python file serving /v1 on the port passed to it as --port N."),
    server_arg: Optional[list[str]] = typer.Option(
        None, metavar="<key[=value]>",
        help="vllm/sglang/script: extra server flag KEY=VALUE or KEY (repeatable), e.g. gpu-memory-utilization=0.9.",
    ),
    device: Optional[str] = typer.Option(SCORE.device, help="transformers: cpu, cuda... (default: cuda when available)."),
):
    """Annotate documents 0-5 with an LLM and the FineWeb-Edu / Python-Edu rubric (resumable)."""
    from edu_filter.annotate.score import score_command

    given = [name for name in ctx.params if name != "show_prompt"
             and getattr(ctx.get_parameter_source(name), "name", None) == "COMMANDLINE"]
    config = ScoreConfig(
        prompt=prompt, backend=backend, model=model, base_url=base_url, api=api, api_key_env=api_key_env,
        concurrency=concurrency, timeout=timeout, max_retries=max_retries, retry_backoff=retry_backoff,
        max_reasks=max_reasks, temperature=temperature, top_p=top_p, max_tokens=max_tokens, max_chars=max_chars,
        sample=sample, seed=seed, select=select, rounds=rounds, seed_size=seed_size, kind=kind, encoder=encoder,
        max_length=max_length, embedding_cache=embedding_cache, cache=cache, text_field=text_field, id_field=id_field,
        max_model_len=max_model_len, tensor_parallel=tensor_parallel, server_script=server_script,
        server_args=server_arg, device=device,
    )
    score_command(data, output, config, show_prompt=show_prompt, given=given)


@command()
def agreement(
    a: str = typer.Argument(..., metavar="A", help="First annotation (JSONL/Parquet with id and a score field); the reference."),
    b: str = typer.Argument(..., metavar="B", help="Second annotation, joined to A on id."),
    field: str = typer.Option("score", help="Score field in A (and in B unless --field-b)."),
    field_b: Optional[str] = typer.Option(None, help="Score field in B when it differs."),
    id_field: str = typer.Option("id"),
    threshold: float = typer.Option(3.0, help="Keep/drop threshold for the binary agreement (FineWeb-Edu: 3)."),
    report: Optional[Path] = typer.Option(None, help="Write the metrics as JSON here."),
):
    """Agreement between two annotations: Cohen's kappa, quadratic kappa, Spearman, MAE, confusion matrix."""
    from edu_filter.annotate.agreement import agreement as compare

    compare(a, b, field=field, field_b=field_b, id_field=id_field, threshold=threshold, report=report)


@command()
def ablate(
    data: list[str] = typer.Option(..., metavar="<name=path>",
                                   help="A training set; give one per run (e.g. edu=..., all=...)."),
    output: Path = typer.Option(..., "-o", "--output", help="Ablation folder: tokenizer, runs, report, plots."),
    eval: Optional[list[str]] = typer.Option(None, "--eval", metavar="<name=path>",
                                             help="A reference set every run is scored on (repeatable)."),
    preset: str = typer.Option("tiny", help="tiny, smollm-135m, smollm-360m or ablation-1.8b."),
    tokens: int = typer.Option(300_000, help="Training tokens per run (the same for every run)."),
    override: Optional[list[str]] = typer.Option(None, metavar="<key=value>",
                                                 help="A model or training field (repeatable), e.g. lr=1e-3."),
    tokenizer: Optional[str] = typer.Option(None, help="Tokenizer folder or hub name (default: train a BPE)."),
    vocab_size: Optional[int] = typer.Option(None, help="Vocabulary of the trained BPE (default: from the preset)."),
    text_field: list[str] = typer.Option(["text"], metavar="<field or name=field>",
                                         help="The text field of every set, or NAME=FIELD for one (repeatable)."),
    val_fraction: float = typer.Option(0.05, help="Share of each dataset's documents held out for its validation "
                                       "loss, 1/N: one document in N, picked by a hash of the text (the same "
                                       "documents in every dataset)."),
    humaneval: bool = typer.Option(False, help="Score HumanEval pass@1 after each run (for code data)."),
    humaneval_limit: Optional[int] = typer.Option(None, help="Only the first N HumanEval problems."),
    cloze: Optional[list[str]] = typer.Option(None, metavar="<name=path>",
                                              help="A multiple-choice JSONL benchmark (repeatable)."),
    seed: int = typer.Option(0, help="Seed of the first training of each dataset (initial weights and data order)."),
    seeds: int = typer.Option(
        1, help="Train every dataset this many times (seeds SEED, SEED+1, ...) to measure seed noise."
    ),
    compare_on: Optional[str] = typer.Option(
        None, help="Evaluation set of the verdict (default: the first --eval, else the last --data's held-out slice)."
    ),
):
    """Train the same small model on each dataset at equal tokens and compare their losses (verdict in report.md)."""
    from edu_filter.ablate.ablation import ablate as run_ablation
    from edu_filter.ablate.pretrain import end_torchrun_rank

    run_ablation(
        data, output, eval_sets=eval, preset=preset, tokens=tokens, overrides=override, tokenizer=tokenizer,
        vocab_size=vocab_size, text_field=text_field, val_fraction=val_fraction, humaneval=humaneval,
        humaneval_limit=humaneval_limit,
        cloze=cloze, seed=seed, seeds=seeds, compare_on=compare_on,
    )
    end_torchrun_rank()


# --- apply / sweep (filters) -------------------------------------------------------------------------------------------
@command()
def apply(
    inputs: list[str] = typer.Argument(..., metavar="INPUTS", show_default=False,
                                       help="JSONL/Parquet files or folders, local or s3://, hf://datasets/..."),
    output: str = typer.Option(..., "-o", "--output", help="Output folder: kept/, removed/<reason>/, failed/, stats.json."),
    model: Optional[str] = typer.Option(None, help="Classifier folder from `train`, or a hub id (preset default)."),
    preset: Optional[str] = typer.Option(None, help="fineweb-edu (>=3), fineweb-edu-score-2 (>=2) or python-edu (>=4)."),
    threshold: Optional[int] = typer.Option(APPLY.threshold, help="Keep int_score >= THRESHOLD (default: the preset's, else 4 for a code classifier, 3 otherwise)."),
    keep_top: Optional[float] = typer.Option(APPLY.keep_top, help="Keep this fraction of documents instead (e.g. 0.1)."),
    dedup: Optional[bool] = typer.Option(None, "--dedup/--no-dedup", help="MinHash near-dedup (on by default).",
                                         show_default=False),
    exact_dedup: Optional[bool] = typer.Option(None, "--exact-dedup/--no-exact-dedup", show_default=False,
                                               help="Exact dedup (on with the python-edu preset)."),
    decontaminate: Optional[list[str]] = typer.Option(
        None, metavar="<path>", help="Eval set JSONL to decontaminate against, or 'humaneval' (repeatable; adds to the "
                                "preset's sets, 'none' drops them)."),
    long_docs: Optional[str] = typer.Option(APPLY.long_docs, help="truncate, chunk-mean or chunk-max (default: the model's)."),
    max_length: Optional[int] = typer.Option(APPLY.max_length, help="Tokens per document/chunk (the model's when unset)."),
    batch_size: Optional[int] = typer.Option(APPLY.batch_size, help="Documents per scoring batch (default 32 on CPU; "
                                             "on GPU 524,288 tokens' worth: 1024 at 512 tokens).", show_default=False),
    dtype: Optional[str] = typer.Option(APPLY.dtype, help="float32, bfloat16, float16 or int8 (CPU fast path); default fp32 on CPU, bf16 on GPU."),
    tokenizer: Optional[str] = typer.Option(APPLY.tokenizer, help="Tokenizer for token_count (the classifier's when unset)."),
    text_field: str = typer.Option(APPLY.text_field),
    id_field: str = typer.Option(APPLY.id_field),
    executor: str = typer.Option("local", help="local, slurm or ray."),
    tasks: int = typer.Option(APPLY.tasks, help="Number of shards."),
    bucket_workers: Optional[int] = typer.Option(None, help="Tasks sharing each of MinHash's 14 bucket merges (default: "
                                                 "one per 100 --tasks, 1 to 32; at most 99; a resumed run keeps its own).",
                                                 show_default=False),
    workers: Optional[int] = typer.Option(None, help="Tasks run at once (local: 1 unless given; Slurm, Ray: no limit unless given)."),
    order: str = typer.Option("auto", help="auto, dedup-first or score-first (auto: score first with fastText or a GPU, "
                       "except with --keep-top; a resumed run keeps its order)."),
    overwrite: bool = typer.Option(False, help="Start over, deleting the run OUT holds and its finished tasks (needed where it was made with other settings, model or inputs; without it, the same run resumes)."),
    keep_work: bool = typer.Option(APPLY.keep_work, help="Keep the scratch folder OUT/work (signatures, intermediates): deleted after success, the dedup signatures once read."),
    wait: bool = typer.Option(False, help="Slurm: follow the submitted chain until it ends (exit 1 if a stage fails)."),
    verbose: bool = typer.Option(False, help="Show datatrove's logs in the terminal (always in OUT/logs)."),
    push_to_hub: Optional[str] = typer.Option(None, help="Upload kept/, stats.json, the card and provenance to this hub dataset repo (ORG/NAME)."),
    slurm_partition: Optional[str] = typer.Option(SLURM.partition, help="Partition (default: the cluster's default)."),
    slurm_gpu_partition: Optional[str] = typer.Option(SLURM.gpu_partition, help="Partition for the scoring stage."),
    slurm_gpus: int = typer.Option(SLURM.gpus_per_task, help="GPUs per scoring task: 0 or 1 (a task scores on one GPU; use a task per GPU)."),
    slurm_time: str = typer.Option(SLURM.time),
    slurm_cpus: int = typer.Option(SLURM.cpus_per_task, help="CPUs per task."),
    slurm_gpu_cpus: Optional[int] = typer.Option(SLURM.gpu_cpus_per_task, help="CPUs per scoring task (default: "
                                                 "--slurm-cpus); they tokenize for its GPU: 16 keep one H200 busy."),
    slurm_mem_gb: Optional[int] = typer.Option(SLURM.mem_gb, help="Memory per task in GB (default: 4 per CPU the task asks: --slurm-cpus, or --slurm-gpu-cpus for scoring)."),
    slurm_cluster_mem_gb: Optional[int] = typer.Option(SLURM.cluster_mem_gb, help="Memory in GB of the minhash-cluster "
                                                       "stage's one task, which holds every near-duplicate pair "
                                                       "(default: --slurm-mem-gb)."),
    slurm_cluster_time: Optional[str] = typer.Option(SLURM.cluster_time, help="Time limit of the minhash-cluster "
                                                     "stage's one task (default: --slurm-time)."),
    slurm_gpu_time: Optional[str] = typer.Option(SLURM.gpu_time, help="Time limit of a scoring task (default: "
                                                 "--slurm-time, which then sizes the CPU stages' short tasks)."),
    slurm_venv: Optional[str] = typer.Option(SLURM.venv_path, help="activate script sourced by every job (default: this Python environment)."),
    slurm_max_array: Optional[int] = typer.Option(None, help="Tasks per array job (default: the cluster's MaxArraySize; 1001 where none says)."),
    slurm_tasks_per_job: int = typer.Option(SLURM.tasks_per_job, help="Tasks each array task runs one after another "
                                            "(each array task counts as a job against the cluster's MaxSubmitJobs; "
                                            "--slurm-time is then for all of them)."),
    slurm_account: Optional[str] = typer.Option(SLURM.account, help="Account the jobs are charged to (sbatch --account)."),
    slurm_qos: Optional[str] = typer.Option(SLURM.qos, help="Quality of service of the jobs (sbatch --qos)."),
    slurm_arg: list[str] = typer.Option([], metavar="KEY=VALUE", help="Another sbatch option for every job, repeatable: "
                                        "constraint=h100, reservation=NAME, a flag such as exclusive."),
    slurm_gpu_arg: list[str] = typer.Option([], metavar="KEY=VALUE", help="An sbatch option for the scoring stage's "
                                            "jobs alone, over --slurm-arg, --slurm-qos and --slurm-account, "
                                            "repeatable: qos=gpu, account=NAME, constraint=h100."),
    dry_run: bool = typer.Option(SLURM.dry_run, help="Slurm: write sbatch scripts and submit.sh, submit nothing."),
    ray_cpus: int = typer.Option(RAY.cpus_per_task, help="CPUs per Ray task (the cluster is RAY_ADDRESS's, or local)."),
    ray_gpu_cpus: Optional[int] = typer.Option(RAY.gpu_cpus_per_task, help="CPUs per Ray scoring task (default: "
                                               "--ray-cpus): its torch threads, or the tokenizing for its GPU."),
    ray_mem_gb: Optional[int] = typer.Option(RAY.mem_gb, help="Memory per Ray task in GB (default: 2 per CPU it "
                                             "asks); Ray packs a node's tasks by it."),
    ray_cluster_mem_gb: Optional[int] = typer.Option(RAY.cluster_mem_gb, help="Memory in GB of the minhash-cluster "
                                                     "stage's one task, which holds every near-duplicate pair "
                                                     "(default: as --ray-mem-gb)."),
    ray_gpus: Optional[int] = typer.Option(RAY.gpus, help="GPUs per Ray scoring task, 0 or 1 (default: 1 where a live "
                                           "node has GPUs; 1 asks also where none has yet, for an autoscaler)."),
):
    """Score, deduplicate and threshold documents with a classifier (datatrove pipeline)."""
    from edu_filter.filters.apply import run_apply

    run_apply(
        inputs, output, model=model, preset=preset, threshold=threshold, keep_top=keep_top, dedup=dedup,
        exact_dedup=exact_dedup, decontaminate=decontaminate, executor=executor, tasks=tasks, workers=workers,
        bucket_workers=bucket_workers,
        slurm=SlurmOptions(partition=slurm_partition, gpu_partition=slurm_gpu_partition, gpus_per_task=slurm_gpus,
                           time=slurm_time, cpus_per_task=slurm_cpus, gpu_cpus_per_task=slurm_gpu_cpus,
                           mem_gb=slurm_mem_gb, cluster_mem_gb=slurm_cluster_mem_gb,
                           cluster_time=slurm_cluster_time, gpu_time=slurm_gpu_time, venv_path=slurm_venv, account=slurm_account, qos=slurm_qos,
                           sbatch_args=slurm_arg, gpu_sbatch_args=slurm_gpu_arg, max_array_size=slurm_max_array,
                           tasks_per_job=slurm_tasks_per_job, dry_run=dry_run),
        ray=RayOptions(cpus_per_task=ray_cpus, gpu_cpus_per_task=ray_gpu_cpus, mem_gb=ray_mem_gb,
                       cluster_mem_gb=ray_cluster_mem_gb, gpus=ray_gpus),
        order=order,
        overwrite=overwrite, wait=wait, verbose=verbose, keep_work=keep_work, push_to_hub=push_to_hub,
        long_docs=long_docs, max_length=max_length, batch_size=batch_size, dtype=dtype, tokenizer=tokenizer,
        text_field=text_field, id_field=id_field,
    )


@command()
def status(
    output: str = typer.Argument(..., metavar="OUT", help="An apply output folder (any executor, running or finished)."),
):
    """Per stage: tasks done, documents read, docs/s and Slurm job states; then the stats table when finished."""
    from rich.console import Console

    from edu_filter.filters.executors import show_status

    show_status(output, Console())


@command()
def sweep(
    scored: list[str] = typer.Argument(..., metavar="SCORED", show_default=False,
                                       help="An apply output folder, or scored JSONL/Parquet files/folders."),
    output: Path = typer.Option(Path("sweep"), "-o", "--output", help="Folder for the table and PNG plots."),
    thresholds: str = typer.Option(",".join(map(str, SCORES)), metavar="<t,t,...>",
                                   help=f"Comma-separated int_score thresholds to compare ({SCORE_RANGE})."),
    label_field: Optional[str] = typer.Option(None, help="Reference label field (input_score or label by default; "
                                              "none: no labels, e.g. where `label` is a topic)."),
    positive_threshold: Optional[int] = typer.Option(None, help="A label >= this, rounded half up (2.5 counts at 3), counts as educational for precision/recall. Default: 4 for apply outputs made for code (--preset python-edu or a code model), else 3."),
    weight_field: str = typer.Option("weight", help="Inclusion weights of an actively chosen sample, used when rows "
                                     "carry them (shares and P/R/F1 then estimate the pool); none ignores them."),
):
    """Retention (docs, tokens) per threshold, score histogram, retention curve; P/R/F1 when labels exist."""
    from edu_filter.filters.sweep import run_sweep

    cuts = parse_ints(thresholds, "--thresholds", low=MIN_SCORE, high=MAX_SCORE)
    run_sweep(scored, output, thresholds=cuts, label_field=label_field, positive_threshold=positive_threshold,
              weight_field=None if weight_field.lower() == "none" else weight_field)


@command()
def lineage(
    path: Path = typer.Argument(..., metavar="PATH", help="An artifact: annotation file, classifier folder, apply output or ablation."),
    as_json: bool = typer.Option(False, "--json", help="Print the tree as JSON (one node per artifact or input)."),
):
    """How PATH was made, back to the raw inputs: a tree of artifacts, marking inputs changed since they were used."""
    from edu_filter.provenance import show_lineage

    show_lineage(path, as_json=as_json)


@command()
def demo(
    output: Path = typer.Option(Path("demo_out"), "-o", "--output", help="Folder for models, outputs and report.md."),
):
    """Run the whole loop on the bundled data (5-26 minutes on 2 CPU cores, by their speed) and write OUTPUT/report.md."""
    from edu_filter.demo import run_demo

    run_demo(output)


if __name__ == "__main__":
    app()
