"""Provenance: how every edu-filter artifact was made and from what, its lineage back to raw data, and hub cards.

An artifact is an annotation file (`score`), a classifier folder (`train`), a filtered dataset folder (`apply`) or an
ablation folder (`ablate`). Each carries a provenance record: `<file>.provenance.json` beside a file,
`<folder>/provenance.json` inside a folder. A record holds the edu-filter version, the command line, the settings,
and for every input its path and content fingerprint, with the input's own record embedded when the input is itself
an artifact (or lies inside one, like `OUT/kept` of an apply output). The chain back to the raw inputs therefore
survives upstream files being moved, rewritten or deleted, and comparing a recorded fingerprint with the input's
current one tells whether it changed since it was used (`stale`).

Fingerprints (`fingerprint()`), chosen so that a terabyte corpus is cheap to fingerprint:

- `sha256:<hex>`: a file or folder of at most `FULL_HASH_MAX_BYTES` (256 MiB) in total is hashed in full. For a
  single file this is its plain SHA-256 (what `sha256sum` prints); a folder hashes each file's relative name and
  SHA-256.
- `sampled:<hex>`: above that, each file contributes its relative name, size, modification time and
  `SAMPLE_BLOCKS` evenly spaced blocks of `SAMPLE_BLOCK_BYTES` (512 KiB read per file). The modification time makes
  an in-place edit between sampled blocks visible; the price is that copying a large input without keeping times
  (plain `cp`) reads as a change.
- Remote inputs (`s3://...`, `hf://datasets/...`, hub model ids) are recorded by name, with no fingerprint; their
  staleness cannot be told.

In a folder, `provenance.json`, `*.provenance.json` sidecars, `README.md` (the card) and hidden files are metadata,
not content, and are left out of the fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import sys
from collections import Counter
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from edu_filter.documents import (
    InputError,
    RunError,
    bundled_data,
    data_files_in,
    folder_data_files,
    glob_matches,
    local_files_under,
    write_json_whole,
)

PROVENANCE_FILE = "provenance.json"
SIDECAR_SUFFIX = ".provenance.json"
CARD_FILE = "README.md"
RECORD_FORMAT = "edu-filter-provenance/1"
KINDS = ("annotations", "classifier", "dataset", "ablation")
FULL_HASH_MAX_BYTES = 256 * 2**20
SAMPLE_BLOCKS = 8
SAMPLE_BLOCK_BYTES = 64 * 2**10
FINGERPRINT_THREADS = 16  # files read at once: a shared filesystem or object-store mount answers each with latency
FINGERPRINT_BAR_FILES = 1000  # inputs of this many files or more show their fingerprinting's progress
ENCLOSING_LEVELS = 3  # how far up from an input path to look for the folder artifact it belongs to
LIBRARIES = ("torch", "transformers", "datatrove", "huggingface_hub", "tokenizers")

# Licences of source data known without asking the hub: hub datasets, and the files bundled in data/ (data/README.md).
KNOWN_DATASET_LICENSES = {
    "HuggingFaceFW/fineweb": "odc-by",
    "HuggingFaceFW/fineweb-edu": "odc-by",
    "HuggingFaceFW/fineweb-edu-llama3-annotations": "odc-by",
    "HuggingFaceTB/smollm-corpus": "odc-by",
}
# Licence ids the hub accepts in a card's `license:` (its documented list, the ids data and code licences use)
HUB_LICENSES = frozenset("""
apache-2.0 mit openrail bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0 bigcode-openrail-m
afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear c-uda cc cc0-1.0 cc-by-2.0 cc-by-2.5
cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0 cc-by-nc-3.0 cc-by-nc-4.0 cc-by-nd-4.0 cc-by-nc-nd-3.0
cc-by-nc-nd-4.0 cc-by-nc-sa-2.0 cc-by-nc-sa-3.0 cc-by-nc-sa-4.0 cdla-sharing-1.0 cdla-permissive-1.0
cdla-permissive-2.0 wtfpl ecl-2.0 epl-1.0 epl-2.0 etalab-2.0 eupl-1.1 eupl-1.2 agpl-3.0 gfdl gpl gpl-2.0 gpl-3.0 lgpl
lgpl-2.1 lgpl-3.0 isc lppl-1.3c ms-pl mpl-2.0 odc-by odbl openrail++ osl-3.0 postgresql ofl-1.1 ncsa unlicense zlib
pddl unknown other
""".split())
BUNDLED_LICENSES = {
    "web/fineweb_edu_llama3_train.jsonl": "odc-by",
    "web/fineweb_edu_llama3_val.jsonl": "odc-by",
    "web/fineweb_edu_llama33_responses.jsonl": "odc-by",
    "code/thealgorithms_unlabelled.jsonl": "mit",
    "code/HumanEval.jsonl.gz": "mit",
}
BUNDLED_HUB_SOURCES = {
    "web/fineweb_edu_llama3_train.jsonl": "HuggingFaceFW/fineweb-edu-llama3-annotations",
    "web/fineweb_edu_llama3_val.jsonl": "HuggingFaceFW/fineweb-edu-llama3-annotations",
    "web/fineweb_edu_llama33_responses.jsonl": "HuggingFaceFW/fineweb-edu",
}


class ProvenanceError(ValueError):
    """A path that cannot be traced, or a record that cannot be read."""


class PushError(RunError):
    """Uploading to the hub failed after the work was done; the message is one line saying why and what to do."""


class PushSetupError(PushError, InputError):
    """Uploading cannot happen (bad id, hub offline, no token): found before any work, so bad usage."""


# --- fingerprints ---------------------------------------------------------------------------------------------------
def is_remote(path: str | os.PathLike) -> bool:
    """s3://, hf://... and hub ids (ORG/NAME, or ORG/NAME@REVISION, that is no local path): named, never
    fingerprinted (a pinned hub id names its files)."""
    text = str(path)
    if "://" in text:
        return True
    return not Path(text).exists() and re.fullmatch(r"[\w.-]+(/[\w.-]+)?(@[\w./-]+)?", text) is not None


def _content_files(path: Path, documents: bool = False) -> list[Path]:
    """The files whose content is the input: a file itself; of a folder of documents (`documents`), the data files
    the readers take (`data_files_in`: a model trained into the folder, or a notes file, changes no document);
    of any other folder (a model), every file but hidden ones and the records."""
    if path.is_file():
        return [path]
    if documents:
        try:  # an apply output read whole, as an older edu-filter did, keeps its fingerprint
            return folder_data_files(path, whole_apply_output=True)
        except InputError:  # no data files: what is there is the input
            pass
    files = []
    for name in sorted(local_files_under(path)):
        parts = name.split("/")
        if any(part.startswith(".") for part in parts) or name.endswith(SIDECAR_SUFFIX):
            continue
        if len(parts) == 1 and name in (PROVENANCE_FILE, CARD_FILE):
            continue
        files.append(path / name)
    return files


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sampled(path: Path, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256(f"{size}:{mtime_ns}".encode())
    with open(path, "rb") as fh:
        span = max(0, size - SAMPLE_BLOCK_BYTES)
        for i in range(SAMPLE_BLOCKS):
            fh.seek(span * i // max(1, SAMPLE_BLOCKS - 1))
            digest.update(fh.read(SAMPLE_BLOCK_BYTES))
    return digest.hexdigest()


def _in_order_with_bar(pool: ThreadPoolExecutor, work, items: list, description: str) -> list:
    """`work(item)` of every item, run on `pool`, in the order of `items`, with a bar on stderr (a plain line in a
    log) from FINGERPRINT_BAR_FILES items: 25,000 files on a shared filesystem were 25,000 reads of 512 KiB one after
    another, at every run and resume, with nothing said. stderr: `lineage --json` prints its record on stdout."""
    from rich.console import Console

    from edu_filter.documents import progress_bar

    done = []
    with progress_bar(len(items) >= FINGERPRINT_BAR_FILES, Console(stderr=True)) as progress:
        task = progress.add_task(description, total=len(items))
        for result in pool.map(work, items):  # map keeps the order
            done.append(result)
            progress.advance(task)
    return done


def _file_digest(file_stat: tuple, full: bool) -> str:
    f, st = file_stat
    return _sha256(f) if full else _sampled(f, st.st_size, st.st_mtime_ns)


def fingerprint(path: str | os.PathLike, full_hash_max_bytes: int = FULL_HASH_MAX_BYTES,
                documents: bool = False) -> dict | None:
    """{"fingerprint": "sha256:..." | "sampled:...", "method": ..., "bytes": total, "files": n} of a local file or
    folder (see the module docstring; `documents`: a folder of documents, see `_content_files`); None for a remote
    input. Raises ProvenanceError when the path is missing."""
    if is_remote(path):
        return None
    matched = glob_matches(str(path))  # a glob the shell left: the files it matches, named below its folder
    base = path = Path(path)
    if matched is not None:
        base = Path(matched[0])
        files = [base / name for name in data_files_in(str(path), matched[1])]
    elif not path.exists():
        raise ProvenanceError(f"{path}: no such file or folder")
    else:
        files = _content_files(path, documents)
    with ThreadPoolExecutor(max(1, min(FINGERPRINT_THREADS, len(files)))) as pool:
        stats = list(pool.map(os.stat, files))
        total = sum(s.st_size for s in stats)
        full = total <= full_hash_max_bytes
        digests = _in_order_with_bar(pool, lambda file_stat: _file_digest(file_stat, full), list(zip(files, stats)),
                                     f"fingerprinting {len(files):,} input files")
    if path.is_file():
        digest = digests[0]
    else:
        outer = hashlib.sha256()
        for f, one in zip(files, digests):
            outer.update(f"{f.relative_to(base).as_posix()}\0{one}\n".encode("utf-8", "surrogateescape"))
        digest = outer.hexdigest()
    method = "sha256" if full else "sampled"
    return {
        "fingerprint": f"{method}:{digest}",
        "method": "sha256 of all content" if full else
                  f"size, mtime and {SAMPLE_BLOCKS} x {SAMPLE_BLOCK_BYTES // 1024} KiB blocks per file",
        "bytes": total,
        "files": len(files),
    }


# --- records --------------------------------------------------------------------------------------------------------
def provenance_path(artifact: str | os.PathLike) -> Path:
    """Where the record of `artifact` lives: `<folder>/provenance.json`, or `<file>.provenance.json` beside a file."""
    artifact = Path(artifact)
    return artifact / PROVENANCE_FILE if artifact.is_dir() else artifact.with_name(artifact.name + SIDECAR_SUFFIX)


def read_provenance(path: str | os.PathLike, parsed: dict | None = None) -> tuple[dict, Path] | None:
    """(record, artifact path) of the artifact at `path` or of the folder artifact enclosing it (`OUT/kept` belongs
    to the apply output OUT); None when there is none. `parsed`: records read before, by file (one read and held
    for the many files of one artifact)."""
    if is_remote(path):
        return None
    path = Path(path).absolute()
    candidates = [path] + list(path.parents)[:ENCLOSING_LEVELS]
    for i, candidate in enumerate(candidates):
        record_file = provenance_path(candidate) if i == 0 else candidate / PROVENANCE_FILE
        if parsed is not None and str(record_file) in parsed:
            return parsed[str(record_file)], candidate
        if record_file.is_file():
            try:
                record = json.loads(record_file.read_text())
                bad = None if isinstance(record, dict) else f"not a provenance record (a JSON {type(record).__name__})"
            except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
                bad = f"unreadable provenance record ({e})"
            if bad:
                if i:  # a folder above the input holds another tool's file of that name: not ours to judge
                    continue
                raise ProvenanceError(f"{record_file}: {bad}")
            if record.get("format") == RECORD_FORMAT:
                if parsed is not None:
                    parsed[str(record_file)] = record
                return record, candidate
    return None


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("edu-filter")
    except PackageNotFoundError:
        return "unknown"


def _library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    found = {"python": sys.version.split()[0]}
    for name in LIBRARIES:
        try:
            found[name] = package_version(name)
        except PackageNotFoundError:
            pass
    return found


_URL_CREDENTIALS = re.compile(r"(?<=://)[^/\s]+@")  # up to the host's @: a password may hold one
# a value named as a secret: `?key=` in a URL, `--server-arg api-key=...`, `hf-token=...`, a SAS `sig=` (not
# `tokenizer=` or `max_tokens=`: the name must end in the word)
_SECRET_VALUES = re.compile(r"(?i)((?<![\w./-])[\w.-]*(?:key|token|secret|password|passwd|sig|signature)=)"
                            r"[^\s&]+")  # a whole name, not after a /: a path's key=value partition is no secret


def _redact(text: str) -> str:
    """Credentials in URLs (scheme://user:secret@host) and values named as secrets (`?key=`, `api-key=`,
    `hf-token=`) never reach a record or a card."""
    return _SECRET_VALUES.sub(r"\1***", _URL_CREDENTIALS.sub("***@", text))


def redacted(value):
    """`_redact` over every string in a JSON value (on its JSON text, a secret holding a quote broke the JSON)."""
    if isinstance(value, dict):
        return {k: redacted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redacted(v) for v in value]
    return _redact(value) if isinstance(value, str) else value


def command_line(argv: list[str] | None = None) -> str:
    """The command that is running, as a shell line (`edu-filter train ...` when run through the CLI)."""
    argv = list(sys.argv if argv is None else argv)
    program = Path(argv[0]).name if argv else "python"
    if program in ("edu-filter", "cli.py"):
        program = "edu-filter"
    if program.startswith("ipykernel"):  # its arguments name the kernel's connection file, not the call
        return "python (a Jupyter kernel: a notebook's call)"
    return shlex.join([program, *map(_redact, argv[1:])])  # each argument whole: a secret may hold a quote


def describe_input(role: str, path: str | os.PathLike, full_hash_max_bytes: int | None = None,
                   parsed: dict | None = None) -> dict:
    """One input as recorded: role, path (absolute when local), fingerprint (hashed in full up to
    `full_hash_max_bytes`, default FULL_HASH_MAX_BYTES), and the input's own provenance record when it is (or lies
    inside) an artifact."""
    text = str(path)
    local = not is_remote(text)
    entry = {"role": role, "path": str(Path(text).absolute()) if local else _redact(text)}
    if full_hash_max_bytes is None:
        full_hash_max_bytes = FULL_HASH_MAX_BYTES
    found = fingerprint(text, full_hash_max_bytes, documents=carries_documents(role))
    entry.update({"fingerprint": None, "fingerprint_method": "none: remote input"} if found is None else {
        "fingerprint": found["fingerprint"], "fingerprint_method": found["method"], "bytes": found["bytes"],
        "files": found["files"]})
    enclosing = read_provenance(text, parsed) if local else None
    if enclosing is not None:
        record, artifact = enclosing
        entry["provenance"] = record
        if artifact != Path(text).absolute():
            entry["artifact"] = str(artifact)
    elif local and carries_documents(role) and Path(text).is_dir():
        # parts hashed as the folder was: each under the limit alone, a sampled folder's were read in full
        parts = _recorded_parts(Path(text), full_hash_max_bytes if found["fingerprint"].startswith("sha256:") else 0)
        if parts:  # a folder of `score` outputs, each with its sidecar record: the folder's record lists them
            entry["provenance"] = {"format": RECORD_FORMAT, "kind": "folder", "inputs": parts}
    return entry


def _recorded_parts(folder: Path, full_hash_max_bytes: int) -> list[dict]:
    """The data files of a folder that have records of their own, as inputs (role `documents`)."""
    try:
        files = folder_data_files(folder)
    except InputError:
        return []
    parts = []
    for file in files:
        if provenance_path(file).is_file():
            try:
                parts.append(describe_input("documents", file, full_hash_max_bytes))
            except ProvenanceError:  # an unreadable sidecar: that part goes unrecorded, the folder is still read
                continue
    return parts


def describe_inputs(inputs: Mapping[str, str | os.PathLike | Iterable | None]) -> list[dict]:
    """Role -> path (or paths) to recorded inputs; None and empty roles are skipped. Paths are described
    FINGERPRINT_THREADS at a time (a shell glob gives `apply` 25,000 files, each fingerprinted on its own)."""
    pairs = [(role, path) for role, paths in inputs.items() if paths is not None
             for path in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
    with ThreadPoolExecutor(max(1, min(FINGERPRINT_THREADS, len(pairs)))) as pool:
        limits = _role_hash_limits(pairs, pool)
        parsed: dict = {}
        entries = _in_order_with_bar(pool, lambda pair: describe_input(*pair, limits.get(pair[0]), parsed), pairs,
                                     f"fingerprinting {len(pairs):,} inputs")
    # an artifact's record once, with the first of its files given: a copy with each (UP/kept/*.parquet, 1,000
    # files) made a record of files x its size, copied again by everything made from it (10 GB at 25k files)
    recorded: set[str] = set()
    for entry in entries:
        if "artifact" in entry and "provenance" in entry:
            if entry["artifact"] in recorded:
                del entry["provenance"]
            recorded.add(entry["artifact"])
    return entries



def _role_hash_limits(pairs: list[tuple[str, str | os.PathLike]], pool) -> dict[str, int]:
    """A role given as several local paths (a shell glob of shards) is hashed in full only when all of them together
    are at most FULL_HASH_MAX_BYTES, as its folder would be: each shard under the limit alone, a terabyte glob was read
    whole before every run (and `score --sample` read the corpus it samples). {role: 0} for a role sampled."""
    by_role: dict[str, list[Path]] = {}
    for role, path in pairs:
        if not is_remote(path) and Path(path).exists():
            by_role.setdefault(role, []).append(Path(path))
    limits = {}
    for role, paths in by_role.items():
        # benchmarks are small, and apply's resume compares their fingerprints with those an earlier release took
        if len(paths) > 1 and role != "decontamination":
            files = [f for path in paths for f in _content_files(path, carries_documents(role))]
            if sum(pool.map(lambda f: os.stat(f).st_size, files)) > FULL_HASH_MAX_BYTES:
                limits[role] = 0
    return limits


def record_provenance(
    artifact: str | os.PathLike,
    kind: str,
    settings: Mapping,
    inputs: Mapping[str, str | os.PathLike | Iterable | None] | list[dict],
    command: str | None = None,
) -> Path:
    """Write the provenance record of `artifact` (a file or folder that exists) and return the record's path.

    `inputs` maps a role ("documents", "train", "classifier", ...) to a path or list of paths (fingerprinted now),
    or is a list already made by `describe_inputs` (fingerprinted when the inputs were read). `command` defaults to
    the running command line. Input paths are stored absolute and relative to the artifact, so that `lineage`
    still finds them after the whole project folder has moved.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    artifact = Path(artifact)
    if not artifact.exists():
        raise ProvenanceError(f"{artifact}: cannot record the provenance of something that does not exist")
    entries = describe_inputs(inputs) if isinstance(inputs, Mapping) else list(inputs)
    base = artifact.absolute() if artifact.is_dir() else artifact.absolute().parent
    for entry in entries:
        if not is_remote(entry["path"]):
            entry["relative_path"] = os.path.relpath(entry["path"], base)
    record = {
        "format": RECORD_FORMAT,
        "kind": kind,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "edu_filter_version": version(),
        "versions": _library_versions(),
        "command": command if command is not None else command_line(),
        "settings": redacted(json.loads(json.dumps(dict(settings), default=str))),
        "inputs": entries,
    }
    if artifact.is_file():  # what the record describes: rows appended or edited later are told apart (lineage)
        record["artifact_fingerprint"] = fingerprint(artifact)["fingerprint"]
    target = provenance_path(artifact)
    write_json_whole(target, record)
    return target


# --- lineage --------------------------------------------------------------------------------------------------------
FOLDER_KINDS = ("classifier", "dataset", "ablation")  # artifacts that are folders, also once deleted


def _present(path: Path, cache: dict) -> bool:
    """A file or folder there, or a glob (an input given as a quoted pattern) matching files: globbed once per
    lineage (`cache`), however often its node asks."""
    if path.exists():
        return True
    key = ("present", str(path))
    if key not in cache:
        try:
            cache[key] = glob_matches(str(path)) is not None
        except (InputError, OSError):
            cache[key] = False
    return cache[key]


def _resolve(entry: dict, base: Path | None, cache: dict) -> Path:
    """Where a recorded input is now: its recorded path, else the same place relative to its (moved) consumer's
    folder `base`. Where neither exists, the moved place: a project moved, one of its artifacts deleted, the inputs
    recorded below that artifact are still found from there (from the recorded place they read as missing too)."""
    recorded = Path(entry["path"])
    if _present(recorded, cache) or base is None or "relative_path" not in entry:
        return recorded
    moved = (base / entry["relative_path"]).resolve()
    return moved if _present(moved, cache) or moved.parent.exists() else recorded


def lineage(path: str | os.PathLike) -> dict:
    """The tree of `path` back to its raw inputs, one node per artifact or input:

    {"kind", "path", "fingerprint" (current), "stale", "inputs": [nodes], ...}. An input node also has its "role",
    "used_fingerprint" (what its consumer recorded), "missing" and "remote"; `stale` is true when its current
    content no longer matches what was used (or it is gone). Below a stale node the tree shows what was used then.
    "record_outdated": a file whose content (as used, or now) is not what its record was written for. The inputs
    of an artifact are shown once, under its first file met; its other files' nodes name that one
    ("inputs_as") with no inputs of their own: the tree grows with the artifacts, not files x upstream inputs.
    """
    path = Path(path)
    if not path.exists():
        raise ProvenanceError(f"{path}: no such file or folder")
    fingerprints: dict = {}  # for this lineage, by path: current fingerprints, and whether a glob matches
    found = read_provenance(path)
    record, artifact = found if found else (None, None)
    about = {"stale": False}
    if artifact is not None and artifact != path.absolute():
        about["artifact"] = str(artifact)
    return _node(record, path, about, fingerprints, origin=artifact)


def _fingerprint_key(path: Path, documents: bool, recorded: str | None) -> tuple[str, bool, int]:
    """`_current_fingerprint`'s cache key: the path, whether it holds documents, the full-hash limit of the method."""
    return str(path), documents, 0 if (recorded or "").startswith("sampled:") else FULL_HASH_MAX_BYTES


def _current_fingerprint(path: Path, cache: dict, documents: bool = False, recorded: str | None = None) -> str | None:
    """The fingerprint of `path` now, by the method of the `recorded` one where given (a part of a sampled folder
    was sampled, though small enough alone to be hashed in full: hashed in full, it read as changed)."""
    key = _fingerprint_key(path, documents, recorded)
    if key not in cache:
        found = fingerprint(path, key[2], documents=documents) if _present(path, cache) else None
        cache[key] = found["fingerprint"] if found else None
    return cache[key]


def _node(record: dict | None, path: Path | str, about: dict, cache: dict, origin: Path | None = None) -> dict:
    """One node: kind, path, current fingerprint, then `about` (role, staleness...), the record's origin, inputs.
    `origin` is where the record's artifact is now, when `path` lies inside it (its inputs are found from there)."""
    local = isinstance(path, Path)
    node = {
        "kind": record["kind"] if record else "file",
        "path": str(path.absolute()) if local else path,
        "fingerprint": _current_fingerprint(path.absolute(), cache, carries_documents(about.get("role", "")),
                                            about.get("used_fingerprint")) if local else None,
        **about,
    }
    if record:
        node.update(command=record.get("command"), created=record.get("created"),
                    edu_filter_version=record.get("edu_filter_version"))
        content = about.get("used_fingerprint", node["fingerprint"]) if "artifact" not in about else None
        if _differs_from_record(record, content):
            node["record_outdated"] = True
    consumer = (origin or path) if local else None
    if consumer is not None and not (consumer.is_dir() or (record or {}).get("kind") in FOLDER_KINDS):
        consumer = consumer.parent  # inputs are recorded relative to a file's folder
    inputs = (record or {}).get("inputs", [])
    if record and inputs:  # the files of one artifact (1,000 kept files of an apply over 100k): its inputs once
        artifact = str(origin or path)  # a file of the artifact `origin`, or an artifact of its own
        first = cache.setdefault(("inputs of", artifact, record.get("created"), record.get("command")),
                                 node["path"])
        if first != node["path"]:
            node.update(inputs=[], inputs_as=first)
            return node
    if consumer is not None and len(inputs) > 1:  # each input's fingerprint now, several at a time, with a bar
        _prefetch_fingerprints([e for e in inputs if not is_remote(e["path"])], consumer, cache, node["path"])
    # an artifact's record is kept with the first of its files given (`describe_inputs`)
    shared = {e["artifact"]: e["provenance"] for e in inputs if e.get("artifact") and e.get("provenance")}
    node["inputs"] = [_input_node(entry, consumer, cache, entry.get("provenance") or shared.get(entry.get("artifact")))
                      for entry in inputs]
    return node


def _differs_from_record(record: dict, content: str | None) -> bool:
    """Whether a file artifact's content (as used, or now) is not what its record describes: rows appended to an
    annotation file after `score` (`cat more.jsonl >> annotations.jsonl`) kept the history of its first rows alone.
    Fingerprints taken by different methods (sampled, hashed) are not compared."""
    described = record.get("artifact_fingerprint")
    if not (isinstance(described, str) and isinstance(content, str)):
        return False
    return described.split(":", 1)[0] == content.split(":", 1)[0] and described != content


def _prefetch_fingerprints(entries: list[dict], consumer: Path, cache: dict, path: str) -> None:
    """The current fingerprints of a node's recorded inputs into `cache`, FINGERPRINT_THREADS at a time: one after
    another, an apply record of 100k files was tens of silent minutes of reads on a shared file system."""
    def args(entry: dict) -> tuple:
        return _resolve(entry, consumer, cache).absolute(), carries_documents(entry["role"]), entry.get("fingerprint")

    def current(entry: dict) -> None:
        path, documents, recorded = args(entry)
        _current_fingerprint(path, cache, documents, recorded)

    todo = [e for e in entries if _fingerprint_key(*args(e)) not in cache]  # an upstream record shared by many files: read once
    if todo:
        with ThreadPoolExecutor(FINGERPRINT_THREADS) as pool:
            _in_order_with_bar(pool, current, todo, f"fingerprinting the {len(todo):,} inputs of {path}")


def _input_node(entry: dict, consumer: Path | None, cache: dict, record: dict | None) -> dict:
    about = {"role": entry["role"], "used_fingerprint": entry.get("fingerprint")}
    if is_remote(entry["path"]):
        return _node(record, entry["path"], {**about, "stale": False, "missing": False, "remote": True}, cache)
    where = _resolve(entry, consumer, cache)
    missing = not _present(where, cache)
    documents = carries_documents(entry["role"])
    used = entry.get("fingerprint")
    current = None if missing else _current_fingerprint(where.absolute(), cache, documents, used)
    changed = missing or current != used
    if changed and not missing and documents and where.is_dir():
        # recorded before document folders were fingerprinted by their data files alone: every file counted then
        changed = _current_fingerprint(where.absolute(), cache, False, used) != used
    if record is None and not changed:  # a record written after this input was used still tells its origin
        found = read_provenance(where)  # (not of a replaced input: that record tells the replacement's)
        record = found[0] if found else None
    about.update(stale=changed, missing=missing, remote=False)
    origin = None
    if "artifact" in entry:  # e.g. OUT/kept of the apply output OUT: OUT's inputs are recorded relative to OUT
        about["artifact"] = entry["artifact"]
        depth = len(Path(entry["path"]).relative_to(entry["artifact"]).parts)
        origin = where.parents[depth - 1] if depth else where
    return _node(record, where, about, cache, origin=origin)


def stale_nodes(node: dict) -> list[dict]:
    """Every stale node of a lineage tree, depth first."""
    found = [node] if node.get("stale") else []
    for child in node["inputs"]:
        found += stale_nodes(child)
    return found


def lineage_tree(node: dict):
    """A rich Tree of a lineage: kind, role, path and short fingerprint per node; changed or missing inputs in red."""
    from rich.markup import escape
    from rich.tree import Tree

    def label(n: dict) -> str:
        parts = [f"[bold]{n['kind']}[/]"]
        if n.get("role"):
            parts.append(f"[dim]({escape(n['role'])})[/]")
        parts.append(escape(n["path"]))
        if n.get("remote"):
            parts.append("[dim]remote, not fingerprinted[/]")
        elif n["fingerprint"]:
            parts.append(f"[cyan]{n['fingerprint'][:23]}[/]")
        if n.get("missing"):
            parts.append("[bold red]MISSING[/]")
        elif n.get("stale"):
            parts.append(f"[bold red]CHANGED since used[/] [dim](was {(n.get('used_fingerprint') or '?')[:23]})[/]")
        if n.get("record_outdated"):
            parts.append("[bold yellow]changed after its record was written[/] [dim](the history below is of its "
                         "content then)[/]")
        if n.get("inputs_as"):
            parts.append(f"[dim]inputs as {escape(n['inputs_as'])}[/]")
        if n.get("command"):
            command = n["command"] if len(n["command"]) <= 100 else n["command"][:99] + "…"
            parts.append(f"\n[dim]{escape(command)}  {n.get('created') or ''}[/]")
        return " ".join(parts)

    def add(tree, n: dict):
        branch = tree.add(label(n))
        for child in n["inputs"]:
            add(branch, child)

    root = Tree(label(node))
    for child in node["inputs"]:
        add(root, child)
    return root


def show_lineage(path: str | os.PathLike, as_json: bool = False) -> dict:
    """`edu-filter lineage`: print the tree (or its JSON) and return it."""
    from rich.console import Console
    from rich.markup import escape

    node = lineage(path)
    if as_json:
        print(json.dumps(node, indent=2))
        return node
    console = Console()
    console.print(lineage_tree(node))
    stale = stale_nodes(node)
    for said, nodes in (("missing", [n for n in stale if n.get("missing")]),
                        ("changed since they were used", [n for n in stale if not n.get("missing")])):
        if nodes:
            console.print(f"[bold red]{len(nodes)} input(s) {said}:[/] " + escape(", ".join(n["path"] for n in nodes)))
    return node


# --- what the chain says about its sources --------------------------------------------------------------------------
def hub_dataset_id(path: str) -> str | None:
    """ORG/NAME of an hf://datasets/ address or of a bundled file that comes from the hub; None otherwise."""
    if path.startswith("hf://datasets/"):
        parts = path[len("hf://datasets/"):].strip("/").split("/")
        return "/".join(parts[:2]) if len(parts) >= 2 else None
    return BUNDLED_HUB_SOURCES.get(_bundled_name(path) or "")


def _bundled_name(path: str) -> str | None:
    try:
        return Path(path).resolve().relative_to(bundled_data().resolve()).as_posix()
    except (ValueError, OSError):
        return None


def carries_documents(role: str) -> bool:
    """Whether an input of this role is where the documents came from (not a classifier, encoder or tokenizer, whose
    own training data is not in the output)."""
    return role in ("documents", "train", "validation") or role.startswith("data:")


def _document_inputs(record: dict) -> list[dict]:
    return [e for e in record.get("inputs") or [] if carries_documents(e["role"])]


def source_datasets(entries: list[dict], roles: Iterable[str] | None = None) -> list[str]:
    """Hub dataset ids at the raw end of the recorded inputs, followed upstream through the inputs that carry
    documents (an upstream apply's classifier and its labels are not a source of the documents), in order."""
    found: list[str] = []

    def walk(items):
        for entry in items:
            upstream = _document_inputs(entry.get("provenance") or {})
            if upstream:
                walk(upstream)
            else:
                hub = hub_dataset_id(entry["path"])
                if hub and hub not in found:
                    found.append(hub)

    walk([e for e in entries if roles is None or e["role"] in roles])
    return found


def source_licenses(entries: list[dict], roles: Iterable[str] | None = None) -> list[str]:
    """Licences of the raw inputs where they are known (known hub datasets, bundled files)."""
    licences = []
    for entry in entries:
        if roles is not None and entry["role"] not in roles:
            continue
        upstream = _document_inputs(entry.get("provenance") or {})
        found = source_licenses(upstream) if upstream else [
            BUNDLED_LICENSES.get(_bundled_name(entry["path"]) or "")
            or KNOWN_DATASET_LICENSES.get(hub_dataset_id(entry["path"]) or "")]
        licences += [lic for lic in found if lic and lic not in licences]
    return licences


# --- cards ----------------------------------------------------------------------------------------------------------
def _metric(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _quote(path: str) -> str:
    return f"`{path}`"


def _weighted_fit(training: dict) -> str:
    """How a fit on an actively chosen sample used its inclusion weights: the ridge head's fit takes them to the
    power cross-validation found best (1, 0.5 or 0: unweighted); the cut points always take them in full."""
    power = training.get("weight_flattening", 1.0) if training["config"]["method"] == "head" else 1.0
    if power == 1:  # a fine-tune weighs its loss in full (its linear probe's power aside); fastText resamples
        return "the fit and the cut points weigh each by its inclusion weight"
    fit = ("the fit is unweighted" if power == 0 else f"the fit weighs each by its inclusion weight to the power "
           f"{power:g}")
    return f"{fit} (cross-validation fit the labels better so), and the cut points weigh each by its inclusion weight"


def model_card(folder: str | os.PathLike, metrics: dict, record: dict, repo_id: str | None = None) -> str:
    """README.md text of a classifier folder: hub metadata, validation metrics, calibration, labels, how to load."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    training = metrics["training"]
    config = training["config"]
    method = config["method"]
    fasttext = method == "fasttext"
    datasets = source_datasets(record["inputs"], roles=("train", "validation"))
    base_model = None if fasttext else training.get("base_model")
    name = repo_id or Path(folder).name
    val_name = "held-out validation split" if not any(e["role"] == "validation" for e in record["inputs"]) else \
        "validation data"
    code = config["kind"] == "code"
    rubric, keep, dataset = ("Python-Edu", 4, "Python-Edu") if code else ("FineWeb-Edu", 3, "FineWeb-Edu")
    scored = [("spearmanr", "Spearman", metrics.get("spearman")), ("mse", "MSE", metrics.get("mse")),
              ("accuracy", "accuracy (int_score)", metrics.get("accuracy")),
              ("f1", f"F1 of int_score >= {keep}", metrics.get(f"binary_f1_at_{keep}"))]
    eval_results = [
        EvalResult(task_type="text-classification", dataset_type=datasets[0] if datasets else "json",
                   dataset_name=val_name, dataset_split="validation", metric_type=kind, metric_name=label,
                   metric_value=round(float(value), 4))
        for kind, label, value in scored if value is not None
    ]
    data = ModelCardData(
        library_name="fasttext" if fasttext else "transformers",
        pipeline_tag="text-classification",
        base_model=base_model,
        datasets=datasets or None,
        metrics=["spearmanr", "mse", "accuracy", "f1"],
        tags=["edu-filter", "educational-value", "data-filtering", config["kind"], method],
        model_name=name,
        eval_results=eval_results or None,
    )
    labels = training.get("labels", {})
    # what the rows say (counts per annotator / prompt version), else what the annotation files' records say
    annotated = [e["provenance"]["settings"] for e in record["inputs"]
                 if e["role"] in ("train", "validation") and (e.get("provenance") or {}).get("kind") == "annotations"]
    annotators = ", ".join(f"{k} ({v})" for k, v in labels.get("annotators", {}).items()) or ", ".join(
        sorted({str(a["model"]) for a in annotated if a.get("model")})) or "not recorded"
    prompts = ", ".join(f"`{k}` ({v})" for k, v in labels.get("prompt_versions", {}).items()) or ", ".join(
        sorted({f"`{a['prompt']}`" for a in annotated if a.get("prompt")})) or "not recorded"
    encoder = training.get("base_model") or training.get("encoder")
    what = {"head": f"a frozen `{encoder}` encoder ({config.get('pooling')}-pooled layers "
                    f"{training.get('pool_layers')}) with a ridge-regression head",
            "finetune": f"`{encoder}` fine-tuned with a regression head",
            "fasttext": "a fastText model over labels 0-5, read as the expected label"}[method]
    cuts = training.get("cut_points") or []
    placed_by = "validation predictions" if method == "finetune" else "validation and out-of-fold predictions"
    weights = training.get("weights")
    lines = [
        f"# {name}",
        "",
        f"An educational-value classifier ({config['kind']} documents) trained with edu-filter: {what}. It predicts",
        f"the 0-5 score an LLM gave with the {rubric} style additive rubric, as a raw `score`, and an `int_score`",
        f"0-5 through the calibration cut points below. Keep `int_score >= {keep}` for a {dataset} style filter.",
        "",
        f"## Validation metrics ({metrics['n']} documents, {val_name})",
        "",
        "| metric | value |",
        "|---|---|",
        f"| Spearman | {_metric(metrics.get('spearman'))} |",
        f"| Pearson | {_metric(metrics.get('pearson'))} |",
        f"| MSE | {_metric(metrics.get('mse'))} |",
        f"| accuracy (int_score) | {_metric(metrics.get('accuracy'))} |",
        f"| macro F1 (int_score) | {_metric(metrics.get('macro_f1'))} |",
        *[f"| F1 of int_score >= {t} (round-and-clip: {_metric(metrics['uncalibrated'].get(f'binary_f1_at_{t}'))}) "
          f"| {_metric(metrics.get(f'binary_f1_at_{t}'))} |" for t in (2, 3, 4) if f"binary_f1_at_{t}" in metrics],
        *([""] + [f"- **Warning:** {w}." for w in metrics["warnings"]] if metrics.get("warnings") else []),
        *(["", f"The training documents were chosen by active selection: {_weighted_fit(training)} (`{weights['field']}`, "
                f"{weights['min']:.2f}-{weights['max']:.2f}; effective size {weights['effective_n']:.0f})."]
          if weights else []),
        *(["", "These metrics weigh the validation documents by their inclusion weights: they estimate those on the "
                f"pool the documents were drawn from (effective size {metrics['weighted']['effective_n']:.0f})."]
          if metrics.get("weighted") else []),
        "",
        "## Calibration",
        "",
        f"`int_score` is t when the raw score is at least the t-th cut point ({training.get('calibration_examples')}",
        f"{placed_by} placed them so that `int_score >= t` is the best binary decision at each threshold):",
        "",
        "| int_score | 1 | 2 | 3 | 4 | 5 |",
        "|---|---|---|---|---|---|",
        "| raw score at least | " + " | ".join(f"{c:.3f}" for c in cuts) + " |",
        "",
        "## Training data and labels",
        "",
        f"{training['n_train']} training and {training['n_val']} validation documents; label field "
        f"`{config['label_field']}`.",
        "",
        f"- labels from: {annotators}",
        f"- prompt versions: {prompts}",
        *[f"- {e['role']} data: {_quote(e['path'])} ({e.get('fingerprint') or 'remote'})" for e in record["inputs"]
          if e["role"] in ("train", "validation")],
        *([f"- source datasets on the hub: {', '.join(datasets)}"] if datasets else []),
        "",
        "## How to load",
        "",
    ]
    if fasttext:
        lines += [
            "```python",
            "from edu_filter.classifiers import load_scorer",
            "",
            f'scorer = load_scorer("{name}")',
            "scores, _ = scorer.predict(texts)",
            "int_scores = scorer.to_int_score(scores)",
            "```",
        ]
    else:
        lines += [
            "```python",
            "import torch",
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
            "",
            f'tokenizer = AutoTokenizer.from_pretrained("{name}", trust_remote_code=True)',
            f'model = AutoModelForSequenceClassification.from_pretrained("{name}", trust_remote_code=True)',
            'inputs = tokenizer(texts, return_tensors="pt", padding=True, truncation=True)',
            "with torch.no_grad():",
            "    scores = model(**inputs).logits.squeeze(-1)  # raw educational score",
            "# int_score: the calibrated cut points it reaches (FineWeb-Edu's round-and-clip would move the threshold)",
            "int_scores = (scores[:, None] >= torch.tensor(model.config.cut_points)).sum(-1)",
            "```",
            "",
            *([f"This reads each document's first {config.get('max_length')} tokens only. The model was trained and "
               f"calibrated on `{config.get('long_docs')}` scores (every chunk of a long document), so only "
               "`load_scorer` below gives the scores its cut points fit."]
              if config.get("long_docs") not in (None, "truncate") else []),
            "",
            "With edu-filter (calibrated `int_score`, long-document handling, datatrove):",
            "",
            "```python",
            "from edu_filter.classifiers import load_scorer",
            "",
            f'scorer = load_scorer("{name}")',
            "scores, truncated = scorer.predict(texts)",
            "int_scores = scorer.to_int_score(scores)",
            "```",
        ]
    lines += [
        "",
        f"or `edu-filter apply CORPUS --model {name} -o OUT --threshold {keep}`.",
        "",
        "## Provenance",
        "",
        f"Made by edu-filter {record['edu_filter_version']} on {record['created']} with",
        "",
        "```bash",
        record["command"],
        "```",
        "",
        "`provenance.json` records every setting and the fingerprint of every input; `edu-filter lineage FOLDER` shows",
        "the chain back to the raw data and whether any of it changed since.",
        "",
    ]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))


def write_model_card(folder: str | os.PathLike, metrics: dict, record: dict, repo_id: str | None = None) -> Path:
    path = Path(folder) / CARD_FILE
    path.write_text(model_card(folder, metrics, record, repo_id))
    return path


def _size_category(n: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                         (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"),
                         (10**10, "1B<n<10B"), (10**11, "10B<n<100B"), (10**12, "100B<n<1T")):  # the hub's names
        if n < limit:
            return label
    return "n>1T"


def _kept_licenses(folder: Path) -> Counter:
    """Per-document licences when the kept data carries a `license` field (code corpora do)."""
    import pyarrow.parquet as pq

    counts: Counter = Counter()
    for file in sorted((folder / "kept").glob("*.parquet")):
        if "license" in pq.read_schema(file).names:
            counts.update(v for v in pq.read_table(file, columns=["license"]).column("license").to_pylist() if v)
    return counts


def dataset_card(out_folder: str | os.PathLike, stats: dict, source_license: str | None = None,
                 repo_id: str | None = None) -> str:
    """README.md text of an apply output: hub metadata, the stats table, threshold, classifier, dedup and
    decontamination settings, and the source licence where known."""
    from huggingface_hub import DatasetCard, DatasetCardData

    out = Path(out_folder)
    settings = stats.get("settings", {})
    name = repo_id or out.name
    inputs = [str(p) for p in settings.get("inputs", [])]
    recorded = read_provenance(out)
    # the recorded inputs (with the classifier's own record), else the input paths stats.json names
    entries = recorded[0]["inputs"] if recorded and recorded[1] == out.absolute() else [
        {"role": "documents", "path": p} for p in inputs]
    sources = source_datasets(entries, roles=("documents",))
    per_doc = _kept_licenses(out)
    licences = [source_license] if source_license else source_licenses(entries, roles=("documents",))
    if not licences and per_doc:
        licences = sorted(per_doc)
    # the hub takes only its own licence ids in a card's metadata (lowercase: "mit", "apache-2.0"); others are
    # "other", named in the card's text
    hub_ids = {lic.lower() for lic in licences if lic.lower() in HUB_LICENSES}
    card_license = hub_ids.pop() if len(licences) == 1 and hub_ids else ("other" if licences else None)
    kept = stats["kept"]
    n_in, t_in = max(1, stats["in"]["documents"]), max(1, stats["in"]["tokens"])
    data = DatasetCardData(
        license=card_license,
        pretty_name=name,
        task_categories=["text-generation"],
        size_categories=[_size_category(kept["documents"])],
        source_datasets=sources or None,
        tags=["edu-filter", "educational-value", "filtered"],
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": "kept/*.parquet"}]}],
    )
    if settings.get("keep_top") is not None:
        cutoff = stats.get("keep_top_cutoff")
        rule = f"the top {settings['keep_top']:.1%} by `score`" + (
            f" (`score >= {cutoff:.3f}`)" if cutoff is not None else "")
    else:
        rule = f"`int_score >= {settings.get('threshold')}`"
    classifier = str(settings.get("model"))
    classifier_entry = next((e for e in entries if e["role"] == "classifier"), None)
    classifier_origin = []
    if classifier_entry and classifier_entry.get("provenance"):
        upstream = classifier_entry["provenance"]
        labelled = sorted({e["path"] for e in upstream.get("inputs", []) if e["role"] == "train"})
        classifier_origin = [f"  trained by `{upstream.get('command')}` on {', '.join(map(_quote, labelled))}"]

    def row(label, v):
        return (f"| {label} | {v['documents']:,} | {100 * v['documents'] / n_in:.1f} | {v['tokens']:,} | "
                f"{100 * v['tokens'] / t_in:.1f} |")

    decont = settings.get("decontaminate") or []
    lines = [
        f"# {name}",
        "",
        f"{kept['documents']:,} of {stats['in']['documents']:,} documents ({100 * kept['tokens'] / t_in:.1f}% of the "
        f"tokens) kept by edu-filter: documents scored with an educational-value classifier, {rule} kept"
        + "".join(f", {step} removed" for step, on in (("exact duplicates", settings.get("exact_dedup")),
                                                      ("near-duplicates", settings.get("dedup")),
                                                      ("passages of evaluation sets", decont)) if on) + ".",
        "",
        "## Counts",
        "",
        "| | documents | % | tokens | % tokens |",
        "|---|---|---|---|---|",
        row("in", stats["in"]),
        row("kept", kept),
        *[row(f"{kind}/{reason}", v) for kind in ("removed", "failed") for reason, v in stats.get(kind, {}).items()],
        "",
        f"Counts add up (every input document is in exactly one row): {'yes' if stats.get('adds_up') else 'NO'}.",
        "",
        "## How it was filtered",
        "",
        f"- preset: {settings.get('preset') or 'none'}",
        f"- keep: {rule}",
        f"- classifier: {_quote(classifier)}"
        + (f" ({classifier_entry['fingerprint']})" if classifier_entry and classifier_entry.get("fingerprint") else ""),
        *classifier_origin,
        f"- long documents: {settings.get('long_docs') or 'the classifier default'}; scoring dtype: "
        f"{settings.get('dtype') or 'default'}",
        f"- near-duplicate removal (MinHash, FineWeb settings: 5-grams, 14 buckets x 8 hashes): "
        f"{'on' if settings.get('dedup') else 'off'}",
        f"- exact duplicate removal: {'on' if settings.get('exact_dedup') else 'off'}",
        *([f"- order of the stages: {settings['order']}"] if settings.get("order") else []),
        f"- decontamination (n-gram overlap) against: {', '.join(map(_quote, decont)) if decont else 'none'}",
        "",
        "## Source data and licence",
        "",
        *[f"- {_quote(_redact(p))}" for p in inputs],
        *([f"- on the hub: {', '.join(sources)}"] if sources else []),
        f"- licence: {', '.join(licences) if licences else 'unknown: check the licence of the source data'}",
        *(["- per-document `license` field: " + ", ".join(f"{k} ({v})" for k, v in per_doc.most_common())]
          if per_doc else []),
        "",
        "## Use",
        "",
        "`kept/*.parquet` holds the documents in the FineWeb-Edu schema: the source fields plus `score` (float) and",
        "`int_score` (0-5).",
        "",
        "```python",
        "from datasets import load_dataset",
        "",
        f'ds = load_dataset("{repo_id}", split="train")' if repo_id else
        f'ds = load_dataset("parquet", data_files="{name}/kept/*.parquet", split="train")',
        "```",
        "",
        "## Provenance",
        "",
        "`stats.json` holds the counts and settings, `provenance.json` how this folder was made and the fingerprint of",
        "every input; `edu-filter lineage FOLDER` shows the chain back to the annotations the classifier learnt from.",
        "",
    ]
    return str(DatasetCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))


def write_dataset_card(out_folder: str | os.PathLike, stats: dict, source_license: str | None = None,
                       repo_id: str | None = None) -> Path:
    """Write `OUT/README.md`, the dataset card of an apply output (its settings: stats["settings"]). Call it
    after `record_provenance(OUT, kind="dataset", ...)` so the card can name the classifier's own origin."""
    path = Path(out_folder) / CARD_FILE
    path.write_text(dataset_card(out_folder, stats, source_license, repo_id))
    return path


# --- hub ------------------------------------------------------------------------------------------------------------
# What goes up for each kind of folder: a dataset repository gets the kept documents and the records, not the
# intermediate work/ and logs/ folders or the removed documents.
# (run_config.json is the run's resume record: every input file's local path, size and time, of no use to a reader.)
PUSH_PATTERNS = {"model": None, "dataset": ["kept/**", "README.md", "stats.json", "provenance.json"]}


def check_can_push(repo_id: str) -> None:
    """Fail before any work when an upload cannot happen: bad id, hub offline or unreachable, no or bad token."""
    from huggingface_hub import HfApi, get_token

    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:  # the hub's own rules (no "--" or "..", at most 96 characters...): a name it refuses, after hours of work
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise PushSetupError(f"--push-to-hub {repo_id!r}: not a repository id ORG/NAME or NAME the hub takes "
                             f"({e})") from None
    from edu_filter.classifiers.encoders import hub_offline

    if hub_offline():
        raise PushSetupError(f"--push-to-hub {repo_id}: the Hugging Face hub is offline here (HF_HUB_OFFLINE or "
                        "TRANSFORMERS_OFFLINE is set); unset it to upload, or drop --push-to-hub")
    if get_token() is None:
        raise PushSetupError(f"--push-to-hub {repo_id}: no Hugging Face token; run `hf auth login` or set HF_TOKEN")
    try:
        HfApi().whoami()
    except Exception as e:  # noqa: BLE001 - unreachable, bad token: one line, before any work is done
        raise PushSetupError(f"--push-to-hub {repo_id}: cannot reach the Hugging Face hub with this token "
                        f"({type(e).__name__}: {_first_line(e)})") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "no detail"


def push_to_hub(folder: str | os.PathLike, repo_id: str, repo_type: str = "model") -> str:
    """Upload `folder` to the hub repository `repo_id` (created if needed); returns its URL. Token: the usual
    `hf auth login` or HF_TOKEN. Any failure is a PushError with one line naming the folder."""
    from huggingface_hub import HfApi

    if repo_type not in PUSH_PATTERNS:
        raise ValueError(f"repo_type must be one of {', '.join(PUSH_PATTERNS)}, got {repo_type!r}")
    try:
        check_can_push(repo_id)
    except PushSetupError as e:  # after the work: a failure to report, never a reason to discard the folder
        raise PushError(f"{e}; the folder {folder} is complete") from None
    api = HfApi()
    try:
        url = api.create_repo(repo_id, repo_type=repo_type, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type=repo_type,
                          allow_patterns=PUSH_PATTERNS[repo_type],
                          commit_message=f"Upload {Path(folder).name} with edu-filter {version()}")
    except Exception as e:  # noqa: BLE001 - network, permissions, quota: one line, the folder stays as it is
        # a dataset folder holds removed/, failed/, logs/ and maybe work/ too: `hf upload` of it would publish the
        # documents the filter removed; the finished run, run again, only uploads
        later = ("run the same apply command again (the finished run only uploads)" if repo_type == "dataset"
                 else f"upload it later with `hf upload {repo_id} {folder}`")
        raise PushError(f"cannot push {folder} to {repo_id} ({type(e).__name__}: {_first_line(e)}); the folder is "
                        f"complete: {later}") from None
    return str(url)
