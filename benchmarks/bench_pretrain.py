"""Pretraining throughput: the `ablate` loop against a bare forward/backward/AdamW loop on the same model and batch.

    python benchmarks/bench_pretrain.py                      # tiny preset (CPU or GPU)
    python benchmarks/bench_pretrain.py --preset smollm-135m             # on a GPU: tokens/s and MFU (compiled)
    python benchmarks/bench_pretrain.py --preset smollm-135m --no-compile  # the eager loop

The ratio (loop / bare) is the cost of everything the real loop adds: reading packed windows from the memory-mapped
token file, the schedule, gradient clipping, loss bookkeeping, progress. MFU is printed on GPUs in bf16 only.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
WEB = REPO / "data/web/fineweb_edu_llama3_train.jsonl"


def bare_tokens_per_second(cfg, tokenizer_size: int, steps: int, compile: bool) -> float:
    """Optimizer steps on random tokens already on the device: the ceiling for this model and batch shape."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from edu_filter.ablate.pretrain import NextTokenLoss, compile_regions

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    vocab = -(-tokenizer_size // 64) * 64
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, attn_implementation="sdpa", **cfg.model)).to(device)
    loss_fn = NextTokenLoss(model)
    if compile:
        compile_regions(loss_fn)
    use_bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and cuda)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)
    micro_batch, seq_len = cfg.micro_batch_size, cfg.context
    grad_accum = cfg.batch_tokens // (micro_batch * seq_len)
    # the loop's optimizer: its parameter groups and settings
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=cuda)
    x = torch.randint(0, vocab, (micro_batch, seq_len + 1), device=device)
    inputs, targets = x[:, :-1], x[:, 1:]  # views of one window, as the loop's batches come
    elapsed = 0.0
    for step in range(steps + 1):  # step 0 warms up (allocator, compilation)
        t0 = time.time()
        for _ in range(grad_accum):
            with autocast:
                loss = loss_fn(inputs, targets) / grad_accum
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        if step:
            elapsed += time.time() - t0
    return steps * cfg.batch_tokens / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per measurement")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="regional torch.compile (default: on a GPU, as `ablate` does)")
    parser.add_argument("--override", action="append", default=[], help="key=value, as in `ablate --override`")
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table
    from transformers.utils import logging as hf_logging

    from edu_filter.ablate.packing import iter_texts, write_train_val
    from edu_filter.ablate.pretrain import PretrainConfig, cpu_threads, parse_overrides, pretrain
    from edu_filter.ablate.tokenizer import mixed_sample, train_tokenizer

    hf_logging.disable_progress_bar()
    cuda = torch.cuda.is_available()
    steps = args.steps or (10 if cuda else 40)
    overrides = {"eval_tokens": 4096, "compile": args.compile, **parse_overrides(args.override)}
    cfg = PretrainConfig.from_preset(args.preset, overrides)
    cfg.tokens = (steps + 1) * cfg.batch_tokens
    compiled = cfg.compiles_on(torch.device("cuda" if cuda else "cpu"))
    work = Path(tempfile.mkdtemp(prefix="bench-pretrain-"))
    try:
        tok = train_tokenizer(mixed_sample([iter_texts(str(WEB))], 1_000_000), cfg.vocab_size)
        write_train_val(iter_texts(str(WEB)), tok, work / "tokens", train_tokens=10**9, val_fraction=0.05,
                        max_val_tokens=cfg.eval_tokens + cfg.context + 1)
        with cpu_threads(cfg.cpu_threads):
            threads = torch.get_num_threads()
            loop = pretrain(cfg, work / "tokens/train.bin", {"val": work / "tokens/val.bin"}, work / "run", tok)
            bare = bare_tokens_per_second(cfg, len(tok), steps, compiled)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    table = Table(title=f"pretraining throughput, {args.preset} ({loop['params'] / 1e6:.1f}M params) on "
                        f"{loop['device']}, {loop['precision']}, {'compiled' if compiled else 'eager'}, "
                        f"{threads} CPU threads")
    for col in ("measurement", "tokens/s", "MFU"):
        table.add_column(col, justify="right" if col != "measurement" else "left")
    peak_mfu = loop["mfu"] * bare / loop["tokens_per_second"] if loop["mfu"] is not None else None
    no_mfu = ("n/a (CPU)" if loop["device"] == "cpu" else "n/a (fp32)" if loop["precision"] == "fp32"
              else "n/a (GPU without a known peak)")
    table.add_row("ablate loop (pretrain)", f"{loop['tokens_per_second']:,.0f}",
                  f"{loop['mfu']:.1%}" if loop["mfu"] is not None else no_mfu)
    table.add_row("bare fwd/bwd/AdamW", f"{bare:,.0f}", f"{peak_mfu:.1%}" if peak_mfu is not None else no_mfu)
    console = Console()
    console.print(table)
    console.print(f"loop / bare = {loop['tokens_per_second'] / bare:.2f}  "
                  f"({steps} steps of {cfg.batch_tokens:,} tokens each, first step excluded)")


if __name__ == "__main__":
    sys.exit(main())
