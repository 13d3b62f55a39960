"""Per-task JSON files: how one stage hands small per-task results (hashes, scores, names) to a
later stage. Written to a temporary name and renamed, so a killed task never leaves a file that
looks complete; a missing file names the stage that should have written it."""

from __future__ import annotations

import json
import os


def task_path(folder: str, rank: int) -> str:
    return os.path.join(folder, f"{rank:05d}.json")


def write_task_json(folder: str, rank: int, obj) -> None:
    os.makedirs(folder, exist_ok=True)
    path = task_path(folder, rank)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
    os.replace(path + ".tmp", path)


def read_task_json(folder: str, rank: int, writer: str, world_size: int):
    path = task_path(folder, rank)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: run {writer} on all {world_size} tasks first")
    with open(path) as f:
        return json.load(f)
