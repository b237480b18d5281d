"""Token streams for pretraining: tokenize documents once, EOS between them, pack into fixed-length windows.

A dataset becomes a flat file of token ids (`NAME.bin`, uint16 or uint32) with a JSON sidecar (`NAME.json`) holding
the dtype and counts, the nanoGPT layout: training memory-maps it, so the stream can be larger than RAM. A dataset
packed into train and val holds `packed.json`, written last: without it the packing is incomplete or from an older
version (whose held-out slice could overlap another dataset's training data) and must not be reused. While packing,
`packing.json` records every minute how far the files and the input are in step, so a packing of billions of tokens
killed part-way resumes there instead of starting over.

Beside a training file and an evaluation set's file, `NAME.hashes` holds a 64-bit hash of each document's text
(`text_hash`, in file order), so the texts an evaluation set shares with a training set can be counted
(`documents_shared`) without reading either input again.

Window `k` of length `seq_len` covers tokens `[k*seq_len, (k+1)*seq_len]` (seq_len + 1 ids): inputs are the first
seq_len, targets the last seq_len. Consecutive windows share one boundary token, so every token after the first is a
prediction target exactly once per epoch; only the tail shorter than one window is left out of an epoch.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from edu_filter.documents import DocumentError, expand_paths, iter_raw_rows, row_text, write_json_whole

PACKED = "packed.json"  # the marker of a finished write_train_val, written last
PACKING = "packing.json"  # where a write_train_val in progress has got to: its resume point
CHECKPOINT_SECONDS = 60.0
VAL_SPLIT = "blake2b-64 of the text modulo round(1 / val_fraction)"  # how it chose the held-out slice
# the order an input's files are read in (`spread_files`), recorded with what was packed in it
FILE_ORDER = "blake2b-64 of each file's path below the input"


class TextStream:
    """The text of every document, its files in name order or, with `spread`, in `spread_files` order; a row without
    text raises DocumentError naming its file and line. It counts the texts of each file read to its end
    (`files_within`), and a resumed packing starts it at the first file it had not finished (`start_at`): reading
    again every document packed before the checkpoint took as long as packing them had (an hour for 10B tokens), in
    every job of a packing that spans many."""

    def __init__(self, paths: str | Iterable[str], text_field: str = "text", spread: bool = False):
        files = expand_paths([paths] if isinstance(paths, str) else paths)
        self.files, self.text_field = spread_files(files) if spread else files, text_field
        self.first_file, self.texts_per_file = 0, []  # of each file read to its end, from `first_file`

    def start_at(self, first_file: int) -> "TextStream":
        self.first_file = first_file
        return self

    def __iter__(self) -> Iterator[str]:
        self.texts_per_file = []
        for path in self.files[self.first_file:]:
            n = 0
            for lineno, row in iter_raw_rows(path):
                n += 1  # a binary text column decoded, as every other command reads it (the raw dump apply filtered)
                yield row_text(path, lineno, row, self.text_field)
            self.texts_per_file.append(n)

    def files_within(self, texts: int) -> tuple[int, int]:
        """(files, their texts): the files, from the first, whose texts all lie within the first `texts` read."""
        files, within = self.first_file, 0
        for n in self.texts_per_file:
            if within + n > texts:
                break
            files, within = files + 1, within + n
        return files, within


def iter_texts(paths: str | Iterable[str], text_field: str = "text", spread: bool = False) -> TextStream:
    """Every document's text (`TextStream`)."""
    return TextStream(paths, text_field, spread)


def spread_files(files: list[str]) -> list[str]:
    """The files in an order that looks random and is the same on every read (FILE_ORDER): a budget that stops
    reading early takes documents from files across the input. In name order it took the first files only: the
    oldest dumps of a crawl laid out by date, while apply's kept/ files each hold some of every input file, so a
    filtered arm and its unfiltered baseline differed in crawl period as well as in the filter."""
    if len(files) < 2:
        return list(files)
    prefix = os.path.commonprefix(files)
    prefix = prefix[: prefix.rfind("/") + 1]  # the folder they share: a moved input keeps its order

    def key(path: str) -> bytes:
        return hashlib.blake2b(path[len(prefix):].encode(), digest_size=8).digest()

    return sorted(files, key=key)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def tokenize_documents(texts: Iterable[str], tokenizer, eos_id: int,
                       batch_size: int = 256) -> Iterator[tuple[str, np.ndarray]]:
    """Each document with its token ids followed by EOS, encoded in batches by the fast (Rust) tokenizer."""
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == batch_size:
            yield from _encode_batch(batch, tokenizer, eos_id)
            batch = []
    if batch:
        yield from _encode_batch(batch, tokenizer, eos_id)


def text_hash(text: str) -> int:
    """A document's 64-bit identity: blake2b-64 of its UTF-8 text (an exact duplicate has the same)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def _encode_batch(texts: list[str], tokenizer, eos_id: int) -> Iterator[tuple[str, np.ndarray]]:
    # a document's own "<|endoftext|>" (tokenizer code, ML tutorials) is text, not the separator: encoded as one,
    # it ended the document mid-way for the model. Not in the tokenizer key: packings made before are reused as
    # they are (an ablation resumed across the change keeps its runs; only such rare documents differ)
    encoded = tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    for text, ids in zip(texts, encoded):
        yield text, np.asarray([*ids, eos_id], dtype=np.int64)


@dataclass
class TokenFileInfo:
    """Sidecar of a token file: what it holds and whether the source was read to its end."""

    dtype: str
    tokens: int
    documents: int
    complete: bool


HASH_DTYPE = np.dtype("<u8")


def hashes_path(path: str | Path) -> Path:
    """The `.hashes` file beside token file `path`: `text_hash` of each of its documents."""
    return Path(path).with_suffix(".hashes")


class TokenFileWriter:
    """Appends token ids to `path` (.bin) and each document's `text_hash` to `.hashes`, and writes the `.json` sidecar
    on close. `resume_at` (tokens, documents) continues both from a checkpoint: whatever was written after it is cut
    off."""

    def __init__(self, path: str | Path, vocab_size: int, resume_at: tuple[int, int] | None = None,
                 rehash: bool = False):
        """`rehash`: the resumed file's hashes are written again from the start (`add_hash`), its packing begun by
        an older edu-filter, which kept none."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.dtype = token_dtype(vocab_size)
        self.tokens, self.documents = resume_at or (0, 0)
        self._fh, self._hashes = (self._open(self.path, self.tokens * self.dtype.itemsize, resume_at is not None),
                                  self._open(hashes_path(self.path), self.documents * HASH_DTYPE.itemsize,
                                             resume_at is not None and not rehash))

    @staticmethod
    def _open(path: Path, size: int, resume: bool):
        if not resume:
            return open(path, "wb")
        fh = open(path, "r+b")
        fh.truncate(size)
        fh.seek(0, os.SEEK_END)
        return fh

    def write(self, ids: np.ndarray, text: str) -> None:
        self._fh.write(ids.astype(self.dtype).tobytes())
        self.add_hash(text)
        self.tokens += len(ids)
        self.documents += 1

    def add_hash(self, text: str) -> None:
        self._hashes.write(np.array([text_hash(text)], dtype=HASH_DTYPE).tobytes())

    def sync(self) -> None:
        """Everything written so far is on disk (a checkpoint may point at it)."""
        for fh in (self._fh, self._hashes):
            fh.flush()
            os.fsync(fh.fileno())

    def close(self, complete: bool) -> TokenFileInfo:
        self._fh.close()
        self._hashes.close()
        info = TokenFileInfo(str(self.dtype), self.tokens, self.documents, complete)
        self.path.with_suffix(".json").write_text(json.dumps(asdict(info), indent=2))
        return info


def is_held_out(text: str, val_fraction: float) -> bool:
    """Whether a document belongs to the held-out slice: a hash of its text, not its position, so a document is held
    out in every dataset that contains it (a filtered subset never trains on its unfiltered baseline's validation
    text, nor the reverse), and so are all its exact duplicates."""
    if val_fraction <= 0:
        return False
    every = max(1, round(1 / val_fraction))
    return text_hash(text) % every == 0


class PackingStopped(Exception):
    """A packing stopped by its `stop()` after a checkpoint: calling it again goes on from there."""


def write_train_val(
    texts: Iterable[str],
    tokenizer,
    out_dir: str | Path,
    train_tokens: int,
    val_fraction: float = 0.05,
    max_val_tokens: int = 1_000_000,
    source: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    checkpoint_seconds: float = CHECKPOINT_SECONDS,
    file_order: str | None = None,
    skipping: Callable[[int, int], None] | None = None,
    stop: Callable[[], bool] | None = None,
    deadline: float | None = None,
) -> tuple[TokenFileInfo, TokenFileInfo]:
    """Tokenize a dataset into `train.bin` and a held-out `val.bin` slice, reading only as far as the budget needs.

    The documents `is_held_out` picks (about 1 in round(1 / val_fraction)) go to validation until it holds
    `max_val_tokens`, and are skipped after that rather than trained on: another dataset whose slice fills later holds
    them out. Reading stops once both files have their tokens (`train_tokens` for training); `packed.json` comes last.

    With a `source` naming the texts (e.g. the input's fingerprint), every `checkpoint_seconds` the files are
    synced and `packing.json` records the documents read and the tokens written. A packing killed part-way and
    called again with the same source, tokenizer and budgets skips the documents read before that checkpoint and
    appends after it, giving the files an unbroken packing gives; with anything else it starts over. `progress(train_tokens,
    val_tokens)` is called at the start (a resumed packing's counts), a few times a second and at the end;
    `skipping(documents, of)` while a resumed packing reads past the documents packed before its checkpoint (an hour
    for 10B tokens: they are read again, not tokenized). A packing with a `source` stops once `stop()` says so
    (SIGTERM: asked after each document) or at the first checkpoint past `deadline` (time.time(): a job's time limit,
    so that each call packs a checkpoint's worth at least): it checkpoints where it is and raises PackingStopped,
    and the same call goes on from there.
    """
    out_dir = Path(out_dir)
    (out_dir / PACKED).unlink(missing_ok=True)
    vocab = len(tokenizer)
    settings = packing_settings(tokenizer, train_tokens, val_fraction, max_val_tokens, source, file_order)
    resume = _packing_checkpoint(out_dir, settings, token_dtype(vocab).itemsize) if source is not None else None
    if resume is None:  # another run's checkpoint must not outlive the files it described
        (out_dir / PACKING).unlink(missing_ok=True)
    rehash = resume is not None and _hashes_behind(out_dir, resume)
    train = TokenFileWriter(out_dir / "train.bin", vocab, resume and tuple(resume["train"]), rehash)
    val = TokenFileWriter(out_dir / "val.bin", vocab, resume and tuple(resume["val"]), rehash)
    read = resume["documents_read"] if resume else 0
    unhashed = {"train": train.documents, "val": val.documents} if rehash else {}
    # a resumed packing of files (`TextStream`) opens the first it had not finished; rehashing reads every text
    stream = texts if isinstance(texts, TextStream) else None
    first_file, before = (resume.get("files_read") or (0, 0)) if resume and stream and not rehash else (0, 0)
    if stream is not None:
        texts = stream.start_at(first_file)

    def files_read() -> list[int] | None:
        """(files, their documents) wholly read within the `read` documents: where a resume starts reading."""
        if stream is None:
            return None
        files, within = stream.files_within(read - before)
        return [files, before + within]

    def hash_skipped(text: str) -> None:
        """Each file took the documents of its kind (held out or not) until full, then none: its documents are the
        first of that kind read."""
        kind = "val" if is_held_out(text, val_fraction) else "train"
        if unhashed.get(kind):
            (val if kind == "val" else train).add_hash(text)
            unhashed[kind] -= 1
    val_tokens = max_val_tokens if val_fraction > 0 else 0
    complete = True
    saved = shown = time.monotonic()
    if progress is not None:
        progress(train.tokens, val.tokens)  # where a resumed packing starts
    skipped = _after(texts, read - before, skipping, hash_skipped if rehash else None,
                     stop if source is not None else None)
    resumed_at = read
    for text, ids in tokenize_documents(skipped, tokenizer, tokenizer.eos_token_id):
        read += 1
        if read == resumed_at + 1:  # past what a resumed packing reads again: a checkpoint's worth from here
            saved = time.monotonic()
        if is_held_out(text, val_fraction):
            if val.tokens < val_tokens:
                val.write(ids, text)
        elif train.tokens < train_tokens:
            train.write(ids, text)
        if train.tokens >= train_tokens and val.tokens >= val_tokens:
            complete = False
            break
        now = time.monotonic()
        if source is not None and now - saved >= checkpoint_seconds:
            _save_packing_checkpoint(out_dir, settings, read, train, val, files_read())
            saved = now
            if deadline is not None and time.time() > deadline:
                raise PackingStopped(f"{read:,} documents read, {train.tokens:,} training tokens packed")
        if source is not None and stop is not None and stop():
            _save_packing_checkpoint(out_dir, settings, read, train, val, files_read())
            raise PackingStopped(f"{read:,} documents read, {train.tokens:,} training tokens packed")
        if progress is not None and now - shown >= 0.25:
            progress(train.tokens, val.tokens)
            shown = now
    infos = train.close(complete), val.close(complete)
    if progress is not None:
        progress(train.tokens, val.tokens)
    marker = out_dir / f"{PACKED}.tmp"
    marker.write_text(json.dumps({"val_split": VAL_SPLIT, "train": asdict(infos[0]), "val": asdict(infos[1]),
                                  "settings": settings}))
    marker.rename(out_dir / PACKED)
    (out_dir / PACKING).unlink(missing_ok=True)
    return infos


SKIPPING_SHOWN_EVERY = 10_000  # documents


def _after(texts: Iterable[str], read: int, skipping: Callable[[int, int], None] | None,
           each: Callable[[str], None] | None = None, stop: Callable[[], bool] | None = None) -> Iterator[str]:
    """`texts` after the first `read`, `skipping` told how far the skip has got and `each` given every text skipped;
    PackingStopped once `stop()` says so (the checkpoint it resumes stays as it was)."""
    texts = iter(texts)
    for done in range(read):
        if done % SKIPPING_SHOWN_EVERY == 0:
            if skipping is not None:
                skipping(done, read)
            if stop is not None and stop():
                raise PackingStopped(f"reading past the {read:,} documents packed before ({done:,})")
        text = next(texts, None)
        if text is None:
            return
        if each is not None:
            each(text)
    if skipping is not None and read:
        skipping(read, read)
    yield from texts


def packing_settings(tokenizer, train_tokens: int, val_fraction: float, max_val_tokens: int,
                     source: str | None, file_order: str | None = None) -> dict:
    """What a packing is made of: a checkpoint resumes, and finished files are reused, only under the same.
    `file_order`: how the texts' files were ordered, when not by name (packings from before recorded none)."""
    return {"val_split": VAL_SPLIT, "tokenizer": tokenizer_key(tokenizer), "train_tokens": train_tokens,
            "val_fraction": val_fraction, "max_val_tokens": max_val_tokens, "source": source,
            **({"file_order": file_order} if file_order else {})}


def packed_settings(out_dir: str | Path) -> dict | None:
    """The settings a finished packing recorded (None: none recorded, by an older edu-filter, or no packing)."""
    try:
        return json.loads((Path(out_dir) / PACKED).read_text()).get("settings")
    except (OSError, ValueError):
        return None


def tokenizer_key(tokenizer, releases_of_split_text: bool = False) -> str:
    """What identifies a tokenizer's encoding: its vocabulary, merges and rules (not the truncation and padding
    settings, which transformers changes on first use) and its EOS id, the document separator.

    `releases_of_split_text`: the key as a few releases recorded it, with the way a document's own special-token text
    is packed (as text, as now) in it; their token files are what this release packs (read as such by
    `ablation._recorded_source`)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    try:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
    except Exception:  # noqa: BLE001 - no fast backend, or one with custom Python parts: the vocabulary alone
        spec = sorted(tokenizer.get_vocab().items())
    spec = {"encoding": spec, "eos": tokenizer.eos_token_id, "size": len(tokenizer),
            **({"special_tokens_in_text": "split"} if releases_of_split_text else {})}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _packing_checkpoint(out_dir: Path, settings: dict, itemsize: int) -> dict | None:
    """The checkpoint of an unfinished packing with these settings whose files hold what it says, else None."""
    try:
        checkpoint = json.loads((out_dir / PACKING).read_text())
    except (OSError, ValueError):
        return None
    if checkpoint.get("settings") != settings:
        return None
    for name in ("train", "val"):
        path = out_dir / f"{name}.bin"
        if not path.exists() or path.stat().st_size < checkpoint[name][0] * itemsize:
            return None
    return checkpoint


def _hashes_behind(out_dir: Path, checkpoint: dict) -> bool:
    """Whether a checkpoint's files lack the text hashes of documents it counts (an older edu-filter kept none)."""
    return any(not hashes_path(out_dir / f"{name}.bin").exists() or hashes_path(out_dir / f"{name}.bin").stat().st_size
               < checkpoint[name][1] * HASH_DTYPE.itemsize for name in ("train", "val"))


def _save_packing_checkpoint(out_dir: Path, settings: dict, read: int, train: TokenFileWriter,
                             val: TokenFileWriter, files_read: list[int] | None = None) -> None:
    train.sync()
    val.sync()
    write_json_whole(out_dir / PACKING, {"settings": settings, "documents_read": read, "files_read": files_read,
                                         "train": [train.tokens, train.documents], "val": [val.tokens, val.documents]},
                     indent=None)


def read_packed(out_dir: str | Path) -> tuple[TokenFileInfo, TokenFileInfo] | None:
    """The train and val infos of a finished `write_train_val` with today's split, else None."""
    marker = Path(out_dir) / PACKED
    if not marker.exists():
        return None
    packed = json.loads(marker.read_text())
    if packed.get("val_split") != VAL_SPLIT:
        return None
    return TokenFileInfo(**packed["train"]), TokenFileInfo(**packed["val"])


def write_tokens(texts: Iterable[str], tokenizer, path: str | Path, max_tokens: int) -> TokenFileInfo:
    """Tokenize documents into one token file (e.g. an evaluation set), stopping after `max_tokens`. Its sidecar goes
    first: the old one beside a file being rewritten, a kill midway left an empty file taken for the packed set."""
    Path(path).with_suffix(".json").unlink(missing_ok=True)
    writer = TokenFileWriter(path, len(tokenizer))
    complete = True
    for text, ids in tokenize_documents(texts, tokenizer, tokenizer.eos_token_id):
        writer.write(ids, text)
        if writer.tokens >= max_tokens:
            complete = False
            break
    return writer.close(complete)


def documents_shared(train_file: str | Path, eval_files: dict[str, str | Path],
                     chunk: int = 8_000_000) -> dict[str, int | None]:
    """For each evaluation set's token file, how many of its documents are also in the training file `train_file`, by
    exact text (their `.hashes`); None where either has none (packed by an older edu-filter). The training hashes
    (~100M at 100B tokens) are read once for all sets, a chunk at a time, each looked up among the sets' sorted
    hashes."""
    trained = hashes_path(train_file)
    wanted = {name: np.fromfile(hashes_path(f), dtype=HASH_DTYPE) for name, f in eval_files.items()
              if hashes_path(f).exists()}
    if not trained.exists() or not wanted:
        return {name: None for name in eval_files}
    keys = np.unique(np.concatenate(list(wanted.values())))
    seen = np.zeros(len(keys), dtype=bool)
    if keys.size and trained.stat().st_size:
        hashes = np.memmap(trained, dtype=HASH_DTYPE, mode="r")
        for start in range(0, len(hashes), chunk):
            part = np.asarray(hashes[start:start + chunk])
            at = np.minimum(np.searchsorted(keys, part), len(keys) - 1)
            seen[at[keys[at] == part]] = True
    return {name: int(seen[np.searchsorted(keys, wanted[name])].sum()) if name in wanted else None
            for name in eval_files}


class PackedTokens:
    """Fixed-length windows over a memory-mapped token file, in a seeded random order that changes every epoch.

    Sample `g` of the whole run is a pure function of `g` (epoch `g // num_windows`, then a permutation of that
    epoch), so a resumed run reads exactly the batches an uninterrupted one would.
    """

    def __init__(self, path: str | Path, seq_len: int, seed: int = 0):
        self.path = Path(path)
        info = TokenFileInfo(**json.loads(self.path.with_suffix(".json").read_text()))
        self.info = info
        self.seq_len = seq_len
        self.seed = seed
        self.num_windows = (info.tokens - 1) // seq_len if info.tokens else 0
        if self.num_windows < 1:  # before the memmap, which refuses an empty file
            raise ValueError(
                f"{self.path}: {info.tokens} tokens, fewer than one window of {seq_len + 1}; give more data "
                "or a shorter sequence length"
            )
        size, expected = self.path.stat().st_size, info.tokens * np.dtype(info.dtype).itemsize
        if size != expected:  # a copy in progress, a full disk: numpy's mmap error named no file, a longer one passed
            raise DocumentError(f"{self.path}: {size:,} bytes where its {self.path.with_suffix('.json').name} says "
                                f"{info.tokens:,} tokens of {info.dtype} ({expected:,} bytes): cut short or not the "
                                "file packed with it; delete it with its sidecars and pack again")
        self.tokens = np.memmap(self.path, dtype=np.dtype(info.dtype), mode="r", shape=(info.tokens,))
        self._perm_epoch = -1
        self._perm = np.arange(self.num_windows)

    def window(self, k: int) -> np.ndarray:
        """Window k: seq_len + 1 token ids (inputs are [:-1], targets [1:])."""
        start = k * self.seq_len
        return np.asarray(self.tokens[start : start + self.seq_len + 1], dtype=np.int64)

    def _window_of_sample(self, g: int) -> int:
        epoch, pos = divmod(g, self.num_windows)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._perm_epoch = epoch
        return int(self._perm[pos])

    def batch(self, first_sample: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets (batch_size x seq_len) for samples first_sample .. first_sample + batch_size - 1."""
        windows = np.stack([self.window(self._window_of_sample(g)) for g in range(first_sample, first_sample + batch_size)])
        w = torch.from_numpy(windows)
        return w[:, :-1], w[:, 1:]

    def eval_batches(self, max_tokens: int, batch_size: int, rank: int = 0, world: int = 1):
        """The first windows in file order (at most max_tokens targets), sharded across ranks."""
        count = min(self.num_windows, max(1, max_tokens // self.seq_len))
        mine = list(range(rank, count, world))
        for i in range(0, len(mine), batch_size):
            w = torch.from_numpy(np.stack([self.window(k) for k in mine[i : i + batch_size]]))
            yield w[:, :-1], w[:, 1:]
