"""`edu-filter demo`: the whole loop on the bundled data, ending in one Markdown report with plots.

Stages, each the library function its CLI command calls: annotation (shown with the bundled LLM annotations: the
parser re-reads real Llama-3.3 answers), train + evaluate a web and a code classifier, `apply` with the FineWeb-Edu and
Python-Edu presets (dedup + threshold), threshold sweeps, and a tiny pretraining ablation (filtered vs unfiltered web
data at equal tokens). Sized for a 2-core CPU: the web model trains on the train split and filters the validation
split, whose documents it did not train on (its saved cut points were placed with their labels too).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.rule import Rule

from edu_filter.documents import bundled_data, check_writable_output

DATA = bundled_data()  # the package's own copy, also when installed from a wheel
WEB_TRAIN = DATA / "web/fineweb_edu_llama3_train.jsonl"
WEB_VAL = DATA / "web/fineweb_edu_llama3_val.jsonl"
WEB_LLAMA33 = DATA / "web/fineweb_edu_llama33_responses.jsonl"
CODE_LABELLED = DATA / "code/python_edu_labels.jsonl"
CODE_UNLABELLED = DATA / "code/thealgorithms_unlabelled.jsonl"

APPLY_DTYPE = "int8"
ABLATION_TOKENS = 100_000  # per run and seed; two seeds say whether the gap is more than seed noise
ABLATION_SEEDS = 2
console = Console()


STAGE_FOLDERS = ("annotation", "models", "eval", "apply", "sweep", "ablation")
DEMO_MARKER = ".edu-filter-demo"


def clear_earlier_demo(out: Path) -> None:
    """A second demo into the same folder starts over: its retrained models are not byte-identical (their metrics
    differ in the last digits), so `apply` and `ablate` would refuse to resume what the first one made. Only a
    folder the demo made loses its stage folders; another folder holding any of them is refused."""
    import shutil

    from edu_filter.documents import InputError

    earlier = [name for name in STAGE_FOLDERS if (out / name).exists()]
    if not earlier:
        return
    if not (out / DEMO_MARKER).exists():
        raise InputError(f"-o/--output {out} holds {', '.join(f'{name}/' for name in earlier)} and no {DEMO_MARKER} "
                         "(another project's, or a demo of an older edu-filter): remove them, or give another folder")
    console.print(f"[yellow]{out} holds an earlier demo: starting over[/]")
    for name in earlier:
        shutil.rmtree(out / name)
    for name in ("results.json", "report.md"):
        (out / name).unlink(missing_ok=True)


def _stage(title: str) -> float:
    console.print(Rule(f"[bold]{title}"))
    return time.perf_counter()


def annotation_stage(out: Path) -> dict:
    """What `score` produces, shown on real LLM answers: parse every bundled response and compare with its label."""
    from edu_filter.annotate.parse import parse_score
    from edu_filter.annotate.prompts import load_prompt
    from edu_filter.documents import read_documents, write_documents

    web = read_documents([WEB_LLAMA33], label_field="score")
    rows = web + read_documents([CODE_LABELLED], label_field="score")
    parsed = [parse_score(r["response"]) for r in rows]
    agree = sum(score == r["label"] for (score, _), r in zip(parsed, rows))
    failed = sum(score is None for score, _ in parsed)
    write_documents(
        [{"id": r["id"], "score": s, "error": e, "label": r["label"]} for r, (s, e) in zip(rows, parsed)],
        out / "parsed_responses.jsonl",
    )
    result = {"responses": len(rows), "parsed_equal_to_label": agree, "unparseable": failed, "web_responses": len(web),
              "prompt_versions": {kind: load_prompt(kind).version for kind in ("web", "code")}}
    console.print(f"parsed {len(rows)} real LLM answers: {agree} match their recorded score, {failed} unparseable")
    return result


def _cell(value: float | None, spec: str = ".3f") -> str:
    """A table cell: n/a where a figure is undefined or absent."""
    return "n/a" if value is None else format(value, spec)


def run_demo(output: str | Path = "demo_out") -> Path:
    """Run every stage and write OUTPUT/report.md; returns its path. From a script of your own, call it under
    `if __name__ == "__main__":`: apply's worker processes import the script again, and each would start the demo
    over, clearing the run under way."""
    from edu_filter.classifiers.evaluate import evaluate_model
    from edu_filter.filters.apply import run_apply
    from edu_filter.filters.sweep import run_sweep
    from edu_filter.ablate.ablation import ablate
    from edu_filter.train.classifier import train_classifier

    check_writable_output(output, "-o/--output", folder=True)
    out = Path(output)
    clear_earlier_demo(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).touch()
    timings: dict[str, float] = {}
    results: dict = {}

    t = _stage("1/6 score: the annotation stage on real LLM answers")
    results["annotation"] = annotation_stage(out / "annotation")
    timings["annotation"] = time.perf_counter() - t

    t = _stage("2/6 train + evaluate: web classifier (frozen encoder + regression head)")
    web_model = out / "models/web"
    train_classifier([str(WEB_TRAIN)], web_model, kind="web", val=[str(WEB_VAL)], overwrite=True)
    results["web_val"] = json.loads((web_model / "metrics.json").read_text())
    results["web_llama33"] = evaluate_model(str(web_model), [str(WEB_LLAMA33)], report=out / "eval/web_llama33.json")
    timings["train_web"] = time.perf_counter() - t

    t = _stage("3/6 train + evaluate: code classifier")
    code_model = out / "models/code"
    train_classifier([str(CODE_LABELLED)], code_model, kind="code", overwrite=True)
    results["code_val"] = json.loads((code_model / "metrics.json").read_text())
    timings["train_code"] = time.perf_counter() - t

    t = _stage("4/6 apply: FineWeb-Edu preset on the web validation split, Python-Edu preset on unlabelled Python "
               "files")
    # int8: the CPU fast path a CPU fleet would use (scores within ~0.04 of the exact ones train/evaluate report)
    results["apply_web"] = run_apply([str(WEB_VAL)], str(out / "apply/web"), model=str(web_model),
                                     preset="fineweb-edu", tasks=2, workers=2, dtype=APPLY_DTYPE)
    results["apply_code"] = run_apply([str(CODE_UNLABELLED)], str(out / "apply/code"), model=str(code_model),
                                      preset="python-edu", tasks=2, workers=2, dtype=APPLY_DTYPE)
    timings["apply"] = time.perf_counter() - t

    t = _stage("5/6 sweep: retention and agreement per threshold")
    results["sweep_web"] = run_sweep([str(out / "apply/web")], out / "sweep/web", positive_threshold=3)
    results["sweep_code"] = run_sweep([str(out / "apply/code")], out / "sweep/code", positive_threshold=4)
    timings["sweep"] = time.perf_counter() - t

    t = _stage("6/6 ablate: tiny llama trained on FineWeb-Edu-filtered vs unfiltered web data, equal tokens")
    kept = out / "apply/web/kept"
    results["ablation"] = ablate(
        [f"edu={kept}", f"all={WEB_VAL}"], out / "ablation", eval_sets=[f"fineweb-edu={WEB_LLAMA33}"],
        preset="tiny", tokens=ABLATION_TOKENS, seeds=ABLATION_SEEDS,
    )
    timings["ablate"] = time.perf_counter() - t

    results["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    report = write_report(out, results)
    console.print(Rule("[bold green]done"))
    console.print(f"report: {report}  (total {sum(timings.values()) / 60:.1f} min)")
    return report


def _metrics_row(name: str, m: dict) -> str:
    cells = ("n/a" if m[key] is None else f"{m[key]:.3f}"  # undefined: constant scores, or no positives
             for key in ("spearman", "binary_f1_at_3", "binary_f1_at_4", "accuracy", "mse"))
    return f"| {name} | {m['n']} | " + " | ".join(cells) + " |"


def _stats_line(name: str, stats: dict) -> str:
    removed = ", ".join(f"{reason}: {n['documents']}" for reason, n in stats["removed"].items()) or "none"
    failed = sum(n["documents"] for n in stats["failed"].values())
    return f"| {name} | {stats['in']['documents']} | {stats['kept']['documents']} | {removed} | {failed} |"


def _image(out: Path, path: Path, caption: str) -> str:
    return f"![{caption}]({path.relative_to(out).as_posix()})" if path.exists() else f"*({caption}: not produced)*"


def write_report(out: Path, r: dict) -> Path:
    """OUT/report.md: the numbers of every stage and the PNG plots, linked relatively so the folder can be shared."""
    runs, prompts, annotation = r["ablation"]["runs"], r["annotation"]["prompt_versions"], r["annotation"]
    eval_names = sorted({name for run in runs.values() for name in run.get("eval", {})})
    lines = [
        "# edu-filter demo report",
        "",
        "Everything below ran on the bundled data (see `data/README.md`) on this machine. The web classifier was trained",
        "on the 1000-row Llama-3 train split and its web numbers come from the unseen 1000-row validation split; the",
        "sweep's F1 on that split uses the saved model's cut points, which `train` places with the validation labels too.",
        "",
        "## 1. score (annotation)",
        "",
        f"The annotation stage asks an LLM for the additive rubric (prompts `{prompts['web']}` for web pages,",
        f"`{prompts['code']}` for Python files) and parses",
        f"\"Educational score: N\". Replayed on {annotation['responses']} real answers bundled with the data",
        f"({annotation['web_responses']} Llama-3.3-70B web answers, "
        f"{annotation['responses'] - annotation['web_responses']} Python-Edu code answers): "
        f"{annotation['parsed_equal_to_label']} parse to",
        f"the recorded score, {r['annotation']['unparseable']} are unparseable. No LLM is run in the demo; to annotate",
        "your own sample against a real endpoint (vLLM, TGI, llama.cpp or a hosted API):",
        "",
        "```bash",
        "vllm serve meta-llama/Llama-3.3-70B-Instruct --tensor-parallel-size 4 --port 8000 &",
        "edu-filter score corpus.jsonl --sample 50000 --seed 0 -o annotations.jsonl --prompt web \\",
        "    --backend openai --base-url http://127.0.0.1:8000/v1 --model meta-llama/Llama-3.3-70B-Instruct --concurrency 64",
        "edu-filter train annotations.jsonl -o my-classifier --kind web",
        "```",
        "",
        "## 2. train + evaluate",
        "",
        "| model / data | n | Spearman | F1@3 | F1@4 | accuracy | MSE |",
        "|---|---|---|---|---|---|---|",
        _metrics_row("web head, unseen val split (Llama-3 labels)", r["web_val"]),
        _metrics_row("web head, Llama-3.3-scored FineWeb-Edu docs (skewed high)", r["web_llama33"]),
        _metrics_row("code head, held-out split (Python-Edu labels)", r["code_val"]),
        "",
        "F1@t is the F1 of `int_score >= t` against `label >= t`. In the validation rows `int_score` comes from cut points",
        "fitted on the training rows' out-of-fold predictions, so no validation label placed them (the model saves cut",
        "points fitted on both); the Llama-3.3 row uses the saved ones and is fully unseen.",
        "",
        _image(out, out / "models/web/confusion_matrix.png", "web confusion matrix"),
        _image(out, out / "models/code/confusion_matrix.png", "code confusion matrix"),
        "",
        "## 3. apply (dedup + threshold)",
        "",
        "| preset | documents in | kept | removed (reason: documents) | failed |",
        "|---|---|---|---|---|",
        _stats_line("fineweb-edu (threshold 3) on the web val split", r["apply_web"]),
        _stats_line("python-edu (threshold 4) on unlabelled Python files", r["apply_code"]),
        "",
        "Every input document is in exactly one of `apply/*/kept/`, `apply/*/removed/<reason>/` or",
        "`apply/*/failed/<reason>/`; the counts",
        f"in `stats.json` add up. Scoring ran with `--dtype {APPLY_DTYPE}`, the CPU fast path: its scores are within a few",
        "hundredths of the exact fp32 scores that the metrics above come from (see `benchmarks/RESULTS.md`).",
        "",
        "## 4. sweep",
        "",
        "| threshold | web docs kept % | web tokens kept % | web F1 vs LLM>=3 | code docs kept % | code F1 vs LLM>=4 |",
        "|---|---|---|---|---|---|",
    ]
    code_rows = {row["threshold"]: row for row in r["sweep_code"]["rows"]}
    for row in r["sweep_web"]["rows"]:
        c = code_rows.get(row["threshold"], {})
        lines.append(
            f"| {row['threshold']} | {row['documents_pct']:.1f} | {row['tokens_pct']:.1f} | {_cell(row.get('f1'))} | "
            f"{_cell(c.get('documents_pct'), '.1f')} | {_cell(c.get('f1'))} |"
        )
    lines += [
        "",
        "The code sweep runs on unlabelled files, so it has no F1 (n/a, as where no label reaches the threshold; a "
        "threshold that keeps nothing while labels reach it has F1 0); the notebooks sweep labelled data.",
        "",
        _image(out, out / "sweep/web/retention_curve.png", "web retention and precision/recall per threshold"),
        _image(out, out / "sweep/web/score_histogram.png", "web score histogram"),
        _image(out, out / "sweep/code/retention_curve.png", "code retention per threshold"),
        _image(out, out / "sweep/code/score_histogram.png", "code score histogram"),
        "",
        "## 5. ablate",
        "",
        "A tiny llama-style model trained twice on the same number of tokens: once on the FineWeb-Edu-filtered web",
        "documents, once on all of them; evaluated on held-out slices and on FineWeb-Edu documents scored by Llama-3.3.",
        f"Each run is trained with {ABLATION_SEEDS} seeds (init and data order); losses are seed means.",
        "",
        "**Verdict:** " + (r["ablation"]["comparison"] or {}).get("summary", "no comparison"),
        "",
        "| run | tokens seen | params | final train loss | " + " | ".join(f"eval {n}" for n in eval_names) + " |",
        "|---|---|---|---|" + "---|" * len(eval_names),
    ]
    for name, run in runs.items():
        evals = " | ".join(f"{run.get('eval', {}).get(n, float('nan')):.3f}" for n in eval_names)
        final = [seed["train_loss"][-1] for seed in run.get("seeds") or [run]]
        lines.append(f"| {name} | {run['tokens_seen']:,} | {run['params']:,} | {sum(final) / len(final):.3f} | "
                     f"{evals} |")
    lines += [
        "",
        _image(out, out / "ablation/loss_curves.png", "loss curves"),
        _image(out, out / "ablation/eval_loss.png", "final evaluation losses"),
        "",
        "## Timings (seconds)",
        "",
        "| stage | s |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in r["timings_s"].items()],
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
