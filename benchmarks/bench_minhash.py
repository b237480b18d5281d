"""MinHash dedup throughput (FineWeb settings: 5-grams, 14 buckets x 8 hashes, 64-bit xxhash), MB/s per core.

Runs datatrove's four MinHash stages in one process (one core) on the bundled FineWeb documents repeated to
`--mb` megabytes of text, each copy lightly edited so it is a near-duplicate of the original. The baseline measured
alongside is reading the same documents back from JSONL, the floor every stage pays.

    python benchmarks/bench_minhash.py            # ~8 MB of text
    python benchmarks/bench_minhash.py --mb 64
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import orjson

DATA = Path(__file__).resolve().parent.parent / "data" / "web"


def make_corpus(folder: Path, megabytes: float) -> tuple[int, int]:
    rows = [json.loads(line) for name in ("fineweb_edu_llama3_train.jsonl", "fineweb_edu_llama3_val.jsonl")
            for line in open(DATA / name)]
    n_bytes = n_docs = 0
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "corpus.jsonl", "wb") as fh:
        copy = 0
        while n_bytes < megabytes * 1e6:
            for r in rows:
                words = r["text"].split(" ")
                if copy:
                    words[copy % len(words)] = f"edit{copy}"
                text = " ".join(words)
                fh.write(orjson.dumps({"id": f"{r['id']}-{copy}", "text": text}) + b"\n")
                n_bytes += len(text.encode())
                n_docs += 1
            copy += 1
    return n_docs, n_bytes


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=8.0)
    args = parser.parse_args()

    from datatrove.pipeline.dedup.minhash import (
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import JsonlReader

    from edu_filter.filters.dedup import check_hashing, fineweb_minhash_config

    check_hashing()
    config = fineweb_minhash_config()
    tmp = Path(tempfile.mkdtemp(prefix="bench_minhash_"))
    n_docs, n_bytes = make_corpus(tmp / "in", args.mb)
    mb = n_bytes / 1e6
    print(f"{n_docs} documents, {mb:.1f} MB of text, {config}")

    def reader():
        return JsonlReader(str(tmp / "in"))

    timings = {}
    start = time.perf_counter()
    n_read = sum(1 for _ in reader().run())
    timings["read JSONL (baseline)"] = time.perf_counter() - start

    start = time.perf_counter()
    MinhashDedupSignature(str(tmp / "sigs"), config=config).run(reader().run())
    timings["1 signatures"] = time.perf_counter() - start
    start = time.perf_counter()
    for bucket in range(config.num_buckets):
        MinhashDedupBuckets(str(tmp / "sigs"), str(tmp / "buckets"), config=config).run(
            rank=bucket, world_size=config.num_buckets)
    timings["2 buckets"] = time.perf_counter() - start
    start = time.perf_counter()
    MinhashDedupCluster(str(tmp / "buckets"), str(tmp / "remove"), config=config).run()
    timings["3 cluster"] = time.perf_counter() - start
    start = time.perf_counter()
    kept = sum(1 for _ in MinhashDedupFilter(str(tmp / "remove")).run(reader().run()))
    timings["4 filter"] = time.perf_counter() - start

    total = sum(v for k, v in timings.items() if not k.startswith("read"))
    for name, seconds in timings.items():
        print(f"{name:24s} {seconds:7.2f} s  {mb / seconds:8.2f} MB/s per core")
    print(f"{'MinHash, all 4 stages':24s} {total:7.2f} s  {mb / total:8.2f} MB/s per core "
          f"({timings['read JSONL (baseline)'] / total:.3f}x the read-only baseline)")
    print(f"kept {kept} of {n_read} documents (each original has {n_read // 2000 - 1} edited near-copies)")


if __name__ == "__main__":
    main()
