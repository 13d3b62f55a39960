"""``--check-config``, shared by every command-line entry point (training, tools, services).

Each entry point validates its arguments before doing any work; training entry points validate the
whole run config (preset, file, overrides, stages, world size). With ``--check-config`` the command
stops right there: it prints ``config ok`` and exits 0, having read no data and started nothing.
That makes a command line checkable without its data, which tests/test_readme_commands.py does for
every command in README.md.
"""

from __future__ import annotations

import argparse

FLAG = "--check-config"


def add_check_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(FLAG, action="store_true",
                        help="validate the arguments (and the run config), print 'config ok' and exit 0 "
                             "without running anything")


def config_ok(args: argparse.Namespace, prog: str, detail: str = "") -> bool:
    """True (after saying so) when ``args`` asked only for the check; call it once validation is done."""
    if not getattr(args, "check_config", False):
        return False
    print(f"config ok: {prog}" + (f" ({detail})" if detail else ""), flush=True)
    return True
