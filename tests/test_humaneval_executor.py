"""HumanEval: canonical solutions pass, broken ones fail, runaway ones time out, all outside this process."""

import os
import time

import pytest
import torch

from edu_filter.ablate.humaneval import (
    check_program,
    execute_completions,
    generate_completions,
    load_problems,
    prompt_ids,
    run_program,
    truncate_at_stop,
)
from edu_filter.documents import bundled_data


@pytest.fixture(scope="module")
def problems():
    return load_problems(limit=4)


def test_bundled_problems_load():
    all_problems = load_problems()
    assert len(all_problems) == 164 and bundled_data("code/HumanEval.jsonl.gz").exists()
    assert all_problems[0]["task_id"] == "HumanEval/0"


def test_canonical_solutions_pass(problems):
    results = execute_completions(problems, [p["canonical_solution"] for p in problems], timeout=20)
    assert [r.status for r in results] == ["passed"] * len(problems)


def test_wrong_and_crashing_solutions_fail(problems):
    wrong = "    return None\n"
    crashing = "    raise RuntimeError('boom')\n"
    syntax = "    return (\n"
    results = execute_completions(problems[:3], [wrong, crashing, syntax], timeout=20)
    assert [r.status for r in results] == ["failed"] * 3
    assert "RuntimeError: boom" in results[1].detail
    assert "SyntaxError" in results[2].detail


def test_a_completion_that_exits_before_the_tests_end_fails(problems):
    """exit(), sys.exit(0) or os._exit(0) in a completion ended the program before its asserts with status 0: a
    wrong completion counted as passed (the reference harnesses fail SystemExit)."""
    exits = ["    exit()\n", "    import sys\n    sys.exit(0)\n", "    import os\n    os._exit(0)\n",
             "    return 0\nexit(0)\n"]
    results = execute_completions([problems[2]] * len(exits), exits, timeout=20)
    assert [r.status for r in results] == ["failed"] * len(exits)
    assert results[0].detail == "exited before its tests ended (exit status 0)"
    assert execute_completions([problems[2]], [problems[2]["canonical_solution"]], timeout=20)[0].passed


def test_an_infinite_loop_is_killed_at_the_timeout(problems):
    t0 = time.time()
    result = run_program(check_program(problems[2], "    while True:\n        pass\n"), timeout=2)
    assert result.status == "timeout" and not result.passed
    assert time.time() - t0 < 15


RUNS_A_CHATTY_PROGRAM = """
import resource, sys
from edu_filter.ablate.humaneval import run_program
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
looping = run_program("while True:\\n    print('x' * 1000)\\n", timeout=3)
noisy = run_program("import sys\\nfor _ in range(10_000):\\n    print('warning ' * 100, file=sys.stderr)\\n"
                    "raise ValueError('the last line')\\n", timeout=60)
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(looping.status, noisy.status, noisy.detail, grown // 1024, sep="|")
"""


def test_a_program_printing_without_end_costs_this_process_no_memory():
    """A greedy completion looping over a print (indented, so no stop sequence cuts it) had every byte it wrote held
    by this process until its timeout: GBs per program, one program per CPU at a time."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", RUNS_A_CHATTY_PROGRAM], capture_output=True, text=True, timeout=120)
    looping, noisy, detail, grown_mb = out.stdout.strip().split("|")
    assert (looping, noisy, detail) == ("timeout", "failed", "ValueError: the last line"), out.stderr
    assert int(grown_mb) < 100


def test_generated_code_cannot_touch_this_process(problems, tmp_path):
    marker = tmp_path / "marker"
    program = f"import os\nos.environ['EDU_FILTER_LEAK'] = '1'\nopen({str(marker)!r}, 'w').write(str(os.getpid()))\n"
    assert run_program(program, timeout=20).passed
    assert "EDU_FILTER_LEAK" not in os.environ
    assert int(marker.read_text()) != os.getpid()


def test_a_child_the_program_forked_is_stopped_with_it(tmp_path):
    """A program that forks and exits (passing or failing) left its child running, with the user's rights, for as
    long as it liked; only a timeout killed the group."""
    marker = tmp_path / "child-alive"
    program = ("import os, time\n"
               "if os.fork() == 0:\n"
               "    time.sleep(1.0)\n"
               f"    open({str(marker)!r}, 'w').write('still running')\n"
               "    os._exit(0)\n")
    for ending in ("", "raise SystemExit(1)\n"):
        assert run_program(program + ending, timeout=20).status == ("passed" if not ending else "failed")
    time.sleep(2.0)
    assert not marker.exists()


def test_completions_are_cut_at_stop_sequences():
    body = "    return x + 1\n"
    assert truncate_at_stop(body + "\ndef other():\n    pass\n") == body
    assert truncate_at_stop(body + "\nif __name__ == '__main__':\n    main()\n") == body
    assert truncate_at_stop(body + "\n# tests\n") == body
    assert truncate_at_stop(body) == body


def test_the_model_continues_each_prompt_where_training_code_has_a_token_boundary():
    """A prompt's trailing line break, tokenized alone, is a token ("\n") that training code has only before column-0
    text: the model continued every prompt with blank lines. Without it, the prompt's tokens begin those of the
    prompt with its solution, as in the code the model learnt from."""
    from edu_filter.ablate.packing import iter_texts
    from edu_filter.ablate.tokenizer import mixed_sample, train_tokenizer

    code = os.path.join(os.path.dirname(__file__), "..", "data", "code", "thealgorithms_unlabelled.jsonl")
    tok = train_tokenizer(mixed_sample([iter_texts(code)], 200_000), 320)
    for problem in load_problems():
        ids = prompt_ids(tok, problem["prompt"])[0].tolist()
        whole = tok(problem["prompt"] + problem["canonical_solution"], add_special_tokens=False).input_ids
        assert whole[:len(ids)] == ids, problem["task_id"]


def test_a_completion_of_the_stripped_prompt_runs_after_the_whole_prompt(problems):
    """Completions start with the line break the model was not given: the program has a blank line there."""
    completions = ["\n" + p["canonical_solution"] for p in problems]
    assert [r.status for r in execute_completions(problems, completions, timeout=20)] == ["passed"] * len(problems)


def test_greedy_generation_with_a_small_llama(problems, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from edu_filter.ablate.packing import iter_texts
    from edu_filter.ablate.tokenizer import mixed_sample, train_tokenizer

    code = os.path.join(os.path.dirname(__file__), "..", "data", "code", "thealgorithms_unlabelled.jsonl")
    tok = train_tokenizer(mixed_sample([iter_texts(code)], 200_000), 320)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=96, eos_token_id=tok.eos_token_id,
        bos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id))
    completions, truncated = generate_completions(model, tok, problems[:2], max_new_tokens=32)
    assert len(completions) == 2 and all(isinstance(c, str) for c in completions)
    assert truncated == 2  # these prompts are longer than 96 - 32 tokens: kept from the right
    assert all(truncate_at_stop(c) == c for c in completions)
    again, _ = generate_completions(model, tok, problems[:2], max_new_tokens=32)
    assert again == completions  # greedy is deterministic
