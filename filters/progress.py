"""Live progress of an `apply` run, in documents, for any executor.

Every reading step of a task writes `OUT/logs/<stage>/progress/<rank>.json` (documents and bytes read so far, and
whether it finished) every few seconds at first, every 30 s once it has run 10 minutes. The same files serve the
local progress bars, `apply --wait` on Slurm and `edu-filter status OUT`: no executor has to report anything itself,
and a finished run still shows what it did.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import time
from dataclasses import dataclass

from datatrove.io import get_datafolder
from datatrove.pipeline.base import PipelineStep

from edu_filter.documents import PLAIN_PROGRESS_EVERY

WRITE_EVERY_S = 2.0  # a task's first 40 s: the bars move at once (then a 20th of its time so far, up to 30 s)
# a task running for hours: 2,000 running tasks writing every 2 s were 1,000 files a second on the shared filesystem
WRITE_MAX_EVERY_S = 30.0
# a task read to its end and scoring its last windows moves its progress time on at least once a window (minutes on CPUs)
SCORING_TAIL_S = 600.0


def write_interval(running_s: float) -> float:
    """Seconds between two writes of a task's progress file, `running_s` seconds into the task."""
    return min(WRITE_MAX_EVERY_S, max(WRITE_EVERY_S, running_s / 20))


class TaskProgress:
    """Documents and bytes one task has read, and of those how many a later step holds unfinished (`held`: the
    scorer's windows); written to its progress file at most every `write_interval`. The latest made in a process
    is its running task's (`holding`)."""

    def __init__(self, folder: str | None, rank: int, bytes_total: int = 0):
        global _running
        _running = self
        self.folder_path = folder
        self.folder = get_datafolder(folder) if folder else None
        self.rank = rank
        self.documents = 0
        self.held = 0
        self.bytes_total = bytes_total
        self.bytes_done = 0  # bytes of finished files
        self.bytes_current = 0  # position in the file being read
        self.started = time.time()
        self._running_since = time.monotonic()
        self._last_write = 0.0
        self._write(done=False)

    def document(self) -> None:
        self.documents += 1
        if self.documents % 256 == 0:
            now = time.monotonic()
            if now - self._last_write >= write_interval(now - self._running_since):
                self._write(done=False)

    def at_bytes(self, position: int) -> None:
        self.bytes_current = position

    def file_done(self, size: int) -> None:
        self.bytes_done += size
        self.bytes_current = 0

    def close(self) -> None:
        self._write(done=True)

    def _write(self, done: bool) -> None:
        self._last_write = time.monotonic()
        if self.folder is None:
            return
        record = {"documents": self.documents, "held": self.held,
                  "bytes": min(self.bytes_total, self.bytes_done + self.bytes_current),
                  "bytes_total": self.bytes_total, "started": self.started, "updated": time.time(), "done": done}
        with self.folder.open(f"{self.rank:05d}.json", "wt") as fh:
            json.dump(record, fh)


_running: TaskProgress | None = None  # the progress of the task running in this process (tasks run one at a time)


def holding(change: int) -> None:
    """A step took `change` documents of the running task in (or, negative, passed them on): the task's documents/s
    counts those it finished. The scorer holds up to two windows read ahead: a stage's rate was the reader's
    (~480x the scorer's on a CPU) until its first window was scored, and for the whole of a task a window long."""
    if _running is not None:
        _running.held += change


class TaskProgressTime(PipelineStep):
    """The last step of a stage whose reader writes the tasks' progress: moves a task's `updated` time on while its
    last documents go through the later steps, once its reader is done, and once more when the task ends. Scoring
    holds up to two windows of documents after its reader ends (on CPUs, minutes): the stage's docs/s was the
    reader's speed until the stage ended, and stayed so in `status`."""

    name = "⏱ progress time"
    type = "⏱ - PROGRESS"

    def __init__(self, progress_folder: str):
        super().__init__()
        self.progress_folder = progress_folder

    def run(self, data, rank: int = 0, world_size: int = 1):
        started = last = time.monotonic()
        for doc in data or ():
            yield doc
            now = time.monotonic()
            if now - last >= write_interval(now - started):
                self._touch(rank)
                last = now
        self._touch(rank)

    def _touch(self, rank: int) -> None:
        folder, name = get_datafolder(self.progress_folder), f"{rank:05d}.json"
        try:
            with folder.open(name, "rt") as fh:
                record = json.load(fh)
        except (OSError, ValueError):
            return
        if record.get("done"):  # while it reads, the reader writes its own time
            record["updated"] = time.time()
            if _running is not None and (_running.folder_path, _running.rank) == (self.progress_folder, rank):
                record["held"] = _running.held  # this task's (a task run before in this process left its own)
            with folder.open(name, "wt") as fh:
                json.dump(record, fh)


@dataclass
class StageProgress:
    """What the progress and completion files of one stage say right now."""

    name: str
    tasks: int
    tasks_done: int = 0
    documents: int = 0
    bytes: int = 0
    bytes_total: int = 0
    started: float | None = None
    updated: float | None = None
    reading: bool = False  # whether this stage reads documents (signature merging stages do not)
    running_fraction: float = 0.0  # sum over unfinished tasks of the share of their input read
    attempt_documents: int = 0  # documents read since the current attempt began (see `current_attempt`)
    attempt_started: float | None = None

    @property
    def fraction(self) -> float:
        if self.finished:
            return 1.0
        return min(0.99, (self.tasks_done + self.running_fraction) / max(1, self.tasks))

    @property
    def finished(self) -> bool:
        return self.tasks_done >= self.tasks

    finished_at: float | None = None  # when the last task wrote its completion marker

    @property
    def docs_per_second(self) -> float:
        """Documents over the stage's elapsed time, to the last progress any of its tasks wrote (at most
        WRITE_MAX_EVERY_S behind a running one): reading runs ahead of scoring by at most a window, so this is the
        stage's throughput. A stage that stopped (failed, killed, waiting on a resume) keeps its rate instead of
        decaying towards 0, and a copied run folder (file times reset) keeps it too."""
        if not self.attempt_started:
            return 0.0
        end = self.updated or (self.finished_at if self.finished else None) or time.time()
        return self.attempt_documents / max(end - self.attempt_started, 1e-3)


ATTEMPT_GAP_S = 60.0  # no task of the stage read anything for this long: a later task belongs to a new attempt


def current_attempt(records: list[dict]) -> tuple[float | None, int]:
    """(start, documents) of the stage's latest attempt: the tasks that started after the last time no task was
    reading. A run resumed a day after it was killed then shows the rate it runs at, not one diluted by the day."""
    start, documents, covered = None, 0, None
    for record in sorted(records, key=lambda r: r["started"]):
        if covered is None or record["started"] > covered + ATTEMPT_GAP_S:
            start, documents = record["started"], 0
        documents += record["documents"] - record.get("held", 0)  # finished: read, and not still being scored
        covered = max(covered or record["updated"], record["updated"])
    return start, documents


def read_stage_progress(logs: str, name: str, tasks: int, final: dict[str, dict] | None = None) -> StageProgress:
    """What the stage's files say now. `final`, kept by the caller between reads: the progress records of completed
    tasks, which no longer change and are not read again (at 50k tasks, 50k opens per read near a stage's end)."""
    folder = get_datafolder(f"{logs}/{name}")
    stage = StageProgress(name, tasks)
    done: list[str] = []
    if folder.exists("completions"):
        done = folder.list_files(subdirectory="completions")
        stage.tasks_done = len(done)
        if stage.finished and folder.is_local():  # each a stat: only once all are there
            stage.finished_at = max(os.path.getmtime(folder.resolve_paths(name)) for name in done)
    if folder.exists("progress"):
        stage.reading = True
        records = []
        completed = {posixpath.basename(f) for f in done}
        final = {} if final is None else final
        for fname in folder.list_files(subdirectory="progress", glob_pattern="*.json"):
            finished = posixpath.basename(fname).removesuffix(".json") in completed
            if finished:
                record = final.get(fname)
            else:  # its completion gone: run again (--overwrite, say), read again until it completes anew
                final.pop(fname, None)
                record = None
            if record is None:
                try:
                    with folder.open(fname, "rt") as fh:
                        record = json.load(fh)
                except (json.JSONDecodeError, OSError):
                    continue  # being rewritten right now
                if record["done"] and finished:
                    final[fname] = record
            records.append(record)
            stage.documents += record["documents"]
            stage.bytes += record["bytes"]
            stage.bytes_total += record["bytes_total"]
            stage.started = min(stage.started or record["started"], record["started"])
            stage.updated = max(stage.updated or record["updated"], record["updated"])
            # read to its end, a task may still be scoring its last windows (its time moves on while it does); one
            # whose time stopped long ago was killed there, and runs again from its start
            if not finished and record["bytes_total"] and (
                    not record["done"] or time.time() - record["updated"] < SCORING_TAIL_S):
                stage.running_fraction += record["bytes"] / record["bytes_total"]
        stage.attempt_started, stage.attempt_documents = current_attempt(records)
    return stage


def stage_description(stage: StageProgress) -> str:
    if not stage.reading:
        return f"{stage.name}"
    return f"{stage.name}: {stage.documents:,} docs, {stage.docs_per_second:,.1f} docs/s"


class ProgressDisplay:
    """One rich progress bar per stage: documents read so far and docs/s; the bar follows tasks done plus the share
    of their input the running tasks have read. Where the console is no terminal (a Slurm job's output file,
    nohup, tee) a live bar shows nothing until it ends: a plain line per running stage every PLAIN_PROGRESS_EVERY
    seconds instead, and one when a stage finishes."""

    def __init__(self, console, stages: list[tuple[str, int]], logs: str):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.logs = logs
        self.stages = stages
        self.console = console
        self.plain = not console.is_terminal
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[tasks]}"),
                                 TimeElapsedColumn(), console=console, transient=False)
        self.bars = {name: self.progress.add_task(name, total=1.0, tasks=f"0/{tasks} tasks", start=False)
                     for name, tasks in stages}
        self.finished: dict[str, StageProgress] = {}  # read once finished: its files no longer change
        self.final: dict[str, dict[str, dict]] = {name: {} for name, _ in stages}  # of completed tasks
        self.said_at: float = -math.inf  # the last plain lines (monotonic)
        self.said_finished: set[str] = set()

    def __enter__(self):
        if not self.plain:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.refresh()
        return None if self.plain else self.progress.__exit__(*exc)

    def refresh(self) -> list[StageProgress]:
        states = []
        for name, tasks in self.stages:
            stage = self.finished.get(name) or read_stage_progress(self.logs, name, tasks, self.final[name])
            if stage.finished:  # 4 stages of 5,000 tasks were 20,000 opens a second on the shared filesystem
                self.finished[name] = stage
            states.append(stage)
            bar = self.bars[name]
            if stage.started or stage.tasks_done:
                self.progress.start_task(bar)
            self.progress.update(bar, completed=stage.fraction, description=stage_description(stage),
                                 tasks=f"{stage.tasks_done}/{tasks} tasks")
        if self.plain:
            self._say(states)
        return states

    def _say(self, states: list[StageProgress]) -> None:
        """The plain lines: finished stages once, running ones every PLAIN_PROGRESS_EVERY seconds."""
        due = time.monotonic() - self.said_at >= PLAIN_PROGRESS_EVERY
        for stage in states:
            running = not stage.finished and (stage.started or stage.tasks_done)
            if (stage.finished and stage.name not in self.said_finished) or (running and due):
                elapsed = self.progress.tasks[self.bars[stage.name]].elapsed or 0.0
                self.console.print(f"{stage_description(stage)}, {stage.tasks_done}/{stage.tasks} tasks"
                                   f"{', done' if stage.finished else ''} ({_clock(elapsed)})",
                                   soft_wrap=True, highlight=False)
                if stage.finished:
                    self.said_finished.add(stage.name)
        if due:
            self.said_at = time.monotonic()


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"
