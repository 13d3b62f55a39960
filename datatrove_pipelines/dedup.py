"""Deduplication of code: exact (SHA256 of content, file and repository level) and near (MinHash).

Exact dedup runs in two datatrove stages over the same document stream, like datatrove's own
MinHash stages:

1. ``ExactDedupSignature(folder)``: each task writes the SHA256 of every document and of every
   repository (the hash of its sorted (path, file hash) list) to ``folder/NNNNN.json``;
2. ``ExactDedupFilter(folder)``: task r loads the hashes of tasks < r, then keeps a document only
   if neither its content nor its repository was seen before (earlier task, or earlier in this
   task). The first copy in (task, position) order survives; reasons ``duplicate_file`` /
   ``duplicate_repo`` are counted.

Near dedup uses datatrove's four MinHash stages (signature, buckets, cluster, filter; its
defaults: 5-grams, 14 buckets x 8 hashes) with a code-aware word tokenizer: identifiers,
numbers and single punctuation characters are words, so formatting-only copies collide.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.minhash import MinhashDedupSignature
from datatrove.utils.word_tokenizers import WordTokenizer

from datatrove_pipelines.task_files import read_task_json, write_task_json

CODE_WORDS = re.compile(r"[A-Za-z_][A-Za-z_0-9]*|\d+|[^\sA-Za-z_0-9]")


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def repo_hashes(docs) -> dict[str, str]:
    """repo -> SHA256 over its sorted (path, content hash) pairs."""
    files = defaultdict(list)
    for doc in docs:
        files[doc.metadata.get("repo", "")].append((doc.metadata.get("path", doc.id), content_hash(doc.text)))
    return {repo: hashlib.sha256(json.dumps(sorted(entries)).encode()).hexdigest() for repo, entries in files.items()}


class ExactDedupSignature(PipelineStep):
    name = "🔑 exact dedup signature"
    type = "🫂 - DEDUP"

    def __init__(self, folder: str):
        super().__init__()
        self.folder = folder

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        docs = list(data or [])
        write_task_json(self.folder, rank, {"files": [content_hash(d.text) for d in docs], "repos": repo_hashes(docs)})
        self.stat_update("documents", value=len(docs))
        yield from ()  # a signature stage passes nothing on


class ExactDedupFilter(PipelineStep):
    name = "🫂 exact dedup filter"
    type = "🫂 - DEDUP"

    def __init__(self, folder: str):
        super().__init__()
        self.folder = folder

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        seen_files, seen_repos = set(), set()
        for r in range(rank):
            sig = read_task_json(self.folder, r, "ExactDedupSignature", world_size)
            seen_files.update(sig["files"])
            seen_repos.update(sig["repos"].values())
        docs = list(data or [])
        mine = repo_hashes(docs)
        # A repository identical to an earlier one is dropped whole; within this task, the first
        # repository with a given hash is the one kept.
        keep_repo = {}
        for doc in docs:
            repo = doc.metadata.get("repo", "")
            if repo not in keep_repo:
                h = mine[repo]
                keep_repo[repo] = h not in seen_repos
                seen_repos.add(h)
        for doc in docs:
            self.stat_update("total")
            if not keep_repo[doc.metadata.get("repo", "")]:
                self.stat_update("dropped_duplicate_repo")
                continue
            h = content_hash(doc.text)
            if h in seen_files:
                self.stat_update("dropped_duplicate_file")
                continue
            seen_files.add(h)
            self.stat_update("forwarded")
            yield doc


class CodeWordTokenizer(WordTokenizer):
    """A datatrove word tokenizer for code: identifiers, numbers, punctuation."""

    def word_tokenize(self, text: str, *args, **kwargs) -> list[str]:
        return CODE_WORDS.findall(text)

    def sent_tokenize(self, text: str) -> list[str]:
        return text.splitlines()

    def span_tokenize(self, text: str):
        return [m.span() for m in CODE_WORDS.finditer(text)]


class CodeMinhashSignature(MinhashDedupSignature):
    """datatrove's MinHash signature stage with :class:`CodeWordTokenizer` (its default is an
    English tokenizer that needs spaCy and splits code poorly)."""

    def __init__(self, output_folder, config=None, **kwargs):
        kwargs.setdefault("language", CodeWordTokenizer())
        super().__init__(output_folder, config=config, **kwargs)


class RecordRepos(PipelineStep):
    """Writes the repository names of the documents it sees (one task file each) and passes
    nothing on: after a repo-level MinHash filter, the repositories that survived."""

    name = "📝 record repositories"
    type = "🫂 - DEDUP"

    def __init__(self, folder: str):
        super().__init__()
        self.folder = folder

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        write_task_json(self.folder, rank, sorted({doc.metadata.get("repo", "") for doc in data or []}))
        yield from ()


class RepoAllowList(PipelineStep):
    """Keeps files whose repository survived repo-level near dedup (recorded by ``RecordRepos``
    for the same task); the rest are dropped as ``near_duplicate_repo``."""

    name = "🫂 near-duplicate repositories"
    type = "🫂 - DEDUP"

    def __init__(self, folder: str):
        super().__init__()
        self.folder = folder

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        allowed = set(read_task_json(self.folder, rank, "RecordRepos", world_size))
        for doc in data or []:
            self.stat_update("total")
            if doc.metadata.get("repo", "") not in allowed:
                self.stat_update("dropped_near_duplicate_repo")
                continue
            self.stat_update("forwarded")
            yield doc
