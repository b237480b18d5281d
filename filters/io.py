"""Reading inputs and writing outputs of `apply` as datatrove steps.

The reader never drops a row silently: a line that is not JSON, not UTF-8 or has no text becomes a document marked
with a failure reason, and `InputErrorFilter` routes it to `OUT/failed/<reason>/` with the file and line it came from.
Outputs are flat records (original fields at the top level, as in FineWeb-Edu), never datatrove's nested `metadata`.
An input that already has `score`/`int_score` (an LLM annotation), `filter_reason` or `duplicate_count` keeps them as
`input_<name>`.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import decimal
import functools
import gzip
import itertools
import math
import os
import posixpath
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import orjson
import pyarrow as pa
from datatrove.data import Document, DocumentsPipeline
from datatrove.io import get_datafolder
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.readers.base import BaseReader
from datatrove.pipeline.readers.jsonl import JsonlReader
from datatrove.pipeline.writers.disk_base import DiskWriter
from datatrove.pipeline.writers.jsonl import JsonlWriter
from datatrove.pipeline.writers.parquet import ParquetWriter

from edu_filter.documents import (
    MAX_LINE_BYTES,
    PARQUET_SUFFIXES,
    UTF8_BOM,
    DocumentError,
    PACKED_FORMATS,
    PackedAsPlainText,
    check_data_file,
    data_files_in,
    distinct_names,
    file_key,
    glob_matches,
    hub_repository_files,
    id_text,
    is_hub_path,
    json_line,
    lines_readable,
    local_files_under,
    open_parquet,
    parquet_rows_or_errors,
    printable_name,
    read_line,
    refuse_packed,
)
from edu_filter.filters.progress import TaskProgress
from edu_filter.filters.report import write_counts

FAILURE_KEY = "_input_failure"  # internal marker set by the reader, never written out
# keys datatrove steps add to documents that do not belong in the kept dataset
PIPELINE_KEYS = frozenset({"filter_reason", "duplicate_count", FAILURE_KEY})
SCORE_KEYS = ("score", "int_score")
# fields the pipeline sets: an input's own are kept as `input_<name>` (an integer `token_count`, FineWeb's column, is
# used as the count instead)
PIPELINE_OWNED = (*SCORE_KEYS, "token_count", "filter_reason", "duplicate_count")
# fields a row may hold besides the ones --text-field and --id-field name, that would take the place of the document's
# own text and id in every record written, or that datatrove's writers read as attachments (`media`)
RECORD_OWNED = ("text", "id", "media")
RAW_PREVIEW_CHARS = 2000
# containers nested in a row at most: orjson writes 254 levels (it reads 1024), and Parquet written with 50 nested
# lists cannot be read back (pyarrow's limit of 100 schema levels): a deeper row would fail its task on every resume
MAX_NESTING = 32
# fsspec metadata that changes when a file is replaced: local and SFTP, S3, GCS, Azure, the hub (content hash)
FILE_VERSION_KEYS = ("mtime", "LastModified", "updated", "last_modified", "ETag", "etag", "blob_id")
# a truncated or corrupt file; transient I/O errors (OSError) still fail the task, so a rerun reads the file again
# what pyarrow says of bytes that are not Parquet (a footer, a page); its memory errors and OSErrors are not that
NOT_PARQUET = (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, pa.ArrowKeyError, pa.ArrowIndexError,
               pa.ArrowSerializationError, UnicodeDecodeError)
UNREADABLE = (EOFError, gzip.BadGzipFile, zlib.error, PackedAsPlainText, *NOT_PARQUET)
# what pyarrow raises for values that do not make (or fit) an array of one type
NOT_ARROW_TYPED = (pa.ArrowException, TypeError, ValueError, OverflowError)


def expand_inputs(inputs: list[str]) -> list[tuple[str, str]]:
    """(folder, file name relative to it) for every JSONL/Parquet file in the inputs, in a stable order.

    Works for local paths and any fsspec URL datatrove reads (s3://, hf://datasets/...). Listing happens once, before
    the tasks start, so every task sees the same list.
    """
    from fsspec.core import url_to_fs

    files: list[tuple[str, str]] = []
    for inp in inputs:
        inp = str(inp)
        fs, path = url_to_fs(inp)
        if is_hub_path(inp):
            try:  # the hub's own reason (offline, gated, no such dataset) instead of "no such file"
                fs.info(path)
            except FileNotFoundError:
                pass
            except Exception as e:  # noqa: BLE001
                raise DocumentError(f"{inp}: cannot load from the Hugging Face hub ({type(e).__name__}: {e})") from None
        repository = hub_repository_files(inp) if is_hub_path(inp) else None
        matched = glob_matches(inp) if repository is None else None
        if matched is not None:
            root, names = matched
            files.extend((root, name) for name in data_files_in(inp, names))
        elif repository is not None:
            files.extend((inp.rstrip("/"), f) for f in data_files_in(inp, repository))
        elif fs.isdir(path):
            folder = get_datafolder(inp)
            found = data_files_in(inp, local_files_under(path, refuse_dangling=True) if folder.is_local()
                                  else folder.list_files(recursive=True))
            files.extend((inp, f) for f in found)
        elif fs.isfile(path):
            check_data_file(inp)
            parent, name = posixpath.split(inp) if "://" in inp else os.path.split(os.path.abspath(inp))
            files.append((parent, name))
        else:
            raise DocumentError(f"{inp}: no such file or folder")
    return _first_of_each(files)


def _first_of_each(files: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Each file once, however often the inputs name it (a folder and a file inside it, `d/` and `d/./`): read
    twice, its rows would be counted twice and kept twice (or removed as duplicates of themselves)."""
    seen, unique = set(), []
    for folder, name in files:
        key = file_key(posixpath.join(folder, name))
        if key not in seen:
            seen.add(key)
            unique.append((folder, name))
    return unique


def file_fingerprint(folder: str, name: str) -> tuple[str, list]:
    """(resolved path, [size, mtime]) of one input file (fsspec metadata for remote ones, where S3's or GCS's time or
    ETag, or the hub's git blob id, stands in for the time): what a run records at its start and every pass over the
    input checks again."""
    df = get_datafolder(folder)
    try:
        info = df.info(name, refresh=True)  # not a listing cached by this process earlier
    except TypeError:  # a filesystem whose info takes no refresh
        info = df.info(name)
    mtime = next((info[k] for k in FILE_VERSION_KEYS if info.get(k)), None)
    return df.resolve_paths(name), [info.get("size"), str(mtime) if mtime is not None else None]


JSONL_RANGE_MIN_BYTES = 1 << 20  # a byte range of a JSONL file a task reads on its own: no smaller
FOOTER_THREADS = 16  # Parquet footers read at once while planning: a shared filesystem answers each with latency
CONTIGUOUS = " (contiguous)"  # ends the recorded name of a split dealt in runs of parts


@dataclass(frozen=True)
class InputSplit:
    """How tasks share fewer files than there are tasks (`input_split`): each file cut into parts (a Parquet file
    into its row groups, a plain JSONL file into byte ranges of `span` bytes), the parts of all files in one sequence
    (plain JSONL files cut in ranges last, each group in file order), and the sequence dealt to the tasks in runs of
    consecutive parts, so a task opens few files (one or two where the files have many parts each).

    A file that cannot be entered midway (compressed JSONL) has as many parts as a plain file of its estimated size
    would: part p is its rows numbered p modulo that, so the tasks dealt its parts each read it whole and keep their
    rows (a gzipped file among plain ones would otherwise be one task's whole). A Parquet file whose footer does not
    read, and a plain JSONL file of one range, is one part. With fewer parts than tasks, the tasks dealt one part read
    it all and keep their share of its rows (10 gzipped files for 100 tasks: each file read by 10 tasks, not all 10
    by each).

    Runs planned by edu-filter before this dealt the sequence round-robin (`contiguous=False`; each of 50k tasks then
    opened hundreds of files) and, where a file could not be cut or the parts were fewer than the tasks, had every
    task read every file by rows; a resume of such a run keeps that. Held as a few numbers per file, not one per
    part: FineWeb's 22M row groups as a list were ~300 MB in every stage's pickle, read by each of its tasks."""

    parts: tuple[int, ...]  # per file: how many parts
    kinds: tuple[str, ...]  # per file: "row groups", "byte ranges" or "whole files"
    sizes: tuple[int, ...]  # per file: bytes when planned (a JSONL file's last range ends there)
    span: int  # bytes of a JSONL range
    contiguous: bool = True

    @property
    def name(self) -> str:
        """What run_config.json records: a run resumes only with the same split."""
        kinds = " and ".join(sorted({k for k, n in zip(self.kinds, self.parts) if n}))
        return kinds + (CONTIGUOUS if self.contiguous else "")

    @property
    def digest(self) -> str:
        """The parts of every file, in short: recorded beside the name, since the same kinds can be cut otherwise."""
        import hashlib

        return hashlib.sha1(orjson.dumps([self.parts, self.kinds, self.span])).hexdigest()[:16]

    def _sequence(self) -> tuple[list[int], list[int]]:
        """The files in the sequence's order, and where each one's parts start in it (the total last)."""
        order = sorted(range(len(self.parts)), key=lambda i: self.kinds[i] == "byte ranges")  # stable: file order
        return order, list(itertools.accumulate((self.parts[i] for i in order), initial=0))

    @staticmethod
    def _first_sharer(part: int, world_size: int, total: int) -> int:
        """With fewer parts than tasks, the first task of those sharing `part`: ceil(part W / N)."""
        return -(-part * world_size // total)

    def share(self, rank: int, world_size: int) -> tuple[list[tuple[int, list[int]]], int, int]:
        """The parts task `rank` reads, (file index, part numbers within the file) in sequence order, and which of
        their rows it keeps: the k-th of every m (m > 1 where tasks outnumber the parts: m tasks read one part)."""
        import bisect

        order, starts = self._sequence()
        total = starts[-1]
        k, m = 0, 1
        if not self.contiguous:
            mine = range(rank, total, world_size)
        elif total >= world_size:
            mine = range(rank * total // world_size, (rank + 1) * total // world_size)
        else:  # the tasks from ceil(p W / N) up to ceil((p + 1) W / N) share part p
            part = rank * total // world_size
            first, end = (self._first_sharer(p, world_size, total) for p in (part, part + 1))
            mine, k, m = range(part, part + 1), rank - first, end - first
        plan: dict[int, list[int]] = {}
        for n in mine:
            j = bisect.bisect_right(starts, n) - 1
            plan.setdefault(order[j], []).append(n - starts[j])
        return list(plan.items()), k, m

    def reads(self, world_size: int) -> list[int]:
        """Per file, how many tasks read it (all of it for a file read whole, its parts else), where that is more
        than once: a gzipped file by every task dealt one of its parts, a part by every task sharing it."""
        import bisect

        order, starts = self._sequence()
        total, reads = starts[-1], [1] * len(self.parts)
        if not self.contiguous or total == 0:
            return reads
        sharing = [1] * total
        if total < world_size:
            sharing = [self._first_sharer(p + 1, world_size, total) - self._first_sharer(p, world_size, total)
                       for p in range(total)]
        bounds = [r * total // world_size for r in range(world_size + 1)]  # the first part of each task
        for j, i in enumerate(order):
            first, end = starts[j], starts[j + 1]
            if first == end:
                continue
            if self.kinds[i] == "whole files":  # each task dealt a part reads it all
                dealt = bisect.bisect_right(bounds, end - 1) - bisect.bisect_right(bounds, first) + 1
                reads[i] = sum(sharing[first:end]) if total < world_size else dealt
            else:
                reads[i] = max(sharing[first:end])
        return reads

    def ranges(self, i: int, parts: list[int]) -> list[tuple[None, int, int]]:
        """Byte ranges (None, first byte, bytes) of JSONL file `i`'s parts."""
        return [(None, k * self.span, min(self.span, self.sizes[i] - k * self.span)) for k in parts]


def _row_groups(folder: str, name: str) -> int | None:
    """A Parquet file's row groups, None where its footer is not Parquet: what pyarrow says of the bytes (an Arrow
    error, a string that does not decode, or its plain OSError with no errno twice: a footer that does not
    deserialize). Any other error (a lost connection, a 429, S3's 503 as an OSError with an errno) stops the
    planning: read a moment later, the run would be cut into other parts, and a resume would read other rows."""
    import pyarrow.parquet as pq

    for attempt in range(2):
        try:
            with get_datafolder(folder).open(name, "rb") as fh:
                return pq.read_metadata(fh).num_row_groups
        except NOT_PARQUET:
            return None
        except Exception as e:  # noqa: BLE001 - sorted below
            if type(e) is not OSError or e.errno is not None:  # HTTP, fsspec, errno errors: not the file's bytes
                raise DocumentError(f"cannot read the Parquet footer of {posixpath.join(folder, name)} "
                                    f"({type(e).__name__}: {e}); run the same command again") from e
            if attempt:
                return None


GZIP_SAMPLE_BYTES = 1 << 16  # of a compressed file, read to estimate its size uncompressed (25k files: 1.6 GB)


def _uncompressed_size(folder: str, name: str, size: int) -> int:
    """A gzipped file's size uncompressed, estimated from its first GZIP_SAMPLE_BYTES (exact for a smaller file),
    every gzip stream in them counted (`cat a.gz b.gz`), a MiB of text at a time; its size where they are not gzip
    (the reader reports the file). An error reading them stops the planning, as in `_row_groups`."""
    try:
        with get_datafolder(folder).open(name, "rb") as fh:
            packed = fh.read(GZIP_SAMPLE_BYTES)
    except Exception as e:  # noqa: BLE001 - a transient error must not change the parts
        raise DocumentError(f"cannot read the start of {posixpath.join(folder, name)} ({type(e).__name__}: {e}); run "
                            "the same command again") from e
    plain, rest = 0, packed
    try:
        while rest:
            unpacker = zlib.decompressobj(wbits=31)
            while rest and not unpacker.eof:
                plain += len(unpacker.decompress(rest, 1 << 20))
                rest = unpacker.unconsumed_tail
            rest = unpacker.unused_data if unpacker.eof else b""
    except zlib.error:  # not gzip, or something after the streams
        if plain == 0:
            return size
    return plain if len(packed) == size else plain * size // max(1, len(packed) - len(rest))


def _packed_as_text(folder: str, name: str) -> bool:
    """Whether a file named as plain JSONL starts like a compressed or Parquet file (`refuse_packed`); an error
    reading its first bytes stops the planning, as in `_row_groups`."""
    try:
        head = get_datafolder(folder).cat_file(name, start=0, end=8)  # those bytes alone, not a readahead block
    except Exception as e:  # noqa: BLE001 - a transient error must not change the parts
        raise DocumentError(f"cannot read the start of {posixpath.join(folder, name)} ({type(e).__name__}: {e}); run "
                            "the same command again") from e
    return any(head.startswith(magic) for magic, _, _ in PACKED_FORMATS)


def input_split(files: list[tuple[str, str]], tasks: int, contiguous: bool = True) -> InputSplit | None:
    """With fewer files than tasks, the parts the tasks share instead (see `InputSplit`): every Parquet row group,
    byte ranges of plain JSONL files (about four per task) and compressed files' rows modulo their parts. None where
    a filesystem tells no size or there is nothing to read (or, dealt the old way, where a file cannot be cut or the
    parts are fewer than the tasks): then every task reads all files and keeps every n-th row (`tasks` times the
    reading). A failed read of a size, a footer or a compressed file's start stops it (DocumentError)."""
    from concurrent.futures import ThreadPoolExecutor

    if len(files) >= tasks:
        return None
    parquet = [name.lower().endswith(PARQUET_SUFFIXES) for _, name in files]
    packed = [not p and name.lower().endswith(".gz") for p, (_, name) in zip(parquet, files)]
    if any(packed) and not contiguous:
        return None
    try:
        sizes = [0 if p else get_datafolder(folder).size(name) for p, (folder, name) in zip(parquet, files)]
    except FileNotFoundError:  # gone since it was listed: the reader reports it
        return None
    except Exception as e:  # noqa: BLE001 - a transient error must not change the split (a resume is refused)
        raise DocumentError(f"cannot read the size of an input file ({type(e).__name__}: {e}); run the same command "
                            "again") from e
    if None in sizes:  # a filesystem that tells no size
        return None
    bare = [not p and not z for p, z in zip(parquet, packed)]  # plain JSONL by their names
    with ThreadPoolExecutor(max(1, min(FOOTER_THREADS, len(files)))) as pool:
        groups = list(pool.map(lambda f: _row_groups(*f), [f for p, f in zip(parquet, files) if p]))
        unpacked = list(pool.map(lambda f: _uncompressed_size(*f[0], f[1]),
                                 [(f, s) for z, f, s in zip(packed, files, sizes) if z]))
        packed_as_text = list(pool.map(lambda f: _packed_as_text(*f), [f for b, f in zip(bare, files) if b]))
    if None in groups and not contiguous:
        return None
    unpacked.reverse()
    plain = [unpacked.pop() if z else size for z, size in zip(packed, sizes)]  # bytes of text
    span = max(JSONL_RANGE_MIN_BYTES, sum(plain) // (4 * tasks))
    groups.reverse()
    packed_as_text.reverse()
    parts, kinds = [], []
    for p, z, size, unpacked in zip(parquet, packed, sizes, plain):
        if p:
            count = groups.pop()
            parts.append(1 if count is None else count)
            kinds.append("whole files" if count is None else "row groups")
        elif z:  # cannot be entered midway: as many parts as its text would have, each its rows modulo that
            parts.append(max(1, -(-unpacked // span)))
            kinds.append("whole files")
        elif (packed_as_text.pop() or 0 < size <= span) and contiguous:
            # one range, read by line, its rows named FILE:LINE; or compressed or Parquet bytes named as plain
            # JSONL, read by one task, which records it (`refuse_packed`), not by each task of a range
            parts.append(1)
            kinds.append("whole files")
        else:
            parts.append(-(-size // span))
            kinds.append("byte ranges")
    split = InputSplit(tuple(parts), tuple(kinds), tuple(sizes), span, contiguous)
    return split if sum(parts) >= (1 if contiguous else tasks) else None


EXTRA_READING_WORTH_SAYING = 1 << 30  # bytes read beyond one pass, over all tasks


def reading_factor(files: list[tuple[str, str]], reads: list[int]) -> float | None:
    """How many times one pass's bytes the tasks read, file i read by `reads[i]` tasks, where that is at least
    EXTRA_READING_WORTH_SAYING more than one pass (a small sample read by a few tasks is not worth a warning); 0
    where it is not; None where a filesystem tells no size."""
    if max(reads, default=1) <= 1:
        return 0
    try:
        sizes = [get_datafolder(folder).size(name) for folder, name in files]
    except Exception:  # noqa: BLE001 - the reader reports the file
        return None
    if None in sizes:
        return None
    read = sum(size * n for size, n in zip(sizes, reads))
    return read / max(1, sum(sizes)) if read - sum(sizes) >= EXTRA_READING_WORTH_SAYING else 0


def nested_deeper(row: dict, limit: int) -> bool:
    """Whether lists and objects nest more than `limit` levels deep in a field of the row."""
    stack = [(row, 0)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return True
        children = value.values() if isinstance(value, dict) else value
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


class ApplyInputReader(BaseReader):
    """Reads JSONL/Parquet inputs and turns every row, good or bad, into exactly one document.

    With at least as many files as tasks, each task reads whole files. With fewer files, `split` (`input_split`)
    splits Parquet files by row group and plain JSONL files by byte range: each task reads its parts only (a row
    without an id is then named by its byte offset, FILE@BYTE, not its line, FILE:LINE, which a range cannot know).
    Tasks dealt the same part (one small .jsonl.gz and `--tasks 4`), and every task of a run planned without a split,
    read it all and keep the rows whose index falls in their share, so the tasks still split the scoring work (rows
    not kept are not converted or parsed).

    Every pass re-reads the input and the passes are matched by position (which documents MinHash removes, which
    scored above the threshold), so a file replaced or appended to during a run (between two Slurm jobs of its
    chain, say) would remove or keep the wrong documents: with `fingerprints` (recorded when the run started) a
    changed file fails the task before a row of it is read, naming the file.
    """

    name = "📖 edu-filter input"

    def __init__(self, files: list[tuple[str, str]], text_key: str = "text", id_key: str = "id",
                 progress_folder: str | None = None, counts_folder: str | None = None,
                 fingerprints: dict | None = None, split: InputSplit | None = None):
        super().__init__(text_key=text_key, id_key=id_key)
        self.files = files
        # a file's name in sources and default ids: relative to its input, or longer where two inputs hold one name
        self.labels = distinct_names([posixpath.join(*f) for f in files], [name for _, name in files])
        self.split = split  # `input_split`'s parts when tasks split files
        self.fingerprints = fingerprints
        self.progress_folder = progress_folder
        self.counts_folder = counts_folder  # set on the pass whose rows end up in kept/removed/failed

    def _document(self, row: dict, source: str) -> Document:
        source = printable_name(source)
        present = self.text_key in row
        text = row.pop(self.text_key, None)
        undecoded = None
        if isinstance(text, (bytes, bytearray)):  # a Parquet string column written without its UTF8 annotation
            try:
                text = bytes(text).decode("utf-8")
            except UnicodeDecodeError as e:
                text, undecoded = None, e
        doc_id = row.pop(self.id_key, None)
        if doc_id in ("", b""):  # no id: named by its place, as a row without the field (an empty id keys nothing)
            doc_id = None
        if row.get("token_count", 0) is None:  # FineWeb's column, null here: counted like a row without it
            del row["token_count"]
        # an input's own score (an LLM annotation, say) must survive the classifier's; a `text` column beside
        # --text-field content must not replace the text scored
        for key in (*PIPELINE_OWNED, *RECORD_OWNED):
            if key in row and not (key == "token_count" and type(row[key]) is int):
                name = f"input_{key}"
                while name in row:
                    name = f"input_{name}"
                row[name] = row.pop(key)
        doc = Document(text=text if isinstance(text, str) else "", id=id_text(doc_id) if doc_id is not None else source,
                       metadata=row)
        if undecoded is not None:
            doc.metadata[FAILURE_KEY] = "invalid_utf8"
            doc.metadata["input_error"] = f"{source}: field '{self.text_key}' is not valid UTF-8 ({undecoded})"
            doc.metadata["input_source"] = source
        elif not isinstance(text, str) or not text.strip():
            what = (("null" if present else "missing") if text is None else
                    ("empty" if isinstance(text, str) else f"a {type(text).__name__}"))
            doc.metadata[FAILURE_KEY] = "no_text"
            doc.metadata["input_error"] = f"{source}: field '{self.text_key}' is {what}"
            doc.metadata["input_source"] = source
            if text is not None and not isinstance(text, str):
                doc.metadata[self.text_key + "_original"] = repr(text)[:RAW_PREVIEW_CHARS]
        return doc

    def _failed(self, reason: str, source: str, error: str, raw: bytes, whole: bool = True) -> Document:
        """A failed row; `raw`: its bytes, kept in raw_base64 where `whole`."""
        source = printable_name(source)
        metadata = {FAILURE_KEY: reason, "input_error": f"{source}: {error}", "input_source": source,
                    "raw_preview": raw[:4 * RAW_PREVIEW_CHARS].decode("utf-8", "replace")[:RAW_PREVIEW_CHARS]}
        if whole:
            metadata["raw_base64"] = base64.b64encode(raw).decode("ascii")
        return Document(text="", id=source, metadata=metadata)

    def _jsonl_lines(self, raw, label: str, keep, progress: "TaskProgress", ranges: list | None):
        """(source, line, its length where it is over MAX_LINE_BYTES, else None) of the non-blank lines to read, `keep`
        choosing among them: all of the file (FILE:LINE), or those starting in the byte `ranges` ((None, first byte,
        bytes)), named FILE@BYTE. A line over MAX_LINE_BYTES comes as its start only."""
        if ranges is None:
            fh = gzip.GzipFile(fileobj=raw) if label.lower().endswith(".gz") else raw
            lineno = 0
            while True:
                line_bytes, length, too_long = read_line(fh)
                if not length:
                    break
                lineno += 1
                if lineno == 1:  # a file saved by Windows tools starts with a BOM
                    line_bytes = line_bytes.removeprefix(UTF8_BOM)
                self._row_reached = lineno
                progress.at_bytes(raw.tell())
                if (too_long or line_bytes.strip()) and keep(lineno):
                    yield f"{label}:{lineno}", line_bytes, length if too_long else None
            if fh is not raw and raw.tell() == 0:  # gzip reads nothing as no rows; the smallest gzip is 20 bytes
                raise EOFError("an empty file, not gzip (a download or copy cut short?)")
            return
        done = 0  # bytes of the ranges read before this one, for progress
        for _, start, size in ranges:
            raw.seek(max(0, start - 1))
            if start:  # the rest of the line holding the byte before the range belongs to the range before
                read_line(raw)
            position = raw.tell()
            while position < start + size:
                line_bytes, length, too_long = read_line(raw)
                if not length:
                    break
                self._row_reached, line_start = position, position
                position += length
                if line_start == 0:
                    line_bytes = line_bytes.removeprefix(UTF8_BOM)
                if (too_long or line_bytes.strip()) and keep(line_start):
                    yield f"{label}@{line_start}", line_bytes, length if too_long else None
                progress.at_bytes(done + min(size, position - start))
            done += size

    def _read_jsonl(self, folder, name: str, label: str, keep, progress: "TaskProgress",
                    ranges: list | None = None) -> Iterator[Document]:
        with folder.open(name, "rb") as opened:
            if not label.lower().endswith(".gz") and (ranges is None or ranges[0][1] == 0
                                                      or not self.split.contiguous):
                # where the read starts at the file's start (no extra fetch of a remote file's first block): a split
                # never cuts such a file in ranges (`input_split`), one unreadable_file record; a split planned by
                # an older release did (each range records it)
                refuse_packed(opened, label)
            raw = lines_readable(opened)
            for source, line_bytes, too_long in self._jsonl_lines(raw, label, keep, progress, ranges):
                if too_long:
                    yield self._failed("line_too_long", source, f"a line of {too_long:,} bytes, over the "
                                       f"{MAX_LINE_BYTES:,} a document may take (a file without line breaks, or a "
                                       "JSON array?); its start is in raw_preview", line_bytes, whole=False)
                    continue
                try:
                    line = line_bytes.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield self._failed("invalid_utf8", source, f"not valid UTF-8 ({e})", line_bytes)
                    continue
                try:
                    row = json_line(line)
                except orjson.JSONDecodeError as e:
                    yield self._failed("invalid_json", source, f"not valid JSON ({e})", line_bytes)
                    continue
                if not isinstance(row, dict):
                    yield self._failed("not_an_object", source, f"expected a JSON object, got {type(row).__name__}",
                                       line_bytes)
                    continue
                if line_bytes.count(b"[") + line_bytes.count(b"{") > MAX_NESTING and nested_deeper(row, MAX_NESTING):
                    yield self._failed("too_deeply_nested", source, f"a field nests more than {MAX_NESTING} lists or "
                                       "objects, more than the Parquet and JSON writers take", line_bytes)
                    continue
                yield self._document(row, source)

    def _read_parquet(self, folder, name: str, label: str, keep, progress: "TaskProgress", after: int = 0,
                      groups: list[int] | None = None, reports: bool = True) -> Iterator[Document]:
        """The rows of a Parquet file after row `after` (a second read, after an error opening it, goes on where the
        first stopped); with `groups` only those row groups. Rows are numbered in the file either way, so a row's
        source names the same row whichever task reads it.

        Read a row group at a time: a row group that stops reading (a corrupt page: pyarrow's plain OSError, or a
        value that does not decode) is read again once from there, which a transient error survives; failing again,
        its rows from there are one unreadable_file record naming them (from the task that `reports` it, of those
        reading the file), and the next row group is read. One bad page cost the rest of the file (a 1 GB shard's
        ~1M good rows), and the counts added up without them."""
        with folder.open(name, "rb") as fh:
            parquet = open_parquet(fh)
            meta = parquet.metadata
            total_rows = max(1, meta.num_rows)
            size = folder.size(name)
            firsts = list(itertools.accumulate((meta.row_group(g).num_rows for g in range(meta.num_row_groups)),
                                               initial=0))
            for j, group in enumerate(range(meta.num_row_groups) if groups is None else groups):
                first, rows = firsts[group], firsts[group + 1] - firsts[group]
                if first + rows <= after:
                    continue

                def at_row(rowno: int, j=j, first=first, rows=rows) -> None:
                    # the share of the file read, as the task's total counts it: by rows of a whole file, by row
                    # groups of its parts (uneven groups would run past or short of the total)
                    progress.at_bytes(int(size * rowno / total_rows) if groups is None else
                                      int(size * (j + (rowno - first) / max(1, rows)) / meta.num_row_groups))

                resumed_at = None  # the row after which a read of this group failed, once
                while True:
                    try:
                        yield from self._parquet_group(parquet, group, first, max(after, resumed_at or 0), keep,
                                                       label, at_row)
                        break
                    except (*UNREADABLE, OSError) as e:
                        if isinstance(e, OSError) and type(e) is not OSError and not isinstance(e, UNREADABLE):
                            raise  # HTTP, fsspec, errno errors: not the file's bytes (a rerun reads it again)
                        if resumed_at != self._row_reached:
                            resumed_at = self._row_reached
                            self.stat_update("parquet_rereads")
                            continue
                        if reports:
                            self.stat_update("unreadable_row_groups")
                            yield self._failed(
                                "unreadable_file", f"{label} (row group {group})",
                                f"cannot read rows {self._row_reached + 1}-{first + rows} of row group {group} "
                                f"({first + rows - self._row_reached:,} rows; {type(e).__name__}: {e}); the file's "
                                "other row groups are read", b"")
                        break
                at_row(first + rows)

    def _parquet_group(self, parquet, group: int, first: int, after: int, keep, label: str,
                       at_row) -> Iterator[Document]:
        """Row group `group`'s rows (the first numbered `first` + 1) after row `after`, those `keep` takes; `at_row`
        is told each batch's last row."""
        rowno = first
        self._row_reached = max(first, after)
        for batch in parquet.iter_batches(batch_size=1024, row_groups=[group]):
            if rowno + batch.num_rows <= after:
                rowno += batch.num_rows
                continue
            wanted = [i for i in range(batch.num_rows) if rowno + i + 1 > after and keep(rowno + i + 1)]
            numbers = [rowno + i + 1 for i in wanted]
            rowno += batch.num_rows
            if len(wanted) < batch.num_rows:  # rows of other tasks are not converted to Python
                batch = batch.take(pa.array(wanted, pa.int64()))
            for number, row in zip(numbers, parquet_rows_or_errors(batch)):
                yield self._parquet_document(row, f"{label}:{number}")
            self._row_reached = rowno
            at_row(rowno)

    def _parquet_document(self, row, source: str) -> Document:
        if isinstance(row, UnicodeDecodeError):
            return self._failed("invalid_utf8", source, f"a string field is not valid UTF-8 ({row})", b"")
        if isinstance(row, Exception):  # a timestamp outside datetime's years, say
            return self._failed("unreadable_row", source, f"cannot read the row ({type(row).__name__}: {row})", b"")
        return self._document(row, source)

    def _checked_size(self, folder: str, name: str) -> int:
        path, now = file_fingerprint(folder, name)
        if self.fingerprints is not None and self.fingerprints.get(path) != now:
            raise DocumentError(f"input {path} was replaced during this run (size, time {self.fingerprints.get(path)}"
                                f" -> {now}), so its passes would not match: restore it, or start over with --overwrite")
        return now[0]

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data:
            yield from data
        # what this task reads: (file index, its row groups or byte ranges, or None for the whole file), and of
        # the rows read the `mine`-th of every `sharing` (tasks reading the same)
        residues: dict[int, tuple[frozenset, int]] = {}
        if len(self.files) >= world_size:
            plan, mine, sharing = [(i, None) for i in range(rank, len(self.files), world_size)], 0, 1
        elif self.split is not None:
            kinds = self.split.kinds
            parts_read, mine, sharing = self.split.share(rank, world_size)
            plan = [(i, self.split.ranges(i, parts) if kinds[i] == "byte ranges"
                     else None if kinds[i] == "whole files" else parts) for i, parts in parts_read]
            # a whole file's parts are its rows by their number modulo its parts: this task's, where not all
            residues = {i: (frozenset(parts), self.split.parts[i]) for i, parts in parts_read
                        if kinds[i] == "whole files" and len(parts) < self.split.parts[i]}
        else:  # every task reads all, keeps its rows
            plan, mine, sharing = [(i, None) for i in range(len(self.files))], rank, world_size
        counter = 0

        def keeping(residue: tuple[frozenset, int] | None):
            def keep(index: int) -> bool:
                nonlocal counter
                if residue is not None and index % residue[1] not in residue[0]:
                    return False
                counter += 1
                return sharing == 1 or (counter - 1) % sharing == mine
            return keep

        sizes = []
        for k, (i, groups) in enumerate(plan):
            size = self._checked_size(*self.files[i])
            if groups is not None and self.split.kinds[i] == "byte ranges":
                # a file's last byte range ends at its size as recorded when the run started (the one checked),
                # not as planned a moment before: a line appended in between is read, once
                planned = self.split.sizes[i]
                groups = [(g, start, max(length, size - start) if start + length == planned else length)
                          for g, start, length in groups]
                plan[k] = (i, groups)
                size = size * sum(g[2] for g in groups) // max(1, planned)  # the share of the file this task reads
            elif groups is not None:  # of its row groups
                size = size * len(groups) // self.split.parts[i]
            sizes.append(size)
        progress = TaskProgress(self.progress_folder, rank, bytes_total=sum(sizes))
        for (i, groups), size in zip(plan, sizes):
            folder_path, name = self.files[i]
            label = self.labels[i]
            folder = get_datafolder(folder_path)
            parquet = name.lower().endswith(PARQUET_SUFFIXES)
            read = (functools.partial(self._read_parquet, groups=groups, reports=mine == 0) if parquet else
                    functools.partial(self._read_jsonl, ranges=groups))
            self.stat_update("input_files")
            self._row_reached = 0  # the line or row of the file read last, by any task
            failed_at = None  # the row after which a Parquet read failed with an OSError, once
            keep = keeping(residues.get(i))
            while True:
                try:
                    for doc in (read(folder, name, label, keep, progress) if failed_at is None
                                else read(folder, name, label, keep, progress, after=failed_at)):
                        self.stat_update("rows_read")
                        progress.document()
                        yield doc
                    break
                except UNREADABLE as e:  # before OSError: a .gz that is not gzip is one (BadGzipFile)
                    error = e
                except OSError as e:
                    # pyarrow says OSError both for a corrupt page (the same again at the same row) and for a
                    # transient read error (gone on a second read): read again from there once to tell them apart
                    if not parquet or type(e) is not OSError:  # HTTP, fsspec, errno errors: not the file's bytes
                        if hasattr(e, "add_note"):  # Python 3.11+; on 3.10 the error goes up as it came
                            e.add_note(f"while reading {label} after row {self._row_reached}")
                        raise
                    if failed_at != self._row_reached:
                        failed_at = self._row_reached
                        self.stat_update("parquet_rereads")
                        continue
                    error = e
                # a truncated or corrupt file: its rows so far are in the stream; the rest cannot be read, which
                # one record says (once, from the task that owns the file or row groups) instead of a crash every
                # resume repeats
                if mine == 0 and (i not in residues or 0 in residues[i][0]):  # of the tasks reading the file
                    self.stat_update("unreadable_files")
                    progress.document()
                    what = label if groups is None else (
                        f"{label} (row groups {', '.join(map(str, groups))})" if parquet
                        else f"{label} (bytes {', '.join(f'{g[1]}-{g[1] + g[2]}' for g in groups)})")
                    after = "row" if parquet or groups is None else "the line at byte"
                    yield self._failed("unreadable_file", what, f"cannot read the rest of the file, after {after} "
                                       f"{self._row_reached} ({type(error).__name__}: {error})", b"")
                break
            self._checked_size(folder_path, name)  # changed while this pass read it: its rows may not match
            progress.file_done(size)
        progress.close()
        if self.counts_folder is not None:
            write_counts(self.counts_folder, rank, {"in": [progress.documents, 0]})


class InputErrorFilter(BaseFilter):
    """Drops the rows the reader marked as unreadable, with the reason (invalid_json, invalid_utf8, no_text...)."""

    name = "🚑 input errors"

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        reason = doc.metadata.pop(FAILURE_KEY, None)
        return (False, reason) if reason else True


class RankFileReader(JsonlReader):
    """Reads back the intermediate file this task wrote in an earlier stage (`{rank:05d}.jsonl.gz`), in order.

    MinHash and exact dedup address documents by their position in this stream, so the order must be the one the
    signatures were computed on.
    """

    name = "📖 stage input"

    def __init__(self, data_folder: str, progress_folder: str | None = None):
        super().__init__(data_folder, add_file_path=False, adapter=_from_record)
        self.progress_folder = progress_folder
        self._position = 0  # compressed bytes of the file read so far

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data:
            yield from data
        filename = f"{rank:05d}.jsonl.gz"
        if not self.data_folder.exists(filename):
            TaskProgress(self.progress_folder, rank).close()
            return  # this task had no documents left in the earlier stage
        size = self.data_folder.size(filename)
        progress = TaskProgress(self.progress_folder, rank, bytes_total=size)
        for doc in self.read_files_shard([filename]):
            progress.at_bytes(self._position)  # the bar moves as it reads, not once the task is done
            progress.document()
            yield doc
        progress.file_done(size)
        progress.close()

    def read_file(self, filepath: str):
        """datatrove's, keeping the compressed file's position; a row that does not read fails the task (the file
        is this run's own: datatrove's skipped it with a warning, and a document was lost)."""
        with self.data_folder.open(filepath, "rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as lines:
            for number, line in enumerate(lines):
                self._position = raw.tell()
                with self.track_time():
                    record = orjson.loads(line)
                    if STAGE_TAG_IN_JSON in line:
                        record = untagged(record)
                    document = self.get_document_from_dict(record, filepath, number)
                if document:
                    yield document


def _from_record(self, data: dict, path: str, id_in_file: int | str) -> dict:
    """A flat record back into a document as it was: every field but text and id is metadata again (datatrove's
    default adapter would unpack an input's own `metadata` column and drop a `media` one)."""
    return {"text": data.pop("text"), "id": data.pop("id"), "metadata": data}


def flat_record(document: Document, drop: frozenset[str] = frozenset()) -> dict:
    """`text`, `id`, then the original fields, with `score`/`int_score` last (the FineWeb-Edu column order)."""
    meta = {k: v for k, v in document.metadata.items() if k not in drop}
    scores = {k: meta.pop(k) for k in SCORE_KEYS if k in meta}
    return {"text": document.text, "id": document.id, **meta, **scores}


def _record_adapter(self, document: Document) -> dict:
    return flat_record(document)


def _removed_adapter(self, document: Document) -> dict:
    """A removed document's record: its `filter_reason` always (datatrove's dedup filters set none: every duplicate
    read null where the threshold's and decontamination's said theirs), without datatrove's `duplicate_count`
    (exact dedup's count of a kept copy's others, 0 on a removed copy: kept/ leaves it out too)."""
    record = flat_record(document, drop=frozenset({"duplicate_count"}))
    record.setdefault("filter_reason", self.destination.removeprefix("removed/"))
    return record


def _kept_adapter(self, document: Document) -> dict:
    return flat_record(document, drop=PIPELINE_KEYS)


class TaskFilenames:
    """datatrove fills `${rank}` before the document's own fields, so an input column named `rank` would choose the
    file and tasks would overwrite each other's output; here the task's rank and the id always win."""

    def _get_output_filename(self, document: Document, rank: int | str = 0, **kwargs) -> str:
        return self.output_filename.substitute(
            {**document.metadata, "id": document.id, "rank": str(rank).zfill(5), **kwargs})


class WrittenCounts:
    """Mixin for a datatrove writer: counts the documents and tokens it writes per destination (`removed/duplicate`,
    `failed/${filter_reason}`, `kept`) and saves them per task on close, so the report adds up small files
    instead of re-reading the corpus."""

    def count_into(self, destination: str, counts_folder: str | None, counts_name: str) -> None:
        self.destination = destination
        self.counts_folder = counts_folder
        self.counts_name = counts_name
        self._counts: dict[str, list[int]] = {}
        self._rank = 0

    def write(self, document: Document, rank: int = 0, **kwargs):
        self._rank = rank
        super().write(document, rank, **kwargs)
        key = self.destination.replace("${filter_reason}", str(document.metadata.get("filter_reason") or "unknown"))
        entry = self._counts.setdefault(key, [0, 0])
        entry[0] += 1
        entry[1] += int(document.metadata.get("token_count") or 0)

    def close(self):
        super().close()
        if self.counts_folder is not None and self._counts:  # a task that wrote nothing leaves no file (no rank guess)
            write_counts(self.counts_folder, self._rank, self._counts, name=self.counts_name)


def json_value(obj):
    """A value JSON has no type for, as the nearest it has: bytes as base64, decimals as their exact text, durations
    in seconds, times (a pandas Timestamp too) in ISO 8601; anything else as its text. A Parquet input's binary or
    decimal column would otherwise fail every JSONL write (removed/, failed/, the files between stages)."""
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(obj)).decode("ascii")
    if isinstance(obj, decimal.Decimal):
        return str(obj)
    if isinstance(obj, datetime.timedelta):
        return obj.total_seconds()
    if isinstance(obj, (datetime.date, datetime.time)):
        return None if obj != obj else obj.isoformat()  # pandas' NaT is not equal to itself
    return str(obj)


JSON_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY  # a map's int keys; numpy values


class RecordJsonl:
    """datatrove's JSONL writing with `json_value` for what JSON cannot hold, and without its handling of a `media`
    field (an input's own `media` is kept as `input_media`)."""

    def _write(self, document: dict, file_handler, _filename: str):
        file_handler.write(orjson.dumps(document, option=JSON_OPTIONS | orjson.OPT_APPEND_NEWLINE, default=json_value))


class CountedJsonlWriter(TaskFilenames, WrittenCounts, RecordJsonl, JsonlWriter):
    """Gzipped JSONL of flat records (removed and failed rows) that counts what it wrote."""

    def __init__(self, folder: str, destination: str, counts_folder: str, filename: str = "${rank}.jsonl.gz",
                 counts_name: str | None = None):
        removed = destination.startswith("removed/") and "$" not in destination
        super().__init__(folder, output_filename=filename, compression="gzip",
                         adapter=_removed_adapter if removed else _record_adapter)
        self.count_into(destination, counts_folder, counts_name or destination.split("/")[-1])


STAGE_TAG = "\x00edu:"  # a key no input has: {STAGE_TAG + type: value} is a value JSON has no type for
STAGE_TAG_IN_JSON = "\\u0000edu:"  # how a line of JSON holds it


def stage_value(obj):
    """orjson's `default` for the files between stages: a value JSON has no type for, tagged with its type, for
    `RankFileReader` to give back as it was. As text (`json_value`) a score-first or --keep-top run kept times, bytes
    and decimals as strings, and NaN as null, where a dedup-first run kept them typed: kept/ changed with --order."""
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return {STAGE_TAG + "bytes": base64.b64encode(bytes(obj)).decode("ascii")}
    if isinstance(obj, decimal.Decimal):
        return {STAGE_TAG + "decimal": str(obj)}
    if isinstance(obj, (datetime.datetime, datetime.timedelta)) and type(obj).__module__.startswith("pandas"):
        if obj != obj:  # NaT
            return None
        if isinstance(obj, datetime.timedelta):  # a Timedelta, to the nanosecond
            return {STAGE_TAG + "pandas_timedelta": obj.value}
        return {STAGE_TAG + "pandas_timestamp": [obj.value, str(obj.tz) if obj.tz else None]}
    if isinstance(obj, datetime.timedelta):
        return {STAGE_TAG + "timedelta": [obj.days, obj.seconds, obj.microseconds]}
    if isinstance(obj, datetime.datetime):  # with its zone's name: an offset alone typed kept/ by the season
        return {STAGE_TAG + "datetime": [obj.isoformat(), getattr(obj.tzinfo, "key", None)
                                         or getattr(obj.tzinfo, "zone", None)]}
    for kind in (datetime.date, datetime.time):
        if isinstance(obj, kind):
            return {STAGE_TAG + kind.__name__: obj.isoformat()}
    return json_value(obj)


def _tag_non_finite(value):
    """NaN and infinities tagged (`stage_value`), at any depth: JSON has no number for them and orjson writes null."""
    if isinstance(value, (float, np.floating)):
        return value if math.isfinite(value) else {STAGE_TAG + "float": repr(float(value))}
    if isinstance(value, dict):
        return {k: _tag_non_finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_tag_non_finite(v) for v in value]
    return value


def _from_stage_value(kind: str, value):
    if kind == "bytes":
        return base64.b64decode(value)
    if kind == "decimal":
        return decimal.Decimal(value)
    if kind == "timedelta":
        return datetime.timedelta(*value)
    if kind.startswith("pandas_"):
        import pandas as pd

        return pd.Timedelta(value) if kind == "pandas_timedelta" else pd.Timestamp(value[0], tz=value[1])
    if kind == "float":
        return float(value)
    if kind == "datetime":
        when = datetime.datetime.fromisoformat(value[0])
        if value[1]:
            import zoneinfo

            when = when.astimezone(zoneinfo.ZoneInfo(value[1]))
        return when
    return getattr(datetime, kind).fromisoformat(value)


def untagged(value):
    """A value read back from the files between stages, its tagged parts (`stage_value`) as they were."""
    if isinstance(value, dict):
        if len(value) == 1:
            (key, inner), = value.items()
            if isinstance(key, str) and key.startswith(STAGE_TAG):
                return _from_stage_value(key[len(STAGE_TAG):], inner)
        return {k: untagged(v) for k, v in value.items()}
    if isinstance(value, list):
        return [untagged(v) for v in value]
    return value


STAGE_VALUES = "tagged"  # how the files between stages hold values JSON has no type for (a run records it)


class RecordWriter(TaskFilenames, RecordJsonl, JsonlWriter):
    """Gzipped JSONL of flat records: the intermediate files between stages, every value typed as it was read
    (`stage_value`; NaN and infinities too, which JSON writes as null). `tagged=False` writes them as text, as a run
    begun by an edu-filter from before did: its finished tasks' files hold them so, and the kept files of its other
    tasks must type them alike."""

    def __init__(self, folder: str, filename: str = "${rank}.jsonl.gz", tagged: bool = True):
        super().__init__(folder, output_filename=filename, compression="gzip", adapter=_record_adapter)
        self.tagged = tagged

    def _write(self, document: dict, file_handler, filename: str):
        if not self.tagged:
            return super()._write(document, file_handler, filename)
        document = {k: v if isinstance(v, (str, int)) else _tag_non_finite(v) for k, v in document.items()}
        file_handler.write(orjson.dumps(document, default=stage_value, option=JSON_OPTIONS
                                        | orjson.OPT_APPEND_NEWLINE | orjson.OPT_PASSTHROUGH_DATETIME))


class DropTaskScratch(PipelineStep):
    """In the stage that reads a task's scratch file (`RecordWriter`'s `{rank:05d}.jsonl.gz`) for the last time:
    the executor calls `drop` once the task is complete (`drop_finished_task_scratch`), so no rerun of it reads the
    file again (`RankFileReader` reads a missing one as "no documents"). Before, the scored documents of `--keep-top`
    and score-first's survivors stayed to the report stage beside kept/ and removed/: the corpus twice on disk."""

    name = "🗑 task scratch"
    type = "🗑 - SCRATCH"

    def __init__(self, folders: list[str]):
        super().__init__()
        self.folders = folders

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        if data:
            yield from data

    def drop(self, rank: int) -> None:
        remove_scratch_files([f"{folder}/{rank:05d}.jsonl.gz" for folder in self.folders])


def remove_scratch_files(paths: list[str]) -> None:
    """Deletes scratch files a later stage no longer reads; one already gone is fine, one that cannot be deleted is
    left for the report stage, which deletes the scratch folder."""
    from datatrove.utils.logging import logger

    for path in paths:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            logger.warning(f"{path} could not be deleted ({e}); the report stage deletes it")


def drop_finished_task_scratch(executor, rank: int) -> None:
    """After a task ran: its stage's `DropTaskScratch` steps drop its scratch files, once its completion is written."""
    steps = [step for step in executor.pipeline if isinstance(step, DropTaskScratch)]
    if steps and executor.is_rank_completed(rank):
        for step in steps:
            step.drop(rank)


def own_files(folder, pattern: str, numbered: bool) -> list[str]:
    """The files a task's writer left under `pattern` (its name; `*` as a whole first folder stands for failed/'s
    reasons; `numbered`: datatrove's 000_NAME, 001_NAME, ... of a writer that rotates files), found by name:
    a glob listed the whole folder in every task (kept/'s 50k files read by each of 50k tasks), and a rotation's
    1000th file (1000_NAME) escaped its three digits."""
    head, base = posixpath.split(pattern)
    if head == "*":
        try:
            heads = [posixpath.basename(entry["name"].rstrip("/")) for entry in folder.ls("", detail=True)
                     if entry["type"] == "directory"]
        except FileNotFoundError:  # nothing failed yet
            heads = []
    else:
        heads = [head]
    found = []
    for where in heads:
        if folder.exists(posixpath.join(where, base)):
            found.append(posixpath.join(where, base))
        missing = 0  # numbers are consecutive from 000; a few missing in a row end them (one deleted by hand)
        for number in itertools.count() if numbered else ():
            name = posixpath.join(where, f"{number:03d}_{base}")
            if folder.exists(name):
                found.append(name)
                missing = 0
            else:
                missing += 1
                if missing == 8:
                    break
    return found


class ClearUnfinishedAttempt(PipelineStep):
    """The first step of a stage: deletes what an unfinished attempt of this task left under its own names (the
    files of the stage's writers, their counts). A task runs only when it has not completed, and its rerun need not
    write to every destination the killed attempt did (a score flipped at the cut on other hardware, nothing left
    below the threshold): such a file would hold documents that now end elsewhere, its counts would be added twice,
    and a Parquet file torn by the kill in kept/ breaks loading the whole folder."""

    name = "🧹 clear an unfinished attempt"
    type = "🔧 - UTILS"

    def __init__(self, steps: list, counts_folder: str | None = None):
        super().__init__()
        writers = [w for step in steps for w in (step, getattr(step, "exclusion_writer", None),
                                                 getattr(step, "misfits", None)) if isinstance(w, DiskWriter)]
        # (folder, file name template, whether datatrove numbers the files: 000_${rank}.parquet)
        self.targets = [(w.output_folder, w.output_filename, w.max_file_size > 0) for w in writers]
        self.counts_folder = counts_folder
        self.count_names = sorted({w.counts_name for w in writers if getattr(w, "counts_folder", None)}
                                  | ({"in"} if any(getattr(s, "counts_folder", None) for s in steps
                                                   if isinstance(s, ApplyInputReader)) else set()))

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for folder, template, numbered in self.targets:
            for name in own_files(folder, template.safe_substitute(rank=f"{rank:05d}", filter_reason="*"), numbered):
                folder.rm(name)
                self.stat_update("stale_files_removed")
                if posixpath.dirname(name):  # failed/<reason>/ goes with its last file (rmdir: only if empty)
                    with contextlib.suppress(OSError, NotImplementedError):  # another task's file is there
                        folder.rmdir(posixpath.dirname(name))
        if self.counts_folder is not None:
            counts = get_datafolder(self.counts_folder)
            for name in self.count_names:
                if counts.exists(f"{name}/{rank:05d}.json"):
                    counts.rm(f"{name}/{rank:05d}.json")
        if data:
            yield from data


def _as_column(values: list, target: pa.DataType) -> pa.Array:
    """`values` as an Arrow array of `target`, or an error: never a silent change (pyarrow alone would truncate 1.5
    into an int64 column and drop a struct's unknown keys). A string column stores other values as their JSON text,
    which keeps them whole: it is the type a field gets when its first values are missing or of mixed types."""
    if pa.types.is_string(target) or pa.types.is_large_string(target):
        return pa.array([v if v is None or isinstance(v, str) else orjson.dumps(v, default=json_value,
                                                                                   option=JSON_OPTIONS).decode()
                         for v in values], target)
    try:
        inferred = _inferred_array(values)
    except OverflowError:  # a uint64 inside a list or struct: as the target, if that changes no value
        exact = pa.array(values, target)
        if exact.to_pylist() != values:
            raise
        return exact
    if inferred.type == target or not _settled(inferred.type):  # nulls, empty lists: they fit any list
        return inferred.cast(target)
    numbers = (pa.types.is_integer, pa.types.is_floating)
    if any(f(inferred.type) for f in numbers) and any(f(target) for f in numbers):
        return inferred.cast(target, safe=True)  # 2.0 into int64 fits, 1.5 does not
    if _widens_to(inferred.type, target):  # a struct without an optional key, 1.25 in a decimal(10, 2): as they are
        return pa.array(values, target)
    raise pa.ArrowInvalid(f"{inferred.type} values")


def _inferred_array(values: list) -> pa.Array:
    """pa.array(values), where whole numbers at or above 2**63 (a uint64 hash column) make a uint64 array instead of
    an OverflowError."""
    try:
        return pa.array(values)
    except OverflowError:
        if all(v is None or (type(v) is int and v >= 0) for v in values):
            return pa.array(values, pa.uint64())
        raise


def _storable(t: pa.DataType) -> bool:
    """Whether Parquet can store the type as it is: not null-typed, and no struct without fields at any depth (a
    field holding `{}`), which pyarrow cannot write."""
    if pa.types.is_null(t) or (pa.types.is_struct(t) and t.num_fields == 0):
        return False
    if pa.types.is_struct(t):
        return all(_storable(t.field(i).type) or pa.types.is_null(t.field(i).type) for i in range(t.num_fields))
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return _storable(t.value_type) or pa.types.is_null(t.value_type)
    if pa.types.is_map(t):
        return _storable(t.item_type) or pa.types.is_null(t.item_type)
    return True


def _settled(t: pa.DataType) -> bool:
    """Whether a type inferred from values says all there is to say: no null type at any depth (a field null, or
    only empty lists, throughout the values seen) and storable in Parquet."""
    if pa.types.is_null(t) or not _storable(t):
        return False
    if pa.types.is_struct(t):
        return all(_settled(t.field(i).type) for i in range(t.num_fields))
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return _settled(t.value_type)
    if pa.types.is_map(t):
        return _settled(t.key_type) and _settled(t.item_type)
    return True


FIELD_TYPE_SAMPLE_ROWS = 10_000  # rows of the first JSONL input that type its fields for every kept Parquet file
FIELD_TYPE_SAMPLE_BYTES = 256 << 20  # or fewer rows, where they are long documents


def input_field_types(files: list[tuple[str, str]], text_key: str, id_key: str) -> dict[str, pa.DataType]:
    """The input's field types under the names kept rows give them (an input's own `score` as `input_score`...),
    where the type survives the files between stages (`_json_safe`): a field that is null (or only empty lists)
    throughout a kept file's first batch takes its type from here, so that every kept file types it alike and the
    files load as one dataset. From the first Parquet input's schema, else from the values of the first JSONL input's
    first FIELD_TYPE_SAMPLE_ROWS rows (a field of mixed or no types there gets no hint)."""
    import pyarrow.parquet as pq

    first = next(((folder, name) for folder, name in files if name.lower().endswith(PARQUET_SUFFIXES)), None)
    try:
        if first is not None:
            with get_datafolder(first[0]).open(first[1], "rb") as fh:
                found = {f.name: _plain_names(f.type) for f in pq.read_schema(fh)}
        elif files:
            found = _jsonl_field_types(*files[0], skip=(text_key, id_key))
        else:
            return {}
    except Exception:  # noqa: BLE001 - an unreadable file is the reader's to report, with its row
        return {}
    types = {}
    for name, t in found.items():
        if name in (text_key, id_key) or not _json_safe(t):
            continue
        kept_as_is = name not in (*PIPELINE_OWNED, *RECORD_OWNED) or (name == "token_count" and pa.types.is_integer(t))
        types[name if kept_as_is else f"input_{name}"] = t
    return types


def first_input_fields(files: list[tuple[str, str]], rows: int = 1000) -> tuple[str, list[str]] | None:
    """The first input file and its field names: a Parquet file's columns, or the keys of a JSONL file's first `rows`
    rows; None when it cannot be read (the reader reports that, with its row)."""
    import pyarrow.parquet as pq

    if not files:
        return None
    folder, name = files[0]
    try:
        if name.lower().endswith(PARQUET_SUFFIXES):
            with get_datafolder(folder).open(name, "rb") as raw:
                names = dict.fromkeys(pq.read_schema(raw).names)
        else:
            names = {}
            for row in _first_jsonl_rows(folder, name, max_lines=rows):
                names |= dict.fromkeys(row)
    except Exception:  # noqa: BLE001
        return None
    return posixpath.join(folder, name), list(names)


def _first_jsonl_rows(folder: str, name: str, max_lines: int | None = None,
                      max_bytes: int | None = None) -> Iterator[dict]:
    """The object rows of a JSONL file from its start (lines that are not JSON objects are failed/'s to report),
    in its first `max_lines` lines or until `max_bytes` are read, whichever comes first: a file of lines that are no
    objects (latin-1, pretty-printed JSON) is not read to its end."""
    with get_datafolder(folder).open(name, "rb") as opened:
        raw = lines_readable(opened)
        fh = gzip.GzipFile(fileobj=raw) if name.lower().endswith(".gz") else raw
        read, lineno = 0, 0
        while True:
            line, length, too_long = read_line(fh)
            lineno += 1
            if not length or (max_lines is not None and lineno > max_lines) or (
                    max_bytes is not None and read > max_bytes):
                return
            read += length
            if too_long:
                continue
            if lineno == 1:
                line = line.removeprefix(UTF8_BOM)
            try:
                row = json_line(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(row, dict) and not nested_deeper(row, MAX_NESTING):  # the reader fails those
                yield row


def _jsonl_field_types(folder: str, name: str, skip: tuple[str, ...]) -> dict[str, pa.DataType]:
    """The types of the first rows' values, but the `skip` fields (the text: book-length documents would hold GBs);
    FIELD_TYPE_SAMPLE_ROWS rows, or fewer where they hold more than FIELD_TYPE_SAMPLE_BYTES."""
    values: dict[str, list] = {}
    rows = 0
    sample = _first_jsonl_rows(folder, name, max_bytes=FIELD_TYPE_SAMPLE_BYTES)
    for row in itertools.islice(sample, FIELD_TYPE_SAMPLE_ROWS):
        for key in skip:
            row.pop(key, None)
        for key in values.keys() - row.keys():
            values[key].append(None)
        for key, value in row.items():
            values.setdefault(key, [None] * rows).append(value)
        rows += 1
    types = {}
    for key, column in values.items():
        try:
            t = _inferred_array(column).type
        except NOT_ARROW_TYPED:
            continue
        if _settled(t):
            types[key] = t
    return types


def _plain_names(t: pa.DataType) -> pa.DataType:
    """The type as pyarrow infers it from values: lists with items named `item` (Parquet files say `element`) of
    variable size, strings and lists not large (polars writes every string large: the values inferred as string
    did not fit, and every row of a polars-written file went to failed/schema_mismatch)."""
    if pa.types.is_struct(t):
        return pa.struct([t.field(i).with_type(_plain_names(t.field(i).type)) for i in range(t.num_fields)])
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return pa.list_(_plain_names(t.value_type))
    if pa.types.is_large_string(t):
        return pa.string()
    return t


def _json_safe(t: pa.DataType) -> bool:
    """Numbers, decimals, booleans, strings, and lists and structs of them: the types a hint is given for (a time or
    bytes is typed from its values, in every --order alike: `stage_value`). A decimal typed from its first values
    (decimal(3, 2) for 1.25) refused a later 123.45: typed as the input's column instead."""
    if pa.types.is_struct(t):
        return all(_json_safe(t.field(i).type) for i in range(t.num_fields))
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return _json_safe(t.value_type)
    return (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_string(t)
            or pa.types.is_large_string(t) or pa.types.is_decimal(t))


def _first_schema(rows: list[dict], field_types: dict[str, pa.DataType] | None = None) -> pa.Schema:
    """Every field of the first batch, typed from all its rows (or, where they do not tell, from `field_types`),
    then the fields `field_types` types that the batch lacks (an optional field of the input, rare enough to miss a
    task's first 1,000 kept rows: its later rows went to failed/schema_mismatch, and the tasks' files had different
    columns); `score`/`int_score` last."""
    names = list(dict.fromkeys(k for r in rows for k in r if k not in SCORE_KEYS))
    names += [k for k, t in (field_types or {}).items() if k not in names and k not in SCORE_KEYS and _settled(t)]
    names += [k for k in SCORE_KEYS if any(k in r for r in rows)]
    fields = []
    for name in names:
        try:
            inferred = _inferred_array([r.get(name) for r in rows]).type
        except NOT_ARROW_TYPED:
            inferred = pa.null()  # mixed types: stored as JSON text
        hint = (field_types or {}).get(name)
        if hint is not None and _settled(hint) and (not _settled(inferred) or _widens_to(inferred, hint)):
            # the batch's rows fit the input's type: whole numbers in a float field (JS and Go tools write 3.0 as 3)
            # typed the file int64, its later 3.5s failed, and its files did not load together with the others'
            inferred = hint
        fields.append(pa.field(name, inferred if _storable(inferred) else pa.string()))  # else JSON text
    return pa.schema(fields)


def _widens_to(found: pa.DataType, hint: pa.DataType) -> bool:
    """Whether values of type `found` fit the wider `hint` as they are (int64 in double, a struct's fields in one
    with more): Arrow's permissive promotion of the two gives the hint."""
    if found == hint:
        return False
    try:
        merged = pa.unify_schemas([pa.schema([pa.field("x", found)]), pa.schema([pa.field("x", hint)])],
                                  promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        return False
    return merged.field("x").type == hint


class KeptParquetWriter(TaskFilenames, WrittenCounts, ParquetWriter):
    """Parquet in the FineWeb-Edu schema: original fields plus top-level `score` and `int_score`.

    One schema per file, typed from the whole first batch (datatrove's ParquetWriter types it from the first
    document). A later document that does not fit it (a field the first batch never had, 1.5 in an integer column)
    is not changed to fit: it goes to `misfits` (`failed/schema_mismatch/`) with the field and both types named.
    """

    name = "📒 kept (FineWeb-Edu parquet)"

    def __init__(self, output_folder: str, counts_folder: str | None = None, batch_size: int = 1000,
                 misfits: "CountedJsonlWriter | None" = None, field_types: dict[str, pa.DataType] | None = None):
        super().__init__(output_folder, output_filename="${rank}.parquet", adapter=_kept_adapter,
                         batch_size=batch_size, use_content_defined_chunking=False)
        self._files = {}
        self._schemas: dict[str, pa.Schema] = {}
        self.misfits = misfits
        self.field_types = field_types or {}  # see input_field_types
        self.count_into("kept", counts_folder, "kept")

    def _write(self, document: dict, file_handler, filename: str):
        if self.max_file_size > 0:
            filename = self._get_filename_with_file_id(filename)
        self._files[filename] = file_handler
        self._batches[filename].append(document)
        if len(self._batches[filename]) == self.batch_size:
            self._write_batch(filename)

    def close(self):
        for filename in list(self._batches):  # writers are created on a first flush, which may not have happened
            self._write_batch(filename)
        super().close()
        if self.misfits is not None:
            self.misfits.close()

    def _write_batch(self, filename):
        if not self._batches[filename]:
            return
        import pyarrow.parquet as pq

        rows = self._batches.pop(filename)
        if filename not in self._writers:
            self._schemas[filename] = schema = _first_schema(rows, self.field_types)
            self._writers[filename] = pq.ParquetWriter(self._files[filename], schema=schema,
                                                       compression=self.compression)
        schema = self._schemas[filename]
        try:
            batch = self._batch(rows, schema)
        except NOT_ARROW_TYPED:
            fitting = []
            for row in rows:  # find the rows that do not fit, one by one
                try:
                    self._batch([row], schema)
                    fitting.append(row)
                except NOT_ARROW_TYPED as e:
                    self._misfit(row, schema, e, filename)
            batch = self._batch(fitting, schema)
        self._writers[filename].write_batch(batch)

    @staticmethod
    def _batch(rows: list[dict], schema: pa.Schema) -> pa.RecordBatch:
        extra = set().union(*rows) - set(schema.names)
        if extra:
            raise ValueError(f"field(s) {sorted(extra)}")
        return pa.RecordBatch.from_arrays([_as_column([r.get(f.name) for r in rows], f.type) for f in schema],
                                          schema=schema)

    def _misfit(self, row: dict, schema: pa.Schema, error: Exception, filename: str) -> None:
        extra = sorted(set(row) - set(schema.names))
        if extra:
            why = f"field(s) {extra} not among the fields of the first {self.batch_size} kept documents of {filename}"
        else:
            bad = []
            for f in schema:
                try:
                    _as_column([row.get(f.name)], f.type)
                except NOT_ARROW_TYPED:
                    bad.append(f"'{f.name}' is {type(row.get(f.name)).__name__} {row.get(f.name)!r:.40} here, "
                               f"{f.type} in {filename}")
            why = "; ".join(bad) or str(error)
        reason = f"does not fit the kept Parquet schema: {why}; give the field one type in every input row"
        if self.misfits is None:
            raise DocumentError(f"document {row.get('id')}: {reason}")
        entry = self._counts.setdefault("kept", [0, 0])  # counted as kept when it arrived (or just after)
        entry[0] -= 1
        entry[1] -= int(row.get("token_count") or 0)
        row = dict(row)
        doc = Document(text=row.pop("text"), id=row.pop("id"),
                       metadata={**row, "filter_reason": "schema_mismatch", "input_error": reason})
        self.misfits.write(doc, self._rank)
