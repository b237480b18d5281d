"""`edu-filter ablate`: train the same small model on each dataset at an equal token budget and compare.

One ablation folder holds one tokenizer (trained on a sample mixing every --data input, or given), the packed token
files, one run folder per dataset (its checkpoint while it trains, then its final model and run.json; with
--seeds K > 1 one `seed-S` folder per seed inside it), `report.json`, `report.md` (the verdict in one sentence), `provenance.json` (inputs and their
fingerprints, see `edu_filter.provenance`) and two plots: `loss_curves.png` (training and evaluation loss against
tokens) and `eval_loss.png` (final evaluation losses per run, side by side). Every run is evaluated on every
dataset's held-out slice and on each --eval reference set.

Seeds: run k of every dataset uses seed `seed + k`, which sets the initial weights and the order of the data, so the
spread over seeds measures how much a loss moves for reasons that have nothing to do with the data. The verdict
compares the two runs with the lowest mean loss on one evaluation set against that spread (`SIGNIFICANCE_RULE`).
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

from edu_filter import provenance
from edu_filter.ablate.cloze import load_cloze, score_cloze
from edu_filter.ablate.humaneval import evaluate_humaneval, load_problems
from edu_filter.ablate.packing import (
    FILE_ORDER,
    PACKING,
    PackingStopped,
    TokenFileInfo,
    documents_shared,
    hashes_path,
    iter_texts,
    packed_settings,
    packing_settings,
    read_packed,
    tokenizer_key,
    write_tokens,
    write_train_val,
)
from edu_filter.ablate.pretrain import (
    PretrainConfig,
    cpu_threads,
    init_distributed,
    parse_overrides,
    preparation_barrier,
    pretrain,
)
from edu_filter.ablate.tokenizer import load_tokenizer, mixed_sample, train_tokenizer
from edu_filter.documents import (InputError, check_writable_output, expand_paths, holds_saved_work, writing_alone,
                                  logged_progress, stop_requested, unclipped)

WELCH_ALPHA = 0.05  # two or more seeds: significant when Welch's t-test gives p below this
EXIT_STOPPED = 75  # stopped at --override time_limit_minutes (sysexits' EX_TEMPFAIL): run again to resume
SIGNIFICANCE_RULE = (
    f"with 2 or more seeds per run a difference is significant when Welch's t-test gives p < {WELCH_ALPHA:g} (with 2 "
    "seeds it has at most 2 degrees of freedom: a gap of at least ~4.3 pooled seed standard deviations passes where "
    "the two runs' seeds vary alike, up to ~12.7 as their variances part and the degrees of freedom fall to 1); with "
    "1 seed there is no estimate of seed noise, hence no verdict"
)


MIN_VOCAB_SIZE = 257
EVAL_HISTORY_KEYS = ("step", "tokens")  # beside each evaluation set's loss in a run's eval_history


def parse_named(specs: list[str] | None, option: str) -> dict[str, str]:
    """NAME=PATH pairs (`--data edu=edu.jsonl`), names unique and usable as folder names."""
    named: dict[str, str] = {}
    for spec in specs or []:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"{option} {spec!r}: expected NAME=PATH")
        if "/" in name or name in named:
            raise ValueError(f"{option} {spec!r}: names must be unique and contain no '/'")
        if name.startswith(".") or (option == "--data" and name == "eval"):  # tokens/eval/ holds the --eval sets
            raise ValueError(f"{option} {spec!r}: {name!r} is a name the output folder uses; give another name")
        if option == "--eval" and name in EVAL_HISTORY_KEYS:  # the evaluation history's own fields
            raise ValueError(f"{option} {spec!r}: {name!r} names a field of the evaluation history; give another name")
        named[name] = path
    return named


def text_fields(specs: str | list[str] | None, names: list[str]) -> dict[str, str]:
    """The text field of each --data/--eval set: FIELD for every set, NAME=FIELD for the sets named NAME (apply's
    kept/ holds `text`, the raw Stack dump it came from `content`)."""
    default, per_set = "text", {}
    for spec in [specs] if isinstance(specs, str) else specs or []:
        name, sep, field = spec.partition("=")
        if not sep:
            default = spec
        elif name not in names or not field:
            raise InputError(f"--text-field {spec!r}: expected FIELD, or NAME=FIELD for a set named by --data or "
                             f"--eval ({', '.join(names)})")
        else:
            per_set[name] = field
    if not default:
        raise InputError("--text-field: give a field name")
    return {name: per_set.get(name, default) for name in names}


def comparison_set(datasets: dict, references: dict, compare_on: str | None) -> str:
    """The evaluation set the verdict is read on: --compare-on, else the first --eval reference, else the held-out
    slice of the last --data (usually the unfiltered baseline, i.e. the distribution being filtered)."""
    available = [*references, *(f"{name}/val" for name in datasets)]
    if compare_on is not None:
        if compare_on not in available:
            raise ValueError(f"--compare-on {compare_on!r}: not an evaluation set; choose one of "
                             f"{', '.join(available)}")
        return compare_on
    return next(iter(references), f"{list(datasets)[-1]}/val")


def run_folder(out: Path, name: str, seed: int, seeds: int) -> Path:
    """runs/NAME with one seed; runs/NAME/seed-S for each seed otherwise. A run of this seed finished in the other
    layout (the same ablation run before with one seed, or with several) is used where it is: seed 0 of a `--seeds 3`
    rerun of a one-seed ablation was trained again, the whole run's cost. So is one stopped midway there (its
    checkpoint), where this layout has neither: it started over, its checkpoint left on disk."""
    single, per_seed = out / "runs" / name, out / "runs" / name / f"seed-{seed}"
    here, other = (single, per_seed) if seeds == 1 else (per_seed, single)
    if _run_seed(here) is None and _run_seed(other) == seed:
        return other
    return here


def _run_seed(folder: Path) -> int | None:
    """The seed of the run finished in `folder` (its run.json), else of the one stopped there (its checkpoint's
    trainer_state.json), else None."""
    def read(path: Path) -> dict:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}

    record = read(folder / "run.json")
    if not record.get("finished"):
        record = read(folder / "checkpoint" / "trainer_state.json")
    return record.get("config", {}).get("seed")


def written_alone(run: Callable) -> Callable:
    """`run(data, output, ...)` with its output folder held by its first process (`RANK` 0, or no torchrun) for the
    whole run: a second ablation into it (a job resubmitted while the first runs) rewrote token files the first had
    mapped, which died of SIGBUS with no word, or both trained the same runs. The second is refused naming the first."""
    import functools

    @functools.wraps(run)
    def alone(data, output, *args, **kwargs):
        out = Path(output)
        check_writable_output(out, "-o/--output", folder=True)  # every rank: none goes on to wait for the others
        if os.environ.get("RANK", "0") != "0":
            return run(data, output, *args, **kwargs)
        with writing_alone(out, lock=out / ABLATION_LOCK):
            return run(data, output, *args, **kwargs)

    return alone


ABLATION_LOCK = ".ablate.lock"


@written_alone
def ablate(
    data: list[str],
    output: str | Path,
    eval_sets: list[str] | None = None,
    preset: str = "tiny",
    tokens: int = 300_000,
    overrides: list[str] | None = None,
    tokenizer: str | None = None,
    vocab_size: int | None = None,
    text_field: str | list[str] = "text",
    val_fraction: float = 0.05,
    tokenizer_sample_chars: int = 4_000_000,
    humaneval: bool = False,
    humaneval_limit: int | None = None,
    cloze: list[str] | None = None,
    seed: int = 0,
    seeds: int = 1,
    compare_on: str | None = None,
) -> dict:
    """Run the ablation and write OUT/report.json, report.md, the plots, provenance.json, and a table in the
    terminal. Every dataset is trained `seeds` times (seeds seed .. seed + seeds - 1). Returns the report."""
    import torch.distributed as dist
    from transformers.utils import logging as hf_logging

    started = time.time()  # --override time_limit_minutes counts packing too: a job's limit covers all of it
    hf_logging.disable_progress_bar()  # rich shows the progress that matters; no bar per saved checkpoint
    datasets, references, cloze_sets = parse_named(data, "--data"), parse_named(eval_sets, "--eval"), parse_named(
        cloze, "--cloze")
    if not datasets:
        raise ValueError("give at least one --data NAME=PATH")
    if seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {seeds}")
    if not 0 <= seed <= 2**32 - seeds:  # numpy's generators take seeds up to 2**32 - 1
        raise InputError(f"--seed must be in [0, 2**32 - --seeds], got {seed}")
    if vocab_size is not None and tokenizer is not None:  # the model takes the given tokenizer's vocabulary
        raise InputError("--vocab-size sizes the BPE trained here; --tokenizer brings its own vocabulary: leave "
                         "--vocab-size out")
    if vocab_size is not None and vocab_size < MIN_VOCAB_SIZE:
        raise InputError(f"--vocab-size must be at least {MIN_VOCAB_SIZE} (the 256 bytes and the end-of-document "
                         f"token), got {vocab_size}")
    if humaneval_limit is not None and (not humaneval or humaneval_limit < 1):
        raise InputError("--humaneval-limit is read with --humaneval only" if not humaneval
                         else f"--humaneval-limit must be >= 1, got {humaneval_limit}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    every = round(1 / val_fraction)  # the held-out slice is one document in `every` (`is_held_out`)
    started_with = {(packed_settings(folder) or _checkpoint_settings(folder) or {}).get("val_fraction")
                    for folder in (Path(output) / "tokens").glob("*")}  # an ablation resumed as it began
    if (every < 2 or abs(1 / val_fraction - every) > 0.01 * every) and val_fraction not in started_with:
        nearest = [n for n in sorted({math.floor(1 / val_fraction), math.ceil(1 / val_fraction)}) if n >= 2]
        raise InputError(f"--val-fraction {val_fraction}: the held-out slice is one document in N, so give 1/N "
                         f"(the nearest: {', '.join(f'{1 / n:.4g} holds out one in {n}' for n in nearest)})")
    compare = comparison_set(datasets, references, compare_on)
    fields = text_fields(text_field, [*datasets, *references])
    run_seeds = [seed + k for k in range(seeds)]
    out = Path(output)
    extra = {"vocab_size": vocab_size} if vocab_size is not None else {}
    parsed_overrides = parse_overrides(overrides)
    for key, option in (("tokens", "--tokens"), ("seed", "--seed"), ("vocab_size", "--vocab-size")):
        if key in parsed_overrides:  # the report, the seeds and the tokenizer read the option, not the override
            raise InputError(f"--override {key}={parsed_overrides[key]}: give {option} instead")
    cfg = PretrainConfig.from_preset(preset, parsed_overrides, tokens=tokens, seed=seed, **extra)
    rank, _, world = init_distributed()
    cfg.check_batches(world)
    # every input read after training is read now too: a bad one found then cost the whole training
    for path in {**datasets, **references}.values():
        expand_paths([path])
    cloze_questions = {c: load_cloze(path) for c, path in cloze_sets.items()}
    problems = load_problems(limit=humaneval_limit) if humaneval else None

    # --- tokenizer (first process), then token files (one dataset per process, in turn); the others wait -------------
    wait = preparation_barrier()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        tok = _prepare_tokenizer(out, datasets, tokenizer, cfg.vocab_size, fields, tokenizer_sample_chars)
    wait()
    if world > 1:  # the processes share the folder: one meeting a bad row must not remove what the others packed
        holds_saved_work(out / "tokenizer")
    if rank != 0:
        tok = load_tokenizer(out / "tokenizer")
    # the time limit and SIGTERM stop a packing too (hours at 10B tokens: the job was killed mid-packing, and its
    # chain, keyed on exit status 75, ended); under torchrun each process packs its own sets and they meet after
    with stop_requested() as terminated:
        deadline = None if cfg.time_limit_minutes is None else started + 60 * cfg.time_limit_minutes
        try:
            _prepare_tokens(out, tok, datasets, references, cfg, fields, val_fraction, rank, world,
                            stop=terminated.is_set if world == 1 else None, deadline=deadline if world == 1 else None)
        except PackingStopped as e:
            from rich.console import Console

            why = "by SIGTERM" if terminated.is_set() else "at the time limit"
            Console(stderr=True).print(f"[yellow]packing stopped {why} ({e}); run the same command again to resume[/]")
            raise SystemExit(128 + signal.SIGTERM if terminated.is_set() else EXIT_STOPPED) from None
    if terminated.is_set():  # met where packing does not stop (an --eval set, a fingerprint): ended here, as asked
        raise SystemExit(128 + signal.SIGTERM)
    wait()
    infos = _packed_infos(out, datasets) if rank == 0 else {}
    inputs = _inputs_used(out, datasets, references, cloze_sets, tokenizer) if rank == 0 else []
    eval_paths = {f"{name}/val": out / "tokens" / name / "val.bin" for name in datasets}
    eval_paths.update({name: out / "tokens" / "eval" / f"{name}.bin" for name in references})
    from rich.console import Console

    console = Console()
    shared = eval_texts_in_training(out, datasets, references) if rank == 0 else {}
    for line in shared_texts_warnings(shared):  # before the training, which it makes unfair
        console.print(f"[yellow]warning: {line}", soft_wrap=True)
    wait()  # the other ranks' next collective would time out while a 100B-token dataset's hashes are read

    # --- every dataset, every seed -----------------------------------------------------------------------------------
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    records: dict[str, list[dict]] = {name: [] for name in datasets}
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(), TimeRemainingColumn()]
    stopped = False
    with cpu_threads(cfg.cpu_threads), logged_progress(*columns, console=console, disable=rank != 0) as progress:
        for name in datasets:
            for run_seed in run_seeds:
                run_cfg = replace(cfg, seed=run_seed)
                if cfg.time_limit_minutes is not None:  # the limit covers the whole invocation, not each run
                    run_cfg = replace(run_cfg, time_limit_minutes=cfg.time_limit_minutes - (time.time() - started) / 60)
                record = pretrain(run_cfg, out / "tokens" / name / "train.bin", eval_paths,
                                  run_folder(out, name, run_seed, seeds), tok, progress,
                                  name=name if seeds == 1 else f"{name} seed {run_seed}")
                records[name].append(record)
                if not record["finished"]:  # the time limit: end the job, the same command resumes it
                    stopped = True
                    break
            if stopped:
                break
    if world > 1:
        dist.destroy_process_group()
    if rank != 0:
        return {}

    for name, seed_records in records.items():
        for record in seed_records:
            if stopped:  # no report comes of this invocation: the benchmarks run when every run has finished
                break
            if humaneval or cloze_sets:
                model = _load_final_model(run_folder(out, name, record["config"]["seed"], seeds) / "model")
            if humaneval:
                record["humaneval"] = evaluate_humaneval(model, tok, problems)
            if cloze_sets:
                record["cloze"] = {c: score_cloze(model, tok, questions) for c, questions in cloze_questions.items()}

    runs = {name: combine_seeds(recs) for name, recs in records.items() if recs}
    complete = not stopped and all(len(records[name]) == seeds for name in datasets)
    fingerprints = {e["role"].removeprefix("data:"): e for e in inputs if e["role"].startswith("data:")}
    report = {
        "preset": preset,
        "tokens": tokens,
        "seeds": run_seeds,
        "tokenizer": str(tokenizer or out / "tokenizer"),
        "vocab_size": len(tok),
        "datasets": {name: {"path": path, "fingerprint": fingerprints[name]["fingerprint"],
                            "made_by": (fingerprints[name].get("provenance") or {}).get("kind", "file"),
                            **infos.get(name, {})} for name, path in datasets.items()},
        "references": references,
        "eval_in_training": shared,
        "runs": runs,
        "complete": complete,  # false: stopped at the time limit, some runs unfinished (their `eval` is not final)
        "comparison": compare_runs(runs, compare) if complete else None,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    settings = {"preset": preset, "tokens": tokens, "overrides": parsed_overrides, "vocab_size": vocab_size,
                "text_field": fields, "val_fraction": val_fraction,
                "tokenizer_sample_chars": tokenizer_sample_chars, "humaneval": humaneval,
                "humaneval_limit": humaneval_limit, "seed": seed, "seeds": seeds, "compare_on": compare,
                "config": asdict(cfg), "complete": complete}
    provenance.record_provenance(out, kind="ablation", settings=settings, inputs=inputs)
    if not complete:
        steps = sum(r["steps"] for recs in records.values() for r in recs)
        console.print(f"[yellow]stopped at the time limit after {steps} steps; run the same command again to resume")
        # not 0: a loop or a job chain keyed on the exit status took a stopped ablation for a finished one. Under
        # torchrun 0 all the same: its agent takes any other status of a rank for a crash, and --max-restarts would
        # start the ablation again at once with a time limit of its own, past the job's
        if "TORCHELASTIC_RUN_ID" not in os.environ:
            raise SystemExit(EXIT_STOPPED)
        return report
    plot_losses(runs, out / "loss_curves.png")
    plot_eval_losses(runs, out / "eval_loss.png")
    write_report_md(out, report)
    console.print(comparison_table(runs, preset, len(run_seeds)))
    if report["comparison"]:
        console.print(f"[bold]verdict:[/] {report['comparison']['summary']}", soft_wrap=True)
    for name, r in runs.items():
        if r["train_epochs"] > 1.0:
            console.print(f"[yellow]note: '{name}' was repeated {r['train_epochs']:.1f} times to fill the budget; "
                          "repeated data weakens the comparison (give more documents or fewer --tokens)")
    console.print(f"report: {out / 'report.json'}")
    return report


def _inputs_used(out: Path, datasets: dict, references: dict, cloze_sets: dict, tokenizer: str | None) -> list[dict]:
    """Every input with its fingerprint, once its token files are made. An input whose token files an earlier
    invocation packed keeps the record made then; one packed again (its token files removed, its content changed
    before any run trained) is described anew: the report named the old content, and `lineage` called it stale."""
    wanted = {f"data:{n}": p for n, p in datasets.items()} | {f"eval:{n}": p for n, p in references.items()} | {
        f"cloze:{n}": p for n, p in cloze_sets.items()} | ({"tokenizer": tokenizer} if tokenizer else {})
    previous = {}
    if (out / provenance.PROVENANCE_FILE).exists():
        recorded = json.loads((out / provenance.PROVENANCE_FILE).read_text())
        previous = {(e["role"], e["path"]): e for e in recorded.get("inputs", [])}
    entries = []
    for role, path in wanted.items():
        key = (role, path if provenance.is_remote(path) else str(Path(path).absolute()))
        tokenized_before = (role.startswith(("data:", "eval:")) and key in previous
                            and previous[key].get("fingerprint") == _packed_fingerprint(out, role))
        entries.append(previous[key] if tokenized_before else provenance.describe_input(role, path))
    return entries


def _packed_fingerprint(out: Path, role: str) -> str | None:
    """The fingerprint of the input the token files of a `data:NAME` or `eval:NAME` input were packed from, as
    recorded with them (`packing_source`); None where none is recorded."""
    kind, name = role.split(":", 1)
    try:
        if kind == "data":
            recorded = packed_settings(out / "tokens" / name)
        else:
            recorded = json.loads((out / "tokens" / "eval" / f"{name}.source.json").read_text())
        return json.loads(recorded["source"])["input"]
    except (OSError, TypeError, KeyError, ValueError):
        return None


def combine_seeds(records: list[dict]) -> dict:
    """One run's report entry: the first seed's record (its curves are the ones the notebooks plot), `eval` as the
    mean over seeds with `eval_std` (None with one seed), benchmark scores as means, every seed under `seeds`."""
    first = records[0]
    combined = {**first, "finished": all(r["finished"] for r in records),
                "seeds": [{"seed": r["config"]["seed"], **{k: v for k, v in r.items() if k != "config"}}
                          for r in records]}
    values = {n: [r["eval"][n] for r in records if n in r["eval"]] for n in first["eval"]}
    combined["eval"] = {n: _mean(v) for n, v in values.items()}
    combined["eval_std"] = {n: _std(v) for n, v in values.items()}
    if all("humaneval" in r for r in records):
        combined["humaneval"] = {"pass@1": _mean([r["humaneval"]["pass@1"] for r in records]),
                                 "problems": first["humaneval"]["problems"]}
    if all("cloze" in r for r in records):
        combined["cloze"] = {c: {"acc": _mean([r["cloze"][c]["acc"] for r in records]),
                                 "acc_norm": _mean([r["cloze"][c]["acc_norm"] for r in records]),
                                 "questions": first["cloze"][c]["questions"]} for c in first["cloze"]}
    return combined


def compare_runs(runs: dict, eval_set: str) -> dict | None:
    """The verdict: the two runs with the lowest mean loss on `eval_set`, their difference against the seed spread,
    and whether it is significant (`SIGNIFICANCE_RULE`). None with a single run."""
    if len(runs) < 2:
        return None
    every_loss = {name: [s["eval"][eval_set] for s in r["seeds"]] for name, r in runs.items()}
    # a run whose loss is not finite diverged (a learning rate too high for it): it is named, not ranked (NaN sorted
    # anywhere, and its verdict read "lower by nan nats/token")
    diverged = [name for name, v in every_loss.items() if not all(math.isfinite(x) for x in v)]
    losses = {name: v for name, v in every_loss.items() if name not in diverged}
    said_diverged = (f"{', '.join(diverged)} diverged (a loss not finite: lower the learning rate, --override lr=...)"
                     if diverged else "")
    if len(losses) < 2:
        return {"eval_set": eval_set, "runs": list(losses), "diverged": diverged, "significant": False,
                "better": None, "rule": SIGNIFICANCE_RULE,
                "summary": f"On {eval_set}, {said_diverged}: no comparison."}
    means = {name: _mean(v) for name, v in losses.items()}
    best, second = sorted(means, key=means.get)[:2]
    a, b = losses[best], losses[second]
    k = min(len(a), len(b))
    difference = means[second] - means[best]
    std = math.sqrt((_std(a) ** 2 + _std(b) ** 2) / 2) if k >= 2 else None
    p_value = None
    pair = f"{means[best]:.3f} vs {means[second]:.3f}, mean of {k} seed{'s' * (k > 1)}"
    lower = f"{best}'s loss is lower than {second}'s by {difference:.3f} nats/token"
    if k >= 2:  # "more than 2 pooled stds" with 2 seeds is a t-test at a critical value of 2 for ~4.3: 18% false alarms
        from scipy.stats import ttest_ind

        p = float(ttest_ind(a, b, equal_var=False).pvalue)
        p_value = p if math.isfinite(p) else None
        test = f"Welch's t-test, p < {WELCH_ALPHA:g}"
        if p_value is None:  # no spread within either run: any gap is beyond seed noise
            significant = difference > 0
            verdict = f"no seed variance, so {'significant' if significant else 'no difference'}"
        else:
            significant = p_value < WELCH_ALPHA
            verdict = (f"{'significant' if significant else 'not significant'} (Welch's t-test p = {p_value:.3g}"
                       f"{' <' if significant else ' >='} {WELCH_ALPHA:g})")
        summary = f"On {eval_set}, {lower} ({pair}; pooled seed std {std:.3f}): {verdict}."
    else:
        significant = False
        test = "none: one seed per run gives no estimate of seed noise"
        summary = (f"On {eval_set}, {lower} ({pair}), but with one seed per run there is no estimate of seed noise "
                   "and so no verdict; run with --seeds 2 or more.")
    if diverged:
        summary += f" ({said_diverged}.)"
    return {
        "eval_set": eval_set,
        "runs": [best, second],
        "diverged": diverged,
        "mean_loss": {best: means[best], second: means[second]},
        "seed_losses": {best: a, second: b},
        "difference": difference,
        "seed_std": std,
        "p_value": p_value,
        "test": test,
        "significant": bool(significant),
        "better": best if significant else None,
        "rule": SIGNIFICANCE_RULE,
        "summary": summary,
        "all_mean_loss": means,
    }


def write_report_md(out: Path, report: dict) -> Path:
    """OUT/report.md: the verdict in one sentence, mean ± seed std per run and evaluation set, per-seed losses."""
    runs, comparison, seeds = report["runs"], report["comparison"], report["seeds"]
    first = next(iter(runs.values()))
    eval_names = list(first["eval"])

    def cell(r: dict, n: str) -> str:
        std = r["eval_std"].get(n)
        return f"{r['eval'][n]:.3f}" + (f" ± {std:.3f}" if std is not None else "")

    lines = [
        f"# Ablation: {' vs '.join(runs)}",
        "",
        f"Preset `{report['preset']}` ({first['params'] / 1e6:.1f}M parameters), {first['tokens_seen']:,} training "
        f"tokens per run, {len(seeds)} seed(s) per run ({', '.join(map(str, seeds))}; a seed sets the initial weights and the "
        "data order, and run k of every dataset uses the same one).",
        "",
        "**Verdict:** " + (comparison["summary"] if comparison else "a single run; nothing to compare."),
        "",
        f"Significance: {SIGNIFICANCE_RULE}.",
        "",
        "## Final evaluation loss (nats/token, lower is better; mean ± standard deviation over seeds)",
        "",
        "| run | " + " | ".join(eval_names) + " |",
        "|---|" + "---|" * len(eval_names),
        *[f"| {name} | " + " | ".join(cell(r, n) for n in eval_names) + " |" for name, r in runs.items()],
        "",
        "Passes over each run's own training data (above 1: its documents were repeated to fill the budget, which "
        "favours it less than new documents would): " + ", ".join(f"{name} {r['train_epochs']:.2f}"
                                                                   for name, r in runs.items()) + ".",
        "",
    ]
    shared = report.get("eval_in_training") or {}
    if any(shared.values()):
        def known(n: dict) -> str:
            return "not checked (older token files)" if n["documents"] is None else f"{n['documents']:,} of {n['of']:,}"

        lines += ["Documents of each evaluation set also in a run's training tokens (exact text; any favours that "
                  "run, its loss there partly recall): " + "; ".join(
                      f"{name} {', '.join(f'{ref} {known(n)}' for ref, n in refs.items())}"
                      for name, refs in shared.items()) + ".", ""]
    lines += _benchmark_table(runs)
    if comparison:
        lines += [
            f"## Per seed on {comparison['eval_set']}",
            "",
            "| seed | " + " | ".join(runs) + " |",
            "|---|" + "---|" * len(runs),
            *[f"| {s} | " + " | ".join(f"{r['seeds'][i]['eval'][comparison['eval_set']]:.4f}" for r in runs.values())
              + " |" for i, s in enumerate(seeds)],
            "",
        ]
    lines += [
        "![loss curves](loss_curves.png)",
        "",
        "![final evaluation losses](eval_loss.png)",
        "",
        "`report.json` holds every number (each seed under `runs[NAME][\"seeds\"]`); `provenance.json` the inputs,",
        "their fingerprints and the settings (`edu-filter lineage` shows the chain back to the annotations).",
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def _benchmark_table(runs: dict) -> list[str]:
    """report.md's HumanEval pass@1 and cloze accuracies per run, mean ± std over seeds (a code ablation's main
    result was in the terminal and report.json only)."""
    cloze_names = sorted({c for r in runs.values() for c in r.get("cloze", {})})
    with_humaneval = any("humaneval" in r for r in runs.values())
    if not cloze_names and not with_humaneval:
        return []

    def cell(r: dict, values) -> str:
        xs = list(values(r))
        std = _std(xs)
        return f"{_mean(xs):.3f}" + (f" ± {std:.3f}" if std is not None else "") if xs else "-"

    columns = ([("HumanEval pass@1", lambda r: [s["humaneval"]["pass@1"] for s in r["seeds"] if "humaneval" in s])]
               if with_humaneval else [])
    for c in cloze_names:
        columns += [(f"{c} {m}", lambda r, c=c, m=m: [s["cloze"][c][m] for s in r["seeds"] if c in s.get("cloze", {})])
                    for m in ("acc", "acc_norm")]
    first = next(iter(runs.values()))
    sizes = ([f"{first['humaneval']['problems']} HumanEval problems"] if "humaneval" in first else []) + [
        f"{first['cloze'][c]['questions']} {c} questions" for c in cloze_names if c in first.get("cloze", {})]
    return ["## Benchmarks (higher is better; mean ± standard deviation over seeds)", "",
            "| run | " + " | ".join(name for name, _ in columns) + " |", "|---|" + "---|" * len(columns),
            *[f"| {name} | " + " | ".join(cell(r, values) for _, values in columns) + " |" for name, r in runs.items()],
            "", f"Greedy pass@1 and log-likelihood accuracies over {', '.join(sizes)}.", ""]


TOKENIZER_SETTINGS = "edu_filter_trained_with.json"  # beside the BPE the ablation trained: what it was trained with


def _prepare_tokenizer(out: Path, datasets: dict, given: str | None, vocab_size: int, fields: dict[str, str],
                       sample_chars: int):
    """OUT/tokenizer: `given`, or a BPE trained on the datasets. A resumed ablation keeps its own; one whose runs
    were trained with another tokenizer than asked is refused before OUT/tokenizer is touched (a mistyped option
    overwrote it, and the ablation's own command was refused from then on)."""
    folder = out / "tokenizer"
    have = (folder / "tokenizer.json").exists()
    trained = (out / "runs").exists()
    redo = f"start a new output folder, or remove {out / 'tokens'} and {out / 'runs'}"
    if given:
        tok = load_tokenizer(given)
        if have and trained and tokenizer_key(load_tokenizer(folder)) != tokenizer_key(tok):
            raise InputError(f"--tokenizer {given} is not the tokenizer the runs in {out} were trained with "
                             f"({folder}): {redo}")
        tok.save_pretrained(folder)
        (folder / TOKENIZER_SETTINGS).unlink(missing_ok=True)
        return tok
    asked = {"vocab_size": vocab_size, "sample_chars": sample_chars}
    if have:  # a resumed ablation keeps its vocabulary
        settings = folder / TOKENIZER_SETTINGS
        recorded = json.loads(settings.read_text()) if settings.exists() else None  # given, or an older release's
        if recorded in (None, asked):
            return load_tokenizer(folder)
        if trained:
            what = "--vocab-size" if recorded.get("vocab_size") != vocab_size else "tokenizer_sample_chars"
            raise InputError(f"{folder} was trained with a vocabulary of {recorded['vocab_size']:,} from "
                             f"{recorded['sample_chars']:,} characters and the runs in {out} with it; this invocation "
                             f"asks {vocab_size:,} from {sample_chars:,} ({what}): {redo}")
    # no run trained with another: trained as asked (the token files of another are packed again)
    sample = mixed_sample([iter_texts(path, fields[name], spread=True) for name, path in datasets.items()],
                          sample_chars)
    tok = train_tokenizer(sample, vocab_size, folder)
    (folder / TOKENIZER_SETTINGS).write_text(json.dumps(asked))
    return tok


def _prepare_tokens(out: Path, tok, datasets: dict, references: dict, cfg: PretrainConfig, fields: dict[str, str],
                    val_fraction: float, rank: int = 0, world: int = 1,
                    stop: Callable[[], bool] | None = None, deadline: float | None = None) -> None:
    """Pack each dataset (train + held-out val) and each reference set not packed yet, reading only what the budget
    needs. Under torchrun the sets are shared out, `rank` packing every `world`-th one, so two datasets take the time
    of one; each set is packed by one process, the same as by a single one."""
    window = cfg.context + 1
    sets = [("--data", name, path) for name, path in datasets.items()] + [
        ("--eval", name, path) for name, path in references.items()]
    trained = (out / "runs").exists()
    for option, name, path in sets[rank::world]:
        text_field = fields[name]
        source = packing_source(path, text_field)
        if option == "--eval":
            file = out / "tokens" / "eval" / f"{name}.bin"
            sidecar = file.with_suffix(".source.json")
            recorded = _recorded_source(json.loads(sidecar.read_text()) if sidecar.exists() else None, path,
                                        text_field, source, tok)
            made_of = {"source": source, "tokenizer": tokenizer_key(tok), "max_tokens": cfg.eval_tokens + window}
            order = _file_order(recorded, made_of)
            made_of.update({"file_order": order} if order else {})
            if file.with_suffix(".json").exists() and recorded not in (None, made_of):
                _refuse_or_repack(out, f"--eval {name}", recorded, made_of, trained)
            # packed by an older edu-filter, which kept no text hashes: the same recipe gives the same tokens again
            if not file.with_suffix(".json").exists() or recorded not in (None, made_of) or \
                    (recorded == made_of and not hashes_path(file).exists()):
                info = write_tokens(iter_texts(path, text_field, spread=order is not None), tok, file,
                                    cfg.eval_tokens + window)
                sidecar.write_text(json.dumps(made_of))
                if info.tokens < window:
                    raise InputError(f"--eval {name}={path}: {info.tokens} tokens, fewer than one sequence of "
                                     f"{window}")
            holds_saved_work(file)  # a bad row met later, hours into packing another set, must not remove it
            continue
        folder = out / "tokens" / name
        packed = read_packed(folder)
        recorded = _recorded_source(packed_settings(folder), path, text_field, source, tok)
        in_name_order = packing_settings(tok, cfg.tokens + window, val_fraction, cfg.eval_tokens + window, source)
        order = _file_order(recorded if packed else _recorded_source(_checkpoint_settings(folder), path, text_field,
                                                                     source, tok), in_name_order)
        wanted = {**in_name_order, **({"file_order": order} if order else {})}  # packing_settings(..., order)
        if packed and recorded not in (None, wanted):  # None: packed by an older edu-filter, which recorded none
            _refuse_or_repack(out, f"--data {name}", recorded, wanted, trained)
            packed = None
        if packed:
            train, val = packed
        elif (folder / "train.json").exists() and trained:
            raise InputError(f"{folder} was packed by an older edu-filter, whose held-out slices could overlap another "
                             f"dataset's training data, and {out / 'runs'} was trained on it: start a new output "
                             f"folder, or remove {out / 'tokens'} and {out / 'runs'}")
        else:
            _adopt_older_checkpoint(folder, path, text_field, source, tok)
            # every rank says how its packing goes in a log (torchrun, Slurm); on a terminal rank 0 draws bars
            # alone (bars of several processes would overwrite each other)
            from rich import get_console

            train, val = _pack_with_progress(name, path, tok, folder, cfg.tokens + window, val_fraction,
                                             cfg.eval_tokens + window, text_field, source, order,
                                             show=rank == 0 or not get_console().is_terminal, stop=stop,
                                             deadline=deadline)
        for part, info in (("training", train), ("validation", val)):
            if info.tokens < window:
                raise InputError(f"--data {name}={path}: {info.tokens} {part} tokens, fewer than one sequence of "
                                 f"{window}; give more documents")
        if train.tokens < cfg.tokens + window:  # said now, not when the training of every run has ended
            from rich.console import Console

            Console(stderr=True).print(
                f"[yellow]warning: --data {name} holds {train.tokens:,} training tokens, fewer than the {cfg.tokens:,} "
                f"each run trains on: its run repeats them about {cfg.tokens / train.tokens:.2f} times, which "
                "weakens the comparison (give more documents or fewer --tokens)[/]", soft_wrap=True)
        holds_saved_work(folder)


def _refuse_or_repack(out: Path, what: str, recorded: dict, wanted: dict, trained: bool) -> None:
    """Token files made of other texts, another tokenizer or another budget than this invocation asks: packed again
    when no run has trained on them yet, else refused (the report would name data the models never saw)."""
    # each budget is tokens + one context window: a context length changed (seq_len, --preset) changes them too
    names = {"source": "the input's content or text field", "tokenizer": "the tokenizer",
             "train_tokens": "--tokens (or the context length: seq_len, --preset)",
             "max_tokens": "the evaluation budget (or the context length)",
             "max_val_tokens": "the evaluation budget (or the context length)", "val_fraction": "--val-fraction",
             "val_split": "the held-out split"}
    changed = sorted({names.get(k, k) for k in set(recorded) | set(wanted) if recorded.get(k) != wanted.get(k)})
    if trained:
        raise InputError(f"{what}: the token files in {out} differ from what this invocation asks in "
                         f"{', '.join(changed)}, and its runs were trained on them: start a new output folder, or "
                         f"remove {out / 'tokens'} and {out / 'runs'}")




def packing_source(path: str, text_field: str, documents: bool = True) -> str:
    """What names the texts a packing reads, so a checkpoint is resumed only by the same texts: the input's
    fingerprint (a remote input's address; of a folder, the data files the readers take, not a notes.txt beside
    them) and the field the texts come from."""
    found = provenance.fingerprint(path, documents=documents)  # None for a remote input
    return json.dumps({"input": found["fingerprint"] if found else str(path), "text_field": text_field})


def _file_order(recorded: dict | None, in_name_order: dict) -> str | None:
    """The order to read an input's files in: FILE_ORDER, or by name (None) where token files or a packing checkpoint
    an edu-filter from before recorded are what this invocation asks (`in_name_order`: its settings without an
    order): a resumed ablation finishes, and keeps, what it started the way it started. Files made otherwise are
    packed again in FILE_ORDER."""
    return None if recorded == in_name_order else FILE_ORDER


def _checkpoint_settings(folder: Path) -> dict | None:
    try:
        return json.loads((folder / PACKING).read_text()).get("settings")
    except (OSError, ValueError, AttributeError):
        return None


def _adopt_older_checkpoint(folder: Path, path: str, text_field: str, source: str, tok) -> None:
    """An unfinished packing checkpointed when a folder's fingerprint was of all its files, or by a release keying
    its tokenizer another way, goes on from there (see `_recorded_source`) instead of starting again."""
    try:
        checkpoint = json.loads((folder / PACKING).read_text())
    except (OSError, ValueError):
        return
    settings = _recorded_source(checkpoint.get("settings"), path, text_field, source, tok)
    if settings is not checkpoint.get("settings"):
        (folder / PACKING).write_text(json.dumps({**checkpoint, "settings": settings}))


def _recorded_source(recorded: dict | None, path: str, text_field: str, source: str, tok) -> dict | None:
    """The settings recorded with token files, the source and tokenizer as this edu-filter names them: a folder's
    fingerprint was once of all its files, which still names the same texts while it matches; a few releases keyed
    the same tokenizer and packing another way (`tokenizer_key`), and an ablation they began was refused as if its
    tokenizer had changed, its trained runs to be thrown away."""
    if recorded and recorded.get("source") not in (None, source) and Path(path).is_dir() and \
            recorded["source"] == packing_source(path, text_field, documents=False):
        recorded = {**recorded, "source": source}
    if recorded and recorded.get("tokenizer") == tokenizer_key(tok, releases_of_split_text=True):
        recorded = {**recorded, "tokenizer": tokenizer_key(tok)}
    return recorded


def _pack_with_progress(name: str, path: str, tok, folder: Path, train_tokens: int, val_fraction: float,
                        val_tokens: int, text_field: str, source: str, file_order: str | None, show: bool,
                        stop: Callable[[], bool] | None = None, deadline: float | None = None):
    """`write_train_val` with a progress bar of the training tokens (10B take hours); a packing killed part-way
    resumes from its last checkpoint while `source` (`packing_source`: the input's fingerprint and text field) is
    unchanged."""
    from rich.progress import BarColumn, TextColumn, TimeElapsedColumn

    started, first = time.monotonic(), None
    with logged_progress(TextColumn("[bold]{task.description}"), BarColumn(),
                         TextColumn("{task.completed:,.0f}/{task.total:,.0f} training tokens {task.fields[rate]}"),
                         TimeElapsedColumn(), disable=not show, transient=True) as progress:
        task = progress.add_task(f"packing {name}", total=train_tokens, rate="")

        def update(train: int, val: int) -> None:
            nonlocal first
            first = train if first is None else first  # the first call: where a resumed packing starts
            seconds = time.monotonic() - started
            rate = f"({(train - first) / seconds:,.0f}/s)" if seconds > 1 else ""
            progress.update(task, completed=min(train, train_tokens), rate=rate)  # the last document runs over

        def skipping(done: int, of: int) -> None:
            nonlocal started
            started = time.monotonic()  # the rate counts the packing, not the skip
            progress.update(task, description=f"packing {name}" if done == of else
                            f"packing {name}: reading past the {of:,} documents packed before ({done:,})")

        return write_train_val(iter_texts(path, text_field, spread=file_order is not None), tok, folder,
                               train_tokens, val_fraction, val_tokens, source=source, progress=update,
                               file_order=file_order, skipping=skipping, stop=stop, deadline=deadline)


def eval_texts_in_training(out: Path, datasets: dict, references: dict) -> dict:
    """{dataset: {--eval set: {"documents": of the set's documents, how many are in the dataset's training tokens
    (exact text), or None where the token files are an older edu-filter's, which kept no text hashes, "of": how many
    the set's tokens hold}}}. A set drawn from the corpus an arm trains on favours that arm: its loss there is partly
    recall. The held-out slices need no check: a document held out in one dataset is held out in all."""
    files = {ref: out / "tokens" / "eval" / f"{ref}.bin" for ref in references}
    of = {ref: TokenFileInfo(**json.loads(f.with_suffix(".json").read_text())).documents for ref, f in files.items()}
    counts = {}
    for name in datasets:
        found = documents_shared(out / "tokens" / name / "train.bin", files)
        counts[name] = {ref: {"documents": found[ref], "of": of[ref]} for ref in references}
    return counts


def shared_texts_warnings(shared: dict) -> list[str]:
    lines = [f"{n['documents']:,} of the {n['of']:,} documents of --eval {ref} are in --data {name}'s training "
             f"tokens ({n['documents'] / n['of']:.1%}): its loss on {ref} is partly recall, which favours that run; "
             "draw evaluation sets from documents no --data input holds" for name, refs in shared.items()
             for ref, n in refs.items() if n["documents"]]
    unknown = [name for name, refs in shared.items() if any(n["documents"] is None for n in refs.values())]
    if unknown:
        lines.append(f"whether the --eval sets share documents with the training tokens of --data "
                     f"{', '.join(unknown)} is not known: they were packed by an older edu-filter, which kept no text "
                     "hashes (a new output folder packs them again)")
    return lines


def _packed_infos(out: Path, datasets: dict) -> dict:
    """What the report says of each packed dataset, whichever process packed it."""
    infos = {}
    for name in datasets:
        train, val = read_packed(out / "tokens" / name)
        infos[name] = {"train_tokens": train.tokens, "train_documents": train.documents, "val_tokens": val.tokens,
                       "val_documents": val.documents, "read_to_end": train.complete}
    return infos


def _load_final_model(path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    from edu_filter.classifiers.device import default_device

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=False)
    return model.to(default_device())


def comparison_table(runs: dict, preset: str, seeds: int = 1):
    """Runs as rows: passes over the training data (repeats weaken the comparison), training loss over the first and
    last steps (first seed), final evaluation losses (mean ± seed std; best in green), speed."""
    from rich.table import Table

    first = next(iter(runs.values()))
    eval_names = list(first["eval"])
    cloze_names = sorted({c for r in runs.values() for c in r.get("cloze", {})})
    with_humaneval = any("humaneval" in r for r in runs.values())
    per_seed = f", mean ± std over {seeds} seeds" if seeds > 1 else ""
    table = Table(title=f"{preset} ({first['params'] / 1e6:.1f}M params), {first['tokens_seen']:,} tokens per run; "
                        f"eval = loss on held-out text, lower is better{per_seed}")
    table.add_column("run")
    for col in ["epochs", "train loss" + (" (1st seed)" if seeds > 1 else ""), *eval_names, "tok/s", "MFU", *[f"{c} acc/norm" for c in cloze_names],
                *(["HumanEval"] if with_humaneval else [])]:
        table.add_column(col, justify="right")
    best = {n: min(r["eval"].get(n, float("inf")) for r in runs.values()) for n in eval_names}
    for name, r in runs.items():
        losses = r["train_loss"]
        cells = [name, f"{r['train_epochs']:.2f}", f"{_mean(losses[:5]):.2f}→{_mean(losses[-5:]):.2f}" if losses else "-"]
        for n in eval_names:
            v, std = r["eval"].get(n), r.get("eval_std", {}).get(n)
            text = "-" if v is None else f"{v:.3f}" + (f"±{std:.3f}" if std is not None else "")
            cells.append(f"[bold green]{text}" if v is not None and v == best[n] else text)
        cells += [f"{r['tokens_per_second']:,.0f}", f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"]
        cells += [f"{r['cloze'][c]['acc']:.2f}/{r['cloze'][c]['acc_norm']:.2f}" if c in r.get("cloze", {}) else "-"
                  for c in cloze_names]
        if with_humaneval:
            cells.append(f"{r['humaneval']['pass@1']:.3f}" if "humaneval" in r else "-")
        table.add_row(*cells)
    return unclipped(table)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _std(xs: list[float]) -> float | None:
    """Sample standard deviation (n - 1); None for fewer than two values."""
    if len(xs) < 2:
        return None
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def plot_losses(runs: dict, path: Path) -> Path:
    """Training loss (left) and evaluation losses (right) against training tokens, one colour per run; further
    seeds of a run as fainter lines of its colour."""
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend (e.g. a notebook's) alone

    fig = Figure(figsize=(12, 4.5))
    left, right = fig.subplots(1, 2)
    styles = ["-", "--", ":", "-."]
    for i, (name, run) in enumerate(runs.items()):
        color = f"C{i}"
        for seed_index, r in enumerate(run.get("seeds") or [run]):
            first = seed_index == 0
            alpha = 1.0 if first else 0.35
            per_step = r["tokens_seen"] / max(1, len(r["train_loss"]))
            left.plot([(s + 1) * per_step for s in range(len(r["train_loss"]))], r["train_loss"], color=color,
                      alpha=alpha, label=name if first else None)
            eval_names = [k for k in r["eval_history"][0] if k not in ("step", "tokens")] if r["eval_history"] else []
            for j, n in enumerate(eval_names):
                right.plot([e["tokens"] for e in r["eval_history"]], [e[n] for e in r["eval_history"]], color=color,
                           alpha=alpha, linestyle=styles[j % len(styles)], marker="o",
                           label=f"{name} on {n}" if first else None)
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
    """Final evaluation loss on each set, the runs' bars side by side (lower is better), mean over seeds with the
    seed standard deviation as error bars."""
    import numpy as np
    from matplotlib.figure import Figure

    eval_names = list(next(iter(runs.values()))["eval"])
    width = 0.8 / len(runs)
    x = np.arange(len(eval_names))
    fig = Figure(figsize=(max(6, 2 * len(eval_names)), 4.5))
    ax = fig.subplots()
    for i, (name, r) in enumerate(runs.items()):
        values = [r["eval"][n] for n in eval_names]
        stds = [r.get("eval_std", {}).get(n) for n in eval_names]
        errors = None if all(s is None for s in stds) else [s or 0.0 for s in stds]
        bars = ax.bar(x + (i - (len(runs) - 1) / 2) * width, values, width, yerr=errors, capsize=4, label=name,
                      color=f"C{i}")
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
