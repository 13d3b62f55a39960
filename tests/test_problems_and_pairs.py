"""Code problems, the judge, and the on-policy DPO pair builder: hidden tests of real CodeI/O tasks
hold their reference solutions and reject wrong ones; the builder's counts reconcile on crafted
problems (all pass, all fail, mixed, a hanging reply, hidden tests that cannot be built) and it
writes exactly the pairs of its rule; sampling runs through the real engine."""

from __future__ import annotations

import gzip
import json
import math

import pytest
import torch

from megatron_seed.data import codeio
from megatron_seed.evaluate.pairs import build_pairs, choose_pairs, main as build_pairs_main
from megatron_seed.evaluate.judge import Completion, Verdict, judge, judge_one, sample_completions
from megatron_seed.evaluate.problems import (HeldOutError, Problem, codeio_tests, extract_code, human_eval_problem,
                                             load_codeio, load_jsonl, load_training_problems)
from megatron_seed.sandbox import Sandbox


@pytest.fixture(scope="module")
def box():
    with Sandbox(max_workers=2) as sandbox:
        yield sandbox


# ---------------------------------------------------------------------------- extract_code
@pytest.mark.parametrize("reply, entry, want", [
    ("def f():\n    return 1\n", None, "def f():\n    return 1\n"),                       # bare code
    ("Here:\n```python\nx = 1\n```\nthen\n```python\ny = 2\n```\n", None, "y = 2\n"),      # the last block
    ("```\nz = 3\n```", None, "z = 3\n"),                                                  # untagged
    ("```py\nz = 3\n```\n```bash\npip install x\n```\n", None, "z = 3\n"),                 # other languages skipped
    ("```python\ndef main_solution(a):\n    return a\n```\nUsage:\n```python\nprint(main_solution(1))\n```",
     "main_solution", "def main_solution(a):\n    return a\n"),                              # the block defining it
    ("```python\ndef f():\n    return [\n", None, "def f():\n    return [\n"),              # open fence: cut reply
    ("  ```Python  \nw = 4\n  ```\n", None, "w = 4\n"),                                     # indented fence, tag case
])
def test_extract_code(reply, entry, want):
    assert extract_code(reply, entry) == want


# ---------------------------------------------------------------------------- held out
def test_humaneval_is_refused_as_training_data(tmp_path):
    with pytest.raises(HeldOutError, match="held out"):
        load_training_problems("humaneval")
    rows = [{"task_id": "mine/0", "prompt": "write f", "tests": "assert f() == 1"},
            {"task_id": "HumanEval/0", "prompt": "def g():\n", "test": "def check(c):\n    pass\n", "entry_point": "g"}]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [p.task_id for p in load_jsonl(str(path))] == ["mine/0", "HumanEval/0"]  # evaluation may use them
    with pytest.raises(HeldOutError, match="HumanEval/0"):
        load_training_problems(str(path))
    # The tool stops before loading any model.
    assert build_pairs_main(["--hf", str(tmp_path / "none"), "--problems", str(path),
                             "--output", str(tmp_path / "pairs.jsonl")]) == 1
    assert not (tmp_path / "pairs.jsonl").exists()


def test_human_eval_replies_as_whole_functions_or_bodies(box):
    row = {"task_id": "HumanEval/x", "entry_point": "head",
           "prompt": "from typing import List\n\n\ndef head(xs: List[int]) -> int:\n    \"\"\"First item.\"\"\"\n",
           "test": "def check(candidate):\n    assert candidate([3, 4]) == 3\n"}
    problem = human_eval_problem(row)
    assert "```python\nfrom typing import List" in problem.messages[0]["content"]
    whole = "Sure:\n```python\ndef head(xs: List[int]) -> int:\n    return xs[0]\n```"  # List from the prompt
    body = "```python\n    return xs[0]\n```"
    wrong = "```python\ndef head(xs):\n    return xs[-1]\n```"
    verdicts = [judge_one(problem, reply, box) for reply in (whole, body, wrong, "```python\nimport sys\nsys.exit(0)\n```")]
    assert [v.passed for v in verdicts] == [True, True, False, False]
    assert verdicts[2].error == "AssertionError" and verdicts[3].error == "ExitedBeforeTestsEnded"


# ---------------------------------------------------------------------------- CodeI/O hidden tests
def test_codeio_hidden_tests_hold_the_reference_and_reject_wrong_solutions(box, tmp_path):
    tasks = {t.task_id: t for t in codeio.load_tasks(limit=5)}
    cache = tmp_path / "cache.jsonl"
    problems, errors = load_codeio(5, cache=str(cache), sandbox=box, progress=False)
    assert len(problems) + len(errors) == 5 and len(problems) >= 3
    assert all(p.meta["cases"] >= 1 and p.entry_point == "main_solution" for p in problems)
    replies = [[codeio.reply_text(tasks[p.task_id]), "```python\ndef main_solution(**kw):\n    return None\n```"]
               for p in problems]
    verdicts = judge(problems, replies, box, timeout=5, progress=False)
    assert [[v.passed for v in vs] for vs in verdicts] == [[True, False]] * len(problems), verdicts
    assert all(vs[1].error == "AssertionError" for vs in verdicts)

    class NoRuns:  # a second load must come from the cache
        max_workers = 1

        def run_many(self, jobs):
            raise AssertionError("ran the sandbox for a cached task")

    again, again_errors = load_codeio(5, cache=str(cache), sandbox=NoRuns(), progress=False)
    assert again == problems and again_errors == errors


def test_codeio_comparison_is_tolerant_where_json_is_and_strict_elsewhere():
    cases = [{"input": {"x": 1}, "output": {"a": [1.0, 2.5], "b": True, "c": {"1": "s"}, "d": float("nan"), "e": 7}}]
    tests = codeio_tests(cases)

    def passes(value) -> bool:
        try:
            exec(tests, {"main_solution": lambda x: value})
        except AssertionError:
            return False
        return True

    assert passes({"a": (1.0 + 1e-9, 2.5), "b": True, "c": {1: "s"}, "d": math.nan, "e": 7.0})
    assert not passes({"a": [1.001, 2.5], "b": True, "c": {"1": "s"}, "d": math.nan, "e": 7})   # float off
    assert not passes({"a": [1.0, 2.5], "b": 1, "c": {"1": "s"}, "d": math.nan, "e": 7})        # 1 is not True
    assert not passes({"a": [1.0, 2.5], "b": True, "c": {"1": "s"}, "d": 0.0, "e": 7})          # nan is nan only
    assert not passes({"a": [1.0, 2.5], "b": True, "c": {"1": "s"}, "d": math.nan})             # a key missing


def _codeio_file(path, tasks: dict) -> str:
    generator = "def generate_inputs(rng):\n    return {'x': rng.randint(0, 9)}\n"
    with gzip.open(path, "wt") as f:
        for solution in tasks.values():
            f.write(json.dumps({"task_description": "Double x.", "input_output_spec": "Input: x (int)",
                                "code_sample": solution, "input_generator": generator}) + "\n")
    return str(path)


# ---------------------------------------------------------------------------- the pair builder
def test_choose_pairs_rule():
    def c(text, finish="stop"):
        return Completion(text, [], finish)

    completions = [c("wrong"), c("cut", "length"), c("ok-cut", "length"), c("ok"), c("slow"), c("ok"),
                   c("flaky"), c("flaky"), c("syntax"), c("ok2")]
    verdicts = [Verdict(False, "failed", "AssertionError"), Verdict(False, "failed", "NameError"),
                Verdict(True, "passed"), Verdict(True, "passed"), Verdict(False, "timeout"), Verdict(True, "passed"),
                Verdict(True, "passed"), Verdict(False, "failed", "AssertionError"),
                Verdict(False, "failed", "SyntaxError"), Verdict(True, "passed")]
    # chosen: ended turns first (3 ok, 6 flaky, 9 ok2; 5 repeats 3), then 2 cut; rejected: 0 wrong answer,
    # then malformed 1 (cut) and 8 (syntax) in order, then 4 timeout; 7 was also judged passing: never rejected
    assert choose_pairs(completions, verdicts, 10) == [(3, 0), (6, 1), (9, 8), (2, 4)]
    assert choose_pairs(completions, verdicts, 1) == [(3, 0)]
    assert choose_pairs(completions[:2], verdicts[:2], 3) == []


def test_pair_builder_counts_reconcile_and_pairs_follow_the_rule(box, tmp_path):
    add = dict(entry_point="add", source="jsonl", tests="assert add(2, 3) == 5\nassert add(-1, 1) == 0")
    ask = [{"role": "user", "content": "Write add(a, b)."}]
    crafted = [Problem("t/all_pass", ask, **add), Problem("t/all_fail", ask, **add), Problem("t/mixed", ask, **add)]
    good = "```python\ndef add(a, b):\n    return a + b\n```"
    replies = {
        "t/all_pass": [good, "def add(a, b):\n    return b + a\n"],
        "t/all_fail": ["```python\ndef add(a, b):\n    return a - b\n```", "I cannot do that."],
        "t/mixed": ["```python\ndef add(a, b):\n    return a * b\n```",          # 0 wrong answer
                    "```python\ndef add(a, b)\n    return a + b\n```",           # 1 syntax error
                    good,                                                         # 2 passes
                    good,                                                         # 3 the same text again
                    "```python\ndef add(a, b):\n    while True:\n        pass\n```",  # 4 hangs: timeout
                    "```python\ndef add(a, b):\n    return sum((a, b))\n```"],   # 5 passes
        "codeio/0": ["```python\ndef main_solution(x):\n    return 2 * x\n```",
                     "```python\ndef main_solution(x):\n    return None\n```"],
    }
    source = _codeio_file(tmp_path / "codeio.jsonl.gz", {
        "codeio/0": "def main_solution(x):\n    return x + x\n",
        "codeio/1": "import not_a_module_anywhere\ndef main_solution(x):\n    return x\n",
        "codeio/2": "def main_solution(x):\n    raise ValueError('no')\n",
        "codeio/3": "import random\ndef main_solution(x):\n    return random.random()\n",
        "codeio/4": "def main_solution(x):\n    return {x}\n",
        "codeio/5": "def main_solution(x):\n    while True:\n        pass\n"})
    codeio_problems, errors = load_codeio(path=source, sandbox=box, timeout=2, progress=False)
    assert [p.task_id for p in codeio_problems] == ["codeio/0"]
    assert {e.task_id: e.reason for e in errors} == {"codeio/1": "missing_module", "codeio/2": "reference_error",
                                                    "codeio/3": "nondeterministic", "codeio/4": "non_json_output",
                                                    "codeio/5": "timeout"}
    problems = crafted + codeio_problems
    calls = []

    def sampler(group):
        calls.append([p.task_id for p in group])
        return [[Completion(text, [], "stop") for text in replies[p.task_id]] for p in group]

    output = tmp_path / "pairs.jsonl"
    summary = build_pairs(problems, errors, sampler, box, str(output), pairs_per_problem=3, timeout=1.0,
                          group_size=2, config={"n": 2}, progress=False)
    assert calls == [["t/all_pass", "t/all_fail"], ["t/mixed", "codeio/0"]]
    assert {k: summary[k] for k in ("problems_in", "paired", "all_passed", "all_failed", "errors", "samples",
                                    "samples_by_status", "pairs_written")} == {
        "problems_in": 9, "paired": 2, "all_passed": 1, "all_failed": 1,
        "errors": {"missing_module": 1, "non_json_output": 1, "nondeterministic": 1, "reference_error": 1,
                   "timeout": 1},
        "samples": 12, "samples_by_status": {"failed": 5, "passed": 6, "timeout": 1}, "pairs_written": 4}
    pairs = [json.loads(line) for line in output.read_text().splitlines()]
    mixed = replies["t/mixed"]
    assert [(p["task_id"], p["chosen"][0]["content"], p["rejected"][0]["content"], p["rejected_status"])
            for p in pairs] == [("t/mixed", mixed[2], mixed[0], "failed"), ("t/mixed", mixed[5], mixed[1], "failed"),
                                ("t/mixed", mixed[2], mixed[4], "timeout"),
                                ("codeio/0", replies["codeio/0"][0], replies["codeio/0"][1], "failed")]
    assert pairs[0]["prompt"] == ask and pairs[0]["chosen"][0]["role"] == "assistant"
    assert pairs[1]["rejected_error"] == "SyntaxError"
    assert pairs[0]["statuses"] == ["failed", "failed", "passed", "passed", "timeout", "passed"]
    assert json.loads((tmp_path / "pairs_summary.json").read_text())["pairs_written"] == 4

    # Resume: everything recorded is skipped; a problem interrupted after its pairs is redone once.
    def no_sampling(group):
        raise AssertionError(f"sampled again: {[p.task_id for p in group]}")

    again = build_pairs(problems, errors, no_sampling, box, str(output), pairs_per_problem=3, timeout=1.0,
                        config={"n": 2}, progress=False)
    assert again["resumed_problems"] == 9 and again["pairs_written"] == 4
    outcomes = tmp_path / "pairs_outcomes.jsonl"
    lines = outcomes.read_text().splitlines()
    outcomes.write_text("\n".join(line for line in lines if '"t/mixed"' not in line) + "\n")
    calls.clear()
    resumed = build_pairs(problems, errors, sampler, box, str(output), pairs_per_problem=3, timeout=1.0,
                          config={"n": 2}, progress=False)
    assert calls == [["t/mixed"]] and resumed["resumed_problems"] == 8
    assert {k: v for k, v in resumed.items() if k not in ("resumed_problems", "wall_seconds")} == \
        {k: v for k, v in summary.items() if k not in ("resumed_problems", "wall_seconds")}
    assert sorted(output.read_text().splitlines()) == sorted(json.dumps(p, ensure_ascii=False) for p in pairs)
    with pytest.raises(ValueError, match="other settings"):
        build_pairs(problems, errors, sampler, box, str(output), pairs_per_problem=1, config={"n": 2}, progress=False)


# ---------------------------------------------------------------------------- sampling with the engine
def test_sample_completions_through_the_engine(tmp_path):
    from megatron_seed.data.chat import load_chat_tokenizer
    from megatron_seed.inference.engine import InferenceModel, generate

    from test_convert import make_hf

    make_hf(tmp_path / "hf", heads=4, kv=2, hidden=64, tied=False)
    model = InferenceModel.from_hf(str(tmp_path / "hf"), torch.float32)
    chat = load_chat_tokenizer("byte")
    problems = [Problem("p/0", [{"role": "user", "content": "Write f."}], "pass"),
                Problem("p/1", [{"role": "user", "content": "Write a longer g, please."}], "pass")]
    out = sample_completions(model, chat, problems, 3, 12, temperature=0.9, top_p=0.95, seed=1, batch_size=2,
                             progress=False)
    assert [len(cs) for cs in out] == [3, 3]
    for cs in out:
        for c in cs:
            stopped = c.token_ids[-1:] == [chat.end_of_turn_id]
            assert c.finish_reason == ("stop" if stopped else "length")
            assert stopped or len(c.token_ids) == 12
            assert c.text == chat.decode(c.token_ids[:-1] if stopped else c.token_ids)
    assert out == sample_completions(model, chat, problems, 3, 12, temperature=0.9, top_p=0.95, seed=1,
                                     batch_size=2, progress=False)  # the seed decides
    assert len({tuple(c.token_ids) for cs in out for c in cs}) > 1  # sampled, not one greedy reply

    # Stopping: with a token the greedy reply emits as end of turn, the reply ends there, token kept.
    prompt = [int(i) for i in chat.encode_prompt(problems[0].messages)]
    greedy = generate(model, [prompt], 12, greedy=True, eos_id=None)[0]
    k = next(i for i in range(1, len(greedy)) if greedy[i] not in greedy[:i])

    class EndsAt:
        def __init__(self, tok, eot):
            self._tok, self.end_of_turn_id, self.pad_id = tok, eot, tok.pad_id

        def __getattr__(self, name):
            return getattr(self._tok, name)

    [[stop]] = sample_completions(model, EndsAt(chat, greedy[k]), problems[:1], 1, 12, temperature=0,
                                  progress=False)
    assert stop == Completion(chat.decode(greedy[:k]), greedy[:k + 1], "stop")


def test_chat_mode_evaluation_cli(tmp_path):
    from megatron_seed.evaluate.code import main as evaluate_main

    from test_convert import make_hf

    make_hf(tmp_path / "hf", heads=4, kv=2, hidden=64, tied=False)
    out = tmp_path / "results.jsonl"
    assert evaluate_main(["--problems", "humaneval", "--chat", "--hf", str(tmp_path / "hf"), "--tokenizer", "byte",
                          "--dtype", "fp32", "--limit", "2", "--n", "2", "--k", "1,2,5", "--max-new-tokens", "6",
                          "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["task_id"] for r in rows] == ["HumanEval/0"] * 2 + ["HumanEval/1"] * 2
    assert all(r["passed"] is False and r["result"] == "failed" and r["finish_reason"] in ("stop", "length")
               for r in rows)  # a random model's six tokens are no solution
