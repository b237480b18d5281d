"""`OUT/stats.json`: documents and tokens in, kept, removed per reason and failed, counted from the output files.

Counting what is actually on disk (rather than adding up step counters) is what makes "adds up" a real check: a
document written twice, or lost, shows up as a mismatch with the number of rows the readers saw.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import orjson
from datatrove.data import DocumentsPipeline
from datatrove.io import get_datafolder
from datatrove.pipeline.base import PipelineStep


def _stat_total(value) -> int:
    return int(value["total"] if isinstance(value, dict) else value)


def rows_read(prepare_logs: str) -> int:
    """Rows the input readers saw, from the prepare stage's per-task datatrove stats."""
    folder = get_datafolder(prepare_logs)
    total = 0
    for name in folder.list_files(subdirectory="stats", glob_pattern="*.json"):
        with folder.open(name, "rt") as fh:
            for step in json.load(fh):
                if "rows_read" in step["stats"]:
                    total += _stat_total(step["stats"]["rows_read"])
    return total


def _count_jsonl(folder) -> tuple[int, int]:
    docs = tokens = 0
    for name in (f for f in folder.list_files(recursive=True) if f.endswith(".jsonl.gz")):
        with folder.open(name, "rb") as raw, gzip.open(raw) as fh:
            for line in fh:
                docs += 1
                tokens += int(orjson.loads(line).get("token_count") or 0)
    return docs, tokens


def _count_parquet(folder) -> tuple[int, int]:
    import pyarrow.parquet as pq

    docs = tokens = 0
    for name in (f for f in folder.list_files(recursive=True) if f.endswith(".parquet")):
        with folder.open(name, "rb") as fh:
            table = pq.read_table(fh, columns=["token_count"])
        docs += table.num_rows
        tokens += int(sum(v for v in table.column("token_count").to_pylist() if v))
    return docs, tokens


def _reason_folders(folder) -> list[str]:
    if not folder.exists(""):
        return []
    return sorted({name.split("/", 1)[0] for name in folder.list_files(recursive=True) if "/" in name})


def count_outputs(output_folder: str) -> dict:
    """{"kept": {"documents", "tokens"}, "removed": {reason: {...}}, "failed": {reason: {...}}} from the files."""
    out = get_datafolder(output_folder)
    kept_docs, kept_tokens = _count_parquet(get_datafolder(out.resolve_paths("kept"))) if out.exists("kept") else (0, 0)
    result = {"kept": {"documents": kept_docs, "tokens": kept_tokens}, "removed": {}, "failed": {}}
    for kind in ("removed", "failed"):
        parent = get_datafolder(out.resolve_paths(kind))
        for reason in _reason_folders(parent):
            docs, tokens = _count_jsonl(get_datafolder(parent.resolve_paths(reason)))
            result[kind][reason] = {"documents": docs, "tokens": tokens}
    return result


def build_stats(output_folder: str, prepare_logs: str, settings: dict) -> dict:
    counts = count_outputs(output_folder)
    out_docs = counts["kept"]["documents"] + sum(
        v["documents"] for kind in ("removed", "failed") for v in counts[kind].values()
    )
    out_tokens = counts["kept"]["tokens"] + sum(
        v["tokens"] for kind in ("removed", "failed") for v in counts[kind].values()
    )
    read = rows_read(prepare_logs)
    return {
        "in": {"documents": read, "tokens": out_tokens},
        **counts,
        "adds_up": read == out_docs,
        "settings": settings,
    }


class WriteApplyStats(PipelineStep):
    """Last stage of `apply` (one task): writes `OUT/stats.json` and fails loudly if the counts do not add up."""

    type = "📊 - STATS"
    name = "📊 apply stats"

    def __init__(self, output_folder: str, prepare_logs: str, settings: dict):
        super().__init__()
        self.output_folder = output_folder
        self.prepare_logs = prepare_logs
        self.settings = settings

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data:
            yield from data
        stats = build_stats(self.output_folder, self.prepare_logs, self.settings)
        with get_datafolder(self.output_folder).open("stats.json", "wt") as fh:
            json.dump(stats, fh, indent=2)
        if not stats["adds_up"]:
            raise RuntimeError(
                f"document counts do not add up: {stats['in']['documents']} read, but kept + removed + failed "
                f"differ; see {Path(str(self.output_folder)) / 'stats.json'}"
            )


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
    table.caption = "counts add up" if stats["adds_up"] else "COUNTS DO NOT ADD UP"
    return table
