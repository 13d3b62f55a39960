"""Sandbox launcher: isolates itself, then executes the program. Runs as its own process.

    python -I -S launcher.py CONFIG_JSON

Standard library only (it starts with ``-I -S`` for speed and so nothing from the environment is
imported). Steps, in order, before ``execve`` of the program:

1. ``unshare(CLONE_NEWNS | CLONE_NEWNET)``: a private mount table and an empty network namespace
   (no interfaces up, not even loopback: every connect fails). Without root, a user namespace is
   created first and the caller's uid is mapped to 0 inside it.
2. Mounts (private to this process tree): read-only tmpfs over the hidden directories (home
   directories, /root, /tmp, /var/tmp, /dev/shm); the working directory bind-mounted at
   ``/tmp/sandbox`` (the only writable place); directories the interpreter and toolchains need
   that live under hidden paths (the Python installation under /root, a venv and its
   site-packages under /tmp or /home, ...) bind-mounted back read-only (``runner._under_hidden``).
   From here on, the death of the parent (runner or zygote) sends SIGTERM (:func:`die_with_parent`).
3. rlimits: CPU seconds, address space, processes, file size, open files, no core dumps.
4. A reaper stays behind (root inside the namespaces, child subreaper) and forks the program,
   which drops privileges: supplementary groups dropped, gid/uid set to the run's own
   unprivileged uid, so root-only files stay unreadable and other users' processes (the reaper,
   the runner) cannot be signalled. See :func:`supervise` for how nothing outlives the run.
5. ``execve`` with a scrubbed environment.

Any failure before ``execve`` exits with code 121 and a message on stderr (the runner reports
``sandbox_error``).
"""

import ctypes
import json
import os
import resource
import signal
import sys

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
SETUP_FAILED = 121
_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source, target, fstype, flags, data=None):
    _check(_libc.mount(source.encode() if source else None, target.encode(),
                       fstype.encode() if fstype else None, flags, data.encode() if data else None),
           f"mount {target}")


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


def die_with_parent(parent_pid, sig=signal.SIGTERM):
    """Have the kernel send ``sig`` to this process when the process that started it dies, even
    by SIGKILL, so no reaper or program outlives the runner (or the zygote) that would have
    stopped it.

    SIGTERM, not SIGKILL: a reaper (see :func:`supervise`) takes SIGTERM as "stop", kills and
    reaps everything of the run, then exits; killed outright it would leave the program running
    under init. The kernel sends the signal when the *thread* that forked this process exits:
    runner threads wait for their launcher until it is gone, and the zygote is single-threaded.
    Call it after :func:`_isolate`: a new user namespace (no root) changes credentials, which
    clears the setting. If the parent died before this call (getppid no longer names it) no
    signal will ever come, so exit now; nothing of the run has been started yet."""
    _check(_libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent_pid:
        os.write(2, b"sandbox set-up failed: the parent process is gone\n")
        os._exit(SETUP_FAILED)


def _isolate(cfg):
    root = os.geteuid() == 0
    if root:
        _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWNET), "unshare(mount, network)")
    else:
        uid, gid = os.getuid(), os.getgid()
        _check(_libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET), "unshare(user, mount, network)")
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"0 {uid} 1")
        _write("/proc/self/gid_map", f"0 {gid} 1")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    # Keep handles on what must stay reachable before covering the directories that hold it.
    work_fd = os.open(cfg["workdir"], os.O_RDONLY | os.O_DIRECTORY)
    keep = [(path, os.open(path, os.O_RDONLY | os.O_DIRECTORY)) for path in cfg["readonly_binds"]
            if os.path.isdir(path)]
    for path in cfg["hidden"]:
        if os.path.isdir(path):
            _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=755")
    target = "/tmp/sandbox"  # /tmp is hidden (a fresh tmpfs): the mount point exists only in here
    os.makedirs(target, exist_ok=True)
    _mount(f"/proc/self/fd/{work_fd}", target, None, MS_BIND)
    for path, fd in keep:
        os.makedirs(path, exist_ok=True)
        _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
        _mount(None, path, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_REC)
        os.close(fd)
    # Hidden tmpfs mounts are read-only from here on.
    for path in cfg["hidden"]:
        if os.path.isdir(path):
            _mount(None, path, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.close(work_fd)
    os.chdir(target)
    return target, root


def _limits(cfg):
    lim = cfg["limits"]
    cpu = int(lim["cpu_seconds"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    if lim.get("memory_bytes"):
        resource.setrlimit(resource.RLIMIT_AS, (lim["memory_bytes"], lim["memory_bytes"]))
    resource.setrlimit(resource.RLIMIT_NPROC, (lim["processes"], lim["processes"]))
    resource.setrlimit(resource.RLIMIT_FSIZE, (lim["file_bytes"], lim["file_bytes"]))
    resource.setrlimit(resource.RLIMIT_NOFILE, (lim["open_files"], lim["open_files"]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _drop_privileges(cfg, root):
    if root:
        os.setgroups([])
        os.setgid(cfg["uid"])
        os.setuid(cfg["uid"])  # after this, nothing above can be undone by the program
    _limits(cfg)


def _kill_all_as(uid):
    """SIGKILL every process of ``uid``: a forked helper takes the uid and signals -1 (all
    processes it may signal, i.e. exactly that uid's), then exits."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setuid(uid)
            os.kill(-1, 9)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


class _Stopped(Exception):
    """The runner asked the reaper to stop (SIGTERM): raised out of a blocking wait."""


def _kill_children():
    """SIGKILL this process's direct children (every descendant becomes one, as subreaper)."""
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/children") as f:
                pids = [int(p) for p in f.read().split()]
        except OSError:
            continue
        for pid in pids:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass


def supervise(cfg, root, run_program):
    """Fork the program (unprivileged) and stay behind as its reaper.

    The reaper keeps root (inside the namespaces), so the program cannot signal it, and is a
    child subreaper, so daemons that detach are re-parented to it instead of to init. When the
    program exits, or on SIGTERM from the runner (timeout), it kills every process of the run's
    uid, reaps them all and exits with the program's status: nothing is left behind, not even
    zombies."""
    _check(_libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(PR_SET_CHILD_SUBREAPER)")

    def stop_request(*_):
        # Both the runner (timeout) and the parent-death signal may send SIGTERM: only the first
        # may interrupt, a second one must not raise out of the clean-up below.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise _Stopped()

    signal.signal(signal.SIGTERM, stop_request)
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        try:
            _drop_privileges(cfg, root)
        except Exception as e:  # noqa: BLE001
            os.write(2, f"sandbox set-up failed: {e}\n".encode())
            os._exit(SETUP_FAILED)
        run_program()
        os._exit(SETUP_FAILED)  # run_program never returns
    status = None
    try:
        while status is None:
            try:
                done, st = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            if done == pid:
                status = st
    except _Stopped:
        pass
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while True:  # kill and reap everything that is left; orphans keep arriving as our children
        if root:
            _kill_all_as(cfg["uid"])
        _kill_children()
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            break
        except InterruptedError:
            continue
    if status is None:
        os._exit(124)  # stopped by the runner (timeout or output limit)
    if os.WIFSIGNALED(status):
        signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
        os.kill(os.getpid(), os.WTERMSIG(status))  # die the same way, so the runner sees it
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


def main():
    cfg = json.loads(sys.argv[1])
    try:
        target, root = _isolate(cfg)
        die_with_parent(cfg["parent_pid"])
        env = dict(cfg["env"], HOME=target, TMPDIR=target, PWD=target)
        argv = cfg["argv"]
    except Exception as e:  # noqa: BLE001 - any set-up failure is reported, never run unisolated
        sys.stderr.write(f"sandbox set-up failed: {e}\n")
        sys.stderr.flush()
        os._exit(SETUP_FAILED)

    def run_program():
        try:
            os.execve(argv[0], argv, env)
        except OSError as e:
            os.write(2, f"sandbox could not execute {argv[0]}: {e}\n".encode())
            os._exit(SETUP_FAILED)

    supervise(cfg, root, run_program)


if __name__ == "__main__":
    main()
