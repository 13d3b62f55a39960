"""The import arrows of megatron_seed point down, and no modules import each other in a circle.

Every import counts, function-local ones included (they are how cycles used to hide); only those
under ``if TYPE_CHECKING:`` do not, since they never run. The
packages sit on floors, lowest first; a module may import only from its own package or from a
lower floor. Entry modules (``python -m megatron_seed.X``: the top-level files) sit above all
packages. The library never imports the repository's other top-level folders, except the entry
modules, which string curation and training together (the demo).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

from helpers import ROOT

PACKAGE = ROOT / "megatron_seed"
# Lowest first. Why this order: platform (launch, precision, megatron-core CPU layer, CLI flags) needs
# nothing of ours; config is typed data; models build megatron-core modules from config; data
# (tokenizers, datasets, packing) may use the model's mask helpers; sandbox runs code; checkpoint is
# the on-disk format both training and conversion use; convert maps HF <-> checkpoint; inference
# loads checkpoints and generates; evaluate judges samples (problems, pass@k, DPO pairs) with
# inference and the sandbox; training runs the loop and its objectives (RL samples with inference
# and scores with evaluate's judge); planning measures training layouts.
FLOORS = ["platform", "config", "models", "data", "sandbox", "checkpoint", "convert", "inference", "evaluate",
          "training", "planning"]
OTHER_TOP_LEVEL = {"datatrove_pipelines", "tools", "bench", "examples", "tests"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(name: str) -> str:
    """The longest prefix of a dotted name that is a module or package of ours."""
    parts = name.split(".")
    while parts:
        candidate = ROOT.joinpath(*parts)
        if candidate.with_suffix(".py").is_file() or (candidate / "__init__.py").is_file():
            return ".".join(parts)
        parts = parts[:-1]
    return name


def imports_of(path: Path) -> list[tuple[str, int]]:
    """(imported module, line) for every import in the file, at any depth."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = []
    tree = ast.parse(path.read_text(encoding="utf-8"))
    # Imports under `if TYPE_CHECKING:` are for annotations only: they never run.
    typing_only = {id(inner) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING"
                   for stmt in node.body for inner in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # "from a import b" imports the module a.b when b is one
            found += [(resolve(f"{module}.{alias.name}"), node.lineno) for alias in node.names]
    return [(resolve(name), line) for name, line in found]


def unit(module: str) -> str:
    """megatron_seed.<package>.x -> <package>; megatron_seed.<entry> -> 'entry'."""
    parts = module.split(".")
    if len(parts) >= 2 and (PACKAGE / parts[1]).is_dir():
        return parts[1]
    return "entry"


def graph():
    edges = defaultdict(list)  # (from module, to module) -> lines
    for path in sorted(PACKAGE.rglob("*.py")):
        me = module_name(path)
        for target, line in imports_of(path):
            top = target.split(".")[0]
            if top == "megatron_seed" and target != me or top in OTHER_TOP_LEVEL:
                edges[(me, target)].append(f"{path.relative_to(ROOT)}:{line}")
    return edges


def upward_imports(edges) -> list[str]:
    rank = {name: i for i, name in enumerate(FLOORS)}
    rank["entry"] = len(FLOORS)
    bad = []
    for (src, dst), where in sorted(edges.items()):
        if dst.split(".")[0] in OTHER_TOP_LEVEL:
            if unit(src) != "entry":
                bad.append(f"{src} -> {dst} ({', '.join(where)}): the library imports a script folder")
            continue
        if dst == "megatron_seed":
            continue
        a, b = unit(src), unit(dst)
        if a not in rank or b not in rank:
            bad.append(f"{src} -> {dst}: package {a if a not in rank else b} has no floor in FLOORS")
        elif a != b and rank[b] >= rank[a]:
            bad.append(f"{src} -> {dst} ({', '.join(where)}): {a} may not import {b}")
    return bad


def cycles(edges) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    nodes = defaultdict(set)
    for src, dst in edges:
        if dst.startswith("megatron_seed") and dst != "megatron_seed":
            nodes[src].add(dst)
            nodes.setdefault(dst, set())
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(nodes[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


def test_every_package_has_a_floor():
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert packages == set(FLOORS), f"packages without a floor: {packages - set(FLOORS)}; " \
                                    f"floors without a package: {set(FLOORS) - packages}"


def test_imports_point_down():
    edges = graph()
    assert len(edges) > 100  # the walk found the imports
    bad = upward_imports(edges)
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    found = cycles(graph())
    assert not found, "\n".join(" <-> ".join(group) for group in found)


def test_the_checks_can_fail(tmp_path):
    # An upward import and a cycle, in a made-up edge set, are both reported.
    edges = {("megatron_seed.config.schema", "megatron_seed.training.trainer"): ["x:1"],
             ("megatron_seed.training.trainer", "megatron_seed.config.schema"): ["y:2"]}
    assert len(upward_imports(edges)) == 1
    assert cycles(edges) == [["megatron_seed.config.schema", "megatron_seed.training.trainer"]]
