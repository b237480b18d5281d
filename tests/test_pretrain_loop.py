"""The pretraining loop on a micro llama: it learns, resumes exactly, and reports what it did."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from edu_filter.ablate.packing import iter_texts, write_tokens, write_train_val
from edu_filter.ablate.pretrain import PretrainConfig, flops_per_token, peak_bf16_flops, pretrain
from edu_filter.ablate.tokenizer import mixed_sample, train_tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from llm_test_server import free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WEB = REPO / "data/web/fineweb_edu_llama3_train.jsonl"
MICRO = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 1, "max_position_embeddings": 64, "micro_batch_size": 4, "batch_tokens": 512,
         "eval_tokens": 1024, "lr": 1e-2}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    tok = train_tokenizer(mixed_sample([iter_texts(str(WEB))], 300_000), 384, root / "tok")
    write_train_val(iter_texts(str(WEB)), tok, root / "web", train_tokens=20_000, val_fraction=0.1, max_val_tokens=2000)
    write_tokens(iter_texts(str(REPO / "data/web/fineweb_edu_llama3_val.jsonl")), tok, root / "ref.bin", 2000)
    return tok, root


def config(**overrides) -> PretrainConfig:
    return PretrainConfig.from_preset("tiny", {**MICRO, **overrides}, tokens=512 * 12, vocab_size=384)


def run(corpus, out, **overrides):
    tok, root = corpus
    evals = {"web/val": root / "web/val.bin", "ref": root / "ref.bin"}
    return pretrain(config(**overrides), root / "web/train.bin", evals, out, tok)


# `run` in a process of its own (argv: config JSON, corpus, output, stall step): prints its record's step count and
# whether it finished; with a stall step > 0 it touches OUT.stalled there and hangs, to be killed; with a stall step
# < 0 it touches OUT.stalled at step -N and waits there for a signal, then goes on.
WORKER = """
import json, signal, sys, time
from pathlib import Path
import torch
from edu_filter.ablate.pretrain import PretrainConfig, pretrain
from edu_filter.ablate.tokenizer import load_tokenizer

cfg, root, out = PretrainConfig(**json.loads(sys.argv[1])), Path(sys.argv[2]), Path(sys.argv[3])
stall_at = int(sys.argv[4])
torch.set_num_threads(1)


class Stall:
    def add_task(self, *args, completed, **kwargs):
        self.step = completed
        return 0

    def update(self, task, advance, loss):
        self.step += advance
        if self.step == stall_at:
            out.with_suffix(".stalled").touch()
            time.sleep(600)
        if self.step == -stall_at:  # the run's own SIGTERM handler runs too; told before the file says "stalled"
            got, handler = [], signal.getsignal(signal.SIGTERM)
            signal.signal(signal.SIGTERM, lambda *a: (handler(*a), got.append(1)))
            out.with_suffix(".stalled").touch()
            while not got:
                time.sleep(0.02)


r = pretrain(cfg, root / "web/train.bin", {"web/val": root / "web/val.bin", "ref": root / "ref.bin"}, out,
             load_tokenizer(root / "tok"), progress=Stall())
print(json.dumps({"steps": r["steps"], "finished": r["finished"]}))
"""


def start_worker(corpus, out, stall_at=0, env=None, **overrides) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(asdict(config(**overrides))), str(corpus[1]),
                             str(out), str(stall_at)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def test_loss_falls_and_the_run_record_is_complete(corpus, tmp_path):
    r = run(corpus, tmp_path / "run")
    assert r["finished"] and r["steps"] == 12 and r["tokens_seen"] == 12 * 512
    assert len(r["train_loss"]) == 12 and len(r["lr"]) == 12
    assert r["train_loss"][-1] < r["train_loss"][0] - 0.5
    assert set(r["eval"]) == {"web/val", "ref"}
    first, last = r["eval_history"][0], r["eval_history"][-1]
    assert [e["step"] for e in r["eval_history"]] == [3, 6, 9, 12]
    assert last["ref"] < first["ref"]
    assert r["mfu"] is None and r["device"] == "cpu" and r["precision"] == "fp32"
    assert r["tokens_per_second"] > 0 and r["params"] > 0
    saved = json.loads((tmp_path / "run/run.json").read_text())
    assert saved["train_loss"] == r["train_loss"]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run/model")
    tok = AutoTokenizer.from_pretrained(tmp_path / "run/model")
    assert model.config.vocab_size == 384 and tok.eos_token_id == model.config.eos_token_id
    assert r["flops_per_token"] == flops_per_token(model, 64)


def test_the_saved_model_states_the_context_it_was_trained_at(corpus, tmp_path):
    """Evaluations cut prompts to the saved context: a model trained on 32-token sequences of a 64-position preset
    must not be asked about 64 tokens. grad_clip=0 is no clipping, as in nanoGPT (clipping to a norm of 0 zeroed
    every gradient: the run finished having learned nothing)."""
    unclipped = run(corpus, tmp_path / "run", seq_len=32, grad_clip=0)
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(tmp_path / "run/model").max_position_embeddings == 32
    assert unclipped["train_loss"][-1] < unclipped["train_loss"][0] - 0.5


def test_a_run_with_dropout_resumes_to_the_same_losses(corpus, tmp_path):
    """Every resume reseeded torch with the run's seed: the dropout masks after it repeated the first steps'."""
    whole = run(corpus, tmp_path / "whole", attention_dropout=0.2, tokens=512 * 4)
    while not (split := run(corpus, tmp_path / "split", attention_dropout=0.2, tokens=512 * 4,
                            time_limit_minutes=1e-9))["finished"]:
        pass
    assert split["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-6)


def test_interrupted_runs_resume_to_the_same_result(corpus, tmp_path):
    whole = run(corpus, tmp_path / "whole")
    parts = []
    for _ in range(20):  # a time limit this small stops every invocation after one step, checkpointed
        r = run(corpus, tmp_path / "split", time_limit_minutes=1e-9)
        parts.append(r["steps"])
        if r["finished"]:
            break
        # each one step, its process's first, which pays for the warmup: none in the tokens/s and MFU (a run over
        # many time-limited jobs read slower than one straight through)
        assert json.loads((tmp_path / "split/checkpoint/trainer_state.json").read_text())["state"][
            "steady_tokens"] == 0
    assert parts == list(range(1, 13))

    # SIGKILL in step 7 of a real process: by default a checkpoint comes with every evaluation (steps 3, 6, 9, 12),
    # so the rerun continues from step 6.
    # SIGTERM (a Slurm time limit, a preemption) in step 8: saved there, exit 143. SIGKILL in step 8 with
    # checkpoints due every minute of the clock (here: every step): the rerun continues from step 7.
    stopped = {}
    for folder, stall, signum, saved_at, overrides in (("killed", 7, signal.SIGKILL, 6, {}),
                                                       ("terminated", -8, signal.SIGTERM, 8, {}),
                                                       ("clocked", 8, signal.SIGKILL, 7, {"checkpoint_minutes": 1e-9})):
        worker = start_worker(corpus, tmp_path / folder, stall_at=stall, **overrides)
        deadline = time.time() + 120
        while not (tmp_path / f"{folder}.stalled").exists():
            assert worker.poll() is None and time.time() < deadline, worker.kill() or worker.communicate()[1][-3000:]
            time.sleep(0.1)
        worker.send_signal(signum)
        said = worker.communicate(timeout=120)
        assert worker.returncode == (-signal.SIGKILL if signum == signal.SIGKILL else 128 + signal.SIGTERM), said
        checkpoint = json.loads((tmp_path / folder / "checkpoint/trainer_state.json").read_text())
        assert checkpoint["state"]["step"] == saved_at
        assert (signum == signal.SIGKILL) != ("stopped by SIGTERM at step 8; saved there" in said[0])
        stopped[folder] = run(corpus, tmp_path / folder)

    from transformers import AutoModelForCausalLM

    wa = AutoModelForCausalLM.from_pretrained(tmp_path / "whole/model").state_dict()
    for resumed, folder in ((r, "split"), *((stopped[f], f) for f in stopped)):
        assert resumed["tokens_seen"] == whole["tokens_seen"]
        assert resumed["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-5)
        assert resumed["eval"] == pytest.approx(whole["eval"], rel=1e-5)
        wb = AutoModelForCausalLM.from_pretrained(tmp_path / folder / "model").state_dict()
        assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_a_save_killed_between_its_renames_resumes_from_the_newest_complete_copy(corpus, tmp_path):
    out = tmp_path / "r"
    run(corpus, out, time_limit_minutes=1e-9)
    (out / "checkpoint").rename(out / "checkpoint.old")  # killed after moving the old copy aside ...
    (out / "checkpoint.partial").mkdir()  # ... with the new one not yet complete: the old one is the newest complete
    assert run(corpus, out, time_limit_minutes=1e-9)["steps"] == 2
    (out / "checkpoint").rename(out / "checkpoint.partial")  # the new copy complete, not yet renamed into place
    run(corpus, tmp_path / "older", time_limit_minutes=1e-9)
    (tmp_path / "older/checkpoint").rename(out / "checkpoint.old")
    assert run(corpus, out, time_limit_minutes=1e-9)["steps"] == 3
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint"]
    # an edu-filter from before wrote the new copy into checkpoint.tmp: complete, it is taken; unfinished, removed
    (out / "checkpoint").rename(out / "checkpoint.tmp")
    assert run(corpus, out, time_limit_minutes=1e-9)["steps"] == 4
    (out / "checkpoint.tmp").mkdir()
    assert run(corpus, out, time_limit_minutes=1e-9)["steps"] == 5
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint"]


def test_a_finished_run_is_not_loaded_or_saved_again_by_a_rerun(corpus, tmp_path):
    """A resumed ablation calls every run again: finished ones loaded weights and optimizer onto the device and
    rewrote their model (7 + 14 GB a run at 1.8B parameters), each invocation."""
    first = run(corpus, tmp_path / "r")
    weights = tmp_path / "r/model/model.safetensors"
    written = weights.stat().st_mtime_ns
    again = run(corpus, tmp_path / "r")
    assert again == json.loads(json.dumps(first)) and weights.stat().st_mtime_ns == written
    # another run's settings: not its record, and not trained over it (its checkpoint is gone once it finished)
    with pytest.raises(ValueError, match=r"holds a run finished with another configuration \(lr: 0.01 then, 0.02 now"):
        run(corpus, tmp_path / "r", lr=2e-2)
    assert weights.stat().st_mtime_ns == written
    # a model field its config left out is LlamaConfig's default then: a preset that sets it since (SmolLM's RMSNorm
    # epsilon) still resumes the run given that value, and names the field otherwise
    assert "rms_norm_eps" not in first["config"]["model"]
    assert run(corpus, tmp_path / "r", rms_norm_eps=1e-6)["train_loss"] == first["train_loss"]
    with pytest.raises(ValueError, match=r"another configuration \(model.rms_norm_eps: 1e-06 then, 1e-05 now\); give "
                                         r"the values it was trained with \(a model field: --override KEY=VALUE\)"):
        run(corpus, tmp_path / "r", rms_norm_eps=1e-5)


@pytest.mark.slow
def test_ddp_ranks_stop_together_when_only_one_has_passed_the_time_limit(corpus, tmp_path):
    """Each rank reads its own clock; unless they agree to stop, one waits forever in a collective the other left.
    Two real processes (gloo) whose limits put rank 1 past its limit at once and rank 0 never."""
    port = free_port()
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    workers = [start_worker(corpus, tmp_path / "ddp", env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                            time_limit_minutes=limit) for rank, limit in enumerate([1e6, 1e-9])]
    try:
        outputs = [w.communicate(timeout=120) for w in workers]
    finally:
        for w in workers:
            w.kill()
    assert all(w.returncode == 0 for w in workers), outputs[0][1][-3000:] + outputs[1][1][-3000:]
    records = [json.loads(stdout.splitlines()[-1]) for stdout, _ in outputs]
    assert records == [{"steps": 1, "finished": False}] * 2


# Two ranks of a gloo group whose collectives time out after 2 s (NCCL's default is 10 minutes); rank 0 prepares
# for 6 s, as it tokenizes a large dataset, while rank 1 waits at the preparation barrier; each prints "ready".
PREPARING = """
import sys, time
from datetime import timedelta
import torch.distributed as dist
from edu_filter.ablate.pretrain import preparation_barrier

dist.init_process_group("gloo", timeout=timedelta(seconds=2))
wait = preparation_barrier()
if dist.get_rank() == 0:
    time.sleep(6)
wait()
dist.barrier()  # the training group still works after the wait
print("ready", flush=True)
"""


@pytest.mark.slow
def test_ranks_wait_for_the_preparation_longer_than_the_training_groups_timeout():
    """Under torchrun the first rank trains the tokenizer and packs the datasets, for hours at 10B tokens, while the
    others wait. Waiting in a barrier of the training group would end them at its timeout; two real processes."""
    port = free_port()
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    ranks = [subprocess.Popen([sys.executable, "-c", PREPARING], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**env, "RANK": str(rank)}) for rank in range(2)]
    try:
        outputs = [r.communicate(timeout=120) for r in ranks]
    finally:
        for r in ranks:
            r.kill()
    assert [r.returncode for r in ranks] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
    assert [stdout for stdout, _ in outputs] == ["ready\n"] * 2


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA GH200 480GB", 989e12), ("NVIDIA B200", 2250e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L40S", 362e12), ("NVIDIA L40", 181e12), ("NVIDIA L4", 121e12),
    ("Tesla T4", None), ("NVIDIA GeForce RTX 4090", None),
])
def test_peak_flops_match_the_whole_gpu_name(name, peak):
    assert peak_bf16_flops(name) == peak


def test_flops_count_the_attention_width_the_heads_compute():
    """PaLM's attention term is 12 * layers * heads * head_dim * seq_len: with head_dim overridden (heads x head_dim
    no longer the hidden size) it counted the hidden size, and the MFU was off by their ratio."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def model(**extra):
        return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, **extra))

    def params(m):
        return sum(p.numel() for p in m.parameters()) - (0 if m.config.tie_word_embeddings
                                                         else m.get_input_embeddings().weight.numel())

    plain, wide = model(), model(head_dim=16)
    assert flops_per_token(plain, 128) == 6 * params(plain) + 12 * 2 * 32 * 128
    assert flops_per_token(wide, 128) == 6 * params(wide) + 12 * 2 * (4 * 16) * 128


def test_resume_refuses_a_checkpoint_from_another_configuration(corpus, tmp_path):
    run(corpus, tmp_path / "r", time_limit_minutes=1e-9)
    with pytest.raises(ValueError, match=r"written with another configuration \(lr: 0.01 then, 0.005 now\)"):
        run(corpus, tmp_path / "r", lr=5e-3)


def test_a_run_resumes_with_another_micro_batch_size_to_the_same_result(corpus, tmp_path):
    """A job requeued on a card with less memory needs a smaller micro-batch (the README's advice for 80 GB): each
    step reads the same samples however its batch is split, yet the checkpoint, and a finished run, were refused."""
    whole = run(corpus, tmp_path / "whole")
    run(corpus, tmp_path / "r", time_limit_minutes=1e-9)
    resumed = run(corpus, tmp_path / "r", micro_batch_size=2)
    assert resumed["finished"] and resumed["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-4)
    assert resumed["eval"] == pytest.approx(whole["eval"], rel=1e-4)
    assert run(corpus, tmp_path / "r", micro_batch_size=1)["train_loss"] == resumed["train_loss"]  # its record


def test_bf16_autocast_path_runs_and_learns_on_cpu(corpus, tmp_path):
    r = run(corpus, tmp_path / "bf16", dtype="bf16", schedule="cosine")
    assert r["precision"] == "bf16-autocast"
    assert r["train_loss"][-1] < r["train_loss"][0] - 0.5


def test_batch_that_does_not_split_into_micro_batches_is_refused(corpus, tmp_path):
    with pytest.raises(ValueError, match="not a multiple of micro_batch_size"):
        run(corpus, tmp_path / "x", batch_tokens=500)


@pytest.mark.slow
def test_regionally_compiled_training_matches_eager(corpus, tmp_path):
    """`compile=True` (each decoder layer and the loss head compiled) trains to the same losses and evaluations as
    the eager loop, and saves the same kind of model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from edu_filter.ablate.pretrain import NextTokenLoss, compile_regions

    eager = run(corpus, tmp_path / "eager", tokens=512 * 4)
    compiled = run(corpus, tmp_path / "compiled", tokens=512 * 4, compile=True)
    assert compiled["train_loss"] == pytest.approx(eager["train_loss"], abs=2e-3)
    assert compiled["eval"] == pytest.approx(eager["eval"], abs=2e-3)
    assert (tmp_path / "compiled/model/config.json").exists()
    loss = NextTokenLoss(LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                                      num_hidden_layers=3, num_attention_heads=2)))
    compile_regions(loss)
    assert all(hasattr(layer, "_compiled_call_impl") and layer._compiled_call_impl is not None
               for layer in loss.lm.model.layers)
