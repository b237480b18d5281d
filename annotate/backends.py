"""Where answers come from: an OpenAI-compatible HTTP endpoint, a server we start (vLLM, SGLang, a script) or a
small transformers model in-process.

Every backend exposes the same coroutine, `complete(prompt) -> Answer`, so caching, re-asks and output are written
once in `score.py`. A per-document failure raises `RequestFailed` (recorded in that document's row); a failure that
would hit every document raises `BackendError` and stops the run. Found at start-up, before any document is asked
(wrong URL, bad key, unknown model), it is a `BackendSetupError`: bad usage, which the command line exits 2 on.
"""

from __future__ import annotations

import asyncio
import importlib.util
import random
import re
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import AsyncIterator

import orjson

from edu_filter.annotate.cache import Answer
from edu_filter.documents import InputError, RunError


@dataclass(frozen=True)
class GenerationSettings:
    """Sampling settings; the defaults are FineWeb-Edu's annotation settings."""

    temperature: float = 0.6
    top_p: float = 0.95
    max_tokens: int = 256

    def as_dict(self) -> dict:
        return asdict(self)


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
_OVERFLOW_MESSAGE = re.compile(r"context (?:length|window|size)|maximum context", re.IGNORECASE)


def _shorten(text: str, limit: int = 160) -> str:
    """One line of at most `limit` characters, cut at a word boundary."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0] + " ..."


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
        return None, _shorten(raw.decode("utf-8", "replace")) or "(empty body)", None
    code = error.get("code")
    code = code.strip() if isinstance(code, str) and code.strip() and not code.strip().isdigit() else None
    message = str(error.get("message") or error.get("detail") or raw.decode("utf-8", "replace"))
    overflow = None
    if (code == "context_length_exceeded" or error.get("type") == "exceed_context_size_error"
            or _OVERFLOW_MESSAGE.search(message)):
        overflow = ContextOverflow(
            context_tokens=error.get("n_ctx") or _first_int(r"maximum context length is (\d+)", message),
            prompt_tokens=error.get("n_prompt_tokens")
            or _first_int(r"(\d+) in the (?:messages|prompt)", message)
            or _first_int(r"(\d+) (?:input|prompt) tokens", message),
        )
    return code, _shorten(message) or "(empty message)", overflow


def _model_ids(raw: bytes) -> list[str] | None:
    """The model ids of a `/models` answer (`{"data": [{"id": ...}]}`), or None when it is not such a list."""
    try:
        return [str(m["id"]) for m in orjson.loads(raw)["data"]]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None


class InFlightLimit:
    """How many requests may be in flight; starts at the asked concurrency and only ever shrinks.

    `shrink(generation)` halves the limit, once per generation: requests sent before the last shrink were queued
    under the old limit and say nothing about the new one."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_flight = 0
        self.generation = 0
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
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:  # all of them look again: a cancelled one cannot swallow the free place
            if not waiter.done():
                waiter.set_result(None)

    def shrink(self, generation: int) -> None:
        if generation == self.generation and self.limit > 1:
            self.limit = max(1, self.limit // 2)
            self.generation += 1


class OpenAIBackend:
    """Async client for `/v1/chat/completions` or `/v1/completions`.

    One aiohttp session and connection pool for the whole run, requests serialised with orjson, bounded in-flight
    requests (`concurrency`), and retries with exponential backoff and jitter on 408, 429, 5xx, timeouts and
    connection errors (honouring `Retry-After`). The API key goes to every route.

    On entry `/models` is read once: a `model` the server does not serve is refused naming what it serves, unless it
    serves exactly one model (llama.cpp serves one under any name), whose name is then used; `model=None` takes that
    one model. `self.model` is the name used, `self.notes` says when it is not the one asked for.

    Timeouts: a request is abandoned (and retried) only when the server has sent no answer at all for `timeout`
    seconds since it was sent. A request older than `timeout` while other answers keep arriving is queued behind
    them (a one-request-at-a-time server with many requests in flight): it keeps waiting and the number of requests
    in flight is halved instead, so the queue fits in the timeout without throwing away work the server will do.
    """

    def __init__(
        self,
        base_url: str,
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
        path = "/chat/completions" if api == "chat" else "/completions"
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + path
        self.model = model
        self.api = api
        self.settings = settings
        self.concurrency = concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.retry_backoff = retry_backoff
        self.max_backoff = max_backoff
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.notes: list[str] = []
        self.stats = RequestStats(concurrency=concurrency)
        self._session = None
        self._limit: InFlightLimit | None = None
        self._last_answer = 0.0  # monotonic time of the last 200 answer

    async def __aenter__(self) -> OpenAIBackend:
        import aiohttp

        connector = aiohttp.TCPConnector(limit=self.concurrency, limit_per_host=self.concurrency, ttl_dns_cache=300)
        # no total timeout on the session: `_send` decides when a request is abandoned
        self._session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None))
        self._limit = InFlightLimit(self.concurrency)
        try:
            self._choose_model(await self._served_models())
        except BaseException:
            await self._session.close()
            raise
        self._base_body = {"model": self.model, **self.settings.as_dict()}
        return self

    async def __aexit__(self, *exc) -> None:
        self.stats.concurrency = self._limit.limit
        await self._session.close()

    def _fatal(self, url: str, status: int, raw: bytes, at_start: bool = False) -> BackendError:
        _, message, _ = read_error(raw)
        hint = "Check --base-url (it usually ends in /v1), --model and the API key variable"
        if status == 401 and "Authorization" not in self.headers:
            hint = "No API key was sent: put it in the variable --api-key-env names (default OPENAI_API_KEY)"
        error = BackendSetupError if at_start else BackendError
        return error(f"{url} answered {status} ({_FATAL_STATUSES[status]}): {message}. {hint}.")

    async def _served_models(self) -> list[str] | None:
        """The model ids the server lists; None when it answers but gives no list."""
        import aiohttp

        url = self.base_url + "/models"
        reason = ""
        for retry in range(self.max_retries + 1):
            retry_after = None
            try:
                timeout = aiohttp.ClientTimeout(total=self.timeout)
                async with self._session.get(url, headers=self.headers, timeout=timeout) as resp:
                    status, raw, retry_after = resp.status, await resp.read(), resp.headers.get("Retry-After")
            except aiohttp.ClientConnectorError as e:  # fail fast on a wrong URL instead of retrying every document
                raise BackendSetupError(f"cannot reach {self.base_url}: {e}") from e
            except asyncio.TimeoutError:
                reason = f"no answer within {self.timeout:g}s"
            except aiohttp.ClientError as e:
                reason = f"{type(e).__name__}: {e}"
            else:
                if status == 200:
                    return _model_ids(raw)
                if status in _FATAL_STATUSES:
                    raise self._fatal(url, status, raw, at_start=True)
                if status not in (408, 429) and status < 500:
                    raise BackendSetupError(f"{url} answered {status}: {read_error(raw)[1]}")
                reason = f"http {status}: {read_error(raw)[1]}"
            if retry < self.max_retries:
                await asyncio.sleep(self._delay(retry, retry_after))
        raise BackendSetupError(f"{url} did not answer: {reason} (gave up after {self.max_retries + 1} tries)")

    def _choose_model(self, served: list[str] | None) -> None:
        if not served:
            if self.model is None:
                raise BackendSetupError(f"{self.base_url}/models lists no model: name the model with --model")
            return
        if self.model in served:
            return
        if len(served) == 1:
            if self.model is not None:
                self.notes.append(f"{self.base_url} serves only {served[0]!r}; using that name instead of "
                                  f"--model {self.model!r}")
            self.model = served[0]
            return
        listed = ", ".join(repr(m) for m in served)
        if self.model is None:
            raise BackendSetupError(f"{self.base_url} serves several models ({listed}): choose one with --model")
        raise BackendSetupError(f"--model {self.model!r} is not served by {self.base_url}; it serves {listed}")

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
        usage = data.get("usage") or {}
        return Answer(text or "", usage.get("prompt_tokens"), usage.get("completion_tokens"),
                      choice.get("finish_reason"), data.get("model") or self.model)

    def _delay(self, retry: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                return min(self.max_backoff, max(0.0, float(retry_after)))
            except ValueError:
                pass  # an HTTP date: fall back to our own backoff
        return min(self.max_backoff, self.retry_backoff * 2**retry) * random.uniform(0.5, 1.0)

    async def _post(self, body: bytes) -> tuple[int, bytes, str | None]:
        async with self._session.post(self.url, data=body, headers=self.headers) as resp:
            raw = await resp.read()
            if resp.status == 200:
                self._last_answer = time.monotonic()
            return resp.status, raw, resp.headers.get("Retry-After")

    async def _send(self, body: bytes) -> tuple[int, bytes, str | None]:
        """POST within the in-flight limit; raises asyncio.TimeoutError when the server has answered nothing for
        `timeout` seconds since the request was sent (see the class docstring)."""
        async with self._limit:
            self.stats.requests += 1
            generation = self._limit.generation
            sent = time.monotonic()
            request = asyncio.ensure_future(self._post(body))
            queued = False
            try:
                while True:
                    silent_until = max(sent, self._last_answer) + self.timeout
                    wake = silent_until if queued else min(silent_until, sent + self.timeout)
                    done, _ = await asyncio.wait((request,), timeout=max(0.0, wake - time.monotonic()))
                    if done:
                        return request.result()
                    if time.monotonic() >= max(sent, self._last_answer) + self.timeout:
                        raise asyncio.TimeoutError
                    if not queued:  # older than the timeout, but answers keep coming: queued behind them
                        queued = True
                        self._limit.shrink(generation)
            finally:
                if not request.done():
                    request.cancel()
                    await asyncio.gather(request, return_exceptions=True)

    async def complete(self, prompt: str) -> Answer:
        import aiohttp

        body = self._payload(prompt)
        reason = ""
        for retry in range(self.max_retries + 1):
            retry_after = None
            try:
                status, raw, retry_after = await self._send(body)
            except asyncio.TimeoutError:
                reason = f"timeout: the server sent no answer for {self.timeout:g}s"
            except aiohttp.ClientError as e:
                reason = f"connection: {type(e).__name__}: {e}"
            else:
                if status == 200:
                    try:
                        return self._answer(raw)
                    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError) as e:
                        body_text = _shorten(raw.decode("utf-8", "replace"))
                        reason = f"bad response: {type(e).__name__} reading {body_text!r}"
                elif status in _FATAL_STATUSES:
                    raise self._fatal(self.url, status, raw)
                else:
                    code, message, overflow = read_error(raw)
                    reason = f"http {status}{' ' + code if code else ''}: {message}"
                    if status not in (408, 429) and status < 500:
                        # 400, 413, 422...: this document's request is wrong (e.g. longer than the context)
                        raise RequestFailed(reason, overflow)
            if retry < self.max_retries:
                self.stats.retries += 1
                await asyncio.sleep(self._delay(retry, retry_after))
        raise RequestFailed(f"{reason} (gave up after {self.max_retries + 1} tries)")


# --------------------------------------------------------------------------------------------------------------------
# Servers we start ourselves: datatrove's inference server classes handle start-up, readiness and shutdown
# --------------------------------------------------------------------------------------------------------------------
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
):
    """datatrove InferenceConfig for `vllm serve MODEL`, SGLang, or `python SCRIPT --port N` (an OpenAI-compatible
    server script of your own). `server_args` ("key=value" or "flag") become `--key=value` / `--flag` flags."""
    from datatrove.pipeline.inference.run_inference import InferenceConfig

    if server_type not in SERVER_BACKENDS:
        raise InputError(f"server backend must be one of {SERVER_BACKENDS}, got {server_type!r}")
    kwargs: dict = {}
    for arg in server_args or []:
        key, sep, value = arg.lstrip("-").partition("=")
        if not key:
            raise InputError(f"bad server argument {arg!r}: expected KEY=VALUE or KEY")
        kwargs[key] = value if sep else True
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
    )


@asynccontextmanager
async def managed_server(config) -> AsyncIterator[str]:
    """Start the server described by a datatrove InferenceConfig, wait until it answers, yield its `/v1` URL, and
    stop it on exit (also on errors and Ctrl-C)."""
    from datatrove.pipeline.inference.servers import CustomServer, SGLangServer, VLLMServer
    from datatrove.pipeline.inference.types import ServerError

    server_class = {"vllm": VLLMServer, "sglang": SGLangServer, "custom": CustomServer}[config.server_type]
    server = server_class(config, rank=0)  # raises ImportError naming the missing package (vllm, sglang)
    async with server:
        try:
            # datatrove resolves this future once /v1/models answers (or sets the start-up error on it).
            await server._server_ready
        except ServerError as e:
            raise BackendError(f"{config.server_type} server for {config.model_name_or_path} did not start: {e}")
        yield server.get_base_url() + "/v1"


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

    async def __aenter__(self) -> TransformersBackend:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from edu_filter.classifiers.device import default_device

        name, extra = pretrained_args(self.model)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name, **extra)
            self.lm = AutoModelForCausalLM.from_pretrained(name, **extra)
        except OSError as e:
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
        self._batcher.cancel()
        await asyncio.gather(self._batcher, return_exceptions=True)

    async def complete(self, prompt: str) -> Answer:
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((prompt, future))
        return await future

    async def _run_batches(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.batch_size:  # give the other workers a moment to queue their prompts
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), timeout=0.005))
                except asyncio.TimeoutError:
                    break
            prompts = [prompt for prompt, _ in batch]
            self.stats.requests += len(prompts)
            try:
                answers = await loop.run_in_executor(None, self._generate, prompts)
            except Exception as e:  # e.g. out of memory on a long batch: fail these documents, keep going
                for _, future in batch:
                    future.set_exception(RequestFailed(f"generation: {type(e).__name__}: {e}"))
                continue
            for (_, future), answer in zip(batch, answers):
                future.set_result(answer)

    def _generate(self, prompts: list[str]) -> list[Answer]:
        import torch

        tok = self.tokenizer
        use_template = self.api == "chat" and getattr(tok, "chat_template", None)
        if use_template:
            texts = [
                tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                for p in prompts
            ]
        else:
            texts = prompts
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=not use_template)
        enc = enc.to(self.lm.device)
        sample = self.settings.temperature > 0
        sampling = {"temperature": self.settings.temperature, "top_p": self.settings.top_p} if sample else {}
        with torch.no_grad():
            out = self.lm.generate(
                **enc,
                do_sample=sample,
                max_new_tokens=self.settings.max_tokens,
                pad_token_id=tok.pad_token_id,
                **sampling,
            )
        new_tokens = out[:, enc["input_ids"].shape[1] :]
        answers = []
        for i, row in enumerate(new_tokens.tolist()):
            n = len(row)
            finish_reason = "length"
            if tok.eos_token_id is not None and tok.eos_token_id in row:
                n = row.index(tok.eos_token_id) + 1
                finish_reason = "stop"
            text = tok.decode(row[:n], skip_special_tokens=True)
            answers.append(Answer(text, int(enc["attention_mask"][i].sum()), n, finish_reason, self.model))
        return answers
