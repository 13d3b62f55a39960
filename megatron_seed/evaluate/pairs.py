"""On-policy preference pairs for DPO: the model's own passing and failing replies to code problems.

    python tools/build_dpo_pairs.py --checkpoint CKPT | --hf DIR --problems codeio:500 | FILE.jsonl
        --output pairs.jsonl [--n 8] [--temperature 0.8] [--top-p 0.95] [--max-new-tokens 512]
        [--pairs-per-problem 1] [--seed 0] [--workers 2] [--timeout 5] [--problems-cache FILE]

For each problem: sample N replies (:func:`megatron_seed.evaluate.judge.sample_completions`),
judge each in the sandbox, and when some pass and some fail write pairs in TRL's conversational
format, ``{"prompt": messages, "chosen": [assistant], "rejected": [assistant], ...metadata}``.

The rule (:func:`choose_pairs`). Texts are distinct on each side; a text judged both ways (a
flaky test) is never rejected, nor is an empty reply (nothing to train on). Chosen: passing
replies, those that ended their turn before those cut at the token limit (DPO trains the end of
turn with the chosen reply), then generation order. Rejected, in this order of preference,
generation order within each rank:
  0. a complete reply whose program ran and failed the tests (a wrong answer or an exception):
     the closest contrast to a passing reply, the signal DPO is run for;
  1. a syntax error, or any failing reply cut at the token limit: malformed, an easy negative;
  2. crashed or out of memory;
  3. a timeout: the least certain label (a slow but correct reply, or a loaded machine).
Pair i is (chosen[i mod C], rejected[i mod R]) for i < min(pairs-per-problem, max(C, R)), so
no pair repeats.

Counts (printed and written to OUTPUT_summary.json) reconcile, asserted: problems in = paired +
all passed + all failed + errors by reason (hidden tests that could not be built, sandbox
errors); samples by sandbox status sum to the samples judged; pairs written equal the pair lines
in OUTPUT for these problems. Resumable: each problem's outcome is appended to
OUTPUT_outcomes.jsonl after its pairs, and a re-run with the same output and settings skips the
problems found there (pairs of a problem without an outcome, from an interrupted run, are
removed first). Sandbox errors are not recorded, so a re-run retries those problems.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from typing import Callable, Optional, Sequence

from megatron_seed.data.jsonl import read_jsonl
from megatron_seed.evaluate.judge import Completion, Verdict, judge
from megatron_seed.evaluate.problems import Problem, ProblemError
from megatron_seed.platform.cli import add_check_config, config_ok

_SYNTAX = ("SyntaxError", "IndentationError", "TabError")
REJECTION_RANKS = ("wrong_answer", "malformed", "crashed", "timeout")


def rejection_rank(completion: Completion, verdict: Verdict) -> int:
    """0 wrong answer, 1 malformed (syntax error or cut at the limit), 2 crashed / OOM, 3 timeout."""
    if verdict.status == "timeout":
        return 3
    if verdict.status in ("crashed", "out_of_memory"):
        return 2
    if verdict.error in _SYNTAX or completion.finish_reason != "stop":
        return 1
    return 0


def choose_pairs(completions: Sequence[Completion], verdicts: Sequence[Verdict],
                 pairs_per_problem: int = 1) -> list[tuple[int, int]]:
    """(chosen index, rejected index) pairs of one problem's samples, by the module's rule."""
    passing_texts = {c.text for c, v in zip(completions, verdicts) if v.passed}
    chosen, rejected, seen = [], [], set()
    order = sorted(range(len(completions)), key=lambda i: (completions[i].finish_reason != "stop", i))
    for i in order:
        if verdicts[i].passed and completions[i].text not in seen:
            seen.add(completions[i].text)
            chosen.append(i)
    candidates = [i for i, v in enumerate(verdicts) if not v.passed and v.status != "sandbox_error"
                  and completions[i].text.strip() and completions[i].text not in passing_texts]
    for i in sorted(candidates, key=lambda i: (rejection_rank(completions[i], verdicts[i]), i)):
        if completions[i].text not in seen:
            seen.add(completions[i].text)
            rejected.append(i)
    if not chosen or not rejected:
        return []
    count = min(pairs_per_problem, max(len(chosen), len(rejected)))
    return [(chosen[k % len(chosen)], rejected[k % len(rejected)]) for k in range(count)]


def pair_record(problem: Problem, completions: Sequence[Completion], verdicts: Sequence[Verdict],
                chosen: int, rejected: int) -> dict:
    return {"prompt": problem.messages,
            "chosen": [{"role": "assistant", "content": completions[chosen].text}],
            "rejected": [{"role": "assistant", "content": completions[rejected].text}],
            "task_id": problem.task_id, "source": problem.source,
            "statuses": [v.status for v in verdicts], "chosen_index": chosen, "rejected_index": rejected,
            "rejected_status": verdicts[rejected].status, "rejected_error": verdicts[rejected].error}


def classify(completions: Sequence[Completion], verdicts: Sequence[Verdict], pairs_per_problem: int
             ) -> tuple[dict, list[tuple[int, int]]]:
    """(outcome record without task_id, pairs) of one problem."""
    record = {"samples": len(verdicts), "statuses": dict(Counter(v.status for v in verdicts)),
              "sample_errors": dict(Counter(v.error for v in verdicts if v.error)),
              "finish_reasons": dict(Counter(c.finish_reason for c in completions)), "pairs": 0}
    if any(v.status == "sandbox_error" for v in verdicts):
        return {**record, "outcome": "error", "reason": "sandbox_error"}, []
    passed = sum(v.passed for v in verdicts)
    if passed == len(verdicts):
        return {**record, "outcome": "all_passed"}, []
    if passed == 0:
        return {**record, "outcome": "all_failed"}, []
    pairs = choose_pairs(completions, verdicts, pairs_per_problem)
    if not pairs:  # every failing text also passed once: the tests are not deterministic
        return {**record, "outcome": "error", "reason": "inconsistent_verdicts"}, []
    return {**record, "outcome": "paired", "pairs": len(pairs)}, pairs


def output_paths(output: str) -> tuple[str, str, str]:
    """(outcomes sidecar, summary, default CodeI/O problems cache) next to ``output``."""
    stem = output[:-len(".jsonl")] if output.endswith(".jsonl") else output
    return stem + "_outcomes.jsonl", stem + "_summary.json", stem + "_problems.jsonl"


def _read_lines(path: str) -> list[dict]:
    return read_jsonl(path) if os.path.exists(path) else []


def _append(path: str, rows: list[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        f.flush()
        os.fsync(f.fileno())


def _log(message: str) -> None:
    print(f"[pairs] {message}", file=sys.stderr, flush=True)


def _resume(output: str, outcomes_path: str, config: dict) -> dict[str, dict]:
    """Outcomes of a previous run with ``config``; the pairs file cut back to those problems."""
    rows = _read_lines(outcomes_path)
    if not rows:
        if os.path.exists(output) and os.path.getsize(output):
            raise ValueError(f"{output} exists without {outcomes_path}: not a run to resume; remove it or "
                             "choose another --output")
        with open(outcomes_path, "w", encoding="utf-8") as f:
            f.write(json.dumps({"config": config}) + "\n")
        open(output, "w").close()
        return {}
    if rows[0].get("config") != config:
        raise ValueError(f"{outcomes_path} was written with other settings ({rows[0].get('config')}); "
                         f"re-run with those or choose another --output")
    done = {r["task_id"]: r for r in rows[1:]}
    pairs = _read_lines(output)
    kept = [p for p in pairs if p["task_id"] in done]
    if len(kept) != len(pairs):  # an interrupted problem: its pairs go, the problem is redone
        with open(output, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in kept)
    found = Counter(p["task_id"] for p in kept)
    wrong = [t for t, r in done.items() if found[t] != r["pairs"]]
    if wrong:
        raise ValueError(f"{output} does not hold the pairs {outcomes_path} records for {wrong[:5]}")
    return done


def build_pairs(problems: Sequence[Problem], errors: Sequence[ProblemError],
                sampler: Callable[[list[Problem]], list[list[Completion]]], sandbox, output: str, *,
                pairs_per_problem: int = 1, timeout: float = 5.0, group_size: int = 4,
                config: Optional[dict] = None, progress: bool = True) -> dict:
    """Sample (``sampler``: problems -> replies per problem), judge, write pairs; returns the summary.
    ``errors``: problems that could not be built, counted as errors by reason. ``config``: the
    sampling settings, recorded so that a resumed run is refused if they changed."""
    start = time.time()
    outcomes_path, summary_path, _ = output_paths(output)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    done = _resume(output, outcomes_path, {**(config or {}), "pairs_per_problem": pairs_per_problem})
    resumed = sum(p.task_id in done for p in problems) + sum(e.task_id in done for e in errors)
    outcomes = {t: r for t, r in done.items()}
    new_errors = [{"task_id": e.task_id, "outcome": "error", "reason": e.reason, "samples": 0, "statuses": {},
                   "finish_reasons": {}, "pairs": 0} for e in errors if e.task_id not in done]
    for record in new_errors:
        outcomes[record["task_id"]] = record
    _append(outcomes_path, [r for r in new_errors if r["reason"] != "sandbox_error"])
    todo = [p for p in problems if p.task_id not in done]
    if progress and resumed:
        _log(f"resuming {output}: {resumed} problems done before, {len(todo)} to go")
    for lo in range(0, len(todo), group_size):
        group = list(todo[lo:lo + group_size])
        completions = sampler(group)
        if len(completions) != len(group) or not all(completions):
            raise ValueError(f"the sampler returned {len(completions)} lists of replies for {len(group)} problems "
                             "(each needs at least one)")
        completions = [[c if isinstance(c, Completion) else Completion(c, [], "stop") for c in cs] for cs in completions]
        verdicts = judge(group, completions, sandbox, timeout, progress=False)
        for problem, cs, vs in zip(group, completions, verdicts):
            record, pairs = classify(cs, vs, pairs_per_problem)
            record = {"task_id": problem.task_id, **record}
            _append(output, [pair_record(problem, cs, vs, c, r) for c, r in pairs])
            if record.get("reason") != "sandbox_error":  # machinery, not the problem: retried next run
                _append(outcomes_path, [record])
            outcomes[problem.task_id] = record
        if progress:
            counts = Counter(outcomes[p.task_id]["outcome"] for p in todo[:lo + len(group)])
            rate = (lo + len(group)) / max(time.time() - start, 1e-9) * 60
            _log(f"{lo + len(group)}/{len(todo)} problems | paired {counts['paired']}, all passed "
                 f"{counts['all_passed']}, all failed {counts['all_failed']}, errors {counts['error']} | "
                 f"{rate:.1f} problems/min")
    summary = summarize([outcomes[p.task_id] for p in problems] + [outcomes[e.task_id] for e in errors], output)
    summary.update(resumed_problems=resumed, wall_seconds=round(time.time() - start, 1))
    with open(summary_path, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    return summary


def summarize(records: Sequence[dict], output: str) -> dict:
    """Counts of the problems' outcome records, checked against each other and the pairs file."""
    outcome = Counter(r["outcome"] for r in records)
    errors = Counter(r["reason"] for r in records if r["outcome"] == "error")
    statuses: Counter = Counter()
    finishes: Counter = Counter()
    for r in records:
        statuses.update(r["statuses"])
        finishes.update(r["finish_reasons"])
    ids = {r["task_id"] for r in records}
    lines = sum(p["task_id"] in ids for p in _read_lines(output))
    summary = {"problems_in": len(records), "paired": outcome["paired"], "all_passed": outcome["all_passed"],
               "all_failed": outcome["all_failed"], "errors": dict(sorted(errors.items())),
               "samples": sum(r["samples"] for r in records), "samples_by_status": dict(sorted(statuses.items())),
               "finish_reasons": dict(sorted(finishes.items())), "pairs_written": sum(r["pairs"] for r in records),
               "output": output}
    assert summary["problems_in"] == (summary["paired"] + summary["all_passed"] + summary["all_failed"]
                                      + sum(errors.values())), summary
    assert summary["samples"] == sum(statuses.values()) == sum(finishes.values()), summary
    assert summary["pairs_written"] == lines, (summary, lines)
    return summary


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(prog="tools/build_dpo_pairs.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="our checkpoint (its tokenizer/ directory is used)")
    model.add_argument("--hf", help="a Hugging Face Llama directory")
    p.add_argument("--tokenizer", default=None, help="chat tokenizer spec overriding the model's")
    p.add_argument("--chat-template", default=None, help="Jinja text or a .jinja file overriding the tokenizer's")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto")
    p.add_argument("--problems", required=True, help="codeio[:N], starter (16 simple tasks shipped with the package) or a jsonl file (HumanEval is refused: held out)")
    p.add_argument("--problems-cache", default=None,
                   help="jsonl cache of CodeI/O hidden tests (default: OUTPUT_problems.jsonl)")
    p.add_argument("--codeio-cases", type=int, default=5, help="hidden test inputs per CodeI/O task")
    p.add_argument("--n", type=int, default=8, help="samples per problem")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=None, help="rows per engine batch (default: n)")
    p.add_argument("--output", required=True)
    p.add_argument("--pairs-per-problem", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="sandbox runs at once")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per judged program")
    p.add_argument("--sandbox-url", default=None, help="delegate runs to a sandbox service (see sandbox/remote.py)")
    add_check_config(p)
    args = p.parse_args(argv)
    if config_ok(args, p.prog):
        return 0

    from megatron_seed.evaluate.judge import sample_completions
    from megatron_seed.evaluate.problems import HeldOutError, load_training_problems
    from megatron_seed.inference.policy import load_policy

    if args.sandbox_url:
        from megatron_seed.sandbox.remote import RemoteSandbox

        sandbox = RemoteSandbox(args.sandbox_url, max_workers=args.workers)
    else:
        from megatron_seed.sandbox import Sandbox

        sandbox = Sandbox(max_workers=args.workers)
    try:
        cache = args.problems_cache or output_paths(args.output)[2]
        try:
            problems, errors = load_training_problems(args.problems, cache=cache, sandbox=sandbox,
                                                      seed=args.seed, cases=args.codeio_cases)
        except (HeldOutError, ValueError, FileNotFoundError) as e:
            _log(f"error: {e}")
            return 1
        t0 = time.time()
        policy, chat = load_policy(args.checkpoint, args.hf, args.tokenizer, args.chat_template, args.dtype)
        _log(f"loaded {args.checkpoint or args.hf} in {time.time() - t0:.1f} s; {len(problems)} problems "
             f"(+{len(errors)} without tests), {args.n} samples each")
        batch = args.batch_size or args.n

        def sampler(group):
            return sample_completions(policy, chat, group, args.n, args.max_new_tokens, args.temperature,
                                      args.top_p, args.seed, batch)

        config = {"model": os.path.abspath(args.checkpoint or args.hf), "tokenizer": args.tokenizer,
                  "chat_template": args.chat_template, "n": args.n, "temperature": args.temperature,
                  "top_p": args.top_p, "max_new_tokens": args.max_new_tokens, "seed": args.seed,
                  "timeout": args.timeout}
        try:
            summary = build_pairs(problems, errors, sampler, sandbox, args.output,
                                  pairs_per_problem=args.pairs_per_problem, timeout=args.timeout,
                                  group_size=max(1, batch // args.n), config=config)
        except ValueError as e:
            _log(f"error: {e}")
            return 1
    finally:
        getattr(sandbox, "close", lambda: None)()
    print(json.dumps(summary, indent=2))
    _log(f"{summary['pairs_written']} pairs in {args.output}; summary {output_paths(args.output)[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
