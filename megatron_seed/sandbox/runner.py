"""Run model-written programs in isolation and report what happened.

    from megatron_seed.sandbox import Sandbox, Limits
    box = Sandbox()
    result = box.run("print(input())", language="python", stdin="hi", test_code=None)
    result.status  # passed | failed | timeout | out_of_memory | crashed | sandbox_error

Each run gets a fresh working directory (removed afterwards), its own session and process
group, its own unprivileged uid (when the runner is root), rlimits, an empty network namespace and
a mount namespace that hides home directories and temporary directories (see ``launcher.py``).
When ``run`` returns, every process the program started is gone: the process group is killed,
then every process still owned by the run's uid (daemons that left the group), until none is left.

What this does not isolate: the kernel is shared (a kernel exploit escapes; gVisor or a VM
closes that), CPU time of the host is shared beyond the rlimits (cgroups would bound it), and
readable world-readable system files stay readable. Production deployments add containers or
gVisor around this, or delegate to a sandbox service (:class:`RemoteSandbox`).
"""

from __future__ import annotations

import json
import os
import queue
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from typing import Optional

from megatron_seed.sandbox.languages import LANGUAGES, Language, interpreter_dirs, toolchain_dirs

LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "launcher.py")
ZYGOTE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "zygote.py")
STATUSES = ("passed", "failed", "timeout", "out_of_memory", "crashed", "sandbox_error")
HIDDEN = ("/root", "/home", "/tmp", "/var/tmp", "/dev/shm", "/run/user", "/mnt", "/media")
_OOM_MARKERS = ("MemoryError", "std::bad_alloc", "out of memory", "Cannot allocate memory",
                "OutOfMemoryError", "memory allocation of", "fatal error: runtime: out of memory")


@dataclass
class Limits:
    wall_seconds: float = 10.0
    cpu_seconds: int = 10
    memory_bytes: int = 1 << 30       # address space; 0 = unlimited (JVMs reserve a lot of it)
    processes: int = 64
    file_bytes: int = 16 << 20
    open_files: int = 256
    output_bytes: int = 64 << 10      # kept per stream; more is counted and dropped
    kill_output_bytes: int = 8 << 20  # a program printing more than this is stopped


@dataclass
class Result:
    status: str
    exit_code: Optional[int]
    stdout: str
    stderr: str
    wall_time: float
    cpu_time: float
    truncated: bool = False
    detail: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


class Sandbox:
    """Runs programs locally under the isolation described above; ``max_workers`` at once."""

    def __init__(self, limits: Optional[Limits] = None, max_workers: int = 2, base_dir: Optional[str] = None,
                 first_uid: int = 61000, python_fast_path: bool = True):
        self.limits = limits or Limits()
        # Own directory per Sandbox, not per process: close() removes it, with the zygote's socket
        # and the working directories of runs in flight, which must not be another Sandbox's.
        self.base_dir = base_dir or tempfile.mkdtemp(prefix=f"megatron_seed_sandbox_{os.getpid()}_")
        os.makedirs(self.base_dir, mode=0o711, exist_ok=True)
        os.chmod(self.base_dir, 0o711)  # others may traverse to their own run directory, not list
        # Concurrent runs get distinct uids, so rlimits on processes and the final sweep are per run.
        offset = (os.getpid() % 500) * 64
        self._uids: "queue.Queue[int]" = queue.Queue()
        for i in range(max(max_workers, 1) * 2):
            self._uids.put(first_uid + offset + i)
        self.max_workers = max_workers
        self._hidden = tuple(h for h in HIDDEN if os.path.isdir(h))
        self._readonly_binds = _under_hidden(self._hidden)
        # Python programs run in forks of a pre-started interpreter (zygote.py), isolated the same way.
        self.python_fast_path = python_fast_path and hasattr(socket, "send_fds")
        self._zygote: Optional[subprocess.Popen] = None
        self._zygote_lock = threading.Lock()

    # ------------------------------------------------------------------ public API
    def available_languages(self) -> dict[str, bool]:
        return {name: lang.available() for name, lang in LANGUAGES.items()}

    def run(self, code: str, language: str = "python", stdin: str = "", test_code: Optional[str] = None,
            limits: Optional[Limits] = None) -> Result:
        lang = LANGUAGES.get(language)
        if lang is None:
            return _error(f"unknown language {language!r}; known: {', '.join(sorted(LANGUAGES))}")
        if not lang.available():
            return _error(f"language {language} is unavailable here: {lang.missing()}")
        limits = limits or self.limits
        uid = self._uids.get()
        workdir = tempfile.mkdtemp(prefix="run_", dir=self.base_dir)
        try:
            return self._run(lang, code, stdin, test_code, limits, uid, workdir)
        finally:
            if os.geteuid() == 0:  # safety net behind the reaper: nothing of this uid may survive
                _kill_uid(uid)
            shutil.rmtree(workdir, ignore_errors=True)
            self._uids.put(uid)

    def run_many(self, jobs: list[dict]) -> list[Result]:
        """Run ``jobs`` (keyword arguments of :meth:`run`) with at most ``max_workers`` at once,
        results in input order."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.max_workers) as pool:
            return list(pool.map(lambda job: self.run(**job), jobs))

    def close(self) -> None:
        with self._zygote_lock:
            self._stop_zygote()
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ one run
    def _run(self, lang: Language, code: str, stdin: str, test_code: Optional[str], limits: Limits,
             uid: int, workdir: str) -> Result:
        source = code if test_code is None else code + "\n\n" + test_code + "\n"
        with open(os.path.join(workdir, lang.filename), "w", encoding="utf-8") as f:
            f.write(source)
        if os.geteuid() == 0:
            os.chown(workdir, uid, uid)
            os.chown(os.path.join(workdir, lang.filename), uid, uid)
        os.chmod(workdir, 0o700)
        config = {
            "workdir": workdir, "uid": uid, "parent_pid": os.getpid(), "hidden": list(self._hidden),
            "readonly_binds": self._readonly_binds,
            "limits": {"cpu_seconds": limits.cpu_seconds, "memory_bytes": lang.memory(limits.memory_bytes),
                       "processes": limits.processes, "file_bytes": limits.file_bytes,
                       "open_files": limits.open_files},
            "env": {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1",
                    "PYTHONHASHSEED": "0"},
            "argv": lang.argv(sys.executable),
        }
        if lang.name == "python" and self.python_fast_path:
            return self._zygote_run(config, stdin, limits)
        start = time.monotonic()
        try:
            proc = subprocess.Popen([sys.executable, "-I", "-S", LAUNCHER, json.dumps(config)],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    start_new_session=True, cwd="/", env={"PATH": "/usr/bin:/bin"})
        except OSError as e:
            return _error(f"could not start the launcher: {e}")
        stdin_fd = os.dup(proc.stdin.fileno())  # _communicate closes it (EOF for the program)
        proc.stdin.close()
        out, err, truncated, reason, status, cpu = _communicate(
            stdin_fd, proc.stdout.fileno(), proc.stderr.fileno(), stdin.encode(), limits, proc.pid,
            lambda deadline: _reap(proc.pid, deadline))
        proc.stdout.close()
        proc.stderr.close()
        proc.returncode = os.waitstatus_to_exitcode(status)
        return _result(proc.returncode, out, err, truncated, reason, time.monotonic() - start, cpu, limits)

    # ------------------------------------------------------------------ Python fast path
    def _start_zygote(self) -> str:
        path = os.path.join(self.base_dir, "zygote.sock")
        if self._zygote is not None and self._zygote.poll() is None:
            return path
        self._stop_zygote()  # one that died: release its pipes
        if os.path.exists(path):
            os.remove(path)
        # stdin: a pipe only this process holds the write end of (close-on-exec and not passed to
        # launchers); the zygote exits at its EOF, i.e. when the Sandbox closes or this process dies.
        self._zygote = subprocess.Popen([sys.executable, "-I", ZYGOTE, path], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, cwd="/",
                                        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
        if self._zygote.stdout.readline().strip() != b"ready":
            raise RuntimeError("the sandbox zygote did not start")
        return path

    def _stop_zygote(self) -> None:
        if self._zygote is not None:
            self._zygote.kill()
            self._zygote.wait()
            self._zygote.stdin.close()
            self._zygote.stdout.close()
            self._zygote = None

    def _zygote_run(self, config: dict, stdin: str, limits: Limits) -> Result:
        start = time.monotonic()
        fds = [*os.pipe(), *os.pipe(), *os.pipe()]  # stdin r/w, stdout r/w, stderr r/w
        try:
            with self._zygote_lock:
                path = self._start_zygote()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(path)
            socket.send_fds(sock, [json.dumps(config).encode()], [fds[0], fds[3], fds[5]])
            pending = bytearray()
            pid = json.loads(_recv_line(sock, pending, time.monotonic() + 30))["pid"]
        except (OSError, RuntimeError, ValueError, KeyError, TypeError) as e:
            for fd in fds:
                os.close(fd)
            return _error(f"sandbox zygote: {e}")
        for fd in (fds[0], fds[3], fds[5]):
            os.close(fd)

        def reap(deadline):
            line = _recv_line(sock, pending, deadline)
            if line is None:
                return None, None
            done = json.loads(line) if line else {"status": 1 << 8, "cpu": 0.0}
            return done["status"], done["cpu"]

        try:
            out, err, truncated, reason, status, cpu = _communicate(fds[1], fds[2], fds[4], stdin.encode(), limits,
                                                                    pid, reap)
        finally:  # _communicate closed the stdin write end (fds[1])
            for fd in (fds[2], fds[4]):
                os.close(fd)
            sock.close()
        code = os.waitstatus_to_exitcode(status)
        return _result(code, out, err, truncated, reason, time.monotonic() - start, cpu, limits)


def _recv_line(sock, pending: bytearray, deadline: Optional[float]) -> Optional[bytes]:
    """One newline-terminated message from the zygote; None at the deadline, b"" if it hung up."""
    while b"\n" not in pending:
        sock.settimeout(None if deadline is None else max(deadline - time.monotonic(), 0.001))
        try:
            chunk = sock.recv(4096)
        except socket.timeout:
            return None
        except OSError:
            return b""
        if not chunk:
            return b""
        pending += chunk
    line, _, rest = bytes(pending).partition(b"\n")
    pending[:] = rest
    return line


def _result(code, out: bytes, err: bytes, truncated: bool, reason: str, wall: float, cpu: float,
            limits: Limits) -> Result:
    stdout, stderr = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
    return Result(_classify(code, stderr, reason, wall, limits), code, stdout, stderr, round(wall, 4),
                  round(cpu or 0.0, 4), truncated, reason)


def _under_hidden(hidden) -> list[str]:
    """Interpreter and toolchain directories that a hidden mount would cover (a venv under /tmp or
    /home, pyenv or rustup under /root): bound back read-only by ``launcher._isolate``.

    Each directory is taken both as named and with symlinks resolved (a venv's ``bin/python``
    points into the base installation). Never a hidden directory itself or one above it (a
    ``sys.path`` entry of ``/root`` would otherwise unhide all of /root), and a directory inside
    another one kept is dropped (it comes with its parent's recursive bind)."""
    named = {*interpreter_dirs(sys.executable), *toolchain_dirs()}
    dirs = {os.path.normpath(p) for d in named for p in (os.path.abspath(d), os.path.realpath(d))}
    keep = {d for d in dirs if any(_inside(d, h) for h in hidden) and not any(_inside(h, d) for h in hidden)}
    return sorted(d for d in keep if not any(other != d and _inside(d, other) for other in keep))


def _inside(path: str, top: str) -> bool:
    """``path`` is ``top`` or below it."""
    return path == top or path.startswith(top.rstrip("/") + "/")


def _communicate(stdin_fd: int, out_fd: int, err_fd: int, stdin: bytes, limits: Limits, pid: int, reap):
    """Feed stdin, collect capped stdout/stderr, enforce the wall clock and the output ceiling,
    then collect the exit. ``reap(deadline)`` returns (wait status, cpu seconds) or (None, None)
    if the program still runs at the deadline (None: wait as long as it takes).
    Returns (stdout, stderr, truncated, reason, status, cpu); reason is "", "timeout" or "output_limit"."""
    sel = selectors.DefaultSelector()
    buffers = {out_fd: bytearray(), err_fd: bytearray()}
    for fd in buffers:
        sel.register(fd, selectors.EVENT_READ)
    pending_in = memoryview(stdin)
    if pending_in:
        os.set_blocking(stdin_fd, False)
        sel.register(stdin_fd, selectors.EVENT_WRITE)
    else:
        os.close(stdin_fd)
    total, truncated, reason = 0, False, ""
    deadline = time.monotonic() + limits.wall_seconds
    while sel.get_map() and not reason:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            reason = "timeout"
            break
        for key, _ in sel.select(timeout=min(remaining, 0.5)):
            if key.fd == stdin_fd:  # feed stdin as the program reads it; EOF once all is written
                try:
                    written = os.write(stdin_fd, pending_in[:65536])
                except BlockingIOError:
                    written = 0
                except BrokenPipeError:  # the program closed its stdin: the rest is not wanted
                    written = len(pending_in)
                pending_in = pending_in[written:]
                if not pending_in:
                    sel.unregister(stdin_fd)
                    os.close(stdin_fd)
                continue
            chunk = os.read(key.fd, 65536)
            if not chunk:
                sel.unregister(key.fd)
                continue
            total += len(chunk)
            buf = buffers[key.fd]
            room = limits.output_bytes - len(buf)
            if room > 0:
                buf += chunk[:room]
            truncated = truncated or len(chunk) > room
            if total > limits.kill_output_bytes:
                reason = "output_limit"
                break
    if stdin_fd in sel.get_map():
        sel.unregister(stdin_fd)
        os.close(stdin_fd)
    sel.close()
    if reason:
        _stop(pid)
    status, cpu = reap(deadline if not reason else time.monotonic() + 5)
    if status is None:  # streams closed but the program is still running at the deadline
        reason = reason or "timeout"
        _stop(pid)
        status, cpu = reap(time.monotonic() + 5)
    if status is None:  # the reaper did not finish its clean-up in time: kill it and its group
        _kill_group(pid)
        status, cpu = reap(None)
    return bytes(buffers[out_fd]), bytes(buffers[err_fd]), truncated, reason, status, cpu


def _reap(pid: int, deadline: Optional[float]):
    """(wait status, cpu seconds) of a child of this process, or (None, None) if still running."""
    while True:
        if deadline is None:
            _, status, usage = os.wait4(pid, 0)
            return status, usage.ru_utime + usage.ru_stime
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            return status, usage.ru_utime + usage.ru_stime
        if time.monotonic() >= deadline:
            return None, None
        time.sleep(0.002)


def _classify(code: int, stderr: str, reason: str, wall: float, limits: Limits) -> str:
    if code == 121 and "sandbox" in stderr:
        return "sandbox_error"
    if reason == "timeout" or code in (-signal.SIGXCPU,) or wall >= limits.wall_seconds:
        return "timeout"
    if any(marker in stderr[-4000:] for marker in _OOM_MARKERS):
        return "out_of_memory"
    if reason == "output_limit":
        return "crashed"
    if code == 0:
        return "passed"
    if code < 0:
        return "crashed"  # killed by a signal (segfault, abort, file-size limit, ...)
    return "failed"


def _error(message: str) -> Result:
    return Result("sandbox_error", None, "", message, 0.0, 0.0, detail=message)


def _stop(pid: int) -> None:
    """Ask the run's reaper (launcher.supervise) to kill and reap everything, then exit."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_uid(uid: int, rounds: int = 50) -> None:
    """SIGKILL every process owned by ``uid`` until none is left (catches daemons that left the
    process group). Only meaningful for per-run uids, i.e. when the runner is root."""
    for _ in range(rounds):
        found = False
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/status") as f:
                    for line in f:
                        if line.startswith("Uid:"):
                            if int(line.split()[1]) == uid:
                                found = True
                                os.kill(int(entry), signal.SIGKILL)
                            break
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
        if not found:
            return
        time.sleep(0.01)
