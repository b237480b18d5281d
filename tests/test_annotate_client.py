"""The OpenAI-compatible scoring client against a real, misbehaving HTTP server on 127.0.0.1."""

from __future__ import annotations

import email.utils
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from llm_test_server import LLMTestServer, directive, free_port, read_jsonl, write_jsonl  # noqa: E402

from edu_filter.annotate.backends import RETRY_AFTER_MAX_S, BackendError, OpenAIBackend, _retry_after  # noqa: E402
from edu_filter.annotate.score import ScoreConfig, score_documents  # noqa: E402
from edu_filter.documents import DocumentError, InputError  # noqa: E402

FAST = {"retry_backoff": 0.01, "timeout": 1.0, "max_retries": 3, "show_progress": False}


def doc(doc_id: str, text: str = "A short lesson about fractions.", **behaviour) -> dict:
    return {"id": doc_id, "text": f"{text} {directive(doc_id, **behaviour)}"}


# (doc, expected score, expected error prefix, expected requests to the server, expected attempts)
CASES = [
    (doc("plain", score=3), 3, None, 1, 1),
    (doc("bold", score=4, format="bold"), 4, None, 1, 1),
    (doc("slash", score=5, format="slash"), 5, None, 1, 1),
    (doc("trailing", score=1, format="trailing"), 1, None, 1, 1),
    (doc("repeat", score=0, format="repeat"), 0, None, 1, 1),
    (doc("two", score=0, format="two"), None, "ambiguous: conflicting scores 0, 1", 3, 3),
    (doc("arith", format="arith"), None, "ambiguous: arithmetic after the score", 3, 3),
    (doc("cut", cut=99), None, "cut off at max_tokens", 2, 2),
    (doc("cutonce", score=4, cut=1), 4, None, 2, 2),
    (doc("e500", score=2, fail500=2), 2, None, 3, 1),
    (doc("e429", score=3, fail429=3), 3, None, 4, 1),
    (doc("dropped", score=4, drop=1), 4, None, 2, 1),
    (doc("slow", score=5, slow=3), 5, None, 2, 1),
    (doc("reask", score=2, garbage=1), 2, None, 2, 2),
    (doc("garbage", format="garbage"), None, "unparseable", 3, 3),
    (doc("refused", http400=1), None, "http 400: The request was refused (planned)", 1, 0),
    (doc("down", fail500=99), None, "http 500", 4, 0),
    (doc("nousage", score=1, usage=0), 1, None, 1, 1),
    # a reasoning parser's answer that stopped inside its thinking: all of it in reasoning_content, content null
    (doc("thinking", reasoning=1), None, "unparseable: the answer ends inside its reasoning", 3, 3),
]


def test_misbehaving_server_every_document_once_with_right_scores(server, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [c[0] for c in CASES])
    out = tmp_path / "out.jsonl"
    summary = score_documents(
        [str(src)], out, base_url=server.base_url, model="test-model", concurrency=8, max_reasks=2, **FAST
    )
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == [c[0]["id"] for c in CASES]  # every document once, in input order
    for (d, score, error, requests, attempts), row in zip(CASES, rows):
        assert row["text"] == d["text"]
        assert row["score"] == score, row
        assert (row["error"] is None) if error is None else row["error"].startswith(error), row
        assert server.requests[d["id"]] == requests, d["id"]
        assert row["attempts"] == attempts, d["id"]
        assert row["model"] == "test-model" and row["prompt"] == "fineweb-edu-v1"
    by_id = {r["id"]: r for r in rows}
    assert by_id["cut"]["finish_reason"] == "length" and by_id["cutonce"]["finish_reason"] == "stop"
    assert len(by_id["refused"]["error"]) < 200 and by_id["refused"]["error"].endswith(" ...")  # cut at a word
    assert "gave up after 4 tries" in by_id["down"]["error"]
    assert by_id["garbage"]["response"] == "I am unable to evaluate this extract."
    assert by_id["nousage"]["prompt_tokens"] is None and by_id["nousage"]["completion_tokens"] is None
    assert by_id["plain"]["prompt_tokens"] > 100 and by_id["plain"]["completion_tokens"] > 5
    assert by_id["reask"]["completion_tokens"] > by_id["plain"]["completion_tokens"]  # summed over both answers

    assert summary.documents == len(CASES) and summary.scored == 12
    assert by_id["thinking"]["response"].startswith("<think>Let me see.")  # the server's reasoning, kept
    assert summary.failed == Counter({"unparseable": 2, "ambiguous": 2, "cut off at max_tokens": 1, "http 400": 1,
                                      "http 500": 1})
    assert summary.requests == sum(c[3] for c in CASES)
    assert summary.reasks == sum(c[4] - 1 for c in CASES if c[4] > 1)
    assert summary.prompt_tokens == sum(r["prompt_tokens"] or 0 for r in rows)


def test_temperature_zero_sends_no_reask(server, tmp_path):
    """A greedy server answers the identical request the same: re-asks at temperature 0 paid for nothing."""
    src = write_jsonl(tmp_path / "in.jsonl", [doc("garbage", format="garbage"), doc("ok", score=3)])
    summary = score_documents([str(src)], tmp_path / "out.jsonl", base_url=server.base_url, model="test-model",
                              temperature=0.0, max_reasks=2, **FAST)
    rows = {r["id"]: r for r in read_jsonl(tmp_path / "out.jsonl")}
    assert server.requests["garbage"] == 1 and rows["garbage"]["attempts"] == 1
    assert rows["garbage"]["error"].startswith("unparseable") and rows["ok"]["score"] == 3
    assert summary.reasks == 0


def test_payload_follows_fineweb_edu_settings_chat_and_completion(tmp_path, monkeypatch):
    server = LLMTestServer(models=("m0", "m1")).start()
    try:
        _check_payloads(server, tmp_path, monkeypatch)
    finally:
        server.stop()


def _check_payloads(server, tmp_path, monkeypatch):
    monkeypatch.setenv("EDU_TEST_KEY", "sk-test-123")
    src = write_jsonl(tmp_path / "in.jsonl", [doc("a", text="Photosynthesis turns light into sugar.", score=3)])
    score_documents([str(src)], tmp_path / "chat.jsonl", base_url=server.base_url, model="m1",
                    api_key_env="EDU_TEST_KEY", **FAST)
    body = server.bodies[-1]
    assert body["model"] == "m1"
    assert (body["temperature"], body["top_p"], body["max_tokens"]) == (0.6, 0.95, 256)
    [message] = body["messages"]
    assert message["role"] == "user"
    assert message["content"].startswith("Below is an extract from a web page.")
    assert "The extract:\nPhotosynthesis turns light into sugar." in message["content"]
    assert server.authorizations[-1] == "Bearer sk-test-123"

    row = read_jsonl(score_documents(
        [str(src)], tmp_path / "completion.jsonl", base_url=server.base_url, model="m1", api="completion",
        prompt="code", temperature=0.0, max_tokens=64, api_key_env="EDU_UNSET_KEY", **FAST,
    ).output and tmp_path / "completion.jsonl")[0]
    body = server.bodies[-1]
    assert "messages" not in body and body["prompt"].startswith("Below is an extract from a Python program.")
    assert (body["temperature"], body["max_tokens"]) == (0.0, 64)
    assert server.authorizations[-1] is None
    assert row["score"] == 3 and row["prompt"] == "python-edu-v1" and row["model"] == "m1"


def test_rerun_replays_answers_retries_failures_and_keys_on_settings(server, tmp_path):
    docs = [doc(f"d{i}", score=i % 6) for i in range(6)] + [doc("reask", garbage=1, score=4), doc("down", fail500=4)]
    src = write_jsonl(tmp_path / "in.jsonl", docs)
    out = tmp_path / "out.jsonl"
    first = score_documents([str(src)], out, base_url=server.base_url, model="m", max_retries=1,
                            **{k: v for k, v in FAST.items() if k != "max_retries"})
    assert first.requests == 6 + 2 + 2 and first.cached_answers == 0
    assert read_jsonl(out)[-1]["error"].startswith("http 500")

    second = score_documents([str(src)], out, base_url=server.base_url, model="m", **FAST)
    # every received answer is replayed; only the document that never got one is asked again (and now succeeds:
    # the server stops failing after 4 requests)
    assert second.cached_answers == 6 + 2 and second.reasks == 0  # the re-ask replayed, not sent
    assert server.requests["down"] == 2 + 3 and server.requests["reask"] == 2
    assert all(server.requests[f"d{i}"] == 1 for i in range(6))
    rows = read_jsonl(out)
    assert [r["score"] for r in rows] == [0, 1, 2, 3, 4, 5, 4, 2]
    assert rows[6]["attempts"] == 2 and rows[6]["response"].endswith("Educational score: 4")
    # the rate and the tokens are of what was asked: 7 documents replayed took no time and cost no tokens
    assert second.replayed == 7 and second.prompt_tokens == rows[7]["prompt_tokens"] > 0
    assert second.docs_per_second == pytest.approx(1 / second.seconds)

    before = sum(server.requests.values())
    score_documents([str(src)], out, base_url=server.base_url, model="m", temperature=0.3, **FAST)
    assert sum(server.requests.values()) - before == len(docs)  # new settings -> every document asked again
    assert sqlite3.connect(tmp_path / "out.jsonl.cache.sqlite").execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 2
    # the same settings written another way (a library call's int, the command line's float): replayed, not asked
    before = sum(server.requests.values())
    replayed = score_documents([str(src)], out, base_url=server.base_url, model="m", temperature=0.3, top_p=1,
                               **FAST)
    assert replayed.cached_answers == 0 and sum(server.requests.values()) - before == len(docs)  # top_p 1 is new
    again = score_documents([str(src)], out, base_url=server.base_url, model="m", temperature=0.3, top_p=1.0,
                            **FAST)
    assert again.requests == 0 and again.cached_answers == replayed.cached_answers + len(docs)
    assert again.replayed == len(docs) and again.prompt_tokens == again.completion_tokens == again.docs_per_second == 0


def test_a_run_that_replays_nothing_says_how_the_answers_its_cache_holds_were_asked(tmp_path, capsys):
    """A local model moved to another path (a job's scratch folder) is another model to the cache: every document
    was asked, and paid, again without a word."""
    server = LLMTestServer(models=("/scratch/job1/model", "/scratch/job2/model")).start()
    try:
        src = write_jsonl(tmp_path / "in.jsonl", [doc(f"d{i}", score=3) for i in range(4)])
        out = tmp_path / "out.jsonl"
        for model, asked, note in (("/scratch/job1/model", 4, ""), ("/scratch/job2/model", 4, "model "
                                   "'/scratch/job1/model' then, '/scratch/job2/model' now"),
                                   ("/scratch/job2/model", 0, "")):
            summary = score_documents([str(src)], out, base_url=server.base_url, model=model, **FAST)
            said = " ".join(capsys.readouterr().err.split())
            assert summary.requests == asked, said
            assert (f"holds 4 answers given with other settings ({note}); none is replayed" in said) == bool(note), said
            assert ("served-model-name=OLD" in said) == bool(note)
        # the closest settings are named: the same model at another temperature, no word of models
        score_documents([str(src)], out, base_url=server.base_url, model="/scratch/job1/model", temperature=0.5,
                        **FAST)
        said = " ".join(capsys.readouterr().err.split())
        assert "holds 4 answers given with other settings (temperature 0.6 then, 0.5 now)" in said, said
        assert "served-model-name" not in said
    finally:
        server.stop()


def test_one_input_path_may_be_given_alone(server, tmp_path):
    """A path string is one input, not a list of one-character paths (an absolute one walked the filesystem)."""
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "text": "A " + directive("a", score=4)}])
    score_documents(str(src), tmp_path / "out.jsonl", base_url=server.base_url, model="m", **FAST)
    score_documents(src, tmp_path / "out2.jsonl", base_url=server.base_url, model="m", **FAST)
    assert [r["score"] for r in read_jsonl(tmp_path / "out.jsonl") + read_jsonl(tmp_path / "out2.jsonl")] == [4, 4]


def test_an_answer_is_replayed_only_for_the_text_it_was_given(server, tmp_path):
    """An edited document, or another --text-field, is asked again instead of getting the old text's score."""
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    options = dict(base_url=server.base_url, model="m", **FAST)
    rows = [{"id": "a", "title": "T " + directive("a", score=0), "text": "A " + directive("a", score=1)},
            {"id": "b", "title": "T " + directive("b", score=0), "text": "B " + directive("b", score=3)}]
    write_jsonl(src, rows)
    score_documents([str(src)], out, **options)
    rows[0]["text"] = "A, edited " + directive("a", score=5)
    write_jsonl(src, rows)
    edited = score_documents([str(src)], out, **options)
    assert [r["score"] for r in read_jsonl(out)] == [5, 3] and edited.cached_answers == 1
    assert server.requests == {"a": 2, "b": 1}

    other_field = score_documents([str(src)], out, text_field="title", **options)
    assert [r["score"] for r in read_jsonl(out)] == [0, 0] and other_field.cached_answers == 0
    assert server.requests == {"a": 3, "b": 2}


def test_sample_truncation_and_parquet_output(server, tmp_path):
    import polars as pl

    docs = [doc(f"d{i:02d}", text="x" * (50 + 10 * i), score=i % 6) for i in range(30)]
    src = write_jsonl(tmp_path / "in.jsonl", docs)
    s1 = score_documents([str(src)], tmp_path / "a.parquet", base_url=server.base_url, model="m", sample=8,
                         seed=1, max_chars=200, **FAST)
    s2 = score_documents([str(src)], tmp_path / "b.jsonl", base_url=server.base_url, model="m", sample=8,
                         seed=1, max_chars=200, **FAST)
    s3 = score_documents([str(src)], tmp_path / "c.jsonl", base_url=server.base_url, model="m", sample=8,
                         seed=2, max_chars=200, **FAST)
    a = pl.read_parquet(tmp_path / "a.parquet")
    ids = a["id"].to_list()
    assert len(ids) == 8 and ids == sorted(ids)  # sampled, kept in input order
    assert ids == [r["id"] for r in read_jsonl(tmp_path / "b.jsonl")]
    assert ids != [r["id"] for r in read_jsonl(tmp_path / "c.jsonl")]
    assert a["truncated"].to_list() == [50 + 10 * int(i[1:]) + len(directive(i, score=0)) + 1 > 200 for i in ids]
    assert s1.truncated == sum(a["truncated"].to_list()) and s1.documents == s2.documents == s3.documents == 8
    # the truncated prompt carries only the first 200 characters of the document
    sent = [b["messages"][0]["content"] for b in server.bodies]
    assert not any("x" * 201 in p for p in sent)


def test_a_server_that_cannot_be_used_is_named_before_the_input_is_read(tmp_path):
    """A wrong URL, key or --model was said only after the whole input was read (hours for a TB): here the input's
    broken last line would have been found first."""
    from edu_filter.annotate.backends import BackendSetupError

    broken = tmp_path / "broken.jsonl"
    broken.write_bytes(orjson.dumps(doc("a")) + b"\n{not json\n")
    with pytest.raises(BackendSetupError, match="cannot reach http://127.0.0.1:9/v1"):
        score_documents([str(broken)], tmp_path / "o.jsonl", base_url="http://127.0.0.1:9/v1", model="m", **FAST)
    assert not (tmp_path / "o.jsonl").exists()


def test_bad_input_fails_before_any_request(server, tmp_path):
    dup = write_jsonl(tmp_path / "dup.jsonl", [doc("a"), doc("b"), doc("a")])
    with pytest.raises(DocumentError, match="duplicate document id 'a'"):
        score_documents([str(dup)], tmp_path / "o.jsonl", base_url=server.base_url, model="m", **FAST)
    broken = tmp_path / "broken.jsonl"
    broken.write_bytes(orjson.dumps(doc("a")) + b"\n{not json\n")
    with pytest.raises(DocumentError, match="broken.jsonl:2"):
        score_documents([str(broken)], tmp_path / "o.jsonl", base_url=server.base_url, model="m", **FAST)
    notext = write_jsonl(tmp_path / "notext.jsonl", [doc("a"), {"id": "b", "body": "x"}])
    with pytest.raises(DocumentError, match="notext.jsonl:2: field 'text' is missing"):
        score_documents([str(notext)], tmp_path / "o.jsonl", base_url=server.base_url, model="m", **FAST)
    with pytest.raises(DocumentError, match="output must end in"):
        score_documents([str(dup)], tmp_path / "o.csv", base_url=server.base_url, model="m", **FAST)
    assert server.requests == Counter()
    assert not (tmp_path / "o.jsonl").exists()


def test_a_score_config_carries_the_settings_and_every_option_is_checked_before_reading(server, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [doc("a", score=4), doc("b", score=1)])
    config = ScoreConfig(base_url=server.base_url, model="m", temperature=0.2, **FAST)
    summary = score_documents([str(src)], tmp_path / "o.jsonl", config, max_tokens=64)  # keywords override fields
    assert summary.scored == 2 and {b["temperature"] for b in server.bodies} == {0.2}
    assert {b["max_tokens"] for b in server.bodies} == {64} and config.max_tokens == 256  # the config is not changed
    sent = len(server.bodies)  # 2, or more where a loaded machine answered past the 1 s timeout
    unreadable = tmp_path / "missing.jsonl"  # never read: every option is refused first
    for bad, message in [({"backend": "ollama"}, "--backend must be one of"), ({"api": "responses"}, "--api"),
                         ({"concurrency": 0}, "--concurrency"), ({"top_p": 0}, "--top-p"),
                         ({"backend": "script"}, "script backend needs server_script"),
                         ({"backend": "transformers", "model": "./nowhere"}, "no such file or folder"),
                         ({"prompt": "no-such-rubric"}, "unknown prompt"), ({"select": "active"}, "needs --sample"),
                         ({"select": "active", "sample": 10, "seed": -1}, r"--seed must be in \[0, 2\*\*32\)"),
                         ({"backend": "vllm", "base_url": ["http://a/v1", "http://b/v1"]}, "several --base-url")]:
        with pytest.raises(InputError, match=message):
            score_documents([str(unreadable)], tmp_path / "x.jsonl", config, **bad)
    with pytest.raises(TypeError):
        score_documents([str(src)], tmp_path / "x.jsonl", config, temprature=0.3)  # a typo is not ignored
    (tmp_path / "a_file").write_text("")
    with pytest.raises(InputError, match="--cache .*a_file is a file"):
        score_documents([str(src)], tmp_path / "x.jsonl", config, cache=tmp_path / "a_file" / "c.sqlite")
    assert not (tmp_path / "x.jsonl").exists() and len(server.bodies) == sent


def test_backoff_doubles_with_jitter_and_honours_retry_after():
    client = OpenAIBackend("http://127.0.0.1:1/v1", "m", retry_backoff=1.0, max_backoff=10.0)
    for retry, upper in [(0, 1.0), (1, 2.0), (2, 4.0), (5, 10.0)]:
        delays = [client._delay(retry, None) for _ in range(50)]
        assert all(upper / 2 <= d <= upper for d in delays) and len(set(delays)) > 1
    # Retry-After, each request a little later than asked: not every worker at the same instant
    honoured = [client._delay(0, "3") for _ in range(50)]
    assert all(3.0 <= d <= 3.75 for d in honoured) and len(set(honoured)) > 1
    # a server's wait is not cut to our own backoff's cap (a gateway's "back in 5 minutes" was probed every minute)
    assert 600.0 <= client._delay(0, "600") <= 750.0
    assert RETRY_AFTER_MAX_S <= client._delay(0, "86400") <= RETRY_AFTER_MAX_S * 1.25  # up to an hour
    in_two_minutes = email.utils.formatdate(time.time() + 120, usegmt=True)  # the HTTP-date form, as RFC 9110 allows
    assert 110.0 <= client._delay(0, in_two_minutes) <= 151.0
    for retry, upper in ((0, 1.0), (3, 8.0)):  # a date of this second or gone by: no sooner than our own backoff
        for date in ("Wed, 21 Oct 2015 07:28:00 GMT", email.utils.formatdate(time.time(), usegmt=True)):
            assert upper / 2 <= client._delay(retry, date) <= upper * 1.25
    assert client._delay(0, "soon") <= 1.0  # unreadable: our own backoff
    # a rate limiter near its refill asks for 0 s or 20 ms: no sooner than our own backoff (26 tries went in a second)
    for retry, upper in ((0, 1.0), (3, 8.0)):
        assert all(upper / 2 <= client._delay(retry, asked) <= upper for asked in ("0", "0.02") for _ in range(20))
    # OpenAI sends both a Retry-After and a finer retry-after-ms: the longer wins
    assert float(_retry_after({"retry-after-ms": "20", "Retry-After": "7"})) == 7.0
    assert float(_retry_after({"retry-after-ms": "2500", "Retry-After": "1"})) == 2.5
    assert _retry_after({"Retry-After": "3"}) == "3" and float(_retry_after({"retry-after-ms": "40"})) == 0.04
    assert _retry_after({}) is None


def test_wrong_url_stops_the_run_with_a_clear_error(server, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [doc("a")])
    with pytest.raises(BackendError, match="404.*--base-url"):
        score_documents([str(src)], tmp_path / "o.jsonl", base_url=server.base_url[: -len("/v1")], model="m", **FAST)
    with pytest.raises(BackendError, match="cannot reach"):
        score_documents([str(src)], tmp_path / "o.jsonl", base_url="http://127.0.0.1:9/v1", model="m", **FAST)
    assert not (tmp_path / "o.jsonl").exists()


def test_a_server_refusing_every_document_the_same_way_stops_the_run(server, tmp_path):
    """A setting the server does not take (a hosted model refusing `temperature`) gets every document the same 400:
    the run sent the whole input, wrote a failed row for each and exited 0. It stops once as many documents in a row
    as it keeps in flight (20 at least) were refused before any answer; one answered document makes 400s the
    documents' own."""
    from edu_filter.annotate.backends import REFUSED_MIN_DOCUMENTS

    refused = [doc(f"r{i:03d}", http400=1) for i in range(300)]
    src = write_jsonl(tmp_path / "in.jsonl", refused)
    with pytest.raises(BackendError, match=r"refused 20 documents in a row with the same error and has answered "
                                           r"none \(http 400: The request was refused \(planned\).*--temperature"):
        score_documents([str(src)], tmp_path / "o.jsonl", base_url=server.base_url, model="m", concurrency=4, **FAST)
    assert REFUSED_MIN_DOCUMENTS <= sum(server.requests[d["id"]] for d in refused) <= REFUSED_MIN_DOCUMENTS + 4
    assert not (tmp_path / "o.jsonl").exists()

    answered = write_jsonl(tmp_path / "in2.jsonl", [doc("ok", score=3)] + [doc(f"s{i:03d}", http400=1)
                                                                            for i in range(40)])
    summary = score_documents([str(answered)], tmp_path / "o2.jsonl", base_url=server.base_url, model="m",
                              concurrency=1, **FAST)
    assert summary.scored == 1 and summary.documents == 41


def test_a_rerun_asking_only_the_documents_refused_before_is_not_taken_for_a_refused_setting(server, tmp_path):
    """Every 4th document refused with a 400 (a content filter): the rerun that retries them sends only those, the
    others replayed, and it stopped with "a setting it does not take", blaming settings the cache shows answered."""
    docs = [doc(f"d{i:03d}", **({"http400": 1} if i % 4 == 0 else {"score": 3})) for i in range(100)]
    src = write_jsonl(tmp_path / "in.jsonl", docs)
    for _ in range(2):
        summary = score_documents([str(src)], tmp_path / "o.jsonl", base_url=server.base_url, model="m",
                                  concurrency=1, **FAST)
        assert summary.scored == 75 and sum(summary.failed.values()) == 25
    assert summary.replayed == 75 and all(server.requests[f"d{i:03d}"] == 2 for i in range(0, 100, 4))


def test_a_server_without_a_model_list_scores_with_the_model_named(tmp_path):
    """Some gateways serve completions but answer 404 to /models: --model is then used as given; without it the
    run stops before any document, naming the option."""
    server = LLMTestServer(models=("m",), model_list=False).start()
    try:
        src = write_jsonl(tmp_path / "in.jsonl", [doc("a", score=3), doc("b", score=1)])
        score_documents([str(src)], tmp_path / "o.jsonl", base_url=server.base_url, model="m", **FAST)
        assert sorted((r["id"], r["score"]) for r in read_jsonl(tmp_path / "o.jsonl")) == [("a", 3), ("b", 1)]
        with pytest.raises(BackendError, match="404.*--model"):
            score_documents([str(src)], tmp_path / "none.jsonl", base_url=server.base_url, model=None, **FAST)
        with pytest.raises(BackendError, match="404"):  # a wrong name still stops the run at its first request
            score_documents([str(src)], tmp_path / "wrong.jsonl", base_url=server.base_url, model="x", **FAST)
    finally:
        server.stop()
    assert not (tmp_path / "none.jsonl").exists()


@pytest.mark.slow
def test_sigkill_mid_run_then_same_command_resumes_without_reasking(tmp_path):
    """The issue's exact invocation, killed with SIGKILL part-way and started again."""
    server = LLMTestServer(delay=0.03).start()
    try:
        docs = [doc(f"d{i:03d}", score=i % 6, **({"garbage": 1} if i % 10 == 0 else {})) for i in range(150)]
        needed = {d["id"]: 2 if int(d["id"][1:]) % 10 == 0 else 1 for d in docs}
        src = write_jsonl(tmp_path / "IN.jsonl", docs)
        out = tmp_path / "OUT.jsonl"
        cmd = [sys.executable, "-m", "edu_filter.cli", "score", str(src), "-o", str(out), "--prompt", "web",
               "--backend", "openai", "--base-url", server.base_url, "--model", "NAME", "--concurrency", "16"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while sum(server.answered.values()) < 60 and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert proc.returncode == -signal.SIGKILL
        assert not out.exists()  # killed before the end: no half-written output

        with sqlite3.connect(tmp_path / "OUT.jsonl.cache.sqlite") as db:
            stored = Counter(doc_id for (doc_id,) in db.execute("SELECT doc_id FROM answers"))
        assert 0 < sum(stored.values()) < sum(needed.values())  # it really died part-way
        before = server.requests.copy()

        server.delay = 0.0
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
        asked_again = server.requests - before
        for doc_id, n in needed.items():
            # Stored answers are replayed; only answers never received are asked for. A request that was in flight
            # at the kill already used up the server's planned unparseable answer, so it is not given again.
            done = stored[doc_id] >= n
            unparseable_left = max(0, 1 - before[doc_id]) if n == 2 else 0
            assert asked_again[doc_id] == (0 if done else 1 + unparseable_left), doc_id
        assert sum(asked_again.values()) < sum(needed.values())
        rows = read_jsonl(out)
        assert [r["id"] for r in rows] == [d["id"] for d in docs]  # each document exactly once
        assert [r["score"] for r in rows] == [i % 6 for i in range(150)]
        # the server serves one model: its name, not the --model it ignores, labels the rows
        assert all(r["error"] is None and r["model"] == "test-model" for r in rows)

        total = sum(server.requests.values())
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
        assert sum(server.requests.values()) == total  # a finished run is answered entirely from the cache
        assert read_jsonl(out) == rows
    finally:
        server.stop()


def test_a_cache_that_cannot_be_written_mid_run_stops_it_and_the_same_command_resumes(tmp_path):
    """Another process holding the cache's write lock (a disk full alike): the run went on paying for answers it
    could not keep (a failed commit is only logged by asyncio). It stops with one line naming the cache, and the
    same command, once the cache is writable, asks only for what was not stored."""
    server = LLMTestServer(delay=0.05).start()
    try:
        docs = [doc(f"d{i:03d}", score=i % 6) for i in range(80)]
        src = write_jsonl(tmp_path / "IN.jsonl", docs)
        out, cache = tmp_path / "OUT.jsonl", tmp_path / "OUT.jsonl.cache.sqlite"
        cmd = [sys.executable, "-m", "edu_filter.cli", "score", str(src), "-o", str(out), "--prompt", "web",
               "--backend", "openai", "--base-url", server.base_url, "--model", "NAME", "--concurrency", "4"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while sum(server.answered.values()) < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        locker = sqlite3.connect(cache, isolation_level=None, timeout=30)
        locker.execute("BEGIN IMMEDIATE")  # the write lock, held until the run has stopped
        locked_at = sum(server.answered.values())
        _, stderr = proc.communicate(timeout=60)
        asked_while_locked = sum(server.answered.values()) - locked_at
        locker.execute("ROLLBACK")
        locker.close()
        assert proc.returncode == 1, stderr[-2000:]
        lines = [ln for ln in stderr.splitlines() if ln.strip()]
        assert f"the answer cache {cache} cannot be written (database is locked)" in lines[-1]
        assert "Traceback" not in stderr and not out.exists()
        assert asked_while_locked <= 8  # the requests in flight, not the rest of the input
        with sqlite3.connect(cache) as db:
            stored = {doc_id for (doc_id,) in db.execute("SELECT doc_id FROM answers")}
        before = server.requests.copy()
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
        asked_again = server.requests - before
        assert set(asked_again) == {d["id"] for d in docs} - stored  # stored answers replayed, the rest asked once
        assert all(n == 1 for n in asked_again.values())
        assert [r["score"] for r in read_jsonl(out)] == [i % 6 for i in range(80)]
    finally:
        server.stop()


def test_sigterm_waits_for_the_answers_in_flight_and_the_same_command_asks_only_for_the_rest(tmp_path):
    """SIGTERM (a Slurm time limit, a preemption) cancelled the requests in flight: up to --concurrency answers the
    server had computed were lost and paid again by the resumed run. No new document is sent after SIGTERM, the
    answers in flight are awaited and cached, and the run exits 143."""
    import signal

    server = LLMTestServer(delay=3).start()
    try:
        docs = [doc(f"d{i:02d}", score=i % 6) for i in range(12)]
        src = write_jsonl(tmp_path / "IN.jsonl", docs)
        out = tmp_path / "OUT.jsonl"
        cmd = [sys.executable, "-m", "edu_filter.cli", "score", str(src), "-o", str(out), "--prompt", "web",
               "--backend", "openai", "--base-url", server.base_url, "--model", "NAME", "--concurrency", "4"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while server.in_flight < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.in_flight == 4 and not server.answered
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 143, stderr[-2000:]
        assert "waiting up to 20 s for the 4 answers in flight" in stderr and not out.exists()
        assert sum(server.requests.values()) == 4 and sum(server.answered.values()) == 4  # nothing sent after
        first = set(server.answered)
        server.delay = 0
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
        assert all(n == 1 for n in server.requests.values()) and set(server.requests) == {d["id"] for d in docs}
        assert first <= set(server.requests)
        assert [r["score"] for r in read_jsonl(out)] == [i % 6 for i in range(12)]
    finally:
        server.stop()


def test_cache_from_before_the_added_columns_still_opens_and_asks_again_what_has_no_text_hash(tmp_path):
    from edu_filter.annotate.cache import Answer, AnswerCache, run_key

    settings = {"prompt": "fineweb-edu-v1", "model": "test-model"}
    path = tmp_path / "old.cache.sqlite"
    with sqlite3.connect(path) as db:  # the first release's schema
        db.executescript(
            "CREATE TABLE runs (run_key TEXT PRIMARY KEY, settings TEXT NOT NULL, created REAL NOT NULL);"
            "CREATE TABLE answers (run_key TEXT NOT NULL, doc_id TEXT NOT NULL, attempt INTEGER NOT NULL, "
            "response TEXT NOT NULL, prompt_tokens INTEGER, completion_tokens INTEGER, created REAL NOT NULL, "
            "PRIMARY KEY (run_key, doc_id, attempt)) WITHOUT ROWID;"
        )
        db.execute("INSERT INTO answers VALUES (?, 'a', 0, 'Educational score: 3', 10, 2, 0)", (run_key(settings),))
    with AnswerCache(path, settings) as cache:
        assert cache.answers("a", "text of a") == []  # which text it answered is unknown: asked again
        cache.add("b", "text of b", 0, Answer("Educational score: 1", 5, 1, "stop", "test-model"), 120)
        assert cache.answers("b", "text of b") == [(Answer("Educational score: 1", 5, 1, "stop", "test-model"), 120)]
        assert cache.answers("b", "another text of b") == []


def test_rows_are_written_in_input_order_while_a_slow_request_holds_back_at_most_max_ahead(server, tmp_path,
                                                                                           monkeypatch):
    """Streaming: a document whose first request hangs (then is retried) holds back the writing of the rows after it,
    and reading stops once MAX_AHEAD documents from it on are held instead of reading on into memory; the rows still
    come out once each, in input order."""
    import asyncio

    from edu_filter.annotate import score as score_module
    from edu_filter.annotate.cache import AnswerCache
    from edu_filter.annotate.prompts import load_prompt

    monkeypatch.setattr(score_module, "MAX_AHEAD", 5)
    docs = [doc("stuck", score=4, slow=3)] + [doc(f"d{i:02d}", score=i % 6) for i in range(40)]
    written: list[str] = []
    pulled_ahead: list[int] = []

    def reading():  # how far past the last written row each document is read
        for i, d in enumerate(docs):
            pulled_ahead.append(i - len(written))
            yield d

    async def main():
        async with OpenAIBackend(server.base_url, "test-model", concurrency=8, timeout=1.0, max_retries=3,
                                 retry_backoff=0.01) as backend:
            with AnswerCache(tmp_path / "cache.sqlite", {"run": "stream"}) as cache:
                scorer = score_module._Scorer(backend, cache, load_prompt("web"), None, 2, 512)
                return await scorer.run(reading(), 8, False, 5.0, write=lambda rows: written.extend(
                    r["id"] for r in rows), total=len(docs))

    assert asyncio.run(main()) == []
    assert written == [d["id"] for d in docs]
    assert max(pulled_ahead) == 4  # the stuck first document and 4 after it were held, then reading waited for it


@pytest.mark.slow
def test_memory_does_not_grow_with_the_input(server, tmp_path):
    """`score` over 12x more documents (120 MB of text against 10 MB) peaks at about the same memory: documents are
    read as they are scored and rows written as they complete."""
    filler = "Fractions name parts of a whole; the denominator counts the equal parts. " * 140  # ~10 KB
    peaks = {}
    for n in (1_000, 12_000):
        src = tmp_path / f"in{n}.jsonl"
        with open(src, "wb") as fh:
            for i in range(n):
                fh.write(orjson.dumps({"id": f"d{i}", "text": f"{filler} {directive(f'd{i}', score=i % 6)}"}) + b"\n")
        out = tmp_path / f"out{n}.jsonl"
        cmd = [sys.executable, "-m", "edu_filter.cli", "score", str(src), "-o", str(out), "--base-url",
               server.base_url, "--model", "test-model", "--concurrency", "32"]
        measure = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess."
                   "DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
        result = subprocess.run([sys.executable, "-c", measure, *cmd], capture_output=True, text=True, timeout=600,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert result.returncode == 0, result.stderr[-2000:]
        peaks[n] = int(result.stdout.split()[-1]) / 1024  # MiB
        rows = read_jsonl(out)
        assert len(rows) == n and rows[-1]["id"] == f"d{n - 1}" and rows[-1]["score"] == (n - 1) % 6
    assert peaks[12_000] - peaks[1_000] < 40, peaks  # holding the input added 120 MiB


def test_several_servers_share_the_documents_and_one_killed_mid_run_costs_none(tmp_path):
    """Two servers of one model, the second a process of its own killed with SIGKILL part-way (a lost node): requests
    go to the least busy server, those in flight on the lost one go to the other at once without using up a retry
    (there are none here), and every document is scored once, none failed."""
    import threading
    import urllib.request

    port = free_port()
    lost = subprocess.Popen([sys.executable, str(Path(__file__).parent / "llm_test_server.py"), "--host", "127.0.0.1",
                             "--port", str(port), "--delay", "0.05"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lost_url, kept = f"http://127.0.0.1:{port}/v1", LLMTestServer(delay=0.05).start()

    def answered_by_lost() -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as resp:
            return sum(orjson.loads(resp.read())["answered"].values())

    deadline = time.monotonic() + 60
    while True:
        try:
            answered_by_lost()
            break
        except OSError:
            assert lost.poll() is None and time.monotonic() < deadline, "the test server did not start"
            time.sleep(0.1)

    killed_after: list[int] = []

    def kill_after_40_answers():
        while (n := answered_by_lost()) < 40:
            time.sleep(0.005)
        lost.kill()
        killed_after.append(n)

    killer = threading.Thread(target=kill_after_40_answers, daemon=True)
    try:
        docs = [doc(f"d{i:03d}", score=i % 6) for i in range(300)]
        src, out = write_jsonl(tmp_path / "in.jsonl", docs), tmp_path / "out.jsonl"
        killer.start()
        summary = score_documents([str(src)], out, base_url=[kept.base_url, lost_url], model="test-model",
                                  concurrency=4, **{**FAST, "max_retries": 0, "timeout": 30.0})
        killer.join(timeout=10)
    finally:
        lost.kill()
        kept.stop()
    assert killed_after and lost.wait(timeout=10) == -signal.SIGKILL
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == [d["id"] for d in docs]
    assert [r["score"] for r in rows] == [i % 6 for i in range(300)] and all(r["error"] is None for r in rows)
    assert summary.scored == 300 and not summary.failed
    (kept_answers, kept_lost), (lost_answers, lost_tries) = summary.servers[kept.base_url], summary.servers[lost_url]
    assert kept_answers + lost_answers == 300 and kept_lost == 0
    assert lost_answers >= 40 and lost_tries >= 1  # it answered until it was killed, then nothing
    assert kept_answers == sum(kept.answered.values()) and kept_answers > 150  # both shared, the survivor the rest


def test_a_server_answering_5xx_beside_a_healthy_one_costs_no_documents(tmp_path):
    """A gateway before a dead node answers 502 at once: the server with the most free places, it took nearly every
    try, and documents failed after their retries while the healthy server idled. A 5xx of one of several servers now
    leaves it out like one that does not answer, and the request goes to another without using up a retry."""
    good, bad = LLMTestServer(delay=0.2).start(), LLMTestServer(failing=502).start()
    try:
        docs = [doc(f"d{i:03d}", score=i % 6) for i in range(60)]
        src, out = write_jsonl(tmp_path / "in.jsonl", docs), tmp_path / "out.jsonl"
        summary = score_documents([str(src)], out, base_url=[good.base_url, bad.base_url], model="test-model",
                                  concurrency=4, **{**FAST, "max_retries": 1, "retry_backoff": 0.2})
    finally:
        good.stop()
        bad.stop()
    assert summary.scored == 60 and not summary.failed, summary.failed
    assert [r["score"] for r in read_jsonl(out)] == [i % 6 for i in range(60)]
    (good_answers, _), (bad_answers, bad_tries) = summary.servers[good.base_url], summary.servers[bad.base_url]
    assert good_answers == 60 and bad_answers == 0 and bad_tries == bad.requests["(failed)"] >= 1


def test_servers_behind_one_gateway_each_get_their_concurrency(tmp_path):
    """Two servers told apart by their path on one host and port (https://gw/node1/v1, https://gw/node2/v1):
    aiohttp's limit per host gave them --concurrency places together, the rest queued into --timeout."""
    gateway = LLMTestServer(delay=0.3).start()
    try:
        root = gateway.base_url.removesuffix("/v1")
        src = write_jsonl(tmp_path / "in.jsonl", [doc(f"d{i:02d}", score=2) for i in range(32)])
        summary = score_documents([str(src)], tmp_path / "o.jsonl", base_url=[f"{root}/node1/v1", f"{root}/node2/v1"],
                                  model="test-model", concurrency=4, **{**FAST, "timeout": 30.0})
    finally:
        gateway.stop()
    assert summary.scored == 32 and gateway.most_in_flight == 8


def test_servers_of_different_models_are_refused_before_any_document(tmp_path):
    from typer.testing import CliRunner

    from edu_filter.cli import app

    first, second = LLMTestServer(own_name="model-a").start(), LLMTestServer(own_name="model-b").start()
    try:
        src = write_jsonl(tmp_path / "in.jsonl", [doc("a", score=3)])
        result = CliRunner().invoke(app, ["score", str(src), "-o", str(tmp_path / "out.jsonl"), "--base-url",
                                          first.base_url, "--base-url", second.base_url])
    finally:
        first.stop()
        second.stop()
    assert result.exit_code == 2, result.output
    assert (f"the servers do not serve one model ({first.base_url} serves 'model-a'; {second.base_url} serves "
            "'model-b')") in " ".join(result.output.split())
    assert not first.requests and not second.requests and not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("name", ["out.parquet", "out.jsonl"])
def test_output_rows_given_at_once_are_written_a_row_group_at_a_time(tmp_path, name):
    """An active run writes its whole sample in one call: as one Parquet row group (500k rows read whole by every
    later reader) and, in JSONL, encoded as one bytes object (+6 GB at 500k rows)."""
    import pyarrow.parquet as pq

    from edu_filter.annotate.score import ScoreOutput

    rows = [{"id": str(i), "text": f"t{i}", "score": i % 6, "round": 0, "weight": 1.0} for i in range(13)]
    out = ScoreOutput(tmp_path / name, active=True)
    out.ROW_GROUP = 4
    with out:
        out.write(rows[:10])
        out.write(rows[10:])
    if name.endswith(".parquet"):
        meta = pq.ParquetFile(tmp_path / name).metadata
        assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [4, 4, 4, 1]
        assert pq.read_table(tmp_path / name).column("id").to_pylist() == [r["id"] for r in rows]
    else:
        assert [r["id"] for r in read_jsonl(tmp_path / name)] == [r["id"] for r in rows]


@pytest.mark.parametrize("rows", [3, 3000])  # flushed when closing / while scoring
def test_a_full_disk_under_the_output_is_named_and_leaves_no_partial_file(server, tmp_path, rows):
    """The hidden output filling a disk: closing it raised ENOSPC before the unlink meant to follow, leaving a
    partial as large as the output on the full disk, behind an error ("[Errno 28] ...") naming no file. /dev/full
    stands in for the disk (every write to it fails with ENOSPC)."""
    ids = [f"full{rows}-{i}" for i in range(rows)]
    src = write_jsonl(tmp_path / "in.jsonl", [doc(i, score=3, text="A lesson. " * 20) for i in ids])
    out = tmp_path / "out.jsonl"
    partial = tmp_path / ".partial-out.jsonl"
    partial.symlink_to("/dev/full")
    with pytest.raises(RuntimeError, match=f"the output {out} cannot be written \\(No space left on device\\): the "
                                           "answers received are in the cache"):
        score_documents([str(src)], out, base_url=server.base_url, model="m", concurrency=8, **FAST)
    assert not partial.is_symlink() and not partial.exists() and not out.exists()
    received = sum(server.requests[i] for i in ids)
    assert 0 < received <= rows
    again = score_documents([str(src)], out, base_url=server.base_url, model="m", concurrency=8, **FAST)
    assert 0 < again.cached_answers <= received and [r["id"] for r in read_jsonl(out)] == ids
    # asked again: only those whose answers were in flight when the run stopped
    assert sum(server.requests[i] for i in ids) == rows + received - again.cached_answers
