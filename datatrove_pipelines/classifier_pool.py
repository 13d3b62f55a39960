"""A real local pool for the fastText classifiers (``classifiers.py``): this machine's files,
labelled by where they come from.

    python -m datatrove_pipelines.classifiers local-pool --output DIR

Positive ("Python-programming text", label 1):

* ``stdlib_code``        ``.py`` files of the standard library (seeded sample, ``code_files``);
* ``python_package_docs`` documentation of Python packages: the README each installed
                          distribution carries in its METADATA, ``.rst`` / ``.md`` files inside
                          site-packages packages (at most ``per_package`` per top-level package:
                          awscli alone ships ~5,800 example pages), and the READMEs / ``.txt`` /
                          ``.md`` / ``.rst`` files of ``/usr/share/doc/python3-*``.

Negative (label 0):

* ``python_package_legal`` LICENSE / COPYING / NOTICE / AUTHORS files of installed distributions;
* ``system_doc_legal``     ``/usr/share/doc/*/copyright`` files;
* ``system_doc_changelog`` Debian changelogs (``changelog*.gz``, one per package);
* ``system_doc_prose``     READMEs, NEWS, TODO, ``.txt`` / ``.md`` / ``.rst`` files of the other
                           system packages (at most ``per_system_package`` of each package).

The labels are the files' origins, not anyone's reading of them: a system README with build
instructions or a C library's API notes is labelled negative, so the task is "text of the Python
ecosystem (its code and its package docs) against other software documentation and legal text",
and some negatives are code-related in the everyday sense. That makes the task neither trivial
nor clean, which is what the hard-negative rounds are for. Files under 200 characters, over
200 KB (a compressed changelog is cut to its first 200 KB instead) or not UTF-8 are skipped;
exact duplicate texts (the many identical licences) are kept once.

Written to ``DIR``: ``labelled.jsonl`` (``labelled_fraction`` of the documents: id, text, label,
source), ``pool.jsonl`` (the rest: id and text only), ``pool_labels.jsonl`` (id, label, source of
the pool: what ``--judge labels:DIR/pool_labels.jsonl`` looks up) and ``pool_summary.json``.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import json
import os
import random
import sysconfig
from collections import Counter, defaultdict

from datatrove_pipelines.classifiers import text_key

MIN_CHARS, MAX_BYTES = 200, 200_000
LEGAL = ("LICENSE", "LICENCE", "COPYING", "NOTICE", "AUTHORS")
SYSTEM_PROSE = ("README", "NEWS", "TODO", "THANKS", "AUTHORS", "BUGS", "HISTORY")


def _read(path: str) -> str | None:
    """The text of a file; None when it is too short, over MAX_BYTES (plain files) or not UTF-8.
    A compressed changelog is cut to its first MAX_BYTES (its latest entries)."""
    try:
        if not path.endswith(".gz") and os.path.getsize(path) > MAX_BYTES:
            return None
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            # final=False: a multi-byte character cut by the size limit is dropped, not an error
            text = codecs.getincrementaldecoder("utf-8")().decode(f.read(MAX_BYTES), final=False)
    except (OSError, UnicodeDecodeError, EOFError):
        return None
    return text if len(text.strip()) >= MIN_CHARS else None


def _sample(paths: list[str], k: int, rng: random.Random) -> list[str]:
    paths = sorted(paths)
    return paths if len(paths) <= k else sorted(rng.sample(paths, k))


def _stdlib_code(stdlib: str, purelib: str, k: int, rng: random.Random) -> list[str]:
    paths = [p for p in glob.glob(os.path.join(stdlib, "**", "*.py"), recursive=True)
             if not p.startswith(purelib + os.sep) and "site-packages" not in p]
    return _sample(paths, k, rng)


def _package_files(purelib: str, per_package: int, rng: random.Random) -> tuple[list[str], list[str]]:
    """(docs of Python packages, legal files of distributions) under site-packages. The docs are
    ``.rst`` / ``.md`` files inside packages and each distribution's METADATA (whose body is the
    project's README)."""
    docs, legal = defaultdict(list), []
    for root, _, files in os.walk(purelib):
        top = os.path.relpath(root, purelib).split(os.sep)[0]
        for name in files:
            path = os.path.join(root, name)
            if top.endswith((".dist-info", ".egg-info")):
                if name.upper().startswith(LEGAL):
                    legal.append(path)
                elif name in ("METADATA", "PKG-INFO") and root == os.path.join(purelib, top):
                    docs[top].append(path)
            elif name.endswith((".rst", ".md")) and not name.upper().startswith(LEGAL):
                docs[top].append(path)
    return [p for top in sorted(docs) for p in _sample(docs[top], per_package, rng)], sorted(legal)


def _system_docs(root: str, per_package: int, rng: random.Random) -> dict[str, list[str]]:
    """Files of /usr/share/doc by kind. The prose of ``python3-*`` packages is documentation of
    Python packages and counts as such; their copyright files and changelogs do not."""
    kinds = defaultdict(list)
    for package in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        found = defaultdict(list)
        for dirpath, _, files in os.walk(os.path.join(root, package)):
            for name in files:
                path = os.path.join(dirpath, name)
                if name == "copyright":
                    found["system_doc_legal"].append(path)
                elif name.startswith("changelog") and name.endswith(".gz"):
                    found["system_doc_changelog"].append(path)
                elif name.upper().startswith(SYSTEM_PROSE) or name.endswith((".txt", ".md", ".rst")):
                    python = package.startswith("python3-") or package.startswith("python-")
                    found["python_package_docs" if python else "system_doc_prose"].append(path)
        for kind, paths in found.items():
            # one changelog per package: their entries all read alike
            kinds[kind] += _sample(paths, 1 if kind == "system_doc_changelog" else per_package, rng)
    return kinds


def build_local_pool(output_dir: str, seed: int = 0, code_files: int = 400, per_package: int = 20,
                     per_system_package: int = 3, labelled_fraction: float = 0.3,
                     stdlib: str | None = None, purelib: str | None = None,
                     system_doc: str = "/usr/share/doc") -> dict:
    """Collect, label by origin, deduplicate, split; write the files listed in the module docstring."""
    rng = random.Random(seed)
    stdlib = stdlib or sysconfig.get_paths()["stdlib"]
    purelib = purelib or sysconfig.get_paths()["purelib"]
    docs, legal = _package_files(purelib, per_package, rng)
    system = _system_docs(system_doc, per_system_package, rng)
    sources = {"stdlib_code": _stdlib_code(stdlib, purelib, code_files, rng),
               "python_package_docs": docs + system.pop("python_package_docs", []),
               "python_package_legal": legal, **system}
    positive = {"stdlib_code", "python_package_docs"}
    records, seen, skipped = [], set(), Counter()
    for source, paths in sources.items():
        for path in paths:
            text = _read(path)
            if text is not None and os.path.basename(path) in ("METADATA", "PKG-INFO"):
                text = text.partition("\n\n")[2]  # the README after the e-mail style headers
                text = text if len(text.strip()) >= MIN_CHARS else None
            if text is None:
                skipped["unreadable_or_size"] += 1
                continue
            key = text_key(text)
            if key in seen:
                skipped["duplicate_text"] += 1
                continue
            seen.add(key)
            records.append({"id": path, "text": text, "label": int(source in positive), "source": source})
    rng.shuffle(records)
    n_labelled = round(len(records) * labelled_fraction)
    labelled, pool = records[:n_labelled], records[n_labelled:]
    os.makedirs(output_dir, exist_ok=True)
    _write_jsonl(os.path.join(output_dir, "labelled.jsonl"), labelled)
    _write_jsonl(os.path.join(output_dir, "pool.jsonl"), [{"id": r["id"], "text": r["text"]} for r in pool])
    _write_jsonl(os.path.join(output_dir, "pool_labels.jsonl"),
                 [{"id": r["id"], "label": r["label"], "source": r["source"], "text": r["text"]} for r in pool])
    summary = {"seed": seed, "skipped": dict(skipped),
               "sources": {s: sum(1 for r in records if r["source"] == s) for s in sources},
               "splits": {name: {"documents": len(rows), "positive": sum(r["label"] for r in rows)}
                          for name, rows in (("labelled", labelled), ("pool", pool))}}
    with open(os.path.join(output_dir, "pool_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def _write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(path + ".tmp", path)
