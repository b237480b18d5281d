"""`edu-filter agreement`: metrics checked against hand-computed values and real annotations."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from edu_filter.annotate.agreement import agreement, agreement_metrics
from edu_filter.documents import DocumentError

DATA = Path(__file__).resolve().parents[1] / "data"


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return path


def test_metrics_match_hand_computed_values():
    a = [0, 1, 2, 3]
    b = [0, 1, 3, 3]
    m = agreement_metrics(a, b, threshold=3)
    # observed agreement 3/4; chance agreement from the marginals: A=(1,1,1,1)/4, B=(1,1,0,2)/4 -> 4/16
    assert m["exact_agreement"] == pytest.approx(0.75)
    assert m["cohen_kappa"] == pytest.approx((0.75 - 0.25) / (1 - 0.25))
    assert m["mae"] == pytest.approx(0.25)
    assert m["spearman"] == pytest.approx(0.9486832980505138)
    assert m["confusion_matrix"][2] == [0, 0, 0, 1, 0, 0] and m["confusion_matrix"][3][3] == 1
    assert (m["kept_a"], m["kept_b"], m["keep_precision"], m["keep_recall"]) == (1, 2, 0.5, 1.0)
    # nothing kept by A: B's recall of A's keeps is undefined, not 0.0 ("B misses every keep")
    none_kept = agreement_metrics([1, 2, 2, 1], [3, 4, 1, 2], threshold=3)
    assert (none_kept["kept_a"], none_kept["keep_recall"], none_kept["keep_precision"], none_kept["keep_f1"]) == (
        0, None, 0.0, 0.0)
    assert agreement_metrics([1, 2], [1, 2], threshold=3)["keep_f1"] is None
    # quadratic weights punish a 0-vs-5 disagreement far more than 2-vs-3
    near = agreement_metrics([0, 2, 5, 1], [0, 3, 5, 1])["quadratic_kappa"]
    far = agreement_metrics([0, 2, 5, 1], [5, 2, 5, 1])["quadratic_kappa"]
    assert near > 0.8 > far
    # regression outputs are rounded for kappa but used as given for MAE
    reg = agreement_metrics([1, 2, 3], [1.2, 2.4, 2.6])
    assert reg["exact_agreement"] == 1.0
    assert reg["mae"] == pytest.approx((0.2 + 0.4 + 0.4) / 3)


def test_undefined_statistics_are_none_not_nan():
    m = agreement_metrics([2, 2, 2], [2, 2, 2])
    assert m["exact_agreement"] == 1.0 and m["cohen_kappa"] is None and m["spearman"] is None


def test_agreement_joins_on_id_and_counts_what_it_skips(tmp_path):
    a = _write(tmp_path / "a.jsonl", [{"id": str(i), "score": i % 6} for i in range(10)] + [{"id": "n", "score": None}])
    b = _write(tmp_path / "b.jsonl", [{"id": str(i), "pred": (i % 6) + (1 if i == 4 else 0)} for i in range(2, 12)])
    report = tmp_path / "report.json"
    r = agreement(str(a), str(b), field="score", field_b="pred", report=report, show=False)
    assert r["n"] == 8 and r["only_in_a"] == 2 and r["only_in_b"] == 2 and r["null_a"] == 0  # "n": not in B
    assert r["exact_agreement"] == pytest.approx(7 / 8)
    assert orjson.loads(report.read_bytes())["n"] == 8
    # a failed annotation (null) in B is counted as null there, not also as missing from B
    failed = _write(tmp_path / "failed.jsonl", [{"id": "1", "score": 3}, {"id": "2", "score": None},
                                                 {"id": "3", "score": 2}])
    scored = _write(tmp_path / "scored.jsonl", [{"id": "1", "score": 3}, {"id": "2", "score": 1},
                                                {"id": "3", "score": 2}])
    r = agreement(str(scored), str(failed), show=False)
    assert (r["n"], r["null_b"], r["only_in_a"], r["only_in_b"]) == (2, 1, 0, 0)
    # a human subset against an LLM pool: the comparisons its nulls cost, not every null of the pool
    pool = _write(tmp_path / "pool.jsonl", [{"id": str(i), "score": None if i % 10 == 3 else i % 6}
                                             for i in range(1000)])
    human = _write(tmp_path / "human.jsonl", [{"id": str(i), "score": i % 6} for i in range(10)])
    r = agreement(str(human), str(pool), show=False)
    assert (r["n"], r["null_a"], r["null_b"], r["only_in_a"], r["only_in_b"]) == (9, 0, 1, 0, 891)
    # integer ids wider than 64 bits: two a digit apart were one float, a duplicate id (or a wrong join)
    wide = 123456789012345678901234
    big = (tmp_path / "big.jsonl")
    big.write_text("".join(f'{{"id": {wide + k}, "score": {k}}}\n' for k in range(3)))
    r = agreement(str(big), str(big), show=False)
    assert r["n"] == 3 and r["exact_agreement"] == 1.0


def test_keep_drop_at_a_whole_threshold_rounds_as_apply_keeps():
    """The matrix rounds 2.6 to a 3 and apply keeps it at threshold 3 (int_score), but the keep/drop block compared
    2.6 < 3 and reported a disagreement where every score agreed."""
    m = agreement_metrics([3, 2, 4, 1], [2.6, 2.4, 3.7, 1.2], threshold=3)
    assert m["exact_agreement"] == 1.0 and m["keep_agreement"] == 1.0 and (m["kept_a"], m["kept_b"]) == (2, 2)
    assert agreement_metrics([3, 2, 4, 1], [2.6, 2.4, 3.7, 1.2], threshold=2.7)["kept_b"] == 1  # values as given


def test_a_classifiers_own_int_score_is_what_it_keeps(tmp_path):
    """apply's int_score comes from the model's calibrated cut points (here 2.9 for a 3): rounding its raw score
    counted 2.6, 2.7 and 2.8 as kept where apply dropped them (keep agreement 0.4 for a classifier agreeing fully)."""
    labels = _write(tmp_path / "llm.jsonl", [{"id": str(i), "score": s} for i, s in enumerate([2, 2, 2, 3, 1])])
    applied = _write(tmp_path / "apply.jsonl", [{"id": str(i), "score": s, "int_score": c} for i, (s, c) in
                                                enumerate([(2.6, 2), (2.7, 2), (2.8, 2), (3.0, 3), (1.0, 1)])])
    r = agreement(str(labels), str(applied), show=False)
    assert (r["kept_a"], r["kept_b"], r["keep_agreement"], r["exact_agreement"]) == (1, 1, 1.0, 1.0)
    assert (r["int_a"], r["int_b"]) == ("rounded", "int_score")
    raw = agreement(str(labels), str(applied), field_b="score", show=False)  # named: still the classifier's rows
    assert raw["kept_b"] == 1
    rows = [orjson.loads(line) for line in applied.read_bytes().splitlines()]
    del rows[2]["int_score"]  # not every row has one: all rounded
    mixed = agreement(str(labels), str(_write(tmp_path / "mixed.jsonl", rows)), show=False)
    assert (mixed["int_b"], mixed["kept_b"]) == ("rounded", 4)


def test_real_annotations_agree_with_themselves_and_not_with_noise(tmp_path):
    labels = DATA / "code" / "python_edu_labels.jsonl"
    rows = [orjson.loads(line) for line in labels.read_bytes().splitlines()]
    same = agreement(str(labels), str(labels), show=False)
    assert same["n"] == 561 and same["cohen_kappa"] == 1.0 and same["quadratic_kappa"] == 1.0
    shifted = _write(tmp_path / "shifted.jsonl", [{"id": r["id"], "score": (r["score"] + 3) % 6} for r in rows])
    other = agreement(str(labels), str(shifted), show=False)
    assert other["cohen_kappa"] < 0.1 and other["exact_agreement"] == 0.0


def test_a_pool_against_a_few_labels_holds_only_the_labelled_rows(tmp_path):
    """An apply output of 100M rows against a few thousand LLM labels held every row of both (~280 bytes a row):
    the smaller side is held, the other read against its ids, either way round, and its other rows counted."""
    import tracemalloc

    pool = tmp_path / "pool.jsonl"
    with pool.open("w") as fh:
        for i in range(200_000):
            fh.write(f'{{"id": "doc-{i:07d}", "score": {(i % 50) / 10}, "int_score": {i % 6}}}\n')
    labels = _write(tmp_path / "labels.jsonl", [{"id": f"doc-{i:07d}", "score": i % 6} for i in range(0, 2000, 2)]
                    + [{"id": "doc-9999999", "score": 3}, {"id": "doc-0000001", "score": None}])
    agreement(str(labels), str(labels), show=False)  # the statistics libraries imported before memory is traced
    for a, b in ((labels, pool), (pool, labels)):
        tracemalloc.start()
        r = agreement(str(a), str(b), show=False)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert r["n"] == 1000 and peak < 8 * 2**20, peak  # every row held: ~60 MB
        pool_side, label_side = ("b", "a") if a == labels else ("a", "b")
        assert r[f"only_in_{pool_side}"] == 199_000 - 1 and r[f"only_in_{label_side}"] == 1
        assert r[f"null_{label_side}"] == 1 and r[f"int_{pool_side}"] == "int_score"


def test_bad_rows_name_file_and_line(tmp_path):
    good = _write(tmp_path / "good.jsonl", [{"id": "a", "score": 1}])
    bad = _write(tmp_path / "bad.jsonl", [{"id": "a", "score": 1}, {"id": "b", "score": "high"}])
    with pytest.raises(DocumentError, match="bad.jsonl:2: field 'score' is not a number"):
        agreement(str(good), str(bad), show=False)
    noid = _write(tmp_path / "noid.jsonl", [{"score": 1}])
    with pytest.raises(DocumentError, match="noid.jsonl:1: field 'id' is missing"):
        agreement(str(good), str(noid), show=False)
    dup = _write(tmp_path / "dup.jsonl", [{"id": "a", "score": 1}, {"id": "a", "score": 2}])
    with pytest.raises(DocumentError, match="dup.jsonl:2: duplicate id 'a'"):
        agreement(str(good), str(dup), show=False)
    other = _write(tmp_path / "other.jsonl", [{"id": "z", "score": 1}])
    with pytest.raises(ValueError, match="no document has a score on both sides"):
        agreement(str(good), str(other), show=False)
    ten_point = _write(tmp_path / "ten_point.jsonl", [{"id": "a", "score": 1}, {"id": "b", "score": 9}])
    with pytest.raises(DocumentError, match=r"ten_point\.jsonl:2: field 'score' is 9, outside the 0-5 scale"):
        agreement(str(good), str(ten_point), show=False)
    with pytest.raises(ValueError, match="--threshold must be on the 0-5 scale"):
        agreement(str(good), str(good), threshold=7, show=False)


def test_labels_written_as_strings_and_binary_ids_are_read_as_train_reads_them(tmp_path):
    """Labels exported as strings ("3", a spreadsheet's) train and evaluate but were refused here; a Parquet id
    column stored as binary was joined as "b'a'"."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    strings = _write(tmp_path / "strings.jsonl", [{"id": "a", "score": "3"}, {"id": "b", "score": "4.5"}])
    binary = tmp_path / "binary.parquet"
    pq.write_table(pa.table({"id": pa.array([b"a", b"b"], pa.binary()), "score": [3, 4]}), binary)
    result = agreement(str(strings), str(binary), show=False)
    assert result["n"] == 2 and result["mean_a"] == 3.75 and result["only_in_a"] == 0


@pytest.mark.slow
def test_agreement_command_prints_tables(tmp_path):
    a = _write(tmp_path / "a.jsonl", [{"id": str(i), "score": i % 6} for i in range(12)])
    b = _write(tmp_path / "b.jsonl", [{"id": str(i), "score": min(5, i % 6 + i % 2)} for i in range(12)])
    out = subprocess.run([sys.executable, "-m", "edu_filter.cli", "agreement", str(a), str(b)],
                         capture_output=True, text=True, check=True).stdout
    assert "quadratic-weighted kappa" in out and "confusion matrix" in out and "Spearman" in out
    bad = subprocess.run([sys.executable, "-m", "edu_filter.cli", "agreement", str(a), str(tmp_path / "none.jsonl")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "no such file" in bad.stderr


def test_an_actively_chosen_sample_is_said_to_be_unweighted(tmp_path, capsys):
    """Rows of `score --select active` carry inclusion weights (the rare high scores many times their share): their
    agreement is the sample's, not the pool's, which nothing said."""
    a = _write(tmp_path / "a.jsonl", [{"id": str(i), "score": i % 6} for i in range(6)])
    b = _write(tmp_path / "b.jsonl", [{"id": str(i), "score": i % 6, "weight": 1.0 + i} for i in range(6)])
    assert agreement(str(a), str(a), show=False)["warnings"] == []
    r = agreement(str(a), str(b))
    assert len(r["warnings"]) == 1 and f"{b}:1" in r["warnings"][0]
    assert "figures are of the sample" in " ".join(capsys.readouterr().out.split())
