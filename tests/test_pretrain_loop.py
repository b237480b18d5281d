"""The pretraining loop on a micro llama: it learns, resumes exactly, and reports what it did."""

import json
from pathlib import Path

import pytest
import torch

from edu_filter.ablate.packing import iter_texts, write_tokens, write_train_val
from edu_filter.ablate.pretrain import PretrainConfig, flops_per_token, pretrain
from edu_filter.ablate.tokenizer import mixed_sample, train_tokenizer

REPO = Path(__file__).resolve().parents[1]
WEB = REPO / "data/web/fineweb_edu_llama3_train.jsonl"
MICRO = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 1, "max_position_embeddings": 64, "micro_batch_size": 4, "batch_tokens": 512,
         "eval_tokens": 1024, "lr": 1e-2}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    tok = train_tokenizer(mixed_sample([iter_texts(str(WEB))], 300_000), 384)
    write_train_val(iter_texts(str(WEB)), tok, root / "web", train_tokens=20_000, val_fraction=0.1, max_val_tokens=2000)
    write_tokens(iter_texts(str(REPO / "data/web/fineweb_edu_llama3_val.jsonl")), tok, root / "ref.bin", 2000)
    return tok, root


def run(corpus, out, **overrides):
    tok, root = corpus
    cfg = PretrainConfig.from_preset("tiny", {**MICRO, **overrides}, tokens=512 * 12, vocab_size=384)
    return pretrain(cfg, root / "web/train.bin", {"web/val": root / "web/val.bin", "ref": root / "ref.bin"}, out, tok)


def test_loss_falls_and_the_run_record_is_complete(corpus, tmp_path):
    r = run(corpus, tmp_path / "run")
    assert r["finished"] and r["steps"] == 12 and r["tokens_seen"] == 12 * 512
    assert len(r["train_loss"]) == 12 and len(r["lr"]) == 12
    assert r["train_loss"][-1] < r["train_loss"][0] - 0.5
    assert set(r["eval"]) == {"web/val", "ref"}
    first, last = r["eval_history"][0], r["eval_history"][-1]
    assert [e["step"] for e in r["eval_history"]] == [3, 6, 9, 12]
    assert last["ref"] < first["ref"]
    assert r["mfu"] is None and r["device"] == "cpu" and r["precision"] == "fp32"
    assert r["tokens_per_second"] > 0 and r["params"] > 0
    saved = json.loads((tmp_path / "run/run.json").read_text())
    assert saved["train_loss"] == r["train_loss"]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run/model")
    tok = AutoTokenizer.from_pretrained(tmp_path / "run/model")
    assert model.config.vocab_size == 384 and tok.eos_token_id == model.config.eos_token_id
    assert r["flops_per_token"] == flops_per_token(model, 64)


def test_interrupted_runs_resume_to_the_same_result(corpus, tmp_path):
    whole = run(corpus, tmp_path / "whole")
    parts = []
    for _ in range(20):  # a time limit this small stops every invocation after one step, checkpointed
        r = run(corpus, tmp_path / "split", time_limit_minutes=1e-9)
        parts.append(r["steps"])
        if r["finished"]:
            break
    assert parts == list(range(1, 13))
    assert r["tokens_seen"] == whole["tokens_seen"]
    assert r["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-5)
    assert r["eval"] == pytest.approx(whole["eval"], rel=1e-5)
    from transformers import AutoModelForCausalLM

    wa = AutoModelForCausalLM.from_pretrained(tmp_path / "whole/model").state_dict()
    wb = AutoModelForCausalLM.from_pretrained(tmp_path / "split/model").state_dict()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_resume_refuses_a_checkpoint_from_another_configuration(corpus, tmp_path):
    run(corpus, tmp_path / "r", time_limit_minutes=1e-9)
    with pytest.raises(ValueError, match="different configuration"):
        run(corpus, tmp_path / "r", lr=5e-3)


def test_bf16_autocast_path_runs_and_learns_on_cpu(corpus, tmp_path):
    r = run(corpus, tmp_path / "bf16", dtype="bf16", schedule="cosine")
    assert r["precision"] == "bf16-autocast"
    assert r["train_loss"][-1] < r["train_loss"][0] - 0.5


def test_batch_that_does_not_split_into_micro_batches_is_refused(corpus, tmp_path):
    with pytest.raises(ValueError, match="not a multiple of micro_batch_size"):
        run(corpus, tmp_path / "x", batch_tokens=500)
