"""Commit-history samples (Seed-Coder's commit data) from local git repositories.

    python -m datatrove_pipelines.commits --repo PATH [--repo PATH ...] --output DIR [--max-commits N]
        [--all-refs] [--min-message-chars 10] [--max-message-chars 8000] [--max-diff-lines 1000]
        [--max-diff-bytes 200000] [--max-file-bytes 100000] [--top-k 5]

Writes ``DIR/commits.jsonl`` (one sample a line: ``text`` plus ``id``, ``repo``, ``sha``,
``parent``, ``date``, ``files`` (the paths in the patch) and ``related_files``; the format
``megatron_seed.data.preprocess`` reads with ``--json-keys text``) and ``DIR/commits_stats.json``,
which reconciles: commits in = kept + dropped per reason + failed.

Only ``git`` is run (explicit argument lists, no shell, a timeout on every call, network
protocols disabled with ``protocol.allow=never``); a partial clone is refused, since reading its
missing blobs would download them. The commits are those reachable from HEAD (``--all-refs``:
from every ref), newest ``--max-commits`` of them, processed oldest first so that of two equal
patches the original is kept. The first matching reason drops a commit:

``merge_commit``       more than one parent (its change is the branches' own commits);
``root_commit``        no parent: there is no tree before it (an initial import is a file dump,
                       not a change);
``message_too_short``  / ``message_too_long``: the stripped message outside
                       [--min-message-chars, --max-message-chars];
``empty_diff``         no file changed, or no line changed (modes, renames without edits, empty
                       files);
``non_text_only``      every changed file is binary (git's NUL heuristic, or ``-diff``
                       attributes) or not UTF-8; other commits keep only their text files;
``diff_too_large``     more changed lines than --max-diff-lines, or a patch over --max-diff-bytes;
``duplicate_patch``    the patch hashes like an earlier one of the run (any repository), ignoring
                       ``index`` lines and hunk line numbers, so a cherry-pick or the same change
                       on two branches counts once.

A commit whose git calls fail or time out is counted under ``failed`` (examples in the stats).

Each kept commit becomes one text, built from the **parent** tree (what the author saw before
the change), in this template::

    ### COMMIT MESSAGE
    <the message, stripped>

    ### README: <path>                only when the parent tree has a top-level README
    <its text, at most --max-readme-chars; one over --max-file-bytes is left out>

    ### DIRECTORY TREE
    <the parent tree's paths, indented two spaces a level, directories ending in "/",
     at most --max-tree-lines lines, then "... (N more files)">

    ### RELATED FILE: <path>          0 to --top-k (5) sections, best first
    <its text in the parent tree, at most --max-related-chars>

    ### MODIFIED FILES
    <one path a line (a rename as "old => new"), text files only>

    ### PATCH
    <git diff parent commit: unified, 3 lines of context, text files only>

Sections are separated by one blank line. Related files are retrieved with BM25 (``bm25s``, the
Lucene variant) over the parent tree's text files, each indexed as its path's and its content's
identifiers (whole, lower-cased, and split at ``_`` and camelCase), with the commit message plus
the modified paths as the query; files over --max-file-bytes are not read (counted
``files_too_large``), binary or non-UTF-8 ones are counted ``files_non_text``, and beyond
--max-index-files the files nearest (in directories) to the modified ones are kept. The modified
files are **not excluded** from the index and not forced in: their pre-change text is the context
the patch edits and the query names their paths, so they usually rank first; whether they appear
is BM25's choice like any other file's. Files added by the commit are not in the parent tree.

``CommitSamples`` is the same as a datatrove step (a reader: repositories are split over ranks,
duplicates are found within a rank).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter, OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

DROP_REASONS = ("merge_commit", "root_commit", "message_too_short", "message_too_long", "empty_diff",
                "non_text_only", "diff_too_large", "duplicate_patch")
FILE_COUNTS = ("files_indexed", "files_too_large", "files_non_text", "files_over_index_limit")
SECTIONS = ("### COMMIT MESSAGE", "### README: ", "### DIRECTORY TREE", "### RELATED FILE: ",
            "### MODIFIED FILES", "### PATCH")
README_NAMES = ("readme.md", "readme.rst", "readme.txt", "readme", "readme.markdown")
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
CAMEL_PARTS = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|[0-9]+")
HUNK_HEADER = re.compile(r"^@@ [^@]* @@")
EMPTY_DOCUMENT = "<empty>"  # a token the tokenizer never makes: bm25s needs a non-empty document
# Words that carry no retrieval signal in commit messages and comments; identifiers do the work.
STOPWORDS = frozenset(
    "a an and are as at be but by for from has have if in into is it its not of on or so that the their then "
    "there these this to was were when which while will with".split())
GIT_ENV = {"GIT_TERMINAL_PROMPT": "0", "GIT_OPTIONAL_LOCKS": "0", "GIT_NO_LAZY_FETCH": "1", "LC_ALL": "C"}
MAX_FAILURE_EXAMPLES = 20
READ_BATCH_BYTES = 32 << 20


def log(message: str) -> None:
    print(f"[commits] {message}", file=sys.stderr, flush=True)


class GitError(RuntimeError):
    """A git call failed or timed out; the message names the repository and the command."""


@dataclass(frozen=True)
class CommitConfig:
    min_message_chars: int = 10
    max_message_chars: int = 8_000
    max_diff_lines: int = 1_000
    max_diff_bytes: int = 200_000
    max_file_bytes: int = 100_000
    max_index_files: int = 5_000
    top_k: int = 5
    max_readme_chars: int = 8_000
    max_related_chars: int = 12_000
    max_tree_lines: int = 200
    # Token tuples of read blobs, by blob id: consecutive commits share most of their trees.
    token_cache_tokens: int = 4_000_000
    git_timeout_s: float = 120.0

    def __post_init__(self):
        for name, value in asdict(self).items():
            if value < 0 or (value == 0 and name not in ("min_message_chars", "top_k")):
                raise ValueError(f"CommitConfig.{name} must be positive, not {value!r}")
        if self.min_message_chars > self.max_message_chars:
            raise ValueError("CommitConfig.min_message_chars is above max_message_chars")


@dataclass(frozen=True)
class Commit:
    sha: str
    parents: tuple[str, ...]
    date: str
    message: str


@dataclass(frozen=True)
class Change:
    added: int
    deleted: int
    path: str
    old_path: Optional[str] = None  # set for a rename or copy

    @property
    def label(self) -> str:
        return f"{self.old_path} => {self.path}" if self.old_path else self.path

    @property
    def pathspecs(self) -> tuple[str, ...]:
        return (self.old_path, self.path) if self.old_path else (self.path,)


@dataclass(frozen=True)
class TreeEntry:
    mode: str
    kind: str
    sha: str
    size: int  # -1 for submodules
    path: str


@dataclass
class Counts:
    commits_in: int = 0
    kept: int = 0
    failed: int = 0
    dropped: Counter = field(default_factory=Counter)
    files: Counter = field(default_factory=Counter)
    failures: list = field(default_factory=list)

    def as_dict(self) -> dict:
        dropped = {reason: self.dropped[reason] for reason in DROP_REASONS}
        return {"commits_in": self.commits_in, "kept": self.kept, "dropped": dropped,
                "dropped_total": sum(dropped.values()), "failed": self.failed,
                "reconciles": self.commits_in == self.kept + sum(dropped.values()) + self.failed,
                "bm25_files": {name: self.files[name] for name in FILE_COUNTS}, "failure_examples": self.failures}


def git(repo: Path, *args: str, input: Optional[bytes] = None, timeout: float = 120.0) -> bytes:
    """stdout of ``git args`` in ``repo``. No network (every transport protocol refused), paths
    taken literally, no pager, colour, external diff or textconv driver."""
    cmd = ["git", "-C", str(repo), "--literal-pathspecs", "--no-pager", "-c", "protocol.allow=never",
           "-c", "core.quotepath=false", "-c", "color.ui=never", *args]
    try:
        done = subprocess.run(cmd, input=input, capture_output=True, timeout=timeout, check=False,
                              env={**os.environ, **GIT_ENV})
    except subprocess.TimeoutExpired as e:
        raise GitError(f"{repo}: git {' '.join(args[:3])} timed out after {timeout:.0f} s") from e
    except FileNotFoundError as e:
        raise GitError("the git executable was not found on PATH") from e
    if done.returncode:
        lines = done.stderr.decode("utf-8", "replace").strip().splitlines()
        # git's reason is its "fatal:"/"error:" line; hints (safe.directory, ...) follow it.
        reason = next((line for line in lines if line.startswith(("fatal:", "error:"))), lines[-1] if lines else "")
        raise GitError(f"{repo}: git {' '.join(args[:3])} failed: {reason or f'exit status {done.returncode}'}")
    return done.stdout


def open_repository(path: str | os.PathLike, timeout: float = 60.0) -> Path:
    """The top-level directory of the git work tree (or bare repository) at ``path``, or a
    ValueError naming the path: missing, unreadable, not a git repository, a partial clone."""
    where = Path(path).expanduser()
    if not where.exists():
        raise ValueError(f"repository {where}: no such directory")
    if not where.is_dir() or not os.access(where, os.R_OK | os.X_OK):
        raise ValueError(f"repository {where}: not a readable directory")
    try:
        bare = git(where, "rev-parse", "--is-bare-repository", timeout=timeout).decode().strip() == "true"
        top = where.resolve() if bare else Path(git(where, "rev-parse", "--show-toplevel",
                                                    timeout=timeout).decode().strip())
    except GitError as e:
        raise ValueError(f"repository {where}: not a git repository ({str(e).removeprefix(f'{where}: ')})") from e
    try:
        git(top, "config", "--get", "extensions.partialclone", timeout=timeout)
    except GitError:  # exit status 1: not set, as wanted
        return top
    raise ValueError(f"repository {where}: a partial clone (reading its missing blobs would download them)")


def list_commits(repo: Path, max_commits: int = -1, all_refs: bool = False, timeout: float = 120.0) -> list[Commit]:
    """The newest ``max_commits`` (all if < 0) commits, oldest first; none in an empty repository."""
    try:
        git(repo, "rev-parse", "--verify", "--quiet", "HEAD^{commit}", timeout=timeout)
    except GitError:
        if not all_refs:
            return []
    args = ["log", "-z", "--topo-order", "--format=%H%x1f%P%x1f%aI%x1f%B"]
    if max_commits >= 0:
        args.append(f"--max-count={max_commits}")
    args += ["--all"] if all_refs else ["HEAD"]
    commits = []
    for record in git(repo, *args, "--", timeout=timeout).split(b"\0"):
        if not record.strip():
            continue
        sha, parents, date, message = record.decode("utf-8", "replace").split("\x1f", 3)
        commits.append(Commit(sha.strip(), tuple(parents.split()), date, message))
    return commits[::-1]


def identifiers(text: str) -> list[str]:
    """BM25 terms: each identifier lower-cased, plus its ``_`` and camelCase parts when it has
    several (``parseHTTPHeader`` -> parsehttpheader, parse, http, header). Strings are interned so
    cached token lists share them."""
    terms = []
    for word in IDENTIFIER.findall(text):
        lowered = word.lower()
        if len(lowered) > 1 and lowered not in STOPWORDS:
            terms.append(sys.intern(lowered))
        parts = [p.lower() for chunk in word.split("_") for p in CAMEL_PARTS.findall(chunk)]
        if len(parts) > 1:
            terms += [sys.intern(p) for p in parts if len(p) > 1 and not p.isdigit() and p not in STOPWORDS]
    return terms


def as_text(data: bytes) -> Optional[str]:
    """The UTF-8 text of a blob, None when binary (git's rule: a NUL in the first 8000 bytes) or
    not UTF-8."""
    if b"\0" in data[:8000]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def patch_hash(patch: str) -> str:
    """The patch's identity for dedup: without ``index`` lines (blob ids, which differ when the
    same change lands on another base) and hunk line numbers."""
    lines = [HUNK_HEADER.sub("@@", line) for line in patch.splitlines() if not line.startswith("index ")]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def render_tree(paths: Sequence[str], max_lines: int) -> str:
    """Paths as an indented tree (two spaces a level, directories end in "/"), cut at ``max_lines``
    lines with a count of the files left out."""
    lines, previous = [], []
    ordered = sorted(paths)
    for shown, path in enumerate(ordered):
        parts = path.split("/")
        common = 0
        while common < min(len(previous), len(parts) - 1) and previous[common] == parts[common]:
            common += 1
        new_lines = ["  " * depth + parts[depth] + "/" for depth in range(common, len(parts) - 1)]
        new_lines.append("  " * (len(parts) - 1) + parts[-1])
        if len(lines) + len(new_lines) > max_lines:
            lines.append(f"... ({len(ordered) - shown} more files)")
            break
        lines += new_lines
        previous = parts[:-1]
    return "\n".join(lines)


def truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit].rstrip("\n") + f"\n[... {len(text) - limit} more characters]"


def render_sample(message: str, readme: Optional[tuple[str, str]], tree: str, related: Sequence[tuple[str, str]],
                  changes: Sequence[Change], patch: str) -> str:
    """The documented template (module docstring): message, README, tree, related files,
    modified files, patch."""
    sections = [f"{SECTIONS[0]}\n{message}"]
    if readme:
        sections.append(f"{SECTIONS[1]}{readme[0]}\n{readme[1].rstrip()}")
    sections.append(f"{SECTIONS[2]}\n{tree}")
    sections += [f"{SECTIONS[3]}{path}\n{text.rstrip()}" for path, text in related]
    sections.append(f"{SECTIONS[4]}\n" + "\n".join(c.label for c in changes))
    sections.append(f"{SECTIONS[5]}\n{patch.rstrip()}")
    return "\n\n".join(sections) + "\n"


def directory_distance(path: str, targets: Sequence[str]) -> int:
    """How many directories separate ``path`` from the nearest target (0: same directory)."""
    parts = path.split("/")[:-1]
    best = None
    for target in targets:
        other = target.split("/")[:-1]
        common = 0
        while common < min(len(parts), len(other)) and parts[common] == other[common]:
            common += 1
        distance = len(parts) + len(other) - 2 * common
        best = distance if best is None else min(best, distance)
    return best or 0


class RepositoryCommits:
    """Commit samples of one repository; ``seen_patches`` is shared between the repositories of
    a run so that dedup spans them."""

    def __init__(self, repo: Path, config: CommitConfig, counts: Counts, seen_patches: set):
        self.repo, self.config, self.counts, self.seen = repo, config, counts, seen_patches
        self.name = repo.name
        self.tokens: OrderedDict[str, Optional[tuple]] = OrderedDict()  # blob id -> terms (None: not text)
        self.cached_tokens = 0

    def git(self, *args: str, input: Optional[bytes] = None) -> bytes:
        return git(self.repo, *args, input=input, timeout=self.config.git_timeout_s)

    def read_blobs(self, shas: Sequence[str]) -> dict[str, bytes]:
        """Blob contents by id, in one ``git cat-file --batch`` call."""
        out = self.git("cat-file", "--batch", input="".join(f"{s}\n" for s in shas).encode())
        blobs, at = {}, 0
        for sha in shas:
            end = out.index(b"\n", at)
            header = out[at:end].split()
            if len(header) != 3:
                raise GitError(f"{self.repo}: object {sha} is missing")
            size = int(header[2])
            blobs[sha] = out[end + 1:end + 1 + size]
            at = end + 1 + size + 1
        return blobs

    def blob_terms(self, entries: Sequence[TreeEntry]) -> dict[str, Optional[tuple]]:
        """BM25 terms of each entry's blob (None: not text), read in batches of at most
        READ_BATCH_BYTES so that a large first tree is not held in memory at once."""
        sizes = {e.sha: e.size for e in entries}
        found = {sha: self.tokens[sha] for sha in sizes if sha in self.tokens}
        for sha in found:
            self.tokens.move_to_end(sha)
        batch, batch_bytes = [], 0
        for sha in sorted(set(sizes) - set(found)) + [None]:
            if sha is not None:
                batch.append(sha)
                batch_bytes += sizes[sha]
            if batch and (sha is None or batch_bytes >= READ_BATCH_BYTES):
                for blob, data in self.read_blobs(batch).items():
                    text = as_text(data)
                    terms = tuple(identifiers(text)) if text is not None else None
                    found[blob] = self.tokens[blob] = terms
                    self.cached_tokens += len(terms or ())
                batch, batch_bytes = [], 0
        while self.cached_tokens > self.config.token_cache_tokens and len(self.tokens) > 1:
            self.cached_tokens -= len(self.tokens.popitem(last=False)[1] or ())
        return found

    def changes(self, commit: Commit) -> list[tuple[Change, bool]]:
        """(change, is_text) per changed file, from ``git diff --numstat`` (binary: "-" counts)."""
        out = self.git("diff", "--numstat", "-z", "-M", "--no-ext-diff", "--no-textconv", commit.parents[0],
                       commit.sha, "--")
        fields = out.split(b"\0")
        changes, i = [], 0
        while i < len(fields) and fields[i]:
            added, deleted, path = fields[i].decode("utf-8", "replace").split("\t", 2)
            if path:
                i += 1
                old = None
            else:  # a rename: "added\tdeleted\t\0old\0new\0"
                old, path = fields[i + 1].decode("utf-8", "replace"), fields[i + 2].decode("utf-8", "replace")
                i += 3
            binary = added == "-"
            changes.append((Change(0 if binary else int(added), 0 if binary else int(deleted), path, old), not binary))
        return changes

    def patch(self, commit: Commit, changes: Sequence[Change], limit_paths: bool) -> bytes:
        paths = [p for c in changes for p in c.pathspecs] if limit_paths else []
        return self.git("diff", "--patch", "-M", "--unified=3", "--no-ext-diff", "--no-textconv", "--no-color",
                        "--src-prefix=a/", "--dst-prefix=b/", commit.parents[0], commit.sha, "--", *paths)

    def text_patch(self, commit: Commit, changes: list[Change], limit_paths: bool) -> tuple[str, list[Change]]:
        """The patch of the changes, decoded; when it is not UTF-8, file by file, dropping files
        whose patch is not (Latin-1 sources and the like)."""
        data = self.patch(commit, changes, limit_paths)
        try:
            return data.decode("utf-8"), changes
        except UnicodeDecodeError:
            pass
        parts, kept = [], []
        for change in changes:
            try:
                parts.append(self.patch(commit, [change], True).decode("utf-8"))
                kept.append(change)
            except UnicodeDecodeError:
                continue
        return "".join(parts), kept

    def tree(self, rev: str) -> list[TreeEntry]:
        entries = []
        for record in self.git("ls-tree", "-r", "-l", "-z", "--full-tree", rev).split(b"\0"):
            if not record:
                continue
            meta, path = record.decode("utf-8", "replace").split("\t", 1)
            mode, kind, sha, size = meta.split()
            entries.append(TreeEntry(mode, kind, sha, int(size) if size.isdigit() else -1, path))
        return entries

    def context(self, commit: Commit, message: str, changes: Sequence[Change]):
        """README, directory tree and the BM25 top-k related files, all from the parent tree."""
        import bm25s

        entries = self.tree(commit.parents[0])
        tree = render_tree([e.path for e in entries], self.config.max_tree_lines)
        # Regular files only: no symlinks (mode 120000), no submodules (kind "commit").
        files = [e for e in entries if e.kind == "blob" and e.mode != "120000"]
        readme = None
        top_level = {e.path.lower(): e for e in files if "/" not in e.path}
        for name in README_NAMES:
            if name in top_level and top_level[name].size <= self.config.max_file_bytes:
                text = as_text(self.read_blobs([top_level[name].sha])[top_level[name].sha])
                if text is not None:
                    readme = (top_level[name].path, truncate(text, self.config.max_readme_chars))
                    break
        small = [e for e in files if e.size <= self.config.max_file_bytes]
        self.counts.files["files_too_large"] += len(files) - len(small)
        if len(small) > self.config.max_index_files:
            targets = [p for c in changes for p in c.pathspecs]
            small.sort(key=lambda e: (directory_distance(e.path, targets), e.path))
            self.counts.files["files_over_index_limit"] += len(small) - self.config.max_index_files
            small = small[:self.config.max_index_files]
        terms = self.blob_terms(small)
        indexed = [e for e in small if terms[e.sha] is not None]
        self.counts.files["files_non_text"] += len(small) - len(indexed)
        self.counts.files["files_indexed"] += len(indexed)
        related: list[tuple[str, str]] = []
        query = identifiers(message + "\n" + "\n".join(p for c in changes for p in c.pathspecs))
        if indexed and query and self.config.top_k:
            corpus = [list(identifiers(e.path)) + list(terms[e.sha]) or [EMPTY_DOCUMENT] for e in indexed]
            retriever = bm25s.BM25()
            retriever.index(corpus, show_progress=False)
            ids, scores = retriever.retrieve([query], k=min(self.config.top_k, len(indexed)), show_progress=False)
            best = [indexed[int(i)] for i, s in zip(ids[0], scores[0]) if s > 0]
            blobs = self.read_blobs(sorted({e.sha for e in best})) if best else {}
            related = [(e.path, truncate(blobs[e.sha].decode("utf-8"), self.config.max_related_chars))
                       for e in best]
        return readme, tree, related

    def sample(self, commit: Commit) -> tuple[Optional[dict], Optional[str]]:
        """(record, None) for a kept commit, (None, reason) for a dropped one."""
        config = self.config
        if len(commit.parents) > 1:
            return None, "merge_commit"
        if not commit.parents:
            return None, "root_commit"
        message = commit.message.strip()
        if len(message) < config.min_message_chars:
            return None, "message_too_short"
        if len(message) > config.max_message_chars:
            return None, "message_too_long"
        all_changes = self.changes(commit)
        changes = [c for c, is_text in all_changes if is_text]
        if not all_changes:
            return None, "empty_diff"
        if not changes:
            return None, "non_text_only"
        lines = sum(c.added + c.deleted for c in changes)
        if lines == 0:
            return None, "empty_diff"
        if lines > config.max_diff_lines:
            return None, "diff_too_large"
        patch, changes = self.text_patch(commit, changes, limit_paths=len(changes) < len(all_changes))
        if not changes:
            return None, "non_text_only"
        if len(patch.encode()) > config.max_diff_bytes:
            return None, "diff_too_large"
        digest = patch_hash(patch)
        if digest in self.seen:
            return None, "duplicate_patch"
        readme, tree, related = self.context(commit, message, changes)
        self.seen.add(digest)
        text = render_sample(message, readme, tree, related, changes, patch)
        return {"text": text, "id": f"{self.name}@{commit.sha}", "repo": self.name, "sha": commit.sha,
                "parent": commit.parents[0], "date": commit.date, "files": [c.path for c in changes],
                "related_files": [path for path, _ in related]}, None

    def samples(self, commits: Sequence[Commit], progress: Optional[Callable[[int], None]] = None) -> Iterator[dict]:
        for n, commit in enumerate(commits, 1):
            self.counts.commits_in += 1
            try:
                record, reason = self.sample(commit)
            except GitError as e:
                self.counts.failed += 1
                if len(self.counts.failures) < MAX_FAILURE_EXAMPLES:
                    self.counts.failures.append({"repo": self.name, "sha": commit.sha, "error": str(e)})
                record, reason = None, None
            if record is not None:
                self.counts.kept += 1
                yield record
            elif reason is not None:
                self.counts.dropped[reason] += 1
            if progress:
                progress(n)


def iter_commit_samples(repos: Sequence[str | os.PathLike], config: CommitConfig, counts: Counts,
                        max_commits: int = -1, all_refs: bool = False,
                        log: Optional[Callable[[str], None]] = log, progress_every_s: float = 10.0) -> Iterator[dict]:
    """Samples of every repository in turn, counting into ``counts``. Every path is checked before
    any work, so a bad one fails at once (ValueError naming it)."""
    tops = [open_repository(r, config.git_timeout_s) for r in repos]
    seen: set = set()
    for top in tops:
        commits = list_commits(top, max_commits, all_refs, config.git_timeout_s)
        if log:
            log(f"{top}: {len(commits)} commit(s)")
        reader = RepositoryCommits(top, config, counts, seen)
        start = last = time.monotonic()

        def progress(n: int) -> None:
            nonlocal last
            now = time.monotonic()
            if log and (now - last >= progress_every_s or n == len(commits)):
                last = now
                log(f"{top.name}: {n}/{len(commits)} commits, {counts.kept} kept in total, "
                    f"{n / max(now - start, 1e-9):.1f} commits/s")

        yield from reader.samples(commits, progress)


def build_commit_samples(repos: Sequence[str | os.PathLike], output: str | os.PathLike,
                         config: Optional[CommitConfig] = None, max_commits: int = -1, all_refs: bool = False,
                         log: Optional[Callable[[str], None]] = log) -> dict:
    """Writes ``output/commits.jsonl`` and ``output/commits_stats.json``; returns the stats."""
    config = config or CommitConfig()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    counts, start = Counts(), time.monotonic()
    path = out / "commits.jsonl"
    with open(str(path) + ".tmp", "w", encoding="utf-8") as f:
        for record in iter_commit_samples(repos, config, counts, max_commits, all_refs, log):
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(str(path) + ".tmp", path)
    stats = {**counts.as_dict(), "repos": [str(r) for r in repos], "max_commits": max_commits,
             "config": asdict(config), "seconds": round(time.monotonic() - start, 3), "output": str(path)}
    (out / "commits_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    if log:
        log(f"{stats['commits_in']} commits in = {stats['kept']} kept + {stats['dropped_total']} dropped "
            f"{ {k: v for k, v in stats['dropped'].items() if v} } + {stats['failed']} failed "
            f"in {stats['seconds']:.1f} s -> {path}")
    return stats


class CommitSamples(PipelineStep):
    """The same as a datatrove reader step: repository i goes to rank i % world_size (duplicates
    are found within a rank); stats per drop reason."""

    name = "🧾 commit samples"
    type = "📖 - READER"

    def __init__(self, repos: Sequence[str], config: Optional[CommitConfig] = None, max_commits: int = -1,
                 all_refs: bool = False):
        super().__init__()
        self.repos, self.config = [str(r) for r in repos], config or CommitConfig()
        self.max_commits, self.all_refs = max_commits, all_refs

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data:
            yield from data
        counts = Counts()
        for record in iter_commit_samples(self.repos[rank::world_size], self.config, counts, self.max_commits,
                                          self.all_refs, log=None):
            text, doc_id = record.pop("text"), record.pop("id")
            self.stat_update("kept")
            yield Document(text=text, id=doc_id, metadata=record)
        self.stat_update("commits_in", value=counts.commits_in)
        self.stat_update("failed", value=counts.failed)
        for reason in DROP_REASONS:
            self.stat_update(f"dropped_{reason}", value=counts.dropped[reason])


def build_parser() -> argparse.ArgumentParser:
    defaults = CommitConfig()
    p = argparse.ArgumentParser(prog="python -m datatrove_pipelines.commits", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", action="append", required=True, help="a local git repository (repeatable)")
    p.add_argument("--output", required=True)
    p.add_argument("--max-commits", type=int, default=-1, help="newest N commits per repository (default all)")
    p.add_argument("--all-refs", action="store_true", help="commits reachable from every ref, not only HEAD")
    for name, value in asdict(defaults).items():
        if name != "token_cache_tokens":
            p.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    return p


def config_from_args(args: argparse.Namespace) -> CommitConfig:
    names = set(asdict(CommitConfig()))
    return CommitConfig(**{k: v for k, v in vars(args).items() if k in names})


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
        for repo in args.repo:  # fail on a bad path before starting anything
            open_repository(repo, config.git_timeout_s)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    from megatron_seed.platform.processes import run_cli_in_own_group

    code = run_cli_in_own_group("datatrove_pipelines.commits", argv)
    if code is not None:  # this process supervised the run, which is over with its whole group
        return code
    stats = build_commit_samples(args.repo, args.output, config, args.max_commits, args.all_refs)
    return 0 if stats["reconciles"] else 1


if __name__ == "__main__":
    sys.exit(main())
