"""Versioned annotation prompts: the FineWeb-Edu web rubric, the Python-Edu code rubric, or a custom file.

A prompt's version id goes into every output row and into the resume-cache key, so changing the wording means a
new id (and fresh answers), never a silent mix of two rubrics in one training set.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from edu_filter.documents import InputError

PLACEHOLDER = "{extract}"

# Short names for the bundled rubrics -> version id (= file name under prompts/ without .txt).
BUNDLED = {"web": "fineweb-edu-v1", "code": "python-edu-v1"}


class PromptError(InputError):
    """A prompt that cannot be used (unknown name, missing file, no {extract} placeholder)."""


@dataclass(frozen=True)
class Prompt:
    version: str
    template: str

    def render(self, text: str, max_chars: int | None = None) -> tuple[str, bool]:
        """The prompt for one document, and whether the document was cut to `max_chars` characters."""
        truncated = max_chars is not None and len(text) > max_chars
        if truncated:
            text = text[:max_chars]
        # str.replace, not str.format: documents and rubrics are full of braces.
        return self.template.replace(PLACEHOLDER, text), truncated


def _bundled_text(version: str) -> str:
    return resources.files("edu_filter.annotate").joinpath("prompts", f"{version}.txt").read_text(encoding="utf-8")


def load_prompt(name: str) -> Prompt:
    """`web`, `code`, a bundled version id (`fineweb-edu-v1`), or a path to a text file with `{extract}`.

    A custom file's version id is `<file stem>-<first 8 hex of its sha256>`, so editing the file changes the id.
    """
    version = BUNDLED.get(name, name)
    if version in BUNDLED.values():
        return Prompt(version, _bundled_text(version))
    path = Path(name)
    if not path.is_file():
        raise PromptError(
            f"unknown prompt {name!r}: use {', '.join(BUNDLED)}, one of {', '.join(BUNDLED.values())}, "
            f"or a path to a text file containing {PLACEHOLDER}"
        )
    template = path.read_text(encoding="utf-8")
    if PLACEHOLDER not in template:
        raise PromptError(f"{path}: prompt file has no {PLACEHOLDER} placeholder for the document")
    digest = hashlib.sha256(template.encode("utf-8")).hexdigest()[:8]
    return Prompt(f"{path.stem}-{digest}", template)


def show_prompt(name: str) -> str:
    """Print a prompt with its version id (for `edu-filter score --show-prompt web`)."""
    from rich.console import Console
    from rich.rule import Rule

    prompt = load_prompt(name)
    console = Console()
    console.print(Rule(f"prompt {prompt.version}"))
    console.print(prompt.template, markup=False, highlight=False, soft_wrap=True)
    return prompt.template
