"""`train --method finetune`: the head recipe's model, then every weight trained with MSE (linear probe, then
fine-tune: the head starts from the ridge, so the encoder is not pulled about by a random head)."""

from __future__ import annotations

import contextlib
import itertools
from typing import TYPE_CHECKING

import numpy as np

from edu_filter.classifiers.device import torch_threads
from edu_filter.classifiers.encoders import pad_batch
from edu_filter.classifiers.head import unit_weights
from edu_filter.train.classifier import TrainedModel, console
from edu_filter.train.head import fit_head

if TYPE_CHECKING:
    from edu_filter.train.classifier import ClassifierTrainConfig


def train_finetune(cfg: ClassifierTrainConfig, texts: list[str], y: np.ndarray, val_texts: list[str],
                   weights=None) -> TrainedModel:
    """The head model fine-tuned on `texts`; no out-of-fold predictions (calibration uses validation alone)."""
    frozen, _, _, info, _ = fit_head(cfg, texts, y, weights)
    with torch_threads():
        finetune(frozen.scorer, texts, y, cfg, weights, autocast=frozen.autocast)
        info["dtype"] = frozen.dtype  # what the encoder computed in (the head computes in float32)
        with frozen.autocast():
            val_pred, _ = frozen.scorer.predict(val_texts, show_progress=True)
    return TrainedModel(frozen.model, val_pred.astype(np.float64), None, info, frozen)


def packed_sequences(scorer, texts: list[str], block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """The token ids `scorer` reads of every text (truncate mode), as one int32 array and each text's offsets into it,
    tokenized `block` texts at a time: as Python lists they took 42 B a token (~8 GB for 500k documents of 512)."""
    parts, lengths = [], []
    for start in range(0, len(texts), block):
        sequences = scorer.token_sequences(texts[start:start + block])
        lengths.extend(map(len, sequences))
        parts.append(np.fromiter(itertools.chain.from_iterable(sequences), np.int32))
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return (np.concatenate(parts) if parts else np.zeros(0, np.int32)), offsets


def finetune(scorer, texts: list[str], y: np.ndarray, cfg: ClassifierTrainConfig, weights=None,
             autocast=contextlib.nullcontext) -> None:
    """Train every weight of `scorer.model` with MSE on the sequences it scores in truncate mode (the first
    max_length tokens; AdamW, warmup + linear decay); with inclusion weights, each document's squared error counts
    in proportion to its weight. The forward passes run inside `autocast()` (mixed precision; the weights and the
    optimizer stay float32; the head computes in float32)."""
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    model, device = scorer.model, scorer.device
    ids, offsets = packed_sequences(scorer, texts)
    pad_id = scorer.tokenizer.pad_token_id
    model.to(device).train()
    optimizer = torch.optim.AdamW(
        [
            {"params": list(model.encoder.parameters()), "lr": cfg.learning_rate},
            {"params": list(model.classifier.parameters()), "lr": cfg.head_learning_rate},
        ],
        weight_decay=0.01,
    )
    steps_per_epoch = (len(texts) + cfg.train_batch_size - 1) // cfg.train_batch_size
    total = steps_per_epoch * cfg.epochs
    warmup = max(1, int(cfg.warmup_fraction * total))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (total - step) / max(1, total - warmup)))
    )
    rng = np.random.default_rng(cfg.seed)
    targets = torch.tensor(y, dtype=torch.float32)
    row_weights = torch.tensor(unit_weights(weights, len(y)), dtype=torch.float32)
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.3f}"),
        TimeRemainingColumn(), console=console,
    ) as progress:
        task = progress.add_task("fine-tuning", total=total, loss=float("nan"))
        for _ in range(cfg.epochs):
            order = rng.permutation(len(texts))
            for start in range(0, len(order), cfg.train_batch_size):
                batch = order[start : start + cfg.train_batch_size]
                input_ids, attention_mask = pad_batch([ids[offsets[i]:offsets[i + 1]] for i in batch], pad_id)
                with autocast():
                    out = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
                    errors = (out.logits[:, 0].float() - targets[batch].to(device)) ** 2
                    loss = (row_weights[batch].to(device) * errors).mean()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                progress.update(task, advance=1, loss=loss.item())
    model.eval()
