"""`score --sample N`: a reproducible uniform sample holding only the sample: streamed from JSONL, read from Parquet's
row groups that hold it."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from llm_test_server import LLMTestServer  # noqa: E402

from edu_filter.annotate.score import load_documents  # noqa: E402
from edu_filter.documents import DocumentError, count_documents, iter_documents, sample_documents  # noqa: E402

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
    assert sample_documents(iter([str(src)]), 1_000, seed=0) == first  # the paths are read twice: not exhausted
    assert [p for p, _ in sample_documents([str(src)], 1_000, seed=1)] != positions
    # uniform: each tenth of the input holds about a tenth of the sample (binomial sd ~9.5), not only the start
    per_tenth = Counter(position // 1_000 for position in positions)
    assert sorted(per_tenth) == list(range(10)) and all(60 <= n <= 140 for n in per_tenth.values()), per_tenth
    # asking for more than there is gives everything, in order
    assert [doc["id"] for _, doc in sample_documents([str(src)], 20_000)] == [f"d{i:06d}" for i in range(10_000)]


def test_a_sample_drawn_by_reading_every_row_says_how_far_it_is(tmp_path, capsys):
    """Not Parquet, every row is read to draw a sample: hours for a TB of JSONL, and nothing was said meanwhile."""
    src = write_rows(tmp_path / "docs.jsonl", 2_500)
    capsys.readouterr()
    assert len(sample_documents([str(src)], 10, seed=0, show_progress=True)) == 10
    assert "reading the pool to sample: 2,500" in capsys.readouterr().out


def write_parquet(path: Path, first: int, n: int, row_group_size: int, ids: bool = True) -> str:
    """Rows of ~200 incompressible characters, so a file's bytes are spread evenly over its row groups."""
    rng = random.Random(first)
    columns = {"text": [rng.randbytes(100).hex() for _ in range(n)], "n": list(range(first, first + n))}
    if ids:
        columns["id"] = [f"d{i:06d}" for i in range(first, first + n)]
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return str(path)


def bytes_read() -> int:
    """Bytes this process has read through system calls so far (all threads), page cache included."""
    with open("/proc/self/io") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("rchar:"))


def test_a_parquet_sample_reads_only_the_row_groups_holding_it(tmp_path):
    files = [write_parquet(tmp_path / f"part-{k}.parquet", 20_000 * k, 20_000, 250) for k in range(3)]
    files.append(write_parquet(tmp_path / "no-ids.parquet", 60_000, 3_000, 100, ids=False))
    everything = list(iter_documents(files))
    assert count_documents(files) == len(everything) == 63_000  # from the footers alone

    sample = sample_documents(files, 2_000, seed=0)
    positions = [p for p, _ in sample]
    assert len(set(positions)) == 2_000 and positions == sorted(positions)
    # each sampled document is the row at its position, as reading the whole input gives it (ids, row numbers)
    assert all(doc == everything[p] for p, doc in sample)
    assert any(doc["id"].startswith("no-ids.parquet:") for _, doc in sample)
    # uniform over the input: each 20,000-row file holds ~635 (binomial sd ~21), the 3,000-row one ~95
    per_file = Counter(min(p // 20_000, 3) for p in positions)
    assert all(540 <= per_file[k] <= 730 for k in range(3)) and 50 <= per_file[3] <= 140, per_file
    assert sample_documents(files, 2_000, seed=0) == sample
    assert [p for p, _ in sample_documents(files, 2_000, seed=1)] != positions
    assert [doc["id"] for _, doc in sample_documents(files, 70_000)] == [doc["id"] for doc in everything]

    # 10 documents touch at most 10 of the 270 row groups: a small part of the bytes a full read takes
    size = sum(Path(f).stat().st_size for f in files)
    before = bytes_read()
    assert len(sample_documents(files, 10, seed=3)) == 10
    sampled_bytes = bytes_read() - before
    before = bytes_read()
    assert sum(1 for _ in iter_documents(files)) == 63_000
    full_bytes = bytes_read() - before
    assert full_bytes >= 0.9 * size and sampled_bytes < 0.1 * size, (sampled_bytes, full_bytes, size)


def test_a_parquet_row_group_is_read_a_page_at_a_time_not_whole(tmp_path):
    """pyarrow read a row group's text column chunk whole (a million-row group is GBs): with a read buffer it reads
    it a page at a time. Peak memory reading an ~80 MB row group stays near that of a one-row file."""
    import os

    n = 40_000
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(n)], "text": [os.urandom(1000).hex() for _ in range(n)]}),
                   tmp_path / "one-group.parquet", row_group_size=n, compression="none")
    pq.write_table(pa.table({"id": ["d0"], "text": ["x"]}), tmp_path / "one-row.parquet")
    read = "import sys\nfrom edu_filter.documents import iter_documents\nsum(1 for _ in iter_documents([sys.argv[1]]))\n"
    peaks = {}
    for name in ("one-row", "one-group"):
        script = tmp_path / "read.py"
        script.write_text(read)
        run = subprocess.run([sys.executable, "-c", PEAK_RSS, sys.executable, str(script),
                              str(tmp_path / f"{name}.parquet")], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr[-2000:]
        peaks[name] = int(run.stdout.split()[-1]) / 1024
    assert peaks["one-group"] - peaks["one-row"] < 40, peaks  # MB; the column chunk is 80


def test_an_input_named_twice_is_sampled_as_reading_it_gives_it(tmp_path):
    """Once, as apply reads it: named twice, its rows were read twice, the second copy's ids repeating the first's."""
    once = write_parquet(tmp_path / "no-ids.parquet", 0, 5, 2, ids=False)
    everything = list(iter_documents([once, once]))
    assert count_documents([once, once]) == 5 and everything == list(iter_documents([once]))
    assert [doc for _, doc in sample_documents([once, once], 10)] == everything
    assert len(load_documents([once, once], "text", "id", sample=10, seed=0)) == 5


def test_a_parquet_sample_checks_its_rows_and_names_a_bad_one(tmp_path):
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"id": ["a", "b", "c"], "text": ["one", None, "three"]}), bad)
    with pytest.raises(DocumentError, match=r"bad\.parquet:2: field 'text' is null"):
        sample_documents([str(bad)], 3)
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DocumentError, match=r"junk\.parquet: cannot read as Parquet"):
        sample_documents([str(tmp_path / "junk.parquet")], 3)


def test_a_hub_parquet_dataset_is_sampled_from_the_files_the_datasets_library_streams(tmp_path, monkeypatch):
    """A hub address resolves through `datasets` to its data files, here a local dataset folder named like a hub
    repository (the `datasets` library looks for one first): the sample is the rows streaming the address gives
    at the sampled positions, and the total is known without reading a row."""
    folder = tmp_path / "edu-org" / "corpus" / "sample" / "10BT"
    folder.mkdir(parents=True)
    for k in range(3):
        write_parquet(folder / f"{k:03d}_00000.parquet", 1_000 * k, 1_000, 100, ids=False)
    write_parquet(tmp_path / "edu-org" / "corpus" / "other.parquet", 0, 50, 50)  # outside the address
    monkeypatch.chdir(tmp_path)
    address = "hf://datasets/edu-org/corpus/sample/10BT"
    streamed = list(iter_documents([address]))
    assert len(streamed) == count_documents([address]) == 3_000
    sample = sample_documents([address], 300, seed=0)
    assert len(sample) == 300 and all(doc == streamed[p] for p, doc in sample)
    assert sample[0][1]["id"].startswith("10BT:")  # the default id of a row streamed from the address


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


def test_the_counting_pass_checks_ids_in_8_bytes_a_document(tmp_path):
    """Without --sample, every id read was held in a dict for the whole pass (~150 bytes a document: 15 GB for
    100M documents, in the counting pass and again while scoring). Now 8-byte hashes, a repeat confirmed by id."""
    import tracemalloc

    from edu_filter.annotate.score import DocumentStream

    src = tmp_path / "docs.jsonl"
    src.write_bytes(b"".join(orjson.dumps({"id": f"<urn:uuid:{i:032x}>", "text": "t"}) + b"\n"
                             for i in range(100_000)))
    tracemalloc.start()
    try:
        stream = DocumentStream([str(src)], "text", "id")
        _, counting = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        assert sum(1 for _ in stream) == stream.total == 100_000
        _, scoring = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert counting < 6 * 2**20 and scoring < 6 * 2**20, (counting, scoring)  # with a dict of the ids: 18 MB
    with open(src, "ab") as fh:
        fh.write(b'{"id": "<urn:uuid:%032x>", "text": "again"}\n' % 7)
    with pytest.raises(DocumentError, match=r"duplicate document id '<urn:uuid:0+7>' \(documents #8 and #100001\)"):
        DocumentStream([str(src)], "text", "id")


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


def test_a_larger_sample_holds_every_smaller_one_of_the_same_seed(tmp_path):
    """Growing --sample from 1,000 to 5,000 kept 33 of the first 1,000 documents of a JSONL input (reservoir
    sampling), and a Parquet input lost some at sizes where Python's random.sample changes its algorithm: answers
    paid for were left unused. Both samplers now give nested samples."""
    src = write_rows(tmp_path / "docs.jsonl", 10_000)
    files = [write_parquet(tmp_path / f"part-{k}.parquet", 20_000 * k, 20_000, 1000) for k in range(3)]
    for paths, sizes in (([str(src)], (10, 1_000, 5_000)), (files, (300, 20_000, 40_000))):
        samples = [{p for p, _ in sample_documents(paths, n, seed=3)} for n in sizes]
        assert [len(s) for s in samples] == list(sizes)
        assert samples[0] <= samples[1] <= samples[2]
        assert samples[1] != {p for p, _ in sample_documents(paths, sizes[1], seed=4)}


def test_a_sample_of_a_stream_keeps_its_documents_when_rows_are_removed_or_added(tmp_path):
    """A JSONL pool's sample was drawn by position: three bad rows removed near the start of a 3,000-row input
    redrew ~95% of a 200-document sample, all of it paid again. Drawn by id, the documents still there stay drawn;
    rows without ids (named by their line, which moves) by their text; a cache answering a sample drawn by position
    (`nested-1`) still draws that way."""
    import sqlite3

    from edu_filter.annotate.cache import recorded_sampler
    from edu_filter.documents import NESTED_SAMPLER, POSITION_SAMPLER

    src = write_rows(tmp_path / "docs.jsonl", 3_000)
    lines = src.read_text().splitlines(keepends=True)
    edited = tmp_path / "edited.jsonl"
    edited.write_text("".join(lines[:5] + lines[8:1500] + ['{"id": "new", "text": "an added document"}\n']
                              + lines[1500:]))
    ids = {sampler: [{doc["id"] for _, doc in sample_documents([str(path)], 200, seed=0, sampler=sampler)}
                     for path in (src, edited)] for sampler in (NESTED_SAMPLER, POSITION_SAMPLER)}
    before, after = ids[NESTED_SAMPLER]
    removed = {orjson.loads(line)["id"] for line in lines[5:8]}
    assert before - removed <= after and len(after - before) == len(before & removed)
    before, after = ids[POSITION_SAMPLER]
    assert len(before & after) < 100  # as it was: most of the sample drawn again
    no_ids = [line.replace('"id":"', '"was":"').replace('"text":"x', '"text":"' + str(k)) for k, line in
              enumerate(lines)]  # the same rows, named by their line (texts told apart)
    (tmp_path / "no_ids.jsonl").write_text("".join(no_ids))
    (tmp_path / "no_ids_edited.jsonl").write_text("".join(no_ids[:5] + no_ids[8:]))
    drawn = [{doc["was"] for _, doc in sample_documents([str(path)], 200, seed=0)}
             for path in (tmp_path / "no_ids.jsonl", tmp_path / "no_ids_edited.jsonl")]
    assert drawn[0] - removed <= drawn[1]
    with sqlite3.connect(tmp_path / "c.sqlite") as db:  # a cache of that edu-filter
        db.execute("CREATE TABLE facts (name TEXT PRIMARY KEY, value TEXT)")
        db.execute("INSERT INTO facts VALUES ('sampler', 'nested-1')")
    assert recorded_sampler(tmp_path / "c.sqlite") == POSITION_SAMPLER


def test_a_run_answering_a_sample_drawn_the_older_way_resumes_with_that_sample(tmp_path):
    """A cache holding answers of an edu-filter from before (no sampler recorded) was answering a sample drawn by
    reservoir sampling: a resumed run drawing another sample would ask for documents it never meant to."""
    import sqlite3

    from edu_filter.annotate.cache import recorded_sampler
    from edu_filter.annotate.score import score_documents
    from edu_filter.documents import LEGACY_SAMPLER, NESTED_SAMPLER

    src = write_rows(tmp_path / "docs.jsonl", 2_000)
    server = LLMTestServer().start()
    try:
        def run(n, cache):
            out = tmp_path / f"{cache}-{n}.jsonl"
            score_documents([str(src)], out, base_url=server.base_url, sample=n, seed=5, cache=str(tmp_path / cache),
                            show_progress=False)
            return [r["id"] for r in map(orjson.loads, out.read_bytes().splitlines())]

        first = run(20, "new.sqlite")
        asked = sum(server.requests.values())
        grown = run(40, "new.sqlite")
        assert set(first) < set(grown) and sum(server.requests.values()) - asked == 20  # only the 20 new ones
        assert recorded_sampler(tmp_path / "new.sqlite") == NESTED_SAMPLER

        older = tmp_path / "old.sqlite"
        run(20, "old.sqlite")
        with sqlite3.connect(older) as db:
            db.execute("DROP TABLE facts")  # as an edu-filter from before left it, answers in it
        assert recorded_sampler(older) == LEGACY_SAMPLER
        legacy = [doc["id"] for _, doc in sample_documents([str(src)], 20, seed=5, sampler=LEGACY_SAMPLER)]
        assert run(20, "old.sqlite") == legacy != first
        assert recorded_sampler(older) == LEGACY_SAMPLER  # and recorded as such now
        for name, sampler in (("old.sqlite-20", LEGACY_SAMPLER), ("new.sqlite-40", NESTED_SAMPLER)):  # reproducible
            record = json.loads((tmp_path / f"{name}.jsonl.provenance.json").read_text())
            assert record["settings"]["sampler"] == sampler

        # a cache started by a run without --sample (the answers of a whole input) is not taken for an older one
        whole = tmp_path / "whole?#%.sqlite"  # characters a URI must escape
        score_documents([str(src)], tmp_path / "whole.jsonl", base_url=server.base_url, cache=str(whole),
                        show_progress=False)
        assert recorded_sampler(whole) == NESTED_SAMPLER
    finally:
        server.stop()


def test_documents_held_for_a_run_keep_only_what_its_rows_hold(tmp_path):
    """A run holds its sample (or its active pool) to the end: an input's other fields were held with it, though the
    output rows hold id and text only."""
    files = [write_parquet(tmp_path / "part.parquet", 0, 50, 10)]
    for sample in (None, 5):
        docs = load_documents(files, "text", "id", sample=sample, seed=0)
        assert docs and all(set(doc) == {"id", "text"} for doc in docs)
