"""The command line's error contract, through the real `edu-filter` commands.

Every bad invocation prints exactly one line `error: ...` on stderr naming the problem, no traceback, exits 2 (bad
usage or input, found before any work) and leaves no output behind; a failure while running exits 1.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edu_filter.cli import app, exit_status

REPO = Path(__file__).resolve().parents[1]
WEB_VAL = REPO / "data/web/fineweb_edu_llama3_val.jsonl"
CODE_LABELS = REPO / "data/code/python_edu_labels.jsonl"
NO_SERVER = "http://127.0.0.1:9/v1"  # nothing listens on port 9: any request would fail, none must be made
CLI = str(Path(sys.executable).parent / "edu-filter")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

runner = CliRunner()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def refused(args: list[str], *fragments: str, status: int = 2, absent: tuple[Path, ...] = ()) -> str:
    """Run `edu-filter ARGS`; check it exits `status` with one `error:` line on stderr naming `fragments`, that no
    traceback shows, and that none of the `absent` paths exists afterwards. Returns the error line."""
    result = runner.invoke(app, [str(a) for a in args])
    lines = result.stderr.splitlines()
    assert result.exit_code == status, (result.exit_code, result.output, result.exception)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    for path in absent:
        assert not path.exists(), f"{path} was created"
    return lines[0]


@pytest.fixture
def files(tmp_path):
    """Real small inputs: scored rows, labels outside 0-5, an empty file, and a regular file to put outputs under."""
    rows = [json.loads(line) for line in WEB_VAL.read_text().splitlines()[:20]]
    scored = [{"id": r["id"], "text": r["text"], "score": i % 6 * 0.9 + 0.2, "int_score": i % 6} for i, r in enumerate(rows)]
    out_of_range = [{"id": r["id"], "text": r["text"], "score": r["score"]} for r in rows[:12]]
    out_of_range[6]["score"] = 7
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "a_file").write_text("not a folder\n")
    return {
        "scored": write_jsonl(tmp_path / "scored.jsonl", scored),
        "labels7": write_jsonl(tmp_path / "labels7.jsonl", out_of_range),
        "empty": tmp_path / "empty.jsonl",
        "blocked": tmp_path / "a_file" / "out",  # its parent is a file: cannot be created, even by root
        "new": tmp_path / "new" / "out",
        "tmp": tmp_path,
    }


# --- outputs that cannot be written ------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["score", "train", "apply", "sweep", "ablate", "evaluate", "agreement"])
def test_unwritable_output_is_refused_before_any_work(command, files, stock_classifier):
    blocked = files["blocked"]
    args = {
        "score": ["score", WEB_VAL, "-o", blocked.with_suffix(".jsonl"), "--base-url", NO_SERVER],
        "train": ["train", CODE_LABELS, "-o", blocked],
        "apply": ["apply", WEB_VAL, "-o", blocked, "--model", stock_classifier, "--no-dedup"],
        "sweep": ["sweep", files["scored"], "-o", blocked],
        "ablate": ["ablate", "--data", f"web={WEB_VAL}", "-o", blocked],
        "evaluate": ["evaluate", stock_classifier, CODE_LABELS, "--report", blocked.with_suffix(".json")],
        "agreement": ["agreement", files["scored"], files["scored"], "--report", blocked.with_suffix(".json")],
    }[command]
    refused(args, "cannot be created", "a_file is a file")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write into read-only folders")
@pytest.mark.parametrize("command", ["sweep", "train"])
def test_read_only_parent_folder_is_refused(command, files):
    locked = files["tmp"] / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        args = {"sweep": ["sweep", files["scored"], "-o", locked / "sw"],
                "train": ["train", CODE_LABELS, "-o", locked / "model"]}[command]
        refused(args, "not writable", absent=(locked / "sw", locked / "model"))
    finally:
        locked.chmod(0o755)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_a_folder_where_nothing_can_be_created_is_refused_even_for_root(command, files, stock_classifier):
    """Permissions say yes to root in /proc (or on a read-only mount): train and evaluate did all their work and
    then failed to write. A folder made and removed at once tells."""
    args = {"train": ["train", CODE_LABELS, "-o", "/proc/edu-filter-model"],
            "evaluate": ["evaluate", stock_classifier, CODE_LABELS, "--report", "/proc/edu-filter-report.json"]}[command]
    refused(args, "cannot be created in /proc")


# --- labels outside 0-5 ------------------------------------------------------------------------------------------
def test_train_refuses_a_label_outside_0_5_naming_file_and_line(files):
    out = files["new"]
    refused(["train", files["labels7"], "-o", out], "labels7.jsonl:7", "'score' is 7", "0-5", absent=(out.parent,))


def test_evaluate_refuses_a_label_outside_0_5_naming_file_and_line(files, stock_classifier):
    report = files["new"] / "report.json"
    refused(["evaluate", stock_classifier, files["labels7"], "--report", report], "labels7.jsonl:7", "0-5",
            absent=(report.parent.parent,))


def test_agreement_refuses_a_score_outside_0_5_naming_file_and_row(files):
    ten_point = write_jsonl(files["tmp"] / "ten_point.jsonl", [{"id": "a", "score": 3}, {"id": "b", "score": 8.5}])
    refused(["agreement", files["scored"], ten_point], "ten_point.jsonl:2", "8.5", "0-5")


def test_sweep_refuses_labels_and_thresholds_outside_0_5(files):
    out = files["new"]
    refused(["sweep", files["scored"], "-o", out, "--thresholds", "2,7"], "--thresholds", "7", absent=(out.parent,))
    refused(["sweep", files["scored"], "-o", out, "--thresholds", "two"], "--thresholds", absent=(out.parent,))
    labelled = write_jsonl(files["tmp"] / "labelled.jsonl", [{"score": 1.0, "int_score": 1, "label": 12}])
    refused(["sweep", labelled, "-o", out], "labelled.jsonl:1", "0-5", absent=(out.parent,))


def test_a_folder_output_that_is_a_file_is_refused_before_any_work(files):
    """sweep read its whole input (hours without summaries), then failed with exit 1 and "[Errno 17] File exists"."""
    taken = files["tmp"] / "taken"
    taken.write_text("a file already\n")
    for args in (["sweep", files["scored"]], ["apply", files["scored"], "--no-dedup"], ["demo"],
                 ["ablate", "--data", f"a={files['scored']}"]):
        refused(args + ["-o", taken], f"-o/--output {taken}: a file, not a folder")
        assert taken.read_text() == "a file already\n"


def test_a_file_output_that_is_a_folder_is_refused_before_any_work(files, stock_classifier):
    """score sent every document to the LLM (paid) and failed renaming its output onto the folder, leaving a
    full-size partial copy; evaluate and agreement did all their work first too."""
    taken = files["tmp"] / "taken.jsonl"
    taken.mkdir()
    for args, what in ((["score", WEB_VAL, "-o", taken, "--base-url", NO_SERVER], "-o/--output"),
                       (["score", WEB_VAL, "-o", files["tmp"] / "new.jsonl", "--cache", taken, "--base-url", NO_SERVER], "--cache"),
                       (["evaluate", stock_classifier, CODE_LABELS, "--report", taken], "--report"),
                       (["agreement", files["scored"], files["scored"], "--report", taken], "--report")):
        refused(args, f"{what} {taken}: a folder, not a file")
        assert taken.is_dir() and not any(taken.iterdir())
    other = files["scored"]  # a --cache naming another file (another input): a traceback before
    before = other.read_bytes()
    refused(["score", WEB_VAL, "-o", files["tmp"] / "new.jsonl", "--cache", other, "--base-url", NO_SERVER],
            f"--cache {other}: not an edu-filter answer cache")
    assert other.read_bytes() == before


# --- empty input -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["score", "train", "apply", "sweep", "evaluate"])
def test_empty_input_is_refused(command, files, stock_classifier):
    empty, out = files["empty"], files["new"]
    args = {
        "score": ["score", empty, "-o", out / "scores.jsonl", "--base-url", NO_SERVER],
        "train": ["train", empty, "-o", out],
        "apply": ["apply", empty, "-o", out, "--model", stock_classifier],
        "sweep": ["sweep", empty, "-o", out],
        "evaluate": ["evaluate", stock_classifier, empty, "--report", out / "report.json"],
    }[command]
    line = refused(args, "empty.jsonl", absent=(out.parent,))
    assert "no " in line or "empty" in line


# --- prompts -----------------------------------------------------------------------------------------------------
def test_unknown_prompt_name_is_one_line_for_score_and_show_prompt(files):
    out = files["new"] / "scores.jsonl"
    refused(["score", WEB_VAL, "-o", out, "--prompt", "no-such-rubric", "--base-url", NO_SERVER],
            "unknown prompt 'no-such-rubric'", absent=(out.parent.parent,))
    refused(["score", "--show-prompt", "no-such-rubric"], "unknown prompt 'no-such-rubric'")
    for url in ("localhost:8000/v1", "127.0.0.1:8000", "ftp://host/v1"):  # retried as a server down before
        refused(["score", WEB_VAL, "-o", out, "--base-url", url], f"--base-url {url}: expected http://HOST:PORT/v1",
                absent=(out.parent.parent,))


def test_show_prompt_with_data_is_refused_rather_than_ignoring_the_data(files):
    line = refused(["score", WEB_VAL, "--show-prompt", "web"], "--show-prompt")
    assert "DATA" in line
    shown = runner.invoke(app, ["score", "--show-prompt", "web"])
    assert shown.exit_code == 0 and "prompt fineweb-edu-v1" in shown.stdout and "Educational score" in shown.stdout


def test_score_without_data_or_output_is_one_line():
    refused(["score", "-o", "x.jsonl"], "give input DATA and -o OUTPUT")


def test_a_cache_named_like_the_output_is_refused(files):
    """The finished output replaces its file at the end: named alike, it would overwrite every paid-for answer."""
    out = files["new"] / "scores.jsonl"
    refused(["score", WEB_VAL, "-o", out, "--cache", out, "--base-url", NO_SERVER], "--cache", "is the -o/--output",
            absent=(out.parent.parent,))


def test_an_output_that_is_an_input_inside_one_remote_or_being_written_is_refused(files, tmp_path):
    """`-o` the input replaced it with the annotated rows; inside an input folder, the rerun that resumes read it as
    documents; `s3://...` became a local folder `s3:`; a second run of one output (a job resubmitted while the first
    ran) wrote the same partial file, exit 0 for a mixed output."""
    from edu_filter.documents import writing_alone

    data = tmp_path / "data"
    data.mkdir()
    docs = data / "docs.jsonl"
    docs.write_bytes(Path(WEB_VAL).read_bytes())
    for given, out, said in ((docs, docs, "is the input"), (data, data / "scores.jsonl", "is inside the input folder")):
        refused(["score", given, "-o", out, "--base-url", NO_SERVER], said)
    refused(["score", docs, "-o", tmp_path / "s.jsonl", "--cache", docs, "--base-url", NO_SERVER], "--cache", "is the input")
    assert docs.read_bytes() == Path(WEB_VAL).read_bytes()
    # a cache in the input folder is no document: this run stops only at the server that does not answer
    refused(["score", data, "-o", tmp_path / "s.jsonl", "--cache", data / "answers.sqlite", "--base-url", NO_SERVER],
            "cannot reach")
    for command in (["score", docs, "-o", "s3://bucket/scores.jsonl", "--base-url", NO_SERVER],
                    ["train", WEB_VAL, "-o", "s3://bucket/model"],
                    ["apply", docs, "-o", "s3://bucket/edu", "--model", tmp_path / "no-model"]):
        refused(command, "s3:/", "a remote location", absent=(Path("s3:"),))
    out = files["new"] / "scores.jsonl"
    with writing_alone(out):
        line = refused(["score", docs, "-o", out, "--base-url", NO_SERVER], "is being written by another run",
                       f"process {os.getpid()}", status=1)
    assert "-o/--output" in line
    with writing_alone(tmp_path / "shared.sqlite", "--cache"):  # another output of the same answers
        refused(["score", docs, "-o", tmp_path / "other.parquet", "--cache", tmp_path / "shared.sqlite", "--base-url",
                 NO_SERVER], "--cache", "shared.sqlite is being written by another run", status=1)


# --- models ------------------------------------------------------------------------------------------------------
def test_missing_model_is_refused_by_evaluate_apply_and_score(files, minilm_path, fasttext_model):
    out, missing = files["new"], files["tmp"] / "no-such-model"
    refused(["evaluate", missing, CODE_LABELS], "no-such-model", "no such file or folder")
    refused(["apply", WEB_VAL, "-o", out, "--model", missing], "no-such-model", "no such file or folder",
            absent=(out.parent,))
    refused(["score", WEB_VAL, "-o", out / "s.jsonl", "--backend", "transformers", "--model", missing],
            "no-such-model", "no such file or folder", absent=(out.parent,))
    # a folder holding no model: found by the scoring tasks, after the whole MinHash dedup, and exit 1
    empty = files["tmp"] / "not-a-model"
    empty.mkdir(exist_ok=True)
    (empty / "notes.txt").write_text("weights elsewhere")
    refused(["apply", WEB_VAL, "-o", out, "--model", empty], "not-a-model: not a model folder (no config.json",
            absent=(out.parent,))
    refused(["apply", WEB_VAL, "-o", out, "--model", empty, "--order", "bogus"], "order must be one of",
            absent=(out.parent,))
    # an encoder given for the classifier, and a fastText folder whose model.bin is not one: the same, refused now
    refused(["apply", WEB_VAL, "-o", out, "--model", minilm_path], "a model with 2 outputs, not a classifier's one",
            absent=(out.parent,))
    broken = files["tmp"] / "broken-fasttext"
    shutil.copytree(fasttext_model, broken)
    (broken / "model.bin").write_bytes(b"not a model")
    refused(["apply", WEB_VAL, "-o", out, "--model", broken], "model.bin is missing, not a fastText model",
            absent=(out.parent,))
    # cut short in its dictionary (a full disk, a partial copy): fastText's loader allocated without end
    whole = (fasttext_model / "model.bin").read_bytes()
    (broken / "model.bin").write_bytes(whole[:4096])
    refused(["apply", WEB_VAL, "-o", out, "--model", broken], "model.bin is missing, not a fastText model, or cut "
            "short", absent=(out.parent,))
    # evaluate read the whole data set first, then failed with exit 1 (transformers' notes on an encoder's new head)
    for folder, said in ((empty, "not a model folder"), (minilm_path, "a model with 2 outputs"),
                         (broken, "not a fastText model, or cut short")):
        refused(["evaluate", folder, CODE_LABELS], f"MODEL {folder}", said)
    # a named weight field no row has: evaluated unweighted, an active sample's bias kept
    refused(["evaluate", fasttext_model, CODE_LABELS, "--weight-field", "wt"], "--weight-field 'wt': no row has it "
            "(`score --select active` writes inclusion weights as 'weight'")


# --- sweep's label field -----------------------------------------------------------------------------------------
def test_sweep_label_field_absent_from_the_data_is_named_with_the_fields_present(files):
    out = files["new"]
    refused(["sweep", files["scored"], "-o", out, "--label-field", "human_score"],
            "'human_score'", "fields: id, int_score, score, text", absent=(out.parent,))
    # the classifier's own score as the label: precision 0 or 1 everywhere, said as a result
    refused(["sweep", files["scored"], "-o", out, "--label-field", "score"], "--label-field score: the classifier's "
            "own score", absent=(out.parent,))
    refused(["sweep", files["scored"], "-o", out, "--weight-field", "wt"], "--weight-field 'wt': no such field",
            absent=(out.parent,))


def test_sweep_takes_comma_separated_thresholds(files):
    out = files["tmp"] / "sw"
    result = runner.invoke(app, ["sweep", str(files["scored"]), "-o", str(out), "--thresholds", "4,1,3"])
    assert result.exit_code == 0, result.output
    assert [r["threshold"] for r in json.loads((out / "sweep.json").read_text())["rows"]] == [1, 3, 4]


# --- Slurm-only options ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options, fragments", [
    (["--dry-run"], ("--dry-run is an option of --executor slurm", "this run uses --executor local")),
    (["--wait"], ("--wait", "Slurm")),
    # the jobs log on the cluster's nodes: heard nowhere
    (["--executor", "slurm", "--slurm-partition", "p", "--dry-run", "--verbose"],
     ("--verbose shows a local or Ray run's datatrove logs", "edu-filter status OUT")),
    # a run meant for the cluster's GPUs would otherwise score on this machine's CPUs, the options ignored unseen
    (["--slurm-gpus", "1", "--slurm-partition", "gpu"], ("--slurm-partition, --slurm-gpus are options of --executor "
                                                         "slurm", "leave them out")),
    (["--slurm-arg", "constraint=h100"], ("--slurm-arg is an option of --executor slurm",)),
    (["--executor", "ray", "--slurm-time", "1:00:00"], ("--slurm-time", "this run uses --executor ray")),
    (["--ray-gpu-cpus", "8"], ("--ray-gpu-cpus is an option of --executor ray", "give --executor ray")),
    (["--ray-gpus", "1"], ("--ray-gpus is an option of --executor ray", "give --executor ray")),
    (["--executor", "ray", "--ray-gpus", "2"], ("--ray-gpus 2: a scoring task scores on one GPU",)),
    (["--executor", "slurm", "--slurm-partition", "p", "--dry-run", "--ray-mem-gb", "8"],
     ("--ray-mem-gb is an option of --executor ray", "this run uses --executor slurm")),
    # the minhash-cluster stage's options without MinHash: the run has no such stage
    (["--executor", "slurm", "--slurm-partition", "p", "--dry-run", "--no-dedup", "--slurm-cluster-time", "2-00:00:00",
      "--slurm-cluster-mem-gb", "64"], ("--slurm-cluster-mem-gb, --slurm-cluster-time: size the minhash-cluster "
                                        "stage", "leave them out, or drop --no-dedup")),
])
def test_an_executors_options_are_refused_on_another(options, fragments, files, stock_classifier):
    out = files["new"]
    refused(["apply", WEB_VAL, "-o", out, "--model", stock_classifier, *options], *fragments, absent=(out.parent,))


@pytest.mark.parametrize("arg, fragments", [
    ("mem=64G", ("--slurm-arg mem", "--slurm-mem-gb")),  # would override edu-filter's own memory request unseen
    ("--partition=gpu", ("--slurm-arg partition", "--slurm-partition")),
    ("gres=gpu:2", ("--slurm-arg gres", "--slurm-gpus")),
    ("array=0-3", ("--slurm-arg array", "--tasks and --workers")),
    ("job-name=mine", ("--slurm-arg job-name", "the chain is found in the queue by its job names")),
    ("part=gpu", ("--slurm-arg part (sbatch reads it as --partition)", "--slurm-partition")),  # a prefix is enough
    ("tres-per-task=gres/gpu:2", ("--slurm-arg tres-per-task", "--slurm-gpus")),
    ("wait", ("--slurm-arg wait", "apply --wait")),  # sbatch would block until each job ends
    ("C=h100", ("--slurm-arg C", "long option name")),
    ("comment=two words", ("--slurm-arg comment", "one word", "splits #SBATCH lines at spaces")),
    ("comment=", ("--slurm-arg comment=", "give a value")),
    ("gpus-per-task=2", ("--slurm-arg gpus-per-task", "--slurm-gpus")),
    ("cpus-per-gpu=8", ("--slurm-arg cpus-per-gpu", "--slurm-gpu-cpus")),
    ("tres-per-task=cpu:4", ("--slurm-arg tres-per-task", "--slurm-cpus")),
    ("ntasks-per-node=2", ("--slurm-arg ntasks-per-node", "one process per task")),
])
def test_sbatch_options_edu_filter_sets_itself_are_refused_naming_ours(arg, fragments, files, stock_classifier):
    out = files["new"]
    refused(["apply", WEB_VAL, "-o", out, "--model", stock_classifier, "--executor", "slurm", "--dry-run",
             "--slurm-partition", "any", "--slurm-arg", arg], *fragments, absent=(out.parent,))


def test_paths_the_slurm_job_scripts_cannot_hold_are_refused(files, stock_classifier, tmp_path):
    """datatrove writes the output path into every job's srun line unquoted: with a space every task of every stage
    failed ('unrecognized arguments'); a --slurm-venv that does not exist ran the jobs in another environment."""
    out = tmp_path / "my runs" / "out"
    refused(["apply", WEB_VAL, "-o", out, "--model", stock_classifier, "--executor", "slurm", "--dry-run",
             "--slurm-partition", "any"], "-o/--output", "unquoted", "' '", absent=(out.parent,))
    out = files["new"]
    refused(["apply", WEB_VAL, "-o", out, "--model", stock_classifier, "--executor", "slurm", "--slurm-partition",
             "any", "--slurm-venv", str(tmp_path / "nope" / "activate")], "--slurm-venv", "no such file",
            absent=(out.parent,))


def test_an_output_path_file_patterns_would_misread_is_refused(files, stock_classifier, tmp_path):
    """The stages find their files by glob patterns under the output: `run[1]` matched nothing, and the run
    reported 0 documents in and out as adding up (the documents were on disk)."""
    out = tmp_path / "runs" / "run[1]"
    refused(["apply", WEB_VAL, "-o", out, "--model", stock_classifier], "-o/--output", "'['", "wildcards",
            absent=(out.parent,))


def test_more_than_one_gpu_per_scoring_task_is_refused(files, stock_classifier):
    """A scoring task runs its model on one device: a second GPU would be held and never used."""
    out = files["new"]
    refused(["apply", WEB_VAL, "-o", out, "--model", stock_classifier, "--executor", "slurm", "--dry-run",
             "--slurm-partition", "any", "--slurm-gpus", "2"], "--slurm-gpus 2", "scores on one GPU", "--tasks",
            absent=(out.parent,))


# --- other commands ----------------------------------------------------------------------------------------------
def test_bad_data_leaves_no_ablation_folder(files):
    bad = write_jsonl(files["tmp"] / "bad.jsonl", [{"text": "fine"}, {"body": "no text"}])
    out = files["new"]
    refused(["ablate", "--data", f"bad={bad}", "-o", out], "bad.jsonl:2", absent=(out.parent,))
    refused(["ablate", "--data", str(bad), "-o", out], "expected NAME=PATH", absent=(out.parent,))
    tiny = write_jsonl(files["tmp"] / "tiny.jsonl", [{"text": "too short to fill one training sequence"}])
    refused(["ablate", "--data", f"tiny={tiny}", "-o", out, "--preset", "tiny"], "tiny.jsonl", "fewer than one "
            "sequence", absent=(out.parent,))


def test_transformer_scoring_options_given_for_a_fasttext_model_are_refused(files, fasttext_model):
    """fastText reads whole documents on a CPU: `--dtype int8` or `--max-length 8` were recorded and ignored."""
    out = files["new"]
    refused(["apply", CODE_LABELS, "-o", out, "--model", fasttext_model, "--dtype", "int8", "--max-length", "8"],
            "--dtype, --max-length are options of transformer classifiers", "fastText", absent=(out.parent,))
    refused(["evaluate", str(fasttext_model), str(CODE_LABELS), "--batch-size", "3"], "--batch-size is an option")
    refused(["apply", CODE_LABELS, "-o", out, "--model", fasttext_model, "--executor", "slurm", "--slurm-partition",
             "p", "--dry-run", "--slurm-gpus", "1"], "--slurm-gpus 1", "fastText model, which scores on CPUs",
            absent=(out.parent,))
    refused(["apply", CODE_LABELS, "-o", out, "--model", fasttext_model, "--executor", "ray", "--ray-gpus", "1"],
            "--ray-gpus 1", "fastText model", "--ray-gpu-cpus still sizes", absent=(out.parent,))


def test_a_field_option_naming_no_field_of_the_input_is_refused(files, fasttext_model):
    """`--text-field body` sent every document to failed/no_text and exited 0; `score --id-field doc_id` named
    every document by its line, so the labels no longer joined the pool."""
    out = files["new"]
    refused(["apply", CODE_LABELS, "-o", out, "--model", fasttext_model, "--text-field", "body"],
            "--text-field 'body': no such field in", "fields: ", absent=(out.parent,))
    refused(["apply", CODE_LABELS, "-o", out, "--model", fasttext_model, "--id-field", "doc_id"],
            "--id-field 'doc_id'", absent=(out.parent,))
    refused(["score", WEB_VAL, "-o", out / "s.jsonl", "--base-url", NO_SERVER, "--id-field", "doc_id"],
            ":1: id field 'doc_id' is missing", absent=(out.parent,))


def test_ablate_refuses_bad_evaluation_inputs_and_overrides_before_any_work(files):
    """A missing --cloze or --eval file was found after packing and training (and the trained runs were removed
    with the half-made folder); `lr=abc` failed after packing with a traceback, `schedule=foo` after training."""
    out, data = files["new"], f"web={WEB_VAL}"
    base = ["ablate", "--data", data, "-o", out, "--tokens", "2048"]
    refused([*base, "--cloze", "arc=" + str(files["tmp"] / "nope.jsonl")], "nope.jsonl: no such file or folder",
            absent=(out.parent,))
    refused([*base, "--eval", "ref=" + str(files["tmp"] / "nope.jsonl")], "nope.jsonl: no such file or folder",
            absent=(out.parent,))
    bad_cloze = write_jsonl(files["tmp"] / "cloze.jsonl", [{"context": "x", "choices": [" a", " b"], "gold": 2}])
    refused([*base, "--cloze", f"arc={bad_cloze}"], "cloze.jsonl:1: 'gold' must be an index", absent=(out.parent,))
    for override, said in (("lr=abc", "--override lr=\"abc\": lr takes a number"),
                           ("schedule=foo", "schedule is one of wsd, cosine"),
                           ("compile=maybe", "compile takes true or false or null"),
                           ("hidden_size=1.5", "hidden_size takes a whole number"),
                           ("batch_tokens=1000", "is not a multiple of micro_batch_size")):
        refused([*base, "--override", override], said, absent=(out.parent,))
    # one document in round(1/f) is held out: 0.4 held out half, anything from 0.67 up every document
    refused([*base, "--val-fraction", "0.4"], "--val-fraction 0.4: the held-out slice is one document in N, so give "
            "1/N (the nearest: 0.5 holds out one in 2, 0.3333 holds out one in 3)", absent=(out.parent,))
    refused([*base, "--val-fraction", "0.7"], "(the nearest: 0.5 holds out one in 2)", absent=(out.parent,))
    refused([*base, "--val-fraction", "0.995"], "(the nearest: 0.5 holds out one in 2)", absent=(out.parent,))
    # an ablation begun with such a fraction by an edu-filter from before resumes with it (it goes on to the
    # next check here: a missing --eval file)
    begun = files["tmp"] / "begun"
    (begun / "tokens/web").mkdir(parents=True)
    (begun / "tokens/web/packed.json").write_text(json.dumps({"settings": {"val_fraction": 0.3}}))
    refused(["ablate", "--data", data, "-o", begun, "--val-fraction", "0.3", "--eval",
             "ref=" + str(files["tmp"] / "nope.jsonl")], "nope.jsonl: no such file or folder")


def test_score_options_this_run_would_not_read_are_refused(files):
    """`--kind foo --rounds 0` without --select active, `--tensor-parallel 4 --device cuda` against a server
    edu-filter does not start: accepted and ignored."""
    out = files["new"]
    base = ["score", WEB_VAL, "-o", out / "s.jsonl", "--base-url", NO_SERVER, "--sample", "20"]
    refused([*base, "--kind", "foo", "--rounds", "3"], "--rounds, --kind are only read with --select active",
            absent=(out.parent,))
    refused([*base, "--tensor-parallel", "4", "--device", "cuda"], "--tensor-parallel, --device are only read with "
            "--backend transformers or --backend vllm or sglang", absent=(out.parent,))
    refused([*base, "--server-arg", "x=1"], "--server-arg is only read with --backend vllm, sglang or script",
            absent=(out.parent,))
    # an API server is sent no seed: recorded in provenance, it claimed reproducible answers it never asked for
    refused([*base[:-2], "--seed", "7"], "--seed is only read with --sample or --backend transformers",
            absent=(out.parent,))


def test_lineage_and_status_of_nothing(files):
    refused(["lineage", files["tmp"] / "nothing"], "no such file or folder")
    refused(["status", files["tmp"] / "nothing"], "nothing")
    broken = files["tmp"] / "broken-run"
    (broken / "logs").mkdir(parents=True, exist_ok=True)
    (broken / "logs" / "stages.json").write_text("{'name': ")  # a kill mid-write, before it was written whole
    refused(["status", broken], "broken-run/logs/stages.json is not the stage list apply writes",
            "run the same apply command again")
    (broken / "logs" / "stages.json").write_text('[{"name": "score", "tasks": 1}]')
    (broken / "slurm").mkdir(exist_ok=True)
    (broken / "slurm" / "jobs.json").write_text("")  # a full disk, before it was written whole
    refused(["status", broken], "slurm/jobs.json cannot be read", "squeue --me", status=1)


def test_bad_option_values_are_refused_before_work(files, stock_classifier):
    out = files["new"]
    for executor, option in (("ray", "--ray-gpu-cpus"), ("ray", "--ray-mem-gb"),  # 0 is not "the default"
                             ("slurm", "--slurm-gpu-cpus")):
        refused(["apply", WEB_VAL, "-o", out, "--model", stock_classifier, "--executor", executor, option, "0"],
                option, absent=(out.parent,))
    refused(["train", CODE_LABELS, "-o", out, "--pool-layers", "2,x"], "--pool-layers", absent=(out.parent,))
    refused(["train", CODE_LABELS, "-o", out, "--pool-layers=-1"], "--pool-layers: -1 is below 0",
            absent=(out.parent,))
    # known once the encoder is loaded (MiniLM has 6 layers): still one error line, exit 2, no model folder
    result = runner.invoke(app, ["train", str(CODE_LABELS), "-o", str(out), "--pool-layers", "2,7", "--limit", "30"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert result.stderr.splitlines()[-1] == "error: --pool-layers 2,7: this encoder has hidden states 0..6"
    assert not out.exists()
    refused(["score", WEB_VAL, "-o", out / "s.jsonl", "--base-url", NO_SERVER, "--concurrency", "0"],
            "--concurrency", absent=(out.parent,))
    refused(["score", WEB_VAL, "-o", out / "s.jsonl", "--base-url", NO_SERVER, "--top-p", "1.5"], "--top-p",
            absent=(out.parent,))
    refused(["agreement", files["scored"], files["scored"], "--threshold", "6"], "--threshold")


# --- the mechanism -----------------------------------------------------------------------------------------------
def test_exit_status_sorts_errors_into_bad_input_and_failures():
    from edu_filter.annotate.backends import BackendError, BackendSetupError
    from edu_filter.annotate.prompts import PromptError
    from edu_filter.documents import DocumentError, InputError, RunError
    from edu_filter.filters.executors import StageFailed
    from edu_filter.provenance import ProvenanceError, PushError, PushSetupError

    for error in (InputError("x"), DocumentError("x"), PromptError("x"), BackendSetupError("x"),
                  ProvenanceError("x"), PushSetupError("x"), ValueError("x"), ImportError("x")):
        assert exit_status(error) == 2, error
    for error in (RunError("x"), BackendError("x"), StageFailed("x"), OSError("x"), PushError("x")):
        assert exit_status(error) == 1, error
    assert exit_status(KeyError("x")) is None  # a bug keeps its traceback
    # a write to a closed `| head`: left to click, which ends it quietly (it printed "error: [Errno 32] Broken pipe");
    # a broken pipe elsewhere (a server's socket) is a failure still
    assert exit_status(BrokenPipeError(32, "Broken pipe")) == 1
    reader, writer = os.pipe()
    os.close(reader)
    asked = subprocess.run([sys.executable, "-c", "import sys; from edu_filter.cli import exit_status; "
                            "print(exit_status(BrokenPipeError(32, 'Broken pipe')), file=sys.stderr)"],
                           stdout=writer, stderr=subprocess.PIPE, text=True)
    os.close(writer)
    assert asked.stderr.strip() == "None", asked.stderr


@pytest.mark.slow
def test_a_stage_failing_while_running_exits_1_in_one_line(tmp_path, stock_classifier):
    """A real process: apply sends datatrove's logs to OUT/logs through the process's stderr descriptor."""
    broken = tmp_path / "broken-model"
    shutil.copytree(stock_classifier, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])  # cut short: fails in the stage
    source = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "text": "some text to score"}])
    proc = subprocess.run([CLI, "apply", str(source), "-o", str(tmp_path / "out"), "--model", str(broken),
                           "--no-dedup"], capture_output=True, text=True, env=ENV, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(errors) == 1 and "stage filter failed" in errors[0] and "task_00000.log" in errors[0]
    assert proc.stderr.strip().splitlines()[-1] == errors[0]  # the progress display above it, nothing after


def test_the_installed_command_prints_one_line_without_traceback(files):
    """The same contract from the console script, as a user's shell sees it."""
    for args in (["sweep", files["scored"], "-o", files["new"], "--label-field", "nope"],
                 ["score", "--show-prompt", "nope"]):
        proc = subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, env=ENV, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("error: ")
    assert not files["new"].parent.exists()


def test_help_shows_plain_types():
    for command in ("score", "apply", "train", "sweep", "ablate"):
        result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0
        for odd in ("list[", "Optional", "<bool>", "NoneType"):
            assert odd not in result.stdout, (command, odd)
    assert "<key[=value]>" in runner.invoke(app, ["score", "--help"], env={"COLUMNS": "200"}).stdout


@pytest.mark.parametrize("columns", ["80", "200"])
def test_help_names_every_option_whole_on_a_narrow_terminal_or_a_pipe(columns):
    """rich's option table cut the longest names at 80 columns (what a pipe or a job's log gets): the Slurm options
    a user must type read `--slurm-gpu-parti…`."""
    import typer

    command = typer.main.get_command(app).commands["apply"]
    help_text = runner.invoke(app, ["apply", "--help"], env={"COLUMNS": columns}).stdout
    names = [name for param in command.params if param.param_type_name == "option"
             for name in param.opts if name.startswith("--")]
    assert len(names) > 40
    missing = [name for name in names if name not in help_text]
    assert not missing and "…" not in help_text, missing


def test_values_and_options_a_run_cannot_use_are_refused_before_any_work(files, stock_classifier):
    """Each was accepted and then ignored, used as nonsense (0 epochs saved the starting model as trained, a
    negative learning rate trained away from the labels), or failed late: a bad --tokenizer or --max-length for
    apply's classifier failed its last stage after the whole dedup, a negative --batch-size in a traceback."""
    out = files["new"]
    model = str(stock_classifier)
    refused(["evaluate", model, WEB_VAL, "--batch-size", "-3"], "--batch-size must be >= 1")
    refused(["evaluate", model, WEB_VAL, "--batch-size", "0"], "--batch-size must be >= 1")
    for args, fragment in (
        (["--method", "finetune", "--epochs", "0"], "--epochs must be >= 1"),
        (["--method", "finetune", "--learning-rate", "-1"], "--learning-rate must be > 0"),
        (["--limit", "0"], "--limit must be >= 1"),
        (["--seed", "-1"], "--seed must be in [0, 2**32)"),
        (["--encoder", "/nonexistent/enc", "--limit", "20"], "--encoder /nonexistent/enc: no such file or folder"),
        # saving the model empties its folder: the embeddings (hours) and a fine-tune's checkpoints went with it
        (["--cache-dir", str(out / "cache")], f"the cache folder {out / 'cache'} (--cache-dir, or EDU_FILTER_CACHE) "
                                              f"lies inside the output folder {out}"),
    ):
        refused(["train", CODE_LABELS, "-o", out, *args], fragment, absent=(out.parent,))
    for args, fragment in ((["--max-length", "2"], "--max-length 2: "), (["--max-length", "9999"], "reads 3 to 512"),
                           (["--tokenizer", "/nonexistent/tok"], "--tokenizer /nonexistent/tok: no such file or folder")):
        refused(["apply", WEB_VAL, "-o", out, "--model", model, "--no-dedup", *args], fragment, absent=(out.parent,))
    # accepted and ignored: the order recorded as dedup-first in a run that deduplicates nothing
    for args, fragment in ((["--order", "score-first"], "--order score-first orders scoring and deduplication"),
                           (["--bucket-workers", "2"], "--bucket-workers shares MinHash's bucket merges")):
        refused(["apply", WEB_VAL, "-o", out, "--model", model, "--no-dedup", *args], fragment, absent=(out.parent,))
    # exited 0, having followed nothing and uploaded nothing
    refused(["apply", WEB_VAL, "-o", out, "--model", model, "--executor", "slurm", "--slurm-partition", "cpu",
             "--dry-run", "--wait"], "--dry-run writes the scripts and submits nothing", absent=(out.parent,))
    refused(["ablate", "--data", f"a={WEB_VAL}", "-o", out, "--humaneval-limit", "3"],
            "--humaneval-limit is read with --humaneval only", absent=(out.parent,))
    # each failed after the tokenizer and the packing (hours at scale), in a traceback, or not at all (0 read as unset)
    for args, fragment in ((["--seed", "-1"], "--seed must be in [0, 2**32 - --seeds], got -1"),
                           (["--vocab-size", "0"], "--vocab-size must be at least 257"),
                           (["--vocab-size", "-5"], "--vocab-size must be at least 257"),
                           (["--override", "micro_batch_size=0"], "micro_batch_size must be at least 1, got 0"),
                           (["--override", "lr=-1"], "lr must be > 0, got -1"),
                           (["--override", "grad_clip=-1"], "grad_clip must be >= 0, got -1"),
                           (["--override", "beta2=1.0"], "beta2 must be in [0, 1), got 1.0"),
                           (["--override", "seq_len=1"], "seq_len must be at least 2"),
                           (["--eval", f"tokens={WEB_VAL}"], "'tokens' names a field of the evaluation history")):
        refused(["ablate", "--data", f"a={WEB_VAL}", "-o", out, *args], fragment, absent=(out.parent,))
    # a dataset named eval had its held-out tokens overwritten by an --eval set's (tokens/eval/NAME.bin)
    refused(["ablate", "--data", f"eval={WEB_VAL}", "--data", f"b={WEB_VAL}", "-o", out, "--eval", f"val={WEB_VAL}"],
            "'eval' is a name the output folder uses", absent=(out.parent,))
    refused(["score", "--show-prompt", "web", "--prompt", "code"], "without --prompt")
    scored = out / "s.jsonl"
    refused(["score", WEB_VAL, "-o", scored, "--backend", "vllm", "--model", "m", "--base-url", NO_SERVER],
            "--base-url is only read with --backend openai", absent=(out.parent,))
    refused(["score", WEB_VAL, "-o", scored, "--backend", "transformers", "--model", "m", "--timeout", "5"],
            "--timeout is only read with --backend openai, vllm, sglang or script", absent=(out.parent,))


def test_a_second_demo_into_its_folder_starts_over_and_another_folder_is_refused(tmp_path):
    """The retrained models differ in their metrics' last digits, so `apply` refused to resume the first demo's
    output: `make demo` twice failed after 6 minutes. A folder the demo did not make is not emptied."""
    from edu_filter.demo import DEMO_MARKER, STAGE_FOLDERS, clear_earlier_demo
    from edu_filter.documents import InputError

    demo = tmp_path / "demo"
    for name in STAGE_FOLDERS:
        (demo / name / "sub").mkdir(parents=True)
        (demo / name / "sub" / "file.json").write_text("{}")
    (demo / "report.md").write_text("# old")
    (demo / "notes.txt").write_text("mine")
    (demo / "results.json").write_text("{}")  # a common name: not taken for the demo's mark
    with pytest.raises(InputError, match="holds annotation/, models/, eval/, apply/, sweep/, ablation/ and no "):
        clear_earlier_demo(demo)
    assert all((demo / name).exists() for name in STAGE_FOLDERS)
    (demo / DEMO_MARKER).touch()
    clear_earlier_demo(demo)
    assert sorted(p.name for p in demo.iterdir()) == [DEMO_MARKER, "notes.txt"]  # results.json, report.md: its own


@pytest.mark.parametrize("command, library", [
    ("ablate", "edu_filter.ablate.ablation:ablate"),
    ("evaluate", "edu_filter.classifiers.evaluate:evaluate_model"),
    ("agreement", "edu_filter.annotate.agreement:agreement"),
    ("sweep", "edu_filter.filters.sweep:run_sweep"),
])
def test_a_command_s_defaults_are_its_library_function_s(command, library):
    """These commands repeat their library function's defaults (reading them would import torch into cli.py): one
    changed on one side only would make the command line and the Python API disagree without a word."""
    import importlib
    import inspect

    from edu_filter import cli

    module, name = library.split(":")
    library_params = inspect.signature(getattr(importlib.import_module(module), name)).parameters
    parsed = {"thresholds"}  # a string the command parses; the library takes the list (None: every score)
    compared = 0
    for param, given in inspect.signature(getattr(cli, command)).parameters.items():
        lib = library_params.get(param)
        if lib is None or lib.default is inspect.Parameter.empty or param in parsed:
            continue
        default = getattr(given.default, "default", given.default)  # typer's OptionInfo
        if isinstance(default, list) and len(default) == 1 and isinstance(lib.default, str):
            default = default[0]  # a repeatable option's single default
        assert default == lib.default, (command, param, default, lib.default)
        compared += 1
    assert compared >= 3


@pytest.mark.parametrize("columns", [60, 80])
def test_result_tables_cut_nothing_in_a_narrow_console_or_a_log(columns, monkeypatch, capsys):
    """Rich cut any cell wider than its column to "…": at a Slurm log's 80 columns every removal reason, at 60 the
    counts' last digits, and the score summary's output and cache paths, which a resume needs. Cells fold onto the
    next line instead; the model's folder is said whole above its metrics."""
    from edu_filter.annotate.score import ScoreSummary, print_summary
    from edu_filter.classifiers.metrics import compute_metrics, print_metrics
    from edu_filter.filters.report import stats_table
    from rich.console import Console

    monkeypatch.setenv("COLUMNS", str(columns))
    big = {"documents": 1_234_567_890, "tokens": 1_234_567_890_123}
    stats = {"in": big, "kept": big, "adds_up": True, "failed": {"text_not_a_string_in_any_form": big},
             "removed": {"score_below_the_threshold_of_the_run": big}}
    Console().print(stats_table(stats))
    cache = "/scratch/project/edu_filter/annotations/cc-main-2024-10/fineweb_sample_100k.jsonl.cache.sqlite"
    print_summary(ScoreSummary(documents=3, scored=3, output=cache.removesuffix(".cache.sqlite"), cache=cache))
    model = "/scratch/project/edu_filter/models/web_head_classifier_run_2024_arctic_embed_m"
    print_metrics(compute_metrics([0, 3, 5, 2], [0.2, 2.9, 4.4, 2.2], [0, 3, 4, 2]), title=f"{model} on 4 documents")
    from edu_filter.ablate.ablation import comparison_table

    run = {"params": 4.2e6, "tokens_seen": 100_257, "train_epochs": 0.98, "train_loss": [8.13, 6.88],
           "eval": {"fineweb-edu": 6.753, "cosmopedia-held-out": 6.872, "all-held-out": 6.796},
           "eval_std": {"fineweb-edu": 0.104, "cosmopedia-held-out": 0.061, "all-held-out": 0.097},
           "tokens_per_second": 5745.0, "mfu": None}
    Console().print(comparison_table({"edu": run, "all": run}, "tiny", seeds=2))  # the demo cut its ± to "0.1…"
    out = capsys.readouterr().out
    assert "…" not in out
    counts = [line.split("│") for line in out.splitlines() if line.count("│") == 6]  # the counts table's rows

    def column(k: int) -> str:  # a folded cell's text runs on down its column
        return "".join(cells[k].strip() for cells in counts)

    assert "1,234,567,890,123" in column(4) and "1,234,567,890" in column(2)
    assert "removed/score_below_the_threshold_of_the_run" in column(1) and "text_not_a_string_in_any_form" in column(1)
    assert cache in "".join(out.split()).replace("│", "")
    assert model in out  # whole on its line, to copy
