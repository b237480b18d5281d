"""Backends other than a plain URL: a real tiny transformers model, servers started through datatrove's inference
server classes (our script; vLLM where it is installed)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import orjson
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from llm_test_server import directive  # noqa: E402

from edu_filter.annotate.backends import server_config  # noqa: E402
from edu_filter.annotate.score import score_documents  # noqa: E402
from edu_filter.documents import InputError  # noqa: E402

TEST_SERVER = str(Path(__file__).parent / "llm_test_server.py")

# A word-level "bigram" Llama: attention and MLP outputs are zeroed, so the next token depends only on the current
# one, wired through the embeddings and lm_head. After "good" it writes "Educational score: 3" and stops; after
# "bad" it repeats "bad" forever (unparseable). Every other word maps to itself.
WORDS = ["<pad>", "<eos>", "<unk>", "Rate", "this", "extract:", "the", "lesson", "is", "good", "bad",
         "Educational", "score:", "3", "<end_of_turn>"]
NEXT = {"good": "Educational", "Educational": "score:", "score:": "3", "3": "<eos>"}


def build_tiny_llama(path: Path, turn_end: str = "<eos>", context: int = 128) -> str:
    """The bigram Llama, saved. `turn_end="<end_of_turn>"`: it ends its answer on a token its generation config
    lists among the EOS ids while the tokenizer's eos_token is another, as Gemma-it (<end_of_turn>), Phi-3 (<|end|>)
    and Llama-3-Instruct (<|eot_id|>) do. `context`: its positions."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>",
                                        unk_token="<unk>", additional_special_tokens=["<end_of_turn>"])
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    hidden = 16
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=hidden, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=context,
                         tie_word_embeddings=False, eos_token_id=vocab["<eos>"], pad_token_id=vocab["<pad>"])
    model = LlamaForCausalLM(config)
    following = {**NEXT, "3": turn_end}
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(len(WORDS), hidden))
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        for word, i in vocab.items():
            model.lm_head.weight[vocab[following.get(word, word)], i] = 10.0
    model.generation_config = GenerationConfig(eos_token_id=sorted({vocab["<eos>"], vocab[turn_end]}),
                                               pad_token_id=vocab["<pad>"])
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    """The same kind of bigram Llama written as a GGUF file (F32, byte-level BPE vocabulary), as llama.cpp reads
    them: after "good" it writes " Educational score: 3" and stops; after "bad" it repeats " bad"."""
    gguf = pytest.importorskip("gguf")
    pytest.importorskip("accelerate")  # transformers needs it to load GGUF checkpoints
    import numpy as np
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Rate this extract: the lesson is good Educational score: 3", "the lesson is bad"],
                            trainer)
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in orjson.loads(tok.to_str())["model"]["merges"]]
    after = {"Ġgood": "ĠEducational", "ĠEducational": "Ġscore", "Ġscore": ":", ":": "Ġ3", "Ġ3": "<|endoftext|>"}
    n_vocab, hidden = len(tokens), -(-len(tokens) // 8) * 8
    lm_head = np.zeros((n_vocab, hidden), dtype=np.float32)
    for token, i in vocab.items():
        lm_head[vocab[after.get(token, token)], i] = 10.0
    noise = np.random.default_rng(0)

    path = tmp_path_factory.mktemp("tiny-gguf") / "tiny-bigram-f32.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-bigram")
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_block_count(1)
    writer.add_feed_forward_length(8)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(hidden // 2)
    writer.add_vocab_size(n_vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types([gguf.TokenType.CONTROL if t == "<|endoftext|>" else gguf.TokenType.NORMAL for t in tokens])
    writer.add_eos_token_id(vocab["<|endoftext|>"])
    writer.add_add_bos_token(False)
    tensors = {
        "token_embd.weight": np.eye(n_vocab, hidden, dtype=np.float32),
        "output_norm.weight": np.ones(hidden, dtype=np.float32),
        "output.weight": lm_head,
        "blk.0.attn_norm.weight": np.ones(hidden, dtype=np.float32),
        "blk.0.ffn_norm.weight": np.ones(hidden, dtype=np.float32),
        "blk.0.attn_output.weight": np.zeros((hidden, hidden), dtype=np.float32),  # attention and MLP add nothing
        "blk.0.ffn_down.weight": np.zeros((hidden, 8), dtype=np.float32),
    }
    for name, shape in [("attn_q", (hidden, hidden)), ("attn_k", (hidden, hidden)), ("attn_v", (hidden, hidden)),
                        ("ffn_gate", (8, hidden)), ("ffn_up", (8, hidden))]:
        tensors[f"blk.0.{name}.weight"] = (noise.normal(size=shape) * 0.02).astype(np.float32)
    for name, tensor in tensors.items():
        writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return path


def _read(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def test_transformers_backend_with_a_real_tiny_model(tiny_llama, tmp_path):
    prompt = tmp_path / "rate.txt"
    prompt.write_text("Rate this extract: {extract}")
    src = _write(tmp_path / "in.jsonl", [
        {"id": "g1", "text": "the lesson is good"},
        {"id": "b1", "text": "the lesson is bad"},
        {"id": "g2", "text": "this is good"},
    ])
    out = tmp_path / "out.jsonl"
    summary = score_documents([str(src)], out, backend="transformers", model=tiny_llama, prompt=str(prompt),
                              max_tokens=6, max_reasks=2, concurrency=4, show_progress=False)
    rows = {r["id"]: r for r in _read(out)}
    for good in ("g1", "g2"):
        assert rows[good]["score"] == 3 and rows[good]["error"] is None
        assert rows[good]["response"] == "Educational score: 3"
        assert rows[good]["attempts"] == 1 and rows[good]["completion_tokens"] == 4  # 3 words + end of sequence
        assert rows[good]["finish_reason"] == "stop" and rows[good]["model"] == tiny_llama
    bad = rows["b1"]
    assert bad["score"] is None and bad["error"].startswith("cut off at max_tokens")
    assert bad["response"] == " ".join(["bad"] * 6) and bad["finish_reason"] == "length"  # stopped at max_tokens
    assert bad["attempts"] == 2 and bad["completion_tokens"] == 2 * 6  # a cut-off answer is asked once more only
    assert rows["g1"]["prompt_tokens"] == len("Rate this extract: the lesson is good".split())
    assert summary.requests == 1 + 1 + 2 and summary.failed == {"cut off at max_tokens": 1}

    again = score_documents([str(src)], out, backend="transformers", model=tiny_llama, prompt=str(prompt),
                            max_tokens=6, max_reasks=2, show_progress=False)
    assert again.requests == 0 and again.cached_answers == 4  # resumed from the cache, model not asked again


def test_a_stopped_run_stops_the_transformers_backends_generation(tmp_path):
    """generate() ran in its thread to max_new_tokens (minutes) past SIGTERM's grace and past a second SIGTERM,
    asyncio.run waiting for it, and Slurm's SIGKILL then cut the job. It stops at its next token now."""
    import signal
    import subprocess
    import time

    model = build_tiny_llama(tmp_path / "model", context=200_000)
    prompt = tmp_path / "rate.txt"
    prompt.write_text("Rate this extract: {extract}")
    src = _write(tmp_path / "in.jsonl", [{"id": "b1", "text": "the lesson is bad"}])  # "bad" for ever
    cli = str(Path(sys.executable).parent / "edu-filter")
    run = subprocess.Popen([cli, "score", str(src), "-o", str(tmp_path / "out.jsonl"), "--backend", "transformers",
                            "--model", model, "--prompt", str(prompt), "--max-tokens", "150000"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        time.sleep(15)  # loaded, generating
        assert run.poll() is None, run.communicate()[1][-2000:]
        run.send_signal(signal.SIGTERM)
        time.sleep(1)
        run.send_signal(signal.SIGTERM)  # "SIGTERM again stops at once"
        stopped = time.monotonic()
        _, stderr = run.communicate(timeout=120)
        assert run.returncode == 143, stderr[-2000:]
        assert time.monotonic() - stopped < 10, stderr[-2000:]
    finally:
        run.kill()  # a failure leaves no run generating for minutes behind it


def test_a_transformers_run_whose_output_disk_is_full_exits_naming_it(tmp_path):
    """A worker's write failing (a full disk) unwound the run while the batcher took prompts the cancelled workers
    had left queued: Python 3.11's wait_for swallowed its cancel, and it waited on the empty queue for ever, the
    process alive and its partial output on the full disk. /dev/full stands in for the disk."""
    import subprocess

    model = build_tiny_llama(tmp_path / "model")
    prompt = tmp_path / "rate.txt"
    prompt.write_text("Rate this extract: {extract}")
    src = _write(tmp_path / "in.jsonl", [{"id": f"g{i}", "text": "the lesson is good " * 3} for i in range(150)])
    partial = tmp_path / ".partial-out.jsonl"
    partial.symlink_to("/dev/full")
    cli = str(Path(sys.executable).parent / "edu-filter")
    run = subprocess.run([cli, "score", str(src), "-o", str(tmp_path / "out.jsonl"), "--backend", "transformers",
                          "--model", model, "--prompt", str(prompt), "--max-tokens", "6", "--temperature", "0"],
                         capture_output=True, text=True, timeout=180, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 1, run.stderr[-2000:]
    assert "cannot be written (No space left on device)" in run.stderr
    assert not partial.is_symlink() and not partial.exists()


def test_transformers_backend_stops_at_any_end_of_turn_token_of_the_model(tmp_path):
    """A chat model ending its turn on a token other than the tokenizer's eos_token (listed in its generation
    config): its complete answers were taken as cut off at max_tokens, never parsed, asked again and failed."""
    model = build_tiny_llama(tmp_path / "model", turn_end="<end_of_turn>")
    prompt = tmp_path / "rate.txt"
    prompt.write_text("Rate this extract: {extract}")
    src = _write(tmp_path / "in.jsonl", [{"id": "g1", "text": "the lesson is good"}])
    summary = score_documents([str(src)], tmp_path / "out.jsonl", backend="transformers", model=model,
                              prompt=str(prompt), max_tokens=8, max_reasks=2, show_progress=False)
    (row,) = _read(tmp_path / "out.jsonl")
    assert (row["score"], row["error"], row["finish_reason"]) == (3, None, "stop")
    assert row["response"] == "Educational score: 3" and row["completion_tokens"] == 4  # padding not counted
    assert summary.requests == 1 and not summary.failed


def test_transformers_backend_loads_a_gguf_file(tiny_gguf, tmp_path):
    prompt = tmp_path / "rate.txt"
    prompt.write_text("Rate this extract: {extract}")
    src = _write(tmp_path / "in.jsonl", [{"id": "g", "text": "the lesson is good"},
                                         {"id": "b", "text": "the lesson is bad"}])
    summary = score_documents([str(src)], tmp_path / "out.jsonl", backend="transformers", model=str(tiny_gguf),
                              prompt=str(prompt), api="completion", temperature=0.0, max_tokens=6,
                              show_progress=False)
    good, bad = _read(tmp_path / "out.jsonl")
    assert good["score"] == 3 and good["response"].strip() == "Educational score: 3"
    assert good["model"] == str(tiny_gguf) and good["finish_reason"] == "stop"
    assert bad["error"].startswith("cut off at max_tokens") and bad["response"] == " bad" * 6
    assert summary.requests == 1 + 1  # the cut-off answer not asked again at temperature 0 (greedy: the same)


def test_gguf_names_are_split_for_transformers(tmp_path):
    from edu_filter.annotate.backends import BackendError, pretrained_args

    assert pretrained_args("HuggingFaceTB/SmolLM2-135M-Instruct") == ("HuggingFaceTB/SmolLM2-135M-Instruct", {})
    if importlib.util.find_spec("gguf") is None or importlib.util.find_spec("accelerate") is None:
        with pytest.raises(ImportError, match="pip install 'gguf>=0.10' accelerate"):
            pretrained_args("ORG/REPO/model.gguf")
        return
    local = tmp_path / "models" / "smollm2-q4_1.gguf"
    local.parent.mkdir()
    local.write_bytes(b"GGUF")
    assert pretrained_args(str(local)) == (str(local.parent), {"gguf_file": "smollm2-q4_1.gguf"})
    assert pretrained_args("ORG/REPO/quants/m-Q4_K_M.gguf") == ("ORG/REPO", {"gguf_file": "quants/m-Q4_K_M.gguf"})
    with pytest.raises(BackendError, match="no such .gguf file"):
        pretrained_args(str(tmp_path / "missing.gguf"))


def test_script_backend_runs_through_datatrove_server_lifecycle(tmp_path, monkeypatch):
    """datatrove's CustomServer starts `python llm_test_server.py --port N`, waits for /v1/models, we drive it. A
    proxy in the environment (compute nodes often set one for the hub) is not asked for the server on this node:
    datatrove's probe went through it, and the run waited 30 minutes for a server that was up."""
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # nothing listens there
    src = _write(tmp_path / "in.jsonl", [
        {"id": "a", "text": "x " + directive("a", score=4, format="bold")},
        {"id": "b", "text": "x " + directive("b", score=1, fail500=1)},
        {"id": "c", "text": "x " + directive("c", format="garbage")},
    ])
    out = tmp_path / "out.jsonl"
    summary = score_documents([str(src)], out, backend="script", server_script=TEST_SERVER, model="test-model",
                              retry_backoff=0.01, max_reasks=1, show_progress=False)
    rows = _read(out)
    assert [(r["id"], r["score"]) for r in rows] == [("a", 4), ("b", 1), ("c", None)]
    assert rows[2]["error"].startswith("unparseable") and rows[2]["attempts"] == 2
    assert summary.requests == 1 + 2 + 2 and summary.retries == 1


def test_a_server_logging_a_long_prompt_or_one_naming_a_cuda_error_goes_on_serving_the_run(tmp_path):
    """vLLM before 0.10.1 logs every prompt on one line. datatrove's monitor of the server's output ended on a line
    over 64 KiB (a prompt of ~7k tokens: any monitor) or naming "RuntimeError" and "CUDA" (its vLLM monitor): the
    run was stopped as if the server had failed, and nothing read the server's output after it."""
    docs = [{"id": "long", "text": "word " * 30_000 + directive("long", score=3)},
            {"id": "cuda", "text": 'raise RuntimeError("CUDA is required") ' + directive("cuda", score=2)}]
    docs += [{"id": f"d{i}", "text": f"x {directive(f'd{i}', score=1)}"} for i in range(4)]
    src, out = _write(tmp_path / "in.jsonl", docs), tmp_path / "out.jsonl"
    summary = score_documents([str(src)], out, backend="script", server_script=TEST_SERVER, model="test-model",
                              server_args=["log-prompts"], concurrency=1, show_progress=False)
    assert summary.documents == 6 and [r["score"] for r in _read(out)] == [3, 2, 1, 1, 1, 1]
    logged = "".join(p.read_text() for p in (tmp_path / "out.jsonl.server-logs").rglob("*") if p.is_file())
    assert all(f"Received request {d['id']}:" in logged for d in docs)  # read to the end, after the long line


def test_a_started_servers_output_is_read_until_it_exits_though_its_children_hold_its_pipes(tmp_path):
    """Once datatrove's monitor has ended early, the server's output is read into its log until the server exits,
    and that exit is seen when it comes: a vLLM crashing while its engine process held the pipes was taken for
    running until the engine ended too."""
    import asyncio
    import logging
    import os
    import signal
    import time

    from edu_filter.annotate.backends import _read_output_until_exit

    log = logging.getLogger("server-output-test")
    log.propagate, handler = False, logging.FileHandler(tmp_path / "server.log")
    log.addHandler(handler)
    log.setLevel(logging.INFO)

    async def run() -> tuple[int, float]:
        process = await asyncio.create_subprocess_exec(
            "sh", "-c", "for i in 1 2 3; do echo line $i; done; sleep 30 & exit 3",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True)
        started = time.monotonic()
        await _read_output_until_exit(process, log)
        seconds = time.monotonic() - started
        os.killpg(process.pid, signal.SIGKILL)  # its child, holding the pipes
        await process.wait()
        await asyncio.sleep(0.1)  # the transport's end, scheduled by the pipes' closing
        return process.returncode, seconds

    status, seconds = asyncio.run(run())
    handler.close()
    assert status == 3 and seconds < 10 and "line 3" in (tmp_path / "server.log").read_text()


def scoring_with_its_server(tmp_path, *server_args: str):
    """`score` with a server it starts (the test server as a script, given `server_args`), a few answers in: (its
    process, the server's process ids, the output path)."""
    import os
    import subprocess
    import time

    src = _write(tmp_path / "in.jsonl", [{"id": f"d{i}", "text": f"x {directive(f'd{i}', score=3)}"}
                                         for i in range(2000)])
    out = tmp_path / "out.jsonl"
    run = subprocess.Popen([sys.executable, "-m", "edu_filter.cli", "score", str(src), "-o", str(out), "--backend",
                            "script", "--server-script", TEST_SERVER, "--server-arg", "delay=0.05", "--model",
                            "test-model", "--concurrency", "2", *server_args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 120
    children = []
    while time.monotonic() < deadline and not (children and Path(f"{out}.cache.sqlite").exists()):
        children = [int(pid) for pid in subprocess.run(["pgrep", "-P", str(run.pid)], capture_output=True,
                                                        text=True).stdout.split()]
        time.sleep(0.5)
    time.sleep(2)  # some answers in
    assert children and run.poll() is None
    return run, children, out


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGKILL"])
def test_a_stopped_or_killed_run_stops_the_server_it_started(tmp_path, stop):
    """`kill`, `timeout` and supervisors send SIGTERM to the main process only: Python ended at once and the vLLM
    server it had started went on holding its GPU, its parent gone. Now the server is stopped and the run exits 143;
    the same command goes on from the cached answers. SIGKILL (the out-of-memory killer) gives the run no chance
    to stop it: the server is told by the system that its parent died."""
    import signal
    import subprocess
    import time

    run, children, _ = scoring_with_its_server(tmp_path)
    run.send_signal(getattr(signal, stop))
    _, stderr = run.communicate(timeout=60)
    assert run.returncode == (143 if stop == "SIGTERM" else -signal.SIGKILL), stderr[-2000:]

    def running(pid: int) -> bool:  # a zombie (ended, not yet reaped by its new parent) is not running
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    deadline = time.monotonic() + 10
    while (alive := [pid for pid in children if running(pid)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert alive == [], subprocess.run(["ps", "-o", "pid,ppid,cmd", "-p", ",".join(map(str, alive))],
                                       capture_output=True, text=True).stdout


def test_a_run_stopped_while_its_server_loads_stops_the_server(tmp_path):
    """Ctrl-C or a SIGTERM while vLLM loads (minutes: when people stop a run) cancelled datatrove's readiness future,
    whose cleanup then raised before stopping the server: a caller that goes on (a driver script) left it loading on
    the GPU until its own exit."""
    import asyncio
    import subprocess
    import time

    from edu_filter.annotate.backends import managed_server

    script = tmp_path / "loading_server.py"
    script.write_text("import time\ntime.sleep(300)\n")  # never answers /v1/models

    def server_pids() -> list[str]:
        return subprocess.run(["pgrep", "-f", str(script)], capture_output=True, text=True).stdout.split()

    async def stopped_while_loading() -> None:
        async def run() -> None:
            async with managed_server(server_config("script", "m", server_script=str(script))):
                raise AssertionError("the server never answers")

        task = asyncio.create_task(run())
        deadline = time.monotonic() + 60
        while not server_pids():
            assert time.monotonic() < deadline and not task.done()
            await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(stopped_while_loading())
    assert server_pids() == []


def test_a_server_whose_port_is_open_but_answers_nothing_is_waited_on_for_its_timeout_and_named(tmp_path):
    """datatrove counts the wait for a server in probes, each waiting 5 s for an answer: a server listening but never
    answering (stuck, or loading with its port bound) was waited on 6x the timeout (3 hours for 30 minutes), then
    said "Failed to start CustomServer server after 0 retries"."""
    import asyncio
    import time

    from edu_filter.annotate.backends import BackendError, managed_server

    script = tmp_path / "stuck_server.py"
    script.write_text("import socket, sys, time\n"
                      "port = int(sys.argv[sys.argv.index('--port') + 1])\n"
                      "s = socket.socket()\ns.bind(('127.0.0.1', port))\ns.listen(64)\ntime.sleep(300)\n")

    async def wait_for_it() -> None:
        async with managed_server(server_config("script", "m", server_script=str(script), ready_timeout=4.0)):
            raise AssertionError("the server never answers")

    started = time.monotonic()
    with pytest.raises(BackendError, match=r"the script server for m did not answer /v1/models within 4 s: still "
                                           r"loading, or stuck"):
        asyncio.run(wait_for_it())
    assert time.monotonic() - started < 15  # 4 s, and the server's start and stop


def test_a_servers_ready_timeout_counts_from_its_launch_not_from_a_wait_before_it(tmp_path, monkeypatch):
    """vLLM's start first waits on a compile lock another job's server may hold (minutes): counted from before the
    launch, a second job's healthy server was called stuck. The clock starts at the first readiness probe; a wait
    before the launch (5 s here, for the lock) is not the server's."""
    import asyncio

    from datatrove.pipeline.inference.servers.custom_server import CustomServer

    from edu_filter.annotate.backends import managed_server

    launch = CustomServer.start_server

    async def after_a_lock(self):
        await asyncio.sleep(5)
        return await launch(self)

    monkeypatch.setattr(CustomServer, "start_server", after_a_lock)
    script = Path(__file__).parent / "llm_test_server.py"

    async def serve() -> str:
        async with managed_server(server_config("script", "m", server_script=str(script), ready_timeout=4.0)) as url:
            return url

    assert asyncio.run(serve()).endswith("/v1")


def test_a_server_that_exits_mid_run_stops_the_run_at_once_naming_its_output(tmp_path):
    """Every request then failed with "connection refused" after its retries, and the run stopped only after 10
    minutes of failures (hundreds of documents marked failed). Now it stops when the server does, saying so and
    where the server's output is: datatrove drops what a server prints once it is ready, so why it crashed was
    nowhere. The log of the run before (whose crash this one may go on after) is kept."""
    import time

    logs = tmp_path / "out.jsonl.server-logs"
    logs.mkdir()
    (logs / "server_rank_00000_node_-1.log").write_text("the crash of the run before\n")
    run, children, out = scoring_with_its_server(tmp_path, "--server-arg", "crash-after=6")
    started = time.monotonic()
    _, stderr = run.communicate(timeout=120)
    said = " ".join(stderr.split())
    assert run.returncode == 1 and time.monotonic() - started < 60, said[-2000:]
    (log,) = logs.glob("*.log")
    assert (f"server for test-model exited while the run was scoring (exit status 1) (its output: {log})"
            in said), said[-2000:]
    assert "RuntimeError: planted crash of the test server" in log.read_text()
    assert (logs / f"{log.name}.previous").read_text() == "the crash of the run before\n"
    assert not out.exists() and Path(f"{out}.cache.sqlite").exists()  # the answers received are kept


def test_a_server_arg_that_would_hide_the_server_from_the_run_is_refused():
    """datatrove gives the server a free port: another one, or a key its readiness probe does not send, left the run
    waiting 30 minutes for a server that would never answer it."""
    for arg in ("port=18555", "api-key=secret", "api_key=secret", "--port=8000"):
        with pytest.raises(InputError, match=f"--server-arg {arg}: edu-filter starts its server on a free port"):
            server_config("script", "test-model", server_script="serve.py", server_args=[arg])


def test_vllm_is_started_without_trust_remote_code_unless_asked(tmp_path, monkeypatch):
    """datatrove starts `vllm serve` with --trust-remote-code always: the Python of any hub repository named by
    --model ran on the GPU node. A `vllm` on PATH that prints its arguments stands in for the real one."""
    import asyncio
    import os

    from edu_filter.annotate.backends import _guarded_server_processes

    fake = tmp_path / "bin" / "vllm"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\necho "$@"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")

    async def started(trust: bool) -> list[str]:
        # the command datatrove's VLLMServer builds, started the way it starts it
        with _guarded_server_processes(trust_remote_code=trust):
            proc = await asyncio.create_subprocess_exec("vllm", "serve", "org/model", "--port", "1",
                                                        "--trust-remote-code", stdout=asyncio.subprocess.PIPE)
            out, _ = await proc.communicate()
        return out.decode().split()

    assert asyncio.run(started(False)) == ["serve", "org/model", "--port", "1"]
    assert "--trust-remote-code" in asyncio.run(started(True))
    assert server_config("vllm", "m", server_args=["trust-remote-code"]).model_kwargs["trust-remote-code"] is True


def test_server_config_builds_the_vllm_command_settings():
    config = server_config("vllm", "meta-llama/Meta-Llama-3-70B-Instruct", api="chat", max_model_len=4096, tp=4,
                           server_args=["gpu-memory-utilization=0.9", "--enforce-eager"])
    assert config.server_type == "vllm" and config.model_name_or_path == "meta-llama/Meta-Llama-3-70B-Instruct"
    assert (config.tp, config.model_max_context, config.use_chat) == (4, 4096, True)
    # on this node only (vLLM listens on every interface by default), unless told otherwise
    assert config.model_kwargs == {"gpu-memory-utilization": "0.9", "enforce-eager": True, "host": "127.0.0.1"}
    assert server_config("vllm", "m", server_args=["host=0.0.0.0"]).model_kwargs == {"host": "0.0.0.0"}
    script = server_config("script", "m", api="completion", server_script="serve.py")
    assert script.server_type == "custom" and script.model_kwargs == {"server_script": "serve.py"}
    assert not script.use_chat
    with pytest.raises(ValueError, match="server_script"):
        server_config("script", "m")
    with pytest.raises(ValueError, match="bad server argument"):
        server_config("vllm", "m", server_args=["=3"])


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_vllm_backend_without_vllm_says_how_to_install(tmp_path):
    src = _write(tmp_path / "in.jsonl", [{"id": "a", "text": "some text"}])
    with pytest.raises(ImportError, match="pip install vllm"):
        score_documents([str(src)], tmp_path / "out.jsonl", backend="vllm", model="m", show_progress=False)
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed (needs a GPU machine)")
def test_vllm_backend_serves_and_scores_a_local_model(tiny_llama, tmp_path):
    src = _write(tmp_path / "in.jsonl", [{"id": "g", "text": "the lesson is good"}, {"id": "b", "text": "bad"}])
    prompt = tmp_path / "rate.txt"
    prompt.write_text("Rate this extract: {extract}")
    summary = score_documents([str(src)], tmp_path / "out.jsonl", backend="vllm", model=tiny_llama,
                              prompt=str(prompt), api="completion", temperature=0.0, max_tokens=6, max_reasks=1,
                              max_model_len=128, show_progress=False)
    rows = {r["id"]: r for r in _read(tmp_path / "out.jsonl")}
    assert rows["g"]["score"] == 3 and rows["b"]["score"] is None
    assert summary.requests == 1 + 1  # no re-ask at temperature 0: greedy decoding answers the same


def test_transformers_backend_fails_only_the_document_that_fails_and_cuts_one_over_the_context(tmp_path):
    """One prompt that cannot be generated (here a token past the model's embeddings; with real models, out of
    memory on its length) failed every document batched with it, and a resume batched them together again; a
    prompt longer than the model's context failed as such instead of being cut to fit (--max-chars), as it is for
    servers."""
    from transformers import AutoTokenizer

    model = build_tiny_llama(tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.add_tokens(["<boom>"])  # an id the model has no embedding for
    tokenizer.save_pretrained(model)
    prompt = tmp_path / "rate.txt"
    prompt.write_text("Rate this extract: {extract}")
    src = _write(tmp_path / "in.jsonl", [
        {"id": "g1", "text": "the lesson is good"},
        {"id": "boom", "text": "<boom> good"},
        {"id": "g2", "text": "this is good"},
        {"id": "long", "text": "good " * 150 + "good"},  # 151 words and the prompt's 3: over the context of 128
    ])
    summary = score_documents([str(src)], tmp_path / "out.jsonl", backend="transformers", model=model,
                              prompt=str(prompt), max_tokens=6, max_reasks=0, concurrency=4, max_chars=10_000,
                              show_progress=False)
    rows = {r["id"]: r for r in _read(tmp_path / "out.jsonl")}
    assert [rows[i]["score"] for i in ("g1", "g2")] == [3, 3], rows
    assert rows["boom"]["score"] is None and rows["boom"]["error"].startswith("generation: IndexError")
    long = rows["long"]
    # cut to fit and asked (what the bigram model answers after a word cut in half does not matter here)
    assert long["truncated"] and long["prompt_tokens"] + 6 <= 128 and long["attempts"] == 1, long
    assert summary.refits == 1
    # without --max-chars, over-long prompts fail under one reason whatever their lengths, and were never sent
    src = _write(tmp_path / "long.jsonl", [{"id": f"long{n}", "text": "good " * n} for n in (150, 151, 152)])
    summary = score_documents([str(src)], tmp_path / "long_out.jsonl", backend="transformers", model=model,
                              prompt=str(prompt), max_tokens=6, max_reasks=0, show_progress=False)
    assert summary.failed == {"context_length_exceeded": 3} and summary.requests == 0
