"""Where answers come from: an OpenAI-compatible HTTP endpoint, a server we start (vLLM, SGLang, a script) or a
small transformers model in-process.

Every backend exposes the same coroutine, `complete(prompt) -> Answer`, so caching, re-asks and output are written
once in `score.py`. A per-document failure raises `RequestFailed` (recorded in that document's row); a failure that
would hit every document raises `BackendError` and stops the run. Found at start-up, before any document is asked
(wrong URL, bad key, unknown model), it is a `BackendSetupError`: bad usage, which the command line exits 2 on.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import random
import re
import threading
import time
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Sequence

import orjson

from edu_filter.annotate.cache import Answer
from edu_filter.annotate.parse import REASONING_START
from edu_filter.documents import InputError, RunError, one_line


@dataclass(frozen=True)
class GenerationSettings:
    """Sampling settings; the defaults are FineWeb-Edu's annotation settings."""

    temperature: float = 0.6
    top_p: float = 0.95
    max_tokens: int = 256

    def as_dict(self) -> dict:
        """As they key the answer cache: a library call's `temperature=0` is the command line's 0.0."""
        return {"temperature": float(self.temperature), "top_p": float(self.top_p),
                "max_tokens": int(self.max_tokens)}


@dataclass(frozen=True)
class ContextOverflow:
    """A server's "the prompt does not fit": its context and the prompt's length in tokens, where it said them."""

    context_tokens: int | None = None
    prompt_tokens: int | None = None


class RequestFailed(Exception):
    """One document's request failed for good (after retries); `reason` goes into its row.

    `overflow` is set when the server refused the prompt as longer than its context."""

    def __init__(self, reason: str, overflow: ContextOverflow | None = None):
        super().__init__(reason)
        self.reason = reason
        self.overflow = overflow


class BackendError(RunError):
    """The backend cannot answer any document any more (a server that stopped, a key revoked mid-run)."""


class BackendSetupError(BackendError, InputError):
    """The backend cannot be used as configured, found before any document is asked: an unreachable --base-url,
    a bad API key, a model the server does not serve, a model that cannot be loaded."""


@dataclass
class RequestStats:
    requests: int = 0  # HTTP requests (or generations) actually sent, retries included
    retries: int = 0
    concurrency: int | None = None  # requests allowed in flight at the end (lower than asked after backing off)


# --------------------------------------------------------------------------------------------------------------------
# OpenAI-compatible HTTP endpoint
# --------------------------------------------------------------------------------------------------------------------
_FATAL_STATUSES = {401: "authentication failed", 403: "permission denied", 404: "not found"}
# OpenAI, vLLM, SGLang, llama.cpp; TGI: "`inputs` tokens + `max_new_tokens` must be <= N" / "must have less than N
# tokens"
_OVERFLOW_MESSAGE = re.compile(r"context (?:length|window|size)|maximum context|inputs. tokens \+ .max_new_tokens. "
                               r"must be <=|inputs. must have less than \d+ tokens", re.IGNORECASE)


def _first_int(pattern: str, text: str) -> int | None:
    match = re.search(pattern, text, re.IGNORECASE)
    return int(match.group(1)) if match else None


def read_error(raw: bytes) -> tuple[str | None, str, ContextOverflow | None]:
    """(code, message, overflow) of an error body: OpenAI's `{"error": {"code", "message", "type"}}`, vLLM's
    top-level `{"message", "type", "code": 400}`, llama.cpp's `n_ctx` / `n_prompt_tokens`, or plain text.

    The code is the error's string code (`context_length_exceeded`), never a repeated HTTP status."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        data = None
    error = data.get("error", data) if isinstance(data, dict) else None
    if isinstance(error, str):
        error = {"message": error}
    if not isinstance(error, dict):
        return None, one_line(raw.decode("utf-8", "replace")) or "(empty body)", None
    code = error.get("code")
    code = code.strip() if isinstance(code, str) and code.strip() and not code.strip().isdigit() else None
    message = str(error.get("message") or error.get("detail") or raw.decode("utf-8", "replace"))
    overflow = None
    if (code == "context_length_exceeded" or error.get("type") == "exceed_context_size_error"
            or _OVERFLOW_MESSAGE.search(message)):
        # OpenAI, vLLM: "maximum context length is N tokens ... (P in the messages" / "has P input tokens"; SGLang and
        # newer vLLM: "maximum context length of N tokens ... P tokens from the input messages", or "The input (P
        # tokens) is longer than the model's context length (N tokens)"
        overflow = ContextOverflow(
            context_tokens=error.get("n_ctx")
            or _first_int(r"maximum context length (?:is|of) (\d+)", message)
            or _first_int(r"context length \((\d+) tokens\)", message)
            or _first_int(r"context size \((\d+) tokens\)", message)
            or _first_int(r"must be <= (\d+)", message)
            or _first_int(r"must have less than (\d+) tokens", message),
            prompt_tokens=error.get("n_prompt_tokens")
            or _first_int(r"(\d+) in the (?:messages|prompt)", message)
            or _first_int(r"(\d+) (?:input|prompt) tokens", message)
            or _first_int(r"(\d+) tokens from the input", message)
            or _first_int(r"input \((\d+) tokens\)", message)
            or _first_int(r"Given: (\d+)", message)
            or _first_int(r"resulted in (\d+) tokens", message)  # OpenAI's wording for chat requests
            or _first_int(r"request \((\d+) tokens\)", message),  # llama.cpp's, without its JSON fields
        )
    return code, one_line(message) or "(empty message)", overflow


def _model_ids(raw: bytes) -> list[str] | None:
    """The model ids of a `/models` answer (`{"data": [{"id": ...}]}`), or None when it is not such a list."""
    try:
        return [str(m["id"]) for m in orjson.loads(raw)["data"]]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None


class InFlightLimit:
    """How many requests may be in flight: the asked concurrency, halved when the server falls behind and grown back
    one at a time while it keeps up (as TCP sizes its window), so a few slow requests in a day-long run do not cut it
    for good.

    `shrink(generation)` halves the limit, once per generation: requests sent before the last shrink were queued
    under the old limit and say nothing about the new one. `kept_up()`, for each answer in time, adds one place
    after GROW_AFTER x limit such answers in a row."""

    GROW_AFTER = 4

    def __init__(self, limit: int):
        self.asked = limit
        self.limit = limit
        self.in_flight = 0
        self.generation = 0
        self.on_time = 0  # answers in time since the limit last changed
        self._waiters: list[asyncio.Future] = []

    async def __aenter__(self) -> InFlightLimit:
        while self.in_flight >= self.limit:  # only after a shrink: there are never more workers than the asked limit
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter
        self.in_flight += 1
        return self

    async def __aexit__(self, *exc) -> None:
        self.in_flight -= 1
        self._wake()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:  # all of them look again: a cancelled one cannot swallow the free place
            if not waiter.done():
                waiter.set_result(None)

    def shrink(self, generation: int) -> None:
        if generation == self.generation and self.limit > 1:
            self.limit = max(1, self.limit // 2)
            self.generation += 1
            self.on_time = 0

    def kept_up(self) -> None:
        self.on_time += 1
        if self.limit < self.asked and self.on_time >= self.GROW_AFTER * self.limit:
            self.limit += 1
            self.on_time = 0
            self._wake()


@dataclass
class Endpoint:
    """One server of the model: its requests in flight, when it last answered, and whether it is left out for now."""

    base_url: str
    concurrency: int
    requests: int = 0  # sent to it, retries included
    answers: int = 0  # 200 answers it gave
    lost: int = 0  # tries it did not answer (connection errors, timeouts)
    lost_in_a_row: int = 0  # times it was left out since it last answered
    benched_at: float = 0.0  # monotonic time it was last left out
    benched_until: float = 0.0  # monotonic time before which it gets no new request while another server can take it
    last_answer: float = 0.0  # monotonic time of its last 200 answer
    last_useful: float = 0.0  # monotonic time of its last answer that was no 408, 429 or 5xx (set on entry)
    paused_until: float = 0.0  # monotonic time before which it gets no request (it answered 429)
    limit: InFlightLimit = field(init=False)

    def __post_init__(self):
        self.limit = InFlightLimit(self.concurrency)


BENCH_MAX_S = 60.0  # the longest a server that stopped answering is left out before one request tries it again
# The run stops when no server has given a usable answer for SILENCE_MIN_S (or SILENCE_TIMEOUTS x --timeout, if
# longer) and, since the last one, as many documents as it has requests in flight (3 at least) failed for good: one
# document the server cannot answer fails alone, however long its retries take
SILENCE_MIN_S = 600.0
SILENCE_TIMEOUTS = 5
SILENCE_MIN_DOCUMENTS = 3
RETRY_AFTER_MAX_S = 3600.0  # a server's Retry-After is honoured up to this (a minute's quota, "back in N minutes")
RATE_LIMITED_TRIES = 20  # 429 answers a document may get on top of its --max-retries: a quota is waited out
# The run stops when, before any server gave one answer, this many documents in a row (or as many as are in flight,
# if more) were refused with the same error: a setting the server does not take, not a document it cannot answer
REFUSED_MIN_DOCUMENTS = 20


class OpenAIBackend:
    """Async client for `/v1/chat/completions` or `/v1/completions` of one server, or of several serving one model.

    One aiohttp session and connection pool for the whole run, requests serialised with orjson, bounded in-flight
    requests (`concurrency` per server), and retries with exponential backoff and jitter on 408, 429, 5xx, timeouts
    and connection errors (honouring `Retry-After`). The API key goes to every route.

    Several servers (`base_url` a list: vLLM replicas on several nodes, say) are used as one: each request goes to
    the server with the most free places. A server that does not answer (refused connection, dropped connection,
    timeout) is left out for 1 s, then 2, 4 ... up to a minute between single tries, and the request goes at once to
    another server, without using up its retries; so a server lost mid-run costs no document.

    On entry `/models` is read once per server: a `model` a server does not serve is refused naming what it serves,
    unless it serves exactly one model (llama.cpp serves one under any name), whose name is then used; `model=None`
    takes that one model. Servers that would answer with different models are refused: one run's labels come from
    one model. `self.model` is the name used, `self.notes` says when it is not the one asked for.

    Timeouts: a request is abandoned (and retried) only when its server has sent no answer at all for `timeout`
    seconds since it was sent. A request older than `timeout` while other answers keep arriving is queued behind
    them (a one-request-at-a-time server with many requests in flight): it keeps waiting and the number of requests
    in flight to that server is halved instead, so the queue fits in the timeout without throwing away work the
    server will do.
    """

    def __init__(
        self,
        base_url: str | Sequence[str],
        model: str | None,
        settings: GenerationSettings = GenerationSettings(),
        api: str = "chat",
        api_key: str | None = None,
        concurrency: int = 16,
        timeout: float = 120.0,
        max_retries: int = 5,
        retry_backoff: float = 1.0,
        max_backoff: float = 60.0,
    ):
        if api not in ("chat", "completion"):
            raise InputError(f"api must be 'chat' or 'completion', got {api!r}")
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        if not urls:
            raise InputError("no server to ask: give a base URL")
        self.path = "/chat/completions" if api == "chat" else "/completions"
        self.endpoints = [Endpoint(url, concurrency) for url in dict.fromkeys(u.rstrip("/") for u in urls)]
        self.model = model
        self.api = api
        self.settings = settings
        self.concurrency = concurrency
        self.capacity = concurrency * len(self.endpoints)  # requests in flight over all servers
        self.timeout = timeout
        self.max_retries = max_retries
        self.retry_backoff = retry_backoff
        self.max_backoff = max_backoff
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.notes: list[str] = []
        self.stats = RequestStats(concurrency=concurrency)
        self.failed_in_a_row = 0  # documents failed for good since a server last gave a usable answer
        self.refused = ("", 0)  # the reason documents were refused (400, 422...) before any answer, and how many in a row
        self.answered_earlier = False  # an earlier run's answers with these settings are cached: a 400 is a document's
        self._session = None

    async def __aenter__(self) -> OpenAIBackend:
        import aiohttp

        # each server's own limit keeps its places: aiohttp's per-host one would share them between servers behind
        # one gateway (https://gw/node1/v1, https://gw/node2/v1), queueing requests into --timeout
        connector = aiohttp.TCPConnector(limit=self.capacity, limit_per_host=0, ttl_dns_cache=300)
        # no total timeout on the session: `_send` decides when a request is abandoned
        self._session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None))
        try:
            served = [await self._served_models(e.base_url) for e in self.endpoints]
            self.model = self._choose_model(served)
        except BaseException:
            await self._session.close()
            raise
        self._base_body = {"model": self.model, **self.settings.as_dict()}
        now = time.monotonic()
        for endpoint in self.endpoints:
            endpoint.last_useful = now
        return self

    async def __aexit__(self, *exc) -> None:
        self.stats.requests = sum(e.requests for e in self.endpoints)
        self.stats.concurrency = min(e.limit.limit for e in self.endpoints)
        await self._session.close()

    def _fatal(self, url: str, status: int, raw: bytes, at_start: bool = False) -> BackendError:
        _, message, _ = read_error(raw)
        hint = "Check --base-url (it usually ends in /v1), --model and the API key variable"
        if status == 401 and "Authorization" not in self.headers:
            hint = "No API key was sent: put it in the variable --api-key-env names (default OPENAI_API_KEY)"
        error = BackendSetupError if at_start else BackendError
        return error(f"{url} answered {status} ({_FATAL_STATUSES[status]}): {message}. {hint}.")

    async def _served_models(self, base_url: str) -> list[str] | None:
        """The model ids the server lists; None when it answers but gives no list."""
        import aiohttp

        url = base_url + "/models"
        reason = ""
        for retry in range(self.max_retries + 1):
            retry_after = None
            try:
                timeout = aiohttp.ClientTimeout(total=self.timeout)
                async with self._session.get(url, headers=self.headers, timeout=timeout) as resp:
                    status, raw, retry_after = resp.status, await resp.read(), resp.headers.get("Retry-After")
            except aiohttp.ClientConnectorError as e:  # fail fast on a wrong URL instead of retrying every document
                raise BackendSetupError(f"cannot reach {base_url}: {e}") from e
            except asyncio.TimeoutError:
                reason = f"no answer within {self.timeout:g}s"
            except aiohttp.ClientError as e:
                reason = f"{type(e).__name__}: {e}"
            else:
                if status == 200:
                    return _model_ids(raw)
                if status == 404 and self.model is not None:
                    # some gateways serve completions without a model list: the first request tells whether the
                    # URL and the name are right (its 404 stops the run as this one would)
                    self.notes.append(f"{url} answered 404: no model list to check --model {self.model!r} against")
                    return None
                if status in _FATAL_STATUSES:
                    raise self._fatal(url, status, raw, at_start=True)
                if status not in (408, 429) and status < 500:
                    raise BackendSetupError(f"{url} answered {status}: {read_error(raw)[1]}")
                reason = f"http {status}: {read_error(raw)[1]}"
            if retry < self.max_retries:
                await asyncio.sleep(self._delay(retry, retry_after))
        raise BackendSetupError(f"{url} did not answer: {reason} (gave up after {self.max_retries + 1} tries)")

    def _model_of(self, base_url: str, served: list[str] | None) -> str:
        """The name to ask `base_url` for: the asked model, or the one model it serves."""
        if not served:
            if self.model is None:
                raise BackendSetupError(f"{base_url}/models lists no model: name the model with --model")
            return self.model
        if self.model in served:
            return self.model
        if len(served) == 1:
            if self.model is not None:
                self.notes.append(f"{base_url} serves only {served[0]!r}; using that name instead of "
                                  f"--model {self.model!r}")
            return served[0]
        listed = ", ".join(repr(m) for m in served)
        if self.model is None:
            raise BackendSetupError(f"{base_url} serves several models ({listed}): choose one with --model")
        raise BackendSetupError(f"--model {self.model!r} is not served by {base_url}; it serves {listed}")

    def _choose_model(self, served: list[list[str] | None]) -> str:
        names = {e.base_url: self._model_of(e.base_url, s) for e, s in zip(self.endpoints, served)}
        if len(set(names.values())) > 1:
            said = "; ".join(f"{url} serves {name!r}" for url, name in names.items())
            raise BackendSetupError(f"the servers do not serve one model ({said}): one run's labels must come from "
                                    "one model; give --model, or only the --base-url of servers of the same model")
        return next(iter(names.values()))

    def _payload(self, prompt: str) -> bytes:
        body = dict(self._base_body)
        if self.api == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        return orjson.dumps(body)

    def _answer(self, raw: bytes) -> Answer:
        data = orjson.loads(raw)
        choice = data["choices"][0]
        text = choice["message"]["content"] if self.api == "chat" else choice["text"]
        if isinstance(text, list):  # content parts (Mistral's API, some reasoning models): the text ones, in order
            text = "".join(part["text"] for part in text if isinstance(part, dict) and part.get("type") == "text")
        if text is not None and not isinstance(text, str):
            raise TypeError(f"the answer's text is a {type(text).__name__}, not a string")
        reasoning = choice.get("message", {}).get("reasoning_content") if self.api == "chat" else None
        if not (text or "").strip() and isinstance(reasoning, str) and reasoning.strip():
            # a reasoning parser (vLLM's, SGLang's) put the whole answer in reasoning_content: the model stopped
            # inside its thinking. Kept as such, it fails as an answer that ends inside its reasoning ("empty answer")
            text = f"{REASONING_START}{reasoning}"
        usage = data.get("usage") or {}
        return Answer(text or "", usage.get("prompt_tokens"), usage.get("completion_tokens"),
                      choice.get("finish_reason"), data.get("model") or self.model)

    def _delay(self, retry: int, retry_after: str | None) -> float:
        """Our own backoff (doubling up to `max_backoff`), or the server's Retry-After (seconds or an HTTP date) where
        it asks for longer, up to RETRY_AFTER_MAX_S (a gateway asking for 5 minutes was probed again every minute).
        Never sooner than our own backoff: a date is to the second, often this one, and a rate limiter near its
        refill says 0 s or 20 ms; taken as said, a document's ~26 tries went in a second and it failed."""
        own = min(self.max_backoff, self.retry_backoff * 2**retry) * random.uniform(0.5, 1.0)
        if not retry_after:
            return own
        try:
            asked = max(0.0, float(retry_after))
        except ValueError:
            asked = _http_date_seconds(retry_after)
            if asked is None:  # unreadable
                return own
        return max(own, min(RETRY_AFTER_MAX_S, asked) * random.uniform(1.0, 1.25))  # each its own: not all at once

    @staticmethod
    def _ready(endpoint: Endpoint, now: float) -> bool:
        """Not left out; and one back from being left out gets one request, its probe, until it answers."""
        return endpoint.benched_until <= now and (endpoint.lost_in_a_row == 0 or endpoint.limit.in_flight == 0)

    def _pick(self) -> Endpoint:
        """The server for the next try: of those ready (else the one back soonest), the most free places."""
        now = time.monotonic()
        ready = [e for e in self.endpoints if self._ready(e, now)]
        if not ready:
            ready = [min(self.endpoints, key=lambda e: e.benched_until)]
        return max(ready, key=lambda e: (e.limit.limit - e.limit.in_flight, -e.requests))

    def _bench(self, endpoint: Endpoint, sent: float) -> bool:
        """Leaves a server that did not answer a try sent at `sent` out for a while: 1 s, then twice as long each
        time a try sent after that still gets no answer (the tries in flight when it went away fail together and
        count once); True when another server can take the request now."""
        endpoint.lost += 1
        now = time.monotonic()
        if sent >= endpoint.benched_at:
            endpoint.lost_in_a_row += 1
            endpoint.benched_at = now
            endpoint.benched_until = now + min(BENCH_MAX_S, 2.0 ** min(endpoint.lost_in_a_row - 1, 10))
        return any(self._ready(e, now) for e in self.endpoints if e is not endpoint)

    async def _post(self, endpoint: Endpoint, body: bytes) -> tuple[int, bytes, str | None]:
        async with self._session.post(endpoint.base_url + self.path, data=body, headers=self.headers) as resp:
            raw = await resp.read()
            if resp.status == 200:
                endpoint.last_answer = time.monotonic()
            elif resp.status not in (408, 429) and resp.status < 500:  # a 200 is usable once it reads (`_usable`)
                self._usable(endpoint)
            return resp.status, raw, _retry_after(resp.headers)

    def _usable(self, endpoint: Endpoint, answer: bool = False) -> None:
        """A server answered: alive, whatever the run's documents get. Not for a 200 that does not read as an answer
        (`{"error": ...}` from a gateway whose backend is gone, `choices: []`): counted so, the stop for a dead server
        or a used-up quota never came, and every document failed after its retries, exit 0."""
        endpoint.last_useful = time.monotonic()
        self.failed_in_a_row = 0
        endpoint.answers += answer

    async def _send(self, endpoint: Endpoint, body: bytes) -> tuple[int, bytes, str | None]:
        """POST within the server's in-flight limit; raises asyncio.TimeoutError when the server has answered nothing
        for `timeout` seconds since the request was sent (see the class docstring)."""
        limit = endpoint.limit
        async with limit:
            while (paused := endpoint.paused_until - time.monotonic()) > 0:  # it said 429: every request waits
                await asyncio.sleep(paused)
            endpoint.requests += 1
            generation = limit.generation
            sent = time.monotonic()
            request = asyncio.ensure_future(self._post(endpoint, body))
            queued = False
            try:
                while True:
                    silent_until = max(sent, endpoint.last_answer) + self.timeout
                    wake = silent_until if queued else min(silent_until, sent + self.timeout)
                    done, _ = await asyncio.wait((request,), timeout=max(0.0, wake - time.monotonic()))
                    if done:
                        status, raw, retry_after = request.result()
                        if status == 429:  # over its rate: fewer in flight, and a pause for all of them
                            limit.shrink(generation)
                            endpoint.paused_until = max(endpoint.paused_until,
                                                        time.monotonic() + self._delay(0, retry_after))
                        elif not queued:
                            limit.kept_up()
                        return status, raw, retry_after
                    if time.monotonic() >= max(sent, endpoint.last_answer) + self.timeout:
                        raise asyncio.TimeoutError
                    if not queued:  # older than the timeout, but answers keep coming: queued behind them
                        queued = True
                        limit.shrink(generation)
            finally:
                if not request.done():
                    request.cancel()
                    await asyncio.gather(request, return_exceptions=True)

    async def complete(self, prompt: str) -> Answer:
        import aiohttp

        body = self._payload(prompt)
        reason = ""
        retry = tries = rerouted = rate_limited = 0
        while True:
            endpoint = self._pick()
            tries += 1
            retry_after = None
            answered = False
            sent = time.monotonic()
            try:
                status, raw, retry_after = await self._send(endpoint, body)
            except asyncio.TimeoutError:
                reason = f"timeout: {endpoint.base_url} sent no answer for {self.timeout:g}s"
            except aiohttp.ClientError as e:
                reason = f"connection: {type(e).__name__}: {e}"
            else:
                # a 5xx or 408 from one of several servers is that server's trouble (a gateway before a dead node, an
                # engine dying): left out like one that does not answer; free at once, it took nearly every try
                answered = not (status >= 500 or status == 408) or len(self.endpoints) == 1
                if answered:
                    endpoint.lost_in_a_row = 0
                if status == 200:
                    try:
                        answer = self._answer(raw)
                    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError) as e:
                        reason = _unreadable_answer(raw, e)
                    else:
                        self._usable(endpoint, answer=True)
                        return answer
                elif status in _FATAL_STATUSES:
                    raise self._fatal(endpoint.base_url + self.path, status, raw)
                else:
                    code, message, overflow = read_error(raw)
                    reason = f"http {status}{' ' + code if code else ''}: {message}"
                    if status not in (408, 429) and status < 500:
                        # 400, 413, 422...: this document's request is wrong (e.g. longer than the context)
                        self._refused(reason, overflow)
                        raise RequestFailed(reason, overflow)
                    if status == 429 and rate_limited < RATE_LIMITED_TRIES:  # waited out, not spent from --max-retries
                        rate_limited += 1
                        self.stats.retries += 1
                        await asyncio.sleep(self._delay(min(rate_limited - 1, 6), retry_after))
                        continue
            # no (usable) answer: that server is left out for a while, and another one takes the request at once
            if not answered and self._bench(endpoint, sent) and rerouted < len(self.endpoints) - 1:
                rerouted += 1
                self.stats.retries += 1
                continue
            if retry >= self.max_retries:
                break
            self.stats.retries += 1
            await asyncio.sleep(self._delay(retry, retry_after))
            retry += 1
            rerouted = 0
        self.failed_in_a_row += 1
        silent = time.monotonic() - max(e.last_useful for e in self.endpoints)
        if (silent > max(SILENCE_MIN_S, SILENCE_TIMEOUTS * self.timeout)
                and self.failed_in_a_row >= max(SILENCE_MIN_DOCUMENTS, self.capacity)):
            # a server that died (a launched vLLM gone, a pod that never came back) or a quota used up would fail
            # every document the same way, one every few retries, for days
            raise BackendError(f"no server gave a usable answer for {silent:.0f} s (last: {reason}); the answers so "
                               "far are in the cache: the same command goes on once the server answers")
        raise RequestFailed(f"{reason} (gave up after {tries} tries)")

    def _refused(self, reason: str, overflow) -> None:
        """Stops the run where every document so far was refused with the same error and no server has answered
        one: a hosted model that takes no `temperature`, say. The run sent the whole input, wrote a failed row for
        each document and exited 0 (10M requests at 10M documents)."""
        if overflow is not None or self.answered_earlier or any(e.answers for e in self.endpoints):
            return  # a rerun asks only what failed before (a content filter's 400s), its answers replayed
        same = self.refused[1] + 1 if self.refused[0] == reason else 1
        self.refused = (reason, same)
        if same >= max(REFUSED_MIN_DOCUMENTS, self.capacity):
            raise BackendError(f"the server refused {same} documents in a row with the same error and has answered "
                               f"none ({reason}): a setting it does not take (--model, --max-tokens, --temperature, "
                               "--api), not the documents")

    def answers_per_server(self) -> dict[str, tuple[int, int]]:
        """Per server: answers given, and tries it did not answer."""
        return {e.base_url: (e.answers, e.lost) for e in self.endpoints}


# --------------------------------------------------------------------------------------------------------------------
# Servers we start ourselves: datatrove's inference server classes handle start-up, readiness and shutdown
# --------------------------------------------------------------------------------------------------------------------
def _retry_after(headers) -> str | None:
    """The longer of a 429's Retry-After and OpenAI's finer retry-after-ms, as seconds (or Retry-After's HTTP date)."""
    milliseconds, header = headers.get("retry-after-ms"), headers.get("Retry-After")
    try:
        asked = float(milliseconds) / 1000 if milliseconds else None
    except ValueError:
        asked = None
    if asked is None or not header:
        return header if asked is None else str(asked)
    try:
        return str(max(asked, float(header)))
    except ValueError:
        until = _http_date_seconds(header)
        return str(asked if until is None else max(asked, until))


def _unreadable_answer(raw: bytes, error: Exception) -> str:
    """A failed try's reason for a 200 whose body is no answer: a gateway's or vLLM's error body said as the error
    it is, anything else as the body that did not read."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        data = None
    if isinstance(data, dict) and ("error" in data or data.get("object") == "error"):
        code, message, _ = read_error(raw)
        return f"http 200{' ' + code if code else ''}: {message}"
    return f"bad response: {type(error).__name__} reading {one_line(raw.decode('utf-8', 'replace'))!r}"


def _http_date_seconds(value: str) -> float | None:
    """Seconds until a Retry-After given as an HTTP date (RFC 9110), 0 for one gone by; None when unreadable."""
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - time.time()) if when.tzinfo else None


SERVER_BACKENDS = ("vllm", "sglang", "script")


def server_config(
    server_type: str,
    model: str,
    *,
    api: str = "chat",
    max_model_len: int = 8192,
    tp: int = 1,
    server_script: str | None = None,
    server_args: list[str] | None = None,
    ready_timeout: float = 1800.0,
    log_folder: str | None = None,
):
    """datatrove InferenceConfig for `vllm serve MODEL`, SGLang, or `python SCRIPT --port N` (an OpenAI-compatible
    server script of your own). `server_args` ("key=value" or "flag") become `--key=value` / `--flag` flags. The
    server's output goes to a file in `log_folder` (datatrove drops what it prints once it is ready)."""
    from datatrove.pipeline.inference.run_inference import InferenceConfig

    if server_type not in SERVER_BACKENDS:
        raise InputError(f"server backend must be one of {SERVER_BACKENDS}, got {server_type!r}")
    kwargs: dict = {}
    for arg in server_args or []:
        key, sep, value = arg.lstrip("-").partition("=")
        if not key:
            raise InputError(f"bad server argument {arg!r}: expected KEY=VALUE or KEY")
        if key.replace("_", "-") in ("port", "api-key"):
            # the server would listen elsewhere, or refuse the unauthenticated readiness probe: the run waited 30
            # minutes for it, then failed
            raise InputError(f"--server-arg {arg}: edu-filter starts its server on a free port of its own and asks it "
                             "without a key (it listens on this node only for this run); leave it out")
        kwargs[key] = value if sep else True
    if server_type == "vllm":  # `vllm serve` listens on every interface unless told: anyone on the network could use it
        kwargs.setdefault("host", "127.0.0.1")
    if server_type == "script":
        if not server_script:
            raise InputError("the script backend needs server_script (a Python file serving /v1 on --port)")
        kwargs["server_script"] = server_script
    delay = 1.0
    return InferenceConfig(
        server_type="custom" if server_type == "script" else server_type,
        model_name_or_path=model,
        model_max_context=max_model_len,
        use_chat=api == "chat",
        tp=tp,
        model_kwargs=kwargs,
        server_ready_delay_sec=delay,
        server_ready_max_attempts=max(1, int(ready_timeout / delay)),
        server_start_max_retries=0,
        server_log_folder=log_folder,
    )


@asynccontextmanager
async def managed_server(config) -> AsyncIterator[str]:
    """Start the server described by a datatrove InferenceConfig, wait until it answers, yield its `/v1` URL, and
    stop it on exit (also on errors and Ctrl-C)."""
    from datatrove.pipeline.inference.servers import CustomServer, SGLangServer, VLLMServer
    from datatrove.pipeline.inference.types import ServerError

    server_class = {"vllm": VLLMServer, "sglang": SGLangServer, "custom": CustomServer}[config.server_type]
    server = server_class(config, rank=0)  # raises ImportError naming the missing package (vllm, sglang)
    first_probe: list[float] = []  # when datatrove first asked it: the server launched (vLLM may wait on a lock first)
    server.is_ready = _answers_models(server, first_probe)
    log = server._get_log_file_path()
    output = f" (its output: {log})" if log else ""
    named = "script" if config.server_type == "custom" else config.server_type  # as the user asked for it
    # datatrove counts the wait in probes, each waiting up to 5 s for an answer: a server whose port is open but
    # answers nothing (stuck, or loading with its port bound) was waited on 6x ready_timeout (3 hours, not 30 min).
    # Counted from the first probe: vLLM's start waits first on a compile lock another job's server may hold
    ready_within = config.server_ready_max_attempts * config.server_ready_delay_sec
    with _guarded_server_processes(trust_remote_code=bool((config.model_kwargs or {}).get("trust-remote-code"))):
        async with server:
            try:
                # datatrove resolves this future once /v1/models answers (or sets the start-up error on it).
                # shielded: a run stopped while the server loads cancelled datatrove's own future, and its cleanup
                # then raised CancelledError before stopping the server (left loading on the GPU until exit)
                ready = asyncio.shield(server._server_ready)
                try:
                    while not (await asyncio.wait({ready}, timeout=1.0))[0]:
                        if first_probe and time.monotonic() - first_probe[0] > ready_within:
                            raise asyncio.TimeoutError
                finally:
                    if not ready.done():
                        ready.cancel()  # this wait's, not datatrove's own future
                ready.result()
            except ServerError as e:
                raise BackendError(f"{named} server for {config.model_name_or_path} did not start: {e}{output}")
            except asyncio.TimeoutError:
                raise BackendError(f"the {named} server for {config.model_name_or_path} did not answer /v1/models "
                                   f"within {ready_within:,.0f} s: still loading, or stuck{output}") from None
            # a server that exits (a crash, out of GPU memory) stops the run at once: every request would fail
            # with "connection refused" after its retries, the run stopping only after 10 minutes of failures
            run, exited = asyncio.current_task(), []

            async def watch(monitor, process) -> None:
                with contextlib.suppress(asyncio.CancelledError):
                    await monitor  # datatrove's monitor ends when the server's output does, or on a line it misreads
                    await _read_output_until_exit(process, server.server_logger())
                    exited.append(process.returncode)
                    run.cancel()

            monitor, process = server._server_monitoring_task, server._server_process
            watcher = asyncio.create_task(watch(monitor, process)) if monitor and process else None
            try:
                yield server.get_base_url() + "/v1"
            except asyncio.CancelledError:
                if not exited:
                    raise
                if hasattr(run, "uncancel"):  # Python 3.11+
                    run.uncancel()
                raise BackendError(f"the {named} server for {config.model_name_or_path} exited while "
                                   f"the run was scoring (exit status {exited[0]}){output}; the answers received "
                                   "are cached: run the same command again to go on") from None
            finally:
                if watcher is not None:
                    watcher.cancel()


async def _read_output_until_exit(process, log) -> None:
    """The server's output read into its log until the server exits. datatrove's monitor also ends while the server
    runs: its vLLM monitor on any line naming both "RuntimeError" and "CUDA" (vLLM before 0.10.1 logs every prompt:
    a Python file raising one), every monitor on a line over its stream's limit. The run was stopped then, as if the
    server had failed, and nothing read its output any more (a server writing on blocks once the pipe is full)."""

    async def read(stream) -> None:
        while chunk := await stream.read(1 << 16):
            if log is not None:
                log.info(chunk.decode("utf-8", "replace").rstrip("\n"))

    readers = [asyncio.create_task(read(stream)) for stream in (process.stdout, process.stderr) if stream is not None]
    try:
        while process.returncode is None:  # set at its exit: wait() also waits for its pipes, which the server's
            await asyncio.sleep(0.5)       # children (vLLM's engine) may hold open after it crashed
        await asyncio.wait(readers, timeout=5)  # the rest of its output
    finally:
        for reader in readers:
            reader.cancel()


def _answers_models(server, first_probe: list[float]):
    """datatrove's readiness probe, without the environment's proxy: its httpx client sent the probe of a server on
    this node through `HTTP_PROXY` (often set on compute nodes for the hub), and the run waited 30 minutes for a
    server that was up. The time of its first call goes into `first_probe`."""

    async def is_ready() -> bool:
        import httpx

        if not first_probe:
            first_probe.append(time.monotonic())
        try:
            async with httpx.AsyncClient(trust_env=False) as session:
                return (await session.get(f"{server.get_base_url()}/v1/models", timeout=5.0)).status_code == 200
        except Exception:
            return False

    return is_ready


# the longest line of a started server's output its monitor reads (asyncio's default, 64 KiB, is a prompt of ~7k
# tokens in vLLM's old request log, and a hub download's progress bar, one line of carriage returns)
SERVER_LINE_LIMIT = 16 * 2**20


@contextmanager
def _guarded_server_processes(trust_remote_code: bool = False):
    """Servers datatrove starts in the block get SIGTERM when this process dies, however it dies (Linux): a run
    killed with SIGKILL (the out-of-memory killer) left its vLLM holding the GPU, and the same command's vLLM then
    could not start. datatrove starts them with asyncio.create_subprocess_exec, given a preexec_fn here.

    datatrove also starts `vllm serve` with `--trust-remote-code` always: the Python a hub repository carries ran on
    the GPU node for any `--model ORG/NAME`. It is dropped unless asked for (`--server-arg trust-remote-code`)."""
    import ctypes
    import signal
    import sys

    started_by_asyncio = asyncio.create_subprocess_exec
    preexec_fn = None
    if sys.platform.startswith("linux"):
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork: the child only calls it
        pr_set_pdeathsig = 1

        def die_with_parent() -> None:
            prctl(pr_set_pdeathsig, signal.SIGTERM)

        preexec_fn = die_with_parent

    async def create_subprocess_exec(*args, **kwargs):
        if args and args[0] == "vllm" and not trust_remote_code:
            args = tuple(a for a in args if a != "--trust-remote-code")
        if preexec_fn is not None:
            kwargs.setdefault("preexec_fn", preexec_fn)
        kwargs.setdefault("limit", SERVER_LINE_LIMIT)
        return await started_by_asyncio(*args, **kwargs)

    asyncio.create_subprocess_exec = create_subprocess_exec
    try:
        yield
    finally:
        asyncio.create_subprocess_exec = started_by_asyncio


# --------------------------------------------------------------------------------------------------------------------
# transformers, in-process (tests and tiny jobs)
# --------------------------------------------------------------------------------------------------------------------
def pretrained_args(model: str) -> tuple[str, dict]:
    """(name, extra from_pretrained arguments) of a model folder, hub id, or .gguf file.

    A .gguf file (a local path, or ORG/REPO/FILE.gguf on the hub) goes through transformers' GGUF support
    (`gguf_file=`), which dequantizes it to a regular PyTorch model."""
    if not model.lower().endswith(".gguf"):
        return model, {}
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"{model}: loading a .gguf file with transformers needs {' and '.join(missing)}: "
                          "pip install 'gguf>=0.10' accelerate")
    path = Path(model)
    if path.is_file():
        return str(path.parent), {"gguf_file": path.name}
    parts = model.split("/")
    if len(parts) < 3 or path.exists() or model.startswith((".", "/")):
        raise BackendSetupError(f"{model}: no such .gguf file (give a local file or ORG/REPO/FILE.gguf on the hub)")
    return "/".join(parts[:2]), {"gguf_file": "/".join(parts[2:])}


STOP_WAIT_S = 60.0  # the longest a stopping run waits for the generation batcher (it stops at its next token)


class StopWhenSet:
    """A transformers stopping criterion: every sequence is done once `event` is set (checked at each new token)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class TransformersBackend:
    """Generate with a local or hub causal LM (a folder, hub id or .gguf file) in this process, batching concurrent
    requests.

    Requests from the scoring workers are gathered into batches of up to `batch_size` prompts (left padding) and
    generated in a worker thread, so the event loop stays free. With `api="chat"` the tokenizer's chat template is
    applied when it has one; otherwise the prompt is fed as plain text.
    """

    def __init__(
        self,
        model: str,
        settings: GenerationSettings = GenerationSettings(),
        api: str = "chat",
        batch_size: int = 8,
        device: str | None = None,
        seed: int = 0,
    ):
        self.model = model
        self.settings = settings
        self.api = api
        self.batch_size = batch_size
        self.device = device
        self.seed = seed
        self.notes: list[str] = []
        self.stats = RequestStats()
        self._queue: asyncio.Queue | None = None
        self._batcher: asyncio.Task | None = None
        # set when the run stops: generate() checks it at every token. A batch ran to max_new_tokens in its thread
        # (minutes) past SIGTERM's 20 s and a second SIGTERM, which asyncio.run waited for, and Slurm's SIGKILL cut
        self._stopping = threading.Event()

    async def __aenter__(self) -> TransformersBackend:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from edu_filter.classifiers.device import default_device

        name, extra = pretrained_args(self.model)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=False, **extra)
            self.lm = AutoModelForCausalLM.from_pretrained(name, trust_remote_code=False, **extra)
        except (OSError, ValueError) as e:  # ValueError: a model whose code its folder carries (never run here)
            raise BackendSetupError(f"cannot load transformers model {self.model!r}: {e}") from e
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        device = self.device or default_device()
        self.lm.to(device).eval()
        torch.manual_seed(self.seed)
        self._queue = asyncio.Queue()
        self._batcher = asyncio.create_task(self._run_batches())
        return self

    async def __aexit__(self, *exc) -> None:
        self._stopping.set()
        # the batcher also sees the stop when it next takes from the queue: Python 3.11's wait_for swallows a cancel
        # that comes as its get() completes, and the batcher waited on the empty queue for ever (a run that raised,
        # its output disk full, hung instead of exiting)
        self._queue.put_nowait(None)
        self._batcher.cancel()
        await asyncio.wait({self._batcher}, timeout=STOP_WAIT_S)

    async def complete(self, prompt: str) -> Answer:
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((prompt, future))
        return await future

    async def _run_batches(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping.is_set():
            batch = [await self._queue.get()]
            while len(batch) < self.batch_size:  # give the other workers a moment to queue their prompts
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), timeout=0.005))
                except asyncio.TimeoutError:
                    break
            if None in batch:  # the run is stopping (`__aexit__`)
                return
            fitting = []
            for prompt, future in batch:
                try:
                    text = self._text(prompt)
                    overflow = self._overflow(text)
                except Exception as e:  # noqa: BLE001 - a template or tokenizer that fails on this prompt alone
                    failed = RequestFailed(f"generation: {type(e).__name__}: {e}")
                else:
                    if overflow is None:
                        fitting.append((text, future))
                        continue
                    # as a server says it: `score` cuts the document to fit (--max-chars) and asks again
                    failed = RequestFailed(f"context_length_exceeded: the prompt is {overflow.prompt_tokens} "
                                           f"tokens; with max_tokens {self.settings.max_tokens} it does not fit the "
                                           f"model's context of {overflow.context_tokens}", overflow)
                if not future.done():
                    future.set_exception(failed)
            # one document that fails generation (out of memory on its length, say) no longer fails its batch:
            # the batch is generated again one prompt at a time, and only what fails alone fails
            for group in ([fitting] if len(fitting) == 1 else [fitting, *([one] for one in fitting)]):
                if not group or all(future.done() for _, future in group):
                    continue
                self.stats.requests += len(group)  # prompts generated (a failed batch's, one by one again)
                try:
                    answers = await loop.run_in_executor(None, self._generate, [text for text, _ in group])
                except Exception as e:  # noqa: BLE001 - alone, its document fails; the run goes on
                    if len(group) == 1 and not group[0][1].done():
                        group[0][1].set_exception(RequestFailed(f"generation: {type(e).__name__}: {e}"))
                    continue
                for (_, future), answer in zip(group, answers):
                    if not future.done():  # its worker cancelled meanwhile (a stopped run)
                        future.set_result(answer)
                if len(group) > 1:
                    break

    def _uses_template(self) -> bool:
        return bool(self.api == "chat" and getattr(self.tokenizer, "chat_template", None))

    def _text(self, prompt: str) -> str:
        """What the model is given: the prompt in the chat template where the model has one and api is chat."""
        if not self._uses_template():
            return prompt
        return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True)

    def _overflow(self, text: str) -> ContextOverflow | None:
        """The model's context and the prompt's tokens where the prompt and max_tokens do not fit in it."""
        context = getattr(self.lm.config, "max_position_embeddings", None)
        if not context:
            return None
        tokens = len(self.tokenizer(text, add_special_tokens=not self._uses_template())["input_ids"])
        return ContextOverflow(context, tokens) if tokens + self.settings.max_tokens > context else None

    def _generate(self, texts: list[str]) -> list[Answer]:
        import torch
        from transformers import StoppingCriteriaList

        tok = self.tokenizer
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=not self._uses_template())
        enc = enc.to(self.lm.device)
        sample = self.settings.temperature > 0
        # top_k 0: temperature and top_p alone, as a server samples them (transformers adds a top_k of 50 unasked)
        sampling = ({"temperature": self.settings.temperature, "top_p": self.settings.top_p, "top_k": 0} if sample
                    else {})
        with torch.no_grad():
            out = self.lm.generate(
                **enc,
                do_sample=sample,
                max_new_tokens=self.settings.max_tokens,
                pad_token_id=tok.pad_token_id,
                stopping_criteria=StoppingCriteriaList([StopWhenSet(self._stopping)]),
                **sampling,
            )
        if self._stopping.is_set():  # cut short: no answer is taken from it
            raise RequestFailed("generation stopped: the run is stopping")
        new_tokens = out[:, enc["input_ids"].shape[1] :]
        # where an answer ends: the tokenizer's EOS or any EOS id of the generation config (chat models end their turn
        # on their own token: Gemma's <end_of_turn>, Phi-3's <|end|>, Llama-3-Instruct's <|eot_id|>)
        configured = getattr(getattr(self.lm, "generation_config", None), "eos_token_id", None)
        stops = {configured} if isinstance(configured, int) else set(configured or ())
        stops |= {tok.eos_token_id} - {None}
        answers = []
        for i, row in enumerate(new_tokens.tolist()):
            n = len(row)
            finish_reason = "length"
            end = next((j for j, token in enumerate(row) if token in stops), None)
            if end is not None:
                n = end + 1
                finish_reason = "stop"
            text = tok.decode(row[:n], skip_special_tokens=True)
            answers.append(Answer(text, int(enc["attention_mask"][i].sum()), n, finish_reason, self.model))
        return answers
