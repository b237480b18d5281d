"""The `edu-filter` command line. Each command only parses options and calls one library function."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Educational-value filters for LLM pretraining data.")


# --- train / evaluate (classifiers) ----------------------------------------------------------------------------------
@app.command()
def train(
    data: list[str] = typer.Argument(..., help="Labelled JSONL/Parquet files or folders."),
    output: Path = typer.Option(..., "-o", "--output", help="Model folder to write."),
    kind: str = typer.Option("web", help="web or code: picks the default encoder."),
    method: str = typer.Option("head", help="head (frozen encoder + regression head), finetune or fasttext."),
    encoder: Optional[str] = typer.Option(None, help="Encoder path or hub name (overrides the --kind default)."),
    val: Optional[list[str]] = typer.Option(None, help="Validation data; split off from DATA when absent."),
    label_field: str = typer.Option("score", help="Field holding the 0-5 label."),
    max_length: int = typer.Option(512, help="Tokens per sequence (saved with the model)."),
    long_docs: str = typer.Option("truncate", help="truncate or chunk-mean (saved as the model's default)."),
    pool_layers: Optional[str] = typer.Option(
        None, help="Comma-separated hidden layers to pool and concatenate (default: six evenly spaced, up to the top)."
    ),
    epochs: int = typer.Option(2, help="finetune: passes over the training data."),
    learning_rate: float = typer.Option(3e-5, help="finetune: encoder learning rate."),
    cache_dir: Optional[str] = typer.Option(None, help="Embedding cache (default ~/.cache/edu-filter)."),
    limit: Optional[int] = typer.Option(None, help="Read at most this many documents (quick runs)."),
    seed: int = typer.Option(0),
    weight_field: str = typer.Option(
        "weight", help="Field holding inclusion weights (written by score --select active), used in the fit, the cut "
        "points and the metrics when the rows have it; 'none' ignores it."
    ),
    learning_curve: bool = typer.Option(True, help="Report validation metrics at 10/25/50/100% of the labels."),
    push_to_hub: Optional[str] = typer.Option(
        None, help="Upload the model folder to this hub repository (ORG/NAME; token from `hf auth login` or HF_TOKEN)."
    ),
):
    """Train a classifier on LLM-annotated scores; writes the model, metrics.json, a confusion-matrix PNG, a learning
    curve PNG, a README.md model card and provenance.json."""
    from edu_filter.documents import DocumentError
    from edu_filter.train.classifier import train_classifier

    try:
        train_classifier(
            data, output, kind=kind, method=method, encoder=encoder, val=val, label_field=label_field,
            max_length=max_length, seed=seed, limit=limit, long_docs=long_docs, epochs=epochs,
            learning_rate=learning_rate, cache_dir=cache_dir,
            pool_layers=[int(x) for x in pool_layers.split(",")] if pool_layers else None, push_to_hub=push_to_hub,
            weight_field=None if weight_field.lower() == "none" else weight_field, learning_curve=learning_curve,
        )
    except (DocumentError, ValueError) as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None


@app.command()
def evaluate(
    model: str = typer.Argument(..., help="Model folder (or hub id)."),
    data: list[str] = typer.Argument(..., help="Labelled JSONL/Parquet files or folders."),
    report: Optional[Path] = typer.Option(None, help="Write the metrics JSON here (and a confusion-matrix PNG beside it)."),
    label_field: str = typer.Option("score"),
    long_docs: Optional[str] = typer.Option(None, help="truncate, chunk-mean or chunk-max (default: the model's)."),
    batch_size: int = typer.Option(32),
    dtype: Optional[str] = typer.Option(None, help="float32, bfloat16 or int8 (CPU fast path); default fp32 on CPU, bf16 on GPU."),
):
    """Evaluate a classifier against labels: table in the terminal, JSON report."""
    from edu_filter.classifiers.evaluate import evaluate_model
    from edu_filter.documents import DocumentError

    try:
        evaluate_model(
            model, data, report=report, label_field=label_field, long_docs=long_docs, batch_size=batch_size, dtype=dtype
        )
    except (DocumentError, ValueError) as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None


# --- score / agreement (LLM annotation) ------------------------------------------------------------------------------
@app.command()
def score(
    data: Optional[list[str]] = typer.Argument(None, help="JSONL/Parquet files or folders of documents."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Annotated output (.jsonl, .jsonl.gz, .parquet)."),
    prompt: str = typer.Option("web", help="web (FineWeb-Edu), code (Python-Edu), a version id, or a file with {extract}."),
    show_prompt: Optional[str] = typer.Option(None, help="Print the named prompt (web, code, file) and exit."),
    backend: str = typer.Option("openai", help="openai (any OpenAI-compatible URL), vllm, sglang, script, transformers."),
    base_url: Optional[str] = typer.Option(None, help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1."),
    model: Optional[str] = typer.Option(
        None, help="Served name, hub id, folder or .gguf file (openai: optional when the server serves one model)."
    ),
    api: str = typer.Option("chat", help="chat (/v1/chat/completions) or completion (/v1/completions)."),
    api_key_env: str = typer.Option("OPENAI_API_KEY", help="Environment variable holding the API key."),
    concurrency: int = typer.Option(16, help="Requests in flight (batch size for transformers)."),
    timeout: float = typer.Option(
        120.0, help="Seconds without any answer from the server before a request is retried (queued requests back off "
        "concurrency instead)."
    ),
    max_retries: int = typer.Option(5, help="Retries on 429, 5xx, timeouts and connection errors."),
    retry_backoff: float = typer.Option(1.0, help="First retry delay in seconds (doubles each retry, jittered)."),
    max_reasks: int = typer.Option(2, help="Extra questions when an answer is unparseable, ambiguous or cut off."),
    temperature: float = typer.Option(0.6),
    top_p: float = typer.Option(0.95),
    max_tokens: int = typer.Option(256, help="Maximum new tokens per answer."),
    max_chars: Optional[int] = typer.Option(
        None, help="Cut documents to this many characters, and further to fit the server's context (counted)."
    ),
    sample: Optional[int] = typer.Option(
        None, help="Annotate N documents: a reproducible random sample (drawn while streaming; only N are held), or "
        "with --select active the budget of documents the LLM may see."
    ),
    seed: int = typer.Option(0, help="Seed for --sample (and transformers sampling)."),
    select: str = typer.Option(
        "random", help="random (a uniform sample), or active: rounds chosen by a classifier trained on the labels so "
        "far, each row weighted so that train undoes the choice."
    ),
    rounds: int = typer.Option(5, help="--select active: rounds the budget is spent in (the first one uniform)."),
    seed_size: Optional[int] = typer.Option(None, help="--select active: documents in the first, uniform round "
                                            "(default: an equal share of the budget)."),
    kind: Optional[str] = typer.Option(None, help="--select active: web or code, the encoder as in train (default: "
                                       "from --prompt)."),
    encoder: Optional[str] = typer.Option(None, help="--select active: encoder path or hub name (as in train)."),
    max_length: int = typer.Option(512, help="--select active: tokens per document the encoder reads (as in train)."),
    embedding_cache: Optional[str] = typer.Option(None, help="--select active: embedding cache, shared with train "
                                                  "(default ~/.cache/edu-filter)."),
    cache: Optional[Path] = typer.Option(None, help="Resume cache (default: OUTPUT.cache.sqlite)."),
    text_field: str = typer.Option("text"),
    id_field: str = typer.Option("id"),
    max_model_len: int = typer.Option(8192, help="vllm/sglang: context length of the started server."),
    tensor_parallel: int = typer.Option(1, help="vllm/sglang: GPUs per model."),
    server_script: Optional[str] = typer.Option(None, help="script backend: Python file serving /v1 on --port."),
    server_arg: Optional[list[str]] = typer.Option(
        None, help="vllm/sglang/script: extra server flag KEY=VALUE or KEY (repeatable), e.g. gpu-memory-utilization=0.9."
    ),
    device: Optional[str] = typer.Option(None, help="transformers: cpu, cuda... (default: cuda when available)."),
):
    """Annotate documents 0-5 with an LLM and the FineWeb-Edu / Python-Edu rubric (resumable)."""
    if show_prompt is not None:
        from edu_filter.annotate.prompts import show_prompt as print_prompt

        print_prompt(show_prompt)
        return
    if not data or output is None:
        raise typer.BadParameter("give input DATA and -o OUTPUT (or --show-prompt NAME)")
    from edu_filter.annotate.score import ANNOTATION_ERRORS, score_documents

    try:
        score_documents(
            data, output, prompt=prompt, backend=backend, model=model, base_url=base_url, api=api,
            api_key_env=api_key_env, concurrency=concurrency, timeout=timeout, max_retries=max_retries,
            retry_backoff=retry_backoff, max_reasks=max_reasks, temperature=temperature, top_p=top_p,
            max_tokens=max_tokens, max_chars=max_chars, sample=sample, seed=seed, select=select, rounds=rounds,
            seed_size=seed_size, kind=kind, encoder=encoder, max_length=max_length, embedding_cache=embedding_cache,
            cache=cache, text_field=text_field, id_field=id_field, max_model_len=max_model_len, tensor_parallel=tensor_parallel,
            server_script=server_script, server_args=server_arg, device=device,
        )
    except ANNOTATION_ERRORS as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None


@app.command()
def agreement(
    a: str = typer.Argument(..., help="First annotation (JSONL/Parquet with id and a score field); the reference."),
    b: str = typer.Argument(..., help="Second annotation, joined to A on id."),
    field: str = typer.Option("score", help="Score field in A (and in B unless --field-b)."),
    field_b: Optional[str] = typer.Option(None, help="Score field in B when it differs."),
    id_field: str = typer.Option("id"),
    threshold: float = typer.Option(3.0, help="Keep/drop threshold for the binary agreement (FineWeb-Edu: 3)."),
    report: Optional[Path] = typer.Option(None, help="Write the metrics as JSON here."),
):
    """Agreement between two annotations: Cohen's kappa, quadratic kappa, Spearman, MAE, confusion matrix."""
    from edu_filter.annotate.agreement import agreement as compare
    from edu_filter.annotate.score import ANNOTATION_ERRORS

    try:
        compare(a, b, field=field, field_b=field_b, id_field=id_field, threshold=threshold, report=report)
    except ANNOTATION_ERRORS as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None


@app.command()
def ablate(
    data: list[str] = typer.Option(..., help="NAME=PATH of a training set; give one per run (e.g. edu=..., all=...)."),
    output: Path = typer.Option(..., "-o", "--output", help="Ablation folder: tokenizer, runs, report, plots."),
    eval: Optional[list[str]] = typer.Option(None, "--eval", help="NAME=PATH of a reference set every run is scored on."),
    preset: str = typer.Option("tiny", help="tiny, smollm-135m, smollm-360m or ablation-1.8b."),
    tokens: int = typer.Option(300_000, help="Training tokens per run (the same for every run)."),
    override: Optional[list[str]] = typer.Option(None, help="key=value for a model or training field, e.g. lr=1e-3."),
    tokenizer: Optional[str] = typer.Option(None, help="Tokenizer folder or hub name (default: train a BPE)."),
    vocab_size: Optional[int] = typer.Option(None, help="Vocabulary of the trained BPE (default: from the preset)."),
    text_field: str = typer.Option("text"),
    humaneval: bool = typer.Option(False, help="Score HumanEval pass@1 after each run (for code data)."),
    humaneval_limit: Optional[int] = typer.Option(None, help="Only the first N HumanEval problems."),
    cloze: Optional[list[str]] = typer.Option(None, help="NAME=PATH of a multiple-choice JSONL benchmark."),
    seed: int = typer.Option(0, help="Seed of the first training of each dataset (initial weights and data order)."),
    seeds: int = typer.Option(
        1, help="Train every dataset this many times (seeds SEED, SEED+1, ...) to measure seed noise."
    ),
    compare_on: Optional[str] = typer.Option(
        None, help="Evaluation set of the verdict (default: the first --eval, else the last --data's held-out slice)."
    ),
):
    """Train the same small model on each dataset at equal tokens and compare their losses (verdict in report.md)."""
    from edu_filter.documents import DocumentError
    from edu_filter.ablate.ablation import ablate as run_ablation

    try:
        run_ablation(
            data, output, eval_sets=eval, preset=preset, tokens=tokens, overrides=override, tokenizer=tokenizer,
            vocab_size=vocab_size, text_field=text_field, humaneval=humaneval, humaneval_limit=humaneval_limit,
            cloze=cloze, seed=seed, seeds=seeds, compare_on=compare_on,
        )
    except (DocumentError, ValueError) as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None


# --- apply / sweep (filters) -------------------------------------------------------------------------------------------
@app.command()
def apply(
    inputs: list[str] = typer.Argument(..., help="JSONL/Parquet files or folders, local or s3://, hf://datasets/..."),
    output: str = typer.Option(..., "-o", "--output", help="Output folder: kept/, removed/<reason>/, failed/, stats.json."),
    model: Optional[str] = typer.Option(None, help="Classifier folder from `train`, or a hub id (preset default)."),
    preset: Optional[str] = typer.Option(None, help="fineweb-edu (>=3), fineweb-edu-score-2 (>=2) or python-edu (>=4)."),
    threshold: Optional[int] = typer.Option(None, help="Keep int_score >= THRESHOLD (default 3, or the preset's)."),
    keep_top: Optional[float] = typer.Option(None, help="Keep this fraction of documents instead (e.g. 0.1)."),
    dedup: Optional[bool] = typer.Option(None, "--dedup/--no-dedup", help="MinHash near-dedup (on by default)."),
    exact_dedup: Optional[bool] = typer.Option(None, "--exact-dedup/--no-exact-dedup", help="Exact dedup (python-edu)."),
    decontaminate: Optional[list[str]] = typer.Option(None, help="Eval set JSONL to decontaminate against, or 'humaneval'."),
    long_docs: Optional[str] = typer.Option(None, help="truncate, chunk-mean or chunk-max (default: the model's)."),
    max_length: Optional[int] = typer.Option(None, help="Tokens per document/chunk (the model's when unset)."),
    batch_size: int = typer.Option(32),
    dtype: Optional[str] = typer.Option(None, help="float32, bfloat16 or int8 (CPU fast path); default fp32 on CPU, bf16 on GPU."),
    tokenizer: Optional[str] = typer.Option(None, help="Tokenizer for token_count (the classifier's when unset)."),
    text_field: str = typer.Option("text"),
    id_field: str = typer.Option("id"),
    executor: str = typer.Option("local", help="local, slurm or ray."),
    tasks: int = typer.Option(1, help="Number of shards."),
    workers: Optional[int] = typer.Option(None, help="Tasks run at once (local: 1 unless given; Slurm: no limit unless given)."),
    order: str = typer.Option("auto", help="auto, dedup-first or score-first (auto: score first with fastText or a GPU)."),
    overwrite: bool = typer.Option(False, help="Start over when OUT holds a run made with other settings, model or inputs."),
    keep_work: bool = typer.Option(False, help="Keep the scratch folder OUT/work (signatures, intermediates) after success."),
    wait: bool = typer.Option(False, help="Slurm: follow the submitted chain until it ends (exit 1 if a stage fails)."),
    verbose: bool = typer.Option(False, help="Show datatrove's logs in the terminal (always in OUT/logs)."),
    push_to_hub: Optional[str] = typer.Option(None, help="Upload kept/, stats.json, the card and provenance to this hub dataset repo (ORG/NAME)."),
    slurm_partition: Optional[str] = typer.Option(None, help="Partition (default: the cluster's default)."),
    slurm_gpu_partition: Optional[str] = typer.Option(None, help="Partition for the scoring stage."),
    slurm_gpus: int = typer.Option(0, help="GPUs per scoring task."),
    slurm_time: str = typer.Option("24:00:00"),
    slurm_cpus: int = typer.Option(4, help="CPUs per task."),
    slurm_mem_gb: Optional[int] = typer.Option(None, help="Memory per task in GB (default: 4 per CPU)."),
    slurm_venv: Optional[str] = typer.Option(None, help="activate script sourced by every job (default: this Python environment)."),
    dry_run: bool = typer.Option(False, help="Slurm: write sbatch scripts and submit.sh, submit nothing."),
):
    """Score, deduplicate and threshold documents with a classifier (datatrove pipeline)."""
    from edu_filter.documents import DocumentError
    from edu_filter.filters.apply import SlurmOptions, run_apply
    from edu_filter.filters.executors import StageFailed

    try:
        run_apply(
            inputs, output, model=model, preset=preset, threshold=threshold, keep_top=keep_top, dedup=dedup,
            exact_dedup=exact_dedup, decontaminate=decontaminate, executor=executor, tasks=tasks, workers=workers,
            slurm=SlurmOptions(partition=slurm_partition, gpu_partition=slurm_gpu_partition, gpus_per_task=slurm_gpus,
                               time=slurm_time, cpus_per_task=slurm_cpus, mem_gb=slurm_mem_gb, venv_path=slurm_venv,
                               dry_run=dry_run),
            order=order, overwrite=overwrite, wait=wait, verbose=verbose, keep_work=keep_work, push_to_hub=push_to_hub,
            long_docs=long_docs, max_length=max_length, batch_size=batch_size, dtype=dtype, tokenizer=tokenizer,
            text_field=text_field, id_field=id_field,
        )
    except (DocumentError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    except StageFailed as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None


@app.command()
def status(
    output: str = typer.Argument(..., help="An apply output folder (any executor, running or finished)."),
):
    """Per stage: tasks done, documents read, docs/s and Slurm job states; then the stats table when finished."""
    from rich.console import Console

    from edu_filter.documents import DocumentError
    from edu_filter.filters.executors import show_status

    try:
        show_status(output, Console())
    except DocumentError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None


@app.command()
def sweep(
    scored: list[str] = typer.Argument(..., help="An apply output folder, or scored JSONL/Parquet files/folders."),
    output: Path = typer.Option(Path("sweep"), "-o", "--output", help="Folder for the table and PNG plots."),
    thresholds: list[int] = typer.Option([0, 1, 2, 3, 4, 5], help="int_score thresholds to compare."),
    label_field: Optional[str] = typer.Option(None, help="Reference label field (input_score or label by default)."),
    positive_threshold: int = typer.Option(3, help="A label >= this counts as educational for precision/recall."),
):
    """Retention (docs, tokens) per threshold, score histogram, retention curve; P/R/F1 when labels exist."""
    from edu_filter.documents import DocumentError
    from edu_filter.filters.sweep import run_sweep

    # `--thresholds 0 1 2` leaves 1 and 2 among the positional arguments: take back bare integers that are not paths
    extra = [s for s in scored if s.isdigit() and not Path(s).exists()]
    scored = [s for s in scored if s not in extra]
    thresholds = sorted(set(thresholds) | {int(s) for s in extra})
    try:
        run_sweep(scored, output, thresholds=thresholds, label_field=label_field,
                  positive_threshold=positive_threshold)
    except (DocumentError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None


@app.command()
def lineage(
    path: Path = typer.Argument(..., help="An artifact: annotation file, classifier folder, apply output or ablation."),
    as_json: bool = typer.Option(False, "--json", help="Print the tree as JSON (one node per artifact or input)."),
):
    """How PATH was made, back to the raw inputs: a tree of artifacts, marking inputs changed since they were used."""
    from edu_filter.provenance import ProvenanceError, show_lineage

    try:
        show_lineage(path, as_json=as_json)
    except ProvenanceError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None


@app.command()
def demo(
    output: Path = typer.Option(Path("demo_out"), "-o", "--output", help="Folder for models, outputs and report.md."),
):
    """Run the whole loop on the bundled data (about 10 minutes on 2 CPU cores) and write OUTPUT/report.md."""
    from edu_filter.demo import run_demo

    run_demo(output)


if __name__ == "__main__":
    app()
