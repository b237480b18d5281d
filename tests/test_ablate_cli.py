"""`edu-filter ablate` end to end on the bundled web data: equal tokens, falling loss, report, plots, table."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edu_filter.ablate.ablation import EXIT_STOPPED
from edu_filter.cli import app
from edu_filter.documents import read_documents, write_documents

sys.path.insert(0, str(Path(__file__).parent))
from micro_ablation import MICRO_ABLATION, MICRO_MODEL  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WEB_TRAIN = REPO / "data/web/fineweb_edu_llama3_train.jsonl"
WEB_VAL = REPO / "data/web/fineweb_edu_llama3_val.jsonl"


pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    docs = read_documents([WEB_TRAIN], label_field="score")
    write_documents([d for d in docs if d["label"] >= 3], root / "edu.jsonl")
    (root / "cloze.jsonl").write_text("".join(json.dumps(q) + "\n" for q in [
        {"context": "Photosynthesis is the process by which plants make", "choices": [" food", " noise"], "gold": 0},
        {"context": "Water freezes at zero degrees", "choices": [" Celsius", " Fahrenheit"], "gold": 0},
    ]))
    return root


@pytest.fixture(scope="module")
def ablation(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("ablation")
    args = ["ablate", "--data", f"edu={inputs / 'edu.jsonl'}", "--data", f"all={WEB_TRAIN}",
            "--eval", f"reference={WEB_VAL}", "--preset", "tiny", "--tokens", "20480", "-o", str(out),
            "--override", "eval_tokens=2048",
            "--humaneval", "--humaneval-limit", "2", "--cloze", f"facts={inputs / 'cloze.jsonl'}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return out, result.output, args


def test_both_runs_see_the_same_tokens_and_learn(ablation):
    out, output, _ = ablation
    report = json.loads((out / "report.json").read_text())
    runs = report["runs"]
    assert set(runs) == {"edu", "all"}
    assert runs["edu"]["tokens_seen"] == runs["all"]["tokens_seen"] == 20480
    assert runs["edu"]["params"] == runs["all"]["params"]
    for r in runs.values():
        assert r["finished"] and len(r["train_loss"]) == 20  # 1024 tokens per step
        assert r["train_loss"][-1] < r["train_loss"][0] - 0.5
        assert set(r["eval"]) == {"edu/val", "all/val", "reference"}
        assert all(3 < v < r["eval_history"][0]["reference"] + 1 for v in r["eval"].values())
        assert r["humaneval"]["problems"] == 2 and 0 <= r["humaneval"]["pass@1"] <= 1
        assert set(r["cloze"]["facts"]) == {"acc", "acc_norm", "questions"}
    info = report["datasets"]
    for name in ("edu", "all"):  # the budget, not the file, bounds reading
        assert not info[name]["read_to_end"] and 20480 < info[name]["train_tokens"] < 20480 + 20_000
    assert info["edu"]["val_documents"] > 0 and info["all"]["val_documents"] > 0


def test_report_plots_and_table_are_written(ablation):
    out, output, _ = ablation
    for png in ("loss_curves.png", "eval_loss.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    rows = [line for line in output.splitlines() if line.startswith("│")]
    assert any(line.startswith("│ edu ") for line in rows) and any(line.startswith("│ all ") for line in rows)
    assert f"report: {out / 'report.json'}" in output.replace("\n", "")
    runs = json.loads((out / "report.json").read_text())["runs"]
    said = re.search(r"Passes over each run's own training data .*: edu ([\d.]+), all ([\d.]+)\.",
                     (out / "report.md").read_text())
    assert said and [float(v) for v in said.groups()] == [round(runs[n]["train_epochs"], 2) for n in ("edu", "all")]
    md = (out / "report.md").read_text()  # the benchmarks asked for, there too (a code ablation's main result)
    assert "| run | HumanEval pass@1 | facts acc | facts acc_norm |" in md and "2 HumanEval problems" in md
    for name, r in runs.items():
        assert (f"| {name} | {r['humaneval']['pass@1']:.3f} | {r['cloze']['facts']['acc']:.3f} | "
                f"{r['cloze']['facts']['acc_norm']:.3f} |") in md


def test_every_run_uses_the_one_ablation_tokenizer(ablation):
    from transformers import AutoTokenizer

    out, _, _ = ablation
    shared = AutoTokenizer.from_pretrained(out / "tokenizer")
    text = "The mitochondria is the powerhouse of the cell."
    for run in ("edu", "all"):
        tok = AutoTokenizer.from_pretrained(out / "runs" / run / "model")
        assert tok(text).input_ids == shared(text).input_ids
    assert len(shared) == 4096


def test_rerunning_a_finished_ablation_does_not_train_again(ablation):
    out, _, args = ablation
    before = json.loads((out / "report.json").read_text())
    mtime = (out / "runs/edu/model/model.safetensors").stat().st_mtime
    # a finished run is its model and run.json: its checkpoint (weights and optimizer moments, 3x the model) is gone
    assert not any((out / "runs" / run / "checkpoint").exists() for run in ("edu", "all"))
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    after = json.loads((out / "report.json").read_text())
    assert after["runs"]["edu"]["train_loss"] == before["runs"]["edu"]["train_loss"]
    assert (out / "runs/edu/model/model.safetensors").stat().st_mtime == mtime


def test_a_finished_ablation_scores_an_added_set_and_refuses_what_its_runs_were_not_trained_with(ablation, inputs,
                                                                                                  tmp_path):
    """An evaluation set added to a finished ablation is scored on its runs' final models, not trained for again
    (it was left out, or the report crashed on it); another tokenizer, vocabulary or training setting is refused
    before anything of the ablation is touched."""
    from edu_filter.ablate.tokenizer import train_tokenizer

    finished, _, args = ablation
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    base = [a for a in args[:args.index("--humaneval")]]
    base[base.index("-o") + 1] = str(out)
    before = json.loads((out / "report.json").read_text())["runs"]
    tokenizer = (out / "tokenizer" / "tokenizer.json").read_bytes()
    other = train_tokenizer(["another vocabulary, trained on other words " * 50], 300, tmp_path / "other")
    assert other is not None
    for extra, said in ((["--tokenizer", str(tmp_path / "other")], "is not the tokenizer the runs"),
                        (["--vocab-size", "2048"], "--vocab-size"),
                        (["--override", "lr=0.01"], "lr: 0.003 then, 0.01 now")):
        result = CliRunner().invoke(app, base + extra)
        assert result.exit_code == 2 and said in " ".join(result.output.split()), result.output
        assert (out / "tokenizer" / "tokenizer.json").read_bytes() == tokenizer
    model = (out / "runs/edu/model/model.safetensors").stat().st_mtime
    (out / "tokens/edu/train.hashes").unlink()  # as an older edu-filter packed it
    result = CliRunner().invoke(app, base[:1] + ["--eval", f"added={WEB_TRAIN}"] + base[1:])  # the verdict's set now
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["comparison"]["eval_set"] == "added"
    # the added set is drawn from the file 'all' trains on: said before the runs are scored, and in the report
    shared, said = report["eval_in_training"], " ".join(result.output.split())
    assert shared["all"]["reference"]["documents"] == 0
    assert 0 < shared["all"]["added"]["documents"] <= shared["all"]["added"]["of"]
    assert "--eval added are in --data all's training tokens" in said
    assert shared["edu"]["added"]["documents"] is shared["edu"]["reference"]["documents"] is None
    assert "training tokens of --data edu is not known: they were packed by an older edu-filter" in said
    assert "Documents of each evaluation set also in a run's training tokens" in (out / "report.md").read_text()
    for name, run in report["runs"].items():
        assert run["train_loss"] == before[name]["train_loss"]
        assert {k: v for k, v in run["eval"].items() if k != "added"} == before[name]["eval"]
        assert 3 < run["eval"]["added"] < run["eval"]["reference"] + 1
    assert (out / "runs/edu/model/model.safetensors").stat().st_mtime == model


def test_bad_input_gives_a_clear_error(inputs, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["ablate", "--data", str(WEB_TRAIN), "-o", str(tmp_path / "a")])
    assert result.exit_code == 2 and "expected NAME=PATH" in result.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text here"}\n')
    result = runner.invoke(app, ["ablate", "--data", f"bad={bad}", "-o", str(tmp_path / "b")])
    assert result.exit_code == 2 and "bad.jsonl:2: field 'text' is missing" in result.output
    # a text field per set (apply's kept/ holds `text`, the raw dump beside it `content`): the default for the
    # others, NAME=FIELD for one; each set is read with its own
    for fields, said in ((["body", "a=text"], "bad.jsonl:1: field 'body' is missing"),
                         (["a=body"], f"{WEB_TRAIN}:1: field 'body' is missing"),
                         (["nope=body"], "--text-field 'nope=body': expected FIELD, or NAME=FIELD for a set named")):
        result = runner.invoke(app, ["ablate", "--data", f"a={WEB_TRAIN}", "--data", f"bad={bad}",
                                     *[f"--text-field={f}" for f in fields], "-o", str(tmp_path / "f")])
        assert result.exit_code == 2 and said in " ".join(result.output.split()), result.output
    result = runner.invoke(app, ["ablate", "--data", f"a={WEB_TRAIN}", "--tokenizer", str(tmp_path), "--vocab-size",
                                 "512", "-o", str(tmp_path / "c")])  # was ignored, and recorded as the vocabulary
    assert result.exit_code == 2 and "--tokenizer brings its own vocabulary" in " ".join(result.output.split())
    result = runner.invoke(app, ["ablate", "--data", f"a={WEB_TRAIN}", "--override", "depth=3", "-o", str(tmp_path / "c")])
    assert result.exit_code == 2 and "unknown override 'depth'" in result.output
    result = runner.invoke(app, ["ablate", "--data", f"a={WEB_TRAIN}", "--val-fraction", "1.5", "-o",
                                 str(tmp_path / "e")])
    assert result.exit_code == 2 and "--val-fraction must be between 0 and 1, got 1.5" in result.output
    for override, option in (("tokens=7680", "--tokens"), ("seed=3", "--seed"), ("vocab_size=400", "--vocab-size")):
        # the report said --tokens while the runs trained on the override's count; the seeds dropped an override's
        result = runner.invoke(app, ["ablate", "--data", f"a={WEB_TRAIN}", "--override", override, "-o",
                                     str(tmp_path / "d")])
        assert result.exit_code == 2 and f"--override {override}: give {option} instead" in result.output
        assert not (tmp_path / "d").exists()
    # a model shape that cannot build or run failed after the tokenizer and the packing, in a traceback
    for override, said in (("num_key_value_heads=3", "num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
                           ("hidden_size=130", "does not build: .*hidden size \\(130\\) is not a multiple")):
        result = runner.invoke(app, ["ablate", "--data", f"a={WEB_TRAIN}", "--preset", "tiny", "--override", override,
                                     "-o", str(tmp_path / "g")])
        assert result.exit_code == 2 and re.search(said, " ".join(result.output.split())), result.output
        assert not (tmp_path / "g").exists()


def test_a_second_ablation_into_a_folder_being_written_is_refused_naming_the_first(tmp_path):
    """Two ablations into one folder (a job resubmitted while the first runs) both packed and trained: the second
    rewrote token files the first had mapped, and the first died of SIGBUS with no word."""
    from edu_filter.ablate.ablation import ABLATION_LOCK, ablate
    from edu_filter.documents import RunError, writing_alone

    out = tmp_path / "abl"
    out.mkdir()
    with writing_alone(out, lock=out / ABLATION_LOCK):  # the first run, holding it
        with pytest.raises(RunError, match=re.escape(f"-o/--output {out} is being written by another run (process "
                                                     f"{os.getpid()}")):
            ablate([f"a={WEB_TRAIN}"], out, preset="tiny", tokens=1000)
    assert [p.name for p in out.iterdir()] == [ABLATION_LOCK]  # nothing of the second's


def test_a_bad_row_met_while_packing_leaves_the_packed_tokens(ablation, inputs, tmp_path):
    """A bad row found hours into packing is bad input (exit 2), but the output then holds real work: it was removed
    as a half-made output, the tokens of every dataset packed before it with it. A bad row before any dataset is
    packed still leaves nothing."""
    out, _, _ = ablation
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine words here"}\n' * 3 + '{"body": "no text here"}\n')
    args = ["ablate", "--data", f"edu={inputs / 'edu.jsonl'}", "--data", f"bad={bad}", "--tokenizer",
            str(out / "tokenizer"), "--tokens", "1024", *MICRO_MODEL, "-o", str(tmp_path / "new" / "ablation")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "bad.jsonl:4: field 'text' is missing" in result.output, result.output
    assert (tmp_path / "new/ablation/tokens/edu/train.bin").stat().st_size > 0
    result = CliRunner().invoke(app, ["ablate", "--data", f"bad={bad}", "--tokens", "1024", *MICRO, "-o",
                                      str(tmp_path / "other" / "ablation")])
    assert result.exit_code == 2 and not (tmp_path / "other").exists(), result.output


@pytest.mark.slow
def test_ddp_with_two_processes_matches_one_process(inputs, tmp_path):
    """torchrun with 2 CPU processes (gloo) splits each batch across ranks: same samples, same averaged gradient,
    stopped at a time limit and resumed too. The ranks share out the packing (rank 0 the dataset, rank 1 the
    reference set): the same token files."""
    common = ["ablate", "--data", f"edu={inputs / 'edu.jsonl'}", "--eval", f"reference={WEB_VAL}", "--preset", "tiny",
              "--tokens", "3072", *MICRO, "--override", "batch_tokens=512"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "edu_filter.cli", *common, "-o", str(tmp_path / "one")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert single.returncode == 0, single.stderr
    # stdout is no terminal here, as in a Slurm log: plain progress lines, not nothing until the end
    lines = single.stdout.splitlines()
    assert any(line.startswith("packing edu: 0/") for line in lines), single.stdout[-2000:]
    # with its rate where packing took over a second (a loaded machine)
    packed = re.compile(r"packing edu: ([\d,]+)/\1( \([\d,]+/s\))?")
    assert any(packed.fullmatch(line) for line in lines), single.stdout[-2000:]
    assert any(re.fullmatch(r"edu: (\d+)/\1 loss \d+\.\d{3}", line) for line in lines), single.stdout[-2000:]
    torchrun = [shutil.which("torchrun", path=os.path.dirname(sys.executable)), "--standalone", "--nproc-per-node",
                "2", "-m", "edu_filter.cli", *common, "-o", str(tmp_path / "two")]
    # stopped at its time limit first: 0 under torchrun (any other status is a crash to its agent, and
    # --max-restarts would start it again at once), report.json not complete; the same command resumes
    stopped = subprocess.run([*torchrun, "--override", "time_limit_minutes=1e-9"], capture_output=True, text=True,
                             env=env, timeout=300)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "report.json").read_text())["complete"] is False
    ddp = subprocess.run(torchrun, capture_output=True, text=True, env=env, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    for file in ("edu/train.bin", "edu/val.bin", "eval/reference.bin", "eval/reference.json"):
        assert (tmp_path / "two/tokens" / file).read_bytes() == (tmp_path / "one/tokens" / file).read_bytes(), file
    one_report, two_report = (json.loads((tmp_path / run / "report.json").read_text()) for run in ("one", "two"))
    assert two_report["datasets"] == one_report["datasets"]  # token and document counts, read by rank 0
    one, two = one_report["runs"]["edu"], two_report["runs"]["edu"]
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["tokens_seen"] == one["tokens_seen"] == 3072
    assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-4)
    assert two["eval"] == pytest.approx(one["eval"], rel=1e-4)


@pytest.mark.slow
def test_a_bad_row_one_rank_meets_keeps_what_the_others_packed(inputs, tmp_path):
    """Under torchrun the datasets are shared out; the process meeting a bad row removed the whole new output,
    the tokenizer and the other process's packing with it (which then failed on files gone). The folder stays,
    the error names the row, and the run with the row mended packs only the dataset that failed."""
    from edu_filter.ablate.packing import iter_texts
    from edu_filter.ablate.tokenizer import train_tokenizer

    train_tokenizer(iter_texts(str(WEB_VAL)), 512, tmp_path / "tokenizer")  # given: no data read to train one
    rows = [json.loads(line) for line in WEB_VAL.read_text().splitlines()[:80]]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"id": "x"} if i == 2 else r) + "\n" for i, r in enumerate(rows)))
    out = tmp_path / "out"
    common = ["ablate", "--data", f"edu={inputs / 'edu.jsonl'}", "--data", f"bad={bad}", "--preset", "tiny",
              "--tokens", "1024", *MICRO_MODEL, "--override", "batch_tokens=512", "--tokenizer", str(tmp_path / "tokenizer"),
              "-o", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [shutil.which("torchrun", path=os.path.dirname(sys.executable)), "--standalone", "--nproc-per-node",
                "2", "-m", "edu_filter.cli"]
    failed = subprocess.run([*torchrun, *common], capture_output=True, text=True, env=env, timeout=300)
    assert failed.returncode != 0 and f"{bad}:3" in failed.stderr, failed.stderr[-3000:]
    assert "No such file or directory" not in failed.stderr  # rank 0 did not lose its files under it
    assert (out / "tokenizer").is_dir() and (out / "tokens" / "edu").is_dir()
    edu_packed = (out / "tokens" / "edu" / "train.bin")
    packed_before = edu_packed.stat().st_mtime_ns if edu_packed.exists() else None

    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    mended = subprocess.run([*torchrun, *common], capture_output=True, text=True, env=env, timeout=300)
    assert mended.returncode == 0, mended.stderr[-3000:]
    if packed_before is not None:  # finished before the other rank failed: kept, not packed again
        assert edu_packed.stat().st_mtime_ns == packed_before
    assert json.loads((out / "report.json").read_text())["runs"].keys() == {"edu", "bad"}


MICRO = MICRO_ABLATION


def test_an_ablation_stopped_by_its_time_limit_resumes_to_the_same_result(inputs, tmp_path):
    common = ["ablate", "--data", f"edu={inputs / 'edu.jsonl'}", "--data", f"all={WEB_TRAIN}", "--tokens", "1024",
              *MICRO]
    runner = CliRunner()
    whole = runner.invoke(app, [*common, "-o", str(tmp_path / "whole")])
    assert whole.exit_code == 0, whole.output
    invocations = 0
    cloze = ["--cloze", f"facts={inputs / 'cloze.jsonl'}"]
    while not (tmp_path / "split/eval_loss.png").exists():
        result = runner.invoke(app, [*common, *cloze, "-o", str(tmp_path / "split"), "--override",
                                     "time_limit_minutes=1e-9"])
        invocations += 1
        assert invocations <= 8
        report = json.loads((tmp_path / "split/report.json").read_text())
        finished = (tmp_path / "split/eval_loss.png").exists()  # benchmarks only then, not for finished runs before
        assert all(("cloze" in run) == finished for run in report["runs"].values()), invocations
        # stopped: not 0 (a job chain keyed on the status took it for done), and the report says it is not complete
        assert result.exit_code == (0 if finished else EXIT_STOPPED) and report["complete"] == finished, result.output
    # One optimizer step per invocation (4 per run), except that the invocation finishing `edu` also starts `all`.
    assert invocations == 7
    a = json.loads((tmp_path / "whole/report.json").read_text())["runs"]
    b = json.loads((tmp_path / "split/report.json").read_text())["runs"]
    for name in ("edu", "all"):
        assert b[name]["tokens_seen"] == a[name]["tokens_seen"] == 1024
        assert b[name]["train_loss"] == pytest.approx(a[name]["train_loss"], rel=1e-5)
        assert b[name]["eval"] == pytest.approx(a[name]["eval"], rel=1e-5)
