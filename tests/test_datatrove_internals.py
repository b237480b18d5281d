"""The few datatrove internals edu-filter overrides or calls, checked against the installed datatrove.

datatrove is pinned (pyproject.toml); these fail loudly, naming the internal, when an upgrade changes one of them:
- `ParquetWriter._write` / `_write_batch` and its `_batches` / `_writers` (KeptParquetWriter infers the schema from
  a whole batch, filters/io.py);
- `SlurmPipelineExecutor.launch_merge_stats`, called by `launch_job` (dropped by apply's Slurm executor, and the
  dry run mirrors `launch_job`, filters/executors.py);
- `MinhashDedupSignature.get_shingles` / `get_signature` (FastMinhashSignature, filters/minhash.py);
- `InferenceServer._server_ready` (the vLLM/SGLang backends wait on it, annotate/backends.py).
"""

import inspect
from importlib.metadata import version

TESTED = "0.10.1"


def params(func) -> list[str]:
    return list(inspect.signature(func).parameters)


def test_datatrove_is_the_tested_version():
    assert version("datatrove") == TESTED, "datatrove changed: re-check the internals listed in this file"


def test_parquet_writer_internals(tmp_path):
    from datatrove.pipeline.writers.parquet import ParquetWriter

    assert params(ParquetWriter._write) == ["self", "document", "file_handler", "filename"]
    assert params(ParquetWriter._write_batch) == ["self", "filename"]
    writer = ParquetWriter(str(tmp_path))
    assert isinstance(writer._batches, dict) and isinstance(writer._writers, dict)


def test_slurm_executor_launches_merge_stats_from_launch_job():
    from datatrove.executor.slurm import SlurmPipelineExecutor

    assert "self.launch_merge_stats()" in inspect.getsource(SlurmPipelineExecutor.launch_job)
    assert params(SlurmPipelineExecutor.get_launch_file_contents) == ["self", "sbatch_args", "run_script"]
    assert params(SlurmPipelineExecutor.get_sbatch_args) == ["self", "max_array"]


def test_minhash_signature_hooks():
    from datatrove.pipeline.dedup.minhash import MinhashDedupSignature

    assert params(MinhashDedupSignature.get_shingles) == ["self", "text"]
    assert params(MinhashDedupSignature.get_signature) == ["self", "shingles"]
    run = inspect.getsource(MinhashDedupSignature.run)
    assert "self.get_shingles(doc.text)" in run and "self.get_signature(shingles)" in run


def test_inference_server_ready_future():
    from datatrove.pipeline.inference.servers.base import InferenceServer

    assert "_server_ready" in inspect.getsource(InferenceServer)
