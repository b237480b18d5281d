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
    max_length: int = typer.Option(512, help="Tokens per document (saved with the model)."),
    seed: int = typer.Option(0),
):
    """Train a classifier on LLM-annotated scores."""
    from edu_filter.train.classifier import train_classifier

    train_classifier(
        data, output, kind=kind, method=method, encoder=encoder, val=val, label_field=label_field,
        max_length=max_length, seed=seed,
    )


@app.command()
def evaluate(
    model: str = typer.Argument(..., help="Model folder (or hub id)."),
    data: list[str] = typer.Argument(..., help="Labelled JSONL/Parquet files or folders."),
    report: Optional[Path] = typer.Option(None, help="Write the metrics JSON here."),
    label_field: str = typer.Option("score"),
):
    """Evaluate a classifier against labels: table in the terminal, JSON report."""
    from edu_filter.classifiers.evaluate import evaluate_model

    evaluate_model(model, data, report=report, label_field=label_field)


# --- score / agreement (LLM annotation) ------------------------------------------------------------------------------
@app.command()
def score(
    data: Optional[list[str]] = typer.Argument(None, help="JSONL/Parquet files or folders of documents."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Annotated output (.jsonl, .jsonl.gz, .parquet)."),
    prompt: str = typer.Option("web", help="web (FineWeb-Edu), code (Python-Edu), a version id, or a file with {extract}."),
    show_prompt: Optional[str] = typer.Option(None, help="Print the named prompt (web, code, file) and exit."),
    backend: str = typer.Option("openai", help="openai (any OpenAI-compatible URL), vllm, sglang, script, transformers."),
    base_url: Optional[str] = typer.Option(None, help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1."),
    model: str = typer.Option("meta-llama/Meta-Llama-3-70B-Instruct", help="Model name (served name, hub id or path)."),
    api: str = typer.Option("chat", help="chat (/v1/chat/completions) or completion (/v1/completions)."),
    api_key_env: str = typer.Option("OPENAI_API_KEY", help="Environment variable holding the API key."),
    concurrency: int = typer.Option(16, help="Requests in flight (batch size for transformers)."),
    timeout: float = typer.Option(120.0, help="Seconds per request before it is retried."),
    max_retries: int = typer.Option(5, help="Retries on 429, 5xx, timeouts and connection errors."),
    retry_backoff: float = typer.Option(1.0, help="First retry delay in seconds (doubles each retry, jittered)."),
    max_reasks: int = typer.Option(2, help="Extra questions when an answer has no parseable score."),
    temperature: float = typer.Option(0.6),
    top_p: float = typer.Option(0.95),
    max_tokens: int = typer.Option(256, help="Maximum new tokens per answer."),
    max_chars: Optional[int] = typer.Option(None, help="Cut documents to this many characters (counted in the summary)."),
    sample: Optional[int] = typer.Option(None, help="Annotate a reproducible random sample of N documents."),
    seed: int = typer.Option(0, help="Seed for --sample (and transformers sampling)."),
    cache: Optional[Path] = typer.Option(None, help="Resume cache (default: OUTPUT.cache.sqlite)."),
    text_field: str = typer.Option("text"),
    id_field: str = typer.Option("id"),
    max_model_len: int = typer.Option(8192, help="vllm/sglang: context length of the started server."),
    tensor_parallel: int = typer.Option(1, help="vllm/sglang: GPUs per model."),
    server_script: Optional[str] = typer.Option(None, help="script backend: Python file serving /v1 on --port."),
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
            max_tokens=max_tokens, max_chars=max_chars, sample=sample, seed=seed, cache=cache,
            text_field=text_field, id_field=id_field, max_model_len=max_model_len, tensor_parallel=tensor_parallel,
            server_script=server_script, device=device,
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
    seed: int = typer.Option(0),
):
    """Train the same small model on each dataset at equal tokens and compare their losses."""
    from edu_filter.train.ablate import ablate as run_ablation

    run_ablation(
        data, output, eval_sets=eval, preset=preset, tokens=tokens, overrides=override, tokenizer=tokenizer,
        vocab_size=vocab_size, text_field=text_field, humaneval=humaneval, humaneval_limit=humaneval_limit,
        cloze=cloze, seed=seed,
    )


if __name__ == "__main__":
    app()
