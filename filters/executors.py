"""Running the stages of `apply`: here (datatrove's local or Ray executor) or on Slurm, with progress in documents.

Slurm defaults follow what people expect of a cluster: no array throttle unless `--workers` is given, jobs run in
the Python environment that submitted them, absolute log paths, and a request that no node of the partition can
satisfy is refused before anything is submitted. `--wait` and `edu-filter status OUT` read the same progress and
completion files for every executor, plus `squeue` on Slurm.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import getpass
import hashlib
import json
import math
import os
import posixpath
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import datatrove.executor.ray as datatrove_ray
from datatrove.executor import LocalPipelineExecutor
from datatrove.io import get_datafolder
from datatrove.utils.logging import logger
from rich.markup import escape

from edu_filter.documents import DocumentError, InputError, RunError, unclipped, write_json_whole
from edu_filter.filters.io import drop_finished_task_scratch
from edu_filter.filters.progress import ProgressDisplay, read_stage_progress
from edu_filter.filters.scoring import TASK_SLOT_ENV

POLL_S = 1.0
REMOTE_TASKS_CHECK_S = 60.0  # how often a Ray run asks the other nodes whether their tasks' processes still run
# how often a Ray run reads the running/ files for this machine's tasks: they are every node's, on a shared file
# system (thousands opened each second otherwise); a local run reads its few every POLL_S
RAY_LOCAL_TASKS_CHECK_S = 10.0
KILLED_TASK_GRACE_S = 10.0  # how long a local stage whose task process is gone may take to end on its own
RAY_STOP_POLL_S = 2.0  # how often a Ray stage's waits look whether the run is stopping
RAY_STOP_S = 60.0  # how long a stopping Ray run waits for its stage to kill its tasks and free their resources
SQUEUE_ATTEMPTS, SQUEUE_RETRY_S = 5, 2.0
SQUEUE_TIMEOUT_S = 60  # a controller that takes longer to answer a ping is taken as not answering
SQUEUE_MAX_INTERVAL_S = 30.0  # --wait asks squeue at least this often once it has followed a chain for minutes
# how long --wait follows a chain by its files alone while Slurm does not answer (a controller restarted, failing over
# or upgraded): the jobs run on meanwhile, and the files tell when the chain is done
SLURM_SILENT_MAX_S = 3600.0
PROGRESS_MAX_INTERVAL_S = 10.0  # --wait reads the running stage's progress files at least this often
# squeue reasons that never resolve by waiting
HOPELESS_REASONS = ("PartitionConfig", "DependencyNeverSatisfied", "BadConstraints", "PartitionNodeLimit",
                    "PartitionTimeLimit", "InvalidQOS", "InvalidAccount", "QOSMaxCpuPerJobLimit",
                    "QOSMaxMemoryPerJob", "AssocMaxCpuPerJobLimit")  # not JobHeldAdmin: an admin may release it
# the states of a job not ended (squeue's default listing)
QUEUED_STATES = ("PENDING,RUNNING,SUSPENDED,COMPLETING,CONFIGURING,RESIZING,REQUEUED,REQUEUE_FED,REQUEUE_HOLD,"
                 "RESV_DEL_HOLD,SIGNALING,STAGE_OUT,STOPPED")
# what to lower when a QOS's or an association's limit on one job is below what the chain's jobs ask
PER_JOB_LIMITS = {"WallDuration": "--slurm-time (and --slurm-gpu-time, --slurm-cluster-time)", "Cpu": "--slurm-cpus",
                  "Mem": "--slurm-mem-gb", "GRES": "--slurm-gpus", "TRES": "--slurm-cpus, --slurm-mem-gb or "
                  "--slurm-gpus", "Node": "the nodes each job asks (--slurm-arg)"}


PARTITION_LIMITS = {"PartitionTimeLimit": "lower --slurm-time (and --slurm-gpu-time, --slurm-cluster-time) to its "
                                          "MaxTime",
                    "PartitionNodeLimit": "its nodes per job (MaxNodes, MinNodes) do not allow one node"}


def slurm_seconds(text: str) -> int | None:
    """Seconds of a Slurm time (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS); None for no limit (infinite,
    UNLIMITED) or what is not one (sbatch says what it makes of it)."""
    days, _, clock = text.strip().rpartition("-")
    parts = clock.split(":")
    if not all(p.isdigit() for p in parts) or (days and not days.isdigit()) or len(parts) > 3:
        return None
    numbers = [int(p) for p in parts]
    if days:  # D-HH, D-HH:MM, D-HH:MM:SS
        hours, minutes, seconds = (numbers + [0, 0])[:3]
    elif len(numbers) == 3:  # HH:MM:SS
        hours, minutes, seconds = numbers
    else:  # MM, MM:SS
        hours, minutes, seconds = 0, numbers[0], (numbers + [0])[1]
    return ((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds


def held(job: dict) -> bool:
    """A job Slurm holds: it never starts until released (`scontrol release`), and the chain waits on it. A job
    whose launch failed on a node is requeued held ("launch failed requeued held"); a user or an admin may hold one
    (JobHeldUser, JobHeldAdmin)."""
    return job["state"] == "REQUEUE_HOLD" or (job["state"] == "PENDING" and "held" in job["reason"].lower())


def never_starts(reason: str) -> str | None:
    """Why a job pending for `reason` never starts by waiting, and what to change; None where waiting may do. A
    QOS's or association's limit per job (`QOSMaxWallDurationPerJobLimit`, `AssocMaxGRESPerJob`, `QOSMinCpu...`)
    leaves a job pending forever where the QOS does not deny it at submission; limits per user or group free up."""
    if reason in PARTITION_LIMITS:
        return f"Slurm says {reason}, a limit of the partition on each job: {PARTITION_LIMITS[reason]}"
    if reason in HOPELESS_REASONS:
        return f"Slurm says {reason}"
    if re.fullmatch(r"(QOS|Assoc)Max\w*PerJob\w*|QOSMin\w+", reason):
        lower = next((v for k, v in PER_JOB_LIMITS.items() if k in reason), "the job's request")
        return (f"Slurm says {reason}, a limit on each job of the QOS or account that the jobs ask "
                f"{'less' if reason.startswith('QOSMin') else 'more'} than: change {lower}")
    return None


class StageFailed(RuntimeError):
    """A stage ended with tasks that did not complete; the message names the stage and a log to read."""


def save_stage_list(out: str, stages) -> None:
    path = Path(out) / "logs" / "stages.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_whole(path, [{"name": s.name, "tasks": s.tasks, "scores": s.scores} for s in stages])


def load_stage_list(out: str) -> list[tuple[str, int]]:
    folder = get_datafolder(str(out))
    if not folder.exists("logs/stages.json"):
        raise DocumentError(f"{out} holds no apply run (no logs/stages.json)")
    try:
        with folder.open("logs/stages.json", "rt") as fh:
            return [(s["name"], int(s["tasks"])) for s in json.load(fh)]
    except (ValueError, TypeError, KeyError) as e:
        raise DocumentError(f"{out}/logs/stages.json is not the stage list apply writes ({type(e).__name__}: {e}); "
                            "run the same apply command again to rewrite it") from None


def scoring_on_gpu(executor: str, slurm, ray_opts=None) -> bool:
    if executor == "slurm":
        return slurm.gpus_per_task > 0
    if executor == "ray":
        if ray_opts is not None and ray_opts.gpus is not None:
            return ray_opts.gpus > 0
        import ray

        return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
    import torch

    return torch.cuda.is_available()


def cpu_threads_per_task(executor: str, workers: int, slurm, ray) -> int:
    """Torch threads of a scoring task: the CPUs the scheduler gives it, or locally a share of this machine's."""
    if executor == "slurm":
        return slurm.scoring_cpus
    if executor == "ray":
        return ray.scoring_cpus
    from edu_filter.classifiers.device import default_num_threads

    return max(1, default_num_threads() // max(1, workers))


# what Slurm writes in a job's log (lower-cased) when it stops the job itself, and what to do about it
SLURM_KILLS = (
    ("due to time limit", "Slurm stopped it at its time limit: run it again with a longer --slurm-time"),
    *((marker, "it ran out of memory (killed by Slurm): run it again with more --slurm-mem-gb")
      for marker in ("oom-kill", "oom_kill", "out-of-memory", "exceeded memory limit", "exceeded job memory limit",
                     "exceeded step memory limit", "exceeded virtual memory limit")),
    ("due to node failure", "its node failed: run the same command again"),
    ("due to preemption", "it was preempted: run the same command again"),
    # last: Slurm's own kills above say "CANCELLED AT ... DUE TO ..." too
    ("cancelled at", "it was cancelled (scancel, by you or an administrator): run the same command again to resume"),
)
CANCELLED = "its jobs were cancelled (scancel, by you or an administrator): run the same command again to resume"
SUBMITTED_JOBS = "slurm/jobs.json"  # every array job id of the current submission, per stage
SUBMITTED_ARRAYS = "slurm/arrays.json"  # how the submission's array tasks map to ranks (datatrove's max_array_size)


def submitted_jobs(out: str) -> dict[str, list[str]]:
    """Array job ids per stage; a run folder written before jobs.json held lists gives its one id per stage."""
    path = Path(out) / SUBMITTED_JOBS
    try:
        jobs = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError) as e:  # written whole since; an empty one (a full disk) was a bare JSON error
        raise RunError(f"{path} cannot be read ({e}): its jobs are not known here; `squeue --me` lists them") from None
    return {name: [str(j) for j in (ids if isinstance(ids, list) else [ids]) if j not in (None, -1)]
            for name, ids in jobs.items()}


def _incomplete_array_tasks(stage_logs: Path, job_ids: list[str]) -> set[tuple[str, str]] | None:
    """(array job id, array index) of the submitted array tasks that ran a rank without completing it, as datatrove
    maps them (index + max_array_size x the job's RUN_OFFSET, into ranks_to_run.json); None when the run folder does
    not say (written before arrays.json)."""
    try:
        arrays = json.loads((stage_logs.parents[1] / SUBMITTED_ARRAYS).read_text())[stage_logs.name]
        ranks = json.loads((stage_logs / "ranks_to_run.json").read_text())
    except (OSError, ValueError, KeyError):
        return None
    done = {p.name for p in (stage_logs / "completions").glob("*")}
    per_job, size = arrays["tasks_per_job"], arrays["max_array_size"]
    tasks = set()
    for slot in range(math.ceil(len(ranks) / per_job)):
        if any(f"{r:05d}" not in done for r in ranks[slot * per_job:(slot + 1) * per_job]):
            offset, index = divmod(slot, size)
            if offset < len(job_ids):
                tasks.add((job_ids[offset], str(index)))
    return tasks


def slurm_kill(stage_logs: Path, job_ids: list[str]) -> tuple[str, Path] | None:
    """Slurm's own reason for stopping a job of this stage (time limit, memory, node failure, preemption) and the
    job log that says so, from the logs of the given array jobs only (`%A_%a.out`: the current submission's), and
    of those only tasks whose ranks did not complete (a task preempted, requeued and then done says nothing about
    another one that raised)."""
    folder = stage_logs / "slurm_logs"
    if not job_ids or not folder.is_dir():
        return None
    said = {log: [ln.lower() for ln in log.read_text(errors="replace").splitlines() if "slurmstepd" in ln]
            for log in _incomplete_task_logs(stage_logs, job_ids)}
    for marker, meaning in SLURM_KILLS:  # in their order: a time limit in one log before a cancel in another
        for log, lines in said.items():
            if any(marker in ln for ln in lines):
                return (meaning.replace("--slurm-mem-gb", memory_flag(stage_logs.name, "slurm"))
                        .replace("--slurm-time", time_flag(stage_logs)), log)
    return None


def _incomplete_task_logs(stage_logs: Path, job_ids: list[str]) -> list[Path]:
    """Slurm's logs (`%A_%a.out`) of the given array jobs' tasks whose ranks did not complete (all of the given
    jobs' logs where the run folder does not say which), in name order."""
    incomplete = _incomplete_array_tasks(stage_logs, job_ids)
    logs = []
    for log in sorted((stage_logs / "slurm_logs").glob("*.out")):
        job, _, index = log.stem.partition("_")
        if job in job_ids and (incomplete is None or (job, index) in incomplete):
            logs.append(log)
    return logs


def cancelled_by_slurm_state(job_ids: list[str]) -> bool:
    """Whether Slurm still holds a CANCELLED state for one of these jobs: tasks cancelled before they started leave no
    log to say so. Asked only where no task's log says why it failed: Slurm also cancels the jobs waiting on one
    that failed (kill_invalid_depend)."""
    return bool(job_ids) and "CANCELLED" in (ended_job_states(job_ids) or ())


CLUSTER_STAGE = "minhash-cluster"  # its one task has its own memory and time options


def time_flag(stage_logs: Path) -> str:
    """The option that sets the time limit of a Slurm task of the stage logging in `stage_logs`."""
    if stage_logs.name == CLUSTER_STAGE:
        return "--slurm-cluster-time"
    try:  # the stage list beside the stages' logs says which score (from before it did: none)
        stages = json.loads((stage_logs.parent / "stages.json").read_text())
    except (OSError, ValueError):
        stages = []
    scores = any(s.get("name") == stage_logs.name and s.get("scores") for s in stages if isinstance(s, dict))
    return "--slurm-gpu-time" if scores else "--slurm-time"


def memory_flag(stage: str, executor: str) -> str:
    """The option that sizes a task of `stage`'s memory."""
    return f"--{executor}-{'cluster-' if stage == CLUSTER_STAGE else ''}mem-gb"


def task_log(out: str, stage: str, rank: int) -> Path:
    return Path(out) / "logs" / stage / "logs" / f"task_{rank:05d}.log"


def _log_has_error(log: Path) -> bool:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return False
    return "Traceback" in text or "| ERROR" in text


def failed_stage_message(out: str, name: str, tasks: int, slurm: bool = False, lost: str | None = None) -> str:
    """Names the stage, the tasks that did not complete and the first one's log with its last error line, or, for a
    Slurm chain (`slurm`), Slurm's own reason when Slurm stopped one of its jobs (a time limit, say), with what to
    change; `lost`: why Ray lost a task's worker (`ray_lost_worker`), said instead of the log's last line."""
    logs = Path(out) / "logs" / name
    done = {p.name for p in (logs / "completions").glob("*")} if (logs / "completions").exists() else set()
    missing = [r for r in range(tasks) if f"{r:05d}" not in done]
    shown = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
    jobs = submitted_jobs(out).get(name, []) if slurm else []
    killed = slurm_kill(logs, jobs) if slurm and missing else None
    if killed is not None:
        return (f"stage {name} failed ({len(missing)}/{tasks} tasks did not complete: {shown}): {killed[0]} (it "
                f"resumes: finished tasks are kept); log: {killed[1]}")
    if lost is not None:
        return f"stage {name} failed ({len(missing)}/{tasks} tasks did not complete: {shown}): {lost}; logs: {logs}"
    # the first missing task whose log holds an error: a task that raised stops the others, which leave logs too
    failing = next((r for r in missing if _log_has_error(task_log(out, name, r))), None)
    if failing is None and slurm and missing and cancelled_by_slurm_state(jobs):
        return (f"stage {name} failed ({len(missing)}/{tasks} tasks did not complete: {shown}): {CANCELLED} (finished "
                f"tasks are kept); logs: {logs / 'slurm_logs'}")
    failing = failing if failing is not None else (missing[0] if missing else None)
    log = task_log(out, name, failing) if failing is not None else logs
    if missing and not log.is_file() and (logs / "slurm_logs").is_dir():
        # the task never started its own log (Slurm killed it, or it never ran): Slurm's log of its job says why (a
        # log of a task that completed said a progress line)
        slurm_logs = sorted(_incomplete_task_logs(logs, jobs) if jobs else (logs / "slurm_logs").glob("*.out"),
                            key=lambda p: p.stat().st_mtime)
        log = next((p for p in reversed(slurm_logs) if "error" in p.read_text(errors="replace").lower()),
                   slurm_logs[-1] if slurm_logs else logs / "slurm_logs")
    error = last_error_line(log) if log.is_file() else ""
    detail = f": {error}" if error else ""
    return (f"stage {name} failed ({len(missing)}/{tasks} tasks did not complete: {shown}); log: {log}{detail}"
            f"{low_space_note([out, tempfile.gettempdir()])}")


LOW_SPACE_BYTES = 64 * 2**20  # free space below which a failed stage says its disk may be why


def low_space_note(folders: Iterable[str | os.PathLike]) -> str:
    """"; FOLDER's filesystem has N bytes free ..." for each of `folders` on a disk all but full: a full disk fails
    every task, and their logs, on the same disk, end mid-traceback, naming no error ("Traceback (most recent call
    last):" was all a failed stage said)."""
    notes, seen = [], set()
    for folder in folders:
        try:
            device, usage = os.stat(folder).st_dev, shutil.disk_usage(folder)
        except OSError:
            continue
        if device not in seen and usage.free < LOW_SPACE_BYTES:
            notes.append(f"{folder}'s filesystem has {usage.free:,} bytes free")
        seen.add(device)
    if not notes:
        return ""
    return f"; {' and '.join(notes)}: a full disk fails every task (free space, then run the same command again)"


def last_error_line(log: Path) -> str:
    """The last line of a task's log naming an error (else its last line), cut to 300 characters."""
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if "ERROR" in ln or "Error" in ln or "Traceback" in ln]
    return (errors[-1] if errors else lines[-1])[-300:] if lines else ""


FAILED_TASK_LOGS_READ = 64  # `status` looks for an error in the logs of this many unfinished tasks at most


def failed_task(out: str, name: str, tasks: int) -> str | None:
    """`status`'s reason for a stage nothing runs any more: the first unfinished task whose log holds an error, with
    that error and the log (a run that failed read "incomplete", as one merely stopped)."""
    done = {p.name for p in (Path(out) / "logs" / name / "completions").glob("*")}
    missing = [r for r in range(tasks) if f"{r:05d}" not in done][:FAILED_TASK_LOGS_READ]
    failing = next((r for r in missing if _log_has_error(task_log(out, name, r))), None)
    if failing is None:
        return None
    log = task_log(out, name, failing)
    return f"failed: task {failing}: {last_error_line(log)} (log: {log})"


# ---------------------------------------------------------------------------------------------------------------
# here: local processes or Ray


@contextlib.contextmanager
def logs_to_file(path: Path, verbose: bool):
    """datatrove's per-task INFO logs (and any library chatter) go to `path` instead of the terminal; the progress
    display keeps writing to the real terminal through a duplicate of it."""
    if verbose:
        yield sys.stderr
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    terminal = os.fdopen(os.dup(saved), "w", buffering=1)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 2)
    try:
        yield terminal
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        terminal.close()


def check_ray_request(opts) -> None:
    if opts.cpus_per_task < 1 or (opts.gpu_cpus_per_task is not None and opts.gpu_cpus_per_task < 1):
        raise ValueError("--ray-cpus and --ray-gpu-cpus must be >= 1")
    for value, flag in ((opts.mem_gb, "--ray-mem-gb"), (opts.cluster_mem_gb, "--ray-cluster-mem-gb")):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1")
    if opts.gpus not in (None, 0, 1):  # the scoring step runs one model on one device
        raise InputError(f"--ray-gpus {opts.gpus}: a scoring task scores on one GPU; give 0 or 1 (default: 1 where "
                         "the cluster has GPUs)")


def refuse_unreachable_ray() -> None:
    """Refuses at once, saying why, a Ray cluster this run cannot join. `ray.init` would print one line a second for
    20 s and then say only "Failed to connect", whether nothing listens at the address (a stale address file of a
    crashed `ray start`) or the cluster refuses this driver for want of its token. Only the address ray.init would
    join is asked (RAY_ADDRESS, else the last `ray start` on this machine); a Ray without these internals is not."""
    import socket

    try:
        from ray._private.services import canonicalize_bootstrap_address
        from ray._raylet import GcsClient
        from ray.exceptions import AuthenticationError
    except ImportError:
        return
    try:
        address = canonicalize_bootstrap_address(os.environ.get("RAY_ADDRESS"))
    except (ValueError, ConnectionError):  # a Ray Client address (ray://), or `auto` with no cluster: left to
        return  # ray.init, which says what it makes of them
    if address is None:  # none to join: ray.init starts a local instance
        return
    named = "RAY_ADDRESS" if os.environ.get("RAY_ADDRESS") else "the address the last `ray start` here left"
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except (ValueError, OverflowError):  # not host:port after all: left to ray.init
        return
    except OSError as e:
        raise RunError(f"no Ray cluster answers at {address} ({named}): {e}. Start one (`ray start --head`), set "
                       "RAY_ADDRESS to a running cluster's, or `ray stop` to forget a crashed one and run on a new "
                       "local instance") from None
    try:
        GcsClient(address=address).cluster_id  # noqa: B018 - asking for it is the handshake that checks the token
    except AuthenticationError:
        raise RunError(f"the Ray cluster at {address} ({named}) refused this run's authentication token (none, "
                       "or not the cluster's): run with RAY_AUTH_MODE=token and the cluster's token in ~/.ray/auth_token "
                       "or RAY_AUTH_TOKEN (`ray get-auth-token` on the head node prints it); `ray start` turns token "
                       "authentication on unless RAY_AUTH_MODE=disabled") from None
    except Exception:  # noqa: BLE001 - anything else (another service on that port, a Ray version apart) is ray.init's
        return


def connect_ray(opts, verbose: bool = False) -> list[str]:
    """Connects to the Ray cluster unless this process already is (ray.init's rules: RAY_ADDRESS, else the last
    `ray start` on this machine, else a new local instance), says which on stderr, and warns (on stderr; also
    returned) when no live node has the CPUs or the memory a task asks: on a fixed cluster the tasks would wait
    forever, while an autoscaling one may still add such a node, so this is not refused."""
    check_ray_request(opts)
    import ray

    if not ray.is_initialized():
        refuse_unreachable_ray()
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=verbose)
    nodes = [n["Resources"] for n in live_ray_nodes()]
    warnings = ray_request_warnings(opts, nodes)
    total = {k: sum(int(r.get(k, 0)) for r in nodes) for k in ("CPU", "GPU")}
    print(f"Ray cluster at {ray.get_runtime_context().gcs_address}: {len(nodes)} live node"
          f"{'s' * (len(nodes) != 1)}, {total['CPU']} CPUs, {total['GPU']} GPUs", file=sys.stderr)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return warnings


def live_ray_nodes() -> list[dict]:
    """The nodes of the connected Ray cluster that are up (ray.nodes() lists dead ones too)."""
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def ray_nodes_not_seeing(path: str, timeout_s: float = 120.0) -> list[str]:
    """The addresses of the live Ray nodes on which `path` does not exist, asked by a task on each node (no CPU
    asked, so a busy node answers too); a node that does not answer within `timeout_s` is not counted."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0, max_retries=0)
    def sees(folder: str) -> bool:
        return os.path.exists(folder)

    nodes = live_ray_nodes()
    asked = [sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(path)
             for n in nodes]
    # one wait for all of them: asked one after another, k nodes that do not answer held the run k x timeout_s
    answered, _ = ray.wait(asked, num_returns=len(asked), timeout=timeout_s) if asked else ([], [])
    answered = set(answered)
    missing = []
    for node, answer in zip(nodes, asked):
        try:
            if answer not in answered:
                raise TimeoutError
            if not ray.get(answer, timeout=0):
                missing.append(node["NodeManagerAddress"])
        except Exception:  # noqa: BLE001 - a node that cannot answer now (busy, leaving): not counted
            ray.cancel(answer, force=True)
    return missing


def refuse_unshared_ray_output(output: str) -> None:
    """On a cluster of several nodes, every node must see the output folder: tasks on a node with its own disk
    wrote their files there, and the run failed hours later (the first stage's merge) saying only that tasks "did
    not complete". A folder on an object store (s3://, gs://) is seen through fsspec and not asked about."""
    if "://" in output or len(live_ray_nodes()) < 2:
        return
    missing = ray_nodes_not_seeing(os.path.abspath(os.path.join(output, "run_config.json")))
    if missing:
        raise InputError(f"-o/--output {output} is not seen from Ray node(s) {', '.join(missing[:5])}"
                         f"{' ...' if len(missing) > 5 else ''}: every node writes its tasks' files there, so it must "
                         "be on a filesystem every node mounts at the same path (or an object store, s3://...)")


def ray_request_warnings(opts, nodes: list[dict]) -> list[str]:
    """What no live node (`nodes`: their resources, as ray.nodes() gives them) can give a task now: on a fixed
    cluster the tasks would wait forever, while an autoscaling one may still add such a node."""
    gpu_nodes = [r for r in nodes if r.get("GPU", 0) >= 1]
    scoring_option = "--ray-gpu-cpus" if opts.gpu_cpus_per_task else "--ray-cpus"
    wait = "so the tasks wait until one joins (an autoscaler may add it; on a fixed cluster, stop and lower"
    warnings = []
    if opts.gpus and not gpu_nodes:
        warnings.append("--ray-gpus 1: no live Ray node has a GPU now, so the scoring tasks wait until one joins (an "
                        "autoscaler may add it; on a fixed cluster, stop and leave --ray-gpus out)")
    scoring_nodes = nodes if opts.gpus == 0 else (gpu_nodes or nodes)
    for cpus, option, fitting in ((opts.cpus_per_task, "--ray-cpus", nodes),
                                  (opts.scoring_cpus, scoring_option, scoring_nodes)):
        where = "GPU node" if fitting is gpu_nodes else "node"
        most = max((int(r.get("CPU", 0)) for r in fitting), default=0)
        memory, most_gb = opts.memory_gb(cpus), max((r.get("memory", 0) / 2**30 for r in fitting), default=0)
        asked = f"--ray-mem-gb {memory}" if opts.mem_gb else f"{memory} GB for a {cpus}-CPU task (2 per CPU)"
        for short, warning in ((cpus > most, f"{option} {cpus}: no live Ray {where} has more than {most} CPUs now, "
                                             f"{wait} {option})"),
                               (memory > most_gb, f"{asked}: no live Ray {where} has more than {most_gb:.1f} GB of "
                                                  f"memory for tasks now, {wait} --ray-mem-gb)")):
            if short and warning not in warnings:  # the scoring task may ask what the others ask
                warnings.append(warning)
    most_gb = max((r.get("memory", 0) / 2**30 for r in nodes), default=0)
    if opts.cluster_mem_gb and opts.cluster_mem_gb > most_gb:
        warnings.append(f"--ray-cluster-mem-gb {opts.cluster_mem_gb}: no live Ray node has more than {most_gb:.1f} GB "
                        f"of memory for tasks now, {wait} --ray-cluster-mem-gb)")
    return warnings


def _executor_here(stage, logs: str, executor: str, workers: int | None, ray=None):
    """`workers`: tasks at once (None on Ray: all of the stage's, as the cluster's resources allow)."""
    if executor == "ray":
        gpus = 1 if stage.gpu and scoring_on_gpu("ray", None, ray) else 0  # fastText scores on CPUs
        at_once = min(workers or stage.tasks, stage.tasks)
        cpus = ray.scoring_cpus if stage.scores else ray.cpus_per_task
        return WatchedRayExecutor(stage.pipeline, tasks=stage.tasks, workers=at_once, logging_dir=f"{logs}/{stage.name}",
                                  mem_per_cpu_gb=ray.memory_gb(cpus, stage.clusters) / cpus,
                                  gpus_per_task=gpus, cpus_per_task=cpus)
    return WatchedLocalExecutor(stage.pipeline, tasks=stage.tasks, workers=min(workers, stage.tasks),
                                logging_dir=f"{logs}/{stage.name}")


@contextlib.contextmanager
def running_marker(logging_dir, rank: int):
    """`running/RANK` holding "PID HOST START" while the task runs in this process; ended, finished or raising, the
    file goes: only a killed process leaves it behind, which `killed_task` and `status` see."""
    marker = f"running/{rank:05d}"
    with logging_dir.open(marker, "wt") as fh:
        fh.write(f"{os.getpid()} {socket.gethostname()} {process_start(os.getpid()) or ''}".rstrip())
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):  # a rerun's start cleared it meanwhile
            logging_dir.rm(marker)


class TaskMarker(NamedTuple):
    """A `running/` file read: the task `rank` runs in process `pid` of machine `host`, started at `started`
    (`process_start`'s; None in an older file: "PID HOST", or "PID" alone, written on this machine)."""
    rank: int
    pid: int
    host: str | None
    name: str
    started: str | None = None


def task_markers(folder) -> list[TaskMarker]:
    """The `running/` files of a stage's logging folder, read; a file removed meanwhile or being written is left
    out."""
    markers = []
    for name in folder.list_files("running"):
        try:
            with folder.open(name, "rt") as fh:
                pid, *rest = fh.read().split()
            markers.append(TaskMarker(int(posixpath.basename(name)), int(pid), rest[0] if rest else None, name,
                                      rest[1] if len(rest) > 1 else None))
        except (OSError, ValueError):
            continue
    return markers


def forget_killed(logging_dir) -> None:
    """Removes the `running/` files a killed earlier run left, before anyone watches this run's (`refuse_live_tasks`
    first)."""
    refuse_live_tasks(logging_dir)
    for name in logging_dir.list_files("running"):
        with contextlib.suppress(FileNotFoundError):
            logging_dir.rm(name)


def refuse_tasks_left_running(out: Path) -> None:
    """`refuse_live_tasks` of every stage of the run in `out`, before `--overwrite` removes its logs: the markers
    went with them, and the workers a run killed alone left went on writing into the new run's output."""
    for running in sorted((Path(out) / "logs").glob("*/running")):
        refuse_live_tasks(get_datafolder(str(running.parent)))


def refuse_live_tasks(logging_dir) -> None:
    """A task of an earlier run still running on this machine (its run killed alone, its workers left) stops this
    one: both would write the task's files at once. One naming this process is an earlier run's (no task of this one
    has started): in a container each run is process 1, and a file of the previous release names no start time."""
    here = socket.gethostname()
    for marker in task_markers(logging_dir):
        if marker.host in (None, here) and marker.pid != os.getpid() and _runs_python(marker.pid, marker.started):
            stage = posixpath.basename(logging_dir.path.rstrip("/"))
            raise RunError(f"task {marker.rank} of stage {stage} is still running in process {marker.pid}, left by "
                           f"an earlier run of this output that was stopped alone: stop it (kill {marker.pid}) or "
                           "let it finish, then run the same command again")


def _runs_python(pid: int, started: str | None = None) -> bool:
    """Whether process `pid` (started at `started`, where known) lives and runs Python (a task's worker, not another
    program given its id since)."""
    if _process_gone(pid, started):
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return b"python" in fh.read().lower()
    except OSError:
        return False


def stop_local_tasks(logs: str, stage: str) -> None:
    """Kills the processes running `stage`'s tasks on this machine (their `running/` files say which): the run is
    stopping, and datatrove's workers would otherwise finish their tasks unwatched, while a rerun ran them again. A
    task run in this process (one worker) ends with it, through its cleanup."""
    here = socket.gethostname()
    for marker in task_markers(get_datafolder(f"{logs}/{stage}")):
        if marker.host in (None, here) and marker.pid != os.getpid() and _runs_python(marker.pid, marker.started):
            with contextlib.suppress(OSError):
                os.kill(marker.pid, signal.SIGKILL)


@contextlib.contextmanager
def stopped_by_signals():
    """SIGTERM and SIGHUP (`kill`, a batch system, a closed terminal) end a run as Ctrl-C does, through its cleanup:
    by default they ended the process alone, its workers running on. Only where signals can be set (the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


_process_slot: tuple[int, int] | None = None  # (process id, worker slot) of this pool process


def _end_with_parent(parent: int | None) -> None:
    """In a manager process: end when the thread that started it ends (Linux's parent-death signal), its parent
    killed included; where the parent is gone already, now. `parent`: the process that forked or spawned it; None
    for a fork server's child (the server ends with the run, and the manager with it)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if parent is not None and os.getppid() != parent:
        os._exit(0)


class _ManagersEndingWithTheRun:
    """`multiprocess` for datatrove's local executor, whose `Manager()` server process ends with the run: with the
    run killed (`kill -9`, the out-of-memory killer) it stayed, ~230 MB a killed run, until killed by hand."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name: str):
        return getattr(self._module, name)

    def Manager(self):  # noqa: N802 - multiprocess's name
        from multiprocess.managers import SyncManager

        context = self._module.get_context()
        manager = SyncManager(ctx=context)
        manager.start(_end_with_parent, (None if context.get_start_method() == "forkserver" else os.getpid(),))
        return manager


class WatchedLocalExecutor(LocalPipelineExecutor):
    """datatrove's local executor, each task leaving its process id in `running/RANK` while it runs. A task whose
    process is killed (the kernel's out-of-memory killer, most often) leaves the file behind, which `killed_task`
    sees; datatrove's process pool alone would wait for that task's result forever, the run hanging silently."""

    def run(self):
        import datatrove.executor.local as datatrove_local

        made_by_datatrove = datatrove_local.multiprocess
        datatrove_local.multiprocess = _ManagersEndingWithTheRun(made_by_datatrove)
        try:
            return super().run()
        finally:
            datatrove_local.multiprocess = made_by_datatrove

    def _launch_run_for_rank(self, rank: int, ranks_q, completed=None, completed_lock=None):
        """datatrove's, but a process takes a worker slot with its first task and keeps it: handed back after each
        task, slots moved between processes that finished at once, and a process's CUDA context and cached memory
        stayed on a GPU that another process then scored on."""
        global _process_slot
        with running_marker(self.logging_dir, rank):
            if _process_slot is None or _process_slot[0] != os.getpid():  # a forked process inherits the global
                _process_slot = (os.getpid(), ranks_q.get())
            try:
                return self._run_for_rank(rank, _process_slot[1])
            finally:
                if completed and completed_lock:
                    with completed_lock:
                        completed.value += 1
                        logger.info(f"{completed.value}/{self.world_size} tasks completed.")

    def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1):
        """Runs the task with its worker slot (0 to workers - 1, held by no other running task) in TASK_SLOT_ENV:
        the scorer's GPU on a machine with several. Restored after it: with one worker the task runs in the run's own
        process, whose later pipelines (and the processes they start) took the slot for theirs."""
        before = os.environ.get(TASK_SLOT_ENV)
        os.environ[TASK_SLOT_ENV] = str(local_rank)
        try:
            stats = super()._run_for_rank(rank, local_rank, node_rank)
            drop_finished_task_scratch(self, rank)
            return stats
        finally:
            if before is None:
                os.environ.pop(TASK_SLOT_ENV, None)
            else:
                os.environ[TASK_SLOT_ENV] = before


class RayRunStopping(RuntimeError):
    """The run is stopping (Ctrl-C, SIGTERM, a killed task): the stage's tasks are stopped, none is started."""


class WatchedRayTaskManager(datatrove_ray.RayTaskManager):
    """datatrove's Ray task manager, keeping the last error of each rank's Ray task (`errors`), failing a task
    whose start fails (its actor killed by Ray's memory monitor, or its node lost, before the task runs), and
    stopping the stage once `stopping` is set: datatrove waited for every queued task to get its resources and run
    before the driver could exit (forever, where no node can take one), the stage running on after Ctrl-C."""

    def __init__(self, *args, errors: dict[int, BaseException], stopping: threading.Event | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.errors = errors
        self.stopping = stopping or threading.Event()

    def wait(self, tasks, timeout: int = 0, num_returns: int = 1):
        """datatrove's, at most RAY_STOP_POLL_S at a time; raises RayRunStopping once the run stops (datatrove's
        clean-up then kills the running tasks' actors and frees their placement groups)."""
        if self.stopping.is_set():
            raise RayRunStopping("the run is stopping")
        return super().wait(tasks, timeout=min(timeout, RAY_STOP_POLL_S), num_returns=num_returns)

    def submit_task(self, executor_ref, ranks_to_submit: list[int], remote_options: dict) -> Future:
        """datatrove's, but where starting the task raises, the task's placement group and actors are removed and
        its future fails. datatrove left the future unset, so the run waited for it forever, and the placement group
        holding its CPUs, so the next tasks could not start either."""
        import ray

        submitted: Future = Future()

        def start() -> None:
            group, workers = None, []
            try:
                bundle = datatrove_ray.convert_remote_options_to_bundle(remote_options)
                group = ray.util.placement_group([bundle] * self.nodes_per_task)
                while not group.wait(timeout_seconds=RAY_STOP_POLL_S):  # resources for it: until the run stops
                    if self.stopping.is_set():
                        raise RayRunStopping("the run is stopping")
                workers = [ray.remote(datatrove_ray.RankWorker).options(
                    placement_group=group, placement_group_bundle_index=i, **remote_options).remote()
                    for i in range(self.nodes_per_task)]
                node_ips = ray.get([worker.get_node_ip.remote() for worker in workers])
                tasks = [worker.run_for_rank.remote(executor_ref, ranks_to_submit, node_ips, i)
                         for i, worker in enumerate(workers)]
            except Exception as e:  # noqa: BLE001 - the task fails; datatrove's wait() drops it with a warning
                self.errors.update(dict.fromkeys(ranks_to_submit, e))
                for worker in workers:
                    with contextlib.suppress(Exception):
                        ray.kill(worker)
                if group is not None:
                    with contextlib.suppress(Exception):
                        ray.util.remove_placement_group(group)
                submitted.set_exception(e)
                return
            task_group = datatrove_ray.TaskGroup(tasks=tasks, workers=workers, placement_group=group,
                                                 ranks=ranks_to_submit)
            for task in tasks:
                self.task_to_group[task] = task_group
                self.timeout_manager.add_task(task)
            submitted.set_result(tasks)

        self.pg_futures.append(self.executor.submit(start))
        return submitted

    def task_done(self, task):
        import ray
        from ray.exceptions import GetTimeoutError

        group = self.task_to_group.get(task)
        if group is not None:
            try:
                ray.get(task, timeout=0)  # finished: its result or its error, at once
            except GetTimeoutError:
                pass
            except Exception as e:  # noqa: BLE001 - kept to explain the failure; datatrove decides what follows
                self.errors.update(dict.fromkeys(group.ranks, e))
            else:
                for rank in group.ranks:
                    self.errors.pop(rank, None)
        return super().task_done(task)


class WatchedRayExecutor(datatrove_ray.RayPipelineExecutor):
    """datatrove's Ray executor run with `WatchedRayTaskManager`: `task_errors` holds, per rank that did not
    complete, Ray's last error for it (an actor killed for memory, a lost node, the task's own exception)."""

    def run(self):
        self.task_errors: dict[int, BaseException] = {}
        made_by_datatrove = datatrove_ray.RayTaskManager
        # datatrove's run() builds its task manager by this module-level name: ours for the length of the run
        datatrove_ray.RayTaskManager = functools.partial(WatchedRayTaskManager, errors=self.task_errors,
                                                         stopping=getattr(self, "stopping", None))
        try:
            super().run()
        finally:
            datatrove_ray.RayTaskManager = made_by_datatrove

    def __getstate__(self):  # Ray ships the executor to its workers: without the errors (exceptions, a lock)
        state = self.__dict__.copy()
        state.pop("task_errors", None)
        state.pop("stopping", None)
        return state

    def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1):
        """datatrove's, its task log kept (until copied to the run's logs) in a temporary folder of this run:
        datatrove's one per node (TMPDIR/ray_logs, opened "w") was shared by every run on the node, so two runs
        on one cluster overwrote each other's logs, and another user's folder made the task fail before it ran."""
        folder = ray_task_log_folder(self.logging_dir.path, rank)
        os.makedirs(folder, exist_ok=True)
        before, tempfile.tempdir = tempfile.tempdir, folder
        try:
            # in the process that runs the task (datatrove's pool child on the node): killed for memory, it leaves
            # its file, and the run (on this machine) or `status` says so; datatrove's pool waited for it forever
            with running_marker(self.logging_dir, rank):
                stats = super()._run_for_rank(rank, local_rank, node_rank)
                drop_finished_task_scratch(self, rank)
                return stats
        finally:
            tempfile.tempdir = before
            # once datatrove has copied it whole to the run's logs: it left every task's log on the node (50k files
            # at 50k tasks); one whose copy failed stays (the run's may be an earlier attempt's, or cut short)
            with contextlib.suppress(OSError):
                local = os.path.join(folder, "ray_logs", "logs", f"task_{rank:05d}.log")
                if self.logging_dir.size(f"logs/task_{rank:05d}.log") == os.path.getsize(local):
                    os.remove(local)
            # and its folders once empty (libraries make theirs in the temporary folder too: torch's compile cache),
            # else every task of every run left one per node
            for parent, _, _ in os.walk(folder, topdown=False):
                with contextlib.suppress(OSError):
                    os.rmdir(parent)


def ray_task_log_folder(logging_dir: str, rank: int) -> str:
    """The node's temporary folder for the log of task `rank` of the stage logging to `logging_dir`: one per task,
    as each task removes its own once its log is copied (one folder per stage, a task ending removed it as empty
    while another task of the stage, starting, was about to write its log in it: the task failed, unlogged)."""
    run = hashlib.sha1(logging_dir.encode()).hexdigest()[:12]
    return os.path.join(tempfile.gettempdir(), f"edu-filter-{os.getuid()}-{run}-{rank:05d}")


def ray_lost_worker(errors: dict[int, BaseException], missing: list[int],
                    logged: Callable[[int], bool] = lambda rank: True, stage: str = "") -> str | None:
    """Why Ray lost a task that did not complete, and what to do, when it was Ray's doing (its memory monitor, a lost
    node), or when the task failed before its log (`logged(rank)`) was written: its arguments did not load on the
    worker (edu-filter or a library missing or of another version on that node), its log could not be opened. A
    task's own exception otherwise has its traceback in the task log."""
    from ray.exceptions import OutOfMemoryError, RayTaskError

    for rank in missing:
        error = errors.get(rank)
        # a task that ran its pipeline wrote its log (a shared filesystem may list it late): that says why
        if isinstance(error, RayTaskError) and "_run_for_rank" not in str(error) and not logged(rank):
            last = next((ln.strip() for ln in reversed(str(error).splitlines()) if ln.strip()), type(error).__name__)
            return (f"task {rank} failed on its Ray worker before its log was written ({last[-300:]}): every node "
                    "of the cluster needs edu-filter and its libraries installed as on this one, and a writable "
                    "temporary folder; the full error is in apply.log")
    for rank in missing:
        error = errors.get(rank)
        if error is None or isinstance(error, RayTaskError):
            continue
        said = " ".join(str(error).split())
        memory = "low on memory" in said or isinstance(error, OutOfMemoryError)
        if len(said) > 240:
            said = said[:240].rsplit(" ", 1)[0] + " ..."
        why, do = ((", its node low on memory", f"give each task more {memory_flag(stage, 'ray')}, so that Ray packs "
                    "fewer tasks on a node, and run") if memory else ("", "run"))
        return (f"Ray lost the worker of task {rank}{why} ({type(error).__name__}: {said}): {do} the same command "
                "again; it resumes, finished tasks are kept")
    return None


def _process_gone(pid: int, started: str | None = None) -> bool:
    """Whether process `pid` has ended; with `started` (`process_start`'s), also where another process has its id now
    (in a container every run is process 1: a killed run's task seemed to run on in the next run itself)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    fields = _proc_stat_fields(pid)
    if fields is None:
        return False
    return fields[0] == "Z" or (started is not None and fields[19] != started)  # a zombie: dead, not reaped yet


def _proc_stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (state first, start time 20th); None where unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields if len(fields) > 19 else None


def process_start(pid: int) -> str | None:
    """When process `pid` started (/proc's clock ticks since boot): with its id, names one process, not a later one
    given the same id."""
    fields = _proc_stat_fields(pid)
    return fields[19] if fields else None


def killed_task_message(out: str, stage: str, rank: int, ray: bool = False) -> str:
    fewer = (f"more {memory_flag(stage, 'ray')} (Ray then packs fewer tasks on a node)" if ray else "fewer --workers")
    return (f"stage {stage} failed: the process of task {rank} was killed before the task finished, most often by "
            "the kernel's out-of-memory killer (`dmesg` or `journalctl -k` says): run the same command again with "
            f"{fewer} (or a smaller --batch-size while scoring); it resumes, finished tasks are kept; log: "
            f"{task_log(out, stage, rank)}")


def local_tasks(logs: str, stage: str) -> list[tuple[int, bool | str]]:
    """(rank, process alive) of the tasks of `stage` a local run has started and not ended (their `running/`
    files, "PID HOST"; a killed task's stays behind); for a process of another machine (a run on a node, `status`
    on the login node) its host name instead: its process ids say nothing here."""
    folder = get_datafolder(f"{logs}/{stage}")
    here = socket.gethostname()
    tasks: list[tuple[int, bool | str]] = []
    for marker in task_markers(folder):
        if marker.host not in (None, here):
            tasks.append((marker.rank, marker.host))
            continue
        gone = _process_gone(marker.pid, marker.started)
        if not gone or folder.exists(marker.name):  # ended meanwhile: its file went first
            tasks.append((marker.rank, not gone))
    return tasks


def remote_killed_task(logs: str, stage: str, here: str | None = None, timeout_s: float = 10.0) -> int | None:
    """A task of `stage` on another node of the Ray cluster whose process is gone while its `running/` file stays
    (the kernel's out-of-memory killer on that node): its pool there waits for it forever, and nothing else ends
    the stage. Each such node is asked by a task pinned to it (no CPU asked, so a busy node answers too); a node
    that does not answer within `timeout_s` is asked again next time."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = here or socket.gethostname()
    folder = get_datafolder(f"{logs}/{stage}")
    ranks: dict[str, dict[tuple[int, str | None], int]] = {}  # host -> (pid, started) -> rank
    for marker in task_markers(folder):
        if marker.host is not None:  # an older "PID" alone was written here
            ranks.setdefault(marker.host, {})[marker.pid, marker.started] = marker.rank
    ranks.pop(here, None)  # this machine's are `killed_task`'s
    if not ranks:
        return None

    @ray.remote(num_cpus=0, max_retries=0)
    def gone(processes: list[tuple[int, str | None]]) -> list[tuple[int, str | None]]:
        return [(pid, started) for pid, started in processes if _process_gone(pid, started)]

    nodes = {n["NodeManagerHostname"]: n["NodeID"] for n in live_ray_nodes()}
    asked = {host: gone.options(scheduling_strategy=NodeAffinitySchedulingStrategy(nodes[host], soft=False)).remote(
        list(processes)) for host, processes in ranks.items() if host in nodes}  # a lost node: Ray fails its tasks itself
    if not asked:
        return None
    answered, _ = ray.wait(list(asked.values()), num_returns=len(asked), timeout=timeout_s)  # all nodes at once
    for host, answer in asked.items():
        try:
            dead = ray.get(answer) if answer in answered else []
        except Exception:  # noqa: BLE001 - busy or leaving: asked again next time
            continue
        for pid, started in dead:
            rank = ranks[host][pid, started]
            if folder.exists(f"running/{rank:05d}"):  # ended meanwhile: its file went first
                return rank
    return None


def killed_task(logs: str, stage: str) -> int | None:
    """A task of `stage` whose process ended without finishing or raising (it was killed), if any; killed even
    after writing its completion, the pool waits for it."""
    return next((rank for rank, alive in local_tasks(logs, stage) if alive is False), None)


def run_here(stages, out: str, executor: str, workers: int | None, console, verbose: bool = False, ray=None) -> dict:
    """Runs the stages one after the other in this process (a thread) while the main thread draws the progress;
    with Ray, on the cluster `connect_ray` connected to, each task asking what `ray` (RayOptions) says."""
    from rich.console import Console

    from edu_filter.filters.apply import RayOptions
    from edu_filter.filters.report import stats_table

    ray, logs = ray or RayOptions(), f"{out}/logs"
    with logs_to_file(Path(logs) / "apply.log", verbose) as terminal:
        screen = Console(file=terminal, quiet=console.quiet, force_terminal=console.is_terminal)
        failure: list[BaseException] = []
        watched: list = []  # the local stage being run, whose task processes the main thread watches
        stopping = threading.Event()  # set when the run stops: a Ray stage stops its tasks and starts none

        def run_all():
            try:
                for stage in stages:
                    ex = _executor_here(stage, logs, executor, workers, ray)
                    if isinstance(ex, WatchedRayExecutor):
                        ex.stopping = stopping
                    forget_killed(ex.logging_dir)
                    watched[:] = [stage.name]  # (Ray: the tasks on this machine; `status` names the others' hosts)
                    try:
                        ex.run()
                    except Exception as e:  # noqa: BLE001 - a task raised: name the stage and its log instead
                        raise StageFailed(failed_stage_message(out, stage.name, stage.tasks)) from e
                    missing = ex.get_incomplete_ranks(skip_completed=True)
                    if missing and isinstance(ex, WatchedRayExecutor) and not set(missing) & set(ex.task_errors):
                        # every task returned: completion files written on other nodes may show late here
                        missing = after_listing_grace(lambda: ex.get_incomplete_ranks(skip_completed=True))
                    if missing:
                        lost = ray_lost_worker(ex.task_errors, missing, lambda rank: task_log(
                            out, stage.name, rank).is_file(), stage.name) if isinstance(ex, WatchedRayExecutor) else None
                        raise StageFailed(failed_stage_message(out, stage.name, stage.tasks, lost=lost))
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                failure.append(e)

        worker = threading.Thread(target=run_all, name="edu-filter-apply", daemon=True)
        with stopped_by_signals(), ProgressDisplay(screen, [(s.name, s.tasks) for s in stages], logs) as display:
            worker.start()
            try:
                started, read, asked, checked = time.monotonic(), -math.inf, time.monotonic(), -math.inf
                while worker.is_alive():
                    # a Ray run's progress files are on a shared filesystem: read as often as a Slurm chain's
                    now = time.monotonic()
                    if executor != "ray" or now - read >= progress_interval(now - started):
                        display.refresh()
                        read = time.monotonic()
                    worker.join(POLL_S)
                    rank = None
                    if watched and worker.is_alive() and (
                            executor != "ray" or time.monotonic() - checked >= RAY_LOCAL_TASKS_CHECK_S):
                        rank, checked = killed_task(logs, watched[0]), time.monotonic()
                    if (rank is None and executor == "ray" and watched and worker.is_alive()
                            and time.monotonic() - asked >= REMOTE_TASKS_CHECK_S):
                        rank, asked = remote_killed_task(logs, watched[0]), time.monotonic()
                    if rank is not None:
                        # a task that raised ends datatrove's pool, which kills the other tasks mid-run: that failure
                        # is the one to report, and it arrives at once; a killed task's pool waits forever
                        worker.join(KILLED_TASK_GRACE_S)
                        if not worker.is_alive():
                            break
                        raise StageFailed(killed_task_message(out, watched[0], rank, ray=executor == "ray"))
            except BaseException:  # a killed task, SIGTERM, Ctrl-C: the stage's tasks go with the run
                if executor == "local" and watched:
                    stop_local_tasks(logs, watched[0])
                if executor == "ray":
                    stopping.set()
                    worker.join(RAY_STOP_S)
                raise
        if failure:
            raise failure[0]
        stats = json.loads((Path(out) / "stats.json").read_text())
        screen.print(stats_table(stats))
    return stats


# ---------------------------------------------------------------------------------------------------------------
# Slurm


def _require(command: str) -> None:
    if shutil.which(command) is None:
        raise DocumentError(f"`{command}` not found: run on a Slurm login node, or use --dry-run to write the scripts")


def node_gpus(gres: str) -> int:
    """GPUs of a node from sinfo's %G (`gpu:4`, `gpu:h100:8(S:0-1)`, `gpu:a100:4(S:0,1),shard:8`, `(null)`): the
    socket or index lists in brackets may hold colons and commas of their own, so they go first."""
    counts = (g.split(":")[-1] for g in re.sub(r"\([^)]*\)", "", gres).split(",") if g.startswith("gpu"))
    return sum(int(c) for c in counts if c.isdigit())


def slurm_partitions() -> dict[str, dict]:
    """{partition: {"default", "cpus", "mem_mb", "gpus", "up", "max_time", "max_seconds"}} with the largest node of
    each partition, and its MaxTime (max_seconds None: no limit)."""
    _require("sinfo")
    res = subprocess.run(["sinfo", "-h", "-N", "-o", "%P|%c|%m|%G|%a|%l"], capture_output=True, text=True)
    if res.returncode != 0:
        raise DocumentError(f"sinfo failed: {res.stderr.strip() or res.returncode}")
    parts: dict[str, dict] = {}
    for line in res.stdout.split("\n"):
        if not line.strip():
            continue
        name, cpus, mem, gres, avail, limit = line.strip().split("|")
        default = name.endswith("*")
        name = name.rstrip("*")
        gpus = node_gpus(gres)
        p = parts.setdefault(name, {"default": default, "cpus": 0, "mem_mb": 0, "gpus": 0, "up": avail == "up",
                                    "max_time": limit, "max_seconds": slurm_seconds(limit)})
        p["cpus"] = max(p["cpus"], int(cpus.rstrip("+")))
        p["mem_mb"] = max(p["mem_mb"], int(mem.rstrip("+")))
        p["gpus"] = max(p["gpus"], gpus)
    return parts


def check_slurm_request(opts):
    """Resolves the default partition and refuses, before anything is submitted, what no node could run."""
    if (opts.cpus_per_task < 1 or (opts.gpu_cpus_per_task is not None and opts.gpu_cpus_per_task < 1)
            or opts.gpus_per_task < 0
            or (opts.mem_gb is not None and opts.mem_gb < 1)
            or (opts.cluster_mem_gb is not None and opts.cluster_mem_gb < 1)):
        raise ValueError("--slurm-cpus, --slurm-gpu-cpus, --slurm-mem-gb and --slurm-cluster-mem-gb must be >= 1, "
                         "--slurm-gpus >= 0")
    if opts.max_array_size is not None and opts.max_array_size < 1:
        raise ValueError("--slurm-max-array must be >= 1")
    if opts.tasks_per_job < 1:
        raise ValueError("--slurm-tasks-per-job must be >= 1")
    if opts.venv_path:
        check_script_path(opts.venv_path, "--slurm-venv")
        if not opts.dry_run and not os.path.isfile(opts.venv_path):
            raise InputError(f"--slurm-venv {opts.venv_path}: no such file (give the environment's bin/activate)")
        opts = replace(opts, venv_path=os.path.abspath(opts.venv_path))
    if opts.gpus_per_task > 1:  # the scoring step runs one model on one device
        raise InputError(f"--slurm-gpus {opts.gpus_per_task}: a scoring task scores on one GPU, so the others would "
                         "sit idle; give --slurm-gpus 1 and a task per GPU (--tasks)")
    mem_gb = opts.mem_gb if opts.mem_gb is not None else 4 * opts.cpus_per_task
    scoring_mem_gb = opts.scoring_mem_gb or (opts.mem_gb if opts.mem_gb is not None else 4 * opts.scoring_cpus)
    for name, value in (("--slurm-account", opts.account), ("--slurm-qos", opts.qos)):
        if value is not None and (not value or any(c.isspace() for c in value)):
            raise InputError(f"{name} {value!r}: must be one word")
    directives = sbatch_directives(opts.sbatch_args)
    gpu_directives = sbatch_directives(opts.gpu_sbatch_args, "--slurm-gpu-arg", allowed=("qos", "account"))
    if any(not v or any(c.isspace() for c in v) for k, v in gpu_directives.items() if k in ("qos", "account")):
        raise InputError("--slurm-gpu-arg qos=NAME, account=NAME: give one word")
    opts = replace(opts, sbatch_args=directives, gpu_sbatch_args=gpu_directives)
    if opts.dry_run:  # the scripts may be meant for another cluster: nothing to check against here
        partition = opts.partition
        if partition is None and shutil.which("sinfo") is not None and slurm_answers():
            partition = next((n for n, p in slurm_partitions().items() if p["default"]), None)
        if partition is None:
            raise DocumentError("give --slurm-partition with --dry-run (no cluster answers here to ask for its "
                                "default)")
        max_array = opts.max_array_size or (slurm_max_array_size() if shutil.which("scontrol") is not None
                                            and slurm_answers() else None)
        return replace(opts, partition=partition, gpu_partition=opts.gpu_partition or partition, mem_gb=mem_gb,
                       scoring_mem_gb=scoring_mem_gb, max_array_size=max_array or SLURM_MAX_ARRAY_SIZE)
    check_sbatch_environment(opts)  # a dry run's submit.sh checks the environment it runs in
    parts = slurm_partitions()
    most = slurm_max_array_size()
    if opts.max_array_size is not None and most is not None and opts.max_array_size > most:
        raise DocumentError(f"--slurm-max-array {opts.max_array_size}: the cluster takes at most {most} tasks per "
                            f"array job (MaxArraySize, max_array_tasks), so sbatch would refuse the array jobs; give "
                            f"{most} or fewer, or leave it out")
    partition = opts.partition or next((n for n, p in parts.items() if p["default"]), None)
    if partition is None:
        raise DocumentError(f"the cluster has no default partition: give --slurm-partition ({', '.join(parts)})")
    gpu_partition = opts.gpu_partition or partition
    scoring_option = "--slurm-gpu-cpus" if opts.gpu_cpus_per_task else "--slurm-cpus"
    cluster_time = ("--slurm-cluster-time", opts.cluster_time) if opts.cluster_time else ("--slurm-time", opts.time)
    gpu_time = ("--slurm-gpu-time", opts.gpu_time) if opts.gpu_time else ("--slurm-time", opts.time)
    for name, cpus, option, gpus, memory, limit in (
            (partition, opts.cpus_per_task, "--slurm-cpus", 0, ("--slurm-mem-gb", mem_gb), ("--slurm-time", opts.time)),
            (gpu_partition, opts.scoring_cpus, scoring_option, opts.gpus_per_task, ("--slurm-mem-gb", scoring_mem_gb),
             gpu_time),
            (partition, opts.cpus_per_task, "--slurm-cpus", 0, ("--slurm-cluster-mem-gb", opts.cluster_mem_gb or 0),
             cluster_time)):
        if name not in parts:
            raise DocumentError(f"Slurm partition {name!r} does not exist (partitions: {', '.join(parts)})")
        p = parts[name]
        if cpus > p["cpus"]:
            raise DocumentError(f"{option} {cpus}: no node of partition {name} has more than "
                                f"{p['cpus']} CPUs, so the jobs would wait forever")
        if 1024 * memory[1] > p["mem_mb"]:
            raise DocumentError(f"{memory[1]} GB per task: no node of partition {name} has more than "
                                f"{p['mem_mb'] // 1024} GB ({memory[0]})")
        if gpus > p["gpus"]:
            raise DocumentError(f"--slurm-gpus {gpus}: no node of partition {name} has {gpus} GPUs "
                                "(--slurm-gpu-partition)")
        # unless the cluster enforces partition limits at submission, such a job is queued and never starts
        asked = slurm_seconds(limit[1] or "")
        if asked is not None and p["max_seconds"] is not None and asked > p["max_seconds"]:
            raise DocumentError(f"{limit[0]} {limit[1]}: partition {name} runs a job for at most {p['max_time']} "
                                "(its MaxTime), so the jobs would wait forever; give that or less")
    opts = replace(opts, partition=partition, gpu_partition=gpu_partition, mem_gb=mem_gb, scoring_mem_gb=scoring_mem_gb,
                   max_array_size=opts.max_array_size or most or SLURM_MAX_ARRAY_SIZE)
    check_sbatch_accepts(opts)
    return opts


SLURM_MAX_ARRAY_SIZE = 1001  # Slurm's default MaxArraySize: array tasks 0 to 1000


def slurm_max_array_size() -> int | None:
    """The most tasks one array job may hold on this cluster (`scontrol show config`), None where it does not say:
    array jobs as large as it allows, since a stage's array jobs run one after another (50,000 tasks were 50 of
    them at the default where the cluster took 10,001)."""
    try:
        res = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=SQUEUE_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return array_limit(res.stdout) if res.returncode == 0 else None


def array_limit(config: str) -> int | None:
    """From `scontrol show config`: MaxArraySize (array indices 0 to MaxArraySize - 1), lowered by
    SchedulerParameters' max_array_tasks (tasks of one array job: a site may allow indices to 100,000 and 1,000
    tasks)."""
    size = re.search(r"^MaxArraySize\s*=\s*(\d+)\s*$", config, re.MULTILINE)
    scheduler = re.search(r"^SchedulerParameters\s*=(.*)$", config, re.MULTILINE)
    tasks = re.search(r"(?:^|,)\s*max_array_tasks=(\d+)", scheduler.group(1)) if scheduler else None
    limits = [int(m.group(1)) for m in (size, tasks) if m and int(m.group(1)) >= 1]
    return min(limits) if limits else None


def job_request(opts, scores: bool, clusters: bool = False) -> tuple[str, int, int, int]:
    """(partition, CPUs, MB per CPU, GPUs) of one task of a stage: the scoring stage's, the minhash-cluster stage's
    (`clusters`: --slurm-cluster-mem-gb), or any other's. Slurm takes
    whole units: --slurm-mem-gb 16 over 6 CPUs in whole GB was 18 GB, 8 over 16 CPUs 16 GB (more than asked, maybe
    more than the node has); in MB a task gets what was asked, to a few MB under (a node of exactly that size fits)."""
    cpus = opts.scoring_cpus if scores else opts.cpus_per_task
    mem_gb = (opts.scoring_mem_gb if scores else opts.cluster_mem_gb if clusters else None) or opts.mem_gb
    return (opts.gpu_partition if scores else opts.partition, cpus, max(1, mem_gb * 1024 // cpus),
            opts.gpus_per_task if scores else 0)


def job_time(opts, scores: bool, clusters: bool = False) -> str:
    """The time limit of a task of the scoring stage (`scores`), the minhash-cluster stage (`clusters`) or any
    other."""
    return (opts.gpu_time if scores else opts.cluster_time if clusters else None) or opts.time


def memory_directive(mb: int) -> str:
    """sbatch's size for `mb` megabytes: in GB where it is whole GB (what people write), else in MB."""
    return f"{mb // 1024}G" if mb % 1024 == 0 else f"{mb}M"


# sbatch options edu-filter sets itself, or that would break the chain: through --slurm-arg they would override ours
# unseen (sbatch reads #SBATCH lines in order, the later winning) or hang the submission
OWN_SBATCH_OPTIONS = {
    "partition": "--slurm-partition or --slurm-gpu-partition", "time": "--slurm-time",
    "cpus-per-task": "--slurm-cpus or --slurm-gpu-cpus", "mem": "--slurm-mem-gb", "mem-per-cpu": "--slurm-mem-gb",
    "mem-per-gpu": "--slurm-mem-gb", "gpus": "--slurm-gpus", "gpus-per-task": "--slurm-gpus",
    "gpus-per-node": "--slurm-gpus", "gpus-per-socket": "--slurm-gpus", "cpus-per-gpu": "--slurm-gpu-cpus",
    "tres-per-task": "--slurm-cpus, --slurm-gpu-cpus and --slurm-gpus", "qos": "--slurm-qos",
    "account": "--slurm-account", "array": "--tasks and --workers", "nodes": "one node per task",
    "ntasks": "one process per task", "ntasks-per-node": "one process per task",
    "job-name": "the chain is found in the queue by its job names", "output": "Slurm logs go to OUT/logs",
    "error": "Slurm logs go to OUT/logs", "dependency": "the stages are chained afterok",
    "export": "jobs run in the submitting environment", "requeue": "a requeued task runs again inside the chain",
    "no-requeue": "a requeued task runs again inside the chain", "wait": "apply --wait follows the chain",
    "hold": "the chain is submitted to run", "test-only": "the chain is submitted to run",
    "parsable": "edu-filter reads sbatch's answer", "clusters": "the chain is followed on this cluster",
}


def sbatch_directives(args: dict | Iterable[str], option: str = "--slurm-arg", allowed: tuple[str, ...] = ()) -> dict:
    """Extra sbatch options, from a dict or `KEY=VALUE` / `FLAG` strings (`option`), checked: sbatch's long option
    names, each once, one word each (sbatch splits #SBATCH lines at spaces), none that edu-filter sets itself nor an
    abbreviation of one (sbatch takes any unambiguous prefix), naming ours; but the `allowed` ones."""
    if isinstance(args, dict):
        items = [(str(k), "" if v is None else str(v)) for k, v in args.items()]
    else:
        items = []
        for arg in args:
            key, given, value = str(arg).partition("=")
            if given and not value:
                raise InputError(f"{option} {arg}: give a value, or the flag alone")
            items.append((key, value))
    directives = {}
    for key, value in items:
        key = key.strip().lstrip("-")
        if len(key) < 2 or not all(c.isalnum() or c == "-" for c in key):
            raise InputError(f"{option} {key or '(empty)'}: give sbatch's long option name as KEY=VALUE or FLAG, "
                             "e.g. constraint=h100 or exclusive")
        if any(c.isspace() for c in value):
            raise InputError(f"{option} {key}: the value must be one word ({value!r}): sbatch splits #SBATCH "
                             "lines at spaces")
        key = next((name for name in allowed if name.startswith(key)), key)  # an allowed one's prefix: its name
        owned = next((own for own in OWN_SBATCH_OPTIONS if own.startswith(key) and own not in allowed), None)
        if owned is None and key.startswith(("gres", "tres")) and "gpu" in value:
            owned = "gpus"
        if owned is not None:
            why = OWN_SBATCH_OPTIONS[owned]
            how = f"give {why}" if why.startswith("--") else f"edu-filter sets it ({why})"
            what = key if owned == key or owned == "gpus" else f"{key} (sbatch reads it as --{owned})"
            raise InputError(f"{option} {what}: {how}")
        if key in directives:
            raise InputError(f"{option} {key} is given twice")
        directives[key] = value
    return directives


def job_directives(opts, scores: bool = False) -> dict:
    """The sbatch options a job gets beyond the stage's own request and its QOS (`job_qos`): --slurm-arg's and the
    account, a scoring job's --slurm-gpu-arg over them, and kill-on-invalid-dep: a job whose dependency failed is
    cancelled by Slurm, and so the jobs waiting on it, down the chain (else only the next one says
    DependencyNeverSatisfied, and the rest stay queued forever, "Dependency")."""
    gpu_args = {k: v for k, v in opts.gpu_sbatch_args.items() if k != "qos"} if scores else {}
    return {"kill-on-invalid-dep": "yes", **opts.sbatch_args, **({"account": opts.account} if opts.account else {}),
            **gpu_args}


def job_qos(opts, scores: bool = False) -> str | None:
    return opts.gpu_sbatch_args.get("qos", opts.qos) if scores else opts.qos


SHELL_SPECIAL = set(" \t\n'\"$`\\!;&|<>()*?[]{}#~%")  # %: Slurm reads it in --output as a filename pattern


def check_script_path(path: str, what: str) -> None:
    """datatrove writes a stage's paths into its job script unquoted (the srun line, #SBATCH --output): a space or a
    shell character there fails every task of every stage, so such a path is refused before anything is submitted."""
    bad = sorted(set(os.path.abspath(path)) & SHELL_SPECIAL)
    if bad:
        shown = " ".join(repr(c) for c in bad)
        raise InputError(f"{what} {os.path.abspath(path)}: Slurm job scripts name it unquoted, and it holds {shown}; "
                         "use a path of letters, digits and . _ - / only")


# sbatch's input environment variables for options every script of the chain sets: sbatch lets the environment
# override #SBATCH lines ("environment variables will override any options set in a batch script"), so an
# SBATCH_PARTITION in a login shell sent the scoring jobs, --gpus and all, to a CPU partition, unseen
SCRIPT_SBATCH_VARIABLES = ("SBATCH_PARTITION", "SBATCH_TIMELIMIT", "SBATCH_MEM_PER_CPU", "SBATCH_MEM_PER_NODE",
                           "SBATCH_MEM_PER_GPU", "SBATCH_GPUS", "SBATCH_GPUS_PER_TASK", "SBATCH_GPUS_PER_NODE",
                           "SBATCH_CPUS_PER_GPU", "SBATCH_ARRAY_INX", "SBATCH_JOB_NAME", "SBATCH_OUTPUT",
                           "SBATCH_ERROR")


def overriding_sbatch_variables(opts) -> list[str]:
    """The sbatch environment variables that would override what the chain's scripts ask: those of the options
    every script sets, and of the account, QOS and other options given."""
    given = {**opts.sbatch_args, **opts.gpu_sbatch_args, **({"account": ""} if opts.account else {}),
             **({"qos": ""} if opts.qos else {})} if isinstance(opts.sbatch_args, dict) else {}
    return [*SCRIPT_SBATCH_VARIABLES, *(f"SBATCH_{name.upper().replace('-', '_')}" for name in given)]


def check_sbatch_environment(opts, environ=os.environ) -> None:
    """Refuses, before anything is queued, sbatch variables set in the environment that would override the jobs'
    own options."""
    found = [f"{name}={environ[name]}" for name in overriding_sbatch_variables(opts) if name in environ]
    if found:
        raise InputError(f"{', '.join(found)} in the environment would override what the jobs ask (sbatch takes its "
                         "environment over a script's #SBATCH lines): unset it, and give what it says through "
                         "edu-filter's own options (--slurm-partition, --slurm-time, --slurm-mem-gb, --slurm-arg)")


def check_sbatch_accepts(opts) -> None:
    """Asks the controller whether it would take each kind of job the chain submits (`sbatch --test-only`, nothing
    queued), so an unknown account, QOS, constraint or reservation, or a malformed --slurm-time, is refused in
    Slurm's words before anything is written, not when the first stage is submitted."""
    requests = {}
    for scores, clusters in ((False, False), (True, False), (False, True)):
        partition, cpus, mem_per_cpu_mb, gpus = job_request(opts, scores, clusters)
        qos = job_qos(opts, scores)
        args = {"partition": partition, "cpus-per-task": cpus, "mem-per-cpu": memory_directive(mem_per_cpu_mb),
                "time": job_time(opts, scores, clusters), **({"gpus": gpus} if gpus else {}),
                **({"qos": qos} if qos else {}),
                **job_directives(opts, scores)}
        requests[tuple(f"--{k}={v}" if v != "" else f"--{k}" for k, v in args.items())] = (partition, cpus,
                                                                                         mem_per_cpu_mb, gpus)
    for options, (partition, cpus, mem_per_cpu_mb, gpus) in requests.items():
        try:
            res = subprocess.run(["sbatch", "--test-only", "--wrap", "true", *options], capture_output=True,
                                 text=True, timeout=120)
        except subprocess.TimeoutExpired:
            raise RunError("sbatch --test-only got no answer from the Slurm controller in 2 minutes") from None
        if res.returncode != 0:
            said = [ln.strip() for ln in (res.stderr + res.stdout).splitlines() if ln.strip()]
            reason = said[-1] if said else f"sbatch exit status {res.returncode}"
            if ("node configuration is not available" in reason
                    and usable_nodes(partition, cpus, cpus * mem_per_cpu_mb, gpus) == 0):
                # every node that could run them drained or down (maintenance): sbatch queues the jobs, --test-only
                # alone refuses them
                print(f"warning: no node of partition {partition} that fits these jobs ({cpus} CPU{'s' * (cpus != 1)}"
                      f"{f', {gpus} GPUs' if gpus else ''}) takes jobs now (drained or down): the jobs will wait "
                      "until one does", file=sys.stderr)
                continue
            raise InputError(f"Slurm would refuse the jobs ({' '.join(options)}): {reason}")


def usable_nodes(partition: str, cpus: int = 1, mem_mb: int = 0, gpus: int = 0) -> int | None:
    """Nodes of the partition with `cpus`, `mem_mb` and `gpus` that take jobs now (not drained, draining, down,
    failed, not responding, nor in a maintenance reservation); None when sinfo cannot say. Only nodes that fit
    count: a partition whose GPU nodes are all drained takes no GPU jobs, however many CPU nodes are up."""
    try:
        res = subprocess.run(["sinfo", "-h", "-N", "-p", partition, "-o", "%t|%c|%m|%G"], capture_output=True,
                             text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return None
    if res.returncode != 0:
        return None
    unusable = ("drain", "drng", "down", "fail", "maint", "inval", "futr", "pow_dn", "powered_down", "unk")
    count = 0
    for line in res.stdout.split("\n"):
        if not line.strip():
            continue
        state, node_cpus, node_mem, gres = line.strip().split("|")
        if set(state) & set("*$") or state.rstrip("~#!%@^-+").startswith(unusable):
            continue
        if int(node_cpus.rstrip("+")) >= cpus and int(node_mem.rstrip("+")) >= mem_mb and node_gpus(gres) >= gpus:
            count += 1
    return count


def chain_tag(out: str) -> str:
    """Job names end with this tag of the output folder, so the jobs of one run can be found in the queue: of its real
    path, the same whichever way it is named (a relative -o and ~/runs/x, /home a link to /gpfs)."""
    return hashlib.sha1(os.path.realpath(out).encode()).hexdigest()[:8]


def chain_tags(out: str) -> set[str]:
    """The tags a queued chain of `out` may carry: `chain_tag`'s, and that of the path as given (an edu-filter from
    before tagged its jobs so)."""
    return {chain_tag(out), hashlib.sha1(os.path.abspath(out).encode()).hexdigest()[:8]}


def sbatch_job_id(said: str) -> str:
    """The job id in sbatch's answer: "Submitted batch job 123", or on a site with several clusters "... 123 on
    cluster foo", whose last word datatrove took for the id (every dependency then named the cluster)."""
    found = re.search(r"Submitted batch job (\d+)", said)
    if found is None:
        raise RunError(f"sbatch gave no job id: {said.strip()[:300]}")
    return found.group(1)


def slurm_answers() -> bool:
    """`scontrol ping` says at once whether the controller is up, where squeue waits ~30 s to say it is not."""
    if shutil.which("scontrol") is None:
        return False
    try:
        return subprocess.run(["scontrol", "ping"], capture_output=True, timeout=SQUEUE_TIMEOUT_S).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def queued_jobs(out: str) -> list[dict]:
    """This run's jobs in `squeue` (array tasks expanded): id, name, state, reason."""
    if shutil.which("squeue") is None:
        return []
    for attempt in range(SQUEUE_ATTEMPTS):  # a busy controller times out now and then; an empty answer is not that
        # this user's jobs (another's may carry the same tag) not ended: SQUEUE_STATES=all in a user's environment
        # lists ended ones for minutes, and --wait then took a failed stage for one still queued
        try:
            res = subprocess.run(["squeue", "-h", "-r", "-u", getpass.getuser(), "-t", QUEUED_STATES, "-o",
                                  "%i|%j|%T|%r"], capture_output=True, text=True, timeout=SQUEUE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            res = subprocess.CompletedProcess([], -1, "", f"no answer in {SQUEUE_TIMEOUT_S} s")
        if res.returncode == 0:
            break
        if attempt + 1 < SQUEUE_ATTEMPTS:
            time.sleep(SQUEUE_RETRY_S * (attempt + 1))
    else:
        raise RunError(f"squeue failed {SQUEUE_ATTEMPTS} times ({res.stderr.strip() or res.returncode}): the state of "
                       f"the jobs is unknown; they were left alone (`edu-filter status {out}` once Slurm answers)")
    tags = chain_tags(out)
    jobs = []
    for line in res.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 4 and parts[1].rsplit("-", 1)[-1] in tags:
            jobs.append({"id": parts[0], "name": parts[1], "state": parts[2], "reason": parts[3]})
    return jobs


def refuse_if_queued(out: str, dry_run: bool = False) -> None:
    if dry_run and not slurm_answers():  # the scripts may be meant for another cluster: no queue here to ask
        return
    jobs = queued_jobs(out)
    if jobs:
        ids = sorted({j["id"].split("_")[0] for j in jobs})
        raise DocumentError(f"jobs of an earlier submission for {out} are still queued or running ({', '.join(ids)}); "
                            f"follow them with `edu-filter status {out}`, or the same apply command with --wait, or "
                            f"cancel them with `scancel {' '.join(ids)}`")


def _slurm_executor_class():
    from datatrove.executor.slurm import SlurmPipelineExecutor

    class ApplySlurmExecutor(SlurmPipelineExecutor):
        """datatrove's Slurm executor without its per-stage `merge_stats` job: `apply`'s report stage counts what
        was written, and a merge job is left pending forever in the queue when its stage fails."""

        def launch_merge_stats(self):
            pass

        def launch_job(self):
            """Marks the stage being submitted, so an sbatch refusal names it (a stage of several array jobs has a
            job id once its first is queued)."""
            self.__dict__["submitting"] = True
            super().launch_job()
            self.__dict__["submitting"] = False

        @property
        def job_id(self):
            return self.__dict__.get("_job_id")

        @job_id.setter
        def job_id(self, value):
            """Every array job of the stage (one per --slurm-max-array tasks) is kept, not only the last."""
            self._job_id = value
            if value not in (None, -1):
                self.__dict__.setdefault("job_ids", []).append(str(value))

        def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1):
            """With --slurm-tasks-per-job, each task gets fresh steps, and one failing does not stop the job's
            others: datatrove's loop ran every task of a job on the same steps (the second's stats counted the
            first's documents) and stopped at the first error, leaving the job's later tasks for a resume."""
            steps = self.pipeline
            if self.tasks_per_job > 1:
                self.pipeline = copy.deepcopy(steps)
            try:
                stats = super()._run_for_rank(rank, local_rank, node_rank)
            except Exception:  # in the task's log already; the job fails once its other tasks ran
                if self.tasks_per_job == 1:
                    raise
                self.__dict__.setdefault("failed_ranks", []).append(rank)
                return None
            finally:
                self.pipeline = steps
            drop_finished_task_scratch(self, rank)
            return stats

        def run(self):
            super().run()
            failed = self.__dict__.get("failed_ranks")
            if failed:
                raise RunError(f"task{'s' * (len(failed) > 1)} {', '.join(map(str, failed))} of this job failed: "
                               "their logs say why")

        @property
        def dependency(self) -> str:
            """afterok on the previous stage and on this stage's previous array job: datatrove chains the array
            jobs of a stage over --max-array-size with afterany, so a failed first job would not stop the next stage,
            which waits on the last job only."""
            return ",".join(f"afterok:{job}" for job in (self.depends_job_id, self.job_id) if job)

    return ApplySlurmExecutor


def environment_command(opts) -> str:
    """Jobs run in the Python environment that submitted them unless `--slurm-venv` names another."""
    if opts.venv_path:  # checked by check_slurm_request; a failed `source` must stop the job, not run elsewhere
        return f"source {shlex.quote(opts.venv_path)} || exit 1"
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "launch_pickled_pipeline").exists():
        raise DocumentError(f"launch_pickled_pipeline is not in {bin_dir}: install datatrove into this environment "
                            "or give --slurm-venv")
    lines = [f'export PATH="{bin_dir}:$PATH"']
    if sys.prefix != sys.base_prefix:
        lines.append(f'export VIRTUAL_ENV="{sys.prefix}"')
    return "\n".join(lines)


def even_array_size(jobs: int, most: int) -> int:
    """Array tasks per array job for `jobs` tasks over array jobs of at most `most`: as many array jobs as needed,
    all of one size. datatrove makes each `most` big, so 2,500 tasks at 1,001 gave a third job of 1,001 array tasks,
    503 with no rank, each still a GPU job to schedule before the next stage could start."""
    if jobs <= most:
        return most
    return math.ceil(jobs / math.ceil(jobs / most))


def srun_request(cpus: int) -> dict:
    """srun options of a task's step: its CPUs again, since Slurm 22.05 to 23.02 give a step one CPU unless srun is
    told (it stopped reading the job's --cpus-per-task), binding 16 scoring threads to one core where tasks are
    bound (task/affinity, task/cgroup)."""
    return {"cpus-per-task": cpus}


def srun_options(args: dict) -> str:
    return " ".join(f"--{k}={v}" for k, v in args.items())


def slurm_executors(stages, out: str, workers: int | None, opts):
    cls = _slurm_executor_class()
    logs, tag = f"{out}/logs", chain_tag(out)
    env = environment_command(opts)
    executors, previous = [], None
    most_per_array = opts.max_array_size or SLURM_MAX_ARRAY_SIZE  # resolved by check_slurm_request
    for stage in stages:
        partition, cpus, mem_per_cpu_mb, gpus = job_request(opts, stage.scores, stage.clusters)
        per_job = 1 if stage.merges else opts.tasks_per_job
        previous = cls(
            # --workers counts tasks running at once; an array task runs its tasks_per_job one after another, so
            # that is as many array tasks at once
            stage.pipeline, tasks=stage.tasks, tasks_per_job=per_job,
            workers=-1 if workers is None else max(1, min(workers, math.ceil(stage.tasks / per_job))),
            time=job_time(opts, stage.scores, stage.clusters), partition=partition, cpus_per_task=cpus,
            mem_per_cpu_gb=math.ceil(mem_per_cpu_mb / 1024),
            gpus_per_task=gpus, job_name=f"edu-filter-{stage.name}-{tag}",
            logging_dir=f"{logs}/{stage.name}", depends=None if opts.dry_run else previous, env_command=env,
            qos=job_qos(opts, stage.scores),
            sbatch_args={**job_directives(opts, stage.scores), "mem-per-cpu": memory_directive(mem_per_cpu_mb)},
            slurm_logs_folder=f"{logs}/{stage.name}/slurm_logs",
            mail_type="NONE", max_array_size=most_per_array, srun_args=srun_request(cpus),
            job_id_retriever=sbatch_job_id,
        )
        jobs = math.ceil(len(previous.get_incomplete_ranks()) / previous.tasks_per_job)
        previous.max_array_size = even_array_size(jobs, most_per_array)
        executors.append((stage.name, previous))
    return executors


def array_layout(executors) -> dict:
    """arrays.json's content: how each stage's array tasks map to ranks (see `_incomplete_array_tasks`)."""
    return {name: {"max_array_size": ex.max_array_size, "tasks_per_job": ex.tasks_per_job} for name, ex in executors}


def write_slurm_scripts(executors, out: str, opts) -> Path:
    """What `SlurmPipelineExecutor.launch_job` writes, minus the `sbatch` calls, plus `submit.sh` chaining the stages
    with `afterok` dependencies. Each stage's `executor.pik` is the one its array tasks load; every path is absolute.
    submit.sh records the job ids it got in jobs.json as it goes, as a submission by `apply` does: `status` and
    `--wait` ask Slurm how those jobs ended. Where an sbatch fails midway it cancels the jobs queued before it, as
    `apply` does (they would wait on a stage never queued), and they stay recorded."""
    import dill
    from dill import CONTENTS_FMODE

    folder = Path(out) / "slurm"
    folder.mkdir(parents=True, exist_ok=True)
    kept, tags = "|".join(SLURM_KEPT_VARIABLES), "|".join(sorted(chain_tags(out)))
    lines = ["#!/bin/bash", "# Submits the edu-filter apply stages in order, each after the previous one succeeded.",
             "set -euo pipefail",
             "# inside a Slurm allocation its SLURM_* variables would reach every job (--export=ALL) and stop srun",
             'if [ -n "${SLURM_JOB_ID:-}" ]; then',
             f"  for v in $(compgen -e | grep '^SLURM_' | grep -Ev '^({kept})$' || true); do unset \"$v\"; done",
             "fi",
             "# sbatch takes these over the scripts' own #SBATCH lines",
             f"for v in {' '.join(overriding_sbatch_variables(opts))}; do",
             '  if [ -n "${!v+set}" ]; then',
             '    echo "$v=${!v} in the environment would override what the jobs ask (sbatch takes its environment '
             "over a script's #SBATCH lines): unset it\" >&2",
             "    exit 1",
             "  fi",
             "done",
             "# run twice, two chains would run every task at once, writing the same files",
             f"if [ -n \"$(squeue -h -u \"$(id -un)\" -t {QUEUED_STATES} -o %j | grep -E -- '-({tags})$' || true)\" ]; "
             "then",
             "  echo 'jobs of this output are still queued or running (squeue --me): wait for them, or scancel "
             "them; to resume a failed chain, write the scripts again (apply ... --dry-run)' >&2",
             "  exit 1",
             "fi",
             "dep=()",
             f'record="{(folder / "jobs.json").resolve()}"',
             'jobs=""; stage=""; ids=""  # JSON members "stage": ["job id", ...] of the stages submitted so far',
             'write_record() {',
             '  local all="$jobs"',
             '  if [ -n "$ids" ]; then all="${all:+$all, }\\"$stage\\": [$ids]"; fi',
             '  printf \'{%s}\\n\' "$all" > "$record.tmp" && mv -f "$record.tmp" "$record"',
             '}',
             "write_record  # none yet: an earlier submission's ids would be read through the layout below",
             "queued=()",
             "cancel_queued() {  # an sbatch refused: the jobs queued before it would wait on a stage never queued",
             '  if [ "${#queued[@]}" -gt 0 ]; then',
             '    scancel "${queued[@]}" || true',
             '    echo "sbatch refused stage $stage: cancelled the ${#queued[@]} jobs queued before it" >&2',
             "  fi",
             "}",
             "trap cancel_queued ERR",
             f"printf '%s\\n' '{json.dumps(array_layout(executors))}' > \"{(Path(out) / SUBMITTED_ARRAYS).resolve()}\""]
    for i, (name, ex) in enumerate(executors):
        ranks = ex.get_incomplete_ranks()
        if not ranks:
            continue
        with ex.logging_dir.open("executor.pik", "wb") as fh:
            dill.dump(ex, fh, fmode=CONTENTS_FMODE)
        with ex.logging_dir.open("ranks_to_run.json", "w") as fh:
            json.dump(ranks, fh)
        jobs = math.ceil(len(ranks) / ex.tasks_per_job)
        per_array = min(jobs, ex.max_array_size)  # more than the cluster's MaxArraySize: several array jobs in a row
        script = ex.get_launch_file_contents(
            ex.get_sbatch_args(per_array),
            f"srun {srun_options(ex.srun_args)} -l -n 1 launch_pickled_pipeline "
            f"{ex.logging_dir.resolve_paths('executor.pik')}",
        )
        path = folder / f"{i:02d}_{name}.slurm"
        path.write_text(script)
        lines.append(f'stage="{name}"; ids=""')
        for offset in range(math.ceil(jobs / per_array)):
            # ${dep[@]+...}: an empty array under `set -u` is an error before bash 4.4 (RHEL/CentOS 7); --parsable
            # prints "jobid;cluster" on multi-cluster sites
            lines.append(f'jid=$(sbatch --parsable --export=ALL,RUN_OFFSET={offset} ${{dep[@]+"${{dep[@]}}"}} '
                         f'"{path.resolve()}")')
            lines.append('jid="${jid%%;*}"')
            lines.append('ids="${ids:+$ids, }\\"$jid\\""; queued+=("$jid"); write_record  # each job as it is queued')
            lines.append('dep=(--dependency=afterok:"$jid")')
        lines.append('jobs="${jobs:+$jobs, }\\"$stage\\": [$ids]"; ids=""')
        lines.append(f'echo "{name}: job $jid"')
    submit = folder / "submit.sh"
    submit.write_text("\n".join(lines) + "\n")
    submit.chmod(0o755)
    return submit


# kept from an allocation's environment when submitting from inside it: where the cluster's configuration is
SLURM_KEPT_VARIABLES = ("SLURM_CONF", "SLURM_CLUSTERS")


@contextlib.contextmanager
def outside_the_allocation():
    """Submitting from inside a Slurm allocation (salloc, or the launcher run as a job itself), its SLURM_* variables
    reached every job through --export=ALL: srun then stopped every task ('SLURM_MEM_PER_CPU, SLURM_MEM_PER_GPU, and
    SLURM_MEM_PER_NODE are mutually exclusive' under an allocation made with --mem; a leaked SLURM_CPU_BIND binds
    outside the step). sbatch sees the environment without them."""
    if "SLURM_JOB_ID" not in os.environ:
        yield
        return
    saved = {k: os.environ.pop(k) for k in list(os.environ)
             if k.startswith("SLURM_") and k not in SLURM_KEPT_VARIABLES}
    try:
        yield
    finally:
        os.environ.update(saved)


def chain_array_tasks(executors) -> int:
    """The array tasks the chain queues at once, each a job to Slurm's limits."""
    return sum(math.ceil(len(ex.get_incomplete_ranks()) / ex.tasks_per_job) for _, ex in executors)


def max_job_count(config: str) -> int | None:
    """From `scontrol show config`: MaxJobCount, the jobs (array tasks each) the whole cluster holds at once."""
    found = re.search(r"^MaxJobCount\s*=\s*(\d+)\s*$", config, re.MULTILINE)
    return int(found.group(1)) if found else None


def check_job_count(jobs: int, limit: int | None) -> None:
    """Refuses a chain of more array tasks than the cluster holds (MaxJobCount, 10,000 by default: 10,000 --tasks
    queue ~30,000): sbatch retried "temporarily unable to accept job" or refused midway, naming no option."""
    if limit is not None and jobs > limit:
        raise InputError(f"the chain queues {jobs:,} array tasks at once and the cluster holds at most {limit:,} jobs "
                         "(MaxJobCount; each array task counts as one): give --slurm-tasks-per-job N to run N tasks in "
                         f"each (N >= {math.ceil(jobs / limit)}, with a --slurm-time for N of them), or fewer --tasks")


def run_slurm(stages, out: str, workers: int | None, opts, wait: bool, console) -> dict | None:
    executors = slurm_executors(stages, out, workers, opts)
    if opts.dry_run:
        submit = write_slurm_scripts(executors, out, opts)
        console.print(f"Slurm scripts written; submit with [bold]{submit}[/]")
        return None
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True,
                                timeout=SQUEUE_TIMEOUT_S)
        check_job_count(chain_array_tasks(executors), max_job_count(config.stdout) if config.returncode == 0
                        else None)
    log = Path(out) / "logs" / "apply.log"
    logged_before = log.stat().st_size if log.exists() else 0  # apply.log holds every earlier run's lines too
    try:
        with logs_to_file(log, verbose=False), outside_the_allocation():
            executors[-1][1].run()  # launches the whole dependency chain through sbatch
    except subprocess.CalledProcessError as e:
        stage = next((name for name, ex in executors if ex.__dict__.get("submitting")), executors[-1][0])
        cancelled = cancel_chain(out)
        with log.open("rb") as fh:
            fh.seek(logged_before)
            said = [ln for ln in fh.read().decode(errors="replace").splitlines() if ln.startswith("sbatch:")]
        raise StageFailed(f"sbatch refused stage {stage}: {said[-1] if said else e}"
                          + (f"; cancelled the {len(cancelled)} jobs submitted before it" if cancelled else "")
                          + submit_limit_hint(said, executors)) from None
    jobs = {name: getattr(ex, "job_ids", []) for name, ex in executors}  # a finished stage is not submitted again
    try:  # written whole: a full disk left an empty jobs.json, and `status` and --wait then failed on it
        (Path(out) / SUBMITTED_JOBS).parent.mkdir(exist_ok=True)
        write_json_whole(Path(out) / SUBMITTED_JOBS, jobs)
        write_json_whole(Path(out) / SUBMITTED_ARRAYS, array_layout(executors), indent=None)
    except OSError as e:  # the chain runs, but nothing could follow or resume it: taken back
        cancelled = cancel_chain(out)
        raise RunError(f"cannot record the submitted jobs in {Path(out) / SUBMITTED_JOBS} ({e.strerror or e}); "
                       f"cancelled the {len(cancelled)} jobs submitted: free space and run the same command again") \
            from None
    submitted = {n: ",".join(ids) for n, ids in jobs.items() if ids}
    console.print(f"Submitted {len(submitted)} Slurm stages ({', '.join(f'{n}: {j}' for n, j in submitted.items())})"
                  + ("" if wait else f"; follow with `edu-filter status {out}`"), soft_wrap=True)
    if not wait:
        return None
    return wait_for_chain(out, console)


SUBMIT_LIMIT = re.compile(r"MaxSubmitJob|job submit limit", re.IGNORECASE)  # QOS's, the association's


def submit_limit_hint(said: list[str], executors) -> str:
    """What to change where sbatch refused for the number of jobs: every array task counts against MaxSubmitJobs,
    and the whole chain is queued at once."""
    if not any(SUBMIT_LIMIT.search(line) for line in said):
        return ""
    jobs = chain_array_tasks(executors)
    return (f". The chain queues {jobs:,} array tasks at once and each counts as a job: give --slurm-tasks-per-job "
            "N to run N tasks in each (and a --slurm-time for N of them)")


def cancel_chain(out: str) -> list[str]:
    ids = sorted({j["id"].split("_")[0] for j in queued_jobs(out)})
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True)
    return ids


def squeue_interval(following_for: float) -> float:
    """Seconds between two squeue calls while --wait follows a chain: every second at first, so a stage refused or
    failing at once is told at once, then a tenth of the time followed, up to SQUEUE_MAX_INTERVAL_S. Each call is an
    RPC to the controller: a chain followed for a day asks ~3,000 times instead of 86,000 (schedulers' guidance, and
    workflow tools' defaults, are tens of seconds). Progress is read from the log files every POLL_S regardless."""
    return min(SQUEUE_MAX_INTERVAL_S, max(POLL_S, following_for / 10))


def progress_interval(following_for: float) -> float:
    """Seconds between two reads of the running stage's progress files while --wait follows a chain: every second
    at first, then up to PROGRESS_MAX_INTERVAL_S (a stage of 5,000 tasks is 5,000 files on a shared filesystem
    whose metadata server the whole cluster uses)."""
    return min(PROGRESS_MAX_INTERVAL_S, max(POLL_S, following_for / 60))


GONE_GRACE_S = 5.0  # a stage gone from the queue whose jobs' end Slurm no longer tells: its completion files' wait
COMPLETED_GRACE_S = 90.0  # jobs Slurm says completed: how long their completion files may take to be listed


def ended_job_states(job_ids: list[str]) -> set[str] | None:
    """The states Slurm still holds for these (array) jobs after they left the queue (`scontrol show job`: until the
    controller forgets them, MinJobAge, 5 minutes by default; no accounting needed); None when it tells none."""
    states = set()
    for job in job_ids:
        try:
            res = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True,
                                 timeout=SQUEUE_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if res.returncode == 0:
            states |= {field.split("=", 1)[1] for line in res.stdout.splitlines() for field in line.split()
                       if field.startswith("JobState=")}
    return states or None


def after_listing_grace(missing: Callable[[], list], grace: float = COMPLETED_GRACE_S, every: float = 5.0) -> list:
    """`missing()` (completion files not seen) asked again until it is empty or `grace` seconds have passed: files
    another node wrote may be listed late on a shared filesystem (NFS caches listings and failed lookups for up to a
    minute). Waits only where something is missing."""
    deadline = time.monotonic() + grace
    left = missing()
    while left and time.monotonic() < deadline:
        time.sleep(every)
        left = missing()
    return left


def gone_failed(waited: float, ended: set[str] | None) -> bool:
    """Whether a stage whose jobs left the queue `waited` seconds ago, some of its completion files not listed, has
    failed; `ended`: the states Slurm tells of its jobs (`ended_job_states`). Jobs Slurm says completed get
    COMPLETED_GRACE_S for their completion files to show: a shared filesystem (NFS caches a folder's listing for up
    to a minute) lists them late, and calling the stage failed cancelled a healthy chain. Jobs that failed, or whose
    end Slurm no longer tells, fail the stage after GONE_GRACE_S."""
    if ended and ended <= {"COMPLETED", "COMPLETING"}:
        return waited > COMPLETED_GRACE_S
    return waited > GONE_GRACE_S


def wait_for_chain(out: str, console) -> dict:
    """Follows a submitted chain until it ends; a failed or hopeless stage cancels the rest and raises StageFailed.
    While Slurm does not answer, it follows the chain's files alone, for up to SLURM_SILENT_MAX_S."""
    from edu_filter.filters.report import stats_table

    stages = load_stage_list(out)
    logs = f"{out}/logs"
    gone_since: dict[str, float] = {}
    told_held: set[str] = set()
    silent_since: float | None = None
    started, asked, read, finished_before = time.monotonic(), -math.inf, -math.inf, -1
    with ProgressDisplay(console, stages, logs) as display:
        while True:
            now = time.monotonic()
            if now - read >= progress_interval(now - started):
                states, read = display.refresh(), now
            if all(s.finished for s in states):
                break
            finished = sum(s.finished for s in states)
            if now - asked < squeue_interval(now - started) and finished == finished_before:
                time.sleep(POLL_S)
                continue
            asked, finished_before = now, finished  # squeue at once too when a stage has finished
            try:
                # while it is silent, a ping first: each squeue against a controller that is down took ~30 s, five
                # times, and the progress shown froze for minutes at a time
                if silent_since is not None and not slurm_answers():
                    raise RunError("the Slurm controller does not answer")
                jobs = queued_jobs(out)
            except RunError as e:
                if silent_since is None:
                    silent_since = now
                    console.print(f"[yellow]{escape(str(e))}; following the chain by its files until Slurm answers "
                                  "again[/]", soft_wrap=True)
                elif now - silent_since > SLURM_SILENT_MAX_S:
                    raise RunError(f"Slurm has not answered for {(now - silent_since) / 60:.0f} minutes ({e}); the "
                                   f"chain's jobs were left alone: `edu-filter status {out}` once Slurm answers, or "
                                   "the same apply command with --wait to follow them again") from None
                time.sleep(POLL_S)
                continue
            if silent_since is not None:
                silent_since = None
                console.print("Slurm answers again")
            for (name, tasks), state in zip(stages, states):
                if state.finished:
                    continue
                # a job of this stage waiting on one of its own that failed (the earlier stages are finished) never
                # runs, nor do the ones waiting on it in turn (Slurm says only "Dependency" of those)
                stage_jobs = [j for j in jobs if j["name"].startswith(f"edu-filter-{name}-")]
                broken = any(j["state"] == "PENDING" and j["reason"] == "DependencyNeverSatisfied" for j in stage_jobs)
                mine = [j for j in stage_jobs if not (j["state"] == "PENDING" and (
                    j["reason"] == "DependencyNeverSatisfied" or (broken and j["reason"] == "Dependency")))]
                hopeless = next((j for j in mine if j["state"] == "PENDING" and never_starts(j["reason"])), None)
                if hopeless:
                    cancel_chain(out)
                    raise StageFailed(f"stage {name} cannot start: {never_starts(hopeless['reason'])} (job "
                                      f"{hopeless['id']}); the chain was cancelled")
                holds = [j for j in mine if held(j) and j["id"] not in told_held]
                if holds:  # said once: the chain waits on them, and --wait with it, until someone releases them
                    told_held.update(j["id"] for j in holds)
                    ids = " ".join(j["id"] for j in holds[:20]) + (" ..." if len(holds) > 20 else "")
                    why = escape(holds[0]["reason"] or holds[0]["state"])
                    console.print(f"[yellow]stage {name}: Slurm holds {len(holds)} of its jobs ({why}); the chain "
                                  f"waits until they are released: `scontrol release {ids}`[/]", soft_wrap=True)
                if not mine:
                    # gone from the queue but not complete: failed, unless the completion files are on their way
                    waited = time.time() - gone_since.setdefault(name, time.time())
                    if (waited > GONE_GRACE_S and not read_stage_progress(logs, name, tasks, display.final[name]).finished
                            and gone_failed(waited, ended_job_states(submitted_jobs(out).get(name, [])))):
                        cancelled = cancel_chain(out)
                        raise StageFailed(failed_stage_message(out, name, tasks, slurm=True)
                                          + (f"; cancelled the {len(cancelled)} jobs waiting on it" if cancelled else ""))
                else:
                    gone_since.pop(name, None)
                break  # only the first unfinished stage can be running; later ones wait on it
            time.sleep(POLL_S)
    stats = json.loads((Path(out) / "stats.json").read_text())
    console.print(stats_table(stats))
    return stats


def show_status(out: str, console) -> dict:
    """`edu-filter status OUT`: per stage tasks done/total, documents and docs/s, and Slurm job states."""
    from rich.table import Table

    from edu_filter.filters.report import stats_table

    stages = load_stage_list(out)
    logs = f"{out}/logs"
    submitted = (Path(out) / "slurm").is_dir()  # a Slurm run (a dry run's scripts may have been submitted by hand)
    job_ids = submitted_jobs(out)
    jobs = queued_jobs(out) if submitted and slurm_answers() else None  # None: a Slurm run, its queue unknown now
    if submitted and jobs is None:
        console.print("[yellow]the Slurm controller does not answer: job states are unknown[/yellow]")
    console.print(f"edu-filter apply: {out}", soft_wrap=True, highlight=False)  # whole: a path to copy
    table = Table(title="stages")
    for col in ("stage", "tasks", "documents", "docs/s", "state"):
        table.add_column(col, justify="left" if col in ("stage", "state") else "right")
    summary = {"stages": []}
    unfinished = None  # the first stage not finished: the later ones wait on it
    for name, tasks in stages:
        s = read_stage_progress(logs, name, tasks)
        mine = [j for j in jobs or [] if j["name"].startswith(f"edu-filter-{name}-")]
        if s.finished:
            state = "done"
        elif submitted and jobs is None:
            state = "unknown (Slurm does not answer)"
        elif mine:
            counts: dict[str, int] = {}
            for j in mine:
                key = j["state"].lower() + (f" ({j['reason']})" if j["state"] == "PENDING" and j["reason"] else "")
                counts[key] = counts.get(key, 0) + 1
            state = ", ".join(f"{n} {k}" for k, n in counts.items())
        elif (killed := slurm_kill(Path(logs, name), job_ids.get(name, []))) is not None:
            state = f"incomplete: {killed[0]}"
        elif not submitted and (local := local_tasks(logs, name)):
            alive = sum(a is True for _, a in local)
            hosts = sorted({a for _, a in local if isinstance(a, str)})
            killed = [r for r, a in local if a is False]
            state = ", ".join(([f"{alive} running"] if alive else [])
                              + ([f"incomplete: task {killed[0]} was killed"] if killed else [])
                              + ([f"{len(local) - alive - len(killed)} started on {', '.join(hosts)} (`status` "
                                  "there tells running from killed)"] if hosts else []))
        elif failure := failed_task(out, name, tasks):
            state = failure
        elif submitted and jobs is not None and cancelled_by_slurm_state(job_ids.get(name, [])):
            # jobs waiting on a stage that failed are cancelled by --wait and by Slurm (kill_invalid_depend)
            state = f"not run: stage {unfinished} did not complete" if unfinished else f"incomplete: {CANCELLED}"
        elif s.tasks_done or s.started:
            state = "incomplete"
        else:
            state = "not started"
        unfinished = unfinished or (None if s.finished else name)
        table.add_row(name, f"{s.tasks_done}/{tasks}", f"{s.documents:,}" if s.reading else "",
                      f"{s.docs_per_second:,.1f}" if s.reading else "", state)
        summary["stages"].append({"name": name, "tasks": tasks, "tasks_done": s.tasks_done,
                                  "documents": s.documents, "state": state})
    console.print(unclipped(table))
    stats_path = Path(out) / "stats.json"
    if stats_path.exists():
        try:
            stats = json.loads(stats_path.read_text())
        except ValueError:  # cut short by a kill while an older edu-filter wrote it: the report stage rewrites it
            console.print(f"{stats_path} cannot be read (cut short); running the same apply command rewrites it")
        else:
            console.print(stats_table(stats))
            summary["stats"] = stats
            report = next((st for st in summary["stages"] if st["name"] == "report"), None)
            if report is not None and report["tasks_done"] < report["tasks"]:
                # stats.json comes first in the report stage: its provenance, card and work/ cleanup did not follow
                console.print("[yellow]the report stage did not finish (its provenance record and card are not "
                              "written, work/ is not removed): run the same apply command again to finish it[/]")
                summary["report_incomplete"] = True
    return summary
