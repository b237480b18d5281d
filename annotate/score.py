"""`edu-filter score`: annotate documents 0-5 with an LLM and the FineWeb-Edu / Python-Edu additive rubric.

Flow: read (and optionally sample) documents -> render the versioned prompt (with explicit truncation) -> ask the
backend with bounded concurrency -> parse the concluding "Educational score: N", re-asking a bounded number of
times on unparseable answers -> write one row per input document, atomically, at the end.

Every received answer is committed to the answer cache first (see cache.py), so a killed run started again with
the same command asks only for what it never received. Requests that failed for good (after retries) are not
answers: they are recorded in the row's `error` and tried again on the next run.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

from edu_filter.annotate.backends import (
    SERVER_BACKENDS,
    BackendError,
    GenerationSettings,
    OpenAIBackend,
    RequestFailed,
    TransformersBackend,
    managed_server,
    server_config,
)
from edu_filter.annotate.cache import AnswerCache
from edu_filter.annotate.parse import MAX_SCORE, parse_score
from edu_filter.annotate.prompts import Prompt, PromptError, load_prompt
from edu_filter.documents import DocumentError, read_documents, write_documents

# What FineWeb-Edu and Python-Edu were annotated with; servers usually serve a model under its hub id.
DEFAULT_MODEL = "meta-llama/Meta-Llama-3-70B-Instruct"
BACKENDS = ("openai", *SERVER_BACKENDS, "transformers")
OUTPUT_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
# Errors the command line reports as one line (bad input, options or backend) instead of a traceback.
ANNOTATION_ERRORS = (DocumentError, PromptError, BackendError, ImportError, ValueError)


@dataclass
class ScoreSummary:
    """What a run did; printed as a table and returned to library callers."""

    documents: int = 0
    scored: int = 0
    failed: Counter = field(default_factory=Counter)  # reason kind ("unparseable", "http 500", ...) -> documents
    score_counts: Counter = field(default_factory=Counter)
    truncated: int = 0
    cached_answers: int = 0  # answers replayed from the cache instead of asked again
    requests: int = 0  # requests actually sent this run, retries included
    retries: int = 0
    reasks: int = 0  # extra questions after unparseable answers
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    output: str = ""
    cache: str = ""

    @property
    def docs_per_second(self) -> float:
        return self.documents / self.seconds if self.seconds else 0.0


def _check_output(output: Path) -> None:
    if not output.name.lower().endswith(OUTPUT_SUFFIXES):
        raise DocumentError(f"{output}: output must end in {', '.join(OUTPUT_SUFFIXES)}")


def _load(inputs, text_field: str, id_field: str, sample: int | None, seed: int) -> list[dict]:
    docs = read_documents(inputs, text_field=text_field, id_field=id_field)
    seen: dict[str, int] = {}
    for i, doc in enumerate(docs):
        if doc["id"] in seen:
            raise DocumentError(
                f"duplicate document id {doc['id']!r} (documents #{seen[doc['id']] + 1} and #{i + 1}): ids key the "
                f"resume cache and the output, so they must be unique (use --id-field to pick another field)"
            )
        seen[doc["id"]] = i
    if sample is not None and sample < len(docs):
        keep = sorted(random.Random(seed).sample(range(len(docs)), sample))  # input order, reproducible
        docs = [docs[i] for i in keep]
    return docs


class _Scorer:
    """Scores documents through one backend, replaying and filling the answer cache."""

    def __init__(self, backend, cache: AnswerCache, prompt: Prompt, model: str, max_chars, max_reasks: int):
        self.backend, self.cache, self.prompt, self.model = backend, cache, prompt, model
        self.max_chars, self.max_reasks = max_chars, max_reasks
        self.summary = ScoreSummary()

    async def score(self, doc: dict) -> dict:
        s = self.summary
        prompt_text, truncated = self.prompt.render(doc["text"], self.max_chars)
        stored = self.cache.answers(doc["id"])
        score = error = response = None
        prompt_tokens = completion_tokens = None
        attempts = 0
        for attempt in range(self.max_reasks + 1):
            if attempt < len(stored):
                answer = stored[attempt]
                s.cached_answers += 1
            else:
                try:
                    answer = await self.backend.complete(prompt_text)
                except RequestFailed as e:
                    error = e.reason
                    break
                self.cache.add(doc["id"], attempt, answer)
            attempts += 1
            s.reasks += attempt > 0
            response = answer.text
            if answer.prompt_tokens is not None:
                prompt_tokens = (prompt_tokens or 0) + answer.prompt_tokens
            if answer.completion_tokens is not None:
                completion_tokens = (completion_tokens or 0) + answer.completion_tokens
            score, error = parse_score(answer.text)
            if score is not None:
                break
        s.documents += 1
        s.truncated += truncated
        s.prompt_tokens += prompt_tokens or 0
        s.completion_tokens += completion_tokens or 0
        if score is None:
            s.failed[error.split(":", 1)[0]] += 1
        else:
            s.scored += 1
            s.score_counts[score] += 1
        return {
            "id": doc["id"],
            "text": doc["text"],
            "score": score,
            "response": response,
            "error": error,
            "model": self.model,
            "prompt": self.prompt.version,
            "attempts": attempts,
            "truncated": truncated,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
        }

    async def run(self, docs: list[dict], workers: int, show_progress: bool) -> list[dict]:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        from rich.progress import TimeRemainingColumn

        rows: list[dict | None] = [None] * len(docs)
        next_index = iter(range(len(docs)))
        progress = Progress(
            TextColumn("[bold]scoring"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("[red]{task.fields[failed]} failed"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            refresh_per_second=4,  # rendering runs on its own thread at this rate, never per request
            disable=not show_progress,
        )
        task = progress.add_task("scoring", total=len(docs), failed=0)

        def report():
            s = self.summary
            progress.update(task, completed=s.documents, failed=s.documents - s.scored)

        async def worker():
            for i in next_index:
                rows[i] = await self.score(docs[i])

        async def reporter():  # the bar's numbers change a few times a second, not once per request
            while True:
                report()
                await asyncio.sleep(0.2)

        with progress:
            tasks = [asyncio.create_task(worker()) for _ in range(max(1, min(workers, len(docs))))]
            ticker = asyncio.create_task(reporter())
            try:
                await asyncio.gather(*tasks)
            finally:
                for t in (*tasks, ticker):
                    t.cancel()
                await asyncio.gather(*tasks, ticker, return_exceptions=True)
                report()
        return rows


async def _score_async(docs, backend_name, backend_kwargs, server_kwargs, cache, prompt, model, options):
    async with AsyncExitStack() as stack:
        if backend_name == "transformers":
            backend = await stack.enter_async_context(TransformersBackend(model, **backend_kwargs))
        else:
            if backend_name in SERVER_BACKENDS:
                config = server_config(backend_name, model, **server_kwargs)
                backend_kwargs = {**backend_kwargs, "base_url": await stack.enter_async_context(managed_server(config))}
            backend = await stack.enter_async_context(OpenAIBackend(model=model, **backend_kwargs))
        scorer = _Scorer(backend, cache, prompt, model, options["max_chars"], options["max_reasks"])
        rows = await scorer.run(docs, options["workers"], options["show_progress"])
    scorer.summary.requests = backend.stats.requests
    scorer.summary.retries = backend.stats.retries
    return rows, scorer.summary


def score_documents(
    inputs: list[str],
    output: str | os.PathLike,
    *,
    prompt: str = "web",
    backend: str = "openai",
    model: str = DEFAULT_MODEL,
    base_url: str | None = None,
    api: str = "chat",
    api_key_env: str = "OPENAI_API_KEY",
    concurrency: int = 16,
    timeout: float = 120.0,
    max_retries: int = 5,
    retry_backoff: float = 1.0,
    max_reasks: int = 2,
    temperature: float = 0.6,
    top_p: float = 0.95,
    max_tokens: int = 256,
    max_chars: int | None = None,
    sample: int | None = None,
    seed: int = 0,
    cache: str | os.PathLike | None = None,
    text_field: str = "text",
    id_field: str = "id",
    max_model_len: int = 8192,
    tensor_parallel: int = 1,
    server_script: str | None = None,
    server_args: list[str] | None = None,
    device: str | None = None,
    show_progress: bool = True,
) -> ScoreSummary:
    """Annotate documents with an LLM; write one row per document to `output`; print and return a summary.

    Re-running the same call resumes from the answer cache (default: `<output>.cache.sqlite`).
    """
    if backend not in BACKENDS:
        raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "openai" and not base_url:
        raise ValueError("the openai backend needs --base-url (e.g. http://127.0.0.1:8000/v1)")
    if max_reasks < 0 or concurrency < 1 or max_retries < 0:
        raise ValueError("--max-reasks and --max-retries must be >= 0 and --concurrency >= 1")
    if max_chars is not None and max_chars < 1:
        raise ValueError("--max-chars must be a positive number of characters")
    output = Path(output)
    _check_output(output)
    the_prompt = load_prompt(prompt)
    docs = _load(inputs, text_field, id_field, sample, seed)
    settings = GenerationSettings(temperature=temperature, top_p=top_p, max_tokens=max_tokens)
    cache_path = Path(cache) if cache is not None else output.with_name(output.name + ".cache.sqlite")
    cache_settings = {"prompt": the_prompt.version, "model": model, "api": api, "max_chars": max_chars,
                      **settings.as_dict()}

    if backend == "transformers":
        backend_kwargs = {"settings": settings, "api": api, "batch_size": concurrency, "device": device,
                          "seed": seed}
    else:
        backend_kwargs = {"settings": settings, "api": api, "api_key": os.environ.get(api_key_env),
                          "concurrency": concurrency, "timeout": timeout, "max_retries": max_retries,
                          "retry_backoff": retry_backoff}
        if backend == "openai":
            backend_kwargs["base_url"] = base_url
    server_kwargs = {"api": api, "max_model_len": max_model_len, "tp": tensor_parallel,
                     "server_script": server_script, "server_args": server_args}
    options = {"max_chars": max_chars, "max_reasks": max_reasks, "workers": concurrency,
               "show_progress": show_progress}

    start = time.perf_counter()
    with AnswerCache(cache_path, cache_settings) as answer_cache:
        rows, summary = asyncio.run(
            _score_async(docs, backend, backend_kwargs, server_kwargs, answer_cache, the_prompt, model, options)
        )
    summary.seconds = time.perf_counter() - start
    summary.output, summary.cache = str(output), str(cache_path)

    # Written whole, then renamed: a run killed here leaves no half file, and the re-run rewrites it from cache.
    partial = output.with_name(f".partial-{output.name}")
    write_documents(rows, partial)
    os.replace(partial, output)
    if show_progress:
        print_summary(summary)
    return summary


def print_summary(summary: ScoreSummary) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="score summary", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("documents", f"{summary.documents:,}")
    table.add_row("scored", f"{summary.scored:,}")
    for reason, n in summary.failed.most_common():
        table.add_row(f"failed: {reason}", f"[red]{n:,}")
    table.add_row("scores 0..5", " ".join(f"{k}:{summary.score_counts.get(k, 0)}" for k in range(MAX_SCORE + 1)))
    table.add_row("truncated (--max-chars)", f"{summary.truncated:,}")
    table.add_row("answers reused from cache", f"{summary.cached_answers:,}")
    table.add_row("requests sent (retries)", f"{summary.requests:,} ({summary.retries:,})")
    table.add_row("re-asks after unparseable answers", f"{summary.reasks:,}")
    table.add_row("tokens prompt / completion", f"{summary.prompt_tokens:,} / {summary.completion_tokens:,}")
    table.add_row("time", f"{summary.seconds:.1f} s ({summary.docs_per_second:,.1f} docs/s)")
    table.add_row("output", summary.output)
    table.add_row("cache", summary.cache)
    Console().print(table)
