"""The built wheel works on its own: installed into a fresh environment, run from an unrelated folder, the
python-edu preset finds the bundled HumanEval and decontaminates against it."""

import gzip
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import orjson
import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"


@pytest.mark.slow
def test_wheel_installed_in_a_clean_venv_runs_the_python_edu_preset(tmp_path):
    from edu_filter.classifiers.fasttext_model import FastTextSettings
    from edu_filter.train.classifier import train_classifier

    dist = tmp_path / "dist"
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                          str(dist), str(REPO)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    wheel = next(dist.glob("edu_filter-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    # dependencies come from this environment's site-packages (not its editable edu_filter, whose hook is a .pth
    # file that is only read in site directories, not in paths listed by another .pth file)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    res = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([str(python), "-c", "import edu_filter; print(edu_filter.__file__)"], cwd=elsewhere,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(venv))

    model = tmp_path / "code-ft"
    train_classifier([str(DATA / "code" / "python_edu_labels.jsonl")], model, kind="code", method="fasttext",
                     fasttext=FastTextSettings(epoch=5))
    problem = json.loads(gzip.open(DATA / "code" / "HumanEval.jsonl.gz").readlines()[3])
    rows = [json.loads(line) for line in open(DATA / "code" / "thealgorithms_unlabelled.jsonl")][:20]
    rows.append({"id": "contaminated", "text": "import math\n\n" + problem["prompt"] + problem["canonical_solution"]})
    (elsewhere / "code.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    res = subprocess.run([str(venv / "bin" / "edu-filter"), "apply", "code.jsonl", "--preset", "python-edu", "--model",
                          str(model), "-o", "out"], cwd=elsewhere, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    stats = json.loads((elsewhere / "out" / "stats.json").read_text())
    assert stats["adds_up"] and stats["removed"]["contaminated"]["documents"] == 1
    assert str(venv) in stats["settings"]["decontaminate"][0]  # the wheel's own HumanEval copy
