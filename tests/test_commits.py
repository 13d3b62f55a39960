"""Commit-history samples (datatrove_pipelines/commits.py) on small crafted git repositories."""

import json
import os
import subprocess

import pytest

from datatrove_pipelines import commits
from datatrove_pipelines.commits import SECTIONS, CommitConfig, build_commit_samples

# Small limits so that the crafted commits cross them: a 300-character message is too long, a
# 40-line file too large a diff.
CONFIG = CommitConfig(min_message_chars=10, max_message_chars=200, max_diff_lines=30)
TOKENIZER = '''"""Splitting text into words."""


def tokenize_words(line):
    """Whitespace tokenizer: the words of a line, lower-cased."""
    return [word.lower() for word in line.split()]
'''
UNRELATED = '''"""Colours for the terminal."""

PALETTE = {"red": 31, "green": 32, "blue": 34}


def paint(text, colour):
    return f"\\033[{PALETTE[colour]}m{text}\\033[0m"
'''
CLI = '''import sys


def main(argv=None):
    args = sys.argv[1:] if argv is None else argv
    print(args)
'''
# Filler files share no identifier with the BM25 commit's query, only the path's "py".
FILLER = "def area_{i}(radius):\n    return 3.14159 * radius * radius * {i}\n"


def git(repo, *args, env=None):
    """git with a fixed identity and dates, and no user or system configuration."""
    base = {"GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull, "GIT_AUTHOR_DATE": "2024-01-01T00:00:00Z",
            "GIT_COMMITTER_DATE": "2024-01-01T00:00:00Z", "HOME": str(repo)}
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=Test", "-c", "user.email=test@example.com",
                           "-c", "init.defaultBranch=main", *args], check=True, capture_output=True, timeout=30,
                          env={**os.environ, **base, **(env or {})}).stdout.decode().strip()


def commit(repo, message, files=(), allow_empty=False):
    for path, content in dict(files).items():
        target = repo / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content if isinstance(content, bytes) else content.encode())
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message, *(["--allow-empty"] if allow_empty else []))
    return git(repo, "rev-parse", "HEAD")


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    """A repository whose commits each exercise one rule; the shas by name."""
    repo = tmp_path_factory.mktemp("commits") / "proj"
    repo.mkdir()
    git(repo, "init", "-q")
    sha = {"root": commit(repo, "Initial import of the project", {
        "README.md": "# Proj v1\nSplits words.\n", "src/tokenizer.py": TOKENIZER, "src/unrelated.py": UNRELATED,
        "src/cli.py": CLI, **{f"pkg/filler_{i}.py": FILLER.format(i=i) for i in range(8)}})}
    sha["readme"] = commit(repo, "Describe version two and start a changelog", {
        "README.md": "# Proj v2\nSplits words, now faster.\n", "CHANGELOG.md": "v2: faster\n"})
    sha["bm25"] = commit(repo, "Split the command line input with tokenize_words from the tokenizer", {
        "src/cli.py": CLI.replace("import sys\n", "import sys\n\nfrom src.tokenizer import tokenize_words\n")
                         .replace("print(args)", "print([tokenize_words(a) for a in args])")})
    sha["short"] = commit(repo, "wip", {"src/cli.py": CLI + "\n# todo\n"})
    sha["binary"] = commit(repo, "Add the project logo image", {"assets/logo.png": b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR"})
    sha["mixed"] = commit(repo, "Add an icon and print the arguments count", {
        "assets/icon.bin": b"\0\1\2\3" * 16, "src/cli.py": CLI + "\nprint(len(sys.argv))\n"})
    sha["large"] = commit(repo, "Add a table of forty constants", {
        "src/table.py": "".join(f"VALUE_{i} = {i}\n" for i in range(40))})
    sha["long"] = commit(repo, "Tweak " + "very " * 60 + "long message", {"src/table.py": "VALUE = 1\n"})
    sha["empty"] = commit(repo, "An empty commit with a long enough message", allow_empty=True)
    # The same change on two branches, both merged: one patch kept, one duplicate, two merges.
    helper = TOKENIZER + "\n\ndef lower_all(words):\n    return [w.lower() for w in words]\n"
    git(repo, "checkout", "-q", "-b", "a")
    sha["branch_a"] = commit(repo, "Add lower_all to the tokenizer (branch a)", {"src/tokenizer.py": helper})
    git(repo, "checkout", "-q", "main")
    git(repo, "checkout", "-q", "-b", "b")
    sha["branch_b"] = commit(repo, "Add lower_all to the tokenizer (branch b)", {"src/tokenizer.py": helper})
    git(repo, "checkout", "-q", "main")
    git(repo, "merge", "-q", "--no-ff", "a", "-m", "Merge branch a")
    git(repo, "merge", "-q", "--no-ff", "b", "-m", "Merge branch b")
    sha["merge"] = git(repo, "rev-parse", "HEAD")
    out = repo.parent / "out"
    stats = build_commit_samples([repo], out, CONFIG, log=None)
    records = {r["sha"]: r for r in map(json.loads, (out / "commits.jsonl").read_text().splitlines())}
    return repo, sha, stats, records, out


def test_counts_reconcile_with_one_reason_per_crafted_commit(history):
    _, sha, stats, records, out = history
    assert stats == json.loads((out / "commits_stats.json").read_text())
    assert stats["commits_in"] == 13 and stats["failed"] == 0 and stats["reconciles"]
    assert stats["dropped"] == {"merge_commit": 2, "root_commit": 1, "message_too_short": 1, "message_too_long": 1,
                                "empty_diff": 1, "non_text_only": 1, "diff_too_large": 1, "duplicate_patch": 1}
    assert stats["kept"] == 4 == len(records)
    assert stats["commits_in"] == stats["kept"] + stats["dropped_total"] + stats["failed"]
    kept = set(records)
    assert {sha["readme"], sha["bm25"], sha["mixed"]} <= kept
    assert len(kept & {sha["branch_a"], sha["branch_b"]}) == 1  # the same patch once
    for name in ("root", "short", "binary", "large", "long", "empty", "merge"):
        assert sha[name] not in kept, name


def test_template_sections_in_order_and_context_from_the_parent_tree(history):
    _, sha, _, records, _ = history
    record = records[sha["readme"]]
    text = record["text"]
    assert text.startswith(SECTIONS[0] + "\nDescribe version two and start a changelog\n\n")
    positions = [text.index(s) for s in (SECTIONS[1] + "README.md", SECTIONS[2], SECTIONS[4], SECTIONS[5])]
    assert positions == sorted(positions)
    readme = text[positions[0]:positions[1]]
    assert "# Proj v1" in readme and "v2" not in readme  # the README before the commit
    tree = text[positions[1]:text.index("\n\n###", positions[1])]
    assert "CHANGELOG.md" not in tree  # added by this commit: not in the parent tree
    assert "src/\n  cli.py\n" in tree + "\n" and "pkg/\n  filler_0.py" in tree
    assert text[positions[2]:positions[3]].split("\n")[1:3] == ["CHANGELOG.md", "README.md"]
    patch = text[positions[3]:]
    assert "+# Proj v2" in patch and "-# Proj v1" in patch and "+++ b/CHANGELOG.md" in patch
    assert record["parent"] == sha["root"] and record["repo"] == "proj" and record["id"] == f"proj@{sha['readme']}"
    assert record["files"] == ["CHANGELOG.md", "README.md"]


def test_bm25_retrieves_the_related_file_from_the_parent_tree(history):
    _, sha, _, records, _ = history
    record = records[sha["bm25"]]
    related = record["related_files"]
    assert "src/tokenizer.py" in related and len(related) <= 5
    assert related[0] != "src/unrelated.py"
    # Fillers share only the ".py" of their paths with the query: below the related file.
    assert all(related.index("src/tokenizer.py") < i for i, path in enumerate(related) if path.startswith("pkg/"))
    # The related file's section holds its text in the parent tree.
    text = record["text"]
    section = text[text.index(SECTIONS[3] + "src/tokenizer.py"):]
    assert section.split("\n", 1)[1].startswith(TOKENIZER.rstrip())
    # The modified file is not excluded: retrieved (before the change), like any other.
    if "src/cli.py" in related:
        cli = text[text.index(SECTIONS[3] + "src/cli.py"):]
        assert "print(args)" in cli.split(SECTIONS[3], 2)[1]


def test_only_text_files_are_in_the_patch(history):
    _, sha, _, records, _ = history
    record = records[sha["mixed"]]
    assert record["files"] == ["src/cli.py"]
    assert "icon.bin" not in record["text"]
    assert "+print(len(sys.argv))" in record["text"]


def test_byte_limit_and_the_patch_hash_ignores_index_lines_and_line_numbers(history, tmp_path):
    repo, _, _, _, _ = history
    stats = build_commit_samples([repo], tmp_path, CommitConfig(max_diff_lines=30, max_message_chars=200,
                                                                max_diff_bytes=300), log=None)
    assert stats["dropped"]["diff_too_large"] > 1 and stats["reconciles"]
    a = "diff --git a/x b/x\nindex 111..222 100644\n@@ -1,2 +1,3 @@ def f\n+y\n"
    b = "diff --git a/x b/x\nindex 333..444 100644\n@@ -9,2 +9,3 @@ def f\n+y\n"
    assert commits.patch_hash(a) == commits.patch_hash(b) != commits.patch_hash(a.replace("+y", "+z"))


def test_output_is_tokenized_by_preprocess(history, tmp_path):
    from megatron_seed.data import preprocess

    _, _, stats, _, out = history
    prefix = tmp_path / "commits"
    assert preprocess.main(["--input", str(out / "commits.jsonl"), "--output-prefix", str(prefix),
                            "--tokenizer-type", "ByteTokenizer", "--log-interval", "0"]) == 0
    summary = json.loads((tmp_path / "commits_summary.json").read_text())
    assert summary["records_in"] == summary["written"] == stats["kept"]


def test_tree_is_bounded_and_identifiers_split_code_names():
    tree = commits.render_tree([f"d/f{i}.py" for i in range(10)] + ["a.txt"], max_lines=5)
    assert tree.splitlines() == ["a.txt", "d/", "  f0.py", "  f1.py", "  f2.py", "... (7 more files)"]
    assert commits.identifiers("parseHTTPHeader(the_value)") == [
        "parsehttpheader", "parse", "http", "header", "the_value", "value"]


def test_bad_repositories_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # no git repository above tmp_path
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(ValueError, match=f"{plain}: not a git repository"):
        build_commit_samples([plain], tmp_path / "out", log=None)
    with pytest.raises(SystemExit, match=str(tmp_path / "missing")):
        commits.main(["--repo", str(tmp_path / "missing"), "--output", str(tmp_path / "out")])
    with pytest.raises(ValueError, match="max_diff_lines"):
        CommitConfig(max_diff_lines=0)


def test_datatrove_step_yields_documents_with_stats(history):
    repo, _, stats, records, _ = history
    step = commits.CommitSamples([repo], CONFIG)
    docs = list(step.run())
    assert {d.id for d in docs} == {r["id"] for r in records.values()}
    assert all(d.metadata["repo"] == "proj" and d.metadata["files"] for d in docs)
    assert step.stats["dropped_merge_commit"].total == 2 and step.stats["commits_in"].total == 13


def test_curate_builds_commit_samples_from_the_git_repositories_in_its_input(history, tmp_path):
    from datatrove_pipelines import curate

    repo, _, _, _, _ = history
    (tmp_path / "plain").mkdir()  # a directory without history is not a repository to read
    assert curate.build_parser().parse_args(["--input", "x", "--output", "y", "--commit-samples", "5"]).commit_samples == 5
    got = curate.commit_samples_for_input(str(repo.parent), str(tmp_path / "commits"), 100)
    assert got["repos"] == 1 and got["commits_in"] == 13 and got["reconciles"]
    assert got["kept"] == len((tmp_path / "commits" / "commits.jsonl").read_text().splitlines()) > 0
    assert got["commits_in"] == got["kept"] + got["dropped_total"] + got["failed"]
    assert curate.commit_samples_for_input(str(repo), str(tmp_path / "one"), 3)["commits_in"] == 3
    none = curate.commit_samples_for_input(str(tmp_path / "plain"), str(tmp_path / "none"), 5)
    assert none["repos"] == 0 and none["commits_in"] == 0
