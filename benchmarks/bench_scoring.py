"""Scoring speed: `EduScorer.predict` against a naive loop over the same documents, side by side in one run.

The naive loop is what a first script does: documents in file order, batches of 32, each padded to its longest
member (truncated at max_length), fp32, plain `torch.no_grad()`. `EduScorer` tokenizes once, sorts by length so each
batch pads only to similar lengths, runs under `inference_mode` (bf16 + SDPA on GPU). Both run on the same torch
threads (every CPU the process may use) and produce the same scores; the script checks that and prints docs/s and
the ratio.
On CPU it also times `dtype="int8"` (dynamic quantization, the opt-in CPU fast path) and reports how far its scores
and int_scores move from the exact ones.

    python benchmarks/bench_scoring.py                       # trains a small head model first (MiniLM, offline)
    python benchmarks/bench_scoring.py --model M --limit 512 data/web data/code/thealgorithms_unlabelled.jsonl
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = [
    str(REPO / "data/web/fineweb_edu_llama3_val.jsonl"),
    str(REPO / "data/code/thealgorithms_unlabelled.jsonl"),
]


def naive_model(model_dir: str, device):
    """The plain transformers model and tokenizer, on the device the scorer runs on (like for like)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, trust_remote_code=True).eval()
    return model.to(device), tokenizer


def naive_scores(model, tokenizer, texts: list[str], max_length: int, batch_size: int = 32):
    import torch

    scores = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                texts[start : start + batch_size], truncation=True, max_length=max_length, padding=True,
                return_tensors="pt",
            ).to(model.device)
            scores.extend(model(**batch).logits[:, 0].float().tolist())  # .tolist() waits for the device
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", nargs="*", default=DEFAULT_DATA, help="files or folders of documents to score")
    parser.add_argument("--model", help="model folder; default: train a small head model on bundled web data")
    parser.add_argument("--limit", type=int, default=384, help="documents to score")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per document, for both methods")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each; the best is kept")
    args = parser.parse_args()

    import numpy as np
    import torch
    from rich.console import Console
    from rich.table import Table

    from edu_filter.classifiers import load_scorer
    from edu_filter.classifiers.device import default_num_threads
    from edu_filter.documents import expand_paths, read_documents

    console = Console()
    torch.set_num_threads(default_num_threads())
    per_file = [read_documents([f], limit=args.limit) for f in expand_paths(args.data)]
    # documents from every input in turn, so the naive file order mixes long web pages and short code files
    rows = [row for group in zip(*per_file) for row in group] if len(per_file) > 1 else per_file[0]
    texts = [r["text"] for r in rows][: args.limit]

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            from edu_filter.classifiers.encoders import minilm_path
            from edu_filter.train.classifier import train_classifier

            model_dir = str(Path(tmp) / "model")
            console.print("training a small head model (MiniLM, 300 web documents) to benchmark with")
            train_classifier(
                [str(REPO / "data/web/fineweb_edu_llama3_train.jsonl")], model_dir, encoder=minilm_path(), limit=300,
                max_length=128, cache_dir=str(Path(tmp) / "cache"),
            )

        scorer = load_scorer(model_dir, max_length=args.max_length, batch_size=args.batch_size)
        int8 = None
        if scorer.device.type == "cpu":
            int8 = load_scorer(model_dir, max_length=args.max_length, batch_size=args.batch_size, dtype="int8")
            int8.predict(texts[:8], long_docs="truncate")
        # both loaded before any timing, both warmed up (on a GPU, its kernels' first start)
        model, tokenizer = naive_model(model_dir, scorer.device)
        scorer.predict(texts[:8], long_docs="truncate")
        naive_scores(model, tokenizer, texts[:8], args.max_length)
        naive_times, fast_times, int8_times = [], [], []
        for _ in range(args.repeats):  # alternate, so all see the same machine load
            start = time.perf_counter()
            reference = naive_scores(model, tokenizer, texts, args.max_length, args.batch_size)
            naive_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            fast, _ = scorer.predict(texts, long_docs="truncate")
            fast_times.append(time.perf_counter() - start)
            if int8 is not None:
                start = time.perf_counter()
                quantized, _ = int8.predict(texts, long_docs="truncate")
                int8_times.append(time.perf_counter() - start)

    n = len(texts)
    naive_best, fast_best = min(naive_times), min(fast_times)
    max_diff = float(np.max(np.abs(np.asarray(reference) - fast)))
    table = Table(title=f"scoring {n} documents, max_length {args.max_length}, {torch.get_num_threads()} threads, "
                        f"{scorer.device.type}")
    table.add_column("method")
    table.add_column("seconds", justify="right")
    table.add_column("docs/s", justify="right")
    table.add_column("speed-up", justify="right")
    table.add_row(f"naive loop (file order, batch {args.batch_size}, fp32, {scorer.device.type})", f"{naive_best:.2f}",
                  f"{n / naive_best:.1f}", "1.00x")
    table.add_row("EduScorer.predict", f"{fast_best:.2f}", f"{n / fast_best:.1f}", f"{naive_best / fast_best:.2f}x")
    if int8_times:
        int8_best = min(int8_times)
        table.add_row("EduScorer.predict, dtype int8", f"{int8_best:.2f}", f"{n / int8_best:.1f}",
                      f"{naive_best / int8_best:.2f}x")
    console.print(table)
    console.print(f"exact path: max |score difference| from the naive loop {max_diff:.2e}")
    if int8_times:
        moved = np.abs(quantized - fast)
        exact_int, int8_int = scorer.to_int_score(fast), scorer.to_int_score(quantized)
        console.print(
            f"int8: |score difference| mean {moved.mean():.3f}, max {moved.max():.3f}; int_score changed for "
            f"{np.mean(exact_int != int8_int):.1%}; keep decision at threshold 3 changed for "
            f"{np.mean((exact_int >= 3) != (int8_int >= 3)):.1%}"
        )
    if max_diff > 1e-2:
        raise SystemExit("EduScorer and the naive loop disagree")


if __name__ == "__main__":
    main()
