"""Multiple-choice cloze scoring: log-likelihoods are right, and a model that learned the facts picks them."""

import json

import pytest
import torch
import torch.nn.functional as F

from edu_filter.documents import DocumentError
from edu_filter.ablate.cloze import choice_loglikelihoods, load_cloze, score_cloze
from edu_filter.ablate.packing import write_tokens
from edu_filter.ablate.pretrain import PretrainConfig, pretrain
from edu_filter.ablate.tokenizer import train_tokenizer

FACTS = [
    "the cat sat on the mat.",
    "the dog ran in the park.",
    "the bird sang in the tree.",
    "the fish swam in the lake.",
]
QUESTIONS = [
    {"context": "the cat sat on the", "choices": [" mat", " lake"], "gold": 0},
    {"context": "the dog ran in the", "choices": [" tree", " park"], "gold": 1},
    {"context": "the bird sang in the", "choices": [" tree", " mat"], "gold": 0},
    {"context": "the fish swam in the", "choices": [" park", " lake"], "gold": 1},
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A micro llama trained on the facts until it knows them."""
    root = tmp_path_factory.mktemp("facts")
    tok = train_tokenizer(FACTS * 50, 300)
    docs = [" ".join(FACTS[i % 4 :] + FACTS[: i % 4]) for i in range(400)]
    # 4 distinct documents: a held-out slice picked by a hash of the text could hold none of them, so split by hand
    write_tokens([d for i, d in enumerate(docs) if i % 20], tok, root / "tokens/train.bin", 40_000)
    write_tokens(docs[::20], tok, root / "tokens/val.bin", 40_000)
    cfg = PretrainConfig.from_preset("tiny", {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "max_position_embeddings": 32, "micro_batch_size": 8, "batch_tokens": 256,
        "eval_tokens": 256, "lr": 1e-2}, tokens=256 * 40)
    pretrain(cfg, root / "tokens/train.bin", {"val": root / "tokens/val.bin"}, root / "run", tok)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(root / "run/model"), tok


def test_loglikelihood_is_the_sum_over_the_choice_tokens(trained):
    model, tok = trained
    context, choices = "the dog ran in the", [" park", " tree by the lake"]
    scores = choice_loglikelihoods(model, tok, context, choices)
    for choice, score in zip(choices, scores):
        ctx, cont = tok(context).input_ids, tok(choice).input_ids
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logprobs = F.log_softmax(model(input_ids=ids[:, :-1]).logits[0], dim=-1)
        expected = sum(logprobs[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))
        assert score == pytest.approx(expected, abs=1e-4)


def test_a_context_ending_in_a_space_is_split_as_lm_evaluation_harness_splits_it(trained):
    """ "the cat sat on the " + "mat": tokenized apart the space was a token of its own (a split the BPE never
    trains on) and never scored; its trailing whitespace goes to the choice, tokenized with the context."""
    from edu_filter.ablate.cloze import encode_pair

    model, tok = trained
    ctx, cont = encode_pair(tok, "the cat sat on the ", "mat")
    assert (ctx, cont) == (tok("the cat sat on the").input_ids, tok(" mat").input_ids)
    assert choice_loglikelihoods(model, tok, "the cat sat on the ", ["mat", "lake"]) == pytest.approx(
        choice_loglikelihoods(model, tok, "the cat sat on the", [" mat", " lake"]))
    assert encode_pair(tok, "", " mat") == ([tok.eos_token_id], tok(" mat").input_ids)
    # no space between, the choice merged into the context's last token: nothing after the context's tokens to score,
    # and the evaluation crashed after the training; the context is cut back to where the tokenizations agree
    whole, ctx = tok("the cat sat on the mat").input_ids, tok("the cat sat on the m").input_ids
    assert len(whole) <= len(ctx)
    short, cont = encode_pair(tok, "the cat sat on the m", "at")
    assert cont and short + cont == whole and short == ctx[:len(short)]
    scores = choice_loglikelihoods(model, tok, "the cat sat on the m", ["at", "ouse"])
    assert len(scores) == 2 and all(s < 0 for s in scores)


def test_a_model_that_learned_the_facts_answers_them(trained, tmp_path):
    model, tok = trained
    path = tmp_path / "facts.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    result = score_cloze(model, tok, load_cloze(path))
    assert result == {"acc": 1.0, "acc_norm": 1.0, "questions": 4}
    flipped = [{**q, "gold": 1 - q["gold"]} for q in QUESTIONS]
    assert score_cloze(model, tok, flipped)["acc"] == 0.0


def test_acc_norm_divides_by_choice_length(trained):
    model, tok = trained
    q = {"context": "the cat sat on the", "choices": [" mat.", " mat. the dog ran in the park."], "gold": 1}
    lls = choice_loglikelihoods(model, tok, q["context"], q["choices"])
    result = score_cloze(model, tok, [q])
    assert result["acc"] == float(lls[1] > lls[0])
    assert result["acc_norm"] == float(lls[1] / len(q["choices"][1].lstrip()) > lls[0] / len(q["choices"][0].lstrip()))


def test_acc_norm_counts_a_choice_without_the_space_before_it(trained):
    """lm-evaluation-harness divides by the choice's length without its delimiter: the same question written with
    the space in the choice or at the end of the context scores the same (counted, short answers gained)."""
    model, tok = trained
    words = ["mat", "lake", "tree", "park", "mat.", "lake by the tree", "the park", "in"]
    questions = [{"context": f"the {subject} in the", "choices": [f" {a}", f" {b}"], "gold": 0}
                 for subject in ("cat sat", "dog ran", "fish swam") for a in words for b in words if a != b]
    spaced = [{**q, "context": q["context"] + " ", "choices": [c.lstrip() for c in q["choices"]]} for q in questions]
    expected = 0
    for q in questions:
        lls = choice_loglikelihoods(model, tok, q["context"], q["choices"])
        expected += lls[0] / len(q["choices"][0].lstrip()) > lls[1] / len(q["choices"][1].lstrip())
    assert score_cloze(model, tok, questions)["acc_norm"] == expected / len(questions)
    assert score_cloze(model, tok, spaced)["acc_norm"] == expected / len(questions)


def test_contexts_longer_than_the_model_are_cut_from_the_left(trained):
    model, tok = trained
    long_context = " ".join(FACTS * 10) + " the cat sat on the"
    assert len(tok(long_context).input_ids) > model.config.max_position_embeddings
    scores = choice_loglikelihoods(model, tok, long_context, [" mat", " lake"])
    assert scores[0] > scores[1]


def test_bad_rows_name_file_and_line(tmp_path):
    bad = tmp_path / "bench.jsonl"
    bad.write_text(json.dumps(QUESTIONS[0]) + "\n" + json.dumps({"context": "x", "choices": [" a", " b"], "gold": 2}))
    with pytest.raises(DocumentError, match=r"bench\.jsonl:2: 'gold' must be an index"):
        load_cloze(bad)
    bad.write_text(json.dumps({"context": "x", "choices": " a"}) + "\n")
    with pytest.raises(DocumentError, match=r"bench\.jsonl:1: 'choices' must be a list"):
        load_cloze(bad)
