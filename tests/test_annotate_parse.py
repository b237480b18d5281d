"""Score parsing on real LLM answers and odd formats; the versioned prompts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from edu_filter.annotate.parse import parse_score
from edu_filter.annotate.prompts import PromptError, load_prompt

DATA = Path(__file__).resolve().parents[1] / "data"


def _rows(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


@pytest.mark.parametrize(
    "path, expected_rows",
    [("web/fineweb_edu_llama33_responses.jsonl", 150), ("code/python_edu_labels.jsonl", 561)],
)
def test_parser_recovers_every_real_llama_score(path, expected_rows):
    rows = _rows(DATA / path)
    assert len(rows) == expected_rows
    wrong = [(r["id"], r["score"], parse_score(r["response"])) for r in rows if parse_score(r["response"]) != (r["score"], None)]
    assert wrong == []
    # the real answers cover several scores, so a parser stuck on one value could not pass
    assert len({r["score"] for r in rows}) >= 3


@pytest.mark.parametrize(
    "response, score",
    [
        ("The extract is a tutorial.\n\nEducational score: 3", 3),
        ("Justification...\n\n**Educational score:** 4", 4),
        ("**Educational score: 2**", 2),
        ("Educational Score: 3/5", 3),
        ("educational score: 5 / 5", 5),
        ("Educational score: 1 out of 5", 1),
        ("Educational score: **0**", 0),
        ("Educational score: [2]", 2),
        # the prompt's "<total points>" placeholder kept by a small model, a quoted or code-formatted score, a
        # non-breaking space: re-asked (paid again), or lost at temperature 0
        ("Educational score: <3>", 3),
        ("Educational score: `3`", 3),
        ('Educational score: "3"', 3),
        ("Educational score:\u00a03", 3),
        ("Educational score:\n\n4.", 4),
        ("Educational score: 4.0", 4),
        ("Educational score: 3\n\nI hope this helps! Let me know if you have questions.", 3),
        ("Educational score: 3 points, mostly for the worked example.", 3),
        ("Educational Score: 4/5 points", 4),
        ("Educational score: 3 (out of 5)", 3),
        ("Educational score: 4 — a solid lesson", 4),
        ("Educational score: 2\n\nTo summarise: **Educational score: 2**", 2),  # the same score repeated
        ("**Educational score:**\n**3**", 3),  # alone on the next line
        ("Educational score:\n1. basic information\n2. coherent\n\nEducational score: 2", 2),  # a heading, then 2
        # a bracketed qualifier before the colon: its number was read as the score (5)
        ("Educational score (5-point scale): 2", 2),
        ("**Educational score (5-point additive scale):** 3", 3),
        ("Educational score [5-point scale]: 1", 1),
        ("Educational score (0-5): 3", 3),
        ("Educational score (out of 5): 4", 4),
        ("Educational score (3)", 3),
        ("Educational score: 3 - a clear, structured lesson", 3),
        ("Educational score: 3—the extract is useful but basic.", 3),  # a dash joined to a word: a hyphen only
        ("Educational score: 4–strong", 4),
        ("Educational score: 3/5—good", 3),
        ("Educational score: 3 points—good", 3),
        ("Educational score: 3 — Points awarded: relevance, coherence, exercises.", 3),  # not joined to the dash
        # a reasoning model's thinking left in the answer: its trial scores made the answer ambiguous
        ("<think>\nThe extract is basic: educational score: 2 seems low, it has exercises.\n</think>\n\n"
         "The extract is a coherent lesson with exercises.\nEducational score: 3", 3),
        ("It lists facts; maybe Educational score: 1?\n</think>\nEducational score: 2", 2),  # the template opened it
    ],
)
def test_parser_accepts_what_models_really_write(response, score):
    assert parse_score(response) == (score, None)


@pytest.mark.parametrize(
    "response, reason",
    [
        (None, "empty"),
        ("   ", "empty"),
        ("I cannot evaluate this extract.", "no 'Educational score"),
        ('Conclude with the score using the format: "Educational score: <total points>"', "no 'Educational score"),
        ("Score: 3", "no 'Educational score"),
        ("Educational score: 3.5", "not a whole number"),
        ("Educational score: 7", "outside 0-5"),
        ("Educational score: -1", "outside 0-5"),
        ("Educational score: 8/10", "out of 10"),
        ("Educational score: 3\n\nOn reflection, Educational score: 9", "outside 0-5"),
        ("Educational score: 3 (out of 10)", "out of 10"),
        # a heading over a list: its first item's number is no score (it gave 1)
        ("Educational score:\n1. The extract provides basic information.\n2. It is coherent.\n\nTotal: 3 points",
         "no 'Educational score"),
        ("**Educational score:**\n* 1 point: basic information\n* 1 point: coherent\n\nTotal score: 2",
         "no 'Educational score"),
        ("<think>\nEducational score: 3 looks right, but let me check the rubric", "ends inside its reasoning"),
        ("<think>Educational score: 3 maybe</think>\nI cannot evaluate this.", "no 'Educational score"),
    ],
)
def test_parser_never_guesses(response, reason):
    score, error = parse_score(response)
    assert score is None
    assert error.startswith("unparseable: ") and reason in error


@pytest.mark.parametrize(
    "response, reason",
    [
        # SmolLM2-135M-Instruct's answer through a llama.cpp server: taking the first number after the colon gave 3
        ("Educational score: 20 - 15 = 3 points\nEducational score: 3 + 4 = 7 points",
         "arithmetic after the score ('Educational score: 20 - 15 = 3 points')"),
        ("Educational score: 1+1+1 = 3", "arithmetic"),
        ("Educational score: 2 + 1\n\nEducational score: 3", "arithmetic"),
        ("At first I'd say Educational score: 2, but the exercises push it up.\n\nEducational score: 3",
         "conflicting scores 2, 3"),
        ("Educational score: 5 ... wait, too generous.\n**Educational score:** 1", "conflicting scores 1, 5"),
        ("Educational score: 3 because it has exercises", "does not end its statement"),
        ("Educational score: 3 out of a possible 5", "does not end its statement"),
        # the first point of a sum, not the score (it gave 1)
        ("Educational score: 1-point (basic info) + 1-point (coherence) = 2", "does not end its statement"),
        ("Educational score: 1–point (basic info) + 1–point (coherent) = 2", "does not end its statement"),
        ("Educational score: 1 – point for basic info + 1 – point = 2", "does not end its statement"),
        ("Educational score: 1 — pt for basic + 1 pt = 2", "does not end its statement"),
        ("Educational score (5-point scale)", "does not end its statement"),
    ],
)
def test_parser_calls_arithmetic_and_conflicting_scores_ambiguous(response, reason):
    score, error = parse_score(response)
    assert score is None
    assert error.startswith("ambiguous: ") and reason in error


def test_a_degenerate_answer_is_read_in_linear_time():
    """An answer of thousands of spaces or asterisks after the colon (a looping model) made the pattern backtrack
    quadratically: 17 s for 32,000 characters, on the event loop every other request waits on."""
    import time

    for filler in (" ", "*", "\n ", "_ "):
        started = time.perf_counter()
        assert parse_score("Educational score:" + filler * 50_000 + "x")[0] is None
        assert time.perf_counter() - started < 5.0, repr(filler)  # a hang guard (the old pattern: ~40 s), not a speed claim


def test_bundled_prompts_keep_the_original_rubrics():
    web = load_prompt("web")
    assert web.version == "fineweb-edu-v1" == load_prompt("fineweb-edu-v1").version
    assert web.template.startswith(
        "Below is an extract from a web page. Evaluate whether the page has a high educational value and could be "
        "useful in an educational setting for teaching from primary school to grade school levels using the additive "
        "5-point scoring system described below."
    )
    code = load_prompt("code")
    assert code.version == "python-edu-v1"
    assert code.template.startswith(
        "Below is an extract from a Python program. Evaluate whether it has a high educational value and could help "
        "teach coding."
    )
    for prompt in (web, code):
        assert "\nThe extract:\n{extract}\n" in prompt.template
        assert "- Briefly justify your total score, up to 100 words." in prompt.template
        assert prompt.template.rstrip().endswith('- Conclude with the score using the format: "Educational score: <total points>"')
        assert prompt.template.count("point") >= 5  # the five additive criteria


def test_render_truncates_explicitly_and_keeps_braces():
    prompt = load_prompt("web")
    text = "def f(x): return {'a': x}  " * 10
    full, truncated = prompt.render(text)
    assert not truncated and text in full
    cut, truncated = prompt.render(text, max_chars=20)
    assert truncated and text[:20] in cut and text[:21] not in cut
    assert prompt.render(text, max_chars=len(text)) == (full, False)


def test_custom_prompt_file_gets_a_content_versioned_id(tmp_path):
    path = tmp_path / "strict.txt"
    path.write_text("Rate this for teaching:\n{extract}\nEducational score: ?")
    first = load_prompt(str(path))
    assert first.version.startswith("strict-") and first.render("abc")[0] == "Rate this for teaching:\nabc\nEducational score: ?"
    path.write_text("Rate this for teaching, strictly:\n{extract}")
    assert load_prompt(str(path)).version != first.version

    (tmp_path / "bad.txt").write_text("no placeholder here")
    with pytest.raises(PromptError, match="no \\{extract\\} placeholder"):
        load_prompt(str(tmp_path / "bad.txt"))
    with pytest.raises(PromptError, match="unknown prompt"):
        load_prompt("fineweb-edu-v9")


def test_show_prompt_from_the_command_line():
    out = subprocess.run(
        [sys.executable, "-m", "edu_filter.cli", "score", "--show-prompt", "code"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert "python-edu-v1" in out
    assert "Below is an extract from a Python program." in out and "{extract}" in out
