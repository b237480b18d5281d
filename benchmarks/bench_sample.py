"""`score --sample N` on Parquet: a reservoir over every row against reading only the row groups that hold the sample.

Writes `--files` Parquet files of FineWeb-sized rows (the bundled FineWeb documents repeated, ~3 KB each) in row
groups of `--row-group` rows (datatrove's Parquet writer, which wrote FineWeb, makes row groups of its 1,000-row
batches), then draws `--sample` documents both ways in this one process: the reservoir that streams every row (what
JSONL input still uses) and `sample_documents`, which reads the row counts from the footers and only the row groups
holding the chosen rows. Printed: the share of row groups the sample touches, seconds and bytes read (from
/proc/self/io, page cache included) for each, and their ratios. Both draws are uniform; they are not the same draw.
The bytes read follow the share of row groups touched, which is what carries over to a real corpus: 100,000 documents
drawn from FineWeb's billions touch at most 100,000 of its millions of row groups. On the hub each read is HTTP range
requests.

    python benchmarks/bench_sample.py                    # 16 files x 20,000 rows (~600 MiB), 16 drawn
    python benchmarks/bench_sample.py --sample 1000      # every row group touched: no bytes saved
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from edu_filter.documents import iter_documents, sample_documents

DATA = Path(__file__).resolve().parent.parent / "data" / "web"


def bytes_read() -> int:
    with open("/proc/self/io") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("rchar:"))


def reservoir(files: list[str], n: int, seed: int) -> list[dict]:
    """The streaming draw: every row is read and checked."""
    rng = random.Random(seed)
    kept: list[dict] = []
    for i, doc in enumerate(iter_documents(files)):
        if i < n:
            kept.append(doc)
        elif (j := rng.randrange(i + 1)) < n:
            kept[j] = doc
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--rows", type=int, default=20_000, help="rows per file")
    parser.add_argument("--row-group", type=int, default=1_000)
    parser.add_argument("--sample", type=int, default=16)
    args = parser.parse_args()

    texts = [json.loads(line)["text"] for line in (DATA / "fineweb_edu_llama3_train.jsonl").read_text().splitlines()]
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for k in range(args.files):
            ids = [f"f{k}-{i}" for i in range(args.rows)]
            table = pa.table({"id": ids, "text": [texts[(k * args.rows + i) % len(texts)] for i in range(args.rows)]})
            files.append(str(Path(tmp) / f"{k:03d}.parquet"))
            pq.write_table(table, files[-1], row_group_size=args.row_group)
        size = sum(Path(f).stat().st_size for f in files)
        print(f"{args.files} files x {args.rows:,} rows, row groups of {args.row_group:,}: {size / 2**20:,.0f} MiB "
              f"of Parquet; drawing {args.sample:,}")
        touched = {p // args.row_group for p, _ in sample_documents(files, args.sample, 0)}
        groups = args.files * -(-args.rows // args.row_group)
        print(f"the sample touches {len(touched):,} of {groups:,} row groups ({len(touched) / groups:.1%})")
        results = {}
        for name, draw in (("reservoir over every row", lambda: reservoir(files, args.sample, 0)),
                           ("row groups holding the sample", lambda: sample_documents(files, args.sample, 0))):
            before, start = bytes_read(), time.perf_counter()
            assert len(draw()) == args.sample
            results[name] = (time.perf_counter() - start, bytes_read() - before)
            print(f"  {name:32s} {results[name][0]:7.2f} s  {results[name][1] / 2**20:9,.1f} MiB read")
        (t0, b0), (t1, b1) = results.values()
        print(f"row-group sampling: {t0 / t1:.1f}x faster, {b0 / max(b1, 1):.1f}x fewer bytes read")


if __name__ == "__main__":
    main()
