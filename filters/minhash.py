"""A cheaper first MinHash stage: datatrove's `MinhashDedupSignature`, same signature files, many times faster.

datatrove's signature stage spends ~90% of its time in spaCy, which builds a `Doc` (and runs a sentencizer) just to
split text that `simplify_text` has already lowercased, stripped of punctuation and reduced to single spaces. On such
text spaCy's English tokenizer leaves every space-separated chunk of plain letters alone, except ~190 contractions
written without apostrophes (`dont` -> `do nt`, `cannot` -> `can not`). `EnglishWordSplitter` therefore
splits on spaces and sends only the rare other chunks (digits mixed with letters, symbols, non-Latin scripts,
contractions) to spaCy's own tokenizer, caching the answers: the words are exactly spaCy's, so the shingles, their
xxhash values and the signature files are byte-for-byte those of the stock stage.

The remaining costs are cut without changing a value: `simplify_text_fast` does datatrove's text normalisation with
C-level string operations, shingle hashes are taken on slices of one UTF-8 buffer per document (no n-gram tuples or
joined strings), and the permutation step reduces modulo the Mersenne prime 2**61-1 with shifts and masks instead of
a 64-bit division, in blocks so that long documents do not allocate (shingles x 112) matrices at once.

Bucket, cluster and filter stages are datatrove's: they read these files as they read the stock ones. A bucket's
merge may be shared among several tasks (`SharedMinhashDedupBuckets`: datatrove's hash ranges, cut where the
signatures are rather than where one task's file says). It hashes bytes, never str, so it does not rely on the str
hashing that xxhash 4.x dropped.
"""

from __future__ import annotations

import posixpath
import re
import struct
import unicodedata
from collections.abc import Iterator

import numpy as np
from datatrove.data import DocumentsPipeline
from datatrove.io import DataFolderLike
from datatrove.pipeline.dedup.minhash import (
    SENTINEL,
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupSignature,
    _mersenne_prime,
)
from datatrove.utils.hashing import HashConfig, create_hash_func
from datatrove.utils.text import (
    MONTHS_PATTERN,
    NUMBERS_PATTERN,
    PUNCTUATION,
    WEEKDAYS_PATTERN,
    TextNormConfig,
)
from datatrove.utils.typeshelper import Languages
from datatrove.utils.word_tokenizers import SpaCyTokenizer, load_word_tokenizer

__all__ = ["EnglishWordSplitter", "FastMinhashSignature", "SharedMinhashDedupBuckets", "min_permuted_hashes",
           "shingle_hashes", "simplify_text_fast"]

_PUNCTUATION_RE = re.compile("[" + "".join(sorted({re.escape(c) for c in PUNCTUATION})) + "]")
_WHITESPACE_RE = re.compile(r"\s+")  # the whitespace str.split() splits on (both use Py_UNICODE_ISSPACE)
SHINGLES_PER_BLOCK = 1 << 18  # shingles hashed at once: their offsets as Python ints are ~18 MB
_SIMPLIFY_PIECE_CHARS = 1 << 20  # a longer text is normalised and split into words a piece at a time
_ROWS_PER_BLOCK = 1024  # shingles permuted at once: 1024 x 112 uint64 is ~0.9 MB
_MASK_61 = np.uint64(_mersenne_prime)
_SHIFT_61 = np.uint64(61)


def _strip_diacritics(text: str) -> str:
    """NFD, then drop nonspacing marks (Mn): datatrove's generator over every character, done with str methods."""
    if text.isascii():
        return text
    text = unicodedata.normalize("NFD", text)
    marks = [c for c in set(text) if c > "\x7f" and unicodedata.category(c) == "Mn"]
    if not marks:
        return text
    if len(marks) == 1:
        return text.replace(marks[0], "")
    return text.translate(dict.fromkeys(map(ord, marks)))


def simplify_text_fast(text: str, config: TextNormConfig | None = None) -> str:
    """Same output as `datatrove.utils.text.simplify_text` for every `TextNormConfig`, ~5x cheaper.

    Same steps in the same order; punctuation goes through one regex character class instead of a dict-based
    `str.translate`, whitespace through `str.split`, and diacritics are only looked for in non-ASCII text. A long
    text goes through the regexes in pieces cut after a whitespace character (where no pattern match can span), its
    whitespace through a regex: `re.sub` and `str.split` hold every piece of their output as a string at once, ~15
    bytes per character of a 50 MB document.
    """
    config = config or TextNormConfig()
    if len(text) <= _SIMPLIFY_PIECE_CHARS:
        text = _simplify_piece(text, config)
        if config.norm_whitespace:
            text = " ".join(text.split())
    else:  # whitespace with a regex, piece by piece: str.split() would list every word of the document
        pieces = (_simplify_piece(piece, config) for piece in _pieces_after_whitespace(text))
        if config.norm_whitespace:
            pieces = (_WHITESPACE_RE.sub(" ", piece) for piece in pieces)
        text = "".join(pieces)
        if config.norm_whitespace:  # a whitespace run cut between two pieces left a double space
            while "  " in text:
                text = text.replace("  ", " ")
            text = text.strip(" ")
    if config.norm_unicode_diacritics:
        text = _strip_diacritics(text)
    return text.strip()


def _pieces_after_whitespace(text: str) -> Iterator[str]:
    """Consecutive slices of `text` of about _SIMPLIFY_PIECE_CHARS, each ending just after a space or line break
    (longer where there is none)."""
    start = 0
    while start < len(text):
        end = start + _SIMPLIFY_PIECE_CHARS
        if end < len(text):
            cut = max(text.rfind(" ", start, end), text.rfind("\n", start, end))
            if cut < 0:
                found = [i for i in (text.find(" ", end), text.find("\n", end)) if i >= 0]
                cut = min(found) if found else len(text) - 1
            end = cut + 1
        yield text[start:end]
        start = end


def _simplify_piece(text: str, config: TextNormConfig) -> str:
    """simplify_text's steps before whitespace (see the caller)."""
    if config.lowercase:
        text = text.lower()
    if config.norm_numbers:
        text = NUMBERS_PATTERN.sub("0", text)
    if config.norm_weekdays:
        text = WEEKDAYS_PATTERN.sub("WEEKDAY", text)
    if config.norm_monthnames:
        text = MONTHS_PATTERN.sub("MONTH", text)
    if config.remove_punctuation:
        text = _PUNCTUATION_RE.sub(" ", text)
    return text


def _trie_pattern(words: list[str]) -> str:
    """One regex alternation shaped as a prefix tree: `re` tries a flat 180-word alternation branch by branch."""
    trie: dict = {}
    for word in words:
        node = trie
        for ch in word:
            node = node.setdefault(ch, {})
        node[""] = {}

    def emit(node: dict) -> str:
        branches = [re.escape(ch) + emit(child) for ch, child in sorted(node.items()) if ch]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return f"(?:{body})?" if "" in node else body

    return emit(trie)


MAX_CACHED_CHUNK_CHARS = 64  # with 2**18 chunks at most, the cache stays under ~50 MB


class EnglishWordSplitter:
    """Splits `simplify_text` output into exactly the words of datatrove's spaCy English word tokenizer.

    Valid for text normalised with lowercase, punctuation removal and whitespace normalisation on (datatrove's and
    FineWeb's default). A chunk between spaces that is plain a-z letters and not one of spaCy's letter-only special
    cases, or the number placeholder `0`, is one spaCy token; every other chunk is split by spaCy's tokenizer itself
    (its output does not depend on the neighbouring chunks) and remembered, so a corpus pays spaCy once per distinct
    unusual chunk.
    """

    def __init__(self, max_cached_chunks: int = 1 << 18):
        # the very spaCy pipeline datatrove's English word tokenizer uses (only its tokenizer is called here)
        self._nlp = load_word_tokenizer(Languages.english).tokenizer
        letter_rules = sorted(k for k in self._nlp.tokenizer.rules if re.fullmatch("[a-z]+", k))
        # a space, then a chunk with a character other than a-z (but not the lone number placeholder "0"), or a
        # letter-only special case; the leading literal space lets `re` skip ahead quickly between chunks
        self._unusual_chunk = re.compile(
            r" ((?!0(?: |\Z))[^ ]*[^a-z ][^ ]*|" + _trie_pattern(letter_rules) + r"(?![^ ]))"
        )
        self._cache: dict[str, str] = {}
        self.max_cached_chunks = max_cached_chunks

    def split_chunk(self, chunk: str) -> str:
        """spaCy's words for one space-free chunk, joined by spaces (datatrove drops whitespace-only tokens)."""
        words = self._cache.get(chunk)
        if words is None:
            if len(self._cache) >= self.max_cached_chunks:
                self._cache.clear()
            with self._nlp.memory_zone():  # keeps spaCy's string store from growing with every new chunk
                words = " ".join(t for t in (tok.text.strip() for tok in self._nlp.tokenizer(chunk)) if t)
            if len(chunk) <= MAX_CACHED_CHUNK_CHARS:  # long chunks (Thai, CJK: a paragraph without spaces) never
                self._cache[chunk] = words            # come back, and would fill the cache with GBs
        return words

    def _replace(self, match: re.Match) -> str:
        words = self.split_chunk(match.group(1))
        return " " + words if words else ""

    def joined(self, simplified: str) -> str:
        """The words joined by single spaces ("" for no words): what shingles are cut from. A long text is split a
        piece at a time (re.sub holds every piece of its output at once: a document of digits and symbols)."""
        if "  " in simplified:  # removing diacritics can leave two spaces around a lone combining mark
            simplified = _WHITESPACE_RE.sub(" ", simplified).strip(" ")
        if len(simplified) <= _SIMPLIFY_PIECE_CHARS:
            return self._unusual_chunk.sub(self._replace, " " + simplified)[1:]
        words = (self._unusual_chunk.sub(self._replace, " " + piece.rstrip(" "))[1:]
                 for piece in _pieces_after_whitespace(simplified))
        return " ".join(piece for piece in words if piece)  # a piece whose chunks all split into nothing

    def split(self, simplified: str) -> list[str]:
        text = self.joined(simplified)
        return text.split(" ") if text else []


def shingle_hashes(joined: str, n_grams: int, hash_bytes) -> np.ndarray:
    """Hashes of every n-gram of the space-separated words in `joined`, as uint64 of shape (n_shingles, 1).

    The bytes hashed for an n-gram are `" ".join(words).encode()`, what datatrove hashes, taken as slices of the
    document's UTF-8 buffer (a space byte never occurs inside a multi-byte character).
    """
    data = joined.encode("utf-8")
    if not data:
        return np.empty((0, 1), dtype=np.uint64)
    spaces = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 32)
    n_shingles = len(spaces) + 1 - n_grams + 1
    if n_shingles <= 0:
        return np.empty((0, 1), dtype=np.uint64)
    hashes = np.empty(n_shingles, dtype=np.uint64)
    # word w starts after space w - 1 (the first at 0) and ends at space w (the last at the end): a block's offsets
    # are read off `spaces`, as Python ints a block at a time (a long document's at once were ~27 bytes a character)
    for first in range(0, n_shingles, SHINGLES_PER_BLOCK):
        last = min(first + SHINGLES_PER_BLOCK, n_shingles)
        starts = ([0] if first == 0 else []) + (spaces[max(first - 1, 0) : last - 1] + 1).tolist()
        ends = spaces[first + n_grams - 1 : last + n_grams - 1].tolist()
        if last + n_grams - 1 > len(spaces):  # the block holding the last word
            ends.append(len(data))
        hashes[first:last] = np.fromiter((hash_bytes(data[a:b]) for a, b in zip(starts, ends)), dtype=np.uint64,
                                         count=last - first)
    return hashes.reshape((-1, 1))


def bytes_hash_func(config: HashConfig):
    """xxhash called directly (datatrove wraps it in a Python function), always on bytes."""
    if config.hash_fc == "xxhash":
        import xxhash

        return xxhash.xxh64_intdigest if config.precision == 64 else xxhash.xxh32_intdigest
    return create_hash_func(config, bytes)


def min_permuted_hashes(shingles: np.ndarray, a: np.ndarray, b: np.ndarray, precision: int = 64) -> np.ndarray:
    """min over shingles of `(shingle * a + b) % (2**61 - 1)` (uint64 wrap-around, as datatrove computes it).

    x mod p for p = 2**61 - 1: r = (x & p) + (x >> 61) is congruent to x and below p + 8, so x mod p = min(r, r - p)
    with unsigned wrap-around (r - p wraps to a huge value when r < p). Exactly datatrove's values, without division.
    """
    out = np.full(a.shape[1], np.iinfo(np.uint64).max, dtype=np.uint64)
    rows = min(len(shingles), _ROWS_PER_BLOCK)
    x_buf, r_buf = np.empty((rows, a.shape[1]), np.uint64), np.empty((rows, a.shape[1]), np.uint64)
    for start in range(0, len(shingles), _ROWS_PER_BLOCK):
        block = shingles[start : start + _ROWS_PER_BLOCK]
        x, r = x_buf[: len(block)], r_buf[: len(block)]
        np.multiply(block, a, out=x)
        x += b
        np.bitwise_and(x, _MASK_61, out=r)
        x >>= _SHIFT_61
        r += x
        np.subtract(r, _MASK_61, out=x)
        np.minimum(r, x, out=r)
        if precision == 32:
            r &= np.uint64(0xFFFFFFFF)
        np.minimum(out, r.min(axis=0), out=out)
    return out


class LazyWordSplitter:
    """A step's `EnglishWordSplitter`, built in the worker on first use: spaCy objects are left out of the pickle the
    executor sends (and a step pickled by a release without the attribute still works)."""

    _splitter: EnglishWordSplitter | None = None

    @property
    def splitter(self) -> EnglishWordSplitter:
        if self._splitter is None:
            self._splitter = EnglishWordSplitter()
        return self._splitter

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_splitter", None)
        return state


class FastMinhashSignature(LazyWordSplitter, MinhashDedupSignature):
    """datatrove's MinHash stage 1 with the same output files (bucket files, sort order, document indices).

    Only `get_shingles` and `get_signature` are replaced; `run` (writing, sorting, verifying the bucket files) is
    datatrove's. English text under a norm config with lowercase, punctuation removal and whitespace normalisation
    (the default) uses `EnglishWordSplitter`; anything else falls back to datatrove's word tokenizer, still with the
    cheaper hashing and permutation.
    """

    name = "🎯 MinHash stage 1 (fast)"

    def __init__(
        self,
        output_folder: DataFolderLike,
        config: MinhashConfig | None = None,
        language: str = Languages.english,
        skip_existing_sigs: bool = False,
    ):
        super().__init__(output_folder, config=config, language=language, skip_existing_sigs=skip_existing_sigs)
        norm = self.config.norm_config
        tokenizer = self.word_tokenizer
        self._fast_split = (
            isinstance(tokenizer, SpaCyTokenizer) and tokenizer.language == "en" and tokenizer.config is None
            and norm.lowercase and norm.remove_punctuation and norm.norm_whitespace
        )
        self._hash_bytes = bytes_hash_func(self.config.hash_config)

    def words_joined(self, text: str) -> str:
        """The document's words (datatrove's: simplified text, spaCy English split) joined by single spaces."""
        simplified = simplify_text_fast(text, self.config.norm_config)
        if self._fast_split:
            return self.splitter.joined(simplified)
        return " ".join(self.word_tokenizer.word_tokenize(simplified))

    def get_shingles(self, text: str) -> np.ndarray:
        if self._fast_split:
            return shingle_hashes(self.words_joined(text), self.config.n_grams, self._hash_bytes)
        # other tokenizers may return words with inner spaces: hash each n-gram's own join, as datatrove does
        words = self.word_tokenizer.word_tokenize(simplify_text_fast(text, self.config.norm_config))
        n = self.config.n_grams
        return np.fromiter(
            (self._hash_bytes(" ".join(words[i : i + n]).encode("utf-8")) for i in range(len(words) - n + 1)),
            dtype=np.uint64,
        ).reshape((-1, 1))

    def get_signature(self, shingles: np.ndarray) -> list[list[int]]:
        a, b = self.parameters
        mins = min_permuted_hashes(shingles, a, b, self.config.hash_config.precision)
        return [x.tolist() for x in np.split(mins.astype(self.config.hash_config.np_dtype), self.config.num_buckets)]

    def __getstate__(self):
        """Executors pickle the step: leave spaCy objects out, the worker rebuilds them on first use."""
        state = super().__getstate__()
        state["word_tokenizer"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.word_tokenizer = load_word_tokenizer(self.language)


def bucket_workers(tasks: int) -> int:
    """Tasks sharing each bucket's merge by default: one per 100 of the run's tasks, 1 to 32. One task per bucket
    merges a signature of every document of the corpus in one Python heap (~100k a second: 12 hours at 15 TB, past a
    day at FineWeb's size); each of k tasks merges a k-th of the hash range, reading only its part of each file."""
    return min(32, max(1, tasks // 100))


class SharedMinhashDedupBuckets(MinhashDedupBuckets):
    """datatrove's bucket merge, `world_size // num_buckets` tasks per bucket, each the signatures in one hash range
    (equal signatures share their first hash, so no pair is split). datatrove cuts the ranges at quantiles of the
    bucket's first file, rank 0's: in a score-first run that may hold a handful of survivors or none, and an
    assertion failed every task of the bucket; here they are cut at quantiles of its largest file."""

    def get_worker_hash_range(self, sig_files, rank, world_size):
        workers = world_size // self.config.num_buckets
        worker = rank % workers
        top = _mersenne_prime if self.config.hash_config.precision == 64 else self.config.hash_config.max
        line = struct.calcsize(f"{self.config.hashes_per_bucket}{self.config.hash_config.struct_format}I")
        sizes = [self.input_folder.size(name) for name in sig_files]
        lines = max(sizes, default=0) // line
        if workers == 1 or lines == 0:
            return 0, top
        first_hash = struct.calcsize(self.config.hash_config.struct_format)
        with self.input_folder.open(sig_files[sizes.index(max(sizes))], mode="rb") as f:
            def cut(j: int) -> int:  # the first hash of the line at the j-th of `workers` quantiles
                f.seek(line * (lines * j // workers))
                return struct.unpack(self.config.hash_config.struct_format, f.read(first_hash))[0]

            return (0 if worker == 0 else cut(worker)), (top if worker + 1 == workers else cut(worker + 1))


class ArrayMinhashDedupCluster(MinhashDedupCluster):
    """datatrove's cluster stage (its `.remove` files and stats) in numpy arrays: datatrove's union-find held a dict
    of tuples, ~190 bytes of resident memory per document with a near duplicate (~95 GB in its one task for a crawl
    of 2B documents, a quarter of them in clusters); here a sorted array of the documents' 64-bit keys and their
    components, ~45 bytes at the peak (`benchmarks/bench_minhash_cluster.py`). The components are found a bucket's pairs at a time
    (scipy's connected components over the components so far), and each keeps its first document by signature key
    (the task that read it, then its position in that task's stream: input order with one task; files are dealt
    to tasks in turn, so with more the copy kept may change with --tasks), where datatrove kept the root its union by
    size happened to leave. Runs with an index
    (pairs naming SENTINEL) or writing cluster ids or sizes take datatrove's own path."""

    name = "🎯 MinHash stage 3 (arrays)"

    def run(self, data: DocumentsPipeline = None, _: int = 0, world_size: int = 1) -> None:
        from datatrove.utils.stats import MetricStats
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        if self.save_cluster_id or self.save_cluster_size or self.ignore_index_matches:
            return super().run(data, _, world_size)
        dup_files = self.input_folder.list_files(glob_pattern="*.dups")
        assert len(dup_files) % self.config.num_buckets == 0, "the .dups files are not a multiple of the buckets"
        assert world_size == 1, "World size must be 1 for clustering"
        buckets: dict[str, list[str]] = {}  # datatrove's names: BUCKET_WORKER.dups
        for name in sorted(dup_files):
            buckets.setdefault(posixpath.basename(name).split("_")[0], []).append(name)
        with self.track_time():
            keys = np.zeros(0, np.uint64)  # every document in a pair, sorted: file << 32 | position
            for names in buckets.values():
                a, b = self._pair_keys(names)
                found = np.concatenate([keys, a, b])
                del a, b, keys
                found.sort()  # in place: np.unique and np.union1d sort copies of copies (their peak, ~1.8x)
                keys = found[np.r_[True, found[1:] != found[:-1]]] if len(found) else found
                del found
            # a match with an index: datatrove's semantics; 2**31 documents or more: scipy's labels are int32
            if (len(keys) and keys[-1] == np.uint64(SENTINEL_KEY)) or len(keys) >= 2**31:
                del keys
                return super().run(data, _, world_size)
            component = np.arange(len(keys), dtype=np.int32)
            for names in buckets.values():
                a, b = self._pair_keys(names)
                edges = (component[np.searchsorted(keys, a)], component[np.searchsorted(keys, b)])
                del a, b
                graph = coo_matrix((np.ones(len(edges[0]), np.int8), edges), shape=(len(keys), len(keys)))
                del edges
                _, joined = connected_components(graph, directed=False)
                del graph
                component = joined[component]
            # keys are sorted: a component's first key is its document read first, kept; the others removed
            first = np.full(int(component.max(initial=-1)) + 1, len(keys), dtype=component.dtype)
            np.minimum.at(first, component, np.arange(len(keys), dtype=component.dtype))
            sizes = np.bincount(component)
            del component
            remove = np.ones(len(keys), bool)
            remove[first[sizes > 0]] = False
            sizes = sizes[sizes > 0]
            del first
            removed = keys[remove]
            del remove
            files = np.unique(removed >> np.uint64(32))
            bounds = np.searchsorted(removed, np.r_[files << np.uint64(32), np.uint64(2**64 - 1)])
            for file, start, end in zip(files.tolist(), bounds[:-1], bounds[1:]):
                with self.output_folder.open(f"{file:06d}.remove", mode="wb") as out:
                    out.write((removed[start:end] & np.uint64(0xFFFFFFFF)).astype("<u4").tobytes())
            for stat, value in (("duplicates", len(keys)), ("to_remove", len(removed))):
                if value:  # as datatrove's stat_update per document adds up
                    self.stats[stat] += MetricStats(total=value, n=value, mean=1.0, min=1, max=1)
            if len(sizes):
                self.stats["cluster_size"] += MetricStats(
                    total=int(sizes.sum()), n=len(sizes), mean=float(sizes.mean()), min=int(sizes.min()),
                    max=int(sizes.max()), _running_variance=float(((sizes - sizes.mean()) ** 2).sum()), unit="cluster")

    def _pair_keys(self, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """The pairs of a bucket's .dups files (4 little-endian uint32 a pair: file, position, file, position) as
        two arrays of 64-bit keys."""
        chunks = []
        for name in names:
            with self.input_folder.open(name, "rb") as fh:
                chunks.append(np.frombuffer(fh.read(), dtype="<u4").reshape(-1, 4))
        pairs = np.concatenate(chunks) if chunks else np.zeros((0, 4), "<u4")
        del chunks
        return tuple((pairs[:, i].astype(np.uint64) << np.uint64(32)) | pairs[:, i + 1] for i in (0, 2))


SENTINEL_KEY = (SENTINEL << 32) | SENTINEL  # datatrove's index document, as a key
