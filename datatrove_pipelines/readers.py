"""Read code repositories as datatrove Documents: one document per source file.

``CodeTreeReader(root)``: every directory directly under ``root`` is a repository (or ``root``
itself, when it is a git checkout or ``single_repo=True``); every file in it becomes a
Document with metadata ``repo``, ``path`` (relative to the repository), ``language`` (from the
extension, :mod:`datatrove_pipelines.languages`) and ``size``. Files are sharded over datatrove
tasks by repository, so a repository stays in one task (repo-level steps need that).

Skipped, each counted under its reason in datatrove's stats (``skipped_<reason>``): files over
``max_bytes``, binaries (a NUL byte in the first 8 KiB), files that are not UTF-8, vendored
directories (node_modules, vendor, third_party, ...), minified files (``.min.js`` or a mean line
longer than ``minified_line_length``), unknown languages, VCS metadata. jsonl and parquet inputs
use datatrove's own ``JsonlReader`` / ``ParquetReader`` (see :func:`datatrove_pipelines.curate.reader_for`).
"""

from __future__ import annotations

import os
from typing import Iterator

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from datatrove_pipelines.languages import language_of

VENDORED = {"node_modules", "vendor", "vendors", "third_party", "thirdparty", "external", "bower_components",
            "site-packages", "dist-packages", "__pycache__", "build", "dist", ".venv", "venv", ".tox"}
VCS = {".git", ".hg", ".svn"}


def skip_reason(path: str, data: bytes, minified_line_length: int = 300) -> str | None:
    """Why a file's bytes are not a source document, or None."""
    if b"\x00" in data[:8192]:
        return "binary"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return "not_utf8"
    name = os.path.basename(path)
    lines = text.count("\n") + 1
    if ".min." in name or (len(text) > 1000 and len(text) / lines > minified_line_length):
        return "minified"
    return None


class CodeTreeReader(PipelineStep):
    name = "📂 code tree reader"
    type = "📖 - READER"

    def __init__(self, root: str, max_bytes: int = 1 << 20, single_repo: bool | None = None,
                 minified_line_length: int = 300, limit: int = -1):
        super().__init__()
        self.root = os.path.abspath(root)
        self.max_bytes = max_bytes
        self.single_repo = single_repo
        self.minified_line_length = minified_line_length
        self.limit = limit

    def repositories(self) -> list[tuple[str, str]]:
        """(repo name, directory) pairs, sorted."""
        single = self.single_repo if self.single_repo is not None else os.path.isdir(os.path.join(self.root, ".git"))
        if single:
            return [(os.path.basename(self.root), self.root)]
        return sorted((d, os.path.join(self.root, d)) for d in os.listdir(self.root)
                      if os.path.isdir(os.path.join(self.root, d)) and d not in VCS)

    def _files(self, repo_dir: str) -> Iterator[str]:
        for dirpath, dirnames, filenames in os.walk(repo_dir):
            kept = []
            for d in sorted(dirnames):
                if d in VCS:
                    continue
                if d in VENDORED or d.endswith(".egg-info"):
                    self.stat_update("skipped_vendored")
                    continue
                kept.append(d)
            dirnames[:] = kept
            for name in sorted(filenames):
                yield os.path.join(dirpath, name)

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data:
            yield from data
        emitted = 0
        for i, (repo, repo_dir) in enumerate(self.repositories()):
            if i % world_size != rank:
                continue
            for path in self._files(repo_dir):
                self.stat_update("files")
                reason = self._check(path)
                if reason is None:
                    with open(path, "rb") as f:
                        raw = f.read()
                    reason = skip_reason(path, raw, self.minified_line_length)
                if reason:
                    self.stat_update(f"skipped_{reason}")
                    continue
                rel = os.path.relpath(path, repo_dir)
                self.stat_update("documents")
                yield Document(text=raw.decode("utf-8"), id=f"{repo}/{rel}",
                               metadata={"repo": repo, "path": rel, "language": language_of(path),
                                         "size": len(raw)})
                emitted += 1
                if 0 < self.limit <= emitted:
                    return

    def _check(self, path: str) -> str | None:
        if os.path.islink(path) or not os.path.isfile(path):
            return "not_a_file"
        if language_of(path) is None:
            return "unknown_language"
        if os.path.getsize(path) > self.max_bytes:
            return "too_large"
        return None
