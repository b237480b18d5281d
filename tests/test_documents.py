"""Document I/O: every supported format reads the same rows, and bad input names its file and line."""

import gzip
import json
import os
import shutil
from pathlib import Path

import polars as pl
import pytest

from edu_filter.documents import (
    MAX_SCORE,
    MIN_SCORE,
    SCORES,
    DocumentError,
    InputError,
    RunError,
    check_model_name,
    check_not_empty,
    check_writable_output,
    expand_paths,
    iter_documents,
    read_documents,
    recover_folder,
    replace_folder,
    sample_documents,
    side_folders,
    write_documents,
)

REPO = Path(__file__).resolve().parents[1]
WEB_TRAIN = REPO / "data/web/fineweb_edu_llama3_train.jsonl"


def test_bundled_web_data_reads_with_labels():
    rows = read_documents([WEB_TRAIN], label_field="score", require_label=True)
    assert len(rows) == 1000
    assert all(isinstance(r["text"], str) and r["text"] for r in rows)
    assert {r["label"] for r in rows} <= {0.0, 1.0, 2.0, 3.0, 4.0, 5.0}
    assert len({r["id"] for r in rows}) == 1000


def test_jsonl_gz_parquet_and_folder_agree(tmp_path):
    rows = read_documents([WEB_TRAIN], label_field="score", limit=50)
    write_documents(rows, tmp_path / "a.jsonl.gz")
    write_documents(rows, tmp_path / "b.parquet")
    gz_rows = read_documents([tmp_path / "a.jsonl.gz"], label_field="score")
    pq_rows = read_documents([tmp_path / "b.parquet"], label_field="score")
    folder_rows = read_documents([tmp_path], label_field="score")
    for other in (gz_rows, pq_rows):
        assert [(r["id"], r["text"], r["label"]) for r in other] == [(r["id"], r["text"], r["label"]) for r in rows]
    assert len(folder_rows) == 100
    assert pl.read_parquet(tmp_path / "b.parquet").height == 50


def test_missing_text_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "fine"}\n{"id": "b", "content": "no text field"}\n')
    with pytest.raises(DocumentError, match=r"bad\.jsonl:2: field 'text' is missing"):
        read_documents([bad])


def test_unreadable_line_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl.gz"
    with gzip.open(bad, "wt") as fh:
        fh.write('{"id": "a", "text": "fine"}\n\n{"id": "b", "text": \n')
    with pytest.raises(DocumentError, match=r"bad\.jsonl\.gz:3: not valid JSON"):
        read_documents([bad])


def test_missing_label_is_an_error_when_required(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text('{"id": "a", "text": "t", "score": 3}\n{"id": "b", "text": "u"}\n')
    assert len(read_documents([f], label_field="score")) == 2
    with pytest.raises(DocumentError, match=r"x\.jsonl:2: label field 'score' is missing"):
        read_documents([f], label_field="score", require_label=True)


def test_custom_label_field_and_non_numeric_label(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text('{"id": "a", "text": "t", "human": 4}\n{"id": "b", "text": "u", "human": "high"}\n')
    with pytest.raises(DocumentError, match=r"x\.jsonl:2: label field 'human' is not a finite number: 'high'"):
        read_documents([f], label_field="human")
    assert read_documents([f], label_field="human", limit=1)[0]["label"] == 4.0


def test_expand_paths_rejects_missing_and_empty(tmp_path):
    with pytest.raises(DocumentError, match="no such file"):
        expand_paths([tmp_path / "nope.jsonl"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DocumentError, match="contains no"):
        expand_paths([tmp_path / "empty"])


def test_corrupt_archives_and_parquet_name_the_file(tmp_path):
    (tmp_path / "plain.jsonl.gz").write_bytes(b'{"id": "a", "text": "not gzipped"}\n')
    whole = gzip.compress(b'{"id": "a", "text": "some text"}\n' * 2000)
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "bad.parquet").write_bytes(b"not a parquet file")
    for name, pattern in [("plain.jsonl.gz", r"plain\.jsonl\.gz:1: cannot read"),
                          ("cut.jsonl.gz", r"cut\.jsonl\.gz:\d+: cannot read"),
                          ("bad.parquet", r"bad\.parquet: cannot read as Parquet")]:
        with pytest.raises(DocumentError, match=pattern):
            read_documents([tmp_path / name])


def test_parquet_is_read_a_batch_at_a_time_as_plain_python_values(tmp_path):
    """A shard of FineWeb is GBs: reading it holds a record batch, not the file (pyarrow's pre-buffering would keep
    every row group read). Values come back as JSON writers take them: nanosecond times (pandas writes them) as
    datetime, maps as dicts."""
    import datetime

    import orjson
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 40_000
    big = tmp_path / "big.parquet"
    pq.write_table(pa.table({"id": [str(i) for i in range(n)], "text": [os.urandom(500).hex() for _ in range(n)]}),
                   big, row_group_size=1_000)
    size = big.stat().st_size
    peak = 0
    for i, doc in enumerate(iter_documents([big])):
        if i % 500 == 0:
            peak = max(peak, pa.total_allocated_bytes())
    assert i == n - 1 and peak < 0.15 * size, (peak, size)

    typed = tmp_path / "typed.parquet"
    when = datetime.datetime(2024, 5, 1, 12, 30, 15, 123456)
    pq.write_table(pa.table({
        "text": ["a"], "at": pa.array([when], pa.timestamp("ns")), "took": pa.array([datetime.timedelta(seconds=3)],
                                                                                      pa.duration("ns")),
        "meta": pa.array([[("lang", "en")]], pa.map_(pa.string(), pa.string())),
        # nested too: in lists, structs and maps
        "visits": pa.array([[when, when]], pa.list_(pa.timestamp("ns", "UTC"))),
        "crawl": pa.array([{"at": when, "id": 7}], pa.struct([("at", pa.timestamp("ns")), ("id", pa.int64())])),
        "seen": pa.array([[("first", when)]], pa.map_(pa.string(), pa.timestamp("ns")))}), typed)
    (doc,) = read_documents([typed])
    assert doc["at"] == when and type(doc["at"]) is datetime.datetime
    assert doc["took"] == datetime.timedelta(seconds=3) and type(doc["took"]) is datetime.timedelta
    assert doc["meta"] == {"lang": "en"}
    assert [type(v) for v in doc["visits"]] == [datetime.datetime] * 2
    assert doc["visits"][0] == when.replace(tzinfo=datetime.timezone.utc)
    assert doc["crawl"] == {"at": when, "id": 7} and type(doc["crawl"]["at"]) is datetime.datetime
    assert doc["seen"] == {"first": when} and type(doc["seen"]["first"]) is datetime.datetime
    # as score's writer does (pandas' Timestamp fails)
    orjson.dumps({k: doc[k] for k in ("text", "at", "meta", "visits", "crawl", "seen")})


def test_non_finite_labels_are_refused(tmp_path):
    f = tmp_path / "nan.parquet"
    pl.DataFrame({"id": ["a", "b"], "text": ["t", "u"], "score": [2.0, float("nan")]}).write_parquet(f)
    with pytest.raises(DocumentError, match=r"nan\.parquet:2: label field 'score' is not a finite number"):
        read_documents([f], label_field="score")


def test_folders_skip_plain_json_but_files_may_be_named(tmp_path):
    write_documents([{"id": "a", "text": "t", "score": 1}], tmp_path / "docs.jsonl")
    (tmp_path / "metrics.json").write_text('{"n": 3,\n "mse": 0.1}\n')  # what a model or report folder holds
    assert [r["id"] for r in read_documents([tmp_path])] == ["a"]
    (tmp_path / "one.json").write_text('{"id": "b", "text": "u"}\n')
    assert [r["id"] for r in read_documents([tmp_path / "one.json"])] == ["b"]


def test_folders_skip_hidden_files_in_every_reader_and_in_the_fingerprint(tmp_path):
    """A hub download's `.cache/`, a notebook's `.ipynb_checkpoints/` copy: read as data they would double documents,
    yet provenance leaves them out of the fingerprint, so an edit there would go unseen by resume checks."""
    from edu_filter.filters.io import expand_inputs
    from edu_filter.provenance import fingerprint

    data = tmp_path / "data"
    write_documents([{"id": "a", "text": "t"}], data / "part-0.jsonl")
    write_documents([{"id": "copy", "text": "t"}], data / ".ipynb_checkpoints" / "part-0-checkpoint.jsonl")
    write_documents([{"id": "hidden", "text": "u"}], data / ".partial.jsonl")
    write_documents([{"id": "lock", "text": "v"}], data / ".cache" / "huggingface" / "part-0.jsonl")
    assert [r["id"] for r in read_documents([data])] == ["a"]
    assert expand_paths([data]) == [str(data / "part-0.jsonl")]
    assert expand_inputs([str(data)]) == [(str(data), "part-0.jsonl")]
    before = fingerprint(data)
    write_documents([{"id": "hidden", "text": "changed"}], data / ".partial.jsonl")
    assert fingerprint(data) == before  # what is not read does not count as a change
    # a link to a file of the folder, or the folder and a file in it: each file once, as apply reads them (a
    # training set held its rows twice, on both sides of the validation split)
    (data / "sub").mkdir()
    (data / "sub" / "link.jsonl").symlink_to(data / "part-0.jsonl")
    assert [r["id"] for r in read_documents([data, data / "part-0.jsonl"])] == ["a"]
    assert len(expand_paths([data, data / "sub" / "link.jsonl"])) == len(expand_inputs([str(data)])) == 1
    shutil.rmtree(data / "sub")
    (data / "part-0.jsonl").write_text('{"id": "a", "text": "edited"}\n')
    assert fingerprint(data) != before
    assert [r["id"] for r in read_documents([data / ".cache"])] == ["lock"]  # a hidden folder named is read
    (data / "part-0.jsonl").unlink()
    with pytest.raises(DocumentError, match="folder contains no .* files \\(only hidden ones, skipped: "):
        read_documents([data])


def test_a_glob_the_shell_left_names_the_files_it_matches_in_every_reader(tmp_path):
    """`apply 's3://bucket/dump/*.jsonl.gz'` (quoted, as remote paths are) said "no such file or folder"."""
    from edu_filter.filters.io import expand_inputs

    dump = tmp_path / "dump"
    for name, doc_id in (("a.jsonl", "a"), ("b.jsonl", "b"), ("c.parquet", "c"), ("sub/d.jsonl", "d")):
        write_documents([{"id": doc_id, "text": "t"}], dump / name)
    assert [r["id"] for r in read_documents([str(dump / "*.jsonl")])] == ["a", "b"]
    assert [r["id"] for r in read_documents([str(dump / "**" / "*.jsonl")])] == ["a", "b", "d"]
    assert expand_inputs([str(dump / "*.jsonl")]) == [(str(dump), "a.jsonl"), (str(dump), "b.jsonl")]
    assert expand_inputs([str(dump / "s*" / "*")]) == [(str(dump), "sub/d.jsonl")]
    # a folder the pattern matches is read whole, as the shell's expansion gives it (the folder was left out)
    write_documents([{"id": "e", "text": "t"}], dump / "sub" / "deeper" / "e.jsonl")
    assert [r["id"] for r in read_documents([str(dump / "*")])] == ["a", "b", "c", "d", "e"]
    assert expand_inputs([str(dump / "s*")]) == [(str(dump), "sub/d.jsonl"), (str(dump), "sub/deeper/e.jsonl")]
    assert [r["id"] for r in read_documents([str(dump / "**")])] == ["a", "b", "c", "d", "e"]  # each file once
    for listing in (expand_paths, lambda p: expand_inputs([str(p[0])])):
        with pytest.raises(DocumentError, match=r"\*\.jsonl\.gz: no file matches"):
            listing([dump / "*.jsonl.gz"])
    # an apply output where the pattern reaches: the next run would read it as input
    from edu_filter.filters.apply import check_output_apart

    for pattern in (dump / "**" / "*.parquet", dump / "*" / "*" / "*.parquet"):
        with pytest.raises(InputError, match="is where the input .* matches"):
            check_output_apart([str(pattern)], str(dump / "filtered"))
    check_output_apart([str(dump / "*.jsonl")], str(dump / "filtered"))  # one level: never reaches its files
    check_output_apart([str(dump / "x*" / "*.jsonl")], str(dump / "filtered"))  # nor a folder it cannot match
    for pattern in (dump / "*", dump / "f*", dump / "*" / "part-*.jsonl"):  # the output folder, or files in it
        with pytest.raises(InputError, match="is where the input .* matches"):
            check_output_apart([str(pattern)], str(dump / "filtered"))
    (tmp_path / "odd[1].jsonl").write_text('{"id": "odd", "text": "t"}\n')  # a name that is a pattern: the file
    assert [r["id"] for r in read_documents([str(tmp_path / "odd[1].jsonl")])] == ["odd"]


def test_hub_addresses_name_a_path_inside_the_repository():
    from edu_filter.documents import hub_dataset_args

    assert hub_dataset_args("hf://datasets/HuggingFaceFW/fineweb/sample/10BT") == {
        "path": "HuggingFaceFW/fineweb", "data_dir": "sample/10BT"}
    assert hub_dataset_args("hf://datasets/org/name/data/train-0.parquet") == {
        "path": "org/name", "data_files": "data/train-0.parquet"}
    assert hub_dataset_args("hf://datasets/org/name") == {"path": "org/name"}
    with pytest.raises(DocumentError, match="expected hf://datasets/ORG/NAME"):
        hub_dataset_args("hf://datasets/justone")


FINEWEB_CARD = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/*/*
- config_name: sample-10BT
  data_files:
  - split: train
    path: sample/10BT/*
---
# a dataset laid out as FineWeb is
"""


def test_a_whole_hub_repository_means_its_default_configurations_train_files_everywhere(tmp_path):
    """apply listed every file of hf://datasets/HuggingFaceFW/fineweb: its sample/ configurations too (copies of
    data/, ~35% more documents, all duplicates) while score read the default configuration; and a test split with
    the train one. Both now take what the `datasets` library reads (shown on local folders in the hub's layouts)."""
    from edu_filter.documents import _HUB_FILE, default_train_files, hub_repository_files

    fineweb = tmp_path / "fineweb"
    for name in ("data/CC-MAIN-2024-10/000_00000.parquet", "data/CC-MAIN-2024-18/000_00000.parquet",
                 "sample/10BT/000_00000.parquet"):
        write_documents([{"id": name, "text": "t"}], fineweb / name)
    (fineweb / "README.md").write_text(FINEWEB_CARD)
    found = default_train_files({"path": str(fineweb)}, "hf://datasets/HuggingFaceFW/fineweb")
    assert sorted(os.path.relpath(f, fineweb) for f in found) == [
        "data/CC-MAIN-2024-10/000_00000.parquet", "data/CC-MAIN-2024-18/000_00000.parquet"]
    splits = tmp_path / "splits"  # no card: the file names say the splits
    for name in ("data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet",
                 "data/test-00000-of-00001.parquet"):
        write_documents([{"id": name, "text": "t"}], splits / name)
    found = default_train_files({"path": str(splits)}, "hf://datasets/org/splits")
    assert sorted(os.path.basename(f) for f in found) == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    # what the library gives for a hub repository, made relative to it for apply's reader
    resolved = "hf://datasets/HuggingFaceFW/fineweb@9bb295ddab0e05d785b879661af7260fed5140fc/data/CC-MAIN-2024-10/000_00000.parquet"
    assert _HUB_FILE.fullmatch(resolved).group("inner") == "data/CC-MAIN-2024-10/000_00000.parquet"
    # a path inside the repository, or a revision named, is listed as given (nothing asked of the hub here)
    assert hub_repository_files("hf://datasets/HuggingFaceFW/fineweb/sample/10BT") is None
    assert hub_repository_files("hf://datasets/HuggingFaceFW/fineweb@main") is None


def test_a_folder_inside_a_hub_repository_is_read_whole_as_apply_reads_it(tmp_path):
    """As `data_dir` the `datasets` library sorted a folder's files into splits by their names: score and train read
    its train-* shards, apply every file (shown on a local folder in the hub's layout, read by the same library)."""
    import datasets

    from edu_filter.documents import folder_as_data_files

    repo = tmp_path / "repo"
    for name in ("train-00000-of-00001.parquet", "test-00000-of-00001.parquet", "dev-00000-of-00001.parquet",
                 "crawl/validation.parquet", ".cache/old.parquet"):
        write_documents([{"id": name, "text": "t"}], repo / "data" / name)
    (repo / "data" / "notes.txt").write_text("not data")
    args = folder_as_data_files({"path": str(repo), "data_dir": "data"}, str(repo / "data"))
    assert args == {"path": str(repo), "data_files": {"train": [
        "data/crawl/validation.parquet", "data/dev-00000-of-00001.parquet", "data/test-00000-of-00001.parquet",
        "data/train-00000-of-00001.parquet"]}}
    read = sorted(row["id"] for row in datasets.load_dataset(**args, split="train", streaming=True))
    assert read == sorted(row["id"] for row in read_documents([str(repo / "data")]))  # what a local copy gives
    assert len(read) == 4
    assert folder_as_data_files({"path": "org/name"}, "hf://datasets/org/name") == {"path": "org/name"}


def test_unreachable_hub_dataset_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DocumentError, match="cannot load from the Hugging Face hub"):
        read_documents(["hf://datasets/edu-filter-tests/no-such-dataset"])
    with pytest.raises(DocumentError, match="cannot load from the Hugging Face hub"):
        sample_documents(["hf://datasets/edu-filter-tests/no-such-dataset"], 5)  # resolving its data files
    from edu_filter.filters.io import expand_inputs

    with pytest.raises(DocumentError, match="cannot load from the Hugging Face hub"):  # apply said "no such file"
        expand_inputs(["hf://datasets/edu-filter-tests/no-such-dataset"])


def test_labels_outside_the_0_5_scale_name_file_and_line(tmp_path):
    f = tmp_path / "ten.jsonl"
    f.write_text('{"text": "a", "score": 5}\n{"text": "b", "score": 0}\n{"text": "c", "score": 5.5}\n')
    with pytest.raises(DocumentError, match=r"ten\.jsonl:3: label field 'score' is 5\.5, outside the 0-5 scale"):
        read_documents([f], label_field="score")
    assert [r["label"] for r in read_documents([f], label_field="score", limit=2)] == [5.0, 0.0]
    (tmp_path / "neg.jsonl").write_text('{"text": "a", "score": -1}\n')
    with pytest.raises(DocumentError, match=r"neg\.jsonl:1: .* -1, outside"):
        read_documents([tmp_path / "neg.jsonl"], label_field="score")


def test_check_writable_output_tests_without_creating(tmp_path):
    check_writable_output(tmp_path / "new" / "deeper" / "out")  # the nearest existing folder is writable
    assert not (tmp_path / "new").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match=r"--report .*file/out\.json: cannot be created, .*file is a file"):
        check_writable_output(tmp_path / "file" / "out.json", "--report")
    (tmp_path / "a-folder.jsonl").mkdir()  # found a folder only when the output was renamed into place, at the end
    with pytest.raises(InputError, match=r"-o/--output .*a-folder\.jsonl: a folder, not a file"):
        check_writable_output(tmp_path / "a-folder.jsonl", "-o/--output", file=True)
    check_writable_output(tmp_path / "a-folder.jsonl", "-o/--output")  # a folder output may exist
    for remote in ("s3://bucket/out.jsonl", Path("s3://bucket/out.jsonl"), "hf://datasets/me/x"):  # Path: "s3:/bucket"
        with pytest.raises(InputError, match="a remote location; this command writes local files"):
            check_writable_output(remote, "-o/--output")
    if os.geteuid() != 0:  # root writes into read-only folders
        (tmp_path / "ro").mkdir(mode=0o555)
        with pytest.raises(InputError, match="not writable"):
            check_writable_output(tmp_path / "ro" / "out")


def test_check_not_empty_and_check_model_name(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DocumentError, match="DATA: no documents in"):
        check_not_empty([tmp_path / "empty.jsonl"])
    check_not_empty([WEB_TRAIN])
    check_model_name("HuggingFaceFW/fineweb-edu-classifier")  # a hub id: the loader decides
    check_model_name("ORG/REPO/model-Q4_K_M.gguf")
    check_model_name(str(tmp_path))
    for missing in ("./model", str(tmp_path / "model"), "models/web/v2"):
        with pytest.raises(InputError, match="no such file or folder"):
            check_model_name(missing)


def test_one_score_scale_for_every_check():
    from edu_filter.annotate.parse import parse_score

    assert SCORES == (MIN_SCORE, 1, 2, 3, 4, MAX_SCORE) == (0, 1, 2, 3, 4, 5)
    assert parse_score("Educational score: 5")[0] == 5 and parse_score("Educational score: 6")[0] is None
    assert issubclass(DocumentError, InputError) and not issubclass(RunError, ValueError)


def test_folders_read_gzipped_json_lines_and_refuse_compressions_no_reader_takes(tmp_path):
    """C4 and Dolma ship JSON Lines as .json.gz: a folder's .json.gz, .ndjson.gz and .jsonl.zst files were skipped
    without a word, and apply's counts added up without them."""
    import gzip

    from edu_filter.filters.io import expand_inputs

    data = tmp_path / "data"
    data.mkdir()
    for name, doc_id in (("c4-00000.json.gz", "c4"), ("part.ndjson.gz", "nd"), ("a.jsonl", "a")):
        opener = gzip.open if name.endswith(".gz") else open
        with opener(data / name, "wt") as fh:
            fh.write(f'{{"id": "{doc_id}", "text": "t"}}\n')
    (data / "metrics.json").write_text("{}")  # not data: a folder's plain .json is left alone
    assert sorted(r["id"] for r in read_documents([data])) == ["a", "c4", "nd"]
    assert [name for _, name in expand_inputs([str(data)])] == ["a.jsonl", "c4-00000.json.gz", "part.ndjson.gz"]
    (data / "dolma-0001.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd")
    for read in (lambda: read_documents([data]), lambda: expand_inputs([str(data)])):
        with pytest.raises(DocumentError, match=r"dolma-0001\.jsonl\.zst cannot be read here \(compression: zst\)"):
            read()


def test_symlinked_folders_are_read_once_each_and_a_link_loop_ends(tmp_path):
    """A folder of links into dumps kept elsewhere: neither rglob nor fsspec's listing entered a linked folder, so
    its files were skipped with no word (and the counts still added up)."""
    from edu_filter.filters.io import expand_inputs
    from edu_filter.provenance import fingerprint

    elsewhere, data = tmp_path / "dump-2024-01", tmp_path / "data"
    write_documents([{"id": "linked", "text": "t"}], elsewhere / "part-0.jsonl")
    write_documents([{"id": "here", "text": "u"}], data / "a.jsonl")
    (data / "2024-01").symlink_to(elsewhere)
    (data / "loop").symlink_to(data)  # a link back up: each real folder is entered once
    assert sorted(r["id"] for r in read_documents([data])) == ["here", "linked"]
    assert expand_inputs([str(data)]) == [(str(data), "2024-01/part-0.jsonl"), (str(data), "a.jsonl")]
    before = fingerprint(data, documents=True), fingerprint(data)
    write_documents([{"id": "linked", "text": "edited"}], elsewhere / "part-0.jsonl")
    assert fingerprint(data, documents=True) != before[0] and fingerprint(data) != before[1]  # an edit behind the link is a change of the input


def test_default_ids_tell_same_named_files_of_subfolders_and_inputs_apart(tmp_path):
    """Monthly folders of part-0.jsonl without an id field: every one named its first row part-0.jsonl:1, and
    `score` refused the folder as holding duplicate ids. A name that occurs once keeps the short form."""
    data = tmp_path / "data"
    for month in ("2024-01", "2024-02"):
        write_documents([{"text": f"a {month}"}, {"text": f"b {month}"}], data / month / "part-0.jsonl")
    write_documents([{"text": "c"}], data / "2024-02" / "extra.jsonl")
    ids = [r["id"] for r in read_documents([data])]
    assert ids == ["2024-01/part-0.jsonl:1", "2024-01/part-0.jsonl:2", "extra.jsonl:1",
                   "2024-02/part-0.jsonl:1", "2024-02/part-0.jsonl:2"]
    # the same names whichever way the rows are read: Parquet sampled from its footers, or every row
    for month in ("2024-01", "2024-02"):
        pl.read_ndjson(data / month / "part-0.jsonl").write_parquet(data / month / "part-0.parquet")
        (data / month / "part-0.jsonl").unlink()
    (data / "2024-02" / "extra.jsonl").unlink()
    sampled = [doc["id"] for _, doc in sample_documents([data], 4, seed=1)]
    assert sampled == ["2024-01/part-0.parquet:1", "2024-01/part-0.parquet:2", "2024-02/part-0.parquet:1",
                       "2024-02/part-0.parquet:2"]
    assert [r["id"] for r in read_documents([data])] == sampled


@pytest.mark.parametrize("name", ["rows.json", "rows.json.gz"])
def test_a_json_array_is_refused_before_it_is_read(tmp_path, name):
    """A .json file holding one JSON array was one line: read whole (7x its size in memory for 350k rows), then one
    failed document in apply, or one error in score."""
    from edu_filter.filters.io import expand_inputs

    path = tmp_path / name
    body = b'\n  [{"id": "a", "text": "t"},\n {"id": "b", "text": "u"}]\n'
    path.write_bytes(gzip.compress(body) if name.endswith(".gz") else body)
    for read in (read_documents, expand_inputs):
        with pytest.raises(DocumentError, match="a JSON array, not JSON Lines .* jq -c"):
            read([str(path)])
    if name.endswith(".gz"):  # a corrupt one is the reader's to name (apply sets it aside), not a crash here
        path.write_bytes(gzip.compress(body)[:20])
        assert expand_inputs([str(path)]) == [(str(tmp_path), name)]
        with pytest.raises(DocumentError, match=f"{name}:2: cannot read the file"):  # after a blank line
            read_documents([str(path)])


def test_labelled_rows_keep_only_what_training_reads(tmp_path):
    """A score output row holds the LLM's whole answer beside the text (5 KB a row where the text was 3): train
    and evaluate keep id, text, label and the fields they name."""
    from edu_filter.documents import read_labelled

    path = write_documents([{"id": "a", "text": "t", "score": 2, "response": "long answer " * 100, "weight": 1.5,
                             "model": "llm", "prompt": "fineweb-edu-v1", "url": "u"}], tmp_path / "ann.jsonl")
    rows, left_out = read_labelled([path], "score", weight_field="weight", fields=("model",))
    assert rows == [{"id": "a", "text": "t", "label": 2.0, "weight": 1.5, "model": "llm"}] and left_out == {}


def test_a_folder_replaced_whole_keeps_a_complete_copy_through_a_failed_write_and_a_kill_between_renames(tmp_path):
    """Checkpoints of fine-tuning and of the ablation loop are swapped in this way."""
    folder = tmp_path / "checkpoint"

    def version(n):
        def write(partial):
            (partial / "weights").write_text(f"v{n}")
            (partial / "done.json").write_text("{}")
        return write

    replace_folder(folder, version(1))
    replace_folder(folder, version(2))
    assert (folder / "weights").read_text() == "v2" and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]

    def full_disk(partial):
        (partial / "weights").write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        replace_folder(folder, full_disk)
    assert (folder / "weights").read_text() == "v2" and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]

    partial, old = side_folders(folder)
    folder.rename(old)  # killed after moving the old copy aside, the new copy incomplete: the old one comes back
    partial.mkdir()
    (partial / "weights").write_text("v3")
    recover_folder(folder, "done.json")
    assert (folder / "weights").read_text() == "v2"
    folder.rename(old)  # killed before the new, complete copy was renamed in: the new one is taken
    version(3)(partial)
    recover_folder(folder, "done.json")
    assert (folder / "weights").read_text() == "v3"
    recover_folder(folder, "done.json")  # complete: left as it is
    assert (folder / "weights").read_text() == "v3"


def test_long_steps_show_in_a_log_and_get_a_time_left(capsys):
    """train's bars (embedding, learning curve, fine-tuning) printed nothing in a Slurm log for hours (rich draws
    nothing where there is no terminal), and steps minutes apart (a learning-curve fit at 450k labels) never got a
    time left: rich estimates the speed from the last 30 s of updates."""
    from rich.progress import TextColumn

    from edu_filter.documents import progress_bar
    from edu_filter.documents import logged_progress

    with progress_bar(True) as bar:  # stdout is no terminal here, as in a Slurm log
        task = bar.add_task("learning curve: 3 fits", total=3)
        for _ in range(3):
            bar.advance(task)
    assert "learning curve: 3 fits: 3/3" in capsys.readouterr().out.splitlines()

    clock = [0.0]
    with logged_progress(TextColumn("{task.description}"), get_time=lambda: clock[0], disable=True) as progress:
        task = progress.add_task("fits", total=10)
        for _ in range(3):
            clock[0] += 150.0  # one fit every 2.5 minutes
            progress.advance(task)
        assert progress.tasks[0].time_remaining == pytest.approx(7 * 150.0)


def test_a_folder_refuses_what_would_shrink_it_unseen(tmp_path):
    """A dangling link (an unmounted dump), compressions no reader takes and an apply output read whole (its removed
    and failed documents with the kept ones: the "filtered" arm of an ablation unfiltered) were read as a smaller
    input, or a mixed one, without a word."""
    from edu_filter.filters.io import expand_inputs

    data = tmp_path / "data"
    write_documents([{"id": "a", "text": "t"}], data / "a.jsonl")
    (data / "2024-01").symlink_to(tmp_path / "not-mounted" / "dump")
    for read in (lambda: read_documents([data]), lambda: expand_inputs([str(data)])):
        with pytest.raises(DocumentError, match=r"2024-01: a link to .*not-mounted/dump, which does not exist"):
            read()
    (data / "2024-01").unlink()
    (data / "CC-MAIN-2024.10").symlink_to(tmp_path / "not-mounted" / "CC-MAIN-2024.10")  # a dump's folder
    with pytest.raises(DocumentError, match=r"CC-MAIN-2024\.10: a link to .*, which does not exist"):
        read_documents([data])
    (data / "CC-MAIN-2024.10").unlink()
    (data / ".cache").mkdir()  # a hub download's lock, in a hidden folder no reader enters
    (data / ".cache" / "x.lock").symlink_to(tmp_path / "gone.lock")
    assert [r["id"] for r in read_documents([data])] == ["a"]
    for name, compression in (("b.jsonl.zip", "zip"), ("c.parquet.gz", "gz"), ("d.jsonl.gzip", "gzip")):
        (data / name).write_bytes(b"x")
        with pytest.raises(DocumentError, match=rf"{name} cannot be read here \(compression: {compression}\)"):
            read_documents([data])
        (data / name).unlink()
    out = tmp_path / "out"  # what apply leaves
    write_documents([{"id": "k", "text": "kept"}], out / "kept" / "00000.jsonl")
    write_documents([{"id": "r", "text": "removed"}], out / "removed" / "below_threshold" / "00000.jsonl.gz")
    (out / "run_config.json").write_text("{}")
    for read in (lambda: read_documents([out]), lambda: expand_inputs([str(out)])):
        with pytest.raises(DocumentError, match=rf"{out}: an apply output .* give {out}/kept"):
            read()
    assert [r["id"] for r in read_documents([out / "kept"])] == ["k"]
    import shutil  # what `apply --push-to-hub` uploads: kept/ and the records, read whole

    shutil.rmtree(out / "removed")
    assert [r["id"] for r in read_documents([out])] == ["k"]
    write_documents([{"id": "k", "text": "kept"}], out / "work" / "scored" / "00000.jsonl.gz")  # --keep-work's copy
    with pytest.raises(DocumentError, match="an apply output"):
        read_documents([out])
    runs = tmp_path / "runs"  # a folder of per-dump runs, given whole; one of them kept nothing
    for dump, kept in (("CC-2024-10", True), ("CC-2024-18", False)):
        if kept:
            write_documents([{"id": "k", "text": "kept"}], runs / dump / "kept" / "00000.jsonl")
        write_documents([{"id": "r", "text": "removed"}], runs / dump / "removed" / "below_threshold" / "0.jsonl.gz")
        (runs / dump / "run_config.json").write_text("{}")
    for read in (lambda: read_documents([runs]), lambda: expand_inputs([str(runs)])):
        with pytest.raises(DocumentError, match=rf"{runs}/CC-2024-10: an apply output .* give {runs}/CC-2024-10/kept "
                                                r"for the documents it kept; of 2 runs, each one's kept/"):
            read()
    shutil.rmtree(runs / "CC-2024-10" / "removed")
    with pytest.raises(DocumentError, match=rf"{runs}/CC-2024-18: an apply output .*here CC-2024-18/removed/"):
        read_documents([runs])
    shutil.rmtree(runs / "CC-2024-18" / "removed")
    assert [r["id"] for r in read_documents([runs])] == ["k"]
    tool = tmp_path / "tool"  # another tool's run_config.json beside its data: not an apply output
    write_documents([{"id": "t", "text": "t"}], tool / "data" / "0.jsonl")
    (tool / "run_config.json").write_text("{}")
    assert [r["id"] for r in read_documents([tool])] == ["t"]


def test_labels_and_ids_that_only_look_right_are_refused(tmp_path):
    """A yes/no field named by mistake trained as 0/1 labels; another script's digit read as a number. An empty id
    is no id: the row is named by its place, as apply names it (score and train stopped at it)."""
    f = tmp_path / "x.jsonl"
    for row, message in (({"id": "a", "text": "t", "score": True}, "not a finite number: True"),
                         ({"id": "a", "text": "t", "score": "٣"}, "not a finite number: '٣'")):
        write_documents([row], f)
        with pytest.raises(DocumentError, match=rf"x\.jsonl:1: .*{message}"):
            read_documents([f], label_field="score")
    write_documents([{"id": "", "text": "t", "score": 3}, {"id": "", "text": "u", "score": 2}], f)
    assert [r["id"] for r in read_documents([f], label_field="score")] == ["x.jsonl:1", "x.jsonl:2"]


def test_integer_ids_past_64_bits_are_read_exactly_as_apply_reads_them(tmp_path):
    """orjson reads an integer past 64 bits as a float: two ids a digit apart were one (score refused the input as a
    duplicate) and an id was "1.2345678901234568e+23" here while apply wrote "123456789012345678901234"."""
    f = tmp_path / "ids.jsonl"
    f.write_text('{"id": 123456789012345678901234, "text": "a"}\n{"id": 123456789012345678901235, "text": "b"}\n'
                 '{"id": 1.5, "text": "c"}\n')
    assert [d["id"] for d in read_documents([f])] == ["123456789012345678901234", "123456789012345678901235", "1.5"]


def test_a_file_name_that_is_not_utf8_is_read_fingerprinted_and_named(tmp_path):
    """A Latin-1 name (caf\\xe9.jsonl): the folder's fingerprint failed with a bare UnicodeEncodeError, and the
    rows' default ids held text no JSON writer takes."""
    import orjson

    from edu_filter.provenance import fingerprint

    data = tmp_path / "data"
    data.mkdir()
    (Path(os.fsdecode(bytes(data) + b"/caf\xe9.jsonl"))).write_text('{"text": "t"}\n')
    [row] = read_documents([data])
    assert row["id"] == "caf\\xe9.jsonl:1" and orjson.dumps(row)
    assert fingerprint(data)["files"] == 1 and fingerprint(data, documents=True)["files"] == 1


# the listings warmed up (their lazy imports read from a folder that user may not enter), then a user the folders
# shut out (root reads everything) lists argv[1]
LISTED_BY_ANOTHER_USER = """import os, sys
from edu_filter.documents import DocumentError, expand_paths
from edu_filter.filters.io import expand_inputs
expand_paths([sys.argv[2]]), expand_inputs([sys.argv[2]])
if os.geteuid() == 0:
    os.setgid(65534), os.setuid(65534)
for listing in (expand_paths, expand_inputs):
    try:
        print(listing([sys.argv[1]]))
    except DocumentError as e:
        print("refused:", e)
"""


def listed_by_another_user(folder: Path, readable: Path) -> list[str]:
    import subprocess
    import sys

    listed = subprocess.run([sys.executable, "-c", LISTED_BY_ANOTHER_USER, str(folder), str(readable)],
                            capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    return listed.stdout.splitlines()


def test_a_subfolder_that_cannot_be_listed_stops_the_read_not_leaves_out_its_files():
    """os.walk passed over a folder it could not list (no permission, a stale NFS handle): every command ran without
    its documents and its counts still added up."""
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp())  # pytest's own folders are closed to other users
    data = base / "data"
    write_documents([{"id": "a", "text": "one"}], data / "a" / "x.jsonl")
    write_documents([{"id": "b", "text": "two"}], data / "b" / "y.jsonl")
    write_documents([{"id": "c", "text": "three"}], data / ".cache" / "z.jsonl")
    for folder in (base, data, data / "a"):
        folder.chmod(0o755)
    (data / "b").chmod(0)
    (data / ".cache").chmod(0)  # hidden: never read, so never a reason to stop
    try:
        lines = listed_by_another_user(data, data / "a")
    finally:
        (data / "b").chmod(0o755)
        (data / ".cache").chmod(0o755)
        shutil.rmtree(base)
    assert len(lines) == 2 and all(line.startswith(f"refused: {data / 'b'}: cannot list the folder") for line in lines)


def test_a_volumes_own_lost_and_found_is_passed_over():
    """ext4 puts lost+found, root's alone, at the top of every volume: a dataset on a volume of its own was refused
    as a folder that cannot be listed. (Mounted here as a tmpfs of its own.)"""
    import shutil
    import subprocess
    import tempfile

    base = Path(tempfile.mkdtemp())
    volume = base / "volume"
    volume.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(volume)], capture_output=True).returncode != 0:
        shutil.rmtree(base)
        pytest.skip("no tmpfs can be mounted here (not root, or in a container without the right)")
    try:
        write_documents([{"id": "a", "text": "one"}], volume / "part-0.jsonl")
        (volume / "lost+found").mkdir(mode=0o700)
        (volume / "elsewhere").mkdir(mode=0o700)  # any other such folder is still refused
        for folder in (base, volume):
            folder.chmod(0o755)
        lines = listed_by_another_user(volume, volume / "part-0.jsonl")
        assert len(lines) == 2 and all(f"{volume / 'elsewhere'}: cannot list" in line for line in lines), lines
        (volume / "elsewhere").rmdir()
        lines = listed_by_another_user(volume, volume / "part-0.jsonl")
        assert lines == [repr([str(volume / "part-0.jsonl")]), repr([(str(volume), "part-0.jsonl")])], lines
    finally:
        subprocess.run(["umount", str(volume)], capture_output=True)
        shutil.rmtree(base)


def test_an_empty_gzip_file_is_a_copy_cut_short_not_a_file_without_rows(tmp_path):
    """Python's gzip reads a 0-byte file as empty, and a shard whose download died before its first byte was read
    as holding no documents; the smallest gzip file is 20 bytes. (One of nothing still reads as no rows.)"""
    (tmp_path / "cut.jsonl.gz").write_bytes(b"")
    (tmp_path / "none.jsonl.gz").write_bytes(gzip.compress(b""))
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(DocumentError, match=r"cut\.jsonl\.gz: an empty file, not gzip"):
        read_documents([tmp_path / "cut.jsonl.gz"])
    assert read_documents([tmp_path / "none.jsonl.gz"]) == [] and read_documents([tmp_path / "empty.jsonl"]) == []


def test_a_line_past_max_line_bytes_stops_the_read_naming_it_without_holding_it(tmp_path, monkeypatch):
    """A JSON array on one line, or a file whose line breaks were lost, was read into memory whole (GBs) before
    failing as JSON; the lines before it are read, then the error names the line and its size."""
    import edu_filter.documents as documents

    monkeypatch.setattr(documents, "MAX_LINE_BYTES", 1000)
    monkeypatch.setattr(documents, "LINE_PIECE_BYTES", 64)
    rows = b'{"id": "a", "text": "fine"}\n' + b'[' + b'{"text": "x"},' * 500 + b'{"text": "x"}]'
    for name, data in (("array.jsonl", rows), ("array.jsonl.gz", gzip.compress(rows))):
        (tmp_path / name).write_bytes(data)
        read = iter_documents([tmp_path / name])
        assert next(read)["id"] == "a"
        with pytest.raises(DocumentError, match=rf"{name}:2: a line of 7,015 bytes, over the 1,000 a document may "
                                                r"take: a file without line breaks, or a JSON array\?"):
            next(read)


def test_a_json_record_that_cannot_be_written_leaves_no_hidden_partial(tmp_path):
    """A full disk (/dev/full: every write fails with ENOSPC) while writing metrics.json or stats.json: the old
    file stays, and no hidden `.partial-` file is left beside it."""
    from edu_filter.documents import PARTIAL_PREFIX, write_json_whole

    path = tmp_path / "metrics.json"
    write_json_whole(path, {"old": 1})
    (tmp_path / (PARTIAL_PREFIX + path.name)).symlink_to("/dev/full")
    with pytest.raises(OSError, match="No space left on device"):
        write_json_whole(path, {"new": "x" * 100_000})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
    assert json.loads(path.read_text()) == {"old": 1}
