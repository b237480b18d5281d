"""A real OpenAI-compatible HTTP server for the annotation tests, misbehaving on request.

Each test document carries a directive such as `[[doc=d7;score=4;fail500=2;format=bold]]` in its text; the server
finds it in the prompt and answers accordingly:

    score=N        the score the answer concludes with (default 2)
    format=F       plain | bold | slash | trailing | repeat (the same score twice) | two (two different scores) |
                   arith (SmolLM2's "Educational score: 20 - 15 = 3 points" answer) | garbage (never parseable)
    garbage=N      the first N answers are unparseable, then a normal answer
    cut=N          the first N answers stop mid-sentence at max_tokens (finish_reason "length")
    fail500=N      the first N requests get HTTP 500
    fail429=N      the first N requests get HTTP 429 with Retry-After: 0
    error200=N     the first N requests get HTTP 200 with an OpenAI-style error body (a gateway whose backend is gone)
    drop=N         the first N requests have their connection closed without an answer
    slow=S         the first request sleeps S seconds before answering (client timeouts)
    http400=1      every request gets HTTP 400 with an OpenAI-style error without a code
    ctx=N          a context of N tokens (4 characters each): a longer prompt plus max_tokens gets llama-cpp-python's
                   400 with error.code context_length_exceeded and the numbers
    ctxsay=S       how that refusal is worded: openai (the default, above), sglang (vLLM's top-level error with
                   "maximum context length of N tokens ... P tokens from the input messages") or bare (no numbers)
    parts=1        the chat answer's content as a list of parts (a reasoning part, then the text), as Mistral's API
    reasoning=1    the chat answer's content null and its text in reasoning_content (vLLM's reasoning parser on a
                   model that stopped inside its thinking)
    usage=0        leave `usage` out of the answer

Answering from a table of labels instead (`labels`, from `label_table(rows)`): the server finds the document
between the bundled prompts' "The extract:" and "After examining the extract:", looks up the SHA-1 of its text and
answers "Educational score: N" with that document's label, counted under its id; a document not in the table gets
an unparseable answer. This stands in for an LLM whose answers are known (e.g. the bundled Llama-3 labels).

Server-wide, as real servers do: `models` are the names /v1/models lists (a request naming another gets vLLM's 404);
`own_name` serves one model under any requested name and names it in every answer (llama.cpp); `api_key` is
required on every route; `serial` answers one request at a time; `delay` slows every answer; `failing` is a
status every completion request gets at once; `log_prompts` prints each prompt on one line (vLLM's old request log).

It counts requests and 200 answers per document (`GET /stats`) and keeps the Authorization header of every
/v1/models and completion request. Run in a thread (`LLMTestServer`) or as a script (`python llm_test_server.py
--port N`), which is how datatrove's CustomServer starts it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import re
import socket
import sys
import threading
from collections import Counter
from pathlib import Path

import orjson
from aiohttp import web

DIRECTIVE = re.compile(r"\[\[doc=([^;\]]+)((?:;[a-z0-9]+=[^;\]]*)*)\]\]")
REASON = "The extract introduces a few concepts clearly but lacks exercises."


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a server, a rendezvous or a refused connection)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def directive(doc_id: str, **options) -> str:
    """Text to put in a test document: `directive("d1", score=4, fail500=2)`."""
    return "[[doc=" + doc_id + "".join(f";{k}={v}" for k, v in options.items()) + "]]"


EXTRACT_START, EXTRACT_END = "The extract:\n", "\n\nAfter examining the extract:"


def text_key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()


def label_table(rows) -> dict[str, tuple[str, int]]:
    """{SHA-1 of text: (id, label)} from rows with `id`, `text` and `score`, for `LLMTestServer(labels=...)`."""
    return {text_key(r["text"]): (str(r["id"]), int(r["score"])) for r in rows}


def extract_of(prompt: str) -> str | None:
    """The document inside a prompt rendered from a bundled rubric."""
    if EXTRACT_START not in prompt or EXTRACT_END not in prompt:
        return None
    return prompt.split(EXTRACT_START, 1)[1].rsplit(EXTRACT_END, 1)[0]


def answer_text(score: int, fmt: str) -> str:
    return {
        "plain": f"{REASON}\n\nEducational score: {score}",
        "bold": f"{REASON}\n\n**Educational score:** {score}",
        "slash": f"{REASON}\n\nEducational Score: {score}/5",
        "trailing": f"{REASON}\n\nEducational score: {score}\n\nI hope this evaluation helps! Let me know.",
        "repeat": f"Educational score: {score}\n\n{REASON}\n\n**Educational score: {score}**",
        "two": f"A first reading suggests Educational score: {(score + 1) % 6}. On reflection: {REASON}\n\n"
        f"Educational score: {score}",
        "arith": "Educational score: 20 - 15 = 3 points\nEducational score: 3 + 4 = 7 points",
        "garbage": "I am unable to evaluate this extract.",
    }[fmt]


def openai_error(message: str, kind: str, code: str | None, status: int) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return web.json_response(body, status=status)


class LLMTestServer:
    def __init__(self, delay: float = 0.0, host: str = "127.0.0.1", port: int = 0, models=("test-model",),
                 own_name: str | None = None, api_key: str | None = None, serial: bool = False,
                 labels: dict[str, tuple[str, int]] | None = None, model_list: bool = True,
                 failing: int | None = None, log_prompts: bool = False):
        self.delay, self.host, self.port = delay, host, port
        self.log_prompts = log_prompts  # each prompt printed on one line, as vLLM before 0.10.1 logged requests
        self.failing = failing  # a status every completion request gets at once (a gateway before a dead node: 502)
        self.labels = labels
        self.model_list = model_list  # False: /v1/models answers 404, as some gateways do
        self.models = [own_name] if own_name else list(models)
        self.own_name, self.api_key = own_name, api_key
        self.requests: Counter = Counter()  # doc id -> requests received
        self.answered: Counter = Counter()  # doc id -> 200 answers sent
        self.bodies: list[dict] = []  # request bodies, for payload checks
        self.authorizations: list[str | None] = []  # Authorization headers of completion requests
        self.model_list_authorizations: list[str | None] = []  # Authorization headers of /v1/models requests
        self._one_at_a_time = asyncio.Lock() if serial else None
        self.in_flight = self.most_in_flight = 0  # completion requests being answered now, and the most at once
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    # --- app ---------------------------------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._require_key])
        for root in ("", "/{node}"):  # /NODE/v1 too: servers behind one gateway, told apart by the path
            app.router.add_post(root + "/v1/chat/completions", self._complete)
            app.router.add_post(root + "/v1/completions", self._complete)
            app.router.add_get(root + "/v1/models", self._models)
        app.router.add_get("/stats", self._stats)
        return app

    @web.middleware
    async def _require_key(self, request: web.Request, handler):
        if request.path == "/v1/models":
            self.model_list_authorizations.append(request.headers.get("Authorization"))
        if self.api_key and request.path.startswith("/v1/") and (
            request.headers.get("Authorization") != f"Bearer {self.api_key}"
        ):
            return openai_error("Invalid API Key", "invalid_request_error", "invalid_api_key", 401)
        return await handler(request)

    async def _models(self, request: web.Request) -> web.Response:
        if not self.model_list:
            return openai_error("Not Found", "NotFoundError", None, 404)
        return web.json_response({"object": "list", "data": [{"id": m, "object": "model"} for m in self.models]})

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response({"requests": dict(self.requests), "answered": dict(self.answered)})

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        self.bodies.append(body)
        self.authorizations.append(request.headers.get("Authorization"))
        if not self.own_name and body.get("model") not in self.models:
            return web.json_response({"object": "error", "message": f"The model `{body.get('model')}` does not "
                                      "exist.", "type": "NotFoundError", "param": None, "code": 404}, status=404)
        if self.failing is not None:
            self.requests["(failed)"] += 1
            return web.json_response({"error": "upstream unavailable (planned)"}, status=self.failing)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            async with self._one_at_a_time or contextlib.nullcontext():
                return await self._answer(request, body)
        finally:
            self.in_flight -= 1

    async def _answer(self, request: web.Request, body: dict) -> web.StreamResponse:
        chat = "messages" in body
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        if self.labels is not None:
            extract = extract_of(prompt)
            doc_id, label = self.labels.get(text_key(extract) if extract is not None else "", ("(unknown)", None))
            opts = {"format": "garbage"} if label is None else {"score": str(label)}
        else:
            match = DIRECTIVE.search(prompt)
            doc_id = match.group(1) if match else "(none)"
            opts = dict(kv.split("=", 1) for kv in match.group(2).split(";")[1:]) if match else {}
        self.requests[doc_id] += 1
        n = self.requests[doc_id]
        if self.log_prompts:
            print(f"INFO Received request {doc_id}: prompt: {prompt!r}", flush=True)
        if self.delay:
            await asyncio.sleep(self.delay)
        if n <= int(opts.get("drop", 0)):
            request.transport.close()  # the client sees the connection die mid-request
            return web.Response(status=500)
        if n <= int(opts.get("fail500", 0)):
            return web.json_response({"error": "internal error (planned)"}, status=500)
        if n <= int(opts.get("fail429", 0)):
            return web.json_response({"error": "rate limited (planned)"}, status=429, headers={"Retry-After": "0"})
        if n <= int(opts.get("error200", 0)):
            return openai_error("The upstream model is overloaded (planned)", "server_error", "overloaded", 200)
        if opts.get("http400"):
            return openai_error("The request was refused (planned) because this test document asks for it, and the "
                                "server explains why at length, as some servers do, in one long sentence that goes "
                                "on well past what a summary table can show.", "invalid_request_error", None, 400)
        prompt_tokens, max_tokens = len(prompt) // 4, body.get("max_tokens", 16)
        if "ctx" in opts and prompt_tokens + max_tokens > int(opts["ctx"]):
            if opts.get("ctxsay") == "sglang":
                return web.json_response({"object": "error", "message": (
                    f"Requested token count exceeds the model's maximum context length of {opts['ctx']} tokens. You "
                    f"requested a total of {prompt_tokens + max_tokens} tokens: {prompt_tokens} tokens from the input "
                    f"messages and {max_tokens} tokens for the completion."), "type": "BadRequestError",
                    "param": None, "code": 400}, status=400)
            if opts.get("ctxsay") == "bare":
                return openai_error("The prompt is too long for the model's context window.", "invalid_request_error",
                                    None, 400)
            return openai_error(
                f"This model's maximum context length is {opts['ctx']} tokens. However, you requested "
                f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in the "
                "completion). Please reduce the length of the messages or completion.",
                "invalid_request_error", "context_length_exceeded", 400)
        if n == 1 and "slow" in opts:
            await asyncio.sleep(float(opts["slow"]))
        fmt = "garbage" if n <= int(opts.get("garbage", 0)) else opts.get("format", "plain")
        text = answer_text(int(opts.get("score", 2)), fmt)
        finish_reason = "stop"
        if n <= int(opts.get("cut", 0)):
            text, finish_reason = REASON[:40], "length"
        choice = {"index": 0, "finish_reason": finish_reason}
        content = [{"type": "thinking", "thinking": "Educational score: 0? No."}, {"type": "text", "text": text}] if opts.get(
            "parts") else text
        choice.update({"message": {"role": "assistant", "content": content}} if chat else {"text": text})
        if chat and opts.get("reasoning"):
            choice["message"].update(content=None, reasoning_content=f"Let me see. {text}")
        answer = {"id": f"cmpl-{doc_id}-{n}", "model": self.own_name or body.get("model"), "choices": [choice]}
        if opts.get("usage", "1") != "0":
            answer["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": len(text) // 4,
                               "total_tokens": prompt_tokens + len(text) // 4}
        self.answered[doc_id] += 1
        return web.Response(body=orjson.dumps(answer), content_type="application/json")

    # --- running in a background thread ------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> LLMTestServer:
        ready = threading.Event()

        async def serve():
            self._runner = web.AppRunner(self.app(), access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, self.host, self.port)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]
            ready.set()

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(serve(), self._loop).result(timeout=10)
        ready.wait(10)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="localhost")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--labels", help="JSONL with id, text, score: answer every document with its score")
    parser.add_argument("--crash-after", type=float, help="seconds after which the server prints a traceback and "
                        "exits 1, as a vLLM hitting a CUDA error hours in")
    parser.add_argument("--log-prompts", action="store_true", help="print each prompt on one line, as vLLM's "
                        "request log did by default before 0.10.1")
    args = parser.parse_args()
    if args.crash_after is not None:
        def crash() -> None:
            print("Traceback (most recent call last):\nRuntimeError: planted crash of the test server", file=sys.stderr,
                  flush=True)
            os._exit(1)

        threading.Timer(args.crash_after, crash).start()
    labels = None
    if args.labels:
        labels = label_table(orjson.loads(line) for line in Path(args.labels).read_bytes().splitlines() if line)
    server = LLMTestServer(delay=args.delay, host=args.host, port=args.port, labels=labels,
                           log_prompts=args.log_prompts)
    print(f"test LLM server listening on {args.host}:{args.port}", flush=True)
    web.run_app(server.app(), host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()


def write_jsonl(path, rows: list[dict]):
    """Rows as JSONL, for the annotation tests."""
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return path


def read_jsonl(path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]
