"""Scorers: raw educational scores, and the model's calibrated 0-5 `int_score`, from any saved classifier.

`load_scorer` reads every folder `edu-filter train` writes and the official HuggingFaceFW/fineweb-edu-classifier
layout (stock `BertForSequenceClassification`, one logit, no calibration -> round-and-clip). It returns an `EduScorer`
for a transformers model or a `FastTextScorer` for a fastText one; both `predict` and `to_int_score` alike.

`EduScorer`'s fast path: tokenize everything once, sort sequences by length, pad each batch only to its longest
member, run under `torch.inference_mode()` (bf16 + SDPA on GPU), and put the results back in input order. Loading a
scorer sets no threads: whoever runs scoring as its main job chooses them (`classifiers.device.torch_threads`).

Precision (`dtype`): exact fp32 on CPU and bf16 on GPU by default. `int8` is the CPU fast path for CPUs without bf16
units: the encoder's linear layers are quantized dynamically with per-channel weight scales (the regression head stays
fp32). It is opt-in because it moves scores a little, and because activations are quantized per batch a score can
depend on the batch a document lands in; the default reproduces what `train` measured. Its speed and score changes
are in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edu_filter.classifiers.calibration import ROUND_CUTS, apply_cut_points, round_and_clip
from edu_filter.classifiers.device import default_device
from edu_filter.classifiers.encoders import SequenceFramer, pad_batch, prepare_tokenizer
from edu_filter.classifiers.fasttext_model import CONFIG_FILE as FASTTEXT_CONFIG
from edu_filter.documents import InputError, one_line, progress_bar

LONG_DOC_MODES = ("truncate", "chunk-max", "chunk-mean")
DTYPES = ("float32", "bfloat16", "float16", "int8")
# Tokenizing a prefix of this many characters per wanted token spares tokenizing megabyte documents in full when only
# their start is scored. English web text averages ~4.8 characters per BERT token (99th percentile 5.8, max 6.3 on the
# bundled FineWeb documents), code ~3.4; a text whose prefix comes up short (sparse: whitespace runs, padded tables) is
# tokenized again in pieces cut where every tokenizer starts a token anyway (SAFE_CUTS: the ids are those of the whole
# text), each CHARS_RETRY_FACTOR times longer than the last, until it has enough tokens, or SPARSE_SCAN_CHARS of it are
# read: tokenized whole, a 1 GB document of whitespace needed ~55 GB and 40 minutes, on every rerun of its task. Only
# such a text's tokens depend on the bound; it counts as truncated.
CHARS_PER_TOKEN_BOUND = 7
WORD_BACKOFF_CHARS = 200  # how far a prefix may end before its bound to end at a whitespace
CHARS_RETRY_FACTOR = 4
SPARSE_SCAN_CHARS = 1 << 20
# Where every pre-tokenizer (WordPiece, byte-level BPE as GPT-2's and Llama 3's, Metaspace) starts a new token: before
# a space that a non-space follows (the run of whitespace before it ends a token of its own), else before whitespace
# that follows a letter or digit (punctuation may take the newlines after it into its token).
SAFE_CUTS = (re.compile(r" (?=\S)"), re.compile(r"(?<=[^\W_])\s"))
# Scoring batches when none is given. A GPU needs big ones: a BERT-base classifier at 512 tokens on one H200 scored
# 1,276 docs/s in batches of 256 documents and 2,565 in batches of 1,024 (benchmarks/RESULTS.md), so a GPU batch holds
# this many tokens (1,024 documents at 512, 64 at 8,192). On a CPU the batch size barely matters: 32 documents.
GPU_BATCH_TOKENS = 1024 * 512
CPU_BATCH_SIZE = 32


def default_batch_size(device: torch.device, max_length: int) -> int:
    """Documents per scoring batch on `device` for sequences of up to `max_length` tokens."""
    return CPU_BATCH_SIZE if device.type == "cpu" else max(1, GPU_BATCH_TOKENS // max_length)


def split_revision(model: str | os.PathLike) -> tuple[str, str | None]:
    """(name, revision) of a hub id written `ORG/NAME@REVISION` (a commit, branch or tag), else (model, None); an
    existing local path is never split."""
    text = str(model)
    name, at, revision = text.partition("@")
    if not at or not revision or Path(text).exists():
        return text, None
    return name, revision


def text_prefix(text: str, limit: int) -> str:
    """The text's first `limit` characters, ended at a whitespace within the last WORD_BACKOFF_CHARS of them, so the
    last word is whole or absent: a word cut in two tokenizes differently from the whole (WordPiece reads a word over
    100 characters, a base64 run, as one [UNK]; its cut end as many pieces), and the tokens read would depend on the
    bound."""
    if len(text) <= limit:
        return text
    cut = text[:limit]
    space = max(cut.rfind(c) for c in " \n\t\r")
    return cut[:space] if space >= limit - WORD_BACKOFF_CHARS else cut


def safe_pieces(text: str, size: int, growth: int = 1, stop: int | None = None) -> Iterator[str]:
    """`text` (its first `stop` characters) in pieces of `size` characters at most, each next one `growth` times
    longer, cut where a new token starts anyway (SAFE_CUTS), so that the pieces' tokens are the text's. A stretch
    with no such place (a base64 blob) is cut where it must, one token off at most."""
    limit = len(text) if stop is None else min(stop, len(text))
    start = 0
    while start < limit:
        end = min(start + size, limit)
        cut = end if end == len(text) else (_last_safe_cut(text, start, end) or end)
        yield text[start:cut]
        start, size = cut, size * growth


def _last_safe_cut(text: str, start: int, end: int) -> int | None:
    """The last place in text[start + 1:end] where SAFE_CUTS allow a cut, the first kind before the second; looked
    for in the last 4096 characters first, where it usually is."""
    for safe in SAFE_CUTS:
        for low in (max(start + 1, end - 4096), start + 1):
            found = None
            for found in safe.finditer(text, low, end):
                pass
            if found is not None:
                return found.start()
    return None


def _sparse_ids(text: str, enough: int, first: int, encode: Callable) -> tuple[list[int], bool]:
    """The ids of a sparse text's start, `encode`d in `safe_pieces` CHARS_RETRY_FACTOR times longer each from
    `first` characters: until more than `enough`, the end, or SPARSE_SCAN_CHARS read; and whether it stopped there."""
    ids: list[int] = []
    read = 0
    for piece in safe_pieces(text, first * CHARS_RETRY_FACTOR, CHARS_RETRY_FACTOR, SPARSE_SCAN_CHARS):
        ids += encode([piece])[0]
        read += len(piece)
        if len(ids) > enough:
            return ids, False
    return ids, read < len(text)


def resolve_model_dir(path_or_hub_id: str | os.PathLike) -> Path:
    """A local folder as is; a hub id (`ORG/NAME`, or `ORG/NAME@REVISION`) through the hub cache (works offline once
    downloaded). The folder of a hub model is its snapshot, named by the commit it holds."""
    path = Path(path_or_hub_id)
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{path}: expected a model folder, got a file")
    name, revision = split_revision(path_or_hub_id)
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:  # hub ids are NAME or ORG/NAME
        raise ValueError(f"{name}: no such model folder")
    from huggingface_hub import snapshot_download

    if revision is not None and re.fullmatch(r"[0-9a-f]{40}", revision):  # a commit (apply pins one): its snapshot
        with contextlib.suppress(Exception):  # in the cache is the model, asked of the hub by no task on any node
            return Path(snapshot_download(name, revision=revision, local_files_only=True))
    try:
        return Path(snapshot_download(name, revision=revision))
    except Exception as e:  # noqa: BLE001 - bad id, offline, gated: one clear line
        raise ValueError(
            f"{name}: not a local model folder, and the hub could not provide it ({type(e).__name__})"
        ) from None


def load_classifier_tokenizer(name: str | os.PathLike, revision: str | None = None):
    """A classifier's tokenizer (a folder or hub id), running no code from it. edu-filter's own classifiers name
    their modeling file in an `auto_map`: registering that class here lets transformers read their config without
    trusting the folder; `trust_remote_code=True` ran whatever Python a hub repository (or a folder) carried, in
    every task of every node, with the user's credentials."""
    from transformers import AutoTokenizer

    _register_edu_classifier()
    try:  # the hub cache first: each task on a node without internet asked the hub, ~95 s of retries per task
        return AutoTokenizer.from_pretrained(name, revision=revision, local_files_only=True, trust_remote_code=False)
    except Exception:  # noqa: BLE001 - not cached here: from the hub
        return AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=False)


def _register_edu_classifier() -> None:
    """transformers reads edu-filter's classifier configs with this package's class, not the folder's copy."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from edu_filter.classifiers.modeling_edu_classifier import (
        EduClassifierConfig,
        EduClassifierForSequenceClassification,
    )

    AutoConfig.register(EduClassifierConfig.model_type, EduClassifierConfig, exist_ok=True)
    AutoModelForSequenceClassification.register(EduClassifierConfig, EduClassifierForSequenceClassification,
                                                exist_ok=True)


def check_long_docs(long_docs: str) -> str:
    if long_docs not in LONG_DOC_MODES:
        raise ValueError(f"long_docs must be one of {', '.join(LONG_DOC_MODES)}, got {long_docs!r}")
    return long_docs


def check_dtype(dtype: torch.dtype | str | None) -> str | None:
    """The dtype's name (None stays None: the device's default), or a ValueError naming the choices."""
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    if dtype not in (None, *DTYPES):
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return dtype


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Dynamic int8 quantization (per-channel weights) of every linear layer except the regression head.

    torch.ao's dynamic quantization is deprecated upstream (torchao succeeds it) but works on the pinned torch; its
    deprecation warning is silenced here so it does not repeat in every pipeline task's log.
    """
    import warnings

    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    head_names = ("classifier", "score")
    spec = {
        name: per_channel_dynamic_qconfig
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.split(".")[0] not in head_names
    }
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantize_per_(tensor|channel).*deprecated", category=UserWarning)
        return quantize_dynamic(model, spec, dtype=torch.qint8)


def model_folder_or_none(model: str | os.PathLike) -> Path | None:
    """`resolve_model_dir`, or None where it cannot: the checks before any work leave that to loading, which says
    why."""
    try:
        return resolve_model_dir(model)
    except ValueError:
        return None


def refuse_transformer_options(model: str | os.PathLike, **given) -> None:
    """The scoring options a fastText model has no use for (see `load_scorer`), given for one: refused by name
    rather than ignored (`--dtype int8` would read as a quantised run)."""
    named = [f"--{k.replace('_', '-')}" for k, v in given.items() if v is not None]
    if not named:
        return
    folder = model_folder_or_none(model)
    if folder is not None and (folder / FASTTEXT_CONFIG).exists():
        raise InputError(f"{', '.join(named)} {'is an option' if len(named) == 1 else 'are options'} of transformer "
                         f"classifiers; {model} is a fastText model, which reads the first max_chars characters of a "
                         f"document (its {FASTTEXT_CONFIG}) on a CPU: leave {'it' if len(named) == 1 else 'them'} out")


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "tokenizer.model",
                   "sentencepiece.bpe.model")  # a vocabulary, in one of the formats transformers' tokenizers read
def check_classifier_folder(folder: str | os.PathLike, what: str = "--model") -> None:
    """A local --model folder holds a classifier, before any work: an encoder or base model (a config.json with two
    labels), a folder without weights or a tokenizer (a save a full disk cut short), or a fastText model.bin that is
    not one, failed every scoring task after the whole MinHash dedup, and the rerun with the right folder was refused
    as a changed classifier."""
    from edu_filter.classifiers.fasttext_model import MODEL_FILE, model_file_whole

    folder = Path(folder)
    if (folder / FASTTEXT_CONFIG).is_file():
        model = folder / MODEL_FILE
        with contextlib.suppress(OSError):
            if model_file_whole(model):
                return
        raise InputError(f"{what} {folder}: {model} is missing, not a fastText model, or cut short")
    if not (folder / "config.json").is_file():
        raise InputError(f"{what} {folder}: not a model folder (no config.json or {FASTTEXT_CONFIG})")
    from transformers import AutoConfig

    _register_edu_classifier()
    try:
        labels = AutoConfig.from_pretrained(folder, trust_remote_code=False).num_labels
    except Exception as e:  # noqa: BLE001 - an unknown model type, a broken file: one line
        raise InputError(f"{what} {folder}: cannot read its config.json ({type(e).__name__}: {e})") from None
    if labels != 1:
        raise InputError(f"{what} {folder}: a model with {labels} outputs, not a classifier's one regression logit "
                         "(an encoder or a base model? give the folder `edu-filter train` wrote)")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise InputError(f"{what} {folder}: no weights ({', '.join(WEIGHT_FILES[:2])}): a copy or a save cut short?")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):  # transformers then builds one with no words
        raise InputError(f"{what} {folder}: no tokenizer ({', '.join(TOKENIZER_FILES[:2])}): a copy or a save cut "
                         "short?")
    try:
        load_classifier_tokenizer(folder)
    except Exception as e:  # noqa: BLE001 - no tokenizer files, broken ones: one line
        raise InputError(f"{what} {folder}: cannot load its tokenizer ({type(e).__name__}: {one_line(str(e))})") \
            from None


def readable_tokens(config: dict, tokenizer) -> int:
    """The most tokens a classifier reads per sequence (its config.json, its tokenizer): its positions, less the two
    of RoBERTa-family encoders offset by the padding index (514 for 512 tokens, which their tokenizers say); a
    tokenizer's smaller advice (MiniLM's says 128 of 512) is not a limit."""
    encoder = config.get("encoder_config") or config
    positions = encoder.get("max_position_embeddings")
    if positions and encoder.get("model_type") in OFFSET_POSITIONS:  # whatever its tokenizer says (trained at 256
        pad = encoder.get("pad_token_id")                          # tokens, it says 256, and 514 was let through)
        return positions - (1 if pad is None else pad) - 1
    limit = positions or tokenizer.model_max_length
    if positions and tokenizer.model_max_length < positions <= tokenizer.model_max_length + 2:
        limit = tokenizer.model_max_length
    return limit


# encoders whose position ids start after the padding index (514 positions read 512 tokens)
OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert", "longformer", "data2vec-text", "xmod",
                    "roberta-prelayernorm", "mpnet", "ibert")


def check_max_length(model: str | os.PathLike, max_length: int | None) -> None:
    """`--max-length` against what a transformer classifier (a folder, or a hub id through the hub cache) reads,
    before any work: more tokens than its positions failed every scoring task with a tensor-size error, fewer than
    its special tokens with another."""
    folder = model_folder_or_none(model) if max_length is not None else None
    if folder is None or (folder / FASTTEXT_CONFIG).exists():
        return
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").exists() else {}
    try:
        tokenizer = load_classifier_tokenizer(folder)
    except Exception as e:  # noqa: BLE001 - loading it says why, with the model
        raise InputError(f"{model}: cannot load its tokenizer ({type(e).__name__}: {e})") from None
    limit = readable_tokens(config, tokenizer)
    ours = config.get("model_type") == "edu_classifier"
    special = SequenceFramer(prepare_tokenizer(tokenizer), by_hand=ours).num_special
    if not special < max_length <= limit:
        raise InputError(f"--max-length {max_length}: {model} reads {special + 1} to {limit} tokens per sequence "
                         f"({special} of them special)")


def load_scorer(
    path_or_hub_id: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    max_length: int | None = None,
    batch_size: int | None = None,
) -> EduScorer | FastTextScorer:
    """The scorer of a saved classifier (a folder or a hub id): `FastTextScorer` for a fastText folder, else
    `EduScorer`. fastText runs on CPU and reads characters, not tokens: it has no use for `device`, `dtype`,
    `max_length` or `batch_size`, and ignores them, so one set of scoring options serves any model."""
    dtype = check_dtype(dtype)
    folder = resolve_model_dir(path_or_hub_id)
    if (folder / FASTTEXT_CONFIG).exists():
        scorer = FastTextScorer.from_pretrained(folder)
    else:
        scorer = EduScorer.from_pretrained(folder, device=device, dtype=dtype, max_length=max_length,
                                           batch_size=batch_size)
    scorer.source = str(path_or_hub_id)
    return scorer


class Scorer:
    """What every scorer offers: raw scores of texts, and the model's calibrated 0-5 integer scores.

    Scoring has a CPU half, `prepare` (tokenizing), and a model half, `score_prepared`: a GPU pipeline prepares the
    next window of texts while the model scores this one (`prepare_in_background`).
    """

    cut_points: list[float]
    kind: str | None  # web or code as the model was trained; None when the folder does not say
    source: str  # the folder or hub id it was loaded from
    prepare_in_background = False  # True when the model runs on another device than the CPU that prepares

    def predict(
        self, texts: Sequence[str], long_docs: str | None = None, show_progress: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Raw scores (np.float32) in input order, and which documents were longer than what the model reads."""
        return self.score_prepared(self.prepare(texts, long_docs), show_progress)

    def predict_many(self, texts: Sequence[str], long_docs: str | None = None, show_progress: bool = False,
                     window: int = 16_384) -> tuple[np.ndarray, np.ndarray]:
        """`predict` of any number of texts, `window` at a time: their tokens as Python lists took ~43 bytes each
        (11 GB at peak for 450k documents of 512), all made before anything was scored; on a GPU the next window is
        prepared while this one is scored. One bar over all of them."""
        from concurrent.futures import ThreadPoolExecutor

        starts = range(0, len(texts), window)
        if len(starts) <= 1:
            return self.predict(texts, long_docs, show_progress)
        values, truncated = [], []
        background = ThreadPoolExecutor(1) if self.prepare_in_background else None
        with progress_bar(show_progress) as progress, background or contextlib.nullcontext():
            task = progress.add_task("scoring", total=len(texts))
            coming = None
            for k, start in enumerate(starts):
                if coming is not None:
                    prepared = coming.result()
                else:
                    prepared = self.prepare(texts[start:start + window], long_docs)
                following = start + window
                coming = (background.submit(self.prepare, texts[following:following + window], long_docs)
                          if background is not None and k + 1 < len(starts) else None)
                raw, cut = self.score_prepared(prepared)
                values.append(raw)
                truncated.append(cut)
                progress.advance(task, min(window, len(texts) - start))
        return np.concatenate(values), np.concatenate(truncated)

    def prepare(self, texts: Sequence[str], long_docs: str | None = None):
        """The texts made ready for the model (the CPU half of `predict`)."""
        raise NotImplementedError

    def score_prepared(self, prepared, show_progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """`predict`'s result for what `prepare` returned."""
        raise NotImplementedError

    calibrated = True  # False: a model saved without cut points (a stock classifier), rounded as FineWeb-Edu did

    def to_int_score(self, scores) -> np.ndarray:
        """Calibrated integer scores 0-5 (np.int64): the cut points saved with the model, else FineWeb-Edu's
        round-and-clip (a half to the even integer, as its run did)."""
        return apply_cut_points(scores, self.cut_points) if self.calibrated else round_and_clip(scores)


class FastTextScorer(Scorer):
    """A fastText model (`train --method fasttext`): the expected label under its label probabilities, on CPU."""

    def __init__(self, model, source: str = ""):
        self.model = model  # FastTextRegressor
        self.cut_points = list(model.cut_points) if model.cut_points is not None else list(ROUND_CUTS)
        self.calibrated = model.cut_points is not None
        self.kind = model.config.kind
        self.max_chars = model.config.settings.max_chars
        self.source = source

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike) -> FastTextScorer:
        from edu_filter.classifiers.fasttext_model import FastTextRegressor

        folder = resolve_model_dir(path_or_hub_id)
        if not (folder / FASTTEXT_CONFIG).exists():
            raise ValueError(f"{folder}: not a fastText model folder (no {FASTTEXT_CONFIG})")
        return cls(FastTextRegressor.from_pretrained(folder), source=str(path_or_hub_id))

    def prepare(self, texts: Sequence[str], long_docs: str | None = None) -> list[str]:
        """fastText reads characters: nothing to prepare. `long_docs` is checked but changes nothing: fastText reads
        the start of each document."""
        if long_docs is not None:
            check_long_docs(long_docs)
        return list(texts)

    def score_prepared(self, prepared: list[str], show_progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Raw scores (np.float32) in input order, and which documents were longer than the `max_chars` characters
        fastText reads."""
        truncated = np.array([len(t) > self.max_chars for t in prepared], dtype=bool)
        return self.model.predict(prepared).astype(np.float32), truncated


class EduScorer(Scorer):
    """A transformers regression model (ours or the stock FineWeb-Edu layout), scored in length-sorted batches."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_length: int = 512,
        cut_points: Sequence[float] | None = None,
        long_docs: str = "truncate",
        max_chunks: int = 16,
        batch_size: int | None = None,
        device: str | torch.device | None = None,
        kind: str | None = None,
        source: str = "",
    ):
        self.model = model
        self.tokenizer = prepare_tokenizer(tokenizer)
        self.pad_id = self.tokenizer.pad_token_id  # read once: scoring never touches the tokenizer a thread may use
        ours = getattr(model.config, "model_type", None) == "edu_classifier"
        if not ours:
            # a ready-made decoder classifier (Llama, Qwen) finds each sequence's last token by its config's pad id:
            # with none, a padded batch raised; with another than the one padded with, it read a pad's position
            # (scores depending on the batch). RoBERTa counts positions from it too.
            if model.config.pad_token_id is None:
                model.config.pad_token_id = self.pad_id
            else:
                self.pad_id = model.config.pad_token_id
        # a ready-made classifier reads what its tokenizer frames (a starencoder-based one is fine-tuned unframed)
        self.framer = SequenceFramer(self.tokenizer, by_hand=ours)
        self.max_length = int(max_length)
        self.cut_points = list(cut_points) if cut_points is not None else list(ROUND_CUTS)
        self.calibrated = cut_points is not None
        self.long_docs = check_long_docs(long_docs)
        self.max_chunks = int(max_chunks)
        self.kind = kind
        self.source = source
        self.device = torch.device(device if device is not None else default_device())
        self.batch_size = int(batch_size or default_batch_size(self.device, self.max_length))
        if self.framer.num_special >= self.max_length:
            raise ValueError(f"max_length {self.max_length} leaves no room for content tokens")
        self.model.to(self.device).eval()
        self.prepare_in_background = self.device.type != "cpu"

    # --- loading ------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | os.PathLike,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        max_length: int | None = None,
        batch_size: int | None = None,
    ) -> EduScorer:
        """The transformers loader behind `load_scorer` (which also reads fastText folders)."""
        folder = resolve_model_dir(path_or_hub_id)
        device = torch.device(device if device is not None else default_device())
        if (folder / FASTTEXT_CONFIG).exists():
            raise ValueError(f"{folder} holds a fastText model: load it with load_scorer")
        config_file = folder / "config.json"
        if not config_file.exists():
            raise ValueError(f"{folder}: not a model folder (no config.json or {FASTTEXT_CONFIG})")
        config = json.loads(config_file.read_text())
        dtype = check_dtype(dtype)
        if dtype == "int8" and device.type != "cpu":
            raise ValueError("dtype int8 (dynamic quantization) runs on CPU only; use bfloat16 on GPU")
        int8 = dtype == "int8"
        if dtype is None or int8:
            from edu_filter.classifiers.device import native_bf16

            dtype = "bfloat16" if native_bf16(device) else "float32"
        dtype = getattr(torch, dtype)
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        ours = config.get("model_type") == "edu_classifier"
        if ours:
            from edu_filter.classifiers.modeling_edu_classifier import EduClassifierForSequenceClassification

            model = EduClassifierForSequenceClassification.from_pretrained(folder, dtype=dtype)
            tokenizer = load_classifier_tokenizer(folder)
            saved_length = config.get("max_seq_length", 512)
        else:
            try:
                model = AutoModelForSequenceClassification.from_pretrained(
                    folder, dtype=dtype, attn_implementation="sdpa", trust_remote_code=False
                )
            except ValueError:  # an architecture without SDPA support
                model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=dtype, trust_remote_code=False)
            tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
            # what its positions read (a RoBERTa-family 514 reads 512: with a tokenizer that names no length, 514
            # was taken, and every long document failed its task)
            saved_length = min(config.get("max_position_embeddings", 512), tokenizer.model_max_length,
                               readable_tokens(config, tokenizer))
        if model.config.num_labels != 1:
            raise ValueError(f"{folder}: expected a regression model with one logit, got {model.config.num_labels}")
        if max_length is not None and max_length > (limit := readable_tokens(config, tokenizer)):
            raise ValueError(f"max_length {max_length}: {path_or_hub_id} reads at most {limit} tokens per sequence")
        if int8:
            model = quantize_int8(model.eval())
        return cls(
            model,
            tokenizer,
            max_length=max_length or saved_length,
            cut_points=config.get("cut_points") if ours else None,
            long_docs=config.get("long_docs", "truncate") if ours else "truncate",
            max_chunks=config.get("max_chunks", 16) if ours else 16,
            batch_size=batch_size,
            device=device,
            kind=config.get("kind") if ours else None,
            source=str(path_or_hub_id),
        )

    # --- scoring ------------------------------------------------------------------------------------------------
    def prepare(self, texts: Sequence[str], long_docs: str | None = None) -> PreparedTexts:
        """Tokenized, framed sequences of `texts` (the CPU half of scoring; releases the GIL while tokenizing).

        `long_docs`: `truncate` scores the first max_length tokens; `chunk-max` / `chunk-mean` score every
        max_length-token chunk (up to the model's max_chunks) and take the max / token-weighted mean. Default: the
        strategy the model was trained with.
        """
        mode = check_long_docs(long_docs or self.long_docs)
        sequences, owner, weight, truncated = self._sequences(list(texts), 1 if mode == "truncate" else self.max_chunks)
        return PreparedTexts(mode, sequences, owner, weight, truncated)

    def score_prepared(self, prepared: PreparedTexts, show_progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Raw scores (np.float32) in input order, and which documents were longer than max_length tokens."""
        model = self.model

        def score(input_ids, attention_mask):
            return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :1]

        values = self._aggregate(prepared, score, show_progress)
        return values[:, 0].astype(np.float32), prepared.truncated

    def embed(
        self, texts: Sequence[str], long_docs: str | None = None, show_progress: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Pooled encoder vectors (n, hidden) the regression head reads; chunk modes average over chunks."""
        return self.embed_prepared(self.prepare_embedding(texts, long_docs), show_progress)

    def prepare_embedding(self, texts: Sequence[str], long_docs: str | None = None) -> PreparedTexts:
        """`embed`'s CPU half (tokenizing), which a GPU pipeline runs for the next texts while embedding these."""
        mode = long_docs or self.long_docs
        return self.prepare(texts, "chunk-mean" if mode == "chunk-max" else mode)

    def embed_prepared(self, prepared: PreparedTexts, show_progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """`embed`'s result for what `prepare_embedding` returned."""
        model = self.model

        def vectors(input_ids, attention_mask):
            return model.embed(input_ids, attention_mask)

        return self._aggregate(prepared, vectors, show_progress), prepared.truncated

    def token_sequences(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's first max_length tokens, special tokens included: what `predict(long_docs="truncate")` reads,
        and what fine-tuning trains on."""
        return self._sequences(list(texts), chunks_per_doc=1)[0]

    # --- internals ----------------------------------------------------------------------------------------------
    def _content_ids(self, texts: list[str], wanted_tokens: int) -> tuple[list[list[int]], list[bool]]:
        """Content token ids (no special tokens) of each text, complete at least up to `wanted_tokens` + 16, and
        which sparse texts were read only to SPARSE_SCAN_CHARS (their ids are those of that start)."""
        def encode(batch: list[str]) -> list[list[int]]:
            return self.tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]

        char_limit = wanted_tokens * CHARS_PER_TOKEN_BOUND + 100
        out: list[list[int]] = []
        for start in range(0, len(texts), 256):
            batch = texts[start : start + 256]
            out += encode([text_prefix(t, char_limit) for t in batch])
        # a prefix that did not end its text and gave wanted + 16 tokens or fewer may have cut some of the first
        # wanted tokens
        enough = wanted_tokens + 16
        cut_short = [False] * len(texts)
        for i, text in enumerate(texts):
            if len(text) > char_limit and len(out[i]) <= enough:
                out[i], cut_short[i] = _sparse_ids(text, enough, char_limit, encode)
        return out, cut_short

    def _sequences(self, texts: list[str], chunks_per_doc: int):
        """Framed sequences of up to `chunks_per_doc` consecutive chunks per text, with each sequence's document and
        content-token count, and which texts were longer than those chunks (the model read only their start)."""
        content_len = self.max_length - self.framer.num_special
        token_ids, cut_short = self._content_ids(texts, content_len * chunks_per_doc)  # exact past it: +16 tokens
        truncated = np.array([len(ids) > content_len * chunks_per_doc or short
                              for ids, short in zip(token_ids, cut_short)], dtype=bool)
        sequences, owner, weight = [], [], []
        for doc, ids in enumerate(token_ids):
            starts = range(0, max(len(ids), 1), content_len)
            for k in list(starts)[:chunks_per_doc]:
                chunk = ids[k : k + content_len]
                sequences.append(self.framer(chunk))
                owner.append(doc)
                weight.append(max(len(chunk), 1))
        return sequences, owner, weight, truncated

    def _aggregate(self, prepared: PreparedTexts, fn: Callable, show_progress: bool) -> np.ndarray:
        """`fn` over every prepared sequence, then one row per text: its chunks' max or token-weighted mean."""
        n = len(prepared.truncated)
        if not n:
            return np.zeros((0, 1))
        chunk_values = self._forward_sorted(prepared.sequences, fn, show_progress)
        owner_arr, weight_arr = np.asarray(prepared.owner), np.asarray(prepared.weight, dtype=np.float64)
        dim = chunk_values.shape[1]
        if prepared.long_docs == "chunk-max":
            result = np.full((n, dim), -np.inf)
            np.maximum.at(result, owner_arr, chunk_values)
        else:  # truncate has one chunk per document, so the weighted mean is that chunk
            sums = np.zeros((n, dim))
            np.add.at(sums, owner_arr, chunk_values * weight_arr[:, None])
            result = sums / np.bincount(owner_arr, weights=weight_arr, minlength=n)[:, None]
        return result

    def _forward_sorted(self, sequences: list[list[int]], fn: Callable, show_progress: bool) -> np.ndarray:
        """Run `fn` over sequences in length-sorted batches padded to each batch's longest; input order restored.

        On a GPU nothing waits for a batch's result before the next is sent: inputs go through pinned memory without
        blocking and the outputs come back in one copy at the end, so the GPU never idles while the CPU pads. A batch
        without padding gets no attention mask, which lets SDPA pick its fastest (flash) kernel.

        A batch the device has no memory for is scored again in halves, and this scorer keeps the smaller batch size
        from then on (`batch_size` is resume-neutral): the default, sized on an 80-141 GB GPU, also runs on a small one.
        """
        if not sequences:
            return np.zeros((0, 1))
        order = np.argsort([-len(s) for s in sequences], kind="stable")
        outputs: list[torch.Tensor] = []
        progress = progress_bar(show_progress)
        with progress, torch.inference_mode():
            task = progress.add_task("scoring", total=len(sequences))
            start = 0
            while start < len(order):
                batch = order[start : start + self.batch_size]
                try:
                    batch_values = self._forward_batch([sequences[i] for i in batch], fn)
                except torch.OutOfMemoryError:
                    if len(batch) == 1:
                        raise
                    batch_values = None
                if batch_values is None:  # outside the handler: the failed batch's tensors are freed by now
                    self._halve_batch_size(len(batch))
                    continue
                outputs.append(batch_values)
                start += len(batch)
                progress.advance(task, len(batch))
        values = torch.cat(outputs).cpu().numpy().astype(np.float64)
        result = np.empty_like(values)
        result[order] = values
        return result

    def _forward_batch(self, rows: list[list[int]], fn: Callable) -> torch.Tensor:
        """`fn` over one batch of sequences sorted longest first, padded to the first."""
        on_gpu = self.device.type == "cuda"
        input_ids, attention_mask = pad_batch(rows, self.pad_id)
        if on_gpu:
            input_ids, attention_mask = input_ids.pin_memory(), attention_mask.pin_memory()
        input_ids = input_ids.to(self.device, non_blocking=on_gpu)
        unpadded = len(rows[0]) == len(rows[-1])
        attention_mask = None if unpadded else attention_mask.to(self.device, non_blocking=on_gpu)
        return fn(input_ids, attention_mask).float()

    def _halve_batch_size(self, failed: int) -> None:
        self.batch_size = max(1, failed // 2)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"warning: a batch of {failed} documents did not fit in {self.device} memory; scoring in batches of "
              f"{self.batch_size} from now on (--batch-size sets it)", file=sys.stderr, flush=True)


@dataclass
class PreparedTexts:
    """Texts tokenized and framed for a transformers scorer: `EduScorer.prepare`'s result, `score_prepared`'s input.
    `owner[k]` is the text sequence k comes from, `weight[k]` its content tokens (chunk-mean weights); `truncated`
    has one entry per text."""

    long_docs: str
    sequences: list[list[int]]
    owner: list[int]
    weight: list[int]
    truncated: np.ndarray


