"""`apply --executor slurm` on a real one-node Slurm cluster (Debian's slurm-wlm + munge) started on this machine.

The cluster is installed and started by `tests/slurm/start_cluster.sh` when the tests run as root (as CI does);
elsewhere these tests are skipped with the reason. Jobs run the real datatrove Slurm executor through sbatch.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from apply_corpus import CLI, ENV, planted_input, read_outputs  # noqa: E402
from apply_corpus import run_cli as cli  # noqa: E402

START_CLUSTER = Path(__file__).parent / "slurm" / "start_cluster.sh"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def slurm_partition() -> str:
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster is installed and started as root (as in CI); not root here")
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        pytest.skip("no apt-get to install slurm-wlm and munge, and no Slurm installed")
    res = subprocess.run(["bash", str(START_CLUSTER)], capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        pytest.fail(f"could not start the local Slurm cluster: {res.stderr[-2000:]}")
    return res.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("slurm-corpus")
    planted = planted_input(tmp / "corpus.jsonl", n_unique=48, n_groups=8)
    return tmp / "corpus.jsonl", planted


def apply_args(corpus: Path, model: str, out: Path) -> list[str]:
    return ["apply", str(corpus), "--model", model, "--threshold", "3", "--executor", "slurm", "--tasks", "4",
            "--slurm-cpus", "1", "--slurm-mem-gb", "2", "-o", str(out), "--wait", "--slurm-account", "edu-tests",
            "--slurm-qos", "normal", "--slurm-arg", "comment=edu-filter-tests", "--slurm-arg", "no-kill"]


# what a shell inside an allocation made with --mem holds (salloc, or the launcher run as a job): through
# --export=ALL srun in every job stopped with "SLURM_MEM_PER_CPU, SLURM_MEM_PER_GPU, and SLURM_MEM_PER_NODE are
# mutually exclusive"
IN_AN_ALLOCATION = {"SLURM_JOB_ID": "999999", "SLURM_MEM_PER_NODE": "512", "SLURM_CPU_BIND": "quiet,none"}


@pytest.fixture(scope="module")
def clean_run(slurm_partition, corpus, stock_classifier, tmp_path_factory):
    """The chain submitted from inside an allocation, followed with --wait."""
    out = tmp_path_factory.mktemp("slurm-clean") / "out"
    res = cli(apply_args(corpus[0], stock_classifier, out), env=IN_AN_ALLOCATION, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res


def test_slurm_wait_runs_the_chain_and_every_document_lands_once(clean_run, corpus):
    out, res = clean_run
    planted = corpus[1]
    found = read_outputs(out)
    everything = [i for ids in found.values() for i in ids]
    assert len(everything) == len(set(everything))
    readable = set(planted["ids"])
    assert readable <= set(everything) and sum(len(v) for k, v in found.items() if k.startswith("failed/")) == 4
    collapsed = 0
    for original, near, copy in planted["groups"].values():
        survivors = {original, near, copy} - set(found.get("removed/duplicate", []))
        # exact copies always collapse; one of the group survives (the near copy, where it is read first)
        assert len(survivors & {original, copy}) <= 1 and survivors and (len(survivors) == 1 or near in survivors)
        collapsed += len(survivors) == 1  # near copies (~0.78 Jaccard) are caught with probability ~0.87
    assert collapsed >= 6
    stats = json.loads((out / "stats.json").read_text())
    assert stats["adds_up"] and stats["in"]["documents"] == len(planted["ids"]) + 4
    assert stats["peak_scratch_bytes"] > 0 and not (out / "work").exists()  # no corpus copy left behind
    scripts = list(out.glob("logs/*/launch_script.slurm"))
    assert len(scripts) >= 4  # one per stage
    for script in scripts:
        lines = script.read_text().splitlines()
        assert "%" not in next(line for line in lines if "--array" in line)
        # the account, QOS and other sbatch options given reach every job the cluster ran
        assert {"#SBATCH --account=edu-tests", "#SBATCH --qos=normal", "#SBATCH --comment=edu-filter-tests",
                "#SBATCH --no-kill"} <= set(lines), script
    assert "counts add up" in res.stderr and "filter" in res.stderr


def test_a_dry_runs_submit_script_runs_the_chain_on_the_cluster(clean_run, corpus, stock_classifier, tmp_path):
    """The scripts a dry run writes are the chain: submit.sh, run from anywhere, queues the stages in order, and
    the chain gives what `--wait` gave (the same documents kept and removed), its tasks two to an array task."""
    from edu_filter.filters import executors as ex

    out = tmp_path / "out"
    args = [a for a in apply_args(corpus[0], stock_classifier, out) if a != "--wait"] + ["--dry-run"]
    res = cli([*args, "--slurm-tasks-per-job", "2"], timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert ex.queued_jobs(str(out)) == []  # nothing submitted

    def array(stage: str) -> str:
        script = next((out / "slurm").glob(f"*_{stage}.slurm")).read_text()
        return next(line for line in script.splitlines() if line.startswith("#SBATCH --array="))

    # --slurm-tasks-per-job is for the stages of many tasks: it packed MinHash's 14 bucket merges (hours each at
    # terabytes) into 7 array tasks running them one after another within one --slurm-time
    assert array("minhash-signatures") == "#SBATCH --array=0-1" and array("filter") == "#SBATCH --array=0-1"
    assert array("minhash-buckets") == "#SBATCH --array=0-13" and array("minhash-cluster") == "#SBATCH --array=0-0"
    submitted = subprocess.run(["bash", str(out / "slurm" / "submit.sh")], cwd="/", capture_output=True, text=True,
                               timeout=120, env={**os.environ, **IN_AN_ALLOCATION})
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    assert submitted.stdout.count(": job ") >= 4  # a line per stage
    record = (out / "slurm" / "jobs.json").read_text()
    again = subprocess.run(["bash", str(out / "slurm" / "submit.sh")], cwd="/", capture_output=True, text=True,
                           timeout=120)  # run twice, two chains would run every task at once
    assert again.returncode == 1 and "still queued or running" in again.stderr, again.stderr[-3000:]
    assert (out / "slurm" / "jobs.json").read_text() == record
    echoed = dict(line.split(": job ") for line in submitted.stdout.splitlines() if ": job " in line)
    # recorded as `apply` records its own submission: status, --wait and the next run's checks read them
    assert {name: ids[-1] for name, ids in ex.submitted_jobs(str(out)).items()} == echoed
    assert set(json.loads((out / "slurm" / "arrays.json").read_text())) >= set(echoed)
    # the same command with --wait while the chain runs (a login node's apply killed, a closed session) follows it
    # to the end: it was refused as "still queued", and the advice after an hour of Slurm silence was that command
    followed = cli([*apply_args(corpus[0], stock_classifier, out), "--slurm-tasks-per-job", "2"], timeout=600)
    assert followed.returncode == 0, followed.stderr[-3000:]
    said = " ".join((followed.stdout + followed.stderr).split())
    assert "is queued or running: following it" in said and "Submitted" not in said, said[-3000:]
    assert (out / "slurm" / "jobs.json").read_text() == record
    stats = json.loads((out / "stats.json").read_text())
    assert stats["adds_up"]
    assert {k: sorted(v) for k, v in read_outputs(out).items()} == {
        k: sorted(v) for k, v in read_outputs(clean_run[0]).items()}


def test_status_reads_a_finished_slurm_run(clean_run):
    out, _ = clean_run
    res = cli(["status", str(out)])
    assert res.returncode == 0, res.stderr
    assert "minhash-buckets" in res.stdout and "14/14" in res.stdout and "done" in res.stdout
    assert "counts add up" in res.stdout


def test_a_request_no_node_can_satisfy_is_refused_before_submitting(slurm_partition, corpus, stock_classifier,
                                                                    tmp_path):
    cpus = os.cpu_count() + 2
    res = cli(["apply", str(corpus[0]), "--model", stock_classifier, "--executor", "slurm", "--slurm-cpus",
               str(cpus), "-o", str(tmp_path / "out")], timeout=120)
    assert res.returncode == 2 and f"--slurm-cpus {cpus}: no node of partition" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "out").exists()
    res = cli(["apply", str(corpus[0]), "--model", stock_classifier, "--executor", "slurm", "--slurm-partition",
               "no-such-partition", "-o", str(tmp_path / "out")], timeout=120)
    assert res.returncode == 2 and "'no-such-partition' does not exist" in res.stderr
    res = cli(["apply", str(corpus[0]), "--model", stock_classifier, "--executor", "slurm", "--slurm-cpus", "1",
               "--slurm-gpu-cpus", str(cpus), "-o", str(tmp_path / "out")], timeout=120)
    assert res.returncode == 2 and f"--slurm-gpu-cpus {cpus}: no node of partition" in res.stderr
    res = cli(["apply", str(corpus[0]), "--model", stock_classifier, "--executor", "slurm", "--slurm-cpus", "1",
               "--slurm-cluster-mem-gb", "100000", "-o", str(tmp_path / "out")], timeout=120)
    assert res.returncode == 2 and "100000 GB per task: no node of partition" in res.stderr
    assert "(--slurm-cluster-mem-gb)" in res.stderr
    # what only the controller knows (features, reservations, accounts), asked with sbatch --test-only
    for option, said in (("constraint=no-such-feature", "Invalid feature specification"),
                         ("reservation=no-such-reservation", "reservation is invalid")):
        res = cli(["apply", str(corpus[0]), "--model", stock_classifier, "--executor", "slurm", "--slurm-cpus", "1",
                   "--slurm-arg", option, "-o", str(tmp_path / "out")], timeout=120)
        assert res.returncode == 2 and "Slurm would refuse the jobs" in res.stderr and said in res.stderr, res.stderr
        assert f"--{option}" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()
    assert not subprocess.run(["squeue", "-h", "-o", "%j"], capture_output=True, text=True).stdout.strip()


def test_array_jobs_are_as_large_as_the_clusters_max_array_size(slurm_partition, tmp_path):
    """A stage's array jobs run one after another: at Slurm's default of 1,001 tasks each, 50,000 tasks were 50 of
    them where the cluster takes 10,001. The cluster's MaxArraySize is the default; a larger one given is refused
    before anything is submitted (sbatch refused each array job)."""
    import re

    from edu_filter.documents import DocumentError
    from edu_filter.filters import executors as ex
    from edu_filter.filters.apply import SlurmOptions

    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, check=True).stdout
    most = int(re.search(r"MaxArraySize\s*=\s*(\d+)", config).group(1))
    assert most != ex.SLURM_MAX_ARRAY_SIZE  # the test cluster's differs from Slurm's default
    asked = SlurmOptions(partition=slurm_partition, cpus_per_task=1, mem_gb=1)
    assert ex.check_slurm_request(asked).max_array_size == most
    assert ex.check_slurm_request(replace(asked, dry_run=True)).max_array_size == most  # a cluster answers here
    assert ex.check_slurm_request(replace(asked, max_array_size=5)).max_array_size == 5
    with pytest.raises(DocumentError, match=rf"--slurm-max-array {most + 1}: the cluster takes at most {most} tasks"):
        ex.check_slurm_request(replace(asked, max_array_size=most + 1))
    res = cli(["apply", str(tmp_path / "in.jsonl"), "--model", "m", "--executor", "slurm", "--slurm-max-array",
               str(most + 1), "-o", str(tmp_path / "out")], timeout=120)
    assert res.returncode == 2 and "MaxArraySize" in res.stderr and not (tmp_path / "out").exists(), res.stderr
    # a site allowing indices to 100,000 and 1,000 tasks per array job (slurm.conf's own example)
    assert ex.array_limit("MaxArraySize            = 100001\nSchedulerParameters     = bf_interval=1,"
                          "max_array_tasks=1000,sched_interval=1\n") == 1000
    assert ex.array_limit("MaxArraySize = 1001\nSchedulerParameters = (null)\n") == 1001
    # the jobs the whole cluster holds (MaxJobCount, 10,000 by default): a chain of 10,000 --tasks queues ~30,000
    from edu_filter.documents import InputError

    limit = ex.max_job_count(config)
    assert limit == int(re.search(r"MaxJobCount\s*=\s*(\d+)", config).group(1))
    ex.check_job_count(limit, limit)
    with pytest.raises(InputError, match=rf"queues {3 * limit + 450:,} array tasks .* at most {limit:,} jobs "
                                         r"\(MaxJobCount.*--slurm-tasks-per-job N .*N >= 4"):
        ex.check_job_count(3 * limit + 450, limit)


def test_a_partition_drained_for_maintenance_gets_the_chain_queued_with_a_warning(slurm_partition, corpus,
                                                                                   stock_classifier, tmp_path):
    """Every node drained: `sbatch --test-only` says no node could take the jobs, while sbatch itself queues them
    to start when the nodes are back. The request check must not refuse what Slurm would accept."""
    from edu_filter.filters import executors as ex

    node, cpus, mem_mb = subprocess.run(["sinfo", "-h", "-N", "-p", slurm_partition, "-o", "%N %c %m"],
                                        capture_output=True, text=True, check=True).stdout.split()[:3]
    # only nodes that fit count: a mixed partition whose GPU nodes are drained takes no GPU job, its CPU nodes up
    assert ex.usable_nodes(slurm_partition, int(cpus), int(mem_mb)) == 1
    assert ex.usable_nodes(slurm_partition, int(cpus) + 1) == 0
    assert ex.usable_nodes(slurm_partition, 1, int(mem_mb) + 1) == 0
    assert ex.usable_nodes(slurm_partition, 1, 0, gpus=1) == 0
    assert ex.usable_nodes("no-such-partition") == 0  # sinfo lists nothing for it (the request check refuses it)
    out = tmp_path / "out"
    subprocess.run(["scontrol", "update", f"nodename={node}", "state=drain", "reason=edu-filter-test"], check=True)
    try:
        assert ex.usable_nodes(slurm_partition) == 0
        res = cli(["apply", str(corpus[0]), "--model", stock_classifier, "--threshold", "3", "--executor", "slurm",
                   "--tasks", "2", "--slurm-cpus", "1", "--slurm-mem-gb", "2", "-o", str(out)], timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        assert (f"no node of partition {slurm_partition} that fits these jobs (1 CPU) takes jobs now (drained or "
                "down)") in res.stderr
        states = {job["state"] for job in ex.queued_jobs(str(out))}
        assert states == {"PENDING"}, states
        # a local run into the same folder would rewrite the files the queued jobs will read
        local = cli(["apply", str(corpus[0]), "--model", stock_classifier, "--threshold", "3", "--tasks", "2",
                     "-o", str(out)], timeout=300)
        assert local.returncode == 2 and "still queued or running" in local.stderr, local.stderr[-2000:]
    finally:
        ex.cancel_chain(str(out))
        subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"], check=True)


def requeue_now(job: str) -> None:
    """What preemption on a requeue partition (or a node failure, with Slurm's default JobRequeue) does to a running
    task: killed and queued again. Slurm holds a requeued job ~2 minutes; the test lets it start again at once."""
    subprocess.run(["scontrol", "requeue", job], check=True, capture_output=True)
    for _ in range(600):
        state = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True).stdout.strip()
        if state == "PENDING":
            break
        time.sleep(0.1)
    subprocess.run(["scontrol", "update", f"jobid={job}", "starttime=now"], check=True, capture_output=True)


def test_a_requeued_task_then_scancel_mid_chain_then_rerun_give_the_clean_result(clean_run, corpus, stock_classifier,
                                                                                 tmp_path):
    """A signature task killed and requeued mid-run runs again inside the chain (the later stages wait on it and its
    rerun writes its files afresh); then the whole chain is cancelled in its last stage and the same command
    resumes it."""
    from edu_filter.filters.executors import queued_jobs

    clean_out, _ = clean_run
    out = tmp_path / "out"
    args = apply_args(corpus[0], stock_classifier, out)
    proc = subprocess.Popen(CLI + args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    completions = out / "logs" / "filter" / "completions"
    requeued = None
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if requeued is None:
            signatures = [j for j in queued_jobs(str(out))
                          if j["name"].startswith(("edu-filter-minhash-signatures-", "edu-filter-exact-signatures-"))]
            running = [j for j in signatures if j["state"] == "RUNNING"]
            # another task of its stage still queued: the next stage cannot have started, even if this one ends now
            if running and sum(j["name"] == running[0]["name"] for j in signatures) >= 2:
                requeued = running[0]["id"]
                requeue_now(requeued)
        done = len(list(completions.iterdir())) if completions.exists() else 0
        if 1 <= done < 4:
            break
        time.sleep(0.1)
    assert requeued is not None, "no signature task was seen running to requeue"
    restarts = subprocess.run(["scontrol", "-o", "show", "job", requeued], capture_output=True, text=True).stdout
    assert "Restarts=1" in restarts, restarts  # it ran again and completed: the filter stage waited on it
    jobs = json.loads((out / "slurm" / "jobs.json").read_text())  # every array job of each stage
    subprocess.run(["scancel", *[j for ids in jobs.values() for j in ids]], check=True)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stderr[-3000:]
    # names the stage and where to look: the log of a task cancelled while it ran, or the stage's Slurm logs where
    # every unfinished task was cancelled before it started
    assert "stage filter failed" in stderr and re.search(r"; logs?: /", stderr), stderr[-3000:]
    # and that it was cancelled (its tasks' logs, or Slurm's states of those that never started), not a log of a task
    # that completed and its progress line
    assert "cancelled (scancel, by you or an administrator)" in stderr, stderr[-3000:]
    assert not (out / "stats.json").exists()

    res = cli(args, timeout=900)  # the same command resumes: only the missing tasks are submitted again
    assert res.returncode == 0, res.stderr[-3000:]
    clean, resumed = read_outputs(clean_out), read_outputs(out)
    assert len(resumed["kept"]) == len(set(resumed["kept"]))
    assert {k: sorted(v) for k, v in resumed.items()} == {k: sorted(v) for k, v in clean.items()}
    assert json.loads((out / "stats.json").read_text())["adds_up"]


def test_a_failed_array_job_stops_the_chain_when_a_stage_spans_several(slurm_partition, tmp_path, monkeypatch):
    """With more tasks than --slurm-max-array a stage is several array jobs; datatrove chains them with afterany and
    the next stage waited on the last one only, so it ran although the first had failed. With three or more, the
    third waited on the second (DependencyNeverSatisfied) saying only "Dependency", and --wait waited forever.
    SQUEUE_STATES=all (squeue then lists ended jobs for MinJobAge, 5 minutes) does not hide the failure."""
    from rich.console import Console

    from edu_filter.filters import executors as ex
    from edu_filter.filters.apply import SlurmOptions, Stage

    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))  # the jobs import the steps below
    monkeypatch.setenv("SQUEUE_STATES", "all")
    from slurm_steps import FailOnRank, WriteMarker

    out, ran = tmp_path / "out", tmp_path / "ran"
    stages = [Stage("first", [FailOnRank(0), WriteMarker(str(ran / "first"))], 3),
              Stage("second", [WriteMarker(str(ran / "second"))], 1),
              Stage("report", [WriteMarker(str(ran / "report"))], 1)]
    ex.save_stage_list(str(out), stages)
    opts = ex.check_slurm_request(SlurmOptions(partition=slurm_partition, cpus_per_task=1, mem_gb=1,
                                               max_array_size=1, time="00:05:00"))
    # task 1's array job waits on task 0's (afterok), task 2's on task 1's: Slurm cancels them (kill-on-invalid-dep),
    # and what is left of the chain is cancelled
    started = time.time()
    with pytest.raises(ex.StageFailed, match=r"stage first failed \(3/3 tasks did not complete: 0, 1, 2\).*planted "
                                             r"failure in task 0"):
        ex.run_slurm(stages, str(out), None, opts, wait=True, console=Console(quiet=True))
    assert time.time() - started < 240
    assert not (ran / "second").exists() and not (ran / "report").exists()
    assert ex.queued_jobs(str(out)) == []  # the jobs that could never run were cancelled
    # `status` says why the later stages never ran, not that someone cancelled them
    states = {st["name"]: st["state"] for st in ex.show_status(str(out), Console(quiet=True))["stages"]}
    assert states["second"] == states["report"] == "not run: stage first did not complete", states


def test_tasks_per_job_runs_each_task_once_on_fresh_steps_and_a_failure_leaves_only_itself(slurm_partition, tmp_path,
                                                                                           monkeypatch):
    """--slurm-tasks-per-job 2: five tasks are three array tasks. Each task counts only its own work (datatrove ran
    a job's tasks on the same steps: the second's stats counted the first's), a failing task does not stop the
    job's other one, and the same chain resumed runs only the task that failed. A job Slurm holds (a launch failed
    on a node: "launch failed requeued held") stopped the chain with no word: --wait now names it and the command
    that releases it."""
    import io
    import threading

    from rich.console import Console

    from edu_filter.filters import executors as ex
    from edu_filter.filters.apply import SlurmOptions, Stage

    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))  # the jobs import the steps below
    from slurm_steps import FailOnRank, WriteMarker, WriteStats

    out, ran = tmp_path / "out", tmp_path / "ran"
    opts = ex.check_slurm_request(SlurmOptions(partition=slurm_partition, cpus_per_task=1, mem_gb=1, tasks_per_job=2,
                                               time="00:05:00"))

    def chain(failing: int, wait: bool):
        stages = [Stage("first", [FailOnRank(failing), WriteMarker(str(ran / "first"))], 5),
                  Stage("report", [WriteMarker(str(ran / "report")), WriteStats(str(out))], 1)]
        ex.save_stage_list(str(out), stages)
        return ex.run_slurm(stages, str(out), 2, opts, wait=wait, console=Console(quiet=True))

    with pytest.raises(ex.StageFailed, match=r"stage first failed \(1/5 tasks did not complete: 2\)"):
        chain(failing=2, wait=True)
    # 3 shares a job with 2 and ran all the same
    assert sorted(p.name for p in (ran / "first").iterdir()) == ["0", "1", "2", "3", "4"]
    assert sorted(p.name for p in (out / "logs" / "first" / "completions").iterdir()) == [
        "00000", "00001", "00003", "00004"]
    script = (out / "logs" / "first" / "launch_script.slurm").read_text()
    assert "#SBATCH --array=0-2%2" in script  # 2 tasks at once: 2 array tasks, each running its tasks in turn
    for rank in (0, 1, 3, 4):
        stats = json.loads((out / "logs" / "first" / "stats" / f"{rank:05d}.json").read_text())
        assert [s["stats"]["ran"] for s in stats if s["name"].endswith("marker")] == [1], stats
    shutil.rmtree(ran / "first")
    chain(failing=-1, wait=False)
    (report_job,) = ex.submitted_jobs(str(out))["report"]
    subprocess.run(["scontrol", "hold", report_job], check=True, capture_output=True)
    said, followed = io.StringIO(), {}
    following = threading.Thread(target=lambda: followed.update(stats=ex.wait_for_chain(
        str(out), Console(file=said, width=300))), daemon=True)
    following.start()
    deadline = time.time() + 240
    while "Slurm holds" not in said.getvalue():
        assert time.time() < deadline and following.is_alive(), said.getvalue()
        time.sleep(0.5)
    assert "stage report: Slurm holds 1 of its jobs (JobHeldAdmin)" in said.getvalue()
    assert f"scontrol release {report_job}" in said.getvalue()
    subprocess.run(["scontrol", "release", report_job], check=True, capture_output=True)
    following.join(240)
    assert followed["stats"]["adds_up"]
    assert sorted(p.name for p in (ran / "first").iterdir()) == ["2"]  # only the failed task again
    assert (ran / "report" / "0").exists()


def test_a_submit_limit_refusal_says_how_to_queue_fewer_jobs(tmp_path):
    """Slurm's words for a chain over MaxSubmitJobs (QOS and association limits) get the option that fixes it."""
    from edu_filter.filters import executors as ex
    from edu_filter.filters.apply import SlurmOptions, Stage

    (tmp_path / "out").mkdir()
    opts = SlurmOptions(partition="cpu", mem_gb=1, tasks_per_job=1, max_array_size=1001)
    executors = ex.slurm_executors([Stage("first", [], 3000), Stage("report", [], 1)], str(tmp_path / "out"), None,
                                   opts)
    for said in ("sbatch: error: QOSMaxSubmitJobPerUserLimit", "sbatch: error: AssocMaxSubmitJobLimit",
                 "sbatch: error: Batch job submission failed: Job violates accounting/QOS policy (job submit limit, "
                 "user's size and/or time limits)"):
        hint = ex.submit_limit_hint(["sbatch: error: something else", said], executors)
        assert "3,001 array tasks" in hint and "--slurm-tasks-per-job" in hint
    assert ex.submit_limit_hint(["sbatch: error: invalid partition specified: gpu"], executors) == ""


def test_a_job_slurm_stops_at_its_time_limit_is_named_with_what_to_change(slurm_partition, tmp_path, monkeypatch):
    """Slurm's own reason (here the time limit; an OOM kill or a node failure alike), not the task log's last line."""
    from rich.console import Console

    from edu_filter.filters import executors as ex
    from edu_filter.filters.apply import SlurmOptions, Stage

    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))  # the jobs import the steps below
    from slurm_steps import Sleep, WriteMarker

    out, ran = tmp_path / "out", tmp_path / "ran"
    stages = [Stage("slow", [Sleep(600)], 1), Stage("report", [WriteMarker(str(ran / "report"))], 1)]
    ex.save_stage_list(str(out), stages)
    opts = ex.check_slurm_request(SlurmOptions(partition=slurm_partition, cpus_per_task=1, mem_gb=1, time="00:01:00"))
    started = time.time()
    with pytest.raises(ex.StageFailed, match=r"stage slow failed \(1/1 tasks did not complete: 0\): Slurm stopped it "
                                             r"at its time limit: run it again with a longer --slurm-time .*slurm_logs"):
        ex.run_slurm(stages, str(out), None, opts, wait=True, console=Console(quiet=True))
    assert time.time() - started < 300 and not (ran / "report").exists()
    assert ex.queued_jobs(str(out)) == []
    status = cli(["status", str(out)])  # the same reason for a chain submitted without --wait
    assert status.returncode == 0 and "time limit" in status.stdout, status.stdout + status.stderr


def test_a_task_slurm_kills_for_memory_is_named_and_more_memory_resumes_it(slurm_partition, tmp_path, monkeypatch):
    """A real memory kill: the test cluster enforces each job's memory (jobacct_gather's OverMemoryKill, polled every
    second). The failure names --slurm-mem-gb; the same stages run again with more memory rerun only the killed task."""
    from rich.console import Console

    from edu_filter.filters import executors as ex
    from edu_filter.filters.apply import SlurmOptions, Stage

    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))  # the jobs import the steps below
    from slurm_steps import HoldMemory, WriteMarker

    out, ran = tmp_path / "out", tmp_path / "ran"
    # the last step pulls from the one before it: HoldMemory runs first, the marker once it is done
    stages = [Stage("hungry", [WriteMarker(str(ran / "hungry")), HoldMemory([16, 1536])], 2),
              Stage("report", [WriteMarker(str(ran / "report"))], 1)]
    ex.save_stage_list(str(out), stages)

    def run(mem_gb: int, wait: bool) -> None:
        opts = ex.check_slurm_request(SlurmOptions(partition=slurm_partition, cpus_per_task=1, mem_gb=mem_gb,
                                                   time="00:05:00"))
        ex.run_slurm(stages, str(out), None, opts, wait=wait, console=Console(quiet=True))

    with pytest.raises(ex.StageFailed, match=r"stage hungry failed \(1/2 tasks did not complete: 1\): it ran out of "
                                             r"memory \(killed by Slurm\): run it again with more --slurm-mem-gb "
                                             r"\(it resumes: finished tasks are kept\); log: .*slurm_logs"):
        run(mem_gb=1, wait=True)
    assert sorted(p.name for p in (ran / "hungry").iterdir()) == ["0"] and not (ran / "report").exists()
    (ran / "hungry" / "0").unlink()
    run(mem_gb=3, wait=False)  # resumes: task 0 completed and is not run again (no stats.json to wait for here)
    deadline = time.time() + 300
    while ex.queued_jobs(str(out)) and time.time() < deadline:
        time.sleep(1)
    assert sorted(p.name for p in (ran / "hungry").iterdir()) == ["1"] and (ran / "report" / "0").exists()


def test_a_stage_gone_from_the_queue_is_failed_only_once_slurm_says_so_or_its_files_never_come(slurm_partition,
                                                                                                 tmp_path):
    """A stage's jobs left the queue with some completion files not listed yet: --wait called it failed after 5 s
    and cancelled the chain, where a shared filesystem (NFS) lists new files up to a minute late. Slurm's own word
    on the ended jobs (scontrol, no accounting needed) now decides: failed at once if one failed, given time if all
    completed."""
    from edu_filter.filters import executors as ex

    script = tmp_path / "array.sh"
    script.write_text("#!/bin/bash\n[ \"$SLURM_ARRAY_TASK_ID\" = 0 ] && exit 3\nexit 0\n")
    job = subprocess.run(["sbatch", "--parsable", f"--partition={slurm_partition}", "--array=0-1", "--mem=100M",
                          f"--output={tmp_path}/%A_%a.out", str(script)], capture_output=True, text=True, check=True
                         ).stdout.strip().split(";")[0]
    deadline = time.monotonic() + 60
    while subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip():
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert ex.ended_job_states([job]) == {"FAILED", "COMPLETED"}
    assert ex.ended_job_states(["99999999"]) is None  # unknown to the controller (or forgotten)
    assert ex.gone_failed(6, {"FAILED", "COMPLETED"}) and ex.gone_failed(6, None)
    assert not ex.gone_failed(60, {"COMPLETED"}) and ex.gone_failed(ex.COMPLETED_GRACE_S + 1, {"COMPLETED"})


def test_slurm_kill_reasons_are_read_from_the_current_jobs_logs_only(tmp_path):
    """Slurm's own lines, as its daemons write them; a node or path that happens to contain "oom" is not a memory
    kill, and a log of an earlier submission says nothing about this one."""
    from edu_filter.filters.executors import slurm_kill

    logs = tmp_path / "slurm_logs"
    logs.mkdir()
    (logs / "77_0.out").write_text("slurmstepd: error: *** JOB 77 ON gpu-room2 CANCELLED AT 2026-12-04T10:00:00 ***\n")
    assert slurm_kill(tmp_path, ["77"])[0].startswith("it was cancelled (scancel, by you or an administrator)")
    (logs / "78_1.out").write_text("INFO starting\nslurmstepd: error: Detected 1 oom_kill event in StepId=78.batch. "
                                   "Some of the step tasks have been OOM Killed.\n")
    assert "--slurm-mem-gb" in slurm_kill(tmp_path, ["77", "78"])[0]  # Slurm's own kill before a cancel, in any log
    cluster = tmp_path / "minhash-cluster"  # the one task holding every near-duplicate pair: its own option
    shutil.copytree(logs, cluster / "slurm_logs")
    assert "more --slurm-cluster-mem-gb" in slurm_kill(cluster, ["77", "78"])[0]
    (logs / "79_0.out").write_text("slurmstepd: error: *** JOB 79 ON n1 CANCELLED AT 2026-12-04T11:00:00 DUE TO TIME "
                                   "LIMIT ***\n")
    assert slurm_kill(tmp_path, ["80"]) is None and slurm_kill(tmp_path, []) is None
    reason, log = slurm_kill(tmp_path, ["79"])
    assert "--slurm-time" in reason and log.name == "79_0.out"
    shutil.copy(logs / "79_0.out", cluster / "slurm_logs")
    assert "a longer --slurm-cluster-time" in slurm_kill(cluster, ["79"])[0]
    scoring = tmp_path / "score"  # a scoring stage (the stage list says which) has its own time option too
    shutil.copytree(logs, scoring / "slurm_logs")
    (tmp_path / "stages.json").write_text(json.dumps([{"name": "score", "tasks": 2, "scores": True},
                                                      {"name": "slurm_logs", "tasks": 1, "scores": False}]))
    assert "a longer --slurm-gpu-time" in slurm_kill(scoring, ["79"])[0]
    assert "a longer --slurm-time" in slurm_kill(tmp_path, ["79"])[0]


def test_slurm_kill_reasons_come_from_tasks_whose_ranks_did_not_complete(tmp_path):
    """A task preempted, requeued and then done leaves the preemption line in its log; the stage's failure is another
    task's. Array tasks map to ranks as datatrove maps them: two array jobs of 2 (RUN_OFFSET 0 and 1) over the
    resumed ranks 3, 5, 6, 9."""
    from edu_filter.filters.executors import SUBMITTED_ARRAYS, slurm_kill

    stage = tmp_path / "logs" / "score"
    (stage / "slurm_logs").mkdir(parents=True)
    (stage / "completions").mkdir()
    (stage / "ranks_to_run.json").write_text(json.dumps([3, 5, 6, 9]))
    (tmp_path / "slurm").mkdir()
    (tmp_path / SUBMITTED_ARRAYS).write_text(json.dumps({"score": {"max_array_size": 2, "tasks_per_job": 1}}))
    for rank in (3, 5, 9):
        (stage / "completions" / f"{rank:05d}").touch()
    (stage / "slurm_logs" / "90_1.out").write_text(  # rank 5: preempted, requeued, completed
        "slurmstepd: error: *** JOB 91 ON n1 CANCELLED AT 2026-12-04T10:00:00 DUE TO PREEMPTION ***\nINFO done\n")
    assert slurm_kill(stage, ["90", "91"]) is None  # rank 6 (job 91, index 0) raised: its own log says why
    (stage / "slurm_logs" / "91_1.out").write_text(  # rank 9, completed
        "slurmstepd: error: *** JOB 93 ON n1 CANCELLED AT 2026-12-04T11:00:00 DUE TO TIME LIMIT ***\n")
    assert slurm_kill(stage, ["90", "91"]) is None
    (stage / "slurm_logs" / "91_0.out").write_text(  # rank 6
        "slurmstepd: error: Detected 1 oom_kill event in StepId=92.batch.\n")
    reason, log = slurm_kill(stage, ["90", "91"])
    assert "--slurm-mem-gb" in reason and log.name == "91_0.out"


def test_a_failed_stage_whose_failed_task_left_no_log_names_no_log_of_a_task_that_completed(tmp_path):
    """Tasks cancelled before they started leave no log: the newest Slurm log of the stage holding "error" was taken,
    a completed task's, and its last line (a progress line) given as the failure."""
    from edu_filter.filters.executors import SUBMITTED_ARRAYS, SUBMITTED_JOBS, failed_stage_message

    stage = tmp_path / "logs" / "filter"
    (stage / "slurm_logs").mkdir(parents=True)
    (stage / "completions").mkdir()
    (stage / "ranks_to_run.json").write_text(json.dumps([0, 1]))
    (tmp_path / "slurm").mkdir()
    (tmp_path / SUBMITTED_ARRAYS).write_text(json.dumps({"filter": {"max_array_size": 1000, "tasks_per_job": 1}}))
    (tmp_path / SUBMITTED_JOBS).write_text(json.dumps({"filter": ["999999001"]}))  # a job Slurm never knew
    (stage / "completions" / "00000").touch()
    (stage / "slurm_logs" / "999999001_0.out").write_text("2026-12-07 | INFO | ERROR-free\n0: ⏱ progress time\n")
    message = failed_stage_message(str(tmp_path), "filter", 2, slurm=True)
    assert message.startswith("stage filter failed (1/2 tasks did not complete: 1); log: ")
    assert "999999001_0.out" not in message and "progress time" not in message


def test_submitted_jobs_reads_lists_and_the_one_id_per_stage_of_older_run_folders(tmp_path):
    from edu_filter.filters.executors import submitted_jobs

    (tmp_path / "slurm").mkdir()
    (tmp_path / "slurm" / "jobs.json").write_text(json.dumps({"signatures": ["80", "81"], "buckets": 79,
                                                              "cluster": -1, "filter": None}))
    assert submitted_jobs(tmp_path) == {"signatures": ["80", "81"], "buckets": ["79"], "cluster": [], "filter": []}
    assert submitted_jobs(tmp_path / "nothing") == {}


def unreachable_controller(tmp_path: Path, monkeypatch) -> None:
    """The Slurm commands of this test talk to a controller that does not answer (real squeue, real failures)."""
    if shutil.which("squeue") is None:
        pytest.skip("squeue is not installed")
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=unreachable\nSlurmctldHost=nowhere(127.0.0.9)\nSlurmctldPort=6999\n"
                    "MessageTimeout=1\nAuthType=auth/munge\n")
    monkeypatch.setenv("SLURM_CONF", str(conf))


def test_a_failing_squeue_is_an_error_not_an_empty_queue(tmp_path, monkeypatch):
    """squeue against a controller it cannot reach: following the chain must not mistake that for 'all jobs gone'."""
    from edu_filter.documents import RunError
    from edu_filter.filters import executors as ex

    unreachable_controller(tmp_path, monkeypatch)
    monkeypatch.setattr(ex, "SQUEUE_RETRY_S", 0.01)
    with pytest.raises(RunError, match="squeue failed 5 times .*controller"):
        ex.queued_jobs(str(tmp_path / "out"))


def test_wait_follows_the_chain_by_its_files_while_slurm_does_not_answer(tmp_path, monkeypatch):
    """A controller restarted or failing over for more than squeue's retries ended a day-long --wait (and its
    --push-to-hub) while the jobs ran on. It now follows the completion files alone, and gives up only after
    SLURM_SILENT_MAX_S of silence."""
    import io
    import threading

    from rich.console import Console

    from edu_filter.documents import RunError
    from edu_filter.filters import executors as ex
    from edu_filter.filters.apply import Stage

    unreachable_controller(tmp_path, monkeypatch)
    monkeypatch.setattr(ex, "SQUEUE_ATTEMPTS", 1)
    out = tmp_path / "out"
    ex.save_stage_list(str(out), [Stage("first", [], 1), Stage("report", [], 1)])
    said = io.StringIO()

    def chain_ends() -> None:  # what the jobs do meanwhile
        time.sleep(6)
        for stage in ("first", "report"):
            (out / "logs" / stage / "completions").mkdir(parents=True)
            (out / "logs" / stage / "completions" / "00000").write_text("")
        (out / "stats.json").write_text(json.dumps({"in": {"documents": 2, "tokens": 9}, "kept": {
            "documents": 2, "tokens": 9}, "removed": {}, "failed": {}, "adds_up": True}))

    asked = []  # squeue calls: while Slurm is silent, only a ping (each squeue took ~30 s against a down one)
    monkeypatch.setattr(ex, "queued_jobs", lambda out, queued_jobs=ex.queued_jobs: asked.append(1) or queued_jobs(out))
    jobs = threading.Thread(target=chain_ends)
    jobs.start()
    stats = ex.wait_for_chain(str(out), Console(file=said, width=300))
    jobs.join()
    assert stats["kept"]["documents"] == 2 and len(asked) == 1
    assert "squeue failed 1 times" in said.getvalue() and "following the chain by its files" in said.getvalue()

    monkeypatch.setattr(ex, "SLURM_SILENT_MAX_S", 2.0)
    silent = tmp_path / "silent"
    ex.save_stage_list(str(silent), [Stage("first", [], 1), Stage("report", [], 1)])
    with pytest.raises(RunError, match=r"Slurm has not answered for 0 minutes .*were left alone: `edu-filter status"):
        ex.wait_for_chain(str(silent), Console(file=io.StringIO()))


def test_sbatch_refusing_a_stage_is_one_clear_error_naming_it(slurm_partition, tmp_path):
    """sbatch's own reason, not a CalledProcessError traceback with the reason buried in a log file."""
    from rich.console import Console

    from edu_filter.documents import DocumentError, InputError
    from edu_filter.filters import executors as ex
    from edu_filter.filters.apply import SlurmOptions, Stage

    out = tmp_path / "out"
    stages = [Stage("first", [], 1), Stage("report", [], 1)]
    ex.save_stage_list(str(out), stages)
    # an earlier run's refusal in the same log: its submit limit has nothing to do with this one's
    (out / "logs").mkdir(exist_ok=True)
    (out / "logs" / "apply.log").write_text("sbatch: error: QOSMaxSubmitJobPerUserLimit\n")
    with pytest.raises(InputError, match=r"Slurm would refuse the jobs \(.*--time=not-a-time.*\): .*time"):
        ex.check_slurm_request(SlurmOptions(partition=slurm_partition, cpus_per_task=1, mem_gb=1, time="not-a-time"))
    with pytest.raises(InputError, match=r"Slurm would refuse the jobs \(.*--time=later.*\): .*time"):  # its own
        ex.check_slurm_request(SlurmOptions(partition=slurm_partition, cpus_per_task=1, mem_gb=1, cluster_time="later"))
    # above a partition's MaxTime (24 h by default on a GPU partition that allows 4): Slurm queued the jobs, which
    # then waited forever (PartitionTimeLimit), unless the cluster enforces partition limits at submission
    short = f"{slurm_partition}-short"  # MaxTime=01:00:00
    for options, said in (({"gpu_partition": short}, r"--slurm-time 24:00:00: partition \S+-short runs a job for "
                           r"at most 1:00:00 \(its MaxTime\)"),
                          ({"partition": short, "time": "1:00:00", "cluster_time": "1-00:00:00"},
                           "--slurm-cluster-time 1-00:00:00: partition")):
        with pytest.raises(DocumentError, match=said):
            ex.check_slurm_request(SlurmOptions(**{"partition": slurm_partition, **options}, cpus_per_task=1,
                                                mem_gb=1))
    ex.check_slurm_request(SlurmOptions(partition=short, time="59:00", cpus_per_task=1, mem_gb=1))
    assert "lower --slurm-time" in ex.never_starts("PartitionTimeLimit")
    # what sbatch refuses at submission anyway (the cluster changed since the check): its reason, the stage named
    opts = replace(ex.check_slurm_request(SlurmOptions(partition=slurm_partition, cpus_per_task=1, mem_gb=1)),
                   time="not-a-time")
    with pytest.raises(ex.StageFailed, match=r"sbatch refused stage first: sbatch: error: .*time") as refused:
        ex.run_slurm(stages, str(out), None, opts, wait=True, console=Console(quiet=True))
    assert "--slurm-tasks-per-job" not in str(refused.value)
    assert ex.queued_jobs(str(out)) == []


def test_a_dry_runs_submit_script_stopped_by_sbatch_midway_records_what_it_submitted(slurm_partition, tmp_path):
    """sbatch refusing the second stage stops submit.sh: the jobs it queued before are cancelled, as `apply` does,
    and are in jobs.json, as `apply` records its own submissions, so that `status` and `--wait` can ask Slurm how
    they ended. Refusing the first leaves none recorded, not an earlier submission's."""
    from rich.console import Console

    from edu_filter.filters import executors as ex
    from edu_filter.filters.apply import SlurmOptions, Stage

    out = tmp_path / "out"
    stages = [Stage("first", [], 3), Stage("report", [], 1)]
    ex.save_stage_list(str(out), stages)
    opts = ex.check_slurm_request(SlurmOptions(partition=slurm_partition, cpus_per_task=1, mem_gb=1, dry_run=True,
                                               max_array_size=1))  # the first stage: 3 array jobs
    ex.run_slurm(stages, str(out), None, opts, wait=False, console=Console(quiet=True))
    (out / "slurm" / "jobs.json").write_text(json.dumps({"first": ["999"]}))  # an earlier submission's
    first, second = sorted((out / "slurm").glob("0*.slurm"))
    script = first.read_text()
    first.write_text(script.replace("#SBATCH --time=", "#SBATCH --time=not-a-time #"))
    res = subprocess.run(["bash", str(out / "slurm" / "submit.sh")], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and ex.submitted_jobs(str(out)) == {}  # not read through the new layout
    assert "cancelled" not in res.stderr  # nothing was queued
    first.write_text(script)
    second.write_text(second.read_text().replace("#SBATCH --time=", "#SBATCH --time=not-a-time #"))
    res = subprocess.run(["bash", str(out / "slurm" / "submit.sh")], capture_output=True, text=True, timeout=60)
    try:
        assert res.returncode != 0 and "time" in res.stderr
        recorded = ex.submitted_jobs(str(out))
        assert list(recorded) == ["first"] and len(set(recorded["first"])) == 3
        assert ex.ended_job_states(recorded["first"])  # Slurm knows it by that id
        # as apply does: the jobs queued before would wait on a stage never queued
        assert "sbatch refused stage report: cancelled the 3 jobs queued before it" in res.stderr
        deadline = time.monotonic() + 30
        while ex.queued_jobs(str(out)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert ex.queued_jobs(str(out)) == []
    finally:
        ex.cancel_chain(str(out))


def test_an_input_replaced_while_the_chain_runs_fails_the_next_pass_naming_it(slurm_partition, corpus,
                                                                              stock_classifier, tmp_path):
    """Every pass re-reads the input and the passes are matched by position: a file replaced between two jobs of the
    chain fails the next pass before it reads a row (it would remove and keep the wrong documents); the same command
    then refuses the changed input, and --overwrite starts over on it, losing nothing."""
    from rich.console import Console

    from edu_filter.filters import executors as ex

    src, out = tmp_path / "corpus.jsonl", tmp_path / "out"
    shutil.copy(corpus[0], src)
    args = apply_args(src, stock_classifier, out)
    submit = cli([a for a in args if a != "--wait"], timeout=300)
    assert submit.returncode == 0, submit.stderr[-3000:]
    stages = [s["name"] for s in json.loads((out / "logs" / "stages.json").read_text())]
    assert stages[0] == "minhash-signatures" and "filter" in stages  # the first and a later pass read the input
    jobs = json.loads((out / "slurm" / "jobs.json").read_text())
    subprocess.run(["scontrol", "hold", *jobs[stages[1]]], check=True)  # it waits on the first stage anyway
    completions = out / "logs" / stages[0] / "completions"
    deadline = time.time() + 600
    while time.time() < deadline and len(list(completions.glob("*")) if completions.exists() else []) < 4:
        time.sleep(0.2)
    assert len(list(completions.glob("*"))) == 4
    with src.open("a") as fh:  # replaced by a longer version between the first pass and the next
        fh.write(json.dumps({"id": "late", "text": "A document appended while the run was going. " * 20}) + "\n")
    subprocess.run(["scontrol", "release", *jobs[stages[1]]], check=True)
    with pytest.raises(ex.StageFailed, match=r"was replaced during this run .*start over with --overwrite"):
        ex.wait_for_chain(str(out), Console(quiet=True))
    assert not list(out.glob("kept/*.parquet"))

    again = cli(args, timeout=300)
    assert again.returncode == 2 and f"input {src} changed" in again.stderr, again.stderr[-2000:]
    # starting over needs no cluster, nor the dedup chain (tested above): one local task keeps it short
    fresh = cli(["apply", str(src), "--model", stock_classifier, "--threshold", "3", "--no-dedup", "-o", str(out),
                 "--overwrite"], timeout=900)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    found = read_outputs(out)
    assert "late" in [i for ids in found.values() for i in ids]
    assert json.loads((out / "stats.json").read_text())["adds_up"]
