"""`edu-filter score`: annotate documents 0-5 with an LLM and the FineWeb-Edu / Python-Edu additive rubric.

Flow: read (or sample while streaming) documents -> render the versioned prompt (with explicit truncation) -> ask
the backend with bounded concurrency -> parse the concluding "Educational score: N", re-asking a bounded number of
times on unparseable or ambiguous answers -> write one row per input document, in input order, to a hidden partial
file renamed to the output at the end. Documents are read as they are scored: memory holds the documents in flight
(at most MAX_AHEAD from the oldest unfinished one on), not the input, whatever its size.

Every received answer is committed to the answer cache first (see cache.py), so a killed run started again with
the same command asks only for what it never received. Requests that failed for good (after retries) are not
answers: they are recorded in the row's `error` and tried again on the next run.

`select="active"` replaces the uniform sample with rounds of draws that a classifier trained on the labels so far
steers towards the documents that teach it most (see active.py); each row then also carries its `round` and the
inclusion `weight` that `train` uses to undo the choice.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import gzip
import math
import os
import signal
import sys
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import orjson

from edu_filter.annotate.backends import (
    SERVER_BACKENDS,
    ContextOverflow,
    GenerationSettings,
    OpenAIBackend,
    RequestFailed,
    TransformersBackend,
    managed_server,
    server_config,
)
from edu_filter.annotate.active import (
    DEFAULT_ROUNDS, ActiveAnnotation, pool_fingerprint, refuse_another_pool, round_sizes, selection_key,
    selection_settings,
)
from edu_filter.annotate.cache import (SAMPLER, AnswerCache, check_answer_cache, recorded_sampler,
                                       recorded_selection_pool, recorded_selection_rounds, run_key)
from edu_filter.annotate.parse import MAX_SCORE, parse_score
from edu_filter.annotate.prompts import BUNDLED, Prompt, load_prompt
from edu_filter import provenance
from edu_filter.documents import (
    LEGACY_SAMPLER,
    NESTED_SAMPLER,
    PLAIN_PROGRESS_EVERY,
    DocumentError,
    InputError,
    RunError,
    check_model_name,
    check_writable_output,
    count_documents,
    counted,
    holds_saved_work,
    is_hub_path,
    iter_documents,
    path_list,
    refuse_output_among_inputs,
    sample_documents,
    writing_alone,
    unclipped,
)

BACKENDS = ("openai", *SERVER_BACKENDS, "transformers")
APIS = ("chat", "completion")
SELECTIONS = ("random", "active")
OUTPUT_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
CUT_OFF = "cut off at max_tokens"
# Output columns and their Parquet types: fixed, so a shard whose every score failed still combines with others.
OUTPUT_SCHEMA = {
    "id": "String", "text": "String", "score": "Int64", "response": "String", "error": "String", "model": "String",
    "prompt": "String", "attempts": "Int64", "truncated": "Boolean", "finish_reason": "String",
    "prompt_tokens": "Int64", "completion_tokens": "Int64",
}
ACTIVE_COLUMNS = {"round": "Int64", "weight": "Float64"}  # added by --select active
# Documents held from the oldest one still being scored on: one request stuck in its retries holds back the writing of
# the rows after it, and this bounds what waits in memory meanwhile.
MAX_AHEAD = 10_000


@dataclass
class ScoreConfig:
    """Every setting of a `score` run but its input and output; `edu-filter score` takes its defaults from here."""

    # the question
    prompt: str = "web"  # web (FineWeb-Edu), code (Python-Edu), a bundled version id, or a file with {extract}
    max_chars: int | None = None  # cut documents to this many characters (and further to fit the server's context)
    # who answers
    backend: str = "openai"  # openai (any OpenAI-compatible URL), vllm, sglang, script or transformers
    model: str | None = None  # served name, hub id, folder or .gguf file (openai: optional if the server serves one)
    base_url: str | list[str] | None = None  # openai: the endpoint, e.g. http://127.0.0.1:8000/v1, or several servers
    api: str = "chat"  # chat (/v1/chat/completions) or completion (/v1/completions)
    api_key_env: str = "OPENAI_API_KEY"  # environment variable holding the API key
    # sampling: FineWeb-Edu's annotation settings
    temperature: float = GenerationSettings.temperature
    top_p: float = GenerationSettings.top_p
    max_tokens: int = GenerationSettings.max_tokens
    # requests
    concurrency: int = 16  # requests in flight per server (the batch size for transformers)
    timeout: float = 120.0  # seconds without any answer before a request is retried
    max_retries: int = 5  # on 429, 5xx, timeouts and connection errors
    retry_backoff: float = 1.0  # first retry delay in seconds (doubles each retry, jittered)
    max_reasks: int = 2  # extra questions when an answer is unparseable, ambiguous or cut off
    # which documents
    sample: int | None = None  # a reproducible uniform sample of N documents, or the budget of select="active"
    seed: int = 0
    select: str = "random"  # random, or active: rounds chosen by a classifier trained on the labels so far
    rounds: int = DEFAULT_ROUNDS  # active: rounds the budget is spent in (the first one uniform)
    seed_size: int | None = None  # active: documents in the first, uniform round (None: an equal share)
    kind: str | None = None  # active: web or code, the encoder as in train (None: from the prompt)
    encoder: str | None = None  # active: encoder path or hub name (as in train)
    max_length: int = 512  # active: tokens per document the encoder reads (as in train)
    embedding_cache: str | None = None  # active: embedding cache shared with train (None: ~/.cache/edu-filter)
    # input fields and the resume cache
    text_field: str = "text"
    id_field: str = "id"
    cache: str | os.PathLike | None = None  # None: <output>.cache.sqlite
    # servers started here (vllm, sglang, script) and the in-process transformers backend
    max_model_len: int = 8192  # context length of the started server
    tensor_parallel: int = 1  # GPUs per model
    server_script: str | None = None  # script: a Python file serving /v1 on --port
    server_args: list[str] | None = None  # extra server flags, KEY=VALUE or KEY
    device: str | None = None  # transformers: cpu, cuda... (None: the best available)
    # display
    show_progress: bool = True
    progress_every: float = PLAIN_PROGRESS_EVERY  # seconds between plain progress lines when output is no terminal

    def generation(self) -> GenerationSettings:
        return GenerationSettings(temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens)

    def reasks(self) -> int:
        """Re-asks worth sending: at temperature 0 a server answers the identical request the same (greedy), so a
        re-ask would pay for the same unusable answer again."""
        return 0 if self.temperature == 0 else self.max_reasks

    def base_urls(self) -> list[str]:
        """The servers to ask (openai backend), each once."""
        urls = [self.base_url] if isinstance(self.base_url, str) else list(self.base_url or [])
        return list(dict.fromkeys(u.rstrip("/") for u in urls if u))

    def check(self) -> None:
        """Every option, before any document is read or anything is written; raises InputError naming it."""
        if self.backend not in BACKENDS:
            raise InputError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.backend == "openai" and not self.base_urls():
            raise InputError("the openai backend needs --base-url (e.g. http://127.0.0.1:8000/v1)")
        for url in self.base_urls():  # "localhost:8000/v1" was retried as a server down: 6 tries, 25 s, then exit 2
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise InputError(f"--base-url {url}: expected http://HOST:PORT/v1 or https://... (a scheme and a host)")
        if self.backend != "openai" and len(self.base_urls()) > 1:
            raise InputError(f"several --base-url are for the openai backend; the {self.backend} backend asks the "
                             "one server it starts")
        if self.backend != "openai":
            if not self.model:
                raise InputError(f"the {self.backend} backend needs --model (the model to load: folder, hub id or file)")
            check_model_name(self.model)
        if self.api not in APIS:
            raise InputError(f"--api must be one of {', '.join(APIS)}, got {self.api!r}")
        for name, value, least in (("concurrency", self.concurrency, 1), ("max-retries", self.max_retries, 0),
                                   ("max-reasks", self.max_reasks, 0), ("max-tokens", self.max_tokens, 1),
                                   ("max-model-len", self.max_model_len, 1), ("tensor-parallel", self.tensor_parallel, 1),
                                   ("max-length", self.max_length, 1)):
            if value < least:
                raise InputError(f"--{name} must be >= {least}, got {value}")
        if self.max_chars is not None and self.max_chars < 1:
            raise InputError("--max-chars must be a positive number of characters")
        if self.timeout <= 0 or self.retry_backoff < 0:
            raise InputError("--timeout must be > 0 seconds and --retry-backoff >= 0")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise InputError(f"--temperature must be >= 0 and --top-p in (0, 1], got {self.temperature} and {self.top_p}")
        if self.sample is not None and self.sample < 1:
            raise InputError("--sample must be a positive number of documents")
        if not 0 <= self.seed < 2**32:  # what numpy's and sklearn's generators take (--select active)
            raise InputError(f"--seed must be in [0, 2**32), got {self.seed}")
        if self.select not in SELECTIONS:
            raise InputError(f"--select must be one of {', '.join(SELECTIONS)}, got {self.select!r}")
        if self.select == "active":
            if self.sample is None:
                raise InputError("--select active needs --sample N: the number of documents the LLM may annotate")
            round_sizes(self.sample, self.rounds, self.seed_size)  # bad --rounds / --seed-size
            if self.kind is not None:
                from edu_filter.classifiers.encoders import KINDS

                if self.kind not in KINDS:
                    raise InputError(f"--kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.backend in SERVER_BACKENDS:
            if self.server_script is not None and not Path(self.server_script).is_file():
                raise InputError(f"--server-script {self.server_script}: no such file")
            self.server()  # bad --server-arg, a script backend without --server-script
        self.refuse_unused_options()
        load_prompt(self.prompt)  # an unknown prompt name, a file without {extract}

    def refuse_unused_options(self) -> None:
        """An option this run would not read is refused by name: `--kind foo` without --select active, or
        `--tensor-parallel 4` for a server edu-filter does not start, ran as if it had been heard."""
        default = ScoreConfig()
        uses = (
            ("rounds", "--rounds", self.select == "active", "--select active"),
            # drawing a sample, choosing one, a local model's sampling: an API server is sent no seed
            ("seed", "--seed", self.sample is not None or self.backend == "transformers",
             "--sample or --backend transformers"),
            ("seed_size", "--seed-size", self.select == "active", "--select active"),
            ("kind", "--kind", self.select == "active", "--select active"),
            ("encoder", "--encoder", self.select == "active", "--select active"),
            ("max_length", "--max-length", self.select == "active", "--select active"),
            ("embedding_cache", "--embedding-cache", self.select == "active", "--select active"),
            ("max_model_len", "--max-model-len", self.backend in ("vllm", "sglang"), "--backend vllm or sglang"),
            ("tensor_parallel", "--tensor-parallel", self.backend in ("vllm", "sglang"), "--backend vllm or sglang"),
            ("server_args", "--server-arg", self.backend in SERVER_BACKENDS, "--backend vllm, sglang or script"),
            ("server_script", "--server-script", self.backend == "script", "--backend script"),
            ("device", "--device", self.backend == "transformers", "--backend transformers"),
            ("base_url", "--base-url", self.backend == "openai", "--backend openai (the others start their server)"),
            *((name, f"--{name.replace('_', '-')}", self.backend != "transformers",
               "--backend openai, vllm, sglang or script") for name in ("timeout", "max_retries", "retry_backoff",
                                                                          "api_key_env")),
        )
        unused = [(flag, where) for name, flag, used, where in uses
                  if not used and getattr(self, name) not in (getattr(default, name), None, [])]
        if unused:
            flags = ", ".join(flag for flag, _ in unused)
            wheres = sorted({where for _, where in unused})
            raise InputError(f"{flags} {'is' if len(unused) == 1 else 'are'} only read with {' or '.join(wheres)}; "
                             f"this run uses --backend {self.backend} and --select {self.select}: leave "
                             f"{'it' if len(unused) == 1 else 'them'} out")

    def served_model_name(self) -> str | None:
        """The name a server this run starts answers under: --server-arg served-model-name=NAME where given (a model
        moved, served under its old name to replay its answers), else --model."""
        for arg in self.server_args or []:
            key, _, value = arg.lstrip("-").partition("=")
            if key.replace("_", "-") == "served-model-name" and value:
                return value.split(",")[0].split()[0]
        return self.model

    def server(self, log_folder: str | None = None):
        """The datatrove description of the server to start (vllm, sglang and script backends)."""
        return server_config(self.backend, self.model, api=self.api, max_model_len=self.max_model_len,
                             tp=self.tensor_parallel, server_script=self.server_script, server_args=self.server_args,
                             log_folder=log_folder)


@dataclass
class ScoreSummary:
    """What a run did; printed as a table and returned to library callers."""

    documents: int = 0
    scored: int = 0
    failed: Counter = field(default_factory=Counter)  # reason kind ("unparseable", "http 400 ...", ...) -> documents
    score_counts: Counter = field(default_factory=Counter)
    truncated: int = 0
    cached_answers: int = 0  # answers replayed from the cache instead of asked again
    replayed: int = 0  # documents whose answers all came from the cache: nothing asked for them this run
    requests: int = 0  # requests actually sent this run, retries included
    retries: int = 0
    reasks: int = 0  # extra questions sent after unparseable, ambiguous or cut-off answers (not replayed)
    refits: int = 0  # documents asked again cut to fit the server's context
    prompt_tokens: int = 0  # of the answers received this run (rows also count the ones replayed from the cache)
    completion_tokens: int = 0
    seconds: float = 0.0  # asking (and replaying): what docs_per_second divides by
    prepared_seconds: float = 0.0  # before: reading the input, drawing a sample, embedding an active pool
    model: str = ""  # the model asked (as the server serves it)
    concurrency: int | None = None  # requests in flight at the end, when lower than asked (timeouts backed it off)
    notes: list[str] = field(default_factory=list)
    # several servers: answers, and tries unanswered or answered 5xx
    servers: dict[str, tuple[int, int]] = field(default_factory=dict)
    selection: str = ""  # how the documents were chosen, when not a plain read or uniform sample
    output: str = ""
    cache: str = ""

    @property
    def docs_per_second(self) -> float:
        """Documents asked about per second: a resume's replayed ones take no time and would show 10x the rate."""
        return (self.documents - self.replayed) / self.seconds if self.seconds else 0.0


def failure_kind(reason: str) -> str:
    """What the summary counts a failure as: the reason up to its first colon (`http 400 context_length_exceeded`)."""
    return reason.split(":", 1)[0]


def _rate(per_second: float) -> str:
    """Enough digits for slow servers too: 1,234 / 12.3 / 0.042."""
    if per_second >= 100:
        return f"{per_second:,.0f}"
    if per_second >= 1:
        return f"{per_second:.1f}"
    return f"{per_second:.2g}"


def _check_output(output: Path) -> None:
    if not output.name.lower().endswith(OUTPUT_SUFFIXES):
        raise DocumentError(f"{output}: output must end in {', '.join(OUTPUT_SUFFIXES)}")


class DocumentStream:
    """The whole input, read as it is scored. For local files a first pass counts the documents (an honest progress
    total) and checks every row and id before any request; a hub dataset is checked as it streams, its total read
    from its Parquet footers (none when it is not Parquet)."""

    def __init__(self, inputs, text_field: str, id_field: str, show_progress: bool = False):
        self.inputs, self.text_field, self.id_field = path_list(inputs), text_field, id_field
        if any(is_hub_path(p) for p in self.inputs):
            self.ids_checked = False  # as it streams (`unique_ids`)
            try:
                self.total = count_documents(self.inputs)
            except DocumentError:  # a total is a nicety: an unreadable file fails the run when the stream reaches it
                self.total = None
        else:  # a pass over the whole input before any request (hours for a TB): said as it goes
            hashes = array("q")  # of every id, 8 bytes a document
            for doc in counted(self._documents(), "counting the documents", show_progress):
                hashes.append(hash(doc["id"]))
            self.total = len(hashes)
            check_unique_ids(hashes, self._documents)
            self.ids_checked = True

    def _documents(self) -> Iterator[dict]:
        return iter_documents(self.inputs, text_field=self.text_field, id_field=self.id_field)

    def __iter__(self) -> Iterator[dict]:
        if self.ids_checked:  # by the counting pass
            return self._documents()
        return (doc for _, doc in unique_ids(enumerate(self._documents())))


def _duration(seconds: float) -> str:
    """4 s, 12 min, 3.5 h, 2.1 days: a time left in a log line."""
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.1f} {unit}" if unit in ("days", "h") else f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def unique_ids(numbered: Iterable[tuple[int, dict]]) -> Iterator[tuple[int, dict]]:
    """(position in the input, document) pairs passed through; an id seen before is an error naming both positions.
    Ids key the resume cache and the output, so they must be unique among the documents scored. Holds every id:
    for a sample, or a stream with no counting pass (`check_unique_ids` is the whole input's)."""
    seen: dict[str, int] = {}
    for position, doc in numbered:
        if doc["id"] in seen:
            raise _duplicate_id(doc["id"], seen[doc["id"]], position)
        seen[doc["id"]] = position
        yield position, doc


def check_unique_ids(hashes: array, documents: Callable[[], Iterable[dict]]) -> None:
    """Ids unique in the whole input, from the counting pass's 8-byte hashes (sorted here, in place): a set of the
    ids themselves took ~150 bytes a document, 15 GB for 100M, in the counting pass and again while scoring. A hash
    that repeats is looked at again in a pass over `documents()` holding only those ids, which names the two."""
    values = np.frombuffer(hashes, dtype=np.int64) if len(hashes) else np.zeros(0, dtype=np.int64)
    values.sort()
    repeated = set(values[1:][values[1:] == values[:-1]].tolist())
    if not repeated:
        return
    first: dict[str, int] = {}
    for position, doc in enumerate(documents()):
        if hash(doc["id"]) in repeated:
            if doc["id"] in first:
                raise _duplicate_id(doc["id"], first[doc["id"]], position)
            first[doc["id"]] = position


def _duplicate_id(doc_id: str, first: int, second: int) -> DocumentError:
    return DocumentError(f"duplicate document id {doc_id!r} (documents #{first + 1} and #{second + 1}): ids key the "
                         "resume cache and the output, so they must be unique (use --id-field to pick another field)")


def load_documents(inputs, text_field: str, id_field: str, sample: int | None, seed: int,
                   show_progress: bool = False, sampler: str = NESTED_SAMPLER) -> list[dict]:
    """The documents to score, ids checked (`unique_ids`), each its id and text only (all a row of the output
    holds; an input's other fields were held for the whole run: a FineWeb row's eight are ~15% of it); with
    `sample`, a reproducible uniform sample (`sample_documents`: of Parquet only the row groups holding it are read,
    other input streams)."""
    if sample is None:  # the whole input (an active pool of millions): counted as it is read
        numbered = enumerate(counted(iter_documents(inputs, text_field=text_field, id_field=id_field),
                                     "reading the documents", show_progress))
    else:
        if sample < 1:
            raise ValueError("--sample must be a positive number of documents")
        numbered = sample_documents(inputs, sample, seed, text_field=text_field, id_field=id_field,
                                    show_progress=show_progress, sampler=sampler)
    return [{"id": doc["id"], "text": doc["text"]} for _, doc in unique_ids(numbered)]


MAX_REFITS = 5  # cuts of one over-long document per run: halving 5 times fits a document 32x too long


def chars_to_fit(doc_chars: int, prompt_chars: int, overflow: ContextOverflow, max_tokens: int) -> int:
    """How many characters of the document to keep so that the prompt fits the context the server reported.

    From the server's numbers when it gave them (the prompt may take the context less max_tokens, less a tenth to
    spare, at this prompt's characters per token), else half the document. Zero or less: nothing would fit."""
    if overflow.context_tokens and overflow.prompt_tokens:
        budget_tokens = 0.9 * (overflow.context_tokens - max_tokens)
        chars_per_token = prompt_chars / overflow.prompt_tokens
        return doc_chars - (prompt_chars - int(budget_tokens * chars_per_token))
    return doc_chars // 2


class _Scorer:
    """Scores documents through one backend, replaying and filling the answer cache."""

    def __init__(self, backend, cache: AnswerCache, prompt: Prompt, max_chars, max_reasks: int, max_tokens: int):
        self.backend, self.cache, self.prompt = backend, cache, prompt
        self.max_chars, self.max_reasks, self.max_tokens = max_chars, max_reasks, max_tokens
        self.summary = ScoreSummary()

    def _answers_with_other_max_chars(self, doc_id: str, text: str, doc_chars: int) -> list:
        """The answers of a run apart only in --max-chars that held what this run sends: the same characters, or a
        cut to fit the server's context where this run starts from at least what that run was refused (and would be
        cut so again); stored under this run's settings too."""
        for their_max, answers in self.cache.answers_with_other_max_chars(doc_id, text):
            given = answers[-1][1]
            if given is None:
                continue
            refused = min(len(text), their_max or len(text))  # what that run sent first, longer than `given` if cut
            if given == doc_chars or (given < refused <= doc_chars and self.max_chars is not None):
                for attempt, (answer, _) in enumerate(answers):
                    self.cache.add(doc_id, text, attempt, answer, given)
                return answers
        return []

    async def score(self, doc: dict) -> dict:
        s = self.summary
        text = doc["text"]
        # characters of the document in the prompt: --max-chars, or what an earlier run cut it to so that it fits
        doc_chars = min(len(text), self.max_chars or len(text))
        stored = self.cache.answers(doc["id"], text) or self._answers_with_other_max_chars(doc["id"], text, doc_chars)
        if stored and stored[-1][1] is not None:
            doc_chars = stored[-1][1]
        score = error = response = finish_reason = None
        model = self.backend.model
        prompt_tokens = completion_tokens = None
        attempts = cut_off = 0
        refits = 0
        asked = False
        while attempts <= self.max_reasks:
            replayed = attempts < len(stored)
            if replayed:
                answer = stored[attempts][0]
                s.cached_answers += 1
            else:
                asked = True
                prompt_text, _ = self.prompt.render(text, doc_chars)
                try:
                    answer = await self.backend.complete(prompt_text)
                except RequestFailed as e:
                    error = e.reason
                    if e.overflow is not None and self.max_chars is not None and refits < MAX_REFITS:
                        # --max-chars allows cutting documents: ask again, cut to fit the server's context (from its
                        # numbers, one cut; a server that gives none, halved each time)
                        refits += 1
                        fit = chars_to_fit(doc_chars, len(prompt_text), e.overflow, self.max_tokens)
                        if 0 < fit < doc_chars:
                            doc_chars = fit
                            s.refits += refits == 1  # documents, however often each was cut
                            continue
                    break
                self.cache.add(doc["id"], text, attempts, answer, doc_chars)
                s.prompt_tokens += answer.prompt_tokens or 0
                s.completion_tokens += answer.completion_tokens or 0
            attempts += 1
            s.reasks += attempts > 1 and not replayed  # sent, as "requests sent" beside it
            response, finish_reason = answer.text, answer.finish_reason
            model = answer.model or model
            if answer.prompt_tokens is not None:
                prompt_tokens = (prompt_tokens or 0) + answer.prompt_tokens
            if answer.completion_tokens is not None:
                completion_tokens = (completion_tokens or 0) + answer.completion_tokens
            if finish_reason == "length":  # a cut answer may have been about to give another score: never parsed
                score, error = None, f"{CUT_OFF}: the answer reached --max-tokens {self.max_tokens} before its end"
                cut_off += 1
                if cut_off == 2:  # cut twice: asking again is unlikely to help
                    break
                continue
            score, error = parse_score(answer.text)
            if score is not None:
                break
        truncated = doc_chars < len(text)
        s.documents += 1
        s.truncated += truncated
        s.replayed += not asked
        if score is None:
            s.failed[failure_kind(error)] += 1
        else:
            s.scored += 1
            s.score_counts[score] += 1
        return {
            "id": doc["id"],
            "text": text,
            "score": score,
            "response": response,
            "error": error,
            "model": model,
            "prompt": self.prompt.version,
            "attempts": attempts,
            "truncated": truncated,
            "finish_reason": finish_reason,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
        }

    async def run(self, docs: Iterable[dict], workers: int, show_progress: bool, progress_every: float,
                  write: Callable[[list[dict]], None] | None = None, total: int | None = None) -> list[dict]:
        """Scores `docs` with `workers` requests in flight. Without `write` the rows come back in input order; with
        it they are handed to `write` in input order as they complete, holding at most MAX_AHEAD documents from the
        oldest unfinished one on, and none come back. `total` (default: len(docs)) sizes the progress bar."""
        from rich.console import Console

        if total is None and hasattr(docs, "__len__"):
            total = len(docs)
        rows: list[dict] = []
        numbered = enumerate(docs)
        finished: dict[int, dict] = {}
        read = written = 0
        ahead = MAX_AHEAD if write is not None else math.inf
        room = asyncio.Condition()
        start = time.perf_counter()
        s = self.summary
        # by earlier calls (rounds of select="active")
        done_before, scored_before, replayed_before = s.documents, s.scored, s.replayed

        in_flight = _IN_FLIGHT.get() or _InFlight()  # outside `_stopped_by_sigterm`: one no SIGTERM stops

        async def worker():
            nonlocal read, written
            while True:
                async with room:
                    await room.wait_for(lambda: read - written < ahead)
                    stopping = in_flight.stopping.is_set()
                    if not stopping:
                        item = next(numbered, None)
                        if item is None:
                            return
                        read += 1
                if stopping:  # SIGTERM: no new document; the run is cancelled once the answers in flight are in
                    await asyncio.Future()
                i, doc = item
                in_flight.started()
                try:
                    row = await self.score(doc)
                finally:
                    in_flight.ended()
                async with room:
                    finished[i] = row
                    block = []
                    while written in finished:
                        block.append(finished.pop(written))
                        written += 1
                    if block:
                        (write or rows.extend)(block)
                        room.notify_all()

        def counts() -> tuple[int, int]:
            """Documents of this call done so far, and how many of them failed."""
            done = s.documents - done_before
            return done, done - (s.scored - scored_before)

        def progress_line() -> str:
            (done, failed), seconds = counts(), time.perf_counter() - start
            replayed = s.replayed - replayed_before
            rate = (done - replayed) / seconds if seconds else 0.0  # what asking takes, not replaying the cache
            of = f"/{total:,}" if total is not None else ""
            cached = f" ({replayed:,} replayed from the cache)" if replayed else ""
            left = (f", {_duration((total - done) / rate)} left" if total is not None and rate > 0 and done < total
                    else "")
            return (f"scoring: {done:,}{of} documents{cached}, {failed:,} failed, {_rate(rate)} docs/s, "
                    f"{seconds:,.0f} s{left}")

        async def report(update, every: float):  # a few times a second or every few seconds, never per request
            while True:
                await asyncio.sleep(every)
                update()

        bar = None
        if not show_progress:
            update, every = (lambda: None), 3600.0
        elif Console().is_terminal:
            bar, update = self._progress_bar(total, counts)
            every = 0.2
            bar.start()
        else:  # a log file or a pipe: a plain line every few seconds

            def update():
                print(progress_line(), flush=True)

            every = progress_every
        tasks = [asyncio.create_task(worker()) for _ in range(max(1, min(workers, total if total else workers)))]
        ticker = asyncio.create_task(report(update, every))
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in (*tasks, ticker):
                t.cancel()
            await asyncio.gather(*tasks, ticker, return_exceptions=True)
            update()
            if bar is not None:
                bar.stop()
        return rows

    def _progress_bar(self, total: int | None, counts):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        from rich.progress import TimeRemainingColumn

        progress = Progress(
            TextColumn("[bold]scoring"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("[red]{task.fields[failed]} failed"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            refresh_per_second=4,  # rendering runs on its own thread at this rate, never per request
        )
        task = progress.add_task("scoring", total=total, failed=0)

        def update():
            done, failed = counts()
            progress.update(task, completed=done, failed=failed)

        return progress, update


SIGTERM_GRACE_S = 20.0  # answers in flight awaited after SIGTERM (Slurm's SIGKILL follows 30 s after, by default)


class _InFlight:
    """The requests being answered, and whether SIGTERM asked the run to stop: workers then take no new document."""

    def __init__(self):
        self.count = 0
        self.stopping = asyncio.Event()
        self.idle = asyncio.Event()
        self.idle.set()

    def started(self) -> None:
        self.count += 1
        self.idle.clear()

    def ended(self) -> None:
        self.count -= 1
        if not self.count:
            self.idle.set()


_IN_FLIGHT: contextvars.ContextVar[_InFlight | None] = contextvars.ContextVar("in_flight", default=None)


async def _stopped_by_sigterm(run):
    """Awaits `run`, which SIGTERM stops: no new document is sent, the answers in flight are awaited for up to
    SIGTERM_GRACE_S (a server mid-way through `--concurrency` long answers has computed them: cached, they are not
    paid again; a second SIGTERM stops at once), then `run` is cancelled and its servers are stopped on the way out
    (Python's default ends the process at once, leaving a launched vLLM running on its GPU), and the process exits
    143. Answers received are cached."""
    loop, task = asyncio.get_running_loop(), asyncio.current_task()
    terminated, waiting, in_flight = [], [], _InFlight()
    _IN_FLIGHT.set(in_flight)  # the scoring workers, created inside `run`, see it

    def cancel() -> None:
        terminated.append(True)
        task.cancel()

    async def cancel_once_answered() -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(in_flight.idle.wait(), SIGTERM_GRACE_S)
        cancel()

    def stop() -> None:
        if in_flight.stopping.is_set() or not in_flight.count:
            return cancel()
        in_flight.stopping.set()
        print(f"SIGTERM: sending no new document; waiting up to {SIGTERM_GRACE_S:.0f} s for the {in_flight.count} "
              "answers in flight, which are cached (SIGTERM again stops at once)", file=sys.stderr, flush=True)
        waiting.append(loop.create_task(cancel_once_answered()))  # held: a task only the loop refers to may go

    previous = signal.getsignal(signal.SIGTERM)
    try:
        loop.add_signal_handler(signal.SIGTERM, stop)
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals here
        return await run
    try:
        return await run
    except asyncio.CancelledError:
        if terminated:
            raise SystemExit(128 + signal.SIGTERM) from None
        raise
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        if previous is not None:  # None: set outside Python, left as asyncio leaves it
            signal.signal(signal.SIGTERM, previous)  # a caller's own handler (a notebook's, a worker's) back


def _unreplayed_note(cache: AnswerCache) -> str | None:
    """What a run that replays nothing of its own should know when its cache holds answers given with other settings:
    a local model moved to another path (a job's scratch folder) is another model to the cache, and every document is
    asked again, paid again; answers of another --max-chars are replayed where they fit."""
    def differing(settings: dict) -> list[str]:
        return sorted(k for k in set(settings) | set(cache.settings) if settings.get(k) != cache.settings.get(k))

    if cache.other_max_chars:
        said = ", ".join(sorted({"none" if m is None else f"{m:,}" for m in cache.other_max_chars.values()}))
        return (f"{cache.path} holds answers given with --max-chars {said}: each is replayed where this run's prompt "
                "would hold what its prompt held")
    others = cache.other_runs()
    if not others:
        return None
    settings, answers = min(others, key=lambda run: (len(differing(run[0])), -run[1]))  # the closest, then the most
    changed = differing(settings)
    said = ", ".join(f"{k} {settings.get(k)!r} then, {cache.settings.get(k)!r} now" for k in changed[:3])
    hint = (" A model moved or renamed is another model to it: give it under its old name (a server edu-filter "
            "starts: --server-arg served-model-name=OLD) to replay them." if "model" in changed else "")
    return (f"{cache.path} holds {answers:,} answers given with other settings ({said}); none is replayed, every "
            f"document is asked again.{hint}")


def _openai_backend(cfg: ScoreConfig, base_url) -> OpenAIBackend:
    return OpenAIBackend(base_url, cfg.model, settings=cfg.generation(), api=cfg.api,
                         api_key=os.environ.get(cfg.api_key_env), concurrency=cfg.concurrency, timeout=cfg.timeout,
                         max_retries=cfg.max_retries, retry_backoff=cfg.retry_backoff)


async def _check_endpoint(cfg: ScoreConfig) -> str:
    """The servers answer, take the key and serve the model: a wrong URL, key or --model was said only after the
    whole input was read (hours for a TB, the pool's embeddings for --select active). Returns the model's name as
    they serve it (the answer cache's key)."""
    async with _openai_backend(cfg, cfg.base_urls()) as backend:
        return backend.model


async def _score_async(docs, cfg: ScoreConfig, cache_path: Path, cache_settings: dict, prompt: Prompt,
                       active=None, write: Callable[[list[dict]], None] | None = None, total: int | None = None,
                       sampler: str | None = None):
    """`sampler`: how `docs` were drawn (`--sample`), recorded in the cache for later runs to draw the same way."""
    async with AsyncExitStack() as stack:
        if cfg.backend == "transformers":
            backend = await stack.enter_async_context(TransformersBackend(
                cfg.model, settings=cfg.generation(), api=cfg.api, batch_size=cfg.concurrency, device=cfg.device,
                seed=cfg.seed))
        else:
            base_url = cfg.base_urls()
            if cfg.backend in SERVER_BACKENDS:
                # beside the answer cache: <output>.server-logs/ (the cache is <output>.cache.sqlite by default)
                logs = cache_path.with_name(cache_path.name.removesuffix(".cache.sqlite") + ".server-logs")
                for log in logs.glob("*.log"):  # the crash a rerun goes on after: datatrove writes its log anew
                    log.replace(log.with_name(log.name + ".previous"))
                base_url = await stack.enter_async_context(managed_server(cfg.server(str(logs))))
            backend = await stack.enter_async_context(_openai_backend(cfg, base_url))
        if cfg.show_progress:
            for note in backend.notes:
                print(f"note: {note}", file=sys.stderr, flush=True)
        # keyed by the model the server actually serves, not by a name it ignores
        cache = stack.enter_context(AnswerCache(cache_path, {**cache_settings, "model": backend.model}))
        answered_earlier = cache.count() > 0 or bool(cache.other_max_chars)
        if cache.count() == 0 and (note := _unreplayed_note(cache)):
            print(f"note: {note}", file=sys.stderr, flush=True)
        if isinstance(backend, OpenAIBackend):
            backend.answered_earlier = answered_earlier
        if sampler is not None:  # what a later --sample run on this cache must draw with
            cache.record_fact(SAMPLER, sampler)
        holds_saved_work(cache_path)  # LLM answers from here on: a bad input found later must not remove them
        scorer = _Scorer(backend, cache, prompt, cfg.max_chars, cfg.reasks(), cfg.max_tokens)

        workers = getattr(backend, "capacity", cfg.concurrency)  # every server's places filled

        async def score(batch, **streaming):
            return await scorer.run(batch, workers, cfg.show_progress, cfg.progress_every, **streaming)

        if active is None:
            rows = await score(docs, write=write, total=total)
        else:
            rows = await active.run(score, cache, _announce_round if cfg.show_progress else None,
                                    note=lambda said: print(f"note: {said}", file=sys.stderr, flush=True))
    s = scorer.summary
    s.requests, s.retries = backend.stats.requests, backend.stats.retries
    s.model, s.notes = backend.model, backend.notes
    if len(getattr(backend, "endpoints", ())) > 1:
        s.servers = backend.answers_per_server()
    if backend.stats.concurrency is not None and backend.stats.concurrency < cfg.concurrency:
        s.concurrency = backend.stats.concurrency
    return rows, s


def _active_annotation(docs, cfg: ScoreConfig, kind: str, cache_path: Path, cache_settings: dict):
    """The rounds over the pool, with its frozen-encoder embeddings (through `train`'s embedding cache) computed at
    the first round that is drawn, not replayed.

    A pool changed since its draws were recorded is refused here already, before the embeddings and the server (a
    vLLM launch takes minutes), when the model's name (`cache_settings`' model: the one a server answered under,
    else --model) fixes the answer run's key; `ActiveAnnotation.run` checks again with the name the server gives."""
    from edu_filter.classifiers.device import release_device_memory
    from edu_filter.classifiers.frozen_encoder import load_frozen_encoder
    from edu_filter.classifiers.metrics import MAIN_THRESHOLD

    threshold = MAIN_THRESHOLD[kind]

    def encoder():
        # float32 on any device: the recorded draws are keyed by the embeddings' settings, so a run started on a GPU
        # resumes on a CPU (and runs from before bfloat16 training resume) without drawing again
        return load_frozen_encoder(kind, cfg.encoder, max_length=cfg.max_length, cache_dir=cfg.embedding_cache,
                                   dtype="float32")

    loaded = [encoder()]  # kept for the embedding if a round is drawn now; else let go before the server starts
    embedding_key, encoder_name = loaded[0].key, loaded[0].model.config.encoder_name
    pool = pool_fingerprint(docs)
    recorded = 0
    if cache_settings.get("model") is not None:
        settings = selection_settings(cfg.sample, cfg.rounds, cfg.seed_size, cfg.seed, threshold, embedding_key)
        key = selection_key(settings, run_key(cache_settings))
        refuse_another_pool(recorded_selection_pool(cache_path, key), pool, cache_path)
        recorded = recorded_selection_rounds(cache_path, key)

    def embeddings():
        frozen = loaded.pop() if loaded else encoder()
        vectors = frozen.embed([doc["text"] for doc in docs])
        del frozen
        release_device_memory()  # not held through the run: a GPU's memory, where a vLLM server starts next
        return vectors

    active = ActiveAnnotation(docs, embeddings, cfg.sample, cfg.rounds, cfg.seed_size, cfg.seed, threshold=threshold,
                              embedding_key=embedding_key, encoder=encoder_name, pool=pool)
    # a round to draw: the pool embedded and clustered now, before the server takes the GPU (and the time counted as
    # preparing); a rerun replaying every round from the cache embeds nothing (hours for millions of documents)
    if recorded < active.selector.rounds:
        active.selector.prepare()
    loaded.clear()
    release_device_memory()
    return active


def _announce_round(round_index: int, rounds: int, n: int, replayed: bool) -> None:
    how = "replayed from the cache" if replayed else ("drawn uniformly" if round_index == 0 else
                                                       "drawn by the classifier trained so far")
    print(f"round {round_index + 1}/{rounds}: {n:,} documents {how}", file=sys.stderr, flush=True)


class ScoreOutput:
    """The output, written as rows arrive to `path` (a hidden name, renamed to `shown` at the end): JSONL (.gz) line
    by line, Parquet a row group at a time with the fixed OUTPUT_SCHEMA types (and the active columns). A run that
    raises leaves no file behind; one that cannot write (a full disk) says so, naming the output."""

    ROW_GROUP = 10_000

    def __init__(self, path: Path, active: bool = False, shown: Path | None = None):
        self.path, self.active, self.shown = Path(path), active, shown or Path(path)
        self.parquet = self.path.name.lower().endswith(".parquet")

    def __enter__(self) -> ScoreOutput:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.parquet:
            import polars as pl
            import pyarrow.parquet as pq

            columns = {**OUTPUT_SCHEMA, **ACTIVE_COLUMNS} if self.active else OUTPUT_SCHEMA
            self.schema = {name: getattr(pl, kind) for name, kind in columns.items()}
            self.buffer: list[dict] = []
            self.writer = pq.ParquetWriter(self.path, pl.DataFrame(schema=self.schema).to_arrow().schema,
                                           compression="zstd")
        else:
            self.file = (gzip.open if self.path.name.lower().endswith(".gz") else open)(self.path, "wb")
        return self

    def write(self, rows: list[dict]) -> None:
        """Any number of rows, encoded ROW_GROUP at a time (an active run writes its whole sample at once)."""
        try:
            self._write(rows)
        except OSError as e:
            raise self._cannot_write(e) from None

    def _cannot_write(self, error: OSError) -> RunError:
        return RunError(f"the output {self.shown} cannot be written ({error.strerror or error}): the answers received "
                        "are in the cache; free disk space, then run the same command again (it asks for no answer "
                        "it has)")

    def _write(self, rows: list[dict]) -> None:
        for start in range(0, len(rows), self.ROW_GROUP):
            part = rows[start:start + self.ROW_GROUP]
            if not self.parquet:
                self.file.write(b"".join(orjson.dumps(r, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n" for r in part))
                continue
            self.buffer += part
            while len(self.buffer) >= self.ROW_GROUP:
                self._flush(self.ROW_GROUP)

    def _flush(self, rows: int | None = None) -> None:
        """Writes `rows` buffered rows (None: all) as one row group."""
        import polars as pl

        if self.buffer:
            rows = len(self.buffer) if rows is None else rows
            part, self.buffer = self.buffer[:rows], self.buffer[rows:]
            self.writer.write_table(pl.DataFrame(part, schema=self.schema).to_arrow())

    def __exit__(self, exc_type, exc, tb) -> None:
        closed = False
        try:  # closing writes what is buffered: a full disk raises here too, and the partial file went on filling it
            if self.parquet:
                if exc_type is None:
                    self._flush()
                self.writer.close()
            else:
                self.file.close()
            closed = True
        except OSError as e:
            raise self._cannot_write(e) from None
        finally:
            if exc_type is not None or not closed:
                self.path.unlink(missing_ok=True)


def score_command(inputs: list[str] | None, output: str | os.PathLike | None, config: ScoreConfig,
                  show_prompt: str | None = None, given: Iterable[str] = ()) -> ScoreSummary | None:
    """`edu-filter score`: prints the prompt `show_prompt` names, which is given alone (`given`: the other options
    given, by parameter name), or scores `inputs` into `output` (`score_documents`)."""
    if show_prompt is not None:
        given = list(given)
        if given:
            raise InputError("--show-prompt prints a prompt and exits: give it alone, without "
                             + ", ".join("DATA" if name == "data" else "--" + name.replace("_", "-") for name in given))
        from edu_filter.annotate.prompts import show_prompt as print_prompt

        print_prompt(show_prompt)
        return None
    if not inputs or output is None:
        raise InputError("give input DATA and -o OUTPUT (or --show-prompt NAME)")
    return score_documents(inputs, output, config)


def score_documents(
    inputs: str | os.PathLike | list[str], output: str | os.PathLike, config: ScoreConfig | None = None, **settings
) -> ScoreSummary:
    """Annotate documents with an LLM; write one row per document to `output`; print and return a summary.

    `config` holds the settings (see `ScoreConfig`); keyword `settings` override its fields, so
    `score_documents(docs, "out.jsonl", backend="transformers", model=...)` works without building one.

    `model` may be left out only for `backend="openai"` against a server that serves exactly one model.
    Re-running the same call resumes from the answer cache (default: `<output>.cache.sqlite`). When output is not
    a terminal, a plain progress line is printed every `progress_every` seconds.

    `select="active"` spends the `sample` budget in `rounds` (the first of `seed_size` documents, uniform) chosen
    with the frozen encoder of `train` (`kind`: web or code, default from the prompt; `encoder`, `max_length`,
    `embedding_cache` as in `train`) and writes `round` and `weight` on every row.
    """
    inputs = path_list(inputs)
    cfg = replace(config or ScoreConfig(), **settings)
    cfg.check()
    output = Path(output)
    _check_output(output)
    cache_path = Path(cfg.cache) if cfg.cache is not None else output.with_name(output.name + ".cache.sqlite")
    check_writable_output(output, "-o/--output", file=True)
    check_writable_output(cache_path, "--cache", file=True)
    if cache_path.resolve() == output.resolve():  # the finished output would replace the answers it was made from
        raise InputError(f"--cache {cache_path} is the -o/--output file: give the cache another name")
    refuse_output_among_inputs(inputs, {"-o/--output": output, "--cache": cache_path})
    check_answer_cache(cache_path)
    # two runs wrote one partial file at once, and paid twice; two outputs of one cache paid twice too, the later
    # answer replacing the earlier one the first output holds
    with writing_alone(output, "-o/--output"), writing_alone(cache_path, "--cache"):
        return _score_alone(inputs, output, cfg, cache_path)


def _score_alone(inputs: list, output: Path, cfg: ScoreConfig, cache_path: Path) -> ScoreSummary:
    """`score_documents` once its settings are checked, the only run writing `output`."""
    began = time.perf_counter()
    the_prompt = load_prompt(cfg.prompt)
    cache_settings = {"prompt": the_prompt.version, "api": cfg.api, "max_chars": cfg.max_chars,
                      **cfg.generation().as_dict()}
    active = sampler = None
    with contextlib.closing(iter_documents(inputs, cfg.text_field, cfg.id_field)) as documents:
        if next(documents, None) is None:  # an empty input, a first row without the fields: said at once
            raise DocumentError(f"no documents to score in {', '.join(map(str, inputs))}")
    served = cfg.served_model_name()  # the name a server this run starts (or the transformers backend) answers under
    if cfg.backend not in (*SERVER_BACKENDS, "transformers"):  # those are started later, by this run
        served = asyncio.run(_check_endpoint(cfg))
    if cfg.select == "active":
        kind = cfg.kind or ("code" if the_prompt.version == BUNDLED["code"] else "web")
        docs = load_documents(inputs, cfg.text_field, cfg.id_field, None, cfg.seed, cfg.show_progress)  # the pool
        total = len(docs)
        active = _active_annotation(docs, cfg, kind, cache_path, {**cache_settings, "model": served}) if docs \
            else None
    elif cfg.sample is not None:
        # the cache's answers were to a sample drawn the older way: a resumed run draws that sample again
        sampler = recorded_sampler(cache_path) or NESTED_SAMPLER
        if sampler == LEGACY_SAMPLER and cfg.show_progress:
            print(f"note: {cache_path} holds answers from an edu-filter that drew samples another way; this run "
                  "draws its sample that way too (another --cache draws samples that a larger --sample keeps)",
                  file=sys.stderr, flush=True)
        docs = load_documents(inputs, cfg.text_field, cfg.id_field, cfg.sample, cfg.seed, cfg.show_progress,
                              sampler=sampler)
        total = len(docs)
    else:
        docs = DocumentStream(inputs, cfg.text_field, cfg.id_field, cfg.show_progress)
        total = docs.total
    used = provenance.describe_inputs({"documents": inputs,
                                       "prompt": cfg.prompt if Path(cfg.prompt).is_file() else None})

    start = time.perf_counter()
    # Written to a hidden file as scored, then renamed: a killed run leaves no half output, and the same command
    # writes it again, replaying the answers from the cache.
    partial = output.with_name(f".partial-{output.name}")
    with ScoreOutput(partial, active is not None, shown=output) as out:
        rows, summary = asyncio.run(_stopped_by_sigterm(_score_async(
            docs, cfg, cache_path, cache_settings, the_prompt, active, write=out.write if active is None else None,
            total=total, sampler=sampler)))
        if active is not None:
            out.write(rows)
    summary.seconds, summary.prepared_seconds = time.perf_counter() - start, start - began
    summary.output, summary.cache = str(output), str(cache_path)
    os.replace(partial, output)
    selection = {"select": cfg.select}
    if active is not None:
        sizes = active.selector.sizes
        w = [r["weight"] for r in rows]
        summary.selection = (f"active from {total:,} documents: {len(sizes)} rounds "
                             f"({', '.join(str(n) for n in sizes)}), weights {min(w):.2f}-{max(w):.2f}")
        selection.update({"rounds": sizes, "pool_size": total, "kind": kind,
                          "encoder": active.encoder, "max_length": cfg.max_length,
                          "threshold": active.selector.threshold, "uniform_share": active.selector.uniform_share})
    provenance.record_provenance(output, kind="annotations", inputs=used, settings={
        "prompt": the_prompt.version, "model": summary.model, "backend": cfg.backend,
        "base_url": urls[0] if len(urls := cfg.base_urls()) == 1 else (urls or None),
        "api": cfg.api, "temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens,
        "max_chars": cfg.max_chars, "max_reasks": cfg.max_reasks, "sample": cfg.sample, "seed": cfg.seed,
        **({"sampler": sampler} if sampler else {}),  # a cache of older answers keeps the older way of drawing
        "text_field": cfg.text_field, "id_field": cfg.id_field, "documents": summary.documents,
        "scored": summary.scored, **selection,
    })
    if cfg.show_progress:
        print_summary(summary)
    return summary


def print_summary(summary: ScoreSummary) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="score summary", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("model", summary.model)
    if summary.selection:
        table.add_row("selection", summary.selection)
    table.add_row("documents", f"{summary.documents:,}")
    table.add_row("scored", f"{summary.scored:,}")
    for reason, n in summary.failed.most_common():
        table.add_row(f"failed: {reason}", f"[red]{n:,}")
    table.add_row("scores 0..5", " ".join(f"{k}:{summary.score_counts.get(k, 0)}" for k in range(MAX_SCORE + 1)))
    table.add_row("truncated (--max-chars)", f"{summary.truncated:,}")
    if summary.refits:
        table.add_row("asked again cut to fit the context", f"{summary.refits:,}")
    table.add_row("answers reused from cache", f"{summary.cached_answers:,}"
                  + (f" ({summary.replayed:,} documents asked nothing)" if summary.replayed else ""))
    table.add_row("requests sent (retries)", f"{summary.requests:,} ({summary.retries:,})")
    for url, (answers, lost) in summary.servers.items():
        table.add_row(f"answers from {url}",
                      f"{answers:,}" + (f" [yellow]({lost:,} tries unanswered or answered 5xx)" if lost else ""))
    if summary.concurrency is not None:
        table.add_row("concurrency (server behind, or 429)", f"[yellow]backed off to {summary.concurrency}")
    table.add_row("re-asks after unusable answers", f"{summary.reasks:,}")
    table.add_row("tokens prompt / completion (sent)", f"{summary.prompt_tokens:,} / {summary.completion_tokens:,}")
    table.add_row("time", f"{summary.prepared_seconds + summary.seconds:.1f} s: {summary.prepared_seconds:.1f} s "
                  f"reading{' and embedding' if summary.selection else ''}, then {summary.seconds:.1f} s asking "
                  f"({_rate(summary.docs_per_second)} docs/s)")
    table.add_row("output", summary.output)
    table.add_row("cache", summary.cache)
    Console().print(unclipped(table))
    failed = summary.documents - summary.scored
    if summary.selection and failed:
        print(f"warning: {failed:,} documents of the active sample have no score, and train refuses rows without "
              "one: run the same command again to ask again only for those (answers that were unusable need a "
              "larger --max-reasks, re-asked above --temperature 0); dropping them would skew the sample's weights",
              file=sys.stderr, flush=True)
