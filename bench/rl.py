"""Seconds per RL (GRPO) step on CPU: megatron-seed vs TRL's GRPOTrainer, in the same run.

    python bench/rl.py [--prompts 2] [--group 4] [--max-new-tokens 128] [--micro-batch 0] [--warmup 1]
                       [--steps 3] [--precision auto|bf16|fp32] [--test-timeout 5] [--threads N]
                       [--ours "key=value ..."] [--quick]

Model: SmolLM2-135M-Instruct, as in bench/sft.py and bench/dpo.py (TRL loads the HF directory, ours
the megatron checkpoint converted from it). Problems: the 16 ``starter`` problems
(megatron_seed.evaluate.problems), their chat messages as the prompt (conversational format for
TRL: ``prompt`` = the messages list); ``data.seq_length`` is set to the longest prompt plus
``--max-new-tokens`` (rounded up to 16) so that ours drops none. The bench checks that TRL's chat
template gives exactly our prompt token ids.

Same prompts in every step: the bench reads the order in which ours deals the problems (its
``ProblemPool`` for the run's seed; no problem retires, see below) and gives TRL its dataset in that
order with ``shuffle_dataset=False``, so step k samples the same ``--prompts`` problems on both
sides; checked afterwards against the task ids each side actually scored (ours:
rollouts.jsonl; TRL: the reward function's ``task_id`` column).

Same sampling: ``--group`` samples per prompt (TRL: ``num_generations``), at most
``--max-new-tokens`` new tokens (TRL: ``max_completion_length``), temperature 0.6, top-p 1 (TRL: top-k
off, no min-p, no repetition penalty), stopping at ``<|im_end|>`` (TRL: the tokenizer's and the
generation config's eos, the same id). The samples themselves differ (different RNGs and kernels),
so the completion lengths differ: besides seconds per step, the bench prints seconds per 1k
generated tokens and rollout tokens/s, which do not depend on how long the replies came out.
Ours: its rollout engine (``rl.engine=local``, default ``rl.engine_batch_size``; weights synced
in memory from the trainer each step). TRL: ``transformers`` ``generate`` on the policy itself (no
vLLM on CPU), the whole generation batch in one call, left-padded.

Same reward: unit tests in our sandbox, 1.0 if the reply's program passes the problem's tests else
0.0 (megatron_seed.evaluate.judge, ``--test-timeout`` 5 s per program, 2 sandbox workers on both
sides). Ours: ``rl.format=none`` (no format check, so its default reward is exactly that rule);
TRL: a reward function ``unit_tests(prompts, completions, task_id, **kwargs)`` that takes the reply
text (``completions[i][-1]["content"]``, decoded without special tokens) and the problem by its task
id (a dataset column, which TRL hands to reward functions) and calls the same ``judge``. Ours
scores a batch's rewards on a worker thread (overlapping the next generation batch when there is
more than one); TRL calls its reward function synchronously.

Same loss and update: DAPO's token-level loss (``loss_type=dapo`` / ``rl.loss=dapo``), clip
epsilon 0.2 low / 0.28 high, no KL (beta 0, no reference model), advantages (reward - group mean) /
(group std + 1e-4), one optimizer step per generation batch (ours: ``rl.updates_per_batch=1``
and ``train.global_batch_size`` = prompts x group; TRL: ``num_iterations=1`` and
``gradient_accumulation_steps`` = ``steps_per_generation`` = prompts x group / ``--micro-batch``),
so the ratio's denominator is the step's own detached log-probs on both sides (no extra forward
pass), ``--micro-batch`` rollouts per micro-batch on both sides, the same AdamW setting
(constant lr 1e-6, betas (0.9, 0.999), clip 1.0), no gradient checkpointing / activation
recomputation. Every rollout trains: no dynamic sampling (ours would drop groups whose rewards
are all equal and sample more prompts; TRL has no such step), no curriculum
(``rl.retire_pass_rate=1``), no overlong filtering on either side (``rl.overlong_filter=false``,
TRL's ``mask_truncated_completions=False``: with it on, a step whose rollouts were all cut at the
limit would make no update on ours and be timed without its training phase).
Precision: the precision policy's choice for this CPU on both sides, as in the other benches:
bf16 weights with fp32 main params on ours (rollout engine in bf16 too), fp32 weights with bf16
autocast on TRL (accelerate's mixed precision, which also covers its ``generate``, printed).

Timing: each side runs in its own process (bench/isolated.py), ``--warmup`` untimed steps, then
the median seconds per optimizer step over ``--steps`` steps (ours: metrics.jsonl's
``step_time_s``; TRL: a callback's clock from one ``on_step_end`` to the next, so both include
everything the step does). The split, per step: ours from metrics.jsonl: ``sync`` (weights into
the rollout engine), ``rollout`` (generation), ``reward`` (the main thread's wait for the rewards;
their own time on the worker thread printed beside it), ``train`` (forward, backward, optimizer
step), ``other`` (the rest: collating rows, selection, logging). TRL, by wrapping its methods:
``rollout`` (``_generate_single_turn``: padding and ``generate``), ``reward``
(``_calculate_rewards``), ``other`` (the rest of ``_generate_and_score_completions``: chat template,
decoding, advantages, metrics), ``train`` (the step's time outside
``_generate_and_score_completions``: forward and backward of every micro-batch, optimizer step,
logging); it has no weight sync (it generates with the training model). Tokens: the generated
tokens (``<|im_end|>`` included where a reply stopped) of the measured steps; rollout tokens/s =
those over the rollout seconds. Peak RSS: each side's process. ``--threads N`` sets torch's
threads on both sides (default: torch's own, one per core). On a machine shared with other work,
all-core threads distort the comparison badly: every parallel region waits for its descheduled
thread, and TRL's ``generate`` (many small kernels per token) suffers far more than ours (on this
2-core machine under a load of ~3.5, TRL's smoke step took 51 s with 2 threads and 4.9 s with 1);
the bench warns when the load says so, and ``--threads 1`` is the fairer choice then.

Prints the CPU and the precision, each side, the ratios (TRL s/step / ours s/step, and the same on
seconds per 1k generated tokens) and the goal: ours at least 3x faster per step, met or not met.
A side that fails stops the bench with its output and exit status 1, as does a mismatch in the
prompts of a step. ``--quick``: a smoke run (1 prompt x 2 samples, 16 new tokens, 1 warm-up + 1
measured step).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from finetune_common import (SEED, Optim, SideFailed, failed, free_port, model_line,  # noqa: E402
                             precision_line, run_alternating, smollm2_checkpoints, step_clock,
                             trl_training_args)
from isolated import peak_rss_gib, report  # noqa: E402

GOAL_SPEEDUP = 3.0
OPTIM = Optim(lr=1e-6)  # TRL's GRPO default
TEMPERATURE, TOP_P = 0.6, 1.0  # ours' defaults
CLIP_LOW, CLIP_HIGH = 0.2, 0.28
SANDBOX_WORKERS = 2
PROBLEMS = "starter"
SIDES = ("ours", "trl")
PHASES = ("sync", "rollout", "reward", "train", "other")


# ---------------------------------------------------------------------------------------- inputs
def load_prompts(hf_dir: str) -> tuple[list, list[list[int]]]:
    """The starter problems and our prompt token ids; stops if TRL's chat template tokenizes any
    prompt differently."""
    from transformers import AutoTokenizer

    from megatron_seed.data.chat import load_chat_tokenizer
    from megatron_seed.evaluate.problems import load_training_problems

    problems, errors = load_training_problems(PROBLEMS, progress=False)
    if errors:
        raise SystemExit(f"{len(errors)} {PROBLEMS} problems could not be built: {errors[:3]}")
    chat, tokenizer = load_chat_tokenizer(hf_dir), AutoTokenizer.from_pretrained(hf_dir)
    ids = []
    for p in problems:
        ours = [int(i) for i in chat.encode_prompt(p.messages)]
        # What TRL's _tokenize_prompts does for a conversational prompt.
        theirs = tokenizer.apply_chat_template(p.messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
        if list(theirs) != ours:
            raise SystemExit(f"{p.task_id}: TRL's prompt has {len(theirs)} token ids, ours {len(ours)}, not the same")
        ids.append(ours)
    if chat.end_of_turn_id != tokenizer.eos_token_id:
        raise SystemExit(f"ours stops at token {chat.end_of_turn_id}, TRL at {tokenizer.eos_token_id}")
    return problems, ids


def ours_problem_order(count: int, prompts: int, steps: int) -> list[list[int]]:
    """The problems (indices) our trainer samples in each step: its pool for the run's seed, with
    no problem retiring (``rl.retire_pass_rate=1``) and no refill round (no dynamic sampling)."""
    from megatron_seed.training.objectives.rl_sampling import ProblemPool

    pool = ProblemPool(count, SEED, retire_pass_rate=1.0)
    return [pool.take(prompts) for _ in range(steps)]


# ------------------------------------------------------------------------------------ the sides
def _ours(a: argparse.Namespace, precision: str) -> dict:
    import torch

    from megatron_seed.rl import main as rl_main

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    run_dir, cache = (os.path.join(a.workdir, f"ours_{part}_{os.getpid()}") for part in ("run", "cache"))
    rollouts = a.prompts * a.group
    argv = ["--preset", "smollm2_135m", f"train.load={a.ckpt}", "train.finetune=true",
            f"data.tokenizer={a.hf}", f"data.cache_dir={cache}", f"data.seq_length={a.seq}",
            f"rl.problems={PROBLEMS}", f"rl.prompts_per_step={a.prompts}", f"rl.group_size={a.group}",
            f"rl.max_new_tokens={a.max_new_tokens}", f"rl.temperature={TEMPERATURE}", f"rl.top_p={TOP_P}",
            "rl.loss=dapo", f"rl.clip_low={CLIP_LOW}", f"rl.clip_high={CLIP_HIGH}", "rl.kl_coef=0",
            "rl.updates_per_batch=1", "rl.tis_cap=0", "rl.overlong_filter=false", "rl.overlong_buffer=0",
            "rl.dynamic_sampling=false", "rl.retire_pass_rate=1.0", "rl.format=none",
            f"rl.test_timeout={a.test_timeout}", f"rl.sandbox_workers={SANDBOX_WORKERS}", "rl.engine=local",
            "rl.log_rollouts=true",
            f"train.micro_batch_size={a.micro_batch}", f"train.global_batch_size={rollouts}",
            f"train.steps={a.warmup + a.steps}", f"train.precision={precision}", "train.recompute=none",
            f"train.seed={SEED}", f"train.run_dir={run_dir}", "train.tensorboard=false", "train.log_interval=1",
            *OPTIM.overrides(), *a.ours.split()]
    status = rl_main(argv)
    if status:
        raise SystemExit(f"megatron_seed.rl exited with status {status}")
    peak, load = peak_rss_gib(), os.getloadavg()[0]
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    with open(os.path.join(run_dir, "rollouts.jsonl")) as f:
        groups = [json.loads(line) for line in f]
    steps = a.warmup + a.steps
    if len(records) != steps:
        raise SystemExit(f"ours logged {len(records)} steps, {steps} expected")
    tasks: list[list[str]] = [[] for _ in range(steps)]
    tokens, samples = [0] * steps, [0] * steps
    for g in groups:
        k = g["step"] - 1
        tasks[k].append(g["task_id"])
        tokens[k] += sum(len(r) for r in g["responses"])
        samples[k] += len(g["responses"])
    phases: dict[str, list[float]] = {name: [] for name in PHASES}
    for r in records:
        parts = {"sync": r.get("sync_seconds", 0.0), "rollout": r["rollout_seconds"],
                 "reward": r["reward_wait_seconds"], "train": r["train_seconds"]}
        parts["other"] = r["step_time_s"] - sum(parts.values())
        for name in PHASES:
            phases[name].append(parts[name])
    return {"step_s": [r["step_time_s"] for r in records], "phases": phases,
            "reward_own_s": [r["reward_seconds"] for r in records], "tokens": tokens, "samples": samples,
            "tasks": tasks, "reward_mean": [round(r["reward_mean"], 3) for r in records],
            "loss": [round(r["loss"], 4) for r in records],
            "skipped": sum(r.get("update_skipped", 0.0) for r in records),
            "peak_rss_gib": peak, "load": load, "threads": torch.get_num_threads()}


def _trl(a: argparse.Namespace, precision: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from megatron_seed.evaluate.judge import judge
    from megatron_seed.evaluate.problems import load_training_problems
    from megatron_seed.sandbox import Sandbox

    steps = a.warmup + a.steps
    # The phases, timed where the trainer calls them; keyed by the optimizer step in progress.
    timed: dict[str, list[float]] = {name: [0.0] * steps for name in ("rollout", "reward", "phase")}
    tokens, samples = [0] * steps, [0] * steps
    tasks: list[list[str]] = [[] for _ in range(steps)]

    def clocked(name: str, fn, count=None):
        def wrapper(self, *args, **kwargs):
            start = time.perf_counter()
            out = fn(self, *args, **kwargs)
            k = self.state.global_step
            timed[name][k] += time.perf_counter() - start
            if count is not None:
                count(k, out)
            return out
        return wrapper

    def count_tokens(k, out):
        completion_ids, _ = out
        tokens[k] += sum(len(ids) for ids in completion_ids)
        samples[k] += len(completion_ids)

    GRPOTrainer._generate_single_turn = clocked("rollout", GRPOTrainer._generate_single_turn, count_tokens)
    GRPOTrainer._calculate_rewards = clocked("reward", GRPOTrainer._calculate_rewards)
    GRPOTrainer._generate_and_score_completions = clocked("phase", GRPOTrainer._generate_and_score_completions)

    problems, _ = load_training_problems(PROBLEMS, progress=False)
    by_id = {p.task_id: p for p in problems}
    sandbox = Sandbox(max_workers=SANDBOX_WORKERS)
    holder: dict = {}

    def unit_tests(prompts, completions, task_id, **kwargs):
        """1.0 when the reply's program passes the problem's tests in our sandbox, else 0.0."""
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        verdicts = judge([by_id[t] for t in task_id], [[t] for t in texts], sandbox, timeout=a.test_timeout,
                         progress=False)
        k = holder["trainer"].state.global_step
        tasks[k] += [t for i, t in enumerate(task_id) if i == 0 or task_id[i - 1] != t]
        return [1.0 if row[0].passed else 0.0 for row in verdicts]

    with open(a.prompts_trl, encoding="utf-8") as f:
        dataset = Dataset.from_list([json.loads(line) for line in f])
    tokenizer = AutoTokenizer.from_pretrained(a.hf)
    model = AutoModelForCausalLM.from_pretrained(a.hf, dtype=torch.float32, attn_implementation="sdpa")
    rollouts = a.prompts * a.group
    config = GRPOConfig(
        num_generations=a.group, max_completion_length=a.max_new_tokens, temperature=TEMPERATURE, top_p=TOP_P,
        top_k=0, min_p=None, repetition_penalty=1.0, use_vllm=False, beta=0.0, num_iterations=1,
        epsilon=CLIP_LOW, epsilon_high=CLIP_HIGH, loss_type="dapo", scale_rewards="group",
        mask_truncated_completions=False, importance_sampling_level="token",
        # The prompts come in the order ours deals them (see the module docstring).
        shuffle_dataset=False, remove_unused_columns=False, log_completions=False,
        # steps_per_generation defaults to the accumulation: one generation batch = one optimizer step.
        **trl_training_args(output_dir=os.path.join(a.workdir, "trl"), precision=precision, optim=OPTIM,
                            micro_batch=a.micro_batch, accumulation=rollouts // a.micro_batch, steps=steps),
    )
    if config.generation_batch_size != rollouts or config.steps_per_generation != rollouts // a.micro_batch:
        raise SystemExit(f"TRL generates {config.generation_batch_size} rollouts every "
                         f"{config.steps_per_generation} micro-batches, not {rollouts} per optimizer step")
    clock = step_clock()
    trainer = GRPOTrainer(model=model, reward_funcs=[unit_tests], args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[clock])
    holder["trainer"] = trainer
    try:
        trainer.train()
    finally:
        sandbox.close()
    peak, load = peak_rss_gib(), os.getloadavg()[0]
    marks = [t for t, _ in clock.marks]
    step_s = [marks[k] - marks[k - 1] for k in range(1, len(marks))]
    if len(step_s) != steps:
        raise SystemExit(f"TRL ran {len(step_s)} steps, {steps} expected")
    phases = {"sync": [0.0] * steps, "rollout": timed["rollout"], "reward": timed["reward"],
              "other": [p - g - r for p, g, r in zip(timed["phase"], timed["rollout"], timed["reward"])],
              "train": [s - p for s, p in zip(step_s, timed["phase"])]}
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {"step_s": step_s, "phases": phases, "reward_own_s": timed["reward"], "tokens": tokens,
            "samples": samples, "tasks": tasks, "reward_mean": [round(h["reward"], 3) for h in logs],
            "loss": [round(h["loss"], 4) for h in logs], "skipped": 0,
            "peak_rss_gib": peak, "load": load, "threads": torch.get_num_threads(),
            "mixed_precision": str(trainer.accelerator.state.mixed_precision)}


# ----------------------------------------------------------------------------------------- main
def warn_if_loaded(results: dict[str, dict]) -> None:
    """As finetune_common.warn_if_shared, with this bench's remedy: the 1-minute load as a side
    finished, above its own busy threads, means other processes shared the cores."""
    busy = {name: r["load"] for name, r in results.items() if r["load"] > r["threads"] + 1}
    if busy:
        print(f"[bench] WARNING: measured under load: other processes were using the CPUs ({os.cpu_count()}) "
              f"during the run: 1-minute load {', '.join(f'{k} {v:.1f}' for k, v in busy.items())}; these figures "
              f"are distorted (most for the side with more, smaller parallel regions): run it again on an idle "
              f"machine" + (", or with --threads 1" if any(r["threads"] > 1 for r in results.values()) else ""),
              flush=True)


def summarize(r: dict, warmup: int) -> dict:
    """The measured steps' median step time and phases, and their generated tokens."""
    m = slice(warmup, None)
    step_s, tokens, samples = r["step_s"][m], sum(r["tokens"][m]), sum(r["samples"][m])
    rollout_s = sum(r["phases"]["rollout"][m])
    return {"median_step_s": statistics.median(step_s), "total_s": sum(step_s),
            "phases": {k: statistics.median(v[m]) for k, v in r["phases"].items()},
            "reward_own_s": statistics.median(r["reward_own_s"][m]), "tokens": tokens, "samples": samples,
            "mean_len": tokens / max(samples, 1), "tokens_per_s": tokens / max(rollout_s, 1e-9),
            "s_per_1k": sum(step_s) / max(tokens / 1000, 1e-9)}


def _side_line(name: str, r: dict, s: dict, steps: int) -> str:
    ph = s["phases"]
    split = " + ".join(f"{k} {ph[k]:.2f}" for k in PHASES if not (k == "sync" and name.strip() == "TRL"))
    return (f"{name}: {s['median_step_s']:.2f} s/step median (= {split} s, medians; reward's own time "
            f"{s['reward_own_s']:.2f} s) | {s['s_per_1k']:.2f} s per 1k generated tokens | rollout "
            f"{s['tokens_per_s']:.1f} tokens/s | {s['tokens']} tokens in {s['samples']} completions over {steps} "
            f"steps, mean length {s['mean_len']:.1f} | {r['threads']} threads, load {r['load']:.1f}, process "
            f"{r['wall_s']:.0f} s | peak RSS {r['peak_rss_gib']:.2f} GiB | reward mean by step {r['reward_mean']}, "
            f"loss by step {r['loss']}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=2, help="prompts (groups) per step, both sides")
    p.add_argument("--group", type=int, default=4, help="samples per prompt (TRL: num_generations)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="new tokens per completion at most, both sides (TRL: max_completion_length)")
    p.add_argument("--micro-batch", type=int, default=0,
                   help="rollouts per micro-batch, both sides (divides --prompts x --group); 0 (default): the "
                        "whole generation batch in one micro-batch, as CPU memory allows at these shapes")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--steps", type=int, default=3, help="measured steps")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                   help="both sides; auto = what megatron_seed.platform.precision picks on this CPU")
    p.add_argument("--test-timeout", type=float, default=5.0, help="seconds per program in the sandbox, both sides")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per side (default: torch's own, one per core); on a machine shared with "
                        "other work, fewer threads than cores keeps the sides from stalling on descheduled ones")
    p.add_argument("--ours", default="", help="space-separated key=value overrides for our run")
    p.add_argument("--quick", action="store_true",
                   help="a tiny smoke run: 1 prompt x 2 samples, 16 new tokens, 1 warm-up + 1 measured step")
    p.add_argument("--_child", choices=SIDES, help=argparse.SUPPRESS)
    for hidden in ("--workdir", "--prompts-trl", "--hf", "--ckpt"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    p.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.quick:
        a.prompts, a.group, a.max_new_tokens, a.micro_batch, a.warmup, a.steps = 1, 2, 16, 2, 1, 1
    if a.prompts < 1 or a.group < 2 or a.max_new_tokens < 1:
        p.error("--prompts and --max-new-tokens must be >= 1, --group >= 2")
    a.micro_batch = a.micro_batch or a.prompts * a.group
    if a.micro_batch < 1 or (a.prompts * a.group) % a.micro_batch:
        p.error(f"--micro-batch {a.micro_batch} must divide --prompts x --group = {a.prompts * a.group}")
    if a.warmup < 0 or a.steps < 1 or a.threads < 0:
        p.error("--warmup and --threads must be >= 0, --steps >= 1")

    precision, header = precision_line(a.precision)
    if a._child:
        if a.threads:
            import torch

            torch.set_num_threads(a.threads)
        report({"ours": _ours, "trl": _trl}[a._child](a, precision))
        return 0

    load_before = os.getloadavg()[0]
    print(f"{header} | 1-minute load before the run {load_before:.1f} ({os.cpu_count()} CPUs)", flush=True)
    a.hf, a.ckpt = smollm2_checkpoints()
    problems, prompt_ids = load_prompts(a.hf)
    longest = max(len(ids) for ids in prompt_ids)
    a.seq = -(-(longest + a.max_new_tokens) // 16) * 16
    total = a.warmup + a.steps
    order = ours_problem_order(len(problems), a.prompts, total)
    planned = [[problems[i].task_id for i in step] for step in order]
    a.workdir = tempfile.mkdtemp(prefix="bench_rl_")
    try:
        a.prompts_trl = os.path.join(a.workdir, "prompts_trl.jsonl")
        with open(a.prompts_trl, "w", encoding="utf-8") as f:
            for step in order:
                f.writelines(json.dumps({"prompt": problems[i].messages, "task_id": problems[i].task_id}) + "\n"
                             for i in step)
        print(model_line(a.hf), flush=True)
        print(f"prompts: the {len(problems)} {PROBLEMS} problems' chat messages ({min(map(len, prompt_ids))}-"
              f"{longest} tokens, identical token ids on both sides), dealt in ours' pool order, the same "
              f"{a.prompts} per step on both sides; ours data.seq_length={a.seq}", flush=True)
        print(f"step: {a.prompts} prompts x {a.group} samples = {a.prompts * a.group} rollouts, <= "
              f"{a.max_new_tokens} new tokens, temperature {TEMPERATURE}, top-p {TOP_P:g} | one optimizer step "
              f"per generation batch, micro-batch {a.micro_batch} x {a.prompts * a.group // a.micro_batch} "
              f"accumulated | ours: rollout engine (local) | TRL: transformers generate, no vLLM", flush=True)
        print(f"both: loss dapo, clip {CLIP_LOW:g}/{CLIP_HIGH:g}, beta 0 (no reference model), group-scaled "
              f"advantages, every rollout trained (no dynamic sampling, curriculum or overlong filter) | reward: "
              f"unit tests in our sandbox (1.0 pass / 0.0), {SANDBOX_WORKERS} workers, {a.test_timeout:g} s per "
              f"program, no format check | {OPTIM.line()} | no activation recomputation | {a.warmup} warm-up + "
              f"{a.steps} measured steps" + (f" | ours with {a.ours}" if a.ours else ""), flush=True)
        common = ["--prompts", str(a.prompts), "--group", str(a.group), "--max-new-tokens", str(a.max_new_tokens),
                  "--micro-batch", str(a.micro_batch), "--warmup", str(a.warmup), "--steps", str(a.steps),
                  "--precision", precision, "--test-timeout", str(a.test_timeout), "--threads", str(a.threads),
                  "--ours", a.ours,
                  "--workdir", a.workdir, "--prompts-trl", a.prompts_trl, "--hf", a.hf, "--ckpt", a.ckpt,
                  "--seq", str(a.seq)]
        try:
            runs = run_alternating(__file__, SIDES, common, 1)
        except SideFailed as err:
            return failed(err)
    finally:
        shutil.rmtree(a.workdir, ignore_errors=True)

    ours, trl = runs["ours"][0], runs["trl"][0]
    so, st = summarize(ours, a.warmup), summarize(trl, a.warmup)
    print(_side_line("ours", ours, so, a.steps), flush=True)
    print(_side_line(" TRL", trl, st, a.steps) + f" | accelerate mixed precision {trl['mixed_precision']}",
          flush=True)
    warn_if_loaded({"ours": ours, "TRL": trl})
    if ours["tasks"] != planned or trl["tasks"] != planned:
        print(f"[bench] FAILED: the sides did not sample the planned prompts per step: planned {planned}, ours "
              f"{ours['tasks']}, TRL {trl['tasks']}", file=sys.stderr)
        return 1
    rollouts = a.prompts * a.group
    if ours["samples"] != [rollouts] * total or trl["samples"] != [rollouts] * total or ours["skipped"]:
        print(f"[bench] FAILED: not {rollouts} rollouts trained per step: ours {ours['samples']} (skipped updates "
              f"{ours['skipped']:g}), TRL {trl['samples']}", file=sys.stderr)
        return 1
    print(f"same prompts: step by step on both sides {planned}", flush=True)
    speedup = st["median_step_s"] / so["median_step_s"]
    per_token = st["s_per_1k"] / so["s_per_1k"]
    print(f"ratio: s/step TRL / ours = {speedup:.2f}x | s per 1k generated tokens TRL / ours = {per_token:.2f}x | "
          f"rollout tokens/s ours / TRL = {so['tokens_per_s'] / st['tokens_per_s']:.2f}x | train phase TRL / ours "
          f"= {st['phases']['train'] / so['phases']['train']:.2f}x | peak RSS ours / TRL = "
          f"{ours['peak_rss_gib'] / trl['peak_rss_gib']:.2f}x", flush=True)
    print(f"goal (ours >= {GOAL_SPEEDUP:g}x faster per step than TRL): {'met' if speedup >= GOAL_SPEEDUP else 'NOT met'}",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
