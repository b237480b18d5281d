"""`edu-filter sweep` of an apply output: reading its documents against adding up the summaries its tasks wrote.

Builds an apply-like output folder of N scored FineWeb documents (the bundled texts, repeated) in T tasks: every
document in `removed/below_threshold/` as gzipped JSONL with its text (where a crawl's apply puts ~90% of it), and
the per-task summaries `ScoreSummaryWriter` writes while scoring (run here over the same documents). Then times
`run_sweep` of the folder (summaries) and of its removed folder named directly (documents), checks the two tables
agree, and prints the ratio.

    python benchmarks/bench_sweep_summaries.py --docs 200000 --tasks 8
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson
from datatrove.data import Document

from edu_filter.documents import bundled_data, read_documents
from edu_filter.filters.sweep import SUMMARY_FOLDER, ScoreSummaryWriter, run_sweep


def build(out: Path, docs: int, tasks: int) -> int:
    """The folder; returns the bytes of removed JSONL written."""
    texts = [r["text"] for r in read_documents([bundled_data("web/fineweb_edu_llama3_val.jsonl")])]
    rng = np.random.default_rng(0)
    score = rng.normal(1.3, 0.9, docs)
    removed = out / "removed" / "below_threshold"
    removed.mkdir(parents=True)
    (out / SUMMARY_FOLDER).mkdir(parents=True)
    for rank in range(tasks):
        mine = range(rank, docs, tasks)
        documents = [Document(text=texts[i % len(texts)], id=f"d{i}", metadata={
            "score": float(score[i]), "int_score": int(np.clip(np.rint(score[i]), 0, 5)),
            "token_count": len(texts[i % len(texts)]) // 4, "input_score": int(rng.integers(0, 4))}) for i in mine]
        for _ in ScoreSummaryWriter(str(out / SUMMARY_FOLDER)).run(iter(documents), rank=rank, world_size=tasks):
            pass
        with gzip.open(removed / f"{rank:05d}.jsonl.gz", "wb", compresslevel=1) as fh:
            for d in documents:
                fh.write(orjson.dumps({"text": d.text, "id": d.id, **d.metadata}) + b"\n")
    settings = {"tasks": tasks, "order": "dedup-first", "dedup": False, "exact_dedup": False}
    (out / "run_config.json").write_text(json.dumps({"settings": settings}))
    # what the folders hold, as apply's report counts it: the summaries stand for the documents only where they agree
    (out / "stats.json").write_text(json.dumps({"settings": settings, "kept": {"documents": 0}, "failed": {},
                                                "removed": {"below_threshold": {"documents": docs}}}))
    return sum(f.stat().st_size for f in removed.iterdir())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=200_000)
    parser.add_argument("--tasks", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        size = build(out, args.docs, args.tasks)
        summaries = sum(f.stat().st_size for f in (out / SUMMARY_FOLDER).iterdir())
        timings, results = {}, {}
        for how, paths in (("documents", [str(out / "removed" / "below_threshold")]), ("summaries", [str(out)])):
            start = time.perf_counter()
            results[how] = run_sweep(paths, Path(tmp) / f"sweep-{how}", show=False)
            timings[how] = time.perf_counter() - start
        assert results["summaries"]["read_from_summaries"] == [str(out)]
        for a, b in zip(results["summaries"]["rows"], results["documents"]["rows"]):
            assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-9 for k in a if a[k] is not None), (a, b)
    print(f"{args.docs:,} documents in {args.tasks} tasks: {size / 2**20:,.0f} MiB of removed JSONL.gz, "
          f"{summaries / 2**10:,.0f} KiB of summaries")
    print(f"sweep reading the documents: {timings['documents']:.1f} s; adding up the summaries: "
          f"{timings['summaries']:.1f} s ({timings['documents'] / timings['summaries']:.0f}x); same table")
    return 0


if __name__ == "__main__":
    sys.exit(main())
