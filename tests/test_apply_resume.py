"""A killed `edu-filter apply` resumes without duplicates on the local executor (SIGKILL to the run, to one worker),
and a task that raises is the failure named (the Ray executor's are in `test_apply_ray.py`).

The classifier is the stock MiniLM regression model of `test_apply.py`: its scores are meaningless but deterministic.
These tests sit apart from `test_apply.py` so that `make test`'s workers can run them alongside it; the clean run
they compare with is the session's `cli_tasks4` fixture (conftest.py), shared with `test_apply_ray.py`.
"""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from apply_corpus import (  # noqa: E402
    CLI,
    ENV,
    failed_run_stderr,
    fixture_args_into,
    read_kept,
    rerun_gives_the_clean_result,
    run_cli,
    sigkill_mid_scoring_then_rerun,
)

pytestmark = pytest.mark.slow  # datatrove pipelines and subprocesses in every test


def processes_left(session: int) -> str:
    """The processes of a session still running: an exited one (`<defunct>`) waits only for this machine's init to
    reap it, which takes a while on some."""
    listed = subprocess.run(["ps", "-o", "stat=,pid=,args=", "-s", str(session)], capture_output=True, text=True)
    return "".join(line + "\n" for line in listed.stdout.splitlines() if not line.lstrip().startswith("Z"))


@pytest.mark.slow
def test_cli_tasks_and_workers_with_default_dedup(cli_tasks4):
    tmp, _ = cli_tasks4
    stats = json.loads((tmp / "out" / "stats.json").read_text())
    assert stats["adds_up"] and stats["settings"]["tasks"] == 4
    assert stats["removed"]["duplicate"]["documents"] >= 15  # 8 groups of 3 leave 16 duplicates
    assert len(list((tmp / "out" / "logs" / "filter" / "completions").iterdir())) == 4
    kept = read_kept(tmp / "out")  # what the resume tests compare: about half the documents, from every task
    assert kept.height >= 20 and kept["int_score"].min() >= 2 and len(list((tmp / "out" / "kept").iterdir())) == 4


@pytest.mark.slow
def test_sigkill_then_rerun_gives_the_clean_result(cli_tasks4, tmp_path):
    """One killed run, checked for two things before its rerun (each kill-and-rerun costs a minute):

    A rerun after the duplicates found went missing (a scratch cleanup, work/ deleted) is refused, naming them:
    datatrove's filter read a missing .remove file as no duplicates, and kept them all, the counts adding up.

    A rerun task need not write to every destination its killed attempt did (a score flipped at the cut on other
    hardware; a first kept batch typed otherwise): those files would keep documents that now end elsewhere, their
    counts would be added in, and a Parquet file torn by the kill breaks loading kept/. Here each killed task's
    attempt also left a torn second kept file, a schema-mismatch record and its counts; the rerun clears them."""
    import gzip
    import shutil

    import orjson

    def lose_the_duplicates_found(out: Path) -> None:
        found = out / "work" / "minhash" / "remove"
        shutil.move(found, tmp_path / "found")
        res = run_cli(fixture_args_into(cli_tasks4, out), timeout=300)
        assert res.returncode == 2, res.stderr[-3000:]
        said = " ".join(res.stderr.split())
        assert f"the duplicates the dedup found are gone from {found}" in said and "--overwrite" in said, said
        shutil.move(tmp_path / "found", found)  # back: the run resumes

    def leave_leftovers(out: Path, ranks: list[int]) -> None:
        assert ranks
        for r in ranks:
            (out / "kept").mkdir(exist_ok=True)
            (out / "kept" / f"001_{r:05d}.parquet").write_bytes(b"PAR1 torn by the kill")
            failed = out / "failed" / "schema_mismatch"
            failed.mkdir(parents=True, exist_ok=True)
            with gzip.open(failed / f"kept_{r:05d}.jsonl.gz", "wb") as fh:
                fh.write(orjson.dumps({"id": f"stale-{r}", "text": "x", "filter_reason": "schema_mismatch"}) + b"\n")
            counts = out / "logs" / "counts" / "failed-kept"
            counts.mkdir(parents=True, exist_ok=True)
            (counts / f"{r:05d}.json").write_text(json.dumps({"failed/schema_mismatch": [1, 1]}))

    def between(out: Path, ranks: list[int]) -> None:
        lose_the_duplicates_found(out)
        leave_leftovers(out, ranks)

    sigkill_mid_scoring_then_rerun(cli_tasks4, tmp_path / "out", [], between=between)


@pytest.mark.slow
def test_a_task_process_killed_alone_fails_the_run_naming_it_and_the_rerun_gives_the_clean_result(cli_tasks4,
                                                                                                  tmp_path):
    """The kernel's out-of-memory killer takes one process: a local worker in the middle of a scoring task. The
    process pool would wait for that task forever; the run instead stops within seconds, naming the task and what to
    change, leaves no process behind, and the same command then ends with the clean run's result."""
    out = tmp_path / "out"
    args = fixture_args_into(cli_tasks4, out)
    proc = subprocess.Popen(CLI + args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    running, completions = out / "logs" / "filter" / "running", out / "logs" / "filter" / "completions"
    deadline, rank = time.time() + 400, None
    while rank is None and time.time() < deadline and proc.poll() is None:
        for marker in running.glob("*") if running.exists() else []:
            with contextlib.suppress(OSError, ValueError):
                pid = int(marker.read_text().split()[0])  # "PID HOST"
                if pid != proc.pid and not (completions / marker.name).exists():
                    os.kill(pid, signal.SIGKILL)  # that worker alone, mid-task
                    rank = int(marker.name)
                    break
        time.sleep(0.05)
    assert rank is not None, "no scoring task was seen running"
    stderr = failed_run_stderr(proc, timeout=120)
    # that task, or the next one if its worker had just finished it (its completion written, its result not sent)
    assert (re.search(r"stage filter failed: the process of task \d was killed before the task finished", stderr)
            and "fewer --workers" in stderr), stderr[-3000:]
    time.sleep(2)
    left = processes_left(proc.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # whatever is left, before failing on it
    assert not left.strip(), f"processes of the run left behind:\n{left}"
    rerun_gives_the_clean_result(cli_tasks4, out, args)
    assert not list(running.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("replaced", [0, 1])
def test_a_task_that_raises_beside_running_ones_is_the_failure_named_not_a_kill(cli_tasks4, tmp_path, replaced):
    """With two workers, a task that raises ends datatrove's process pool, which kills the task running beside it
    mid-run: the run names the failure that started it (an input file replaced during the run), not a killed task,
    and shows the log of the task that raised, not the lowest unfinished one's (rank 0, stopped without an error)."""
    source = cli_tasks4[0] / "in.jsonl"
    rows = source.read_bytes().splitlines(keepends=True)
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    for i in range(4):  # a file per task
        (folder / f"part{i}.jsonl").write_bytes(b"".join(rows[i::4]))
    args = [str(folder) if a == str(source) else a for a in fixture_args_into(cli_tasks4, out)]
    proc = subprocess.Popen(CLI + args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    signatures = out / "logs" / "minhash-signatures" / "completions"
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and len(list(signatures.glob("*"))) < 4:
        time.sleep(0.05)
    part = folder / f"part{replaced}.jsonl"
    stat = part.stat()
    os.utime(part, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**10))  # replaced, for the run
    stderr = failed_run_stderr(proc, timeout=300)
    assert f"part{replaced}.jsonl was replaced during this run" in stderr and "was killed" not in stderr, stderr[-3000:]
    assert f"task_{replaced:05d}.log" in stderr, stderr[-3000:]


@pytest.mark.slow
def test_a_stats_file_cut_short_by_a_kill_is_rebuilt_by_the_rerun(cli_tasks4, tmp_path):
    """stats.json was written in place: a kill mid-write (a time limit in the report stage) left a file every later
    rerun failed on in its report stage, and `status` on. It is written whole now; one cut short by an older
    version, or deleted, is rebuilt."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(cli_tasks4[0] / "out", out)
    whole = (out / "stats.json").read_text()
    (out / "stats.json").write_text(whole[: len(whole) // 2])
    shutil.rmtree(out / "logs" / "report" / "completions")
    # and `status` of a local run, its report task killed (its process gone), running in a live process, and
    # started on another machine (a shared filesystem: its process id says nothing here)
    ended = subprocess.Popen(["true"])
    ended.wait()
    marker = out / "logs" / "report" / "running" / "00000"
    marker.parent.mkdir(parents=True, exist_ok=True)
    for text, state in ((f"{ended.pid} {socket.gethostname()}", "incomplete: task 0 was killed"),
                        (str(os.getpid()), "1 running"),  # as an older version wrote it
                        (f"{os.getpid()} node-17", "1 started on node-17")):  # another machine's process
        marker.write_text(text)
        status = subprocess.run([*CLI, "status", str(out)], capture_output=True, text=True, timeout=300,
                                env={**ENV, "COLUMNS": "200"})
        assert status.returncode == 0 and "cannot be read (cut short)" in status.stdout, status.stderr[-2000:]
        assert re.search(rf"report .* 0/1 .* {state}", status.stdout), status.stdout
    marker.unlink()
    # ... and the task ended with an error (its log says which): "incomplete" said nothing of it
    log = out / "logs" / "report" / "logs" / "task_00000.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("Traceback (most recent call last):\n  File ...\nOSError: [Errno 28] No space left on device\n")
    status = subprocess.run([*CLI, "status", str(out)], capture_output=True, text=True, timeout=300,
                            env={**ENV, "COLUMNS": "200"})
    said = " ".join(status.stdout.split())
    assert "failed: task 0: OSError: [Errno 28] No space left on device" in said and "task_00000.log" in said, said
    rerun_gives_the_clean_result(cli_tasks4, out, fixture_args_into(cli_tasks4, out))
    assert json.loads((out / "stats.json").read_text())["in"] == json.loads(whole)["in"]
    assert not list(out.glob(".partial-*"))
    # deleted from a finished run: the report stage was skipped as done, and every rerun failed on the missing file
    (out / "stats.json").unlink()
    stderr = rerun_gives_the_clean_result(cli_tasks4, out, fixture_args_into(cli_tasks4, out))
    assert "stats.json is missing or unreadable: the report stage runs again" in " ".join(stderr.split())
    assert json.loads((out / "stats.json").read_text())["in"] == json.loads(whole)["in"]


@pytest.mark.slow
def test_a_run_stopped_alone_takes_its_workers_and_a_rerun_beside_left_ones_is_refused(cli_tasks4, tmp_path):
    """`kill PID` (SIGTERM) to the run alone ended the process and left datatrove's workers finishing their tasks
    unwatched, and a rerun then ran the same tasks beside them, both writing their files. The run now stops through
    its cleanup, its workers with it; and a task of an earlier run still running here stops a rerun, naming it."""
    out = tmp_path / "out"
    args = fixture_args_into(cli_tasks4, out)
    proc = subprocess.Popen(CLI + args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    running = out / "logs" / "filter" / "running"
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None and not (running.exists() and any(running.iterdir())):
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGTERM)  # the run's own process alone
    proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    time.sleep(2)
    left = processes_left(proc.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    assert not left.strip(), f"processes of the run left behind:\n{left}"

    # a worker an earlier run left (here: a stand-in process of Python) holding task 1; task 0's process id is now
    # another Python process's (a container's runs are all process 1: the rerun was refused for its own id)
    stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (running / "00000").write_text(f"{os.getpid()} {socket.gethostname()} 1")
        (running / "00001").write_text(f"{stand_in.pid} {socket.gethostname()}")  # as the previous release wrote it
        res = run_cli(args)
        assert res.returncode == 1 and (f"task 1 of stage filter is still running in process {stand_in.pid}"
                                        in " ".join(res.stderr.split())), res.stderr[-3000:]
        # --overwrite, the flag reached for after a crash, removed the logs (the markers with them) unlooked at
        res = run_cli([*args, "--overwrite"])
        assert res.returncode == 1 and (f"task 1 of stage filter is still running in process {stand_in.pid}"
                                        in " ".join(res.stderr.split())), res.stderr[-3000:]
    finally:
        stand_in.kill()
        stand_in.wait()
    assert (running / "00001").exists()  # left for the rerun to see (a resume after a kill is tested above)


def test_a_run_killed_alone_leaves_no_process_behind(cli_tasks4, tmp_path):
    """`kill -9` to the run alone (a batch system's, the kernel's): datatrove's manager process (~230 MB) stayed
    until killed by hand, one per killed run; its workers end once their task is done."""
    out = tmp_path / "out"
    proc = subprocess.Popen(CLI + fixture_args_into(cli_tasks4, out), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    running = out / "logs" / "minhash-signatures" / "running"
    try:
        deadline = time.time() + 400
        while time.time() < deadline and proc.poll() is None and not (running.exists() and any(running.iterdir())):
            time.sleep(0.05)
        assert proc.poll() is None
        proc.kill()  # the run's own process alone
        proc.wait()
        deadline, left = time.time() + 90, "?"
        while time.time() < deadline and left:
            time.sleep(1)
            left = processes_left(proc.pid).strip()
        assert not left, f"processes of the run left behind:\n{left}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


MANAGERS = """
import multiprocess
from edu_filter.filters.executors import _ManagersEndingWithTheRun
if __name__ == "__main__":
    for method in ("fork", "spawn", "forkserver"):
        multiprocess.set_start_method(method, force=True)
        manager = _ManagersEndingWithTheRun(multiprocess).Manager()
        queue = manager.Queue()
        queue.put(method)
        print(queue.get(), end=" ")
        manager.shutdown()
"""


def test_the_manager_starts_under_every_start_method(tmp_path):
    """A fork server's child has the server for its parent: the manager took its parent for gone and exited before
    it answered, every local run failing (forkserver is Python 3.14's default on Linux)."""
    script = tmp_path / "managers.py"
    script.write_text(MANAGERS)
    ran = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert ran.stdout.split() == ["fork", "spawn", "forkserver"], ran.stderr[-2000:]


STOPPING = """
import os, socket, subprocess, sys, time
from edu_filter.filters.executors import stop_local_tasks
running = os.path.join(sys.argv[1], "stage", "running")
os.makedirs(running)
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
here = socket.gethostname()
for rank, pid in ((0, os.getpid()), (1, worker.pid)):
    with open(os.path.join(running, f"{rank:05d}"), "w") as fh:
        fh.write(f"{pid} {here}")
stop_local_tasks(sys.argv[1], "stage")
print("still here, worker", worker.wait(timeout=10))
"""


def test_stopping_a_run_kills_its_workers_and_spares_its_own_process(tmp_path):
    """With one worker datatrove runs the task in the run's own process: stopping the run (Ctrl-C, SIGTERM) sent
    that process SIGKILL, ending it without its cleanup or a message (exit 137, as an out-of-memory kill reads)."""
    res = subprocess.run([sys.executable, "-c", STOPPING, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and f"still here, worker {-signal.SIGKILL}" in res.stdout, res.stderr[-2000:]


@pytest.mark.slow
def test_a_second_run_of_an_output_is_refused_while_another_writes_it(cli_tasks4, tmp_path):
    """A second run of an output while one writes it (--overwrite, or the same command on another node) removed the
    first's files as they were written: kept documents lost, or made under two thresholds. It is refused, naming
    the run holding the output's lock (here this process, as a run holds it), and writes nothing."""
    from edu_filter.documents import writing_alone
    from edu_filter.filters.apply import APPLY_LOCK

    out = tmp_path / "out"
    with writing_alone(out, "-o/--output", lock=out / APPLY_LOCK):
        second = run_cli(fixture_args_into(cli_tasks4, out) + ["--threshold", "4", "--overwrite"])
    assert second.returncode == 1 and (f"-o/--output {out} is being written by another run (process {os.getpid()} "
                                       "on " in " ".join(second.stderr.split())), second.stderr[-3000:]
    assert [p.name for p in out.iterdir()] == [APPLY_LOCK]


def test_a_marker_naming_this_process_is_an_earlier_runs(tmp_path):
    """In a container every run is process 1: a task file the previous release wrote ("PID HOST", no start time)
    named the rerun itself, which was refused on every attempt and told to kill itself."""
    from datatrove.io import get_datafolder

    from edu_filter.filters.executors import forget_killed

    (tmp_path / "running").mkdir()
    (tmp_path / "running" / "00000").write_text(f"{os.getpid()} {socket.gethostname()}")
    forget_killed(get_datafolder(str(tmp_path)))
    assert not list((tmp_path / "running").iterdir())
