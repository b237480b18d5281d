"""`edu-filter ablate --seeds K`: every run trained K times, per-seed results, and a verdict against seed noise."""

from __future__ import annotations

import sys
import json
import math
import statistics
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edu_filter.cli import app
from edu_filter.documents import read_documents, write_documents
from edu_filter.ablate.ablation import SIGNIFICANCE_RULE, compare_runs

sys.path.insert(0, str(Path(__file__).parent))
from micro_ablation import MICRO_ABLATION, MICRO_MODEL  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WEB_TRAIN = REPO / "data/web/fineweb_edu_llama3_train.jsonl"
WEB_VAL = REPO / "data/web/fineweb_edu_llama3_val.jsonl"
MICRO = ["--tokens", "1024", *MICRO_ABLATION]
MICRO_GIVEN_TOKENIZER = ["--tokens", "1024", *MICRO_MODEL]

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]


@pytest.fixture(scope="module")
def edu_file(tmp_path_factory):
    docs = read_documents([WEB_TRAIN], label_field="score")
    return write_documents([d for d in docs if d["label"] >= 3], tmp_path_factory.mktemp("edu") / "edu.jsonl")


def run_ablate(*args) -> None:
    result = CliRunner().invoke(app, ["ablate", *args])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def two_seeds(edu_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("two-seeds")
    result = run_ablate("--data", f"edu={edu_file}", "--data", f"all={WEB_TRAIN}", "--eval", f"reference={WEB_VAL}",
                        "--seeds", "2", *MICRO, "-o", str(out))
    return out, json.loads((out / "report.json").read_text()), result.output


def test_every_run_is_trained_once_per_seed(two_seeds):
    out, report, _ = two_seeds
    assert report["seeds"] == [0, 1]
    for name in ("edu", "all"):
        run = report["runs"][name]
        assert [s["seed"] for s in run["seeds"]] == [0, 1]
        first, second = run["seeds"]
        assert first["tokens_seen"] == second["tokens_seen"] == 1024 and first["finished"] and second["finished"]
        assert first["train_loss"] != second["train_loss"]  # other initial weights, other data order
        for n, mean in run["eval"].items():
            values = [first["eval"][n], second["eval"][n]]
            assert mean == pytest.approx(statistics.mean(values))
            assert run["eval_std"][n] == pytest.approx(statistics.stdev(values))
        assert run["train_loss"] == first["train_loss"]  # the curves shown first are the first seed's
        for seed in (0, 1):
            assert (out / "runs" / name / f"seed-{seed}" / "model" / "config.json").exists()
            assert json.loads((out / "runs" / name / f"seed-{seed}" / "run.json").read_text())["config"]["seed"] == seed


def test_the_comparison_holds_a_verdict_against_seed_noise(two_seeds):
    out, report, output = two_seeds
    c = report["comparison"]
    assert c["eval_set"] == "reference"  # the first --eval set, common to both runs
    assert set(c["runs"]) == {"edu", "all"} and isinstance(c["significant"], bool)
    best, second = c["runs"]
    assert c["mean_loss"][best] <= c["mean_loss"][second]
    assert c["difference"] == pytest.approx(c["mean_loss"][second] - c["mean_loss"][best])
    losses = {name: [s["eval"]["reference"] for s in report["runs"][name]["seeds"]] for name in c["runs"]}
    assert c["seed_losses"] == losses
    pooled = math.sqrt((statistics.variance(losses[best]) + statistics.variance(losses[second])) / 2)
    assert c["seed_std"] == pytest.approx(pooled)
    assert c["significant"] == (c["p_value"] < 0.05 if c["p_value"] is not None else c["difference"] > 0)
    md = (out / "report.md").read_text()
    assert f"**Verdict:** {c['summary']}" in md and SIGNIFICANCE_RULE in md
    assert c["summary"] in " ".join(output.split())
    assert "| edu | " in md and " ± " in md  # mean ± seed std per run


def test_seed_k_of_a_multi_seed_ablation_is_the_single_run_with_that_seed(two_seeds, edu_file, tmp_path):
    out, report, _ = two_seeds
    run_ablate("--data", f"edu={edu_file}", "--eval", f"reference={WEB_VAL}", "--seed", "1", *MICRO_GIVEN_TOKENIZER,
               "--tokenizer", str(out / "tokenizer"), "-o", str(tmp_path / "one"))
    single = json.loads((tmp_path / "one/report.json").read_text())
    assert single["runs"]["edu"]["train_loss"] == pytest.approx(report["runs"]["edu"]["seeds"][1]["train_loss"])
    assert single["runs"]["edu"]["eval_std"] == {"edu/val": None, "reference": None}
    assert single["comparison"] is None and (tmp_path / "one/runs/edu/model").exists()
    assert "a single run; nothing to compare" in (tmp_path / "one/report.md").read_text()
    # the same ablation with a second seed trains only that one: its first seed's run was trained again
    trained = (tmp_path / "one/runs/edu/run.json").stat().st_mtime_ns
    run_ablate("--data", f"edu={edu_file}", "--eval", f"reference={WEB_VAL}", "--seed", "1", "--seeds", "2", *MICRO_GIVEN_TOKENIZER,
               "--tokenizer", str(out / "tokenizer"), "-o", str(tmp_path / "one"))
    both = json.loads((tmp_path / "one/report.json").read_text())
    assert (tmp_path / "one/runs/edu/run.json").stat().st_mtime_ns == trained
    assert not (tmp_path / "one/runs/edu/seed-1").exists() and (tmp_path / "one/runs/edu/seed-2/run.json").exists()
    assert [s["seed"] for s in both["runs"]["edu"]["seeds"]] == [1, 2]
    assert both["runs"]["edu"]["seeds"][0]["train_loss"] == single["runs"]["edu"]["train_loss"]


def test_a_run_stopped_midway_in_the_other_layout_goes_on_where_it_is(tmp_path):
    """A one-seed ablation stopped at its time limit, rerun with --seeds 2: its seed started over in seed-0/ and the
    checkpoint (22 GB at 1.8B) stayed on disk unread. Either way round."""
    from edu_filter.ablate.ablation import run_folder

    def stopped_in(folder: Path, seed: int) -> None:
        (folder / "checkpoint").mkdir(parents=True)
        (folder / "checkpoint" / "trainer_state.json").write_text(json.dumps({"config": {"seed": seed}, "state": {}}))

    runs = tmp_path / "runs"
    stopped_in(runs / "edu", 0)
    assert run_folder(tmp_path, "edu", 0, 2) == runs / "edu"
    assert run_folder(tmp_path, "edu", 1, 2) == runs / "edu/seed-1"
    stopped_in(runs / "web" / "seed-3", 3)
    assert run_folder(tmp_path, "web", 3, 1) == runs / "web/seed-3"
    assert run_folder(tmp_path, "web", 0, 1) == runs / "web"
    stopped_in(runs / "web", 3)  # its own layout's run is the one it goes on with
    assert run_folder(tmp_path, "web", 3, 1) == runs / "web"


def test_bad_seed_options_are_clear_errors(edu_file, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["ablate", "--data", f"edu={edu_file}", "--seeds", "0", "-o", str(tmp_path / "a")])
    assert result.exit_code == 2 and "--seeds must be at least 1" in result.output
    result = runner.invoke(app, ["ablate", "--data", f"edu={edu_file}", "--compare-on", "wiki", "-o",
                                 str(tmp_path / "b")])
    assert result.exit_code == 2
    assert "--compare-on 'wiki': not an evaluation set; choose one of edu/val" in result.output


def runs_with(losses: dict[str, list[float]]) -> dict:
    return {name: {"seeds": [{"seed": i, "eval": {"ref": v}} for i, v in enumerate(values)]}
            for name, values in losses.items()}


def test_two_seeds_use_welchs_t_test_and_noise_passes_it_one_time_in_twenty():
    """The earlier 2-seed rule (a gap over 2 pooled stds) is a t-test with ~2 degrees of freedom at a critical value
    of 2 instead of 4.3: it called pure seed noise significant 17% of the time."""
    import random

    clear = compare_runs(runs_with({"all": [6.00, 6.02], "edu": [5.90, 5.92]}), "ref")
    assert clear["runs"] == ["edu", "all"] and clear["significant"] and clear["better"] == "edu"
    assert clear["difference"] == pytest.approx(0.10) and clear["seed_std"] == pytest.approx(0.02 / math.sqrt(2))
    assert clear["summary"].startswith("On ref, edu's loss is lower than all's by 0.100 nats/token")
    noisy = compare_runs(runs_with({"all": [6.00, 6.10], "edu": [5.98, 6.06]}), "ref")
    assert not noisy["significant"] and noisy["better"] is None and "not significant" in noisy["summary"]
    rng = random.Random(0)
    alarms = sum(compare_runs(runs_with({"a": [rng.gauss(6, 0.05) for _ in range(2)],
                                         "b": [rng.gauss(6, 0.05) for _ in range(2)]}), "ref")["significant"]
                 for _ in range(2000))
    assert alarms / 2000 < 0.08  # 0.05 expected (the 2-std rule: 0.17)


def test_three_seeds_use_welchs_t_test():
    clear = compare_runs(runs_with({"a": [5.90, 5.91, 5.92], "b": [6.00, 6.01, 6.03]}), "ref")
    assert clear["significant"] and clear["p_value"] < 0.05 and "Welch" in clear["test"]
    close = compare_runs(runs_with({"a": [5.90, 6.00, 5.95], "b": [5.93, 6.01, 5.97]}), "ref")
    assert not close["significant"] and close["p_value"] > 0.05 and f"p = {close['p_value']:.3g}" in close["summary"]


def test_one_seed_gives_no_verdict_and_one_run_no_comparison():
    one = compare_runs(runs_with({"a": [5.9], "b": [6.0]}), "ref")
    assert one["significant"] is False and one["seed_std"] is None and "no verdict" in one["summary"]
    assert compare_runs(runs_with({"a": [5.9, 6.0]}), "ref") is None


def test_a_diverged_run_is_named_not_ranked():
    """A run whose loss went NaN (a learning rate too high for it) was ranked anywhere by the sort, and the verdict
    read "lower by nan nats/token"; with two seeds a NaN p-value read as "no seed variance"."""
    from edu_filter.ablate.ablation import compare_runs

    def runs(**losses):
        return {name: {"seeds": [{"eval": {"ref": x}} for x in v]} for name, v in losses.items()}

    c = compare_runs(runs(a=[6.0, 6.1], b=[float("nan"), 6.0], c=[6.2, 6.3]), "ref")
    assert c["runs"] == ["a", "c"] and c["diverged"] == ["b"] and "nan" not in c["summary"]
    assert c["difference"] == pytest.approx(0.2) and "b diverged (a loss not finite" in c["summary"]
    alone = compare_runs(runs(a=[6.0, 6.1], b=[float("nan"), float("inf")]), "ref")
    assert alone["diverged"] == ["b"] and not alone["significant"] and alone["better"] is None
    assert alone["summary"] == ("On ref, b diverged (a loss not finite: lower the learning rate, --override lr=...): "
                                "no comparison.")
    assert compare_runs(runs(a=[6.0, 6.1], b=[6.3, 6.4]), "ref")["diverged"] == []


def test_an_input_packed_again_is_described_anew_and_one_reused_keeps_its_record(tmp_path):
    """A resumed ablation keeps the record of the input its token files were packed from. One packed again (its
    token files removed after a refusal, and the input changed) kept the old record: the report named the old
    content, and `lineage` called the input stale."""
    from edu_filter import provenance
    from edu_filter.ablate.ablation import _inputs_used, packing_source
    from edu_filter.ablate.packing import PACKED

    data = tmp_path / "edu.jsonl"
    write_documents([{"id": "a", "text": "the new content"}], data)
    out = tmp_path / "ablation"
    old = {**provenance.describe_input("data:edu", str(data)), "fingerprint": "sha256:old-content"}
    out.mkdir()
    (out / provenance.PROVENANCE_FILE).write_text(json.dumps({"inputs": [old]}))
    packed = out / "tokens" / "edu"
    packed.mkdir(parents=True)
    for source, expected in ((json.dumps({"input": "sha256:old-content", "text_field": "text"}), "sha256:old-content"),
                             (packing_source(str(data), "text"), provenance.fingerprint(data)["fingerprint"])):
        (packed / PACKED).write_text(json.dumps({"settings": {"source": source}}))
        (entry,) = _inputs_used(out, {"edu": str(data)}, {}, {}, None)
        assert entry["fingerprint"] == expected
