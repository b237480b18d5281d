"""Multiple-choice cloze scoring by log-likelihood, the way lm-evaluation-harness scores ARC, HellaSwag or MMLU.

Benchmark files are JSONL, one question a line:

    {"context": "The Sun is a", "choices": [" star", " planet", " moon"], "gold": 0}

Each choice is scored by the summed log-probability of its tokens after the context, the pair split into tokens
as lm-evaluation-harness splits it (`encode_pair`). `acc` picks the choice with
the highest sum; `acc_norm` divides each sum by the choice's length in characters first, so long answers are not
penalised for having more tokens: its length without the space before it, as lm-evaluation-harness counts it
(which keeps that delimiter apart from the choice), so " star" after "a" and "star" after "a " score the same.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from edu_filter.documents import DocumentError, expand_paths, iter_raw_rows


def load_cloze(path: str | Path) -> list[dict]:
    """Questions with `context` (str), `choices` (list of str) and `gold` (index); bad rows name file and line."""
    questions = []
    for file in expand_paths([path]):
        for lineno, row in iter_raw_rows(file):
            context, choices, gold = row.get("context"), row.get("choices"), row.get("gold")
            if not isinstance(context, str):
                raise DocumentError(f"{file}:{lineno}: 'context' must be a string")
            if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)):
                raise DocumentError(f"{file}:{lineno}: 'choices' must be a list of at least two non-empty strings")
            if not (isinstance(gold, int) and 0 <= gold < len(choices)):
                raise DocumentError(f"{file}:{lineno}: 'gold' must be an index into 'choices', got {gold!r}")
            questions.append({"context": context, "choices": choices, "gold": gold})
    if not questions:
        raise DocumentError(f"{path}: no questions")
    return questions


def encode_pair(tokenizer, context: str, choice: str) -> tuple[list[int], list[int]]:
    """The context's tokens and the choice's, as lm-evaluation-harness's `_encode_pair` makes them: the context's
    trailing whitespace moved to the choice, the choice's tokens those of context + choice after the context's.
    Tokenized apart, "Answer: " + "a" became [..., ':', ' ', 'a'], a split a byte-level BPE never trains on (it
    joins the space to the word), and the space was never scored. An empty context is the end-of-text token."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, choice = context[:-spaces], context[-spaces:] + choice
    ctx = tokenizer(context, add_special_tokens=False).input_ids
    if not ctx:
        return [tokenizer.eos_token_id], tokenizer(choice, add_special_tokens=False).input_ids
    whole = tokenizer(context + choice, add_special_tokens=False).input_ids
    if len(whole) > len(ctx):
        return ctx, whole[len(ctx):]
    # the choice merged into the context's last token ("the m" + "at": [..., ' mat']): nothing after the context's
    # tokens to score; the context is cut back to where both tokenizations agree and the rest scored as the choice
    agree = next((i for i, (a, b) in enumerate(zip(ctx, whole)) if a != b), min(len(ctx), len(whole)))
    return whole[:agree] or [tokenizer.eos_token_id], whole[agree:]


@torch.no_grad()
def choice_loglikelihoods(model, tokenizer, context: str, choices: list[str]) -> list[float]:
    """Summed log-probability of each choice's tokens given the context (left-truncated to the model's context)."""
    max_len = model.config.max_position_embeddings
    device = next(model.parameters()).device
    rows, n_choice = [], []
    for choice in choices:
        ctx, cont = encode_pair(tokenizer, context, choice)
        seq = (ctx + cont)[-(max_len + 1):]
        rows.append(seq)
        n_choice.append(min(len(cont), len(seq) - 1))
    width = max(len(s) for s in rows) - 1
    inputs = torch.full((len(rows), width), tokenizer.eos_token_id, dtype=torch.long)
    for i, seq in enumerate(rows):
        inputs[i, : len(seq) - 1] = torch.tensor(seq[:-1])
    logprobs = F.log_softmax(model(input_ids=inputs.to(device)).logits.float(), dim=-1)
    scores = []
    for i, (seq, n) in enumerate(zip(rows, n_choice)):
        targets = torch.tensor(seq[-n:], device=device)
        positions = torch.arange(len(seq) - 1 - n, len(seq) - 1, device=device)
        scores.append(logprobs[i, positions, targets].sum().item())
    return scores


def choice_length(choice: str) -> int:
    """The characters `acc_norm` divides by: the choice without the whitespace that separates it from the context
    (counted, one character more for every choice, it favoured short answers against the harness's figures)."""
    return max(1, len(choice.lstrip()))


def score_cloze(model, tokenizer, questions: list[dict]) -> dict:
    """acc and acc_norm over the questions."""
    model.eval()
    correct = correct_norm = 0
    for q in questions:
        lls = choice_loglikelihoods(model, tokenizer, q["context"], q["choices"])
        normed = [ll / choice_length(c) for ll, c in zip(lls, q["choices"])]
        correct += max(range(len(lls)), key=lls.__getitem__) == q["gold"]
        correct_norm += max(range(len(normed)), key=normed.__getitem__) == q["gold"]
    return {"acc": correct / len(questions), "acc_norm": correct_norm / len(questions), "questions": len(questions)}
