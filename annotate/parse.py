"""Read the 0-5 score out of an LLM answer, the way models really write it.

Accepted: "Educational score: 3", "**Educational score:** 3", "Educational Score: **3**", "Educational score: 3/5",
"... 3 out of 5", trailing text after the number, and several scores in one answer (the concluding one counts).
Anything else gives score None and a reason: a wrong score is worse for the classifier than a missing one, so we
never guess.
"""

from __future__ import annotations

import re

MAX_SCORE = 5

# "Educational score", then any mix of markdown emphasis, colons and spaces, then the number (optionally emphasised,
# bracketed, negative or fractional so that we can reject it explicitly) and an optional "/N" or "out of N".
_SCORE_RE = re.compile(
    r"educational[ \t]+score[\s*_:：=]*[\[(]?[\s*_]*(?P<num>-?\d+(?:\.\d+)?)"
    r"[\s*_\])]*(?:(?:/|out[ \t]+of)[ \t]*(?P<den>\d+))?",
    re.IGNORECASE,
)


def parse_score(response: str | None) -> tuple[int | None, str | None]:
    """(score, None) when the answer concludes with a valid score, else (None, reason)."""
    if not response or not response.strip():
        return None, "unparseable: empty answer"
    matches = list(_SCORE_RE.finditer(response))
    if not matches:
        return None, "unparseable: no 'Educational score: N' in the answer"
    last = matches[-1]
    num, den = last.group("num"), last.group("den")
    if den is not None and int(den) != MAX_SCORE:
        return None, f"unparseable: score given out of {den}, expected out of {MAX_SCORE}"
    if "." in num:
        value = float(num)
        if not value.is_integer():
            return None, f"unparseable: score {num} is not a whole number"
        num = str(int(value))
    score = int(num)
    if not 0 <= score <= MAX_SCORE:
        return None, f"unparseable: score {score} is outside 0-{MAX_SCORE}"
    return score, None
