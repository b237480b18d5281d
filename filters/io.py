"""Reading inputs and writing outputs of `apply` as datatrove steps.

The reader never drops a row silently: a line that is not JSON, not UTF-8 or has no text becomes a document marked
with a failure reason, and `InputErrorFilter` routes it to `OUT/failed/<reason>/` with the file and line it came from.
Outputs are flat records (original fields at the top level, as in FineWeb-Edu), never datatrove's nested `metadata`.
An input that already has `score`/`int_score` (an LLM annotation) keeps them as `input_score`/`input_int_score`.
"""

from __future__ import annotations

import base64
import gzip
import os
import posixpath
from collections.abc import Iterator

import orjson
from datatrove.data import Document, DocumentsPipeline
from datatrove.io import get_datafolder
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.readers.base import BaseReader
from datatrove.pipeline.readers.jsonl import JsonlReader
from datatrove.pipeline.writers.jsonl import JsonlWriter
from datatrove.pipeline.writers.parquet import ParquetWriter

from edu_filter.documents import PARQUET_SUFFIXES, DocumentError, check_data_file, data_files_in
from edu_filter.filters.progress import TaskProgress
from edu_filter.filters.report import write_counts

FAILURE_KEY = "_input_failure"  # internal marker set by the reader, never written out
# keys datatrove steps add to documents that do not belong in the kept dataset
PIPELINE_KEYS = frozenset({"filter_reason", "duplicate_count", FAILURE_KEY})
SCORE_KEYS = ("score", "int_score")
RAW_PREVIEW_CHARS = 2000


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
        if fs.isdir(path):
            found = data_files_in(inp, get_datafolder(inp).list_files(recursive=True))
            files.extend((inp, f) for f in found)
        elif fs.isfile(path):
            check_data_file(inp)
            parent, name = posixpath.split(inp) if "://" in inp else os.path.split(os.path.abspath(inp))
            files.append((parent, name))
        else:
            raise DocumentError(f"{inp}: no such file or folder")
    return files


class ApplyInputReader(BaseReader):
    """Reads JSONL/Parquet inputs and turns every row, good or bad, into exactly one document.

    With at least as many files as tasks, each task reads whole files; with fewer files (one big JSONL and
    `--tasks 4`) every task reads all files and keeps the rows whose index falls in its shard, so the tasks still
    split the scoring work.
    """

    name = "📖 edu-filter input"

    def __init__(self, files: list[tuple[str, str]], text_key: str = "text", id_key: str = "id",
                 progress_folder: str | None = None, counts_folder: str | None = None):
        super().__init__(text_key=text_key, id_key=id_key)
        self.files = files
        self.progress_folder = progress_folder
        self.counts_folder = counts_folder  # set on the pass whose rows end up in kept/removed/failed

    def _document(self, row: dict, source: str) -> Document:
        text = row.pop(self.text_key, None)
        doc_id = row.pop(self.id_key, None)
        for key in SCORE_KEYS:  # an input's own score (an LLM annotation, say) must survive the classifier's
            if key in row:
                row.setdefault(f"input_{key}", row.pop(key))
        doc = Document(text=text if isinstance(text, str) else "", id=str(doc_id) if doc_id is not None else source,
                       metadata=row)
        if not isinstance(text, str) or not text.strip():
            what = "missing" if text is None else ("empty" if isinstance(text, str) else f"a {type(text).__name__}")
            doc.metadata[FAILURE_KEY] = "no_text"
            doc.metadata["input_error"] = f"{source}: field '{self.text_key}' is {what}"
            doc.metadata["input_source"] = source
            if text is not None and not isinstance(text, str):
                doc.metadata[self.text_key + "_original"] = repr(text)[:RAW_PREVIEW_CHARS]
        return doc

    def _failed(self, reason: str, source: str, error: str, raw: bytes) -> Document:
        return Document(
            text="",
            id=source,
            metadata={
                FAILURE_KEY: reason,
                "input_error": f"{source}: {error}",
                "input_source": source,
                "raw_preview": raw.decode("utf-8", "replace")[:RAW_PREVIEW_CHARS],
                "raw_base64": base64.b64encode(raw).decode("ascii"),
            },
        )

    def _read_jsonl(self, folder, name: str, keep, progress: "TaskProgress") -> Iterator[Document]:
        with folder.open(name, "rb") as raw:
            fh = gzip.GzipFile(fileobj=raw) if name.lower().endswith(".gz") else raw
            for lineno, line_bytes in enumerate(fh, start=1):
                progress.at_bytes(raw.tell())
                if not line_bytes.strip() or not keep(lineno):
                    continue
                source = f"{name}:{lineno}"
                try:
                    line = line_bytes.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield self._failed("invalid_utf8", source, f"not valid UTF-8 ({e})", line_bytes)
                    continue
                try:
                    row = orjson.loads(line)
                except orjson.JSONDecodeError as e:
                    yield self._failed("invalid_json", source, f"not valid JSON ({e})", line_bytes)
                    continue
                if not isinstance(row, dict):
                    yield self._failed("not_an_object", source, f"expected a JSON object, got {type(row).__name__}",
                                       line_bytes)
                    continue
                yield self._document(row, source)

    def _read_parquet(self, folder, name: str, keep, progress: "TaskProgress") -> Iterator[Document]:
        import pyarrow.parquet as pq

        with folder.open(name, "rb") as fh:
            rowno = 0
            parquet = pq.ParquetFile(fh)
            total_rows = max(1, parquet.metadata.num_rows)
            size = folder.size(name)
            for batch in parquet.iter_batches(batch_size=1024):
                for row in batch.to_pylist():
                    rowno += 1
                    if keep(rowno):
                        yield self._document(row, f"{name}:{rowno}")
                progress.at_bytes(size * rowno // total_rows)

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data:
            yield from data
        by_file = len(self.files) >= world_size
        shard = self.files[rank::world_size] if by_file else self.files
        counter = 0

        def keep(_index: int) -> bool:
            nonlocal counter
            counter += 1
            return by_file or (counter - 1) % world_size == rank

        sizes = [get_datafolder(folder).size(name) for folder, name in shard]
        progress = TaskProgress(self.progress_folder, rank, bytes_total=sum(sizes))
        for (folder_path, name), size in zip(shard, sizes):
            folder = get_datafolder(folder_path)
            read = self._read_parquet if name.lower().endswith(PARQUET_SUFFIXES) else self._read_jsonl
            self.stat_update("input_files")
            for doc in read(folder, name, keep, progress):
                self.stat_update("rows_read")
                progress.document()
                yield doc
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
        super().__init__(data_folder, add_file_path=False)
        self.progress_folder = progress_folder

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
            progress.document()
            yield doc
        progress.file_done(size)
        progress.close()


def flat_record(document: Document, drop: frozenset[str] = frozenset()) -> dict:
    """`text`, `id`, then the original fields, with `score`/`int_score` last (the FineWeb-Edu column order)."""
    meta = {k: v for k, v in document.metadata.items() if k not in drop}
    scores = {k: meta.pop(k) for k in SCORE_KEYS if k in meta}
    return {"text": document.text, "id": document.id, **meta, **scores}


def _record_adapter(self, document: Document) -> dict:
    return flat_record(document)


def _kept_adapter(self, document: Document) -> dict:
    return flat_record(document, drop=PIPELINE_KEYS)


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
        super().write(document, rank, **kwargs)
        key = self.destination.replace("${filter_reason}", str(document.metadata.get("filter_reason") or "unknown"))
        entry = self._counts.setdefault(key, [0, 0])
        entry[0] += 1
        entry[1] += int(document.metadata.get("token_count") or 0)
        self._rank = rank

    def close(self):
        super().close()
        if self.counts_folder is not None and self._counts:  # a task that wrote nothing leaves no file (no rank guess)
            write_counts(self.counts_folder, self._rank, self._counts, name=self.counts_name)


class CountedJsonlWriter(WrittenCounts, JsonlWriter):
    """Gzipped JSONL of flat records (removed and failed rows) that counts what it wrote."""

    def __init__(self, folder: str, destination: str, counts_folder: str, filename: str = "${rank}.jsonl.gz",
                 counts_name: str | None = None):
        super().__init__(folder, output_filename=filename, compression="gzip", adapter=_record_adapter)
        self.count_into(destination, counts_folder, counts_name or destination.split("/")[-1])


def record_writer(folder: str, filename: str = "${rank}.jsonl.gz") -> JsonlWriter:
    """Gzipped JSONL of flat records: the intermediate files between stages."""
    return JsonlWriter(folder, output_filename=filename, compression="gzip", adapter=_record_adapter)


def _json_safe(value):
    """Values that pyarrow cannot type consistently across rows (nested mixed types) are kept as JSON strings."""
    return value if isinstance(value, (str, int, float, bool, type(None))) else orjson.dumps(value).decode()


class KeptParquetWriter(WrittenCounts, ParquetWriter):
    """Parquet in the FineWeb-Edu schema: original fields plus top-level `score` and `int_score`.

    datatrove's ParquetWriter takes the schema from the first document, so a column that is null there and a string
    later breaks the file; this writer infers the schema from the whole first batch instead.
    """

    name = "📒 kept (FineWeb-Edu parquet)"

    def __init__(self, output_folder: str, counts_folder: str | None = None, batch_size: int = 1000):
        super().__init__(output_folder, output_filename="${rank}.parquet", adapter=_kept_adapter,
                         batch_size=batch_size, use_content_defined_chunking=False)
        self._files = {}
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

    def _write_batch(self, filename):
        if not self._batches[filename]:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = self._batches.pop(filename)
        if filename not in self._writers:
            try:
                schema = pa.Table.from_pylist(rows).schema
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                rows = [{k: _json_safe(v) for k, v in r.items()} for r in rows]
                schema = pa.Table.from_pylist(rows).schema
            self.schema = schema
            self._writers[filename] = pq.ParquetWriter(self._files[filename], schema=schema,
                                                       compression=self.compression)
        new_fields = set().union(*rows) - set(self.schema.names)
        if new_fields:
            raise DocumentError(
                f"field(s) {sorted(new_fields)} first appear after the first {self.batch_size} kept documents of "
                f"{filename}; give every input row the same fields (null where absent)"
            )
        try:
            batch = pa.RecordBatch.from_pylist(rows, schema=self.schema)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            batch = pa.RecordBatch.from_pylist([{k: _json_safe(v) for k, v in r.items()} for r in rows],
                                               schema=self.schema)
        self._writers[filename].write_batch(batch)
