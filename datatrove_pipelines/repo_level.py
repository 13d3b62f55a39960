"""Repository-level documents for long-context training (Seed-Coder's continued pretraining).

``RepoLevelDocuments`` groups a task's documents by ``metadata["repo"]`` (readers keep a
repository inside one task) and emits one document per repository: its files concatenated, each
preceded by a ``# path`` header line, in dependency order - for Python a topological order of
the files over their imports (a module comes before the modules importing it; cycles are broken
by path order) - and in a seeded random order for other languages, as the paper does. Files keep
their own metadata in ``metadata["files"]`` (path, language, quality score).
"""

from __future__ import annotations

import ast
import heapq
import random
from collections import defaultdict

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep


def python_module_name(path: str) -> str:
    parts = path[:-3].replace("\\", "/").split("/") if path.endswith(".py") else [path]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(p for p in parts if p)


def imports(source: str, module: str, is_package: bool = False) -> list[tuple[str, list[str]]]:
    """(module, imported names) per import statement of a Python file, relative imports resolved
    against ``module`` (an ``__init__.py`` is its own package). ``import a.b`` gives ("a.b", [])."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    found = []
    package = module if is_package else (module.rsplit(".", 1)[0] if "." in module else "")
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".") if package else []
                anchor = parts[: max(len(parts) - (node.level - 1), 0)]
                base = ".".join([*anchor, base] if base else anchor)
            found.append((base, [alias.name for alias in node.names]))
    return found


def dependency_order(files: list[tuple[str, str]]) -> list[int]:
    """Indices of (path, source) Python files so that imported files come first (Kahn's algorithm,
    ties by path; a cycle is broken at the file with the fewest unmet imports)."""
    modules = {python_module_name(path): i for i, (path, _) in enumerate(files)}
    remaining = {i: set() for i in range(len(files))}
    for i, (path, source) in enumerate(files):
        for base, names in imports(source, python_module_name(path), path.endswith("__init__.py")):
            # "from pkg import mod" depends on pkg/mod.py; on pkg/__init__.py only for other names.
            submodules = [modules[f"{base}.{n}"] for n in names if f"{base}.{n}" in modules]
            targets = submodules + ([modules[base]] if base in modules and len(submodules) < max(len(names), 1) else [])
            remaining[i].update(j for j in targets if j != i)
    users = defaultdict(set)
    for i, deps in remaining.items():
        for j in deps:
            users[j].add(i)
    ready = [(files[i][0], i) for i, deps in remaining.items() if not deps]
    heapq.heapify(ready)
    order, placed = [], set()
    while len(order) < len(files):
        if not ready:
            i = min((i for i in remaining if i not in placed), key=lambda k: (len(remaining[k]), files[k][0]))
            heapq.heappush(ready, (files[i][0], i))
        _, i = heapq.heappop(ready)
        if i in placed:
            continue
        order.append(i)
        placed.add(i)
        for user in users[i]:
            remaining[user].discard(i)
            if not remaining[user] and user not in placed:
                heapq.heappush(ready, (files[user][0], user))
    return order


class RepoLevelDocuments(PipelineStep):
    name = "📚 repo-level documents"
    type = "🔢 - TRANSFORM"

    def __init__(self, seed: int = 0, min_files: int = 2):
        super().__init__()
        self.seed = seed
        self.min_files = min_files

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        repos = defaultdict(list)
        for doc in data or []:
            repos[doc.metadata.get("repo", "")].append(doc)
        for repo in sorted(repos):
            docs = sorted(repos[repo], key=lambda d: d.metadata.get("path", d.id))
            if len(docs) < self.min_files:
                self.stat_update("repos_too_small")
                continue
            python = [d for d in docs if d.metadata.get("language") == "Python"]
            others = [d for d in docs if d.metadata.get("language") != "Python"]
            order = [python[i] for i in dependency_order([(d.metadata.get("path", d.id), d.text) for d in python])]
            random.Random(f"{self.seed}:{repo}").shuffle(others)
            ordered = order + others
            text = "".join(f"# {d.metadata.get('path', d.id)}\n{d.text.rstrip()}\n\n" for d in ordered)
            self.stat_update("repos")
            yield Document(text=text, id=f"repo:{repo}", metadata={
                "repo": repo, "files": [{"path": d.metadata.get("path"), "language": d.metadata.get("language"),
                                         "quality_score": d.metadata.get("quality_score")} for d in ordered]})
