"""The sandbox: HumanEval correctness, and each attack contained with the right status while the
host keeps working. Runs as the CI user (root here: per-run uids, namespaces)."""

from __future__ import annotations

import glob
import importlib.util
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import psutil
import pytest

from megatron_seed.evaluate.code import evaluate, pass_at_k
from megatron_seed.evaluate.problems import load_problems
from megatron_seed.sandbox import Limits, Sandbox
from megatron_seed.sandbox.remote import RemoteSandbox, make_server

from helpers import ROOT, subprocess_env

FAST = Limits(wall_seconds=5, cpu_seconds=5, memory_bytes=512 << 20)


@pytest.fixture(scope="module")
def box():
    with Sandbox(max_workers=2) as sandbox:
        yield sandbox


def uid_processes(uid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/status") as f:
                    if any(line.startswith("Uid:") and int(line.split()[1]) == uid for line in f):
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


def test_all_humaneval_canonical_solutions_pass_and_wrong_ones_fail(box):
    problems = load_problems("humaneval")
    samples = [{"task_id": t, "completion": p["canonical_solution"]} for t, p in problems.items()]
    samples += [{"task_id": t, "completion": "    return None\n"} for t in problems]
    summary, rows = evaluate(problems, samples, [1, 2], box, progress=False)
    canonical, wrong = rows[:len(problems)], rows[len(problems):]
    assert [r["task_id"] for r in canonical if not r["passed"]] == []
    assert sum(r["passed"] for r in wrong) <= 2  # a couple of problems accept None-like answers? none should
    assert summary["problems"] == 164 and summary["pass@1"] == pytest.approx(
        sum(r["passed"] for r in rows) / len(rows))


def test_pass_at_k_matches_the_combinatorial_definition():
    for n, c, k in [(10, 3, 1), (10, 3, 5), (20, 0, 3), (5, 5, 2), (100, 7, 10)]:
        want = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)


def test_evaluate_cli_writes_per_sample_results(tmp_path):
    problems = load_problems("humaneval")
    ids = list(problems)[:3]
    samples = tmp_path / "samples.jsonl"
    with open(samples, "w") as f:
        for t in ids:
            f.write(json.dumps({"task_id": t, "completion": problems[t]["canonical_solution"]}) + "\n")
            f.write(json.dumps({"task_id": t, "completion": "    raise ValueError\n"}) + "\n")
    proc = subprocess.run([sys.executable, "-m", "megatron_seed.evaluate.code", "--samples", str(samples),
                           "--k", "1,2"], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    assert summary["pass@1"] == 0.5 and summary["pass@2"] == 1.0
    rows = [json.loads(line) for line in (tmp_path / "samples_results.jsonl").read_text().splitlines()]
    assert [r["passed"] for r in rows] == [True, False] * 3 and rows[1]["result"] == "failed"


def test_stdin_exit_codes_and_results(box):
    r = box.run("print(input().upper())", stdin="hello\n")
    assert (r.status, r.stdout, r.exit_code) == ("passed", "HELLO\n", 0)
    r = box.run("import sys; sys.exit(3)")
    assert (r.status, r.exit_code) == ("failed", 3)
    big = "x" * (1 << 20) + "\n"  # larger than a pipe: fed as the program reads
    r = box.run("import sys; print(len(sys.stdin.read()))", stdin=big)
    assert (r.status, r.stdout) == ("passed", f"{len(big)}\n")
    r = box.run("def f(x):\n    return x * 2\n", test_code="assert f(2) == 4\nassert f(3) == 5\n")
    assert r.status == "failed" and "AssertionError" in r.stderr


def test_infinite_loop_times_out(box):
    r = box.run("while True:\n    pass\n", limits=Limits(wall_seconds=1.5, cpu_seconds=1))
    assert r.status == "timeout" and r.wall_time < 4


def test_fork_bomb_is_contained(box):
    r = box.run("import os, time\nprint(os.getuid(), flush=True)\nwhile True:\n    try:\n        os.fork()\n"
                "    except OSError:\n        time.sleep(0.01)\n", limits=Limits(wall_seconds=2, cpu_seconds=2))
    assert r.status == "timeout"
    uid = int(r.stdout.split()[0])
    assert uid_processes(uid) == []  # every process it made is gone
    assert box.run("print('alive')").stdout == "alive\n"


def test_memory_bomb_is_out_of_memory(box):
    r = box.run("blocks = []\nwhile True:\n    blocks.append(bytearray(64 << 20))\n", limits=FAST)
    assert r.status == "out_of_memory"


def test_huge_output_is_capped_and_stopped(box):
    limits = Limits(wall_seconds=10, output_bytes=4096, kill_output_bytes=1 << 20)
    r = box.run("while True:\n    print('x' * 10000)\n", limits=limits)
    assert r.truncated and len(r.stdout) <= 4096 and r.detail == "output_limit" and r.status == "crashed"
    assert r.wall_time < 5


def test_writes_outside_the_working_directory_fail(box, tmp_path):
    targets = ["/tmp/sandbox_escape", "/var/tmp/sandbox_escape", "/dev/shm/sandbox_escape", "/etc/sandbox_escape",
               "/root/sandbox_escape", f"{box.base_dir}/sandbox_escape", "/usr/sandbox_escape"]
    code = ("import json\nok = []\nfor p in %r:\n    try:\n        open(p, 'w').write('x')\n        ok.append(p)\n"
            "    except OSError:\n        pass\nopen('inside.txt', 'w').write('fine')\nprint(json.dumps(ok))\n") % targets
    r = box.run(code)
    assert r.status == "passed", r.stderr
    assert json.loads(r.stdout) == []
    assert not any(os.path.exists(p) for p in targets)


def test_secrets_and_home_directories_are_not_readable(box, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("token")
    code = ("import os, json\nres = {}\nfor p in ['/etc/shadow', %r]:\n    try:\n        open(p).read()\n"
            "        res[p] = 'read'\n    except OSError as e:\n        res[p] = type(e).__name__\n"
            "res['root'] = sorted(os.listdir('/root'))\nres['env'] = sorted(os.environ)\nprint(json.dumps(res))\n"
            ) % str(secret)
    r = box.run(code)
    res = json.loads(r.stdout)
    assert res["/etc/shadow"] == "PermissionError" and res[str(secret)] == "FileNotFoundError"
    visible = set(res["root"])
    host = set(os.listdir("/root")) if os.access("/root", os.R_OK) else set()
    assert visible < host or not host  # only toolchain directories bound back, never the rest
    assert not visible & {".ssh", ".bash_history", ".netrc", ".aws", ".config"}
    assert set(res["env"]) <= {"PATH", "LANG", "PYTHONDONTWRITEBYTECODE", "PYTHONHASHSEED", "HOME", "TMPDIR", "PWD",
                               "LC_CTYPE"}


def test_connecting_to_localhost_fails(box):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    r = box.run(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')")
    assert r.status == "failed" and "connected" not in r.stdout and "unreachable" in r.stderr.lower()
    with pytest.raises(socket.timeout):
        server.accept()
    server.close()


def test_killing_the_parent_fails(box):
    r = box.run(f"import os, signal\nfor pid in (os.getppid(), {os.getpid()}, 1):\n    try:\n"
                f"        os.kill(pid, signal.SIGKILL)\n        print('killed', pid)\n    except OSError as e:\n"
                f"        print(type(e).__name__)\n")
    assert "killed" not in r.stdout and r.stdout.count("PermissionError") == 3


def test_daemons_do_not_outlive_the_run(box):
    code = ("import os, sys, time\nprint(os.getuid(), flush=True)\nif os.fork() == 0:\n    os.setsid()\n"
            "    if os.fork() == 0:\n        time.sleep(60)\n    os._exit(0)\nprint('parent done')\n")
    r = box.run(code)
    assert r.status == "passed" and "parent done" in r.stdout
    assert uid_processes(int(r.stdout.split()[0])) == []


def test_os_system_runs_inside_the_sandbox(box):
    r = box.run("import os\nprint(os.system('id -u; cat /etc/shadow; touch /tmp/x /usr/x; "
                "python3 -c \"import socket; socket.create_connection((\\'127.0.0.1\\', 22))\"') != 0)")
    assert r.status == "passed"
    lines = r.stdout.split()
    assert lines[0] != "0" and lines[-1] == "True"  # not root; the failures propagated
    assert "Permission denied" in r.stderr and not os.path.exists("/usr/x")


def test_other_languages_and_the_exec_path():
    with Sandbox(max_workers=1, python_fast_path=False) as box:
        assert box.run("print(6 * 7)").stdout == "42\n"
        # /tmp inside holds the run's own directory, plus the top folder of any read-only bind of the
        # interpreter that lives under /tmp (a virtual environment made there); nothing else of the host.
        binds = {os.path.relpath(p, "/tmp").split(os.sep)[0] for p in box._readonly_binds
                 if os.path.commonpath([p, "/tmp"]) == "/tmp"}
        with tempfile.TemporaryDirectory(dir="/tmp") as host_only:
            seen = json.loads(box.run("import os, json; print(json.dumps(sorted(os.listdir('/tmp'))))").stdout)
        assert seen == sorted({"sandbox"} | binds) and os.path.basename(host_only) not in seen
        c = box.run('#include <stdio.h>\nint main(){int x; scanf("%d",&x); printf("%d\\n", x*2); return 0;}',
                    language="c", stdin="21")
        assert (c.status, c.stdout) == ("passed", "42\n")
        assert box.run("int main( {", language="c").status == "failed"
        assert box.run("echo $((6*7)); exit 2", language="bash").exit_code == 2
        assert box.run("x", language="cobol").status == "sandbox_error"
        languages = box.available_languages()
        for name, ok in languages.items():
            if not ok:
                r = box.run("", language=name)
                assert r.status == "sandbox_error" and "unavailable" in r.stderr


def test_remote_sandbox_service():
    with Sandbox(max_workers=1) as local:
        server = make_server("127.0.0.1", 0, local)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            remote = RemoteSandbox(f"http://127.0.0.1:{server.server_address[1]}")
            results = remote.run_many([{"code": "print(input())", "stdin": "via http"},
                                       {"code": "while True: pass", "limits": Limits(wall_seconds=1, cpu_seconds=1)}])
            assert (results[0].status, results[0].stdout) == ("passed", "via http\n")
            assert results[1].status == "timeout"
        finally:
            server.shutdown()
    # a host that refuses connections: retried until retry_for, then a sandbox_error Result
    assert RemoteSandbox("http://127.0.0.1:9", timeout=2, retry_for=1).run("print(1)").status == "sandbox_error"


# A process that owns Sandboxes with runs in flight: the zygote (started by a run_many worker
# thread that has exited since), a fast-path run (reaper + program forked by the zygote) and an
# exec-path run (launcher/reaper + program), both sleeping far beyond the test.
SANDBOX_OWNER = textwrap.dedent("""
    import sys, threading, time
    sys.path.insert(0, ROOT)
    from megatron_seed.sandbox import Limits, Sandbox
    fast, slow = Sandbox(max_workers=2), Sandbox(max_workers=1, python_fast_path=False)
    assert [r.status for r in fast.run_many([{"code": "print(1)"}])] == ["passed"]
    zygote = fast._zygote.pid
    time.sleep(0.3)  # the worker thread that started the zygote is gone: the zygote must not be
    assert fast.run("print(2)").stdout == "2\\n" and fast._zygote.pid == zygote, "zygote restarted"
    long = Limits(wall_seconds=300, cpu_seconds=60)
    for box in (fast, slow):
        threading.Thread(target=box.run, args=("import time; time.sleep(300)",), kwargs={"limits": long},
                         daemon=True).start()
    print("ready", flush=True)
    time.sleep(300)
""")


def _kill_and_expect_no_descendants(proc: subprocess.Popen, expected: int) -> None:
    """Wait until ``proc`` has at least ``expected`` descendants, SIGKILL it, and assert that
    every one of them is gone within a few seconds (zombies count as gone: PID 1 here may not
    reap the orphans)."""
    parent = psutil.Process(proc.pid)
    deadline = time.monotonic() + 30
    while len(parent.children(recursive=True)) < expected:
        assert time.monotonic() < deadline, f"{parent.children(recursive=True)} (expected {expected})"
        time.sleep(0.05)
    descendants = parent.children(recursive=True)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)

    def alive():
        left = []
        for p in descendants:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    left.append(f"{p.pid} {p.cmdline()[:4]}")
            except psutil.Error:  # gone, or turned zombie (cmdline raises) between the two calls
                pass
        return left

    deadline = time.monotonic() + 5
    while alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    left = alive()
    for p in descendants:  # on failure, do not leave the orphans running behind the test
        try:
            p.kill()
        except psutil.Error:
            pass
    assert left == []


def _kill_and_clean(proc: subprocess.Popen) -> None:
    """The killed process could not remove its Sandboxes' directories: remove them here."""
    proc.kill()
    proc.wait()
    for path in glob.glob(os.path.join(tempfile.gettempdir(), f"megatron_seed_sandbox_{proc.pid}_*")):
        shutil.rmtree(path, ignore_errors=True)


def test_nothing_outlives_a_killed_sandbox_owner():
    proc = subprocess.Popen([sys.executable, "-c", f"ROOT = {str(ROOT)!r}\n" + SANDBOX_OWNER], cwd=ROOT,
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line == "ready\n", proc.stderr.read() if proc.poll() is not None else line
        # zygote, its run's reaper and program; the exec path's launcher/reaper and program
        _kill_and_expect_no_descendants(proc, expected=5)
    finally:
        _kill_and_clean(proc)


def test_nothing_outlives_a_killed_sandbox_service():
    # --max-wall-seconds: the run below asks for 300 s, above the service's default maximum
    proc = subprocess.Popen([sys.executable, "-m", "megatron_seed.sandbox.remote", "--port", "0", "--workers", "1",
                             "--max-wall-seconds", "300"], cwd=ROOT, env=subprocess_env(), stderr=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stderr.readline()
        assert "serving on" in line, line + (proc.stderr.read() if proc.poll() is not None else "")
        remote = RemoteSandbox(line.split()[-1], timeout=60)
        assert remote.run("print(1)").status == "passed"  # the zygote exists from here on
        # A run in flight when the service dies; its request fails then, which is expected.
        threading.Thread(target=remote.run, args=("import time; time.sleep(300)",),
                         kwargs={"limits": Limits(wall_seconds=300, cpu_seconds=60)}, daemon=True).start()
        _kill_and_expect_no_descendants(proc, expected=3)  # zygote, run's reaper, program
    finally:
        _kill_and_clean(proc)


def test_sandbox_bench_reports_runs_that_did_not_pass():
    """bench/sandbox.py stops (exit 1) with this report instead of printing "0/164" as a rate."""
    spec = importlib.util.spec_from_file_location("bench_sandbox", ROOT / "bench" / "sandbox.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.failure_report("ours", [("HumanEval/0", "passed", ""), ("HumanEval/1", "passed", "")]) == ""
    report = bench.failure_report("ours", [("HumanEval/0", "passed", ""),
                                           ("HumanEval/1", "sandbox_error", "could not execute /tmp/v/bin/python\n"),
                                           ("HumanEval/2", "sandbox_error", "same"), ("HumanEval/3", "timeout", "")])
    assert report.startswith("[bench] FAILED: ours: 1/4 canonical HumanEval solutions passed")
    assert "sandbox_error: 2, passed: 1, timeout: 1" in report
    assert report.endswith("first failure HumanEval/1 (sandbox_error): could not execute /tmp/v/bin/python")
