"""The pretraining loop behind `edu-filter ablate`: a llama-style decoder trained on a fixed token budget.

One file, read top to bottom (after nanoGPT / build-nanogpt): presets and the config dataclass, the schedule, then
`pretrain()`: data, model, optimizer, resume, the step loop with gradient accumulation, evaluation, checkpoints.
On a GPU it trains in bf16 autocast, regionally `torch.compile`d, and under `torchrun` with DDP; on a CPU the same
code runs in fp32, which is how the tiny preset is exercised.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import re
import shutil
import signal
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from edu_filter.ablate.packing import PackedTokens
from edu_filter.documents import (InputError, one_line, recover_folder, replace_folder, side_folders,
                                  stop_requested, write_json_whole)

# ----------------------------------------------------------------------------------------------------------------------
# Presets: LlamaConfig fields ("model") and training defaults ("train"). `tiny` trains 300k tokens in about a minute
# on two CPU cores; the others are SmolLM's (its shapes and RMSNorm epsilon) and the FineWeb ablation model
# (HuggingFaceFW/ablation-model-*: tied embeddings, RMSNorm epsilon 1e-5; 1.71B parameters with its GPT-2 vocabulary,
# the "1.82B" said of it counting the embedding twice).
PRESETS: dict[str, dict[str, dict]] = {
    "tiny": {
        "model": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True),
        # Small batches: at 300k tokens, more optimizer steps beat bigger ones (held-out loss 6.13 at 1k tokens per
        # step vs 6.27 at 2k and 6.65 at 4k on the bundled web data). One CPU thread: matrices this small gain
        # little from a second, and on busy cores OpenMP threads waiting for each other made training 6-18x slower.
        "train": dict(vocab_size=4096, micro_batch_size=4, batch_tokens=1024, lr=3e-3, eval_tokens=16_384,
                      cpu_threads=1),
    },
    "smollm-135m": {
        "model": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True,
                      rms_norm_eps=1e-5),
        "train": dict(vocab_size=49152, micro_batch_size=32, batch_tokens=2**19, lr=3e-3, eval_tokens=2**20),
    },
    "smollm-360m": {
        "model": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                      num_key_value_heads=5, max_position_embeddings=2048, tie_word_embeddings=True,
                      rms_norm_eps=1e-5),
        "train": dict(vocab_size=49152, micro_batch_size=16, batch_tokens=2**19, lr=3e-3, eval_tokens=2**20),
    },
    "ablation-1.8b": {
        "model": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                      num_key_value_heads=32, max_position_embeddings=2048, tie_word_embeddings=True,
                      rms_norm_eps=1e-5),
        "train": dict(vocab_size=49152, micro_batch_size=4, batch_tokens=2**21, lr=3e-4, eval_tokens=2**20),
    },
}

# LlamaConfig fields an override may set, with their types (everything else in PretrainConfig is a training field).
MODEL_FIELDS = {
    "hidden_size": "int", "intermediate_size": "int", "num_hidden_layers": "int", "num_attention_heads": "int",
    "num_key_value_heads": "int", "head_dim": "int", "hidden_act": "str", "max_position_embeddings": "int",
    "initializer_range": "float", "rms_norm_eps": "float", "tie_word_embeddings": "bool", "rope_parameters": "dict",
    "attention_bias": "bool", "attention_dropout": "float", "mlp_bias": "bool",
}
CHOICES = {"schedule": ("wsd", "cosine"), "dtype": ("auto", "bf16", "fp32")}
_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "dict": (dict,)}


def check_override(key: str, value, expected: str) -> None:
    """An override's value of the field's type (`expected`: "int", "float | None"...) and, where a field has a few
    choices, one of them: found before any work (`lr=abc` failed after packing, `schedule=foo` after training)."""
    kinds = [k.strip() for k in expected.split("|")]
    fits = (value is None and "None" in kinds) or any(
        isinstance(value, _TYPES[k]) and not (k != "bool" and isinstance(value, bool)) for k in kinds if k in _TYPES)
    if not fits:
        words = {"None": "null", "int": "a whole number", "float": "a number", "bool": "true or false", "str": "text",
                 "dict": "a JSON object"}
        wanted = " or ".join(words.get(k, k) for k in kinds)
        raise InputError(f"--override {key}={json.dumps(value)}: {key} takes {wanted}")
    if key in CHOICES and value not in CHOICES[key]:
        raise InputError(f"--override {key}={value}: {key} is one of {', '.join(CHOICES[key])}")

# Dense bf16 tensor-core peaks (NVIDIA datasheets; half the "with sparsity" figures), for MFU. Matched by whole words
# against torch.cuda.get_device_name(), longest name first (`peak_bf16_flops`).
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200 NVL": 835e12, "H200": 989e12,
                   "GH200": 989e12, "B200": 2250e12, "A100": 312e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12}


@dataclass
class PretrainConfig:
    """Everything one run depends on. `from_preset` fills it from a preset plus `key=value` overrides."""

    preset: str = "tiny"
    tokens: int = 300_000  # training tokens per run (rounded down to whole optimizer steps)
    model: dict = field(default_factory=dict)  # LlamaConfig fields
    vocab_size: int = 4096  # of the BPE tokenizer trained for an ablation; the model takes the tokenizer's size
    seq_len: int | None = None  # defaults to the model's max_position_embeddings
    micro_batch_size: int = 4  # sequences per forward/backward on one device
    batch_tokens: int = 1024  # tokens per optimizer step, all devices and accumulation steps together
    lr: float = 3e-3
    min_lr_ratio: float = 0.0  # the schedule decays toward lr * min_lr_ratio (reached after the last step)
    schedule: str = "wsd"  # "wsd": warmup, constant, linear cooldown; or "cosine"
    warmup_fraction: float = 0.05
    cooldown_fraction: float = 0.2  # wsd: the last 20% of steps decay linearly
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # the gradient norm's limit; 0: none
    eval_every: int | None = None  # steps between evaluations (default: 4 evaluations per run); always at the end
    eval_tokens: int = 16_384  # at most this many tokens from each evaluation set
    checkpoint_every: int | None = None  # steps between checkpoints (default: at every evaluation); always at the end
    # and at least this often (a SIGKILL, a node failure lose no more; a SIGTERM saves the step it stopped at)
    checkpoint_minutes: float | None = 30.0
    time_limit_minutes: float | None = None  # checkpoint and stop once exceeded; rerun to resume (job time limits)
    resume: bool = True  # continue from OUT/checkpoint when it exists
    dtype: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU), "bf16" or "fp32"
    # torch.compile each decoder layer and the loss head (`compile_regions`); None: on a GPU, where it more than
    # doubles smollm-135m's throughput (20% -> 46% MFU on an H200, benchmarks/RESULTS.md), not on a CPU
    compile: bool | None = None
    cpu_threads: int | None = None  # torch intra-op threads for a CPU ablation (default: torch's choice)
    seed: int = 0

    @classmethod
    def from_preset(cls, preset: str, overrides: dict | None = None, **kwargs) -> "PretrainConfig":
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        model = dict(PRESETS[preset]["model"])
        train = {**PRESETS[preset]["train"], **kwargs}
        train_fields = {f.name for f in fields(cls)} - {"preset", "model"}
        annotations = {f.name: f.type for f in fields(cls)}
        for key, value in (overrides or {}).items():
            if key in MODEL_FIELDS:
                check_override(key, value, MODEL_FIELDS[key])
                model[key] = value
            elif key in train_fields:
                check_override(key, value, annotations[key])
                train[key] = value
            else:
                raise ValueError(
                    f"unknown override {key!r}; model fields: {', '.join(sorted(MODEL_FIELDS))}; "
                    f"training fields: {', '.join(sorted(train_fields))}"
                )
        return cls(preset=preset, model=model, **train)

    @property
    def context(self) -> int:
        return self.seq_len or self.model["max_position_embeddings"]

    def check_batches(self, world: int = 1) -> None:
        """An optimizer step splits into whole micro-batches on every process, and the run holds at least one; the
        sizes and the learning rate are positive (0 raised ZeroDivisionError, a negative value failed only after the
        tokenizer and the packing)."""
        for name in ("micro_batch_size", "batch_tokens", "tokens"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.context < 2:
            raise InputError(f"seq_len must be at least 2 (a token and the one after it), got {self.context}")
        if not self.lr > 0:
            raise InputError(f"lr must be > 0, got {self.lr}")
        # AdamW refused these only once built, after the tokenizer and the packing; a negative grad_clip climbed
        ranges = {"beta1": "[0, 1)", "beta2": "[0, 1)", "weight_decay": ">= 0", "grad_clip": ">= 0",
                  "warmup_fraction": "[0, 1]", "cooldown_fraction": "[0, 1]", "min_lr_ratio": "[0, 1]"}
        for name, bound in ranges.items():
            value = getattr(self, name)
            if not (value >= 0 and (bound == ">= 0" or value < 1 or (value == 1 and bound.endswith("]")))):
                raise InputError(f"{name} must be {'in ' if bound[0] == '[' else ''}{bound}, got {value}")
        T, B = self.context, self.micro_batch_size
        if self.batch_tokens % (B * T * world):
            raise InputError(f"batch_tokens={self.batch_tokens} is not a multiple of micro_batch_size * seq_len * "
                             f"world_size = {B} * {T} * {world}")
        if self.tokens // self.batch_tokens < 1:
            raise InputError(f"tokens={self.tokens} is less than one optimizer step of {self.batch_tokens} tokens")
        self.check_model()

    def check_model(self) -> None:
        """The model's shape builds and runs: one transformers refuses (hidden_size not a multiple of the heads) or
        takes but cannot run (heads not a multiple of the key-value heads: a shape error in attention's first call)
        failed after the tokenizer and the packing, hours in, in a traceback naming no override."""
        from transformers import LlamaConfig

        try:
            config = LlamaConfig(vocab_size=64, **{**self.model, "max_position_embeddings": self.context})
        except Exception as e:  # transformers' validation errors have no common type
            raise InputError(f"model {self.preset} with these overrides does not build: {one_line(str(e), 300)}") from None
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        if not (heads >= 1 and kv_heads >= 1 and heads % kv_heads == 0):
            raise InputError(f"model {self.preset}: num_attention_heads={heads} is not a multiple of "
                             f"num_key_value_heads={kv_heads} (each key-value head serves a whole group of heads)")
        if config.head_dim % 2:
            raise InputError(f"model {self.preset}: head_dim={config.head_dim} is odd (rotary embeddings turn pairs "
                             "of dimensions): change hidden_size, num_attention_heads or head_dim")

    def compiles_on(self, device: torch.device) -> bool:
        """Whether training on `device` is compiled: `compile`, or when unset, on a GPU."""
        return self.compile if self.compile is not None else device.type == "cuda"


def parse_overrides(items: list[str] | None) -> dict:
    """`key=value` strings to a dict; values are read as JSON when they parse (numbers, true/false), else strings."""
    out = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not key=value")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


# ----------------------------------------------------------------------------------------------------------------------
def learning_rate(step: int, total_steps: int, cfg: PretrainConfig) -> float:
    """Linear warmup, then constant with a linear cooldown over the last `cooldown_fraction` (wsd; from the end of
    warmup where the two overlap: `cooldown_fraction=1` is warmup then linear decay), or cosine."""
    warmup = int(cfg.warmup_fraction * total_steps)
    min_lr = cfg.lr * cfg.min_lr_ratio
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "cosine":
        progress = (step - warmup) / max(1, total_steps - warmup)
        return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * progress))
    if cfg.schedule != "wsd":
        raise ValueError(f"unknown schedule {cfg.schedule!r}; use wsd or cosine")
    cooldown_start = total_steps - max(1, round(cfg.cooldown_fraction * total_steps)) if cfg.cooldown_fraction else total_steps
    cooldown_start = max(warmup, cooldown_start)  # a cooldown longer than what warmup leaves starts where it ends
    if step < cooldown_start:
        return cfg.lr
    progress = (step - cooldown_start) / (total_steps - cooldown_start)
    return cfg.lr - (cfg.lr - min_lr) * progress


def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token, PaLM's estimate: 6N + 12 * layers * heads * head_dim * seq_len, where N counts the
    output projection but not the input embedding lookup (which does no matmul). heads * head_dim is the hidden size
    unless `head_dim` is overridden."""
    c = model.config
    n = sum(p.numel() for p in model.parameters())
    if not c.tie_word_embeddings:
        n -= model.get_input_embeddings().weight.numel()
    attention_width = c.num_attention_heads * (getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
    return 6 * n + 12 * c.num_hidden_layers * attention_width * seq_len


class NextTokenLoss(torch.nn.Module):
    """A causal LM and its next-token loss as one module: DDP's forward covers both, and the output projection, the
    fp32 upcast of the logits and the cross-entropy can be compiled as one region instead of materialising a float
    copy of a (tokens x vocab) matrix."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        self.head_loss = _head_loss

    def forward(self, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        hidden = self.lm.model(input_ids=x, use_cache=False).last_hidden_state
        return self.head_loss(self.lm.lm_head, hidden, y, reduction)


def _head_loss(lm_head, hidden, y, reduction: str):
    return F.cross_entropy(lm_head(hidden).float().flatten(0, 1), y.flatten(), reduction=reduction)


def compile_regions(loss: NextTokenLoss) -> None:
    """Regional torch.compile: every decoder layer runs one compiled graph (the layers share their code, so it is
    compiled once, in seconds rather than the minutes a whole 30-layer model takes) and the loss head another. Small
    models are bound by the elementwise work between matmuls (norms, rotary, SiLU, residuals), which this fuses."""
    for layer in loss.lm.model.layers:
        layer.compile()
    loss.head_loss = torch.compile(_head_loss)


def peak_bf16_flops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU by name. Whole words, longest key first: "NVIDIA H100 NVL" is an H100 NVL, not an
    H100, and "NVIDIA L40" is not an L4."""
    words = f" {' '.join(re.findall(r'[A-Za-z0-9]+', device_name)).upper()} "
    return next((PEAK_BF16_FLOPS[k] for k in sorted(PEAK_BF16_FLOPS, key=len, reverse=True)
                 if f" {k.upper()} " in words), None)


@contextmanager
def cpu_threads(n: int | None):
    """Use n torch threads inside the block when training on CPU, then restore the previous count."""
    before = torch.get_num_threads()
    if n and not torch.cuda.is_available():
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def init_distributed() -> tuple[int, int, int]:
    """(rank, local_rank, world_size); starts the process group when launched by torchrun."""
    if "RANK" in os.environ and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)), dist.get_world_size()
    return 0, 0, 1


def end_torchrun_rank(status: int = 0) -> None:
    """Ends a process torchrun started, its work done and written, without Python's finalization. gloo's worker
    threads outlive `destroy_process_group`: one releasing an all_reduce's tensor while the interpreter finalizes
    needs the GIL, is made to exit, and the forced unwind through a C++ destructor aborts the process ("terminate
    called without an active exception", SIGABRT), so torchrun reported a failed rank for a finished ablation. Does
    nothing outside torchrun."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    import logging
    import sys

    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    logging.shutdown()
    os._exit(status)


PREPARATION_TIMEOUT = timedelta(days=3)  # tokenizing tens of billions of tokens takes hours, not the NCCL 10 minutes


def preparation_barrier(name: str = "prepared") -> Callable[[], None]:
    """A barrier for ranks that wait while others tokenize the datasets (or rank 0 writes a checkpoint: 22 GB at
    1.8B). A barrier of the training process group would end them after its timeout (NCCL's default: 10 minutes),
    long before a 10B-token dataset is packed; this one waits on keys of the store the ranks met through when the
    group started (already connected, so it opens no new connection that a multi-node network could block), without
    that timeout. Every rank must call it; `name` keeps its keys apart from another barrier's."""
    if not dist.is_initialized():
        return lambda: None
    store = dist.distributed_c10d._get_default_store()
    rank, world, passed = dist.get_rank(), dist.get_world_size(), itertools.count()

    def wait() -> None:
        barrier = next(passed)
        store.set(f"edu-filter/{name}/{barrier}/{rank}", "1")
        store.wait([f"edu-filter/{name}/{barrier}/{r}" for r in range(world)], PREPARATION_TIMEOUT)

    return wait


# ----------------------------------------------------------------------------------------------------------------------
def pretrain(
    cfg: PretrainConfig,
    train_path: str | Path,
    eval_paths: dict[str, str | Path],
    out_dir: str | Path,
    tokenizer,
    progress=None,
    name: str | None = None,
) -> dict:
    """Train one model on `train_path` (a packed token file) and evaluate it on `eval_paths`; returns the run record.

    Writes OUT/checkpoint (model, optimizer, trainer state; resumable) while it trains, then OUT/model (final weights
    and tokenizer, loadable with AutoModelForCausalLM) and OUT/run.json, and removes the checkpoint. `progress` is an optional rich Progress to report into,
    under `name` (default: the folder's name). `cfg.seed` sets the initial weights and the order of the data.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    entered = time.time()  # the time limit counts loading the checkpoint too (22 GB at 1.8B: the job's margin)
    out_dir = Path(out_dir)
    rank, local_rank, world = init_distributed()
    master = rank == 0
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    use_bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # --- data: every run of an ablation sees the same number of tokens --------------------------------------------
    T, B = cfg.context, cfg.micro_batch_size
    cfg.check_batches(world)
    grad_accum = cfg.batch_tokens // (B * T * world)
    total_steps = cfg.tokens // cfg.batch_tokens
    train_data = PackedTokens(train_path, T, seed=cfg.seed)
    eval_data = {name: PackedTokens(path, T) for name, path in eval_paths.items()}
    eval_every = cfg.eval_every or math.ceil(total_steps / 4)
    checkpoint_every = cfg.checkpoint_every or eval_every

    # --- model: same seed, same initial weights for every run ------------------------------------------------------
    vocab = math.ceil(len(tokenizer) / 64) * 64  # a multiple of 64 keeps the output matmul tensor-core friendly
    eos = tokenizer.eos_token_id
    model_config = LlamaConfig(
        vocab_size=vocab, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, attn_implementation="sdpa",
        # the context it is trained at, which the evaluations read back: cloze and HumanEval prompts cut to it
        **{**cfg.model, "max_position_embeddings": T},
    )
    finished_before = _finished_record(out_dir, cfg) if cfg.resume else None
    if finished_before is not None:  # a resumed ablation's earlier runs: no reload of weights and optimizer, no save
        if progress is not None and master:
            progress.add_task(name or out_dir.name, total=finished_before["total_steps"],
                              completed=finished_before["steps"], loss=finished_before["train_loss"][-1])
        missing = {n: PackedTokens(path, T) for n, path in eval_paths.items() if n not in finished_before["eval"]}
        if missing:  # an evaluation set added since it finished: its final model is scored on it, not trained again
            model = LlamaForCausalLM.from_pretrained(out_dir / "model", dtype=torch.float32).to(device)
            finished_before["eval"].update(evaluation_losses(NextTokenLoss(model), missing, cfg.eval_tokens, B,
                                                             autocast, device, rank, world))
            if master:
                write_json_whole(out_dir / "run.json", finished_before)
        # the sets this invocation asks for, in its order (a set no longer asked stays in run.json)
        return {**finished_before, "eval": {n: finished_before["eval"][n] for n in eval_paths}}
    checkpoint = out_dir / "checkpoint"
    if master:
        _adopt_legacy_side_folder(checkpoint)
        recover_folder(checkpoint, "trainer_state.json")
    if world > 1:
        dist.barrier()
    resuming = cfg.resume and (checkpoint / "trainer_state.json").exists()
    torch.manual_seed(cfg.seed)
    if resuming:
        raw_model = LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    else:
        raw_model = LlamaForCausalLM(model_config)
    raw_model.to(device)
    params = sum(p.numel() for p in raw_model.parameters())
    flops = flops_per_token(raw_model, T)

    # --- optimizer: AdamW, weight decay on matrices and embeddings only ---------------------------------------------
    decay = [p for p in raw_model.parameters() if p.dim() >= 2]
    no_decay = [p for p in raw_model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda",
    )

    # --- resume ------------------------------------------------------------------------------------------------------
    state = {"step": 0, "tokens_seen": 0, "train_loss": [], "lr": [], "eval_history": [], "train_seconds": 0.0,
             "steady_tokens": 0, "steady_seconds": 0.0}
    if resuming:
        saved = json.loads((checkpoint / "trainer_state.json").read_text())
        if changed := _config_changes(saved["config"], cfg):
            raise ValueError(f"{checkpoint} was written with another configuration ({changed}); give the values it "
                             "was written with (a model field: --override KEY=VALUE), or remove it to train again")
        state = saved["state"]
        optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", map_location=device, weights_only=True))

    loss_fn = NextTokenLoss(raw_model)
    if cfg.compiles_on(device):
        compile_regions(loss_fn)
    model = loss_fn
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(loss_fn, device_ids=[local_rank] if device.type == "cuda" else None)

    saved_everywhere = preparation_barrier(f"saved/{out_dir.resolve()}")

    def save_checkpoint():
        """The checkpoint swapped in whole (trainer_state.json written last), every rank past it before going on."""
        if master:
            def write(folder: Path):
                raw_model.save_pretrained(folder)
                torch.save(optimizer.state_dict(), folder / "optimizer.pt")
                (folder / "trainer_state.json").write_text(json.dumps({"config": asdict(cfg), "state": state}))

            replace_folder(checkpoint, write)
        saved_everywhere()

    def evaluate() -> dict[str, float]:
        model.eval()
        losses = evaluation_losses(loss_fn, eval_data, cfg.eval_tokens, B, autocast, device, rank, world)
        model.train()
        return losses

    # --- the loop ----------------------------------------------------------------------------------------------------
    task = progress.add_task(name or out_dir.name, total=total_steps, completed=state["step"], loss=float("nan")) if (
        progress is not None and master) else None
    last_saved = time.time()
    model.train()
    stopping = False  # SIGTERM seen, by every rank's agreement
    with stop_requested() as stop:
        resumed_at = state["step"]
        while state["step"] < total_steps:
            step = state["step"]
            t0 = time.time()
            # each step's randomness (dropout, where overridden) from its number: a resumed run repeated the first
            # steps' masks, reseeded with cfg.seed
            torch.manual_seed(int(np.random.SeedSequence([cfg.seed, step, rank]).generate_state(1)[0]))
            lr = learning_rate(step, total_steps, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            for micro in range(grad_accum):
                first_sample = ((step * grad_accum + micro) * world + rank) * B
                x, y = (t.to(device, non_blocking=True) for t in train_data.batch(first_sample, B))
                sync = world == 1 or micro == grad_accum - 1
                with (nullcontext() if sync else model.no_sync()), autocast:
                    loss = model(x, y) / grad_accum
                loss.backward()
                loss_sum += loss.detach()
            if cfg.grad_clip:  # 0: no clipping (clipping to 0 zeroed every gradient: the run learned nothing)
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if world > 1:
                dist.all_reduce(loss_sum)  # a sum: gloo (CPU) has no AVG
            step_loss = loss_sum.item() / world  # also waits for the GPU, so the timing below is real
            dt = time.time() - t0

            state["step"] = step + 1
            state["tokens_seen"] += cfg.batch_tokens
            state["train_loss"].append(step_loss)
            state["lr"].append(lr)
            state["train_seconds"] += dt
            if step > resumed_at:  # this process's first step pays for compilation and allocator warmup (each
                state["steady_tokens"] += cfg.batch_tokens  # resume's too: a run over many jobs read slow)
                state["steady_seconds"] += dt
            if task is not None:
                progress.update(task, advance=1, loss=step_loss)
            if state["step"] % eval_every == 0 or state["step"] == total_steps:
                state["eval_history"].append({"step": state["step"], "tokens": state["tokens_seen"], **evaluate()})
            now = time.time()
            timed_out = cfg.time_limit_minutes is not None and (now - entered) / 60 > cfg.time_limit_minutes
            saving_due = cfg.checkpoint_minutes is not None and (now - last_saved) / 60 > cfg.checkpoint_minutes
            stopping = stop.is_set()
            if world > 1:  # one decision: ranks that disagree (each its clock, a signal not yet seen) would hang
                flags = torch.tensor([float(timed_out), float(saving_due), float(stopping)], device=device)
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
                timed_out, saving_due, stopping = (bool(v) for v in flags.tolist())
            if (state["step"] % checkpoint_every == 0 or timed_out or saving_due or stopping
                    or state["step"] == total_steps):
                save_checkpoint()
                last_saved = time.time()
            if stopping and state["step"] < total_steps:
                if master:
                    print(f"{name or out_dir.name}: stopped by SIGTERM at step {state['step']:,}; saved there, the "
                          "same command goes on from it", flush=True)
                raise SystemExit(128 + signal.SIGTERM)
            if timed_out:
                break
        late = stop.is_set()  # during the last save: this run is saved and finished, the next must not start
        if world > 1:
            flag = torch.tensor(float(late), device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            late = bool(flag.item())
    signalled = stopping or late  # the run is finished (or stopped at its limit) and saved below, then it ends

    finished = state["step"] >= total_steps
    tokens_per_second = (state["steady_tokens"] / state["steady_seconds"] if state["steady_seconds"]
                         else state["tokens_seen"] / max(state["train_seconds"], 1e-9))
    # MFU is measured against the bf16 tensor-core peak, so only under bf16 autocast: fp32 matmuls have a far lower
    # peak, and a CPU has none in the table.
    peak = peak_bf16_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" and use_bf16 else None
    record = {
        "finished": finished,
        "steps": state["step"],
        "total_steps": total_steps,
        "tokens_seen": state["tokens_seen"],
        "params": params,
        "flops_per_token": flops,
        "train_loss": state["train_loss"],
        "lr": state["lr"],
        "eval": {k: v for k, v in state["eval_history"][-1].items() if k not in ("step", "tokens")}
        if state["eval_history"] else {},
        "eval_history": state["eval_history"],
        "train_seconds": state["train_seconds"],
        "tokens_per_second": tokens_per_second,
        "mfu": flops * tokens_per_second / (peak * world) if peak else None,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "world_size": world,
        "precision": "bf16-autocast" if use_bf16 else "fp32",
        "train_epochs": state["tokens_seen"] / max(1, train_data.num_windows * T),
        "config": asdict(cfg),
    }
    if finished and master:
        raw_model.save_pretrained(out_dir / "model")
        tokenizer.save_pretrained(out_dir / "model")
        write_json_whole(out_dir / "run.json", record)  # last: a kill saving the model leaves no run.json
        # never read again (a finished run is its run.json and model/), and with the optimizer's moments three times
        # the model's size: 22 GB per run at 1.8B parameters
        shutil.rmtree(checkpoint, ignore_errors=True)
    if signalled:
        raise SystemExit(128 + signal.SIGTERM)
    return record


@torch.no_grad()
def evaluation_losses(loss_fn, eval_data: dict, eval_tokens: int, batch_size: int, autocast, device, rank: int = 0,
                      world: int = 1) -> dict[str, float]:
    """Mean next-token loss (nats/token) on the first `eval_tokens` targets of each packed set, shared across ranks."""
    losses = {}
    for name, data in eval_data.items():
        total = torch.zeros(2, device=device)
        for x, y in data.eval_batches(eval_tokens, batch_size, rank, world):
            x, y = x.to(device), y.to(device)
            with autocast:
                total[0] += loss_fn(x, y, reduction="sum")
            total[1] += y.numel()
        if world > 1:
            dist.all_reduce(total)
        losses[name] = (total[0] / total[1]).item()
    return losses


def _adopt_legacy_side_folder(checkpoint: Path) -> None:
    """checkpoint.tmp, where an edu-filter from before wrote a new checkpoint (now checkpoint.partial): a save it had
    finished but not yet renamed in is taken, an unfinished one removed."""
    legacy, partial = checkpoint.with_name("checkpoint.tmp"), side_folders(checkpoint)[0]
    if legacy.is_dir():
        if (legacy / "trainer_state.json").exists() and not partial.exists():
            legacy.rename(partial)
        else:
            shutil.rmtree(legacy, ignore_errors=True)


def _finished_record(out_dir: Path, cfg: PretrainConfig) -> dict | None:
    """The record of a run this configuration finished in `out_dir` (its model saved), or None. A run finished with
    another configuration is refused: training it again would overwrite it."""
    try:
        record = json.loads((out_dir / "run.json").read_text())
    except (OSError, ValueError):
        return None
    if not record.get("finished") or not (out_dir / "model" / "config.json").exists():
        return None
    if changed := _config_changes(record.get("config", {}), cfg):
        raise ValueError(f"{out_dir} holds a run finished with another configuration ({changed}); give the values "
                         "it was trained with (a model field: --override KEY=VALUE), use another output folder, or "
                         "remove it to train again")
    # never read again, with the optimizer's moments 3x the model: a run an earlier edu-filter finished kept it
    shutil.rmtree(out_dir / "checkpoint", ignore_errors=True)
    return record


def _config_changes(saved: dict, cfg: PretrainConfig) -> str:
    """The run-defining fields whose values differ between a saved configuration and `cfg`, with both values."""
    saved, wanted = _run_defining(saved), _run_defining(asdict(cfg))
    return ", ".join(f"{k}: {saved.get(k)!r} then, {wanted.get(k)!r} now" for k in sorted(set(saved) | set(wanted))
                     if saved.get(k) != wanted.get(k))


def _run_defining(config: dict) -> dict:
    """The config fields a checkpoint must match to be resumed (stopping, resuming and memory controls may change),
    the model's fields flat (`model.rms_norm_eps`), each one a config leaves out at LlamaConfig's default: a run
    saved before a preset set a field resumes when the field is given its value then (`--override`)."""
    # micro_batch_size too: each step reads the same samples however its batch is split (a job requeued on a card
    # with less memory goes on with a smaller one)
    defining = {k: v for k, v in config.items() if k not in ("time_limit_minutes", "resume", "checkpoint_every",
                                                             "checkpoint_minutes", "eval_every", "compile",
                                                             "cpu_threads", "micro_batch_size", "model")}
    model = config.get("model") or {}
    defining.update({f"model.{k}": model.get(k, _llama_default(k)) for k in sorted({*MODEL_FIELDS, *model})})
    return defining


@functools.cache
def _llama_defaults() -> dict:
    from transformers import LlamaConfig

    return LlamaConfig().to_dict()


def _llama_default(field: str):
    return _llama_defaults().get(field)
