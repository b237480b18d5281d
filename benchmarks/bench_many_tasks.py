"""What each of `apply`'s tasks pays for the others as the tasks grow: finding its own files of an unfinished attempt,
and the `--keep-top` cutoff.

* **Clearing an attempt.** Every task's first step deletes what a killed attempt of it left. It used to glob its own
  names (`[0-9][0-9][0-9]_00003.parquet`, `*/00003.jsonl.gz`), which lists the whole folder: `kept/` holds a file per
  task, so T tasks read T x T entries. Today it asks for its names (`own_files`). The script fills `kept/` with one
  file per task and `failed/` with a few reasons, and times both ways for a sample of tasks.
* **The keep-top cutoff.** Each `select` task used to merge every task's score histogram itself (a dict loop): T
  tasks read T x T files. Today one task merges them once, in numpy, and the select tasks read one small file. The
  script writes T histograms of FineWeb-like scores and times one old merge (to multiply by T) against the new one.

    python benchmarks/bench_many_tasks.py              # 2,000 tasks for the clearing, 400 histograms (~1 minute)
    python benchmarks/bench_many_tasks.py --quick      # a quarter of each

On a local disk. On a shared filesystem every entry listed is also a metadata request, and the files a glob lists are
those of every other task. Ratios are against the old way, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import posixpath
import tempfile
import time
from pathlib import Path

import numpy as np
from datatrove.io import get_datafolder
from rich.console import Console
from rich.table import Table

from edu_filter.filters.io import own_files
from edu_filter.filters.scoring import keep_top_cutoff, load_histogram, score_bins


def old_own_files(folder, pattern: str, numbered: bool) -> set[str]:
    """The previous release's way: glob the task's names, which lists the folder."""
    head, base = posixpath.split(pattern)
    patterns = [pattern] + ([posixpath.join(head, f"[0-9][0-9][0-9]_{base}")] if numbered else [])
    return {f for p in patterns for f in folder.glob(p)}


def old_merge(folder: str) -> dict[int, int]:
    """The previous release's merge: a dict loop over every file's bins."""
    data = get_datafolder(folder)
    total: dict[int, int] = {}
    for name in sorted(data.list_files(glob_pattern="*.npz")):
        with data.open(name, "rb") as fh:
            part = np.load(fh)
            for b, c in zip(part["bins"].tolist(), part["counts"].tolist()):
                total[b] = total.get(b, 0) + c
    return total


def bench_clearing(root: Path, tasks: int, sampled: int) -> tuple[float, float]:
    kept, failed = root / "kept", root / "failed"
    kept.mkdir(parents=True)
    for rank in range(tasks):
        (kept / f"000_{rank:05d}.parquet").write_bytes(b"")
    for reason in ("no_text", "invalid_json", "schema_mismatch"):
        (failed / reason).mkdir(parents=True)
        for rank in range(0, tasks, 7):
            (failed / reason / f"{rank:05d}.jsonl.gz").write_bytes(b"")
    kept_folder, failed_folder = get_datafolder(str(kept)), get_datafolder(str(failed))
    ranks = np.linspace(0, tasks - 1, sampled).astype(int)
    timings = []
    for find in (old_own_files, own_files):
        start = time.perf_counter()
        for rank in ranks:
            found = set(find(kept_folder, f"{rank:05d}.parquet", True))
            assert found == {f"000_{rank:05d}.parquet"}, found
            find(failed_folder, f"*/{rank:05d}.jsonl.gz", False)
        timings.append((time.perf_counter() - start) / sampled)
    return timings[0], timings[1]


def bench_cutoff(root: Path, tasks: int, docs: int) -> tuple[float, float]:
    folder = root / "histograms"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for rank in range(tasks):  # FineWeb-like raw scores: most near 1-2, a tail to 5
        bins, counts = np.unique(score_bins(rng.gamma(2.0, 0.7, docs).astype(np.float32)), return_counts=True)
        np.savez(folder / f"{rank:05d}.npz", bins=bins.astype(np.int64), counts=counts.astype(np.int64))
    start = time.perf_counter()
    old = old_merge(str(folder))
    one_old = time.perf_counter() - start
    start = time.perf_counter()
    new = load_histogram(str(folder))
    cutoff = keep_top_cutoff(new, 0.1)
    (root / "keep_top.json").write_text(json.dumps({"cutoff": cutoff}))
    once = time.perf_counter() - start
    assert new == old
    start = time.perf_counter()
    for _ in range(tasks):  # what each select task now reads
        json.loads((root / "keep_top.json").read_text())
    reads = time.perf_counter() - start
    return one_old * tasks, once + reads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=2000, help="tasks (a kept file each) for the clearing")
    parser.add_argument("--histograms", type=int, default=400, help="tasks (a histogram each) for the cutoff")
    parser.add_argument("--docs", type=int, default=100_000, help="documents per task's histogram")
    parser.add_argument("--quick", action="store_true", help="a quarter of every size")
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.histograms, args.docs = args.tasks // 4, args.histograms // 4, args.docs // 4
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        old_clear, new_clear = bench_clearing(Path(tmp) / "clear", args.tasks, min(200, args.tasks))
        old_cut, new_cut = bench_cutoff(Path(tmp) / "cut", args.histograms, args.docs)
    table = Table(title="per-task costs that grow with the tasks (local disk)")
    for column in ("", "before", "now", "before / now"):
        table.add_column(column, justify="right" if column else "left")
    table.add_row(f"clearing an attempt, per task ({args.tasks:,} tasks)", f"{old_clear * 1e3:.2f} ms",
                  f"{new_clear * 1e3:.2f} ms", f"{old_clear / new_clear:.1f}x")
    table.add_row(f"  all {args.tasks:,} tasks", f"{old_clear * args.tasks:.1f} s", f"{new_clear * args.tasks:.1f} s",
                  "")
    table.add_row(f"keep-top cutoff, all {args.histograms:,} select tasks", f"{old_cut:.1f} s", f"{new_cut:.2f} s",
                  f"{old_cut / new_cut:.0f}x")
    console.print(table)
    console.print("Before, both grow with the square of the tasks; now the clearing costs the same per task whatever "
                  "their number, and the cutoff one merge.")


if __name__ == "__main__":
    main()
