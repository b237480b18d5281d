"""`edu-filter sweep`: retention table, plots and precision/recall/F1 against labels, on scored documents."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import orjson
import pytest

from edu_filter.documents import DocumentError, InputError
from edu_filter.filters.sweep import run_sweep, threshold_positions

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def scored_rows(n=400, seed=0, labels=True):
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 6, n)
    score = np.clip(label + rng.normal(0, 0.8, n), 0, 5)
    rows = []
    for i in range(n):
        row = {"id": f"d{i}", "text": "w " * int(rng.integers(5, 50)), "score": float(score[i]),
               "int_score": int(np.clip(np.round(score[i]), 0, 5)), "token_count": int(rng.integers(10, 1000))}
        if labels:
            row["input_score"] = int(label[i])
        rows.append(row)
    return rows


def write_jsonl(path: Path, rows):
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return path


def test_retention_and_f1_match_an_independent_count(tmp_path):
    rows = scored_rows()
    result = run_sweep([str(write_jsonl(tmp_path / "scored.jsonl", rows))], tmp_path / "sweep", show=False)
    ints = np.array([r["int_score"] for r in rows])
    tokens = np.array([r["token_count"] for r in rows])
    truth = np.array([r["input_score"] for r in rows]) >= 3
    assert [r["threshold"] for r in result["rows"]] == [0, 1, 2, 3, 4, 5]
    for r in result["rows"]:
        keep = ints >= r["threshold"]
        assert r["documents"] == keep.sum() and r["tokens"] == tokens[keep].sum()
        tp = (keep & truth).sum()
        assert r["precision"] == pytest.approx(tp / keep.sum() if keep.sum() else 0)
        assert r["recall"] == pytest.approx(tp / truth.sum())
    assert result["rows"][0]["documents_pct"] == 100 and result["labelled"] == len(rows)
    best = max(result["rows"], key=lambda r: r["f1"])
    assert best["threshold"] in (2, 3, 4)  # scores track the labels, so the best cut sits near the label cut
    for png in ("score_histogram.png", "retention_curve.png"):
        data = (tmp_path / "sweep" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text())["rows"] == result["rows"]
    assert (tmp_path / "sweep" / "retention.csv").read_text().splitlines()[0].startswith("threshold,documents")


def test_without_labels_or_token_counts(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "token_count"} for r in scored_rows(50, labels=False)]
    result = run_sweep([str(write_jsonl(tmp_path / "s.jsonl", rows))], tmp_path / "out", thresholds=[3, 1], show=False)
    assert [r["threshold"] for r in result["rows"]] == [1, 3]
    assert "f1" not in result["rows"][0] and result["token_unit"] == "words"
    assert result["rows"][0]["tokens"] == sum(len(r["text"].split()) for r in rows if r["int_score"] >= 1)


def test_unscored_input_is_a_clear_error(tmp_path):
    path = write_jsonl(tmp_path / "raw.jsonl", [{"id": "a", "text": "x"}])
    with pytest.raises(DocumentError, match="raw.jsonl:1: needs both score and int_score .*has neither"):
        run_sweep([str(path)], tmp_path / "out", show=False)


@pytest.mark.slow
def test_cli_takes_comma_separated_thresholds(tmp_path):
    path = write_jsonl(tmp_path / "scored.jsonl", scored_rows(100))
    cli = str(Path(sys.executable).parent / "edu-filter")
    res = subprocess.run([cli, "sweep", str(path), "-o", str(tmp_path / "sw"), "--thresholds", "4,2,3"],
                         env=ENV, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    rows = json.loads((tmp_path / "sw" / "sweep.json").read_text())["rows"]
    assert [r["threshold"] for r in rows] == [2, 3, 4]
    assert "Retention by threshold" in res.stdout and "F1" in res.stdout


def fake_apply_output(root: Path, rows, model: Path, record: str = "run_config.json") -> Path:
    """An apply output folder as sweep reads it: the model named in its record, the scored rows in kept/."""
    out = root / "out"
    (out / "kept").mkdir(parents=True)
    write_jsonl(out / "kept" / "00000.jsonl", rows)
    for name in {record, "stats.json"}:  # stats.json: a finished run
        (out / name).write_text(json.dumps({"settings": {"model": str(model), "threshold": 0}}))
    return out


@pytest.mark.parametrize("config_name, record", [("config.json", "run_config.json"),
                                                 ("fasttext_config.json", "stats.json")])
def test_histogram_and_curve_use_the_models_own_cut_points(tmp_path, config_name, record):
    cuts = [0.8, 1.7, 2.2, 2.9, 3.6]
    model = tmp_path / "model"
    model.mkdir()
    (model / config_name).write_text(json.dumps({"cut_points": cuts}))
    rows = scored_rows(200)
    for r in rows:  # int_score through the model's cut points, as apply computes it
        r["int_score"] = int(sum(r["score"] >= c for c in cuts))
    result = run_sweep([str(fake_apply_output(tmp_path, rows, model, record))], tmp_path / "sw", show=False)
    assert result["cut_points"] == cuts and result["cut_points_from"] == f"model {model}"
    # every threshold sits where the float-score curve is: keeping score >= c_t keeps exactly int_score >= t
    scores = np.array([r["score"] for r in rows])
    for r, x in zip(result["rows"], threshold_positions(result["rows"], cuts, float(scores.min()))):
        assert r["documents"] == (scores >= x).sum()


def test_a_model_saved_without_cut_points_is_round_and_clip(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "bert"}))
    result = run_sweep([str(fake_apply_output(tmp_path, scored_rows(50), model))], tmp_path / "sw", show=False)
    assert result["cut_points"] == [0.5, 1.5, 2.5, 3.5, 4.5]
    # apply scored it with round(): 2.5 is a 2 there, which the cut points alone (score >= 2.5 is 3) misstate
    assert result["cut_points_from"] == f"model {model} (saved without cut points: its score rounded, a half to even)"


def test_the_legends_cover_no_threshold_and_fit_in_the_picture(tmp_path):
    """A model saved without cut points (the official fineweb-edu-classifier's layout) named itself and how it
    rounds in the legend, which sat inside the axes: it hid every threshold's number in the histogram and ran past
    the retention curve's right edge."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from edu_filter.filters.sweep import load_scored, model_cut_points, retention_table, sweep_figures

    model = tmp_path / "HuggingFaceFW-fineweb-edu-classifier"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "bert"}))
    out = fake_apply_output(tmp_path, scored_rows(200), model)
    summary = load_scored([str(out)], None, "weight", show=False)
    cuts, cuts_from = model_cut_points([str(out)])
    figures = sweep_figures(summary, retention_table(summary, list(range(6)), 3), 3, cuts, cuts_from)
    for name, fig in figures:
        renderer = FigureCanvasAgg(fig).get_renderer()
        ax = fig.axes[0]
        legend, axes = ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer)
        assert not legend.overlaps(axes), name
        texts = [t for t in ax.texts if t.get_text()]
        assert texts and not any(t.get_window_extent(renderer).overlaps(legend) for t in texts), name
        # saved with its whole legend (`plot_sweep` saves the tight box of every artist): none wider than 3 figures
        assert fig.get_tightbbox(renderer).width < 3 * fig.get_figwidth(), name


def test_without_a_model_the_cut_points_come_from_the_data(tmp_path):
    rows = scored_rows(300)
    result = run_sweep([str(write_jsonl(tmp_path / "s.jsonl", rows))], tmp_path / "sw", show=False)
    assert result["cut_points_from"] == "data"
    for t, cut in enumerate(result["cut_points"], start=1):
        assert cut == pytest.approx(min(r["score"] for r in rows if r["int_score"] >= t))


def test_a_label_field_not_in_the_data_is_refused_and_nothing_is_written(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", scored_rows(20))
    with pytest.raises(DocumentError, match=r"--label-field 'human': no such field .*fields: id, input_score, int_score"):
        run_sweep([str(path)], tmp_path / "out", label_field="human", show=False)
    with pytest.raises(ValueError, match="thresholds must be int_scores in 0-5"):
        run_sweep([str(path)], tmp_path / "out", thresholds=[3, 6], show=False)
    assert not (tmp_path / "out").exists()
    rows = run_sweep([str(path)], tmp_path / "out", label_field="input_score", show=False)["rows"]
    assert "f1" in rows[0]


def test_inclusion_weights_make_shares_and_f1_those_of_the_replicated_sample(tmp_path):
    """An actively chosen sample over-represents high scores; its weights undo that. sweep ignored them, so its
    keep share and precision were those of the biased sample (evaluate and train use them)."""
    rows = scored_rows(300, seed=1)
    rng = np.random.default_rng(2)
    for r in rows:
        r["weight"] = int(rng.integers(1, 4))
    weighted = run_sweep([str(write_jsonl(tmp_path / "w.jsonl", rows))], tmp_path / "w", show=False)
    replicated = [dict(r, id=f"{r['id']}-{k}") for r in rows for k in range(r.pop("weight"))]
    plain = run_sweep([str(write_jsonl(tmp_path / "r.jsonl", replicated))], tmp_path / "r", show=False)
    assert weighted["weight_field"] == "weight" and plain["weight_field"] is None
    for w, p in zip(weighted["rows"], plain["rows"]):
        for key in ("documents_pct", "tokens_pct", "precision", "recall", "f1"):
            assert w[key] == pytest.approx(p[key])
    assert weighted["rows"][3]["documents"] == sum(r["int_score"] >= 3 for r in rows)  # counts stay counts
    ignored = run_sweep([str(tmp_path / "w.jsonl")], tmp_path / "i", weight_field=None, show=False)
    assert ignored["weight_field"] is None and ignored["rows"][3]["documents_pct"] != weighted["rows"][3]["documents_pct"]


def test_undefined_precision_and_recall_are_null_not_zero(tmp_path):
    rows = [dict(r, input_score=min(r["input_score"], 2), int_score=min(r["int_score"], 4))  # no label reaches 3,
            for r in scored_rows(60)]                                                        # no int_score 5
    result = run_sweep([str(write_jsonl(tmp_path / "s.jsonl", rows))], tmp_path / "o", show=False)
    assert all(r["recall"] is None and r["f1"] is None for r in result["rows"])
    assert result["rows"][5]["documents"] == 0 and result["rows"][5]["precision"] is None  # nothing kept
    assert result["rows"][0]["precision"] == 0.0  # documents kept, none of them positive
    saved = json.loads((tmp_path / "o" / "sweep.json").read_text())
    assert saved["rows"][0]["recall"] is None
    rows = [dict(r, int_score=min(r["int_score"], 4)) for r in scored_rows(60)]  # labels of 5, no int_score 5
    missed = run_sweep([str(write_jsonl(tmp_path / "m.jsonl", rows))], tmp_path / "m", show=False,
                       positive_threshold=5)["rows"][5]
    assert missed["documents"] == 0 and missed["recall"] == 0.0 and missed["f1"] == 0.0  # every positive missed


def test_rows_with_and_without_token_counts_are_not_added_up(tmp_path):
    rows = scored_rows(20)
    for r in rows[10:]:
        del r["token_count"]
    with pytest.raises(DocumentError, match=r"some rows have a token_count \(.*s.jsonl:1\) and some do not "
                                            r"\(.*s.jsonl:11\)"):
        run_sweep([str(write_jsonl(tmp_path / "s.jsonl", rows))], tmp_path / "o", show=False)


@pytest.mark.parametrize("token_count", ["counted", "all null"])
def test_parquet_is_summed_as_jsonl_is(tmp_path, token_count):
    """Parquet is read without its text where every row has a token count; a FineWeb-style all-null token_count
    column counted 0 words per row (the text was not read)."""
    import polars as pl

    rows = [dict(r, weight=1 + i % 3) for i, r in enumerate(scored_rows(500, seed=3))]
    if token_count == "all null":
        rows = [dict(r, token_count=None) for r in rows]
    pl.DataFrame(rows, schema_overrides={"token_count": pl.Int64}).write_parquet(tmp_path / "s.parquet")
    parquet = run_sweep([str(tmp_path / "s.parquet")], tmp_path / "p", show=False)
    jsonl = run_sweep([str(write_jsonl(tmp_path / "s.jsonl", rows))], tmp_path / "j", show=False)
    assert parquet["rows"] == jsonl["rows"] and parquet["cut_points"] == jsonl["cut_points"]
    assert parquet["token_unit"] == ("words" if token_count == "all null" else "tokens")
    assert parquet["rows"][0]["tokens"] > 0
    assert parquet["weight_field"] == "weight"
    with pytest.raises(DocumentError, match=r"fields: .*id.*text"):  # the file's fields, not only those read
        run_sweep([str(tmp_path / "s.parquet")], tmp_path / "x", label_field="labl", show=False)
    rows[321]["input_score"] = 7  # found by the batch's check, named by the row it is in
    pl.DataFrame(rows, schema_overrides={"token_count": pl.Int64}).write_parquet(tmp_path / "bad.parquet")
    with pytest.raises(DocumentError, match=r"bad.parquet:322: label field 'input_score' is 7"):
        run_sweep([str(tmp_path / "bad.parquet")], tmp_path / "y", show=False)


def test_parquet_texts_are_read_a_few_documents_at_a_time(tmp_path, monkeypatch):
    """Without token counts the words are counted from the texts: 65,536 of them at a time became Python rows
    (2.8 GB for 20 KB documents, ~14 GB for books); numbers alone are still read in large batches."""
    import polars as pl
    import pyarrow.parquet as pq

    from edu_filter.documents import PARQUET_BATCH_ROWS
    from edu_filter.filters import sweep

    rows = scored_rows(2 * PARQUET_BATCH_ROWS + 100, seed=5)
    read = []
    batches = pq.ParquetFile.iter_batches

    def counted(self, batch_size=65536, **kw):
        for batch in batches(self, batch_size=batch_size, **kw):
            read.append((batch.num_rows, "text" in batch.schema.names))
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counted)
    for token_count, texts in (("null", True), ("counted", False)):
        read.clear()
        typed = [dict(r, token_count=None) for r in rows] if token_count == "null" else rows
        pl.DataFrame(typed, schema_overrides={"token_count": pl.Int64}).write_parquet(tmp_path / f"{token_count}.parquet")
        result = sweep.run_sweep([str(tmp_path / f"{token_count}.parquet")], tmp_path / token_count, show=False)
        assert sum(n for n, _ in read) == len(rows) and all(t == texts for _, t in read)
        assert max(n for n, _ in read) == (PARQUET_BATCH_ROWS if texts else len(rows))
        assert result["rows"][0]["documents"] == len(rows)


def test_a_pinned_hub_models_cut_points_are_read_from_the_hub_cache(tmp_path, monkeypatch):
    """apply records a hub model as ORG/NAME@COMMIT; sweep looked it up unpinned and fell back to the data's cuts."""
    from huggingface_hub import constants

    commit, cuts = "3" * 40, [0.9, 1.8, 2.2, 3.1, 4.0]
    snapshot = tmp_path / "hub" / "models--edu--clf" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"cut_points": cuts}))
    (tmp_path / "hub" / "models--edu--clf" / "refs").mkdir()
    (tmp_path / "hub" / "models--edu--clf" / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    out = fake_apply_output(tmp_path, scored_rows(50), f"edu/clf@{commit}")
    result = run_sweep([str(out)], tmp_path / "sw", show=False)
    assert result["cut_points"] == cuts and result["cut_points_from"] == f"model edu/clf@{commit}"


def test_parquet_read_in_batches_agrees_with_rows_on_odd_columns(tmp_path):
    """The batch path read top-level columns only: labels in a datatrove `metadata` struct were lost; a NaN
    int_score went into bin 0 and a NaN token_count added -2**63 tokens; fractional counts were not whole."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    base = {"score": [0.4, 2.6, 4.9], "int_score": [0, 3, 5], "token_count": [2.5, 1.5, 3.5]}
    nested = pa.table({**base, "metadata": [{"input_score": 1}, {"input_score": 3}, {"input_score": 5}]})
    pq.write_table(nested, tmp_path / "nested.parquet")
    rows = [{k: v[i] for k, v in base.items()} | {"metadata": {"input_score": [1, 3, 5][i]}} for i in range(3)]
    from_parquet = run_sweep([str(tmp_path / "nested.parquet")], tmp_path / "p", show=False)
    from_rows = run_sweep([str(write_jsonl(tmp_path / "nested.jsonl", rows))], tmp_path / "j", show=False)
    assert from_parquet["labelled"] == 3 and from_parquet["rows"] == from_rows["rows"]
    assert from_parquet["rows"][0]["tokens"] == 2 + 1 + 3  # whole tokens
    pq.write_table(pa.table({**base, "int_score": [0.0, float("nan"), 5.0]}), tmp_path / "nan.parquet")
    with pytest.raises(DocumentError, match=r"nan.parquet:2: int_score nan .* must be whole numbers"):
        run_sweep([str(tmp_path / "nan.parquet")], tmp_path / "n", show=False)
    # off the scale: counted as a 5 before, in both paths
    pq.write_table(pa.table({**base, "int_score": [0, 9, 5]}), tmp_path / "nine.parquet")
    with pytest.raises(DocumentError, match=r"nine.parquet:2: int_score 9 is outside 0-5"):
        run_sweep([str(tmp_path / "nine.parquet")], tmp_path / "9", show=False)
    for label in (True, "٣"):  # a yes/no field, another script's digit: counted as 1 and 3 before
        with pytest.raises(DocumentError, match=r"odd.jsonl:1: label field 'input_score' is .*, not a number"):
            run_sweep([str(write_jsonl(tmp_path / "odd.jsonl", [{**rows[0], "input_score": label}]))],
                      tmp_path / "odd", show=False)
    with pytest.raises(DocumentError, match=r"nine.jsonl:1: int_score -1 is outside 0-5"):
        run_sweep([str(write_jsonl(tmp_path / "nine.jsonl", [{**rows[0], "int_score": -1}]))], tmp_path / "j9",
                  show=False)


@pytest.mark.parametrize("order", ["score-first", "dedup-first"])
def test_an_apply_folder_stands_for_the_documents_its_threshold_saw(tmp_path, order):
    """In score-first order the threshold came before dedup: the duplicates of kept documents were scored and
    passed it, and left out they made every share a mix of before- and after-dedup counts. A folder named twice
    (the output and its kept/) is read once."""
    rows = scored_rows(300, labels=False)
    out = tmp_path / "out"
    for sub, part in (("kept", rows[:90]), ("failed/schema_mismatch", rows[90:100]),
                      ("removed/below_threshold", rows[100:250]), ("removed/duplicate", rows[250:])):
        (out / sub).mkdir(parents=True)
        write_jsonl(out / sub / "00000.jsonl", part if sub != "removed/duplicate" or order == "score-first"
                    else [{"id": r["id"], "text": r["text"]} for r in part])  # dedup-first: never scored
    settings = {"order": order, "dedup": True, "exact_dedup": False, "threshold": 3}
    for name in ("run_config.json", "stats.json"):
        (out / name).write_text(json.dumps({"settings": settings}))
    (out / "removed" / "contaminated").mkdir()  # not a destination of the threshold
    result = run_sweep([str(out), str(out / "kept")], tmp_path / "sw", show=False)
    seen = rows if order == "score-first" else rows[:250]
    assert result["documents"] == len(seen)
    assert result["rows"][3]["documents"] == sum(r["int_score"] >= 3 for r in seen)


def test_an_unfinished_apply_run_is_refused_but_its_folders_can_be_named(tmp_path):
    from edu_filter.documents import InputError

    rows = scored_rows(60, labels=False)
    out = fake_apply_output(tmp_path, rows, tmp_path / "model")
    (out / "stats.json").unlink()  # what a killed or running apply leaves: its record, not its stats
    with pytest.raises(InputError, match="has not finished .*edu-filter status"):
        run_sweep([str(out)], tmp_path / "sw", show=False)
    assert not (tmp_path / "sw").exists()
    assert run_sweep([str(out / "kept")], tmp_path / "sw", show=False)["documents"] == len(rows)
    (out / "stats.json").write_text("{}")
    (out / "removed" / "below_threshold").mkdir(parents=True)  # a destination left empty: holds no documents
    assert run_sweep([str(out)], tmp_path / "sw2", show=False)["documents"] == len(rows)


def test_a_code_runs_output_counts_label_4_as_educational_by_default(tmp_path):
    """A Python-Edu output (threshold 4) was scored against label >= 3 unless told: its t=4 row was not evaluate's
    F1 at 4. A code run's positive class is label >= 4 now, a web run's 3; --positive-threshold still decides."""
    rows = scored_rows(300)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"kind": "code"}))
    out = fake_apply_output(tmp_path, rows, model)
    code = run_sweep([str(out)], tmp_path / "code", show=False)
    told = run_sweep([str(out)], tmp_path / "told", positive_threshold=3, show=False)
    assert code["positive_threshold"] == 4 and told["positive_threshold"] == 3
    at4 = code["rows"][4]
    tp = sum(r["int_score"] >= 4 and r["input_score"] >= 4 for r in rows)
    assert at4["precision"] == pytest.approx(tp / sum(r["int_score"] >= 4 for r in rows), abs=1e-4)
    assert at4["recall"] == pytest.approx(tp / sum(r["input_score"] >= 4 for r in rows), abs=1e-4)
    (model / "config.json").write_text(json.dumps({"kind": "web"}))
    assert run_sweep([str(out)], tmp_path / "web", show=False)["positive_threshold"] == 3
    (out / "run_config.json").write_text(json.dumps({"settings": {"model": "hub/id", "preset": "python-edu"}}))
    assert run_sweep([str(out)], tmp_path / "preset", show=False)["positive_threshold"] == 4


@pytest.mark.slow
def test_a_code_runs_kind_is_recorded_by_apply_and_outlives_its_model_folder(tmp_path, stock_classifier):
    """The kind was read from the model folder at sweep time: swept elsewhere, or once a cluster's scratch was
    cleared, a code run's output was scored against label >= 3 with no word."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(stock_classifier, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "kind": "code"}))
    rows = [{"id": f"c{i}", "text": f"def f{i}(x):\n    return x + {i}\n", "score": i % 6} for i in range(12)]
    out = tmp_path / "out"
    cli = str(Path(sys.executable).parent / "edu-filter")
    res = subprocess.run([cli, "apply", str(write_jsonl(tmp_path / "code.jsonl", rows)), "-o", str(out), "--model",
                          str(model), "--threshold", "0", "--no-dedup", "--tasks", "1", "--workers", "1"],
                         env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((out / "run_config.json").read_text())["model_kind"] == "code"
    shutil.rmtree(model)
    result = run_sweep([str(out)], tmp_path / "sw", show=False)
    assert result["positive_threshold"] == 4 and result["documents"] == 12


def test_cut_points_of_a_model_retrained_since_the_run_are_not_used(tmp_path):
    from edu_filter.provenance import describe_inputs

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"cut_points": [0.8, 1.7, 2.2, 2.9, 3.6]}))
    out = fake_apply_output(tmp_path, scored_rows(200), model)
    record = json.loads((out / "run_config.json").read_text())
    record["model_fingerprint"] = describe_inputs({"classifier": str(model)})[0]["fingerprint"]
    (out / "run_config.json").write_text(json.dumps(record))
    assert run_sweep([str(out)], tmp_path / "a", show=False)["cut_points_from"] == f"model {model}"
    (model / "config.json").write_text(json.dumps({"cut_points": [1.0, 2.0, 3.0, 4.0, 4.9]}))  # retrained
    assert run_sweep([str(out)], tmp_path / "b", show=False)["cut_points_from"] == "data"


def test_a_score_that_is_not_a_finite_number_names_its_row(tmp_path):
    rows = scored_rows(20, labels=False)
    rows[7]["score"] = float("nan")
    path = tmp_path / "s.parquet"  # JSON has no NaN; Parquet (or a float column) does
    import polars as pl

    pl.DataFrame(rows).write_parquet(path)
    with pytest.raises(DocumentError, match="s.parquet:8: score nan is not a finite number"):
        run_sweep([str(path)], tmp_path / "sw", show=False)


def summarised_output(root: Path, rows: list[dict], tasks: int = 2) -> Path:
    """An apply output as sweep reads it: the rows in kept/ and below_threshold/ by int_score, the summaries its
    scoring tasks would have written (the real step, run over the same documents), run_config and stats."""
    from datatrove.data import Document

    from edu_filter.filters.sweep import SUMMARY_FOLDER, ScoreSummaryWriter

    out = root / "out"
    for k in range(tasks):
        mine = rows[k::tasks]
        docs = [Document(text=r["text"], id=r["id"], metadata={k2: v for k2, v in r.items() if k2 not in ("text", "id")})
                for r in mine]
        list(ScoreSummaryWriter(str(out / SUMMARY_FOLDER)).run(iter(docs), rank=k, world_size=tasks))
        for sub, part in (("kept", [r for r in mine if r["int_score"] >= 3]),
                          ("removed/below_threshold", [r for r in mine if r["int_score"] < 3])):
            (out / sub).mkdir(parents=True, exist_ok=True)
            write_jsonl(out / sub / f"{k:05d}.jsonl", part)
    kept = sum(r["int_score"] >= 3 for r in rows)
    (out / "run_config.json").write_text(json.dumps({"settings": {"tasks": tasks, "order": "dedup-first"}}))
    (out / "stats.json").write_text(json.dumps({"settings": {}, "kept": {"documents": kept}, "failed": {},
                                                "removed": {"below_threshold": {"documents": len(rows) - kept}}}))
    return out


def test_summaries_read_an_inputs_own_metadata_and_fall_back_when_they_cannot_stand(tmp_path):
    """Labels and weights nested in an input's own `metadata` (datatrove's layout) counted when the documents were
    read and not from the summaries; an output named twice counted twice; a damaged summary crashed sweep."""
    rng = np.random.default_rng(1)
    rows = [dict(r, metadata={"label": int(r.pop("input_score")), "weight": float(rng.uniform(0.5, 2)), "lang": "en"})
            for r in scored_rows(120)]
    out = summarised_output(tmp_path, rows)
    read = run_sweep([str(out / "kept"), str(out / "removed" / "below_threshold")], tmp_path / "read", show=False)
    assert read["labelled"] == 120 and read["weight_field"] == "weight"
    summed = run_sweep([str(out), str(out) + "/", str(tmp_path / "." / "out")], tmp_path / "sum", show=False)
    assert summed["read_from_summaries"] == [str(out)] and summed["documents"] == 120
    for a, b in zip(summed["rows"], read["rows"]):
        assert a == pytest.approx(b)
    stats = json.loads((out / "stats.json").read_text())
    stats["kept"]["documents"] += 1  # folders no longer holding what the summaries counted
    (out / "stats.json").write_text(json.dumps(stats))
    assert run_sweep([str(out)], tmp_path / "s2", show=False)["read_from_summaries"] == []
    stats["kept"]["documents"] -= 1
    (out / "stats.json").write_text(json.dumps(stats))
    summary = out / "logs" / "summaries" / "00001.npz"
    summary.write_bytes(summary.read_bytes()[:100])  # damaged: the documents are read
    again = run_sweep([str(out)], tmp_path / "s3", show=False)
    assert again["read_from_summaries"] == [] and again["documents"] == 120


def test_summaries_of_rows_with_and_without_weights_or_token_counts_are_not_summed(tmp_path):
    """Such rows are refused when the documents are read (the error names them): summing the summaries would hide
    it, in one task or across tasks."""
    for k, (field, said) in enumerate((("weight", "some rows have inclusion weights"),
                                       ("token_count", "some rows have a token_count"))):
        rows = scored_rows(40, labels=False)
        for i, row in enumerate(rows):
            if field == "weight" and i % 3 == 0:
                row["weight"] = 2.0
            if field == "token_count" and i % 3 == 0:
                del row["token_count"]
        out = summarised_output(tmp_path / str(k), rows)
        with pytest.raises((DocumentError, InputError), match=said):
            run_sweep([str(out)], tmp_path / f"s{k}", show=False)


def test_a_label_column_that_is_no_edu_score_says_how_to_sweep_without_it(tmp_path):
    """A corpus's own `label` (a topic, a class id) is read as the reference label by default: off the 0-5 scale,
    sweep stopped with no way to go on; it names --label-field, and --label-field none sweeps without labels."""
    rows = [dict(r, label=["news", "sports"][i % 2]) for i, r in enumerate(scored_rows(60, labels=False))]
    path = str(write_jsonl(tmp_path / "topics.jsonl", rows))
    with pytest.raises(DocumentError, match="label field 'label' is 'news'.*give --label-field none"):
        run_sweep([path], tmp_path / "s1", show=False)
    result = run_sweep([path], tmp_path / "s2", label_field="none", show=False)
    assert result["documents"] == 60 and result["labelled"] == 0
    # an apply output of it: the summaries stand for its documents without labels (--label-field none read every
    # kept and removed document, terabytes on a crawl), and --weight-field none of an unweighted output too
    out = summarised_output(tmp_path / "apply", rows)
    with pytest.raises(DocumentError, match="label field 'label' is 'news'"):  # the documents read, the row named
        run_sweep([str(out)], tmp_path / "s3", show=False)
    for options in ({"label_field": "none"}, {"label_field": "none", "weight_field": None}):
        summed = run_sweep([str(out)], tmp_path / "s4", label_field="none", show=False, **{
            k: v for k, v in options.items() if k != "label_field"})
        assert summed["read_from_summaries"] == [str(out)] and summed["labelled"] == 0
        for a, b in zip(summed["rows"], result["rows"]):
            assert a == pytest.approx(b)
