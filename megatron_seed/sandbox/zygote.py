"""Python fast path: a pre-started interpreter that forks one isolated child per program.

Starting a Python interpreter costs ~80 ms of CPU here, more than most test programs take to
run. The zygote starts once (``python -I zygote.py SOCKET``, no secrets, clean environment) and
listens on a root-only Unix socket. Per request it forks; the child isolates itself exactly as
``launcher.py`` does (namespaces, hidden directories, rlimits, own uid), takes the request's
stdin/stdout/stderr (passed as file descriptors), and executes ``main.py`` in a fresh
``__main__`` namespace instead of exec'ing a new interpreter. The zygote is single-threaded
(fork-safe); it reaps children and answers each request with the exit status and CPU time.

Protocol on one connection: client sends JSON config + 3 fds (SCM_RIGHTS); zygote replies
``{"pid": N}`` then, when the child ends, ``{"status": WAITSTATUS, "cpu": SECONDS}``.

Lifetime: the zygote exits when its stdin (a pipe from the Sandbox) reaches EOF, i.e. when the
Sandbox closes or its process dies; each run's reaper gets SIGTERM when the zygote dies
(``launcher.die_with_parent``) and then kills and reaps its run. Nothing is left behind.
"""

import importlib.util
import json
import os
import selectors
import signal
import socket
import sys

_spec = importlib.util.spec_from_file_location(
    "megatron_seed_sandbox_launcher", os.path.join(os.path.dirname(os.path.abspath(__file__)), "launcher.py"))
launcher = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(launcher)


def _child(cfg, fds, zygote_pid):
    """In the forked child: isolate, then supervise the program; never returns."""
    try:
        os.setsid()
        for target, fd in zip((0, 1, 2), fds):
            os.dup2(fd, target)
        os.closerange(3, 65536)
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        target, root = launcher._isolate(cfg)
        launcher.die_with_parent(zygote_pid)  # the zygote gone: stop the run (SIGTERM to the reaper)
        os.environ.clear()
        os.environ.update(cfg["env"], HOME=target, TMPDIR=target, PWD=target)
        with open("main.py", encoding="utf-8") as f:
            source = f.read()
    except BaseException as e:  # noqa: BLE001 - set-up failure: report, never run the program
        os.write(2, f"sandbox set-up failed: {e}\n".encode())
        os._exit(launcher.SETUP_FAILED)
    launcher.supervise(cfg, root, lambda: _run_inline(source, target))


def _run_inline(source, target):
    """Execute main.py as ``python main.py`` would, in this (forked, unprivileged) interpreter."""
    sys.argv = ["main.py"]
    sys.path[:0] = [target]
    sys.stdin = open(0, "r", encoding="utf-8", errors="replace", closefd=False)
    code = 0
    try:
        exec(compile(source, os.path.join(target, "main.py"), "exec"),
             {"__name__": "__main__", "__file__": "main.py", "__builtins__": __builtins__})
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - the program's own failure: report like the interpreter
        import traceback

        traceback.print_exc()
        code = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code & 0xFF)


def serve(path):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chmod(path, 0o600)
    listener.listen(64)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, "accept")
    sel.register(wake_r, selectors.EVENT_READ, "wake")
    # stdin is a pipe whose write end only the Sandbox that started us holds: EOF means it is gone
    # (closed, or its process died, even by SIGKILL), and the zygote must not outlive it. A pipe,
    # not PR_SET_PDEATHSIG: that fires when the starting *thread* exits, and the zygote is started
    # by whichever thread runs first (often a short-lived run_many worker).
    sel.register(0, selectors.EVENT_READ, "parent")
    zygote_pid = os.getpid()
    children = {}  # pid -> connection waiting for its status
    print("ready", flush=True)
    while True:
        for key, _ in sel.select(timeout=1.0):
            if key.data == "accept":
                conn, _ = listener.accept()
                try:
                    msg, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
                    cfg = json.loads(msg)
                except (OSError, ValueError):
                    conn.close()
                    continue
                pid = os.fork()
                if pid == 0:
                    listener.close()
                    conn.close()
                    _child(cfg, fds, zygote_pid)
                for fd in fds:
                    os.close(fd)
                children[pid] = conn
                conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
            elif key.data == "parent":
                if not os.read(0, 4096):
                    # Runs in progress get SIGTERM from the kernel (die_with_parent) and clean up.
                    return
            else:
                os.read(wake_r, 4096)
        while children:  # reap every finished child, answering its client
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = children.pop(pid, None)
            if conn is not None:
                try:
                    conn.sendall(json.dumps({"status": status, "cpu": usage.ru_utime + usage.ru_stime}).encode()
                                 + b"\n")
                except OSError:
                    pass
                conn.close()


if __name__ == "__main__":
    serve(sys.argv[1])
