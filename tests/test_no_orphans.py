"""No orphans: what we start ends with us, on timeout, failure, Ctrl-C, SIGTERM and kill -9.

Every test records the processes it expects to end *before* it ends anything (psutil.Process
objects, so a recycled pid is not mistaken for a survivor) and cleans up survivors itself, so a
failing test does not leave processes behind on a shared machine either.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from helpers import ROOT, pretrain_cmd, subprocess_env

from megatron_seed.platform.processes import run_process_group

# A child that starts a grandchild sleeping "forever" in its own process group (no new session), writes
# "<child pid> <grandchild pid>" to argv[1], then sleeps. The grandchild ignores SIGTERM when argv[2]
# is "stubborn", so only the SIGKILL that follows the grace period can end it.
FAMILY = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    grandchild = subprocess.Popen([sys.executable, "-c", "import signal, sys, time\\n"
                                   "if sys.argv[1] == 'stubborn': signal.signal(signal.SIGTERM, signal.SIG_IGN)\\n"
                                   "time.sleep(600)", sys.argv[2]],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(sys.argv[1] + ".tmp", "w") as f:
        f.write(f"{os.getpid()} {grandchild.pid}")
    os.replace(sys.argv[1] + ".tmp", sys.argv[1])
    time.sleep(600)
""")


def alive(p: psutil.Process) -> bool:
    """Running and not a zombie (an exited process whose new parent has not reaped it yet is gone)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_gone(procs, timeout: float) -> list:
    """The processes of ``procs`` still alive after up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while (survivors := [p for p in procs if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return survivors


def describe(procs) -> list:
    out = []
    for p in procs:
        try:
            out.append((p.pid, " ".join(p.cmdline())[:120]))
        except psutil.Error:
            out.append((p.pid, "?"))
    return out


def kill_all(procs) -> None:
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass


def wait_for_file(path: Path, proc: subprocess.Popen, timeout: float, log: Path = None) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
        assert proc.poll() is None, f"exited ({proc.returncode}) before {path} appeared:\n{tail}"
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout}s:\n{tail}"
        time.sleep(0.1)


def read_family(path: Path) -> list:
    """The processes named in ``path`` that still exist. A pid that is gone is not a survivor, and
    one created after ``path`` was written is a recycled pid, not ours (never to be killed)."""
    pids, written = [int(pid) for pid in path.read_text().split()], path.stat().st_mtime
    assert len(pids) == 2, pids
    family = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            if p.create_time() <= written + 1:
                family.append(p)
        except psutil.NoSuchProcess:
            pass
    return family


# --------------------------------------------------------------------------- 1. kill -9 of a training run
@pytest.mark.parametrize("launcher", ["python", "torchrun"])
def test_kill_9_of_a_run_that_saves_every_step_leaves_no_helper_alive(tmp_path, launcher):
    """Before the fix each kill -9 left megatron-core's checkpoint Manager, multiprocessing's resource
    tracker and sometimes a forked writer running; under torchrun, the worker itself survived too."""
    save, log = tmp_path / "ckpt", tmp_path / "stderr.log"
    cmd = pretrain_cmd(tmp_path / "run", "--preset", "tiny", "train.steps=1000", "train.precision=fp32",
                       f"train.save={save}", "train.save_interval=1", "train.log_interval=1000",
                       launcher=launcher)
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
    top = psutil.Process(proc.pid)
    seen, cmdlines = {}, {}
    try:
        wait_for_file(save / "latest", proc, timeout=240, log=log)
        # Saves keep coming (one a step): watch for a second so forked writers are seen as well.
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            for child in top.children(recursive=True):
                if child.pid not in seen:
                    try:
                        cmdlines[child.pid] = " ".join(child.cmdline())
                    except psutil.Error:  # a writer that already finished its file
                        continue
                    seen[child.pid] = child
            time.sleep(0.05)
        helpers = [pid for pid, cmdline in cmdlines.items() if "multiprocessing" in cmdline]
        assert helpers, f"no multiprocessing helper seen, the test would prove nothing: {cmdlines}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        survivors = wait_gone(seen.values(), timeout=10)
        assert not survivors, f"alive 10 s after kill -9 of {launcher}: {describe(survivors)}"
    finally:
        kill_all([top, *seen.values()])
        proc.wait()


# A process that forks a child with multiprocessing's "fork" context, as megatron-core does for its
# checkpoint writers, writes "<pid> <child pid>" to argv[1] and sleeps; argv[2] == "bound" installs the
# fork hook the checkpointer installs before its first save.
FORKS_A_WRITER = textwrap.dedent("""
    import multiprocessing, os, sys, time
    from megatron_seed.platform.processes import forked_children_die_with_this_process
    if sys.argv[2] == "bound":
        forked_children_die_with_this_process()
    child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(600,))
    child.start()
    with open(sys.argv[1] + ".tmp", "w") as f:
        f.write(f"{os.getpid()} {child.pid}")
    os.replace(sys.argv[1] + ".tmp", sys.argv[1])
    time.sleep(600)
""")


@pytest.mark.parametrize("mode", ["bound", "unbound"])
def test_forked_helpers_die_with_their_parent_on_kill_9(tmp_path, mode):
    """The forked-writer half of test 1, deterministic (test 1 sees a writer only if it kills mid-save).
    "unbound" is the control: without the hook the forked child outlives kill -9 of its parent, so
    this test can tell the difference."""
    pids = tmp_path / "pids"
    proc = subprocess.Popen([sys.executable, "-c", FORKS_A_WRITER, str(pids), mode], cwd=ROOT, env=subprocess_env(),
                            start_new_session=True)
    family = []
    try:
        wait_for_file(pids, proc, timeout=60)
        family = read_family(pids)
        assert len(family) == 2
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        survivors = wait_gone(family[1:], timeout=3)
        assert survivors == ([] if mode == "bound" else family[1:]), describe(survivors)
    finally:
        kill_all(family)
        proc.wait()


# --------------------------------------------------------------------------- 2. run_process_group
@pytest.mark.parametrize("grandchild", ["plain", "stubborn"])
def test_timeout_ends_the_child_and_its_grandchild(tmp_path, grandchild):
    """subprocess.run(timeout=...) kills only the child: the grandchild went on sleeping."""
    pids = tmp_path / "pids"
    start = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        run_process_group([sys.executable, "-c", FAMILY, str(pids), grandchild], timeout=2, grace=1,
                          capture_output=True)
    elapsed = time.monotonic() - start
    assert pids.exists(), "the child did not start its grandchild within the 2 s timeout (machine too slow?)"
    family = read_family(pids)
    try:
        survivors = wait_gone(family, timeout=3)
        assert not survivors, f"alive after the timeout: {describe(survivors)}"
        # A SIGTERM-ignoring grandchild costs the 1 s grace, no more.
        assert elapsed < 2 + 1 + 2, elapsed
    finally:
        kill_all(family)


def test_a_grandchild_left_behind_by_a_finished_child_is_ended(tmp_path):
    """The child exits 0 but leaves a daemon in its group: it must not outlive the call."""
    pids = tmp_path / "pids"
    script = FAMILY.replace("time.sleep(600)\n", "")  # the child's own final sleep: it exits at once
    assert script != FAMILY
    proc = run_process_group([sys.executable, "-c", script, str(pids), "plain"], timeout=60, grace=1)
    assert proc.returncode == 0
    family = read_family(pids)
    try:
        assert not wait_gone(family, timeout=3), describe(family)
    finally:
        kill_all(family)


# --------------------------------------------------------------------------- 3. CLIs: signals to the supervisor
# A CLI built exactly like megatron_seed.demo and datatrove_pipelines.curate: main() starts with
# run_cli_in_own_group, then starts a child process (the demo's stages start workers the same way).
FAKE_CLI = textwrap.dedent("""
    import subprocess, sys
    from megatron_seed.platform.processes import run_cli_in_own_group

    def main(argv=None):
        code = run_cli_in_own_group("fake_cli", argv)
        if code is not None:
            return code
        exec(compile(FAMILY, "family", "exec"), {"__name__": "family"})

    FAMILY = %r
    if __name__ == "__main__":
        sys.exit(main())
""") % FAMILY


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_signal_to_a_cli_ends_its_process_group(tmp_path, sig):
    """SIGINT (Ctrl-C) and SIGTERM reach the supervisor, which ends the group; after kill -9 of the
    supervisor, PDEATHSIG tells the group leader, which ends the group itself."""
    (tmp_path / "fake_cli.py").write_text(FAKE_CLI)
    pids = tmp_path / "pids"
    env = dict(subprocess_env(), PYTHONPATH=f"{ROOT}{os.pathsep}{tmp_path}")
    # A shell that runs this suite in the background starts it with SIGINT ignored, and Python keeps an
    # ignored SIGINT: give the CLI the default disposition a terminal user's Ctrl-C meets.
    supervisor = subprocess.Popen([sys.executable, "-m", "fake_cli", str(pids), "plain"], cwd=tmp_path, env=env,
                                  start_new_session=True, preexec_fn=_default_sigint)
    family = []
    try:
        wait_for_file(pids, supervisor, timeout=60)
        family = read_family(pids)
        assert len(family) == 2, "the child and its grandchild should be running by now"
        child = family[0]
        # The mechanism: the work runs in a child of the supervisor that leads a process group of its own.
        assert child.ppid() == supervisor.pid and os.getpgid(child.pid) == child.pid
        assert os.getpgid(family[1].pid) == child.pid
        os.kill(supervisor.pid, sig)
        code = supervisor.wait(timeout=30)
        assert code == (-signal.SIGKILL if sig == signal.SIGKILL else 128 + sig), code
        survivors = wait_gone(family, timeout=10)
        assert not survivors, f"alive after {sig.name} to the CLI: {describe(survivors)}"
    finally:
        kill_all(family)
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait()


def test_processes_cli_times_out_the_whole_group(tmp_path):
    """`python -m megatron_seed.platform.processes --timeout S -- CMD`: exit 124, nothing left."""
    pids = tmp_path / "pids"
    proc = run_process_group([sys.executable, "-m", "megatron_seed.platform.processes", "--timeout", "2",
                              "--grace", "1", "--", sys.executable, "-c", FAMILY, str(pids), "stubborn"],
                             cwd=ROOT, env=subprocess_env(), timeout=60, capture_output=True, text=True)
    assert proc.returncode == 124, proc.stderr
    family = read_family(pids)
    try:
        assert not wait_gone(family, timeout=3), describe(family)
    finally:
        kill_all(family)


def test_sigterm_to_the_demo_ends_its_curation_workers(tmp_path):
    """The demo itself, stopped during curation (seconds in; the full demo takes minutes): its
    supervised child, datatrove's Manager, forkserver and pool workers all end. Before the fix the
    demo ran in one process and SIGTERM killed only that process."""
    out = tmp_path / "demo"
    with open(tmp_path / "stderr.log", "w") as err:
        demo = subprocess.Popen([sys.executable, "-m", "megatron_seed.demo", "--out", str(out), "--max-files", "40",
                                 "--site-packages-files", "10", "--oracle-sample", "4"], cwd=ROOT, env=subprocess_env(),
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    top, seen = psutil.Process(demo.pid), {}
    try:
        deadline = time.monotonic() + 120
        while len(seen) < 4:  # the supervised child plus curation's processes
            assert demo.poll() is None and time.monotonic() < deadline, (tmp_path / "stderr.log").read_text()[-3000:]
            for p in top.children(recursive=True):
                seen.setdefault(p.pid, p)
            time.sleep(0.1)
        child = top.children()[0]
        assert os.getpgid(child.pid) == child.pid, "the demo's work should run in a process group of its own"
        os.kill(demo.pid, signal.SIGTERM)
        assert demo.wait(timeout=30) == 128 + signal.SIGTERM
        survivors = wait_gone(seen.values(), timeout=10)
        assert not survivors, f"alive after SIGTERM to the demo: {describe(survivors)}"
    finally:
        kill_all([top, *seen.values()])
        demo.wait()

