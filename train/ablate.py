"""`edu-filter ablate`: train the same small model on each dataset at an equal token budget and compare.

One ablation folder holds one tokenizer (trained on a sample mixing every --data input, or given), the packed token
files, one run folder per dataset (checkpoint, final model, run.json), `report.json`, and two plots:
`loss_curves.png` (training and evaluation loss against tokens) and `eval_loss.png` (final evaluation losses per run,
side by side). Every run is evaluated on every dataset's held-out slice and on each --eval reference set.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from edu_filter.train.packing import TokenFileInfo, iter_texts, write_tokens, write_train_val
from edu_filter.train.pretrain import PretrainConfig, cpu_threads, init_distributed, parse_overrides, pretrain
from edu_filter.train.tokenizer import load_tokenizer, mixed_sample, train_tokenizer


def parse_named(specs: list[str] | None, option: str) -> dict[str, str]:
    """NAME=PATH pairs (`--data edu=edu.jsonl`), names unique and usable as folder names."""
    named: dict[str, str] = {}
    for spec in specs or []:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"{option} {spec!r}: expected NAME=PATH")
        if "/" in name or name in named:
            raise ValueError(f"{option} {spec!r}: names must be unique and contain no '/'")
        named[name] = path
    return named


def ablate(
    data: list[str],
    output: str | Path,
    eval_sets: list[str] | None = None,
    preset: str = "tiny",
    tokens: int = 300_000,
    overrides: list[str] | None = None,
    tokenizer: str | None = None,
    vocab_size: int | None = None,
    text_field: str = "text",
    val_fraction: float = 0.05,
    tokenizer_sample_chars: int = 4_000_000,
    humaneval: bool = False,
    humaneval_limit: int | None = None,
    cloze: list[str] | None = None,
    seed: int = 0,
) -> dict:
    """Run the ablation and write OUT/report.json, the plots, and a table in the terminal. Returns the report."""
    import torch.distributed as dist
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # rich shows the progress that matters; no bar per saved checkpoint
    datasets, references, cloze_sets = parse_named(data, "--data"), parse_named(eval_sets, "--eval"), parse_named(
        cloze, "--cloze")
    if not datasets:
        raise ValueError("give at least one --data NAME=PATH")
    out = Path(output)
    extra = {"vocab_size": vocab_size} if vocab_size else {}
    cfg = PretrainConfig.from_preset(preset, parse_overrides(overrides), tokens=tokens, seed=seed, **extra)
    rank, _, world = init_distributed()

    # --- tokenizer and token files (first process only; the others wait and read them) ------------------------------
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        tok = _prepare_tokenizer(out, datasets, tokenizer, cfg.vocab_size, text_field, tokenizer_sample_chars)
        infos = _prepare_tokens(out, tok, datasets, references, cfg, text_field, val_fraction)
    if world > 1:
        dist.barrier()
    if rank != 0:
        tok = load_tokenizer(out / "tokenizer")
        infos = {}
    eval_paths = {f"{name}/val": out / "tokens" / name / "val.bin" for name in datasets}
    eval_paths.update({name: out / "tokens" / "eval" / f"{name}.bin" for name in references})

    # --- one run per dataset -----------------------------------------------------------------------------------------
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = Console()
    runs = {}
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(), TimeRemainingColumn()]
    started = time.time()
    with cpu_threads(cfg.cpu_threads), Progress(*columns, console=console, disable=rank != 0) as progress:
        for name in datasets:
            run_cfg = cfg
            if cfg.time_limit_minutes is not None:  # the limit covers the whole invocation, not each run
                run_cfg = replace(cfg, time_limit_minutes=cfg.time_limit_minutes - (time.time() - started) / 60)
            run_dir = out / "runs" / name
            runs[name] = pretrain(run_cfg, out / "tokens" / name / "train.bin", eval_paths, run_dir, tok, progress)
            if not runs[name]["finished"]:  # the time limit: end the job, the same command resumes it
                break
    if world > 1:
        dist.destroy_process_group()
    if rank != 0:
        return {}

    for name, record in runs.items():
        if not record["finished"]:
            continue
        if humaneval or cloze_sets:
            model = _load_final_model(out / "runs" / name / "model")
        if humaneval:
            from edu_filter.train.humaneval import evaluate_humaneval, load_problems

            record["humaneval"] = evaluate_humaneval(model, tok, load_problems(limit=humaneval_limit))
        if cloze_sets:
            from edu_filter.train.cloze import load_cloze, score_cloze

            record["cloze"] = {c: score_cloze(model, tok, load_cloze(path)) for c, path in cloze_sets.items()}

    report = {
        "preset": preset,
        "tokens": tokens,
        "tokenizer": str(tokenizer or out / "tokenizer"),
        "vocab_size": len(tok),
        "datasets": {name: {"path": path, **infos.get(name, {})} for name, path in datasets.items()},
        "references": references,
        "runs": runs,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    if len(runs) < len(datasets) or not all(r["finished"] for r in runs.values()):
        console.print(f"[yellow]stopped at the time limit after {sum(r['steps'] for r in runs.values())} steps; "
                      "run the same command again to resume")
        return report
    plot_losses(runs, out / "loss_curves.png")
    plot_eval_losses(runs, out / "eval_loss.png")
    console.print(comparison_table(runs, preset))
    for name, r in runs.items():
        if r["train_epochs"] > 1.05:
            console.print(f"[yellow]note: '{name}' was repeated {r['train_epochs']:.1f} times to fill the budget; "
                          "repeated data weakens the comparison (give more documents or fewer --tokens)")
    console.print(f"report: {out / 'report.json'}")
    return report


def _prepare_tokenizer(out: Path, datasets: dict, given: str | None, vocab_size: int, text_field: str,
                       sample_chars: int):
    if given:
        tok = load_tokenizer(given)
        tok.save_pretrained(out / "tokenizer")
        return tok
    if (out / "tokenizer" / "tokenizer.json").exists():  # a resumed ablation keeps its vocabulary
        return load_tokenizer(out / "tokenizer")
    sample = mixed_sample([iter_texts(path, text_field) for path in datasets.values()], sample_chars)
    return train_tokenizer(sample, vocab_size, out / "tokenizer")


def _prepare_tokens(out: Path, tok, datasets: dict, references: dict, cfg: PretrainConfig, text_field: str,
                    val_fraction: float) -> dict:
    """Pack each dataset (train + held-out val) and each reference set, reading only what the budget needs."""
    window = cfg.context + 1
    infos = {}
    for name, path in datasets.items():
        folder = out / "tokens" / name
        if (folder / "train.json").exists():
            train = TokenFileInfo(**json.loads((folder / "train.json").read_text()))
            val = TokenFileInfo(**json.loads((folder / "val.json").read_text()))
        else:
            train, val = write_train_val(iter_texts(path, text_field), tok, folder, cfg.tokens + window, val_fraction,
                                         cfg.eval_tokens + window)
        for part, info in (("training", train), ("validation", val)):
            if info.tokens < window:
                raise ValueError(f"--data {name}={path}: {info.tokens} {part} tokens, fewer than one sequence of "
                                 f"{window}; give more documents")
        infos[name] = {"train_tokens": train.tokens, "train_documents": train.documents, "val_tokens": val.tokens,
                       "val_documents": val.documents, "read_to_end": train.complete}
    for name, path in references.items():
        file = out / "tokens" / "eval" / f"{name}.bin"
        if not file.with_suffix(".json").exists():
            info = write_tokens(iter_texts(path, text_field), tok, file, cfg.eval_tokens + window)
            if info.tokens < window:
                raise ValueError(f"--eval {name}={path}: {info.tokens} tokens, fewer than one sequence of {window}")
    return infos


def _load_final_model(path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.to("cuda" if torch.cuda.is_available() else "cpu")


def comparison_table(runs: dict, preset: str):
    """Runs as rows: passes over the training data (repeats weaken the comparison), training loss over the first and
    last steps, final evaluation losses (best in green), speed."""
    from rich.table import Table

    first = next(iter(runs.values()))
    eval_names = list(first["eval"])
    cloze_names = sorted({c for r in runs.values() for c in r.get("cloze", {})})
    with_humaneval = any("humaneval" in r for r in runs.values())
    table = Table(title=f"{preset} ({first['params'] / 1e6:.1f}M params), {first['tokens_seen']:,} tokens per run; "
                        "eval = loss on held-out text, lower is better")
    table.add_column("run")
    for col in ["epochs", "train loss", *eval_names, "tok/s", "MFU", *[f"{c} acc/norm" for c in cloze_names],
                *(["HumanEval"] if with_humaneval else [])]:
        table.add_column(col, justify="right")
    best = {n: min(r["eval"].get(n, float("inf")) for r in runs.values()) for n in eval_names}
    for name, r in runs.items():
        losses = r["train_loss"]
        cells = [name, f"{r['train_epochs']:.2f}", f"{_mean(losses[:5]):.2f}→{_mean(losses[-5:]):.2f}" if losses else "-"]
        for n in eval_names:
            v = r["eval"].get(n)
            cells.append("-" if v is None else (f"[bold green]{v:.3f}" if v == best[n] else f"{v:.3f}"))
        cells += [f"{r['tokens_per_second']:,.0f}", f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"]
        cells += [f"{r['cloze'][c]['acc']:.2f}/{r['cloze'][c]['acc_norm']:.2f}" if c in r.get("cloze", {}) else "-"
                  for c in cloze_names]
        if with_humaneval:
            cells.append(f"{r['humaneval']['pass@1']:.3f}" if "humaneval" in r else "-")
        table.add_row(*cells)
    return table


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def plot_losses(runs: dict, path: Path) -> Path:
    """Training loss (left) and evaluation losses (right) against training tokens, one colour per run."""
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend (e.g. a notebook's) alone

    fig = Figure(figsize=(12, 4.5))
    left, right = fig.subplots(1, 2)
    styles = ["-", "--", ":", "-."]
    for i, (name, r) in enumerate(runs.items()):
        color = f"C{i}"
        per_step = r["tokens_seen"] / max(1, len(r["train_loss"]))
        left.plot([(s + 1) * per_step for s in range(len(r["train_loss"]))], r["train_loss"], color=color, label=name)
        eval_names = [k for k in r["eval_history"][0] if k not in ("step", "tokens")] if r["eval_history"] else []
        for j, n in enumerate(eval_names):
            right.plot([e["tokens"] for e in r["eval_history"]], [e[n] for e in r["eval_history"]], color=color,
                       linestyle=styles[j % len(styles)], marker="o", label=f"{name} on {n}")
    left.set(title="Training loss", xlabel="training tokens", ylabel="cross-entropy (nats/token)")
    right.set(title="Evaluation loss", xlabel="training tokens", ylabel="cross-entropy (nats/token)")
    left.legend()
    right.legend(fontsize="small")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def plot_eval_losses(runs: dict, path: Path) -> Path:
    """Final evaluation loss on each set, the runs' bars side by side (lower is better)."""
    import numpy as np
    from matplotlib.figure import Figure

    eval_names = list(next(iter(runs.values()))["eval"])
    width = 0.8 / len(runs)
    x = np.arange(len(eval_names))
    fig = Figure(figsize=(max(6, 2 * len(eval_names)), 4.5))
    ax = fig.subplots()
    for i, (name, r) in enumerate(runs.items()):
        values = [r["eval"][n] for n in eval_names]
        bars = ax.bar(x + (i - (len(runs) - 1) / 2) * width, values, width, label=name, color=f"C{i}")
        ax.bar_label(bars, fmt="%.3f", fontsize="small")
    lowest = min(r["eval"][n] for r in runs.values() for n in eval_names)
    ax.set_ylim(bottom=max(0.0, lowest - 0.5))  # differences between runs are tenths of a nat: start near them
    ax.set_xticks(x, eval_names)
    ax.set(title=f"Final evaluation loss at {next(iter(runs.values()))['tokens_seen']:,} training tokens",
           xlabel="evaluation set", ylabel="cross-entropy (nats/token, lower is better)")
    ax.legend(title="trained on")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
