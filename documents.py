"""Document I/O shared by every command: JSONL (.jsonl, .jsonl.gz), Parquet, folders of them, and hub datasets.

Outside datatrove pipelines we read with orjson line by line (so a bad line is reported with its file and line
number) and pyarrow for Parquet, one record batch at a time. Every row comes back as a plain dict with at least `id`
and `text`.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import io
import itertools
import json
import math
import os
import posixpath
import random
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import orjson

if TYPE_CHECKING:
    import numpy as np

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".ndjson", ".ndjson.gz")
# not .json: folders hold metrics.json & co.; .json.gz is JSON Lines in C4 and Dolma
FOLDER_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz", ".ndjson", ".ndjson.gz", ".parquet")
# data in a compression no reader here takes: in a folder, refused rather than skipped (a run would add up without it)
UNREADABLE_DATA = re.compile(r"\.(jsonl|json|ndjson|parquet)\.(zst|zstd|bz2|xz|lz4|lzma|br|snappy|zip|gzip|7z|tgz|tar)$"
                             r"|\.(parquet)\.(gz)$", re.IGNORECASE)
PARQUET_SUFFIXES = (".parquet",)
UTF8_BOM = b"\xef\xbb\xbf"
FILE_SUFFIXES = JSONL_SUFFIXES + PARQUET_SUFFIXES
HUB_PREFIX = "hf://datasets/"


# The educational-value scale: every label, LLM score, int_score and threshold lies in MIN_SCORE..MAX_SCORE.
MIN_SCORE, MAX_SCORE = 0, 5
SCORES = tuple(range(MIN_SCORE, MAX_SCORE + 1))
SCORE_RANGE = f"{MIN_SCORE}-{MAX_SCORE}"  # as messages and help texts write it


def in_score_range(value: float) -> bool:
    return MIN_SCORE <= value <= MAX_SCORE


class InputError(ValueError):
    """Bad usage or bad input, knowable before any work (a bad option value, a missing or unreadable file, a label
    outside 0-5, an unwritable output). The command line prints the message as one line and exits 2."""


class RunError(RuntimeError):
    """A failure while running (a pipeline stage, a server going away). The command line prints the message as one
    line and exits 1."""


class DocumentError(InputError):
    """A bad input document: the message names the file and line (or row)."""


_SAVED_WORK: set[Path] = set()  # paths this process wrote resumable work to (see `holds_saved_work`)


def holds_saved_work(path: str | os.PathLike) -> None:
    """`path` now holds work a rerun resumes (packed tokens, LLM answers): an InputError found later (a bad row met
    hours into packing) fails the command without the command line removing the output as half-made."""
    _SAVED_WORK.add(Path(path).absolute())


def saved_work_under(path: str | os.PathLike) -> bool:
    """Whether `path` is, or holds, a path given to `holds_saved_work` that exists (was written)."""
    path = Path(path).absolute()
    return any((w == path or path in w.parents) and w.exists() for w in _SAVED_WORK)


def text_hash(text: str) -> str:
    """Identity of a document's text: the key of its cached embedding, and of the LLM answers given to it."""
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()


def repeat_key(text: str) -> str:
    """Which labelled rows are one document: the text in Unicode NFKC with whitespace ignored. The same page crawled
    twice differs in a trailing newline or its line ends; byte-exact keys put such copies on both sides of the
    split (on random labels, a validation Spearman of 0.88)."""
    import unicodedata

    return text_hash(" ".join(unicodedata.normalize("NFKC", text).split()))


TRAINED_TEXTS = "trained_texts.npy"  # in a model folder: the 64-bit `repeat_key`s of the texts it was fitted on


def text_keys(texts: Iterable[str]) -> np.ndarray:
    """The texts' `repeat_key`s as 64-bit numbers (TRAINED_TEXTS holds a model's, sorted: 8 bytes a text, no text)."""
    import numpy as np

    return np.fromiter((int(repeat_key(t)[:16], 16) for t in texts), dtype=np.uint64)


def check_model_name(model: str, what: str = "--model") -> None:
    """A model given as a local path (./m, /models/m, ~/m, a/b/c) must exist; a hub id (NAME, ORG/NAME, or
    ORG/REPO/FILE.gguf) is left to the loader, which knows whether the hub (or its cache) has it."""
    if Path(model).expanduser().exists() or "://" in model:
        return
    if model.startswith((".", "/", "~")) or (model.count("/") > 1 and not model.lower().endswith(".gguf")):
        raise InputError(f"{what} {model}: no such file or folder")


def check_named_path(value: str | os.PathLike, option: str) -> None:
    """A value written as a local path (./, /, ~) that does not exist: one line naming the option, where a loader
    would take it for a hub id and say "Repo id must be in the form 'repo_name'"."""
    if str(value).startswith((".", "/", "~")) and not Path(value).expanduser().exists():
        raise InputError(f"{option} {value}: no such file or folder")


REMOTE_LOOKING = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+:/")  # s3://b/x, or s3:/b/x once a Path took one slash


def refuse_output_among_inputs(inputs: Iterable[str | os.PathLike], outputs: dict[str, str | os.PathLike]) -> None:
    """An output that is one of the local inputs, or a data file the readers would take from an input folder, is
    refused: the finished output replaced the input it was made from, or a rerun (the way to resume) read it back as
    documents."""
    for option, output in outputs.items():
        target = Path(output).absolute().resolve()
        for given in path_list(inputs):
            if is_hub_path(str(given)) or not Path(given).exists():
                continue
            source = Path(given).absolute().resolve()
            if target == source:
                raise InputError(f"{option} {output} is the input {given}: the output would replace it; write it "
                                 "elsewhere")
            inside = source.is_dir() and target.is_relative_to(source)
            if inside and _has_suffix(target.name, FOLDER_SUFFIXES) and not any(
                    part.startswith(".") for part in target.relative_to(source).parts):  # what the readers take
                raise InputError(f"{option} {output} is inside the input folder {given}: a rerun, which resumes, would "
                                 "read it as documents; write it elsewhere")


@contextlib.contextmanager
def held_alone(lock: Path, refusal: Callable[[str], str]) -> Iterator[OSError | None]:
    """An exclusive lock on file `lock`, held while the block runs, naming this process in it; another holder stops
    this run with RunError(`refusal(holder)`). The kernel drops it when the process ends, however it ends. Yields
    the refusal where the file system takes no locks (NFS without lockd, Lustre mounted noflock; nothing then keeps
    two runs apart), else None."""
    import fcntl

    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        opened = open(lock, "a+")
    except OSError as e:  # a folder this user cannot write (an output handed out inside a read-only project tree)
        yield e
        return
    with opened as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            raise RunError(refusal(fh.read().strip() or "another process")) from None
        except OSError as e:
            yield e
            return
        fh.seek(0)
        fh.truncate()
        fh.write(f"process {os.getpid()} on {socket.gethostname()}")
        fh.flush()
        yield None


@contextlib.contextmanager
def writing_alone(output: Path, what: str = "-o/--output", lock: Path | None = None) -> Iterator[None]:
    """Held while a run writes `output` (a lock on `lock`, by default `.OUTPUT.lock` beside it): a second run of it (a
    job resubmitted while the first runs) is refused naming the first, instead of both writing the same files."""
    if lock is None:  # beside it, named after it: `-o .` is named after the working directory
        whole = Path(os.path.abspath(output))
        lock = whole.with_name(f".{whole.name}.lock")
    with held_alone(lock, lambda holder: (
            f"{what} {output} is being written by another run ({holder}): wait for it to end, or stop it; the same "
            "command then resumes")) as no_locks:
        if no_locks:
            where = (f"no lock can be made in {lock.parent}" if no_locks.errno in (errno.EACCES, errno.EPERM,
                                                                                  errno.EROFS)
                     else f"{lock.parent} takes no file locks")
            print(f"warning: {where} ({no_locks.strerror}): nothing stops a second run of this command from writing "
                  "the same output at once", file=sys.stderr, flush=True)
        yield


def check_writable_output(path: str | os.PathLike, what: str = "--output", folder: bool = False,
                          file: bool = False) -> None:
    """Refuse an output path that cannot be created or written, without creating anything.

    The nearest existing ancestor must be a folder this process may write into (and the path itself, when it
    exists, a writable folder, or file unless the output is a `folder`; a `file` output is no folder: `score -o X`
    found it one only at the end, every answer paid for). Remote paths (s3://, hf://) are refused: no
    command writes them, and a `Path` made `s3:/bucket/x` of one, which wrote a local folder named `s3:` that a job's
    node kept."""
    text = str(path)
    if REMOTE_LOOKING.match(text):
        raise InputError(f"{what} {text}: a remote location; this command writes local files (write them on a "
                         "shared file system, then copy them)")
    target = Path(text).expanduser()
    if folder and target.exists() and not target.is_dir():
        raise InputError(f"{what} {text}: a file, not a folder; give a folder to write into")
    if file and target.is_dir():
        raise InputError(f"{what} {text}: a folder, not a file; give the file to write")
    if target.exists():
        if not os.access(target, os.W_OK) or (target.is_dir() and not os.access(target, os.X_OK)):
            raise InputError(f"{what} {text}: not writable (permission denied)")
        return
    parent = target.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{what} {text}: cannot be created, {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{what} {text}: cannot be created, {parent} is not writable (permission denied)")
    try:  # permissions do not tell for root, a read-only mount or /proc: a folder made and removed at once does
        os.rmdir(tempfile.mkdtemp(prefix=".edu-filter-probe-", dir=parent))
    except OSError as e:
        raise InputError(f"{what} {text}: cannot be created in {parent} ({e.strerror or e})") from None


def bundled_data(relative: str = "") -> Path:
    """A file (or the folder) of the data shipped inside the package (`data/` in the repository), found through
    importlib.resources so it works from a checkout, an editable install and an installed wheel alike."""
    from importlib.resources import files

    path = Path(str(files("edu_filter").joinpath("data", *filter(None, relative.split("/")))))
    if not path.exists():
        raise DocumentError(f"bundled data {relative or 'data/'} is missing from the installed package ({path})")
    return path


def is_hub_path(path: str | os.PathLike) -> bool:
    return str(path).startswith(HUB_PREFIX)


def _has_suffix(path: str, suffixes: tuple[str, ...]) -> bool:
    return path.lower().endswith(suffixes)


def data_files_in(folder: str, names: Iterable[str], whole_apply_output: bool = False) -> list[str]:
    """The data files among a folder's file names, sorted (so runs are reproducible); an error when there are none.

    Shared by `read_documents` and `apply`'s datatrove reader, so a folder means the same to every command. `names`
    are relative to the folder; hidden files and folders (`.cache/` of a hub download, `.ipynb_checkpoints/`) are
    skipped, as the hub's `datasets` does and as provenance leaves them out of the fingerprint that tells a changed
    input."""
    names = list(names)
    visible = [n for n in names if not any(part.startswith(".") for part in n.split("/"))]
    if not whole_apply_output:
        _refuse_apply_outputs(folder, visible)
    unreadable = sorted(n for n in visible if UNREADABLE_DATA.search(n))
    if unreadable:
        match = UNREADABLE_DATA.search(unreadable[0])
        raise DocumentError(f"{folder}: {unreadable[0]}{f' and {len(unreadable) - 1} more' if len(unreadable) > 1 else ''}"
                            f" cannot be read here (compression: {match.group(2) or match.group(4)}); "
                            "recompress as .jsonl.gz (or Parquet uncompressed outside), or give the other files by "
                            "name")
    found = sorted(n for n in visible if _has_suffix(n, FOLDER_SUFFIXES))
    if not found:
        data = [n for n in names if _has_suffix(n, FOLDER_SUFFIXES)]
        hidden = f" (only hidden ones, skipped: {data[0]}{', ...' * (len(data) > 1)})" if data else ""
        raise DocumentError(f"{folder}: folder contains no .jsonl(.gz), .json.gz, .ndjson(.gz) or .parquet files"
                            f"{hidden}")
    return found


def _refuse_apply_outputs(folder: str, names: list[str]) -> None:
    """An apply output read whole, at the folder's top or below it (a folder of per-dump runs), is refused: its kept,
    removed and failed documents read together (and work/'s copies with --keep-work), the "filtered" arm of an
    ablation unfiltered. A dataset `apply --push-to-hub` uploaded holds kept/ alone, and is read whole."""
    runs = {n[:-len("run_config.json")] for n in names if n == "run_config.json" or n.endswith("/run_config.json")}
    if not runs:
        return
    # apply's: its run_config.json beside kept/, removed/ or failed/ (another tool's run_config.json is not one)
    beside = set()
    for name in names:
        parts = name.split("/")
        beside.update("".join(f"{p}/" for p in parts[:depth]) for depth in range(len(parts) - 1)
                      if parts[depth] in ("kept", "removed", "failed"))
    runs &= beside
    if not runs:
        return
    for name in sorted(names):
        if not _has_suffix(name, FOLDER_SUFFIXES):
            continue
        parts = name.split("/")
        for depth in range(len(parts)):
            run = "".join(f"{p}/" for p in parts[:depth])
            if run in runs and (depth == len(parts) - 1 or parts[depth] != "kept"):
                where = f"{folder.rstrip('/')}/{run}".rstrip("/")
                several = f"; of {len(runs)} runs, each one's kept/" if len(runs) > 1 else ""
                raise DocumentError(f"{where}: an apply output (its kept/, removed/ and failed/ documents together, "
                                    f"here {name}); give {where}/kept for the documents it kept{several}")


def local_files_under(folder: str | os.PathLike, refuse_dangling: bool = False) -> list[str]:
    """The files under a local folder, as paths relative to it, symlinked folders followed (a folder of links into
    dumps kept elsewhere is a common layout; neither `Path.rglob` nor fsspec's listing enters them), each real
    folder entered once (a link back up does not loop)."""
    names, entered = [], set()

    def unlisted(error: OSError) -> None:
        # os.walk leaves out a folder it cannot list (no permission, a stale NFS handle, a storage target down), and
        # a run would add up without its documents
        where = Path(os.path.relpath(error.filename, folder)).parts if error.filename else ()
        if any(part.startswith(".") for part in where):  # hidden: never read
            return
        if where and where[-1] == "lost+found" and os.path.ismount(os.path.dirname(error.filename)):
            return  # fsck's folder at the top of every ext4 volume, root's alone: a dataset on its own volume
        raise DocumentError(f"{error.filename}: cannot list the folder ({error.strerror or error}); its files "
                            "would be left out")

    for root, dirs, files in os.walk(folder, onerror=unlisted, followlinks=True):
        real = os.path.realpath(root)
        if real in entered:
            dirs[:] = []
            continue
        entered.add(real)
        relative = os.path.relpath(root, folder)
        prefix = "" if relative == "." else Path(relative).as_posix() + "/"
        for f in files:
            full = os.path.join(root, f)
            if os.path.isfile(full):
                names.append(prefix + f)
            elif (refuse_dangling and os.path.islink(full) and not os.path.exists(full)
                  and not any(part.startswith(".") for part in (prefix + f).split("/"))):  # hidden: never read
                # a link to nothing (an unmounted dump, a moved file; a folder's name says nothing of what it held):
                # skipped, a run would add up without it
                raise DocumentError(f"{full}: a link to {os.readlink(full)}, which does not exist; mount or restore "
                                    "it, or remove the link")
    return names


def folder_data_files(folder: Path, whole_apply_output: bool = False) -> list[Path]:
    """The data files under a local folder, as every reader takes them (`data_files_in`); `whole_apply_output`
    for a fingerprint of what an older edu-filter read of one."""
    return [folder / name for name in data_files_in(str(folder), local_files_under(folder, refuse_dangling=True),
                                                    whole_apply_output)]


def distinct_names(paths: list[str], names: list[str]) -> list[str]:
    """The name each file goes by in default ids (NAME:LINE) and error messages: its short name (`names`), unless
    another of the files has the same one; those are named by their path below the folder they all share
    (`2024-01/part-0.jsonl` and `2024-02/part-0.jsonl`, which both named their first row part-0.jsonl:1)."""
    groups: dict[str, set[str]] = {}
    for path, name in zip(paths, names):
        groups.setdefault(name, set()).add(path)
    prefixes = {}
    for name, group in groups.items():
        if len(group) > 1:
            parts = [p.split("/") for p in group]
            shared = 0
            while all(len(q) > shared + 1 and q[shared] == parts[0][shared] for q in parts):
                shared += 1
            prefixes[name] = shared
    chosen = [name if name not in prefixes else "/".join(path.split("/")[prefixes[name]:])
              for path, name in zip(paths, names)]
    # a name made longer can be another file's own (`apply cc new/2024-10 new/2024-18`, cc holding
    # 2024-10/part-0.jsonl), whose rows then had the same default ids: those take one more folder of their path each
    # until no two files are alike (a file named twice keeps one name)
    while True:
        holders: dict[str, list[int]] = {}
        for i, name in enumerate(chosen):
            holders.setdefault(name, []).append(i)
        grown = False
        for alike in (found for found in holders.values() if len({paths[i] for i in found}) > 1):
            for i in alike:
                parts, length = paths[i].split("/"), chosen[i].count("/") + 1
                if length < len(parts):
                    chosen[i], grown = "/".join(parts[-length - 1:]), True
        if not grown:
            return chosen


def check_data_file(path: str) -> None:
    """A file named directly may also be plain .json (JSON Lines, as the hub's exports name them; a JSON array is
    refused before it is read: it would be one line, one failed document, held whole); anything else is an error
    naming it."""
    if not _has_suffix(path, FILE_SUFFIXES):
        raise DocumentError(
            f"{path}: unsupported file type (expected .jsonl, .json or .ndjson, each optionally .gz, or .parquet)"
        )
    if _has_suffix(path, (".json", ".json.gz")):
        import fsspec

        try:
            with fsspec.open(path, "rb", compression="infer") as fh:
                start = fh.read(4096).removeprefix(UTF8_BOM).lstrip()
        except (OSError, EOFError, zlib.error):  # unreadable: the reader names it (apply sets it aside)
            return
        if start.startswith(b"["):
            raise DocumentError(f"{path}: a JSON array, not JSON Lines (one object per line); convert it, e.g. with "
                                f"jq -c '.[]' {path} > {Path(path).stem}.jsonl")


def path_list(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list:
    """The paths as a list: one path given alone is one input, not a string of one-character paths (an absolute one
    walked the whole filesystem)."""
    return [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)


GLOB_CHARS = "*?["


def glob_split(pattern: str) -> tuple[str, str] | None:
    """(the folder before a pattern's first wildcard, with its slash; the pattern below it), None without one."""
    first = min((i for i in map(pattern.find, GLOB_CHARS) if i >= 0), default=-1)
    if first < 0:
        return None
    slash = pattern.rfind("/", 0, first) + 1
    return pattern[:slash], pattern[slash:]


def glob_matches(pattern: str) -> tuple[str, list[str]] | None:
    """For an input with glob characters that names no file or folder itself (`'s3://bucket/dump/*.jsonl.gz'`,
    quoted so the shell left it; `data/**/*.parquet`): the folder before its first wildcard and the files matching,
    relative to it, with the files under the folders matching (`'s3://bucket/dump/*'` over loose shards and per-crawl
    folders left the folders out, as the shell's expansion does not); None for any other input. A pattern matching
    nothing is an error naming it."""
    split = glob_split(pattern)
    if split is None:
        return None
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(pattern)
    if fs.exists(path):
        return None
    root = split[0] or "./"
    root_path = url_to_fs(root)[1].rstrip("/")
    found = fs.glob(path, detail=True)
    names = {posixpath.relpath(name, root_path) for name, info in found.items() if info.get("type") == "file"}
    local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    for folder in (name for name, info in found.items() if info.get("type") == "directory"):
        inside = (posixpath.join(folder, f) for f in local_files_under(folder)) if local else fs.find(folder)
        names.update(posixpath.relpath(f, root_path) for f in inside)
    names = sorted(names)
    if not names:
        raise DocumentError(f"{pattern}: no file matches")
    return root.rstrip("/") or ".", names


def expand_paths(paths: Iterable[str | os.PathLike]) -> list[str]:
    """Files given directly, or every JSONL/Parquet file under a folder (sorted, so runs are reproducible); each file
    once, as in `apply` (a link to a file of the folder, the folder and a file in it: its rows twice in a training set
    fell on both sides of the validation split)."""
    files: list[str] = []
    for p in path_list(paths):
        p = str(p)
        if is_hub_path(p):
            files.append(p)
            continue
        path = Path(p)
        matched = glob_matches(p)
        if matched is not None:
            root, names = matched
            files.extend(os.path.join(root, name) for name in data_files_in(p, names))
        elif path.is_dir():
            files.extend(str(f) for f in folder_data_files(path))
        elif path.is_file():
            check_data_file(p)
            files.append(str(path))
        else:
            raise DocumentError(f"{p}: no such file or folder")
    once = {}
    for f in files:
        once.setdefault(file_key(f), f)
    return list(once.values())


def file_key(path: str) -> str:
    """What a path reads, for reading each file once: a local one's real path (links, `d/./f`), a remote one as
    given."""
    return path if "://" in path else os.path.realpath(path)


# A JSONL line longer is no document (a file without line breaks, a JSON array on one line): apply fails it as
# `line_too_long`, read past in pieces with only its start kept, and the other commands stop naming it. Read whole, a
# 10 GB one took ~70 GB, on every attempt.
MAX_LINE_BYTES = 64 << 20
LINE_PIECE_BYTES = 1 << 20
LINE_HEAD_BYTES = 8000  # what is kept of such a line


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def json_line(line: bytes | str):
    """A JSON line as orjson reads it, else as Python's json reads it: NaN and Infinity (Python's json.dumps writes
    them), and lone surrogate escapes ("\\ud83d" of an emoji cut in two by a tool), which orjson refuses, each row
    otherwise failed or stopped the command; a lone surrogate becomes U+FFFD (no writer takes one). A line neither
    reads raises orjson's error, as do bytes that are not strict UTF-8 (Python's json let UTF-8-encoded surrogates,
    CESU-8, through, which apply's reader fails as invalid UTF-8).

    orjson reads an integer past 64 bits as a float: 2**64 + 1, a 128-bit hash in any field, was written out as
    another number (ids a digit apart were one). A line where orjson gives a float that large is read by Python's
    json, exactly, and such integers are kept as their digits (text): no JSON or Parquet writer takes them."""
    try:
        row = orjson.loads(line)
    except orjson.JSONDecodeError as error:
        try:
            row = json.loads(bytes(line).decode("utf-8") if isinstance(line, (bytes, bytearray, memoryview)) else line)
        except (ValueError, RecursionError):  # UnicodeDecodeError among them
            raise error from None
        return _huge_ints_as_text(_without_lone_surrogates(row))
    if not _holds_huge_float(row):
        return row
    try:
        exact = json.loads(line if isinstance(line, str) else bytes(line).decode("utf-8"))
    except (ValueError, RecursionError):  # nested deeper than Python's json reads: orjson's reading
        return row
    return _huge_ints_as_text(exact)


def _holds_huge_float(row) -> bool:
    """Whether a parsed JSON value holds a float of 2**63 or more in size: where orjson may have read an integer
    past 64 bits (a walk of the parsed row: a regex over every line cost 8x the parse). Without recursion: orjson
    reads 1,023 levels, and a row nested 332 deep raised RecursionError, failing its task on every rerun."""
    stack = [row]
    while stack:
        value = stack.pop()
        if type(value) is float:
            if abs(value) >= 2.0**63:
                return True
        elif type(value) is dict:
            stack.extend(value.values())
        elif type(value) is list:
            stack.extend(value)
    return False


def _huge_ints_as_text(row):
    """`row` with integers outside [-2**63, 2**64) as their digits, in place (no recursion): orjson writes none of
    them (it raised mid-task)."""
    if type(row) is int:
        return row if -(2**63) <= row < 2**64 else str(row)
    stack = [row]
    while stack:
        container = stack.pop()
        for key, value in (container.items() if type(container) is dict else enumerate(container)):
            if type(value) is int and not -(2**63) <= value < 2**64:
                container[key] = str(value)
            elif type(value) in (dict, list):
                stack.append(value)
    return row


def _without_lone_surrogates(value):
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {_without_lone_surrogates(k): _without_lone_surrogates(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_lone_surrogates(v) for v in value]
    return value


def lines_readable(fh):
    """`fh` where `read_line` can read it: a remote file of fsspec (s3://, hf://, http://) has a `readline` that
    takes no size, and gets a buffer that does (its position, `tell`, stays the file's)."""
    from fsspec.spec import AbstractBufferedFile

    return io.BufferedReader(fh, LINE_PIECE_BYTES) if isinstance(fh, AbstractBufferedFile) else fh


def read_line(fh, limit: int | None = None) -> tuple[bytes, int, bool]:
    """The next line of `fh` (b"" at the end), its length in bytes, and whether it is longer than `limit`
    (MAX_LINE_BYTES): such a line is given as its first bytes only, the rest read past a piece at a time."""
    limit = MAX_LINE_BYTES if limit is None else limit
    line = fh.readline(limit + 1)
    if len(line) <= limit:
        return line, len(line), False
    length, head, ended = len(line), line[:LINE_HEAD_BYTES], line.endswith(b"\n")
    del line
    while not ended:
        piece = fh.readline(LINE_PIECE_BYTES)
        if not piece:
            break
        length += len(piece)
        ended = piece.endswith(b"\n")
    return head, length, True


# what a file named as plain JSONL may hold instead, by its first bytes, and what to do about it
PACKED_FORMATS = ((b"\x1f\x8b", "gzip-compressed", "give it the .gz suffix (.jsonl.gz)"),
                  (b"\x28\xb5\x2f\xfd", "zstd-compressed", "decompress it (zstd -d), or recompress it with gzip"),
                  (b"BZh", "bzip2-compressed", "decompress it (bunzip2), or recompress it with gzip"),
                  (b"\xfd7zXZ\x00", "xz-compressed", "decompress it (unxz), or recompress it with gzip"),
                  (b"PAR1", "Parquet", "give it the .parquet suffix"))


class PackedAsPlainText(ValueError):
    """A file named as plain JSONL holds compressed or Parquet bytes: read as text, it was thousands of failed
    rows of binary (failed/ twice the input's size), and the run exited 0."""


def refuse_packed(fh, name: str) -> None:
    """Raises PackedAsPlainText where the seekable binary file `fh`, named as plain JSONL, starts like a compressed
    or Parquet file; leaves `fh` at its start."""
    head = fh.read(6)
    fh.seek(0)
    for magic, what, fix in PACKED_FORMATS:
        if head.startswith(magic):
            raise PackedAsPlainText(f"{name} holds {what} data, not plain JSONL: {fix}")


def _iter_jsonl(path: str, id_field: str | None = None) -> Iterator[tuple[int, dict]]:
    opener = gzip.open if path.lower().endswith(".gz") else open
    lineno = 0
    try:
        fh = opener(path, "rb")
    except OSError as e:  # permission denied, a folder named like a file
        raise DocumentError(f"{path}: cannot open the file ({e.strerror or e})") from None
    with fh:
        if opener is open:
            try:
                refuse_packed(fh, path)
            except PackedAsPlainText as e:
                raise DocumentError(str(e)) from None
        while True:
            try:
                raw, length, too_long = read_line(fh)
            except (OSError, EOFError, zlib.error) as e:  # not gzip, truncated archive, disk error
                raise DocumentError(f"{path}:{lineno + 1}: cannot read the file ({type(e).__name__}: {e})") from None
            if not length:
                if lineno == 0 and opener is gzip.open and os.path.getsize(path) == 0:
                    # gzip reads nothing as no rows, but the smallest gzip file is 20 bytes: a copy cut short
                    raise DocumentError(f"{path}: an empty file, not gzip (a download or copy cut short?)") from None
                return
            lineno += 1
            if too_long:
                raise DocumentError(f"{path}:{lineno}: a line of {length:,} bytes, over the {MAX_LINE_BYTES:,} a "
                                    "document may take: a file without line breaks, or a JSON array? (JSON Lines "
                                    "holds one object per line)")
            if lineno == 1:  # a file saved by Windows tools starts with a BOM
                raw = raw.removeprefix(UTF8_BOM)
            if not raw.strip():
                continue
            try:
                row = json_line(raw)
            except orjson.JSONDecodeError as e:
                raise DocumentError(f"{path}:{lineno}: not valid JSON ({e})") from None
            if not isinstance(row, dict):
                raise DocumentError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row


PARQUET_BATCH_ROWS = 1024  # rows converted to Python at a time: a FineWeb shard is GBs, a batch a few MB
# a column chunk read through a buffer of this size, a page at a time: unbuffered, pyarrow read the chunk whole (a row
# group of a million rows, pandas' and pyarrow's default, is GBs of text)
PARQUET_BUFFER_BYTES = 1 << 20


@contextlib.contextmanager
def _parquet_file(url: str):
    """A local or remote (any fsspec URL: hf://, s3://) Parquet file. pyarrow reads its footer and row groups with
    seeks, so a remote file is fetched only where it is read; without pre-buffering, since buffering holds every
    row group read until the reader is done (a whole shard, for a full pass)."""
    import pyarrow.parquet as pq

    if "://" not in url:
        with pq.ParquetFile(url, pre_buffer=False, buffer_size=PARQUET_BUFFER_BYTES) as parquet:
            yield parquet
        return
    import fsspec

    with fsspec.open(url, "rb") as fh:
        yield open_parquet(fh)


def open_parquet(fh):
    """A Parquet file from an open binary file object, read a record batch at a time: without pre-buffering, which
    holds every row group read until the reader is done (a whole shard, for a full pass)."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(fh, pre_buffer=False, buffer_size=PARQUET_BUFFER_BYTES)


def _read_errors(url: str) -> tuple[type[BaseException], ...]:
    """What reading `url` may raise for a bad or unreachable file: a remote file's filesystem raises its own HTTP
    client's errors, which pyarrow passes through."""
    import pyarrow as pa

    return (Exception,) if "://" in url else (pa.ArrowException, OSError)


def _parquet_error(path: str, e: Exception, after_row: int = 0) -> DocumentError:
    where = f" after row {after_row}" if after_row else ""
    return DocumentError(f"{path}: cannot read as Parquet{where} ({type(e).__name__}: {e})")


def _microsecond_times(t):
    """The Arrow type with every nanosecond timestamp or duration in it (nested in lists, structs and maps too) in
    microseconds; None when it holds none."""
    import pyarrow as pa

    if (pa.types.is_timestamp(t) or pa.types.is_duration(t)) and t.unit == "ns":
        return pa.timestamp("us", t.tz) if pa.types.is_timestamp(t) else pa.duration("us")
    if pa.types.is_map(t):
        key, item = _microsecond_times(t.key_type), _microsecond_times(t.item_type)
        return None if key is None and item is None else pa.map_(key or t.key_type, item or t.item_type)
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        inner = _microsecond_times(t.value_type)
        if inner is None:
            return None
        field = t.value_field.with_type(inner)
        if pa.types.is_fixed_size_list(t):
            return pa.list_(field, t.list_size)
        return pa.large_list(field) if pa.types.is_large_list(t) else pa.list_(field)
    if pa.types.is_struct(t):
        fields = [t.field(i) for i in range(t.num_fields)]
        changed = [_microsecond_times(f.type) for f in fields]
        if all(c is None for c in changed):
            return None
        return pa.struct([f.with_type(c) if c is not None else f for f, c in zip(fields, changed)])
    return None


def parquet_rows(batch) -> list[dict]:
    """A record batch's rows as plain Python values, as JSON writers take them: nanosecond times (at any depth)
    become datetime and timedelta (microseconds, as polars gives them) rather than pandas objects, maps become
    dicts."""
    import pyarrow as pa

    changed = [_microsecond_times(f.type) for f in batch.schema]
    if any(c is not None for c in changed):
        schema = pa.schema([f.with_type(c) if c is not None else f for f, c in zip(batch.schema, changed)])
        batch = batch.cast(schema, safe=False)
    return batch.to_pylist(maps_as_pydicts="lossy")


def parquet_rows_or_errors(batch) -> list:
    """`parquet_rows`, where a row that cannot become Python values (a string column holding invalid UTF-8, a
    timestamp outside datetime's years) is the exception instead of failing its whole batch."""
    import pyarrow as pa

    conversion = (ValueError, OverflowError, pa.ArrowException)  # UnicodeDecodeError is a ValueError
    try:
        return parquet_rows(batch)
    except conversion:
        rows: list = []
        for i in range(batch.num_rows):
            try:
                rows.extend(parquet_rows(batch.slice(i, 1)))
            except conversion as e:
                rows.append(e)
        return rows


def one_line(text: str, limit: int = 160) -> str:
    """One line of at most `limit` characters, cut at a word boundary."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0] + " ..."


def _bad_row(path: str, row: int, error: Exception) -> DocumentError:
    return DocumentError(f"{path}:{row}: cannot read the row ({type(error).__name__}: {one_line(str(error), 200)})")


def iter_parquet_batches(path: str, columns: Callable | None = None,
                         batch_size: int | Callable = PARQUET_BATCH_ROWS) -> Iterator[tuple[int, object]]:
    """(number of its first row, record batch) of a local or remote Parquet file, so memory holds a batch, not the
    file; with `columns` (the pq.ParquetFile -> the names of the columns to read), only those columns are read, in
    batches of `batch_size` rows (or of `batch_size(chosen columns)`). A file that cannot be read is a DocumentError
    naming it and the rows read."""
    lineno = 0
    try:
        with _parquet_file(path) as parquet:
            chosen = columns(parquet) if columns else None
            rows = batch_size(chosen) if callable(batch_size) else batch_size
            for batch in parquet.iter_batches(batch_size=rows, columns=chosen):
                yield lineno + 1, batch
                lineno += batch.num_rows
    except _read_errors(path) as e:
        raise _parquet_error(path, e, lineno) from None


def _iter_parquet(path: str) -> Iterator[tuple[int, dict]]:
    """Rows of a Parquet file, one record batch at a time (see `iter_parquet_batches`)."""
    for first, batch in iter_parquet_batches(path):
        for lineno, row in enumerate(parquet_rows_or_errors(batch), start=first):
            if isinstance(row, Exception):
                raise _bad_row(path, lineno, row)
            yield lineno, row


def hub_dataset_args(path: str) -> dict:
    """`load_dataset` arguments for hf://datasets/ORG/NAME[/PATH_IN_REPO].

    The part after ORG/NAME is a folder or file inside the dataset repository, exactly what datatrove (fsspec) reads
    for the same address in `apply`, e.g. hf://datasets/HuggingFaceFW/fineweb/sample/10BT.
    """
    parts = path[len(HUB_PREFIX) :].strip("/").split("/")
    if len(parts) < 2 or not all(parts[:2]):
        raise DocumentError(f"{path}: expected hf://datasets/ORG/NAME[/PATH_IN_REPO]")
    args: dict = {"path": "/".join(parts[:2])}
    inner = "/".join(parts[2:])
    if inner:
        args["data_files" if _has_suffix(inner, FILE_SUFFIXES + (".csv", ".arrow")) else "data_dir"] = inner
    return args


def hub_load_args(path: str) -> dict:
    """`hub_dataset_args` with a folder inside the repository given as its data files, listed as `apply` lists
    them (`data_files_in`): as `data_dir` the `datasets` library kept only the files its names put in the train
    split (a shard named test-*.parquet, validation-*, dev-* was left out of score and train, read by apply)."""
    args = hub_dataset_args(path)
    if "data_dir" in args and os.path.isdir(args["path"]):  # a local folder named as the repository, which the
        return folder_as_data_files(args, os.path.join(args["path"], args["data_dir"]))  # library reads first
    return folder_as_data_files(args, path)


def folder_as_data_files(args: dict, folder: str) -> dict:
    """`load_dataset` arguments naming a `data_dir` (the address `folder`) as the data files in it, all in train."""
    if "data_dir" not in args:
        return args
    from datatrove.io import get_datafolder

    try:
        names = get_datafolder(folder).list_files(recursive=True)
    except Exception as e:  # offline, missing repo, no such folder: one clear line instead of a traceback
        raise DocumentError(f"{folder}: cannot load from the Hugging Face hub ({type(e).__name__}: {e})") from None
    inner = args["data_dir"]
    return {"path": args["path"], "data_files": {"train": [posixpath.join(inner, n)
                                                           for n in data_files_in(folder, names)]}}


def _iter_hub(path: str, split: str = "train") -> Iterator[tuple[int, dict]]:
    """A hub dataset through the `datasets` library (streaming, so huge sets are fine)."""
    import datasets

    args = hub_load_args(path)
    try:
        rows = iter(datasets.load_dataset(**args, split=split, streaming=True))
        first = next(rows, None)
    except Exception as e:  # offline, missing repo, no such path: one clear line instead of a traceback
        raise DocumentError(f"{path}: cannot load from the Hugging Face hub ({type(e).__name__}: {e})") from None
    if first is None:
        return
    yield 1, dict(first)
    for i, row in enumerate(rows, start=2):
        yield i, dict(row)


def iter_raw_rows(path: str, id_field: str | None = None) -> Iterator[tuple[int, dict]]:
    """(line or row number, row) pairs of one file, without any field checks; a JSONL integer `id_field` read
    exactly."""
    if is_hub_path(path):
        return _iter_hub(path)
    if _has_suffix(path, PARQUET_SUFFIXES):
        return _iter_parquet(path)
    return _iter_jsonl(path, id_field)


def _why_unlabelled(row: dict) -> str:
    """A `score` output row whose annotation failed (its `error` says why): how to get its label."""
    if not row.get("error"):
        return ""
    why = (f": its LLM annotation failed ({row['error']}); running the same `edu-filter score` command again asks "
           "again only for the documents that failed (answers that were unusable need a larger --max-reasks), or "
           "--skip-failed leaves such rows out")
    if row.get("weight") is not None:
        why += ", while dropping rows from an --select active sample would skew its weights"
    return why


def iter_documents(
    paths: Iterable[str | os.PathLike],
    text_field: str = "text",
    id_field: str = "id",
    label_field: str | None = None,
    require_label: bool | str = False,
    blank_ok: bool = False,
) -> Iterator[dict]:
    """`read_documents`, one row at a time: only the current row (and a Parquet record batch) is held."""
    files = expand_paths(paths)
    for path, name in zip(files, default_id_names(files)):
        for lineno, row in iter_raw_rows(path, id_field):
            yield _document(path, lineno, row, text_field, id_field, label_field, require_label, name, blank_ok)


def printable_name(name: str) -> str:
    """A file name as text any writer takes: a name that is not UTF-8 (a Latin-1 `caf\\xe9.jsonl`, held with
    surrogates) has its bytes escaped; orjson and Arrow refused the ids and errors naming it."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def default_id_names(files: list[str]) -> list[str]:
    """Each file's name in the ids of its rows that have none: its base name, or its path where base names repeat
    (`printable_name`: an id holds text any writer takes)."""
    posix = [printable_name(Path(f).as_posix()) if not is_hub_path(f) else f for f in files]
    return distinct_names(posix, [p.rstrip("/").rsplit("/", 1)[-1] for p in posix])


def row_text(path: str, lineno: int, row: dict, text_field: str) -> str:
    """A row's text, a binary one decoded (a Parquet string column written without its UTF8 annotation, as Hive and
    older Spark wrote them), or an error naming file and line."""
    text = row.get(text_field)
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            raise DocumentError(f"{path}:{lineno}: field '{text_field}' is not valid UTF-8 ({e})") from None
    if not isinstance(text, str):
        what = (("null" if text_field in row else "missing") if text is None
                else f"not a string ({type(text).__name__})")
        raise DocumentError(f"{path}:{lineno}: field '{text_field}' is {what}")
    return text


def id_text(value) -> str:
    """A row's id as text: a binary one decoded (a Parquet string column written without its UTF8 annotation, as
    Hive and older Spark wrote them: `str` made `"b'doc-1'"` of it, an id the source never had), its bytes escaped
    where they are not UTF-8."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "backslashreplace")
    return str(value)


def _document(path: str, lineno: int, row: dict, text_field: str, id_field: str, label_field: str | None = None,
              require_label: bool | str = False, name: str | None = None, blank_ok: bool = False) -> dict:
    """One input row as a document (`id`, `text`, the label under `label`), or an error naming file and line. A
    text that is empty or only whitespace is an error unless `blank_ok`, as apply fails it (no_text): score paid for
    an answer on it (`read_labelled` leaves such rows out, counted)."""
    text = row_text(path, lineno, row, text_field)
    if not blank_ok and not text.strip():
        raise DocumentError(f"{path}:{lineno}: field '{text_field}' is empty" if not text else
                            f"{path}:{lineno}: field '{text_field}' holds only whitespace")
    doc = dict(row)
    doc["text"] = text
    if row.get(id_field) is None and id_field != "id":  # named on purpose: a typo would rename every document
        raise DocumentError(f"{path}:{lineno}: id field '{id_field}' is missing")
    given = row.get(id_field)
    # an empty id keys nothing: named by its place, as a row without one, as apply names it (score and train
    # stopped at a corpus apply took)
    doc["id"] = id_text(given) if given not in (None, "", b"") else f"{name or Path(path).name}:{lineno}"
    if label_field is not None:
        label = row.get(label_field)
        if label is None and require_label and not (require_label == SKIP_FAILED and row.get("error")):
            raise DocumentError(f"{path}:{lineno}: label field '{label_field}' is missing{_why_unlabelled(row)}")
        if label is not None:
            value = label_value(label)
            if not math.isfinite(value):
                raise DocumentError(f"{path}:{lineno}: label field '{label_field}' is not a finite number: {label!r}")
            if not in_score_range(value):
                raise DocumentError(
                    f"{path}:{lineno}: label field '{label_field}' is {label!r}, outside the {SCORE_RANGE} scale"
                )
            doc["label"] = value
    return doc


def label_value(label) -> float:
    """A label as a number, NaN where it is none: not a yes/no field (true read as 1), nor another script's digits
    ("٣" read as 3)."""
    if isinstance(label, bool) or (isinstance(label, str) and not label.isascii()):
        return math.nan
    try:
        return float(label)
    except (TypeError, ValueError):
        return math.nan


def check_not_empty(paths: Iterable[str | os.PathLike], what: str = "DATA", text_field: str = "text") -> None:
    """Refuse input without a single document before any work (reads up to the first document; hub datasets are
    left to the reader)."""
    paths = path_list(paths)
    if any(is_hub_path(p) for p in paths):
        return
    if next(iter_documents(paths, text_field), None) is None:
        raise DocumentError(f"{what}: no documents in {', '.join(map(str, paths))}")


SKIP_FAILED = "unless-failed"  # require_label: a row whose LLM annotation failed (`score`'s `error`) may lack one


def read_documents(
    paths: Iterable[str | os.PathLike],
    text_field: str = "text",
    id_field: str = "id",
    label_field: str | None = None,
    require_label: bool | str = False,
    limit: int | None = None,
    fields: Iterable[str] | None = None,
    blank_ok: bool = False,
) -> list[dict]:
    """Rows with `id`, `text` (and the label under `label` when label_field is given), with all their other fields
    or, given `fields`, only those (what is not read later need not be held).

    A missing `text`, a label that is no number on the 0-5 scale, or a missing label when `require_label`, raises
    DocumentError naming the file and line; a row without an id gets `<file>:<line>` so it can still be traced.
    With `require_label=SKIP_FAILED` a row `score` could not annotate (its `error` set) comes without `label`.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be a number of documents >= 0, got {limit}")
    rows = itertools.islice(iter_documents(paths, text_field, id_field, label_field, require_label, blank_ok), limit)
    if fields is None:
        return list(rows)
    kept = {"id", "text", "label", *fields}
    return [{k: v for k, v in row.items() if k in kept} for row in rows]


def read_labelled(paths: Iterable[str | os.PathLike], label_field: str, limit: int | None = None,
                  skip_failed: bool = False, what: str = "DATA", console=None, weight_field: str | None = None,
                  fields: Iterable[str] = ()) -> tuple[list[dict], dict[str, int]]:
    """The labelled rows of `train` and `evaluate`, and {reason: rows} left out (`iter_labelled`, held)."""
    left: dict[str, int] = {}
    rows = list(iter_labelled(paths, label_field, left, limit, skip_failed, weight_field, fields))
    say_left_out(left, len(rows), what, console)
    return rows, left


def iter_labelled(paths: Iterable[str | os.PathLike], label_field: str, left: dict[str, int],
                  limit: int | None = None, skip_failed: bool = False, weight_field: str | None = None,
                  fields: Iterable[str] = ()) -> Iterator[dict]:
    """The labelled rows of `train` and `evaluate` as they are read, the rows left out counted in `left` by reason
    (`say_left_out` then says them). Rows keep `id`, `text`, `label`, the `weight_field` and the `fields` asked for
    (a score output row also holds the LLM's whole answer: 5 KB a row where the text was 3, 0.9 GB at 450k labels).
    With `skip_failed`, rows whose LLM annotation failed for good (an answer the server refuses, a document over its
    context) are left out and counted by reason instead of stopping the run; a row with no label and no such error
    is still an error (a wrong --label-field). An empty text (in annotations written before `score` refused it)
    teaches nothing apply will see: left out, counted under EMPTY_TEXT."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be a number of documents >= 0, got {limit}")
    kept = {"id", "text", "label", "error", *fields, *([weight_field] if weight_field else [])}
    rows = itertools.islice(iter_documents(paths, "text", "id", label_field,
                                           SKIP_FAILED if skip_failed else True, True), limit)
    for row in rows:
        if not row["text"].strip():
            left[EMPTY_TEXT] = left.get(EMPTY_TEXT, 0) + 1
        elif "label" not in row:
            reason = FAILED_ANNOTATION + one_line(str(row.get("error")), 60)
            left[reason] = left.get(reason, 0) + 1
            if weight_field and row.get(weight_field) is not None:
                left[WEIGHTED_FAILED] = left.get(WEIGHTED_FAILED, 0) + 1
        else:
            yield {k: v for k, v in row.items() if k in kept}


def say_left_out(left: dict[str, int], labelled: int, what: str, console=None) -> None:
    """Stops where no row is left to learn from or score (every text empty, every annotation failed); else says, on
    `console`, what `iter_labelled` left out, and turns the reasons of failed annotations into the reasons as `score`
    wrote them."""
    blank, weighted = left.get(EMPTY_TEXT, 0), left.pop(WEIGHTED_FAILED, 0) > 0
    failed = {k.removeprefix(FAILED_ANNOTATION): n for k, n in left.items() if k.startswith(FAILED_ANNOTATION)}
    if blank and not labelled and not failed:
        raise DocumentError(f"{what}: every row's text is empty: nothing to learn from")
    reasons = sorted(failed.items(), key=lambda kv: -kv[1])
    listed = "; ".join(f"{n} x {reason}" for reason, n in reasons[:3]) + ("; ..." if len(reasons) > 3 else "")
    if failed and not labelled:
        raise DocumentError(f"{what}: the LLM annotation of every row failed ({listed}): nothing to learn from")
    for key in [k for k in left if k.startswith(FAILED_ANNOTATION)]:
        left[key.removeprefix(FAILED_ANNOTATION)] = left.pop(key)
    if console is None:
        return
    if blank:
        console.print(f"[yellow]{what}: {blank} rows with an empty text left out (apply fails such documents as "
                      "no_text)[/]")
    if failed:
        console.print(f"[yellow]{what}: {sum(failed.values())} of {labelled + sum(failed.values())} rows left out, "
                      f"their LLM annotation failed ({listed})" + (": the sample's inclusion weights no longer sum "
                                                                  "to the pool" if weighted else "") + "[/]")


EMPTY_TEXT = "empty text"  # a reason `read_labelled` leaves a row out for
FAILED_ANNOTATION = "\x00failed: "  # `iter_labelled`'s count of a failed annotation's reason, until said
WEIGHTED_FAILED = "\x00weighted"  # `iter_labelled`'s count of failed rows that carry an inclusion weight

NESTED_SAMPLER = "nested-2"  # `sample_documents`: a larger sample holds every smaller one of the same seed
POSITION_SAMPLER = "nested-1"  # before: a stream's rows drawn by position (a row removed redrew most of the sample)
LEGACY_SAMPLER = "reservoir-or-random.sample"  # before: a larger sample kept 3% of a smaller one (JSONL)


def sample_documents(
    paths: Iterable[str | os.PathLike],
    n: int,
    seed: int = 0,
    text_field: str = "text",
    id_field: str = "id",
    show_progress: bool = False,
    sampler: str = NESTED_SAMPLER,
) -> list[tuple[int, dict]]:
    """A uniform random sample of `n` documents as (position in the input, document), in input order.

    When every input is Parquet (local files, or a hub dataset stored as Parquet) the row counts come from the
    files' footers and only the row groups holding the chosen rows are read: sampling 100,000 documents from
    FineWeb reads what holds them, not the whole corpus. Otherwise every row is read and checked, and only the
    sample is held. The same input and seed give the same sample, and a larger `n` a sample holding it (a budget
    grown from 100k to 200k annotations reuses the 100k answers): the first `n` distinct positions of a seeded
    stream of draws (Parquet), the `n` rows of lowest seeded hash of their id, or of their text where they have none
    (a stream: a few rows removed or added anywhere keep the rest of the sample, where a hash of positions redrew
    ~97% of it). `sampler` POSITION_SAMPLER or LEGACY_SAMPLER draws as edu-filter did before (by position;
    reservoir sampling, `random.sample`), for a run it resumes."""
    if n < 0:
        raise ValueError(f"sample size must be >= 0, got {n}")
    paths = path_list(paths)  # read twice: once for the footers, again by the stream
    parts = parquet_parts(paths, show_progress)
    if parts is not None:
        return _sample_parquet(parts, n, seed, text_field, id_field, show_progress, sampler)
    # every row read (hours for a TB of JSONL): said as it goes
    documents = enumerate(counted(documents_and_draw_keys(paths, text_field, id_field), "reading the pool to sample",
                                  show_progress))
    if sampler == LEGACY_SAMPLER:
        rng = random.Random(seed)
        reservoir: list[tuple[int, dict]] = []
        for i, (doc, _) in documents:
            if i < n:
                reservoir.append((i, doc))
            else:
                j = rng.randrange(i + 1)
                if j < n:
                    reservoir[j] = (i, doc)
        return sorted(reservoir, key=lambda item: item[0])
    import heapq

    salt = seed.to_bytes(8, "little", signed=True)
    lowest: list[tuple[int, int, dict]] = []  # (-key, position, document): the n lowest keys, the highest on top
    for i, (doc, drawn_by) in documents:
        drawn = i.to_bytes(8, "little") if sampler == POSITION_SAMPLER else drawn_by.encode("utf-8", "surrogatepass")
        key = int.from_bytes(hashlib.blake2b(drawn, digest_size=8, key=salt).digest(), "little")
        if len(lowest) < n:
            heapq.heappush(lowest, (-key, i, doc))
        elif n and -key > lowest[0][0]:
            heapq.heapreplace(lowest, (-key, i, doc))
    return sorted(((i, doc) for _, i, doc in lowest), key=lambda item: item[0])


def documents_and_draw_keys(paths: list[str], text_field: str, id_field: str) -> Iterator[tuple[dict, str]]:
    """(document, what draws it in a sample) of every row: its own id, else its text (a row without an id is named
    by its line, which moves when rows before it are removed)."""
    files = expand_paths(paths)
    for path, name in zip(files, default_id_names(files)):
        for lineno, row in iter_raw_rows(path, id_field):
            doc = _document(path, lineno, row, text_field, id_field, name=name)
            given = row.get(id_field)
            yield doc, id_text(given) if given not in (None, "", b"") else "\0" + doc["text"]


def nested_positions(total: int, n: int, seed: int) -> list[int]:
    """`n` distinct positions below `total`, uniformly chosen: the first `n` distinct values of a seeded stream of
    draws, so a larger `n` continues the same stream and holds every smaller sample. Memory: the sample."""
    if n >= total:
        return list(range(total))
    rng, chosen = random.Random(seed), {}
    while len(chosen) < n:
        chosen.setdefault(rng.randrange(total), None)
    return list(chosen)


PARQUET_THREADS = 16  # files are read in parallel: on the hub a footer or a row group is a few HTTP range requests


@dataclass(frozen=True)
class ParquetPart:
    """One Parquet file of the input and its row count (from its footer). `source` is the input it belongs to and
    `offset` the number of rows before it in that input, so its rows carry the row numbers (and default ids) that
    reading the input from the start gives them."""

    source: str
    url: str
    offset: int
    rows: int


def _hub_data_files(path: str) -> list[str] | None:
    """The files the `datasets` library streams for a hub address, in its order, or None when it is not one list
    of Parquet files (then the dataset is streamed as before)."""
    files = default_train_files(hub_load_args(path), path)
    if not files or not all(_has_suffix(f, PARQUET_SUFFIXES) for f in files):
        return None
    return files


def default_train_files(builder_args: dict, named: str) -> list[str] | None:
    """The data files of a dataset's default configuration's train split, as the `datasets` library reads it
    (`load_dataset_builder(**builder_args)`: a hub repository, or a local folder in the same layout), or None when
    it names none; `named`: the address the user gave, for the error."""
    import datasets

    try:
        builder = datasets.load_dataset_builder(**builder_args)
    except Exception as e:  # offline, missing repo, no such path: one clear line instead of a traceback
        raise DocumentError(f"{named}: cannot load from the Hugging Face hub ({type(e).__name__}: {e})") from None
    files = (builder.config.data_files or {}).get("train")
    return [str(f) for f in files] if files else None


# A resolved hub data file: hf://datasets/ORG/NAME@REVISION/PATH_IN_REPO
_HUB_FILE = re.compile(r"hf://datasets/[^/]+/[^/@]+(?:@[^/]+)?/(?P<inner>.+)")


def hub_repository_files(path: str) -> list[str] | None:
    """For an address naming a whole hub dataset repository (hf://datasets/ORG/NAME), the files `score` reads of it
    (its default configuration's train split), relative to the repository: listed whole, FineWeb's root also held
    its sample/ configurations (copies of data/, ~35% more documents) and a repository's test split. None for an
    address inside the repository (a folder is read whole everywhere), or where the `datasets` library names none."""
    args = hub_dataset_args(path)
    if set(args) != {"path"} or "@" in args["path"]:  # a revision named: the repository's files at it, listed
        return None
    files = default_train_files(args, path)
    inner = [m.group("inner") for f in files or [] if (m := _HUB_FILE.fullmatch(f))]
    return inner if files and len(inner) == len(files) else None


def _row_count(url: str) -> int:
    try:
        with _parquet_file(url) as parquet:
            return parquet.metadata.num_rows
    except _read_errors(url) as e:
        raise _parquet_error(url, e) from None


def parquet_parts(paths: Iterable[str | os.PathLike], show_progress: bool = False) -> list[ParquetPart] | None:
    """Every Parquet file of the input with its row count, read from the footers alone; None when any input is not
    Parquet. An input named twice is read once, as reading it gives it."""
    files: list[tuple[int, str, str]] = []  # (input occurrence, input, file)
    for occurrence, path in enumerate(expand_paths(paths)):
        if is_hub_path(path):
            hub = _hub_data_files(path)
            if hub is None:
                return None
            files.extend((occurrence, path, url) for url in hub)
        elif _has_suffix(path, PARQUET_SUFFIXES):
            files.append((occurrence, path, path))
        else:
            return None
    with progress_bar(show_progress) as progress, ThreadPoolExecutor(PARQUET_THREADS) as pool:
        task = progress.add_task("reading Parquet footers", total=len(files))
        counts = []
        for rows in pool.map(_row_count, [url for _, _, url in files]):
            counts.append(rows)
            progress.advance(task)
    parts, offsets = [], {}
    for (occurrence, source, url), rows in zip(files, counts):
        parts.append(ParquetPart(source, url, offsets.get(occurrence, 0), rows))
        offsets[occurrence] = offsets.get(occurrence, 0) + rows
    return parts


def count_documents(paths: Iterable[str | os.PathLike]) -> int | None:
    """The number of rows in the input when the Parquet footers tell it (a progress total without a read), else
    None."""
    parts = parquet_parts(paths)
    return None if parts is None else sum(part.rows for part in parts)


def _sample_parquet(parts: list[ParquetPart], n: int, seed: int, text_field: str, id_field: str,
                    show_progress: bool, sampler: str = NESTED_SAMPLER) -> list[tuple[int, dict]]:
    """`n` uniform positions among all rows; then each file holding some is opened once and only the row groups
    holding them are read (files in parallel)."""
    import bisect

    sources = list(dict.fromkeys(part.source for part in parts))
    id_names = dict(zip(sources, default_id_names(sources)))
    starts = list(itertools.accumulate((part.rows for part in parts), initial=0))
    chosen = sorted(random.Random(seed).sample(range(starts[-1]), min(n, starts[-1])) if sampler == LEGACY_SAMPLER
                    else nested_positions(starts[-1], n, seed))
    wanted: dict[int, list[int]] = {}  # part -> its chosen positions, in order
    for position in chosen:
        wanted.setdefault(bisect.bisect_right(starts, position) - 1, []).append(position)

    def read(k: int) -> list[tuple[int, dict]]:
        part = parts[k]
        sampled = []
        try:
            with _parquet_file(part.url) as parquet:
                meta = parquet.metadata
                group_starts = list(itertools.accumulate(
                    (meta.row_group(g).num_rows for g in range(meta.num_row_groups)), initial=starts[k]))
                by_group: dict[int, list[int]] = {}
                for position in wanted[k]:
                    by_group.setdefault(bisect.bisect_right(group_starts, position) - 1, []).append(position)
                for g, positions in by_group.items():  # a batch at a time: a row group may be GBs
                    first = group_starts[g]
                    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[g]):
                        inside = [p for p in positions if first <= p < first + batch.num_rows]
                        if inside:
                            rows = parquet_rows_or_errors(batch.take([p - first for p in inside]))
                            for p, row in zip(inside, rows):
                                if isinstance(row, Exception):
                                    raise _bad_row(part.source, part.offset + p - starts[k] + 1, row)
                            sampled.extend(zip(inside, rows))
                        first += batch.num_rows
        except _read_errors(part.url) as e:
            raise _parquet_error(part.url, e) from None
        if len(sampled) != len(wanted[k]):
            raise DocumentError(f"{part.url}: holds fewer rows than its footer says ({part.rows})")
        return [(p, _document(part.source, part.offset + p - starts[k] + 1, row, text_field, id_field,
                              name=id_names[part.source]))
                for p, row in sampled]

    sample: list[tuple[int, dict]] = []
    with progress_bar(show_progress) as progress, ThreadPoolExecutor(PARQUET_THREADS) as pool:
        task = progress.add_task(f"reading the files holding the {len(chosen):,} sampled rows", total=len(wanted))
        for rows in pool.map(read, sorted(wanted)):
            sample.extend(rows)
            progress.advance(task)
    return sample


PLAIN_PROGRESS_EVERY = 30.0  # seconds between the plain progress lines of a run whose output is not a terminal


def logged_progress(*columns, **options):
    """A rich Progress that, where its console is no terminal (a Slurm or torchrun log, nohup), prints a plain line
    per task every PLAIN_PROGRESS_EVERY seconds and when it completes; rich alone would print nothing until the end.
    Its time left is estimated over the last hour of updates (rich's 30 s showed none for steps of minutes: a
    learning-curve fit, a block of embeddings on a CPU)."""
    import time

    from rich.progress import Progress

    from rich import get_console

    # no terminal: rich draws nothing (it would only print blank lines and the bars at the end); the lines are ours
    plain = not options.get("disable", False) and not (options.get("console") or get_console()).is_terminal
    options.setdefault("speed_estimate_period", 3600.0)

    class LoggedProgress(Progress):
        def __init__(self):
            super().__init__(*columns, **{**options, "disable": options.get("disable", False) or plain})
            self._said: dict = {}
            self._said_completed: dict = {}  # what the last line said: the end repeats no line

        def _plain(self) -> bool:
            return plain

        def _say(self, task_id, done: bool) -> None:
            self._said[task_id] = "done" if done else time.monotonic()
            task = self._tasks[task_id]
            self._said_completed[task_id] = task.completed
            extra = " ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{v}" for k, v in task.fields.items()
                             if v not in ("", None))
            total = f"/{task.total:,.0f}" if task.total is not None else ""
            self.console.print(f"{task.description}: {task.completed:,.0f}{total} {extra}".rstrip(),
                               highlight=False, soft_wrap=True)

        def update(self, task_id, **fields) -> None:
            super().update(task_id, **fields)
            said = self._said.get(task_id)
            if not self._plain() or said == "done":
                return
            task = self._tasks[task_id]
            done = task.total is not None and task.completed >= task.total
            if done or said is None or time.monotonic() - said >= PLAIN_PROGRESS_EVERY:
                self._say(task_id, done)

        def advance(self, task_id, advance: float = 1) -> None:
            self.update(task_id, advance=advance)

        def stop(self) -> None:
            """The last state of every task not yet said complete: a packing whose input ran out before its
            budget, a training stopped by its time limit."""
            if self._plain():
                for task_id in list(self._tasks):
                    if self._said.get(task_id) != "done" and (
                            self._said_completed.get(task_id) != self._tasks[task_id].completed):
                        self._say(task_id, True)
            super().stop()

    return LoggedProgress()


def progress_bar(enabled: bool, console=None):
    """A bar with the time left on a terminal, a plain line every 30 s in a log (`logged_progress`); on `console`
    (default: rich's, on stdout)."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    return logged_progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TimeRemainingColumn(), disable=not enabled, transient=True,
                           **({"console": console} if console is not None else {}))


def counted(items: Iterable, description: str, enabled: bool) -> Iterator:
    """`items` passed through, counted on a bar (a plain line every 30 s in a log): a pass over a whole input."""
    with progress_bar(enabled) as progress:
        task = progress.add_task(description, total=None)
        n = 0
        try:
            for n, item in enumerate(items, start=1):
                if n % 1000 == 0:
                    progress.update(task, completed=n)
                yield item
        finally:  # a bad row stops the pass: its last line says the rows read before it, not the last thousand
            progress.update(task, completed=n)


def unclipped(table):
    """`table` with no cell cut to "…": a column too narrow for the console (80 columns in a Slurm log) folds its
    text onto the next line instead. A count's last digits, a removal reason and the cache's path were cut off."""
    for column in table.columns:
        column.overflow = "fold"
    return table


PARTIAL_PREFIX = ".partial-"  # a file written whole is written first under its name with this in front


def write_json_whole(path: str | os.PathLike, record, indent: int | None = 2) -> None:
    """A JSON file a kill cannot leave half-written (which every later read, a resume's included, would trip on):
    written beside under a hidden name, synced, and renamed over the old one."""
    path = Path(path)
    partial = path.with_name(PARTIAL_PREFIX + path.name)
    try:
        with open(partial, "w") as fh:
            json.dump(record, fh, indent=indent)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(partial, path)
    except BaseException:  # a full disk: the hidden partial stayed beside the output
        partial.unlink(missing_ok=True)
        raise


def synced(folder: Path, files: bool = True) -> None:
    """fsync the files of `folder` (with `files`) and the folder itself (its entries: renames, new names)."""
    for path in sorted(folder.iterdir()) if files else ():
        if path.is_file():
            with open(path, "rb+") as fh:
                os.fsync(fh.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def side_folders(folder: Path) -> tuple[Path, Path]:
    """Where `replace_folder` writes a new copy of `folder` (.partial) and moves the old one aside (.old)."""
    return folder.with_name(folder.name + ".partial"), folder.with_name(folder.name + ".old")


def replace_folder(folder: Path, write: Callable[[Path], None]) -> None:
    """A new version of a checkpoint folder that a kill or a node crash at any instant cannot leave without a
    complete copy: `write(partial)` fills a side folder (its completion file last), which is synced to disk and
    swapped in by renames. `recover_folder` finds the newest complete copy after a kill between the renames. A
    write that fails (a full disk) removes its side folder and raises."""
    partial, old = side_folders(folder)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        write(partial)
        synced(partial)  # on disk before the old copy goes: a crash after the renames leaves no empty files
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    partial.rename(folder)
    synced(folder.parent, files=False)
    shutil.rmtree(old, ignore_errors=True)


def recover_folder(folder: Path, complete: str) -> None:
    """After a `replace_folder` killed between its renames, no `folder` holds `complete` (the file its writer writes
    last): the newest complete copy takes its place, the new one (.partial) before the old one."""
    if (folder / complete).exists():
        return
    for candidate in side_folders(folder):
        if (candidate / complete).exists():
            shutil.rmtree(folder, ignore_errors=True)
            candidate.rename(folder)
            return


@contextlib.contextmanager
def stop_requested():
    """An event SIGTERM sets (a Slurm time limit, a preemption, `kill`): a training loop saves where it is and exits
    143, instead of Python ending at once and the steps since its last checkpoint redone. The handler before is
    put back; outside the main thread (no signals there) the event is never set."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, previous)


def write_documents(rows: Iterable[dict], path: str | os.PathLike) -> Path:
    """Write rows to .jsonl, .jsonl.gz or .parquet, chosen by the file name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = list(rows)
    if path.name.lower().endswith(".parquet"):
        import polars as pl

        pl.DataFrame(rows, infer_schema_length=None).write_parquet(path)
    else:
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        with opener(path, "wb") as fh:
            for row in rows:
                fh.write(orjson.dumps(row, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n")
    return path


WEIGHT_FIELD = "weight"  # where `score --select active` writes inclusion weights


def row_weights(rows: list[dict], weight_field: str | None, required: bool = False) -> np.ndarray | None:
    """The rows' inclusion weights, or None when no row has the field (a uniform sample needs none), unless
    `required` (a field named on the command line: a typo went unweighted, an active sample's bias kept).

    Some rows with and some without is an error: mixing a chosen sample with other rows has no correct weights."""
    if not weight_field:
        return None
    return inclusion_weights(weight_values(rows, weight_field), weight_field, required)


def weight_values(rows: Iterable[dict], weight_field: str) -> np.ndarray:
    """The rows' `weight_field` as float64, NaN where a row has none (`inclusion_weights` checks them)."""
    import numpy as np

    try:
        return np.array([np.nan if (v := r.get(weight_field)) is None else v for r in rows], dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"field '{weight_field}' must hold numbers (inclusion weights)") from None


def inclusion_weights(values: np.ndarray, weight_field: str, required: bool = False) -> np.ndarray | None:
    """`row_weights` of the rows' `weight_values`."""
    import numpy as np

    missing = int(np.isnan(values).sum())
    if missing == len(values):
        if required and len(values):
            # the rows hold only what the command reads (the label under `label`): their fields would mislead
            raise InputError(f"--weight-field {weight_field!r}: no row has it (`score --select active` writes "
                             f"inclusion weights as '{WEIGHT_FIELD}'; --weight-field none reads none)")
        return None
    if missing:
        raise InputError(f"{missing} of {len(values)} rows have no '{weight_field}': inclusion weights (written by "
                         f"`score --select active`) must be on every row or none (--weight-field none ignores them)")
    if not np.isfinite(values).all() or (values <= 0).any():
        raise InputError(f"field '{weight_field}' must hold positive finite inclusion weights")
    return values


def weight_summary(w: np.ndarray, weight_field: str) -> dict:
    """What the weights did to the sample: its effective size (Kish) and range."""
    return {"field": weight_field, "effective_n": float(w.sum() ** 2 / (w**2).sum()), "min": float(w.min()),
            "max": float(w.max())}
