"""MinHash cluster stage: datatrove's `MinhashDedupCluster` (a dict union-find) against edu-filter's
`ArrayMinhashDedupCluster` (sorted numpy keys, scipy's connected components a bucket at a time).

The pairs are shaped as datatrove's bucket stage writes them: `--docs` documents with a near duplicate, spread over
`--files` input files, in clusters of 2 to 20 (most of 2-3); each of the 14 buckets finds a cluster with probability
0.8 and writes its members' consecutive pairs, over 2 files per bucket (bucket workers). Both stages run in this one
process on the same files, and again each alone in a fresh process for its resident memory. Printed: each stage's
peak resident memory added (what a job's limit sees) and peak traced memory (tracemalloc: numpy's arrays, not its
sorts' scratch) per document with a near duplicate, its CPU seconds, their ratios, and whether both keep exactly one document of every
cluster and remove as many (the copy kept may differ: datatrove keeps the root its union by size leaves, edu-filter
the first read).

    python benchmarks/bench_minhash_cluster.py              # 300k documents with a near duplicate (~1 minute)
    python benchmarks/bench_minhash_cluster.py --docs 2000000
"""

from __future__ import annotations

import argparse
import importlib
import os
import tempfile
import time
import tracemalloc

import numpy as np


def write_pairs(folder: str, docs: int, files: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    sizes = np.minimum(2 + rng.geometric(0.6, size=docs) - 1, 20)
    sizes = sizes[np.cumsum(sizes) <= docs]
    members = rng.permutation(files * (docs // files + 1))[: sizes.sum()]  # document ids, then (file, position)
    keys = np.stack([members % files, members // files], axis=1).astype("<u4")
    bounds = np.r_[0, np.cumsum(sizes)]
    os.makedirs(folder, exist_ok=True)
    for bucket in range(14):
        found = rng.random(len(sizes)) < 0.8
        starts, ends = bounds[:-1][found], bounds[1:][found]
        first = np.concatenate([np.arange(s, e - 1) for s, e in zip(starts, ends)])
        pairs = np.concatenate([keys[first], keys[first + 1]], axis=1)
        for worker, part in enumerate(np.array_split(pairs[rng.permutation(len(pairs))], 2)):
            part.tofile(os.path.join(folder, f"{bucket:05d}_{worker:02d}.dups"))


def removed(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, name)) // 4 for name in os.listdir(folder))


def measure(step) -> tuple[int, float]:
    tracemalloc.start()
    start = time.process_time()
    step.run(None)
    seconds = time.process_time() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak, seconds


def resident_growth(name: str, buckets: str, out: str) -> int:
    """The peak resident memory a stage adds, run alone in a fresh process (what a job's memory limit sees:
    tracemalloc misses the scratch numpy's sorts take)."""
    import subprocess
    import sys

    script = f"""
import importlib
importlib.import_module("scipy.sparse.csgraph")
from datatrove.pipeline.dedup.minhash import MinhashDedupCluster
from edu_filter.filters.dedup import fineweb_minhash_config
from edu_filter.filters.minhash import ArrayMinhashDedupCluster
cls = {{"datatrove": MinhashDedupCluster, "edu-filter": ArrayMinhashDedupCluster}}[{name!r}]
step = cls({buckets!r}, {out!r}, config=fineweb_minhash_config())
def status(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))
open("/proc/self/clear_refs", "w").write("5")  # the peak resident size starts again from now
before = status("VmRSS")
step.run(None)
print((status("VmHWM") - before) * 1024)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1])


def main() -> None:
    importlib.import_module("scipy.sparse.csgraph")  # before the measures: its modules are no document's memory
    from datatrove.pipeline.dedup.minhash import MinhashDedupCluster

    from edu_filter.filters.dedup import fineweb_minhash_config
    from edu_filter.filters.minhash import ArrayMinhashDedupCluster

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=300_000)
    parser.add_argument("--files", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    config = fineweb_minhash_config()
    with tempfile.TemporaryDirectory() as root:
        write_pairs(f"{root}/buckets", args.docs, args.files, args.seed)
        results = {}
        for name, cls in (("datatrove", MinhashDedupCluster), ("edu-filter", ArrayMinhashDedupCluster)):
            step = cls(f"{root}/buckets", f"{root}/{name}", config=config)
            peak, seconds = measure(step)
            results[name] = (peak, seconds, removed(f"{root}/{name}"), step.stats["duplicates"].total,
                             step.stats["cluster_size"].n,
                             resident_growth(name, f"{root}/buckets", f"{root}/{name}-resident"))
        stock, ours = results.values()
    (stock_peak, stock_s, stock_removed, dups, clusters, _), (peak, s, ours_removed, dups2, clusters2, _) = stock, ours
    print(f"{dups:,} documents with a near duplicate in {clusters:,} clusters")
    for name, (peak, seconds, gone, _, _, resident) in results.items():
        print(f"  {name:10s}  resident peak +{resident / 2**20:7.1f} MiB ({resident / dups:5.1f} bytes a document), "
              f"traced {peak / dups:5.1f} bytes a document   {seconds:6.2f} CPU s   {gone:,} removed")
    print(f"  resident memory {stock[-1] / ours[-1]:.1f}x less, traced {stock_peak / peak:.1f}x, time "
          f"{stock_s / s:.1f}x; same clusters and removals: "
          f"{'yes' if (dups, clusters, stock_removed) == (dups2, clusters2, ours_removed) else 'NO'}")


if __name__ == "__main__":
    main()
