"""`apply --preset fineweb-edu` at scale: per-stage speed, peak memory and disk, against datatrove's stock MinHash stage.

For each size in `--sizes` the script builds a corpus from the bundled FineWeb documents, runs the real CLI on it

    edu-filter apply CORPUS -o OUT --preset fineweb-edu --model FASTTEXT --tasks 8 --workers 2

in a subprocess, and reports per stage docs/s and MB/s per core, the peak RSS of the whole process tree, the peak
disk usage under OUT, where every document ended up, and how many planted near-duplicate groups collapsed. At the
sizes in `--stock-sizes` it then times datatrove's stock `MinhashDedupSignature` stage alone on the same corpus with
the same tasks and workers (a `LocalPipelineExecutor` of `[JsonlReader, MinhashDedupSignature]`, FineWeb settings),
and prints the ratio of the whole `apply` to it.

    python benchmarks/bench_scale.py --quick                   # 2k documents, stock stage included (~2 minutes)
    python benchmarks/bench_scale.py                           # 4k and 40k, stock stage at 40k (~12 minutes)
    python benchmarks/bench_scale.py --sizes 4000,40000,400000 # + 400k (~30 minutes more on 2 cores; the stock
                                                               #   stage is not timed there: it would take ~1 hour)

The corpus: every bundled FineWeb document (2,000, labelled 0-4 by Llama-3-70B) is split into paragraphs, long ones
cut at sentence ends into pieces of at most 600 characters. Each synthetic document draws a label with the
frequencies of the originals and is filled with random pieces of originals with that label until ~3.4 KB, so it
reads like the originals of its label and no two documents share more than a piece or two. 8% of the
documents are planted near-copies: groups of one base document and 1-3 copies with light word edits (one word in a
hundred replaced, deleted or inserted; at least two); half the groups are based on documents with label >= 3 so
that enough groups pass the threshold and reach MinHash (`apply` scores first with fastText). The corpus is written
as `--files` JSONL shards (default: one per task) and kept under `--workdir` for later runs.

The classifier is fastText trained on the bundled training file (`train_classifier(..., method="fasttext")`, once per
workdir). Its calibrated cut for int_score 3 is liberal: about half the documents pass (FineWeb-Edu keeps ~8% of
FineWeb), so MinHash sees a larger share of the corpus than it would on FineWeb. The CLI runs with
`HF_HUB_OFFLINE=1`: nothing waits on the network while timed (offline, token_count counts all-MiniLM-L6-v2 tokens
instead of GPT-2's).

How the figures are computed:

* stage wall: from the earliest start of its tasks (first line of `OUT/logs/<stage>/logs/task_*.log`) to the last
  completion file (`OUT/logs/<stage>/completions/*` mtime). The rest of the total is in three rows: `startup` (the
  CLI's launch to the first task: imports, checks, fingerprints, starting the first worker pool), `between stages`
  (starting each next pool) and `end` (last completion to the CLI's exit).
* stage CPU: the process tree (the CLI and every descendant: pool workers, the multiprocessing manager) is sampled
  every 0.25 s; the CPU seconds each process used since the previous sample go to the stage running then (the first
  stage whose completion files are not all there; `startup` before the stage list is written, `end` after the last
  completion), so starting a stage's pool counts for that stage. A process's last <0.25 s before it exits is not
  seen; the total CPU row is the sum over stages.
* docs: documents the stage read (`OUT/logs/<stage>/progress/*.json`); stages that read no documents (buckets,
  cluster) are credited the documents of the stage before them (the signatures of those documents).
* MB: text megabytes (UTF-8 of the `text` field) of those documents: docs x the corpus's mean text bytes (documents
  are built to a near-constant size).
* docs/s = docs / stage wall; MB/s per core = MB / stage CPU seconds (so other load on the machine does not count).
* peak RSS: the largest sum of RSS over the process tree in one sample (pages shared between processes count once
  per process), overall and per stage (samples taken while it ran); peak disk: the largest sum of file sizes under OUT in one sample (every 0.5 s), the stats' own
  `peak_scratch_bytes` beside it.
* other load: CPU the rest of the machine used during the run, in cores (system-wide busy time minus the tree's).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import orjson
import psutil

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data" / "web"
SOURCES = ("fineweb_edu_llama3_train.jsonl", "fineweb_edu_llama3_val.jsonl")
CORPUS_VERSION = 1  # bump when the corpus recipe changes: cached corpora are rebuilt
MAX_PIECE_CHARS = 600
FILL_TO_CHARS = 3250  # pieces are added until the text is at least this long: ~3.4 KB documents on average
COPY_SHARE = 0.08  # share of the corpus that is planted near-copies
SAMPLE_S = 0.25


# ---------------------------------------------------------------------------------------------------------------
# the corpus


def split_piece(paragraph: str) -> list[str]:
    """A paragraph as pieces of at most MAX_PIECE_CHARS, cut at sentence ends (at a word when a sentence is longer)."""
    if len(paragraph) <= MAX_PIECE_CHARS:
        return [paragraph]
    pieces, current = [], ""
    for sentence in re.split(r"(?<=[.!?])\s+", paragraph):
        while len(sentence) > MAX_PIECE_CHARS:
            cut = sentence.rfind(" ", 0, MAX_PIECE_CHARS)
            cut = cut if cut > 0 else MAX_PIECE_CHARS
            pieces.append(sentence[:cut])
            sentence = sentence[cut:].strip()
        if current and len(current) + 1 + len(sentence) > MAX_PIECE_CHARS:
            pieces.append(current)
            current = sentence
        else:
            current = f"{current} {sentence}" if current else sentence
    if current:
        pieces.append(current)
    return pieces


def load_pieces() -> tuple[dict[int, list[str]], dict[int, int]]:
    """{label: pieces of the originals with that label} and {label: number of originals}."""
    pieces: dict[int, list[str]] = {}
    originals: Counter = Counter()
    for name in SOURCES:
        for line in (DATA / name).read_text().splitlines():
            row = json.loads(line)
            label = int(row["score"])
            originals[label] += 1
            for paragraph in row["text"].split("\n"):
                if paragraph.strip():
                    pieces.setdefault(label, []).extend(split_piece(paragraph.strip()))
    return pieces, dict(originals)


def near_copy(text: str, rng: random.Random) -> str:
    """One word in a hundred (at least two) replaced, deleted or inserted."""
    words = text.split(" ")
    for _ in range(max(2, len(words) // 100)):
        i = rng.randrange(len(words))
        kind = rng.choice(["replace", "delete", "insert"])
        if kind == "replace":
            words[i] = rng.choice(["indeed", "however", "Moreover,", "2024", "notably"])
        elif kind == "delete" and len(words) > 1:
            del words[i]
        else:
            words.insert(i, rng.choice(["really", "also", "(see below)", "in fact"]))
    return " ".join(words)


def build_corpus(folder: Path, n_docs: int, n_files: int, seed: int = 0) -> dict:
    """Writes `n_docs` documents as `n_files` JSONL shards plus `planted.json`; returns the corpus description."""
    meta_path = folder / "corpus.json"
    wanted = {"version": CORPUS_VERSION, "documents": n_docs, "files": n_files, "seed": seed}
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if {k: meta.get(k) for k in wanted} == wanted:
            return meta
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "jsonl").mkdir(parents=True)
    rng = random.Random(seed)
    pieces, originals = load_pieces()
    labels = sorted(originals)
    weights = [originals[label] for label in labels]

    # the planted groups: sizes first, so that the unique documents plus the copies make exactly n_docs
    copies_per_group = []
    while sum(copies_per_group) < COPY_SHARE * n_docs:
        copies_per_group.append(rng.randint(1, 3))
    n_unique = n_docs - sum(copies_per_group)

    docs: list[tuple[str, str, int]] = []  # (id, text, label)
    for i in range(n_unique):
        label = rng.choices(labels, weights)[0]
        chosen, length = [], 0
        while length < FILL_TO_CHARS:
            piece = rng.choice(pieces[label])
            chosen.append(piece)
            length += len(piece) + 1
        docs.append((f"d{i:07d}", "\n".join(chosen), label))

    high = [d for d in docs if d[2] >= 3]
    low = [d for d in docs if d[2] < 3]
    n_high = min(len(high), len(copies_per_group) // 2)
    bases = rng.sample(high, n_high) + rng.sample(low, len(copies_per_group) - n_high)
    groups = []
    for (base_id, text, label), n_copies in zip(bases, copies_per_group):
        group = [base_id]
        for j in range(1, n_copies + 1):
            docs.append((f"{base_id}-copy{j}", near_copy(text, rng), label))
            group.append(f"{base_id}-copy{j}")
        groups.append(group)

    rng.shuffle(docs)
    text_bytes = json_bytes = 0
    per_file = -(-len(docs) // n_files)
    for f in range(n_files):
        with open(folder / "jsonl" / f"part-{f:05d}.jsonl", "wb") as fh:
            for doc_id, text, _ in docs[f * per_file : (f + 1) * per_file]:
                line = orjson.dumps({"id": doc_id, "text": text}) + b"\n"
                fh.write(line)
                text_bytes += len(text.encode())
                json_bytes += len(line)
    (folder / "planted.json").write_text(json.dumps(groups))
    meta = {**wanted, "text_bytes": text_bytes, "input_bytes": json_bytes, "groups": len(groups),
            "planted_copies": sum(copies_per_group),
            "label_shares": {str(k): round(v / n_docs, 4) for k, v in sorted(Counter(d[2] for d in docs).items())}}
    meta_path.write_text(json.dumps(meta, indent=2))
    return meta


# ---------------------------------------------------------------------------------------------------------------
# watching a process tree


def stage_of_apply(out: Path):
    """A function naming the apply stage running now: the first one whose completion files are not all there."""
    stages: list = []

    def current() -> str:
        if not stages:
            path = out / "logs" / "stages.json"
            if not path.exists():
                return "startup"
            try:
                stages.extend((s["name"], s["tasks"]) for s in json.loads(path.read_text()))
            except (json.JSONDecodeError, OSError):
                return "startup"
        for name, tasks in stages:
            done = out / "logs" / name / "completions"
            if not done.exists() or len(os.listdir(done)) < tasks:
                return name
        return "end"

    return current


def folder_size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:
                pass  # deleted while we looked
    return total


class TreeMonitor(threading.Thread):
    """Samples a process and all its descendants: summed RSS, CPU seconds per stage, and the size of a folder."""

    def __init__(self, pid: int, stage_of=lambda: "run", folder: Path | None = None):
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.stage_of = stage_of
        self.folder = folder
        self.peak_rss = 0
        self.peak_rss_by_stage: dict[str, int] = {}
        self.peak_disk = 0
        self.cpu_by_stage: Counter = Counter()
        self.tree_cpu = 0.0
        self._seen: dict[tuple[int, float], float] = {}  # (pid, create time) -> CPU seconds at the last sample
        self._done = threading.Event()
        self._busy_start = self._machine_busy()

    @staticmethod
    def _machine_busy() -> float:
        t = psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0)

    def sample(self, with_disk: bool) -> None:
        stage = self.stage_of()
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        rss = 0
        for p in procs:
            try:
                with p.oneshot():
                    rss += p.memory_info().rss
                    cpu = p.cpu_times()
                    key = (p.pid, p.create_time())
            except psutil.NoSuchProcess:
                continue
            used = cpu.user + cpu.system
            delta = used - self._seen.get(key, 0.0)
            self._seen[key] = used
            self.cpu_by_stage[stage] += delta
            self.tree_cpu += delta
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_rss_by_stage[stage] = max(self.peak_rss_by_stage.get(stage, 0), rss)
        if with_disk and self.folder is not None:
            self.peak_disk = max(self.peak_disk, folder_size(self.folder))

    def run(self) -> None:
        n = 0
        while not self._done.is_set():
            self.sample(with_disk=n % 2 == 0)
            n += 1
            self._done.wait(SAMPLE_S)

    def stop(self) -> float:
        """Stops sampling; returns the CPU seconds the rest of the machine used meanwhile."""
        self._done.set()
        self.join()
        return max(0.0, self._machine_busy() - self._busy_start - self.tree_cpu)


def run_watched(cmd: list[str], log: Path, stage_of=lambda: "run", folder: Path | None = None) -> dict:
    """Runs `cmd` (stdout and stderr to `log`) while a TreeMonitor samples it."""
    start = time.time()
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "120"})
        monitor = TreeMonitor(proc.pid, stage_of, folder)
        monitor.start()
        rc = proc.wait()
    wall = time.time() - start
    other_cpu = monitor.stop()
    if rc != 0:
        sys.exit(f"{' '.join(cmd)} failed with exit code {rc}; its output: {log}\n"
                 + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
    return {"start": start, "wall_s": wall, "peak_rss": monitor.peak_rss,
            "peak_rss_by_stage": monitor.peak_rss_by_stage, "peak_disk": monitor.peak_disk,
            "cpu_by_stage": dict(monitor.cpu_by_stage), "tree_cpu_s": monitor.tree_cpu,
            "other_load_cores": other_cpu / wall}


# ---------------------------------------------------------------------------------------------------------------
# the two runs: apply through the CLI, and the stock signature stage alone


def train_fasttext(folder: Path) -> Path:
    from dataclasses import fields

    from edu_filter.train.classifier import ClassifierTrainConfig, train_classifier

    model = folder / "fasttext-web"
    if not (model / "fasttext_config.json").exists():
        # only the classifier: no learning curve (a dozen more fastText fits) where training offers one
        extra = {"learning_curve": False} if "learning_curve" in {f.name for f in fields(ClassifierTrainConfig)} else {}
        train_classifier([str(DATA / SOURCES[0])], model, kind="web", method="fasttext", **extra)
    return model


def run_apply(corpus: Path, out: Path, model: Path, tasks: int, workers: int, log: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cli = Path(sys.executable).parent / "edu-filter"
    cmd = [str(cli) if cli.exists() else "edu-filter", "apply", str(corpus), "-o", str(out), "--preset",
           "fineweb-edu", "--model", str(model), "--tasks", str(tasks), "--workers", str(workers)]
    return run_watched(cmd, log, stage_of_apply(out), folder=out)


def run_stock(corpus: Path, logs: Path, tasks: int, workers: int, log: Path) -> dict:
    """datatrove's stock MinHash signature stage alone, in its own process (this script with --stock-stage)."""
    shutil.rmtree(logs, ignore_errors=True)
    cmd = [sys.executable, __file__, "--stock-stage", str(corpus), str(logs), str(tasks), str(workers)]
    result = run_watched(cmd, log, folder=logs / "sigs")
    shutil.rmtree(logs, ignore_errors=True)
    return result


def stock_stage(corpus: str, logs: str, tasks: int, workers: int) -> None:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import MinhashDedupSignature
    from datatrove.pipeline.readers import JsonlReader
    from edu_filter.filters.dedup import check_hashing, fineweb_minhash_config

    check_hashing()
    LocalPipelineExecutor([
        JsonlReader(corpus),
        MinhashDedupSignature(f"{logs}/sigs", config=fineweb_minhash_config()),
    ], tasks=tasks, workers=workers, logging_dir=f"{logs}/logs").run()


# ---------------------------------------------------------------------------------------------------------------
# reading an apply output


def log_start(path: Path) -> float | None:
    """When a task started: the timestamp on the first line of its datatrove log."""
    with open(path, errors="replace") as fh:
        first = fh.readline()
    try:
        return datetime.strptime(first[:23], "%Y-%m-%d %H:%M:%S.%f").timestamp()
    except ValueError:
        return None


def stage_figures(out: Path, run: dict, text_bytes_per_doc: float) -> list[dict]:
    """One row per stage, then the time outside the stages (see the module docstring for each figure)."""
    rows, docs_before, previous_end = [], 0, run["start"]
    gaps = {"startup": 0.0, "between stages": 0.0}
    for stage in json.loads((out / "logs" / "stages.json").read_text()):
        folder = out / "logs" / stage["name"]
        starts = [s for s in (log_start(p) for p in (folder / "logs").glob("task_*.log")) if s is not None]
        end = max(p.stat().st_mtime for p in (folder / "completions").glob("*"))
        progress = [json.loads(p.read_text()) for p in (folder / "progress").glob("*.json")]
        if progress:
            docs = docs_before = sum(r["documents"] for r in progress)
        else:  # bucket and cluster stages work on the signatures of the documents read before them
            docs = docs_before if stage["name"].startswith(("minhash-", "exact-")) else 0
        start = min(starts)
        gaps["startup" if not rows else "between stages"] += start - previous_end
        previous_end = end
        wall, cpu, mb = end - start, run["cpu_by_stage"].get(stage["name"], 0.0), docs * text_bytes_per_doc / 1e6
        rows.append({"stage": stage["name"], "tasks": stage["tasks"], "docs": docs, "mb": mb, "wall_s": wall,
                     "cpu_s": cpu, "docs_per_s": docs / wall if docs and wall else 0.0,
                     "mb_per_s_core": mb / cpu if docs and cpu else 0.0, "steps": step_times(folder),
                     "peak_rss": run["peak_rss_by_stage"].get(stage["name"], 0)})
    gaps["end"] = run["start"] + run["wall_s"] - previous_end
    for name, wall in gaps.items():  # CPU between stages (starting the next pool) counts for the next stage
        rows.append({"stage": name, "tasks": 0, "docs": 0, "mb": 0.0, "wall_s": wall, "docs_per_s": 0.0,
                     "cpu_s": run["cpu_by_stage"].get(name, 0.0), "mb_per_s_core": 0.0, "steps": {},
                     "peak_rss": run["peak_rss_by_stage"].get(name, 0)})
    return rows


def step_times(stage_folder: Path) -> dict[str, float]:
    """Seconds spent in each pipeline step, summed over tasks (datatrove's own stats of the stage)."""
    path = stage_folder / "stats.json"
    if not path.exists():
        return {}
    return {s["name"].split(": ", 1)[-1]: s["time_stats"]["total"] for s in json.loads(path.read_text())
            if isinstance(s.get("time_stats"), dict)}


def where_documents_went(out: Path) -> dict[str, list[str]]:
    """{document id: [every place it was written]}: kept/, removed/<reason>/, failed/<reason>/."""
    import pyarrow.parquet as pq

    places: dict[str, list[str]] = {}
    for path in sorted((out / "kept").glob("*.parquet")):
        for doc_id in pq.read_table(path, columns=["id"]).column("id").to_pylist():
            places.setdefault(doc_id, []).append("kept")
    for kind in ("removed", "failed"):
        for path in sorted((out / kind).rglob("*.jsonl.gz")):
            reason = f"{kind}/{path.relative_to(out / kind).parts[0]}"
            with gzip.open(path, "rb") as fh:
                for line in fh:
                    places.setdefault(orjson.loads(line)["id"], []).append(reason)
    return places


def check_output(out: Path, corpus: Path, meta: dict) -> dict:
    """Every document in exactly one place, and the planted near-duplicate groups collapsed to one kept member."""
    places = where_documents_went(out)
    ids = []
    for path in sorted((corpus / "jsonl").glob("*.jsonl")):
        with open(path, "rb") as fh:
            ids.extend(orjson.loads(line)["id"] for line in fh)
    missing = sum(1 for i in ids if i not in places)
    twice = sum(1 for p in places.values() if len(p) > 1)
    strangers = len(set(places) - set(ids))
    passed = ("kept", "removed/duplicate")  # score-first: what passed the threshold reached MinHash
    groups = json.loads((corpus / "planted.json").read_text())
    eligible = collapsed = 0
    members = {i for g in groups for i in g}
    for group in groups:
        destinations = [places.get(i, ["missing"])[0] for i in group]
        if sum(d in passed for d in destinations) >= 2:
            eligible += 1
            collapsed += destinations.count("kept") == 1
    unplanted_removed = sum(1 for i, p in places.items() if p[0] == "removed/duplicate" and i not in members)
    stats = json.loads((out / "stats.json").read_text())
    return {"documents": len(ids), "missing": missing, "written_twice": twice, "unknown_ids": strangers,
            "one_place": missing == 0 and twice == 0 and strangers == 0 and stats["adds_up"],
            "destinations": dict(Counter(p[0] for p in places.values())),
            "groups": len(groups), "groups_reaching_dedup": eligible, "groups_collapsed": collapsed,
            "collapsed_share": collapsed / eligible if eligible else float("nan"),
            "unplanted_removed_as_duplicate": unplanted_removed,
            "peak_scratch_bytes": stats.get("peak_scratch_bytes", 0)}


# ---------------------------------------------------------------------------------------------------------------
# reporting


def print_report(results: list[dict], args) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    for res in results:
        meta = res["corpus"]
        table = Table(title=f"apply --preset fineweb-edu, {meta['documents']:,} documents "
                            f"({meta['input_bytes'] / 1e6:.0f} MB JSONL, {meta['text_bytes'] / 1e6:.0f} MB text), "
                            f"--tasks {args.tasks} --workers {args.workers}")
        for col in ("stage", "tasks", "docs", "text MB", "wall s", "CPU s", "docs/s", "MB/s per core", "% of wall",
                    "peak RSS MiB"):
            table.add_column(col, justify="left" if col == "stage" else "right")
        for r in res["stages"]:
            table.add_row(r["stage"], str(r["tasks"] or ""), f"{r['docs']:,}" if r["docs"] else "",
                          f"{r['mb']:.1f}" if r["mb"] else "", f"{r['wall_s']:.1f}", f"{r['cpu_s']:.1f}",
                          f"{r['docs_per_s']:,.0f}" if r["docs_per_s"] else "",
                          f"{r['mb_per_s_core']:.2f}" if r["mb_per_s_core"] else "",
                          f"{100 * r['wall_s'] / res['apply']['wall_s']:.0f}",
                          f"{r['peak_rss'] / 2**20:,.0f}" if r["peak_rss"] else "")
        a = res["apply"]
        table.add_row("apply, total", "", f"{meta['documents']:,}", f"{meta['text_bytes'] / 1e6:.1f}",
                      f"{a['wall_s']:.1f}", f"{a['tree_cpu_s']:.1f}", f"{meta['documents'] / a['wall_s']:,.0f}",
                      f"{meta['text_bytes'] / 1e6 / a['tree_cpu_s']:.2f}", "100", f"{a['peak_rss'] / 2**20:,.0f}",
                      style="bold")
        if res.get("stock"):
            s = res["stock"]
            table.add_row("stock MinhashDedupSignature alone", str(args.tasks), f"{meta['documents']:,}",
                          f"{meta['text_bytes'] / 1e6:.1f}", f"{s['wall_s']:.1f}", f"{s['tree_cpu_s']:.1f}",
                          f"{meta['documents'] / s['wall_s']:,.0f}",
                          f"{meta['text_bytes'] / 1e6 / s['tree_cpu_s']:.2f}", "", f"{s['peak_rss'] / 2**20:,.0f}",
                          style="yellow")
        console.print(table)
        for r in res["stages"]:
            if sum(r["steps"].values()) > 0.1 * r["wall_s"] > 0:  # datatrove times steps, not reading or loading
                console.print(f"  {r['stage']}: seconds in each step over all tasks (datatrove's stats): "
                              + ", ".join(f"{name} {t:.1f}" for name, t in
                                          sorted(r["steps"].items(), key=lambda kv: -kv[1]) if t >= 0.05),
                              soft_wrap=True)
        c = res["check"]
        console.print(f"  destinations: {c['destinations']}; every document in exactly one place: {c['one_place']} "
                      f"(missing {c['missing']}, twice {c['written_twice']}, unknown {c['unknown_ids']}); planted "
                      f"groups with >= 2 members past the threshold: {c['groups_reaching_dedup']} of {c['groups']}, "
                      f"collapsed to one kept member: {c['groups_collapsed']} ({100 * c['collapsed_share']:.1f}%); "
                      f"other documents removed as duplicates: {c['unplanted_removed_as_duplicate']}", soft_wrap=True)
        console.print(f"  peak RSS (process tree) {a['peak_rss'] / 2**20:,.0f} MiB; peak disk under OUT "
                      f"{a['peak_disk'] / 1e6:,.1f} MB = {a['peak_disk'] / meta['input_bytes']:.2f}x the input "
                      f"(stats.json peak scratch {c['peak_scratch_bytes'] / 1e6:,.1f} MB); other load on the machine "
                      f"{a['other_load_cores']:.2f} cores during apply"
                      + (f", {res['stock']['other_load_cores']:.2f} during the stock stage" if res.get("stock") else ""),
                      soft_wrap=True)

    summary = Table(title="scale summary (baselines measured in this run)")
    for col in ("documents", "apply s", "stock stage s", "apply/stock", "apply/stock CPU", "peak RSS MiB",
                "RSS / smallest", "disk / input", "groups collapsed", "one place"):
        summary.add_column(col, justify="right")
    smallest = results[0]["apply"]["peak_rss"]
    for res in results:
        a, s, c = res["apply"], res.get("stock"), res["check"]
        summary.add_row(f"{res['corpus']['documents']:,}", f"{a['wall_s']:.1f}", f"{s['wall_s']:.1f}" if s else "-",
                        f"{a['wall_s'] / s['wall_s']:.2f}" if s else "-",
                        f"{a['tree_cpu_s'] / s['tree_cpu_s']:.2f}" if s else "-", f"{a['peak_rss'] / 2**20:,.0f}",
                        f"{a['peak_rss'] / smallest:.2f}x",
                        f"{a['peak_disk'] / res['corpus']['input_bytes']:.2f}x",
                        f"{100 * c['collapsed_share']:.1f}%", str(c["one_place"]))
    console.print(summary)
    by_size = {r["corpus"]["documents"]: r["apply"]["wall_s"] for r in results}
    for big, small in ((400_000, 40_000), (40_000, 4_000)):
        if big in by_size and small in by_size:
            console.print(f"apply time {big:,} / {small:,} documents: {by_size[big] / by_size[small]:.2f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="4000,40000", help="corpus sizes in documents, comma-separated")
    parser.add_argument("--stock-sizes", default="40000",
                        help="sizes at which the stock signature stage is timed too ('' for none)")
    parser.add_argument("--quick", action="store_true", help="2,000 documents, stock stage included (~2 minutes)")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--files", type=int, default=None, help="JSONL shards per corpus (default: --tasks)")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "edu_filter_bench_scale"),
                        help="corpora (kept for later runs), outputs and logs")
    parser.add_argument("--keep-outputs", action="store_true", help="keep each run's OUT folder")
    parser.add_argument("--stock-stage", nargs=4, help=argparse.SUPPRESS)  # internal: run the stock stage here
    args = parser.parse_args()
    if args.stock_stage:
        corpus, logs, tasks, workers = args.stock_stage
        stock_stage(corpus, logs, int(tasks), int(workers))
        return
    if args.quick:
        args.sizes, args.stock_sizes = "2000", "2000"
    sizes = [int(s) for s in args.sizes.split(",") if s]
    stock_sizes = {int(s) for s in args.stock_sizes.split(",") if s}
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model = train_fasttext(work)

    results = []
    for n in sizes:
        corpus = work / f"corpus-{n}"
        t = time.time()
        meta = build_corpus(corpus, n, args.files or args.tasks)
        print(f"{n:,} documents: {meta['input_bytes'] / 1e6:.1f} MB JSONL in {corpus} ({time.time() - t:.0f} s); "
              f"{meta['groups']} planted groups, {meta['planted_copies']} near-copies", flush=True)
        out = work / f"out-{n}"
        run = run_apply(corpus / "jsonl", out, model, args.tasks, args.workers, work / f"apply-{n}.log")
        print(f"  apply: {run['wall_s']:.1f} s, peak RSS {run['peak_rss'] / 2**20:,.0f} MiB", flush=True)
        res = {"corpus": meta, "apply": run, "stages": stage_figures(out, run, meta["text_bytes"] / n),
               "check": check_output(out, corpus, meta)}
        if n in stock_sizes:
            res["stock"] = run_stock(corpus / "jsonl", work / f"stock-{n}", args.tasks, args.workers,
                                     work / f"stock-{n}.log")
            print(f"  stock MinhashDedupSignature: {res['stock']['wall_s']:.1f} s", flush=True)
        if not args.keep_outputs:
            shutil.rmtree(out, ignore_errors=True)
        results.append(res)
        (work / "results.json").write_text(json.dumps(results, indent=2))
    print_report(results, args)
    print(f"figures saved in {work / 'results.json'}")


if __name__ == "__main__":
    main()
