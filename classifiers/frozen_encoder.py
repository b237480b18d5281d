"""The frozen encoder of the head recipe: pooled embeddings of documents, cached on disk under a key of the settings.

`train` fits its head on these vectors and `score --select active` chooses documents with them; both load the
encoder here, so the same documents under the same settings share one cache entry.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
from rich.console import Console

from edu_filter.classifiers.encoders import encoder_identity, resolve_encoder
from edu_filter.documents import check_named_path, one_line

console = Console(stderr=True)


def default_pool_layers(num_hidden_layers: int) -> list[int]:
    """Six evenly spaced layers up to the top: every layer of MiniLM (1-6), every other one of BERT-base (2, 4, .. 12).

    Pooling costs nothing at inference (every layer runs anyway), and middle layers keep the form of a document
    (structure, comments, style) that a quality judgement needs: six layers beat three and the top layer alone on
    both web and code (benchmarks/RESULTS.md, "Classifier design choices").
    """
    n = num_hidden_layers
    return sorted({max(1, round(k * n / 6)) for k in range(1, 7)})


TRAIN_DTYPES = ("float32", "bfloat16")


def check_train_dtype(dtype: str | None) -> None:
    if dtype is not None and dtype not in TRAIN_DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(TRAIN_DTYPES)} while training, got {dtype!r}")


def compute_dtype(dtype: str | None, device) -> str:
    """The precision the encoder computes in while training: `dtype`, or by default bfloat16 on a GPU that has it (as
    `apply` scores there; 2-3x the fp32 matmul speed), float32 elsewhere."""
    from edu_filter.classifiers.device import native_bf16

    check_train_dtype(dtype)
    if dtype is None:
        return "bfloat16" if native_bf16(device) else "float32"
    return dtype


@dataclass
class FrozenEncoder:
    """An encoder loaded for the head recipe, with the embedding-cache key its pooled vectors are stored under."""

    name: str  # the path or hub name loaded
    tokenizer: object
    model: object  # EduClassifierForSequenceClassification around the encoder, head untrained
    scorer: object  # EduScorer over `model`
    key: str  # embedding-cache setting key
    cache: object  # EmbeddingCache
    max_length: int
    pool_layers: list[int]
    dtype: str  # what the encoder computes in (`compute_dtype`); its weights stay float32

    def autocast(self):
        """The encoder's forward passes in `dtype` (torch autocast) inside the block; the weights, and so the saved
        model, stay float32."""
        import torch

        if self.dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(self.scorer.device.type, dtype=getattr(torch, self.dtype))

    def embed(self, texts: list[str]) -> np.ndarray:
        """Pooled vectors (n, hidden * len(pool_layers)), float32; the cached ones read, the others computed in
        `dtype` on every CPU this process may use, or its GPU (and stored)."""
        from edu_filter.classifiers.device import torch_threads
        from edu_filter.classifiers.embeddings import cached_embeddings

        with torch_threads(), self.autocast():
            return cached_embeddings(self.scorer, texts, self.key, self.cache)


def load_frozen_encoder(
    kind: str = "web",
    encoder: str | None = None,
    *,
    max_length: int = 512,
    pooling: str = "mean",
    pool_layers: list[int] | None = None,
    long_docs: str = "truncate",
    max_chunks: int = 8,
    batch_size: int | None = None,
    cache_dir: str | None = None,
    seed: int = 0,
    method: str = "head",
    dtype: str | None = None,
) -> FrozenEncoder:
    """The encoder (`encoder`, else the kind's default) wrapped in an untrained edu_classifier model whose config
    records these settings, and its embedding-cache key. `max_length` is capped at the encoder's positions;
    `pool_layers` None: `default_pool_layers`; `batch_size` None: the device's default (32 documents on a CPU, a token
    budget on a GPU; the vectors do not depend on it); `dtype`: what it computes in (`compute_dtype`; vectors computed
    in bfloat16 are cached apart). The defaults are `train`'s, so a caller giving only what it changed shares
    `train`'s cached vectors."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from edu_filter.classifiers.embeddings import EmbeddingCache, setting_key
    from edu_filter.classifiers.modeling_edu_classifier import (
        EduClassifierConfig,
        EduClassifierForSequenceClassification,
    )
    from edu_filter.classifiers.scorer import OFFSET_POSITIONS, EduScorer, readable_tokens

    torch.manual_seed(seed)
    encoder_name = resolve_encoder(kind, encoder)
    check_named_path(encoder_name, "--encoder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(encoder_name, trust_remote_code=False)
        model = AutoModel.from_pretrained(encoder_name, dtype=torch.float32, trust_remote_code=False)
    except (OSError, ValueError) as e:  # no such hub repo, a folder with no weights or no tokenizer in it
        raise ValueError(f"cannot load encoder {encoder_name!r}: {one_line(str(e))}") from None
    # the tokens an encoder reads: its positions, less what its tokenizer says it cannot use (RoBERTa-family models
    # have 514 positions for 512 tokens: two are offset by the padding index)
    max_positions = getattr(model.config, "max_position_embeddings", max_length)
    if model.config.model_type in OFFSET_POSITIONS:  # whatever its tokenizer says: 513 tokens failed in the encoder
        max_positions = readable_tokens(model.config.to_dict(), tokenizer)
    if 0 < getattr(tokenizer, "model_max_length", 0) < max_positions:
        max_positions = tokenizer.model_max_length
    wanted_length, max_length = max_length, min(max_length, max_positions)
    if max_length < wanted_length:
        console.print(f"max_length {wanted_length} exceeds the {max_positions} tokens the encoder reads; using "
                      f"{max_length}")
    depth = model.config.num_hidden_layers
    pool_layers = pool_layers or default_pool_layers(depth)
    if any(not 0 <= layer <= depth for layer in pool_layers):
        raise ValueError(f"--pool-layers {','.join(map(str, pool_layers))}: this encoder has hidden states 0..{depth}")
    # without its dtype: a model loaded in bfloat16 must build its encoder in bfloat16, not in the float32 saved here
    encoder_config = {k: v for k, v in model.config.to_dict().items() if k not in ("dtype", "torch_dtype")}
    config = EduClassifierConfig(
        encoder_config=encoder_config,
        encoder_name=encoder or encoder_name,
        pooling=pooling,
        pool_layers=pool_layers,
        max_seq_length=max_length,
        long_docs=long_docs,
        max_chunks=max_chunks,
        kind=kind,
        method=method,
    )
    classifier = EduClassifierForSequenceClassification(config, encoder=model)
    scorer = EduScorer(
        classifier, tokenizer, max_length=max_length, long_docs=long_docs, max_chunks=max_chunks,
        batch_size=batch_size, kind=kind,
    )
    dtype = compute_dtype(dtype, scorer.device)
    key = setting_key(
        encoder=encoder_identity(encoder_name), max_length=max_length, pooling=pooling, pool_layers=pool_layers,
        long_docs=long_docs, max_chunks=max_chunks,
        # bfloat16 vectors are cached apart; since the mean is pooled in float32 (a bfloat16 count of tokens is
        # inexact past 256), apart from those pooled before too
        **({} if dtype == "float32" else {"autocast": dtype, "pooled_in": "float32"}),
    )
    return FrozenEncoder(encoder_name, tokenizer, classifier, scorer, key, EmbeddingCache(cache_dir), max_length,
                         pool_layers, dtype)
