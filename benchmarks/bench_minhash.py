"""MinHash signature stage: datatrove's stock `MinhashDedupSignature` against edu-filter's `FastMinhashSignature`.

FineWeb settings (5-grams, 14 buckets x 8 hashes, 64-bit xxhash). Both stages run in this one process (one core) on
the same corpus: the bundled FineWeb documents repeated to `--mb` megabytes of text, each repeat a near-copy of its
original (one or two words replaced, deleted or inserted). Printed: each signature stage's MB/s per core (text
megabytes over the process's CPU seconds, so other load on the machine does not count; wall-clock figures beside
them), their ratio, whether the signature files are byte-identical, and the near-duplicate agreement after
datatrove's bucket and cluster stages run on each set of signatures: candidate pairs found by both / by stock only /
by the new stage only, and documents removed. The bucket, cluster and filter stages (datatrove's, unchanged) are timed
on the new signatures; reading the JSONL alone is the floor every stage pays. spaCy is loaded before any timing (a
one-off 1-3 s per process that both signature stages pay). Last, the n-gram decontamination filter (python-edu's
HumanEval check, which splits words the same way): datatrove's against edu-filter's, MB/s per core and whether every
verdict agrees.

    python benchmarks/bench_minhash.py            # ~14 MB of text (stock stage: about a minute)
    python benchmarks/bench_minhash.py --mb 64
"""

from __future__ import annotations

import argparse
import atexit
import json
import random
import shutil
import struct
import tempfile
import time
from pathlib import Path

import orjson

DATA = Path(__file__).resolve().parent.parent / "data" / "web"


def near_copy(text: str, rng: random.Random) -> str:
    words = text.split(" ")
    for _ in range(rng.randint(1, 2)):
        i = rng.randrange(len(words))
        kind = rng.choice(["replace", "delete", "insert"])
        if kind == "replace":
            words[i] = rng.choice(["indeed", "however", "Moreover,", "2024"])
        elif kind == "delete" and len(words) > 1:
            del words[i]
        else:
            words.insert(i, rng.choice(["really", "also", "(see below)"]))
    return " ".join(words)


def make_corpus(folder: Path, megabytes: float) -> tuple[int, int]:
    """The 2,000 bundled FineWeb documents (copy 0), then near-copies of all of them until `megabytes` of text."""
    rows = [json.loads(line) for name in ("fineweb_edu_llama3_train.jsonl", "fineweb_edu_llama3_val.jsonl")
            for line in (DATA / name).read_text().splitlines()]
    rng = random.Random(0)
    n_bytes = n_docs = 0
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "corpus.jsonl", "wb") as fh:
        copy = 0
        while n_bytes < megabytes * 1e6:
            for r in rows:
                text = near_copy(r["text"], rng) if copy else r["text"]
                fh.write(orjson.dumps({"id": f"{r['id']}-{copy}", "text": text}) + b"\n")
                n_bytes += len(text.encode())
                n_docs += 1
            copy += 1
    return n_docs, n_bytes


def timed(fn):
    """(wall seconds, CPU seconds of this process) of fn()."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def read_pairs(folder: Path) -> set:
    """Candidate duplicate pairs ((file, doc), (file, doc)) written by the bucket stage."""
    pairs = set()
    for path in folder.glob("*.dups"):
        for rec in struct.iter_unpack("<4I", path.read_bytes()):
            pairs.add(tuple(sorted([rec[:2], rec[2:]])))
    return pairs


def read_removed(folder: Path) -> set:
    return {(int(p.name.split(".")[0]), doc) for p in folder.glob("*.remove")
            for (doc,) in struct.iter_unpack("<I", p.read_bytes())}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=8.0, help="at least this many MB of text (whole repeats)")
    args = parser.parse_args()

    from datatrove.pipeline.dedup.minhash import (
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import JsonlReader

    from edu_filter.filters.dedup import check_hashing, fineweb_minhash_config
    from edu_filter.filters.minhash import FastMinhashSignature

    check_hashing()  # the stock stage needs xxhash<4
    # spaCy (and thinc, which imports torch) load once per process, 1-3 s, paid by both stages: not timed here
    from datatrove.utils.typeshelper import Languages
    from datatrove.utils.word_tokenizers import load_word_tokenizer

    load_word_tokenizer(Languages.english).word_tokenize("warm up")
    config = fineweb_minhash_config()
    tmp = Path(tempfile.mkdtemp(prefix="bench_minhash_"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    n_docs, n_bytes = make_corpus(tmp / "in", args.mb)
    mb = n_bytes / 1e6
    print(f"{n_docs} documents, {mb:.1f} MB of text, {config}")

    def reader():
        return JsonlReader(str(tmp / "in"))

    def buckets(name):
        for bucket in range(config.num_buckets):
            MinhashDedupBuckets(str(tmp / name / "sigs"), str(tmp / name / "buckets"), config=config).run(
                rank=bucket, world_size=config.num_buckets)

    def cluster(name):
        MinhashDedupCluster(str(tmp / name / "buckets"), str(tmp / name / "remove"), config=config).run()

    kept = []
    timings = {
        "read JSONL (floor)": timed(lambda: sum(1 for _ in reader().run())),
        "1 signatures, stock": timed(
            lambda: MinhashDedupSignature(str(tmp / "stock" / "sigs"), config=config).run(reader().run())),
        "1 signatures, fast": timed(
            lambda: FastMinhashSignature(str(tmp / "fast" / "sigs"), config=config).run(reader().run())),
        "2 buckets": timed(lambda: buckets("fast")),
        "3 cluster": timed(lambda: cluster("fast")),
        "4 filter": timed(lambda: kept.append(
            sum(1 for _ in MinhashDedupFilter(str(tmp / "fast" / "remove")).run(reader().run())))),
    }
    buckets("stock")
    cluster("stock")

    for name, (wall, cpu) in timings.items():
        print(f"{name:22s} {cpu:7.2f} s CPU {mb / cpu:8.2f} MB/s per core   (wall {wall:7.2f} s, {mb / wall:8.2f} MB/s)")
    stock_cpu, fast_cpu = timings["1 signatures, stock"][1], timings["1 signatures, fast"][1]
    print(f"signature stage: stock {mb / stock_cpu:.2f} MB/s per core, fast {mb / fast_cpu:.2f} MB/s per core, "
          f"{stock_cpu / fast_cpu:.1f}x faster")

    sig_files = sorted(p.relative_to(tmp / "stock" / "sigs") for p in (tmp / "stock" / "sigs").rglob("*.sig"))
    differing = [f for f in sig_files
                 if (tmp / "stock" / "sigs" / f).read_bytes() != (tmp / "fast" / "sigs" / f).read_bytes()]
    print(f"signature files byte-identical: {len(sig_files) - len(differing)} of {len(sig_files)}")

    stock_pairs, fast_pairs = read_pairs(tmp / "stock" / "buckets"), read_pairs(tmp / "fast" / "buckets")
    both = len(stock_pairs & fast_pairs)
    share = both / len(stock_pairs) if stock_pairs else float("nan")
    print(f"candidate duplicate pairs: both {both}, stock only {len(stock_pairs - fast_pairs)}, "
          f"fast only {len(fast_pairs - stock_pairs)} ({share:.2%} of the stock pairs found)")
    stock_removed, fast_removed = read_removed(tmp / "stock" / "remove"), read_removed(tmp / "fast" / "remove")
    print(f"documents removed: both {len(stock_removed & fast_removed)}, stock only "
          f"{len(stock_removed - fast_removed)}, fast only {len(fast_removed - stock_removed)}")
    print(f"kept {kept[0]} of {n_docs} documents (2000 originals, each with {n_docs // 2000 - 1} planted near-copies)")

    # the n-gram decontamination filter (python-edu's HumanEval check) splits words the same way: stock vs fast
    from datatrove.pipeline.decont.n_grams import NGramsDecontFilter

    from edu_filter.filters.dedup import FastNGramsDecontFilter, build_decont_index, decont_config

    build_decont_index([str(DATA.parent / "code" / "HumanEval.jsonl.gz")], str(tmp / "decont"), decont_config())
    verdicts = {}

    def decontaminate(step_class):
        step = step_class(str(tmp / "decont"), config=decont_config())
        verdicts[step_class] = [step.filter(doc) for doc in reader().run()]

    stock_wall, stock_cpu = timed(lambda: decontaminate(NGramsDecontFilter))
    fast_wall, fast_cpu = timed(lambda: decontaminate(FastNGramsDecontFilter))
    print(f"decontamination filter: stock {mb / stock_cpu:.2f} MB/s per core, fast {mb / fast_cpu:.2f} MB/s per core, "
          f"{stock_cpu / fast_cpu:.1f}x faster (wall {stock_wall:.1f} s vs {fast_wall:.1f} s); same verdicts: "
          f"{verdicts[NGramsDecontFilter] == verdicts[FastNGramsDecontFilter]}")


if __name__ == "__main__":
    main()
