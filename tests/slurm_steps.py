"""Pipeline steps for executor tests: importable by Slurm jobs and local workers (the test puts this folder on their
PYTHONPATH)."""

from pathlib import Path

from datatrove.pipeline.base import PipelineStep


class FailOnRank(PipelineStep):
    """Raises in one task, as a task whose node died or whose input broke would."""

    name = "fail on one rank"

    def __init__(self, failing_rank: int):
        super().__init__()
        self.failing_rank = failing_rank

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        if rank == self.failing_rank:
            raise RuntimeError(f"planted failure in task {rank}")
        yield from data or []


class WriteMarker(PipelineStep):
    """Leaves a file saying this task ran."""

    name = "marker"

    def __init__(self, folder: str):
        super().__init__()
        self.folder = folder

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        (Path(self.folder) / f"{rank}").write_text("ran")
        self.stat_update("ran")
        yield from data or []


class RecordGpu(PipelineStep):
    """Records when the task ran and the GPU the scorer would give it on a machine with `gpus` GPUs."""

    name = "record gpu"

    def __init__(self, folder: str, gpus: int, slow_rank: int, seconds: float):
        super().__init__()
        self.folder, self.gpus, self.slow_rank, self.seconds = folder, gpus, slow_rank, seconds

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        import json
        import os
        import time

        from edu_filter.filters.scoring import gpu_for_task

        start = time.time()
        time.sleep(self.seconds if rank == self.slow_rank else self.seconds / 6)
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        (Path(self.folder) / f"{rank}").write_text(json.dumps(
            {"rank": rank, "gpu": gpu_for_task(rank, self.gpus), "start": start, "end": time.time(),
             "pid": os.getpid()}))
        yield from data or []


class Sleep(PipelineStep):
    """Takes longer than any test's time limit, as a task that outgrew its --slurm-time would."""

    name = "sleep"

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        import time

        time.sleep(self.seconds)
        yield from data or []


class HoldMemory(PipelineStep):
    """Holds `mib[rank]` MiB of touched memory for a few seconds, as a task that outgrew its --slurm-mem-gb would."""

    name = "hold memory"

    def __init__(self, mib: list[int], seconds: float = 8):
        super().__init__()
        self.mib, self.seconds = mib, seconds

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        import time

        held = b"\1" * (self.mib[rank] << 20)  # every byte written: resident, not just reserved
        time.sleep(self.seconds)  # long enough for Slurm's memory poll (every second on the test cluster)
        del held
        yield from data or []


class WriteStats(PipelineStep):
    """Writes a stats.json as apply's report stage does (what --wait reads once the chain is done)."""

    name = "stats"

    def __init__(self, out: str):
        super().__init__()
        self.out = out

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        import json

        counts = {"documents": 0, "tokens": 0}
        (Path(self.out) / "stats.json").write_text(json.dumps(
            {"in": counts, "kept": counts, "removed": {}, "failed": {}, "adds_up": True}))
        yield from data or []
