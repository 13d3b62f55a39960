"""No orphans: the processes we start end with us.

Three tools, each for one way a process tree can outlive its owner:

* ``run_process_group(cmd, timeout=...)``: ``subprocess.run`` that starts the child in a new
  session (so it leads its own process group) and, on timeout, on any exception (Ctrl-C's
  KeyboardInterrupt included) and after the child exits, ends that *whole group*: SIGTERM, a short
  grace, SIGKILL, then reaps. ``subprocess.run(timeout=...)`` kills only the direct child and leaves
  its children (torchrun workers, datatrove pool workers, multiprocessing managers) running.
* ``die_with_parent()``: ``prctl(PR_SET_PDEATHSIG)``, so the kernel signals a helper process when
  its parent dies, even by ``kill -9``, where no cleanup code of the parent can run.
* ``run_cli_in_own_group(module)``: for CLIs that start process trees (the demo, curation). The
  process the user started stays in the terminal's process group (so Ctrl-C reaches it) and only
  supervises: it re-runs the CLI under ``run_process_group`` and turns SIGTERM/SIGHUP into an
  exception, so every way it ends also ends the group. The supervised child ends its own group
  if the supervisor is killed with ``kill -9``.

``python -m megatron_seed.platform.processes [--timeout S] -- CMD ...`` runs any command this way.

PR_SET_PDEATHSIG fires when the parent *thread* that created the child exits, not when the parent
process does; callers here only start helpers from a main thread (checked where it matters).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Optional, Sequence

from megatron_seed.platform.cli import add_check_config, config_ok

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
DEFAULT_GRACE = 5.0
# Set by run_cli_in_own_group in its child's environment: the supervisor's pid. The child removes
# it at once, so only the direct child of a supervisor ever sees it.
SUPERVISOR_ENV = "MEGATRON_SEED_SUPERVISOR_PID"


# --------------------------------------------------------------------------- die with the parent
def die_with_parent(sig: int = signal.SIGKILL, parent_pid: Optional[int] = None) -> bool:
    """Have the kernel send ``sig`` to this process when its parent (thread) exits.

    ``parent_pid`` closes the race between our start and this call: if the parent has already
    died, getppid() no longer returns it and ``sig`` is sent at once. Without it, an orphan is
    recognised only by having been re-parented to init (pid 1).
    Returns False where prctl does not exist (not Linux): there the call is a no-op.
    """
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
    orphaned = os.getppid() != parent_pid if parent_pid is not None else os.getppid() == 1
    if orphaned:
        os.kill(os.getpid(), sig)
    return True


_fork_hook_installed = False
_forking_parent: Optional[int] = None  # set in the parent just before fork, read in the child


def forked_children_die_with_this_process() -> None:
    """Every child later forked (``os.fork``, multiprocessing's "fork" context) from this process's
    main thread gets ``die_with_parent(SIGKILL)``. Children forked from other threads are left as
    they are: PDEATHSIG would kill them when that thread ends. Installed once per process; hooks
    are inherited by forked children, so their own forked children are bound to them in turn.
    ``subprocess`` children are unaffected (they are started without running Python fork hooks)."""
    global _fork_hook_installed
    if _fork_hook_installed or not sys.platform.startswith("linux"):
        return
    _fork_hook_installed = True

    def before():
        global _forking_parent
        _forking_parent = os.getpid() if threading.current_thread() is threading.main_thread() else None

    def after_in_child():
        if _forking_parent is not None:
            die_with_parent(signal.SIGKILL, _forking_parent)

    os.register_at_fork(before=before, after_in_child=after_in_child)


# --------------------------------------------------------------------------- process groups
def _group_members(pgid: int) -> dict:
    """Live (non-zombie) processes in group ``pgid``: pid -> start time (ticks since boot), which
    tells a process from a later one that got the same pid. Linux /proc."""
    members = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp ...
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members[int(name)] = fields[19]  # field 22 of stat: starttime
    return members


def _ignores(pid: int, sig: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            mask = next(line.split()[1] for line in f if line.startswith("SigIgn:"))
    except (OSError, StopIteration):
        return False
    return bool(int(mask, 16) >> (sig - 1) & 1)


def _group_alive(pgid: int) -> bool:
    """Whether any live process is still in group ``pgid``. Zombies do not count: they have exited,
    and orphaned ones wait for init to reap them, which some container inits do slowly."""
    try:
        os.killpg(pgid, 0)  # cheap first answer: nobody at all, zombies included
    except ProcessLookupError:
        return False
    except PermissionError:  # a member we may not signal is still a member
        pass
    return bool(_group_members(pgid)) if os.path.isdir("/proc") else True


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _term_and_wait(pgid: int, grace: float, exclude: int = 0, poll=None) -> None:
    """SIGTERM group ``pgid``, then wait up to ``grace`` s for the members that got it to exit.

    Not waited for (they get the SIGKILL that follows): members that ignore SIGTERM (multiprocessing's
    resource tracker does; it exits once the others are gone) and members started after the signal
    (a multiprocessing Pool replaces workers that died); waiting for either would always cost the
    whole grace. ``poll`` is called each round (to reap a child); ``exclude`` is never waited for."""
    _signal_group(pgid, signal.SIGTERM)
    have_proc = os.path.isdir("/proc")
    told = {pid: start for pid, start in _group_members(pgid).items()
            if pid != exclude and not _ignores(pid, signal.SIGTERM)} if have_proc else {}
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if poll is not None:
            poll()
        if have_proc:
            members = _group_members(pgid)
            if not any(members.get(pid) == start for pid, start in told.items()):
                return
        elif not _group_alive(pgid):
            return
        time.sleep(0.05)


def end_process_group(proc: subprocess.Popen, grace: float = DEFAULT_GRACE) -> None:
    """End every process in the group ``proc`` leads (``proc`` started with start_new_session):
    SIGTERM, up to ``grace`` seconds for them to exit, then SIGKILL; reap ``proc``.

    The group keeps its id while any member lives, even after ``proc`` has exited, so grandchildren
    are reached after their parent is gone."""
    pgid = proc.pid
    if not _group_alive(pgid):
        proc.wait()
        return
    try:
        # proc.poll reaps the leader as soon as it exits; other members are reaped by their parents.
        _term_and_wait(pgid, grace, poll=proc.poll)
    finally:  # also when a second Ctrl-C / SIGTERM cuts the grace short: no survivors either way
        _signal_group(pgid, signal.SIGKILL)
        proc.wait()


def run_process_group(cmd: Sequence[str], *, timeout: Optional[float] = None, grace: float = DEFAULT_GRACE,
                      check: bool = False, input=None, **popen_kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run`` that never leaves a descendant behind (see the module docstring).

    Raises ``subprocess.TimeoutExpired`` after ending the group on timeout, with the output so far."""
    if popen_kwargs.pop("capture_output", False):
        popen_kwargs["stdout"] = popen_kwargs["stderr"] = subprocess.PIPE
    if input is not None:
        popen_kwargs["stdin"] = subprocess.PIPE
    proc = subprocess.Popen(cmd, start_new_session=True, **popen_kwargs)
    try:
        stdout, stderr = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        end_process_group(proc, grace)
        stdout, stderr = proc.communicate()  # the group is gone, so the pipes are at EOF
        raise subprocess.TimeoutExpired(proc.args, timeout, output=stdout, stderr=stderr) from exc
    except BaseException:  # KeyboardInterrupt, SystemExit from a signal handler, errors
        end_process_group(proc, grace)
        raise
    # The child is done; whatever it left running in its group (daemons, stuck workers) goes too.
    end_process_group(proc, grace)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    if check:
        result.check_returncode()
    return result


class _Terminated(BaseException):
    """Raised in the main thread by SIGTERM/SIGHUP while supervising (unwinds like Ctrl-C)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum, frame):
    raise _Terminated(signum)


def supervise(cmd: Sequence[str], *, timeout: Optional[float] = None, grace: float = DEFAULT_GRACE,
              env: Optional[dict] = None) -> int:
    """Run ``cmd`` in its own process group with inherited stdio, ending the group when ``cmd``
    exits, on ``timeout``, and when this process gets SIGINT (Ctrl-C), SIGTERM or SIGHUP. Returns
    the exit status, shell style (128 + signal number when ``cmd`` or this process was signalled;
    124 on timeout). Call from the main thread (Python delivers signals only there)."""
    previous = {sig: signal.signal(sig, _raise_terminated) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        code = run_process_group(cmd, timeout=timeout, grace=grace, env=env).returncode
    except subprocess.TimeoutExpired:
        print(f"timed out after {timeout}s: ended process group of {' '.join(cmd)}", file=sys.stderr, flush=True)
        return 124
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    except _Terminated as term:
        return 128 + term.signum
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 - code if code < 0 else code


def _end_own_group(signum, frame) -> None:
    """SIGTERM handler of a supervised child, which leads its group: take the whole group down
    (the supervisor does this too when it is alive; when it was kill -9'd, nobody else will)."""
    pgid = os.getpgrp()
    if os.getpid() != pgid:  # a forked child inherited this handler: die as SIGTERM normally makes it
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # killpg below reaches this process as well
    _term_and_wait(pgid, DEFAULT_GRACE, exclude=pgid)
    _signal_group(pgid, signal.SIGKILL)  # the stragglers and this process


def run_cli_in_own_group(module: str, argv: Optional[Sequence[str]] = None) -> Optional[int]:
    """First call of a process-starting CLI's ``main(argv)``:

        code = run_cli_in_own_group("megatron_seed.demo", argv)
        if code is not None:
            return code        # this process supervised the run; it is over, group and all

    In the process the user started, re-runs ``python -m module argv`` under ``supervise`` and
    returns its exit status. In that supervised child (the leader of a fresh process group), returns
    None so ``main`` does the work; there SIGTERM ends the whole group, and so does the supervisor's
    death, even by kill -9 (PDEATHSIG delivers SIGTERM)."""
    supervisor = os.environ.pop(SUPERVISOR_ENV, None)  # popped: our own children must not see it
    if supervisor is not None:
        if os.getpgrp() == os.getpid():  # we lead the group supervise() made; never end someone else's
            signal.signal(signal.SIGTERM, _end_own_group)
        # If the supervisor died before this line, getppid() is no longer its pid and SIGTERM
        # arrives now: the child ends (with its group) instead of running unsupervised.
        die_with_parent(signal.SIGTERM, int(supervisor))
        return None
    if threading.current_thread() is not threading.main_thread() or not sys.platform.startswith("linux"):
        return None  # no signal handling off the main thread / no /proc: run in this process as before
    args = list(sys.argv[1:] if argv is None else argv)
    return supervise([sys.executable, "-m", module, *args], env=dict(os.environ, **{SUPERVISOR_ENV: str(os.getpid())}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_seed.platform.processes",
                                     description="Run CMD in its own process group; end the whole group when "
                                                 "CMD exits, on --timeout, Ctrl-C, SIGTERM or SIGHUP.")
    parser.add_argument("--timeout", type=float, default=None)
    parser.add_argument("--grace", type=float, default=DEFAULT_GRACE, help="seconds between SIGTERM and SIGKILL")
    parser.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARGS ...]")
    add_check_config(parser)
    args = parser.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        parser.error("no command given")
    if config_ok(args, parser.prog):
        return 0
    return supervise(cmd, timeout=args.timeout, grace=args.grace)


if __name__ == "__main__":
    sys.exit(main())
