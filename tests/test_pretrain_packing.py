"""Token packing and the learning-rate schedule of the pretraining loop."""

import json
import math
import re
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from edu_filter.documents import DocumentError, InputError, write_documents
from edu_filter.ablate.ablation import _prepare_tokens
from edu_filter.ablate.packing import (
    PACKED,
    PACKING,
    PackedTokens,
    documents_shared,
    hashes_path,
    is_held_out,
    iter_texts,
    read_packed,
    write_tokens,
    write_train_val,
)
from edu_filter.ablate.pretrain import PretrainConfig, learning_rate, parse_overrides
from edu_filter.ablate.tokenizer import mixed_sample, train_tokenizer

TEXT = defaultdict(lambda: "text")  # the text field of every set (`_prepare_tokens` takes one per set name)

REPO = Path(__file__).resolve().parents[1]
WEB = REPO / "data/web/fineweb_edu_llama3_train.jsonl"
CODE = REPO / "data/code/thealgorithms_unlabelled.jsonl"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(mixed_sample([iter_texts(str(WEB)), iter_texts(str(CODE))], 300_000), 512, path)
    return path


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from edu_filter.ablate.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)


def split_on_eos(stream: np.ndarray, eos: int) -> list[list[int]]:
    docs, current = [], []
    for t in stream.tolist():
        if t == eos:
            docs.append(current)
            current = []
        else:
            current.append(t)
    assert current == [], "the stream must end with EOS"
    return docs


def test_tokenizer_is_a_saved_byte_level_bpe_with_eos(tokenizer, tokenizer_dir):
    from transformers import AutoTokenizer

    assert len(tokenizer) == 512 and tokenizer.eos_token_id == 0
    assert AutoTokenizer.from_pretrained(str(tokenizer_dir)).eos_token == "<|endoftext|>"
    code = "def f(x):\n    return x ** 2  # squares ✓\n"
    assert tokenizer.decode(tokenizer(code).input_ids) == code  # byte-level: lossless, even for rare characters
    half = list(mixed_sample([iter(["a" * 10] * 5), iter(["b" * 10] * 5)], 40))
    assert half == ["a" * 10, "b" * 10, "a" * 10, "b" * 10]  # round-robin, each source held to its share


def test_documents_are_separated_by_eos_and_val_is_held_out(tokenizer, tmp_path):
    texts = [t for t, _ in zip(iter_texts(str(WEB)), range(60))]
    train, val = write_train_val(texts, tokenizer, tmp_path, train_tokens=10**9, val_fraction=0.1)
    assert train.complete and val.complete
    held_out = [t for t in texts if is_held_out(t, 0.1)]
    assert (train.documents, val.documents) == (60 - len(held_out), len(held_out)) and 2 <= len(held_out) <= 12
    eos = tokenizer.eos_token_id
    train_docs = split_on_eos(np.fromfile(tmp_path / "train.bin", dtype=np.uint16), eos)
    val_docs = split_on_eos(np.fromfile(tmp_path / "val.bin", dtype=np.uint16), eos)
    decoded_train = [tokenizer.decode(d) for d in train_docs]
    decoded_val = [tokenizer.decode(d) for d in val_docs]
    assert decoded_val == held_out
    assert decoded_train == [t for t in texts if t not in held_out]
    assert not set(decoded_val) & set(decoded_train)
    assert train.tokens + val.tokens == sum(len(tokenizer(t).input_ids) + 1 for t in texts)


def test_a_documents_own_separator_text_is_text_not_a_document_boundary(tokenizer, tmp_path):
    """Tokenizer code and ML tutorials write "<|endoftext|>": encoded as the EOS token, it cut the document in two
    for the model (one such file in the bundled Python labels)."""
    texts = ['SPECIAL_TOKENS = ["<|pad|>", "<|endoftext|>"]\n', "plain text"] * 20
    write_train_val(texts, tokenizer, tmp_path, train_tokens=10**9, val_fraction=0.01)
    docs = split_on_eos(np.fromfile(tmp_path / "train.bin", dtype=np.uint16), tokenizer.eos_token_id)
    assert [tokenizer.decode(d) for d in docs] == [t for t in texts if not is_held_out(t, 0.01)]


def test_the_documents_an_evaluation_set_shares_with_training_are_counted_from_the_packed_files(tokenizer, tmp_path):
    """An --eval set drawn from the corpus an arm trains on favours that arm; the packings keep a hash per document, so
    what they share is counted without reading either input again, exact duplicates included. Token files of an older
    edu-filter, with no hashes, are not checked (None), not taken as sharing nothing."""
    texts = [t for t, _ in zip(iter_texts(str(WEB)), range(120))]
    write_train_val(texts, tokenizer, tmp_path / "data", train_tokens=10**9, val_fraction=0.1)
    trained = [t for t in texts if not is_held_out(t, 0.1)]
    held_out = next(t for t in texts if is_held_out(t, 0.1))
    reference = [trained[3], "A text no dataset holds.", trained[50], held_out, trained[3], "Another new one."]
    info = write_tokens(reference, tokenizer, tmp_path / "eval.bin", max_tokens=10**9)
    assert info.documents == 6
    write_tokens(["A text no dataset holds.", trained[7]], tokenizer, tmp_path / "other.bin", max_tokens=10**9)
    sets = {"reference": tmp_path / "eval.bin", "other": tmp_path / "other.bin"}
    assert documents_shared(tmp_path / "data/train.bin", sets) == {"reference": 3, "other": 1}
    assert documents_shared(tmp_path / "data/train.bin", sets, chunk=7) == {"reference": 3, "other": 1}  # in chunks
    assert documents_shared(tmp_path / "data/val.bin", sets) == {"reference": 1, "other": 0}
    hashes_path(tmp_path / "other.bin").unlink()
    assert documents_shared(tmp_path / "data/train.bin", sets) == {"reference": 3, "other": None}
    hashes_path(tmp_path / "data/train.bin").unlink()
    assert documents_shared(tmp_path / "data/train.bin", sets) == {"reference": None, "other": None}


def test_a_document_held_out_in_one_dataset_is_held_out_in_every_other(tokenizer, tmp_path):
    """A filtered subset and its baseline are packed separately; neither may train on the other's validation text,
    also once a small validation budget fills at different points in the two."""
    texts = [t for t, _ in zip(iter_texts(str(WEB)), range(300))]
    subsets = {"all": texts, "edu": texts[1::3]}
    docs = {}
    for name, subset in subsets.items():
        write_train_val(subset, tokenizer, tmp_path / name, train_tokens=10**9, val_fraction=0.1, max_val_tokens=3000)
        for part in ("train", "val"):
            stream = np.fromfile(tmp_path / name / f"{part}.bin", dtype=np.uint16)
            docs[name, part] = {tokenizer.decode(d) for d in split_on_eos(stream, tokenizer.eos_token_id)}
    assert docs["all", "val"] and docs["edu", "val"] and docs["all", "val"] != docs["edu", "val"]
    assert not docs["all", "val"] & docs["edu", "train"]
    assert not docs["edu", "val"] & docs["all", "train"]


def test_finished_token_files_are_reused_only_for_the_same_texts_tokenizer_and_budget(tokenizer, tmp_path):
    """Another file under the same --data name, or a bigger --tokens: the old token files were reused, and the report
    named data the models never saw. Packed again while no run has trained on them; refused once one has."""
    import shutil

    cfg = PretrainConfig.from_preset("tiny", {"max_position_embeddings": 64, "eval_tokens": 256}, tokens=20_000)
    texts = [json.loads(line) for line in WEB.read_text().splitlines()]
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"text": r["text"].upper()}) + "\n" for r in texts[:400]))
    reference = tmp_path / "ref.jsonl"
    shutil.copy(WEB, reference)
    out = tmp_path / "ablation"
    _prepare_tokens(out, tokenizer, {"web": str(WEB)}, {"ref": str(reference)}, cfg, TEXT, 0.1)
    first = (out / "tokens/web/train.bin").read_bytes()
    _prepare_tokens(out, tokenizer, {"web": str(WEB)}, {"ref": str(reference)}, cfg, TEXT, 0.1)
    assert (out / "tokens/web/train.bin").read_bytes() == first  # the same: reused
    _prepare_tokens(out, tokenizer, {"web": str(other)}, {"ref": str(reference)}, cfg, TEXT, 0.1)
    assert (out / "tokens/web/train.bin").read_bytes() != first  # other texts, nothing trained yet: packed again
    (out / "runs").mkdir()
    with pytest.raises(InputError, match="--data web: .* asks in the input's content or text field, and its runs"):
        _prepare_tokens(out, tokenizer, {"web": str(WEB)}, {"ref": str(reference)}, cfg, TEXT, 0.1)
    bigger = PretrainConfig.from_preset("tiny", {"max_position_embeddings": 64, "eval_tokens": 256}, tokens=40_000)
    with pytest.raises(InputError, match=r"asks in --tokens \(or the context length"):
        _prepare_tokens(out, tokenizer, {"web": str(other)}, {"ref": str(reference)}, bigger, TEXT, 0.1)
    # a longer context changes every budget (tokens + a window) with --tokens untouched: it is named as a cause
    longer = PretrainConfig.from_preset("tiny", {"max_position_embeddings": 128, "eval_tokens": 256}, tokens=20_000)
    with pytest.raises(InputError, match=r"asks in --tokens \(or the context length: seq_len, --preset\)"):
        _prepare_tokens(out, tokenizer, {"web": str(other)}, {"ref": str(reference)}, longer, TEXT, 0.1)
    reference.write_text(other.read_text())
    with pytest.raises(InputError, match="--eval ref: .* asks in the input's content"):
        _prepare_tokens(out, tokenizer, {"web": str(other)}, {"ref": str(reference)}, cfg, TEXT, 0.1)


def test_a_note_beside_a_data_folder_leaves_its_token_files_in_use(tokenizer, tmp_path):
    """A folder input's fingerprint took every file in it: a notes.txt or a model trained into the folder after the
    runs meant 'other texts' and the ablation was refused. Only the data files count now, and token files recorded
    with the older fingerprint of all files are still taken while it matches."""
    import shutil

    from edu_filter.ablate.ablation import _adopt_older_checkpoint, packing_source

    cfg = PretrainConfig.from_preset("tiny", {"max_position_embeddings": 64, "eval_tokens": 256}, tokens=20_000)
    data, ref = tmp_path / "data", tmp_path / "ref"
    data.mkdir(), ref.mkdir()
    shutil.copy(WEB, data / "part-0.jsonl")
    shutil.copy(WEB, ref / "part-0.jsonl")
    out = tmp_path / "ablation"
    _prepare_tokens(out, tokenizer, {"web": str(data)}, {"ref": str(ref)}, cfg, TEXT, 0.1)
    (out / "runs").mkdir()
    for folder in (data, ref):
        (folder / "notes.txt").write_text("labelled by hand in March\n")
    _prepare_tokens(out, tokenizer, {"web": str(data)}, {"ref": str(ref)}, cfg, TEXT, 0.1)  # not refused
    legacy = packing_source(str(data), "text", documents=False)
    assert legacy != packing_source(str(data), "text")
    record = out / "tokens/web" / PACKED
    settings = json.loads(record.read_text())
    assert settings["settings"]["source"] == packing_source(str(data), "text"), settings
    settings["settings"]["source"] = legacy  # as an older edu-filter recorded it
    record.write_text(json.dumps(settings))
    _prepare_tokens(out, tokenizer, {"web": str(data)}, {"ref": str(ref)}, cfg, TEXT, 0.1)
    unfinished = tmp_path / "unfinished"  # a packing checkpointed by an older edu-filter goes on from there
    unfinished.mkdir()
    (unfinished / PACKING).write_text(json.dumps({"settings": {"source": legacy, "train_tokens": 5}}))
    _adopt_older_checkpoint(unfinished, str(data), "text", packing_source(str(data), "text"), tokenizer)
    assert json.loads((unfinished / PACKING).read_text())["settings"] == {
        "source": packing_source(str(data), "text"), "train_tokens": 5}
    (data / "part-0.jsonl").write_text((data / "part-0.jsonl").read_text().upper())
    with pytest.raises(InputError, match="--data web: .* asks in the input's content"):
        _prepare_tokens(out, tokenizer, {"web": str(data)}, {"ref": str(ref)}, cfg, TEXT, 0.1)


def test_token_files_of_the_releases_that_keyed_split_special_text_are_taken_as_they_are(tokenizer, tmp_path):
    """A few releases put how a document's own special-token text is packed (as text, as now) in the tokenizer key;
    the key went back to what it was before them, and an ablation they began, its runs trained, was refused as made
    with another tokenizer: start over, or remove the trained runs."""
    from edu_filter.ablate.packing import tokenizer_key

    cfg = PretrainConfig.from_preset("tiny", {"max_position_embeddings": 64, "eval_tokens": 256}, tokens=20_000)
    reference = tmp_path / "ref.jsonl"
    shutil.copy(WEB, reference)
    out = tmp_path / "ablation"
    _prepare_tokens(out, tokenizer, {"web": str(WEB)}, {"ref": str(reference)}, cfg, TEXT, 0.1)
    first = (out / "tokens/web/train.bin").read_bytes()
    then = tokenizer_key(tokenizer, releases_of_split_text=True)
    assert then != tokenizer_key(tokenizer)
    record = out / "tokens/web" / PACKED  # as those releases recorded them
    packed = json.loads(record.read_text())
    record.write_text(json.dumps({**packed, "settings": {**packed["settings"], "tokenizer": then}}))
    sidecar = out / "tokens/eval/ref.source.json"
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "tokenizer": then}))
    (out / "runs").mkdir()
    _prepare_tokens(out, tokenizer, {"web": str(WEB)}, {"ref": str(reference)}, cfg, TEXT, 0.1)  # not refused
    assert (out / "tokens/web/train.bin").read_bytes() == first
    other = train_tokenizer(["another vocabulary, trained on other words " * 50], 300, tmp_path / "other")
    packed, other_then = json.loads(record.read_text()), tokenizer_key(other, releases_of_split_text=True)
    record.write_text(json.dumps({**packed, "settings": {**packed["settings"], "tokenizer": other_then}}))
    with pytest.raises(InputError, match="--data web: .* asks in the tokenizer, and its runs"):
        _prepare_tokens(out, tokenizer, {"web": str(WEB)}, {"ref": str(reference)}, cfg, TEXT, 0.1)


def test_only_finished_packing_is_reused(tokenizer, tmp_path):
    """packed.json is written last: without it the token files are from an interrupted packing, packed again, or
    from an older version whose slices could leak, refused once runs were trained on them."""
    cfg = PretrainConfig.from_preset("tiny", {"max_position_embeddings": 64, "eval_tokens": 256}, tokens=20_000)
    folder = tmp_path / "tokens/web"
    _prepare_tokens(tmp_path, tokenizer, {"web": str(WEB)}, {}, cfg, TEXT, 0.1)
    assert read_packed(folder)
    (folder / "packed.json").unlink()
    (folder / "val.json").unlink()  # killed between the two sidecars
    assert read_packed(folder) is None
    _prepare_tokens(tmp_path, tokenizer, {"web": str(WEB)}, {}, cfg, TEXT, 0.1)
    assert read_packed(folder) and (folder / "val.json").exists()
    (folder / "packed.json").unlink()  # as an older version left it
    (tmp_path / "runs").mkdir()
    with pytest.raises(InputError, match="packed by an older edu-filter"):
        _prepare_tokens(tmp_path, tokenizer, {"web": str(WEB)}, {}, cfg, TEXT, 0.1)


def test_a_packing_stops_at_sigterm_or_its_deadline_and_goes_on_to_the_same_files(tokenizer, tmp_path):
    """The time limit and SIGTERM stopped training only: a job whose limit came while it packed (hours at 10B
    tokens) was killed, its chain keyed on exit status 75 ended. A packing stops at either, checkpointed, and the
    next call goes on to the files of an unbroken one."""
    from edu_filter.ablate.packing import PackingStopped

    def pack(folder, **kwargs):
        infos = write_train_val(iter_texts(str(WEB)), tokenizer, folder, train_tokens=200_000, val_fraction=0.1,
                                max_val_tokens=20_000, source="web", **kwargs)
        return infos, [(folder / name).read_bytes() for name in ("train.bin", "val.bin")]

    clean = pack(tmp_path / "clean")
    calls = []
    with pytest.raises(PackingStopped, match="100 documents read"):  # SIGTERM: asked after each document
        pack(tmp_path / "stopped", stop=lambda: calls.append(1) or len(calls) >= 100)
    assert json.loads((tmp_path / "stopped" / "packing.json").read_text())["documents_read"] == 100
    with pytest.raises(PackingStopped):  # a deadline passed: at the next checkpoint, a checkpoint's worth packed
        pack(tmp_path / "stopped", deadline=time.time() - 1, checkpoint_seconds=0)
    assert json.loads((tmp_path / "stopped" / "packing.json").read_text())["documents_read"] == 101
    with pytest.raises(PackingStopped, match="reading past the 101 documents"):  # SIGTERM while reading past them
        pack(tmp_path / "stopped", stop=lambda: True)
    assert json.loads((tmp_path / "stopped" / "packing.json").read_text())["documents_read"] == 101
    assert pack(tmp_path / "stopped", deadline=time.time() + 3600) == clean
    assert not (tmp_path / "stopped" / "packing.json").exists()


def test_a_resumed_packing_opens_the_file_it_stopped_in_not_those_before(tokenizer, tmp_path, monkeypatch):
    """A resumed packing read every document packed before its checkpoint again (an hour for 10B tokens, in every
    job of a packing spanning many: each could end re-reading). It starts at the first file it had not finished,
    to the same files as an unbroken packing."""
    from edu_filter.ablate import packing
    from edu_filter.ablate.packing import PackingStopped

    rows = [json.loads(line) for line in WEB.read_text().splitlines()]
    data = tmp_path / "data"
    data.mkdir()
    for k in range(5):
        (data / f"part-{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[k::5]))

    def pack(folder, **kwargs):
        infos = write_train_val(iter_texts(str(data), spread=True), tokenizer, folder, train_tokens=10**9,
                                val_fraction=0.1, max_val_tokens=20_000, source="web", file_order="spread", **kwargs)
        return infos, [(folder / name).read_bytes() for name in ("train.bin", "val.bin", "train.hashes",
                                                                 "val.hashes")]

    clean = pack(tmp_path / "clean")
    calls = []
    with pytest.raises(PackingStopped):
        pack(tmp_path / "resumed", stop=lambda: calls.append(1) or len(calls) >= 500)
    checkpoint = json.loads((tmp_path / "resumed" / "packing.json").read_text())
    assert checkpoint["documents_read"] == 500 and checkpoint["files_read"] == [2, 400]  # 200 a file
    opened, rows_of = [], packing.iter_raw_rows
    monkeypatch.setattr(packing, "iter_raw_rows", lambda path: opened.append(Path(path).name) or rows_of(path))
    assert pack(tmp_path / "resumed") == clean
    order = [Path(p).name for p in packing.spread_files(sorted(str(p) for p in data.iterdir()))]
    assert opened == order[2:]  # the two files read whole before the checkpoint: not opened again


# Packs the bundled web documents slowly (5 ms each), with a checkpoint every 50 ms, until it is killed.
SLOW_PACKING = """
import sys, time
from edu_filter.ablate.packing import iter_texts, write_train_val
from edu_filter.ablate.tokenizer import load_tokenizer

def slowly(texts):
    for text in texts:
        time.sleep(0.005)
        yield text

write_train_val(slowly(iter_texts(sys.argv[2])), load_tokenizer(sys.argv[1]), sys.argv[3], train_tokens=10**9,
                val_fraction=0.1, max_val_tokens=20_000, source="web", checkpoint_seconds=0.05)
"""


@pytest.mark.slow
def test_a_packing_killed_part_way_resumes_to_the_files_of_an_unbroken_one(tokenizer, tokenizer_dir, tmp_path):
    """10B tokens take hours to pack: a kill (preemption, a node lost) costs the minute since the last checkpoint,
    and the resumed files are byte for byte those of an unbroken packing, the bytes written after the checkpoint
    cut off. Other settings or another input start over."""
    skipped = []

    def pack(folder, source="web"):
        seen = []
        skipped.clear()
        infos = write_train_val(iter_texts(str(WEB)), tokenizer, folder, train_tokens=10**9, val_fraction=0.1,
                                max_val_tokens=20_000, source=source, progress=lambda train, val: seen.append(train),
                                skipping=lambda done, of: skipped.append((done, of)))
        return infos, seen[0], [(folder / name).read_bytes() for name in ("train.bin", "val.bin", "train.hashes",
                                                                            "val.hashes")]

    clean, started, clean_bytes = pack(tmp_path / "clean")
    assert started == 0 and clean[0].tokens > 100_000 and skipped == []
    folder = tmp_path / "killed"
    packer = subprocess.Popen([sys.executable, "-c", SLOW_PACKING, str(tokenizer_dir), str(WEB), str(folder)])
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and packer.poll() is None:
            try:
                if json.loads((folder / "packing.json").read_text())["documents_read"] >= 300:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        packer.kill()  # SIGKILL: nothing is closed or written on the way out
    finally:
        packer.wait()
    checkpoint = json.loads((folder / "packing.json").read_text())
    assert packer.returncode == -9 and not (folder / "packed.json").exists()
    assert 0 < checkpoint["documents_read"] < 2000 and checkpoint["train"][0] > 0

    resumed, started, resumed_bytes = pack(folder)
    assert started == checkpoint["train"][0]  # resumed from the checkpoint, not from the start
    read = checkpoint["documents_read"]
    assert skipped == [(0, read), (read, read)]  # the reading past them is said, start and end
    assert resumed == clean and resumed_bytes == clean_bytes
    assert read_packed(folder) and not (folder / "packing.json").exists()

    # the checkpoint of an older edu-filter, which kept no text hashes: resumed (hours of packing), the hashes of the
    # documents packed before it written again from the texts it reads past
    (folder / "packed.json").unlink()
    (folder / "packing.json").write_text(json.dumps(checkpoint))
    for name in ("train.hashes", "val.hashes"):
        (folder / name).unlink()
    rehashed, started, rehashed_bytes = pack(folder)
    assert started == checkpoint["train"][0] and rehashed == clean and rehashed_bytes == clean_bytes

    (folder / "packed.json").unlink()  # an unfinished packing of another input: started over, not mixed
    (folder / "packing.json").write_text(json.dumps(checkpoint))
    again, started, again_bytes = pack(folder, source="another input")
    assert started == 0 and again == clean and again_bytes == clean_bytes

    # a run that starts over and dies before its first checkpoint leaves no checkpoint of the files it overwrote
    (folder / "packing.json").write_text(json.dumps(checkpoint))

    def dying(texts, after=50):
        for i, text in enumerate(texts):
            if i == after:
                raise RuntimeError("killed")
            yield text

    with pytest.raises(RuntimeError, match="killed"):
        write_train_val(dying(iter_texts(str(WEB))), tokenizer, folder, train_tokens=10**9, val_fraction=0.1,
                        max_val_tokens=20_000, source="a third input")
    assert not (folder / "packing.json").exists()


def test_a_packing_checkpoint_names_the_input_and_the_text_field(tmp_path):
    """An unfinished packing resumed with another --text-field would append one field's texts to another's."""
    from edu_filter.ablate.ablation import packing_source

    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"text": "apple banana", "alt": "zebra yak"}\n')
    source = packing_source(str(docs), "text")
    assert packing_source(str(docs), "text") == source != packing_source(str(docs), "alt")
    docs.write_text('{"text": "apple cherry", "alt": "zebra yak"}\n')
    assert packing_source(str(docs), "text") != source
    assert json.loads(packing_source("hf://datasets/org/name", "text"))["input"] == "hf://datasets/org/name"


def test_plain_progress_says_where_a_task_ended_short_of_its_total():
    """In a Slurm log (no terminal): a line at the start, at most one per PLAIN_PROGRESS_EVERY, and the last state at
    the end even when the total is never reached (an input that runs out before the budget, a time limit)."""
    import io

    from rich.console import Console
    from rich.progress import TextColumn

    from edu_filter.ablate.ablation import logged_progress

    log = io.StringIO()
    with logged_progress(TextColumn("{task.description}"), console=Console(file=log, force_terminal=False),
                         transient=True) as progress:
        short = progress.add_task("packing web", total=1_000_000)
        full = progress.add_task("packing code", total=10)
        for done in (1_000, 250_000, 400_000):
            progress.update(short, completed=done)
        progress.update(full, completed=10)
    lines = log.getvalue().splitlines()  # nothing else: no blank lines, no bars drawn at the end
    assert lines == ["packing web: 1,000/1,000,000", "packing code: 10/10", "packing web: 400,000/1,000,000"]
    log = io.StringIO()  # a count without total whose last line said its final number: not said again at the end
    with logged_progress(TextColumn("{task.description}"), console=Console(file=log, force_terminal=False),
                         transient=True) as progress:
        counting = progress.add_task("counting the documents", total=None)
        progress.update(counting, completed=1_000)
        progress.update(counting, completed=1_000)
    assert log.getvalue().splitlines() == ["counting the documents: 1,000"]


def test_the_tokenizer_key_names_the_encoding_not_the_settings_of_a_call(tokenizer_dir):
    from edu_filter.ablate.packing import tokenizer_key
    from edu_filter.ablate.tokenizer import load_tokenizer

    fresh = load_tokenizer(tokenizer_dir)
    key = tokenizer_key(fresh)
    fresh(["some text"], add_special_tokens=False, truncation=True, max_length=4)  # transformers changes the backend
    assert tokenizer_key(fresh) == key == tokenizer_key(load_tokenizer(tokenizer_dir))
    other_separator = load_tokenizer(tokenizer_dir)
    other_separator.eos_token = other_separator.convert_ids_to_tokens(5)
    assert tokenizer_key(other_separator) != key


def test_reading_stops_once_train_and_val_have_their_tokens(tokenizer, tmp_path):
    train, val = write_train_val(iter_texts(str(WEB)), tokenizer, tmp_path, train_tokens=5000, val_fraction=0.05,
                                 max_val_tokens=2000)
    assert not train.complete
    assert 5000 <= train.tokens < 5000 + 20_000
    assert 2000 <= val.tokens < 2000 + 20_000  # read on until validation has its tokens too
    assert train.documents < 1000


def test_windows_have_fixed_length_and_lose_no_token_at_boundaries(tokenizer, tmp_path):
    info = write_tokens(iter_texts(str(WEB)), tokenizer, tmp_path / "s.bin", max_tokens=3000)
    stream = np.fromfile(tmp_path / "s.bin", dtype=np.uint16).astype(np.int64)
    data = PackedTokens(tmp_path / "s.bin", seq_len=64, seed=1)
    assert data.num_windows == (info.tokens - 1) // 64
    windows = [data.window(k) for k in range(data.num_windows)]
    assert all(len(w) == 65 for w in windows)
    for a, b in zip(windows, windows[1:]):
        assert a[-1] == b[0]  # consecutive windows share their boundary token
    targets = np.concatenate([w[1:] for w in windows])
    np.testing.assert_array_equal(targets, stream[1 : 1 + 64 * data.num_windows])  # every token a target once


def test_batches_cover_each_window_once_per_epoch_in_a_seeded_order(tokenizer, tmp_path):
    write_tokens(iter_texts(str(WEB)), tokenizer, tmp_path / "s.bin", max_tokens=3000)
    data = PackedTokens(tmp_path / "s.bin", seq_len=32, seed=7)
    n = data.num_windows
    x, y = data.batch(0, n)
    assert x.shape == y.shape == (n, 32)
    assert (x[:, 1:] == y[:, :-1]).all()
    all_windows = {tuple(data.window(k)) for k in range(n)}
    epoch0 = [tuple(np.concatenate([a[:1], b]).tolist()) for a, b in zip(x.numpy(), y.numpy())]
    assert set(epoch0) == all_windows and len(epoch0) == n
    x1, _ = data.batch(n, n)  # the next epoch: the same windows, in another order
    assert not (x1 == x).all()
    again = PackedTokens(tmp_path / "s.bin", seq_len=32, seed=7)
    assert (again.batch(5, 3)[0] == x[5:8]).all()  # sample g is a pure function of g (what resume relies on)


def test_too_little_data_and_bad_rows_give_clear_errors(tokenizer, tmp_path):
    write_tokens(["tiny"], tokenizer, tmp_path / "t.bin", max_tokens=100)
    write_tokens([], tokenizer, tmp_path / "empty.bin", max_tokens=100)
    for path in ("t.bin", "empty.bin"):
        with pytest.raises(ValueError, match="fewer than one window"):
            PackedTokens(tmp_path / path, seq_len=64)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"content": "no text"}\n')
    with pytest.raises(DocumentError, match=r"bad\.jsonl:2: field 'text' is missing"):
        list(iter_texts(str(bad)))
    # a binary text column (Hive, older Spark), which every other command reads: refused here, the raw dump apply
    # filtered could not be the unfiltered arm
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": pa.array([b"hello world", "caf\u00e9".encode()], type=pa.binary())}),
                   tmp_path / "binary.parquet")
    assert list(iter_texts(str(tmp_path / "binary.parquet"))) == ["hello world", "caf\u00e9"]
    pq.write_table(pa.table({"text": pa.array([b"ok", b"caf\xe9"], type=pa.binary())}), tmp_path / "latin1.parquet")
    with pytest.raises(DocumentError, match=r"latin1\.parquet:2: field 'text' is not valid UTF-8"):
        list(iter_texts(str(tmp_path / "latin1.parquet")))
    # a token file cut short (a copy in progress, a full disk) or longer than its sidecar says: named, not numpy's
    # unnamed mmap error, nor read as if whole
    write_tokens(["a longer text " * 50], tokenizer, tmp_path / "whole.bin", max_tokens=10**6)
    PackedTokens(tmp_path / "whole.bin", seq_len=64)
    data = (tmp_path / "whole.bin").read_bytes()
    for changed in (data[:-10], data + data):
        (tmp_path / "whole.bin").write_bytes(changed)
        with pytest.raises(DocumentError, match=r"whole\.bin: [\d,]+ bytes where its whole\.json says"):
            PackedTokens(tmp_path / "whole.bin", seq_len=64)


def test_a_token_file_being_rewritten_is_not_taken_for_packed(tokenizer, tmp_path):
    """Packing an evaluation set again emptied its token file while the old sidecar stayed: killed midway, the next
    run took the empty file for the packed set (0 documents shared with training, then numpy's mmap error)."""
    write_tokens(["an evaluation document " * 20] * 3, tokenizer, tmp_path / "ref.bin", max_tokens=10**6)

    def killed_midway():
        yield "an evaluation document " * 20
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_tokens(killed_midway(), tokenizer, tmp_path / "ref.bin", max_tokens=10**6)
    assert not (tmp_path / "ref.json").exists()


def test_wsd_schedule_warms_up_holds_then_cools_down_over_the_last_20_percent():
    cfg = PretrainConfig(lr=1e-3, warmup_fraction=0.1, cooldown_fraction=0.2, schedule="wsd")
    total = 100
    lrs = [learning_rate(s, total, cfg) for s in range(total)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(lr == 1e-3 for lr in lrs[10:81])  # constant up to the cooldown
    cooldown = lrs[80:]
    assert all(a > b for a, b in zip(cooldown, cooldown[1:]))
    steps = np.diff(cooldown)
    assert np.allclose(steps, steps[0])  # linear
    assert lrs[-1] == pytest.approx(1e-3 / 20)  # heading to min_lr (0) at the end of the run
    cfg.min_lr_ratio = 0.1
    assert learning_rate(total, total, cfg) == pytest.approx(1e-4)


def test_a_cooldown_overlapping_the_warmup_decays_from_the_warmups_end():
    """`cooldown_fraction=1` (warmup, then a linear decay) warmed up to the full rate, then fell at once onto the
    cooldown's line (1.0 to 0.95 of it in a step; 1.0 to 0.625 with warmup 0.5, cooldown 0.8)."""
    for warmup, cooldown in ((0.05, 1.0), (0.5, 0.8)):
        cfg = PretrainConfig(lr=1e-3, warmup_fraction=warmup, cooldown_fraction=cooldown, schedule="wsd")
        lrs = [learning_rate(s, 100, cfg) for s in range(100)]
        end = int(warmup * 100)
        assert lrs[end - 1] == pytest.approx(1e-3) and lrs[end] == pytest.approx(1e-3)
        decay = np.diff(lrs[end:])
        assert np.all(decay < 0) and np.allclose(decay, decay[0])  # one straight line down from there


def test_cosine_schedule_option():
    cfg = PretrainConfig(lr=1e-3, warmup_fraction=0.1, schedule="cosine", min_lr_ratio=0.1)
    lrs = [learning_rate(s, 100, cfg) for s in range(101)]
    after = lrs[10:]
    assert lrs[10] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(after, after[1:]))
    assert lrs[55] == pytest.approx(1e-4 + 0.5 * 9e-4)
    assert lrs[100] == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="unknown schedule"):
        learning_rate(50, 100, PretrainConfig(schedule="linear"))


def test_presets_and_overrides():
    cfg = PretrainConfig.from_preset("smollm-135m")
    assert cfg.model["num_hidden_layers"] == 30 and cfg.model["hidden_size"] == 576
    assert (cfg.model["num_attention_heads"], cfg.model["num_key_value_heads"]) == (9, 3)
    assert cfg.model["intermediate_size"] == 1536 and cfg.model["tie_word_embeddings"] and cfg.context == 2048
    assert cfg.vocab_size == 49152
    # SmolLM's config.json: RMSNorm epsilon 1e-5 (LlamaConfig's default is 1e-6)
    assert all(PretrainConfig.from_preset(p).model["rms_norm_eps"] == 1e-5 for p in ("smollm-135m", "smollm-360m"))
    assert PretrainConfig.from_preset("ablation-1.8b").model["num_attention_heads"] == 32
    # HuggingFaceFW/ablation-model-*'s config.json: tied (its 3.43 GB of float16 weights), epsilon 1e-5
    fineweb = PretrainConfig.from_preset("ablation-1.8b").model
    assert fineweb["tie_word_embeddings"] and fineweb["rms_norm_eps"] == 1e-5
    over = PretrainConfig.from_preset(
        "tiny", parse_overrides(["hidden_size=64", "lr=1e-2", "schedule=cosine", "tie_word_embeddings=false"]))
    assert over.model["hidden_size"] == 64 and over.lr == 1e-2 and over.schedule == "cosine"
    assert over.model["tie_word_embeddings"] is False
    with pytest.raises(ValueError, match="unknown override 'hidden'"):
        PretrainConfig.from_preset("tiny", {"hidden": 3})
    with pytest.raises(ValueError, match="unknown preset"):
        PretrainConfig.from_preset("gpt5")
    with pytest.raises(ValueError, match="not key=value"):
        parse_overrides(["lr"])


def test_smollm_135m_shape_has_135m_parameters():
    """The preset builds the published architecture (the meta device allocates no memory)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = PretrainConfig.from_preset("smollm-135m")
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(vocab_size=49152, **cfg.model))
    n = sum(p.numel() for p in model.parameters())
    assert math.isclose(n, 134.5e6, rel_tol=0.01)


def test_a_budget_read_early_takes_documents_from_across_the_input_files(tokenizer, tmp_path):
    """A crawl laid out by date, read in name order, gave an arm the oldest dumps only (apply's kept/ files each hold
    some of every input file, so the filtered arm did not): files are read in a fixed order that looks random. Token
    files packed by an edu-filter from before (no order recorded) are still taken."""
    from edu_filter.ablate.packing import FILE_ORDER, spread_files

    texts = [t for t, _ in zip(iter_texts(str(WEB)), range(80))]
    data = tmp_path / "crawl"
    for k in range(16):  # 16 dumps, 5 documents each, each document saying which dump it is from
        (data / f"CC-MAIN-{2013 + k}").mkdir(parents=True)
        write_documents([{"text": f"dump{k:02d} {t}"} for t in texts[5 * k:5 * (k + 1)]],
                        data / f"CC-MAIN-{2013 + k}" / "000_00000.jsonl")
    cfg = PretrainConfig.from_preset("tiny", {"max_position_embeddings": 64, "eval_tokens": 256}, tokens=12_000)
    out = tmp_path / "ablation"
    _prepare_tokens(out, tokenizer, {"web": str(data)}, {}, cfg, TEXT, 0.1)
    tokens = np.fromfile(out / "tokens/web/train.bin", dtype=np.uint16)
    read = sorted({int(m) for m in re.findall(r"dump(\d\d)", tokenizer.decode(tokens))})
    assert 2 <= len(read) <= 8 and max(read) >= 8, read  # in name order: dumps 0, 1, 2, ... only
    files = sorted(str(p) for p in data.rglob("*.jsonl"))
    order = [int(f.split("CC-MAIN-")[1][:4]) - 2013 for f in spread_files(files)]
    assert read == sorted(order[:len(read)])
    moved = tmp_path / "elsewhere"
    shutil.copytree(data, moved)  # the same files in another folder: the same order
    assert [Path(f).parent.name for f in spread_files(sorted(str(p) for p in moved.rglob("*.jsonl")))] == [
        f"CC-MAIN-{2013 + k}" for k in order]

    record = out / "tokens/web" / PACKED
    packed = json.loads(record.read_text())
    assert packed["settings"]["file_order"] == FILE_ORDER
    del packed["settings"]["file_order"]  # as an edu-filter from before recorded it: in name order, taken as such
    record.write_text(json.dumps(packed))
    (out / "runs").mkdir()
    _prepare_tokens(out, tokenizer, {"web": str(data)}, {}, cfg, TEXT, 0.1)
    assert json.loads(record.read_text()) == packed
    (out / "runs").rmdir()  # not trained on yet, and another budget asked: packed again, in today's order
    more = PretrainConfig.from_preset("tiny", {"max_position_embeddings": 64, "eval_tokens": 256}, tokens=14_000)
    _prepare_tokens(out, tokenizer, {"web": str(data)}, {}, more, TEXT, 0.1)
    assert json.loads(record.read_text())["settings"]["file_order"] == FILE_ORDER


def test_an_input_short_of_the_budget_is_said_when_it_is_packed(tokenizer, tmp_path, capsys):
    """Its run repeats its documents to fill the budget: said days before the report, when nothing can change."""
    small = tmp_path / "small.jsonl"
    write_documents([{"text": t} for t, _ in zip(iter_texts(str(WEB)), range(12))], small)
    cfg = PretrainConfig.from_preset("tiny", {"max_position_embeddings": 64, "eval_tokens": 256}, tokens=20_000)
    _prepare_tokens(tmp_path / "out", tokenizer, {"small": str(small), "web": str(WEB)}, {}, cfg, TEXT, 0.1)
    said = " ".join(capsys.readouterr().err.split())
    assert re.search(r"warning: --data small holds [\d,]+ training tokens, fewer than the 20,000 each run trains on: "
                     r"its run repeats them about [\d.]+ times", said), said
    assert "--data web" not in said


def test_every_rank_says_how_its_packing_goes_in_a_log(tokenizer, tmp_path, capsys):
    """Under torchrun the ranks share out the datasets: rank 1 packed for hours saying nothing while rank 0 waited
    for it, silently, at the barrier."""
    cfg = PretrainConfig.from_preset("tiny", {"max_position_embeddings": 64, "eval_tokens": 256}, tokens=5_000)
    _prepare_tokens(tmp_path, tokenizer, {"first": str(WEB), "second": str(WEB)}, {}, cfg, TEXT, 0.1, rank=1,
                    world=2)
    lines = capsys.readouterr().out.splitlines()
    # with its rate where packing took over a second (a loaded machine)
    assert any(re.fullmatch(r"packing second: ([\d,]+)/\1( \([\d,]+/s\))?", line) for line in lines), lines
    assert not (tmp_path / "tokens/first").exists()  # rank 0's
