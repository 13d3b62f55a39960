"""Sample chat replies to problems with our engine, and judge them in the sandbox.

    model, chat = load_policy(checkpoint="ckpt/")           # megatron_seed.inference.policy; or hf=...
    completions = sample_completions(model, chat, problems, n=8, max_new_tokens=512)
    with Sandbox(max_workers=2) as box:
        verdicts = judge(problems, completions, box)         # verdicts[i][j]: problem i, sample j

The judge is the reward of a reply: :func:`judge_one` (problem + reply text -> :class:`Verdict`)
is what DPO pairs, pass@k and, later, RL rewards all call. A reply passes when its program
(:func:`megatron_seed.evaluate.problems.program`) exits 0 *and* reaches the end of the tests: the
program ends by printing a per-call random marker, so a reply that exits early with status 0
(``sys.exit(0)`` at import) fails instead of passing every test unseen. (A reply that reads its
own program file could still forge the marker; tests beyond that reach need their own process.)
"""

from __future__ import annotations

import re
import secrets
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from typing import Sequence, Union

from megatron_seed.evaluate.problems import Problem, program
from megatron_seed.sandbox.batches import run_in_batches

_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Warning|Iteration))\b")


@dataclass(frozen=True)
class Completion:
    text: str                 # the reply, without the end-of-turn token
    token_ids: list[int]      # what the model generated, the end-of-turn token included when it stopped
    finish_reason: str        # "stop": ended its turn; "length": cut at max_new_tokens


@dataclass(frozen=True)
class Verdict:
    passed: bool
    status: str               # the sandbox's: passed | failed | timeout | out_of_memory | crashed | sandbox_error
    error: str = ""           # the exception that ended a failed run (AssertionError, SyntaxError, ...)
    wall_time: float = 0.0
    stderr_tail: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _log(message: str) -> None:
    print(f"[judge] {message}", file=sys.stderr, flush=True)


def sample_completions(model, chat_tokenizer, problems: Sequence[Problem], n: int, max_new_tokens: int,
                       temperature: float = 0.8, top_p: float = 0.95, seed: int = 0, batch_size: int = 8,
                       progress: bool = True) -> list[list[Completion]]:
    """``n`` replies per problem (``[problem][sample]``), sampled from the chat prompt with the
    engine; a reply stops at the template's end-of-turn token. Rows are batched ``batch_size``
    at a time in problem order; each batch's sampling seed derives from ``seed`` and its first
    row (task id, sample index), so a problem's samples do not depend on the problems sampled
    before it when batches hold whole problems."""
    from megatron_seed.inference.engine import generate

    if n < 1 or batch_size < 1:
        raise ValueError("n and batch_size must be at least 1")
    eot = chat_tokenizer.end_of_turn_id
    prompts = [[int(i) for i in chat_tokenizer.encode_prompt(p.messages)] for p in problems]
    rows = [(i, j) for i in range(len(problems)) for j in range(n)]
    out: list[list[Completion]] = [[] for _ in problems]
    start, tokens = time.time(), 0
    for lo in range(0, len(rows), batch_size):
        batch = rows[lo:lo + batch_size]
        first_task, first_sample = problems[batch[0][0]].task_id, batch[0][1]
        batch_seed = (seed * 1_000_003 + zlib.crc32(first_task.encode()) + first_sample) % (1 << 63)
        generated = generate(model, [prompts[i] for i, _ in batch], max_new_tokens, temperature=temperature,
                             top_p=top_p, greedy=temperature <= 0, eos_id=eot, pad_id=chat_tokenizer.pad_id or 0,
                             seed=batch_seed)
        for (i, _), ids in zip(batch, generated):
            stopped = bool(ids) and ids[-1] == eot
            text = chat_tokenizer.decode(ids[:-1] if stopped else ids)
            out[i].append(Completion(text, list(ids), "stop" if stopped else "length"))
            tokens += len(ids)
        if progress:
            done = lo + len(batch)
            elapsed = max(time.time() - start, 1e-9)
            _log(f"sampled {done}/{len(rows)} replies ({len(problems)} problems x {n}) | "
                 f"{tokens / elapsed:.1f} tokens/s")
    return out


def _error_name(stderr: str) -> str:
    for line in reversed(stderr.strip().splitlines()):
        m = _EXCEPTION_LINE.match(line.strip())
        if m:
            return m.group(1)
    return ""


def _jobs(problem: Problem, text: str, marker: str, limits) -> dict:
    # The marker is printed after the tests on fd 1 (sys.stdout may have been replaced by the reply).
    tail = f"\nimport os as _os\n_os.write(1, b'\\n{marker}\\n')\n"
    return {"code": program(problem, text) + tail, "limits": limits}


def _verdict(result, marker: str) -> Verdict:
    status, error = result.status, _error_name(result.stderr) if result.status != "passed" else ""
    if status == "passed" and marker not in result.stdout:
        # Exit status 0 without reaching the end of the tests: an early exit, or output beyond
        # what the sandbox keeps (a solution to a function problem has no reason to print that much).
        status, error = "failed", "ExitedBeforeTestsEnded" if not result.truncated else "OutputTooLarge"
    return Verdict(status == "passed", status, error, result.wall_time, result.stderr[-500:])


def judge(problems: Sequence[Problem], completions: Sequence[Sequence[Union[Completion, str]]], sandbox,
          timeout: float = 5.0, progress: bool = True) -> list[list[Verdict]]:
    """Each reply's program in the sandbox: ``completions[i]`` are replies (text or
    :class:`Completion`) to ``problems[i]``; returns verdicts in the same shape."""
    from megatron_seed.sandbox import Limits

    if len(completions) != len(problems):
        raise ValueError(f"{len(completions)} lists of completions for {len(problems)} problems")
    limits = Limits(wall_seconds=timeout, cpu_seconds=max(1, int(timeout + 0.999)))
    marker = "judge-end-" + secrets.token_hex(8)
    flat = [(i, c.text if isinstance(c, Completion) else c) for i, cs in enumerate(completions) for c in cs]
    jobs = [_jobs(problems[i], text, marker, limits) for i, text in flat]
    results = []
    for batch in run_in_batches(sandbox, jobs):
        results += batch.results
        if progress:
            _log(f"judged {batch.done}/{batch.total} programs | {batch.rate:.1f} programs/s")
    out: list[list[Verdict]] = [[] for _ in problems]
    for (i, _), result in zip(flat, results):
        out[i].append(_verdict(result, marker))
    return out


def judge_one(problem: Problem, text: str, sandbox, timeout: float = 5.0) -> Verdict:
    """One reply's verdict (a reward)."""
    return judge([problem], [[text]], sandbox, timeout, progress=False)[0][0]
