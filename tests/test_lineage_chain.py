"""The whole chain through the command line: score (against the local OpenAI-compatible test server) -> train ->
apply -> ablate --seeds 2, then `edu-filter lineage` from the ablation back to the annotations, the hub cards, and
staleness after the annotation file is edited."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edu_filter.cli import app
from edu_filter.documents import read_documents, write_documents

sys.path.insert(0, str(Path(__file__).parent))
from micro_ablation import MICRO_ABLATION  # noqa: E402
from llm_test_server import LLMTestServer, directive  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WEB_TRAIN = REPO / "data/web/fineweb_edu_llama3_train.jsonl"
WEB_VAL = REPO / "data/web/fineweb_edu_llama3_val.jsonl"
MICRO = ["--tokens", "1024", *MICRO_ABLATION]

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]


def invoke(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def lineage(path: Path) -> dict:
    return json.loads(invoke("lineage", str(path), "--json"))


def child(node: dict, kind: str) -> dict:
    [found] = [n for n in node["inputs"] if n["kind"] == kind]
    return found


@pytest.fixture(scope="module")
def chain(tmp_path_factory, minilm_path, embedding_cache_dir):
    root = tmp_path_factory.mktemp("lineage-chain")
    # documents whose text tells the test server which score to answer: the bundled Llama-3 label
    labelled = read_documents([WEB_TRAIN], label_field="score", limit=80)
    documents = write_documents(
        [{"id": r["id"], "text": f"{r['text']} {directive(r['id'], score=int(r['label']))}"} for r in labelled],
        root / "documents.jsonl")
    pool = write_documents(read_documents([WEB_VAL], limit=150), root / "pool.jsonl")
    annotations, classifier, dataset, ablation = (root / "annotations.jsonl", root / "classifier", root / "dataset",
                                                  root / "ablation")
    server = LLMTestServer().start()
    try:
        invoke("score", str(documents), "-o", str(annotations), "--backend", "openai", "--base-url", server.base_url,
               "--model", "test-model", "--concurrency", "4")
    finally:
        server.stop()
    invoke("train", str(annotations), "-o", str(classifier), "--encoder", minilm_path, "--max-length", "64",
           "--cache-dir", str(embedding_cache_dir))
    invoke("apply", str(pool), "-o", str(dataset), "--model", str(classifier), "--keep-top", "0.5", "--no-dedup")
    invoke("ablate", "--data", f"edu={dataset / 'kept'}", "--data", f"all={pool}", "--seeds", "2", *MICRO,
           "-o", str(ablation))
    return {"documents": documents, "annotations": annotations, "classifier": classifier, "dataset": dataset,
            "ablation": ablation, "pool": pool}


def test_lineage_goes_from_the_ablation_to_the_annotations(chain):
    tree = lineage(chain["ablation"])
    assert tree["kind"] == "ablation"
    dataset = child(tree, "dataset")
    classifier = child(dataset, "classifier")
    annotations = child(classifier, "annotations")
    assert dataset["path"] == str(chain["dataset"] / "kept")
    assert classifier["path"] == str(chain["classifier"]) and annotations["path"] == str(chain["annotations"])
    assert annotations["fingerprint"] == lineage(chain["annotations"])["fingerprint"]
    assert any(n["path"] == str(chain["documents"]) for n in annotations["inputs"])
    assert not any(n["stale"] for n in (dataset, classifier, annotations))


def test_both_cards_load_with_metadata(chain):
    from huggingface_hub import DatasetCard, ModelCard

    model_card = ModelCard.load(chain["classifier"] / "README.md")
    dataset_card = DatasetCard.load(chain["dataset"] / "README.md")
    assert model_card.data.to_dict() and model_card.data.library_name == "transformers"
    assert dataset_card.data.to_dict() and dataset_card.data.to_dict()["configs"]


def test_the_ablation_report_has_two_seeds_per_run_and_a_verdict(chain):
    report = json.loads((chain["ablation"] / "report.json").read_text())
    for run in report["runs"].values():
        assert len(run["seeds"]) == 2
    assert isinstance(report["comparison"]["significant"], bool)


def test_an_edited_annotation_file_is_stale_in_the_dataset_lineage(chain):
    annotations = chain["annotations"]
    original = annotations.read_bytes()
    try:
        annotations.write_bytes(original + original.splitlines(keepends=True)[0])
        tree = lineage(chain["dataset"])
        edited = child(child(tree, "classifier"), "annotations")
        assert edited["stale"] is True
    finally:
        annotations.write_bytes(original)
