"""`edu-filter apply` end to end with a real classifier, real datatrove executors and planted duplicates.

The classifier is a MiniLM encoder with a fixed random regression head saved as a stock
`BertForSequenceClassification` (the HuggingFaceFW/fineweb-edu-classifier layout): its scores are meaningless
but deterministic, which is all the pipeline's accounting, dedup and threshold logic needs.
"""

import base64
import contextlib
import gzip
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import orjson
import polars as pl
import pytest

from edu_filter.filters.apply import run_apply

sys.path.insert(0, str(Path(__file__).parent))
from apply_corpus import (  # noqa: E402
    CLI,
    DATA,
    ENV,
    planted_input,
    read_kept,
    read_outputs,
    run_cli,
)

pytestmark = pytest.mark.slow  # a classifier and datatrove pipelines in every test


@pytest.fixture(scope="module")
def planted_run(stock_classifier, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("planted")
    planted = planted_input(tmp / "in.jsonl", n_unique=140, n_groups=24)
    stats = run_apply([str(tmp / "in.jsonl")], str(tmp / "out"), model=stock_classifier, threshold=2, tasks=2,
                      workers=1, show=False)
    return planted, stats, tmp / "out"


def test_every_document_lands_in_exactly_one_place(planted_run):
    planted, stats, out = planted_run
    found = read_outputs(out)
    all_ids = [i for ids in found.values() for i in ids]
    assert stats["adds_up"]
    assert stats["in"]["documents"] == len(planted["ids"]) + 4 == len(all_ids)
    assert sorted(i for i in all_ids if "jsonl:" not in i) == sorted(planted["ids"] + ["no-text"])
    assert stats["kept"]["documents"] == len(found["kept"])
    # tokens: those the kept documents carry (the input's tokens are those of every output: a failed row has none)
    assert stats["kept"]["tokens"] == (read_kept(out)["token_count"].sum() if found["kept"] else 0)
    assert json.loads((out / "stats.json").read_text()) == stats


def test_planted_duplicates_are_collapsed_and_unique_docs_survive(planted_run):
    planted, stats, out = planted_run
    found = read_outputs(out)
    dups = set(found["removed/duplicate"])
    assert dups, "dedup removed nothing: MinHash is silently broken"
    survivors = set(found["kept"]) | set(found.get("removed/below_threshold", []))
    collapsed = sum(len(set(members) & survivors) == 1 for members in planted["groups"].values())
    assert collapsed >= 0.9 * len(planted["groups"])
    assert len(set(planted["unique"]) & dups) <= 1  # almost no unique document removed
    assert all(len(set(m) & survivors) >= 1 for m in planted["groups"].values())  # a group never vanishes


def test_threshold_splits_on_int_score_and_kept_is_fineweb_edu_parquet(planted_run):
    _, stats, out = planted_run
    kept = read_kept(out)
    assert kept.height > 0 and kept["int_score"].min() >= 2
    below = [json.loads(line) for f in (out / "removed" / "below_threshold").glob("*.gz") for line in gzip.open(f)]
    assert below and max(r["int_score"] for r in below) < 2
    assert kept.columns[:2] == ["text", "id"] and kept.columns[-2:] == ["score", "int_score"]
    assert kept.schema["score"] == pl.Float64 and kept.schema["int_score"] == pl.Int64
    assert {"annotator", "input_score", "token_count"} <= set(kept.columns)  # original fields; LLM score kept aside
    assert "metadata" not in kept.columns and "file_path" not in kept.columns
    assert stats["settings"]["threshold"] == 2


def test_bad_rows_are_kept_aside_with_file_and_line(planted_run):
    _, stats, out = planted_run
    assert {r: v["documents"] for r, v in stats["failed"].items()} == {
        "invalid_json": 1, "invalid_utf8": 1, "no_text": 1, "not_an_object": 1}
    row = json.loads(gzip.open(next((out / "failed" / "invalid_json").glob("*.gz"))).readline())
    assert row["input_error"].startswith("in.jsonl:") and "not valid JSON" in row["input_error"]
    assert row["raw_preview"].startswith("{this is not json")


def test_sweep_reads_an_apply_output_folder(planted_run, tmp_path, capsys):
    from edu_filter.filters.sweep import run_sweep

    _, stats, out = planted_run
    result = run_sweep([str(out)], tmp_path / "sweep", show=True)
    assert "reading scores" not in capsys.readouterr().out  # its summaries: no file to read ("0/0" was said)
    scored = stats["kept"]["documents"] + stats["removed"]["below_threshold"]["documents"]
    assert result["documents"] == scored and result["labelled"] == scored  # the LLM labels, kept as input_score
    row = next(r for r in result["rows"] if r["threshold"] == 2)
    assert row["documents"] == stats["kept"]["documents"] and row["tokens"] == stats["kept"]["tokens"]
    assert "f1" in row


def test_restart_with_other_settings_is_refused(planted_run, stock_classifier):
    _, _, out = planted_run
    with pytest.raises(ValueError, match=r"made differently \(settings: threshold \(2 -> 3\)"):
        run_apply([str(out.parent / "in.jsonl")], str(out), model=stock_classifier, threshold=3, tasks=2, show=False)


@pytest.mark.parametrize("option", [{"long_docs": "middle"}, {"dtype": "int4"}])
def test_bad_scoring_option_fails_before_the_run_is_recorded(stock_classifier, tmp_path, option):
    """Checked up front: a run_config.json written first would refuse the corrected rerun as 'different settings'."""
    planted_input(tmp_path / "in.jsonl", n_unique=4, n_groups=0)
    with pytest.raises(ValueError, match=f"{next(iter(option))} must be one of"):
        run_apply([str(tmp_path / "in.jsonl")], str(tmp_path / "out"), model=stock_classifier, show=False, **option)
    assert not (tmp_path / "out" / "run_config.json").exists()


def test_keep_top_keeps_the_best_scored_fraction(stock_classifier, tmp_path):
    planted_input(tmp_path / "in.jsonl", n_unique=60, n_groups=0)
    stats = run_apply([str(tmp_path / "in.jsonl")], str(tmp_path / "out"), model=stock_classifier, keep_top=0.25,
                      dedup=False, tasks=2, show=False)
    kept = read_kept(tmp_path / "out")
    below = [json.loads(line) for f in (tmp_path / "out" / "removed" / "below_threshold").glob("*.gz")
             for line in gzip.open(f)]
    assert kept.height == 15  # a quarter of the 60 readable documents
    assert kept["score"].min() > max(r["score"] for r in below)
    assert stats["adds_up"] and stats["settings"]["keep_top"] == 0.25
    # the cutoff is found once, by one task reading every histogram; the select tasks read only the cutoff
    assert [p.name for p in (tmp_path / "out" / "logs" / "keep-top-cutoff" / "completions").iterdir()] == ["00000"]
    assert len(list((tmp_path / "out" / "logs" / "select" / "completions").iterdir())) == 2
    assert stats["keep_top_cutoff"] <= kept["score"].min() and "cutoff" not in stats
    # each select task drops its scored documents once complete (they stayed to the report, the corpus twice on
    # disk): stats.json's peak still counts them
    run_apply([str(tmp_path / "in.jsonl")], str(tmp_path / "kept-work"), model=stock_classifier, keep_top=0.25,
              dedup=False, tasks=2, keep_work=True, show=False)
    scored = sum(f.stat().st_size for f in (tmp_path / "kept-work" / "work" / "scored").iterdir())
    assert stats["peak_scratch_bytes"] >= scored > 0 and not (tmp_path / "out" / "work").exists()


def test_a_keep_top_run_resumed_keeps_the_order_auto_chose_for_it(stock_classifier, tmp_path):
    """`--order auto` with --keep-top now deduplicates first; a run the previous release ordered score-first (a GPU,
    a fastText model) was refused on resume, only --overwrite going on. Resumed, it keeps its order; overwritten, it
    takes today's."""
    planted_input(tmp_path / "in.jsonl", n_unique=20, n_groups=4)
    args = dict(model=stock_classifier, keep_top=0.5, tasks=2, show=False)
    first = run_apply([str(tmp_path / "in.jsonl")], str(tmp_path / "out"), order="score-first", **args)
    (tmp_path / "out" / "stats.json").unlink()  # the report stage to run again, as after a kill
    for done in (tmp_path / "out" / "logs" / "report" / "completions").iterdir():
        done.unlink()
    resumed = run_apply([str(tmp_path / "in.jsonl")], str(tmp_path / "out"), order="auto", **args)
    assert resumed["kept"] == first["kept"] and resumed["settings"]["order"] == "score-first"
    fresh = run_apply([str(tmp_path / "in.jsonl")], str(tmp_path / "out"), order="auto", overwrite=True, **args)
    assert fresh["settings"]["order"] == "dedup-first" and fresh["adds_up"]


def test_cli_threshold_0_without_dedup_keeps_every_readable_document(stock_classifier, tmp_path):
    planted = planted_input(tmp_path / "in.jsonl", n_unique=30, n_groups=5)
    res = run_cli(["apply", str(tmp_path / "in.jsonl"), "--model", stock_classifier, "-o", str(tmp_path / "out"),
                   "--threshold", "0", "--no-dedup"])
    assert res.returncode == 0, res.stderr[-3000:]
    found = read_outputs(tmp_path / "out")
    assert sorted(found["kept"]) == sorted(planted["ids"])  # duplicates too: dedup is off
    assert not any(k.startswith("removed/") for k in found)
    assert "counts add up" in res.stderr


@pytest.mark.parametrize("gres, gpus", [
    ("gpu:4", 4), ("gpu:h100:8(S:0-1)", 8), ("gpu:a100:4(S:0,1)", 4), ("gpu:tesla:2(IDX:0-1)", 2),
    ("gpu:a100:4(S:0,1),shard:8", 4), ("gpu:a:2,gpu:b:2", 4), ("(null)", 0), ("shard:8", 0),
])
def test_gpus_of_a_node_are_read_from_every_form_sinfo_prints(gres, gpus):
    """sinfo's %G adds socket or index lists with colons and commas of their own on many GPU clusters: misread,
    a node with 8 GPUs counted 0 and a valid --slurm-gpus 1 was refused."""
    from edu_filter.filters.executors import node_gpus

    assert node_gpus(gres) == gpus


def test_following_a_chain_asks_squeue_less_often_as_it_goes_on():
    """Every second at first (a refused or failing stage is told at once), then backing off to every 30 s: --wait on a
    day-long chain would otherwise send the controller 86,400 RPCs."""
    from edu_filter.filters.executors import POLL_S, SQUEUE_MAX_INTERVAL_S, squeue_interval

    assert squeue_interval(0) == squeue_interval(5) == POLL_S == 1
    assert squeue_interval(100) == 10 and squeue_interval(3600) == SQUEUE_MAX_INTERVAL_S == 30
    calls, t = 0, 0.0
    while t < 86_400:
        t += squeue_interval(t)
        calls += 1
    assert calls < 3_100


def test_a_stage_failed_on_a_full_disk_says_so(tmp_path):
    """A full disk under OUT fails every task, and their logs, on that disk, end mid-traceback: "Traceback (most
    recent call last):" was all a failed stage said. A filesystem with no free byte (procfs) stands in for it."""
    from edu_filter.filters.executors import failed_stage_message, low_space_note

    note = low_space_note(["/proc", str(tmp_path), "/proc/self"])
    assert note == ("; /proc's filesystem has 0 bytes free: a full disk fails every task (free space, then run the "
                    "same command again)")  # one filesystem named once; one with room not named
    log = tmp_path / "logs" / "filter" / "logs" / "task_00001.log"
    log.parent.mkdir(parents=True)
    log.write_text("2026-12-07 | ERROR | a task\nTraceback (most recent call last):\n  File \"x.py\", line 1, in ru")
    message = failed_stage_message(str(tmp_path), "filter", 2)
    assert message.startswith("stage filter failed (2/2 tasks did not complete: 0, 1); log: ")
    assert "bytes free" not in message  # tmp_path has room

def test_a_job_over_a_per_job_limit_of_its_qos_is_never_waited_for():
    """A QOS or association capping each job's time, CPUs, memory or GPUs below the request leaves the job pending
    forever where the QOS does not deny it at submission: --wait stops and names the option to change. Limits per
    user or group free up as other jobs end, and are waited for."""
    from edu_filter.filters.executors import never_starts

    assert "--slurm-time" in never_starts("QOSMaxWallDurationPerJobLimit")
    assert "--slurm-time" in never_starts("AssocMaxWallDurationPerJobLimit")
    assert "--slurm-gpus" in never_starts("QOSMaxGRESPerJob")
    assert "--slurm-mem-gb" in never_starts("AssocMaxMemPerJob")
    assert "less" in never_starts("QOSMinCpuNotSatisfied") and never_starts("PartitionTimeLimit")
    for waits in ("Priority", "Resources", "Dependency", "QOSMaxJobsPerUserLimit", "AssocGrpCpuLimit",
                  "QOSMaxCpuPerUserLimit", "AssocMaxJobsLimit", "JobHeldAdmin", "ReqNodeNotAvail"):
        assert never_starts(waits) is None, waits


def test_a_chain_is_named_alike_however_its_output_is_named_and_job_ids_read_on_multi_cluster_sites(tmp_path,
                                                                                                    monkeypatch):
    """A relative -o and the same folder through a link (/home a link to /gpfs) tagged their jobs apart: a second
    submission beside a queued chain was not refused. Where sbatch says "... 123 on cluster foo", datatrove took
    "foo" for the job id, and every dependency named the cluster."""
    from edu_filter.filters.executors import chain_tag, chain_tags, sbatch_job_id

    (tmp_path / "real" / "runs" / "x").mkdir(parents=True)
    (tmp_path / "home").symlink_to(tmp_path / "real")
    monkeypatch.chdir(tmp_path / "real" / "runs")
    assert chain_tag("x") == chain_tag(str(tmp_path / "home" / "runs" / "x"))
    assert chain_tag("x") in chain_tags(str(tmp_path / "home" / "runs" / "x"))
    assert sbatch_job_id("Submitted batch job 123\n") == "123"
    assert sbatch_job_id("Submitted batch job 4567 on cluster gpu-east\n") == "4567"


def test_following_a_chain_reads_progress_less_often_and_finished_stages_once(tmp_path):
    """--wait read every progress and completion file of every stage each second, finished stages included: 4
    stages of 5,000 tasks were ~20,000 opens a second on the shared filesystem. A finished stage is read once, a
    completed task's progress once; the running one every second at first, then every 10 s."""
    from rich.console import Console

    from edu_filter.filters.executors import POLL_S, PROGRESS_MAX_INTERVAL_S, progress_interval
    from edu_filter.filters.progress import ProgressDisplay

    assert progress_interval(0) == POLL_S and progress_interval(3600) == PROGRESS_MAX_INTERVAL_S == 10
    for stage, done in (("first", 2), ("second", 1)):
        (tmp_path / stage / "completions").mkdir(parents=True)
        (tmp_path / stage / "progress").mkdir()
        for rank in range(done):
            (tmp_path / stage / "completions" / f"{rank:05d}").write_text("")
        for rank in range(2):
            (tmp_path / stage / "progress" / f"{rank:05d}.json").write_text(json.dumps(
                {"documents": 10, "bytes": 1, "bytes_total": 1, "started": 0.0, "updated": 1.0, "done": True}))
    display = ProgressDisplay(Console(quiet=True), [("first", 2), ("second", 2)], str(tmp_path))
    assert [(s.finished, s.documents) for s in display.refresh()] == [(True, 20), (False, 20)]
    for stage in ("first", "second"):
        (tmp_path / stage / "progress" / "00000.json").unlink()
    assert [(s.finished, s.documents) for s in display.refresh()] == [(True, 20), (False, 10)]
    # a completed task's record no longer changes and is not read again (50k opens per read near a stage's end);
    # a task with no completion file yet (requeued, rerun) is
    for rank, documents in ((0, 10), (1, 30)):
        (tmp_path / "second" / "progress" / f"{rank:05d}.json").write_text(json.dumps(
            {"documents": documents, "bytes": 1, "bytes_total": 1, "started": 0.0, "updated": 1.0, "done": rank == 0}))
    assert display.refresh()[1].documents == 40
    (tmp_path / "second" / "progress" / "00000.json").write_text("{not json")
    assert display.refresh()[1].documents == 40
    (tmp_path / "second" / "completions" / "00000").unlink()  # task 0 runs again (a run started over, say)
    (tmp_path / "second" / "progress" / "00000.json").write_text(json.dumps(
        {"documents": 3, "bytes": 1, "bytes_total": 4, "started": 0.0, "updated": 1.0, "done": False}))
    second = display.refresh()[1]
    assert second.documents == 33 and second.running_fraction == 1.25  # task 1 read all of its input, task 0 a quarter
    (tmp_path / "second" / "progress" / "00000.json").write_text(json.dumps(
        {"documents": 5, "bytes": 4, "bytes_total": 4, "started": 0.0, "updated": 1.0, "done": True}))
    (tmp_path / "second" / "completions" / "00000").write_text("")  # completed anew: its new record counts
    assert display.refresh()[1].documents == 35


def test_progress_written_to_a_file_is_a_plain_line_per_running_stage_now_and_then(tmp_path):
    """A batch job's output (Slurm's slurm-%j.out, nohup, tee) got nothing from the live bars until the run ended:
    hours in which stuck and working looked the same. Not a terminal: a line per running stage every 30 s, and one
    when a stage finishes."""
    import io

    from rich.console import Console

    from edu_filter.documents import PLAIN_PROGRESS_EVERY
    from edu_filter.filters.progress import ProgressDisplay

    for stage in ("first", "second"):
        (tmp_path / stage / "completions").mkdir(parents=True)
        (tmp_path / stage / "progress").mkdir()
    (tmp_path / "first" / "progress" / "00000.json").write_text(json.dumps(
        {"documents": 7, "bytes": 1, "bytes_total": 2, "started": time.time(), "updated": time.time(), "done": False}))
    log = io.StringIO()
    with ProgressDisplay(Console(file=log, width=80), [("first", 1), ("second", 1)], str(tmp_path)) as display:
        display.refresh()
        said = log.getvalue().splitlines()
        assert len(said) == 1 and said[0].startswith("first: 7 docs") and "0/1 tasks" in said[0], said
        display.refresh()  # within the 30 s: nothing new
        assert len(log.getvalue().splitlines()) == 1
        (tmp_path / "first" / "completions" / "00000").write_text("")
        display.refresh()  # a stage finished: said at once, once
        display.refresh()
        lines = log.getvalue().splitlines()
        assert len(lines) == 2 and "1/1 tasks, done" in lines[1], lines
        (tmp_path / "second" / "progress" / "00000.json").write_text(json.dumps(
            {"documents": 3, "bytes": 1, "bytes_total": 4, "started": time.time(), "updated": time.time(),
             "done": False}))
        display.refresh()  # started within the 30 s: said with the next lines
        assert len(log.getvalue().splitlines()) == 2
        display.said_at -= PLAIN_PROGRESS_EVERY  # 30 s later: the running stage
        display.refresh()
        lines = log.getvalue().splitlines()
        assert len(lines) == 3 and lines[2].startswith("second: 3 docs"), lines
    assert "\x1b" not in log.getvalue() and "\r" not in log.getvalue()  # no bar drawn into the file


def test_local_tasks_running_at_once_score_on_different_gpus(tmp_path, monkeypatch):
    """On a machine with several GPUs a task took GPU rank % n: the pool hands ranks out as workers free up, so
    tasks 0 and 2 ran together on GPU 0 while GPU 1 idled (two models and their batches on one card). Each running
    task now holds a worker slot of its own, and the slot picks the GPU; under datatrove's own executor (a pipeline
    of one's own) each process holds a GPU no other process holds (a lock file per GPU)."""
    import itertools

    from datatrove.executor import LocalPipelineExecutor

    from edu_filter.filters.executors import WatchedLocalExecutor

    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))  # the workers import the step
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the GPUs' lock files: this test's own
    from slurm_steps import RecordGpu

    from edu_filter.filters.scoring import TASK_SLOT_ENV

    # one worker runs its task in this process: its slot stayed in this process's environment, and every later
    # pipeline's workers (inheriting it) scored on that one GPU
    monkeypatch.delenv(TASK_SLOT_ENV, raising=False)
    WatchedLocalExecutor([RecordGpu(str(tmp_path / "alone"), gpus=2, slow_rank=-1, seconds=0)], tasks=1, workers=1,
                         logging_dir=str(tmp_path / "alone-logs")).run()
    assert TASK_SLOT_ENV not in os.environ

    for executor, name in ((WatchedLocalExecutor, "gpus"), (LocalPipelineExecutor, "stock")):
        executor([RecordGpu(str(tmp_path / name), gpus=2, slow_rank=0, seconds=3)], tasks=4, workers=2,
                 logging_dir=str(tmp_path / f"{name}-logs")).run()
        records = [json.loads(p.read_text()) for p in (tmp_path / name).iterdir()]
        together = [(a, b) for a, b in itertools.combinations(records, 2)
                    if a["start"] < b["end"] and b["start"] < a["end"]]
        assert any(a["rank"] % 2 == b["rank"] % 2 for a, b in together), together  # where rank % 2 would clash
        assert all(a["gpu"] != b["gpu"] for a, b in together), (name, together)
    # a process keeps its slot: returned after each task, slots moved between processes that finished at once, and
    # a process's CUDA context and cached memory stayed on a GPU another process then scored on
    WatchedLocalExecutor([RecordGpu(str(tmp_path / "many"), gpus=2, slow_rank=-1, seconds=0)], tasks=120, workers=2,
                         logging_dir=str(tmp_path / "many-logs")).run()
    gpus_of = {}
    for p in (tmp_path / "many").iterdir():
        record = json.loads(p.read_text())
        gpus_of.setdefault(record["pid"], set()).add(record["gpu"])
    assert len(gpus_of) == 2 and all(len(gpus) == 1 for gpus in gpus_of.values()), gpus_of


def test_two_jobs_numbering_their_gpus_alike_claim_theirs_apart(tmp_path):
    """Slurm numbers each job's GPUs from 0, and jobs share a node's temporary folder: one job's claims took the
    other's, whose tasks then fell back to `rank % gpus`, two on one GPU while another idled."""
    import subprocess
    import sys

    # each holds its claim until killed, once every claim is read (a slow start of the later ones under load found
    # the first ones' claims released)
    claim = ("import sys, time; from edu_filter.filters.scoring import claim_gpu; print(claim_gpu(2), flush=True); "
             "time.sleep(300)")

    def start(jobs):
        return [subprocess.Popen([sys.executable, "-c", claim], stdout=subprocess.PIPE, text=True, env={
            **os.environ, "TMPDIR": str(tmp_path), "CUDA_VISIBLE_DEVICES": "0,1", "SLURM_JOB_ID": job})
            for job in jobs]

    runs = start(("101", "101", "102", "102"))
    claimed = [run.stdout.readline().strip() for run in runs]
    runs += start(("101", "101", "101"))  # once the first ones hold theirs
    claimed += [run.stdout.readline().strip() for run in runs[4:]]
    for run in runs:
        run.kill()
        run.wait()
    assert sorted(claimed[:2]) == sorted(claimed[2:4]) == ["0", "1"], claimed
    # more processes than GPUs: shared evenly (every GPU held, they fell back to rank % gpus whatever the load)
    assert sorted(claimed[:2] + claimed[4:]) == ["0", "0", "0", "1", "1"], claimed


def test_slurm_dry_run_writes_checkable_sbatch_scripts(stock_classifier, tmp_path, monkeypatch):
    from edu_filter.filters.apply import SlurmOptions

    planted_input(tmp_path / "in.jsonl", n_unique=10, n_groups=0)
    monkeypatch.chdir(tmp_path)  # relative OUT: every path in the scripts must still be absolute
    run_apply(["in.jsonl"], "out", model=stock_classifier, executor="slurm", tasks=8, workers=4, show=False,
              slurm=SlurmOptions(partition="cpu-q", gpu_partition="gpu-q", gpus_per_task=1, gpu_cpus_per_task=6,
                                 dry_run=True, venv_path="/opt/venv/bin/activate", account="proj-7", qos="high",
                                 sbatch_args=["constraint=h100", "exclusive"]))
    scripts = sorted((tmp_path / "out" / "slurm").glob("*.slurm"))
    names = [p.stem.split("_", 1)[1] for p in scripts]
    # a GPU makes scoring cheaper than MinHash: score first, deduplicate only what passes the threshold
    assert names == ["score", "minhash-signatures", "minhash-buckets", "minhash-cluster", "filter", "report"]
    arrays = {}
    for p in scripts:
        text = p.read_text()
        assert subprocess.run(["bash", "-n", str(p)]).returncode == 0
        assert "source /opt/venv/bin/activate" in text and "launch_pickled_pipeline" in text
        arrays[p.stem.split("_", 1)[1]] = next(line for line in text.splitlines() if "--array" in line)
        assert ("--partition=gpu-q" in text and "--gpus=1" in text) == p.stem.endswith("score")
        # the scoring task's own CPUs (they tokenize for its GPU), 4 GB each as every task's (it was 16 GB, 4 per CPU
        # of the other stages, over its 6 CPUs)
        cpus, mem = ("6", "4G") if p.stem.endswith("score") else ("4", "4G")
        assert f"--cpus-per-task={cpus}\n" in text and f"--mem-per-cpu={mem}\n" in text
        # srun says them again: Slurm 22.05-23.02 gave the step one CPU, binding the scoring threads to one core
        assert f"srun --cpus-per-task={cpus} -l -n 1 launch_pickled_pipeline" in text
        # the account, QOS and other sbatch options reach every job
        assert {"#SBATCH --account=proj-7", "#SBATCH --qos=high", "#SBATCH --constraint=h100",
                "#SBATCH --exclusive"} <= set(text.splitlines())
        log_line = next(line for line in text.splitlines() if line.startswith("#SBATCH --output="))
        assert log_line.split("=", 1)[1].startswith(str(tmp_path / "out" / "logs"))
    assert arrays["minhash-signatures"].endswith("=0-7%4") and arrays["minhash-buckets"].endswith("=0-13%4")
    assert arrays["minhash-cluster"].endswith("=0-0%1") and arrays["report"].endswith("=0-0%1")
    submit = (tmp_path / "out" / "slurm" / "submit.sh").read_text()
    assert subprocess.run(["bash", "-n", str(tmp_path / "out" / "slurm" / "submit.sh")]).returncode == 0
    assert submit.count("sbatch --parsable") == 6 and submit.count("--dependency=afterok") == 6
    assert submit.index("dep=()") < submit.index("sbatch --parsable")  # the first stage depends on nothing, the others chain
    assert f'"{tmp_path}/out/slurm/00_score.slurm"' in submit  # runs from any folder
    import dill

    def pipeline(stage):
        with open(tmp_path / "out" / "logs" / stage / "executor.pik", "rb") as fh:
            executor = dill.load(fh)
        return executor.world_size, [type(s).__name__ for s in executor.pipeline]

    assert pipeline("score") == (8, ["ClearUnfinishedAttempt", "ApplyInputReader", "InputErrorFilter", "CountTokens",
                                     "EduClassifierScorer", "NonFiniteScoreFilter", "ScoreSummaryWriter",
                                     "ScoreThresholdFilter", "RecordWriter", "TaskProgressTime"])
    assert pipeline("filter") == (8, ["ClearUnfinishedAttempt", "CheckDedupResults", "RankFileReader",
                                      "MinhashDedupFilter", "DropDedupScratch", "KeptParquetWriter",
                                      "DropTaskScratch", "TaskProgressTime"])
    # sbatch takes SBATCH_* variables over the scripts' #SBATCH lines: the scoring jobs went to a login shell's
    # SBATCH_PARTITION, --gpus and all; a variable of an option given (the account, a constraint) too, others pass
    for variable, refused in (("SBATCH_PARTITION", True), ("SBATCH_CONSTRAINT", True), ("SBATCH_ACCOUNT", True),
                              ("SBATCH_MEM_PER_NODE", True), ("SBATCH_RESERVATION", False)):
        ran = subprocess.run([shutil.which("bash"), str(tmp_path / "out" / "slurm" / "submit.sh")], capture_output=True,
                             text=True, env={"PATH": "/nonexistent", variable: "x"})  # no squeue: nothing is queued
        assert (f"{variable}=x in the environment would override" in ran.stderr) == refused, ran.stderr
        assert ran.returncode != 0
    from edu_filter.documents import InputError
    from edu_filter.filters.executors import check_sbatch_environment

    check_sbatch_environment(SlurmOptions(sbatch_args={}), {"SBATCH_ACCOUNT": "proj", "SBATCH_EXPORT": "NONE"})
    with pytest.raises(InputError, match="SBATCH_TIMELIMIT=1:00:00 in the environment would override"):
        check_sbatch_environment(SlurmOptions(sbatch_args={}), {"SBATCH_TIMELIMIT": "1:00:00"})
    assert not (tmp_path / "out" / "kept").exists()  # nothing ran
    assert scorer_of(tmp_path / "out" / "logs" / "score").device is None  # its GPU, or the GPUs Slurm lets it see


def scorer_of(stage_logs: Path):
    import dill

    with open(stage_logs / "executor.pik", "rb") as fh:
        return next(s for s in dill.load(fh).pipeline if type(s).__name__ == "EduClassifierScorer")


def test_a_stage_over_the_array_limit_is_array_jobs_of_one_size(stock_classifier, tmp_path):
    """12 tasks at --slurm-max-array 5 were arrays of 5, 5 and 5: three array tasks with no rank, each a job (a GPU
    job in the scoring stage) the next stage waited for. Now three arrays of 4, and the ranks they run are the 12."""
    from edu_filter.filters.apply import SlurmOptions
    from edu_filter.filters.executors import even_array_size

    assert [even_array_size(n, 1001) for n in (10, 1001, 1002, 2500)] == [1001, 1001, 501, 834]
    planted_input(tmp_path / "in.jsonl", n_unique=10, n_groups=0)
    run_apply([str(tmp_path / "in.jsonl")], str(tmp_path / "out"), model=stock_classifier, executor="slurm",
              tasks=12, dedup=False, show=False, slurm=SlurmOptions(partition="cpu-q", dry_run=True, max_array_size=5))
    [script] = (tmp_path / "out" / "slurm").glob("*_filter.slurm")
    assert "#SBATCH --array=0-3\n" in script.read_text()
    # no GPU asked: told to score on CPUs, where a cluster without device constraints shows a task every GPU
    assert scorer_of(tmp_path / "out" / "logs" / "filter").device == "cpu"
    submit = (tmp_path / "out" / "slurm" / "submit.sh").read_text()
    offsets = [line.split("RUN_OFFSET=")[1].split()[0] for line in submit.splitlines() if "_filter.slurm" in line]
    assert offsets == ["0", "1", "2"]
    import dill

    with open(tmp_path / "out" / "logs" / "filter" / "executor.pik", "rb") as fh:
        assert dill.load(fh).max_array_size == 4  # each array task's rank: index + 4 x RUN_OFFSET, 0 to 11


def test_the_scoring_stage_takes_its_own_sbatch_options(stock_classifier, tmp_path):
    """A GPU partition with its own QOS, account or GPU feature: --slurm-arg and --slurm-qos reached every stage
    (constraint=h100 on the CPU stages' jobs, a GPU QOS the CPU partition refuses), and --slurm-arg qos=... was
    refused. --slurm-gpu-arg is the scoring stage's alone."""
    from edu_filter.documents import InputError
    from edu_filter.filters.apply import SlurmOptions

    planted_input(tmp_path / "in.jsonl", n_unique=10, n_groups=0)
    slurm = SlurmOptions(partition="cpu-q", gpu_partition="gpu-q", gpus_per_task=1, dry_run=True, qos="cpu",
                         account="lab", sbatch_args=["exclusive"],
                         gpu_sbatch_args=["qos=gpu", "account=lab-gpu", "constraint=h100"])
    run_apply([str(tmp_path / "in.jsonl")], str(tmp_path / "out"), model=stock_classifier, executor="slurm", tasks=2,
              show=False, slurm=slurm)
    scripts = {p.stem.split("_", 1)[1]: p.read_text() for p in (tmp_path / "out" / "slurm").glob("*.slurm")}
    [scoring] = [name for name, text in scripts.items() if "#SBATCH --gpus" in text]
    assert len(scripts) > 3 and "--partition=gpu-q" in scripts[scoring]
    for name, text in scripts.items():
        directives = [line for line in text.splitlines() if line.startswith("#SBATCH")]
        mine = name == scoring
        assert ("#SBATCH --qos=gpu" if mine else "#SBATCH --qos=cpu") in directives, (name, directives)
        assert ("#SBATCH --account=lab-gpu" if mine else "#SBATCH --account=lab") in directives, (name, directives)
        assert ("#SBATCH --constraint=h100" in directives) == mine and "#SBATCH --exclusive" in directives
        assert sum(d.startswith(("#SBATCH --qos", "#SBATCH --account")) for d in directives) == 2, directives
    for given, said in ((["gpus=2"], "--slurm-gpu-arg gpus: give --slurm-gpus"), (["qos"], "give one word"),
                        (["qos=a", "qo=b"], "--slurm-gpu-arg qos is given twice")):  # sbatch reads qo as qos
        with pytest.raises(InputError, match=said):
            run_apply([str(tmp_path / "in.jsonl")], str(tmp_path / "other"), model=stock_classifier,
                      executor="slurm", show=False, slurm=SlurmOptions(partition="p", dry_run=True,
                                                                       gpu_sbatch_args=given))


def test_slurm_scripts_run_in_the_submitting_environment_without_a_throttle(stock_classifier, tmp_path):
    """Without --workers no `%N` throttle; without --slurm-venv the jobs find this environment's executables."""
    from edu_filter.filters.apply import SlurmOptions

    planted_input(tmp_path / "in.jsonl", n_unique=10, n_groups=0)
    run_apply([str(tmp_path / "in.jsonl")], str(tmp_path / "out"), model=stock_classifier, executor="slurm",
              tasks=4, show=False, slurm=SlurmOptions(partition="cpu-q", dry_run=True, cpus_per_task=2, mem_gb=3,
                                                      cluster_mem_gb=40, time="02:00:00", cluster_time="2-00:00:00",
                                                      gpu_time="1-00:00:00"))
    scripts = sorted((tmp_path / "out" / "slurm").glob("*.slurm"))
    assert len(scripts) == 5
    stages = json.loads((tmp_path / "out" / "logs" / "stages.json").read_text())
    scoring = [s["name"] for s in stages if s["scores"]]
    assert len(scoring) == 1
    for script in scripts:
        text = script.read_text()
        assert "%" not in next(line for line in text.splitlines() if "--array" in line)
        assert f'export PATH="{Path(sys.executable).parent}:$PATH"' in text
        # 3 GB over 2 CPUs (not 2 GB each); the cluster stage's one task, which holds every pair, 40 GB
        memory = "20G" if script.stem.endswith("minhash-cluster") else "1536M"
        assert "--cpus-per-task=2" in text and f"--mem-per-cpu={memory}\n" in text
        assert text.count("--mem-per-cpu=") == 1
        # and its time limit: it reads every bucket's pairs alone, for hours where each other task takes minutes
        limit = ("2-00:00:00" if script.stem.endswith("minhash-cluster") else "1-00:00:00"
                 if script.stem.endswith(scoring[0]) else "02:00:00")
        assert f"#SBATCH --time={limit}\n" in text and text.count("--time=") == 1


def test_dry_run_and_status_go_on_when_the_slurm_controller_does_not_answer(stock_classifier, tmp_path):
    """Scripts written for another cluster, or a controller that is down: the dry run is still written and `status`
    still shows what the files say, naming the job states as unknown instead of failing after squeue's timeouts."""
    planted_input(tmp_path / "in.jsonl", n_unique=10, n_groups=0)
    (tmp_path / "slurm.conf").write_text("ClusterName=gone\nSlurmctldHost=localhost(127.0.0.1)\nSlurmctldPort=9\n"
                                         "AuthType=auth/munge\nNodeName=localhost CPUs=1\n"
                                         "PartitionName=p Nodes=localhost Default=YES\n")
    env = {**ENV, "SLURM_CONF": str(tmp_path / "slurm.conf")}  # port 9: nothing listens there
    args = CLI + ["apply", str(tmp_path / "in.jsonl"), "--model", stock_classifier, "-o", str(tmp_path / "out"),
                  "--executor", "slurm", "--dry-run"]
    res = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)  # sinfo failed here
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1] == (
        "error: give --slurm-partition with --dry-run (no cluster answers here to ask for its default)"), res.stderr
    res = subprocess.run(CLI + ["apply", str(tmp_path / "in.jsonl"), "--model", stock_classifier, "-o",
                                str(tmp_path / "out"), "--executor", "slurm", "--slurm-partition", "p", "--dry-run"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "out" / "slurm" / "submit.sh").exists()
    status = subprocess.run(CLI + ["status", str(tmp_path / "out")], env=env, capture_output=True, text=True,
                            timeout=120)
    assert status.returncode == 0, status.stderr[-3000:]
    assert "does not answer" in status.stdout + status.stderr and "not started" not in status.stdout


def test_python_edu_preset_end_to_end_with_a_trained_code_model(code_model, tmp_path):
    """Exact + near dedup, HumanEval decontamination and int_score >= 4 on the bundled Python files."""
    algorithms = [json.loads(line) for line in open(DATA / "code" / "thealgorithms_unlabelled.jsonl")][:120]
    labelled = [json.loads(line) for line in open(DATA / "code" / "python_edu_labels.jsonl")]
    humaneval_docs = [r for r in labelled if r["id"].startswith("HumanEval/")][:6]
    labelled = [r for r in labelled if not r["id"].startswith("HumanEval/")][:60] + humaneval_docs
    problem = json.loads(gzip.open(DATA / "code" / "HumanEval.jsonl.gz").readlines()[12])
    planted = [
        {"id": "planted-contaminated", "text": "import os\n\n" + problem["prompt"] + problem["canonical_solution"]},
        dict(algorithms[0], id="planted-exact-copy"),
    ]
    rows = algorithms + labelled + planted
    (tmp_path / "code").mkdir()
    write = lambda name, part: (tmp_path / "code" / name).write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in part))
    write("algorithms.jsonl", algorithms)
    write("labelled.jsonl", labelled + planted)

    stats = run_apply([str(tmp_path / "code")], str(tmp_path / "out"), model=str(code_model), preset="python-edu",
                      tasks=2, show=False)
    found = read_outputs(tmp_path / "out")
    assert stats["adds_up"] and stats["in"]["documents"] == len(rows)
    assert stats["settings"]["threshold"] == 4 and stats["settings"]["exact_dedup"]
    contaminated = set(found["removed/contaminated"])
    assert "planted-contaminated" in contaminated
    # decontaminated documents count with their tokens, so the token totals add up too
    removed = [json.loads(line) for f in (tmp_path / "out" / "removed" / "contaminated").glob("*.gz")
               for line in gzip.open(f)]
    assert stats["removed"]["contaminated"]["tokens"] == sum(r["token_count"] for r in removed) > 0
    assert len(contaminated & {r["id"] for r in humaneval_docs}) >= 5  # HumanEval solutions in the labelled set
    assert len(contaminated - {r["id"] for r in humaneval_docs} - {"planted-contaminated"}) <= 1
    exact_dups = [json.loads(line)["id"] for f in (tmp_path / "out" / "removed" / "duplicate").glob("exact_*.gz")
                  for line in gzip.open(f)]
    assert len(set(exact_dups) & {algorithms[0]["id"], "planted-exact-copy"}) == 1
    near_dups = [line for f in (tmp_path / "out" / "removed" / "duplicate").glob("near_*.gz") for line in gzip.open(f)]
    by_kind = stats["removed"]["duplicate"]["by_kind"]  # the two kinds apart, adding up to the folder's count
    assert by_kind["exact"]["documents"] == len(exact_dups) and by_kind.get("near", {}).get("documents", 0) == len(
        near_dups) and len(exact_dups) + len(near_dups) == stats["removed"]["duplicate"]["documents"]
    kept = read_kept(tmp_path / "out") if found["kept"] else None
    assert kept is None or kept["int_score"].min() >= 4
    below = [json.loads(line) for f in (tmp_path / "out" / "removed" / "below_threshold").glob("*.gz")
             for line in gzip.open(f)]
    assert max(r["int_score"] for r in below) < 4 and {"path", "repo", "license"} <= set(below[0])
    # every removed record says why (the duplicates' said null), and none carries datatrove's duplicate_count
    removed_records = [json.loads(line) for f in (tmp_path / "out" / "removed").glob("*/*.gz") for line in gzip.open(f)]
    assert {r["filter_reason"] for r in removed_records} == {"below_threshold", "contaminated", "duplicate"}
    assert not any("duplicate_count" in r for r in removed_records)
    # the same command on the finished run: the same result, and no scratch (the decontamination index) left behind
    again = run_apply([str(tmp_path / "code")], str(tmp_path / "out"), model=str(code_model), preset="python-edu",
                      tasks=2, show=False)
    assert again["kept"] == stats["kept"] and not (tmp_path / "out" / "work").exists()


def test_an_eval_set_given_with_the_python_edu_preset_adds_to_humaneval(stock_classifier, tmp_path):
    """`--preset python-edu --decontaminate mbpp.jsonl` replaced the preset's HumanEval: a dataset contaminated with
    the benchmark its ablation then reports. A set given adds to the preset's; `none` drops the preset's."""
    from edu_filter.filters.apply import resolve_config

    mbpp = tmp_path / "mbpp.jsonl"
    mbpp.write_text('{"text": "def add(a, b): return a + b"}\n')

    def sets(*given):
        return resolve_config([str(mbpp)], str(tmp_path / "out"), model=stock_classifier, preset="python-edu",
                              decontaminate=list(given) or None).decontaminate

    humaneval = sets()
    assert len(humaneval) == 1 and humaneval[0].endswith("HumanEval.jsonl.gz")
    assert sets(str(mbpp)) == [*humaneval, str(mbpp)]
    assert sets("humaneval", str(mbpp)) == [*humaneval, str(mbpp)]  # named twice, read once
    assert sets("none") == [] and sets("none", str(mbpp)) == [str(mbpp)]
    # a run begun when a set given replaced the preset's resumes as it began (else refused, --overwrite its only way)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "run_config.json").write_text(json.dumps({"settings": {
        "preset": "python-edu", "model": os.path.abspath(stock_classifier), "decontaminate": [str(mbpp)]}}))
    assert sets(str(mbpp)) == [str(mbpp)]
    assert sets() == humaneval  # the same run without the set: as the preset has it (refused by the resume check)


def test_a_code_classifier_without_a_threshold_keeps_python_edu_s_cut(code_model, stock_classifier, tmp_path):
    """`apply stack/ --model code-classifier` kept int_score >= 3 (FineWeb-Edu's cut) where Python-Edu keeps 4."""
    from edu_filter.filters.apply import resolve_config

    (tmp_path / "in.jsonl").write_text('{"text": "def f(): pass"}\n')

    def threshold(model, **given):
        return resolve_config([str(tmp_path / "in.jsonl")], str(tmp_path / "out"), model=str(model), **given).threshold

    assert threshold(code_model) == 4
    assert threshold(code_model, threshold=3) == 3 and threshold(code_model, preset="fineweb-edu") == 3
    assert threshold(stock_classifier) == 3  # a classifier recording no kind (the official ones): FineWeb-Edu's
    # a run begun when the default was 3 for every classifier resumes as it began (else refused: --overwrite only)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "run_config.json").write_text(json.dumps({"settings": {
        "model": os.path.abspath(code_model), "threshold": 3, "keep_top": None}}))
    assert threshold(code_model) == 3 and threshold(code_model, overwrite=True) == 4


def test_scorer_step_chunk_max_scores_whole_documents(stock_classifier):
    """chunk-max takes the max over all 128-token chunks, so it can only raise a long document's truncated score."""
    from datatrove.data import Document

    from edu_filter.filters.scoring import EduClassifierScorer

    texts = [json.loads(line)["text"] for line in open(DATA / "web" / "fineweb_edu_llama3_val.jsonl")][:40]

    def score(mode):
        step = EduClassifierScorer(stock_classifier, long_docs=mode, window_size=16)
        docs = list(step.run(iter(Document(text=t, id=str(i), metadata={"score": i % 6}) for i, t in enumerate(texts))))
        # in a user's own pipeline (JsonlReader keeps a row's fields), its label was overwritten; apply's reader
        # renames it as this does
        assert [d.metadata["input_score"] for d in docs] == [i % 6 for i in range(len(texts))]
        return step, [d.metadata["score"] for d in docs], [d.metadata["int_score"] for d in docs]

    step, truncated_scores, ints = score("truncate")
    _, max_scores, _ = score("chunk-max")
    stats = step.stats.to_dict()["stats"]
    assert stats["scored"]["total"] == 40 and stats["truncated"]["total"] >= 10  # most docs exceed 128 tokens
    assert stats["docs_per_second"]["unit"] == "window"
    assert all(m >= t - 1e-4 for m, t in zip(max_scores, truncated_scores))
    assert sum(m > t + 1e-3 for m, t in zip(max_scores, truncated_scores)) >= 5
    assert all(isinstance(i, int) and 0 <= i <= 5 for i in ints)
    with pytest.raises(ValueError, match="long_docs"):
        EduClassifierScorer(stock_classifier, long_docs="sliding")


def test_scorer_step_defaults_to_the_models_long_document_mode(web_model, tmp_path):
    """A model trained with chunk-mean is scored with chunk-mean by `apply` unless told otherwise, like `evaluate`."""
    import shutil

    from datatrove.data import Document

    from edu_filter.classifiers import load_scorer
    from edu_filter.filters.scoring import EduClassifierScorer

    model = tmp_path / "chunk-mean-model"
    shutil.copytree(web_model, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "long_docs": "chunk-mean"}))
    texts = [json.loads(line)["text"] for line in open(DATA / "web" / "fineweb_edu_llama3_val.jsonl")][:12]

    def step_scores(**kwargs):
        step = EduClassifierScorer(str(model), window_size=8, **kwargs)
        return [d.metadata["score"] for d in step.run(iter(Document(text=t, id=str(i)) for i, t in enumerate(texts)))]

    scorer = load_scorer(model)
    expected, _ = scorer.predict(texts)
    assert scorer.predict(texts, long_docs="truncate")[1].sum() >= 4  # over one sequence, where the modes differ
    assert step_scores() == pytest.approx(expected.tolist(), abs=1e-5)
    assert step_scores(long_docs="truncate") != pytest.approx(expected.tolist(), abs=1e-3)


def test_apply_with_a_fasttext_model_counts_tokens_without_its_own_tokenizer(tmp_path):
    from edu_filter.classifiers.fasttext_model import FastTextSettings
    from edu_filter.train.classifier import train_classifier

    model = tmp_path / "ft"
    train_classifier([str(DATA / "code" / "python_edu_labels.jsonl")], model, kind="code", method="fasttext",
                     fasttext=FastTextSettings(epoch=5))
    docs = tmp_path / "in.jsonl"
    docs.write_bytes(b"".join(open(DATA / "code" / "thealgorithms_unlabelled.jsonl", "rb").readlines()[:30]))
    stats = run_apply([str(docs)], str(tmp_path / "out"), model=str(model), threshold=0, dedup=False, show=False)
    assert stats["adds_up"] and stats["kept"]["documents"] == 30 and stats["kept"]["tokens"] > 0
    kept = read_kept(tmp_path / "out")
    assert kept["token_count"].min() > 0 and kept["int_score"].is_between(0, 5).all()


def test_a_document_scored_not_a_number_fails_alone(stock_classifier, tmp_path):
    """One document overflowing (float16) failed its task on every rerun, and a resume in another --dtype was
    refused as changed: it goes to failed/non_finite_score, named, the counts adding up. (Here the weights of one
    word are NaN.)"""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    model = tmp_path / "model"
    shutil.copytree(stock_classifier, model)
    weights = load_file(model / "model.safetensors")
    word = AutoTokenizer.from_pretrained(model).convert_tokens_to_ids("zebra")
    name = next(k for k in weights if k.endswith("word_embeddings.weight"))
    weights[name][word] = float("nan")
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    rows = [{"id": f"d{i}", "text": f"A lesson on fractions and decimals, part {i}."} for i in range(9)]
    rows.append({"id": "zebra", "text": "The zebra is a striped animal of the savanna."})
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    stats = run_apply([str(tmp_path / "in.jsonl")], str(tmp_path / "out"), model=str(model), dedup=False,
                      threshold=0, show=False)
    assert stats["adds_up"] and stats["failed"]["non_finite_score"]["documents"] == 1 and stats["kept"][
        "documents"] == 9
    [failed] = [json.loads(line) for f in (tmp_path / "out" / "failed" / "non_finite_score").glob("*.gz")
                for line in gzip.open(f)]
    assert failed["id"] == "zebra" and "scored it nan" in failed["input_error"]
    # evaluate took its NaN for an int_score of 0 in every F1, warning only of "constant scores or labels"
    from edu_filter.classifiers.evaluate import evaluate_model
    from edu_filter.documents import RunError

    (tmp_path / "labelled.jsonl").write_text("".join(json.dumps({**r, "score": 2}) + "\n" for r in rows))
    with pytest.raises(RunError, match="scores 1 of 10 documents read so far with no finite number .first: zebra, nan"):
        evaluate_model(str(model), [str(tmp_path / "labelled.jsonl")])
    # damaged weights, every document not a number: the task fails at once, found on a probe sentence (NaN fails
    # every threshold: all would have been removed)
    from datatrove.data import Document

    from edu_filter.filters.scoring import EduClassifierScorer

    name = next(k for k in weights if k.startswith("classifier.") and k.endswith("bias"))
    weights[name][:] = float("nan")
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    step = EduClassifierScorer(str(model), window_size=4)
    with pytest.raises(RuntimeError, match=r"scores a plain sentence nan: its weights are damaged"):
        list(step.run(iter([Document(text=r["text"], id=r["id"]) for r in rows[:3]])))


def test_a_scoring_task_running_alone_takes_every_core(stock_classifier, tmp_path):
    """--workers above --tasks: each task's threads were the cores over --workers, a task alone on part of them."""
    from edu_filter.classifiers.device import default_num_threads

    planted_input(tmp_path / "in.jsonl", n_unique=4, n_groups=0)
    run_apply([str(tmp_path / "in.jsonl")], str(tmp_path / "out"), model=stock_classifier, dedup=False, workers=4,
              show=False)
    said = " ".join(log.read_text() for log in (tmp_path / "out" / "logs").glob("*/logs/task_*.log"))
    assert f"scoring on cpu with {default_num_threads()} torch threads" in said, said[-2000:]


def test_a_fasttext_run_keeps_its_count_tokenizer_when_gpt2_is_cached_since(tmp_path):
    """Offline, a fastText run counts tokens with the bundled MiniLM tokenizer and records it; GPT-2 in the hub
    cache by the resume changed that setting, and the resume was refused (only --overwrite went on). A new run
    there counts GPT-2 tokens."""
    import shutil

    from edu_filter.classifiers.encoders import minilm_path
    from edu_filter.classifiers.fasttext_model import FastTextSettings
    from edu_filter.train.classifier import train_classifier

    model = tmp_path / "ft"
    train_classifier([str(DATA / "code" / "python_edu_labels.jsonl")], model, kind="code", method="fasttext",
                     fasttext=FastTextSettings(epoch=2), learning_curve=False)
    docs = tmp_path / "in.jsonl"
    docs.write_bytes(b"".join(open(DATA / "code" / "thealgorithms_unlabelled.jsonl", "rb").readlines()[:10]))
    env = {"HF_HUB_CACHE": str(tmp_path / "hub")}
    args = ["apply", str(docs), "--model", str(model), "--threshold", "0", "--no-dedup", "-o", str(tmp_path / "out")]
    first = run_cli(args, env=env)
    assert first.returncode == 0 and "counting all-MiniLM-L6-v2 tokens" in first.stderr, first.stderr[-2000:]
    snapshot = tmp_path / "hub" / "models--gpt2" / "snapshots" / ("1" * 40)  # a tokenizer cached as gpt2
    snapshot.mkdir(parents=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (Path(minilm_path()) / name).exists():
            shutil.copy(Path(minilm_path()) / name, snapshot / name)
    (tmp_path / "hub" / "models--gpt2" / "refs").mkdir()
    (tmp_path / "hub" / "models--gpt2" / "refs" / "main").write_text("1" * 40)
    (tmp_path / "out" / "stats.json").unlink()  # the report stage to run again
    shutil.rmtree(tmp_path / "out" / "logs" / "report" / "completions")
    again = run_cli(args, env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    recorded = json.loads((tmp_path / "out" / "run_config.json").read_text())["settings"]["tokenizer"]
    assert Path(recorded) == Path(minilm_path()).resolve() or Path(recorded) == Path(minilm_path())
    fresh = run_cli(args[:-1] + [str(tmp_path / "fresh")], env=env)
    assert fresh.returncode == 0 and "unavailable" not in fresh.stderr, fresh.stderr[-2000:]
    assert json.loads((tmp_path / "fresh" / "run_config.json").read_text())["settings"]["tokenizer"] == "gpt2"
    overwritten = run_cli(args + ["--overwrite"], env=env)  # starting over: today's choice, not the record's
    assert overwritten.returncode == 0, overwritten.stderr[-2000:]
    assert json.loads((tmp_path / "out" / "run_config.json").read_text())["settings"]["tokenizer"] == "gpt2"


def test_equivalent_paths_resume_and_a_replaced_model_or_input_is_refused(stock_classifier, tmp_path, monkeypatch,
                                                                         capsys):
    import shutil

    from edu_filter.documents import DocumentError

    planted_input(tmp_path / "in.jsonl", n_unique=20, n_groups=0)
    model = tmp_path / "model"
    shutil.copytree(stock_classifier, model)
    monkeypatch.chdir(tmp_path)
    first = run_apply(["./in.jsonl"], "out", model="./model", threshold=2, dedup=False, show=False)
    again = run_apply([str(tmp_path / "in.jsonl")], str(tmp_path / "out"), model=str(model), threshold=2,
                      dedup=False, show=False)  # the same run: resumes (here: nothing left to do)
    assert again == first
    capsys.readouterr()
    # --overwrite kept in a script: the same run started over, its finished tasks discarded, said
    assert run_apply(["in.jsonl"], "out", model="model", threshold=2, dedup=False, overwrite=True, show=False)[
        "kept"] == first["kept"]
    said = " ".join(capsys.readouterr().err.split())
    assert re.search(r"--overwrite starts over: the \d+ finished tasks of the run in \S*out, made the way this one "
                     r"is, are discarded", said), said[-2000:]

    from safetensors.torch import load_file, save_file

    weights = load_file(model / "model.safetensors")
    weights["classifier.bias"] += 2.0  # another model, same folder, same file names and size
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(DocumentError, match="classifier's files changed"):
        run_apply(["in.jsonl"], "out", model="model", threshold=2, dedup=False, show=False)
    rescored = run_apply(["in.jsonl"], "out", model="model", threshold=2, dedup=False, overwrite=True, show=False)
    assert rescored["adds_up"] and rescored["kept"]["documents"] > first["kept"]["documents"]  # +2 on every score

    with open(tmp_path / "in.jsonl", "ab") as fh:  # the input replaced between runs
        fh.write(b'{"id": "late", "text": "a document that arrived later"}\n')
    with pytest.raises(DocumentError, match="in.jsonl changed"):
        run_apply(["in.jsonl"], "out", model="model", threshold=2, dedup=False, show=False)


def test_no_copy_of_the_corpus_is_left_and_stats_record_the_scratch(stock_classifier, tmp_path):
    planted = planted_input(tmp_path / "in.jsonl", n_unique=40, n_groups=4)
    stats = run_apply([str(tmp_path / "in.jsonl")], str(tmp_path / "out"), model=stock_classifier, threshold=2,
                      tasks=2, show=False)
    out = tmp_path / "out"
    assert stats["adds_up"] and stats["peak_scratch_bytes"] > 0 and not (out / "work").exists()
    texts = [json.loads(line)["text"][:200] for line in open(tmp_path / "in.jsonl", errors="replace")
             if line.startswith('{"id":"fineweb')]
    assert len(texts) == 40 + 8
    for f in out.rglob("*"):
        if not f.is_file() or f.relative_to(out).parts[0] in ("kept", "removed", "failed"):
            continue
        content = gzip.open(f).read() if f.suffix == ".gz" else f.read_bytes()
        assert not any(t.encode() in content for t in texts[:10]), f"{f} holds documents"
    kept = run_apply([str(tmp_path / "in.jsonl")], str(tmp_path / "kept-work"), model=stock_classifier,
                     threshold=2, tasks=2, keep_work=True, show=False)
    assert (tmp_path / "kept-work" / "work" / "minhash").is_dir() and kept["kept"] == stats["kept"]
    assert len(planted["ids"]) + 4 == stats["in"]["documents"]
    # the signatures and buckets were deleted as the filter stage began: the peak still counts them
    signatures = sum(f.stat().st_size for part in ("sigs", "buckets")
                     for f in (tmp_path / "kept-work" / "work" / "minhash" / part).rglob("*") if f.is_file())
    assert stats["peak_scratch_bytes"] >= signatures > 0


def test_each_task_of_the_stage_removing_duplicates_deletes_the_signatures_its_rank_wrote(tmp_path):
    """MinHash signatures of FineWeb's 22B documents are ~20 TB: they were kept until the report, beside the whole
    kept dataset. Each task of the filter stage deletes the signature files its rank wrote (and task r the r-th
    bucket's file), by datatrove's file names, once the stages reading them have all their completion files; the
    last of those stages records the scratch size first (without that record nothing is deleted); the documents
    pass through."""
    from datatrove.data import Document
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.exact_dedup import ExactDedupSignature, ExactFindDedups
    from datatrove.pipeline.dedup.minhash import MinhashDedupBuckets, MinhashDedupCluster

    from edu_filter.filters.dedup import (DropDedupScratch, RecordScratchPeak, exact_dedup_config,
                                          fineweb_minhash_config)
    from edu_filter.filters.minhash import FastMinhashSignature

    work, logs = tmp_path / "work", tmp_path / "logs"
    docs = [Document(text=f"document {i} " + "words that repeat in every document " * 5, id=str(i)) for i in range(20)]
    minhash, exact = fineweb_minhash_config(), exact_dedup_config()

    def run(name: str, pipeline: list, tasks: int) -> None:
        LocalPipelineExecutor(pipeline, tasks=tasks, workers=1, logging_dir=str(logs / name)).run()

    run("exact-signatures", [docs, ExactDedupSignature(str(work / "exact/sigs"), config=exact)], 2)
    run("exact-find", [ExactFindDedups(str(work / "exact/sigs"), str(work / "exact/dups"), config=exact)], 1)
    run("minhash-signatures", [docs, FastMinhashSignature(str(work / "minhash/sigs"), config=minhash)], 2)
    run("minhash-buckets", [MinhashDedupBuckets(str(work / "minhash/sigs"), str(work / "minhash/buckets"),
                                                config=minhash)], minhash.num_buckets)
    record = logs / "dedup_scratch.json"
    run("minhash-cluster", [MinhashDedupCluster(str(work / "minhash/buckets"), str(work / "minhash/remove"),
                                                config=minhash), RecordScratchPeak(str(work), str(record))], 1)
    scratch = lambda *parts: [f for part in parts for f in (work / part).rglob("*") if f.is_file()]  # noqa: E731
    signatures = scratch("exact/sigs", "minhash/sigs", "minhash/buckets")
    assert len(scratch("minhash/sigs")) == 2 * minhash.num_buckets and scratch("exact/sigs")
    assert json.loads(record.read_text())["peak_scratch_bytes"] >= sum(f.stat().st_size for f in signatures)

    writers = [str(logs / "exact-signatures"), str(logs / "minhash-signatures")]
    readers = [(str(logs / "exact-find"), 1), (str(logs / "minhash-buckets"), minhash.num_buckets),
               (str(logs / "minhash-cluster"), 1)]

    def drop(writers=writers, readers=readers, record=record) -> DropDedupScratch:
        return DropDedupScratch((str(work / "minhash/sigs"), str(work / "minhash/buckets"), minhash.num_buckets),
                                str(work / "exact/sigs"), writers, readers, str(record))

    for kept in (drop(readers=readers + [(str(logs / "never-ran"), 1)]), drop(writers=writers + [str(logs / "x")]),
                 drop(record=tmp_path / "none.json")):  # a stage incomplete; the size never recorded
        assert list(kept.run(iter(["a"]), rank=0, world_size=2)) == ["a"]
        assert len(scratch("exact/sigs", "minhash/sigs", "minhash/buckets")) == len(signatures)
    step = drop()
    assert list(step.run(iter(["a", "b"]), rank=1, world_size=2)) == ["a", "b"]
    assert len(scratch("minhash/sigs")) == minhash.num_buckets  # rank 0's are left to task 0
    list(step.run(iter([]), rank=0, world_size=2))
    list(step.run(iter([]), rank=0, world_size=2))  # a rerun of task 0: nothing left to delete, no error
    assert not scratch("exact/sigs", "minhash/sigs") and len(scratch("minhash/buckets")) == minhash.num_buckets - 2
    assert scratch("minhash/remove") and scratch("exact/dups")  # what the filter stage reads


def test_bucket_merges_shared_among_tasks_keep_and_remove_the_same_documents(fasttext_model, tmp_path):
    """Each of MinHash's 14 bucket merges shared by 3 tasks (--bucket-workers; by default one per 100 --tasks): the
    same duplicates removed, every task's .dups file read and deleted. A resumed run keeps the number it was planned
    with (its finished bucket tasks are numbered by it; an older edu-filter's, 1)."""
    from edu_filter.documents import InputError
    from edu_filter.filters.apply import ApplyConfig, bucket_workers_of_run, resumed_record

    planted_input(tmp_path / "in.jsonl", n_unique=40, n_groups=6)
    outputs = {}
    for workers in (1, 3):
        out = tmp_path / f"shared-{workers}"
        stats = run_apply([str(tmp_path / "in.jsonl")], str(out), model=str(fasttext_model), threshold=0, tasks=2,
                          bucket_workers=workers, show=False)
        assert stats["adds_up"] and not (out / "work").exists()
        assert len(list((out / "logs" / "minhash-buckets" / "completions").iterdir())) == 14 * workers
        assert json.loads((out / "run_config.json").read_text())["bucket_workers"] == workers
        outputs[workers] = {k: sorted(v) for k, v in read_outputs(out).items()}
    assert outputs[3] == outputs[1] and outputs[1]["removed/duplicate"]
    with pytest.raises(InputError, match="1 to 99"):  # files named with two digits: read out of order past 99
        run_apply([str(tmp_path / "in.jsonl")], str(tmp_path / "x"), model=str(fasttext_model), bucket_workers=100)

    cfg = ApplyConfig(inputs=[str(tmp_path / "in.jsonl")], output=str(tmp_path / "shared-3"), model="m", tasks=2)
    assert bucket_workers_of_run(cfg, resumed_record(cfg.output, False), None) == 3
    assert bucket_workers_of_run(cfg, resumed_record(cfg.output, True), None) == 1
    with pytest.raises(InputError, match="planned with 3"):
        bucket_workers_of_run(cfg, resumed_record(cfg.output, False), 2)
    record = json.loads((tmp_path / "shared-3" / "run_config.json").read_text())
    del record["bucket_workers"]  # as an older edu-filter wrote it
    (tmp_path / "shared-3" / "run_config.json").write_text(json.dumps(record))
    assert bucket_workers_of_run(cfg, resumed_record(cfg.output, False), None) == 1
    assert bucket_workers_of_run(ApplyConfig(inputs=[], output=str(tmp_path / "new"), model="m", tasks=2_000),
                                 resumed_record(str(tmp_path / "new"), False), None) == 20


def test_score_first_and_dedup_first_keep_the_same_documents_up_to_cluster_members(stock_classifier, tmp_path):
    """... and `sweep` of either output reads the summaries its scoring tasks wrote, with the numbers reading its
    documents gives (on a crawl those are terabytes of removed JSONL)."""
    from edu_filter.filters.sweep import run_sweep

    planted = planted_input(tmp_path / "in.jsonl", n_unique=60, n_groups=8)
    kept = {}
    for order in ("dedup-first", "score-first"):
        out = tmp_path / order
        stats = run_apply([str(tmp_path / "in.jsonl")], str(out), model=stock_classifier, threshold=2,
                          tasks=2, order=order, show=False)
        assert stats["adds_up"] and stats["settings"]["order"] == order
        kept[order] = set(read_kept(out)["id"].to_list())
        summed = run_sweep([str(out)], tmp_path / f"sweep-{order}", show=False)
        folders = [out / "kept", out / "removed" / "below_threshold"] + (
            [out / "removed" / "duplicate"] if order == "score-first" else [])
        read = run_sweep([str(f) for f in folders], tmp_path / f"read-{order}", show=False)
        assert summed["read_from_summaries"] == [str(out)] and read["read_from_summaries"] == []
        assert summed["documents"] == read["documents"] == stats["in"]["documents"] - sum(
            n["documents"] for n in stats["failed"].values()) - (
            stats["removed"]["duplicate"]["documents"] if order == "dedup-first" else 0)
        assert summed["labelled"] == read["labelled"] > 0
        for a, b in zip(summed["rows"], read["rows"]):
            assert a == pytest.approx(b)
    assert (tmp_path / "score-first" / "logs" / "score").is_dir()  # the threshold ran before dedup
    in_groups = {m for members in planted["groups"].values() for m in members}
    assert kept["dedup-first"] - in_groups == kept["score-first"] - in_groups
    for members in planted["groups"].values():
        assert len(kept["dedup-first"] & set(members)) <= 2 and len(kept["score-first"] & set(members)) <= 2


def test_keep_top_cutoff_is_recorded(stock_classifier, tmp_path):
    planted_input(tmp_path / "in.jsonl", n_unique=30, n_groups=0)
    stats = run_apply([str(tmp_path / "in.jsonl")], str(tmp_path / "out"), model=stock_classifier, keep_top=0.5,
                      dedup=False, show=False)
    kept = read_kept(tmp_path / "out")
    assert kept["score"].min() >= stats["keep_top_cutoff"] and kept.height == 15


def test_cli_output_is_progress_and_a_table_with_logs_in_out(stock_classifier, tmp_path):
    planted_input(tmp_path / "in.jsonl", n_unique=30, n_groups=3)
    res = run_cli(["apply", str(tmp_path / "in.jsonl"), "--model", stock_classifier, "-o", str(tmp_path / "out"),
                   "--tasks", "2"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "INFO" not in res.stderr and "Launching pipeline" not in res.stderr
    assert len(res.stderr.splitlines()) < 60 and "counts add up" in res.stderr
    assert "docs" in res.stderr and "minhash-signatures" in res.stderr
    assert "Launching pipeline" in (tmp_path / "out" / "logs" / "apply.log").read_text()
    status = run_cli(["status", str(tmp_path / "out")])
    assert status.returncode == 0 and "filter" in status.stdout and "2/2" in status.stdout
    assert "report stage did not finish" not in status.stdout
    for done in (tmp_path / "out" / "logs" / "report" / "completions").iterdir():  # killed after writing stats.json
        done.unlink()
    status = run_cli(["status", str(tmp_path / "out")])
    assert "the report stage did not finish" in " ".join(status.stdout.split()), status.stdout
    # a task's progress time runs to its end, its last documents scored and written (it stopped when its reader
    # did: the stage's docs/s was the reader's speed)
    for rank in range(2):
        record = json.loads((tmp_path / "out" / "logs" / "filter" / "progress" / f"{rank:05d}.json").read_text())
        written = max(f.stat().st_mtime for f in (tmp_path / "out").glob(f"*/**/*{rank:05d}*") if f.is_file()
                      and "logs" not in f.parts)
        assert record["done"] and record["updated"] >= written, (record, written)


def test_a_task_read_to_its_end_but_still_scoring_counts_in_the_bar_and_the_rate(tmp_path, monkeypatch):
    """The bar dropped a task's share to 0 once its reader was done, while scoring took its last two windows
    (minutes on CPUs), and the rate stopped at the reader's end."""
    import edu_filter.filters.progress as progress

    folder = tmp_path / "stage" / "progress"
    folder.mkdir(parents=True)
    record = {"documents": 100, "bytes": 10, "bytes_total": 10, "started": time.time() - 10, "updated":
              time.time() - 8, "done": True}
    (folder / "00000.json").write_text(json.dumps(record))
    stage = progress.read_stage_progress(str(tmp_path), "stage", 2)
    assert stage.running_fraction == 1.0 and stage.fraction == 0.5
    killed = {**record, "updated": time.time() - 2 * progress.SCORING_TAIL_S}  # its time stopped: killed, not scoring
    (folder / "00000.json").write_text(json.dumps(killed))
    assert progress.read_stage_progress(str(tmp_path), "stage", 2).running_fraction == 0.0
    (folder / "00000.json").write_text(json.dumps(record))
    monkeypatch.setattr(progress, "write_interval", lambda running_s: 0.0)
    progress.TaskProgress(str(tmp_path / "another-stage"), rank=0)  # a task run before in this process: not this one
    step = progress.TaskProgressTime(str(folder))
    assert list(step.run(iter(range(3)), rank=0)) == [0, 1, 2]
    touched = json.loads((folder / "00000.json").read_text())
    assert touched["updated"] > record["updated"] + 7 and {k: v for k, v in touched.items() if k != "updated"} == {
        k: v for k, v in record.items() if k != "updated"}
    reading = {**record, "done": False}  # while it reads, its reader writes the time
    (folder / "00000.json").write_text(json.dumps(reading))
    list(step.run(iter(range(3)), rank=0))
    assert json.loads((folder / "00000.json").read_text()) == reading


def test_cli_unknown_hub_model_is_refused_up_front_and_a_failing_stage_is_named(tmp_path, stock_classifier):
    """A folder a full disk cut short while saving: without weights or a tokenizer it is refused before any work
    (it failed every scoring task after the whole dedup); with weights cut short, the failing stage is named."""
    (tmp_path / "in.jsonl").write_text('{"id": "a", "text": "some text to score"}\n')
    res = run_cli(["apply", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out"), "--model", "org/no-such-model"])
    assert res.returncode == 2 and "model org/no-such-model: not a local folder" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "out").exists()
    broken = tmp_path / "broken-model"
    shutil.copytree(stock_classifier, broken)
    weights = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").unlink()
    tokenizer = {f.name: f.read_bytes() for f in broken.glob("*") if f.name.startswith(("tokenizer", "vocab"))}
    for name in tokenizer:
        (broken / name).unlink()
    args = ["apply", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out"), "--model", str(broken), "--no-dedup"]
    res = run_cli(args)
    assert res.returncode == 2 and "no weights (model.safetensors" in res.stderr, res.stderr
    (broken / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    res = run_cli(args)
    assert res.returncode == 2 and "no tokenizer (tokenizer.json" in res.stderr, res.stderr
    assert not (tmp_path / "out").exists()
    for name, content in tokenizer.items():
        (broken / name).write_bytes(content)
    res = run_cli(args)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "stage filter failed" in res.stderr and "task_00000.log" in res.stderr


@pytest.mark.parametrize("kind", ["parquet", "jsonl"])
def test_more_tasks_than_files_split_the_files(stock_classifier, tmp_path, monkeypatch, kind):
    """With fewer files than tasks every task read every file whole and kept every n-th row: `--tasks 64` over a
    few big files read the corpus 64 times. Tasks now split Parquet row groups or plain JSONL byte ranges: each
    reads its own, both passes of the dedup-first order alike, every document lands once and the dedup clusters
    keep one member each; the run records the split, and a run folder split the older way is not resumed with the
    new one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    import edu_filter.filters.io as io
    from edu_filter.documents import DocumentError

    monkeypatch.setattr(io, "JSONL_RANGE_MIN_BYTES", 1)  # ranges of a small file: a sixteenth of it each

    src = planted_input(tmp_path / "planted.jsonl", n_unique=40, n_groups=6)
    rows = []
    for line in open(tmp_path / "planted.jsonl", "rb"):
        try:
            row = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("text"), str) and row.get("id") in src["ids"]:
            rows.append(row)
    source = tmp_path / f"in.{kind}"
    if kind == "parquet":
        pq.write_table(pa.table({"id": [r["id"] for r in rows], "text": [r["text"] for r in rows]}), source,
                       row_group_size=10)
        assert pq.ParquetFile(source).metadata.num_row_groups >= 5
    else:
        source.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    out = tmp_path / "out"
    stats = run_apply([str(source)], str(out), model=stock_classifier, threshold=0, tasks=4,
                      order="dedup-first", show=False)
    split = json.loads((out / "run_config.json").read_text())["input_split"]
    assert stats["adds_up"] and split == {"parquet": "row groups", "jsonl": "byte ranges"}[kind] + " (contiguous)"
    found = read_outputs(out)
    landed = [i for ids in found.values() for i in ids]
    assert sorted(landed) == sorted(r["id"] for r in rows)  # every document once
    whole = read_outputs(tmp_path / "one-task") if run_apply(
        [str(source)], str(tmp_path / "one-task"), model=stock_classifier, threshold=0, tasks=1,
        order="dedup-first", show=False)["adds_up"] else None
    # the same clusters found (which member a cluster keeps may differ with the split)
    assert {k: len(v) for k, v in found.items()} == {k: len(v) for k, v in whole.items()}
    for members in src["groups"].values():
        assert sum(m in found["kept"] for m in members) == sum(m in whole["kept"] for m in members)
    for stage in ("minhash-signatures", "filter"):  # each task read its row groups (byte ranges) only
        progress = [json.loads(p.read_text()) for p in sorted((out / "logs" / stage / "progress").glob("*"))]
        read = [p["documents"] for p in progress]
        most = 2 * 10 if kind == "parquet" else len(rows) // 2
        assert len(read) == 4 and sum(read) == len(rows) and max(read) <= most, (stage, read)
        # not the whole file each, keeping every 4th row (which also shares out the documents)
        assert max(p["bytes_total"] for p in progress) < 0.6 * source.stat().st_size, progress
    record = json.loads((out / "run_config.json").read_text())
    del record["input_split"]
    (out / "run_config.json").write_text(json.dumps(record))
    with pytest.raises(DocumentError, match="split the input among the tasks another way"):
        run_apply([str(source)], str(out), model=stock_classifier, threshold=0, tasks=4,
                  order="dedup-first", show=False)


def _planted_rows(path: Path, groups: list | None = None) -> list[dict]:
    """The readable rows of a planted input (id and text); its duplicate groups added to `groups`."""
    src = planted_input(path, n_unique=40, n_groups=6)
    if groups is not None:
        groups.extend(src["groups"].values())
    rows = []
    for line in open(path, "rb"):
        with contextlib.suppress(orjson.JSONDecodeError):
            row = orjson.loads(line)
            if isinstance(row, dict) and isinstance(row.get("text"), str) and row.get("id") in src["ids"]:
                rows.append({"id": row["id"], "text": row["text"]})
    return rows


@pytest.mark.parametrize("kind", ["parquet", "gzipped"])
def test_a_run_planned_the_old_way_resumes_the_old_way(stock_classifier, tmp_path, monkeypatch, kind):
    """Runs planned before split files were dealt in runs of parts hold round-robin rows in their finished tasks,
    and runs over gzipped files fewer than the tasks every task's n-th rows of every file: a task rerun on resume
    must read the same rows (read the new way, its rows would land twice or not at all)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    import edu_filter.filters.apply as apply_module
    import edu_filter.filters.io as io

    rows = _planted_rows(tmp_path / "planted.jsonl")
    if kind == "parquet":
        sources = [tmp_path / "in.parquet"]
        pq.write_table(pa.table({"id": [r["id"] for r in rows], "text": [r["text"] for r in rows]}), sources[0],
                       row_group_size=5)
    else:
        sources = [tmp_path / "a.jsonl.gz", tmp_path / "b.jsonl.gz"]
        for i, source in enumerate(sources):
            source.write_bytes(gzip.compress(b"".join(orjson.dumps(r) + b"\n" for r in rows[i::2])))
    out = tmp_path / "out"
    args = dict(model=stock_classifier, threshold=0, tasks=4, order="dedup-first", show=False)
    inputs = [str(s) for s in sources]
    whole = read_outputs(tmp_path / "whole") if run_apply(inputs, str(tmp_path / "whole"), **args) else None
    reading = io.ApplyInputReader.run

    def task_1_dies_in_the_final_pass(self, data=None, rank=0, world_size=1):
        if rank == 1 and self.counts_folder is not None:
            raise RuntimeError("killed")
        yield from reading(self, data, rank, world_size)

    with monkeypatch.context() as m:  # as an older edu-filter planned it
        m.setattr(apply_module, "split_planned_the_old_way", lambda recorded: True)
        m.setattr(io.ApplyInputReader, "run", task_1_dies_in_the_final_pass)
        with pytest.raises(Exception, match="filter"):
            run_apply(inputs, str(out), **args)
    recorded = json.loads((out / "run_config.json").read_text()).get("input_split")
    assert recorded == ("row groups" if kind == "parquet" else None)
    assert not (out / "logs" / "filter" / "completions" / "00001").exists()
    stats = run_apply(inputs, str(out), **args)
    found = read_outputs(out)
    assert stats["adds_up"] and sorted(i for ids in found.values() for i in ids) == sorted(r["id"] for r in rows)
    assert {k: len(v) for k, v in found.items()} == {k: len(v) for k, v in whole.items()}  # as many duplicates


def test_a_run_whose_files_would_be_cut_otherwise_is_not_resumed_and_a_broken_record_is_overwritten(
        stock_classifier, tmp_path, monkeypatch):
    """The recorded split names only the kinds of parts: a footer read whole at the start and by row groups on the
    resume made the same name, and the resumed tasks read other rows than the finished ones wrote. The parts are
    recorded too. A run_config.json cut short (an older edu-filter wrote it in place) is reported, and --overwrite
    starts over instead of failing on it; so does a folder holding only the hidden file a record is written to."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    import edu_filter.filters.io as io
    from edu_filter.documents import DocumentError

    rows = _planted_rows(tmp_path / "planted.jsonl")
    for name, part in (("a", rows[::2]), ("c", rows[1::2])):
        pq.write_table(pa.table({"id": [r["id"] for r in part], "text": [r["text"] for r in part]}),
                       tmp_path / f"{name}.parquet", row_group_size=5)
    (tmp_path / "b.parquet").write_bytes(b"PAR1 not a parquet file")
    inputs = [str(tmp_path / f"{n}.parquet") for n in "abc"]
    out = tmp_path / "out"
    args = dict(model=stock_classifier, threshold=0, tasks=4, dedup=False, show=False)
    real = io._row_groups
    with monkeypatch.context() as m:  # a.parquet's footer did not read at the start
        m.setattr(io, "_row_groups", lambda folder, name: None if name == "a.parquet" else real(folder, name))
        assert run_apply(inputs, str(out), **args)["adds_up"]
    record = json.loads((out / "run_config.json").read_text())
    assert record["input_split"] == "row groups and whole files (contiguous)"
    (out / "stats.json").unlink()
    with pytest.raises(DocumentError, match="cut into other parts than when the run was planned"):
        run_apply(inputs, str(out), **args)
    (out / "run_config.json").write_text(json.dumps(record)[:50])
    with pytest.raises(DocumentError, match="run_config.json does not read.*--overwrite"):
        run_apply(inputs, str(out), **args)
    stats = run_apply(inputs, str(out), overwrite=True, **args)
    assert stats["adds_up"] and stats["in"]["documents"] == len(rows) + 1  # b.parquet: one unreadable record
    # a first run killed while it wrote its record leaves only the hidden file: the folder is still its own
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / ".partial-run_config.json").write_text('{"sett')
    assert run_apply(inputs, str(fresh), overwrite=True, **args)["adds_up"]
    assert not (fresh / ".partial-run_config.json").exists()
    (out / ".partial-kept").mkdir()  # a user's, not a record written whole: kept, and the folder is not apply's
    (out / ".partial-kept" / "notes.txt").write_text("mine")
    (out / "run_config.json").unlink()
    with pytest.raises(DocumentError, match=r"holds no apply run \(.partial-kept\)"):
        run_apply(inputs, str(out), overwrite=True, **args)
    assert (out / ".partial-kept" / "notes.txt").read_text() == "mine"


def test_gzipped_files_fewer_than_the_tasks_are_each_read_by_a_share_of_the_tasks(stock_classifier, tmp_path):
    """Two .jsonl.gz files and --tasks 4: every task read both files whole (4x the reading of the input, and the
    gunzipping). Each file is now read by the two tasks dealt it, each keeping every other row, in both passes of
    the dedup-first order; every document lands once and MinHash finds the same clusters as one task does."""
    groups = []
    rows = _planted_rows(tmp_path / "planted.jsonl", groups)
    sources = [tmp_path / "a.jsonl.gz", tmp_path / "b.jsonl.gz"]
    for i, source in enumerate(sources):
        source.write_bytes(gzip.compress(b"".join(orjson.dumps(r) + b"\n" for r in rows[i::2])))
    out = tmp_path / "out"
    args = dict(model=stock_classifier, threshold=0, order="dedup-first", show=False)
    stats = run_apply([str(s) for s in sources], str(out), tasks=4, **args)
    assert stats["adds_up"]
    assert json.loads((out / "run_config.json").read_text())["input_split"] == "whole files (contiguous)"
    found = read_outputs(out)
    assert sorted(i for ids in found.values() for i in ids) == sorted(r["id"] for r in rows)
    whole = read_outputs(tmp_path / "one") if run_apply([str(s) for s in sources], str(tmp_path / "one"), tasks=1,
                                                        **args) else None
    assert {k: len(v) for k, v in found.items()} == {k: len(v) for k, v in whole.items()}
    for members in groups:  # each cluster keeps as many as with one task (the passes matched row for row)
        assert sum(m in found["kept"] for m in members) == sum(m in whole["kept"] for m in members) >= 1
    for stage in ("minhash-signatures", "filter"):
        progress = [json.loads(p.read_text()) for p in sorted((out / "logs" / stage / "progress").glob("*"))]
        totals = [p["bytes_total"] for p in progress]
        assert totals == [sources[0].stat().st_size] * 2 + [sources[1].stat().st_size] * 2, (stage, totals)
        read = [p["documents"] for p in progress]
        assert sum(read) == len(rows) and max(read) <= len(rows[::2]) // 2 + 1, (stage, read)


@pytest.mark.parametrize("tasks", [1, 3])
def test_a_corrupt_parquet_page_is_one_unreadable_record_and_the_other_row_groups_are_read(fasttext_model, tmp_path,
                                                                                            tasks):
    """pyarrow reports a corrupt page as a plain OSError, like a transient read error: the task failed, and every
    resume failed again at the same page. A second read from that row tells them apart. Read whole, the row groups
    after the bad one were lost too (and the counts added up without them); with a task per row group they were
    read: the kept set changed with --tasks. (Rows are read 1024 at a time: row groups of 1024.)"""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": f"d{i}", "text": f"def f{i}(x):\n    return x * {i}\n"} for i in range(3 * 1024)]
    path = tmp_path / "in" / "c.parquet"
    path.parent.mkdir()
    pq.write_table(pa.table({"id": [r["id"] for r in rows], "text": [r["text"] for r in rows]}), path,
                   row_group_size=1024, compression="snappy")
    offset = pq.ParquetFile(path).metadata.row_group(1).column(1).data_page_offset
    data = bytearray(path.read_bytes())
    data[offset:offset + 8] = b"\xff" * 8  # the page header of the second row group's text
    path.write_bytes(bytes(data))
    with pytest.raises(OSError):
        pq.read_table(path)
    out = tmp_path / "out"
    stats = run_apply([str(path)], str(out), model=str(fasttext_model), threshold=0, dedup=False, show=False,
                      tasks=tasks)
    found = read_outputs(out)
    assert stats["adds_up"] and found["failed/unreadable_file"] == ["c.parquet (row group 1)"]
    failed = json.loads(gzip.open(next((out / "failed" / "unreadable_file").glob("*.gz"))).readline())
    assert "cannot read rows 1025-2048 of row group 1 (1,024 rows" in failed["input_error"]
    assert sorted(found["kept"]) == sorted(r["id"] for r in rows[:1024] + rows[2048:])  # the other groups, once


@pytest.mark.parametrize("order", ["score-first", "dedup-first"])
def test_awkward_inputs_land_once_with_their_fields_intact(stock_classifier, tmp_path, order):
    """What big crawls contain: a `rank` column (datatrove would name output files after it), a nested `metadata`
    column (datatrove's reader would unpack it between stages), a truncated gzip file and a broken Parquet file
    (which crashed their task on every resume), and a file the inputs name twice (read and counted twice)."""
    from edu_filter.documents import InputError

    rows = [json.loads(line) for line in open(DATA / "web" / "fineweb_edu_llama3_val.jsonl")]
    rows = [r for r in rows if len(r["text"].split()) >= 100][:50]
    data = tmp_path / "data"
    data.mkdir()
    with open(data / "a.jsonl", "wb") as fh:
        for i, r in enumerate(rows[:30]):
            fh.write(orjson.dumps({"id": r["id"], "text": r["text"], "rank": i % 2, "url": "top",
                                   "metadata": {"url": f"u{i}", "lang": "en"}}) + b"\n")
    packed = gzip.compress(b"".join(orjson.dumps({"id": r["id"], "text": r["text"]}) + b"\n" for r in rows[30:]))
    (data / "b.jsonl.gz").write_bytes(packed[: len(packed) * 2 // 3])  # cut off mid-stream
    readable_b = []
    with gzip.open(data / "b.jsonl.gz") as fh:
        try:
            for line in fh:
                readable_b.append(json.loads(line)["id"])
        except EOFError:
            pass
    (data / "c.parquet").write_bytes(b"not a parquet file")
    assert 0 < len(readable_b) < 20
    readable = [r["id"] for r in rows[:30]] + readable_b

    with pytest.raises(InputError, match="inside the input"):
        run_apply([str(data)], str(data / "out"), model=stock_classifier, threshold=0, show=False)
    out = tmp_path / "out"
    stats = run_apply([str(data), str(data / "a.jsonl")], str(out), model=stock_classifier, threshold=0, tasks=2,
                      order=order, show=False)
    found = read_outputs(out)
    assert stats["adds_up"]
    assert sorted(found["failed/unreadable_file"]) == ["b.jsonl.gz", "c.parquet"]
    landed = [i for dest, ids in found.items() if dest != "failed/unreadable_file" for i in ids]
    assert sorted(landed) == sorted(readable)  # each readable row exactly once
    assert stats["in"]["documents"] == len(readable) + 2
    kept = read_kept(out)
    assert sorted(p.name for p in (out / "kept").glob("*.parquet")) == ["000_00000.parquet", "000_00001.parquet"]
    from_a = kept.filter(pl.col("url") == "top").sort("id")
    assert from_a.height == len(found["kept"]) - sum(i in readable_b for i in found["kept"])
    assert set(from_a["rank"].to_list()) == {0, 1}
    assert {m["lang"] for m in from_a["metadata"].to_list()} == {"en"}


def test_deeply_nested_rows_fail_alone_and_same_named_inputs_keep_apart(stock_classifier, tmp_path):
    """A row nesting 300 lists in a field failed its task on every resume when it went to removed/ (orjson writes
    254 levels) and made kept/ Parquet no reader opens when kept (pyarrow reads ~50 nested lists). Two dumps each
    holding part-0.jsonl without ids named their rows alike; a failed row's source did not say which dump."""
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in open(DATA / "web" / "fineweb_edu_llama3_val.jsonl")][:6]
    dumps = [tmp_path / "dump-a", tmp_path / "dump-b"]
    deep = {"text": "nested " * 50, "meta": json.loads("[" * 300 + "1" + "]" * 300)}
    for k, dump in enumerate(dumps):
        dump.mkdir()
        lines = [json.dumps({"text": r["text"]}) for r in rows[3 * k:3 * k + 3]] + ["{not json"]
        if k == 0:
            lines.insert(1, json.dumps(deep))
            lines.append(json.dumps({"text": "just deep enough", "meta": json.loads("[" * 32 + "]" * 32)}))
        (dump / "part-0.jsonl").write_text("\n".join(lines) + "\n")
    for threshold in (0, 5):  # every readable row kept, then every one removed
        out = tmp_path / f"out{threshold}"
        stats = run_apply([str(d) for d in dumps], str(out), model=stock_classifier, threshold=threshold,
                          dedup=False, show=False)
        found = read_outputs(out)
        assert stats["adds_up"] and stats["in"]["documents"] == 10
        assert found["failed/too_deeply_nested"] == ["dump-a/part-0.jsonl:2"]
        assert sorted(found["failed/invalid_json"]) == ["dump-a/part-0.jsonl:5", "dump-b/part-0.jsonl:4"]
        readable = found["kept"] if threshold == 0 else found["removed/below_threshold"]
        assert sorted(readable) == ["dump-a/part-0.jsonl:1", "dump-a/part-0.jsonl:3", "dump-a/part-0.jsonl:4",
                                    "dump-a/part-0.jsonl:6", "dump-b/part-0.jsonl:1", "dump-b/part-0.jsonl:2",
                                    "dump-b/part-0.jsonl:3"]
        for f in (out / "kept").glob("*.parquet"):
            pq.read_table(f)
        record = json.loads(gzip.open(next((out / "failed" / "too_deeply_nested").glob("*.jsonl.gz"))).readline())
        assert json.loads(base64.b64decode(record["raw_base64"])) == deep  # nothing of the row is lost


@pytest.mark.parametrize("order", ["score-first", "dedup-first"])
def test_typed_parquet_fields_and_columns_named_like_ours_land_once_intact(stock_classifier, tmp_path, order):
    """Parquet and JSON fields JSON or Parquet cannot hold as they are (binary, decimal, duration, a map with integer
    keys, `{}`) crashed the stage on every resume; invalid UTF-8 in a Parquet string failed its whole task; a `text`
    or `id` column beside --text-field/--id-field replaced the scored text in every record (score-first deduplicated
    on it: 1 of 18 kept); a `media` column crashed datatrove's writer; a null token_count sent its rows to failed/."""
    import decimal
    import datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in open(DATA / "web" / "fineweb_edu_llama3_val.jsonl")]
    rows = [r for r in rows if len(r["text"].split()) >= 100][:24]
    data = tmp_path / "data"
    data.mkdir()
    title = "Lesson plan from the school district archive"
    with open(data / "j.jsonl", "wb") as fh:
        for r in rows[:6]:
            fh.write(orjson.dumps({"doc_id": f"j-{r['id']}", "content": r["text"], "text": title, "meta": {},
                                   "media": None}) + b"\n")
    part = rows[6:]
    content = [r["text"].encode() for r in part]
    content[5] = b"caf\xe9 " + content[5]  # not UTF-8
    pq.write_table(pa.table({
        "doc_id": [f"p-{r['id']}" for r in part],
        "content": pa.array(content, pa.binary()).view(pa.string()),
        "text": [title] * len(part),
        "id": list(range(len(part))),
        "token_count": pa.array([None if i >= 9 else 1000 + i for i in range(len(part))], pa.int64()),
        "blob": pa.array([bytes([i, 255]) for i in range(len(part))], pa.binary()),
        "price": pa.array([decimal.Decimal(f"{i}.25") for i in range(len(part))], pa.decimal128(10, 2)),
        "took": pa.array([datetime.timedelta(seconds=i) for i in range(len(part))], pa.duration("ns")),
        "tags": pa.array([[(i, "x")] for i in range(len(part))], pa.map_(pa.int64(), pa.string())),
        "when": pa.array([(1_700_000_000_123_456 + i) * 1000 for i in range(len(part))], pa.timestamp("ns", tz="UTC")),
        "day": pa.array([datetime.date(2020, 1, 1 + i) for i in range(len(part))], pa.date32()),
        "ratio": pa.array([[math.nan, math.inf, -math.inf][i % 3] if i < 6 else i / 8 for i in range(len(part))]),
        "ratios": pa.array([[math.nan, i / 8] for i in range(len(part))], pa.list_(pa.float64())),
        "local": pa.array([1_700_000_000_000_000 + i for i in range(len(part))], pa.timestamp("us", tz="Europe/Paris")),
    }), data / "p.parquet")

    out = tmp_path / "out"
    stats = run_apply([str(data)], str(out), model=stock_classifier, threshold=0, tasks=2, order=order, show=False,
                      text_field="content", id_field="doc_id")
    assert stats["adds_up"]
    failed = [json.loads(line) for f in (out / "failed").glob("*/*.jsonl.gz") for line in gzip.open(f)]
    assert [r["id"] for r in failed] == ["p.parquet:6"] and (out / "failed" / "invalid_utf8").is_dir()
    assert "p.parquet:6: a string field is not valid UTF-8" in failed[0]["input_error"]
    kept = [pq.read_table(f).to_pylist() for f in sorted((out / "kept").glob("*.parquet"))]
    kept = [row for rows_of_file in kept for row in rows_of_file]
    expected = {f"j-{r['id']}": r["text"] for r in rows[:6]} | {
        f"p-{r['id']}": r["text"] for i, r in enumerate(part) if i != 5}
    assert sorted(r["id"] for r in kept) == sorted(expected)  # every readable row kept once: none deduplicated
    assert all(r["text"] == expected[r["id"]] and r["input_text"] == title for r in kept)
    from_parquet = [r for r in kept if r["id"].startswith("p-")]
    assert sorted(r["input_id"] for r in from_parquet) == [i for i in range(len(part)) if i != 5]
    assert all(isinstance(r["token_count"], int) for r in kept)  # counted where the input's was null
    assert all(r["blob"] and r["price"] is not None and r["took"] is not None and r["tags"] for r in from_parquet)
    # typed as the input, in either order: score-first's files between stages held them as text (NaN as null)
    schema = next(s for s in map(pq.read_schema, (out / "kept").glob("*.parquet")) if "blob" in s.names)
    assert [str(schema.field(f).type) for f in ("blob", "took", "when", "day", "ratio")] == [
        "binary", "duration[us]", "timestamp[us, tz=UTC]", "date32[day]", "double"]  # the reader's units
    assert pa.types.is_decimal(schema.field("price").type)  # its precision from the values, in either order
    assert pa.types.is_list(schema.field("ratios").type) and schema.field("ratios").type.value_type == pa.float64()
    assert str(schema.field("local").type) == "timestamp[us, tz=Europe/Paris]"  # the zone, not an offset of a season
    by_row = {r["input_id"]: r for r in from_parquet}
    for i, r in by_row.items():
        assert r["blob"] == bytes([i, 255]) and r["price"] == decimal.Decimal(f"{i}.25")
        assert r["when"] == datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc) + datetime.timedelta(
            microseconds=1_700_000_000_123_456 + i) and r["day"] == datetime.date(2020, 1, 1 + i)
        assert repr(r["ratio"]) == repr([math.nan, math.inf, -math.inf][i % 3] if i < 6 else i / 8)
        assert math.isnan(r["ratios"][0]) and r["ratios"][1] == i / 8


def test_a_run_begun_by_an_older_edu_filter_keeps_writing_the_files_between_stages_as_text(tmp_path):
    """Its finished tasks' files hold times, bytes and NaN as text: the rest, written typed, would make the kept files
    type a column as strings in some and not in others."""
    from datatrove.data import Document

    from edu_filter.filters.apply import resumed_record, stage_values_of_run
    from edu_filter.filters.io import STAGE_VALUES, RecordWriter, untagged

    out = tmp_path / "out"
    assert stage_values_of_run(resumed_record(str(out), False)) == STAGE_VALUES  # a new run
    out.mkdir()
    (out / "run_config.json").write_text(json.dumps({"settings": {}, "input_files": {}}))  # as the older one wrote it
    assert stage_values_of_run(resumed_record(str(out), False)) is None
    assert stage_values_of_run(resumed_record(str(out), True)) == STAGE_VALUES
    (out / "run_config.json").write_text(json.dumps({"settings": {}, "stage_values": STAGE_VALUES}))
    assert stage_values_of_run(resumed_record(str(out), False)) == STAGE_VALUES
    doc = Document(text="t", id="a", metadata={"blob": b"\x00\xff", "ratio": math.nan})
    for tagged, expected in ((False, {"blob": "AP8=", "ratio": None}), (True, {"blob": b"\x00\xff"})):
        with RecordWriter(str(tmp_path / f"files-{tagged}"), tagged=tagged) as writer:
            writer.write(doc, rank=0)
        [line] = gzip.open(tmp_path / f"files-{tagged}" / "00000.jsonl.gz", "rt").read().splitlines()
        record = untagged(json.loads(line))
        assert {k: record[k] for k in expected} == expected
        assert tagged or "\\u0000" not in line
    assert math.isnan(record["ratio"])


@pytest.mark.parametrize("order", ["score-first", "dedup-first"])
def test_kept_files_of_a_parquet_corpus_load_as_one_dataset(stock_classifier, tmp_path, order):
    """A field null (or only empty lists) throughout one task's first kept batch was typed string (or list<null>)
    there and int64 elsewhere: the kept files did not load as one dataset (polars, the hub's `datasets`), and later
    rows of that task went to failed/schema_mismatch. The input's own types settle them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in open(DATA / "web" / "fineweb_edu_llama3_val.jsonl")]
    rows = [r for r in rows if len(r["text"].split()) >= 100][:16]
    data = tmp_path / "data"
    data.mkdir()
    for k, part in enumerate((rows[:8], rows[8:])):
        pq.write_table(pa.table({
            "id": [r["id"] for r in part], "text": [r["text"] for r in part],
            "stars": pa.array([None if k else 10 + i for i in range(8)], pa.int64()),  # null throughout file 1
            "licenses": pa.array([[] if k else ["mit"] for i in range(8)], pa.list_(pa.string())),
            "score": pa.array([None if k else 3.5] * 8, pa.float64()),  # an input's own, kept as input_score
        }), data / f"part-{k}.parquet")
    out = tmp_path / "out"
    stats = run_apply([str(data)], str(out), model=stock_classifier, threshold=0, tasks=2, order=order, show=False)
    assert stats["adds_up"] and not (out / "failed").exists()
    files = sorted((out / "kept").glob("*.parquet"))
    assert len(files) == 2
    schemas = [pq.read_schema(f) for f in files]
    assert [s.field("stars").type for s in schemas] == [pa.int64()] * 2
    assert [s.field("licenses").type for s in schemas] == [pa.list_(pa.string())] * 2
    assert [s.field("input_score").type for s in schemas] == [pa.float64()] * 2
    kept = pl.read_parquet(out / "kept" / "*.parquet")  # one dataset
    assert kept.height == 16 and kept["stars"].null_count() == 8


def test_a_uint64_column_is_kept_whole(stock_classifier, tmp_path):
    """A hash column stored as uint64 (values at or above 2**63): Python ints that big do not infer as int64, and
    every such row went to failed/schema_mismatch (half the documents of a random hash)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in open(DATA / "web" / "fineweb_edu_llama3_val.jsonl")][:24]
    hashes = [2**64 - 1 - i if i % 2 else i for i in range(24)]
    pq.write_table(pa.table({"id": [r["id"] for r in rows], "text": [r["text"] for r in rows],
                             "content_hash": pa.array(hashes, pa.uint64()),
                             "parts": pa.array([[h] for h in hashes], pa.list_(pa.uint64()))}), tmp_path / "in.parquet")
    (tmp_path / "in.jsonl").write_bytes(b"".join(orjson.dumps({"id": r["id"], "text": r["text"], "content_hash": h})
                                                 + b"\n" for r, h in zip(rows, hashes)))
    for source in ("in.parquet", "in.jsonl"):
        out = tmp_path / f"out-{source}"
        stats = run_apply([str(tmp_path / source)], str(out), model=stock_classifier, threshold=0, dedup=False,
                          show=False)
        assert stats["adds_up"] and not (out / "failed").exists(), source
        kept = pl.read_parquet(out / "kept" / "*.parquet")
        assert sorted(kept["content_hash"].to_list()) == sorted(hashes), source
        assert pq.read_schema(next((out / "kept").glob("*.parquet"))).field("content_hash").type == pa.uint64()


def test_kept_files_of_a_jsonl_corpus_type_a_field_alike(stock_classifier, tmp_path):
    """The same for JSONL inputs, typed by the values of the first input's first rows: a field null throughout one
    task's first kept batch became a string column (JSON text) there and int64 in the other task's file; a field
    absent from it (`license`) was no column there, and its later rows would have gone to failed/schema_mismatch; a
    float field holding whole numbers only there was int64 there. An integer past 64 bits (a 128-bit hash) is its
    digits, as text: read as a float it was written as another number; read exactly, no writer took it and its task
    failed on every rerun."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in open(DATA / "web" / "fineweb_edu_llama3_val.jsonl")]
    rows = [r for r in rows if len(r["text"].split()) >= 100][:16]
    data = tmp_path / "data"
    data.mkdir()
    for k, part in enumerate((rows[:8], rows[8:])):
        (data / f"part-{k}.jsonl").write_text("".join(json.dumps(
            {"id": r["id"], "text": r["text"], "stars": None if k else 10 + i,
             "meta": None if k else {"lang": "en", "year": 2024}, **({} if k else {"license": "mit"}),
             "rating": 4 if k else 3 + i % 2 / 2, "hash": 2**127 + i}) + "\n"
            for i, r in enumerate(part)))
    out = tmp_path / "out"
    stats = run_apply([str(data)], str(out), model=stock_classifier, threshold=0, tasks=2, show=False)
    assert stats["adds_up"] and not (out / "failed").exists()
    schemas = [pq.read_schema(f) for f in sorted((out / "kept").glob("*.parquet"))]
    assert len(schemas) == 2
    assert [s.field("stars").type for s in schemas] == [pa.int64()] * 2
    assert [s.field("meta").type for s in schemas] == [pa.struct([("lang", pa.string()), ("year", pa.int64())])] * 2
    assert [s.field("license").type for s in schemas] == [pa.string()] * 2
    # whole numbers alone in a float field (JS and Go tools write 3.0 as 3): typed int64 there, its 3.5s would fail
    assert [s.field("rating").type for s in schemas] == [pa.float64()] * 2
    kept = pl.read_parquet(out / "kept" / "*.parquet")
    assert kept.height == 16 and kept["stars"].null_count() == 8 and kept["license"].null_count() == 8
    assert sorted(kept["hash"].to_list()) == sorted([str(2**127 + i) for i in range(8)] * 2)


def test_a_hub_classifier_is_pinned_to_the_commit_the_run_started_with(stock_classifier, tmp_path):
    """A hub classifier updated between the Slurm jobs of one chain, or before a resume, would score part of the
    corpus with other weights. The run records ORG/NAME@COMMIT (its files now) and its tasks load that commit's files
    whatever the hub's main is by then (the explicit run below: main has moved on); a resume into the same folder
    keeps the commit instead of being refused; a new run takes the new one. The hub cache is laid out as
    huggingface_hub lays it out (refs/main, snapshots/COMMIT), read offline."""
    import shutil

    from transformers import AutoModelForSequenceClassification

    repo = tmp_path / "hub" / "models--edu--clf"
    first, second = "1" * 40, "2" * 40

    def publish(commit: str, bias: float) -> None:
        snapshot = repo / "snapshots" / commit
        shutil.copytree(stock_classifier, snapshot)
        model = AutoModelForSequenceClassification.from_pretrained(snapshot)
        model.classifier.bias.data.fill_(bias)
        model.save_pretrained(snapshot)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)

    publish(first, 1.5)
    src = planted_input(tmp_path / "in.jsonl", n_unique=20, n_groups=0)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub")}
    args = ["apply", str(tmp_path / "in.jsonl"), "--model", "edu/clf", "--threshold", "2", "--no-dedup"]

    def run(out: str, *extra: str) -> set:
        res = run_cli([*args, *extra, "-o", str(tmp_path / out)], env=env, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        config = json.loads((tmp_path / out / "run_config.json").read_text())["settings"]["model"]
        return config, set(read_outputs(tmp_path / out)["kept"])

    pinned, kept = run("out")
    assert pinned == f"edu/clf@{first}" and 0 < len(kept) < len(src["unique"])
    publish(second, 9.0)  # the hub moves on: every document would score 5
    for stage in ("filter", "report"):  # the scoring and report to run again, as after a kill
        for done in (tmp_path / "out" / "logs" / stage / "completions").iterdir():
            done.unlink()
    (tmp_path / "out" / "stats.json").unlink()
    assert run("out") == (pinned, kept)  # the same command resumes the run with its commit's weights, not refused
    assert run("new") == (f"edu/clf@{second}", set(src["unique"]))
    assert run("explicit", "--model", f"edu/clf@{first}") == (pinned, kept)  # a commit named on the command line
    assert run("out", "--overwrite") == (f"edu/clf@{second}", set(src["unique"]))  # starting over: the hub's now


def test_an_input_that_cannot_be_split_among_the_tasks_is_said_to_cost_a_read_per_task(stock_classifier, tmp_path,
                                                                                         capsys, monkeypatch):
    """One gzipped JSONL file and --tasks 4: every task reads it whole and keeps every 4th row, 4x the reading of
    one pass, which nothing said (at 25k files for 50k tasks, one unreadable Parquet footer did the same). So does
    every task dealt a part of a big gzipped file among plain ones. A small input whose extra reading is under a GiB
    (here a plain JSONL sample) is not worth the warning."""
    from edu_filter.filters import io
    from edu_filter.filters.apply import SlurmOptions

    planted_input(tmp_path / "in.jsonl", n_unique=10, n_groups=0)
    run_apply([str(tmp_path / "in.jsonl")], str(tmp_path / "small"), model=stock_classifier, executor="slurm",
              tasks=4, dedup=False, slurm=SlurmOptions(partition="cpu-q", dry_run=True))
    assert "the reading of one pass" not in capsys.readouterr().err  # too small to matter
    (tmp_path / "in.jsonl.gz").write_bytes(gzip.compress((tmp_path / "in.jsonl").read_bytes()))
    monkeypatch.setattr(io, "EXTRA_READING_WORTH_SAYING", 1000)  # the sample stands for a large input
    run_apply([str(tmp_path / "in.jsonl.gz")], str(tmp_path / "out"), model=stock_classifier, executor="slurm",
              tasks=4, dedup=False, slurm=SlurmOptions(partition="cpu-q", dry_run=True))
    said = " ".join(capsys.readouterr().err.split())
    assert "warning: up to 4 of the 4 tasks read one input file" in said and "4.0x the reading of one pass" in said
    monkeypatch.setattr(io, "JSONL_RANGE_MIN_BYTES", 256)  # in parts: a big gzipped file beside a plain one
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.jsonl.gz").write_bytes((tmp_path / "in.jsonl.gz").read_bytes())
    (tmp_path / "mixed" / "b.jsonl").write_bytes((tmp_path / "in.jsonl").read_bytes())
    files = io.expand_inputs([str(tmp_path / "mixed")])
    split = io.input_split(files, 8)
    reads = split.reads(8)
    assert split.kinds == ("whole files", "byte ranges") and reads[1] == 1 and 4 <= reads[0] < 8
    assert reads[0] == sum(any(i == 0 for i, _ in split.share(rank, 8)[0]) for rank in range(8))  # dealt a part
    run_apply([str(tmp_path / "mixed")], str(tmp_path / "mixed-out"), model=stock_classifier, executor="slurm",
              tasks=8, dedup=False, slurm=SlurmOptions(partition="cpu-q", dry_run=True))
    assert f"up to {reads[0]} of the 8 tasks read one input file" in " ".join(capsys.readouterr().err.split())
    run_apply([str(tmp_path / "in.jsonl.gz")], str(tmp_path / "one"), model=stock_classifier, executor="slurm",
              tasks=1, dedup=False, slurm=SlurmOptions(partition="cpu-q", dry_run=True))  # a file per task
    assert "the reading of one pass" not in capsys.readouterr().err


@pytest.mark.slow
def test_the_readmes_own_datatrove_pipeline_runs_as_a_script(stock_classifier, tmp_path):
    """The README's example, as a user copies it into a script: without its `__main__` guard, datatrove's forkserver
    workers ran the script again each and it never ended. Only the model and the input folder are changed."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("### In your own datatrove pipeline", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert "HuggingFaceFW/fineweb-edu-classifier" in code and '"crawl/"' in code
    (tmp_path / "crawl").mkdir()
    rows = [json.loads(line) for line in open(DATA / "web" / "fineweb_edu_llama3_val.jsonl")][:24]
    (tmp_path / "crawl" / "part.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    script = tmp_path / "pipeline.py"
    script.write_text(code.replace("HuggingFaceFW/fineweb-edu-classifier", stock_classifier))
    res = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env=ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    written = [json.loads(line) for folder in ("kept", "removed/below_threshold")
               for f in (tmp_path / folder).glob("*.jsonl.gz") for line in gzip.open(f)]
    assert sorted(r["id"] for r in written) == sorted(r["id"] for r in rows)  # each document in one of the two
    assert all(r["metadata"]["input_score"] == next(x["score"] for x in rows if x["id"] == r["id"]) for r in written)


def test_a_file_named_in_latin1_and_an_empty_id_are_named_by_their_place(stock_classifier, tmp_path):
    """apply named the rows of `caf\\xe9.jsonl` (a Latin-1 name) with surrogates, which orjson and Arrow refused:
    every task reading it failed, on every resume. An empty id (it keys nothing) is named by its place too."""
    import os

    data = tmp_path / "data"
    data.mkdir()
    rows = [json.loads(line) for line in open(DATA / "web" / "fineweb_edu_llama3_val.jsonl")][:3]
    rows[1]["id"] = ""
    Path(os.fsdecode(bytes(data) + b"/caf\xe9.jsonl")).write_text("".join(
        json.dumps({k: v for k, v in r.items() if k != "id" or r is rows[1]}) + "\n" for r in rows))
    stats = run_apply([str(data)], str(tmp_path / "out"), model=stock_classifier, threshold=0, dedup=False,
                      show=False)
    assert stats["adds_up"] and stats["kept"]["documents"] == 3
    assert sorted(read_kept(tmp_path / "out")["id"].to_list()) == [f"caf\\xe9.jsonl:{n}" for n in (1, 2, 3)]
