"""The Ray executor: a killed run resumes without duplicates (SIGKILL to the driver and the instance it started, to a
driver alone on a running cluster), workers Ray kills for memory fail the stage saying so, a cluster the run cannot
join is refused at once, and a GPU declared by the instance changes the order and the resources the tasks ask.

The classifier is the stock MiniLM regression model of `test_apply.py`: its scores are meaningless but deterministic.
The clean run they compare with is the session's `cli_tasks4` fixture, shared with `test_apply_resume.py`.
"""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edu_filter.filters.apply import run_apply

sys.path.insert(0, str(Path(__file__).parent))
from apply_corpus import (  # noqa: E402
    CLI,
    ENV,
    failed_run_stderr,
    fixture_args_into,
    planted_input,
    read_kept,
    read_outputs,
    rerun_gives_the_clean_result,
    run_cli,
    sigkill_mid_scoring_then_rerun,
)
from llm_test_server import free_port  # noqa: E402

pytestmark = pytest.mark.slow  # Ray instances, datatrove pipelines and subprocesses in every test


@pytest.mark.slow
def test_ray_run_killed_with_its_instance_then_rerun_gives_the_local_result(cli_tasks4, tmp_path):
    """SIGKILL to the driver and the Ray instance it started (a lost head node): the same command starts a new one,
    runs only the tasks without a completion file, and ends with what the local executor kept and removed."""
    pytest.importorskip("ray")
    sigkill_mid_scoring_then_rerun(cli_tasks4, tmp_path / "out", ["--executor", "ray"])


@contextlib.contextmanager
def ray_head(env: dict):
    """A Ray cluster started apart from any run, as users have one (`ray start --head` with `env`), torn down by its
    own process group: `ray stop` would stop every Ray instance on the machine, other tests' too. Yields its address."""

    pytest.importorskip("ray")
    port = free_port()
    temp = Path("/tmp") / f"ray-{port}"  # Ray's socket paths must stay short; its address file is written here
    head = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={port}",
                             "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats",
                             f"--temp-dir={temp}"], env={**ENV, **env}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (temp / "ray_current_cluster").exists():  # written once the head is up: the address to give
            assert head.poll() is None and time.time() < deadline, "ray start did not bring the head node up"
            time.sleep(0.5)
        yield (temp / "ray_current_cluster").read_text().strip()
    finally:
        head.terminate()  # `ray start --block` stops the cluster's processes, all in its process group, on SIGTERM
        try:
            head.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)  # whatever is left of the group
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def ray_cluster():
    with ray_head({"RAY_AUTH_MODE": "disabled"}) as address:  # `ray start` turns token auth on unless told
        yield address


def test_a_ray_cluster_this_run_cannot_join_is_refused_at_once_saying_why(cli_tasks4, tmp_path):
    """`ray start` turns token authentication on, so a user's first run against their cluster lacks the token; and a
    crashed cluster leaves an address nothing answers at. Ray retries either for 20 s and then says only "Failed to
    connect"; the run says which it is and what to do, before anything is written. With the token it joins."""
    import secrets

    out = tmp_path / "out"
    args = fixture_args_into(cli_tasks4, out) + ["--executor", "ray"]
    token = secrets.token_hex(32)
    joins = [sys.executable, "-c", "from edu_filter.filters.apply import RayOptions; "
             "from edu_filter.filters.executors import connect_ray; connect_ray(RayOptions())"]
    with ray_head({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "HOME": str(tmp_path)}) as address:
        refused = run_cli(args, env={"RAY_ADDRESS": address, "RAY_AUTH_MODE": "disabled"}, timeout=120)
        assert refused.returncode == 1, refused.stderr[-3000:]
        assert (f"the Ray cluster at {address} (RAY_ADDRESS) refused this run's authentication token"
                in refused.stderr), refused.stderr[-3000:]
        assert "RAY_AUTH_MODE=token" in refused.stderr and "Failed to connect" not in refused.stderr
        joined = subprocess.run(joins, env={**ENV, "RAY_ADDRESS": address, "RAY_AUTH_MODE": "token",
                                            "RAY_AUTH_TOKEN": token}, capture_output=True, text=True, timeout=120)
        assert f"Ray cluster at {address}: 1 live node, 2 CPUs" in joined.stderr, joined.stderr[-3000:]
    gone = run_cli(args, env={"RAY_ADDRESS": address}, timeout=120)
    assert gone.returncode == 1 and f"no Ray cluster answers at {address} (RAY_ADDRESS)" in gone.stderr, gone.stderr
    assert not (out / "stats.json").exists() and not (out / "logs" / "stages.json").exists()


@pytest.mark.slow
def test_a_ray_driver_killed_on_a_running_cluster_then_rerun_gives_the_local_result(cli_tasks4, ray_cluster,
                                                                                     tmp_path):
    """The usual way a Ray run dies: its driver (a closed terminal, a killed job) while the cluster lives on, with the
    driver's tasks still on it. The same command, RAY_ADDRESS still naming the cluster, reruns only the tasks without
    a completion file and ends with what the local executor kept and removed, no document twice."""
    sigkill_mid_scoring_then_rerun(cli_tasks4, tmp_path / "out", ["--executor", "ray"], env={"RAY_ADDRESS": ray_cluster})


@pytest.mark.slow
def test_ray_workers_killed_for_memory_fail_the_stage_saying_so_and_the_rerun_completes(cli_tasks4, tmp_path):
    """Ray's memory monitor kills task workers on a node short of memory (here: told that 1% of the machine's memory
    is the most its processes may use). A worker killed as its task started left datatrove's run waiting forever,
    silently; the stage now fails naming the task, Ray's reason and what to change, and the same command on a node
    with room runs only what is missing, ending with the clean run's result."""
    pytest.importorskip("ray")
    out = tmp_path / "out"
    args = fixture_args_into(cli_tasks4, out) + ["--executor", "ray"]
    starved = run_cli(args, env={"RAY_memory_usage_threshold": "0.01", "RAY_memory_monitor_refresh_ms": "100"},
                      timeout=300)
    assert starved.returncode == 1, starved.stderr[-3000:]
    error = starved.stderr.strip().splitlines()[-1]
    assert re.match(r"error: stage minhash-signatures failed \(\d/4 tasks did not complete: .*\): Ray lost the worker "
                    r"of task \d, its node low on memory \(\w+Error: .*\): give each task more --ray-mem-gb",
                    error), error
    rerun_gives_the_clean_result(cli_tasks4, out, args)


def test_ray_gpus_asks_a_gpu_where_no_live_node_has_one_yet_or_none_at_all():
    """An autoscaling cluster whose GPU workers are at zero showed no GPU when the run started: scoring went to CPUs
    and no GPU was ever asked for, so none was ever added. --ray-gpus 1 asks (with a warning that the tasks wait for
    a GPU node); --ray-gpus 0 scores on CPUs on a cluster with GPUs."""
    from edu_filter.filters.apply import RayOptions
    from edu_filter.filters.executors import ray_request_warnings, scoring_on_gpu

    cpu_only = [{"CPU": 8.0, "memory": 32 * 2**30}]
    with_gpu = cpu_only + [{"CPU": 16.0, "GPU": 1.0, "memory": 64 * 2**30}]
    assert ray_request_warnings(RayOptions(), cpu_only) == []
    assert ray_request_warnings(RayOptions(gpus=1), cpu_only) == [
        "--ray-gpus 1: no live Ray node has a GPU now, so the scoring tasks wait until one joins (an autoscaler may add "
        "it; on a fixed cluster, stop and leave --ray-gpus out)"]
    assert ray_request_warnings(RayOptions(gpus=1, gpu_cpus_per_task=12), with_gpu) == []
    # scoring on CPUs: the scoring task's CPUs are looked for on every node, not only on the GPU ones
    assert ray_request_warnings(RayOptions(gpus=0, gpu_cpus_per_task=12), [{"CPU": 16.0, "memory": 64 * 2**30},
                                                                          {"CPU": 4.0, "GPU": 1.0,
                                                                           "memory": 64 * 2**30}]) == []
    assert scoring_on_gpu("ray", None, RayOptions(gpus=1)) and not scoring_on_gpu("ray", None, RayOptions(gpus=0))


@pytest.mark.slow
def test_ray_executor_on_a_local_ray_instance_with_a_gpu(stock_classifier, fasttext_model, tmp_path, capsys):
    """On an instance this process already started, declaring one GPU (Ray schedules on what nodes declare; without
    CUDA the task scores on CPU): the run sees the GPU before choosing its order and scores first, the scoring task
    asks the GPU and --ray-gpu-cpus CPUs and scores on that many torch threads, the other tasks ask --ray-cpus; every
    task asks --ray-mem-gb, the minhash-cluster stage's --ray-cluster-mem-gb; a task no live node has the CPUs or the memory for is named in a warning (an autoscaler
    may still add the node). A fastText model's scoring tasks ask no GPU (each took one and left it idle, as many
    tasks at once as the cluster had GPUs)."""
    ray = pytest.importorskip("ray")
    from edu_filter.filters.apply import RayOptions
    from edu_filter.filters.executors import connect_ray, ray_task_log_folder

    planted = planted_input(tmp_path / "in.jsonl", n_unique=30, n_groups=4)
    out = tmp_path / "out"
    ray.init(num_cpus=2, num_gpus=1, _memory=6 * 2**30, include_dashboard=False, log_to_driver=False)
    try:
        assert connect_ray(RayOptions(cpus_per_task=2)) == []
        assert connect_ray(RayOptions(cpus_per_task=2, mem_gb=7)) == [
            "--ray-mem-gb 7: no live Ray node has more than 6.0 GB of memory for tasks now, so the tasks wait until "
            "one joins (an autoscaler may add it; on a fixed cluster, stop and lower --ray-mem-gb)",
            "--ray-mem-gb 7: no live Ray GPU node has more than 6.0 GB of memory for tasks now, so the tasks wait "
            "until one joins (an autoscaler may add it; on a fixed cluster, stop and lower --ray-mem-gb)"]
        assert connect_ray(RayOptions(gpu_cpus_per_task=4))[-1].startswith(
            "8 GB for a 4-CPU task (2 per CPU): no live Ray GPU node has more than 6.0 GB")
        assert connect_ray(RayOptions(cluster_mem_gb=9)) == [
            "--ray-cluster-mem-gb 9: no live Ray node has more than 6.0 GB of memory for tasks now, so the tasks wait "
            "until one joins (an autoscaler may add it; on a fixed cluster, stop and lower --ray-cluster-mem-gb)"]
        assert connect_ray(RayOptions(cpus_per_task=3))[0].startswith("--ray-cpus 3: no live Ray node has more than 2")
        assert connect_ray(RayOptions(gpu_cpus_per_task=3)) == ["--ray-gpu-cpus 3: no live Ray GPU node has more "
                                                                "than 2 CPUs now, so the tasks wait until one joins "
                                                                "(an autoscaler may add it; on a fixed cluster, stop "
                                                                "and lower --ray-gpu-cpus)"]
        assert "warning: --ray-gpu-cpus 3: no live Ray GPU node" in capsys.readouterr().err
        stats = run_apply([str(tmp_path / "in.jsonl")], str(out), model=stock_classifier, threshold=2,
                          executor="ray", tasks=2, show=False, ray=RayOptions(gpu_cpus_per_task=2, mem_gb=3,
                                                                              cluster_mem_gb=5))
        assert run_apply([str(tmp_path / "in.jsonl")], str(tmp_path / "fasttext"), model=fasttext_model, dedup=False,
                         executor="ray", tasks=2, show=False, ray=RayOptions(mem_gb=3))["adds_up"]
        assert json.loads((tmp_path / "fasttext/logs/filter/executor.json").read_text())["gpus_per_task"] == 0
    finally:
        ray.shutdown()
    found = read_outputs(out)
    assert stats["adds_up"] and found.get("removed/duplicate")  # duplicates that passed the threshold are removed
    for original, _, copy in planted["groups"].values():
        assert not {original, copy} <= set(found["kept"])  # an exact copy never survives beside its original
    assert json.loads((out / "run_config.json").read_text())["settings"]["order"] == "score-first"
    kept = read_kept(out)
    assert kept.height and kept["int_score"].min() >= 2
    executors = {p.parent.name: json.loads(p.read_text()) for p in out.glob("logs/*/executor.json")}
    asked = {name: (e["cpus_per_task"], e["gpus_per_task"], e["cpus_per_task"] * e["mem_per_cpu_gb"])
             for name, e in executors.items()}
    assert asked.pop("score") == (2, 1, 3) and asked.pop("minhash-cluster") == (1, 0, 5)
    assert set(asked.values()) == {(1, 0, 3)} and len(asked) == 4
    logs = sorted((out / "logs" / "score" / "logs").glob("task_*.log"))
    assert len(logs) == 2 and all(re.search(r"scoring on (cpu|cuda:0) with 2 torch threads", log.read_text())
                                  for log in logs)  # what the Ray workers really did
    # without --workers no throttle: Ray runs every task the cluster has the resources for
    assert all(e["workers"] == e["tasks"] for e in executors.values())
    # each task's log copied into the run's logs, and nothing left in the node's temporary folder, not even it
    for stage in out.glob("logs/*/executor.json"):
        assert (stage.parent / "logs").is_dir() and not any(
            Path(ray_task_log_folder(str(stage.parent), rank)).exists() for rank in range(20))


DRIVER_ONLY_STEP = '''
from datatrove.pipeline.base import PipelineStep


class DriverOnlyStep(PipelineStep):
    name = "driver only"

    def run(self, data=None, rank=0, world_size=1):
        yield from data or []
'''

DRIVER = '''
import sys
sys.path.insert(0, sys.argv[2])  # the driver's environment only: a module the workers lack
from rich.console import Console
from onlyhere_step import DriverOnlyStep
from edu_filter.filters.apply import RayOptions, Stage
from edu_filter.filters.executors import connect_ray, run_here
connect_ray(RayOptions())
run_here([Stage("filter", [DriverOnlyStep()], 2)], sys.argv[1], "ray", None, Console(stderr=True))
'''


@pytest.mark.slow
def test_a_ray_task_failing_before_its_log_exists_says_why(tmp_path):
    """A worker node without edu-filter (or with another version of a library) fails the task as it loads its
    arguments, before the task log is opened: the stage said only "log: task_00000.log", a file that never existed."""
    (tmp_path / "driveronly").mkdir()
    (tmp_path / "driveronly" / "onlyhere_step.py").write_text(DRIVER_ONLY_STEP)
    run = subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path / "out"), str(tmp_path / "driveronly")],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1
    said = run.stderr.strip().splitlines()[-1]
    assert re.search(r"stage filter failed \(2/2 tasks did not complete: 0, 1\): task \d failed on its Ray worker "
                     r"before its log was written \(ModuleNotFoundError: No module named 'onlyhere_step'\): every "
                     r"node of the cluster needs edu-filter", said), run.stderr[-3000:]


NODES_ASKED = '''
import socket
import subprocess
import sys
from pathlib import Path
import ray
from edu_filter.filters.executors import ray_nodes_not_seeing, remote_killed_task
ray.init(num_cpus=1, include_dashboard=False)
print(len(ray_nodes_not_seeing(sys.argv[1])), len(ray_nodes_not_seeing(sys.argv[2])))
running = Path(sys.argv[3]) / "stage" / "running"
running.mkdir(parents=True)
ended = subprocess.Popen(["true"])
ended.wait()
alive = subprocess.Popen(["sleep", "60"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
for rank, pid in ((0, alive.pid), (3, ended.pid)):
    (running / f"{rank:05d}").write_text(f"{pid} {socket.gethostname()}")
print(remote_killed_task(sys.argv[3], "stage"), remote_killed_task(sys.argv[3], "stage", here="the-driver"))
(running / "00003").unlink()
print(remote_killed_task(sys.argv[3], "stage", here="the-driver"))
alive.kill()
ray.shutdown()
'''


@pytest.mark.slow
def test_the_other_nodes_are_asked_whether_they_see_the_output_and_run_their_tasks(tmp_path):
    """A node with its own disk wrote its tasks' files there and the run failed hours later saying only that tasks
    "did not complete": a run on several nodes asks each whether it sees the output (one node here: a folder that
    exists and one that does not stand for a node that mounts it and one that does not). A task's process killed
    on another node (the kernel's out-of-memory killer) left its pool there waiting forever: each node is asked
    whether its tasks' processes still run (the one node here, taken for another one by a driver named otherwise)."""
    (tmp_path / "out").mkdir()
    run = subprocess.run([sys.executable, "-c", NODES_ASKED, str(tmp_path / "out"), str(tmp_path / "nowhere"),
                          str(tmp_path / "logs")], env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split()[-5:] == ["0", "1", "None", "3", "None"]  # its own tasks are this machine's to check


@pytest.mark.slow
def test_a_ray_task_process_killed_alone_fails_the_run_naming_it(cli_tasks4, tmp_path):
    """The kernel's out-of-memory killer takes the process running a Ray task (datatrove's pool child on the node):
    its pool waited for the task forever, the run hanging with nothing said and `status` showing nothing. The task
    leaves its `running/` file now: the run (on the machine the task ran on) stops naming it and what to change."""
    out = tmp_path / "out"
    args = fixture_args_into(cli_tasks4, out) + ["--executor", "ray"]
    proc = subprocess.Popen(CLI + args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline, killed = time.time() + 300, None
    while killed is None and time.time() < deadline and proc.poll() is None:
        for marker in (out / "logs").glob("*/running/*"):  # the first stage's first task seen running
            with contextlib.suppress(OSError, ValueError):
                pid = int(marker.read_text().split()[0])  # "PID HOST"
                if not (marker.parents[1] / "completions" / marker.name).exists():
                    os.kill(pid, signal.SIGKILL)
                    killed = marker.parents[1].name
                    break
        time.sleep(0.05)
    assert killed is not None, "no task was seen running"
    stderr = failed_run_stderr(proc, timeout=180)
    assert re.search(rf"stage {killed} failed: the process of task \d was killed before the task finished.* more "
                     r"--ray-mem-gb", " ".join(stderr.split())), stderr[-3000:]


@pytest.mark.slow
def test_a_ray_run_stopped_while_its_tasks_wait_for_resources_exits(cli_tasks4, tmp_path):
    """A task no node can take (--ray-cpus above every node's CPUs: the run warns, "on a fixed cluster, stop and
    lower --ray-cpus") waits for its resources. Ctrl-C then did not end the driver: its threads waited for every
    queued task to start and run, forever here, the whole stage at scale. It now stops the stage and exits."""
    out, said = tmp_path / "out", tmp_path / "stderr.txt"
    args = fixture_args_into(cli_tasks4, out) + ["--executor", "ray", "--ray-cpus", "3"]
    with open(said, "w") as stderr:
        proc = subprocess.Popen(CLI + args, env=ENV, stdout=subprocess.DEVNULL, stderr=stderr, text=True,
                                start_new_session=True)
    try:
        deadline = time.time() + 120
        while "no live Ray node has more than" not in said.read_text():
            assert time.time() < deadline and proc.poll() is None, said.read_text()[-3000:]
            time.sleep(0.2)
        time.sleep(5)  # the first stage's tasks submitted, waiting for a node of 3 CPUs
        stopped = time.time()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=90)
        assert time.time() - stopped < 45 and proc.returncode == 130, said.read_text()[-3000:]
        assert not list((out / "logs").glob("*/completions/*"))  # none ever started
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
