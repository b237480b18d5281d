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


if __name__ == "__main__":
    app()
