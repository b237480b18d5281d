"""`train --method finetune`: the head recipe's model, then every weight trained with MSE (linear probe, then
fine-tune: the head starts from the ridge, so the encoder is not pulled about by a random head)."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shutil
import signal
import tempfile
from operator import itemgetter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from safetensors import SafetensorError

from edu_filter.classifiers.device import torch_threads
from edu_filter.classifiers.encoders import pad_batch
from edu_filter.classifiers.head import unit_weights
from edu_filter.documents import (RunError, held_alone, logged_progress, recover_folder, replace_folder, side_folders,
                                  stop_requested, text_hash)
from edu_filter.train.classifier import TrainedModel, console
from edu_filter.train.head import fit_head

if TYPE_CHECKING:
    from edu_filter.train.classifier import ClassifierTrainConfig


def train_finetune(cfg: ClassifierTrainConfig, texts: list[str], y: np.ndarray, val_texts: list[str],
                   weights=None, y_val: np.ndarray | None = None, w_val=None) -> TrainedModel:
    """The head model fine-tuned on `texts`; no out-of-fold predictions (calibration uses validation alone). With
    `y_val`, the validation MSE and Spearman are measured EVALUATIONS times over the run (`validation_point`): a
    long run says how it goes, not only its training loss, and whether it went past its best."""
    keeps_checkpoints = checkpoints_usable(cfg)
    # only the probe and its info: the training embeddings it returns (GBs at 450k labels) are let go at once
    frozen, info = itemgetter(0, 3)(fit_head(cfg, texts, y, weights))
    with torch_threads():
        checkpoint = checkpoint_folder(cfg, frozen.key, texts, y, weights) if keeps_checkpoints else None
        with only_run_of(checkpoint) if checkpoint is not None else contextlib.nullcontext():
            history = finetune(frozen.scorer, texts, y, cfg, weights, autocast=frozen.autocast, checkpoint=checkpoint,
                               validation=(val_texts, y_val, w_val) if y_val is not None else None)
        info["dtype"] = frozen.dtype  # what the encoder computed in (the head computes in float32)
        with frozen.autocast():
            val_pred, _ = frozen.scorer.predict_many(val_texts, show_progress=True)
    if y_val is not None:
        steps = finetune_steps(len(texts), cfg)
        history.append(validation_point(steps, val_pred, y_val, w_val))
        info["validation_during_training"] = history
        warn_past_best(history, steps)
    # the checkpoint goes once the caller has saved the model (`remove_checkpoint`): a kill before that resumes at
    # the last step
    return TrainedModel(frozen.model, val_pred.astype(np.float64), None, info, frozen, checkpoint=checkpoint)


def warn_past_best(history: list[dict], steps: int) -> None:
    """Said when the validation MSE ended well above its lowest: the saved weights are the last, not the best (the
    validation split also places the cut points and gives the metrics, so choosing weights on it would flatter
    them)."""
    best = min(history, key=lambda point: point["mse"])
    if best["mse"] < 0.95 * history[-1]["mse"]:
        console.print(f"[yellow]fine-tuning: the validation MSE was lowest at step {best['step']:,} of {steps:,} "
                      f"({best['mse']:.3f}) and is {history[-1]['mse']:.3f} at the end, whose weights are saved: "
                      "fewer --epochs or a lower --learning-rate may do better[/]")


@contextlib.contextmanager
def only_run_of(checkpoint: Path):
    """Held while a run fine-tunes into `checkpoint`: the same command started twice (a job submitted again while
    the first runs) would write one checkpoint folder from two processes, each renaming the other's copy away. The
    second is refused, naming the first."""
    lock = checkpoint.with_name(checkpoint.name + ".lock")
    with held_alone(lock, lambda holder: (
            f"{holder} is fine-tuning the same model on the same data (its checkpoint: {checkpoint}): wait for it to "
            "finish, or stop it and run this again to go on from its checkpoint")) as no_locks:
        if no_locks:
            console.print(f"[yellow]fine-tuning: {lock.parent} takes no file locks ({no_locks.strerror}): nothing "
                          "stops a second run of this command from using the same checkpoint at once[/]")
        yield


def checkpoints_usable(cfg: ClassifierTrainConfig) -> bool:
    """Whether the folder of fine-tuning checkpoints can be made, checked before the embedding: where it cannot (a
    read-only home, a --cache-dir that is a file), the run goes on without checkpoints, as the embedding cache goes on
    without its cache, rather than failing after hours of embedding."""
    from edu_filter.classifiers.embeddings import DEFAULT_CACHE_DIR

    folder = Path(cfg.cache_dir or DEFAULT_CACHE_DIR) / "finetune"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=".probe-", dir=folder))  # its own name: runs starting at once each probe
        return True
    except OSError as e:
        console.print(f"[yellow]fine-tuning without checkpoints: {folder} cannot be written ({e.strerror or e}); a "
                      "killed run starts over[/]")
        return False


def remove_checkpoint(folder: Path) -> None:
    """A finished run's checkpoint, with what a kill mid-save left beside it; other runs' are named, not removed."""
    for path in (folder, *side_folders(folder)):
        shutil.rmtree(path, ignore_errors=True)
    folder.with_name(folder.name + ".lock").unlink(missing_ok=True)
    others = [p for p in folder.parent.iterdir() if p.is_dir() and not _being_written(p)] if folder.parent.is_dir() \
        else []
    if others:
        size = sum(f.stat().st_size for p in others for f in p.rglob("*") if f.is_file())
        console.print(f"[yellow]{len(others)} checkpoint(s) of other fine-tuning runs, killed and not resumed with "
                      f"the same command, hold {size / 2**30:.1f} GB in {folder.parent}: delete what you will not "
                      "resume[/]")


def _being_written(checkpoint: Path) -> bool:
    """Whether a run fine-tunes into `checkpoint` (or its side folders) now: its lock is held. Named among the
    abandoned ones, it was deleted on that advice, and the run started over once killed."""
    import fcntl

    lock = checkpoint.with_name(checkpoint.name.removesuffix(".partial").removesuffix(".old") + ".lock")
    try:
        with open(lock, "rb") as fh:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # no lock file (a run killed; the kernel dropped its lock), or one the file system cannot lock
        return False
    return False


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


CHECKPOINTS = 20  # saved this many times over a fine-tuning run (50k steps at 450k labels: every 2,500)


def checkpoint_folder(cfg: ClassifierTrainConfig, encoder_key: str, texts: list[str], y: np.ndarray,
                      weights) -> Path:
    """Where a fine-tuning run keeps its checkpoints: in the embedding cache folder, named by everything that
    makes the run (its settings, encoder and data), so the same command after a kill finds it and another run
    does not."""
    from edu_filter.classifiers.embeddings import DEFAULT_CACHE_DIR

    digest = hashlib.sha256(json.dumps({"format": CHECKPOINT_FORMAT, **{k: getattr(cfg, k) for k in RUN_DEFINING}},
                                       sort_keys=True).encode())
    digest.update(encoder_key.encode())
    for text in texts:
        digest.update(text_hash(text).encode())
    digest.update(np.asarray(y, np.float64).tobytes())
    digest.update(b"" if weights is None else np.asarray(weights, np.float64).tobytes())
    return Path(cfg.cache_dir or DEFAULT_CACHE_DIR) / "finetune" / digest.hexdigest()[:20]


RUN_DEFINING = ("kind", "max_length", "seed", "pooling", "pool_layers", "long_docs", "dtype", "epochs",
                "learning_rate", "head_learning_rate", "train_batch_size", "warmup_fraction", "weight_field",
                "folds", "min_positives")
CHECKPOINT_FORMAT = 1  # in the key: a checkpoint of another edu-filter's training loop is not resumed


def validation_point(step: int, predictions: np.ndarray, y_val: np.ndarray, w_val=None) -> dict:
    """The validation MSE and Spearman of the model at `step` (weighted by the inclusion weights, as the final
    metrics are); monitored only: the saved weights stay the last, and the metrics come from them."""
    from edu_filter.classifiers.metrics import compute_metrics

    clipped = np.clip(np.round(predictions), 0, 5).astype(int)
    metrics = compute_metrics(y_val, predictions, clipped, weights=w_val)
    return {"step": step, "mse": metrics["mse"], "spearman": metrics["spearman"]}


def finetune_steps(documents: int, cfg: ClassifierTrainConfig) -> int:
    """Optimizer steps of a fine-tuning run over `documents` (the last batch of an epoch may be short)."""
    return (documents + cfg.train_batch_size - 1) // cfg.train_batch_size * cfg.epochs


EVALUATIONS = 5  # times the validation split is scored over a fine-tuning run (the last: the final metrics' own)


def finetune(scorer, texts: list[str], y: np.ndarray, cfg: ClassifierTrainConfig, weights=None,
             autocast=contextlib.nullcontext, checkpoint: Path | None = None,
             validation: tuple | None = None) -> list[dict]:
    """Train every weight of `scorer.model` with MSE on the sequences it scores in truncate mode (the first
    max_length tokens; AdamW, warmup + linear decay); with inclusion weights, each document's squared error counts
    in proportion to its weight. The forward passes run inside `autocast()` (mixed precision; the weights and the
    optimizer stay float32; the head computes in float32).

    With `checkpoint`, the model, optimizer, schedule and random states are saved there CHECKPOINTS times over the
    run (renamed into place whole), and a run finding one goes on from its step: hours of steps survive a kill,
    with the weights an uninterrupted run would have reached.

    With `validation` (texts, labels, weights), the model scores them at each of the first EVALUATIONS - 1 fifths
    of the run (printed, on the bar); returned as `validation_point`s, kept in the checkpoint across a resume."""
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

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
    total = finetune_steps(len(texts), cfg)
    warmup = max(1, int(cfg.warmup_fraction * total))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (total - step) / max(1, total - warmup)))
    )
    rng = np.random.default_rng(cfg.seed)
    targets = torch.tensor(y, dtype=torch.float32)
    row_weights = torch.tensor(unit_weights(weights, len(y)), dtype=torch.float32)
    measured_on = validation_key(*validation) if validation else None
    done, history = (_resume(checkpoint, model, optimizer, schedule, device, measured_on) if checkpoint is not None
                     else (0, []))
    every = max(1, total // CHECKPOINTS)
    evaluated_at = {total * k // EVALUATIONS for k in range(1, EVALUATIONS)} - {0, total} if validation else set()

    def measure(step: int, stop) -> None:
        """The validation point of `step`, unless SIGTERM comes during it (the checkpoint first: SIGKILL follows)."""
        val_texts, y_val, w_val = validation
        model.eval()
        with autocast():
            predictions = _scores_unless_stopped(scorer, val_texts, stop)
        model.train()
        if predictions is not None:
            history.append(validation_point(step, predictions, y_val, w_val))
            progress.update(task, validation=_shown(history[-1]))
            console.print(f"fine-tuning: step {step:,} of {total:,}, {_shown(history[-1])}")

    with stop_requested() as stop, logged_progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.3f}"),
        TextColumn("{task.fields[validation]}"), TimeRemainingColumn(), console=console,
    ) as progress:
        task = progress.add_task("fine-tuning", total=total, loss=float("nan"), completed=done,
                                 validation=_shown(history[-1]) if history else "")
        if done in evaluated_at and all(point["step"] != done for point in history):
            measure(done, stop)  # stopped by a SIGTERM during that pass: measured now, not lost to the resume
        step = 0
        for _ in range(cfg.epochs):
            order = rng.permutation(len(texts))  # drawn for every epoch, a resumed one too: the same order
            for start in range(0, len(order), cfg.train_batch_size):
                step += 1
                if step <= done:
                    continue
                batch = order[start : start + cfg.train_batch_size]
                input_ids, attention_mask = pad_batch([ids[offsets[i]:offsets[i + 1]] for i in batch], pad_id)
                with autocast():
                    out = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
                    errors = (out.logits[:, 0].float() - targets[batch].to(device)) ** 2
                    loss = (row_weights[batch].to(device) * errors).mean()
                value = loss.item()
                if not np.isfinite(value):  # every later step NaN too: hours on, and a model that scores all NaN
                    raise RunError(f"fine-tuning diverged at step {step:,}: the loss is {value} (a lower "
                                   "--learning-rate, or --dtype float32)")
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                progress.update(task, advance=1, loss=value)
                if step in evaluated_at and not stop.is_set():
                    measure(step, stop)
                if checkpoint is not None and (step % every == 0 or step == total or stop.is_set()):
                    try:
                        _save(checkpoint, model, optimizer, schedule, step, device, history, measured_on)
                    except (OSError, RuntimeError, SafetensorError) as e:  # read-only, full, over quota
                        console.print(f"[yellow]fine-tuning checkpoints cannot be saved in {checkpoint} ({e}); "
                                      "going on without (--cache-dir names another folder)[/]")
                        checkpoint = None
                if stop.is_set():
                    saved = "; saved there, the same command goes on from it" if checkpoint is not None else ""
                    console.print(f"fine-tuning: stopped by SIGTERM at step {step:,}{saved}")
                    raise SystemExit(128 + signal.SIGTERM)
    model.eval()
    return history


VALIDATION_WINDOW = 1024  # validation documents scored between two looks for a SIGTERM


def _scores_unless_stopped(scorer, texts: list[str], stop) -> np.ndarray | None:
    """The model's scores of `texts`, a window at a time; None once `stop` is set (a validation split of 45k documents
    takes minutes, past the 30 s a Slurm job has between SIGTERM and SIGKILL to save its checkpoint)."""
    parts = []
    for start in range(0, len(texts), VALIDATION_WINDOW):
        if stop.is_set():
            return None
        parts.append(scorer.predict_many(texts[start:start + VALIDATION_WINDOW])[0])
    return np.concatenate(parts) if parts else np.zeros(0)


def _shown(point: dict) -> str:
    spearman = "n/a" if point["spearman"] is None else f"{point['spearman']:.3f}"
    return f"validation MSE {point['mse']:.3f}, Spearman {spearman}"


def validation_key(texts: list[str], labels, weights=None) -> str:
    """What the validation points were measured on: the checkpoint's name leaves the validation data out (the
    weights do not depend on it), so a `--val` replaced before a resume must not mix its points with the old's."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text_hash(text).encode())
    digest.update(np.asarray(labels, np.float64).tobytes())
    digest.update(b"" if weights is None else np.asarray(weights, np.float64).tobytes())
    return digest.hexdigest()[:20]


def _save(folder: Path, model, optimizer, schedule, step: int, device, history: list[dict] = (),
          measured_on: str | None = None) -> None:
    """The training state swapped in whole (step.json written last): a kill mid-save leaves the previous one."""
    import torch
    from safetensors.torch import save_file

    def write(partial: Path):
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()},
                  partial / "model.safetensors")
        torch.save({"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                    # the device trained on only: a rerun may see fewer GPUs
                    "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.zeros(0)},
                   partial / "state.pt")
        (partial / "step.json").write_text(json.dumps({"step": step, "validation": list(history),
                                                        "validation_data": measured_on}))

    replace_folder(folder, write)


def _resume(folder: Path, model, optimizer, schedule, device, measured_on: str | None = None) -> tuple[int, list[dict]]:
    """The step a checkpoint was saved at and its validation points (those measured on the validation data
    `measured_on` names, else none), its state loaded into the run; (0, []) without one (after a save killed
    between its renames, the newest complete copy beside it)."""
    import torch
    from safetensors.torch import load_file

    recover_folder(folder, "step.json")
    if not (folder / "step.json").exists():
        return 0, []
    try:
        weights = load_file(folder / "model.safetensors", device=str(device))
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
        saved = json.loads((folder / "step.json").read_text())
        step, history = saved["step"], saved.get("validation", [])
        if history and saved.get("validation_data") != measured_on:
            console.print(f"fine-tuning: the validation data changed since step {step:,}: its {len(history)} "
                          "earlier validation point(s) are left out")
            history = []
    except Exception as e:  # noqa: BLE001 - cut short by a node crash: start over rather than fail every rerun
        console.print(f"[yellow]fine-tuning checkpoint {folder} cannot be read ({type(e).__name__}: {e}); "
                      "starting over[/]")
        shutil.rmtree(folder, ignore_errors=True)
        return 0, []
    model.load_state_dict(weights)
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    torch.set_rng_state(state["torch_rng"])
    if device.type == "cuda" and state["cuda_rng"].numel():
        torch.cuda.set_rng_state(state["cuda_rng"], device)
    console.print(f"fine-tuning: resuming at step {step:,} from {folder}")
    return step, history
