"""Provenance records, fingerprints, lineage and cards, on real artifacts: an annotation file recorded the way
`edu-filter score` records it, a classifier from the real `train`, a filtered dataset folder scored by that
classifier and recorded the way `apply` records it, and a real `ablate --seeds 2` on it."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edu_filter import provenance
from edu_filter.cli import app
from edu_filter.documents import data_files_in, read_documents, write_documents

sys.path.insert(0, str(Path(__file__).parent))
from llm_test_server import free_port  # noqa: E402
from micro_ablation import MICRO_ABLATION  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WEB_TRAIN = REPO / "data/web/fineweb_edu_llama3_train.jsonl"
WEB_VAL = REPO / "data/web/fineweb_edu_llama3_val.jsonl"
MICRO = MICRO_ABLATION
THRESHOLD = 2


def sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def record_annotations(annotations: Path, documents: Path) -> Path:
    """What `edu-filter score` records for its output (the hook in annotate/score.py)."""
    return provenance.record_provenance(
        annotations, kind="annotations",
        settings={"prompt": "fineweb-edu-v1", "model": "meta-llama/Meta-Llama-3-70B-Instruct", "backend": "openai",
                  "base_url": "http://user:secret@127.0.0.1:8000/v1", "temperature": 0.6, "max_tokens": 256},
        inputs={"documents": [documents], "prompt": None},
    )


def filter_with(classifier: Path, documents: Path, out: Path, limit: int) -> dict:
    """A small apply output made by hand: the classifier's scores on the first `limit` documents,
    `int_score >= THRESHOLD` kept as Parquet."""
    from edu_filter.classifiers import load_scorer

    rows = read_documents([documents], limit=limit)
    scorer = load_scorer(classifier)
    scores, _ = scorer.predict([r["text"] for r in rows])
    ints = scorer.to_int_score(scores)
    for row, score, int_score in zip(rows, scores, ints):
        row.update(score=float(score), int_score=int(int_score), token_count=len(row["text"].split()))
    kept = [r for r in rows if r["int_score"] >= THRESHOLD]
    removed = [r for r in rows if r["int_score"] < THRESHOLD]
    write_documents(kept, out / "kept" / "00000.parquet")
    write_documents(removed, out / "removed" / "below_threshold" / "00000.jsonl.gz")

    def count(part):
        return {"documents": len(part), "tokens": sum(r["token_count"] for r in part)}

    settings = {"inputs": [str(documents)], "limit": limit, "model": str(classifier), "threshold": THRESHOLD,
                "keep_top": None,
                "dedup": False, "exact_dedup": False, "decontaminate": [str(REPO / "data/code/HumanEval.jsonl.gz")],
                "preset": None, "long_docs": None, "dtype": None}
    stats = {"in": count(rows), "kept": count(kept), "removed": {"below_threshold": count(removed)}, "failed": {},
             "adds_up": True, "settings": settings}
    (out / "stats.json").write_text(json.dumps(stats))
    return stats


@pytest.fixture(scope="module")
def chain(tmp_path_factory, minilm_path, embedding_cache_dir):
    """documents -> annotations -> classifier -> dataset -> ablation (2 seeds), every step recorded. The annotations
    are the bundled Llama-3 labels of the first 80 bundled FineWeb documents; the dataset filters the first 150
    documents of the bundled validation file."""
    from edu_filter.train.classifier import train_classifier

    root = tmp_path_factory.mktemp("chain")
    documents = WEB_TRAIN
    labelled = read_documents([documents], label_field="score", limit=80)
    annotations = write_documents(
        [{"id": r["id"], "text": r["text"], "score": int(r["label"]), "model": r["annotator"],
          "prompt": "fineweb-edu-v1"} for r in labelled], root / "annotations.jsonl")
    record_annotations(annotations, documents)

    classifier = root / "classifier"
    train_classifier([str(annotations)], classifier, kind="web", encoder=minilm_path, max_length=64,
                     cache_dir=str(embedding_cache_dir), val_fraction=0.25)

    pool = WEB_VAL
    dataset = root / "dataset"
    stats = filter_with(classifier, pool, dataset, limit=150)
    provenance.record_provenance(dataset, kind="dataset", settings=stats["settings"],
                                 inputs={"documents": [pool], "classifier": classifier,
                                         "decontamination": stats["settings"]["decontaminate"]})
    provenance.write_dataset_card(dataset, stats)

    ablation = root / "ablation"
    result = CliRunner().invoke(app, ["ablate", "--data", f"edu={dataset / 'kept'}", "--data", f"all={pool}",
                                      "--seeds", "2", "--tokens", "1024", *MICRO, "-o", str(ablation)])
    assert result.exit_code == 0, result.output
    return {"root": root, "documents": documents, "annotations": annotations, "classifier": classifier,
            "pool": pool, "dataset": dataset, "ablation": ablation, "stats": stats}


def lineage_json(path: Path) -> dict:
    result = CliRunner().invoke(app, ["lineage", str(path), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def child(node: dict, role: str) -> dict:
    [found] = [n for n in node["inputs"] if n["role"] == role]
    return found


# --- fingerprints ---------------------------------------------------------------------------------------------------
def test_a_small_file_fingerprint_is_its_sha256(tmp_path):
    file = tmp_path / "docs.jsonl"
    file.write_text('{"id": "a", "text": "x"}\n')
    found = provenance.fingerprint(file)
    assert found["fingerprint"] == sha256(file) and found["bytes"] == file.stat().st_size and found["files"] == 1
    assert found["method"] == "sha256 of all content"


def test_a_folder_fingerprint_covers_content_not_metadata(tmp_path):
    folder = tmp_path / "kept"
    folder.mkdir()
    (folder / "a.jsonl").write_text("one\n")
    (folder / "sub").mkdir()
    (folder / "sub" / "b.jsonl").write_text("two\n")
    before = provenance.fingerprint(folder)["fingerprint"]
    (folder / "README.md").write_text("a card")
    (folder / "provenance.json").write_text("{}")
    (folder / "a.jsonl.provenance.json").write_text("{}")
    (folder / ".partial-c.jsonl").write_text("half")
    assert provenance.fingerprint(folder)["fingerprint"] == before
    (folder / "sub" / "b.jsonl").write_text("TWO\n")
    assert provenance.fingerprint(folder)["fingerprint"] != before
    (folder / "sub" / "b.jsonl").write_text("two\n")
    (folder / "sub" / "b.jsonl").rename(folder / "b.jsonl")  # same bytes under another name
    assert provenance.fingerprint(folder)["fingerprint"] != before


def test_large_inputs_are_sampled_and_still_see_edits(tmp_path):
    file = tmp_path / "big.bin"
    file.write_bytes(os.urandom(3 * 2**20))
    limit = 2**20  # what FULL_HASH_MAX_BYTES (256 MiB) does for real corpora
    first = provenance.fingerprint(file, full_hash_max_bytes=limit)
    assert first["fingerprint"].startswith("sampled:") and "8 x 64 KiB blocks" in first["method"]
    assert provenance.fingerprint(file, full_hash_max_bytes=limit) == first
    stat = file.stat()
    with open(file, "r+b") as fh:  # a byte inside the first sampled block, flipped
        fh.seek(10)
        flipped = bytes([fh.read(1)[0] ^ 0xFF])
        fh.seek(10)
        fh.write(flipped)
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert provenance.fingerprint(file, full_hash_max_bytes=limit)["fingerprint"] != first["fingerprint"]
    with open(file, "r+b") as fh:  # between the sampled blocks: seen through the modification time
        fh.seek(100_000)
        fh.write(b"edit")
    assert provenance.fingerprint(file, full_hash_max_bytes=limit)["fingerprint"] != first["fingerprint"]


def test_a_folder_of_many_files_is_read_several_at_a_time_into_the_same_fingerprint(tmp_path, capsys):
    """25,000 files were read one after another at every run; read at once, the fingerprint is still each file's
    in name order, and its progress is said in a log."""
    import hashlib

    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(provenance.FINGERPRINT_BAR_FILES + 7):  # enough for a bar
        (folder / f"part-{i:05d}.jsonl").write_text(f'{{"id": {i}, "text": "document {i}"}}\n' * (1 + i % 5))
    outer = hashlib.sha256()
    for file in sorted(folder.iterdir()):
        outer.update(f"{file.name}\0{sha256(file).split(':', 1)[1]}\n".encode())
    n = provenance.FINGERPRINT_BAR_FILES + 7
    found = provenance.fingerprint(folder)
    assert found["fingerprint"] == f"sha256:{outer.hexdigest()}" and found["files"] == n
    said = capsys.readouterr()
    assert f"fingerprinting {n:,} input files: {n:,}/{n:,}" in " ".join(said.err.split()) and not said.out


def test_many_input_paths_are_described_several_at_a_time_in_their_order(tmp_path, capsys):
    """A shell glob gives `apply` thousands of files, each fingerprinted on its own, one after another: they are
    described several at a time, recorded in the order given, with a bar on stderr."""
    n = provenance.FINGERPRINT_BAR_FILES + 3
    files = []
    for i in reversed(range(n)):  # an order that is not the names'
        files.append(tmp_path / f"part-{i:05d}.jsonl")
        files[-1].write_text(f'{{"id": {i}, "text": "document {i}"}}\n')
    entries = provenance.describe_inputs({"documents": files, "classifier": None})
    assert [e["path"] for e in entries] == [str(f) for f in files]
    assert [e["fingerprint"] for e in entries] == [sha256(f) for f in files]
    said = capsys.readouterr()
    assert f"fingerprinting {n:,} inputs: {n:,}/{n:,}" in " ".join(said.err.split()) and not said.out
    # their lineage reads them again, several at a time too (one after another: tens of silent minutes at 100k)
    (tmp_path / "out").mkdir()
    provenance.record_provenance(tmp_path / "out", kind="dataset", settings={}, inputs={"documents": files})
    capsys.readouterr()
    tree = provenance.lineage(tmp_path / "out")
    assert [n["fingerprint"] for n in tree["inputs"]] == [sha256(f) for f in files]
    assert not any(n["stale"] for n in tree["inputs"])
    said = " ".join(capsys.readouterr().err.split())
    assert f"fingerprinting the {n:,} inputs of {tmp_path / 'out'}: {n:,}/{n:,}" in said


def test_a_glob_of_shards_is_hashed_in_full_only_when_all_of_them_together_are_small(tmp_path, monkeypatch):
    """Each shard under the limit alone, a glob of them was read whole before every run (a terabyte of small shards);
    it is sampled as its folder is, and a later look (lineage) reads it the same way and finds it unchanged."""
    files = []
    for i in range(3):
        files.append(tmp_path / f"part-{i}.jsonl")
        files[-1].write_text(f'{{"id": {i}, "text": "{"document " * 5}"}}\n')
    one = files[0].stat().st_size
    monkeypatch.setattr(provenance, "FULL_HASH_MAX_BYTES", 2 * one)  # one shard, or two, would be read in full
    entries = provenance.describe_inputs({"documents": files, "classifier": str(files[0])})
    assert [e["fingerprint_method"].split(",")[0] for e in entries] == ["size"] * 3 + ["sha256 of all content"]
    assert provenance.describe_inputs({"documents": files[:2]})[0]["fingerprint"] == sha256(files[0])
    assert provenance._current_fingerprint(files[1], {}, True, entries[1]["fingerprint"]) == entries[1]["fingerprint"]


def test_remote_inputs_are_named_not_fingerprinted(tmp_path):
    for remote in ("hf://datasets/HuggingFaceFW/fineweb/sample/10BT", "s3://bucket/crawl/",
                   "HuggingFaceFW/fineweb-edu-classifier"):
        assert provenance.is_remote(remote) and provenance.fingerprint(remote) is None
    assert not provenance.is_remote(WEB_TRAIN)
    with pytest.raises(provenance.ProvenanceError, match="no such file or folder"):
        provenance.fingerprint(tmp_path / "gone.jsonl")


# --- records --------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_an_annotation_file_records_how_and_from_what(chain):
    annotations, documents = chain["annotations"], chain["documents"]
    sidecar = annotations.with_name(annotations.name + ".provenance.json")
    record = json.loads(sidecar.read_text())
    assert record["kind"] == "annotations" and record["edu_filter_version"] == provenance.version()
    assert record["versions"]["python"] and "torch" in record["versions"]
    assert record["settings"]["prompt"] == "fineweb-edu-v1"
    assert record["settings"]["base_url"] == "http://***@127.0.0.1:8000/v1"  # credentials never recorded
    [entry] = record["inputs"]
    assert entry["role"] == "documents" and entry["path"] == str(documents)
    assert entry["fingerprint"] == sha256(documents)
    assert entry["relative_path"] == os.path.relpath(documents, annotations.parent)
    assert "provenance" not in entry  # raw documents have no record of their own
    # a folder of annotation files does not count their records as data
    assert data_files_in("annotations/", [annotations.name, sidecar.name]) == [annotations.name]
    with pytest.raises(ValueError, match="kind must be one of"):
        provenance.record_provenance(annotations, kind="model", settings={}, inputs={})


def test_secrets_in_commands_and_settings_are_redacted_and_nothing_else():
    """Only scheme://user:pass@ was redacted: a key in a URL's query, a `--server-arg api-key=...` or `hf-token=`
    (vLLM's for gated models), and a password holding an @, reached the record, the card and the hub."""
    line = provenance.command_line(["edu-filter", "score", "in.jsonl", "--base-url", "http://h/v1?key=SECRET1&x=1",
                                    "--base-url", "http://u:p@ss2@h/v1", "--server-arg", "api-key=sk-SECRET3",
                                    "--server-arg", "hf-token=hf_SECRET4", "--server-arg", "max_tokens=5",
                                    "--override", "tokenizer=gpt2", "--data", "hf://datasets/org/name@main"])
    assert "SECRET" not in line and "ss2" not in line
    assert "key=***&x=1" in line and "http://***@h/v1" in line and "api-key=***" in line and "hf-token=***" in line
    kernel = ["/venv/lib/python3.11/site-packages/ipykernel_launcher.py", "-f", "/tmp/tmpab12.json",
              "--HistoryManager.hist_file=:memory:"]
    assert provenance.command_line(kernel) == "python (a Jupyter kernel: a notebook's call)"
    # names that merely hold the words, and a hub path's @revision, are left as they are
    assert "max_tokens=5" in line and "tokenizer=gpt2" in line and "hf://datasets/org/name@main" in line
    assert provenance._redact("s3://b/key=2024/part.parquet") == "s3://b/key=2024/part.parquet"  # a partition
    for secret in ("DefaultEndpointsProtocol=https;AccountName=a;AccountKey=SECRET5==;X=1", "dtype=auto,api-key=SECRET6",
                   "(token=SECRET7)", "env:HF_TOKEN=SECRET8"):  # after any character but a path's /
        assert "SECRET" not in provenance._redact(secret), secret
    # settings are redacted string by string: a secret holding a quote broke the JSON text it was redacted in
    assert provenance.redacted({"server_args": ['api-key=sk-"q"x'], "n": 3}) == {"server_args": ["api-key=***"],
                                                                                 "n": 3}


@pytest.mark.slow
def test_a_classifier_records_its_labels_encoder_and_settings(chain, minilm_path):
    classifier = chain["classifier"]
    record = json.loads((classifier / "provenance.json").read_text())
    assert record["kind"] == "classifier" and "train_classifier" not in record["command"]
    train, encoder = child(record, "train"), child(record, "encoder")
    assert train["path"] == str(chain["annotations"]) and train["fingerprint"] == sha256(chain["annotations"])
    assert train["provenance"]["kind"] == "annotations"  # the annotation record travels with the classifier
    assert child(train["provenance"], "documents")["fingerprint"] == sha256(chain["documents"])
    assert encoder["path"] == str(Path(minilm_path).absolute()) and encoder["fingerprint"].startswith("sha256:")
    assert record["settings"]["max_length"] == 64 and record["settings"]["val_fraction"] == 0.25
    metrics = json.loads((classifier / "metrics.json").read_text())
    assert metrics["training"]["data"][0] == {"role": "train", "path": str(chain["annotations"]),
                                              "fingerprint": sha256(chain["annotations"])}
    assert metrics["training"]["labels"]["prompt_versions"] == {"fineweb-edu-v1": 80}
    assert metrics["training"]["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    # the folder still loads with plain transformers
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(classifier, trust_remote_code=True)
    assert model.config.num_labels == 1


@pytest.mark.slow
def test_model_card_loads_with_metadata_metrics_and_calibration(chain):
    from huggingface_hub import ModelCard

    classifier = chain["classifier"]
    card = ModelCard.load(classifier / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-classification"
    assert data["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert data["datasets"] == ["HuggingFaceFW/fineweb-edu-llama3-annotations"]
    metrics = json.loads((classifier / "metrics.json").read_text())
    [results] = data["model-index"][0]["results"]
    spearman = next(m for m in results["metrics"] if m["type"] == "spearmanr")
    assert spearman["value"] == pytest.approx(metrics["spearman"], abs=1e-4)
    cuts = metrics["training"]["cut_points"]
    assert "| raw score at least | " + " | ".join(f"{c:.3f}" for c in cuts) + " |" in card.text
    assert "`fineweb-edu-v1` (80)" in card.text and "meta-llama/Meta-Llama-3-70B-Instruct (80)" in card.text
    assert "AutoModelForSequenceClassification.from_pretrained" in card.text
    assert f"({sha256(chain['annotations'])})" in card.text


@pytest.mark.slow
def test_a_model_card_says_the_kinds_threshold_how_its_cut_points_were_placed_and_its_weights(chain):
    """A code model's hub metrics named F1 at 3 (its decision is 4); a fine-tuned model's card said out-of-fold
    predictions placed its cut points (it has none: validation alone); weighted metrics were not said to be."""
    from huggingface_hub import ModelCard

    classifier = chain["classifier"]
    metrics = json.loads((classifier / "metrics.json").read_text())
    record = json.loads((classifier / "provenance.json").read_text())
    metrics["training"]["config"].update(kind="code", method="finetune")
    metrics["training"]["weights"] = {"field": "weight", "effective_n": 31.5, "min": 0.5, "max": 4.0}
    metrics["weighted"] = {"effective_n": 12.25}
    metrics["binary_f1_at_4"] = 0.5  # this web model's validation split may hold no 4+
    text = provenance.model_card(classifier, metrics, record)
    card = ModelCard(text)
    [results] = card.data.to_dict()["model-index"][0]["results"]
    f1 = next(m for m in results["metrics"] if m["type"] == "f1")
    assert f1["name"] == "F1 of int_score >= 4" and f1["value"] == pytest.approx(metrics["binary_f1_at_4"], abs=1e-4)
    said = " ".join(text.split())
    assert "validation predictions placed them" in said and "out-of-fold" not in said
    assert "chosen by active selection" in said and "(`weight`, 0.50-4.00; effective size 32)" in said
    assert "These metrics weigh the validation documents" in said and "(effective size 12)" in said
    del metrics["weighted"]  # a uniform --val beside an actively chosen DATA: its metrics are not weighted
    said = " ".join(provenance.model_card(classifier, metrics, record).split())
    assert "chosen by active selection" in said and "These metrics weigh" not in said
    # a fine-tune weighs its loss in full, whatever power its linear probe took
    metrics["training"]["weight_flattening"] = 0.0
    assert "the fit and the cut points weigh each by its inclusion weight" in " ".join(
        provenance.model_card(classifier, metrics, record).split())
    # the ridge head's fit takes the power cross-validation chose; the card said "weighted" for an unweighted fit
    metrics["training"]["config"]["method"] = "head"
    for power, fit in ((0.0, "the fit is unweighted"), (0.5, "the fit weighs each by its inclusion weight to the "
                                                            "power 0.5"), (1.0, "the fit and the cut points weigh")):
        metrics["training"]["weight_flattening"] = power
        said = " ".join(provenance.model_card(classifier, metrics, record).split())
        assert f"chosen by active selection: {fit}" in said, said


@pytest.mark.slow
def test_dataset_card_loads_with_stats_settings_and_licence(chain):
    from huggingface_hub import DatasetCard

    dataset, stats = chain["dataset"], chain["stats"]
    card = DatasetCard.load(dataset / "README.md")
    data = card.data.to_dict()
    assert data["license"] == "odc-by"  # the bundled FineWeb sample's licence, from data/README.md
    assert data["configs"][0]["data_files"][0]["path"] == "kept/*.parquet"
    assert data["source_datasets"] == ["HuggingFaceFW/fineweb-edu-llama3-annotations"]
    assert data["size_categories"] == ["n<1K"]
    kept = stats["kept"]
    assert f"| kept | {kept['documents']:,} |" in card.text
    assert f"| removed/below_threshold | {stats['removed']['below_threshold']['documents']:,} |" in card.text
    assert f"`int_score >= {THRESHOLD}`" in card.text
    assert f"`{chain['classifier']}`" in card.text and "near-duplicate removal" in card.text
    assert "HumanEval.jsonl.gz" in card.text
    assert "trained by `" in card.text and str(chain["annotations"]) in card.text  # the classifier's own origin


def test_dataset_card_names_per_document_licences(tmp_path):
    out = tmp_path / "code-edu"
    write_documents([{"id": "a", "text": "x", "license": "mit", "score": 4.2, "int_score": 4},
                     {"id": "b", "text": "y", "license": "apache-2.0", "score": 4.8, "int_score": 5},
                     {"id": "c", "text": "z", "license": "mit", "score": 4.1, "int_score": 4}],
                    out / "kept" / "00000.parquet")
    stats = {"in": {"documents": 3, "tokens": 3}, "kept": {"documents": 3, "tokens": 3}, "removed": {}, "failed": {},
             "adds_up": True, "settings": {"inputs": ["s3://bucket/the-stack/"], "model": "code-classifier",
                                           "threshold": 4, "dedup": True, "exact_dedup": True, "decontaminate": []}}
    provenance.write_dataset_card(out, stats)
    from huggingface_hub import DatasetCard

    card = DatasetCard.load(out / "README.md")
    assert card.data.license == "other"
    assert "per-document `license` field: mit (2), apache-2.0 (1)" in card.text
    # what was done, not "scored every document" (duplicates and failed rows of a dedup-first run never are)
    assert ("kept by edu-filter: documents scored with an educational-value classifier, `int_score >= 4` kept, "
            "exact duplicates removed, near-duplicates removed.") in " ".join(card.text.split())
    provenance.write_dataset_card(out, stats, source_license="apache-2.0", repo_id="me/code-edu")
    card = DatasetCard.load(out / "README.md")
    assert card.data.license == "apache-2.0" and 'load_dataset("me/code-edu", split="train")' in card.text


def test_credentials_in_input_urls_stay_out_of_stats_and_the_dataset_card(tmp_path):
    """stats.json and README.md go up with a pushed dataset; an input URL's password or presigned signature went
    with them (provenance.json and the command line were redacted, these two were not)."""
    from edu_filter.filters.report import build_stats

    inputs = ["https://alice:hunter2@data.example.org/dump/", "s3://b/part.jsonl?X-Amz-Signature=deadbeef&x=1"]
    (tmp_path / "counts").mkdir()
    stats = build_stats(str(tmp_path / "counts"), {"inputs": inputs, "model": "m", "threshold": 3})
    out = tmp_path / "edu"
    (out / "kept").mkdir(parents=True)
    provenance.write_dataset_card(out, {**stats, "settings": {**stats["settings"], "inputs": inputs}})  # as given
    for text in (json.dumps(stats), (out / "README.md").read_text()):
        assert "hunter2" not in text and "deadbeef" not in text
        assert "data.example.org/dump/" in text and "s3://b/part.jsonl" in text  # the inputs are still named


# --- lineage --------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_lineage_of_the_ablation_reaches_the_annotations(chain):
    tree = lineage_json(chain["ablation"])
    assert tree["kind"] == "ablation" and tree["stale"] is False and tree["path"] == str(chain["ablation"])
    dataset = child(tree, "data:edu")
    assert dataset["kind"] == "dataset" and dataset["path"] == str(chain["dataset"] / "kept")
    assert dataset["artifact"] == str(chain["dataset"]) and not dataset["stale"]
    assert dataset["fingerprint"] == provenance.fingerprint(chain["dataset"] / "kept")["fingerprint"]
    classifier = child(dataset, "classifier")
    assert classifier["kind"] == "classifier" and classifier["path"] == str(chain["classifier"])
    annotations = child(classifier, "train")
    assert annotations["kind"] == "annotations" and not annotations["stale"]
    assert annotations["fingerprint"] == lineage_json(chain["annotations"])["fingerprint"]
    assert annotations["fingerprint"] == sha256(chain["annotations"])
    documents = child(annotations, "documents")
    assert documents["kind"] == "file" and documents["inputs"] == [] and documents["fingerprint"] == sha256(
        chain["documents"])
    assert child(tree, "data:all")["kind"] == "file"
    for node in (tree, dataset, classifier, annotations, documents):
        assert set(node) >= {"kind", "path", "fingerprint", "inputs", "stale"}


@pytest.mark.slow
def test_an_edited_annotation_file_is_stale_in_the_lineage_of_the_dataset(chain):
    annotations = chain["annotations"]
    original = annotations.read_bytes()
    try:
        annotations.write_bytes(original.replace(b'"score":1', b'"score":5', 1))
        tree = provenance.lineage(chain["dataset"])
        classifier = child(tree, "classifier")
        edited = child(classifier, "train")
        assert edited["stale"] and not edited["missing"] and not classifier["stale"]
        assert edited["fingerprint"] == sha256(annotations) != edited["used_fingerprint"]
        assert [n["path"] for n in provenance.stale_nodes(tree)] == [str(annotations)]
        result = CliRunner().invoke(app, ["lineage", str(chain["dataset"])])
        assert result.exit_code == 0 and "CHANGED since used" in result.output
        assert "1 input(s) changed since they were used" in result.output
    finally:
        annotations.write_bytes(original)
    assert provenance.stale_nodes(provenance.lineage(chain["dataset"])) == []


def test_rows_added_to_an_annotation_file_after_its_record_are_told(tmp_path):
    """`cat more.jsonl >> annotations.jsonl` after `score`: the file kept its record, and lineage showed that run's
    history for rows it never wrote."""
    annotations = write_documents([{"id": "a", "text": "t", "score": 3}], tmp_path / "ann.jsonl")
    record_annotations(annotations, WEB_TRAIN)
    model = tmp_path / "model"
    model.mkdir()
    provenance.record_provenance(model, kind="classifier", settings={}, inputs={"train": annotations})
    assert not child(lineage_json(model), "train").get("record_outdated")
    assert not lineage_json(annotations).get("record_outdated")
    with annotations.open("a") as fh:
        fh.write('{"id": "b", "text": "from elsewhere", "score": 5}\n')
    assert lineage_json(annotations)["record_outdated"]
    later = tmp_path / "later"
    later.mkdir()
    provenance.record_provenance(later, kind="classifier", settings={}, inputs={"train": annotations})
    used = child(lineage_json(later), "train")
    assert used["record_outdated"] and not used["stale"] and used["inputs"]  # its history, said to be of before
    assert not child(lineage_json(model), "train").get("record_outdated")  # the first model used what was described
    result = CliRunner().invoke(app, ["lineage", str(later)], env={"COLUMNS": "300"})
    assert "changed after its record was written" in result.output


def test_a_deleted_input_is_missing_and_stale(tmp_path):
    documents = write_documents([{"id": "a", "text": "some text"}], tmp_path / "docs.jsonl")
    annotations = write_documents([{"id": "a", "text": "some text", "score": 2}], tmp_path / "ann.jsonl")
    record_annotations(annotations, documents)
    documents.unlink()
    [node] = provenance.lineage(annotations)["inputs"]
    assert node["missing"] and node["stale"] and node["fingerprint"] is None
    assert node["used_fingerprint"].startswith("sha256:")
    said = CliRunner().invoke(app, ["lineage", str(annotations)])  # said missing, not changed
    assert "1 input(s) missing" in said.output and "changed since" not in said.output, said.output


def test_a_record_found_beside_an_input_later_is_shown_only_while_the_input_is_unchanged(tmp_path):
    """An input recorded without a record of its own: a record written beside it afterwards tells its origin; but
    once the file is replaced, that record is the replacement's, and the stale node showed its history."""
    labels = write_documents([{"id": "a", "text": "old", "score": 1}], tmp_path / "labels.jsonl")
    (tmp_path / "model").mkdir()
    provenance.record_provenance(tmp_path / "model", kind="classifier", settings={}, inputs={"train": str(labels)},
                                 command="edu-filter train labels.jsonl -o model")
    provenance.record_provenance(labels, kind="annotations", settings={}, inputs={},
                                 command="edu-filter score docs.jsonl -o labels.jsonl")
    [node] = provenance.lineage(tmp_path / "model")["inputs"]
    assert not node["stale"] and node["command"] == "edu-filter score docs.jsonl -o labels.jsonl"
    write_documents([{"id": "a", "text": "new", "score": 5}], labels)
    provenance.record_provenance(labels, kind="annotations", settings={"model": "another-llm"}, inputs={},
                                 command="edu-filter score other.jsonl -o labels.jsonl --model another-llm")
    [node] = provenance.lineage(tmp_path / "model")["inputs"]
    assert node["stale"] and node.get("command") is None and node["kind"] == "file"


def test_an_input_given_as_a_glob_is_followed_and_its_changes_seen(tmp_path):
    """A quoted glob (`train 'ann/*.jsonl'`) was recorded as given, and lineage called it MISSING and changed."""
    for part, text in (("a", "one"), ("b", "two")):
        write_documents([{"id": part, "text": text, "score": 2}], tmp_path / "ann" / f"{part}.jsonl")
    (tmp_path / "model").mkdir()
    provenance.record_provenance(tmp_path / "model", kind="classifier", settings={},
                                 inputs={"train": str(tmp_path / "ann" / "*.jsonl")}, command="edu-filter train ...")
    [node] = provenance.lineage(tmp_path / "model")["inputs"]
    assert not node["missing"] and not node["stale"] and node["fingerprint"] == node["used_fingerprint"]
    write_documents([{"id": "b", "text": "edited", "score": 2}], tmp_path / "ann" / "b.jsonl")
    [node] = provenance.lineage(tmp_path / "model")["inputs"]
    assert node["stale"] and not node["missing"]
    for part in ("a", "b"):
        (tmp_path / "ann" / f"{part}.jsonl").unlink()
    [node] = provenance.lineage(tmp_path / "model")["inputs"]
    assert node["stale"] and node["missing"]


def test_a_moved_project_keeps_its_lineage(tmp_path):
    project = tmp_path / "project"
    documents = write_documents([{"id": "a", "text": "some text"}], project / "raw" / "docs.jsonl")
    annotations = write_documents([{"id": "a", "text": "some text", "score": 2}], project / "ann.jsonl")
    record_annotations(annotations, documents)
    moved = tmp_path / "elsewhere"
    project.rename(moved)
    [node] = provenance.lineage(moved / "ann.jsonl")["inputs"]
    assert node["path"] == str(moved / "raw" / "docs.jsonl") and not node["stale"] and not node["missing"]


def test_lineage_of_a_plain_file_and_of_nothing(tmp_path):
    tree = provenance.lineage(WEB_TRAIN)
    assert tree["kind"] == "file" and tree["inputs"] == [] and tree["fingerprint"] == sha256(WEB_TRAIN)
    result = CliRunner().invoke(app, ["lineage", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "no such file or folder" in result.output


# --- the hub --------------------------------------------------------------------------------------------------------
def test_push_to_hub_offline_fails_in_one_line_before_training(tmp_path):
    out = tmp_path / "model"
    result = CliRunner().invoke(app, ["train", str(WEB_TRAIN), "-o", str(out), "--push-to-hub", "me/edu-classifier"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --push-to-hub me/edu-classifier: the Hugging Face hub is "
                                                   "offline here")
    assert not out.exists()  # nothing was trained
    for bad in ("not/a/repo/id", "org/a..b", "org/x--y", "org/café", "org/-x", "me/" + "x" * 97):  # the hub's rules
        with pytest.raises(provenance.PushError, match="not a repository id ORG/NAME or NAME the hub takes"):
            provenance.check_can_push(bad)


def test_push_to_an_unreachable_hub_fails_in_one_line(tmp_path):
    port = free_port()
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "stats.json").write_text("{}")
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{port}",
           "HF_TOKEN": "hf_not_a_real_token", "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2"}
    code = ("import sys\nfrom edu_filter.provenance import PushError, push_to_hub\n"
            f"try:\n    push_to_hub({str(folder)!r}, 'me/edu', repo_type='dataset')\n"
            "except PushError as e:\n    print(e)\n    sys.exit(1)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("--push-to-hub me/edu: cannot reach the Hugging Face hub")


HUB_REFUSING_UPLOADS = """
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Hub(BaseHTTPRequestHandler):
    def answer(self):
        ok = self.path.startswith("/api/whoami")
        body = json.dumps({"name": "me", "type": "user", "auth": {"type": "access_token"}} if ok
                          else {"error": "quota exceeded"}).encode()
        self.send_response(200 if ok else 500)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_GET = do_POST = do_PUT = answer
    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Hub).serve_forever()
"""


def test_a_failed_dataset_upload_says_to_run_the_command_again_not_to_upload_the_folder(chain, tmp_path):
    """The advice was `hf upload REPO OUT`: every file of the apply output, removed/ (the documents the filter
    dropped), failed/, logs/ and work/ with it. And run_config.json, a resume record of every input's local path,
    went up with the dataset."""
    from huggingface_hub.utils import filter_repo_objects

    dataset = chain["dataset"]
    listed = [p.relative_to(dataset).as_posix() for p in dataset.rglob("*") if p.is_file()]
    assert any(f.startswith("removed/") for f in listed)
    listed += ["run_config.json", "logs/apply.log", "work/minhash/remove/000000.remove"]  # a run's others
    pushed = set(filter_repo_objects(listed, allow_patterns=provenance.PUSH_PATTERNS["dataset"]))
    assert pushed == {f for f in listed if f.startswith("kept/")} | {"README.md", "stats.json", "provenance.json"}
    port = free_port()
    hub = subprocess.Popen([sys.executable, "-c", HUB_REFUSING_UPLOADS, str(port)])
    try:
        env = {**os.environ, "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "HF_TOKEN": "hf_not_a_real_token",
               "HF_ENDPOINT": f"http://127.0.0.1:{port}", "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
        code = ("import sys\nfrom edu_filter.provenance import PushError, push_to_hub\n"
                f"try:\n    push_to_hub({str(dataset)!r}, 'me/edu', repo_type='dataset')\n"
                "except PushError as e:\n    print(e)\n    sys.exit(1)\n")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    finally:
        hub.kill()
    said = proc.stdout.strip()
    assert proc.returncode == 1 and said.startswith(f"cannot push {dataset} to me/edu"), (said, proc.stderr[-2000:])
    assert said.endswith("run the same apply command again (the finished run only uploads)") and "hf upload" not in said


# --- the ablation's own record --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_ablation_records_its_inputs_and_report_names_them(chain):
    ablation = chain["ablation"]
    record = json.loads((ablation / "provenance.json").read_text())
    assert record["kind"] == "ablation" and record["settings"]["seeds"] == 2 and record["settings"]["complete"]
    assert {e["role"] for e in record["inputs"]} == {"data:edu", "data:all"}
    report = json.loads((ablation / "report.json").read_text())
    assert report["datasets"]["edu"]["made_by"] == "dataset" and report["datasets"]["all"]["made_by"] == "file"
    assert report["datasets"]["all"]["fingerprint"] == sha256(chain["pool"])
    assert report["datasets"]["edu"]["fingerprint"] == provenance.fingerprint(chain["dataset"] / "kept")["fingerprint"]


# --- cards and fingerprints of chained and folder inputs ------------------------------------------------------------
def test_a_dataset_filtered_from_another_names_only_where_its_documents_came_from(chain, tmp_path):
    """B = apply of A/kept, A = apply of MIT code scored by a classifier trained on FineWeb (odc-by) labels: B's card
    said `license: other` and FineWeb as a source, walking into A's classifier and its training data."""
    from huggingface_hub import DatasetCard

    code = REPO / "data/code/thealgorithms_unlabelled.jsonl"
    rows = [dict(r, score=3.0, int_score=3) for r in read_documents([code], limit=3)]
    stats = {"in": {"documents": 3, "tokens": 3}, "kept": {"documents": 3, "tokens": 3}, "removed": {}, "failed": {},
             "adds_up": True, "settings": {"model": str(chain["classifier"]), "threshold": 1, "dedup": False}}
    a, b = tmp_path / "A", tmp_path / "B"
    write_documents(rows, a / "kept" / "00000.parquet")
    provenance.record_provenance(a, kind="dataset", settings=stats["settings"],
                                 inputs={"documents": [code], "classifier": chain["classifier"]})
    write_documents(rows, b / "kept" / "00000.parquet")
    provenance.record_provenance(b, kind="dataset", settings=stats["settings"],
                                 inputs={"documents": [a / "kept"], "classifier": chain["classifier"]})
    for out in (a, b):
        provenance.write_dataset_card(out, stats)
        card = DatasetCard.load(out / "README.md")
        assert card.data.license == "mit" and not card.data.source_datasets, out.name


def test_the_files_of_one_artifact_carry_its_record_once_and_lineage_finds_it_for_each(tmp_path, monkeypatch):
    """A glob of an apply output's kept files (1,000 of them) copied the output's whole record into each file's
    entry: a record of files x its size, copied again downstream (10 GB of JSON at 25k upstream files)."""
    rows = [{"id": "a", "text": "t", "score": 3.0, "int_score": 3}]
    upstream = tmp_path / "A"
    files = [write_documents(rows, upstream / "kept" / f"{i:05d}.parquet") for i in range(3)]
    provenance.record_provenance(upstream, kind="dataset", settings={"threshold": 3},
                                 inputs={"documents": [REPO / "data/code/thealgorithms_unlabelled.jsonl",
                                                       REPO / "data/code/HumanEval.jsonl.gz"]})
    entries = provenance.describe_inputs({"documents": files})
    assert [e.get("artifact") for e in entries] == [str(upstream)] * 3
    assert ["provenance" in e for e in entries] == [True, False, False]
    out = tmp_path / "B"
    out.mkdir()
    provenance.record_provenance(out, kind="dataset", settings={}, inputs={"documents": files})
    read, fingerprint = [], provenance.fingerprint
    monkeypatch.setattr(provenance, "fingerprint", lambda path, *a, **k: read.append(str(path)) or fingerprint(
        path, *a, **k))
    nodes = provenance.lineage(out)["inputs"]
    assert [n["kind"] for n in nodes] == ["dataset"] * 3
    assert len(read) == len(set(read))  # the upstream's inputs read once, not again under each of its files
    # and shown once: the tree of a glob of 1,000 kept files of an apply over 100k files held 10**8 nodes
    assert [len(n["inputs"]) for n in nodes] == [2, 0, 0]
    assert [n.get("inputs_as") for n in nodes] == [None, nodes[0]["path"], nodes[0]["path"]]
    result = CliRunner().invoke(app, ["lineage", str(out)], env={"COLUMNS": "400"})
    assert result.exit_code == 0 and result.output.count("thealgorithms_unlabelled.jsonl") == 1, result.output
    assert result.output.count(f"inputs as {nodes[0]['path']}") == 2


def test_a_card_licence_is_one_the_hub_takes(tmp_path):
    """Per-document `license` values as written (`MIT`) went into the metadata, which the hub refuses."""
    from huggingface_hub import DatasetCard

    stats = {"in": {"documents": 1, "tokens": 1}, "kept": {"documents": 1, "tokens": 1}, "removed": {}, "failed": {},
             "adds_up": True, "settings": {"inputs": ["s3://b/x/"], "model": "m", "threshold": 3}}
    for written, card_license in (("MIT", "mit"), ("Apache-2.0", "apache-2.0"), ("Proprietary (ACME)", "other")):
        out = tmp_path / written.split()[0]
        write_documents([{"id": "a", "text": "x", "license": written, "score": 4.0, "int_score": 4}],
                        out / "kept" / "00000.parquet")
        provenance.write_dataset_card(out, stats)
        card = DatasetCard.load(out / "README.md")
        assert card.data.license == card_license and written in card.text


def test_a_document_folder_is_fingerprinted_by_the_files_the_readers_take(tmp_path):
    """A model trained into the labels folder (or any notes beside the data) flagged the labels as changed in the
    lineage of that very model."""
    labels = tmp_path / "labels"
    write_documents([{"id": "a", "text": "x", "score": 3}], labels / "part-0.jsonl")
    artifact = tmp_path / "model"
    artifact.mkdir()
    provenance.record_provenance(artifact, kind="classifier", settings={}, inputs={"train": labels})
    before = provenance.fingerprint(labels, documents=True)
    (labels / "model").mkdir()
    (labels / "model" / "model.bin").write_bytes(b"weights")
    (labels / "NOTES.txt").write_text("labelled in May")
    assert provenance.fingerprint(labels, documents=True) == before
    assert provenance.fingerprint(labels) != before  # a model folder: every file counts
    assert not lineage_json(artifact)["inputs"][0]["stale"]
    write_documents([{"id": "a", "text": "edited", "score": 3}], labels / "part-0.jsonl")
    assert lineage_json(artifact)["inputs"][0]["stale"]
    # a record made when every file of the folder counted still reads as unchanged
    record = json.loads((artifact / "provenance.json").read_text())
    record["inputs"][0]["fingerprint"] = provenance.fingerprint(labels)["fingerprint"]
    (artifact / "provenance.json").write_text(json.dumps(record))
    assert not lineage_json(artifact)["inputs"][0]["stale"]


def test_the_parts_of_a_sampled_folder_are_sampled_too_and_their_lineage_is_not_stale(tmp_path, monkeypatch):
    """A folder of `score` outputs over the full-hash limit was sampled, but each part with a record of its own,
    under the limit alone, was hashed in full: 1,000 shards of 200 MB read whole at every train, apply and lineage."""
    monkeypatch.setattr(provenance, "FULL_HASH_MAX_BYTES", 2000)  # what 256 MiB does for real folders
    folder = tmp_path / "ann"
    for k in range(3):
        part = write_documents([{"id": f"d{k}", "text": "x" * 900, "score": 3}], folder / f"part-{k}.jsonl")
        record_annotations(part, WEB_TRAIN)
    entry = provenance.describe_input("train", folder)
    assert entry["fingerprint"].startswith("sampled:")
    assert [e["fingerprint"].split(":")[0] for e in entry["provenance"]["inputs"]] == ["sampled"] * 3
    artifact = tmp_path / "model"
    artifact.mkdir()
    provenance.record_provenance(artifact, kind="classifier", settings={}, inputs={"train": folder})
    [node] = lineage_json(artifact)["inputs"]
    assert not node["stale"] and [n["stale"] for n in node["inputs"]] == [False] * 3
    write_documents([{"id": "d1", "text": "y" * 900, "score": 3}], folder / "part-1.jsonl")  # then one is rewritten
    [node] = lineage_json(artifact)["inputs"]
    assert node["stale"] and [n["stale"] for n in node["inputs"]] == [False, True, False]


def test_a_folder_of_annotation_files_carries_their_records(tmp_path):
    """`train ann/` on a folder of `score` outputs, each with its sidecar record: the lineage stopped at the folder
    (no annotator, prompt or source documents), while the same files named one by one showed them."""
    folder = tmp_path / "ann"
    for k in range(2):
        part = write_documents([{"id": f"d{k}", "text": "x", "score": 3}], folder / f"part-{k}.jsonl")
        record_annotations(part, WEB_TRAIN)
    entry = provenance.describe_input("train", folder)
    assert entry["provenance"]["kind"] == "folder"
    assert [e["provenance"]["kind"] for e in entry["provenance"]["inputs"]] == ["annotations", "annotations"]
    assert provenance.source_datasets([entry]) == ["HuggingFaceFW/fineweb-edu-llama3-annotations"]
    artifact = tmp_path / "model"
    artifact.mkdir()
    provenance.record_provenance(artifact, kind="classifier", settings={}, inputs={"train": folder})
    [node] = lineage_json(artifact)["inputs"]
    assert node["kind"] == "folder" and [n["kind"] for n in node["inputs"]] == ["annotations", "annotations"]
    assert all(child(n, "documents")["path"] == str(WEB_TRAIN) for n in node["inputs"])
    for broken in (b"{not json", b"caf\xe9", b"[]", b'"a string"'):  # unreadable sidecars, or not records
        provenance.provenance_path(folder / "part-1.jsonl").write_bytes(broken)
        assert [e["path"] for e in provenance.describe_input("train", folder)["provenance"]["inputs"]] == [
            str(folder / "part-0.jsonl")], broken


def test_another_tools_provenance_json_above_an_input_is_not_ours_to_judge(tmp_path):
    """A `provenance.json` of another pipeline two folders up (a JSON list, not JSON at all) failed every recording
    command on every input below it; an input's own unreadable record is still an error."""
    corpus = tmp_path / "corpus"
    part = write_documents([{"id": "a", "text": "t"}], corpus / "2024" / "part.jsonl")
    for other in (b'[{"step": "crawl"}]', b"{not json", b"caf\xe9"):
        (corpus / "provenance.json").write_bytes(other)
        entry = provenance.describe_input("train", part)
        assert "provenance" not in entry and entry["fingerprint"].startswith("sha256:")
    provenance.provenance_path(part).write_text("[]")
    with pytest.raises(provenance.ProvenanceError, match="not a provenance record"):
        provenance.describe_input("train", part)


@pytest.mark.parametrize("n, category", [(999, "n<1K"), (1_300_000_000, "1B<n<10B"), (22 * 10**9, "10B<n<100B"),
                                         (2 * 10**12, "n>1T")])
def test_dataset_size_categories_are_the_hubs(n, category):
    """FineWeb-Edu's 1.3B documents were `n>1B`, which is not one of the hub's categories."""
    assert provenance._size_category(n) == category


def test_lineage_finds_a_moved_projects_inputs_below_one_of_its_artifacts_that_was_deleted(tmp_path):
    """A project moved (copied elsewhere, the old place removed) and its classifier folder deleted: its inputs,
    present in the new place, read as missing and changed, looked for below the classifier's old place (and below
    that place's parent, a deleted folder not being a folder)."""
    import shutil

    project = tmp_path / "proj"
    project.mkdir()
    labels = write_documents([{"id": "a", "text": "t", "score": 3}], project / "labels.jsonl")
    provenance.record_provenance(labels, kind="annotations", settings={}, inputs={})
    (project / "clf").mkdir()
    (project / "clf" / "config.json").write_text("{}")
    provenance.record_provenance(project / "clf", kind="classifier", settings={}, inputs={"train": str(labels)})
    (project / "out").mkdir()
    provenance.record_provenance(project / "out", kind="dataset", settings={},
                                 inputs={"classifier": str(project / "clf")})
    moved = tmp_path / "moved"
    shutil.copytree(project, moved)
    shutil.rmtree(project)
    shutil.rmtree(moved / "clf")
    [classifier] = provenance.lineage(moved / "out")["inputs"]
    assert classifier["missing"] and classifier["path"] == str(moved / "clf")
    [train] = classifier["inputs"]
    assert train["path"] == str(moved / "labels.jsonl") and not train["missing"] and not train["stale"]
