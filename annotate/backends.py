"""Where answers come from: an OpenAI-compatible HTTP endpoint, a server we start (vLLM, SGLang, a script) or a
small transformers model in-process.

Every backend exposes the same coroutine, `complete(prompt) -> Answer`, so caching, re-asks and output are written
once in `score.py`. A per-document failure raises `RequestFailed` (recorded in that document's row); a failure that
would hit every document (bad key, unknown model, wrong URL) raises `BackendError` and stops the run.
"""

from __future__ import annotations

import asyncio
import random
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from typing import AsyncIterator

import orjson

from edu_filter.annotate.cache import Answer


@dataclass(frozen=True)
class GenerationSettings:
    """Sampling settings; the defaults are FineWeb-Edu's annotation settings."""

    temperature: float = 0.6
    top_p: float = 0.95
    max_tokens: int = 256

    def as_dict(self) -> dict:
        return asdict(self)


class RequestFailed(Exception):
    """One document's request failed for good (after retries); `reason` goes into its row."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class BackendError(RuntimeError):
    """The backend cannot answer any document (authentication, unknown model, unreachable server)."""


@dataclass
class RequestStats:
    requests: int = 0  # HTTP requests (or generations) actually sent, retries included
    retries: int = 0


# --------------------------------------------------------------------------------------------------------------------
# OpenAI-compatible HTTP endpoint
# --------------------------------------------------------------------------------------------------------------------
_FATAL_STATUSES = {401: "authentication failed", 403: "permission denied", 404: "not found"}


class OpenAIBackend:
    """Async client for `/v1/chat/completions` or `/v1/completions`.

    One aiohttp session and connection pool for the whole run, requests serialised with orjson, bounded in-flight
    requests (`concurrency`), a total timeout per request, and retries with exponential backoff and jitter on
    408, 429, 5xx, timeouts and connection errors (honouring `Retry-After`).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
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
            raise ValueError(f"api must be 'chat' or 'completion', got {api!r}")
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
        self._base_body = {"model": model, **settings.as_dict()}
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.stats = RequestStats()
        self._session = None
        self._slots: asyncio.Semaphore | None = None

    async def __aenter__(self) -> OpenAIBackend:
        import aiohttp

        connector = aiohttp.TCPConnector(limit=self.concurrency, limit_per_host=self.concurrency, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=self.timeout))
        self._slots = asyncio.Semaphore(self.concurrency)
        try:  # fail fast on a wrong URL instead of retrying every document into the void
            async with self._session.get(self.base_url + "/models"):
                pass
        except (aiohttp.ClientConnectorError, asyncio.TimeoutError) as e:
            await self._session.close()
            raise BackendError(f"cannot reach {self.url}: {e}") from e
        return self

    async def __aexit__(self, *exc) -> None:
        await self._session.close()

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
        return Answer(text or "", usage.get("prompt_tokens"), usage.get("completion_tokens"))

    def _delay(self, retry: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                return min(self.max_backoff, max(0.0, float(retry_after)))
            except ValueError:
                pass  # an HTTP date: fall back to our own backoff
        return min(self.max_backoff, self.retry_backoff * 2**retry) * random.uniform(0.5, 1.0)

    async def complete(self, prompt: str) -> Answer:
        import aiohttp

        body = self._payload(prompt)
        reason = ""
        for retry in range(self.max_retries + 1):
            retry_after = None
            try:
                async with self._slots:
                    self.stats.requests += 1
                    async with self._session.post(self.url, data=body, headers=self.headers) as resp:
                        status = resp.status
                        raw = await resp.read()
                        retry_after = resp.headers.get("Retry-After")
            except asyncio.TimeoutError:
                reason = f"timeout: no answer within {self.timeout:g}s"
            except aiohttp.ClientError as e:
                reason = f"connection: {type(e).__name__}: {e}"
            else:
                if status == 200:
                    try:
                        return self._answer(raw)
                    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError) as e:
                        reason = f"bad response: {type(e).__name__} reading {raw[:200]!r}"
                elif status in (408, 429) or status >= 500:
                    reason = f"http {status}: {_snippet(raw)}"
                elif status in _FATAL_STATUSES:
                    raise BackendError(
                        f"{self.url} answered {status} ({_FATAL_STATUSES[status]}): {_snippet(raw)}. Check "
                        "--base-url (it usually ends in /v1), --model and the API key variable."
                    )
                else:  # 400, 413, 422...: this document's request is wrong (e.g. longer than the context)
                    raise RequestFailed(f"http {status}: {_snippet(raw)}")
            if retry < self.max_retries:
                self.stats.retries += 1
                await asyncio.sleep(self._delay(retry, retry_after))
        raise RequestFailed(f"{reason} (gave up after {self.max_retries + 1} tries)")


def _snippet(raw: bytes, limit: int = 200) -> str:
    return raw[:limit].decode("utf-8", "replace").strip() or "(empty body)"


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
        raise ValueError(f"server backend must be one of {SERVER_BACKENDS}, got {server_type!r}")
    kwargs: dict = {}
    for arg in server_args or []:
        key, sep, value = arg.lstrip("-").partition("=")
        if not key:
            raise ValueError(f"bad server argument {arg!r}: expected KEY=VALUE or KEY")
        kwargs[key] = value if sep else True
    if server_type == "script":
        if not server_script:
            raise ValueError("the script backend needs server_script (a Python file serving /v1 on --port)")
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
class TransformersBackend:
    """Generate with a local or hub causal LM in this process, batching concurrent requests.

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
        self.model_name = model
        self.settings = settings
        self.api = api
        self.batch_size = batch_size
        self.device = device
        self.seed = seed
        self.stats = RequestStats()
        self._queue: asyncio.Queue | None = None
        self._batcher: asyncio.Task | None = None

    async def __aenter__(self) -> TransformersBackend:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_name)
            self.model = AutoModelForCausalLM.from_pretrained(self.model_name)
        except OSError as e:
            raise BackendError(f"cannot load transformers model {self.model_name!r}: {e}") from e
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(device).eval()
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
        enc = enc.to(self.model.device)
        sample = self.settings.temperature > 0
        sampling = {"temperature": self.settings.temperature, "top_p": self.settings.top_p} if sample else {}
        with torch.no_grad():
            out = self.model.generate(
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
            if tok.eos_token_id is not None and tok.eos_token_id in row:
                n = row.index(tok.eos_token_id) + 1
            text = tok.decode(row[:n], skip_special_tokens=True)
            answers.append(Answer(text, int(enc["attention_mask"][i].sum()), n))
        return answers
