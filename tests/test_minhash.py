"""FastMinhashSignature against datatrove's stock MinHash signature stage, on bundled FineWeb text.

The stock stage is the reference: the fast one must write the same signature files, so that datatrove's bucket,
cluster and filter stages find the same near-duplicate pairs from them.
"""

from __future__ import annotations

import gzip
import importlib
import itertools
import json
import pickle
import random
import struct
from pathlib import Path

import numpy as np
import orjson
import pytest
from datatrove.data import Document
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup.minhash import (
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.hashing import HashConfig
from datatrove.utils.text import TextNormConfig, simplify_text

from edu_filter.filters.dedup import fineweb_minhash_config
from edu_filter.filters.minhash import (
    ArrayMinhashDedupCluster,
    EnglishWordSplitter,
    FastMinhashSignature,
    SharedMinhashDedupBuckets,
    min_permuted_hashes,
    simplify_text_fast,
)

WEB = Path(__file__).resolve().parent.parent / "data" / "web"
MERSENNE = (1 << 61) - 1

# Hard cases for the splitter: contractions without apostrophes (spaCy special cases), digits next to letters and
# units, currency and other symbols, emoji with modifiers, combining marks, non-Latin scripts, odd whitespace.
ODD_PIECES = [
    "dont", "don't", "cannot", "I'm", "im", "id", "gonna", "y'all", "whos", "10am", "5pm", "10km", "3.5kg", "£20m",
    "€5", "$10", "50%", "1st", "21°C", "x²", "½", "naïve", "café", "Ångström", "ﬁne", "İstanbul", "straße",
    "Привет", "10км", "日本語", "한국어", "العربية", "٣٤٥", "१२३", "😀", "👍🏽", "❤️", "🇬🇧", "©", "®", "™", "•", "·",
    "…", "—", "‘quoted’", "“double”", "«guillemets»", "e.g.", "U.S.", "http://example.com/a?b=c", "user@mail.com",
    "#tag", "C++", "3:30", "2023-01-05", "a/b", "it's", "rock'n'roll", "\u0301", "a\u0301", "\u200b", "\u00a0",
    "\u2028", "\x1c", "\x85", "\u3000", "\t", "\n\n", "IS_ALPHA", "ಠ_ಠ", ":)", "§3", "№5", "℃", "Ⅻ", "ﾊﾝｶｸ", "Ⓐ",
    "𝓗𝓮𝓵𝓵𝓸", "ŉ", "ΐ", "0x1F", "v2.0", "mp3", "covid-19", "’s", "‘s", "em", "nothin'", "cant", "wont",
]


def fineweb_texts() -> list[str]:
    return [json.loads(line)["text"] for line in (WEB / "fineweb_edu_llama3_val.jsonl").read_text().splitlines()]


def odd_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    plain = ["word", "data", "more", "text", "some", "x", "a", "i"]
    texts = []
    for _ in range(n):
        words = [rng.choice(ODD_PIECES) if rng.random() < 0.5 else rng.choice(plain) for _ in range(rng.randint(0, 40))]
        texts.append("".join(w + rng.choice([" ", " ", "", "\n", ", ", ". ", "-", "'"]) for w in words))
    return texts


def edit_lightly(text: str, rng: random.Random) -> str:
    """A near-copy: one or two words replaced, deleted or inserted (Jaccard of 5-gram sets stays above ~0.9)."""
    words = text.split(" ")
    for _ in range(rng.randint(1, 2)):
        i = rng.randrange(len(words))
        kind = rng.choice(["replace", "delete", "insert"])
        if kind == "replace":
            words[i] = rng.choice(["indeed", "however", "Moreover,", "2024"])
        elif kind == "delete":
            del words[i]
        else:
            words.insert(i, rng.choice(["really", "also", "(see below)"]))
    return " ".join(words)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Two JSONL files (two tasks): 200 FineWeb documents, 40 near-copies of long ones, and two edge-case documents.

    (datatrove's readers drop documents without text before any stage sees them; the empty case is tested below.)
    """
    rng = random.Random(12)
    texts = fineweb_texts()[:200]
    rows = [{"id": f"orig-{i}", "text": t} for i, t in enumerate(texts)]
    long_ones = [i for i, t in enumerate(texts) if len(t.split()) >= 250][:30]
    copies = {}
    for k, i in enumerate(long_ones + long_ones[:10]):  # 10 originals get two copies (a cluster of three)
        rows.append({"id": f"copy-{k}-of-{i}", "text": edit_lightly(texts[i], rng)})
        copies.setdefault(f"orig-{i}", []).append(f"copy-{k}-of-{i}")
    rows += [{"id": "short", "text": "Only four words here."}, {"id": "unicode", "text": " ".join(ODD_PIECES * 3)}]
    rng.shuffle(rows)
    folder = tmp_path_factory.mktemp("planted") / "in"
    folder.mkdir()
    half = len(rows) // 2
    for name, part in (("a.jsonl", rows[:half]), ("b.jsonl", rows[half:])):
        (folder / name).write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in part))
    return {"folder": folder, "groups": copies, "n_docs": len(rows)}


def run_minhash(step_class, input_folder: Path, out: Path) -> dict:
    """datatrove's four MinHash stages, with `step_class` as stage 1; returns candidate pairs and removed ids."""
    config = fineweb_minhash_config()
    LocalPipelineExecutor([JsonlReader(str(input_folder)), step_class(str(out / "sigs"), config=config)],
                          tasks=2, logging_dir=str(out / "logs/sigs"), workers=1).run()
    LocalPipelineExecutor([MinhashDedupBuckets(str(out / "sigs"), str(out / "buckets"), config=config)],
                          tasks=config.num_buckets, logging_dir=str(out / "logs/buckets"), workers=1).run()
    LocalPipelineExecutor([MinhashDedupCluster(str(out / "buckets"), str(out / "remove"), config=config)],
                          tasks=1, logging_dir=str(out / "logs/cluster"), workers=1).run()
    LocalPipelineExecutor([JsonlReader(str(input_folder)),
                           MinhashDedupFilter(str(out / "remove"), exclusion_writer=JsonlWriter(str(out / "removed"))),
                           JsonlWriter(str(out / "kept"))],
                          tasks=2, logging_dir=str(out / "logs/filter"), workers=1).run()
    pairs = set()
    for path in (out / "buckets").glob("*.dups"):
        data = path.read_bytes()
        for rec in struct.iter_unpack("<4I", data):
            pairs.add(tuple(sorted([rec[:2], rec[2:]])))
    removed = {json.loads(line)["id"] for f in (out / "removed").glob("*.jsonl*") for line in _lines(f)}
    kept = {json.loads(line)["id"] for f in (out / "kept").glob("*.jsonl*") for line in _lines(f)}
    return {"pairs": pairs, "removed": removed, "kept": kept, "sigs": out / "sigs"}


def _lines(path: Path):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as fh:
        yield from fh


@pytest.fixture(scope="module")
def both_runs(planted, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    return {
        "stock": run_minhash(MinhashDedupSignature, planted["folder"], out / "stock"),
        "fast": run_minhash(FastMinhashSignature, planted["folder"], out / "fast"),
    }


@pytest.mark.slow
def test_signature_files_are_byte_identical_to_stock(both_runs):
    stock, fast = both_runs["stock"]["sigs"], both_runs["fast"]["sigs"]
    files = sorted(p.relative_to(stock) for p in stock.rglob("*.minhash.sig"))
    assert len(files) == 14 * 2  # 14 buckets x 2 tasks
    assert files == sorted(p.relative_to(fast) for p in fast.rglob("*.minhash.sig"))
    for rel in files:
        assert (stock / rel).read_bytes() == (fast / rel).read_bytes(), rel


@pytest.mark.slow
def test_datatrove_stages_find_the_same_pairs_as_with_stock_signatures(both_runs):
    stock, fast = both_runs["stock"], both_runs["fast"]
    assert stock["pairs"], "the stock stage found no pairs: the planted corpus is broken"
    found = len(stock["pairs"] & fast["pairs"]) / len(stock["pairs"])
    assert found >= 0.99
    assert not fast["pairs"] - stock["pairs"], "pairs the stock signatures do not flag"
    assert fast["removed"] == stock["removed"] and fast["kept"] == stock["kept"]


@pytest.mark.slow
def test_dedup_collapses_planted_near_copies(planted, both_runs):
    fast = both_runs["fast"]
    assert fast["removed"], "dedup removed nothing: MinHash is silently broken"
    collapsed = 0
    for original, copies in planted["groups"].items():
        members = {original, *copies}
        collapsed += len(members & fast["kept"]) == 1
        assert members & fast["kept"], "a whole group of near-duplicates vanished"
    assert collapsed >= 0.95 * len(planted["groups"])
    # every document is kept or removed; the short one has no signature and is always kept
    assert len(fast["kept"]) + len(fast["removed"]) == planted["n_docs"]
    assert {"short", "unicode"} <= fast["kept"]


@pytest.mark.slow
def test_a_bucket_shared_among_tasks_finds_the_pairs_of_one_task_though_the_first_file_is_empty(both_runs, tmp_path):
    """One task per bucket merges a signature of every document of the corpus (half a day at 15 TB); shared by 3,
    each merges a third of the hash range. datatrove cuts the ranges at quantiles of the bucket's first file, rank
    0's, which in a score-first run may hold no survivor at all: its assertion failed every task of the bucket."""
    config = fineweb_minhash_config()
    sigs = tmp_path / "sigs"
    for f in both_runs["fast"]["sigs"].rglob("*.minhash.sig"):
        (sigs / f.parent.name).mkdir(parents=True, exist_ok=True)
        (sigs / f.parent.name / f"{int(f.name.split('.')[0]) + 1:05d}.minhash.sig").write_bytes(f.read_bytes())
        (sigs / f.parent.name / "00000.minhash.sig").write_bytes(b"")  # rank 0 kept nothing to deduplicate

    def merged(step_class, workers: int, name: str) -> list:
        for rank in range(config.num_buckets * workers):
            step_class(str(sigs), str(tmp_path / name), config=config).run(rank=rank,
                                                                           world_size=config.num_buckets * workers)
        files = sorted((tmp_path / name).glob("*.dups"))
        assert len(files) == config.num_buckets * workers
        return sorted(tuple(sorted([r[:2], r[2:]])) for f in files for r in struct.iter_unpack("<4I", f.read_bytes()))

    one = merged(MinhashDedupBuckets, 1, "one")
    assert one and merged(SharedMinhashDedupBuckets, 3, "shared") == one
    with pytest.raises(AssertionError, match="there are only 0 lines"):
        merged(MinhashDedupBuckets, 3, "stock")
    step = SharedMinhashDedupBuckets(str(sigs), str(tmp_path / "x"), config=config)
    files = step.input_folder.list_files(subdirectory="bucket_000")
    ranges = [step.get_worker_hash_range(files, rank, 3 * config.num_buckets) for rank in range(3)]
    assert ranges[0][0] == 0 and ranges[0][1] == ranges[1][0] < ranges[1][1] == ranges[2][0] < ranges[2][1]


def _clusters(buckets: Path) -> list[list[tuple[int, int]]]:
    """The clusters the pairs in `buckets` make, each sorted (a plain union-find)."""
    parent: dict = {}

    def root(x):
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    for path in sorted(buckets.glob("*.dups")):
        for f1, d1, f2, d2 in struct.iter_unpack("<4I", path.read_bytes()):
            a, b = root((f1, d1)), root((f2, d2))
            parent[max(a, b)] = min(a, b)
    found: dict = {}
    for x in parent:
        found.setdefault(root(x), []).append(x)
    return [sorted(c) for c in found.values()]


def _removed(folder: Path) -> set[tuple[int, int]]:
    out = set()
    for path in folder.glob("*.remove"):
        positions = np.frombuffer(path.read_bytes(), "<u4")
        assert (np.diff(positions.astype(np.int64)) > 0).all()  # ascending, as datatrove's filter reads them
        out |= {(int(path.stem), int(p)) for p in positions}
    return out


@pytest.mark.slow
def test_the_array_cluster_stage_keeps_one_document_of_each_cluster_as_datatrove_does(both_runs, tmp_path):
    """Its clusters, counts and stats are datatrove's; the copy kept is each cluster's first read (file, then
    position), where datatrove's is the root its union by size happened to leave."""
    buckets = both_runs["fast"]["sigs"].parent / "buckets"
    config = fineweb_minhash_config()
    stock = MinhashDedupCluster(str(buckets), str(tmp_path / "stock"), config=config)
    arrays = ArrayMinhashDedupCluster(str(buckets), str(tmp_path / "arrays"), config=config)
    stock.run()
    arrays.run()
    clusters, removed = _clusters(buckets), _removed(tmp_path / "arrays")
    assert len(clusters) > 20 and len(removed) == len(_removed(tmp_path / "stock"))
    for cluster in clusters:
        assert [x for x in cluster if x not in removed] == cluster[:1]
    for name in ("duplicates", "to_remove", "cluster_size"):
        a, b = stock.stats[name], arrays.stats[name]
        assert (a.total, a.n, a.min, a.max, a.unit) == (b.total, b.n, b.min, b.max, b.unit), name
        assert a.variance == pytest.approx(b.variance), name


def test_the_array_cluster_stage_holds_about_fifty_bytes_a_document(tmp_path):
    """datatrove's union-find, a dict of tuples, took ~170 bytes per document with a near duplicate (~340 GB in
    its one task for 2B such documents); a bucket's pairs at a time, as its bucket stage writes them. (Traced
    memory: the benchmark measures the resident peak, ~45 bytes, sorts' scratch included.)"""
    import tracemalloc

    importlib.import_module("scipy.sparse.csgraph")  # its modules loaded before the measure

    rng = np.random.default_rng(0)
    docs, files = 200_000, 16
    sizes = np.minimum(rng.geometric(0.6, size=docs) + 1, 20)
    sizes = sizes[np.cumsum(sizes) <= docs]
    members = rng.permutation(docs)[: sizes.sum()]
    keys = np.stack([members % files, members // files], axis=1).astype("<u4")
    starts = np.cumsum(sizes) - sizes
    (tmp_path / "b").mkdir()
    for bucket in range(14):
        found = rng.random(len(sizes)) < 0.8
        first = np.concatenate([np.arange(s, s + n - 1) for s, n in zip(starts[found], sizes[found])])
        np.concatenate([keys[first], keys[first + 1]], axis=1).tofile(tmp_path / "b" / f"{bucket:05d}_00.dups")
    step = ArrayMinhashDedupCluster(str(tmp_path / "b"), str(tmp_path / "remove"), config=fineweb_minhash_config())
    tracemalloc.start()
    try:
        step.run()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert step.stats["duplicates"].total == sizes.sum() and step.stats["cluster_size"].n == len(sizes)
    assert len(_removed(tmp_path / "remove")) == sizes.sum() - len(sizes)
    assert peak < 80 * sizes.sum(), peak / sizes.sum()


def test_splitter_reproduces_spacy_words_on_fineweb_and_hard_text():
    stock = MinhashDedupSignature("memory://unused", config=fineweb_minhash_config())
    splitter = EnglishWordSplitter()
    texts = fineweb_texts()[200:320] + odd_texts(400)
    for text in texts:
        simplified = simplify_text(text)
        assert simplify_text_fast(text) == simplified
        assert splitter.split(simplified) == stock.word_tokenizer.word_tokenize(simplified), text


def test_splitter_special_cases():
    splitter = EnglishWordSplitter()
    assert splitter.split("we dont know what cannot be") == ["we", "do", "nt", "know", "what", "can", "not", "be"]
    assert splitter.split("0 0km £0m 0th 0") == ["0", "0", "km", "£", "0", "m", "0th", "0"]
    assert splitter.split("plain words stay whole") == ["plain", "words", "stay", "whole"]
    assert splitter.split("") == [] and splitter.joined("") == ""
    assert splitter.split("a  b") == ["a", "b"]  # double space left by a removed combining mark


def test_splitter_with_a_tiny_cache_still_splits_correctly():
    big, tiny = EnglishWordSplitter(), EnglishWordSplitter(max_cached_chunks=2)
    for text in odd_texts(60, seed=3):
        simplified = simplify_text(text)
        assert tiny.split(simplified) == big.split(simplified)
    assert len(tiny._cache) <= 2


def test_text_without_spaces_is_split_as_spacy_does_without_filling_the_cache():
    """Thai or CJK paragraphs are chunks of thousands of characters that never come back: cached, 60,000 of them
    took 1.2 GB (5 GB at the entry cap)."""
    import random

    stock = MinhashDedupSignature("memory://unused", config=fineweb_minhash_config())
    splitter = EnglishWordSplitter()
    rng = random.Random(0)
    for _ in range(20):
        text = " ".join("".join(chr(rng.randrange(0x0E01, 0x0E2F)) for _ in range(rng.randrange(200, 3000)))
                        for _ in range(3)) + " plain words, and numbers 12"
        simplified = simplify_text(text)
        assert splitter.split(simplified) == stock.word_tokenizer.word_tokenize(simplified)
    assert max(map(len, splitter._cache), default=0) <= 64


def test_simplify_text_fast_matches_datatrove_for_every_norm_config():
    fields = ["lowercase", "norm_whitespace", "remove_punctuation", "norm_unicode_diacritics", "norm_numbers",
              "norm_weekdays", "norm_monthnames"]
    texts = odd_texts(15, seed=1) + ["Monday, 3 January 2022:\tThe café’s  naïve\u2028cost €1,000.50!"]
    for combo in itertools.product([False, True], repeat=len(fields)):
        config = TextNormConfig(**dict(zip(fields, combo)))
        for text in texts:
            assert simplify_text_fast(text, config) == simplify_text(text, config), (combo, text)


def test_a_long_document_is_simplified_and_hashed_in_pieces_with_the_same_values(monkeypatch):
    """Long texts go through the regexes in pieces cut after whitespace, their shingles hashed in blocks: the cuts
    (here every few dozen characters) change no value."""
    from edu_filter.filters import minhash

    monkeypatch.setattr(minhash, "_SIMPLIFY_PIECE_CHARS", 40)
    monkeypatch.setattr(minhash, "SHINGLES_PER_BLOCK", 7)
    texts = [t for t in odd_texts(40, seed=3) + fineweb_texts()[:5] if len(t) > 40]
    texts += ["Monday  3.14\n\n\t January" * 30, "x" * 200 + " 12.5 " + "ΣΟΔ " * 20, "   lead and trail   " * 9]
    fields = ["lowercase", "norm_whitespace", "remove_punctuation", "norm_numbers", "norm_weekdays", "norm_monthnames"]
    for combo in itertools.product([False, True], repeat=len(fields)):
        config = TextNormConfig(**dict(zip(fields, combo)))
        for text in texts:
            assert simplify_text_fast(text, config) == simplify_text(text, config), (combo, text[:80])
    config = fineweb_minhash_config()
    stock, fast = MinhashDedupSignature("memory://a", config=config), FastMinhashSignature("memory://b", config=config)
    for text in texts:
        assert np.array_equal(fast.get_shingles(text), stock.get_shingles(text))


def test_a_long_document_costs_a_few_bytes_per_character(monkeypatch, tmp_path):
    """A 50 MB document took ~2.9 GB in the signature stage (every word listed by str.split and re.sub, every
    shingle's offsets and hash as Python ints at once): a 1 GB Parquet document was killed for memory on every
    rerun. Now ~5 bytes per character (its copies, the words' offsets and the hashes as arrays), and as little in
    the decontamination filter."""
    import tracemalloc

    from edu_filter.filters import minhash

    monkeypatch.setattr(minhash, "SHINGLES_PER_BLOCK", 1 << 14)  # the blocks' own cost, fixed, out of the measure
    words = "the quick brown fox, jumps over a lazy dog; reading 12 books about science (and history).".split()
    rng = random.Random(0)
    text = " ".join(rng.choice(words) for _ in range(1_000_000))
    step = FastMinhashSignature("memory://a", config=fineweb_minhash_config())
    step.get_shingles("warm up the splitter: its cache and spaCy")
    # and the decontamination filter, which keeps the digits (a chunk spaCy splits) and looks its hashes up
    from datatrove.data import Document

    from edu_filter.filters.dedup import FastNGramsDecontFilter, build_decont_index, decont_config

    index = str(tmp_path / "decont")
    build_decont_index([str(Path(__file__).parents[1] / "data" / "code" / "HumanEval.jsonl.gz")], index)
    decont = FastNGramsDecontFilter(index, config=decont_config())
    decont.filter(Document(text="warm up", id="0"))
    for run in (lambda: step.get_shingles(text), lambda: decont.filter(Document(text=text, id="1"))):
        tracemalloc.start()
        try:
            run()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 8 * len(text), peak / len(text)


@pytest.mark.parametrize("text,n_shingles", [
    ("", 0),
    ("   \n\t ", 0),
    ("!!! ... ???", 0),
    ("Only four words here.", 0),
    ("Exactly five words are here.", 1),
    ("We don't know: 10km, £20m — naïve café 😀 日本語 text here.", None),
])
def test_shingles_equal_stock_on_edge_cases(text, n_shingles):
    config = fineweb_minhash_config()
    stock, fast = MinhashDedupSignature("memory://a", config=config), FastMinhashSignature("memory://b", config=config)
    expected, got = stock.get_shingles(text), fast.get_shingles(text)
    assert got.dtype == np.uint64 and got.shape == expected.shape and np.array_equal(got, expected)
    if n_shingles is not None:
        assert len(got) == n_shingles
    if got.size:
        assert fast.get_signature(got) == stock.get_signature(expected)


@pytest.mark.parametrize("config", [
    MinhashConfig(hash_config=HashConfig(precision=32, hash_fc="xxhash")),
    MinhashConfig(n_grams=3, num_buckets=4, hashes_per_bucket=5, hash_config=HashConfig(precision=64, hash_fc="sha1")),
    MinhashConfig(norm_config=TextNormConfig(remove_punctuation=False)),  # falls back to datatrove's word tokenizer
], ids=["xxhash32", "sha1-3gram", "keep-punctuation"])
def test_other_configs_match_stock(config):
    stock, fast = MinhashDedupSignature("memory://a", config=config), FastMinhashSignature("memory://b", config=config)
    for text in fineweb_texts()[:15] + odd_texts(15, seed=2):
        expected, got = stock.get_shingles(text), fast.get_shingles(text)
        assert np.array_equal(got, expected)
        if got.size:
            assert fast.get_signature(got) == stock.get_signature(expected)


def test_mersenne_reduction_matches_modulo_including_wraparound_edges():
    rng = np.random.default_rng(0)
    edges = np.array([0, 1, MERSENNE - 8, MERSENNE - 1, MERSENNE, MERSENNE + 1, 2 * MERSENNE, 2 * MERSENNE + 6,
                      (1 << 63), (1 << 64) - 1, (1 << 64) - 9], dtype=np.uint64)
    shingles = np.concatenate([edges, rng.integers(0, 2**64 - 1, size=3000, dtype=np.uint64)]).reshape(-1, 1)
    a = np.concatenate([[1, 2, 7], rng.integers(1, MERSENNE, size=29)]).astype(np.uint64).reshape(1, -1)
    b = np.concatenate([[0, 0, 5], rng.integers(0, MERSENNE, size=29)]).astype(np.uint64).reshape(1, -1)
    modulo = np.uint64(MERSENNE)
    for i in range(len(edges)):  # each edge alone, so that no smaller value elsewhere hides it
        row = edges[i : i + 1].reshape(-1, 1)
        assert np.array_equal(min_permuted_hashes(row, a, b), np.min((row * a + b) % modulo, axis=0))
    expected = np.min((shingles * a + b) % modulo, axis=0)  # several blocks of 1024 rows
    assert np.array_equal(min_permuted_hashes(shingles, a, b), expected)
    masked = np.min(((shingles * a + b) % modulo) & np.uint64(0xFFFFFFFF), axis=0)
    assert np.array_equal(min_permuted_hashes(shingles, a, b, precision=32), masked)


def test_step_pickles_after_use_and_keeps_working(tmp_path):
    step = FastMinhashSignature(str(tmp_path / "sigs"), config=fineweb_minhash_config())
    text = fineweb_texts()[0]
    before = step.get_shingles(text)
    clone = pickle.loads(pickle.dumps(step))
    assert np.array_equal(clone.get_shingles(text), before)


def test_run_writes_the_stock_files_for_documents_without_signatures(tmp_path):
    """Empty and short documents get no record, and the doc indices of the others skip them, as in datatrove."""
    docs = [Document(text=t, id=str(i)) for i, t in enumerate(["", fineweb_texts()[1], "too short", fineweb_texts()[2]])]
    config = fineweb_minhash_config()
    MinhashDedupSignature(str(tmp_path / "stock"), config=config).run(iter(docs))
    FastMinhashSignature(str(tmp_path / "fast"), config=config).run(iter(docs))
    for bucket in range(config.num_buckets):
        rel = f"bucket_{bucket:03d}/00000.minhash.sig"
        data = (tmp_path / "fast" / rel).read_bytes()
        assert data == (tmp_path / "stock" / rel).read_bytes()
        assert sorted(rec[-1] for rec in struct.iter_unpack("<8QI", data)) == [1, 3]


def test_pickled_step_leaves_spacy_behind():
    step = FastMinhashSignature("memory://sigs", config=fineweb_minhash_config())
    step.get_shingles(fineweb_texts()[0])  # loads spaCy
    assert len(pickle.dumps(step)) < 50_000
