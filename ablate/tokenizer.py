"""The ablation tokenizer: a byte-level BPE trained with `tokenizers` on a sample mixing every input dataset.

Training it once per ablation and saving it next to the runs keeps every run on the same vocabulary, so their losses
are comparable. It is saved as a standard `transformers` tokenizer folder (`AutoTokenizer.from_pretrained(path)`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

EOS_TOKEN = "<|endoftext|>"


def mixed_sample(sources: list[Iterable[str]], max_chars: int) -> Iterator[str]:
    """Round-robin documents from each source, each source contributing at most max_chars / len(sources) chars."""
    share = max_chars // max(1, len(sources))
    iterators = [iter(s) for s in sources]
    used = [0] * len(iterators)
    active = list(range(len(iterators)))
    while active:
        for i in list(active):
            text = next(iterators[i], None)
            if text is None or used[i] >= share:
                active.remove(i)
                continue
            text = text[: share - used[i]]
            used[i] += len(text)
            yield text


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path | None = None):
    """Train a byte-level BPE (GPT-2 style pre-tokenization, every byte in the base alphabet, EOS as id 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, unk_token=EOS_TOKEN, pad_token=EOS_TOKEN
    )
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def load_tokenizer(name_or_path: str | Path):
    """A saved tokenizer folder or hub name; it must define an EOS token (the document separator)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), trust_remote_code=False)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{name_or_path}: tokenizer has no EOS token; documents need a separator")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer

