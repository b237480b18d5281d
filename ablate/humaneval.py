"""HumanEval pass@1 for code ablations: greedy completions, each checked by running its tests in a subprocess.

Generated code is never executed in this process: every program runs in a fresh `python -I` in a temporary
directory, in its own session (so the whole process group is killed on timeout), with a memory limit on Linux.
It is still untrusted code running as your user; run ablations on machines you are willing to expose to it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from edu_filter.classifiers.device import default_num_threads
from edu_filter.documents import bundled_data, iter_raw_rows

# Where a function body ends (as in the Codex paper and bigcode-evaluation-harness).
STOP_SEQUENCES = ["\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```"]


@dataclass
class ExecutionResult:
    status: str  # "passed", "failed" or "timeout"
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def load_problems(path: str | Path | None = None, limit: int | None = None) -> list[dict]:
    """HumanEval problems (task_id, prompt, canonical_solution, test, entry_point) from a JSONL(.gz) file (default:
    the bundled HumanEval)."""
    path = bundled_data("code/HumanEval.jsonl.gz") if path is None else path
    problems = []
    for lineno, row in iter_raw_rows(str(path)):
        missing = [k for k in ("task_id", "prompt", "test", "entry_point") if not isinstance(row.get(k), str)]
        if missing:
            raise ValueError(f"{path}:{lineno}: HumanEval problem lacks {', '.join(missing)}")
        problems.append(row)
        if limit is not None and len(problems) >= limit:
            break
    return problems


def truncate_at_stop(completion: str, stop_sequences: list[str] = STOP_SEQUENCES) -> str:
    """The completion up to the first stop sequence (the end of the function body)."""
    cut = min((i for s in stop_sequences if (i := completion.find(s)) != -1), default=len(completion))
    return completion[:cut]


CHECKED_SUFFIX = ".checked"  # a file the program leaves beside itself once its tests have run to their end


def check_program(problem: dict, completion: str) -> str:
    """The program that passes iff the completion is correct: prompt + completion + tests + check(entry_point),
    then a mark that the check returned (run with `checked=True`: a completion calling exit() or sys.exit(0) ended
    the program before the asserts, exit status 0, counted as passed; the reference harnesses fail SystemExit)."""
    return (f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"
            f"open(__file__ + {CHECKED_SUFFIX!r}, 'w').close()\n")


# The end of a failed program's stderr kept for its detail; programs write stdout and stderr to nowhere and a file
# capped at STDERR_CAP_BYTES (a completion that prints in a loop filled the pipes' reader: GBs in this process).
STDERR_TAIL_BYTES = 4096
STDERR_CAP_BYTES = 16 * 2**20


def _limit_resources(memory_bytes: int):
    def apply():
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_FSIZE, (STDERR_CAP_BYTES, STDERR_CAP_BYTES))

    return apply if sys.platform.startswith("linux") else None


def _exited(proc: subprocess.Popen, timeout: float) -> bool:
    """Whether the child exited within `timeout` seconds, without reaping it (WNOWAIT) where the system can."""
    if not hasattr(os, "waitid"):  # macOS: reaped here
        try:
            proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    deadline = time.monotonic() + timeout
    while True:
        if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)


def run_program(program: str, timeout: float = 10.0, memory_mb: int = 2048, checked: bool = False) -> ExecutionResult:
    """Run a Python program in a subprocess; passed means it exited 0 within the timeout (and, `checked`, left the
    mark `check_program` ends with)."""
    with tempfile.TemporaryDirectory(prefix="humaneval-") as tmp:
        path = Path(tmp) / "program.py"
        path.write_text(program)
        with open(Path(tmp) / "stderr", "w+b") as stderr:
            proc = subprocess.Popen(
                [sys.executable, "-I", str(path)],
                cwd=tmp,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
                preexec_fn=_limit_resources(memory_mb * 2**20),
                env={"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0"},
            )
            ended = _exited(proc, timeout)
            # the whole session goes, however the program ended: a child it forked (passed or failed) ran on from a
            # deleted folder for as long as it liked. The program is not reaped yet, so its group id is still its own.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if not ended:
                return ExecutionResult("timeout", f"no result after {timeout:g}s")
            if proc.returncode == 0 and checked and not path.with_name(path.name + CHECKED_SUFFIX).exists():
                return ExecutionResult("failed", "exited before its tests ended (exit status 0)")
            if proc.returncode == 0:
                return ExecutionResult("passed")
            stderr.seek(max(0, stderr.seek(0, os.SEEK_END) - STDERR_TAIL_BYTES))
            lines = stderr.read().decode(errors="replace").strip().splitlines()
    return ExecutionResult("failed", lines[-1] if lines else f"exit code {proc.returncode}")


def execute_completions(
    problems: list[dict], completions: list[str], timeout: float = 10.0, workers: int | None = None
) -> list[ExecutionResult]:
    """Check each completion against its problem's tests, several subprocesses at a time (one per CPU this process
    may use: under a scheduler its allocation, not every core of the node)."""
    with ThreadPoolExecutor(max_workers=workers or default_num_threads()) as pool:
        return list(pool.map(lambda pc: run_program(check_program(*pc), timeout, checked=True),
                             zip(problems, completions)))


def prompt_ids(tokenizer, prompt: str):
    """The prompt's tokens as the model continues it: without its trailing whitespace (bigcode-evaluation-harness's
    strip_prompt). Every HumanEval prompt ends in a line break, which a byte-level BPE splits from the indentation
    that follows it in all training code: a lone "\n" token comes before text at column 0 (`def`, `if`, `#`), and a
    small model continued every prompt with blank lines, pass@1 0 whatever its data."""
    return tokenizer(prompt.rstrip(), return_tensors="pt", add_special_tokens=False).input_ids


def generate_completions(model, tokenizer, problems: list[dict], max_new_tokens: int = 256) -> tuple[list[str], int]:
    """Greedy completions cut at the stop sequences, and how many prompts had to be cut (from the left) to fit the
    model's context. A completion continues the prompt without its trailing whitespace (`prompt_ids`): it starts
    with the line break, which the prompt's own one before it leaves a blank line (`check_program`)."""
    import torch

    context = model.config.max_position_embeddings
    max_new_tokens = min(max_new_tokens, context // 2)
    device = next(model.parameters()).device
    completions, truncated = [], 0
    model.eval()
    for problem in problems:
        ids = prompt_ids(tokenizer, problem["prompt"])
        if ids.shape[1] > context - max_new_tokens:
            ids = ids[:, -(context - max_new_tokens):]
            truncated += 1
        ids = ids.to(device)
        with torch.no_grad():
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                stop_strings=STOP_SEQUENCES, tokenizer=tokenizer, pad_token_id=tokenizer.eos_token_id,
            )
        completions.append(truncate_at_stop(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)))
    return completions, truncated


def evaluate_humaneval(
    model, tokenizer, problems: list[dict] | None = None, max_new_tokens: int = 256, timeout: float = 10.0
) -> dict:
    """pass@1 with greedy decoding (one sample per problem), with per-problem outcomes."""
    problems = problems if problems is not None else load_problems()
    completions, truncated = generate_completions(model, tokenizer, problems, max_new_tokens)
    results = execute_completions(problems, completions, timeout)
    return {
        "pass@1": sum(r.passed for r in results) / len(results),
        "problems": len(results),
        "prompts_truncated": truncated,
        "results": [{"task_id": p["task_id"], "status": r.status, "detail": r.detail, "completion": c}
                    for p, r, c in zip(problems, results, completions)],
    }
