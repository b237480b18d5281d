"""What real OpenAI-compatible servers do, reproduced by the local test server: SmolLM2's arithmetic answers, answers
cut off at max_tokens, OpenAI-style error bodies, keys on every route, one model under any name, one request at a
time."""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path

import orjson
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from llm_test_server import read_jsonl, write_jsonl, LLMTestServer, directive  # noqa: E402

from edu_filter.annotate.backends import BackendError, ContextOverflow, read_error  # noqa: E402
from edu_filter.annotate.prompts import load_prompt  # noqa: E402
from edu_filter.annotate.score import _rate, score_documents  # noqa: E402

FAST = {"retry_backoff": 0.01, "timeout": 1.0, "max_retries": 3, "show_progress": False}
SMOLLM = "smollm2-135m-instruct-q4_1.gguf"


def doc(doc_id: str, text: str = "A short lesson about fractions.", **behaviour) -> dict:
    return {"id": doc_id, "text": f"{directive(doc_id, **behaviour)} {text}"}


def test_arithmetic_and_conflicting_scores_are_never_recorded(server, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [doc("arith", format="arith"), doc("two", score=4, format="two"),
                                              doc("repeat", score=4, format="repeat")])
    summary = score_documents([str(src)], tmp_path / "out.jsonl", base_url=server.base_url, max_reasks=1, **FAST)
    arith, two, repeat = read_jsonl(tmp_path / "out.jsonl")
    # "Educational score: 20 - 15 = 3 points\nEducational score: 3 + 4 = 7 points" was once stored as 3
    assert arith["score"] is None and arith["response"].startswith("Educational score: 20 - 15 = 3 points")
    assert arith["error"] == "ambiguous: arithmetic after the score ('Educational score: 20 - 15 = 3 points')"
    assert two["score"] is None and two["error"] == "ambiguous: conflicting scores 4, 5 in one answer"
    assert arith["attempts"] == two["attempts"] == 2  # re-asked like unparseable answers, within --max-reasks
    assert repeat["score"] == 4 and repeat["error"] is None
    assert summary.failed == Counter({"ambiguous": 2}) and summary.scored == 1


def test_cut_off_answer_is_named_and_asked_at_most_twice(server, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [doc("always", cut=99), doc("once", score=5, cut=1)])
    summary = score_documents([str(src)], tmp_path / "out.jsonl", base_url=server.base_url, max_reasks=5,
                              max_tokens=64, **FAST)
    always, once = read_jsonl(tmp_path / "out.jsonl")
    assert always["score"] is None and always["finish_reason"] == "length"
    assert always["error"] == "cut off at max_tokens: the answer reached --max-tokens 64 before its end"
    assert server.requests["always"] == 2 and always["attempts"] == 2  # not the 6 that --max-reasks 5 allows
    assert once["score"] == 5 and server.requests["once"] == 2 and once["finish_reason"] == "stop"
    assert summary.failed == Counter({"cut off at max_tokens": 1})


def test_context_overflow_counted_by_code_and_cut_to_fit_when_max_chars_allows(server, tmp_path):
    template_tokens = len(load_prompt("web").render("")[0]) // 4
    ctx = template_tokens + 256 + 300  # room for ~1,200 characters of document
    long_text = "Fractions name parts of a whole. " * 200  # 6,600 characters
    docs = [doc("long", text=long_text, score=3, ctx=ctx), doc("short", score=1, ctx=ctx),
            doc("hopeless", score=1, ctx=template_tokens // 2)]  # not even the rubric fits
    src = write_jsonl(tmp_path / "in.jsonl", docs)

    plain = score_documents([str(src)], tmp_path / "plain.jsonl", base_url=server.base_url, **FAST)
    long_row, short_row, hopeless_row = read_jsonl(tmp_path / "plain.jsonl")
    assert long_row["score"] is None and short_row["score"] == 1
    assert long_row["error"].startswith("http 400 context_length_exceeded: This model's maximum context length is")
    assert plain.failed == Counter({"http 400 context_length_exceeded": 2})  # counted by error.code, not "http 400"
    assert server.requests["long"] == 1 and not long_row["truncated"]

    fitted = score_documents([str(src)], tmp_path / "fitted.jsonl", base_url=server.base_url, max_chars=100_000,
                             **FAST)
    long_row, short_row, hopeless_row = read_jsonl(tmp_path / "fitted.jsonl")
    assert long_row["score"] == 3 and long_row["error"] is None and long_row["truncated"]
    assert server.requests["long"] == 1 + 2  # refused once more, then asked once cut to fit
    assert hopeless_row["error"].startswith("http 400 context_length_exceeded")
    assert server.requests["hopeless"] == 2  # one request per run: nothing left to cut that would fit
    assert fitted.refits == 1 and fitted.truncated == 1 and fitted.failed == {"http 400 context_length_exceeded": 1}

    # resumed: the answer to the cut prompt is replayed, still marked truncated
    again = score_documents([str(src)], tmp_path / "fitted.jsonl", base_url=server.base_url, max_chars=100_000,
                            **FAST)
    assert server.requests["long"] == 3 and again.truncated == 1
    assert read_jsonl(tmp_path / "fitted.jsonl")[0]["score"] == 3


def test_a_rerun_with_max_chars_asks_again_only_what_its_prompts_change(server, tmp_path):
    """The README's way past context_length_exceeded is a rerun with --max-chars, which keyed the cache: every
    document was asked again (500k answers paid twice to mend a few hundred). An answer is replayed where its
    prompt held what this run's would: the same characters, or a cut to fit the server's context where this run
    starts from at least what was refused then."""
    template_tokens = len(load_prompt("web").render("")[0]) // 4
    ctx = template_tokens + 256 + 300  # room for ~1,200 characters of document

    def lead(doc_id: str, text: str, **behaviour) -> dict:  # the directive first: it survives a cut
        return {"id": doc_id, "text": f"{directive(doc_id, **behaviour)} {text}"}

    docs = ([lead("long", "Fractions name parts of a whole. " * 200, score=3, ctx=ctx)]
            + [lead(f"s{i}", "A short lesson.", score=i % 6) for i in range(10)]
            + [lead("medium", "Decimals are fractions of ten. " * 20, score=4)])  # ~650 characters
    src, out = write_jsonl(tmp_path / "in.jsonl", docs), tmp_path / "out.jsonl"
    plain = score_documents([str(src)], out, base_url=server.base_url, **FAST)
    assert plain.failed == Counter({"http 400 context_length_exceeded": 1}) and server.requests["long"] == 1

    fitted = score_documents([str(src)], out, base_url=server.base_url, max_chars=100_000, **FAST)
    assert fitted.replayed == 11 and fitted.refits == 1 and not fitted.failed
    assert server.requests["long"] == 1 + 2 and server.requests["medium"] == 1
    assert all(server.requests[f"s{i}"] == 1 for i in range(10))
    assert [r["score"] for r in read_jsonl(out)] == [3] + [i % 6 for i in range(10)] + [4]

    cache = sqlite3.connect(tmp_path / "out.jsonl.cache.sqlite")
    fit = cache.execute("SELECT MAX(doc_chars) FROM answers WHERE doc_id = 'long'").fetchone()[0]
    cache.close()
    assert 750 < fit < 1_200  # the server's context, from its numbers; the medium document is shorter

    # another limit above the whole long document: it is sent whole, refused and cut again, so its answer is replayed
    same = score_documents([str(src)], out, base_url=server.base_url, max_chars=50_000, **FAST)
    assert same.replayed == 12 and server.requests["long"] == 3
    # a limit between the cut and the document sends that much (it fits): asked; so is less of the medium document
    between = score_documents([str(src)], out, base_url=server.base_url, max_chars=fit + 100, **FAST)
    assert between.replayed == 11 and server.requests["long"] == 4 and server.requests["medium"] == 1
    shortest = score_documents([str(src)], out, base_url=server.base_url, max_chars=400, **FAST)
    assert shortest.replayed == 10 and server.requests["long"] == 5 and server.requests["medium"] == 2
    assert all(server.requests[f"s{i}"] == 1 for i in range(10)) and not shortest.failed


def test_overflow_in_sglang_words_or_none_is_still_cut_to_fit(server, tmp_path):
    """SGLang (and newer vLLM) say "maximum context length of N ... P tokens from the input messages", which the
    OpenAI patterns missed: the document was halved once and failed on every run. A server that gives no numbers
    gets the document halved until it fits (up to 5 times), not once."""
    template_tokens = len(load_prompt("web").render("")[0]) // 4
    ctx = template_tokens + 256 + 300  # room for ~1,200 characters of document
    long_text = "Fractions name parts of a whole. " * 200  # 6,600 characters: more than twice too long
    src = write_jsonl(tmp_path / "in.jsonl", [doc("sglang", text=long_text, score=3, ctx=ctx, ctxsay="sglang"),
                                               doc("bare", text=long_text, score=4, ctx=ctx, ctxsay="bare")])
    summary = score_documents([str(src)], tmp_path / "out.jsonl", base_url=server.base_url, max_chars=100_000,
                              **FAST)
    sglang, bare = read_jsonl(tmp_path / "out.jsonl")
    assert (sglang["score"], sglang["error"], sglang["truncated"]) == (3, None, True)
    assert server.requests["sglang"] == 2  # refused once, then cut by the numbers
    assert (bare["score"], bare["error"], bare["truncated"]) == (4, None, True)
    assert server.requests["bare"] == 4  # 6,600 characters halved three times: 825 fit
    assert summary.refits == 2 and summary.truncated == 2


def test_answer_content_given_as_parts_is_read_from_its_text_parts(server, tmp_path):
    """Mistral's API (and reasoning models behind some servers) answer `content` as a list of parts: the run
    crashed on it with an SQLite error. Only the text parts are the answer (the reasoning part here says 0)."""
    src = write_jsonl(tmp_path / "in.jsonl", [doc("parts", score=4, parts=1), doc("plain", score=2)])
    summary = score_documents([str(src)], tmp_path / "out.jsonl", base_url=server.base_url, **FAST)
    parts, plain = read_jsonl(tmp_path / "out.jsonl")
    assert (parts["score"], parts["error"], plain["score"]) == (4, None, 2) and summary.scored == 2
    assert "Educational score: 0" not in parts["response"]


@pytest.mark.parametrize(
    "body, code, message, overflow",
    [
        ({"error": {"message": "This model's maximum context length is 2048 tokens. However, you requested 2329 "
                               "tokens (2073 in the messages, 256 in the completion).",
                    "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}},
         "context_length_exceeded", "This model's maximum context length is 2048", ContextOverflow(2048, 2073)),
        ({"object": "error", "message": "This model's maximum context length is 4096 tokens. However, your request "
                                        "has 5000 input tokens.", "type": "BadRequestError", "code": 400},
         None, "This model's maximum", ContextOverflow(4096, 5000)),
        ({"error": {"code": 400, "message": "the request exceeds the available context size, try increasing it",
                    "type": "exceed_context_size_error", "n_prompt_tokens": 5000, "n_ctx": 4096}},
         None, "the request exceeds", ContextOverflow(4096, 5000)),
        ({"object": "error", "message": "Requested token count exceeds the model's maximum context length of 4096 "
                                        "tokens. You requested a total of 5256 tokens: 5000 tokens from the input "
                                        "messages and 256 tokens for the completion.", "code": 400},
         None, "Requested token count", ContextOverflow(4096, 5000)),  # SGLang, newer vLLM
        ({"object": "error", "message": "The input (5000 tokens) is longer than the model's context length (4096 "
                                        "tokens).", "code": 400},
         None, "The input (5000 tokens)", ContextOverflow(4096, 5000)),  # SGLang
        ({"error": "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 4096. Given: 5000 `inputs` "
                   "tokens and 256 `max_new_tokens`", "error_type": "validation"},
         None, "Input validation error", ContextOverflow(4096, 5000)),  # TGI
        ({"error": "Input validation error: `inputs` must have less than 4096 tokens. Given: 5000",
          "error_type": "validation"}, None, "Input validation error", ContextOverflow(4096, 5000)),  # TGI
        # OpenAI's wording for chat requests: the prompt's size was not read, and a document 10% over the context
        # was halved instead of cut once by the numbers
        ({"error": {"message": "This model's maximum context length is 8192 tokens. However, your messages "
                               "resulted in 9000 tokens. Please reduce the length of the messages.",
                    "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}},
         "context_length_exceeded", "This model's maximum context length is 8192", ContextOverflow(8192, 9000)),
        ({"error": {"code": 400, "message": "request (9000 tokens) exceeds the available context size (8192 tokens), "
                                            "try increasing it", "type": "exceed_context_size_error"}},
         None, "request (9000 tokens)", ContextOverflow(8192, 9000)),  # llama.cpp without n_ctx / n_prompt_tokens
        ({"error": {"message": "Invalid API Key", "type": "invalid_request_error", "code": "invalid_api_key"}},
         "invalid_api_key", "Invalid API Key", None),
        ({"detail": "Not Found"}, None, "Not Found", None),
    ],
)
def test_error_bodies_of_real_servers_are_read(body, code, message, overflow):
    got_code, got_message, got_overflow = read_error(orjson.dumps(body))
    assert (got_code, got_overflow) == (code, overflow) and got_message.startswith(message)
    assert read_error(b"<html>Bad Gateway</html>") == (None, "<html>Bad Gateway</html>", None)


def test_api_key_goes_to_every_route(tmp_path, monkeypatch):
    server = LLMTestServer(api_key="sk-secret").start()
    try:
        src = write_jsonl(tmp_path / "in.jsonl", [doc("a", score=3)])
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)
        with pytest.raises(BackendError, match="/models answered 401 .*Invalid API Key.*No API key was sent"):
            score_documents([str(src)], tmp_path / "out.jsonl", base_url=server.base_url, **FAST)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong")
        with pytest.raises(BackendError, match="401 \\(authentication failed\\): Invalid API Key"):
            score_documents([str(src)], tmp_path / "out.jsonl", base_url=server.base_url, **FAST)
        assert server.requests == Counter()  # refused before any document was asked

        monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
        score_documents([str(src)], tmp_path / "out.jsonl", base_url=server.base_url, **FAST)
        assert read_jsonl(tmp_path / "out.jsonl")[0]["score"] == 3
        # asked before the input is read, and by the run: the key each time
        assert server.model_list_authorizations == [None, "Bearer sk-wrong", "Bearer sk-secret", "Bearer sk-secret"]
        assert server.authorizations == ["Bearer sk-secret"]
    finally:
        server.stop()


def test_rows_and_cache_name_the_model_that_answered(tmp_path):
    """llama.cpp serves one model under any requested name; the rows once said Meta-Llama-3-70B-Instruct."""
    server = LLMTestServer(own_name=SMOLLM).start()
    try:
        src = write_jsonl(tmp_path / "in.jsonl", [doc("a", score=3), doc("b", score=1)])
        out = tmp_path / "out.jsonl"
        summary = score_documents([str(src)], out, base_url=server.base_url,
                                  model="meta-llama/Meta-Llama-3-70B-Instruct", **FAST)
        assert [(r["model"], r["score"]) for r in read_jsonl(out)] == [(SMOLLM, 3), (SMOLLM, 1)]
        assert summary.model == SMOLLM and "Meta-Llama-3-70B-Instruct" in summary.notes[0]
        assert {body["model"] for body in server.bodies} == {SMOLLM}
        with sqlite3.connect(tmp_path / "out.jsonl.cache.sqlite") as db:
            [(settings,)] = db.execute("SELECT settings FROM runs").fetchall()
            assert {m for (m,) in db.execute("SELECT model FROM answers")} == {SMOLLM}
        assert orjson.loads(settings)["model"] == SMOLLM

        # without --model: the one model served; same cache key, so nothing is asked again
        again = score_documents([str(src)], out, base_url=server.base_url, **FAST)
        assert again.requests == 0 and again.cached_answers == 2 and again.notes == []
    finally:
        server.stop()


def test_model_not_served_is_refused_naming_what_is_served(tmp_path):
    server = LLMTestServer(models=("llama-3.3-70b", "qwen2.5-72b")).start()
    try:
        src = write_jsonl(tmp_path / "in.jsonl", [doc("a", score=3)])
        with pytest.raises(BackendError, match="--model 'gpt-4o' is not served .* 'llama-3.3-70b', 'qwen2.5-72b'"):
            score_documents([str(src)], tmp_path / "out.jsonl", base_url=server.base_url, model="gpt-4o", **FAST)
        # no silent default name: the command line says what to choose from, in one line
        cli = subprocess.run(
            [sys.executable, "-m", "edu_filter.cli", "score", str(src), "-o", str(tmp_path / "out.jsonl"),
             "--base-url", server.base_url], capture_output=True, text=True, timeout=120,
        )
        assert cli.returncode == 2 and server.requests == Counter()
        assert cli.stderr.strip().splitlines() == [
            f"error: {server.base_url} serves several models ('llama-3.3-70b', 'qwen2.5-72b'): choose one with --model"
        ]
        score_documents([str(src)], tmp_path / "out.jsonl", base_url=server.base_url, model="qwen2.5-72b", **FAST)
        assert read_jsonl(tmp_path / "out.jsonl")[0]["model"] == "qwen2.5-72b"
    finally:
        server.stop()


def test_queued_requests_back_off_concurrency_instead_of_being_abandoned(tmp_path):
    """One request at a time, 0.1 s each: 16 in flight queue for up to 1.6 s, longer than the 1 s timeout."""
    server = LLMTestServer(serial=True, delay=0.1).start()
    try:
        src = write_jsonl(tmp_path / "in.jsonl", [doc(f"d{i:02d}", score=i % 6) for i in range(24)])
        summary = score_documents([str(src)], tmp_path / "out.jsonl", base_url=server.base_url, concurrency=16,
                                  timeout=1.0, max_retries=0, retry_backoff=0.01, show_progress=False)
        rows = read_jsonl(tmp_path / "out.jsonl")
        assert [r["score"] for r in rows] == [i % 6 for i in range(24)]  # none given up (there are no retries)
        assert all(server.requests[f"d{i:02d}"] == 1 for i in range(24))  # and none sent twice
        assert summary.concurrency is not None and summary.concurrency < 16
    finally:
        server.stop()


def test_the_in_flight_limit_grows_back_while_the_server_keeps_up():
    """It only ever shrank: a few slow requests in a day-long run cut 16 requests in flight to 1 for good."""
    from edu_filter.annotate.backends import InFlightLimit

    limit = InFlightLimit(16)
    for generation in range(4):
        limit.shrink(generation)
    assert limit.limit == 1
    answers = 0
    while limit.limit < 16:
        limit.kept_up()
        answers += 1
    assert answers == sum(InFlightLimit.GROW_AFTER * n for n in range(1, 16))  # one place per 4 x limit answers
    limit.kept_up()
    assert limit.limit == 16  # never above the asked concurrency


def test_a_429_halves_the_requests_in_flight(tmp_path):
    """A rate limit (429) left every worker retrying on its own at the full concurrency."""
    server = LLMTestServer().start()
    try:
        src = write_jsonl(tmp_path / "in.jsonl", [doc("limited", score=3, fail429=1)] +
                          [doc(f"d{i}", score=2) for i in range(5)])
        summary = score_documents([str(src)], tmp_path / "out.jsonl", base_url=server.base_url, concurrency=8,
                                  **FAST)
        assert summary.scored == 6 and summary.concurrency == 4
        # a 429 is waited out, not spent from --max-retries (3 here): a quota steadily exceeded failed documents
        src = write_jsonl(tmp_path / "quota.jsonl", [doc("quota", score=4, fail429=8)])
        summary = score_documents([str(src)], tmp_path / "quota-out.jsonl", base_url=server.base_url, **FAST)
        assert summary.scored == 1 and server.requests["quota"] == 9
    finally:
        server.stop()


def test_a_server_gone_for_good_stops_the_run(tmp_path, monkeypatch):
    """A server that died mid-run (a launched vLLM gone, a pod never back) failed every remaining document one at a
    time, a few retries each, for days. With no usable answer from any server for long enough, the run stops; what
    was answered is in the cache."""
    import threading
    import time

    import edu_filter.annotate.backends as backends

    monkeypatch.setattr(backends, "SILENCE_MIN_S", 2.0)
    server = LLMTestServer(delay=0.02).start()
    src = write_jsonl(tmp_path / "in.jsonl", [doc(f"d{i:03d}", score=i % 6) for i in range(400)])

    def stop_after_some_answers():
        while sum(server.requests.values()) < 40:
            time.sleep(0.01)
        server.stop()

    stopper = threading.Thread(target=stop_after_some_answers)
    stopper.start()
    started = time.monotonic()
    with pytest.raises(BackendError, match="no server gave a usable answer for"):
        score_documents([str(src)], tmp_path / "out.jsonl", base_url=server.base_url, concurrency=4,
                        **{**FAST, "timeout": 0.3})
    stopper.join()
    assert time.monotonic() - started < 60
    cached = sqlite3.connect(tmp_path / "out.jsonl.cache.sqlite").execute("SELECT COUNT(*) FROM answers").fetchone()
    assert cached[0] >= 30


def test_a_gateway_answering_200_with_error_bodies_stops_the_run_as_a_dead_server(tmp_path, monkeypatch):
    """A gateway whose backend is gone, or whose quota is used up, may say so in 200s with an error body. Each 200
    counted as a usable answer: the stop for a dead server never came, and every document failed after its retries,
    saying only "bad response: KeyError", exit 0. A document whose first tries get such a body is still scored."""
    import edu_filter.annotate.backends as backends

    monkeypatch.setattr(backends, "SILENCE_MIN_S", 1.0)
    monkeypatch.setattr(backends, "SILENCE_TIMEOUTS", 0)
    server = LLMTestServer(delay=0.01).start()
    try:
        src = write_jsonl(tmp_path / "in.jsonl", [doc("brief", score=4, error200=2), doc("ok", score=3)])
        summary = score_documents([str(src)], tmp_path / "out.jsonl", base_url=server.base_url, concurrency=1,
                                  **FAST)
        assert summary.scored == 2 and server.requests["brief"] == 3
        src = write_jsonl(tmp_path / "gone.jsonl", [doc(f"d{i:03d}", error200=99) for i in range(300)])
        with pytest.raises(BackendError, match=r"no server gave a usable answer .*http 200 overloaded: The upstream"):
            score_documents([str(src)], tmp_path / "gone-out.jsonl", base_url=server.base_url, concurrency=2,
                            **{**FAST, "max_retries": 1})
        assert sum(server.requests[f"d{i:03d}"] for i in range(300)) < 2 * 300  # stopped before the end
    finally:
        server.stop()


def test_one_document_the_server_cannot_answer_fails_alone_however_long_its_retries(tmp_path, monkeypatch):
    """The run stops for a silent server only once documents fail for good one after another: a single document
    whose retries outlast the silence limit (six tries of two minutes) stopped a healthy run, and every rerun."""
    import edu_filter.annotate.backends as backends

    monkeypatch.setattr(backends, "SILENCE_MIN_S", 0.0)  # any silence is long enough
    monkeypatch.setattr(backends, "SILENCE_TIMEOUTS", 0)
    server = LLMTestServer().start()
    try:
        src = write_jsonl(tmp_path / "in.jsonl", [doc("stuck", fail500=99), doc("a", score=3), doc("b", score=4)])
        summary = score_documents([str(src)], tmp_path / "out.jsonl", base_url=server.base_url, concurrency=1,
                                  **FAST)
        rows = read_jsonl(tmp_path / "out.jsonl")
        assert [(r["id"], r["score"]) for r in rows] == [("stuck", None), ("a", 3), ("b", 4)]
        assert rows[0]["error"].startswith("http 500") and summary.scored == 2
        monkeypatch.setattr(backends, "SILENCE_MIN_DOCUMENTS", 1)  # one failed document would be enough: stopped
        with pytest.raises(BackendError, match="no server gave a usable answer"):
            score_documents([str(src)], tmp_path / "again.jsonl", base_url=server.base_url, concurrency=1, **FAST)
    finally:
        server.stop()


def test_plain_progress_lines_when_output_is_not_a_terminal(tmp_path, capsys):
    server = LLMTestServer(delay=0.05).start()
    try:
        src = write_jsonl(tmp_path / "in.jsonl", [doc(f"d{i}", score=2) for i in range(8)] + [doc("bad", http400=1)])
        score_documents([str(src)], tmp_path / "out.jsonl", base_url=server.base_url, concurrency=1,
                        show_progress=True, progress_every=0.05)
    finally:
        server.stop()
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("scoring: ")]
    assert len(lines) >= 3 and "\x1b[" not in out  # several plain lines, no terminal control codes
    assert lines[-1].startswith("scoring: 9/9 documents, 1 failed, ")
    assert "docs/s" in lines[-1] and "score summary" in out
    # the time left while it runs (log mode said none), and the pass counting the input before any request said
    assert re.search(r"scoring: [1-8]/9 documents, .* docs/s, \d+ s, \d+ s left$", "\n".join(lines), re.M), lines
    assert "counting the documents: 9" in out


def test_docs_per_second_keeps_digits_on_slow_servers():
    assert [_rate(x) for x in (0.0423, 0.5, 3.14159, 42.0, 1234.4)] == ["0.042", "0.5", "3.1", "42.0", "1,234"]


def test_parquet_score_column_stays_integer_when_every_score_failed(server, tmp_path):
    import polars as pl

    failed = write_jsonl(tmp_path / "failed.jsonl", [doc("a", http400=1), doc("b", format="garbage")])
    fine = write_jsonl(tmp_path / "fine.jsonl", [doc("c", score=4)])
    score_documents([str(failed)], tmp_path / "failed.parquet", base_url=server.base_url, max_reasks=0, **FAST)
    score_documents([str(fine)], tmp_path / "fine.parquet", base_url=server.base_url, **FAST)
    failed_frame = pl.read_parquet(tmp_path / "failed.parquet")
    assert failed_frame["score"].to_list() == [None, None]
    assert failed_frame.schema["score"] == pl.Int64 and failed_frame.schema["prompt_tokens"] == pl.Int64
    combined = pl.read_parquet([tmp_path / "failed.parquet", tmp_path / "fine.parquet"])
    assert combined["score"].to_list() == [None, None, 4]
