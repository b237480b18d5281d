"""How `apply`'s tasks share input files fewer than they are: the parts dealt in runs (today) against round-robin
(runs planned before), and gzipped files read by the tasks dealt their parts against every task reading every file.

For Parquet, the corpus is `--files` files of `--groups` row groups of `--rows` rows (FineWeb's datatrove-written
shards hold ~1,000-row groups). For each dealing the script reads every task's share with the real reader
(`ApplyInputReader`, one task after another in this process) and reports the files each task opens (a footer read
each, on a shared filesystem a metadata request and a read), the wall time of all tasks together, and the size of the
split pickled into each stage (the part list before, counts per file now). For gzipped JSONL it writes `--gz-files`
files and compares the bytes decompressed over all tasks when every task reads every file (as before) with the
tasks dealt a file's parts reading it. Every row is checked to be read exactly once in each case.

    python benchmarks/bench_split.py            # 8 Parquet files x 400 groups x 50 rows, 64 tasks (~25 s)
    python benchmarks/bench_split.py --quick    # a quarter of that

Ratios are against the old way, measured in the same run.
"""

from __future__ import annotations

import argparse
import gzip
import pickle
from collections import Counter
import tempfile
import time
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

from edu_filter.filters import io


def write_parquet(folder: Path, files: int, groups: int, rows: int) -> list[str]:
    schema = pa.schema([("id", pa.string()), ("text", pa.string())])
    every = []
    for f in range(files):
        with pq.ParquetWriter(folder / f"shard-{f:03d}.parquet", schema) as writer:
            for g in range(groups):
                ids = [f"{f}-{g}-{r}" for r in range(rows)]
                writer.write_table(pa.table({"id": ids, "text": [f"document {i} " * 20 for i in ids]}))
                every += ids
    return every


def read_all(files, split, tasks: int, expected: list[str]) -> tuple[float, list[int]]:
    """(seconds, files opened per task) of every task reading its share, one after another; every expected id read
    exactly once, or it fails."""
    opened, ids = [], []
    started = time.perf_counter()
    for rank in range(tasks):
        reader = io.ApplyInputReader(files, split=split)
        ids += [d.id for d in reader.run(rank=rank, world_size=tasks)]
        opened.append(reader.stats.stats["input_files"].total)  # a file opened, its footer read
    seconds = time.perf_counter() - started
    assert Counter(ids) == Counter(expected), "a row read twice or not at all"
    return seconds, opened


def old_unit_list(split: io.InputSplit, rows: int) -> list[tuple]:
    """The part list the previous release pickled into every stage: (file, group, rows before it, its rows)."""
    return [(i, g, g * rows, rows) for i, n in enumerate(split.parts) for g in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--groups", type=int, default=400)
    parser.add_argument("--rows", type=int, default=50)
    parser.add_argument("--tasks", type=int, default=64)
    parser.add_argument("--gz-files", type=int, default=4)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.groups, args.tasks = args.groups // 4, args.tasks // 4
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "parquet"
        folder.mkdir()
        expected = write_parquet(folder, args.files, args.groups, args.rows)
        files = io.expand_inputs([str(folder)])
        if args.files * args.groups < args.tasks:
            parser.error("give at least as many row groups in all as tasks: the old way read every file then")
        table = Table(title=f"{args.files} Parquet files x {args.groups} row groups x {args.rows} rows, "
                            f"{args.tasks} tasks")
        for col in ("dealing", "files opened per task (mean / max)", "all tasks' reading (s)", "split pickled (bytes)"):
            table.add_column(col, justify="right" if col != "dealing" else "left")
        results = {}
        for name, contiguous in (("round-robin (the previous release)", False), ("runs of parts (now)", True)):
            split = io.input_split(files, args.tasks, contiguous=contiguous)
            seconds, opened = read_all(files, split, args.tasks, expected)
            pickled = len(pickle.dumps(old_unit_list(split, args.rows) if not contiguous else split))
            results[name] = (seconds, sum(opened) / len(opened), pickled)
            table.add_row(name, f"{sum(opened) / len(opened):.1f} / {max(opened)}", f"{seconds:.2f}", f"{pickled:,}")
        console.print(table)
        (old_s, old_open, old_pickle), (new_s, new_open, new_pickle) = results.values()
        console.print(f"runs of parts vs round-robin: {old_open / new_open:.1f}x fewer files opened per task, "
                      f"{old_s / new_s:.2f}x the reading speed, {old_pickle / new_pickle:.0f}x smaller pickle")

        gz = Path(tmp) / "gz"
        gz.mkdir()
        per_file = len(expected) // args.gz_files
        expected = []
        for f in range(args.gz_files):
            rows = per_file * (f + 1) // 2  # files of different sizes
            lines = (orjson.dumps({"id": f"gz{f}-{r}", "text": f"document {r} " * 20}) + b"\n" for r in range(rows))
            (gz / f"part-{f}.jsonl.gz").write_bytes(gzip.compress(b"".join(lines), compresslevel=1))
            expected += [f"gz{f}-{r}" for r in range(rows)]
        files = io.expand_inputs([str(gz)])
        unpacked = [len(gzip.decompress(Path(folder, name).read_bytes())) for folder, name in files]
        table = Table(title=f"{args.gz_files} gzipped JSONL files of {sum(unpacked) / 1e6:.0f} MB of text, "
                            f"{args.tasks} tasks")
        for col in ("reading", "text decompressed over all tasks (MB)", "all tasks' reading (s)"):
            table.add_column(col, justify="right" if col != "reading" else "left")
        results = {}
        for name, split in (("every task every file (before)", None),
                            ("the tasks dealt its parts (now)", io.input_split(files, args.tasks))):
            seconds, opened = read_all(files, split, args.tasks, expected)
            reads = split.reads(args.tasks) if split else [args.tasks] * len(files)
            decompressed = sum(size * n for size, n in zip(unpacked, reads))  # each reader gunzips all of it
            results[name] = (seconds, decompressed)
            table.add_row(name, f"{decompressed / 1e6:,.0f}", f"{seconds:.2f}")
        console.print(table)
        (old_s, old_mb), (new_s, new_mb) = results.values()
        console.print(f"the tasks dealt its parts vs every task: {old_mb / new_mb:.1f}x less decompressed, "
                      f"{old_s / new_s:.2f}x the reading speed")


if __name__ == "__main__":
    main()
