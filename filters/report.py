"""`OUT/stats.json`: documents and tokens in, kept, removed per reason and failed, from what the writers wrote.

Every writer of `apply` counts the rows it actually wrote and saves the counts per task
(`OUT/logs/counts/<destination>/<rank>.json`); the reader of the final pass saves how many rows it read. The report
adds up those small files, so it costs nothing at corpus scale, and a document written twice or lost still shows up
as a mismatch with the number of rows read. A rerun task rewrites its own counts files with its own outputs.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from datatrove.data import DocumentsPipeline
from datatrove.io import get_datafolder
from datatrove.pipeline.base import PipelineStep

from edu_filter import documents


def write_counts(counts_folder: str, rank: int, counts: dict[str, list[int]], name: str = "in") -> None:
    """{destination: [documents, tokens]} written by one task's writer `name`."""
    with get_datafolder(counts_folder).open(f"{name}/{rank:05d}.json", "wt") as fh:
        json.dump(counts, fh)


def read_counts(counts_folder: str, counter: str | None = None) -> dict[str, list[int]]:
    """{destination: [documents, tokens]} over every task's count files, or those of one `counter` (a writer's)."""
    folder = get_datafolder(counts_folder)
    totals: dict[str, list[int]] = {}
    if not folder.exists(counter or ""):
        return totals
    for name in folder.list_files(subdirectory=counter or "", recursive=True, glob_pattern="**/*.json"):
        with folder.open(name, "rt") as fh:
            for destination, (docs, tokens) in json.load(fh).items():
                entry = totals.setdefault(destination, [0, 0])
                entry[0] += docs
                entry[1] += tokens
    return totals


def folder_bytes(path: str) -> int:
    """Bytes under a local folder (0 for remote or missing folders, where scratch size is not measured); one stat a
    file (hundreds of thousands of signature files on a shared filesystem)."""
    if "://" in path or not os.path.isdir(path):
        return 0
    total, folders = 0, [path]
    while folders:
        with os.scandir(folders.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    folders.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
    return total


def recorded_scratch(record: str | None) -> int:
    """The scratch size `RecordScratchPeak` recorded in `record`; 0 without one."""
    try:
        return int(json.loads(Path(record).read_text())["peak_scratch_bytes"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def build_stats(counts_folder: str, settings: dict, scratch_bytes: int = 0, extra: dict | None = None) -> dict:
    from edu_filter.provenance import redacted

    counts = read_counts(counts_folder)
    read = counts.pop("in", [0, 0])[0]
    result = {"kept": {"documents": 0, "tokens": 0}, "removed": {}, "failed": {}}
    for destination, (docs, tokens) in sorted(counts.items()):
        if destination == "kept":
            result["kept"] = {"documents": docs, "tokens": tokens}
        else:
            kind, reason = destination.split("/", 1)
            result[kind][reason] = {"documents": docs, "tokens": tokens}
    if "duplicate" in result["removed"]:  # exact (python-edu) and near duplicates apart: one writer counts each
        kinds = {kind: read_counts(counts_folder, f"duplicate-{kind}").get("removed/duplicate")
                 for kind in ("exact", "near")}
        result["removed"]["duplicate"]["by_kind"] = {kind: {"documents": n[0], "tokens": n[1]}
                                                     for kind, n in kinds.items() if n}
    out_docs = result["kept"]["documents"] + sum(
        v["documents"] for kind in ("removed", "failed") for v in result[kind].values()
    )
    out_tokens = result["kept"]["tokens"] + sum(
        v["tokens"] for kind in ("removed", "failed") for v in result[kind].values()
    )
    return {
        "in": {"documents": read, "tokens": out_tokens},
        **result,
        "adds_up": read == out_docs,
        "peak_scratch_bytes": scratch_bytes,
        **(extra or {}),
        # an input URL's credentials (user:pass@, a presigned signature) stay out: stats.json goes up with the dataset
        "settings": redacted(settings),
    }


def incomplete_stages(output_folder: str) -> list[str]:
    """'name (done/tasks)' of every stage before the report whose completion files are not all there: counts that
    add up prove nothing about a task that never ran, since it never read anything either."""
    from edu_filter.filters.executors import load_stage_list

    out = get_datafolder(output_folder)
    missing = []
    for name, tasks in load_stage_list(output_folder)[:-1]:
        folder = f"logs/{name}/completions"
        done = len(out.list_files(subdirectory=folder)) if out.exists(folder) else 0
        if done < tasks:
            missing.append(f"{name} ({done}/{tasks})")
    return missing


def write_stats_json(folder, record: dict) -> None:
    """stats.json as a kill cannot leave it half-written (an object store's upload is whole already)."""
    if folder.is_local():
        documents.write_json_whole(folder.resolve_paths("stats.json"), record)
        return
    with folder.open("stats.json", "wt") as fh:
        json.dump(record, fh, indent=2)


class WriteApplyStats(PipelineStep):
    """Last stage of `apply` (one task): writes `OUT/stats.json`, fails loudly if the counts do not add up, and then
    deletes the scratch folder (signatures, intermediate files) unless `keep_work`."""

    type = "📊 - STATS"
    name = "📊 apply stats"

    def __init__(self, output_folder: str, settings: dict, keep_work: bool = False, extra_folder: str | None = None,
                 provenance_inputs: list[dict] | None = None, command: str | None = None,
                 listing_grace_s: float | None = None, scratch_record: str | None = None):
        super().__init__()
        self.scratch_record = scratch_record  # what `RecordScratchPeak` measured before signatures were deleted
        self.output_folder = output_folder
        self.listing_grace_s = listing_grace_s  # None: executors.COMPLETED_GRACE_S
        self.settings = settings
        self.keep_work = keep_work
        self.extra_folder = extra_folder  # small JSON files merged into stats.json (e.g. the keep-top cutoff)
        self.provenance_inputs = provenance_inputs  # fingerprinted by the submitting process when it read them
        self.command = command

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data:
            yield from data
        out = get_datafolder(self.output_folder)
        from edu_filter.filters.executors import COMPLETED_GRACE_S, after_listing_grace

        # the last tasks finished on other nodes a moment ago: their completion files may show here late
        grace = COMPLETED_GRACE_S if self.listing_grace_s is None else self.listing_grace_s
        incomplete = after_listing_grace(lambda: incomplete_stages(self.output_folder), grace=grace,
                                         every=min(5.0, max(grace / 10, 0.01)))
        if incomplete:
            raise RuntimeError(
                f"stage(s) {', '.join(incomplete)} did not complete, yet the report stage ran (a Slurm array job "
                "that never ran its tasks, or ranks rewritten under a queued run): run the same command again to "
                "finish them; no stats.json is written and the scratch folder is kept")
        work = out.resolve_paths("work")
        previous = {}
        if out.exists("stats.json"):  # a rerun after the scratch folder was already deleted keeps the measurement
            try:
                with out.open("stats.json", "rt") as fh:
                    previous = json.load(fh)
            except ValueError:  # cut short by a kill while an older edu-filter wrote it in place: rebuilt below
                previous = {}
        # a step pickled by an older edu-filter has no scratch_record
        scratch = max(folder_bytes(work), previous.get("peak_scratch_bytes", 0),
                      recorded_scratch(getattr(self, "scratch_record", None)))
        extra = {}
        if self.extra_folder and get_datafolder(self.extra_folder).exists(""):
            folder = get_datafolder(self.extra_folder)
            for name in folder.list_files(glob_pattern="*.json"):
                with folder.open(name, "rt") as fh:
                    extra.update(json.load(fh))
        stats = build_stats(out.resolve_paths("logs/counts"), self.settings, scratch, extra)
        write_stats_json(out, stats)
        if not stats["adds_up"]:
            raise RuntimeError(
                f"document counts do not add up: {stats['in']['documents']} read, but kept + removed + failed "
                f"differ; see {Path(str(self.output_folder)) / 'stats.json'}"
            )
        if self.provenance_inputs is not None and out.is_local():
            from edu_filter import provenance

            provenance.record_provenance(self.output_folder, kind="dataset", settings=self.settings,
                                         inputs=self.provenance_inputs, command=self.command)
            provenance.write_dataset_card(self.output_folder, stats)
        if not self.keep_work and out.exists("work"):
            if out.is_local():
                shutil.rmtree(work, ignore_errors=True)
            else:
                out.rm("work", recursive=True)


def stats_table(stats: dict):
    """A rich table of stats.json: one row per destination, with shares of the input."""
    from rich.table import Table

    n_docs = max(1, stats["in"]["documents"])
    n_tokens = max(1, stats["in"]["tokens"])
    table = Table(title="edu-filter apply")
    for col in ("", "documents", "%", "tokens", "% tokens"):
        table.add_column(col, justify="left" if not col else "right")

    def row(label, v, style=None):
        table.add_row(label, f"{v['documents']:,}", f"{100 * v['documents'] / n_docs:.1f}", f"{v['tokens']:,}",
                      f"{100 * v['tokens'] / n_tokens:.1f}", style=style)

    row("in", stats["in"], style="bold")
    row("kept", stats["kept"], style="green")
    for kind in ("removed", "failed"):
        for reason, v in stats[kind].items():
            row(f"{kind}/{reason}", v, style="red" if kind == "failed" else None)
            for sub, n in v.get("by_kind", {}).items() if len(v.get("by_kind", {})) > 1 else ():
                row(f"  {sub}", n, style="dim")
    table.caption = "counts add up" if stats["adds_up"] else "COUNTS DO NOT ADD UP"
    return documents.unclipped(table)
