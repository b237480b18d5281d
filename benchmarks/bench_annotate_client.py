"""Is the annotation client the bottleneck? Requests/s of `edu-filter score` against a server that answers instantly.

The server runs in its own process (a minimal keep-alive HTTP/1.1 server on asyncio) so client and server do not
share an event loop. Three clients are measured in the same run, against the same server:

  * edu-filter score   the full scoring path: read JSONL, render prompts, async client, parse, cache every answer
                       in SQLite, write the output file (also shown: the asking phase alone, without file I/O)
  * bare aiohttp       the same session / pool / concurrency with nothing else: the ceiling for this box
  * per-request conn   datatrove's localhost helper, which opens a new connection for every request: the baseline

Usage: python benchmarks/bench_annotate_client.py [--docs 20000] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

ANSWER = orjson.dumps({
    "id": "bench",
    "model": "bench",
    "choices": [{"index": 0, "finish_reason": "stop",
                 "message": {"role": "assistant", "content": "Clear worked example.\n\nEducational score: 3"}}],
    "usage": {"prompt_tokens": 420, "completion_tokens": 12, "total_tokens": 432},
})
MODELS = orjson.dumps({"object": "list", "data": [{"id": "bench", "object": "model"}]})


def response_head(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n"


class InstantHTTP(asyncio.Protocol):
    """Answers every request at once with the same completion (GET /v1/models with the model list); honours
    keep-alive and `Connection: close`."""

    def connection_made(self, transport):
        self.transport, self.buffer = transport, b""

    def data_received(self, data):
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].lower()
            start = head.find(b"content-length:")
            length = int(head[start + 15 : head.find(b"\r\n", start) if b"\r\n" in head[start:] else None]) if start >= 0 else 0
            if len(self.buffer) < end + 4 + length:
                return
            self.buffer = self.buffer[end + 4 + length :]
            close = b"connection: close" in head
            body = MODELS if head.startswith(b"get /v1/models") else ANSWER
            self.transport.write(response_head(body) + (b"Connection: close\r\n\r\n" if close else b"\r\n") + body)
            if close:
                self.transport.close()
                return


async def serve() -> None:
    server = await asyncio.get_running_loop().create_server(InstantHTTP, "127.0.0.1", 0, backlog=1024)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


def start_server() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, text=True)
    port = int(proc.stdout.readline())
    return proc, f"http://127.0.0.1:{port}/v1"


async def bare_aiohttp(url: str, payload: dict, n: int, concurrency: int) -> float:
    import aiohttp

    body = orjson.dumps(payload)
    todo = iter(range(n))
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        async def worker():
            for _ in todo:
                async with session.post(url + "/chat/completions", data=body) as resp:
                    orjson.loads(await resp.read())

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return n / (time.perf_counter() - start)


async def connection_per_request(url: str, payload: dict, n: int, concurrency: int) -> float:
    from datatrove.pipeline.inference.servers.base import _raw_post

    todo = iter(range(n))

    async def worker():
        for _ in todo:
            status, body = await _raw_post(url + "/chat/completions", payload)
            assert status == 200, body

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve())
        return

    from rich.console import Console
    from rich.table import Table

    from edu_filter.annotate.prompts import load_prompt
    from edu_filter.annotate.score import score_documents

    proc, url = start_server()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "docs.jsonl"
            # ~2,000-character documents, like a FineWeb extract cut with --max-chars
            sentence = "Photosynthesis converts light energy into chemical energy stored in glucose. "
            src.write_bytes(b"".join(
                orjson.dumps({"id": f"doc-{i}", "text": f"{i}: " + sentence * 26}) + b"\n" for i in range(args.docs)
            ))
            # the other clients send the same request body as `score` does
            payload = {"model": "bench", "temperature": 0.6, "top_p": 0.95, "max_tokens": 256,
                       "messages": [{"role": "user", "content": load_prompt("web").render("0: " + sentence * 26)[0]}]}
            start = time.perf_counter()
            summary = score_documents([str(src)], Path(tmp) / "out.jsonl", base_url=url, model="bench",
                                      concurrency=args.concurrency, show_progress=False)
            ours = args.docs / (time.perf_counter() - start)
            assert summary.scored == args.docs and summary.requests == args.docs, summary
            ceiling = asyncio.run(bare_aiohttp(url, payload, args.docs, args.concurrency))
            baseline = asyncio.run(connection_per_request(url, payload, min(args.docs, 5000), args.concurrency))
    finally:
        proc.terminate()
        proc.wait()

    table = Table(title=f"annotation client, {args.docs:,} documents, concurrency {args.concurrency}, "
                        f"{os.cpu_count()} CPUs, server in its own process")
    for col in ("client", "requests/s", "vs baseline"):
        table.add_column(col, justify="right" if col != "client" else "left")
    table.add_row("edu-filter score (end to end)", f"{ours:,.0f}", f"{ours / baseline:.1f}x")
    asking = summary.docs_per_second
    table.add_row("edu-filter score (asking phase only)", f"{asking:,.0f}", f"{asking / baseline:.1f}x")
    table.add_row("bare aiohttp (ceiling)", f"{ceiling:,.0f}", f"{ceiling / baseline:.1f}x")
    table.add_row("connection per request (baseline)", f"{baseline:,.0f}", "1.0x")
    Console().print(table)
    print(f"edu-filter score: {ours:,.0f} requests/s ({ours / ceiling:.0%} of bare aiohttp, "
          f"{ours / baseline:.1f}x the connection-per-request baseline); target >= 1,000: "
          f"{'PASS' if ours >= 1000 else 'FAIL'}")


if __name__ == "__main__":
    main()
