"""Read the 0-5 score out of an LLM answer, the way models really write it.

A score counts only where it ends its statement: "Educational score: 3" at the end of a line or before punctuation,
optionally bold (`**Educational score:** 3`, `Educational Score: **3**`), bracketed (also `<3>`, the prompt's
`<total points>` kept, or quoted), "3/5", "3 out of 5" or "3 points". Text on later lines and the same score repeated
are fine. A reasoning model's thinking (`<think>...</think>`, left in the answer by a server without a reasoning
parser) is not read.

Anything else gives score None and a reason, because a wrong score is worse for the classifier than a missing one:
`unparseable` (no score, not a whole number, outside 0-5, out of 10) or `ambiguous` (arithmetic after the number,
as in "Educational score: 20 - 15 = 3 points", other words right after it, or two different scores in one answer).
"""

from __future__ import annotations

import re

from edu_filter.documents import MAX_SCORE, MIN_SCORE, SCORE_RANGE

# "Educational score", then any mix of markdown emphasis, colons and spaces on its line, or the number alone on one of
# the next two lines (`below`); the number optionally emphasised, bracketed, negative or fractional so that we can
# reject it explicitly. No two repeated runs here may match the same characters: backtracking over a degenerate answer
# (thousands of spaces after the colon) would take quadratic time on the event loop.
# A bracketed qualifier before the colon ("Educational score (5-point scale): 2", "(0-5)") is skipped: its number
# read as the score gave 5.
_STATEMENT = re.compile(
    r"educational[ \t]+score(?:[ \t*_]*[(\[][^()\[\]\n]{1,60}[)\]](?=[ \t*_]*[:：=]))?"
    r"[ \t\u00a0*_:：=]*(?P<below>(?:\r?\n[ \t*_]*){1,2})?(?:[\[(<`\"][ \t*_]*)?(?P<num>-?\d+(?:\.\d+)?)",
    re.IGNORECASE,
)
_CLOSE = r"[ \t*_\])>`\"]*"  # closing emphasis and brackets after the number (`<3>`: the prompt's placeholder kept)
_OUT_OF = r"(?:(?:[(\[][ \t]*)?(?:/|out[ \t]+of)[ \t]*(?P<den>\d+)" + _CLOSE + r")?"  # "/5", "out of 5", "(out of 5)"
_POINTS = r"(?:(?:points?|pts)\b" + _CLOSE + r")?"
# What may follow the number for it to end the statement: "/5" or "out of 5", "points", then the end of the line or
# punctuation that does not start a calculation; a hyphen not joined to a word, and no dash before a "point" of a
# tally ("1-point (basic info) + ...", "1 – point for ..." are no score of 1; "3—the extract is..." and
# "3 — Points awarded: ..." are 3).
_ENDING = re.compile(
    _CLOSE + _OUT_OF + _POINTS + r"(?:\r?\n|\Z|[.,;:!?\"'”’(](?![ \t]*\d)|[—–](?![ \t]*\d|[ \t]*(?:points?|pts?)\b(?![ \t]*(?::|awarded)))"
    r"|-(?![ \t]*\d|\w))", re.IGNORECASE)
# A number below "Educational score:" is the score only alone on its line: "Educational score:\n1. The extract..." is a
# heading over a numbered list, not a score of 1.
_ALONE = re.compile(_CLOSE + _OUT_OF + _POINTS + r"\.?[ \t]*(?:\r?\n|\Z)", re.IGNORECASE)
# The tags around a reasoning model's thinking when the server leaves it in the answer.
REASONING_START, REASONING_END = "<think>", "</think>"
_ARITHMETIC = re.compile(_CLOSE + r"(?:=|[-+*×÷][ \t]*\(?[ \t]*\d)")


def _statement_text(response: str, start: int) -> str:
    line_end = response.find("\n", start)
    line = response[start : line_end if line_end >= 0 else len(response)].strip()
    return line if len(line) <= 80 else line[:77] + "..."


def _read_statement(response: str, match: re.Match) -> tuple[int | None, str | None]:
    """(score, None) for a statement that ends at a valid score, else (None, reason)."""
    rest = response[match.end() :]
    num = match.group("num")
    if _ARITHMETIC.match(rest):
        return None, f"ambiguous: arithmetic after the score ({_statement_text(response, match.start())!r})"
    ending = _ENDING.match(rest)
    if ending is None:
        return None, f"ambiguous: the score does not end its statement ({_statement_text(response, match.start())!r})"
    den = ending.group("den")
    if den is not None and int(den) != MAX_SCORE:
        return None, f"unparseable: score given out of {den}, expected out of {MAX_SCORE}"
    if "." in num:
        value = float(num)
        if not value.is_integer():
            return None, f"unparseable: score {num} is not a whole number"
        num = str(int(value))
    score = int(num)
    if not MIN_SCORE <= score <= MAX_SCORE:
        return None, f"unparseable: score {score} is outside {SCORE_RANGE}"
    return score, None


def parse_score(response: str | None) -> tuple[int | None, str | None]:
    """(score, None) when every score statement in the answer gives the same valid score, else (None, reason).

    Reasons start with their kind (`unparseable: ...` or `ambiguous: ...`), which the run summary counts."""
    if not response or not response.strip():
        return None, "unparseable: empty answer"
    # a reasoning model served without a reasoning parser (DeepSeek-R1 distills, Qwen3) answers after its thinking,
    # whose trial scores ("educational score: 2 seems low") made every such answer ambiguous
    thought_end = response.rfind(REASONING_END)
    if thought_end >= 0:
        response = response[thought_end + len(REASONING_END):]
    elif REASONING_START in response:
        return None, f"unparseable: the answer ends inside its reasoning ({REASONING_START} without {REASONING_END})"
    statements = [_read_statement(response, m) for m in _STATEMENT.finditer(response)
                  if not m.group("below") or _ALONE.match(response, m.end())]
    if not statements:
        return None, "unparseable: no 'Educational score: N' in the answer"
    errors = [error for _, error in statements if error is not None]
    ambiguous = [error for error in errors if error.startswith("ambiguous")]
    if ambiguous or errors:
        return None, (ambiguous or errors)[0]
    scores = sorted({score for score, _ in statements})
    if len(scores) > 1:
        return None, f"ambiguous: conflicting scores {', '.join(map(str, scores))} in one answer"
    return scores[0], None
