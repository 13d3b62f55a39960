"""Model-centric curation of code, end to end, as datatrove pipelines.

    python -m datatrove_pipelines.curate --input DIR_OR_GLOB --output DIR [--tasks N] [--workers N]
        [--oracle URL|HF_DIR|smollm2] [--oracle-sample 200] [--scorer HF_DIR] [--scorer-base HF_DIR]
        [--drop-fraction 0.1] [--executor local|slurm|ray] [--max-files N] [--no-near-dedup]
        [--tokenizer DIR] [--fim-rate 0.5] [--no-redact] [--quality-classifier PATH --quality-threshold 0.5]

Stages (each a datatrove executor with its own logging dir under OUTPUT/logs; a rerun skips the
tasks that completed, so an interrupted job resumes):

1. ``filter``        read (directory tree: one document per file; or jsonl/parquet) -> file filters
                     -> fastText classifier (``classifiers.py``; only with --quality-classifier)
                     -> 10-gram + MinHash decontamination (--benchmark) -> secrets/PII redaction
                     (``redaction.py``; off with --no-redact) -> OUTPUT/stages/1_filtered
2. ``exact``         SHA256 file + repository dedup (signature, then filter) -> 2_exact
3. ``near``          MinHash near dedup (datatrove's 4 stages, code tokenizer) of files -> 3_dedup,
                     then of repositories (one document each), dropping near-copied repos -> 3_repo_dedup
4. ``oracle``        an LLM rates a deterministic sample with the paper's prompt -> labels.jsonl
5. ``scorer``        a Llama + regression head trained on the labels (unless --scorer is given)
6. ``score``         every file scored (metadata quality_score, 0-10) -> 4_scored
7. ``select``        the bottom --drop-fraction of each language dropped -> OUTPUT/kept (jsonl.gz;
                     also OUTPUT/kept_parquet with --parquet)
   ``repo_level``    kept files of each repository concatenated in dependency order -> OUTPUT/repo_level
8. ``tokenize``      kept files -> Megatron .bin/.idx with SPM FIM (tools/preprocess_data.py)

Executors: ``local`` is what the tests run; ``slurm`` and ``ray`` pass the same pipelines to
datatrove's Slurm/Ray executors and are **not exercised by the test suite**.

``OUTPUT/contamination.jsonl`` lists every file the decontamination dropped: id, path, benchmark,
item, kind (exact: the shared 10-gram; near: the MinHash Jaccard estimate).

``OUTPUT/stats.json`` reconciles documents: files read = kept + dropped per stage and reason;
``OUTPUT/score_histogram.png`` shows the score distribution and the cut. ``OUTPUT/label_audit.json``
(``label_audit.py``) compares the scorer with the oracle on the labels held out of its training
(--audit-fraction; MAE, Spearman, Pearson; headline in stats.json under ``audit``) and counts
scores per bin per language (``score_histograms_by_language.png``).

The command line runs in its own process group (``run_cli_in_own_group``): Ctrl-C, SIGTERM, a
failure or the end of the run also ends datatrove's pool workers, forkserver and Manager.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from typing import Optional

STAGES = ("filter", "exact_signature", "exact_filter", "near_signature", "near_buckets", "near_cluster",
          "near_filter", "near_repo_apply", "oracle", "score", "select")


def log(message: str) -> None:
    print(f"[curate] {message}", file=sys.stderr, flush=True)


def reader_for(spec: str, max_files: int = -1):
    """A datatrove reader for a directory tree of repositories, or jsonl / parquet files."""
    from datatrove.pipeline.readers import JsonlReader, ParquetReader

    from datatrove_pipelines.readers import CodeTreeReader

    if os.path.isdir(spec) and not glob.glob(os.path.join(spec, "*.jsonl*")) \
            and not glob.glob(os.path.join(spec, "*.parquet")):
        return CodeTreeReader(spec, limit=max_files)
    folder, pattern = (spec, None) if os.path.isdir(spec) else (os.path.dirname(spec) or ".", os.path.basename(spec))
    adapter = _record_adapter
    if (pattern or "").endswith(".parquet") or glob.glob(os.path.join(folder, "*.parquet")):
        return ParquetReader(folder, glob_pattern=pattern, adapter=adapter, limit=max_files)
    return JsonlReader(folder, glob_pattern=pattern, adapter=adapter, limit=max_files)


def _record_adapter(self, data: dict, path: str, id_in_file: int | str) -> dict:
    """jsonl/parquet records -> Documents with the metadata the code steps use. Counts every
    record, and records without text (which datatrove's reader then skips) under a reason."""
    from datatrove_pipelines.languages import language_of

    self.stat_update("records")
    if not (data.get("text") or data.get("content")):
        self.stat_update("skipped_empty_text")
    file_path = data.get("path") or data.get("max_stars_repo_path") or ""
    metadata = {k: v for k, v in data.items() if k not in ("text", "content", "id")}
    metadata.setdefault("repo", data.get("repo") or data.get("max_stars_repo_name") or os.path.basename(path))
    metadata.setdefault("path", file_path)
    metadata.setdefault("language", data.get("language") or language_of(file_path) or "unknown")
    return {"text": data.get("text", data.get("content", "")), "id": str(data.get("id", f"{path}/{id_in_file}")),
            "metadata": metadata}


def make_executor(kind: str, pipeline, tasks: int, workers: int, logging_dir: str, depends=None, **slurm):
    if kind == "local":
        from datatrove.executor import LocalPipelineExecutor

        return LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=min(workers, tasks),
                                     logging_dir=logging_dir, depends=depends)
    if kind == "slurm":
        from datatrove.executor import SlurmPipelineExecutor

        return SlurmPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=workers, logging_dir=logging_dir,
                                     depends=depends, job_name=os.path.basename(logging_dir),
                                     partition=slurm.get("partition"), time=slurm.get("time", "24:00:00"))
    if kind == "ray":
        from datatrove.executor import RayPipelineExecutor

        return RayPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=workers, logging_dir=logging_dir,
                                   depends=depends)
    raise ValueError(f"--executor must be local, slurm or ray, not {kind!r}")


def run(args: argparse.Namespace) -> dict:
    from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                                  MinhashDedupFilter)
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter, ParquetWriter

    from datatrove_pipelines.decontamination import BenchmarkDecontaminator, report_adapter
    from datatrove_pipelines.dedup import (CodeMinhashSignature, ExactDedupFilter, ExactDedupSignature, RecordRepos,
                                           RepoAllowList)
    from datatrove_pipelines.repo_level import RepoLevelDocuments
    from datatrove_pipelines.filters import CodeFileFilter
    from datatrove_pipelines.oracle import OracleLabeler
    from datatrove_pipelines.redaction import SecretRedactor
    from datatrove_pipelines.scorer import PercentileFilter, QualityScorer

    out = os.path.abspath(args.output)
    stage_dir = lambda name: os.path.join(out, "stages", name)  # noqa: E731
    logs = lambda name: os.path.join(out, "logs", name)  # noqa: E731
    n, w, ex = args.tasks, args.workers, args.executor
    t0 = time.time()

    def execute(name, pipeline, tasks=n):
        log(f"stage {name} ({tasks} task(s))")
        make_executor(ex, pipeline, tasks, w, logs(name)).run()

    # Redaction after the filters (they judge the original text, and fewer files are scanned) and
    # before dedup and the first write: no intermediate stage holds a secret, and copies differing
    # only in their keys hash alike.
    redact = [SecretRedactor(args.max_redacted_fraction)] if args.redact else []
    # Dropped files go through an exclusion writer that keeps only the report fields: one file per
    # task written by datatrove itself (no shared file between workers; a rerun task rewrites its
    # own), merged into contamination.jsonl at the end.
    report = JsonlWriter(os.path.join(out, "contamination"), output_filename="${rank}.jsonl", compression=None,
                         adapter=report_adapter)
    decontaminate = BenchmarkDecontaminator(args.benchmark or ["humaneval"], exclusion_writer=report,
                                            near_threshold=None if args.no_near_match else args.near_match_threshold)
    # The fastText classifier runs after the cheap file filters and before the costlier
    # decontamination; its drops are counted as filter/dropped_low_classifier_score.
    classify = []
    if args.quality_classifier:
        from datatrove_pipelines.classifiers import ClassifierFilter

        classify = [ClassifierFilter(args.quality_classifier, args.quality_threshold)]
    execute("filter", [reader_for(args.input, args.max_files), CodeFileFilter(), *classify, decontaminate,
                       *redact, JsonlWriter(stage_dir("1_filtered"))])
    execute("exact_signature", [JsonlReader(stage_dir("1_filtered")), ExactDedupSignature(os.path.join(out, "exact"))])
    execute("exact_filter", [JsonlReader(stage_dir("1_filtered")), ExactDedupFilter(os.path.join(out, "exact")),
                             JsonlWriter(stage_dir("2_exact"))])
    deduped = stage_dir("2_exact")
    if args.near_dedup:
        config = MinhashConfig()
        minhash = os.path.join(out, "minhash")
        execute("near_signature", [JsonlReader(deduped), CodeMinhashSignature(os.path.join(minhash, "signatures"),
                                                                                 config=config)])
        execute("near_buckets", [MinhashDedupBuckets(os.path.join(minhash, "signatures"),
                                                     os.path.join(minhash, "buckets"), config=config)],
                tasks=config.num_buckets)
        execute("near_cluster", [MinhashDedupCluster(os.path.join(minhash, "buckets"),
                                                     os.path.join(minhash, "remove_ids"), config=config)], tasks=1)
        execute("near_filter", [JsonlReader(deduped), MinhashDedupFilter(os.path.join(minhash, "remove_ids")),
                                JsonlWriter(stage_dir("3_dedup"))])
        deduped = stage_dir("3_dedup")
        # Repository level: each repository as one document (its files concatenated), MinHash over
        # those, then the files of repositories found to be near copies of another are dropped.
        repos = lambda: [JsonlReader(deduped), RepoLevelDocuments(args.seed, min_files=1)]  # noqa: E731
        execute("near_repo_signature", repos() + [CodeMinhashSignature(os.path.join(minhash, "repo_signatures"),
                                                                       config=config)])
        execute("near_repo_buckets", [MinhashDedupBuckets(os.path.join(minhash, "repo_signatures"),
                                                          os.path.join(minhash, "repo_buckets"), config=config)],
                tasks=config.num_buckets)
        execute("near_repo_cluster", [MinhashDedupCluster(os.path.join(minhash, "repo_buckets"),
                                                          os.path.join(minhash, "repo_remove_ids"), config=config)],
                tasks=1)
        execute("near_repo_filter", repos() + [MinhashDedupFilter(os.path.join(minhash, "repo_remove_ids")),
                                               RecordRepos(os.path.join(minhash, "repos_kept"))])
        execute("near_repo_apply", [JsonlReader(deduped), RepoAllowList(os.path.join(minhash, "repos_kept")),
                                    JsonlWriter(stage_dir("3_repo_dedup"))])
        deduped = stage_dir("3_repo_dedup")
    scorer_dir = args.scorer
    if scorer_dir is None:
        labels = os.path.join(out, "labels.jsonl")
        execute("oracle", [JsonlReader(deduped), OracleLabeler(labels, args.oracle, args.oracle_sample, args.seed,
                                                               max_prompt_tokens=args.oracle_prompt_tokens)],
                tasks=1)
        scorer_dir = os.path.join(out, "scorer")
        if not os.path.exists(os.path.join(scorer_dir, "scorer_metrics.json")):
            from datatrove_pipelines.scorer import train_scorer

            from datatrove_pipelines.oracle import smollm2_hf_dir

            base = args.scorer_base or smollm2_hf_dir()
            log(f"stage scorer: training a regression head on {base}")
            train_scorer(labels, base, scorer_dir, epochs=args.scorer_epochs, max_tokens=args.max_tokens,
                         num_layers=args.scorer_layers, holdout=args.audit_fraction, seed=args.seed)
    execute("score", [JsonlReader(deduped), QualityScorer(scorer_dir, os.path.join(out, "scores"),
                                                          max_tokens=args.max_tokens),
                      JsonlWriter(stage_dir("4_scored"))])
    kept_writer = JsonlWriter(os.path.join(out, "kept"))
    execute("select", [JsonlReader(stage_dir("4_scored")),
                       PercentileFilter(os.path.join(out, "scores"), n, args.drop_fraction), kept_writer]
            + ([ParquetWriter(os.path.join(out, "kept_parquet"))] if args.parquet else []))
    if args.repo_level:
        execute("repo_level", [JsonlReader(os.path.join(out, "kept")), RepoLevelDocuments(args.seed),
                               JsonlWriter(os.path.join(out, "repo_level"))])
    stats = write_stats(out, args)
    if args.commit_samples:
        stats["commits"] = commit_samples_for_input(args.input, os.path.join(out, "commits"), args.commit_samples)
        with open(os.path.join(out, "stats.json"), "w") as f:
            json.dump(stats, f, indent=2)
    write_contamination_report(out)
    if args.tokenize:
        tokenize(out, args)
    from datatrove_pipelines.label_audit import describe

    log(f"done in {time.time() - t0:.0f} s: {stats['documents_in']} files in, {stats['kept']} kept "
        f"-> {os.path.join(out, 'kept')} (stats: {os.path.join(out, 'stats.json')}); {describe(stats['audit'])}")
    return stats


def commit_samples_for_input(input_path: str, output: str, max_commits: int) -> dict:
    """Commit-history samples (datatrove_pipelines.commits) from the git repositories among
    ``--input``: the directory itself if it is a work tree, else its immediate subdirectories that
    are. Writes OUTPUT/commits/commits.jsonl and commits_stats.json; returns the counts."""
    from datatrove_pipelines import commits

    candidates = [input_path] if os.path.isdir(os.path.join(input_path, ".git")) else sorted(
        os.path.join(input_path, d) for d in (os.listdir(input_path) if os.path.isdir(input_path) else [])
        if os.path.isdir(os.path.join(input_path, d, ".git")))
    if not candidates:
        log(f"commit samples: no git repository in {input_path}; none written")
        return {"repos": 0, "commits_in": 0, "kept": 0, "dropped_total": 0, "failed": 0, "reconciles": True}
    stats = commits.build_commit_samples(candidates, output, max_commits=max_commits, log=log)
    return {"repos": len(candidates), "output": stats["output"],
            **{k: stats[k] for k in ("commits_in", "kept", "dropped", "dropped_total", "failed", "reconciles")}}


def write_contamination_report(out: str) -> str:
    """contamination.jsonl: the per-task report files of the decontamination step, in task order."""
    path = os.path.join(out, "contamination.jsonl")
    with open(path + ".tmp", "w", encoding="utf-8") as report:
        for part in sorted(glob.glob(os.path.join(out, "contamination", "*.jsonl"))):
            with open(part, encoding="utf-8") as f:
                report.writelines(line for line in f if line.strip())
    os.replace(path + ".tmp", path)
    return path


def _stage_stats(out: str, name: str) -> dict:
    path = os.path.join(out, "logs", name, "stats.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        steps = json.load(f)
    merged = {}
    for step in steps:
        for key, value in step.get("stats", {}).items():
            merged[f"{step['name']}::{key}"] = value["total"] if isinstance(value, dict) else value
    return merged


def write_stats(out: str, args) -> dict:
    """stats.json: files read = kept + dropped per stage and reason, from datatrove's own stats."""
    from datatrove_pipelines.label_audit import headline, write_label_audit
    from datatrove_pipelines.redaction import SecretRedactor, rule_set_info

    stages = {name: _stage_stats(out, name) for name in STAGES}
    reader = {k.split("::", 1)[1]: v for k, v in stages["filter"].items() if "READER" in k.split("::", 1)[0]}
    documents_in = reader.get("files", reader.get("records", reader.get("documents", 0)))
    # Vendored directories are skipped whole (counted per directory, their files never read).
    dropped = {f"read/{k}": v for k, v in reader.items() if k.startswith("skipped_") and k != "skipped_vendored"}
    redacted, redacted_by_rule = {}, {}
    for name, values in stages.items():
        for key, value in values.items():
            step, stat = key.split("::", 1)
            if "READER" not in step and stat.startswith("dropped_"):
                # The redaction step runs in the filter stage; its drops are reported under its name.
                prefix = "redaction" if step.endswith(SecretRedactor.name) else name
                dropped[f"{prefix}/{stat}"] = dropped.get(f"{prefix}/{stat}", 0) + value
            if step.endswith(SecretRedactor.name) and stat.startswith("redacted_"):
                redacted[stat] = redacted.get(stat, 0) + value
            if step.endswith(SecretRedactor.name) and stat.startswith("rule/"):  # secrets per rule (source)
                redacted_by_rule[stat[5:]] = redacted_by_rule.get(stat[5:], 0) + value
            if name == "near_filter" and stat == "dropped":
                dropped["near_filter/dropped_near_duplicate"] = dropped.get("near_filter/dropped_near_duplicate", 0) + value
    kept = sum(v for k, v in stages["select"].items() if k.endswith("::forwarded") and "FILTER" in k)
    # The scorer's agreement with the oracle on labels it did not train on, and per-language
    # score histograms: label_audit.json beside this file, the headline numbers in it.
    audit = write_label_audit(out, args.scorer or os.path.join(out, "scorer"), args.drop_fraction)
    stats = {"documents_in": documents_in, "kept": kept, "dropped": dropped, "dropped_total": sum(dropped.values()),
             "reconciles": documents_in == kept + sum(dropped.values()),
             "vendored_directories_skipped": reader.get("skipped_vendored", 0), "redacted": redacted,
             "redacted_by_rule": dict(sorted(redacted_by_rule.items())),
             # The secrets rule set (name, version, rules run and skipped): None with --no-redact.
             "redaction_rules": rule_set_info() if getattr(args, "redact", True) else None,
             "drop_fraction": args.drop_fraction, "audit": headline(audit), "stages": stages}
    with open(os.path.join(out, "stats.json"), "w") as f:
        json.dump(stats, f, indent=2)
    _histogram(out, args.drop_fraction)
    return stats


def _histogram(out: str, drop_fraction: float) -> Optional[str]:
    from datatrove_pipelines.label_audit import pyplot, read_scores

    scores = [v for values in read_scores(os.path.join(out, "scores")).values() for v in values]
    if not scores:
        return None
    plt = pyplot("score_histogram.png")
    if plt is None:
        return None
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(scores, bins=40, color="#4472c4")
    ax.axvline(float(np.quantile(scores, drop_fraction)), color="#c00000", linestyle="--",
               label=f"cut: bottom {drop_fraction:.0%} (all languages)")
    ax.set_xlabel("quality score (0-10)")
    ax.set_ylabel("files")
    ax.legend()
    fig.tight_layout()
    path = os.path.join(out, "score_histogram.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def tokenize(out: str, args) -> str:
    from megatron_seed.data import preprocess, tokenizer_training

    kept = sorted(glob.glob(os.path.join(out, "kept", "*.jsonl.gz")))
    tokenizer = args.tokenizer
    if tokenizer is None:
        tokenizer = os.path.join(out, "tokenizer")
        tokenizer_training.train_bpe(tokenizer_training.iter_texts(kept), args.vocab_size, tokenizer)
    prefix = os.path.join(out, "tokens", "code")
    code = preprocess.main(["--input", *kept, "--output-prefix", prefix, "--tokenizer-model", tokenizer,
                            "--append-eod", "--fim-rate", str(args.fim_rate), "--workers", str(args.workers),
                            "--log-interval", "0"])
    if code:
        raise RuntimeError("tokenization of the kept files failed")
    log(f"stage tokenize: {preprocess.output_prefix(prefix, 'text')}.bin/.idx")
    return preprocess.output_prefix(prefix, "text")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m datatrove_pipelines.curate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="a directory of repositories, or jsonl/parquet files (dir or glob)")
    p.add_argument("--output", required=True)
    p.add_argument("--tasks", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--executor", choices=("local", "slurm", "ray"), default="local")
    p.add_argument("--max-files", type=int, default=-1, help="read at most this many files per task (sampling)")
    p.add_argument("--no-near-dedup", dest="near_dedup", action="store_false")
    p.add_argument("--benchmark", action="append", default=None,
                   help="decontaminate against this benchmark (repeatable; default humaneval): humaneval, "
                        "or a jsonl of problems, optionally with its fields: path.jsonl:prompt,canonical_solution")
    p.add_argument("--near-match-threshold", type=float, default=0.7,
                   help="drop files (filter/dropped_near_match) with a window whose MinHash Jaccard estimate with "
                        "a benchmark solution is at least this")
    p.add_argument("--no-near-match", action="store_true", help="only the exact 10-gram decontamination")
    p.add_argument("--oracle", default=None, help="OpenAI-compatible URL, a local HF chat model dir, or smollm2")
    p.add_argument("--oracle-sample", type=int, default=200, help="files the oracle rates")
    p.add_argument("--scorer", default=None, help="a trained scorer (HF dir); skips labelling and training")
    p.add_argument("--scorer-base", default=None, help="HF Llama dir the scorer is trained from (default SmolLM2)")
    p.add_argument("--scorer-epochs", type=int, default=1)
    p.add_argument("--audit-fraction", type=float, default=0.2,
                   help="oracle labels held out of the scorer's training (at least 1): its held-out MAE and "
                        "the oracle-vs-scorer agreement in label_audit.json")
    p.add_argument("--scorer-layers", type=int, default=None,
                   help="keep the first N layers of the scorer's base model (default all): scoring cost scales with it")
    p.add_argument("--oracle-prompt-tokens", type=int, default=1536,
                   help="a local oracle's prompt budget; longer files are cut (the instructions are kept)")
    p.add_argument("--max-tokens", type=int, default=512, help="tokens of each file the scorer reads")
    p.add_argument("--drop-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parquet", action="store_true", help="also write the kept files as parquet (kept_parquet/)")
    p.add_argument("--no-tokenize", dest="tokenize", action="store_false")
    p.add_argument("--no-repo-level", dest="repo_level", action="store_false",
                   help="skip the repository-level documents (long-context data)")
    p.add_argument("--tokenizer", default=None, help="tokenizer for .bin/.idx (default: a BPE trained on the kept files)")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--fim-rate", type=float, default=0.5)
    p.add_argument("--no-redact", dest="redact", action="store_false",
                   help="keep secrets and PII (e-mails, public IPs, keys, tokens) instead of redacting them")
    p.add_argument("--max-redacted-fraction", type=float, default=0.5,
                   help="drop a file (redaction/dropped_mostly_secrets) when more of its text than this is redacted")
    p.add_argument("--commit-samples", type=int, default=0, metavar="N",
                   help="also build commit-history samples from the newest N commits of each git repository "
                        "in --input (OUTPUT/commits/; datatrove_pipelines.commits); 0: none")
    p.add_argument("--quality-classifier", default=None,
                   help="a local fastText model (model.bin or its directory, from python -m "
                        "datatrove_pipelines.classifiers train): keep files it scores >= --quality-threshold")
    p.add_argument("--quality-threshold", type=float, default=0.5,
                   help="minimum positive-class probability (metadata classifier_score)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not 0 <= args.drop_fraction < 1:
        raise SystemExit("--drop-fraction must be in [0, 1)")
    if not 0 < args.max_redacted_fraction <= 1:
        raise SystemExit("--max-redacted-fraction must be in (0, 1]")
    if not 0 <= args.quality_threshold <= 1:
        raise SystemExit("--quality-threshold must be in [0, 1]")
    if args.quality_classifier and not os.path.isfile(args.quality_classifier) \
            and not os.path.isfile(os.path.join(args.quality_classifier, "model.bin")):
        raise SystemExit(f"--quality-classifier {args.quality_classifier}: no fastText model there")
    if not 0 < args.audit_fraction < 1:
        raise SystemExit("--audit-fraction must be in (0, 1)")
    from megatron_seed.platform.processes import run_cli_in_own_group

    code = run_cli_in_own_group("datatrove_pipelines.curate", argv)
    if code is not None:  # this process supervised the run, which is over with its whole group
        return code
    stats = run(args)
    return 0 if stats["reconciles"] else 1


if __name__ == "__main__":  # required: datatrove's local executor re-imports this module in workers
    sys.exit(main())
