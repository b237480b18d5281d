"""Labels vs quality: documents chosen by `score --select active` against a uniform `score --sample`, end to end.

An OpenAI-compatible server on 127.0.0.1 answers every prompt with the bundled label of the document in it (the
bundled labels stand in for the LLM; the pool handed to `score` has no labels). `score` annotates N documents of the
pool (uniformly, or actively in rounds), `train` fits a classifier on what `score` wrote (`kind` web or code, the
default settings: frozen encoder, 512 tokens, ridge head, calibration, weights when the rows have them), and the
model is scored on labelled documents that no step saw, which are random documents: F1 at threshold 3 (and 4 for
code), Spearman, and the share kept at threshold 3 (retention) against the true share.

Protocols (each pool is split from its evaluation set; every step sees only the pool):
- web a: pool = data/web/fineweb_edu_llama3_train.jsonl (1000), evaluation = the val file (1000);
- web b: the reverse;
- webcv: all 2000 bundled web documents in 4 folds, pool three of them (1500), evaluation the fourth (500), so that
  1000 random labels are a sample of the pool rather than all of it;
- code: the 561 labelled Python files split in two halves at random (3 splits), pool one half, evaluation the other.

Scores on the evaluation set come from the cached frozen embeddings with the saved head and cut points: the numbers
`edu-filter evaluate` gives (checked on a subset in the run), without encoding the evaluation set again per model.

    python benchmarks/bench_active.py                  # everything: ~20 min on 2 CPU cores with the embeddings cached
    python benchmarks/bench_active.py --only web-a --budgets 500 --seeds 1
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
WEB_TRAIN = REPO / "data/web/fineweb_edu_llama3_train.jsonl"
WEB_VAL = REPO / "data/web/fineweb_edu_llama3_val.jsonl"
CODE_LABELS = REPO / "data/code/python_edu_labels.jsonl"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    import orjson

    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return path


def protocols(only: set[str] | None, web_budgets: list[int], seeds: int, cv_seeds: int = 1) -> list[dict]:
    """Every protocol: name, kind, pool and evaluation rows (id, text, score), budgets and draws per budget."""
    import numpy as np

    from edu_filter.documents import read_documents

    def rows(path):
        return [{"id": r["id"], "text": r["text"], "score": int(r["label"])}
                for r in read_documents([path], label_field="score")]

    web_train, web_val, code = rows(WEB_TRAIN), rows(WEB_VAL), rows(CODE_LABELS)
    found = [{"name": "web-a", "kind": "web", "pool": web_train, "eval": web_val, "budgets": web_budgets,
              "seeds": seeds},
             {"name": "web-b", "kind": "web", "pool": web_val, "eval": web_train, "budgets": web_budgets,
              "seeds": seeds}]
    both = web_train + web_val
    for fold, held in enumerate(np.array_split(np.random.default_rng(0).permutation(len(both)), 4)):
        held_set = set(held.tolist())
        found.append({"name": f"webcv-{fold}", "kind": "web",
                      "pool": [r for i, r in enumerate(both) if i not in held_set],
                      "eval": [both[i] for i in held], "budgets": [250, 500, 1000], "seeds": cv_seeds})
    for split in range(3):
        order = np.random.default_rng(split).permutation(len(code))
        half = len(code) // 2
        found.append({"name": f"code-{split}", "kind": "code", "pool": [code[i] for i in order[:half]],
                      "eval": [code[i] for i in order[half:]], "budgets": [half // 4, half // 2], "seeds": 1})
    return [p for p in found if only is None or p["name"] in only or p["name"].split("-")[0] in only]


def evaluate_on(model_dir: Path, kind: str, eval_rows: list[dict]) -> dict:
    """Metrics of a trained head model on the evaluation rows, from cached embeddings."""
    import numpy as np
    from safetensors.numpy import load_file

    from edu_filter.classifiers.calibration import apply_cut_points
    from edu_filter.classifiers.frozen_encoder import load_frozen_encoder
    from edu_filter.classifiers.metrics import compute_metrics

    config = json.loads((model_dir / "config.json").read_text())
    tensors = load_file(str(model_dir / "model.safetensors"))
    weight, bias = tensors["classifier.weight"][0].astype(np.float64), float(tensors["classifier.bias"][0])
    frozen = load_frozen_encoder(kind, max_length=config["max_seq_length"])
    x = frozen.embed([r["text"] for r in eval_rows]).astype(np.float64)
    raw = x @ weight + bias
    ints = apply_cut_points(raw, config["cut_points"])
    labels = np.array([r["score"] for r in eval_rows], dtype=np.float64)
    m = compute_metrics(labels, raw, ints)
    return {"f1_3": m["binary_f1_at_3"], "f1_4": m["binary_f1_at_4"], "spearman": m["spearman"],
            "retention_3": float((ints >= 3).mean()), "true_share_3": float((labels >= 3).mean())}


def check_against_evaluate(model_dir: Path, eval_rows: list[dict], kind: str) -> float:
    """Largest difference between the cached-embedding scores and `evaluate`'s on 40 documents."""
    import numpy as np

    from safetensors.numpy import load_file

    from edu_filter.classifiers import load_scorer
    from edu_filter.classifiers.frozen_encoder import load_frozen_encoder

    subset = eval_rows[:40]
    scores, _ = load_scorer(model_dir).predict([r["text"] for r in subset])
    tensors = load_file(str(model_dir / "model.safetensors"))
    frozen = load_frozen_encoder(kind)
    cached = frozen.embed([r["text"] for r in subset]).astype(np.float64) @ tensors["classifier.weight"][0] + float(
        tensors["classifier.bias"][0])
    return float(np.abs(scores - cached).max())


def run_one(work: Path, server, protocol: dict, select: str, budget: int, seed: int) -> dict:
    from edu_filter.annotate.score import score_documents
    from edu_filter.train.classifier import train_classifier

    name = f"{protocol['name']}-{select}-{budget}-seed{seed}"
    pool = work / f"{protocol['name']}-pool.jsonl"
    if not pool.exists():
        write_jsonl(pool, [{"id": r["id"], "text": r["text"]} for r in protocol["pool"]])  # no labels
    out = work / f"{name}.jsonl"
    before = server.requests.copy()
    score_documents([str(pool)], out, prompt=protocol["kind"], base_url=server.base_url, model="llama-3-labels",
                    sample=budget, seed=seed, select=select, concurrency=32, show_progress=False)
    asked = len(server.requests - before)  # distinct documents the server was asked about in this run
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    train_classifier([str(out)], work / name, kind=protocol["kind"], seed=seed)
    curve = json.loads((work / name / "metrics.json").read_text())["learning_curve"]
    result = {"protocol": protocol["name"], "select": select, "budget": budget, "seed": seed,
              "labels": len(rows), "asked": asked, "high_in_sample": sum(r["score"] >= 3 for r in rows),
              "high_in_pool": sum(r["score"] >= 3 for r in protocol["pool"]),
              "still_helping": curve["verdict"]["still_helping"],
              **evaluate_on(work / name, protocol["kind"], protocol["eval"])}
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="protocols: web-a, web-b, webcv-0..3, code-0..2, or web / webcv / "
                        "code")
    parser.add_argument("--budgets", default="250,500", help="budgets of web-a and web-b")
    parser.add_argument("--seeds", type=int, default=3, help="draws per budget and selection in web-a and web-b "
                        "(one in code, whose splits are the repeats)")
    parser.add_argument("--cv-seeds", type=int, default=1, help="draws per budget and selection in each webcv fold")
    parser.add_argument("--out", default=None, help="folder for the runs (default: a temporary one)")
    args = parser.parse_args()

    from llm_test_server import LLMTestServer, label_table

    chosen = protocols(set(args.only) if args.only else None, [int(b) for b in args.budgets.split(",")], args.seeds,
                       args.cv_seeds)
    work = Path(args.out or tempfile.mkdtemp(prefix="bench-active-"))
    if not args.out:  # kept only where asked for
        atexit.register(shutil.rmtree, work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for protocol in chosen:
        server = LLMTestServer(labels=label_table(protocol["pool"])).start()  # answers for the pool only
        try:
            results.append(run_one(work, server, protocol, "random", len(protocol["pool"]), 0))  # the whole pool
            for budget in protocol["budgets"]:
                for select in ("random", "active"):
                    for seed in range(protocol["seeds"]):
                        results.append(run_one(work, server, protocol, select, budget, seed))
        finally:
            server.stop()
    first = chosen[0]
    model = work / f"{first['name']}-random-{len(first['pool'])}-seed0"
    print(f"cached-embedding scores vs EduScorer.predict: max difference "
          f"{check_against_evaluate(model, first['eval'], first['kind']):.2e}")
    (work / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
    print(f"runs in {work}, one JSON line per run in {work / 'results.jsonl'}")
    summarise(results)


def summarise(results: list[dict]) -> None:
    """Mean over draws per protocol, selection and budget."""
    import numpy as np

    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["protocol"], r["budget"], r["select"]), []).append(r)
    # mean over draws ± its standard error (as RESULTS.md reports them); keep@3 with its standard deviation
    print(f"{'protocol':10} {'labels':>6} {'select':>7} {'F1@3 ± s.e.':>13} {'F1@4':>6} {'Spearman ± s.e.':>15} "
          f"{'keep@3 (sd)':>14} {'true':>5} {'3+ found':>9}")
    for (protocol, budget, select), rs in sorted(groups.items()):
        def stat(key, spread="se"):
            values = np.array([r[key] for r in rs if r[key] is not None])  # None: no 3+ labelled or scored
            if not len(values):
                return "n/a"
            if not spread or len(values) < 2:
                return f"{values.mean():.3f}"
            sd = values.std(ddof=1)
            return (f"{values.mean():.3f} ±{sd / np.sqrt(len(values)):.3f}" if spread == "se" else
                    f"{values.mean():.3f} ({sd:.3f})")
        found = f"{np.mean([r['high_in_sample'] for r in rs]):.1f}/{rs[0]['high_in_pool']}"
        print(f"{protocol:10} {budget:>6} {select:>7} {stat('f1_3'):>13} {stat('f1_4', spread=None):>6} "
              f"{stat('spearman'):>15} {stat('retention_3', spread='sd'):>14} {rs[0]['true_share_3']:>5.3f} "
              f"{found:>9}")


if __name__ == "__main__":
    main()
