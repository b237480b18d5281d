"""`score --sample N`: a reproducible uniform sample drawn while streaming the input, holding only the sample."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import orjson
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from llm_test_server import LLMTestServer  # noqa: E402

from edu_filter.annotate.score import load_documents  # noqa: E402
from edu_filter.documents import DocumentError, sample_documents  # noqa: E402

# Runs a command and prints the peak resident memory (KiB) of it and its children, nothing else.
PEAK_RSS = (
    "import resource, subprocess, sys\n"
    "code = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    "sys.exit(code)\n"
)


def write_rows(path: Path, n: int, text_chars: int = 20) -> Path:
    filler = b"x" * text_chars
    with open(path, "wb") as fh:
        for start in range(0, n, 10_000):
            chunk = range(start, min(n, start + 10_000))
            fh.write(b"".join(b'{"id":"d%06d","text":"%s"}\n' % (i, filler) for i in chunk))
    return path


def test_sample_is_reproducible_uniform_and_of_the_right_size(tmp_path):
    src = write_rows(tmp_path / "docs.jsonl", 10_000)
    first = sample_documents([str(src)], 1_000, seed=0)
    positions = [position for position, _ in first]
    assert len(first) == 1_000 and len(set(positions)) == 1_000
    assert positions == sorted(positions)  # input order
    assert all(doc["id"] == f"d{position:06d}" for position, doc in first)
    assert sample_documents([str(src)], 1_000, seed=0) == first  # same seed, same sample
    assert [p for p, _ in sample_documents([str(src)], 1_000, seed=1)] != positions
    # uniform: each tenth of the input holds about a tenth of the sample (binomial sd ~9.5), not only the start
    per_tenth = Counter(position // 1_000 for position in positions)
    assert sorted(per_tenth) == list(range(10)) and all(60 <= n <= 140 for n in per_tenth.values()), per_tenth
    # asking for more than there is gives everything, in order
    assert [doc["id"] for _, doc in sample_documents([str(src)], 20_000)] == [f"d{i:06d}" for i in range(10_000)]


def test_sample_checks_every_row_and_ids_within_the_sample(tmp_path):
    src = write_rows(tmp_path / "docs.jsonl", 100)
    with open(src, "ab") as fh:
        fh.write(b'{"id": "late", "body": "no text"}\n')
    with pytest.raises(DocumentError, match="docs.jsonl:101: field 'text' is missing"):
        sample_documents([str(src)], 5)
    dup = tmp_path / "dup.jsonl"
    dup.write_bytes(b"".join(orjson.dumps({"id": "same", "text": str(i)}) + b"\n" for i in range(3)))
    with pytest.raises(DocumentError, match="duplicate document id 'same'"):
        load_documents([str(dup)], "text", "id", sample=2, seed=0)
    with pytest.raises(ValueError, match="--sample must be a positive"):
        load_documents([str(src)], "text", "id", sample=0, seed=0)


@pytest.mark.slow
def test_score_sample_streams_a_large_input(tmp_path):
    """`score --sample 1000` over 200,000 rows (~300 MB) holds the sample, not the rows: its peak memory exceeds that
    of the same command over 1,000 rows by far less than the input's size, which holding every row would need at
    the very least, and stays under the 500 MB the issue sets."""
    small = write_rows(tmp_path / "small.jsonl", 1_000, text_chars=1_500)
    src = write_rows(tmp_path / "big.jsonl", 200_000, text_chars=1_500)
    input_mib = src.stat().st_size / 2**20
    server = LLMTestServer().start()
    peaks = {}
    try:
        for name, path in (("small", small), ("big", src)):
            out = tmp_path / f"sample-{name}.jsonl"
            cli = [sys.executable, "-m", "edu_filter.cli", "score", str(path), "-o", str(out), "--sample", "1000",
                   "--seed", "7", "--base-url", server.base_url, "--concurrency", "32"]
            run = subprocess.run([sys.executable, "-c", PEAK_RSS, *cli], capture_output=True, text=True, timeout=300)
            assert run.returncode == 0, run.stderr
            peaks[name] = int(run.stdout.split()[-1]) / 1024
    finally:
        server.stop()
    rows = [orjson.loads(line) for line in (tmp_path / "sample-big.jsonl").read_bytes().splitlines()]
    ids = [row["id"] for row in rows]
    assert len(ids) == 1_000 and ids == sorted(set(ids)) and all(row["score"] == 2 for row in rows)
    assert input_mib > 280 and peaks["big"] - peaks["small"] < 100 and peaks["big"] < 500, (input_mib, peaks)
